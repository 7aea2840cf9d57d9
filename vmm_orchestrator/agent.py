"""The composition root: the one place that builds a host from the configuration.

``vmm agent`` (systemd, DevStack), the labs, the demos and the benchmarks
all get their hosts from :func:`assemble`, so what a lab proves is what an
operator runs. Per ``[agent] hosts`` entry it builds, each chosen by an
option and loaded through stevedore from the contracts' entry points
(:mod:`vmm_orchestrator.contracts`):

* the directory client (``[nva] backend``: embedded, etcd, neutron);
* the data plane (``[agent] host_driver``: linux, ovn): NVE driver,
  announcers, NVE agent;
* the state service (``[agent] state_service``), only when a stage of
  ``[pipeline] stages`` requires the ``state`` service;
* the journal (``[agent] journal_backend``: sqlite, etcd);
* the migration lock (``[agent] migration_lock``: none, or etcd leases
  when several agent instances serve the same host);
* the pipeline (stages of ``[pipeline] stages``) and its dispatcher.

Nothing here imports a plugin: a backend is only ever named by option.
The event source (libvirt) is the other half of ``vmm agent``: it turns a
hypervisor's signals into :class:`~vmm_orchestrator.model.MigrationEvent`
and submits them to a host's dispatcher (see :mod:`vmm_orchestrator.agent_cmd`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import threading
from collections.abc import Callable, Mapping
from typing import Any

from oslo_config import cfg, types
from stevedore import driver, extension

from vmm_orchestrator import contracts, engine, options
from vmm_orchestrator.contracts import HostSpec
from vmm_orchestrator.engine import Dispatcher, Pipeline
from vmm_orchestrator.errors import ConfigError
from vmm_orchestrator.nva import backends as nva_backends
from vmm_orchestrator.stage import HostContext, Stage

LOG = logging.getLogger(__name__)

GROUP = "agent"
#: Prefix of the per-host groups: ``[host:compute1]``.
HOST_GROUP_PREFIX = options.HOST_GROUP_PREFIX
#: ``[agent] migration_lock`` value for a single agent per host.
NO_LOCK = "none"

AGENT_OPTS: list[cfg.Opt] = [
    cfg.ListOpt(
        "hosts",
        default=[],
        help="Names of the hypervisor hosts this agent serves; each name is the host's "
        "NVE id in the directory and has a [host:<name>] group (vtep, vnis, ...), like "
        "[host:example] below. One per machine in production; several for a small site "
        "or the lab.",
    ),
    cfg.StrOpt(
        "event_source",
        default="libvirt",
        help="Where migration signals come from, by entry point name in the "
        "vmm_orchestrator.event_sources namespace.",
    ),
    cfg.StrOpt(
        "host_driver",
        default="linux",
        help="Data plane of each host (NVE driver, announcers, NVE agent), by entry point "
        "name in the vmm_orchestrator.host_drivers namespace: 'linux' (Linux bridge + "
        "VXLAN), or another installed plugin.",
    ),
    cfg.StrOpt(
        "state_service",
        default="state",
        help="State service of each host (firewall and bridge state that moves with the "
        "VM), by entry point name in vmm_orchestrator.state_services. Built only when a "
        "stage of [pipeline] stages needs it (state_precopy, state_delta, state_cleanup).",
    ),
    cfg.StrOpt(
        "journal_backend",
        default="sqlite",
        help="Where each host's journal of migrations lives, by entry point name in "
        "vmm_orchestrator.journals: 'sqlite' (a local file, [host:<name>] journal) or "
        "'etcd' (shared by several agent instances, [nva_etcd]).",
    ),
    cfg.StrOpt(
        "migration_lock",
        default=NO_LOCK,
        help="'none' for one agent per host; 'etcd' when several agent instances serve "
        "the same hosts: each migration is leased to one instance in etcd, and an "
        "instance that dies has its migrations finished or reverted by another. Needs "
        "journal_backend = etcd.",
    ),
]

HOST_OPTS: list[cfg.Opt] = [
    cfg.HostAddressOpt(
        "vtep",
        help="Underlay (VTEP) address of this host's NVE. Required.",
    ),
    cfg.ListOpt(
        "vnis",
        item_type=types.Integer(min=1, max=2**24 - 1),
        default=[],
        help="Virtual networks this host's NVE serves.",
    ),
    cfg.StrOpt(
        "netns",
        help="Network namespace of this host's data plane (the lab); unset: the agent's own.",
    ),
    cfg.StrOpt(
        "journal",
        help="This host's journal file (journal_backend sqlite); unset: [pipeline] journal "
        "with one host, journal-<name>.sqlite beside it with several.",
    ),
]


def host_group(name: str) -> str:
    """The config group of host ``name``."""
    return HOST_GROUP_PREFIX + name


def register_opts(conf: cfg.ConfigOpts) -> None:
    """Register [agent], [pipeline] and a [host:<name>] group per [agent] hosts (the
    core's part only; :func:`vmm_orchestrator.options.register_all` registers every
    plugin's, which is what a configuration needs)."""
    for opt in AGENT_OPTS:
        with contextlib.suppress(cfg.DuplicateOptError):
            conf.register_opt(opt, group=GROUP)
    engine.register_opts(conf)
    for name in conf[GROUP].hosts:
        for opt in HOST_OPTS:
            with contextlib.suppress(cfg.DuplicateOptError):
                conf.register_opt(opt, group=host_group(name))


def list_opts() -> list[tuple[str, list[cfg.Opt]]]:
    """For oslo-config-generator: the per-host options appear once, for a host "example"."""
    return [(GROUP, AGENT_OPTS), (host_group("example"), HOST_OPTS)]


def default_journal(pipeline_journal: str, name: str, several: bool) -> str:
    """Where host ``name`` journals when its group sets no journal."""
    if not several:
        return pipeline_journal
    return os.path.join(os.path.dirname(pipeline_journal) or ".", f"journal-{name}.sqlite")


def host_specs(conf: cfg.ConfigOpts) -> list[HostSpec]:
    """Every configured host, checked; ConfigError says what to fix."""
    options.require(conf, GROUP, "the composition root", "hosts")
    # The [host:<name>] groups follow [agent] hosts, which may have been set after
    # register_all (an override): register each plugin's per-host options for them.
    options.register_hosts(conf)
    names = list(conf[GROUP].hosts)
    if not names:
        raise ConfigError(
            "[agent] hosts is empty: the agent would serve no host",
            hint="list this machine's NVE id, e.g. hosts = compute1, and give it a "
            "[host:compute1] group with vtep and vnis",
        )
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"[agent] hosts lists {', '.join(duplicates)} more than once")
    specs = []
    for name in names:
        group = conf[host_group(name)]
        if not group.vtep:
            raise ConfigError(
                f"[{host_group(name)}] vtep is not set",
                hint="set the underlay address of this host's NVE",
            )
        journal = group.journal or default_journal(conf.pipeline.journal, name, len(names) > 1)
        specs.append(HostSpec(name, group.vtep, tuple(group.vnis), group.netns, journal))
    journals = [s.journal for s in specs]
    shared = sorted({j for j in journals if journals.count(j) > 1})
    if shared and conf[GROUP].journal_backend == "sqlite":
        raise ConfigError(
            f"several hosts share the journal {', '.join(shared)}",
            hint="give each [host:<name>] group its own journal",
        )
    return specs


