"""Warm mobility: mirror a VM's state to its planned destination ahead of the move.

A live migration's pre-copy (``state_precopy``) moves every entry of the VM
at PREPARE. For a move planned ahead (``[state_warm] plan``, the same on
both hosts), the source's agent keeps a *mirror* of that pre-copy at the
destination instead, refreshed every ``[state_warm] interval`` seconds, so
that PREPARE moves only what changed since (the SWITCHOVER delta runs as
before; see Refresh for what it carries).

* **Identity.** The hypervisor's migration id is not known ahead, so the
  mirror has one of its own, derived from the VM's name and the planned
  source and destination (``mirror_id``). Both hosts announce it
  (``StateHost.expect``) when the plan starts, with the same description
  (the directory's NICs): the state services refuse migrations that are
  neither announced nor vouched for by the directory, and a mirror is by
  definition a move the directory does not know yet.
* **Refresh** (source, ``WarmService``): push the VM's export under that
  identity, each kind whole the first time (which makes the source track
  the VM's changes, ``StateKind.track``) and then as a delta since the
  destination's newest import. A source's tracker (conntrack) keeps every
  change from the whole export on, so a refresh, the PREPARE remainder and
  the SWITCHOVER delta each carry what changed since that *base* (not since
  the previous transfer: measured in the lab, 100 changed sessions went at
  PREPARE and again at SWITCHOVER). ``[state_warm] rebase`` bounds the
  base's age (the mirror is removed and rebuilt whole), and so the delta
  inside the pause to the churn of that many seconds; it also keeps the
  base below ``[state_conntrack] refresh_below`` (packets refresh timeouts
  without raising events: an entry mirrored long ago could otherwise run
  out at the destination unseen). The source refreshes only while the
  directory places the VM at it with no move pending.
* **Adoption** (destination, ``state_precopy``): when the destination holds
  the mirror of the migration's plan (same VM name, hosts and NICs), it
  pulls only the delta since the mirror's newest import, and the kinds the
  mirror lacks whole, both under the mirror's identity; the move's state
  then stays under it (SWITCHOVER delta, revert on ABORTED, commit at
  COMPLETED). At SWITCHOVER the source hands the plan over (its refreshes
  stop for good, under the plan's lock, before the VM's entries may change
  as it leaves) and asks the destination which identity holds the imports.
  If the mirror went away during the adoption (a rebase raced it) the
  destination notices (``intact``) and pulls everything.
* **No effect ahead**: entries mirrored ahead involve only the VM's own
  addresses (the importer refuses others), which reach the destination only
  once the VM does: the argument of today's pre-copy, over a longer
  window. Only ``[state_warm] kinds`` are mirrored (conntrack by default:
  the bulk of the state, and inert until the VM's packets arrive).
* **Bounded**: a plan lives ``[state_warm] lifetime`` seconds on each host.
  A mirror not adopted by then is reverted by the destination itself (even
  if the source is gone) and the source stops tracking; cancelling a plan
  (``WarmService.cancel``) does the same at once. An adopted mirror is left
  to its migration.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import logging
import threading
import time
import weakref
from collections.abc import Iterable
from typing import Any

from oslo_config import cfg

from vmm_orchestrator.commands import Command
from vmm_orchestrator.errors import ConfigError, VmmError
from vmm_orchestrator.model import Migration, Vif, Workload, normalize_mac
from vmm_orchestrator.options import require
from vmm_state.importer import ImportReport, KindAnswer, LedgerEntry
from vmm_state.service import ExportStat, StateHost, StateSettings, Transfer
from vmm_state.wire import ServiceError

LOG = logging.getLogger(__name__)

GROUP = "state_warm"
PRECOPY = "precopy"

WARM_OPTS: list[cfg.Opt] = [
    cfg.MultiStrOpt(
        "plan",
        default=[],
        help="A planned move whose state is mirrored ahead: 'VM SOURCE DESTINATION "
        "VNI:MAC[,VNI:MAC...]' (the VM's name as the hypervisor reports it, NVE ids, its "
        "NICs; their addresses come from the directory). Repeat per VM. Set the same "
        "plans on the source and the destination.",
    ),
    cfg.FloatOpt(
        "interval",
        default=10.0,
        min=0.1,
        help="Seconds between two refreshes of a mirror.",
    ),
    cfg.FloatOpt(
        "rebase",
        default=120.0,
        min=1.0,
        help="Seconds after which a mirror is rebuilt from a whole export (removed at "
        "the destination, then pushed whole). A source tracks changes from its whole "
        "export on, so the changes since the base are sent again at each refresh, at "
        "PREPARE and in the SWITCHOVER delta: this bounds them. Keep it below "
        "[state_conntrack] refresh_below: timeouts that packets refresh raise no events, "
        "so an older base could let mirrored entries run out at the destination.",
    ),
    cfg.FloatOpt(
        "lifetime",
        default=3600.0,
        min=1.0,
        help="Seconds a plan lives on a host; a mirror not adopted by a migration by "
        "then is removed from the destination and the source stops tracking.",
    ),
    cfg.ListOpt(
        "kinds",
        default=["conntrack"],
        help="State kinds mirrored ahead (among [state] kinds); the others move at "
        "PREPARE as without a plan.",
    ),
]


def register_opts(conf: cfg.ConfigOpts) -> None:
    """Register ``[state_warm]`` on a bare configuration (tools, tests); ``vmm`` and
    the labs register it at load (``vmm_orchestrator.options.register_all``)."""
    try:
        conf.register_opts(WARM_OPTS, group=GROUP)
    except cfg.DuplicateOptError:
        pass


def list_opts() -> list[tuple[str, list[cfg.Opt]]]:
    """The ``[state_warm]`` options, for oslo-config-generator."""
    return [(GROUP, list(WARM_OPTS))]


# ------------------------------------------------------------------ identity


def mirror_id(workload: str, source: str, destination: str) -> str:
    """The mirror's migration id for a planned move of ``workload`` (the
    hypervisor's VM name) from ``source`` to ``destination``: the same on
    every host, computed from what both the plan and the real migration know."""
    digest = hashlib.sha256(f"{workload}\0{source}\0{destination}".encode()).hexdigest()
    return f"warm-{digest[:32]}"


def mirror_migration(workload: Workload, source: str, destination: str) -> Migration:
    """How both hosts describe a plan's mirror (NICs without port: the plan's
    description must not depend on what only the hypervisor knows)."""
    vifs = tuple(dataclasses.replace(v, port=None) for v in workload.vifs)
    return Migration(
        mirror_id(workload.name, source, destination),
        Workload(workload.name, vifs),
        source,
        destination,
    )


def _nics(workload: Workload) -> set[tuple[str, int]]:
    return {(normalize_mac(v.mac), v.vni) for v in workload.vifs}


@dataclasses.dataclass(frozen=True)
class PlanSpec:
    """One ``[state_warm] plan`` line: the VM's name, the hosts, its NICs (VNI, MAC)."""

    name: str
    source: str
    destination: str
    nics: tuple[tuple[int, str], ...]

    @classmethod
    def parse(cls, text: str) -> PlanSpec:
        """``VM SOURCE DESTINATION VNI:MAC[,VNI:MAC...]``; ConfigError if it is not."""
        parts = text.split()
        if len(parts) != 4:
            raise ConfigError(
                f"[state_warm] plan {text!r} is not 'VM SOURCE DESTINATION VNI:MAC[,VNI:MAC]'",
                hint="e.g. plan = web1 host-a host-b 100:52:54:00:00:64:0a",
            )
        name, source, destination, nics = parts
        found = []
        for nic in nics.split(","):
            vni, sep, mac = nic.partition(":")
            try:
                if not sep:
                    raise ValueError(nic)
                found.append((int(vni), normalize_mac(mac)))
            except ValueError:
                raise ConfigError(
                    f"[state_warm] plan {text!r}: {nic!r} is not VNI:MAC",
                    hint="e.g. 100:52:54:00:00:64:0a",
                ) from None
        if source == destination:
            raise ConfigError(f"[state_warm] plan {text!r} moves the VM to its own host")
        return cls(name, source, destination, tuple(found))

    def workload(self, nva: Any) -> Workload:
        """The VM's NICs with the addresses the directory registers for them."""
        if nva is None:
            raise ConfigError(
                "[state_warm] plan needs the directory for the NICs' addresses",
                hint="run the plan on an agent with a directory ([nva] url)",
            )
        vifs = []
        for vni, mac in self.nics:
            ep = nva.get_endpoint(vni, mac)
            vifs.append(Vif(mac, vni, tuple(ep.get("ipv4") or ()), tuple(ep.get("ipv6") or ())))
        return Workload(self.name, tuple(vifs))


