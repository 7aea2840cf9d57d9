"""The contracts every backend implements, and the entry-point namespaces
the composition root (:mod:`vmm_orchestrator.agent`) loads them from.

The core never imports a backend: it asks stevedore for the plugin an
option names and holds it only through these types. A new backend (an OVN
host, a journal on another store) implements one of them, registers an
entry point, and passes the conformance cases in
``tests/unit/test_contracts.py`` (the same cases run over every installed
implementation).

* :class:`Directory`: the NVA, keyed by (VNI, MAC), as migrations use it:
  pre-stage, commit, abort, acknowledgements, expire. Embedded (HTTP), etcd
  and Neutron implement it; :class:`NveDirectory` adds what NVE agents that
  follow the directory themselves need (registration, snapshot, watch,
  ack): embedded and etcd.
* :class:`JournalStore`: the durable record of every migration, phase and
  stage that the pipeline engine writes and recovery reads. SQLite and etcd.
* :class:`NveDriver` and :class:`AnnouncerPool`: the data plane of one host
  as the NVE stages use it (under the ``nve`` and ``announcers`` services).
* :class:`HostDriver`: what a data-plane plugin builds for one host from the
  configuration: the services its stages use, started and stopped together.
* :class:`StateService`: a host's state service (``state`` service).
* :class:`MigrationLock`: who handles a migration when several orchestrator
  instances serve the same host.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from oslo_config import cfg

if TYPE_CHECKING:
    from vmm_orchestrator.model import Migration, Phase, Role, Vif

#: Data-plane plugins: ``factory(conf, spec, directory) -> HostDriver``.
HOST_DRIVERS = "vmm_orchestrator.host_drivers"
#: State services: ``factory(conf, spec, directory, peers) -> StateService``.
STATE_SERVICES = "vmm_orchestrator.state_services"
#: Journal backends: ``factory(conf, spec, lock) -> JournalStore``.
JOURNALS = "vmm_orchestrator.journals"
#: Migration locks (several instances per host): ``factory(conf, spec) -> MigrationLock``.
MIGRATION_LOCKS = "vmm_orchestrator.migration_locks"


@dataclasses.dataclass(frozen=True)
class HostSpec:
    """One hypervisor host this agent serves, from its ``[host:<name>]`` group.

    ``name`` is the host's NVE id in the directory; ``netns`` the network
    namespace its data plane lives in (None: the agent's own). ``extra``
    holds what event-source plugins add to the group (a libvirt URI, a hook
    socket), read by them alone.
    """

    name: str
    vtep: str
    vnis: tuple[int, ...]
    netns: str | None
    journal: str
    extra: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False)


@runtime_checkable
class Directory(Protocol):
    """The NVA as the migration stages and the command use it (every backend:
    embedded, etcd, Neutron).

    ``prestage`` marks the (VNI, MAC) pending at ``nve`` for ``migration_id``
    after checking that ``nve`` may take it (it serves the VN / can bind the
    port) and that no other endpoint claims its addresses; ``commit`` moves
    it there (a higher sequence, or the binding activated); ``abort`` undoes
    a prestage and is a no-op when there is nothing to undo; ``acks`` waits
    until every NVE of the VN acknowledged ``min_revision`` (or the timeout)
    and answers per NVE; ``expire`` tells NVEs to drop a stale entry.
    Errors are :class:`vmm_orchestrator.nva.errors.NvaError` subclasses (or
    VmmError with a hint): ``Unavailable`` is worth a retry, anything else
    is final.
    """

    def prestage(self, vni: int, mac: str, nve: str, migration_id: str) -> dict[str, Any]: ...

    def commit(self, vni: int, mac: str, migration_id: str) -> dict[str, Any]: ...

    def abort(self, vni: int, mac: str, migration_id: str) -> dict[str, Any]: ...

    def acks(
        self,
        vni: int,
        min_revision: int,
        nves: Sequence[str] | None = None,
        timeout: float = 0.0,
    ) -> dict[str, dict[str, Any]]: ...

    def expire(self, vni: int, mac: str, nves: Sequence[str]) -> dict[str, Any]: ...


@runtime_checkable
class NveDirectory(Directory, Protocol):
    """A directory NVE agents follow themselves (embedded, etcd): NVEs register
    with their VTEP and VNs, read a VN's snapshot, long-poll its changes and
    acknowledge the revision they applied."""

    def register_nve(self, nve_id: str, vtep: str, vnis: Sequence[int]) -> dict[str, Any]: ...

    def list_nves(self, vni: int | None = None) -> list[dict[str, Any]]: ...

    def get_nve(self, nve_id: str) -> dict[str, Any]: ...

    def add_endpoint(
        self,
        vni: int,
        mac: str,
        ipv4: Sequence[str],
        ipv6: Sequence[str],
        nve: str,
    ) -> dict[str, Any]: ...

    def get_endpoint(self, vni: int, mac: str) -> dict[str, Any]: ...

    def snapshot(self, vni: int | None = None) -> tuple[int, list[dict[str, Any]]]: ...

    def watch(
        self, nve: str, since: int, timeout: float = 0.0
    ) -> tuple[int, list[dict[str, Any]]]: ...

    def ack(self, nve_id: str, revision: int) -> dict[str, Any]: ...


class JournalStore(abc.ABC):
    """The durable record the engine writes and recovery reads (one per host).

    Every write is durable when the call returns; a record read back after
    a crash holds each completed stage's JSON result so it can be reverted.
    """

    @abc.abstractmethod
    def begin_migration(self, migration: Migration, role: Role) -> None: ...

    @abc.abstractmethod
    def set_status(self, migration_id: str, status: str) -> None: ...

    @abc.abstractmethod
    def phase_started(self, migration_id: str, phase: Phase) -> None: ...

    @abc.abstractmethod
    def phase_completed(self, migration_id: str, phase: Phase) -> None: ...

    @abc.abstractmethod
    def phase_failed(self, migration_id: str, phase: Phase) -> None: ...

    @abc.abstractmethod
    def stage_started(self, migration_id: str, phase: Phase, stage: str) -> int: ...

    @abc.abstractmethod
    def stage_checkpoint(
        self, migration_id: str, phase: Phase, stage: str, data: dict[str, Any]
    ) -> None: ...

    @abc.abstractmethod
    def stage_completed(
        self,
        migration_id: str,
        phase: Phase,
        stage: str,
        record: dict[str, Any] | None,
        attempts: int = 1,
    ) -> None: ...

    @abc.abstractmethod
    def stage_failed(
        self, migration_id: str, phase: Phase, stage: str, error: str, attempts: int = 1
    ) -> None: ...

    @abc.abstractmethod
    def stage_reverted(
        self, migration_id: str, phase: Phase, stage: str, error: str | None = None
    ) -> None: ...

    @abc.abstractmethod
    def get(self, migration_id: str) -> Any: ...

    @abc.abstractmethod
    def stage_run(self, migration_id: str, phase: Phase, stage: str) -> Any: ...

    @abc.abstractmethod
    def completed_stages(self, migration_id: str) -> list[Any]: ...

    @abc.abstractmethod
    def unfinished(self) -> list[Any]: ...

    @abc.abstractmethod
    def close(self) -> None: ...


class NveDriver(abc.ABC):
    """One host's virtual switch as the NVE stages drive it.

    ``expect`` makes the destination take frames for an incoming MAC on its
    local port from PREPARE on without announcing it; ``plug`` pins the MAC
    to the port once the VM runs there; ``start_inflight`` makes the source
    forward frames for a departed MAC to the new host's VTEP.
    Every method is idempotent (the engine re-runs stages after a crash).
    """

    @abc.abstractmethod
    def ensure_vn(self, vni: int) -> None: ...

    @abc.abstractmethod
    def expect(self, vni: int, mac: str, port: str, addresses: Sequence[str]) -> None: ...

    @abc.abstractmethod
    def plug(self, vni: int, mac: str, port: str, addresses: Sequence[str]) -> None: ...

    @abc.abstractmethod
    def unplug(self, vni: int, mac: str) -> None: ...

    @abc.abstractmethod
    def start_inflight(self, vni: int, mac: str, vtep: str) -> None: ...

    @abc.abstractmethod
    def stop_inflight(self, vni: int, mac: str) -> None: ...

    def watch_departure(self, vni: int, mac: str, port: str) -> None:
        """The VM behind local ``port`` is paused for a migration's final copy (or
        by an operator): once it shows up elsewhere, send its frames on to it
        without waiting for SWITCHOVER. Optional; stop_inflight, unplug and
        end_departure end it."""
        return None

    def end_departure(self, vni: int, mac: str) -> None:
        """The VM ``watch_departure`` was called for runs here again (it resumed
        here): send nothing more of its frames on. Optional."""
        return None

    @abc.abstractmethod
    def close(self) -> None: ...


class Announcer(Protocol):
    """Announces one VIF from its host: GARP, unicast replies to gateways, NA."""

    def announce(self, vif: Vif, on_first_sent: Callable[[float], None] | None = None) -> None: ...


class AnnouncerPool(Protocol):
    """A host's announcers, one per VN."""

    def for_vni(self, vni: int) -> Announcer: ...

    def close(self) -> None: ...


