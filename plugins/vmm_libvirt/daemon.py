"""The per-host daemon (`vmm agent`): libvirt events and hook calls in, pipeline
phases out.

For each configured host one ``HostAgent`` ties together:

* an event source on the host's libvirt URI;
* the phase rules (``phases.Tracker``), turning libvirt signals into phases;
* discovery and resolution, turning a domain into a ``Migration``;
* the host's ``Pipeline`` and ``Dispatcher``, which run the stages;
* the hook endpoint, where libvirt's ``migrate begin`` on the destination
  runs PREPARE and its outcome allows or vetoes the migration: the answer
  goes back as soon as every stage that can fail PREPARE ran (the
  directory's pre-stage, a state pre-copy), while its best-effort stages
  (the NVE's expectation, 40-90 ms of tc and nft under load on the libvirt
  lab) finish as libvirt starts the incoming QEMU;
* cold mobility (draft-ietf-nvo3-vmm section 7): a domain that starts here
  outside any migration while the directory places its MAC at another NVE
  was shut down there and started here. The network follows it as a
  planned move (``_cold_start``): prestage here, pin the MAC to its port,
  commit (sequence + 1, peers follow), announce. No state is imported: the
  VM restarted, and what the state kinds carry (sessions, snooped bindings,
  memberships, 802.1X/MACsec associations) belongs to the old run.

Handling runs on the event source's dispatcher thread (which may call
libvirt) and on the hook server's threads (which must not: libvirtd is
waiting for the hook). On its first connection a host recovers its journal,
locating each unfinished migration's VM through libvirt, before it handles
any event.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import libvirt
from oslo_config import cfg

from vmm_libvirt import discovery, events, options, phases
from vmm_libvirt.hook import HookServer
from vmm_libvirt.marks import IncomingMarks
from vmm_libvirt.resolve import NothingToMove, ResolveError, Resolver
from vmm_orchestrator import agent as root
from vmm_orchestrator import journal as jr
from vmm_orchestrator import metrics
from vmm_orchestrator.engine import IN_FLIGHT, Decided, Dispatcher, PhaseReport, Pipeline
from vmm_orchestrator.errors import ConfigError
from vmm_orchestrator.journal import Journal
from vmm_orchestrator.model import Migration, MigrationEvent, Phase, Role, Workload
from vmm_orchestrator.nva import errors as nva_errors
from vmm_orchestrator.options import require
from vmm_orchestrator.stage import HostContext, Stage

LOG = logging.getLogger(__name__)

#: The source's pause for a migration's final copy (or an operator's, during one).
PAUSED_FOR_MIGRATION = phases.Lifecycle(phases.Event.SUSPENDED, phases.SUSPENDED_MIGRATED)
#: The VM runs on this host again: every RESUMED detail but post-copy's (which
#: means it runs at the destination).
RUNS_HERE_AGAIN = frozenset(
    phases.Lifecycle(phases.Event.RESUMED, detail)
    for detail in range(8)
    if detail not in (phases.RESUMED_POSTCOPY, phases.RESUMED_POSTCOPY_FAILED)
)

#: (state, reason) of a VM that does not run here (yet): paused for a migration
#: (incoming, or the source's switchover) or still starting up.
_NOT_RUNNING_YET = {
    (phases.STATE_PAUSED, phases.PAUSED_MIGRATION),
    (phases.STATE_PAUSED, phases.PAUSED_STARTING_UP),
}
#: A destination's last phases of a migration: its guest's mark goes (see marks).
_ENDS_HERE = (Phase.RESUMED, Phase.ABORTED)


@dataclasses.dataclass(frozen=True)
class HostSpec:
    """One hypervisor host as the libvirt side sees it: the core's
    [host:<name>] part plus this plugin's (libvirt URI, hook socket)."""

    name: str
    uri: str
    vtep: str
    vnis: tuple[int, ...]
    netns: str | None
    hook_socket: str
    journal: str


def host_specs(conf: cfg.ConfigOpts) -> list[HostSpec]:
    """Every configured host, checked; ConfigError says what to fix."""
    require(conf, options.GROUP, "the libvirt event source")
    specs = [
        HostSpec(
            name=core.name,
            uri=conf[options.host_group(core.name)].uri,
            vtep=core.vtep,
            vnis=core.vnis,
            netns=core.netns,
            hook_socket=conf[options.host_group(core.name)].hook_socket
            or conf[options.AGENT_GROUP].hook_socket,
            journal=core.journal,
        )
        for core in root.host_specs(conf)
    ]
    sockets = [s.hook_socket for s in specs]
    shared = sorted({v for v in sockets if sockets.count(v) > 1})
    if shared:
        raise ConfigError(
            f"several hosts share hook_socket {', '.join(shared)}",
            hint="give each [host:<name>] group its own hook_socket",
        )
    return specs


