"""The etcd directory backend: entry point ``etcd`` in ``vmm_orchestrator.nva_backends``.

Like the other backends of that namespace (``neutron``), the entry point is
a class whose ``from_conf(conf)`` gives the directory client that NVE agents
and stages use; for etcd it talks to etcd directly and watches the VNs'
keys. ``store_from_conf(conf)`` gives the store that ``vmm nva serve`` can
serve over HTTP to clients that do not reach etcd. The HA parts (the
instance's lease, the shared journal, the leased pipeline) are built here
too, so an orchestrator needs nothing but ``[nva_etcd]`` to join a group of
instances.
"""

from __future__ import annotations

from typing import TypeVar

from oslo_config import cfg

from vmm_etcd import options
from vmm_etcd.client import EtcdNvaClient
from vmm_etcd.ha import HaPipeline
from vmm_etcd.journal import EtcdJournal
from vmm_etcd.kv import EtcdKV
from vmm_etcd.locks import InstanceLease, MigrationLocks
from vmm_etcd.store import EtcdNvaStore
from vmm_orchestrator.contracts import HostSpec
from vmm_orchestrator.nva import options as nva_options
from vmm_orchestrator.nva.client import NvaClient
from vmm_orchestrator.nva.store import MobilityPolicy
from vmm_orchestrator.options import require
from vmm_orchestrator.stage import HostContext, Stage

S = TypeVar("S", bound=EtcdNvaStore)


class EtcdBackend:
    """Factories of the etcd directory's parts, configured by ``[nva_etcd]``."""

    name = "etcd"

    @staticmethod
    def kv_from_conf(conf: cfg.ConfigOpts) -> EtcdKV:
        """A connection to the cluster (ConfigError when the endpoints are malformed)."""
        require(conf, options.GROUP, "the etcd backend")
        require(conf, nva_options.GROUP, "the etcd backend")  # move-flap policy, log window
        g = conf[options.GROUP]
        return EtcdKV(
            g.endpoints,
            api_path=g.api_path,
            timeout=g.request_timeout,
            ca_cert=g.ca_cert,
            cert_key=g.key_file,
            cert_cert=g.cert_file,
        )

    @classmethod
    def _directory(cls, conf: cfg.ConfigOpts, kind: type[S]) -> S:
        """``kind`` (the store or its client) on ``[nva_etcd]`` with ``[nva]``'s rules."""
        kv = cls.kv_from_conf(conf)
        g = conf[options.GROUP]
        return kind(
            kv,
            g.prefix,
            max_txn_ops=g.max_txn_ops,
            mobility=MobilityPolicy.from_conf(conf),
            keep_changes=conf.nva.change_log_keep,
        )

    @classmethod
    def from_conf(cls, conf: cfg.ConfigOpts) -> EtcdNvaClient:
        """The directory client for NVE agents and stages (what the namespace promises)."""
        return cls._directory(conf, EtcdNvaClient)

    @classmethod
    def store_from_conf(cls, conf: cfg.ConfigOpts) -> EtcdNvaStore:
        """The directory for ``vmm nva serve`` (or in-process use)."""
        return cls._directory(conf, EtcdNvaStore)

    @classmethod
    def locks_from_conf(cls, conf: cfg.ConfigOpts, host: str) -> MigrationLocks:
        """A new lease for this instance and the owner keys of ``host``'s migrations."""
        kv = cls.kv_from_conf(conf)
        g = conf[options.GROUP]
        return MigrationLocks(kv, host, InstanceLease(kv, g.lease_ttl), g.prefix)

    @classmethod
    def journal_from_conf(
        cls, conf: cfg.ConfigOpts, host: str, locks: MigrationLocks | None = None
    ) -> EtcdJournal:
        """``host``'s journal, shared by every instance; fenced by ``locks`` when given."""
        require(conf, options.GROUP, "the etcd journal")
        prefix = conf[options.GROUP].prefix
        if locks is not None:
            return EtcdJournal(locks.kv, host, prefix, owner=locks)
        return EtcdJournal(cls.kv_from_conf(conf), host, prefix, owns_kv=True)

    @classmethod
    def pipeline_from_conf(
        cls, conf: cfg.ConfigOpts, host: HostContext, stages: list[Stage] | None = None
    ) -> HaPipeline:
        """A pipeline for ``host`` that shares its journal and migrations with other instances."""
        locks = cls.locks_from_conf(conf, host.name)
        journal = cls.journal_from_conf(conf, host.name, locks)
        claim_timeout = conf[options.GROUP].claim_timeout
        return HaPipeline(conf, host, journal, locks, stages, claim_timeout=claim_timeout)


class EtcdServedBackend(EtcdBackend):
    """Entry point ``etcd-served`` of ``vmm_orchestrator.nva_backends``: the directory on
    etcd, reached through `vmm nva serve` (issue 16).

    The server's store is the etcd store (``[nva_etcd]``), whose commit feed
    (one etcd watch, :mod:`vmm_etcd.feed`) drives the server's streams; NVE
    agents and stages use the HTTP client of ``[nva] url``, one stream per
    NVE, as with the embedded directory. Agents then cost etcd nothing per
    NVE (one watch per server instead of one per agent) and a move fans out
    as fast as the embedded directory's. Several servers over one etcd stay
    consistent (they keep no state of their own); put them behind one
    address for ``[nva] url``. The HA parts (journal, leases) stay on etcd.
    """

    name = "etcd-served"

    @classmethod
    def from_conf(cls, conf: cfg.ConfigOpts) -> NvaClient:  # type: ignore[override]
        return NvaClient.from_conf(conf)


def open_journal(conf: cfg.ConfigOpts, spec: HostSpec, lock: MigrationLocks | None) -> EtcdJournal:
    """Entry point ``etcd`` of ``vmm_orchestrator.journals``: the host's journal on
    etcd, shared by every instance serving it; fenced by ``lock`` when given."""
    return EtcdBackend.journal_from_conf(conf, spec.name, lock)


class EtcdMigrationLock:
    """Entry point ``etcd`` of ``vmm_orchestrator.migration_locks``.

    ``open`` gives this instance's lease and the owner keys of the host's
    migrations; ``pipeline`` the engine's pipeline that claims a migration
    before running it and takes over those of dead instances.
    """

    @staticmethod
    def open(conf: cfg.ConfigOpts, spec: HostSpec) -> MigrationLocks:
        return EtcdBackend.locks_from_conf(conf, spec.name)

    @staticmethod
    def pipeline(
        conf: cfg.ConfigOpts,
        host: HostContext,
        journal: EtcdJournal,
        lock: MigrationLocks,
        stages: list[Stage],
    ) -> HaPipeline:
        require(conf, options.GROUP, "the etcd migration lock")
        claim_timeout = conf[options.GROUP].claim_timeout
        return HaPipeline(conf, host, journal, lock, stages, claim_timeout=claim_timeout)
