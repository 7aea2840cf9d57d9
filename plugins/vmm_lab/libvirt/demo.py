"""The demo with a real libvirt guest: one real live migration per mode, under
echo probe streams, and a side-by-side report.

Modes (each in a fresh lab: same topology, same guest, same migration h1 -> h2):
  rarp          QEMU alone: no orchestrator; QEMU's own RARP self-announcement,
                which the NVE agents' local learning (EVPN-style MAC mobility)
                turns into a directory move;
  orchestrated  the HostAgents' pipelines watching the real libvirt events
                (hook relay PREPARE, early switchover, see vmm_lab.libvirt.site).

The probes. The guest cannot run probe.py's receiver, so its kernel is the
receiver: each peer (vm2 on h3, vm3 on h1, the gateway on h3) sends ICMP echo
requests whose payload is a probe packet to the guest's IPv4 and IPv6
address, and a reply counts as delivery (vmm_lab.libvirt.guest). The
streams run as separate processes (``python -m vmm_lab.libvirt.demo echo``),
so their 2 x 3 x ``rate`` packets per second do not compete for this
process's interpreter with the HostAgents' critical path.

The pause window, for ``probe.analyze``. libvirt's events arrive after the
fact, so two windows are reported:

* strict: from the source's SUSPENDED/MIGRATED event to the first RARP
  that QEMU sends on the destination's tap. QEMU sends it once the incoming
  stream is complete, just before libvirt resumes the guest: from that frame
  on the destination has taken over, and nothing sent later may be lost.
  The headline "lost after resume" and the black-hole times use this one.
* resumed: the same start, ending at the destination's RESUMED/MIGRATED
  event (which arrives 1-50 ms after the first RARP).

Duplicates: when the guest moves to h1, vm3's streams show hundreds of
duplicates. From PREPARE until RESUMED the destination's NVE floods the
guest's MAC locally (nve_prepare, the port does not exist yet), so a peer on
the destination reaches the guest twice: over VXLAN at the source, and into
the new tap, where the copies wait until the guest resumes. ``tap_dropped``
(the destination tap's tx_dropped) shows when that backlog filled the tap's
queue; the guest then loses fresh frames after resume while it drains it.

Per-NVE convergence is the time from that first RARP until the NVE agent
programmed the destination for the guest's MAC (``NveAgent.applied_at``).
libvirt's own downtime (its job statistics) and the migrateToURI3 wall time
are reported as libvirt measures them.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from types import FrameType
from typing import Any

from oslo_config import cfg
from pyroute2.netlink import NETLINK_ROUTE
from pyroute2.netlink.rtnl import RTMGRP_NEIGH
from pyroute2.netlink.rtnl.marshal import MarshalRtnl

from vmm_kernel import netns as netns_mod
from vmm_kernel.netns import socket_in
from vmm_lab.libvirt import guest as guest_mod
from vmm_lab.libvirt.migrate import (
    MigrationRecord,
    RarpWatch,
    TapArrivals,
    held_lateness_ms,
    migrate,
)
from vmm_lab.libvirt.site import LibvirtSite, lab_conf, libvirt_site
from vmm_lab.linux import probe
from vmm_lab.linux.topology import in_ns, new_prefix
from vmm_linux.nve import inflight_name
from vmm_orchestrator import journal as jr
from vmm_orchestrator.engine import PhaseReport
from vmm_orchestrator.errors import VmmError
from vmm_orchestrator.model import Phase

MODES = ("rarp", "orchestrated")
#: Peers that probe the guest: vm2 and the gateway over VXLAN from h3, vm3 on
#: h1 (the guest's bridge before the migration, its destination's after).
PROBERS = ("vm2", "vm3", "gw")
#: Echo requests per second per stream (6 streams). The TCG guest answers
#: 6 x 500 pps without loss in steady state, but not right after a resume:
#: it must first work through the frames queued on its new tap (the in-flight
#: tunnel's, up to the tap's 1000-frame queue), and at 6 x 500 pps it had no
#: headroom left, so the tap dropped fresh frames for 100-200 ms even with no
#: probing peer on the destination (34-112 lost per stream in 2 of 3
#: orchestrated migrations to h2). At 6 x 250 pps it keeps up; what is then
#: lost after resume is the network's.
DEFAULT_RATE = 250
WARMUP_S = 1.0  # probe traffic before the migration starts
#: Probe traffic after the migration returned: covers QEMU's five RARPs
#: (0.8 s) and the slowest NVE's convergence.
OBSERVE_S = 1.5
#: Upper bound of a probe process's life; it is stopped by SIGTERM long before.
PROBE_MAX_S = 600.0
PROBE_START_MARGIN_S = 1.0  # a late process starts when ready; warm-up counts from then
CONVERGE_TIMEOUT_S = 15.0
#: SWITCHOVER..COMPLETED of the source include hold_timer (3 s by default).
PIPELINE_TIMEOUT_S = 60.0


# -- probe processes --------------------------------------------------------------


class EchoRun:
    """Echo probe streams from the peers' namespaces to the guest, as processes."""

    def __init__(self, ls: LibvirtSite, probers: Sequence[str], rate: int, tag: str) -> None:
        self.ls = ls
        self.probers = list(probers)
        self.rate = rate
        self.tag = tag
        self.procs: dict[str, subprocess.Popen[str]] = {}
        self.outputs: dict[str, tuple[str, str]] = {}

    def start(self) -> float:
        """Start every stream; return the monotonic time they all began sending."""
        start_at = time.monotonic() + PROBE_START_MARGIN_S
        for peer in self.probers:
            for family, addr in (("v4", self.ls.ipv4), ("v6", self.ls.ipv6)):
                stream = f"{peer}-{family}"
                base = os.path.join(self.ls.workdir, f"{self.tag}-{stream}")
                self.outputs[stream] = (f"{base}.send.json", f"{base}.recv.json")
                self.procs[stream] = self.ls.lab_site.lab.popen(
                    self.ls.netns(peer),
                    *(sys.executable, "-m", "vmm_lab.libvirt.demo", "echo"),
                    *("--dst", addr, "--rate", str(self.rate), "--stream", stream),
                    *("--send-out", self.outputs[stream][0]),
                    *("--recv-out", self.outputs[stream][1]),
                    *("--start-at", f"{start_at:.6f}"),
                    stdout=subprocess.PIPE,
                )
        for stream, proc in self.procs.items():
            assert proc.stdout is not None
            line = proc.stdout.readline()
            if "ready" not in line:
                raise VmmError(f"echo probe {stream} did not start: {line!r}")
        return max(start_at, time.monotonic())

    def finish(self) -> dict[str, tuple[probe.SendLog, list[probe.Recv]]]:
        """Stop every stream (SIGTERM) and read what each sent and got back."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        logs = {}
        for stream, proc in self.procs.items():
            proc.wait(timeout=30)
            sent_path, recv_path = self.outputs[stream]
            logs[stream] = (probe.load_send_log(sent_path), probe.load_recv_log(recv_path))
        return logs

    def kill(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                with contextlib.suppress(Exception):
                    proc.wait(timeout=5)


# -- the in-flight tunnel, as the kernel shows it -----------------------------------


class FdbWatch:
    """Times the kernel added and removed the VXLAN entries for ``mac`` on ``ifindex``.

    Passive (a netlink listener in the host's namespace, as the NVE agent's
    local learning is), so watching adds no call to the NVE's own netlink
    thread, which the migration's critical path uses. Only "self" entries
    (the ones that name a remote VTEP) are recorded.
    """

    def __init__(self, netns: str, ifindex: int, mac: str) -> None:
        self.ifindex = ifindex
        self.mac = mac.lower()
        #: (monotonic, "add" | "del", VTEP)
        self.changes: list[tuple[float, str, str | None]] = []
        self._sock = socket_in(netns, socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE)
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            self._sock.bind((0, RTMGRP_NEIGH))
            self._sock.settimeout(0.1)
        except BaseException:
            self._sock.close()
            raise
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fdb-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        marshal = MarshalRtnl()
        while not self._stop.is_set():
            try:
                data = self._sock.recv(1 << 20)
            except TimeoutError:
                continue
            except OSError:
                return
            at = time.monotonic()
            for msg in marshal.parse(data):
                if (
                    msg.get("ifindex") != self.ifindex
                    or str(msg.get("NDA_LLADDR") or "").lower() != self.mac
                    or not msg.get("NDA_DST")
                ):
                    continue
                kind = "add" if msg.get("event") == "RTM_NEWNEIGH" else "del"
                self.changes.append((at, kind, str(msg.get("NDA_DST"))))

    def close(self) -> list[tuple[float, str, str | None]]:
        self._stop.set()
        self._thread.join(timeout=1)
        self._sock.close()
        return list(self.changes)


# -- one measured migration ---------------------------------------------------------


@dataclasses.dataclass
class MigrationResult:
    """Everything measured in one real migration (times in ms unless named _at)."""

    mode: str
    source: str
    destination: str
    #: Strict window: SUSPENDED event .. first RARP on the destination's tap.
    streams: list[probe.StreamReport]
    #: Same start, ending at the destination's RESUMED/MIGRATED event.
    streams_resumed: list[probe.StreamReport]
    #: Per NVE: first RARP -> the NVE programmed the destination (None: never).
    convergence_ms: dict[str, float | None]
    libvirt_downtime_ms: float | None
    wall_ms: float
    suspended_at: float
    took_over_at: float
    resumed_at: float
    rarp_ms: list[float]  # each RARP, from the first
    events_ms: list[str]  # every libvirt event, from the first RARP
    gateway_fdb_vtep: str | None
    destination_vtep: str
    #: Frames the destination's tap dropped because QEMU was not taking them
    #: (its 1000-frame queue full): before the resume and while the guest
    #: worked through the backlog after it.
    tap_dropped: int | None = None
    #: time.monotonic() when the migration call began.
    started_at: float = 0.0
    migration_ids: list[str] = dataclasses.field(default_factory=list)
    directory: dict[str, Any] = dataclasses.field(default_factory=dict)
    ack_convergence_ms: dict[str, float] = dataclasses.field(default_factory=dict)
    timeline: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    #: The in-flight tunnel on the source: (monotonic, add|del, VTEP) changes.
    inflight: list[tuple[float, str, str | None]] = dataclasses.field(default_factory=list)
    errors: list[str] = dataclasses.field(default_factory=list)
    reports: list[PhaseReport] = dataclasses.field(default_factory=list, repr=False)
    #: Probes sent while the guest was paused (SUSPENDED .. first RARP) that entered
    #: the destination's tap, and how much later than that first RARP the last of
    #: them came in (ms, 0: all before; see migrate.TapArrivals).
    held_in_tap: int = 0
    held_in_tap_late_ms: float | None = None

    @property
    def lost_after_resume(self) -> int:
        """Strict window, every stream."""
        return sum(s.lost_after_resume for s in self.streams)

    @property
    def lost_after_resumed_event(self) -> int:
        return sum(s.lost_after_resume for s in self.streams_resumed)

    @property
    def max_black_hole_ms(self) -> float:
        return max((s.black_hole_ms for s in self.streams), default=0.0)

    @property
    def max_convergence_ms(self) -> float | None:
        values = list(self.convergence_ms.values())
        if not values or any(v is None for v in values):
            return None
        return max(v for v in values if v is not None)

    @property
    def inflight_installed_ms(self) -> float | None:
        """In-flight tunnel to the destination installed, ms after the SUSPENDED event."""
        for at, kind, vtep in self.inflight:
            if kind == "add" and vtep == self.destination_vtep:
                return (at - self.suspended_at) * 1000.0
        return None

    @property
    def inflight_held_s(self) -> float | None:
        """How long the in-flight tunnel to the destination stayed in the kernel."""
        added = None
        for at, kind, vtep in self.inflight:
            if kind == "add" and vtep == self.destination_vtep and added is None:
                added = at
            elif kind == "del" and added is not None:
                return at - added
        return None

    def to_dict(self) -> dict[str, Any]:
        out = {
            f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "reports"
        }
        out["streams"] = [dataclasses.asdict(s) for s in self.streams]
        out["streams_resumed"] = [dataclasses.asdict(s) for s in self.streams_resumed]
        for name in (
            "lost_after_resume",
            "lost_after_resumed_event",
            "max_black_hole_ms",
            "max_convergence_ms",
            "inflight_installed_ms",
            "inflight_held_s",
        ):
            out[name] = getattr(self, name)
        return out


#: Per host, the reports an agent held before a migration (kept alive, so
#: identity tells them from newer ones even once the deque has rotated).
Marks = dict[str, list[PhaseReport]]


def report_marks(ls: LibvirtSite) -> Marks:
    """What each HostAgent has reported so far (pass to ``reports_of``)."""
    return {name: list(agent.reports) for name, agent in ls.agents.items()}


def journal_marks(ls: LibvirtSite) -> dict[str, set[str]]:
    """The migrations each ``vmm agent`` process has journalled so far."""
    return {name: {r.id for r in p.migrations()} for name, p in ls.processes.items()}


def wait_journalled(
    ls: LibvirtSite,
    since: dict[str, set[str]],
    hosts: Iterable[str],
    timeout: float = PIPELINE_TIMEOUT_S,
) -> tuple[list[str], list[str]]:
    """With ``vmm agent`` processes (whose reports stay in their processes): wait
    until each of ``hosts`` journalled a migration after ``since`` and ended it
    there; (the migration ids, what failed)."""
    deadline = time.monotonic() + timeout
    while True:
        new = {
            name: [r for r in p.migrations() if r.id not in since.get(name, set())]
            for name, p in ls.processes.items()
        }
        ended = all(new.get(h) and all(r.status != jr.RUNNING for r in new[h]) for h in hosts)
        if ended or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    errors = [
        f"{s.phase.value} on {name}: {s.stage}: {s.error}"
        for name, records in new.items()
        for r in records
        for s in r.stages
        if s.state == jr.STAGE_FAILED
    ]
    if not ended:
        errors.append(f"the agents did not journal the migration as ended within {timeout:.0f} s")
    return sorted({r.id for records in new.values() for r in records}), errors


def reports_of(ls: LibvirtSite, since: Marks) -> list[PhaseReport]:
    """Reports the HostAgents added after ``since`` was taken."""
    out: list[PhaseReport] = []
    for name, agent in ls.agents.items():
        old = {id(r) for r in since.get(name, [])}
        out.extend(r for r in list(agent.reports) if id(r) not in old)
    return out


def wait_reports(
    ls: LibvirtSite,
    since: Marks,
    expected: Iterable[tuple[str, Phase]],
    timeout: float = PIPELINE_TIMEOUT_S,
) -> list[PhaseReport]:
    """Wait until every (host, phase) in ``expected`` was reported, then until idle."""
    want = set(expected)
    deadline = time.monotonic() + timeout
    while True:
        got = reports_of(ls, since)
        if want <= {(r.host, r.phase) for r in got}:
            break
        if time.monotonic() > deadline:
            missing = sorted(f"{h} {p.value}" for h, p in want - {(r.host, r.phase) for r in got})
            raise VmmError(f"phases never reported within {timeout:.0f} s: {', '.join(missing)}")
        time.sleep(0.05)
    assert ls.daemon is not None
    ls.daemon.wait_idle(max(0.0, deadline - time.monotonic()))
    return reports_of(ls, since)


def wait_converged(ls: LibvirtSite, destination: str, timeout: float = CONVERGE_TIMEOUT_S) -> bool:
    """Wait until the directory and every NVE agent place the guest at ``destination``."""
    key = (ls.vni, ls.guest.mac)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        endpoint = ls.client().get_endpoint(ls.vni, ls.guest.mac)
        # (the NVE agents of this process: those of ``vmm agent`` processes journal theirs)
        placed = [h.agent.placement.get(key) for h in ls.lab_site.hosts.values()]
        if endpoint["nve"] == destination and all(p == destination for p in placed):
            return True
        time.sleep(0.05)
    return False


def measured_migration(
    ls: LibvirtSite,
    destination: str | None = None,
    *,
    rate: int = DEFAULT_RATE,
    probers: Sequence[str] = PROBERS,
    mode: str | None = None,
    warmup_s: float = WARMUP_S,
    observe_s: float = OBSERVE_S,
) -> MigrationResult:
    """Live-migrate the guest to ``destination`` (default: the other host) under echo
    probes, wait until the network settled, and measure it.

    Orchestrated: waits for the four phases of the migration (PREPARE and
    RESUMED at the destination, SWITCHOVER and COMPLETED at the source,
    hold timer included) and for every agent to be idle. QEMU alone: waits
    until the directory and every NVE place the guest at the destination.
    A failed migration raises MigrationFailed (the guest stays where it was).
    """
    src = ls.where
    dst = destination or ls.other(src)
    mode = mode or ("orchestrated" if ls.orchestrated else "rarp")
    lab = ls.lab_site
    dst_vtep = lab.lab.hosts[dst].vtep
    errors: list[str] = []
    marks = report_marks(ls)
    journalled = journal_marks(ls)
    with netns_mod.entered(ls.netns(src)):  # h1 and h2 may be ``vmm agent`` processes'
        inflight_ifindex = socket.if_nametoindex(inflight_name(ls.vni))
    # vm3 lives on h1, which a ``vmm agent`` process serves: the lab creates no VM there
    probers = [p for p in probers if p in lab.lab.vms]
    run = EchoRun(ls, probers, rate, f"{mode}-{src}-{dst}-{time.monotonic_ns()}")
    reports: list[PhaseReport] = []
    with contextlib.ExitStack() as cleanup:  # whatever fails, nothing keeps running
        rarp = RarpWatch(ls.netns(dst), ls.guest.mac, ls.guest.tap)
        cleanup.callback(rarp.close)
        arrivals = TapArrivals(ls.netns(dst), ls.guest.mac, ls.guest.tap)
        cleanup.callback(arrivals.close)
        fdb = FdbWatch(ls.netns(src), inflight_ifindex, ls.guest.mac)
        cleanup.callback(fdb.close)
        cleanup.callback(run.kill)
        began = run.start() if probers else time.monotonic()
        time.sleep(max(0.0, began + warmup_s - time.monotonic()))
        record = migrate(ls.guest.name, ls.hosts[src], ls.hosts[dst])
        ls.where = dst
        time.sleep(observe_s)
        logs = run.finish() if probers else {}
        rarp_times = rarp.close()
        arrived = arrivals.close()
        tap_dropped = _tap_dropped(ls.netns(dst), ls.guest.tap)
        ids: list[str] = []
        if ls.processes:
            ids, failed = wait_journalled(ls, journalled, (src, dst))
            errors += failed
        elif ls.orchestrated:
            try:
                reports = wait_reports(
                    ls,
                    marks,
                    [
                        (dst, Phase.PREPARE),
                        (dst, Phase.RESUMED),
                        (src, Phase.SWITCHOVER),
                        (src, Phase.COMPLETED),
                    ],
                )
            except VmmError as exc:
                errors.append(str(exc))
                reports = reports_of(ls, marks)
        if not wait_converged(ls, dst):
            errors.append(f"the directory and the NVEs did not all place the guest at {dst}")
        inflight = fdb.close()  # after COMPLETED: the hold timer has removed the tunnel
    suspended = record.paused_at
    resumed = record.resumed_at
    if suspended is None or resumed is None:
        raise VmmError(f"libvirt events missing from the record: {record.events}")
    if rarp_times:
        took_over = rarp_times[0]
    else:
        errors.append(f"no RARP seen on {dst}'s tap: the strict window ends at RESUMED")
        took_over = resumed
    strict = (int(min(suspended, took_over) * 1e9), int(took_over * 1e9))
    to_resumed = (int(suspended * 1e9), int(max(suspended, resumed) * 1e9))
    streams = [probe.analyze(sent, got, *strict) for sent, got in logs.values()]
    held_in_tap, held_late = held_lateness_ms(arrived, *strict)
    streams_resumed = [probe.analyze(sent, got, *to_resumed) for sent, got in logs.values()]
    errors += [f"{r.phase.value} on {r.host}: {r.error}" for r in reports if not r.ok]
    ids = ids or sorted({r.migration_id for r in reports})
    if ls.orchestrated and len(ids) != 1:
        errors.append(f"the phases carry {len(ids)} migration ids: {ids}")
    return MigrationResult(
        mode=mode,
        source=src,
        destination=dst,
        streams=streams,
        streams_resumed=streams_resumed,
        convergence_ms=_convergence(ls, dst, took_over, record),
        libvirt_downtime_ms=record.downtime_ms,
        wall_ms=round(record.wall_ms, 1),
        suspended_at=suspended,
        took_over_at=took_over,
        held_in_tap=held_in_tap,
        held_in_tap_late_ms=held_late,
        resumed_at=resumed,
        rarp_ms=[round((t - took_over) * 1000.0, 1) for t in rarp_times],
        events_ms=[
            f"{e.host} {e.event}/{e.detail} {(e.at - took_over) * 1000.0:+.1f}"
            for e in record.events
        ],
        gateway_fdb_vtep=lab.hosts[lab.lab.vms["gw"].host].nve.vxlan_dst(ls.vni, ls.guest.mac),
        destination_vtep=dst_vtep,
        tap_dropped=tap_dropped,
        started_at=record.started_at,
        migration_ids=ids,
        directory=ls.client().get_endpoint(ls.vni, ls.guest.mac),
        ack_convergence_ms=_ack_convergence(reports),
        timeline=_timeline(reports, record, took_over),
        inflight=inflight,
        errors=errors,
        reports=reports,
    )


def _tap_dropped(netns: str, tap: str) -> int | None:
    """The tap's tx_dropped counter (frames towards the guest it could not queue)."""
    out = in_ns(netns, "ip", "-s", "-j", "link", "show", tap, check=False)
    try:
        return int(json.loads(out)[0]["stats64"]["tx"]["dropped"])
    except (ValueError, LookupError, TypeError):
        return None