class LibvirtDomains:
    """The ``libvirt`` service stages use: this host's domains by name."""

    def __init__(self, source: Any) -> None:
        self.source = source

    def lookup(self, name: str) -> Any:
        return self.source.connection().lookupByName(name)


def _report_line(report: PhaseReport) -> str:
    stages = ", ".join(f"{t.stage} {t.outcome} {t.duration_ms:.0f}ms" for t in report.timeline)
    status = "ok" if report.ok else f"FAILED: {report.error}"
    return (
        f"host {report.host}: migration {report.migration_id} {report.phase.value} as "
        f"{report.role.value}: {status}"
        + (f" [{stages}]" if stages else "")
        + (f" ({report.detail})" if report.detail else "")
    )


class HostAgent:
    """One host: events and hook calls -> phases -> its pipeline.

    ``source_factory(uri, handler, name)`` makes the event source (the
    daemon passes the configured plugin). ``siblings`` are the other hosts
    of the same daemon: recovery asks them too where a VM runs.
    """

    def __init__(
        self,
        conf: cfg.ConfigOpts,
        spec: HostSpec,
        context: HostContext,
        journal: Journal,
        stages: list[Stage] | None = None,
        source_factory: Callable[..., Any] | None = None,
        dispatcher: Dispatcher | None = None,
    ) -> None:
        require(conf, options.GROUP, "the libvirt host agent")
        self.conf = conf
        self.spec = spec
        self.name = spec.name
        self.context = context
        self.journal = journal
        self.dispatcher = dispatcher or Dispatcher(Pipeline(conf, context, journal, stages))
        self.pipeline = self.dispatcher.pipeline
        self._owns_dispatcher = dispatcher is None
        self.tracker = phases.Tracker(bool(conf[options.GROUP].early_switchover))
        self.resolver = Resolver(context.nva, spec.name)
        vni_of = discovery.VniMap(options.bridge_vnis(conf), options.bridge_pattern(conf))
        self.discovery = discovery.Discovery(
            vni_of, context.nva, list(conf[options.GROUP].address_sources)
        )
        make_source = source_factory or events.LibvirtEventSource.from_conf
        self.source = make_source(conf, spec.uri, self.on_item, name=spec.name)
        context.services.setdefault("libvirt", LibvirtDomains(self.source))
        self.hook_timeout = float(conf[options.AGENT_GROUP].hook_timeout)
        self.hook = HookServer(
            spec.hook_socket,
            self.on_hook,
            timeout=self.hook_timeout + 1.0,
            on_abandoned=self._hook_abandoned,
        )
        #: Guests coming in by a migration this agent allowed: the relay forwards
        #: their "stopped end"/"release end" and lets the others go on at once.
        self.marks = IncomingMarks(spec.hook_socket)
        #: Stopping: incoming migrations are refused, those under way finish.
        self._draining = False
        self.siblings: list[HostAgent] = []
        self.reports: collections.deque[PhaseReport] = collections.deque(maxlen=200)
        self.reconciled = threading.Event()
        self._recovered = False
        self._lock = threading.Lock()
        self._workloads: dict[str, Workload] = {}
        #: Domains whose departure the NVE watches since their pause here.
        self._departing: dict[str, Workload] = {}
        self._incoming: dict[str, Migration] = {}
        self._outgoing: dict[str, Migration] = {}
        self._pending: set[concurrent.futures.Future[Any]] = set()
        self._idle = threading.Condition(self._lock)
        #: Cold moves run here, off the event thread (they wait for peers' acks).
        self._cold_pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"cold-{spec.name}"
        )
        #: The last cold moves decided here (what _cold_start returned), newest last.
        self.cold_moves: collections.deque[dict[str, Any]] = collections.deque(maxlen=50)
        #: Seconds a cold move waits for every NVE of the VN to apply it (logged, not fatal).
        self.cold_ack_timeout = 3.0

    # -- life cycle -------------------------------------------------------------------

    def start(self) -> None:
        self.marks.open()
        self.hook.start()
        self.source.start()

    def stop(self) -> None:
        """Stop taking hook calls and events; queued phases finish (the
        assembled host's close waits for them when it owns the dispatcher)."""
        self.hook.stop()
        self.marks.close()
        self.source.stop()
        self._cold_pool.shutdown(wait=True)
        if self._owns_dispatcher:
            self.dispatcher.close(wait=True)

    def wait_idle(self, timeout: float) -> bool:
        """Wait until every submitted phase has been handled."""
        end = time.monotonic() + timeout
        with self._idle:
            while self._pending:
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(min(left, 60.0))
        return True

    # -- where a VM runs ----------------------------------------------------------------

    def runs_here(self, name: str) -> bool:
        """Whether VM ``name`` runs on this host (an incoming one still paused does not)."""
        try:
            dom = self.source.connection().lookupByName(name)
            state, reason = dom.state()
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return False
            raise
        if not dom.isActive():
            return False
        return (state, reason) not in _NOT_RUNNING_YET

    def migrating_here(self, name: str) -> bool:
        """Whether VM ``name`` is in a migration on this host now: an incoming one
        still paused, or one with an active (outgoing) migration job."""
        try:
            dom = self.source.connection().lookupByName(name)
            if not dom.isActive():
                return False
            if dom.state() == [phases.STATE_PAUSED, phases.PAUSED_MIGRATION]:
                return True
            return bool(dom.jobInfo()[0] != libvirt.VIR_DOMAIN_JOB_NONE)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return False
            raise

    def locate(self, migration: Migration) -> str | None:
        """Where the migration's VM runs, asking this host's libvirt then siblings';
        ``engine.IN_FLIGHT`` while a host still runs its migration job."""
        name = migration.workload.name
        agents = [self, *self.siblings]
        for agent in agents:
            try:
                if agent.migrating_here(name):
                    return IN_FLIGHT
            except events.NotConnected:
                continue
        for agent in agents:
            try:
                if agent.runs_here(name):
                    return agent.name
            except events.NotConnected:
                continue
        return self._directory_says(migration)

    def _directory_says(self, migration: Migration) -> str | None:
        """Where the directory places the VM's first NIC, when it holds it active
        (a VM gone from every libvirt this agent sees: its other host is served
        by another agent, which committed the move or not)."""
        get = getattr(self.context.nva, "get_endpoint", None)
        if get is None or not migration.workload.vifs:
            return None
        vif = migration.workload.vifs[0]
        try:
            entry = get(vif.vni, vif.mac)
        except nva_errors.NvaError as exc:
            LOG.warning("%s: cannot ask the directory where %s is: %s", self.name, vif.mac, exc)
            return None
        if entry.get("state") == "active" and entry.get("nve"):
            return str(entry["nve"])
        return None

    # -- events -------------------------------------------------------------------------

    def on_item(self, item: events.Item) -> None:
        """Handle one item from the event source (its dispatcher thread)."""
        if isinstance(item, events.Connected):
            if not self._recovered:
                self._recovered = True
                for report in self.pipeline.recover(self.locate):
                    LOG.warning("%s", _report_line(report))
                    self.reports.append(report)
        elif isinstance(item, events.Reconciled):
            self._reconcile(item)
        elif isinstance(item, events.DomainSignal):
            self._remember(item)
            decision = self.tracker.apply(item.uuid, item.signal)
            LOG.debug("%s: %s %s -> %s", self.name, item.name, item.signal, decision)
            if decision.note:
                LOG.info("%s: %s: %s", self.name, item.name, decision.note)
            if item.signal == PAUSED_FOR_MIGRATION and decision.track.paused:
                self._watch_departure(item.uuid)
            elif item.signal in RUNS_HERE_AGAIN:
                self._end_departure(item.uuid)
            elif any(t.phase is Phase.COMPLETED for t in decision.transitions):
                with self._lock:  # it left for good: its follow ended with SWITCHOVER
                    self._departing.pop(item.uuid, None)
            self._run(item.uuid, item.name, decision.transitions, item.monotonic)
            if decision.started:
                self._cold_start_later(item.uuid, item.name, decision.started)
        elif isinstance(item, events.Disconnected):
            LOG.info("%s: libvirt connection closed (%s)", self.name, item.reason)

    def _watch_departure(self, uuid: str) -> None:
        """The source paused the VM (the final copy, or an operator): let the NVE
        send its frames on to where it goes from now on, ahead of the job read and
        of SWITCHOVER (see the NVE's ``watch_departure``)."""
        nve = self.context.services.get("nve")
        with self._lock:
            workload = self._workloads.get(uuid)
        if nve is None or workload is None:
            return
        with self._lock:
            self._departing[uuid] = workload
        for vif in workload.vifs:
            if not vif.port:
                continue
            try:
                nve.watch_departure(vif.vni, vif.mac, vif.port)
            except Exception as exc:  # SWITCHOVER's in-flight tunnel still follows
                LOG.warning("%s: cannot watch %s leave: %s", self.name, vif.mac, exc)

    def _end_departure(self, uuid: str) -> None:
        """The VM resumed here (an operator's pause ended, a migration failed): its
        frames stay here, and what its departure watch sent on comes back (the
        NVE's ``end_departure``); SWITCHOVER's revert, if it ran, ends the rest."""
        with self._lock:
            workload = self._departing.pop(uuid, None)
        nve = self.context.services.get("nve")
        if nve is None or workload is None:
            return
        for vif in workload.vifs:
            try:
                nve.end_departure(vif.vni, vif.mac)
            except Exception as exc:
                LOG.warning("%s: cannot end the watch of %s: %s", self.name, vif.mac, exc)

    def _reconcile(self, item: events.Reconciled) -> None:
        observed = {}
        names = {}
        for dom in item.domains:
            observed[dom.uuid] = dom.observed
            names[dom.uuid] = dom.name
            if dom.xml:
                try:
                    workload = self.discovery.workload(dom.xml)
                except discovery.DomainXmlError as exc:
                    LOG.warning("%s: domain %s: %s", self.name, dom.name, exc)
                    continue
                with self._lock:
                    self._workloads[dom.uuid] = workload
        with self._lock:
            departing = list(self._departing)
        for uuid in departing:  # a RESUMED missed while disconnected (libvirtd restarted)
            seen = observed.get(uuid)
            if seen is not None and seen.active and seen.state == phases.STATE_RUNNING:
                self._end_departure(uuid)  # it runs here again
        decisions = self.tracker.reconcile(observed)
        LOG.info(
            "%s: reconciled %d domain(s) after connection %d",
            self.name,
            len(item.domains),
            item.generation,
        )
        for uuid, decision in decisions.items():
            name = names.get(uuid) or self._cached_name(uuid)
            if decision.note:
                LOG.info("%s: %s: %s", self.name, name, decision.note)
            self._run(uuid, name, decision.transitions, item.monotonic)
            if decision.started:
                self._cold_start_later(uuid, name, decision.started)
        with self._lock:  # forget the NICs of domains gone and no longer tracked
            keep = set(observed) | set(self.tracker.snapshot())
            for uuid in set(self._workloads) - keep:
                del self._workloads[uuid]
        self.reconciled.set()

    def _remember(self, item: events.DomainSignal) -> None:
        """Read a domain's NICs while it still exists here.

        A source's SWITCHOVER and COMPLETED run once the VM has left (a
        transient domain is gone by then), so its NICs must be known before:
        read any domain not seen yet, and refresh at the start of an outgoing
        migration (iteration 1) in case NICs changed since.
        """
        with self._lock:
            known = item.uuid in self._workloads
        starting = isinstance(item.signal, phases.Iteration) and item.signal.iteration == 1
        if not known or starting:
            workload = self._live_workload(item.uuid)
            if workload is not None:
                with self._lock:
                    self._workloads[item.uuid] = workload
                self._locate_taps(workload)

    def _locate_taps(self, workload: Any) -> None:
        """Have the host find who reads the domain's taps now, ahead of any pause:
        at SWITCHOVER what they queued goes on with the VM (``leftovers``)."""
        leftovers = self.context.services.get("leftovers")
        if leftovers is None:
            return
        for vif in workload.vifs:
            if vif.port:
                leftovers.locate(vif.port)

    def _cached_name(self, uuid: str) -> str:
        with self._lock:
            workload = self._workloads.get(uuid)
        return workload.name if workload else uuid

    # -- phases -> migrations -> pipeline ------------------------------------------------

    def _run(
        self,
        uuid: str,
        name: str,
        transitions: tuple[phases.Transition, ...],
        monotonic: float,
        xml: str | None = None,
    ) -> list[concurrent.futures.Future[PhaseReport]]:
        """Submit each transition's phase in order; stop at the first that cannot be resolved."""
        futures = []
        for transition in transitions:
            try:
                migration = self._migration_for(uuid, name, transition, xml)
            except NothingToMove as exc:
                LOG.info("%s: %s %s not run: %s", self.name, name, transition.phase.value, exc)
                break
            except (ResolveError, nva_errors.NvaError, discovery.DomainXmlError) as exc:
                level = logging.INFO if transition.confirm else logging.ERROR
                LOG.log(
                    level,
                    "%s: %s: cannot run %s as %s (%s): %s",
                    self.name,
                    name,
                    transition.phase.value,
                    transition.role.value,
                    transition.why,
                    exc,
                )
                break
            if migration is None:
                LOG.info(
                    "%s: %s: %s (%s): nothing ran here for it",
                    self.name,
                    name,
                    transition.phase.value,
                    transition.why,
                )
                continue
            LOG.info(
                "%s: %s: %s as %s for migration %s (%s)",
                self.name,
                name,
                transition.phase.value,
                transition.role.value,
                migration.id,
                transition.why,
            )
            if (transition.phase, transition.role) == (Phase.PREPARE, Role.DESTINATION):
                self.marks.mark(migration.id, name)  # its end calls abort it (see marks)
            futures.append(self._submit(migration, transition.phase, transition.role, monotonic))
        return futures

    def _submit(
        self,
        migration: Migration,
        phase: Phase,
        role: Role,
        monotonic: float,
        decided: Decided | None = None,
    ) -> concurrent.futures.Future[PhaseReport]:
        future = self.dispatcher.submit(MigrationEvent(migration, phase, role, monotonic), decided)
        with self._lock:
            self._pending.add(future)
        future.add_done_callback(self._done)
        return future

    def _done(self, future: concurrent.futures.Future[PhaseReport]) -> None:
        try:
            report = future.result()
        except Exception as exc:
            LOG.error("%s: the pipeline failed: %s", self.name, exc)
        else:
            if report.role is Role.DESTINATION and report.phase in _ENDS_HERE:
                self.marks.unmark(report.migration_id)  # before anyone sees the report
            self.reports.append(report)
            LOG.log(logging.INFO if report.ok else logging.ERROR, "%s", _report_line(report))
        with self._idle:
            self._pending.discard(future)
            self._idle.notify_all()

    def _workload(self, uuid: str, live: bool, xml: str | None) -> Workload:
        """The VM's workload: from ``xml``, else the live domain (``live``), else the cache."""
        found: Workload | None
        if xml is not None:
            found = self.discovery.workload(xml)
        else:
            found = self._live_workload(uuid) if live else None
            if found is None:
                with self._lock:
                    cached = self._workloads.get(uuid)
                found = cached if cached is not None else self._live_workload(uuid)
            if found is None:
                raise ResolveError(f"domain {uuid} is gone and was never seen with its NICs")
        workload = found
        with self._lock:
            self._workloads[uuid] = workload
        return workload

    def _live_workload(self, uuid: str) -> Workload | None:
        try:
            dom = self.source.connection().lookupByUUIDString(uuid)
            return self.discovery.workload(dom.XMLDesc(0), dom)
        except (libvirt.libvirtError, events.NotConnected) as exc:
            LOG.debug("%s: cannot read domain %s: %s", self.name, uuid, exc)
            return None

    def _with_live_ports(self, uuid: str, migration: Migration) -> Workload:
        """The migration's workload with each NIC's host device as libvirt shows it now.

        At PREPARE (the hook) the XML may not name the destination's devices
        yet; at RESUMED they exist. One local libvirt call, no directory call.
        """
        workload = migration.workload
        try:
            xml = self.source.connection().lookupByUUIDString(uuid).XMLDesc(0)
            targets = {nic.mac: nic.target for nic in discovery.parse_domain(xml).nics}
        except (libvirt.libvirtError, events.NotConnected, discovery.DomainXmlError) as exc:
            LOG.debug("%s: ports of %s not refreshed: %s", self.name, workload.name, exc)
            return workload
        vifs = tuple(
            dataclasses.replace(vif, port=targets.get(vif.mac) or vif.port) for vif in workload.vifs
        )
        return dataclasses.replace(workload, vifs=vifs)

    def _reusable(self, migration_id: str) -> bool:
        record = self.journal.get(migration_id)
        return record is None or record.status == jr.RUNNING

    def _migration_for(
        self, uuid: str, name: str, transition: phases.Transition, xml: str | None
    ) -> Migration | None:
        """The Migration a transition is about (None: nothing ran here that needs it)."""
        phase, role = transition.phase, transition.role
        if role is Role.DESTINATION:
            if phase is Phase.ABORTED:
                with self._lock:
                    known = self._incoming.pop(uuid, None)
                if known is not None:
                    return known
                return self.resolver.pending_for_destination(self._workload(uuid, False, xml))
            with self._lock:
                known = self._incoming.get(uuid) if phase is not Phase.PREPARE else None
            if known is not None:
                # RESUMED is the critical path: keep PREPARE's addresses, re-read ports only.
                migration = dataclasses.replace(known, workload=self._with_live_ports(uuid, known))
            else:
                workload = self._workload(uuid, live=phase is Phase.RESUMED, xml=xml)
                migration = self.resolver.for_destination(uuid, workload, self._reusable)
            with self._lock:
                if phase is Phase.RESUMED:  # this host's last phase of it
                    self._incoming.pop(uuid, None)
                else:
                    self._incoming[uuid] = migration
            return migration
        if phase is Phase.ABORTED:
            with self._lock:
                return self._outgoing.pop(uuid, None)
        with self._lock:
            known = self._outgoing.get(uuid)
        if known is None:
            known = self.resolver.for_source(self._workload(uuid, False, xml))
            with self._lock:
                self._outgoing[uuid] = known
        if phase is Phase.COMPLETED:
            with self._lock:
                self._outgoing.pop(uuid, None)
        return known

    # -- cold mobility -----------------------------------------------------------------------

    def _cold_start_later(self, uuid: str, name: str, why: str) -> None:
        """Check (and do) a cold move off the event thread; wait_idle waits for it."""
        if getattr(self.context.nva, "get_endpoint", None) is None:
            return  # a directory without endpoint reads (Neutron binds ports itself)
        try:
            future = self._cold_pool.submit(self._cold_start, uuid, name, why)
        except RuntimeError:
            return  # stopping
        with self._lock:
            self._pending.add(future)
        future.add_done_callback(self._cold_done)

    def _cold_done(self, future: concurrent.futures.Future[Any]) -> None:
        try:
            future.result()
        except Exception:
            LOG.exception("%s: a cold move failed", self.name)
        with self._idle:
            self._pending.discard(future)
            self._idle.notify_all()

    def _cold_start(
        self, uuid: str, name: str, why: str, workload: Workload | None = None
    ) -> dict[str, Any] | None:
        """A domain started here outside any migration: move each NIC the directory
        places at another NVE (phases.cold_verdict) to this host.

        Per NIC: prestage here under one ``cold-<uuid>-<ns>`` id, pin the MAC to
        its port, commit (a planned move: sequence + 1, counted once), then
        announce it and wait (bounded) for every NVE of the VN to acknowledge.
        Returns what was done (also kept in ``cold_moves``), None when nothing
        had to move.
        """
        workload = workload or self._live_workload(uuid)
        if workload is None:
            LOG.info("%s: %s started, but its NICs cannot be read: no cold move", self.name, name)
            return None
        with self._lock:
            self._workloads[uuid] = workload
        nva = self.context.nva
        to_move = []
        learned: list[Any] = []
        skipped: dict[str, str] = {}
        for vif in workload.vifs:
            try:
                endpoint = nva.get_endpoint(vif.vni, vif.mac)
            except nva_errors.NotFound:
                skipped[vif.mac] = "not in the directory"
                continue
            except nva_errors.NvaError as exc:
                skipped[vif.mac] = f"directory error: {exc}"
                LOG.warning("%s: %s: cold move check of %s: %s", self.name, name, vif.mac, exc)
                continue
            verdict, reason = phases.cold_verdict(endpoint, self.name, time.time())
            if verdict is phases.Cold.MOVE:
                to_move.append((vif, str(endpoint.get("nve"))))
            elif verdict is phases.Cold.LEARNED:
                learned.append(vif)
                skipped[vif.mac] = reason
            else:
                skipped[vif.mac] = reason
                if verdict is not phases.Cold.HERE:
                    LOG.warning("%s: %s: no cold move: %s", self.name, name, reason)
        nve = self.context.services.get("nve")
        announcers = self.context.services.get("announcers")
        for vif in learned:  # the directory already moved: pin and announce only
            self._pin_and_announce(nve, announcers, name, vif)
        if not to_move:
            if learned:
                record: dict[str, Any] = {
                    "vm": name,
                    "why": why,
                    "learned": [v.mac for v in learned],
                }
                self.cold_moves.append(record)
                return record
            return None
        mid = f"cold-{uuid}-{time.time_ns()}"
        LOG.info(
            "%s: %s: cold move %s (%s): %s",
            self.name,
            name,
            mid,
            why,
            ", ".join(f"{v.mac} from {old}" for v, old in to_move),
        )
        moved: list[tuple[Any, str, int]] = []
        for vif, old in to_move:
            plugged = False
            try:
                nva.prestage(vif.vni, vif.mac, self.name, mid)
                if nve is not None and vif.port:
                    nve.ensure_vn(vif.vni)
                    nve.plug(vif.vni, vif.mac, vif.port, vif.ipv4 + vif.ipv6)
                    plugged = True
                result = nva.commit(vif.vni, vif.mac, mid)
            except Exception as exc:  # one NIC's failure is logged and undone
                skipped[vif.mac] = f"move refused: {exc}"
                LOG.error("%s: %s: cold move of %s failed: %s", self.name, name, vif.mac, exc)
                with contextlib.suppress(Exception):
                    nva.abort(vif.vni, vif.mac, mid)
                if plugged:
                    with contextlib.suppress(Exception):
                        nve.unplug(vif.vni, vif.mac)
                continue
            moved.append((vif, old, int(result.get("revision") or 0)))
        for vif, _old, _rev in moved:
            self._pin_and_announce(None, announcers, name, vif)
        laggards: dict[str, list[str]] = {}
        for vif, _old, revision in moved:
            if not revision:
                continue
            try:
                acks = nva.acks(vif.vni, revision, timeout=self.cold_ack_timeout)
            except nva_errors.NvaError as exc:
                LOG.warning("%s: %s: peers' acks for %s: %s", self.name, name, vif.mac, exc)
                continue
            late = sorted(n for n, a in acks.items() if (a.get("acked_revision") or 0) < revision)
            if late:
                laggards[vif.mac] = late
                LOG.warning(
                    "%s: %s: %s not yet applied by %s", self.name, name, vif.mac, ", ".join(late)
                )
        record = {
            "migration_id": mid,
            "vm": name,
            "why": why,
            "moved": [
                {"vni": v.vni, "mac": v.mac, "from": old, "revision": rev} for v, old, rev in moved
            ],
            "skipped": skipped,
            "laggards": laggards,
            "learned": [v.mac for v in learned],
            "state_imported": False,
        }
        self.cold_moves.append(record)
        return record

    def _pin_and_announce(self, nve: Any, announcers: Any, name: str, vif: Any) -> None:
        """Pin a started VM's MAC to its port (when ``nve``) and announce it; best effort."""
        try:
            if nve is not None and vif.port:
                nve.ensure_vn(vif.vni)
                nve.plug(vif.vni, vif.mac, vif.port, vif.ipv4 + vif.ipv6)
            if announcers is not None:
                announcers.for_vni(vif.vni).announce(vif)
        except Exception as exc:  # the directory move stands; peers converge without it
            LOG.warning("%s: %s: pinning/announcing %s: %s", self.name, name, vif.mac, exc)

    # -- hook calls (hook server threads; never call libvirt here) -------------------------

    def on_hook(self, request: dict[str, Any]) -> dict[str, Any]:
        """Answer one relayed hook call (see _answer_hook); counted in the metrics."""
        answer = self._answer_hook(request)
        if request.get("op") not in ("ping", "status"):
            metrics.count_hook(str(request.get("op", "")), str(request.get("sub_op", "")), answer)
        return answer

    def _answer_hook(self, request: dict[str, Any]) -> dict[str, Any]:
        """Answer one relayed hook call: {"allow": bool, "reason": str[, "error": True]}."""
        if request.get("op") == "ping":
            return {"allow": True, "reason": f"host {self.name}", "host": self.name}
        if request.get("op") == "status":
            return self.status()
        op, sub_op, guest = request["op"], request["sub_op"], request["guest"]
        if self._draining and (op, sub_op) == ("migrate", "begin"):
            return {
                "allow": False,
                "reason": f"the vmm agent of {self.name} is stopping; retry the migration",
            }
        xml = request.get("xml") or ""
        try:
            uuid = discovery.parse_domain(xml).uuid
        except discovery.DomainXmlError as exc:
            if (op, sub_op) == ("migrate", "begin"):
                return {
                    "allow": False,
                    "reason": f"cannot read the domain XML: {exc}",
                    "error": True,
                }
            return {"allow": True, "reason": ""}
        decision = self.tracker.apply(uuid, phases.Hook(op, sub_op))
        prepare = [t for t in decision.transitions if t.phase is Phase.PREPARE]
        if not prepare:
            self._run(uuid, guest, decision.transitions, time.monotonic(), xml)
            return {"allow": True, "reason": ""}
        return self._prepare_now(uuid, guest, prepare[0], xml)

    def status(self) -> dict[str, Any]:
        """The local API's view of this host: connection, migrations under way, last reports."""
        tracks = {
            uuid: {
                "role": t.role.value if t.role else None,
                "done": sorted(p.value for p in t.done),
                "paused": t.paused,
            }
            for uuid, t in self.tracker.snapshot().items()
            if not t.finished
        }
        return {
            "allow": True,
            "reason": "",
            "host": self.name,
            "uri": self.spec.uri,
            "connected": bool(self.source.connected),
            "under_way": tracks,
            "reports": [_report_line(r) for r in list(self.reports)[-20:]],
        }

    def _prepare_now(
        self, uuid: str, guest: str, transition: phases.Transition, xml: str
    ) -> dict[str, Any]:
        """Run PREPARE for an incoming migration and let its outcome decide."""
        start = time.monotonic()
        try:
            workload = self._workload(uuid, live=False, xml=xml)
            migration = self.resolver.for_destination(uuid, workload, self._reusable)
        except NothingToMove as exc:
            return {"allow": True, "reason": exc.message}
        except nva_errors.Unavailable as exc:
            self.tracker.forget(uuid)
            return {"allow": False, "reason": f"directory unavailable: {exc}", "error": True}
        except (ResolveError, nva_errors.NvaError) as exc:
            self.tracker.forget(uuid)
            return {"allow": False, "reason": f"{guest}: {exc}"}
        with self._lock:
            self._incoming[uuid] = migration
        self.marks.mark(migration.id, guest)  # before the answer: libvirt goes on after it
        LOG.info(
            "%s: %s: PREPARE as destination for migration %s from %s (%s)",
            self.name,
            guest,
            migration.id,
            migration.source,
            transition.why,
        )
        # The answer comes once every stage that can fail PREPARE ran (the directory's
        # pre-stage: the veto); best-effort ones after it (the NVE's expectation) go on
        # while libvirt starts the incoming QEMU, and RESUMED queues behind them.
        decided: Decided = concurrent.futures.Future()
        self._submit(migration, Phase.PREPARE, Role.DESTINATION, start, decided)
        left = self.hook_timeout - (time.monotonic() - start)
        try:
            error = decided.result(timeout=max(left, 0.0))
        except concurrent.futures.TimeoutError:
            # Vetoed: undo whatever PREPARE does once it ends (same migration: runs after it).
            self._submit(migration, Phase.ABORTED, Role.DESTINATION, time.monotonic())
            self._vetoed(uuid)
            return {
                "allow": False,
                "reason": f"PREPARE of migration {migration.id} did not finish within "
                f"{self.hook_timeout:g} s",
            }
        if error is None:
            return {"allow": True, "reason": f"migration {migration.id} prepared"}
        self._vetoed(uuid)
        return {"allow": False, "reason": f"{guest}: {error}"}

    def _hook_abandoned(self, request: dict[str, Any], answer: dict[str, Any]) -> None:
        """An allow that reached the relay after it stopped waiting: the relay
        decided alone, so undo this PREPARE (if libvirt went on regardless,
        its events prepare the migration again)."""
        if (request.get("op"), request.get("sub_op")) != ("migrate", "begin"):
            return
        try:
            uuid = discovery.parse_domain(request.get("xml") or "").uuid
        except discovery.DomainXmlError:
            return
        with self._lock:
            migration = self._incoming.pop(uuid, None)
        self.tracker.forget(uuid)
        if migration is not None:
            self.marks.unmark(migration.id)
            LOG.warning(
                "%s: migration %s: the relay stopped waiting for PREPARE; reverting it",
                self.name,
                migration.id,
            )
            self._submit(migration, Phase.ABORTED, Role.DESTINATION, time.monotonic())

    def drain(self, end: float) -> list[str]:
        """Refuse new incoming migrations and keep handling events until every
        migration under way here reached its last phase here (or ``end``, a
        time.monotonic() deadline); the names of those still under way."""
        self._draining = True
        while self.tracker.under_way() and time.monotonic() < end:
            time.sleep(0.05)
        self.wait_idle(max(0.0, end - time.monotonic()))
        return [self._cached_name(u) for u in self.tracker.under_way()]

    def _vetoed(self, uuid: str) -> None:
        self.tracker.forget(uuid)
        with self._lock:
            migration = self._incoming.pop(uuid, None)
        if migration is not None:
            self.marks.unmark(migration.id)