# ------------------------------------------------------------ transfers


def pull_since(
    host: StateHost,
    migration: Migration,
    kinds: list[str],
    since: float | None,
    deadline: float,
    label: str = PRECOPY,
) -> Transfer:
    """Destination: pull ``kinds`` from the source, a delta from ``since``
    (the source's clock; None: whole), and import it here: StateHost.pull with a
    ``since`` and without freezing the heap (a mirror's id may outlive the move)."""
    return host.pull(migration, label, kinds, deadline, since=since, freeze=False)


def merged(transfers: list[Transfer]) -> Transfer:
    """One transfer of several (answers side by side, sizes and times added)."""
    if len(transfers) == 1:
        return transfers[0]
    answers: dict[str, KindAnswer] = {}
    exported: dict[str, ExportStat] = {}
    for t in transfers:
        answers.update(t.report.answers_for(t.report.answers))
        exported.update(t.exported)
    first = transfers[0].report
    report = ImportReport(
        first.migration,
        first.label,
        answers,
        bytes=sum(t.report.bytes for t in transfers),
        read_ms=sum(t.report.read_ms for t in transfers),
        check_ms=sum(t.report.check_ms for t in transfers),
        import_ms=sum(t.report.import_ms for t in transfers),
    )
    return Transfer(report, exported, sum(t.ms for t in transfers))


