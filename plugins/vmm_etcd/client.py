"""The directory client for NVE agents and orchestrators when the NVA is etcd.

It offers the method set of :class:`vmm_orchestrator.nva.client.NvaClient`
(register_nve, list_nves, snapshot, watch, ack, get_endpoint, get_nve,
move, prestage, commit, abort, expire, acks, health, ...) but talks to etcd
itself: no directory process sits between the agents and the data.

Acks are batched: ``ack_async`` (what the NVE agent calls) hands the ack
to one writer thread per client, which writes every ack that arrived while
its previous transaction was in flight in one transaction (group commit,
:meth:`EtcdNvaStore.record_acks`), so an agent process serving many NVEs
does not pay one etcd round trip per NVE per move, and the first ack waits
for nothing.

``watch`` is where it differs in substance. Instead of a long-poll per
call, each NVE gets one etcd watch over its VNs' change-log prefixes: after
a catch-up read, etcd pushes every change to every NVE as it commits, and
``watch`` only takes what has arrived. A thousand NVEs then cost etcd a
thousand watchers, not a thousand requests per change.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from typing import Any, Self

from vmm_etcd.kv import EtcdKV
from vmm_etcd.store import EtcdNvaStore, decode_change, watched_range
from vmm_etcd.watch import WatchStream
from vmm_orchestrator.nva import store as core
from vmm_orchestrator.nva.errors import NvaError
from vmm_orchestrator.nva.store import (
    CHANGE_LOG_KEEP,
    MobilityPolicy,
    check_nve_id,
    check_revision,
    check_timeout,
)

LOG = logging.getLogger(__name__)


@dataclasses.dataclass
class _Subscription:
    """An NVE's live watch: everything up to ``position`` has been handed out."""

    vnis: frozenset[int]
    stream: WatchStream
    position: int


class EtcdNvaClient(EtcdNvaStore):
    """Directory client on etcd; one instance may serve several NVEs and threads."""

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
        super().__init__(
            kv,
            prefix,
            max_txn_ops=max_txn_ops,
            owns_kv=owns_kv,
            mobility=mobility,
            keep_changes=keep_changes,
        )
        self._subs: dict[str, _Subscription] = {}
        self._subs_lock = threading.Lock()
        self._acks: dict[str, int] = {}
        self._acks_cond = threading.Condition()
        self._acker: threading.Thread | None = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Write the acks still queued, stop every NVE's watch and close the connection."""
        with self._acks_cond:
            acker, self._acker = self._acker, None
            self._acks_cond.notify_all()
        if acker is not None:
            acker.join(timeout=5)
        with self._subs_lock:
            subs, self._subs = list(self._subs.values()), {}
        for sub in subs:
            sub.stream.close()
        super().close()

    def close_stream(self, nve: str) -> None:
        """Stop ``nve``'s watch (its agent stopped following); the next watch starts one."""
        with self._subs_lock:
            sub = self._subs.pop(nve, None)
        if sub is not None:
            sub.stream.close()

    def ack_async(self, nve_id: str, revision: int) -> None:
        """Queue an ack for the writer thread (see the module doc); never waits for etcd."""
        nve_id = check_nve_id(nve_id)
        revision = check_revision(revision)
        self._check_open()
        with self._acks_cond:
            if revision > self._acks.get(nve_id, -1):
                self._acks[nve_id] = revision
            if self._acker is None:
                self._acker = threading.Thread(
                    target=self._write_acks, name="etcd-nva-acks", daemon=True
                )
                self._acker.start()
            self._acks_cond.notify()

    def _write_acks(self) -> None:
        me = threading.current_thread()
        while True:
            with self._acks_cond:
                while not self._acks and self._acker is me:
                    self._acks_cond.wait()
                batch, self._acks = self._acks, {}
                stopping = self._acker is not me
            if batch:
                try:
                    for nve_id, why in self.record_acks(batch).items():
                        LOG.info("ack of NVE %s refused: %s", nve_id, why)
                except NvaError as err:  # etcd unreachable: the agent's next ack retries
                    LOG.warning("%d NVE acks not written: %s", len(batch), err)
            if stopping:
                return

    def health(self) -> dict[str, Any]:
        """{"revision": R, "etcd": endpoints} when etcd answers."""
        return {"revision": self.revision, "etcd": self.kv.describe()}

    def watch(self, nve: str, since: int, timeout: float = 0.0) -> tuple[int, list[dict[str, Any]]]:
        """Changes for ``nve`` after ``since``: (revision to ack, changes).

        The first call (or one whose ``since`` is not where the last answer
        left the NVE, as after a resync) reads the change log from ``since``
        and starts the NVE's etcd watch at the revision of that read, so no
        change falls between the two. Later calls take what the watch has
        delivered, waiting up to ``timeout`` s. When the watch breaks (an
        etcd member went away) this raises Unavailable and the next call
        starts over, possibly on another member.
        """
        nve = check_nve_id(nve)
        since = check_revision(since, "since")
        timeout = check_timeout(timeout)
        self._check_open()
        with self._subs_lock:
            sub = self._subs.get(nve)
        if sub is None or sub.position != since or sub.stream.closed:
            if sub is not None:
                sub.stream.close()
            page = self.changes_page(nve, since)
            if len(page.changes) >= core.CHANGES_PAGE:
                return page.revision, page.changes  # a backlog: catch up by reading first
            if not page.vnis:  # nothing to watch but targeted changes: long-poll instead
                return self.changes_since(nve, since, timeout)
            start, end = watched_range(self.keys, page.vnis)
            stream = WatchStream(
                self.kv, start, start_revision=page.etcd_revision + 1, range_end=end
            )
            sub = _Subscription(frozenset(page.vnis), stream, page.revision)
            with self._subs_lock:
                old = self._subs.get(nve)
                self._subs[nve] = sub
            if old is not None and old is not sub:
                old.stream.close()
            if page.changes or timeout <= 0:
                return page.revision, page.changes
        return self._take(nve, sub, timeout)

    def _take(
        self, nve: str, sub: _Subscription, timeout: float
    ) -> tuple[int, list[dict[str, Any]]]:
        """What the NVE's watch delivered, waiting up to ``timeout`` s for the first batch."""
        try:
            batch = sub.stream.get(timeout)
        except NvaError:
            with self._subs_lock:
                if self._subs.get(nve) is sub:
                    del self._subs[nve]
            if self._closed:
                return sub.position, []
            raise
        if batch is None:
            return sub.position, []
        events = list(batch)
        while len(events) < core.CHANGES_PAGE:
            more = sub.stream.get_nowait()
            if more is None:
                break
            events.extend(more)
        changes = []
        for event in events:
            if event.kind != "PUT":
                continue  # a pruned change log entry, nothing to apply
            item = decode_change(event.kv)
            sub.position = max(sub.position, int(item["revision"]))
            if item["vni"] in sub.vnis and item.get("target_nve") in (None, nve):
                changes.append(item)
        return sub.position, changes