def _convergence(
    ls: LibvirtSite, destination: str, took_over: float, record: MigrationRecord
) -> dict[str, float | None]:
    """Per NVE: ms from the first RARP until its agent programmed ``destination``."""
    key = (ls.vni, ls.guest.mac)
    out: dict[str, float | None] = {}
    for name, host in sorted(ls.lab_site.hosts.items()):
        applied = host.agent.applied_at.get(key)
        if applied and applied[0] == destination and applied[1] >= record.started_at:
            out[name] = round((applied[1] - took_over) * 1000.0, 1)
        else:
            out[name] = None
    return out


def _ack_convergence(reports: list[PhaseReport]) -> dict[str, float]:
    """peer_update's directory commit -> NVE acknowledgement, per NVE."""
    for rep in reports:
        for t in rep.timeline:
            if "convergence_ms" in t.notes:
                return {k: round(float(v), 1) for k, v in t.notes["convergence_ms"].items()}
    return {}


#: Which libvirt event each phase's stages are timed from (host role, event, detail).
_PHASE_EVENT = {
    Phase.SWITCHOVER: ("source", "SUSPENDED", "MIGRATED"),
    Phase.RESUMED: ("destination", "RESUMED", "MIGRATED"),
    Phase.COMPLETED: ("source", "STOPPED", "MIGRATED"),
}