def push_since(
    host: StateHost,
    migration: Migration,
    label: str,
    kinds: list[str],
    deadline: float,
    synced: dict[str, float],
) -> Transfer:
    """Source: StateHost.push with the destination's ``synced`` already known
    (one round trip fewer inside the pause): each kind a delta from its
    newest import there, or whole."""
    return host.push(migration, label, kinds, deadline, synced=synced)


# ------------------------------------------------------------ plans


@dataclasses.dataclass
class Refresh:
    """One refresh of a mirror, as the source saw it."""

    at: float
    #: per kind "full" or "delta" (as exported)
    modes: dict[str, str]
    #: per kind: entries exported, and the destination's answer
    entries: dict[str, int]
    answers: dict[str, dict[str, Any]]
    bytes: int
    ms: float
    ok: bool


@dataclasses.dataclass
class Plan:
    """One planned move on one host (source or destination of it)."""

    migration: Migration
    expires: float
    #: the migration that took the mirror over (its id), if any
    handed_over: str | None = None
    based_at: float | None = None
    refreshes: list[Refresh] = dataclasses.field(default_factory=list)
    ended: str | None = None
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    def matches(self, migration: Migration) -> bool:
        m = self.migration
        return m.id == mirror_id(
            migration.workload.name, migration.source, migration.destination
        ) and _nics(m.workload) == _nics(migration.workload)


