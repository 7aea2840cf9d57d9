"""Which migration phases a libvirt signal means on this host.

Pure: no libvirt import and no I/O, so every rule of the design's phases
table can be unit-tested with plain values. libvirt's numbers are mirrored
below (libvirt-domain.h, stable ABI since the versions that introduced them).

A signal alone is ambiguous; what it means depends on what this host already
saw of the domain, so a small per-domain ``Track`` is kept:

* RESUMED/MIGRATED is the destination's RESUMED, but on a host that is the
  *source* of a running migration it means the source took the VM back
  (the migration failed): ABORTED.
* SUSPENDED/MIGRATED is only a candidate switchover. libvirt 9.0 emits it,
  with the same detail and the same state reason (PAUSED/MIGRATION), both
  when QEMU stops the VM for the final copy and when an operator pauses a VM
  during an outgoing migration (``virsh suspend``; nova's force-complete),
  which leaves the migration iterating (measured on the libvirt lab; libvirt
  also refuses ``virsh resume`` until that migration job ends, so such a
  pause ends in a non-live completion or in an abort). What tells them apart
  is the job: the event source reads the outgoing job's statistics right
  after the pause (and after each later MIGRATION_ITERATION while paused)
  and hands them in as ``JobProgress``. The migration is in its final phase
  when the job ended, or when what remains fits in the migration's allowed
  downtime at QEMU's measured bandwidth, which is QEMU's own test for
  switching over, or when QEMU does not answer at all within a few
  milliseconds: it holds its big lock for the whole final copy (stop, last
  RAM pages, device state), so the read of a real pause returns only when
  the copy is done, 0.2-0.3 s later on the libvirt lab, which put the
  in-flight tunnel 29-76 ms before the destination's first RARP and once
  1.3 ms after it (a lost frame per stream). An operator's pause is
  answered at once. Measured at the real pause: 0 or 58 MiB left at 444
  MB/s (131 ms, under the 300 ms allowed); at an operator's pause of a
  1 MiB/s migration: 127 MiB left (124 s). With ``early_switchover`` (the
  default) SWITCHOVER runs at that fact, right after the pause; an
  operator's pause runs it only once its migration really switches over (a
  host so loaded that an operator's pause goes unanswered switches over
  early: frames for the paused VM then wait at the destination instead of
  the source, and an abort reverts the tunnel).
  Whatever the facts, the job's completion (STOPPED/MIGRATED or
  JOB_COMPLETED) is a switchover, and a resume here after an early
  SWITCHOVER aborts the source's part of the migration (its later
  completion is then ignored). Without ``early_switchover`` the source's
  SWITCHOVER waits for the completion, 0.37-0.48 s after the destination's
  RESUMED/MIGRATED on the libvirt lab, when peers have long converged and an
  in-flight tunnel no longer helps.
* Post-copy switches over at SUSPENDED/POSTCOPY (the VM runs at the
  destination from then on: no way back) and resumes at the destination
  with RESUMED/POSTCOPY, before RESUMED/MIGRATED.

A domain that *starts* here outside any migration (STARTED/BOOTED or
STARTED/RESTORED, or found running for one of those reasons at a
reconciliation) may be a cold move (draft-ietf-nvo3-vmm section 7): shut
down on another host, then defined and started here (``virsh migrate
--offline`` or undefine/define, then ``virsh start``). No phase of the live
pipeline fits it, so the decision only says ``started``; the caller reads
the directory and ``cold_verdict`` decides, per NIC, whether the network
must follow (the directory places the MAC at another NVE and no migration is
pending) or not.

``reconcile`` applies the same rules to a state read after a (re)connection,
so a migration that began, ended or failed while no event could arrive is
not missed. Decisions it cannot prove from libvirt alone (a domain that came
by migration before this host was watched) are marked ``confirm``: the caller
checks them against the directory before acting.
"""

from __future__ import annotations

import dataclasses
import enum
import threading
from collections.abc import Mapping
from typing import Any

from vmm_orchestrator.model import Phase, Role


class Event(enum.IntEnum):
    """virDomainEventType."""

    DEFINED = 0
    UNDEFINED = 1
    STARTED = 2
    SUSPENDED = 3
    RESUMED = 4
    STOPPED = 5
    SHUTDOWN = 6
    PMSUSPENDED = 7
    CRASHED = 8