class TapLeftovers(Protocol):
    """Optional host service ``leftovers``: frames a paused VM's tap queued go on
    with it at SWITCHOVER. A hypervisor plugin says which ports to look at ahead."""

    def locate(self, port: str) -> None: ...


class HostDriver(abc.ABC):
    """What a data-plane plugin builds for one host.

    ``services`` is what its stages find in the host's context: at least
    ``nve`` (:class:`NveDriver`) and ``announcers`` (:class:`AnnouncerPool`),
    optionally ``leftovers`` (:class:`TapLeftovers`).
    ``start`` registers the host with the directory and starts following it;
    ``stop`` undoes ``start`` and releases what the driver holds.
    """

    services: dict[str, Any]

    @abc.abstractmethod
    def start(self) -> None: ...

    @abc.abstractmethod
    def stop(self) -> None: ...


class StateService(abc.ABC):
    """A host's state service: serves pre-copies and deltas to peers, imports
    what a peer sends. ``url`` is where peers reach it once started."""

    @property
    @abc.abstractmethod
    def url(self) -> str: ...

    @abc.abstractmethod
    def start(self) -> None: ...

    @abc.abstractmethod
    def stop(self) -> None: ...


class MigrationLock(abc.ABC):
    """Per-migration ownership among orchestrator instances serving one host."""

    @property
    @abc.abstractmethod
    def instance(self) -> str: ...

    @abc.abstractmethod
    def owner_of(self, migration_id: str) -> str | None: ...

    @abc.abstractmethod
    def release(self, migration_id: str) -> None: ...

    @abc.abstractmethod
    def close(self) -> None: ...


HostDriverFactory = Callable[[cfg.ConfigOpts, HostSpec, Any], HostDriver]