class WarmService:
    """A host's warm plans: as source it refreshes their mirrors, as destination
    it removes a mirror no migration adopted before the plan's end."""

    def __init__(
        self,
        host: StateHost,
        kinds: Iterable[str] = ("conntrack",),
        interval: float = 10.0,
        rebase: float = 120.0,
        lifetime: float = 3600.0,
        nva: Any = None,
    ) -> None:
        self.host = host
        self.kinds = [k for k in kinds if k in host.kinds]
        self.interval, self.rebase, self.lifetime = interval, rebase, lifetime
        self.nva = nva
        self.plans: dict[str, Plan] = {}
        #: configured plans waiting for the directory (``from_conf``)
        self.pending: list[PlanSpec] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def from_conf(cls, conf: cfg.ConfigOpts, host: StateHost, nva: Any = None) -> WarmService:
        """The plans of ``[state_warm] plan`` that involve ``host``; a plan whose NICs
        the directory cannot tell yet starts once it can (tried every interval)."""
        require(conf, GROUP, "warm mobility")
        group = conf[GROUP]
        service = cls(host, group.kinds, group.interval, group.rebase, group.lifetime, nva)
        specs = [PlanSpec.parse(text) for text in group.plan]
        service.pending = [s for s in specs if host.name in (s.source, s.destination)]
        if service.pending:
            service._resolve()
            service._start()
        return service

    def _resolve(self) -> None:
        """Start the configured plans whose NICs the directory now tells."""
        for spec in list(self.pending):
            try:
                workload = spec.workload(self.nva)
            except ConfigError:
                raise
            except Exception as err:
                LOG.warning("warm plan of %s: the directory cannot tell its NICs yet: %s",
                            spec.name, err)  # fmt: skip
                continue
            self.pending.remove(spec)
            self.plan(workload, spec.source, spec.destination)

    # -- plans ---------------------------------------------------------------

    def plan(
        self, workload: Workload, source: str, destination: str, lifetime: float | None = None
    ) -> Plan:
        """Start (or restart) a plan; the mirror follows within ``interval``."""
        if self.host.name not in (source, destination):
            raise VmmError(f"host {self.host.name} is neither {source} nor {destination}")
        migration = mirror_migration(workload, source, destination)
        plan = Plan(migration, time.monotonic() + (lifetime or self.lifetime))
        self.host.expect(migration)
        with self._lock:
            old = self.plans.get(migration.id)
            self.plans[migration.id] = plan
        if old is not None:
            old.ended = "replaced"
        self._start()
        self._wake.set()
        return plan

    def find(self, migration: Migration) -> Plan | None:
        """The live plan of ``migration``'s move, if any."""
        with self._lock:
            plan = self.plans.get(
                mirror_id(migration.workload.name, migration.source, migration.destination)
            )
        if plan is None or plan.ended or not plan.matches(migration):
            return None
        return plan

    def cancel(self, mirror: str, why: str = "cancelled") -> None:
        """End a plan now: its mirror is removed unless a migration took it over."""
        with self._lock:
            plan = self.plans.pop(mirror, None)
        if plan is not None:
            self._end(plan, why)

    def _end(self, plan: Plan, why: str) -> None:
        with plan.lock:
            if plan.ended and plan.ended != "replaced":
                return
            plan.ended = why
            if plan.handed_over is not None:
                LOG.info("warm plan %s ends (%s): left to %s", plan.migration.id, why,
                         plan.handed_over)  # fmt: skip
                return
            m, host = plan.migration, self.host
            if m.destination == host.name:
                reverted, errors = host.revert_imports(m, None)
                LOG.info("warm plan %s ends (%s): %d import(s) reverted here %s",
                         m.id, why, reverted, errors or "")  # fmt: skip
            else:
                try:
                    host.peer(m.destination).revert(m, None, time.monotonic() + 10.0)
                except (ServiceError, VmmError) as err:
                    LOG.warning("warm plan %s ends (%s): %s did not revert: %s",
                                m.id, why, m.destination, err)  # fmt: skip
            host.forget(m.id)

    # -- hand-over ------------------------------------------------------------

    def hand_over(self, plan: Plan, migration: Migration) -> None:
        """A migration takes the mirror over: no refresh, rebase or expiry touches it
        from now on (waits for a refresh under way)."""
        with plan.lock:
            plan.handed_over = migration.id

    def give_back(self, plan: Plan) -> None:
        """The migration aborted: the plan goes on (its mirror rebuilt from nothing)."""
        with plan.lock:
            plan.handed_over = None
            plan.based_at = None
        self.host.expect(plan.migration)

    def done(self, plan: Plan) -> None:
        """The migration completed: the plan is over here."""
        with self._lock:
            if self.plans.get(plan.migration.id) is plan:
                del self.plans[plan.migration.id]
        with plan.lock:
            plan.ended = "the VM moved"

    # -- the loop -------------------------------------------------------------

    def _start(self) -> None:
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return
            self._stop.clear()
            self._thread = threading.Thread(
                target=self._run, name=f"warm-{self.host.name}", daemon=True
            )
            self._thread.start()

    def stop(self) -> None:
        """Stop refreshing (the plans stay as they are; the mirrors expire at the
        destinations). Idempotent."""
        self._stop.set()
        self._wake.set()
        thread = self._thread
        if thread is not None:
            thread.join(30)

    def close(self) -> None:
        """Stop and end every plan (their mirrors removed)."""
        self.stop()
        with self._lock:
            plans, self.plans = list(self.plans.values()), {}
        for plan in plans:
            self._end(plan, "the service stopped")

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()
            if self.pending:
                try:
                    self._resolve()
                except ConfigError as err:
                    LOG.error("warm plans: %s", err)
                    self.pending.clear()
            with self._lock:
                plans = list(self.plans.values())
            for plan in plans:
                if self._stop.is_set():
                    return
                try:
                    self.tick(plan)
                except Exception as err:  # a plan's failure must not stop the others
                    LOG.warning("warm plan %s: %r", plan.migration.id, err)
            self._wake.wait(self.interval)

    def tick(self, plan: Plan) -> Refresh | None:
        """What the plan needs now: expire, or (source) rebase and refresh."""
        if plan.ended or plan.handed_over:
            return None
        if time.monotonic() >= plan.expires:
            with self._lock:
                if self.plans.get(plan.migration.id) is plan:
                    del self.plans[plan.migration.id]
            self._end(plan, "the plan's lifetime is over")
            return None
        if plan.migration.source != self.host.name:
            return None
        with plan.lock:
            if plan.ended or plan.handed_over:
                return None
            if not self.here(plan):
                return None  # a move under way, or the VM is elsewhere: leave the mirror
            if plan.based_at is not None and time.monotonic() - plan.based_at > self.rebase:
                m = plan.migration
                self.host.peer(m.destination).revert(m, None, time.monotonic() + 10.0)
                plan.based_at = None
            return self._refresh(plan)

    def here(self, plan: Plan) -> bool:
        """Whether the directory places the VM at this host with no move pending
        (no directory: assumed)."""
        if self.nva is None:
            return True
        try:
            for vif in plan.migration.workload.vifs:
                ep = self.nva.get_endpoint(vif.vni, vif.mac)
                if ep.get("pending_nve") or ep.get("nve") != self.host.name:
                    return False
        except Exception as err:
            LOG.info("warm plan %s: cannot ask the directory: %s", plan.migration.id, err)
            return False
        return True

    def _refresh(self, plan: Plan) -> Refresh:
        m, host = plan.migration, self.host
        deadline = time.monotonic() + host.settings.read_timeout
        started = time.perf_counter()
        synced = host.peer(m.destination).synced(m, deadline)
        done = push_since(host, m, PRECOPY, self.kinds, deadline, synced)
        refresh = Refresh(
            at=time.monotonic(),
            modes={k: ("delta" if k in synced else "full") for k in self.kinds},
            entries={k: s.entries for k, s in done.exported.items()},
            answers={k: a.to_dict() for k, a in done.report.answers.items()},
            bytes=done.report.bytes,
            ms=round((time.perf_counter() - started) * 1000.0, 3),
            ok=done.report.ok,
        )
        if done.report.ok and any(k not in synced for k in self.kinds):
            plan.based_at = time.monotonic()
        plan.refreshes.append(refresh)
        LOG.info("warm plan %s: %s", m.id, refresh)
        return refresh