# virDomainEvent*DetailType values this module reads.
STARTED_BOOTED = 0
STARTED_MIGRATED = 1
STARTED_RESTORED = 2
SUSPENDED_MIGRATED = 1
SUSPENDED_POSTCOPY = 7
SUSPENDED_POSTCOPY_FAILED = 8
RESUMED_MIGRATED = 1
RESUMED_POSTCOPY = 3
RESUMED_POSTCOPY_FAILED = 4
STOPPED_MIGRATED = 3

# virDomainState and the reasons this module reads.
STATE_RUNNING = 1
STATE_PAUSED = 3
STATE_SHUTOFF = 5
RUNNING_BOOTED = 1
RUNNING_MIGRATED = 2
RUNNING_RESTORED = 3
RUNNING_POSTCOPY = 10
PAUSED_MIGRATION = 2
PAUSED_STARTING_UP = 11
PAUSED_POSTCOPY = 12
PAUSED_POSTCOPY_FAILED = 13
SHUTOFF_MIGRATED = 4

# virDomainJobOperation.
JOB_MIGRATION_IN = 4
JOB_MIGRATION_OUT = 5

_EVENT_DETAILS: dict[Event, dict[int, str]] = {
    Event.DEFINED: {0: "ADDED", 1: "UPDATED", 2: "RENAMED", 3: "FROM_SNAPSHOT"},
    Event.UNDEFINED: {0: "REMOVED", 1: "RENAMED"},
    Event.STARTED: {0: "BOOTED", 1: "MIGRATED", 2: "RESTORED", 3: "FROM_SNAPSHOT", 4: "WAKEUP"},
    Event.SUSPENDED: {
        0: "PAUSED",
        1: "MIGRATED",
        2: "IOERROR",
        3: "WATCHDOG",
        4: "RESTORED",
        5: "FROM_SNAPSHOT",
        6: "API_ERROR",
        7: "POSTCOPY",
        8: "POSTCOPY_FAILED",
    },
    Event.RESUMED: {
        0: "UNPAUSED",
        1: "MIGRATED",
        2: "FROM_SNAPSHOT",
        3: "POSTCOPY",
        4: "POSTCOPY_FAILED",
    },
    Event.STOPPED: {
        0: "SHUTDOWN",
        1: "DESTROYED",
        2: "CRASHED",
        3: "MIGRATED",
        4: "SAVED",
        5: "FAILED",
        6: "FROM_SNAPSHOT",
    },
    Event.SHUTDOWN: {0: "FINISHED", 1: "GUEST", 2: "HOST"},
    Event.PMSUSPENDED: {0: "MEMORY", 1: "DISK"},
    Event.CRASHED: {0: "PANICKED", 1: "CRASHLOADED"},
}


def describe(event: int, detail: int) -> str:
    """``SUSPENDED/MIGRATED`` for (3, 1): how libvirt's docs and logs name a lifecycle event."""
    try:
        kind = Event(event)
    except ValueError:
        return f"EVENT{event}/{detail}"
    return f"{kind.name}/{_EVENT_DETAILS[kind].get(detail, str(detail))}"


# -- signals -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Lifecycle:
    """VIR_DOMAIN_EVENT_ID_LIFECYCLE."""

    event: int
    detail: int

    def __str__(self) -> str:
        return describe(self.event, self.detail)


@dataclasses.dataclass(frozen=True)
class Iteration:
    """VIR_DOMAIN_EVENT_ID_MIGRATION_ITERATION: only a migration's source emits it."""

    iteration: int

    def __str__(self) -> str:
        return f"MIGRATION_ITERATION {self.iteration}"


@dataclasses.dataclass(frozen=True)
class JobCompleted:
    """VIR_DOMAIN_EVENT_ID_JOB_COMPLETED; ``operation`` from its statistics, when given."""

    operation: int | None = None

    def __str__(self) -> str:
        return f"JOB_COMPLETED operation={self.operation}"


#: How far above QEMU's own switchover threshold (bandwidth x allowed downtime)
#: what remains may still count as the final phase: QEMU's bandwidth figure is
#: refreshed every 100 ms and a loaded host's lags. Too generous only means an
#: operator's pause close to the end switches over a little early.
FINAL_PHASE_SLACK = 2