def _timeline(
    reports: list[PhaseReport], record: MigrationRecord, took_over: float
) -> list[dict[str, Any]]:
    """Stage rows; ``at_ms`` places each stage against the first RARP where the
    phase's libvirt event is known (PREPARE comes from the hook: no event)."""
    rows = []
    for rep in reports:
        origin = None
        if rep.phase in _PHASE_EVENT:
            role, event, detail = _PHASE_EVENT[rep.phase]
            host = record.source if role == "source" else record.destination
            origin = record.event_at(host, event, detail)
        for t in rep.timeline:
            at = None if origin is None else origin + t.started_offset_ms / 1000.0
            rows.append(
                {
                    "phase": rep.phase.value,
                    "host": rep.host,
                    "stage": t.stage,
                    "at_ms": None if at is None else round((at - took_over) * 1000.0, 1),
                    "start_ms": round(t.started_offset_ms, 1),
                    "duration_ms": round(t.duration_ms, 1),
                    "outcome": t.outcome,
                }
            )
    return rows


# -- the report ---------------------------------------------------------------------


def _ms(value: float | None) -> str:
    return "never" if value is None else f"{value:.1f}"


def render(results: Sequence[MigrationResult]) -> str:
    """The side-by-side report of one migration per mode."""
    lines = [
        "== Echo probe streams (lost after resume: strict = window ends at the first RARP "
        "on the destination tap; resumed = at the RESUMED/MIGRATED event) =="
    ]
    rows = []
    for res in results:
        for s, loose in zip(res.streams, res.streams_resumed, strict=True):
            rows.append(
                {
                    "mode": res.mode,
                    "stream": s.stream,
                    "sent": s.sent,
                    "paused": s.lost_while_paused,
                    "after": s.lost_after_resume,
                    "after_resumed": loose.lost_after_resume,
                    "dup": s.duplicates,
                    "bh": f"{s.black_hole_ms:.1f}" + ("" if s.converged else " (never)"),
                }
            )
    lines.append(
        probe.format_table(
            rows,
            [
                ("mode", "mode"),
                ("stream", "stream"),
                ("sent", "sent"),
                ("paused", "lost while paused"),
                ("after", "lost after resume"),
                ("after_resumed", "(to RESUMED)"),
                ("dup", "dup"),
                ("bh", "black-hole ms"),
            ],
        )
    )
    lines += ["", "== Per-NVE convergence: ms from the first RARP until the NVE forwards there =="]
    nves = sorted({n for r in results for n in r.convergence_ms})
    modes = [r.mode for r in results]
    heads = [
        r.mode if modes.count(r.mode) == 1 else f"{r.mode} {r.source}->{r.destination}"
        for r in results
    ]
    conv = [
        {"nve": n, **{f"c{i}": _ms(r.convergence_ms.get(n)) for i, r in enumerate(results)}}
        for n in nves
    ]
    lines.append(
        probe.format_table(conv, [("nve", "NVE")] + [(f"c{i}", h) for i, h in enumerate(heads)])
    )
    lines += ["", "== Summary (one live migration per mode) =="]
    summary = []
    for r in results:
        summary.append(
            {
                "mode": r.mode,
                "move": f"{r.source}->{r.destination}",
                "downtime": r.libvirt_downtime_ms,
                "wall": r.wall_ms,
                "window": round((r.took_over_at - r.suspended_at) * 1000.0, 1),
                "resumed": round((r.resumed_at - r.took_over_at) * 1000.0, 1),
                "after": r.lost_after_resume,
                "after_resumed": r.lost_after_resumed_event,
                "bh": round(r.max_black_hole_ms, 1),
                "conv": _ms(r.max_convergence_ms),
                "gw": "new host" if r.gateway_fdb_vtep == r.destination_vtep else "STALE",
                "tap": r.tap_dropped,
                "tunnel": "-"
                if r.inflight_installed_ms is None
                else f"+{r.inflight_installed_ms:.0f} ms, {_ms(r.inflight_held_s)} s",
            }
        )
    lines.append(
        probe.format_table(
            summary,
            [
                ("mode", "mode"),
                ("move", "move"),
                ("downtime", "libvirt downtime ms"),
                ("wall", "wall ms"),
                ("window", "SUSPENDED->1st RARP ms"),
                ("resumed", "1st RARP->RESUMED ms"),
                ("after", "lost after resume"),
                ("after_resumed", "(to RESUMED)"),
                ("bh", "max black-hole ms"),
                ("conv", "max convergence ms"),
                ("gw", "gateway NVE -> guest"),
                ("tap", "dst tap drops"),
                ("tunnel", "in-flight tunnel (after SUSPENDED, held)"),
            ],
        )
    )
    for r in results:
        if r.timeline:
            lines += [
                "",
                f"== Pipeline timeline ({r.mode}, migration {', '.join(r.migration_ids)}; "
                "at = ms from the first RARP, start = ms from the phase's event) ==",
            ]
            lines.append(
                probe.format_table(
                    r.timeline,
                    [
                        ("phase", "phase"),
                        ("host", "host"),
                        ("stage", "stage"),
                        ("at_ms", "at ms"),
                        ("start_ms", "start ms"),
                        ("duration_ms", "duration ms"),
                        ("outcome", "outcome"),
                    ],
                )
            )
            if r.ack_convergence_ms:
                acks = ", ".join(f"{k} {v:.1f}" for k, v in sorted(r.ack_convergence_ms.items()))
                lines.append(f"directory commit -> NVE acknowledgement ms: {acks}")
        lines.append(f"libvirt events ({r.mode}, ms from the first RARP): {'; '.join(r.events_ms)}")
        for err in r.errors:
            lines.append(f"ERROR ({r.mode}): {err}")
    return "\n".join(lines)