# ------------------------------------------------- the stages' side (hosts)

#: StateHost -> its WarmService (``attach``); weak, so a stopped host goes away.
_SERVICES: weakref.WeakKeyDictionary[StateHost, WarmService] = weakref.WeakKeyDictionary()


def attach(host: StateHost, service: WarmService) -> WarmService:
    """Make ``service`` the warm plans the stages of ``host`` see."""
    _SERVICES[host] = service
    return service


def service_of(host: StateHost) -> WarmService | None:
    return _SERVICES.get(host)


#: Source: migration id -> the mirror identity its state moved under. Kept
#: in memory: an orchestrator restarted between SWITCHOVER and COMPLETED
#: leaves the mirror's undo data at the destination until the plan expires.
_MOVED_AS: dict[str, Migration] = {}
_MOVED_LOCK = threading.Lock()


def moved_as(migration_id: str) -> Migration | None:
    with _MOVED_LOCK:
        return _MOVED_AS.get(migration_id)


def note_moved_as(migration_id: str, mirror: Migration | None) -> None:
    with _MOVED_LOCK:
        if mirror is None:
            _MOVED_AS.pop(migration_id, None)
        else:
            _MOVED_AS[migration_id] = mirror


@dataclasses.dataclass
class Adoption:
    """The mirror the destination found at PREPARE."""

    plan: Plan
    #: kind -> source-clock time of the mirror's newest import (the delta's start)
    synced: dict[str, float]
    #: the mirror's ledger entries before the remainder's import (to check they survive)
    base: list[LedgerEntry]
    #: seconds since the mirror's newest import (the source's clock against ours)
    age: float

    @property
    def mirror(self) -> Migration:
        return self.plan.migration