@dataclasses.dataclass(frozen=True)
class JobProgress:
    """An outgoing migration job's statistics, read right after the source paused.

    ``active``: a migration job still runs (False: it ended, or the domain
    is gone). ``remaining`` and ``bps``: libvirt's memory_remaining (bytes)
    and memory_bps (QEMU's measured bandwidth, bytes/s);
    ``max_downtime_ms``: the migration's allowed downtime. None: not reported.
    """

    active: bool
    remaining: int | None = None
    bps: int | None = None
    max_downtime_ms: int | None = None
    #: Set instead of the figures when QEMU did not answer within this many ms:
    #: it holds its big lock for the whole final copy, and only then.
    busy_ms: int | None = None

    @property
    def final(self) -> bool:
        """The migration switches over now: the job ended, QEMU is too busy to
        answer (the final copy), or what is left fits in the allowed downtime
        (QEMU's own test, with FINAL_PHASE_SLACK)."""
        if not self.active or self.remaining == 0 or self.busy_ms is not None:
            return True
        if self.remaining is None or not self.bps or not self.max_downtime_ms:
            return False
        return self.remaining * 1000 <= self.bps * self.max_downtime_ms * FINAL_PHASE_SLACK

    def __str__(self) -> str:
        if not self.active:
            return "job ended"
        if self.busy_ms is not None:
            return f"job: QEMU busy (no answer in {self.busy_ms} ms), the final copy"
        left = "?" if self.remaining is None else f"{self.remaining / 2**20:.1f} MiB"
        rate = "?" if self.bps is None else f"{self.bps / 1e6:.1f} MB/s"
        return f"job: {left} left at {rate}, {self.max_downtime_ms} ms allowed downtime"


@dataclasses.dataclass(frozen=True)
class Hook:
    """A call of libvirt's qemu hook, relayed by the hook script."""

    op: str
    sub_op: str

    def __str__(self) -> str:
        return f"hook {self.op} {self.sub_op}"


@dataclasses.dataclass(frozen=True)
class Observed:
    """A domain's state as read after a (re)connection.

    ``job_operation`` is the operation of the domain's active job (libvirt's
    job statistics), None when there is no job or the driver cannot tell;
    ``progress`` that job's statistics when it is an outgoing migration.
    """

    active: bool
    state: int
    reason: int
    job_operation: int | None = None
    progress: JobProgress | None = None

    def __str__(self) -> str:
        job = f" job={self.job_operation}" if self.job_operation is not None else ""
        return f"observed active={self.active} state={self.state}/{self.reason}{job}"


@dataclasses.dataclass(frozen=True)
class Absent:
    """A domain this host tracked is gone (a transient domain that stopped or left)."""

    def __str__(self) -> str:
        return "absent"


Signal = Lifecycle | Iteration | JobCompleted | JobProgress | Hook | Observed | Absent


# -- decisions -----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Transition:
    """One phase to run on this host, and why.

    ``confirm``: the decision rests on a guess (the domain's history was not
    seen); run it only if the directory agrees a move happened.
    """

    phase: Phase
    role: Role
    why: str
    confirm: bool = False


@dataclasses.dataclass(frozen=True)
class Track:
    """What this host knows of one domain's current migration.

    ``role`` is None while no migration is known. ``done`` holds the phases
    already decided for it (so duplicates and replays decide nothing).
    ``paused`` is a source's candidate switchover (SUSPENDED/MIGRATED seen,
    job not yet completed). ``hook_prepared`` says the hook ran PREPARE for
    the incoming migration whose STARTED/MIGRATED has not arrived yet.
    """

    role: Role | None = None
    done: frozenset[Phase] = frozenset()
    paused: bool = False
    hook_prepared: bool = False

    @property
    def finished(self) -> bool:
        """No migration is under way: a new one may start."""
        if self.role is None:
            return True
        last = Phase.RESUMED if self.role is Role.DESTINATION else Phase.COMPLETED
        return bool(self.done & {last, Phase.ABORTED})

    def incoming(self) -> bool:
        return self.role is Role.DESTINATION and not self.finished

    def outgoing(self) -> bool:
        return self.role is Role.SOURCE and not self.finished


@dataclasses.dataclass(frozen=True)
class Decision:
    """The new track, the phases to run (in order) and, when nothing runs, why not.

    ``started`` (why, or None): the domain started here outside any migration;
    the caller checks the directory for a cold move (``cold_verdict``).
    """

    track: Track
    transitions: tuple[Transition, ...] = ()
    note: str | None = None
    started: str | None = None