def load_plugin(namespace: str, name: str, option: str) -> Any:
    """The plugin ``name`` of ``namespace`` (not invoked); ConfigError naming the fix."""
    try:
        return driver.DriverManager(namespace, name, invoke_on_load=False).driver
    except Exception as exc:
        available = sorted(extension.ExtensionManager(namespace).names())
        raise ConfigError(
            f"{option} {name!r} cannot be loaded: {exc}",
            hint=f"choose one of {', '.join(available) or 'none installed'}, or install "
            f"the plugin that provides it in {namespace}",
        ) from None


def required_services(stages: list[Stage]) -> set[str]:
    """The host services the configured stages need beyond the data plane's."""
    needed: set[str] = set()
    for stage in stages:
        needed.update(stage.requires)
    return needed


@dataclasses.dataclass
class Host:
    """One assembled host: what an event source submits migration events to.

    ``state`` is None unless a stage needs it; ``lock`` is None for a single
    agent per host. ``background`` holds the loops the host's plugins want
    run while the agent serves (a lock's takeover of dead instances'
    migrations), each ``fn(stop_event, locate, on_report)``.
    """

    spec: HostSpec
    directory: Any
    driver: contracts.HostDriver
    context: HostContext
    journal: Any
    pipeline: Pipeline
    dispatcher: Dispatcher
    state: contracts.StateService | None = None
    lock: Any = None
    background: list[Callable[..., None]] = dataclasses.field(default_factory=list)
    _closers: list[Callable[[], None]] = dataclasses.field(default_factory=list, repr=False)

    @property
    def name(self) -> str:
        return self.spec.name

    def start(self) -> None:
        """State service first (a peer may pull a pre-copy from us as soon as our
        NVE takes part), then the data plane."""
        if self.state is not None:
            self.state.start()
        self.driver.start()

    def close(self) -> None:
        """Stop accepting events, finish queued phases, then release every part."""
        with contextlib.suppress(Exception):
            self.dispatcher.close(wait=True)
        for close in reversed(self._closers):
            try:
                close()
            except Exception as exc:  # keep closing the rest
                LOG.warning("host %s: closing a part failed: %s", self.name, exc)
        self._closers.clear()