# -- running it -----------------------------------------------------------------------


def check_prerequisites() -> None:
    """Refuse to start without what the real-libvirt lab needs, saying what to install."""
    if os.geteuid() != 0:
        raise VmmError("the libvirt lab needs root", hint="run it as root, e.g. with sudo")
    for tool, package in (
        ("ip", "iproute2"),
        ("libvirtd", "libvirt-daemon-system"),
        ("tini", "tini"),
        ("qemu-system-x86_64", "qemu-system-x86"),
    ):
        if shutil.which(tool) is None and not os.path.exists(f"/usr/sbin/{tool}"):
            raise VmmError(f"the libvirt lab needs {tool}", hint=f"apt-get install {package}")


def run_mode(conf: cfg.ConfigOpts, mode: str, prefix: str, rate: int) -> MigrationResult:
    """One migration h1 -> h2 of the real guest in a fresh lab, in ``mode``."""
    with libvirt_site(conf, prefix, orchestrated=mode == "orchestrated") as ls:
        return measured_migration(ls, "h2", rate=rate, mode=mode)


def run_libvirt_demo(
    conf: cfg.ConfigOpts | None = None,
    json_out: str | None = None,
    modes: Sequence[str] | None = None,
    rate: int | None = None,
) -> int:
    """Run one real migration per mode and print the report; 0 only if the
    orchestrated run lost nothing after the guest resumed (strict window)."""
    modes = list(modes or MODES)
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise VmmError(
            f"the libvirt demo has no mode {', '.join(bad)}",
            hint=f"choose from {', '.join(MODES)} (QEMU always sends its RARPs)",
        )
    check_prerequisites()
    # One configuration for every mode: the orchestrator settings the site
    # overrides (stages, early_switchover, hook_timeout) are read by the
    # HostAgents only, which the QEMU-alone mode does not run.
    conf = conf if conf is not None else lab_conf()
    rate = rate or DEFAULT_RATE
    prefix = new_prefix()
    results = []
    for mode in modes:
        print(f"-- running mode {mode!r} with a real libvirt guest (lab prefix {prefix}{mode[0]})")
        results.append(run_mode(conf, mode, f"{prefix}{mode[0]}", rate))
    print()
    print(render(results))
    if json_out:
        with open(json_out, "w", encoding="utf-8") as fh:
            json.dump([r.to_dict() for r in results], fh, indent=2, default=str)
    status = 0
    for r in results:
        if r.mode == "orchestrated" and (r.lost_after_resume or r.errors):
            print(
                f"\nFAIL: the orchestrated run lost {r.lost_after_resume} packet(s) after the "
                "guest resumed" + (f"; errors: {r.errors}" if r.errors else ""),
                file=sys.stderr,
            )
            status = 1
    return status