def _emit(
    track: Track,
    wanted: tuple[Phase, ...],
    why: str,
    confirm: bool = False,
    paused: bool | None = None,
    hook_prepared: bool | None = None,
) -> Decision:
    """Decide ``wanted`` for the track's role, skipping phases already decided.

    ``paused`` / ``hook_prepared``, when given, replace the track's flags.
    """
    assert track.role is not None
    todo = tuple(p for p in wanted if p not in track.done)
    new = Track(
        role=track.role,
        done=track.done | set(todo),
        paused=track.paused if paused is None else paused,
        hook_prepared=track.hook_prepared if hook_prepared is None else hook_prepared,
    )
    return Decision(new, tuple(Transition(p, track.role, why, confirm) for p in todo))


def _as(track: Track, role: Role) -> Track:
    """The track in ``role``: the same one if it is that role's unfinished migration, else new."""
    if track.role is role and not track.finished:
        return track
    return Track(role=role)


def _aborted(track: Track, why: str) -> Decision:
    """The end of whatever was under way: ABORTED if this host already ran a phase of it."""
    ran = (track.incoming() and Phase.PREPARE in track.done) or (
        track.outgoing() and Phase.SWITCHOVER in track.done
    )
    if ran:
        # The migration is over: the domain starts afresh (duplicates then decide nothing).
        return Decision(Track(), _emit(track, (Phase.ABORTED,), why).transitions)
    if not track.finished:
        return Decision(Track(), note=f"{why}; nothing had run here for that migration")
    return Decision(Track())


def _source_completed(track: Track, why: str, confirm: bool = False) -> Decision:
    if track.role is Role.SOURCE and Phase.COMPLETED in track.done:
        return Decision(track)  # STOPPED/MIGRATED then JOB_COMPLETED: one completion
    src = _as(track, Role.SOURCE)
    return _emit(src, (Phase.SWITCHOVER, Phase.COMPLETED), why, confirm, paused=False)


def _destination_resumed(track: Track, why: str, confirm: bool = False) -> Decision:
    dst = track if track.role is Role.DESTINATION else Track(role=Role.DESTINATION)
    if Phase.RESUMED in dst.done:
        return Decision(dst)
    return _emit(dst, (Phase.PREPARE, Phase.RESUMED), why, confirm, hook_prepared=False)


def decide(track: Track, signal: Signal, early_switchover: bool = True) -> Decision:
    """Apply one signal to a domain's track (the rules are in the module docstring)."""
    if isinstance(signal, Lifecycle):
        return _lifecycle(track, signal)
    if isinstance(signal, Iteration):
        return Decision(_as(track, Role.SOURCE))
    if isinstance(signal, JobCompleted):
        return _job_completed(track, signal)
    if isinstance(signal, JobProgress):
        return _job_progress(track, signal, early_switchover)
    if isinstance(signal, Hook):
        return _hook(track, signal)
    if isinstance(signal, Observed):
        return _observed(track, signal, early_switchover)
    return _absent(track)


def _lifecycle(track: Track, sig: Lifecycle) -> Decision:
    name = str(sig)
    event, detail = sig.event, sig.detail
    if event == Event.STARTED:
        if detail != STARTED_MIGRATED:
            if track.finished and detail in (STARTED_BOOTED, STARTED_RESTORED):
                return Decision(Track(), started=f"{name}: started here, no migration under way")
            return _aborted(track, f"{name} while a migration was under way")
        if track.incoming() and track.hook_prepared:
            return Decision(dataclasses.replace(track, hook_prepared=False))
        return _emit(Track(role=Role.DESTINATION), (Phase.PREPARE,), name)
    if event == Event.SUSPENDED:
        if detail == SUSPENDED_POSTCOPY:
            return _emit(_as(track, Role.SOURCE), (Phase.SWITCHOVER,), name, paused=False)
        if detail == SUSPENDED_MIGRATED and not track.incoming():
            src = _as(track, Role.SOURCE)
            why = f"{name}: a candidate switchover (the real one, or an operator's pause)"
            return Decision(dataclasses.replace(src, paused=True), note=why)
        if detail == SUSPENDED_POSTCOPY_FAILED:
            return Decision(track, note=f"{name}: post-copy failed; the VM needs recovery")
        return Decision(track)
    if event == Event.RESUMED:
        if detail == RESUMED_POSTCOPY_FAILED:
            return Decision(track, note=f"{name}: post-copy failed; the VM needs recovery")
        if track.outgoing():
            if detail in (RESUMED_MIGRATED, RESUMED_POSTCOPY):
                return _aborted(track, f"{name} on the source: the migration failed")
            if Phase.SWITCHOVER in track.done:  # early switchover, then the VM runs here again
                return _aborted(track, f"{name}: the VM runs here again after an early switchover")
            note = f"{name}: the pause was a plain pause" if track.paused else None
            return Decision(dataclasses.replace(track, paused=False), note=note)
        if detail in (RESUMED_MIGRATED, RESUMED_POSTCOPY):
            return _destination_resumed(track, name)
        return Decision(track)
    if event == Event.STOPPED:
        if detail == STOPPED_MIGRATED:
            return _source_completed(track, name)
        return _aborted(track, name)
    return Decision(track)


