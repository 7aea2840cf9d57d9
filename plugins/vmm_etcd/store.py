"""The directory (NVA) on etcd, with the embedded store's exact semantics.

:class:`EtcdNvaStore` has the public methods of
:class:`vmm_orchestrator.nva.store.NvaStore`, takes the same arguments,
returns the same dicts and raises the same exceptions with the same
messages, so ``NvaServer`` serves it unchanged and the same semantics tests
run against both (tests/functional/test_etcd_store.py):

* a dense directory revision (1, 2, 3, ...) for every change an NVE must
  apply, never consumed by a refused operation;
* an EVPN-style sequence number per endpoint that grows by one per move;
* duplicate-address detection on create and again at pre-stage;
* pre-stage / commit / abort, idempotent on repeat;
* a change log NVEs read after a revision (paged), long-polls that wake on
  a change, acks that never go backwards and a wait for every NVE's ack;
* acks written in batches (:meth:`EtcdNvaStore.record_acks`), which the
  server's streams and the client's ``ack_async`` feed: one etcd key per
  batch of acks (:mod:`vmm_etcd.acklog`), not a put per NVE (issue 16: at
  1,000 peers the per-NVE puts were most of etcd's CPU per move).

Two generation keys tell readers of acks that nothing changed without a
read of a whole range: ``nvegen`` is rewritten with every NVE record written
or deleted, ``ackgen`` with every NVE's own ack key written or deleted
(:class:`PrefixCache`).

Every mutation is one etcd transaction that compares the mod revisions of
what it read (see :mod:`vmm_etcd.txn`), so several processes can share one
directory safely. Long-polls wait on etcd watches instead of a condition
variable. The layout of keys is in :mod:`vmm_etcd.keys`.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Generic, TypeVar

from vmm_etcd import kv as kvmod
from vmm_etcd import txn
from vmm_etcd.acklog import (
    FOLD_KEYS,
    Ack,
    AckLogWriter,
    Entry,
    LogCache,
    LogView,
    better,
    epochs_of,
    fold,
)
from vmm_etcd.feed import ChangeFeed, GapListener, Listener
from vmm_etcd.keys import Keys, pad
from vmm_etcd.kv import EtcdKV, KeyValue
from vmm_etcd.txn import Tx
from vmm_etcd.watch import WatchStream
from vmm_orchestrator.nva import store as core
from vmm_orchestrator.nva.errors import Conflict, NotFound, NvaError
from vmm_orchestrator.nva.store import (
    CHANGE_LOG_KEEP,
    MobilityPolicy,
    StoreFront,
    check_movable,
    check_vni,
    decide_move,
    frozen_error,
    gone,
    membership_changes,
    nve_busy,
    same_endpoint,
)

T = TypeVar("T")

LOG = logging.getLogger(__name__)

#: Fields of an endpoint that callers see (the store also keeps commit facts).
PUBLIC_FIELDS = (
    "vni",
    "mac",
    "ipv4",
    "ipv6",
    "nve",
    "vtep",
    "state",
    "seq",
    "pending_nve",
    "migration_id",
    "last_migration_id",
    "revision",
    "updated_at",
    "sticky",
    "frozen",
    "frozen_at",
    "frozen_reason",
    "moves",
)

#: Mobility fields of an endpoint stored before they existed.
_MOBILITY_DEFAULTS: dict[str, Any] = {
    "sticky": False,
    "frozen_at": None,
    "frozen_reason": None,
    "moves": [],
    "last_planned": None,
}


def public(endpoint: dict[str, Any]) -> dict[str, Any]:
    """The endpoint as the API shows it."""
    full = {**_MOBILITY_DEFAULTS, **endpoint}
    full["frozen"] = full["frozen_at"] is not None
    full["sticky"] = bool(full["sticky"])
    return {name: full.get(name) for name in PUBLIC_FIELDS}


def ack_value(revision: int, at: float | None) -> str:
    """An ack as stored: the padded revision first, so a string compare orders acks."""
    return f"{pad(revision)}|{'' if at is None else repr(at)}"


def parse_ack(value: str | None) -> dict[str, Any]:
    """{"acked_revision", "acked_at"} from a stored ack (absent: never acked)."""
    if not value:
        return {"acked_revision": 0, "acked_at": None}
    revision, _, at = value.partition("|")
    return {"acked_revision": int(revision), "acked_at": float(at) if at else None}


def nve_dict(record: dict[str, Any], ack: str | None, logged: Ack | None = None) -> dict[str, Any]:
    """An NVE as the API shows it; its ack the higher of its own key and the ack log."""
    own = parse_ack(ack)
    best = better((own["acked_revision"], own["acked_at"]), logged)
    assert best is not None
    return {
        "id": record["id"],
        "vtep": record["vtep"],
        "vnis": list(record["vnis"]),
        "acked_revision": best[0],
        "acked_at": best[1],
    }


def change(revision: int, vni: int, kind: str, payload: dict[str, Any]) -> dict[str, Any]:
    """A change as NVEs read it (the same shape as the embedded store's)."""
    return {"revision": revision, "kind": kind, "vni": vni, "created_at": time.time(), **payload}


def _not_registered(nve_id: str) -> NotFound:
    return NotFound(f"no NVE '{nve_id}' is registered", hint="register it first")


class EtcdNvaStore(StoreFront):
    """Thread-safe directory of NVEs and endpoints with a watchable change log, on etcd."""

    #: Seconds the stream hub's ack writer lets a burst of acks gather before writing
    #: it (:class:`vmm_orchestrator.nva.stream.AckWriter`): each write costs etcd a
    #: request, about 1 ms of its CPU, whatever the batch holds.
    ack_window = 0.005

    def __init__(
        self,
        kv: EtcdKV,
        prefix: str = "/vmm/",
        *,
        max_txn_ops: int = 128,
        owns_kv: bool = True,
        mobility: MobilityPolicy | None = None,
        keep_changes: int = CHANGE_LOG_KEEP,
    ) -> None:
        self.kv = kv
        self.keys = Keys(prefix)
        self.max_txn_ops = max_txn_ops
        if mobility is not None:
            self.mobility = mobility
        self.keep_changes = max(1, keep_changes)
        #: The key holding the revision up to which the change log was pruned.
        self.pruned_key = f"{self.keys.prefix}pruned"
        self._pruned_seen = 0
        self._owns_kv = owns_kv
        # Operations that record changes all compete for the revision key; inside one
        # process they wait their turn here instead of losing races in etcd.
        self._write_lock = threading.Lock()
        self._streams: set[WatchStream] = set()
        self._streams_lock = threading.Lock()
        self._closed = False
        self._last_revision = 0
        self._feed: ChangeFeed | None = None
        self._feed_lock = threading.Lock()
        self._ack_log = AckLogWriter(kv, self.keys, max_txn_ops)
        self._records = record_cache(self.keys)
        self._ack_keys = ack_key_cache(self.keys)
        self._log_cache = LogCache(self.keys, own=self._ack_log)
        self._local = LocalAcks()
        self._ack_log.listeners.append(self._local.add)

    @property
    def path(self) -> str:
        """Where the directory lives, for messages (the embedded store's is a file)."""
        return f"etcd {self.kv.describe()} {self.keys.prefix}"

    # ------------------------------------------------------------- plumbing

    @property
    def revision(self) -> int:
        """The revision of the newest change (0 when there is none)."""
        self._check_open()
        found = self.kv.read(kvmod.get(self.keys.revision), what="read the revision").one(0)
        self._last_revision = int(found.value) if found is not None else 0
        return self._last_revision

    def close(self) -> None:
        """Close the connection and wake every waiter so it returns at once."""
        if self._closed:
            return
        self._closed = True
        self._local.wake()
        with self._feed_lock:
            feed, self._feed = self._feed, None
        if feed is not None:
            feed.close()
        with self._streams_lock:
            streams = list(self._streams)
        for stream in streams:
            stream.close()
        if self._owns_kv:
            self.kv.close()

    # ------------------------------------------------------- commit feed

    def add_listener(self, listener: Listener) -> None:
        """Call ``listener(revision, changes)`` after each commit that recorded changes.

        The embedded store's commit-listener seam, fed here by one etcd watch
        over the change log (:class:`vmm_etcd.feed.ChangeFeed`, started with
        the first listener): `vmm nva serve` over etcd then streams changes
        to NVE agents like the embedded directory. Commits by other
        processes sharing the etcd reach the listener too, in revision order.
        """
        self._listen(lambda feed: feed.add_listener(listener))

    def remove_listener(self, listener: Listener) -> None:
        self._drop_feed_listener(lambda feed: feed.remove_listener(listener))

    def add_gap_listener(self, listener: GapListener) -> None:
        """Call ``listener(why)`` when the feed may have missed commits (etcd compacted the
        history it had to watch again from); readers must catch up from the change log."""
        self._listen(lambda feed: feed.add_gap_listener(listener))

    def remove_gap_listener(self, listener: GapListener) -> None:
        self._drop_feed_listener(lambda feed: feed.remove_gap_listener(listener))

    @property
    def feed(self) -> ChangeFeed | None:
        """The running commit feed, if anyone listens."""
        return self._feed

    def _listen(self, add: Callable[[ChangeFeed], None]) -> None:
        """Add a listener to the feed, starting the feed (after the add: no commit in
        between is missed) when it is the first."""
        self._check_open()
        with self._feed_lock:
            if self._feed is not None:
                add(self._feed)
                return
            feed = ChangeFeed(self.kv, self.keys)
            add(feed)
            feed.start()
            self._feed = feed

    def _drop_feed_listener(self, drop: Callable[[ChangeFeed], None]) -> None:
        with self._feed_lock:
            feed = self._feed
            if feed is None:
                return
            drop(feed)
            if not feed.idle:
                return
            self._feed = None
        feed.close()

    def _check_open(self) -> None:
        if self._closed:
            raise NvaError("the NVA store is closed")

    def _run(self, what: str, decide: Callable[[Tx], T], *, changes: bool) -> T:
        """One optimistic operation (see vmm_etcd.txn); ``changes``: it may record changes."""
        self._check_open()
        guard = self._write_lock if changes else contextlib.nullcontext()
        with guard:
            return txn.run(
                self.kv,
                self.keys,
                what,
                decide,
                max_ops=self.max_txn_ops,
                on_commit=self._committed,
            )

    def _committed(self, tx: Tx) -> None:
        if tx.new_revision is not None:
            self._last_revision = max(self._last_revision, tx.new_revision)
            self._prune(tx.new_revision)

    @property
    def pruned_revision(self) -> int:
        """Changes up to this revision are no longer in the log (0: nothing pruned)."""
        self._check_open()
        found = self.kv.read(kvmod.get(self.pruned_key), what="read the pruned revision").one(0)
        self._pruned_seen = int(found.value) if found is not None else 0
        return self._pruned_seen

    def _prune(self, revision: int) -> None:
        """Keep the newest ``keep_changes`` changes, pruning in batches of a tenth of that.

        The floor is raised first, then the older changes of every served VN
        are deleted: a reader either sees the new floor (and is told to
        re-sync) or reads a log that still has what it asks for.
        """
        floor = revision - self.keep_changes
        if floor - self._pruned_seen < max(1, self.keep_changes // 10):
            return
        if floor - self.pruned_revision < max(1, self.keep_changes // 10):
            return  # another process pruned already
        answer = self.kv.txn(
            [kvmod.cmp_value(self.pruned_key, "LESS", pad(floor))],
            [kvmod.put(self.pruned_key, pad(floor))],
            what="raise the pruned revision",
        )
        if not answer.succeeded and self.pruned_revision >= floor:
            return
        if not answer.succeeded:  # no floor key yet: create it
            self.kv.txn(
                [kvmod.cmp_mod(self.pruned_key, 0)],
                [kvmod.put(self.pruned_key, pad(floor))],
                what="set the pruned revision",
            )
        vnis = self._logged_vnis()
        deletes = [
            {
                "request_delete_range": {
                    "key": kvmod.b64(self.keys.vn_changes(vni)),
                    "range_end": kvmod.b64(self.keys.change(vni, floor + 1)),
                }
            }
            for vni in vnis
        ]
        for start in range(0, len(deletes), self.max_txn_ops):
            self.kv.txn(success=deletes[start : start + self.max_txn_ops], what="prune changes")
        self._pruned_seen = floor

    def _logged_vnis(self) -> list[int]:
        """Every VN with a change in the log (one short read per VN, at pruning time)."""
        vnis: list[int] = []
        start = self.keys.changes
        while True:
            found = self.kv.read(
                kvmod.get_prefix(self.keys.changes, start=start, limit=1),
                what="read the change log",
            ).kvs(0)
            if not found:
                return vnis
            vni = int(found[0].key[len(self.keys.changes) :].split("/", 1)[0])
            vnis.append(vni)
            start = self.keys.vn_changes(vni + 1)

    @contextlib.contextmanager
    def _watch(self, key: str, start_revision: int, prefix: bool = False) -> Iterator[WatchStream]:
        """A watch that close() can interrupt."""
        stream = WatchStream(self.kv, key, start_revision=start_revision, prefix=prefix)
        with self._streams_lock:
            self._streams.add(stream)
        try:
            yield stream
        finally:
            with self._streams_lock:
                self._streams.discard(stream)
            stream.close()

    def _record(self, tx: Tx, vni: int, kind: str, payload: dict[str, Any], revision: int) -> None:
        tx.put_json(self.keys.change(vni, revision), change(revision, vni, kind, payload))

    def _nve(self, tx: Tx, nve_id: str) -> dict[str, Any]:
        record = tx.get_json(self.keys.nve(nve_id))
        if record is None:
            raise _not_registered(nve_id)
        result: dict[str, Any] = record
        return result

    def _serving_nve(self, tx: Tx, nve_id: str, vni: int) -> dict[str, Any]:
        record = self._nve(tx, nve_id)
        if vni not in record["vnis"]:
            raise Conflict(
                f"NVE '{nve_id}' does not serve VNI {vni} (it serves {record['vnis']})",
                hint="register the NVE with that VNI first",
            )
        return record

    def _endpoint(self, tx: Tx, vni: int, mac: str) -> dict[str, Any]:
        endpoint = tx.get_json(self.keys.endpoint(vni, mac))
        if endpoint is None:
            raise NotFound(f"no endpoint {mac} in VNI {vni}")
        return {**_MOBILITY_DEFAULTS, **endpoint}

    def _put_endpoint(self, tx: Tx, endpoint: dict[str, Any], **fields: Any) -> dict[str, Any]:
        """Write ``endpoint`` with ``fields`` changed; returns the stored form."""
        updated = {**endpoint, **fields, "updated_at": time.time()}
        tx.put_json(self.keys.endpoint(updated["vni"], updated["mac"]), updated)
        return updated

    def _check_addresses(self, tx: Tx, vni: int, mac: str, addresses: Sequence[str]) -> None:
        """Duplicate-address detection: an IP belongs to one MAC per VN."""
        if not addresses:
            return
        found = tx.get(*(self.keys.address(vni, ip) for ip in addresses))
        taken = [
            f"{ip} (held by {holder.value})"
            for ip, holder in zip(addresses, found, strict=True)
            if holder is not None and holder.value != mac
        ]
        if taken:
            raise Conflict(
                f"duplicate address in VNI {vni} for {mac}: {', '.join(taken)}",
                hint="delete or readdress the other endpoint first",
            )

    # ---------------------------------------------------------------- NVEs

    def _do_register_nve(self, nve_id: str, vtep_ip: str, vni_list: list[int]) -> dict[str, Any]:
        def decide(tx: Tx) -> dict[str, Any]:
            old, ack = tx.get(self.keys.nve(nve_id), self.keys.ack(nve_id))
            record = {"id": nve_id, "vtep": vtep_ip, "vnis": vni_list}
            before = json.loads(old.value) if old is not None else None
            logged = self._logged_ack(old) if old is not None else None
            if before == record:  # a restarting agent: nothing changes
                return nve_dict(record, ack.value if ack is not None else None, logged)
            tx.put_json(self.keys.nve(nve_id), record)
            # Every record write: readers of records compare it (PrefixCache), and a new
            # record is a new epoch that ack log writers must learn (vmm_etcd.acklog).
            tx.put(self.keys.nve_generation, nve_id)
            for vni, payload in membership_changes(before, record):
                self._record(tx, vni, "nve", payload, tx.next_revision())
            if before is not None and before["vtep"] != vtep_ip:
                self._announce_vtep_change(tx, nve_id, vtep_ip)
            return nve_dict(record, ack.value if ack is not None else None, logged)

        return self._run(f"register NVE {nve_id}", decide, changes=True)

    def _do_delete_nve(self, nve_id: str) -> dict[str, Any]:
        def decide(tx: Tx) -> dict[str, Any]:
            tx.get(self.keys.nve(nve_id), self.keys.ack(nve_id), self.keys.revision)
            record = self._nve(tx, nve_id)
            busy = []
            for item in tx.scan(self.keys.endpoints):
                endpoint = json.loads(item.value)
                tx.expect(item)
                if nve_id in (endpoint["nve"], endpoint.get("pending_nve")):
                    busy.append((endpoint["vni"], endpoint["mac"]))
            if busy:
                raise nve_busy(nve_id, busy)
            ack, stored = tx.get(self.keys.ack(nve_id), self.keys.nve(nve_id))
            tx.delete(self.keys.nve(nve_id))
            tx.delete(self.keys.ack(nve_id))
            tx.put(self.keys.nve_generation, nve_id)
            if ack is not None:
                tx.put(ack_generation(self.keys), nve_id)
            for vni, payload in membership_changes(record, None):
                self._record(tx, vni, "nve", payload, tx.next_revision())
            logged = self._logged_ack(stored) if stored is not None else None
            return nve_dict(record, ack.value if ack is not None else None, logged)

        return self._run(f"delete NVE {nve_id}", decide, changes=True)

    def _announce_vtep_change(self, tx: Tx, nve_id: str, vtep: str) -> None:
        """Peers tunnel to the VTEP, so each endpoint behind a moved VTEP is a change."""
        for item in tx.scan(self.keys.endpoints):
            endpoint = json.loads(item.value)
            if endpoint["nve"] != nve_id:
                continue
            tx.expect(item)
            revision = tx.next_revision()
            stored = self._put_endpoint(tx, endpoint, vtep=vtep, revision=revision)
            self._record(tx, stored["vni"], "endpoint", {"endpoint": public(stored)}, revision)

    def _read_with_log(
        self, *requests_: dict[str, Any], what: str
    ) -> tuple[kvmod.TxnResult, LogView]:
        """``requests_`` and the ack log (:class:`LogCache`), read at one etcd revision."""
        for full in (False, True):
            answer = self.kv.read(*requests_, *self._log_cache.requests(full), what=what)
            view = self._log_cache.read(answer, len(requests_))
            if view is not None:
                return answer, view
        raise NvaError(f"cannot {what}: the ack log kept changing under the read")

    def _logged_ack(self, record: KeyValue) -> Ack | None:
        """The ack log's highest ack of the NVE stored as ``record`` (read, not compared)."""
        nve_id = record.key[len(self.keys.nves) :]
        _, view = self._read_with_log(what="read the ack log")
        return view.fold({nve_id: record.create_revision}).get(nve_id)

    def _do_get_nve(self, nve_id: str) -> dict[str, Any]:
        self._check_open()
        answer, view = self._read_with_log(
            kvmod.get(self.keys.nve(nve_id)), kvmod.get(self.keys.ack(nve_id)), what="read an NVE"
        )
        record, ack = answer.one(0), answer.one(1)
        if record is None:
            raise _not_registered(nve_id)
        logged = view.fold({nve_id: record.create_revision}).get(nve_id)
        return nve_dict(json.loads(record.value), ack.value if ack is not None else None, logged)

    def _do_list_nves(self, vni: int | None) -> list[dict[str, Any]]:
        self._check_open()
        answer, view = self._read_with_log(
            kvmod.get_prefix(self.keys.nves), kvmod.get_prefix(self.keys.acks), what="list NVEs"
        )
        acks = {a.key[len(self.keys.acks) :]: a.value for a in answer.kvs(1)}
        records = answer.kvs(0)
        logged = view.fold(epochs_of(self.keys, records))
        out = []
        for item in records:
            record = json.loads(item.value)
            if vni is None or vni in record["vnis"]:
                out.append(nve_dict(record, acks.get(record["id"]), logged.get(record["id"])))
        return out

    # ----------------------------------------------------------- endpoints

    def _do_create_endpoint(
        self, vni: int, mac: str, v4: list[str], v6: list[str], nve: str, sticky: bool
    ) -> tuple[dict[str, Any], bool]:
        def decide(tx: Tx) -> tuple[dict[str, Any], bool]:
            tx.get(self.keys.endpoint(vni, mac), self.keys.nve(nve), self.keys.revision)
            record = self._serving_nve(tx, nve, vni)
            existing = tx.get_json(self.keys.endpoint(vni, mac))
            if existing is not None:
                if same_endpoint(public(existing), v4, v6, nve, sticky):
                    return public(existing), False
                raise Conflict(
                    f"endpoint {mac} in VNI {vni} already exists with other addresses or NVE "
                    f"(ipv4={existing['ipv4']}, ipv6={existing['ipv6']}, "
                    f"nve={existing['nve']})",
                    hint="delete it first, or use move to change its NVE",
                )
            self._check_addresses(tx, vni, mac, v4 + v6)
            revision = tx.next_revision()
            endpoint = {
                "vni": vni,
                "mac": mac,
                "ipv4": v4,
                "ipv6": v6,
                "nve": nve,
                "vtep": record["vtep"],
                "state": "active",
                "seq": 0,
                "pending_nve": None,
                "migration_id": None,
                "last_migration_id": None,
                "revision": revision,
                "last_commit_revision": None,
                "committed_at": None,
                **_MOBILITY_DEFAULTS,
                "sticky": sticky,
            }
            stored = self._put_endpoint(tx, endpoint)
            for ip in v4 + v6:
                tx.put(self.keys.address(vni, ip), mac)
            self._record(tx, vni, "endpoint", {"endpoint": public(stored)}, revision)
            return public(stored), True

        return self._run(f"add endpoint {mac} in VNI {vni}", decide, changes=True)

    def _do_get_endpoint(self, vni: int, mac: str) -> dict[str, Any]:
        self._check_open()
        found = self.kv.read(kvmod.get(self.keys.endpoint(vni, mac)), what="read an endpoint")
        item = found.one(0)
        if item is None:
            raise NotFound(f"no endpoint {mac} in VNI {vni}")
        return public(json.loads(item.value))

    def _do_find(
        self,
        vni: int,
        addr: ipaddress.IPv4Address | ipaddress.IPv6Address | None,
        wanted_mac: str | None,
    ) -> dict[str, Any]:
        if addr is None:
            assert wanted_mac is not None
            return self.get_endpoint(vni, wanted_mac)
        self._check_open()
        holder = self.kv.read(
            kvmod.get(self.keys.address(vni, str(addr))), what="look up an address"
        ).one(0)
        endpoint = None
        if holder is not None and (wanted_mac is None or holder.value == wanted_mac):
            with contextlib.suppress(NotFound):
                endpoint = self.get_endpoint(vni, holder.value)
        if endpoint is None or str(addr) not in endpoint["ipv4"] + endpoint["ipv6"]:
            wanted = f"IP {addr}" + (f" and MAC {wanted_mac}" if wanted_mac else "")
            raise NotFound(f"no endpoint in VNI {vni} with {wanted}")
        return endpoint

    def list_endpoints(self, vni: int | None = None) -> list[dict[str, Any]]:
        """All endpoints, or those of one VN, ordered by (vni, mac)."""
        prefix = self.keys.endpoints if vni is None else self.keys.vn_endpoints(check_vni(vni))
        self._check_open()
        items = self.kv.read(kvmod.get_prefix(prefix), what="list endpoints").kvs(0)
        return [public(json.loads(i.value)) for i in items]

    def snapshot(self, vni: int | None = None) -> tuple[int, list[dict[str, Any]]]:
        """Endpoints and the directory revision they were read at, in one etcd read."""
        prefix = self.keys.endpoints if vni is None else self.keys.vn_endpoints(check_vni(vni))
        self._check_open()
        answer = self.kv.read(
            kvmod.get(self.keys.revision), kvmod.get_prefix(prefix), what="list endpoints"
        )
        counter = answer.one(0)
        revision = int(counter.value) if counter is not None else 0
        return revision, [public(json.loads(i.value)) for i in answer.kvs(1)]

    def _do_delete_endpoint(self, vni: int, mac: str) -> dict[str, Any]:
        def decide(tx: Tx) -> dict[str, Any]:
            tx.get(self.keys.endpoint(vni, mac), self.keys.revision)
            stored = self._endpoint(tx, vni, mac)
            addresses = stored["ipv4"] + stored["ipv6"]
            holders = tx.get(*(self.keys.address(vni, ip) for ip in addresses))
            tx.delete(self.keys.endpoint(vni, mac))
            for ip, holder in zip(addresses, holders, strict=True):
                if holder is not None and holder.value == mac:
                    tx.delete(self.keys.address(vni, ip))
            endpoint = public(stored)
            endpoint["revision"] = tx.next_revision()
            payload = {"mac": mac, "seq": endpoint["seq"], "endpoint": endpoint}
            self._record(tx, vni, "endpoint_deleted", payload, endpoint["revision"])
            return endpoint

        return self._run(f"delete endpoint {mac} in VNI {vni}", decide, changes=True)

    # ---------------------------------------------------------- migration

    def _do_prestage(self, vni: int, mac: str, nve: str, migration_id: str) -> dict[str, Any]:
        def decide(tx: Tx) -> dict[str, Any]:
            tx.get(self.keys.endpoint(vni, mac), self.keys.nve(nve))
            row = self._endpoint(tx, vni, mac)
            self._serving_nve(tx, nve, vni)
            if core.prestage_is_done(row, vni, mac, nve, migration_id):
                return public(row)
            check_movable(row, vni, mac, "pre-stage")
            self._check_addresses(tx, vni, mac, row["ipv4"] + row["ipv6"])
            target = tx.get(self.keys.nve(nve))[0]
            assert target is not None  # _serving_nve read it
            stored = self._put_endpoint(
                tx,
                row,
                state="pending",
                pending_nve=nve,
                migration_id=migration_id,
                # What the commit needs of the target NVE, so that the commit, on the
                # migration's critical path, need not read it again (see _commit_pending).
                pending_vtep=json.loads(target.value)["vtep"],
                pending_nve_mod=target.mod_revision,
            )
            return public(stored)

        return self._run(f"prestage {mac} in VNI {vni}", decide, changes=False)

    def _do_commit(self, vni: int, mac: str, migration_id: str) -> dict[str, Any]:
        def decide(tx: Tx) -> dict[str, Any]:
            tx.get(self.keys.endpoint(vni, mac), self.keys.revision)
            row = self._endpoint(tx, vni, mac)
            if not core.commit_is_done(row, vni, mac, migration_id):
                return self._commit_pending(tx, row)
            return {
                "endpoint": public(row),
                "revision": row["last_commit_revision"],
                "committed_at": row["committed_at"],
            }

        return self._run(f"commit {mac} in VNI {vni}", decide, changes=True)

    def _commit_pending(self, tx: Tx, row: dict[str, Any]) -> dict[str, Any]:
        if tx.attempt == 1 and row.get("pending_vtep") and row.get("pending_nve_mod"):
            # The target NVE as the prestage saw it, valid only if it is unchanged since.
            tx.assume(self.keys.nve(row["pending_nve"]), row["pending_nve_mod"])
            vtep = row["pending_vtep"]
        else:
            vtep = self._nve(tx, row["pending_nve"])["vtep"]
        revision = tx.next_revision()
        committed_at = time.time()
        mobility: dict[str, Any] = {}
        if row["pending_nve"] != row["nve"]:  # not already moved there by its first frame
            mobility = decide_move(
                row, row["pending_nve"], committed_at, self.mobility, row["migration_id"]
            ).fields
        stored = self._put_endpoint(
            tx,
            row,
            **mobility,
            nve=row["pending_nve"],
            vtep=vtep,
            seq=row["seq"] + 1,
            state="active",
            pending_nve=None,
            pending_vtep=None,
            pending_nve_mod=None,
            migration_id=None,
            last_migration_id=row["migration_id"],
            last_commit_revision=revision,
            committed_at=committed_at,
            revision=revision,
        )
        endpoint = public(stored)
        self._record(tx, row["vni"], "endpoint", {"endpoint": endpoint}, revision)
        return {"endpoint": endpoint, "revision": revision, "committed_at": committed_at}

    def _do_abort(self, vni: int, mac: str, migration_id: str) -> dict[str, Any]:
        def decide(tx: Tx) -> dict[str, Any]:
            row = self._endpoint(tx, vni, mac)
            if core.abort_is_done(row, vni, mac, migration_id):
                return public(row)
            stored = self._put_endpoint(
                tx,
                row,
                state="active",
                pending_nve=None,
                pending_vtep=None,
                pending_nve_mod=None,
                migration_id=None,
            )
            return public(stored)

        return self._run(f"abort the prestage of {mac} in VNI {vni}", decide, changes=False)

    def _do_move(self, vni: int, mac: str, nve: str, seq: int | None) -> dict[str, Any]:
        def decide(tx: Tx) -> dict[str, Any]:
            tx.get(self.keys.endpoint(vni, mac), self.keys.nve(nve), self.keys.revision)
            row = self._endpoint(tx, vni, mac)
            record = self._serving_nve(tx, nve, vni)
            frozen.clear()  # from an attempt that lost a race
            if core.move_is_done(row, vni, mac, nve, seq):
                return public(row)
            check_movable(row, vni, mac, f"move to {nve}")
            decision = decide_move(row, nve, time.time(), self.mobility)
            if decision.freeze:
                self._put_endpoint(tx, row, **decision.fields)
                frozen.append((row["nve"], decision.reason or ""))
                return public(row)
            revision = tx.next_revision()
            stored = self._put_endpoint(
                tx,
                row,
                **decision.fields,
                nve=nve,
                vtep=record["vtep"],
                seq=row["seq"] + 1,
                revision=revision,
            )
            self._record(tx, vni, "endpoint", {"endpoint": public(stored)}, revision)
            return public(stored)

        frozen: list[tuple[str, str]] = []
        result = self._run(f"move {mac} in VNI {vni}", decide, changes=True)
        if frozen:
            at, reason = frozen[-1]
            raise frozen_error(vni, mac, at, reason)
        return result

    def _do_release(self, vni: int, mac: str) -> dict[str, Any]:
        def decide(tx: Tx) -> dict[str, Any]:
            row = self._endpoint(tx, vni, mac)
            stored = self._put_endpoint(
                tx, row, frozen_at=None, frozen_reason=None, moves=[], last_planned=None
            )
            return public(stored)

        return self._run(f"release {mac} in VNI {vni}", decide, changes=False)

    def _do_expire(self, vni: int, mac: str, targets: list[str]) -> dict[str, Any]:
        def decide(tx: Tx) -> dict[str, Any]:
            tx.get(
                self.keys.endpoint(vni, mac),
                self.keys.revision,
                *(self.keys.nve(n) for n in targets),
            )
            self._endpoint(tx, vni, mac)
            for nve in targets:
                self._serving_nve(tx, nve, vni)
            revision = 0
            for nve in targets:
                revision = tx.next_revision()
                self._record(tx, vni, "expire", {"mac": mac, "target_nve": nve}, revision)
            return {"vni": vni, "mac": mac, "nves": targets, "revision": revision}

        return self._run(f"expire {mac} in VNI {vni}", decide, changes=True)

    # ------------------------------------------------------ watch and acks

    def _do_changes_since(
        self, nve_id: str, revision: int, deadline: float
    ) -> tuple[int, list[dict[str, Any]]]:
        self._check_open()
        while True:
            if self._closed:  # closed while we waited: let the watcher go
                return self._last_revision, []
            page = self.changes_page(nve_id, revision)
            remaining = deadline - time.monotonic()
            if page.changes or remaining <= 0:
                return page.revision, page.changes
            # Sleep until the revision key changes after what we read (or the timeout).
            with contextlib.suppress(NvaError):
                with self._watch(self.keys.revision, page.etcd_revision + 1) as stream:
                    stream.get(remaining)

    def changes_page(self, nve_id: str, since: int) -> ChangesPage:
        """One answer to a watch, read at one etcd revision (see changes_since)."""
        self._check_open()
        record = self.kv.read(kvmod.get(self.keys.nve(nve_id)), what="read an NVE").one(0)
        if record is None:
            raise _not_registered(nve_id)
        vnis: list[int] = json.loads(record.value)["vnis"]
        page_size = core.CHANGES_PAGE
        collected: list[dict[str, Any]] = []
        cursor = since
        etcd_revision = 0
        while True:
            requests_ = [kvmod.get(self.keys.revision, etcd_revision)] + [
                kvmod.get_prefix(
                    self.keys.vn_changes(vni),
                    start=self.keys.change(vni, cursor + 1),
                    limit=page_size,
                    revision=etcd_revision,
                )
                for vni in vnis
            ]
            answer = self.kv.read(
                *requests_,
                kvmod.get(self.pruned_key, etcd_revision),
                what="read the change log",
            )
            etcd_revision = etcd_revision or answer.revision
            counter = answer.one(0)
            current = int(counter.value) if counter is not None else 0
            self._last_revision = current
            if since > current:
                raise Conflict(
                    f"since={since} is ahead of the directory's revision {current}",
                    hint="the directory was reset: resynchronize from a full endpoint list",
                )
            floor = answer.one(len(requests_))
            pruned = int(floor.value) if floor is not None else 0
            if cursor < pruned:  # read at the same etcd revision as the log itself
                raise gone(since, pruned)
            # A VN whose range hit the limit is known only up to its last change read.
            bound = current
            found: list[dict[str, Any]] = []
            for index in range(1, len(requests_)):
                items = [json.loads(i.value) for i in answer.kvs(index)]
                if answer.more(index) and items:
                    bound = min(bound, items[-1]["revision"])
                found.extend(items)
            found.sort(key=lambda c: c["revision"])
            for item in found:
                if item["revision"] > bound:
                    break
                if item.get("target_nve") in (None, nve_id):
                    collected.append(item)
            if len(collected) >= page_size:
                collected = collected[:page_size]
                return ChangesPage(collected[-1]["revision"], collected, etcd_revision, vnis)
            if bound == current:
                return ChangesPage(current, collected, etcd_revision, vnis)
            cursor = bound  # the rest of a truncated VN: read on at the same etcd revision

    def _do_ack(self, nve_id: str, revision: int) -> dict[str, Any]:
        """One transaction in the common case: it writes only if the NVE exists,
        the directory has reached ``revision`` and the stored ack is lower.
        """
        self._check_open()
        nve_key, ack_key = self.keys.nve(nve_id), self.keys.ack(nve_id)
        now = time.time()
        compare = [kvmod.cmp_exists(nve_key), kvmod.cmp_value(ack_key, "LESS", pad(revision))]
        if revision > 0:
            compare.append(kvmod.cmp_value(self.keys.revision, "GREATER", pad(revision - 1)))
        for full in (False, True):  # the ack log as the LogCache reads it, not all of it
            log = self._log_cache.requests(full)
            reads = [kvmod.get(nve_key), kvmod.get(self.keys.revision), kvmod.get(ack_key), *log]
            answer = self.kv.txn(
                compare,
                [
                    kvmod.put(ack_key, ack_value(revision, now)),
                    kvmod.put(ack_generation(self.keys), nve_id),
                    kvmod.get(nve_key),
                    *log,
                ],
                reads,
                what=f"record the ack of NVE {nve_id}",
            )
            view = self._log_cache.read(answer, 3)
            if view is not None or answer.succeeded:
                break
        if answer.succeeded:
            record = answer.one(2)
            assert record is not None
            logged = (
                view.fold({nve_id: record.create_revision}).get(nve_id)
                if view is not None
                else self._logged_ack(record)
            )
            return nve_dict(json.loads(record.value), ack_value(revision, now), logged)
        record, counter, ack = answer.one(0), answer.one(1), answer.one(2)
        if record is None:
            raise _not_registered(nve_id)
        logged = (
            view.fold({nve_id: record.create_revision}).get(nve_id)
            if view is not None
            else self._logged_ack(record)
        )
        current = int(counter.value) if counter is not None else 0
        if revision > current:
            raise Conflict(
                f"NVE '{nve_id}' acked revision {revision}, but the directory is at {current}",
                hint="the directory was reset: resynchronize from a full endpoint list",
            )
        if ack is not None:  # already acked as far
            return nve_dict(json.loads(record.value), ack.value, logged)

        def decide(tx: Tx) -> dict[str, Any]:  # the NVE's first single ack: no key yet
            found = self._nve(tx, nve_id)
            tx.get(ack_key)
            tx.put(ack_key, ack_value(revision, now))
            tx.put(ack_generation(self.keys), nve_id)
            return nve_dict(found, ack_value(revision, now), logged)

        return self._run(f"record the ack of NVE {nve_id}", decide, changes=False)

    def _do_ack_many(self, acks: dict[str, int]) -> dict[str, Any]:
        errors = self.record_acks(acks)
        listed = {n["id"]: n for n in self._do_list_nves(None)}  # one read, not one per NVE
        acked = {n: listed[n] for n in acks if n not in errors and n in listed}
        return {"acked": acked, "errors": errors}

    def record_acks(self, acks: dict[str, int]) -> dict[str, str]:
        """Write a batch of acks as one key of the ack log (:mod:`vmm_etcd.acklog`):
        {nve: why refused}.

        The batch is written if the directory has reached its highest
        revision and every NVE in it is registered (known with its epoch);
        there is no compare per NVE: readers take the highest ack, so an
        ack lower than one already held changes nothing. The NVEs the writer
        does not know, and the acks ahead of the directory, go ack by ack
        (:meth:`ack`), which tells which one was refused and why.
        """
        self._check_open()
        if not acks:
            return {}
        log = self._ack_log
        slow: dict[str, int] = {}
        with log.lock:
            if any(n not in log.epochs for n in acks):
                log.refresh()  # the first batch, or NVEs registered since the last
            fast = {n: r for n, r in acks.items() if n in log.epochs}
            slow = {n: r for n, r in acks.items() if n not in log.epochs}
            for _ in range(3):
                if not fast:
                    break
                written, current = log.write(fast, time.time())
                if written:
                    fast = {}
                    break
                ahead = {n: r for n, r in fast.items() if r > current}
                slow.update(ahead)
                fast = {n: r for n, r in fast.items() if n not in ahead}
                log.refresh()  # an NVE record created meanwhile: learn its epoch
                slow.update({n: r for n, r in fast.items() if n not in log.epochs})
                fast = {n: r for n, r in fast.items() if n in log.epochs}
            slow.update(fast)
            if log.due():
                try:
                    log.compact()
                except NvaError as err:  # the next batch tries again
                    LOG.warning("folding the ack log failed: %s", err)
        errors: dict[str, str] = {}
        for nve_id, revision in sorted(slow.items()):  # the slow path names the culprit
            try:
                self._do_ack(nve_id, revision)
            except NvaError as err:
                errors[nve_id] = err.message
        return errors

    def _do_acks(
        self, vni: int, min_revision: int, wanted: list[str] | None, deadline: float
    ) -> dict[str, dict[str, Any]]:
        """The set of NVEs is taken when the call starts; acks arriving afterwards
        are followed through an etcd watch, not by reading everything again.
        """
        self._check_open()
        full_records = full_acks = full_log = False
        caches = (self._records, self._ack_keys)
        while True:  # twice at most: a full read of what a cached read could not settle
            known = self._records.snapshot(full=full_records)
            known_acks = self._ack_keys.snapshot(full=full_acks)
            head = [kvmod.get(self.keys.revision), *(kvmod.get(c.generation) for c in caches)]
            log = self._log_cache.requests(full_log)
            ranges = [self._records.request(known), self._ack_keys.request(known_acks)]
            compare = [self._records.compare(known), self._ack_keys.compare(known_acks)]
            if None in compare:
                answer = self.kv.read(*head, *ranges, *log, what="read the acks")
            else:  # neither records nor own ack keys written since: only count them
                counts = [c.count() for c in caches]
                answer = self.kv.txn(
                    [c for c in compare if c is not None],
                    [*head, *counts, *log],
                    [*head, *ranges, *log],
                    what="read the acks",
                )
            gens = (answer.one(1), answer.one(2))
            if None not in compare and answer.succeeded:
                found = self._records.unchanged(known, answer, 3, gens[0])
                acked = self._ack_keys.unchanged(known_acks, answer, 4, gens[1])
            else:
                found = self._records.update(known, answer, 3, gens[0])
                acked = self._ack_keys.update(known_acks, answer, 4, gens[1])
            view = self._log_cache.read(answer, 5)
            if found is not None and acked is not None and view is not None:
                break
            if full_records and full_acks and full_log:
                raise NvaError("cannot read the acks: the directory kept changing under the read")
            full_records = full_records or found is None
            full_acks = full_acks or acked is None
            full_log = full_log or view is None
        counter = answer.one(0)
        current = int(counter.value) if counter is not None else 0
        if min_revision > current:
            raise Conflict(
                f"min_revision {min_revision} is ahead of the directory's revision {current}"
            )
        records = {n: record for n, (record, _) in found.items()}
        epochs = {n: epoch for n, (_, epoch) in found.items()}
        logged = view.fold(epochs)
        if view.keys > FOLD_KEYS:
            self._ack_log.fold_soon()
        if wanted is None:
            ids = [n for n in sorted(records) if vni in records[n]["vnis"]]
        else:
            for nve_id in wanted:
                if nve_id not in records:
                    raise _not_registered(nve_id)
            ids = wanted
        # Each NVE's best ack as (revision, at), None: never acked; the dicts at the end.
        state: dict[str, Ack | None] = {}
        for n in ids:
            single, entry = acked.get(n), logged.get(n)
            state[n] = (
                entry if single is None else single if entry is None else better(single, entry)
            )

        def short() -> list[str]:
            return [n for n, a in state.items() if a is None or a[0] < min_revision]

        missing = short()
        if not missing or deadline - time.monotonic() <= 0:
            return _ack_dicts(state)
        if self._local.knows(missing):
            # Those NVEs' acks came through this process so far: wait for its own
            # writes first (no etcd watch), then watch etcd from the read on.
            until = min(deadline, time.monotonic() + LOCAL_WAIT)
            missing = self._wait_local(state, epochs, min_revision, missing, until)
            if not missing or deadline - time.monotonic() <= 0:
                return _ack_dicts(state)
        own = self._ack_log.prefix
        with self._watch(self.keys.any_ack, answer.revision + 1, prefix=True) as stream:
            while missing:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                if self._closed:
                    raise NvaError("the NVA store is closed")
                try:
                    events = stream.get(remaining)
                except NvaError:
                    if self._closed:
                        raise NvaError("the NVA store is closed") from None
                    raise
                for event in events or ():
                    if event.kind != "PUT":
                        continue
                    if event.kv.key.startswith(self.keys.ack_log):
                        acks = fold([event.kv], epochs)
                        if not event.kv.key.startswith(own):
                            self._local.forget(acks)  # those NVEs ack elsewhere now
                        for nve_id, ack in acks.items():
                            if nve_id in state:
                                state[nve_id] = better(state[nve_id], ack)
                        continue
                    nve_id = event.kv.key[len(self.keys.acks) :]
                    if nve_id in state and event.kv.key.startswith(self.keys.acks):
                        state[nve_id] = better(state[nve_id], own_ack(event.kv.value))
                missing = [n for n in missing if (a := state[n]) is None or a[0] < min_revision]
        return _ack_dicts(state)

    def _wait_local(
        self,
        state: dict[str, Ack | None],
        epochs: dict[str, int],
        min_revision: int,
        missing: list[str],
        until: float,
    ) -> list[str]:
        """Merge the acks this process writes into ``state`` until every NVE of
        ``missing`` acked ``min_revision`` or ``until`` (monotonic); entries count only
        for the epochs read. Only the NVEs still missing are looked at on each write;
        returns those still missing."""
        generation = 0
        while missing:
            generation, acks = self._local.since(generation, missing, until)
            for nve_id, (revision, epoch, at) in acks.items():
                if epochs.get(nve_id) == epoch:
                    state[nve_id] = better(state[nve_id], (revision, at))
            missing = [n for n in missing if (a := state[n]) is None or a[0] < min_revision]
            if self._closed:
                raise NvaError("the NVA store is closed")
            if time.monotonic() >= until:
                break
        return missing


def own_ack(value: str | None) -> Ack | None:
    """An NVE's own ack key's value as (revision, at); None when empty."""
    if not value:
        return None
    revision, _, at = value.partition("|")
    return int(revision), float(at) if at else None


def _ack_dicts(state: dict[str, Ack | None]) -> dict[str, dict[str, Any]]:
    """{nve: {"acked_revision", "acked_at"}} as the API answers."""
    return {
        n: {"acked_revision": a[0], "acked_at": a[1]}
        if a is not None
        else {"acked_revision": 0, "acked_at": None}
        for n, a in state.items()
    }


#: Seconds a wait for acks waits on this process's own ack writes before it also
#: watches etcd (only when every NVE it waits for acked through this process before).
LOCAL_WAIT = 0.5


class LocalAcks:
    """The highest ack of each NVE that this process wrote to the ack log, as written.

    Why (issue 16): `vmm nva serve` writes the acks its streams receive and
    answers the orchestrator's wait for them. That wait followed the acks
    through an etcd watch, opened per move, which etcd then sent the batch
    just written (about 40 bytes per ack, plus the watch's own cost): the
    acks are durable once the write returned, and the writer is in this
    process, so the wait takes them from here. Acks written by anyone else
    (another server, agents writing to etcd) still reach it through the watch.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._acks: dict[str, tuple[int, int, float | None]] = {}
        self._generation = 0

    def add(self, revision: int, written: list[tuple[str, list[Entry]]]) -> None:
        """An :class:`AckLogWriter` listener: keys written at etcd ``revision``."""
        with self._cond:
            for _, parsed in written:
                for nve_id, acked, epoch, at in parsed:
                    found = self._acks.get(nve_id)
                    if found is None or (found[1], found[0]) < (epoch, acked):
                        self._acks[nve_id] = (acked, epoch, at)
            self._generation += 1
            self._cond.notify_all()

    def knows(self, nves: Sequence[str]) -> bool:
        """Whether every one of ``nves`` acked through this process before."""
        with self._cond:
            return all(n in self._acks for n in nves)

    def forget(self, nves: Iterable[str]) -> None:
        with self._cond:
            for nve_id in nves:
                self._acks.pop(nve_id, None)

    def wake(self) -> None:
        with self._cond:
            self._generation += 1
            self._cond.notify_all()

    def since(
        self, generation: int, nves: Sequence[str], until: float
    ) -> tuple[int, dict[str, tuple[int, int, float | None]]]:
        """Wait until a write after ``generation`` (or ``until``); (generation, the acks of
        ``nves`` held now)."""
        with self._cond:
            while self._generation == generation:
                remaining = until - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            acks = {n: self._acks[n] for n in nves if n in self._acks}
            return self._generation, acks


#: An NVE record and its epoch (the etcd create revision of its key).
Record = tuple[dict[str, Any], int]


V = TypeVar("V")


class PrefixCache(Generic[V]):
    """The keys under a prefix as of an etcd revision, brought up to date by reading only
    the keys written since (and how many there are).

    Why (issue 16): the orchestrator's wait for the peers' acks read every NVE
    record, and every NVE's own ack key, on each move (about 10 us of etcd
    CPU per key returned, through its JSON gateway); they rarely change, so a
    read at a later etcd revision asks for those written after the cached one
    (``min_mod_revision``). etcd counts the range before that filter, so a
    count lower than what the cache plus the written ones hold means keys
    were deleted: then everything is read again.

    etcd still reads every key of the range to apply that filter (about 2 us
    per key); with ``generation``, a key every writer of the prefix rewrites
    in the same transaction, a reader first compares that key's mod revision
    with the one it cached (:meth:`compare`) and reads nothing of the range
    when it is unchanged, only its count (etcd's index alone).
    """

    def __init__(
        self, prefix: str, parse: Callable[[KeyValue], tuple[str, V]], generation: str
    ) -> None:
        self.prefix = prefix
        self.parse = parse
        self.generation = generation
        self._lock = threading.Lock()
        self._items: dict[str, V] = {}
        self._revision = 0
        self._generation_mod = 0

    def snapshot(self, full: bool = False) -> tuple[int, dict[str, V], int]:
        """(etcd revision, items, generation's mod revision) to read from; revision 0:
        read everything."""
        with self._lock:
            if full:
                return 0, {}, 0
            return self._revision, self._items, self._generation_mod

    def compare(self, known: tuple[int, dict[str, V], int]) -> dict[str, Any] | None:
        """The compare that holds while nothing under the prefix was written since
        ``known`` (None: nothing cached)."""
        revision, _, generation = known
        return kvmod.cmp_mod(self.generation, generation) if revision else None

    def request(self, known: tuple[int, dict[str, V], int]) -> dict[str, Any]:
        revision = known[0]
        return kvmod.get_prefix(self.prefix, min_mod_revision=revision + 1 if revision else 0)

    def count(self) -> dict[str, Any]:
        return kvmod.get_prefix(self.prefix, count_only=True)

    def update(
        self,
        known: tuple[int, dict[str, V], int],
        answer: kvmod.TxnResult,
        index: int,
        generation: KeyValue | None,
    ) -> dict[str, V] | None:
        """The items as of ``answer`` (its :meth:`request` at ``index``; ``generation``
        as read with it). None: some were deleted; read them all."""
        revision, cached, _ = known
        items = dict(cached) if revision else {}
        for item in answer.kvs(index):
            name, value = self.parse(item)
            items[name] = value
        if answer.count(index) != len(items):
            return None
        self._keep(items, answer.revision, generation)
        return items

    def unchanged(
        self,
        known: tuple[int, dict[str, V], int],
        answer: kvmod.TxnResult,
        index: int,
        generation: KeyValue | None,
    ) -> dict[str, V] | None:
        """The items of ``known``, still true at ``answer`` (its :meth:`compare` held;
        its :meth:`count` at ``index``). None: the count differs (a writer that does
        not rewrite the generation key): read them all."""
        _, items, _ = known
        if answer.count(index) != len(items):
            return None
        self._keep(items, answer.revision, generation)
        return items

    def _keep(self, items: dict[str, V], revision: int, generation: KeyValue | None) -> None:
        with self._lock:
            if revision >= self._revision:
                self._items, self._revision = items, revision
                self._generation_mod = generation.mod_revision if generation is not None else 0


def record_cache(keys: Keys) -> PrefixCache[Record]:
    """The NVE records: {id: (record, epoch)}."""

    def parse(item: KeyValue) -> tuple[str, Record]:
        record = json.loads(item.value)
        return record["id"], (record, item.create_revision)

    return PrefixCache(keys.nves, parse, keys.nve_generation)


def ack_key_cache(keys: Keys) -> PrefixCache[Ack | None]:
    """The NVEs' own ack keys (single acks: older agents, the log's slow path):
    {nve: (revision, at)}. Every NVE may have one, so the wait for acks read a
    thousand of them on each move at 1,000 peers."""
    return PrefixCache(
        keys.acks,
        lambda item: (item.key[len(keys.acks) :], own_ack(item.value)),
        ack_generation(keys),
    )


def ack_generation(keys: Keys) -> str:
    """The key every write of an NVE's own ack key rewrites (:class:`PrefixCache`)."""
    return f"{keys.prefix}ackgen"


class ChangesPage:
    """One read of the change log for an NVE.

    ``revision`` is what the NVE passes next time and acks; ``etcd_revision``
    is the etcd revision the page was read at, from which a watch continues
    without a gap; ``vnis`` are the VNs the NVE served at that moment.
    """

    __slots__ = ("changes", "etcd_revision", "revision", "vnis")

    def __init__(
        self, revision: int, changes: list[dict[str, Any]], etcd_revision: int, vnis: list[int]
    ) -> None:
        self.revision = revision
        self.changes = changes
        self.etcd_revision = etcd_revision
        self.vnis = vnis


def watched_range(keys: Keys, vnis: Sequence[int]) -> tuple[str, bytes]:
    """One key range covering the change logs of ``vnis`` (and those in between).

    One watch keeps etcd's total order across the NVE's VNs, which an ack
    relies on ("everything up to R is applied"); changes of VNs in between
    that the NVE does not serve are dropped by the reader.
    """
    low, high = min(vnis), max(vnis)
    return keys.vn_changes(low), kvmod.prefix_end(keys.vn_changes(high))


def decode_change(item: KeyValue) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(item.value)
    return result