# -- the daemon --------------------------------------------------------------------------


class Daemon:
    """The libvirt event source of ``vmm agent``: one HostAgent per assembled host.

    Entry point ``libvirt`` of ``vmm_orchestrator.event_sources``. The hosts
    themselves (directory client, data plane, state service, journal,
    pipeline) come from the core's composition root; this only adds what
    libvirt needs: an event source per host URI and a hook server per socket.
    """

    def __init__(self, agents: list[HostAgent]) -> None:
        self.agents = agents
        for agent in agents:
            agent.siblings = [a for a in agents if a is not agent]

    @staticmethod
    def check_options(conf: cfg.ConfigOpts) -> list[HostSpec]:
        """Read every option of this plugin now, so a bad value fails before anything starts."""
        from vmm_orchestrator.cli import check_options

        require(conf, options.GROUP, "the libvirt event source")
        groups = [(options.GROUP, options.LIBVIRT_OPTS), (options.AGENT_GROUP, options.AGENT_OPTS)]
        groups += [(options.host_group(n), options.HOST_OPTS) for n in conf.agent.hosts]
        check_options(conf, groups)
        options.bridge_pattern(conf)
        options.bridge_vnis(conf)
        return host_specs(conf)

    @classmethod
    def for_assembly(cls, conf: cfg.ConfigOpts, assembly: root.Assembly) -> Daemon:
        """A HostAgent on each assembled host (nothing started yet)."""
        specs = {s.name: s for s in host_specs(conf)}
        agents = [
            HostAgent(
                conf,
                specs[host.name],
                host.context,
                host.journal,
                dispatcher=host.dispatcher,
            )
            for host in assembly.hosts
        ]
        return cls(agents)

    def start(self) -> None:
        for agent in self.agents:
            agent.start()

    def wait_reconciled(self, timeout: float) -> list[str]:
        """Wait for every host's first reconciliation; the names of those still waiting."""
        end = time.monotonic() + timeout
        for agent in self.agents:
            agent.reconciled.wait(max(0.0, end - time.monotonic()))
        return [a.name for a in self.agents if not a.reconciled.is_set()]

    def wait_idle(self, timeout: float) -> bool:
        end = time.monotonic() + timeout
        return all(a.wait_idle(max(0.0, end - time.monotonic())) for a in self.agents)

    def locate(self, migration: Migration) -> str | None:
        """Where a migration's VM runs, asking every host's libvirt (for takeovers)."""
        return self.agents[0].locate(migration) if self.agents else None

    def drain(self, timeout: float) -> list[str]:
        """Let the migrations under way on every host finish (see HostAgent.drain)."""
        end = time.monotonic() + timeout
        left: list[str] = []
        for agent in self.agents:
            left += agent.drain(end)
        return left

    def on_report(self, report: PhaseReport) -> None:
        for agent in self.agents:
            if agent.name == report.host:
                agent.reports.append(report)
        LOG.warning("%s", _report_line(report))

    def stop(self) -> None:
        for agent in reversed(self.agents):
            with contextlib.suppress(Exception):
                agent.stop()
