"""Each host's state service: the source serves signed exports, the
destination takes imports and answers per kind SUCCESS or FAIL + reason.

Routes (every request carries the X-Auth-Token; requests about a migration
carry its description in X-Vmm-Migration, base64url JSON)::

    GET    /v1/state/<migration>?label=&kinds=&since=   stream an export (bundle)
    POST   /v1/state/<migration>?label=                 import a bundle -> JSON answer
    DELETE /v1/state/<migration>?label=                 revert imports (ABORTED)
    GET    /v1/state/<migration>/synced                 what was imported, per kind
    POST   /v1/state/<migration>/commit                 the VM stays: forget the undo data
    GET    /v1/health

A host exports only the entries of the VM a migration names, and only for a
migration it knows (``StateHost.expect``, called by the stages) or that the
directory vouches for (the NICs' MAC/addresses are the VM's registered
ones; for an export the VM is registered at this host and pending to the
migration's destination, for an import pending to this host, for that
migration): a token holder cannot make a host export another VM's
sessions by describing a fake VM.

Per-host credentials (issue 13): with ``[state] peer_token_digests`` each
host sends its own ``[state] token`` and a host knows only the SHA-256
digests of its peers' tokens (so no host can act as another); with mutual
TLS and ``[state] tls_peer_identity`` the peer is the host its client
certificate names (its CN, signed by the site's CA). A request
with a peer's token acts as that peer, which may only be the other end of
the migration it names: the destination pulls the export from the source;
the source pushes, asks what was imported, reverts and commits at the
destination. A request with this host's own token (or the one token every
host shares, when no digests are configured) is not bound to a peer.

``StateHost`` is what stages find under ``ctx.host.service("state")``: the
host's kinds, keys and limits, its server (:mod:`vmm_state.server`), its
importer (:mod:`vmm_state.importer`) and clients for its peers
(:mod:`vmm_state.client`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Self

from oslo_config import cfg

from vmm_orchestrator.errors import ConfigError, TransientError, VmmError
from vmm_orchestrator.model import Migration, Role
from vmm_orchestrator.options import require
from vmm_orchestrator.statekind import KindContext, Reason, StateKind
from vmm_state import options
from vmm_state.bundle import (
    BundleError,
    BundleHeader,
    BundleReader,
    SectionSource,
    write_bundle,
)
from vmm_state.client import StateClient
from vmm_state.importer import Importer, ImportReport, Ledger, LedgerEntry, kind_context
from vmm_state.kinds._common import freeze_heap, no_gc, thaw_heap
from vmm_state.server import StateServer
from vmm_state.wire import (
    MID_RE,
    MIGRATION_HEADER,
    BadRequest,
    Conflict,
    Forbidden,
    NotFound,
    ServiceError,
    TlsFiles,
    Unavailable,
    decode_migration,
    reason_for,
)

LOG = logging.getLogger(__name__)

__all__ = ["StateClient", "StateHost", "StateServer", "StateSettings", "nva_voucher"]


@dataclasses.dataclass(frozen=True)
class StateSettings:
    """The ``[state]`` options a StateHost uses, read and checked once."""

    key_id: str
    key: bytes
    verify_keys: Mapping[str, bytes]
    token: str
    max_bundle_bytes: int = 256 * 1024 * 1024
    max_entries: int = 262144
    max_entries_per_kind: Mapping[str, int] = dataclasses.field(default_factory=dict)
    chunk_entries: int = 2048
    delta_margin: float = 1.0
    bind_host: str = "127.0.0.1"
    bind_port: int = 9798
    connect_timeout: float = 2.0
    read_timeout: float = 30.0
    retry_delay: float = 0.2
    tls: TlsFiles | None = None
    ledger_dir: str | None = None
    #: longest a source tracks a migration's changes (a missed end is not a leak)
    track_seconds: float = 3600.0
    #: peer host -> SHA-256 hex digest of its token (per-host credentials)
    peer_token_digests: Mapping[str, str] = dataclasses.field(default_factory=dict)
    #: imports (uploads) served at once; more are answered 503 + Retry-After
    max_concurrent_imports: int = 2
    #: with mutual TLS: the peer is the host its client certificate names (CN)
    tls_peer_identity: bool = False
    #: the service's connection limit and request-head deadline (the JSON server's)
    max_connections: int = 4096
    request_deadline: float = 5.0

    def __post_init__(self) -> None:
        if not self.key or self.key_id not in self.verify_keys:
            raise ConfigError(
                "a state host needs a signing key that is also among its verification keys",
                hint="set [state] key (and key_id) to the same values on every host",
            )
        if not self.token:
            raise ConfigError(
                "[state] token is not set: the state service would be open to anyone",
                hint="set [state] token to the same secret on every host",
            )
        if self.tls_peer_identity and self.tls is None:
            raise ConfigError(
                "[state] tls_peer_identity needs mutual TLS",
                hint="set [state] cert_file, key_file and ca_file",
            )

    def identify(self, given: bytes) -> tuple[bool, str | None]:
        """(authenticated, peer): the peer whose token ``given`` is, None for this host's
        own token. Every digest is compared, in constant time."""
        own = hmac.compare_digest(given, self.token.encode("utf-8"))
        digest = hashlib.sha256(given).hexdigest().encode("ascii")
        peer = None
        for name, expected in self.peer_token_digests.items():
            if hmac.compare_digest(digest, expected.lower().encode("ascii")) and peer is None:
                peer = name
        if own:
            return True, None
        return peer is not None, peer

    @classmethod
    def from_conf(cls, conf: cfg.ConfigOpts) -> StateSettings:
        require(conf, options.GROUP, "the state service")
        group = conf[options.GROUP]
        key_id, key, keys = options.signing_keys(conf)
        default_max, per_kind = options.entry_limits(conf)
        files = (group.cert_file, group.key_file, group.ca_file)
        if any(files) and not all(files):
            raise ConfigError(
                "[state] cert_file, key_file and ca_file must be set together",
                hint="set all three for mutual TLS between hosts, or none",
            )
        return cls(
            key_id=key_id,
            key=key,
            verify_keys=keys,
            token=group.token or "",
            max_bundle_bytes=group.max_bundle_bytes,
            max_entries=default_max,
            max_entries_per_kind=per_kind,
            chunk_entries=group.chunk_entries,
            delta_margin=group.delta_margin,
            bind_host=group.bind_host,
            bind_port=group.bind_port,
            connect_timeout=group.connect_timeout,
            read_timeout=group.read_timeout,
            retry_delay=group.retry_delay,
            tls=TlsFiles(*files) if all(files) else None,
            ledger_dir=group.ledger_dir,
            peer_token_digests=options.peer_digests(conf),
            max_concurrent_imports=group.max_concurrent_imports,
            tls_peer_identity=group.tls_peer_identity,
            max_connections=group.max_connections,
            request_deadline=group.request_deadline,
        )

    def limit(self, kind: str) -> int:
        """Most entries of ``kind`` accepted for one migration."""
        return self.max_entries_per_kind.get(kind, self.max_entries)


# ------------------------------------------------------------ migrations


#: Raises unless the directory confirms the migration's VM: ``role`` SOURCE
#: (export: the VM is here), DESTINATION (import), None (revert, commit).
Voucher = Callable[[Migration, Role | None], None]


def nva_voucher(nva: Any, host: str) -> Voucher:
    """A voucher that asks the directory (an NvaClient) about each NIC.

    The MAC must be registered in its VNI with exactly the NIC's addresses
    (only the registered binding may move, DESIGN problem 3), and a pending
    move must be this migration's. For an export the endpoint must be
    located at this host and pending to the migration's destination; for an
    import pending to this host. A committed or aborted migration is pending
    nowhere, so a bundle replayed after it (by a destination restarted since,
    which forgot the migrations it closed) is refused here.
    """

    def vouch(migration: Migration, role: Role | None) -> None:
        for vif in migration.workload.vifs:
            try:
                ep = nva.get_endpoint(vif.vni, vif.mac)
            except TransientError:
                raise
            except VmmError as err:
                raise Forbidden(
                    f"the directory does not know NIC {vif.mac} in VNI {vif.vni} of "
                    f"{migration.workload.name}: {err}"
                ) from None
            registered = sorted(ep.get("ipv4") or []) + sorted(ep.get("ipv6") or [])
            described = sorted(vif.ipv4) + sorted(vif.ipv6)
            if registered != described:
                raise Forbidden(
                    f"NIC {vif.mac} of {migration.workload.name} is described with addresses "
                    f"{described}, the directory registers {registered}"
                )
            at, pending = ep.get("nve"), ep.get("pending_nve")
            # The directory names the pending migration (a stand-in may not say).
            moving = ep.get("migration_id")
            if moving is not None and moving != migration.id:
                raise Forbidden(
                    f"NIC {vif.mac} of {migration.workload.name} is pending for migration "
                    f"{moving}, not {migration.id}"
                )
            if role is Role.SOURCE and at != host:
                raise Forbidden(
                    f"NIC {vif.mac} of {migration.workload.name} is registered at {at}, not at "
                    f"{host}: this host will not export its state"
                )
            if role is Role.SOURCE and pending != migration.destination:
                raise Forbidden(
                    f"NIC {vif.mac} of {migration.workload.name} is not pending to "
                    f"{migration.destination} (pending: {pending}): this host will not export "
                    "its state for a move the directory does not know",
                    hint="the destination pre-stages the move (nva_prestage) before it pulls",
                )
            if role is Role.DESTINATION and pending != host:
                raise Forbidden(
                    f"NIC {vif.mac} of {migration.workload.name} is registered at {at} "
                    f"(pending: {pending}); it is not moving to {host} in migration "
                    f"{migration.id}"
                )

    return vouch


# -------------------------------------------------------------- the host


@dataclasses.dataclass
class ExportStat:
    """One kind's part of an export: entries written and ms spent in the kind's export.

    ``figures`` are the kind's own (``StateKind.delta_figures``): for a
    tracking kind, whether a delta was sent or, after lost events, a full resync.
    """

    entries: int = 0
    ms: float = 0.0
    error: str | None = None
    figures: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Transfer:
    """One transfer attempt: the importer's answer, the export figures, the wall time."""

    report: ImportReport
    exported: dict[str, ExportStat]
    ms: float