class Assembly:
    """Every host of one configuration, started and closed together.

    ``state_peers`` (NVE id -> state service URL) is the mapping every
    host's state service reads at each transfer; :meth:`start` adds the
    URLs of this assembly's own services once they are bound.
    """

    def __init__(self, hosts: list[Host], state_peers: dict[str, str] | None = None) -> None:
        self.hosts = hosts
        self.by_name = {h.name: h for h in hosts}
        self.state_peers = state_peers if state_peers is not None else {}

    def __getitem__(self, name: str) -> Host:
        return self.by_name[name]

    def start(self) -> None:
        """Start every host; publish the state services' URLs to each other."""
        for host in self.hosts:
            host.start()
            if host.state is not None:
                self.state_peers.setdefault(host.name, host.state.url)

    def close(self) -> None:
        for host in reversed(self.hosts):
            host.close()

    def __enter__(self) -> Assembly:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def assemble(
    conf: cfg.ConfigOpts,
    state_peers: Mapping[str, str] | None = None,
) -> Assembly:
    """Build every host of ``[agent] hosts`` (nothing started yet).

    ``state_peers`` (NVE id -> state service URL) is shared by every host's
    state service and read at each transfer: hosts of this assembly whose
    service binds a free port are added once started (:func:`start`), on
    top of ``[state] peers``. On any error everything built so far is
    closed and the error (a ConfigError naming the fix) propagates.
    """
    specs = host_specs(conf)
    stages_probe = engine.load_stages(conf, list(conf.pipeline.stages))
    needed = required_services(stages_probe)
    host_factory = load_plugin(
        contracts.HOST_DRIVERS, conf[GROUP].host_driver, "[agent] host_driver"
    )
    journal_factory = load_plugin(
        contracts.JOURNALS, conf[GROUP].journal_backend, "[agent] journal_backend"
    )
    lock_name = conf[GROUP].migration_lock
    lock_plugin = (
        None
        if lock_name == NO_LOCK
        else load_plugin(contracts.MIGRATION_LOCKS, lock_name, "[agent] migration_lock")
    )
    state_factory = (
        load_plugin(contracts.STATE_SERVICES, conf[GROUP].state_service, "[agent] state_service")
        if "state" in needed
        else None
    )
    peers: dict[str, str] = dict(state_peers or {})
    hosts: list[Host] = []
    try:
        for spec in specs:
            hosts.append(
                _assemble_one(
                    conf, spec, host_factory, journal_factory, lock_plugin, state_factory, peers
                )
            )
    except BaseException:
        for host in reversed(hosts):
            host.close()
        raise
    return Assembly(hosts, peers)


def _assemble_one(
    conf: cfg.ConfigOpts,
    spec: HostSpec,
    host_factory: Any,
    journal_factory: Any,
    lock_plugin: Any,
    state_factory: Any,
    peers: dict[str, str],
) -> Host:
    closers: list[Callable[[], None]] = []

    def keep(close: Callable[[], None] | None) -> None:
        if close is not None:
            closers.append(close)

    try:
        directory = nva_backends.open_client(conf)
        keep(getattr(directory, "close", None))
        state = None
        if state_factory is not None:
            state = state_factory(conf, spec, directory, peers)
            keep(state.stop)
        host_driver: contracts.HostDriver = host_factory(conf, spec, directory)
        keep(host_driver.stop)
        services = dict(host_driver.services)
        if state is not None:
            services["state"] = state
        context = HostContext(name=spec.name, nva=directory, services=services)
        lock = lock_plugin.open(conf, spec) if lock_plugin is not None else None
        if lock is not None:
            keep(lock.close)
        journal = journal_factory(conf, spec, lock)
        keep(journal.close)
        stages = engine.load_stages(conf, list(conf.pipeline.stages))
        missing = required_services(stages) - set(services)
        if missing:
            raise ConfigError(
                f"host {spec.name}: stages of [pipeline] stages need the "
                f"{', '.join(sorted(missing))} service, which no configured plugin provides",
                hint="enable the plugin that provides it, or remove those stages",
            )
        if lock_plugin is not None:
            pipeline = lock_plugin.pipeline(conf, context, journal, lock, stages)
            background = [pipeline.serve_takeovers]
        else:
            pipeline = Pipeline(conf, context, journal, stages)
            background = []
        dispatcher = Dispatcher(pipeline)
    except BaseException:
        for close in reversed(closers):
            with contextlib.suppress(Exception):
                close()
        raise
    return Host(
        spec=spec,
        directory=directory,
        driver=host_driver,
        context=context,
        journal=journal,
        pipeline=pipeline,
        dispatcher=dispatcher,
        state=state,
        lock=lock,
        background=background,
        _closers=closers,
    )


def run_background(
    assembly: Assembly,
    stop: threading.Event,
    locate: Callable[..., str | None] | None = None,
    on_report: Callable[..., None] | None = None,
) -> list[threading.Thread]:
    """Start each host's background loops (takeovers) as daemon threads."""
    threads = []
    for host in assembly.hosts:
        for loop in host.background:
            thread = threading.Thread(
                target=loop,
                kwargs={"stop": stop, "locate": locate, "on_report": on_report},
                name=f"vmm-bg-{host.name}",
                daemon=True,
            )
            thread.start()
            threads.append(thread)
    return threads
