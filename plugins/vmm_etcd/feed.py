"""The etcd directory's commit feed: one etcd watch over the change log, for `vmm nva serve`.

Why (issue 16): with NVE agents watching etcd themselves, a move to 1,000
peers cost etcd 1,000 watchers to wake and 1,000 event encodings, and the
fan-out took about 600 ms. `vmm nva serve` in front of etcd instead holds
one watch on the whole change log (``<prefix>chg/``) and hands each commit
to the same :class:`vmm_orchestrator.nva.stream.StreamHub` that the
embedded directory feeds from its commit listener: the hub encodes each
change once and writes it to every NVE's stream. Agents hold one cheap TCP
stream to a server, etcd holds one watch per server.

Several servers over one etcd stay consistent because none of them keeps
state of its own: every write is an etcd transaction (:mod:`vmm_etcd.txn`)
that bumps the dense directory revision, and every server's feed sees every
commit (its own, the other servers', and any written to etcd directly) in
etcd's revision order. An agent that moves to another server resumes from
the revision it reached, read from etcd's change log.

When the watch breaks (a member went away) the feed watches again from the
last etcd revision it saw, so nothing is lost. If etcd compacted that
history meanwhile, the feed cannot know what it missed: it tells its gap
listeners (the hub ends every stream, and each agent reconnects from its
own revision, catching up from the change log or resynchronizing in full).
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

from vmm_etcd import kv as kvmod
from vmm_etcd.keys import Keys
from vmm_etcd.kv import EtcdKV
from vmm_etcd.watch import WatchEvent, WatchStream
from vmm_orchestrator.nva.errors import NvaError

LOG = logging.getLogger(__name__)

#: ``listener(revision, changes)``: a commit, as the embedded store's listeners get it.
Listener = Callable[[int, Sequence[dict[str, Any]]], None]
#: ``listener(why)``: changes may have been missed; readers must catch up from the log.
GapListener = Callable[[str], None]

#: Seconds between attempts to watch again while no etcd member answers (doubling).
RETRY_FIRST, RETRY_MAX = 0.1, 2.0


def batch_of(events: Sequence[WatchEvent]) -> tuple[int, int, list[dict[str, Any]]]:
    """(etcd revision, directory revision, changes) of watch events on the change log.

    Deletions are the log being pruned: nothing to apply. The directory
    revision is the newest change's (0 when there is none).
    """
    etcd_revision = max((e.kv.mod_revision for e in events), default=0)
    changes = [json.loads(e.kv.value) for e in events if e.kind == "PUT"]
    changes.sort(key=lambda c: int(c["revision"]))
    revision = int(changes[-1]["revision"]) if changes else 0
    return etcd_revision, revision, changes


class ChangeFeed:
    """Follow ``keys``' change log in etcd; call the listeners with each commit, in order.

    Listeners run on the feed's thread, one batch at a time, so they should
    only hand the batch on (the hub queues it).
    """

    def __init__(self, kv: EtcdKV, keys: Keys) -> None:
        self.kv = kv
        self.keys = keys
        self._listeners: list[Listener] = []
        self._gap_listeners: list[GapListener] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._stream: WatchStream | None = None
        self._thread: threading.Thread | None = None
        #: The etcd revision up to which every change was handed on.
        self.etcd_revision = 0
        #: The directory revision of the newest change handed on.
        self.revision = 0
        #: Times the watch broke and was opened again, and gaps reported (for tests, metrics).
        self.rewatches = 0
        self.gaps = 0

    # ------------------------------------------------------------ callers

    def add_listener(self, listener: Listener) -> None:
        with self._lock:
            self._listeners.append(listener)

    def remove_listener(self, listener: Listener) -> None:
        with self._lock:
            if listener in self._listeners:
                self._listeners.remove(listener)

    def add_gap_listener(self, listener: GapListener) -> None:
        with self._lock:
            self._gap_listeners.append(listener)

    def remove_gap_listener(self, listener: GapListener) -> None:
        with self._lock:
            if listener in self._gap_listeners:
                self._gap_listeners.remove(listener)

    @property
    def idle(self) -> bool:
        """Whether nobody listens any more."""
        with self._lock:
            return not self._listeners and not self._gap_listeners

    def start(self) -> None:
        """Watch from now on: every commit after this call reaches the listeners.

        The first watch opens here, so a caller that then reads the
        directory (a stream's catch-up) misses nothing in between; raises
        Unavailable when no etcd member answers.
        """
        if self._thread is not None:
            return
        answer = self.kv.read(kvmod.get(self.keys.revision), what="start the change feed")
        self.etcd_revision = answer.revision
        found = answer.one(0)
        self.revision = int(found.value) if found is not None else 0
        self._stream = self._open()
        self._thread = threading.Thread(target=self._run, name="etcd-change-feed", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop watching; idempotent."""
        self._stop.set()
        stream = self._stream
        if stream is not None:
            stream.close()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    # ---------------------------------------------------------- the thread

    def _open(self) -> WatchStream:
        return WatchStream(
            self.kv, self.keys.changes, start_revision=self.etcd_revision + 1, prefix=True
        )

    def _run(self) -> None:
        delay = RETRY_FIRST
        while not self._stop.is_set():
            stream = self._stream
            if stream is None:
                try:
                    stream = self._stream = self._open()
                    delay = RETRY_FIRST
                except NvaError as err:
                    LOG.warning("etcd change feed: cannot watch again: %s", err)
                    self._stop.wait(delay)
                    delay = min(RETRY_MAX, delay * 2)
                    continue
            try:
                events = stream.get(1.0)
            except NvaError as err:
                if self._stop.is_set():
                    return
                self._broken(stream, err)
                continue
            if events:
                self._hand_on(events, stream)

    def _hand_on(self, events: list[WatchEvent], stream: WatchStream) -> None:
        while True:  # whatever else arrived already: one batch, fewer hub wake-ups
            more = stream.get_nowait()
            if more is None:
                break
            events.extend(more)
        etcd_revision, revision, changes = batch_of(events)
        self.etcd_revision = max(self.etcd_revision, etcd_revision)
        if not changes:
            return
        self.revision = max(self.revision, revision)
        with self._lock:
            listeners = list(self._listeners)
        for listener in listeners:
            try:
                listener(revision, changes)
            except Exception:  # one listener's bug must not starve the others
                LOG.exception("etcd change feed listener %r failed", listener)

    def _broken(self, stream: WatchStream, err: NvaError) -> None:
        """Watch again from where we were; report a gap when etcd compacted that away."""
        stream.close()
        self._stream = None
        self.rewatches += 1
        if stream.compacted_revision is None:
            LOG.info("etcd change feed: watching again after: %s", err)
            return
        why = f"the etcd change feed missed changes: {err}"
        LOG.warning("%s; every stream must catch up from the change log", why)
        with contextlib.suppress(NvaError):
            self.etcd_revision = self.kv.read(
                kvmod.get(self.keys.revision), what="restart the change feed"
            ).revision
        self.etcd_revision = max(self.etcd_revision, stream.compacted_revision - 1)
        self.gaps += 1
        with self._lock:
            listeners = list(self._gap_listeners)
        for listener in listeners:
            try:
                listener(why)
            except Exception:
                LOG.exception("etcd change feed gap listener %r failed", listener)