def adopt(host: StateHost, migration: Migration) -> Adoption | None:
    """Destination, PREPARE: the mirror of this move held here, handed over to
    the migration; None if there is no plan or no mirror yet."""
    service = service_of(host)
    plan = service.find(migration) if service is not None else None
    if plan is None or service is None:
        return None
    service.hand_over(plan, migration)  # no expiry removes it from now on
    synced = host.importer.synced(plan.migration.id)
    if not synced:
        service.give_back(plan)
        return None
    base = host.importer.ledger.entries(plan.migration.id)
    return Adoption(plan, synced, base, max(0.0, time.time() - max(synced.values())))


def intact(host: StateHost, adoption: Adoption) -> bool:
    """Whether every ledger entry the remainder was built on is still here (a
    rebase that raced the adoption would have taken them)."""
    now = host.importer.ledger.entries(adoption.mirror.id)
    return all(any(e is n for n in now) for e in adoption.base)


def precopy_transfer(
    host: StateHost, adoption: Adoption, names: list[str], deadline: float
) -> Transfer:
    """Destination: the remainder since the mirror for the mirrored kinds among
    ``names``, the whole of the others; both under the mirror's identity."""
    mirrored = [k for k in names if k in adoption.synced]
    whole = [k for k in names if k not in adoption.synced]
    done: list[Transfer] = []
    if mirrored:
        since = min(adoption.synced[k] for k in mirrored) - host.settings.delta_margin
        done.append(pull_since(host, adoption.mirror, mirrored, since, deadline))
    if whole:
        done.append(pull_since(host, adoption.mirror, whole, None, deadline))
    return merged(done)


def abandon(host: StateHost, migration: Migration) -> Migration | None:
    """Destination, ABORTED: the plan whose mirror the migration took goes on
    (rebuilt from nothing); returns the mirror's identity, if any."""
    service = service_of(host)
    plan = service.find(migration) if service is not None else None
    if plan is None or service is None:
        return None
    if plan.handed_over == migration.id:
        service.give_back(plan)
    return plan.migration


def delta_identity(
    host: StateHost, migration: Migration, deadline: float
) -> tuple[Migration, dict[str, float]]:
    """Source, SWITCHOVER: hand the move's plan over (if any: its refreshes stop)
    and say which identity holds the destination's imports of this move (the
    migration's own, else the mirror's), and what it imported. Without a plan,
    what the destination told at PREPARE (``StateHost.held``) answers without
    a round trip inside the pause."""
    service = service_of(host)
    plan = service.find(migration) if service is not None else None
    held = host.take_held(migration.id)
    if plan is None and held:
        return migration, held
    if plan is not None and service is not None:
        service.hand_over(plan, migration)
    client = host.peer(migration.destination)
    synced = client.synced(migration, deadline)
    if synced or plan is None:
        return migration, synced
    theirs = client.synced(plan.migration, deadline)
    return (plan.migration, theirs) if theirs else (migration, synced)