def _job_completed(track: Track, sig: JobCompleted) -> Decision:
    outgoing = sig.operation == JOB_MIGRATION_OUT or (sig.operation is None and track.outgoing())
    if outgoing:
        return _source_completed(track, str(sig))
    return Decision(track)


def _job_progress(track: Track, sig: JobProgress, early_switchover: bool) -> Decision:
    """The statistics of a paused source's job: SWITCHOVER now if it is the final phase."""
    if not (early_switchover and track.outgoing() and track.paused):
        return Decision(track)
    if Phase.SWITCHOVER in track.done:
        return Decision(track)
    if sig.final:
        return _emit(track, (Phase.SWITCHOVER,), f"paused, {sig}: the switchover (early)")
    return Decision(track, note=f"paused, {sig}: not the switchover yet (an operator's pause?)")


def _hook(track: Track, sig: Hook) -> Decision:
    if (sig.op, sig.sub_op) == ("migrate", "begin"):
        return _emit(Track(role=Role.DESTINATION), (Phase.PREPARE,), str(sig), hook_prepared=True)
    if sig.sub_op == "end" and sig.op in ("stopped", "release") and track.incoming():
        return _aborted(track, f"{sig} before the VM resumed here")
    return Decision(track)


def _observed(track: Track, obs: Observed, early_switchover: bool) -> Decision:
    why = f"reconciled: {obs}"
    if not obs.active:
        if obs.reason == SHUTOFF_MIGRATED and obs.state == STATE_SHUTOFF:
            # The domain left by migration; unproven unless this host saw it leave.
            return _source_completed(track, why, confirm=not track.outgoing())
        return _aborted(track, why)
    if obs.job_operation == JOB_MIGRATION_IN:
        if track.incoming():
            return Decision(track)
        return _emit(Track(role=Role.DESTINATION), (Phase.PREPARE,), why)
    if obs.job_operation == JOB_MIGRATION_OUT:
        src = _as(track, Role.SOURCE)
        if obs.state == STATE_PAUSED and obs.reason == PAUSED_POSTCOPY:
            return _emit(src, (Phase.SWITCHOVER,), why, paused=False)
        paused = obs.state == STATE_PAUSED and obs.reason == PAUSED_MIGRATION
        src = dataclasses.replace(src, paused=paused)
        if paused and obs.progress is not None:
            return _job_progress(src, obs.progress, early_switchover)
        return Decision(src)
    # No migration job: whatever was under way has ended.
    running = obs.state == STATE_RUNNING
    if track.incoming():
        return _destination_resumed(track, why) if running else Decision(track)
    if track.outgoing():
        if running:
            return _aborted(track, f"{why}: the VM runs here again")
        return Decision(track)
    if track.role is None and running and obs.reason in (RUNNING_MIGRATED, RUNNING_POSTCOPY):
        return _destination_resumed(track, f"{why}: came by migration unseen", confirm=True)
    if track.role is None and running and obs.reason in (RUNNING_BOOTED, RUNNING_RESTORED):
        return Decision(track, started=f"{why}: running here, no migration under way")
    return Decision(track)


def _absent(track: Track) -> Decision:
    if track.outgoing():
        # A transient domain vanishes when it migrates away; it also does when destroyed.
        return _source_completed(track, "reconciled: gone from this host", confirm=True)
    return _aborted(track, "reconciled: gone from this host")


# -- cold mobility -------------------------------------------------------------