# -- the echo probe process -----------------------------------------------------------


class _StopFlag:
    """Set by SIGTERM/SIGINT, polled by the sender (never interrupts a log write)."""

    def __init__(self) -> None:
        self.stop = False

    def __call__(self) -> bool:
        return self.stop

    def handle(self, signum: int, frame: FrameType | None) -> None:
        self.stop = True


def echo_main(argv: Sequence[str] | None = None) -> int:
    """``python -m vmm_lab.libvirt.demo echo``: one echo stream until SIGTERM.

    Like ``python -m vmm_lab.libvirt.guest echo`` but stopped by a signal, so
    the stream covers however long the migration takes, and the logs are
    written after the stop.
    """
    parser = argparse.ArgumentParser(prog="python -m vmm_lab.libvirt.demo")
    sub = parser.add_subparsers(dest="command", required=True)
    e = sub.add_parser("echo", help="probe the guest with ICMP echo until SIGTERM")
    e.add_argument("--dst", required=True)
    e.add_argument("--rate", type=float, required=True)
    e.add_argument("--stream", required=True)
    e.add_argument("--send-out", required=True)
    e.add_argument("--recv-out", required=True)
    e.add_argument("--start-at", type=float, help="CLOCK_MONOTONIC seconds to start at")
    e.add_argument("--duration", type=float, default=PROBE_MAX_S, help="at most (seconds)")
    args = parser.parse_args(argv)
    stop = _StopFlag()
    signal.signal(signal.SIGTERM, stop.handle)
    signal.signal(signal.SIGINT, stop.handle)
    sent, received = guest_mod.echo_probes(
        None,
        args.dst,
        args.rate,
        args.duration,
        args.stream,
        start_at_ns=None if args.start_at is None else int(args.start_at * 1e9),
        should_stop=stop,
        on_ready=lambda: print("ready", flush=True),
    )
    probe.write_send_log(sent, args.send_out)
    probe.write_recv_log(received, args.recv_out)
    return 0


if __name__ == "__main__":
    sys.exit(echo_main())