def completed(host: StateHost, migration: Migration) -> None:
    """Source, COMPLETED: the plan of this move is over here."""
    service = service_of(host)
    plan = service.find(migration) if service is not None else None
    if plan is not None and service is not None:
        service.done(plan)


def resumed_plan(host: StateHost, migration: Migration) -> None:
    """Source, ABORTED after SWITCHOVER: the plan goes on."""
    service = service_of(host)
    plan = service.find(migration) if service is not None else None
    if plan is not None and service is not None and plan.handed_over == migration.id:
        service.give_back(plan)


# ------------------------------------------------------ composition root


def open_state_service(
    conf: cfg.ConfigOpts, spec: Any, directory: Any, peers: dict[str, str]
) -> StateHost:
    """Entry point of ``vmm_orchestrator.state_services``: the host's state service
    (``vmm_state.provider``) with its warm plans attached (``[state_warm] plan``)."""
    from vmm_state import provider

    host = provider.open_state_service(conf, spec, directory, peers)
    require(conf, GROUP, "warm mobility")
    if conf[GROUP].plan:
        attach(host, WarmService.from_conf(conf, host, nva=directory))
    return host


# ------------------------------------------------------------ the command


def mirror_status(mirror: Migration, client: Any, deadline: float) -> dict[str, float]:
    """Per mirrored kind, seconds since the mirror's newest import at the
    destination (``client``: a StateClient of the destination); {} if none."""
    synced = client.synced(mirror, deadline)
    now = time.time()
    return {kind: round(max(0.0, now - at), 1) for kind, at in sorted(synced.items())}


class StateCommand(Command):
    """``vmm state warm status``: the configured warm plans and their mirrors.

    The plans themselves are agent options (``[state_warm] plan`` on the
    source and the destination): an agent mirrors what its configuration
    plans. This command shows, from the same configuration, whether each
    destination holds its mirror and how fresh it is.
    """

    name = "state"
    help = "state moved with VMs: warm plans and their mirrors"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        sub = parser.add_subparsers(dest="state_command", required=True)
        warm_parser = sub.add_parser("warm", help="warm mobility: planned moves mirrored ahead")
        warm_sub = warm_parser.add_subparsers(dest="warm_command", required=True)
        warm_sub.add_parser(
            "status",
            help="per [state_warm] plan: its mirror id and, per kind, the age of the "
            "mirror at the destination",
        )

    def run(self, conf: cfg.ConfigOpts, args: argparse.Namespace) -> int:
        from vmm_orchestrator.cli import format_table
        from vmm_orchestrator.nva.client import NvaClient
        from vmm_state import options
        from vmm_state.client import StateClient

        require(conf, GROUP, "vmm state warm")
        require(conf, options.GROUP, "vmm state warm")
        specs = [PlanSpec.parse(text) for text in conf[GROUP].plan]
        if not specs:
            print("no warm plan is configured ([state_warm] plan)")
            return 0
        s = StateSettings.from_conf(conf)
        peers = dict(conf[options.GROUP].peers or {})
        rows = []
        with NvaClient.from_conf(conf) as nva:
            for spec in specs:
                mirror = mirror_migration(spec.workload(nva), spec.source, spec.destination)
                url = peers.get(spec.destination)
                if not url:
                    state = f"no URL for {spec.destination} in [state] peers"
                else:
                    client = StateClient(url, s.token, s.connect_timeout, s.read_timeout, s.tls)
                    try:
                        ages = mirror_status(mirror, client, time.monotonic() + s.read_timeout)
                        state = (
                            ", ".join(f"{k} {age} s old" for k, age in ages.items())
                            or "no mirror yet"
                        )
                    except (ServiceError, VmmError) as err:
                        state = f"unknown: {err}"
                    finally:
                        client.close()
                rows.append([spec.name, spec.source, spec.destination, mirror.id, state])
        print(format_table(["VM", "SOURCE", "DESTINATION", "MIRROR", "AT THE DESTINATION"], rows))
        return 0