class Cold(enum.Enum):
    """What a domain started here outside a migration means for one NIC."""

    MOVE = "move"  # the directory places it at another NVE: move it here
    HERE = "here"  # already placed here: an ordinary (re)boot, nothing to move
    LEARNED = "learned"  # just moved here by the NVE agent's local learning: pin, announce
    IN_FLIGHT = "in_flight"  # a migration of it is pending: that migration decides
    REFUSED = "refused"  # sticky or frozen: the directory would refuse the move


#: How recent (seconds) an unplanned move here must be to count as the NVE
#: agent's local learning of the VM that just started (it may report the
#: MAC from the guest's first frame before the start event is handled).
LEARNED_WINDOW = 30.0


def cold_verdict(
    endpoint: Mapping[str, Any], host: str, now: float | None = None
) -> tuple[Cold, str]:
    """Decide a cold move of one NIC from the directory's endpoint (``get_endpoint``).

    ``host`` is this host's NVE id; ``now`` the wall clock (time.time()) to
    judge the endpoint's last move by. Pure: the caller did the reading.
    """
    at = endpoint.get("nve")
    mac = endpoint.get("mac")
    if endpoint.get("state") == "pending":
        return Cold.IN_FLIGHT, (
            f"{mac}: migration {endpoint.get('migration_id')} to "
            f"{endpoint.get('pending_nve')} is pending"
        )
    if at == host:
        moves = endpoint.get("moves") or []
        last = moves[-1] if moves else {}
        if (
            now is not None
            and last.get("to") == host
            and not last.get("planned")
            and now - float(last.get("at") or 0.0) <= LEARNED_WINDOW
        ):
            return Cold.LEARNED, (
                f"{mac}: moved here from {last.get('from')} by local learning just now"
            )
        return Cold.HERE, f"{mac}: the directory already places it at {host}"
    if endpoint.get("sticky"):
        return Cold.REFUSED, f"{mac}: sticky at {at}; a sticky MAC never moves"
    if endpoint.get("frozen"):
        return Cold.REFUSED, (
            f"{mac}: frozen at {at} ({endpoint.get('frozen_reason')}); "
            "release it with vmm nva endpoint release"
        )
    return Cold.MOVE, f"{mac}: at {at} in the directory, started at {host}: a cold move"


# -- per-host state ------------------------------------------------------------


class Tracker:
    """The tracks of one host's domains, by UUID; safe to use from several threads.

    Event handling and the hook server run on different threads and both
    decide for the same domains.
    """

    def __init__(self, early_switchover: bool = True) -> None:
        self.early_switchover = early_switchover
        self._tracks: dict[str, Track] = {}
        self._lock = threading.Lock()

    def apply(self, uuid: str, signal: Signal) -> Decision:
        """Decide ``signal`` for ``uuid`` and remember the new track."""
        with self._lock:
            decision = decide(self._tracks.get(uuid, Track()), signal, self.early_switchover)
            self._store(uuid, decision.track)
            return decision

    def reconcile(self, observed: Mapping[str, Observed]) -> dict[str, Decision]:
        """Decide a fresh view of every domain; tracked domains missing from it are Absent."""
        with self._lock:
            decisions: dict[str, Decision] = {}
            for uuid in sorted(set(self._tracks) | set(observed)):
                signal: Signal = observed.get(uuid, Absent())
                decision = decide(self._tracks.get(uuid, Track()), signal, self.early_switchover)
                self._store(uuid, decision.track)
                decisions[uuid] = decision
            return decisions

    def get(self, uuid: str) -> Track:
        with self._lock:
            return self._tracks.get(uuid, Track())

    def forget(self, uuid: str) -> None:
        """Drop what is known of ``uuid`` (a vetoed incoming migration never happened)."""
        with self._lock:
            self._tracks.pop(uuid, None)

    def snapshot(self) -> dict[str, Track]:
        with self._lock:
            return dict(self._tracks)

    def under_way(self) -> dict[str, Track]:
        """The domains whose migration has not reached this host's last phase yet.

        An agent told to stop waits for these (while still handling events) so
        that a migration it prepared gets its RESUMED (or ABORTED) before exit.
        """
        with self._lock:
            return {uuid: t for uuid, t in self._tracks.items() if not t.finished}

    def _store(self, uuid: str, track: Track) -> None:
        if track == Track():
            self._tracks.pop(uuid, None)
        else:
            self._tracks[uuid] = track