class StateHost:
    """One host's state kinds, keys, limits, service and peer clients.

    ``peers`` maps NVE id -> base URL of that host's state service, or is a
    callable doing the same; a mapping is read at every transfer, so it may
    be filled after construction (after each host's server has bound a
    port). ``vouch`` lets the service accept migrations that the stages
    have not announced with ``expect`` (the source learns of a migration
    only when the destination pulls); without it only announced
    migrations are served.
    """

    def __init__(
        self,
        name: str,
        netns: str | None,
        kinds: Mapping[str, StateKind],
        settings: StateSettings,
        peers: Mapping[str, str] | Callable[[str], str | None] | None = None,
        vouch: Voucher | None = None,
    ) -> None:
        self.name = name
        self.netns = netns
        self.kinds = dict(kinds)
        self.settings = settings
        self.peers: Mapping[str, str] | Callable[[str], str | None] = (
            peers if peers is not None else {}
        )
        self.vouch = vouch
        self.importer = Importer(name, netns, self.kinds, Ledger(settings.ledger_dir))
        self._expected: dict[str, Migration] = {}
        self._lock = threading.Lock()
        self._clients: dict[str, StateClient] = {}
        self._server: StateServer | None = None
        #: migrations whose changes this host (as source) tracks
        self._tracked: set[str] = set()
        #: full resyncs sent because change events were lost (counted, logged, noted)
        self.resyncs = 0
        #: (migration, kind) found available at a full export here
        self._available: set[tuple[str, str]] = set()
        #: migrations for which this host froze the heap (``freeze_heap``)
        self._frozen: set[str] = set()
        #: the seq of the last bundle this host exported (BundleHeader.seq)
        self._seq = 0
        #: migration -> exported_at of each export here -> time.monotonic() just
        #: before its kinds began (what ``settle`` tells a tracking kind)
        self._marks: dict[str, dict[float, float]] = {}
        #: (migration, kind) -> exported_at of the newest export settled for it
        self._settled: dict[tuple[str, str], float] = {}
        #: migration -> what its destination said it holds, at PREPARE (``held``)
        self._held: dict[str, dict[str, float]] = {}
        #: (migration, kind) -> a delta export started ahead (``prefetch``)
        self._prefetched: dict[tuple[str, str], Future[tuple[list[dict[str, Any]], ExportStat]]]
        self._prefetched = {}
        self._pool: ThreadPoolExecutor | None = None
        #: bundles being received at once (uploads and pulls): each is held in memory
        #: until its signature verifies ([state] max_concurrent_imports)
        self.import_slots = threading.BoundedSemaphore(settings.max_concurrent_imports)

    @classmethod
    def from_conf(
        cls,
        conf: cfg.ConfigOpts,
        name: str,
        netns: str | None,
        nva: Any = None,
        peers: Mapping[str, str] | Callable[[str], str | None] | None = None,
        kinds: Mapping[str, StateKind] | None = None,
    ) -> StateHost:
        """A host as ``[state]`` describes it; ``nva`` (an NvaClient) vouches for migrations.

        ``peers`` defaults to ``[state] peers``; ``kinds`` to the kinds of
        ``[state] kinds`` loaded through stevedore.
        """
        from vmm_state import registry

        settings = StateSettings.from_conf(conf)
        if kinds is None:
            kinds = registry.load_kinds(conf, list(conf[options.GROUP].kinds))
        if peers is None:
            peers = dict(conf[options.GROUP].peers or {})
        vouch = nva_voucher(nva, name) if nva is not None else None
        return cls(name, netns, kinds, settings, peers=peers, vouch=vouch)

    # -- server ---------------------------------------------------------------

    def start(self) -> None:
        """Serve this host's state API in a background thread."""
        if self._server is None:
            for name, kind in self.kinds.items():
                try:
                    kind.prepare(self.netns)
                except Exception as err:
                    LOG.warning("host %s: preparing %s failed: %r", self.name, name, err)
            self._server = StateServer(self)
        self._server.start()

    def stop(self) -> None:
        """Stop serving and drop peer connections. Idempotent."""
        if self._server is not None:
            self._server.stop()
            self._server = None
        with self._lock:
            clients, self._clients = list(self._clients.values()), {}
            tracked, self._tracked = set(self._tracked), set()
        for client in clients:
            client.close()
        for migration_id in tracked:
            self._untrack(migration_id)
        with self._lock:
            frozen, self._frozen = set(self._frozen), set()
            pool, self._pool = self._pool, None
            self._prefetched.clear()
        for migration_id in frozen:
            thaw_heap(migration_id)
        if pool is not None:
            pool.shutdown(wait=True)

    @property
    def url(self) -> str:
        """Base URL of this host's running service."""
        if self._server is None:
            raise RuntimeError(f"the state service of host {self.name} is not started")
        return self._server.url

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- migrations -------------------------------------------------------------

    def expect(self, migration: Migration) -> None:
        """Announce a migration this host takes part in (stages call this)."""
        with self._lock:
            self._expected[migration.id] = migration

    def forget(self, migration_id: str) -> None:
        """The migration is over here (completed, aborted or committed): stop
        tracking its changes and drop what the kinds remember of it."""
        with self._lock:
            self._expected.pop(migration_id, None)
            self._tracked.discard(migration_id)
            self._available = {m for m in self._available if m[0] != migration_id}
            self._frozen.discard(migration_id)
            self._marks.pop(migration_id, None)
            self._held.pop(migration_id, None)
            self._settled = {k: v for k, v in self._settled.items() if k[0] != migration_id}
        self.drop_prefetch(migration_id)
        thaw_heap(migration_id)
        self._untrack(migration_id)
        self.importer.close(migration_id)
        for name, kind in self.kinds.items():
            try:
                kind.forget(migration_id)
            except Exception as err:
                LOG.error("host %s: %s could not forget %s: %r", self.name, name, migration_id, err)

    def _untrack(self, migration_id: str) -> None:
        for name, kind in self.kinds.items():
            try:
                kind.untrack(migration_id)
            except Exception as err:
                LOG.error(
                    "host %s: %s could not stop tracking %s: %r", self.name, name, migration_id, err
                )

    def track(self, ctx: KindContext, names: Iterable[str]) -> None:
        """Start tracking the VM's changes in ``names`` before their full export."""
        for name in names:
            kind = self.kinds.get(name)
            if kind is None:
                continue
            try:
                kind.track(ctx)
            except Exception as err:  # the delta is then a full export (replace semantics)
                LOG.warning(
                    "host %s: cannot track %s changes of %s (%r); its delta will be a full export",
                    self.name,
                    name,
                    ctx.migration_id,
                    err,
                )
                continue
            with self._lock:
                fresh = ctx.migration_id not in self._tracked
                self._tracked.add(ctx.migration_id)
            if fresh:
                # A migration that aborts before its switchover leaves the source no
                # stage to end its tracking: end it after a generous lifetime.
                timer = threading.Timer(
                    self.settings.track_seconds, self._expire, (ctx.migration_id,)
                )
                timer.daemon = True
                timer.start()

    def _expire(self, migration_id: str) -> None:
        with self._lock:
            if migration_id not in self._tracked:
                return
        LOG.warning(
            "host %s: migration %s neither completed nor aborted within %.0f s; its "
            "change tracking ends",
            self.name,
            migration_id,
            self.settings.track_seconds,
        )
        self.forget(migration_id)

    def resolve(
        self,
        migration_id: str,
        description: str | None,
        role: Role | None,
        peer: str | None = None,
    ) -> Migration:
        """The migration a request is about, or the ServiceError that refuses it.

        ``peer`` is the host whose own token the request carries (None: not
        bound to a peer); it must be the migration's other end: its
        destination for an export (``role`` SOURCE), its source otherwise.
        """
        if not MID_RE.match(migration_id):
            raise BadRequest(f"migration id {migration_id!r} is not valid")
        described = decode_migration(description) if description else None
        if described is not None and described.id != migration_id:
            raise BadRequest(
                f"{MIGRATION_HEADER} describes migration {described.id}, the path names "
                f"{migration_id}"
            )
        with self._lock:
            known = self._expected.get(migration_id)
        if known is not None:
            if described is not None and described != known:
                raise Conflict(
                    f"the description of migration {migration_id} differs from the one host "
                    f"{self.name} has (workload, NICs, source or destination)"
                )
            migration = known
        elif role is Role.DESTINATION and self.importer.is_closed(migration_id):
            # Over here and not announced again: whatever comes for it is a replay.
            raise Conflict(
                f"migration {migration_id} is closed on host {self.name} (committed or "
                "aborted); a bundle for it is a replay and is refused unread",
                hint="a new move under this id must be announced again (StateHost.expect)",
            )
        elif described is None:
            raise NotFound(
                f"migration {migration_id} is unknown on host {self.name}",
                hint=f"send its description in {MIGRATION_HEADER}",
            )
        else:
            migration = described
        self._check_role(migration, role)
        if peer is not None:
            self._check_peer(migration, role, peer)
        if known is None:
            self._vouch(migration, role)
        return migration

    def _check_peer(self, migration: Migration, role: Role | None, peer: str) -> None:
        end, other = (
            ("destination", migration.destination)
            if role is Role.SOURCE
            else ("source", migration.source)
        )
        if peer != other:
            raise Forbidden(
                f"host {peer} is not the {end} of migration {migration.id} "
                f"({migration.source} -> {migration.destination}); host {self.name} serves "
                "this request only to that host",
                hint="each host's [state] token is its own ([state] peer_token_digests)",
            )

    def _check_role(self, migration: Migration, role: Role | None) -> None:
        if role is Role.SOURCE and migration.source != self.name:
            raise Forbidden(
                f"migration {migration.id} moves {migration.workload.name} from "
                f"{migration.source}, not from {self.name}: nothing to export here"
            )
        if role is Role.DESTINATION and migration.destination != self.name:
            raise Forbidden(
                f"migration {migration.id} moves {migration.workload.name} to "
                f"{migration.destination}, not to {self.name}: nothing to import here"
            )

    def _vouch(self, migration: Migration, role: Role | None) -> None:
        if self.vouch is None:
            raise Forbidden(
                f"migration {migration.id} was not announced on host {self.name} and no "
                "directory is configured to vouch for it",
                hint="give the host's StateHost an NVA client (nva=...)",
            )
        try:
            self.vouch(migration, role)
        except ServiceError:
            raise
        except TransientError as err:
            raise Unavailable(f"cannot ask the directory about {migration.id}: {err}") from err
        except VmmError as err:
            raise Forbidden(str(err)) from err

    def context(self, migration: Migration) -> KindContext:
        return kind_context(self.netns, migration)

    # -- source side ------------------------------------------------------------

    def export(
        self,
        migration: Migration,
        label: str,
        kinds: Iterable[str] | None = None,
        since: float | Mapping[str, float | None] | None = None,
        stats: dict[str, ExportStat] | None = None,
    ) -> Iterator[bytes]:
        """The signed bundle of the VM's state here, as a stream of pieces.

        ``since`` is one time for every kind or a time per kind (None: a
        full export). Kinds not enabled here, or unavailable on this host,
        get an "unavailable" section so the importer answers FAIL/unsupported.
        """
        ctx = self.context(migration)
        names = list(self.kinds) if kinds is None else list(kinds)
        per_kind = since if isinstance(since, Mapping) else dict.fromkeys(names, since)
        starts = [s for s in (per_kind.get(n) for n in names) if s is not None]
        full = [n for n in names if per_kind.get(n) is None]
        if full:  # subscribe before the dump, so that no change slips between
            self.track(ctx, full)
        mark = time.monotonic()  # before any kind's export (they run lazily, later)
        header = BundleHeader(
            migration=migration.id,
            workload=migration.workload.name,
            source=self.name,
            label=label,
            since=min(starts) if starts else None,
            exported_at=time.time(),
            seq=self._next_seq(),
        )
        with self._lock:
            self._marks.setdefault(migration.id, {})[header.exported_at] = mark
        box = stats if stats is not None else {}
        sections = (self._section(ctx, name, per_kind.get(name), box) for name in names)
        s = self.settings
        pieces = write_bundle(header, s.key_id, s.key, sections, s.chunk_entries)
        return self._without_gc(pieces, migration.id if full else None)

    def settle(self, migration: Migration, synced: Mapping[str, float]) -> dict[str, int]:
        """Source: the destination says it holds, per kind, the export of
        ``migration`` made here at ``synced[kind]`` (its ``synced`` answer, read
        just before the next export). Each tracking kind forgets the changes
        that export already carried (``settle(migration_id, upto)``), so the
        next delta holds only what changed since the last transfer that
        succeeded. Settling from what the destination holds *now* (not from a
        push's answer) stays right if it reverts a later import. Returns
        per kind the changes dropped.
        """
        with self._lock:
            marks = dict(self._marks.get(migration.id, {}))
        out: dict[str, int] = {}
        for name, kind in self.kinds.items():
            if not kind.settles:
                continue
            settle = kind.settle
            at = synced.get(name)
            with self._lock:
                before = self._settled.get((migration.id, name))
            try:
                if before is not None and (at is None or at < before):
                    # it reverted a transfer settled here: its changes must go again
                    LOG.warning(
                        "host %s: %s no longer holds the %s export of %s settled at %s; "
                        "its next delta is a resync",
                        self.name, migration.destination, name, migration.id, before,
                    )  # fmt: skip
                    settle(migration.id, None)
                    with self._lock:
                        self._settled.pop((migration.id, name), None)
                upto = None if at is None else marks.get(at)
                if upto is not None:
                    out[name] = int(settle(migration.id, upto) or 0)
                    with self._lock:
                        self._settled[(migration.id, name)] = at  # type: ignore[assignment]
            except Exception as err:  # the next delta is then merely larger
                LOG.warning(
                    "host %s: %s could not settle %s: %r", self.name, name, migration.id, err
                )
        if synced:
            oldest = min(synced.values())
            with self._lock:
                kept = self._marks.get(migration.id)
                if kept is not None:
                    for at in [a for a in kept if a < oldest]:
                        del kept[at]
        return out

    def held(self, migration: Migration, synced: Mapping[str, float]) -> dict[str, int]:
        """Source: the destination told (at PREPARE, after its import) what it holds
        of ``migration``: settle now, outside the pause, and keep it for the
        switchover (``take_held``), which then needs no round trip to ask.
        Only ABORTED makes the destination drop its imports before then."""
        settled = self.settle(migration, synced)
        with self._lock:
            self._held[migration.id] = dict(synced)
        return settled

    def take_held(self, migration_id: str) -> dict[str, float] | None:
        """What the destination told it holds, once (a retry asks it again)."""
        with self._lock:
            return self._held.pop(migration_id, None)

    def prefetch(self, migration: Migration, kinds: Iterable[str]) -> list[str]:
        """Source, SWITCHOVER: start now, side by side, the delta exports that need
        nothing from the destination, while the caller asks it what it holds.

        Those are the kinds without change tracking to settle (bridge kinds,
        fingerprinted sets: their delta does not depend on the destination's
        answer) and already exported whole here for the migration (the
        pre-copy: they are tracked and were available). Their ``since`` is
        that first export's time less ``[state] delta_margin``, at or before
        any the destination can name, so the delta is never smaller than the
        one asked later. The next ``export`` of the migration with a
        ``since`` for such a kind takes its result (once); ``drop_prefetch``
        forgets what nobody took. Returns the kinds started.
        """
        with self._lock:
            marks = self._marks.get(migration.id)
            first = min(marks) if marks else None
            available = {k for m, k in self._available if m == migration.id}
        if first is None:
            return []
        since = first - self.settings.delta_margin
        ctx = self.context(migration)
        started = []
        for name in kinds:
            kind = self.kinds.get(name)
            if kind is None or name not in available or kind.settles:
                continue
            with self._lock:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(
                        max_workers=max(1, len(self.kinds)), thread_name_prefix=f"state-{self.name}"
                    )
                future = self._pool.submit(self._export_now, kind, ctx, since)
                self._prefetched[(migration.id, name)] = future
            started.append(name)
        return started

    def drop_prefetch(self, migration_id: str) -> None:
        """Forget the prefetched exports of a migration nobody took (they age)."""
        with self._lock:
            for key in [k for k in self._prefetched if k[0] == migration_id]:
                del self._prefetched[key]

    def _export_now(
        self, kind: StateKind, ctx: KindContext, since: float
    ) -> tuple[list[dict[str, Any]], ExportStat]:
        stat = ExportStat()
        entries = list(self._exported(kind, ctx, since, stat))
        return entries, stat

    def _next_seq(self) -> int:
        """Above every seq this host wrote, also before a restart (the clock counts up)."""
        with self._lock:
            self._seq = max(self._seq + 1, time.time_ns())
            return self._seq

    def _without_gc(self, pieces: Iterator[bytes], freeze: str | None) -> Iterator[bytes]:
        """The bundle, written with the collector paused (see ``no_gc``); after a
        pre-copy's export the heap is frozen until the migration ends (``freeze_heap``)."""
        with no_gc():
            yield from pieces
        if freeze is not None:
            self._freeze(freeze)

    def _freeze(self, migration_id: str) -> None:
        with self._lock:
            self._frozen.add(migration_id)
        freeze_heap(migration_id)

    def _section(
        self,
        ctx: KindContext,
        name: str,
        since: float | None,
        stats: dict[str, ExportStat],
    ) -> SectionSource:
        kind = self.kinds.get(name)
        stat = stats.setdefault(name, ExportStat())
        if kind is None:
            stat.error = f"kind {name} is not enabled on host {self.name} ([state] kinds)"
            return SectionSource(name, unavailable=stat.error)
        mark = (ctx.migration_id, name)
        if since is not None and mark in self._available:
            why = None  # checked at the pre-copy: not again inside the pause
        else:
            try:
                why = kind.unavailable(ctx)
            except Exception as err:
                why = f"its availability check failed: {err!r}"
            if why is None:
                with self._lock:
                    self._available.add(mark)
        if why is not None:
            stat.error = f"host {self.name} cannot hold {name}: {why}"
            return SectionSource(name, unavailable=stat.error)
        with self._lock:
            ahead = self._prefetched.pop(mark, None)
        if ahead is not None and since is not None:
            try:
                entries, done = ahead.result()
            except Exception as err:  # exported again below, in line
                LOG.warning("host %s: the early %s export failed: %r", self.name, name, err)
            else:
                stat.entries, stat.ms, stat.figures = done.entries, done.ms, done.figures
                return SectionSource(name, entries=entries)
        return SectionSource(name, entries=self._exported(kind, ctx, since, stat))

    def _exported(
        self, kind: StateKind, ctx: KindContext, since: float | None, stat: ExportStat
    ) -> Iterator[dict[str, Any]]:
        # A kind may hand the writer entries it encoded itself (bundle.Line).
        export = getattr(kind, "export_encoded", None) or kind.export
        yield from _timed(lambda: export(ctx, since), stat)
        stat.figures = kind.delta_figures(ctx.migration_id)
        if stat.figures.get("mode") == "resync":
            with self._lock:
                self.resyncs += 1
            LOG.warning(
                "host %s: %s of %s sent as a full resync (%s)",
                self.name,
                kind.name,
                ctx.migration_id,
                stat.figures,
            )

    def cleanup_source(self, migration: Migration) -> dict[str, str | None]:
        """Remove the VM's entries here, kind by kind; per kind None or the error."""
        ctx = self.context(migration)
        out: dict[str, str | None] = {}
        for name, kind in self.kinds.items():
            try:
                kind.cleanup_source(ctx)
                out[name] = None
            except Exception as err:
                LOG.error("host %s: cleanup of %s for %s failed: %r", self.name, name, ctx, err)
                out[name] = repr(err)
        return out

    # -- destination side ----------------------------------------------------

    def new_reader(self, migration: Migration | None = None) -> BundleReader:
        """A reader that parses each chunk as it arrives and, for ``migration``'s
        bundle, checks the entries of kinds with a pure check as well (see
        ``Importer.early_check``): that work overlaps the transfer."""
        s = self.settings
        check = self.importer.early_check(migration) if migration is not None else None
        return BundleReader(
            s.verify_keys, s.max_bundle_bytes, s.limit, parse_early=True, check_early=check
        )

    def import_pieces(
        self, migration: Migration, pieces: Iterable[bytes], label: str
    ) -> ImportReport:
        """Read, verify and import one bundle; refusals become FAIL answers, never raise."""
        with no_gc():
            return self._import_pieces(migration, pieces, label)

    def _import_pieces(
        self, migration: Migration, pieces: Iterable[bytes], label: str
    ) -> ImportReport:
        reader = self.new_reader(migration)
        started = time.perf_counter()
        received_at = time.monotonic()
        try:
            for piece in pieces:
                reader.feed(piece)
            bundle = reader.finish()
        except BundleError as err:
            LOG.warning(
                "host %s: %s bundle of migration %s refused: %s",
                self.name,
                label,
                migration.id,
                err,
            )
            report = ImportReport.refused(migration.id, label, self.kinds, err, reader.size)
            report.read_ms = (time.perf_counter() - started) * 1000.0
            return report
        read_ms = (time.perf_counter() - started) * 1000.0
        report = self.importer.import_bundle(migration, bundle, label, received_at)
        report.read_ms = read_ms
        return report

    def revert_imports(
        self,
        migration: Migration,
        label: str | None = None,
        fallback: list[LedgerEntry] | None = None,
    ) -> tuple[int, list[str]]:
        """Undo this host's imports for ``migration`` (of ``label`` or all), newest first."""
        return self.importer.revert(migration, label, fallback)

    # -- transfers ---------------------------------------------------------------

    def peer(self, nve: str) -> StateClient:
        """A client for host ``nve``'s state service (ConfigError if its URL is unknown)."""
        url = self.peers(nve) if callable(self.peers) else self.peers.get(nve)
        if not url:
            raise ConfigError(
                f"host {self.name} does not know the state service of host {nve}",
                hint=f"add {nve}:<url> to [state] peers",
            )
        with self._lock:
            client = self._clients.get(url)
            if client is None:
                s = self.settings
                client = StateClient(url, s.token, s.connect_timeout, s.read_timeout, s.tls)
                self._clients[url] = client
            return client

    def source_kinds(self, migration: Migration, deadline: float) -> list[str]:
        """The kinds to pre-copy: ours, then those only the source has (which we will
        answer FAIL/unsupported, so the policy decides whether the VM moves without)."""
        kinds = list(self.kinds)
        try:
            theirs = self.peer(migration.source).health(deadline).get("kinds", [])
        except ServiceError as err:
            LOG.info("host %s: cannot list the kinds of %s: %s", self.name, migration.source, err)
            return kinds
        return kinds + [str(k) for k in theirs if k not in self.kinds]

    def pull(
        self,
        migration: Migration,
        label: str,
        kinds: list[str],
        deadline: float,
        since: float | None = None,
        freeze: bool = True,
    ) -> Transfer:
        """Destination: pull an export of ``kinds`` from the source and import it here
        (the collector paused; with ``freeze`` the heap frozen afterwards until the
        migration ends). ``since`` (the source's clock) asks for a delta from then
        (a warm mirror's remainder); None: whatever the source tracks, else whole."""
        with no_gc():
            done = self._pull(migration, label, kinds, deadline, since)
        if freeze:
            self._freeze(migration.id)
        return done

    def _pull(
        self,
        migration: Migration,
        label: str,
        kinds: list[str],
        until: float,
        since: float | None = None,
    ) -> Transfer:
        started = time.perf_counter()
        client = self.peer(migration.source)
        if not self.import_slots.acquire(timeout=max(0.0, until - time.monotonic())):
            busy = (
                f"host {self.name} was receiving {self.settings.max_concurrent_imports} "
                "bundles until the stage deadline ([state] max_concurrent_imports)"
            )
            report = ImportReport.failed(migration.id, label, kinds, Reason.TRANSFER_FAILED, busy)
            return Transfer(report, {}, (time.perf_counter() - started) * 1000.0)
        try:
            return self._pull_one(client, migration, label, kinds, until, started, since)
        finally:
            self.import_slots.release()

    def _pull_one(
        self,
        client: StateClient,
        migration: Migration,
        label: str,
        kinds: list[str],
        until: float,
        started: float,
        since: float | None = None,
    ) -> Transfer:
        received_at = time.monotonic()
        reader = self.new_reader(migration)
        try:
            client.pull(migration, reader, label=label, kinds=kinds, since=since, deadline=until)
            bundle = reader.finish()
        except BundleError as err:
            report = ImportReport.refused(migration.id, label, kinds, err, reader.size)
        except ServiceError as err:
            report = ImportReport.failed(
                migration.id, label, kinds, reason_for(err), f"{err.code}: {err}", reader.size
            )
        else:
            read_ms = (time.perf_counter() - started) * 1000.0
            report = self.importer.import_bundle(migration, bundle, label, received_at)
            report.read_ms = read_ms
            del bundle
        return Transfer(report, {}, (time.perf_counter() - started) * 1000.0)

    def push(
        self,
        migration: Migration,
        label: str,
        kinds: list[str],
        deadline: float,
        synced: dict[str, float] | None = None,
    ) -> Transfer:
        """Source: export ``kinds`` (each since the destination last imported it) and push,
        with the collector paused (this is the part inside the VM's pause). ``synced``:
        what the destination holds, when already known (one round trip fewer); else asked."""
        with no_gc():
            return self._push(migration, label, kinds, deadline, synced)

    def _push(
        self,
        migration: Migration,
        label: str,
        kinds: list[str],
        until: float,
        synced: dict[str, float] | None = None,
    ) -> Transfer:
        started = time.perf_counter()
        client = self.peer(migration.destination)
        stats: dict[str, ExportStat] = {}
        try:
            if synced is None:
                synced = client.synced(migration, until)
            self.settle(migration, synced)  # what the destination holds needs no resend
            margin = self.settings.delta_margin
            since = {k: (synced[k] - margin if k in synced else None) for k in kinds}
            pieces = self.export(migration, label, kinds, since, stats)
            report = client.push(migration, pieces, label=label, deadline=until)
        except ServiceError as err:
            report = ImportReport.failed(
                migration.id, label, kinds, reason_for(err), f"{err.code}: {err}"
            )
        return Transfer(report, stats, (time.perf_counter() - started) * 1000.0)


def _timed(
    export: Callable[[], Iterable[dict[str, Any]]], stat: ExportStat
) -> Iterator[dict[str, Any]]:
    """The kind's export, lazily, counting entries and the time spent inside the kind
    (not the time the consumer spends sending them)."""
    clock = time.perf_counter
    t0 = clock()
    try:
        iterator = iter(export())
        while True:
            try:
                entry = next(iterator)
            except StopIteration:
                break
            stat.entries += 1
            stat.ms += (clock() - t0) * 1000.0
            yield entry
            t0 = clock()
        stat.ms += (clock() - t0) * 1000.0
    except Exception as err:
        stat.error = repr(err)
        raise
