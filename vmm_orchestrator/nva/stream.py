"""The directory's streaming watch: one connection per NVE, changes pushed, acks batched.

Why (issue 16): with the long-poll watch, every move cost the directory one
HTTP request and one ack request per peer NVE, each a thread wake-up, a
query and a transaction; at 1,000 peers ``benchmarks/fanout.py`` measured
about 4 s until every peer had applied a move, mostly the server's threads
queueing on the store's lock (py-spy). Here an NVE agent opens
``GET /v1/stream?nve=ID&since=R`` once, with ``Upgrade: vmm-nva-stream``;
after ``101 Switching Protocols`` the connection carries JSON lines both
ways:

* directory -> NVE: ``{"revision": R, "changes": [...]}``, the same answer
  a long-poll gives, first the catch-up from ``since`` and then one line per
  commit that concerns the NVE's VNs (or targets it);
* NVE -> directory: ``{"ack": R}``.

One thread (:class:`StreamHub`) serves every stream with a selector: the
store hands it each committed batch of changes once (a commit listener);
the hub encodes each change once, builds one line per distinct answer (all
NVEs of a VN get the same bytes) and writes it to each socket without
blocking. Acks that arrive together (one ``select`` round) are written in
one transaction (:meth:`NvaStore.ack_many`). Per peer that leaves a
filter, a ``send`` and a ``recv``: the directory cost per peer that
``benchmarks/fanout.py`` prints.

Acks are written by a thread of their own (:class:`AckWriter`, group
commit): while one batch is being written the next accumulates, and the
hub thread never waits for a transaction (with etcd behind the server a
batch of 1,000 acks is 8 etcd transactions).

The store may be anything with ``add_listener`` / ``remove_listener``,
``changes_since``, ``get_nve``, ``revision`` and ``record_acks``: the
embedded SQLite store, or the etcd store, whose listeners are fed by one
etcd watch over the change log (:mod:`vmm_etcd.feed`). A store that can
miss commits (an etcd watch whose history was compacted) also offers
``add_gap_listener``: the hub then ends every stream with an Unavailable
line, and each agent reconnects from its own revision.

A new stream's catch-up page is read by one of ``ADMITTERS`` threads, not
by the hub thread: with etcd behind the server each page is a few etcd
reads (milliseconds each), so on the hub thread a thousand agents
(re)connecting at once (a site starting, or the agents of a failed server
moving to this one) would hold every delivery back for seconds. A commit
the hub delivered while a page was being read is caught up when the
stream joins. (A site's set-up time at 1,000 agents is dominated by the
registrations, each a change every agent receives, not by this.)

Each change is encoded once for every stream: the hub keeps the newest
``ENCODED_KEEP`` encodings by revision, so a thousand agents catching up
over the same changes do not encode each change a thousand times (a
profile of the hub at 1,000 agents connecting showed 1,000,000 encodings,
about 16 s of the hub thread, during which no commit was delivered).

A stream whose reader falls too far behind (``MAX_BACKLOG`` bytes unsent)
is closed; the agent reconnects from the revision it reached.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import queue
import selectors
import socket
import threading
import time
from collections.abc import Sequence
from typing import Any

from vmm_orchestrator.nva.errors import NvaError, Unavailable

LOG = logging.getLogger(__name__)

#: The Upgrade token of the stream protocol.
PROTOCOL = "vmm-nva-stream/1"
#: Unsent bytes after which a stream's reader is counted as gone.
MAX_BACKLOG = 8 * 1024 * 1024
#: Longest line an NVE may send (an ack is ~20 bytes).
MAX_LINE = 4096
#: Threads reading new streams' catch-up pages.
ADMITTERS = 4
#: Encoded changes the hub keeps for catch-up pages (see StreamHub._encode).
ENCODED_KEEP = 8192


class Subscriber:
    """One NVE's stream, as the hub sees it."""

    def __init__(self, sock: socket.socket, nve_id: str, since: int) -> None:
        self.sock = sock
        self.nve_id = nve_id
        self.position = since
        self.vnis: frozenset[int] = frozenset()
        self.out = bytearray()
        self.inbuf = bytearray()
        self.done = threading.Event()
        self.writing = False
        #: The catch-up page read for it: (revision, changes).
        self.page: tuple[int, list[dict[str, Any]]] = (since, [])
        #: The hub's generation when its page was read (a gap starts a new one).
        self.generation = 0


def _ack_revision(line: bytes) -> int | None:
    """R of an ``{"ack": R}`` line (the form clients send, read without a JSON parse), or None."""
    if line.startswith(b'{"ack": ') and line.endswith(b"}") and line[8:-1].isdigit():
        return int(line[8:-1])
    try:
        revision = json.loads(line)["ack"]
    except (ValueError, KeyError, TypeError):
        return None
    if isinstance(revision, bool) or not isinstance(revision, int) or revision < 0:
        return None
    return revision


def _encoded(change: dict[str, Any]) -> bytes:
    return json.dumps(change).encode("utf-8")


class AckWriter:
    """Writes acks handed over by the hub, merged while the previous write runs.

    A store whose writes cost much whatever their size says how long the
    first ack of a burst may wait for the others (``ack_window`` seconds,
    0 by default): with etcd behind the server a write is a request that
    costs etcd about 1 ms of CPU through its JSON gateway, and a move to
    1,000 peers was written in 2-3 batches, the first holding the few acks
    that came before the hub had finished sending the change. The acks
    are still written (durably, in batches) before anyone is told they are.
    """

    def __init__(self, store: Any) -> None:
        self.store = store
        self.window = float(getattr(store, "ack_window", 0.0) or 0.0)
        self._cond = threading.Condition()
        self._pending: dict[str, int] = {}
        self._stopping = False
        #: The writer waits for a first ack (only then does an ack wake it).
        self._idle = False
        #: Batches written (for tests: fewer than the acks handed over).
        self.batches = 0
        self._thread = threading.Thread(target=self._run, name="nva-stream-acks", daemon=True)
        self._thread.start()

    def add(self, acks: dict[str, int]) -> None:
        with self._cond:
            pending = self._pending
            for nve_id, revision in acks.items():
                if revision > pending.get(nve_id, -1):
                    pending[nve_id] = revision
            if self._idle:  # not while it writes or lets a burst gather: no wake-up per round
                self._cond.notify()

    def close(self) -> None:
        """Write what is pending, then stop."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._stopping:
                    self._idle = True
                    self._cond.wait()
                self._idle = False
                if self.window > 0 and not self._stopping:
                    deadline = time.monotonic() + self.window
                    while not self._stopping and (left := deadline - time.monotonic()) > 0:
                        self._cond.wait(left)  # the rest of the burst joins the batch
                batch, self._pending = self._pending, {}
                stopping = self._stopping
            if batch:
                self._write(batch)
            if stopping:
                return

    def _write(self, acks: dict[str, int]) -> None:
        self.batches += 1
        try:
            errors = self.store.record_acks(acks)
        except NvaError as err:
            LOG.warning("NVA stream: %d acks not recorded: %s", len(acks), err)
            return
        except Exception:  # the writer must not die: every later ack depends on it
            LOG.exception("NVA stream: writing %d acks failed", len(acks))
            return
        for nve_id, message in errors.items():
            LOG.info("NVA stream: ack of %s refused: %s", nve_id, message)


class StreamHub:
    """Every NVE stream of one directory server, served by one thread."""

    def __init__(self, store: Any) -> None:
        self.store = store
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._lock = threading.Lock()
        self._batches: collections.deque[tuple[int, list[dict[str, Any]]]] = collections.deque()
        self._joining: list[Subscriber] = []
        self._reading = 0
        self._to_read: queue.SimpleQueue[Subscriber | None] = queue.SimpleQueue()
        #: Newest revision the hub thread delivered (hub thread only).
        self._high = 0
        self._generation = 0
        self._leaving: list[Subscriber] = []
        self._subs: set[Subscriber] = set()
        self._by_vni: dict[int, set[Subscriber]] = {}
        self._by_nve: dict[str, set[Subscriber]] = {}
        self._closed = False
        self._woken = False
        self._gap: str | None = None
        #: (revision, created_at) -> the change encoded (hub thread only).
        self._encodings: collections.OrderedDict[tuple[Any, Any], bytes] = collections.OrderedDict()
        self.acks = AckWriter(store)
        store.add_listener(self.publish)
        self._gap_feed = getattr(store, "add_gap_listener", None) is not None
        if self._gap_feed:
            store.add_gap_listener(self.restart)
        self._thread = threading.Thread(target=self._loop, name="nva-stream-hub", daemon=True)
        self._thread.start()
        self._admitters = [
            threading.Thread(target=self._read_pages, name=f"nva-stream-admit-{i}", daemon=True)
            for i in range(ADMITTERS)
        ]
        for thread in self._admitters:
            thread.start()

    # ------------------------------------------------------------ callers

    @property
    def streams(self) -> int:
        """Streams open now."""
        with self._lock:
            return len(self._subs) + len(self._joining) + self._reading

    def publish(self, revision: int, changes: Sequence[dict[str, Any]]) -> None:
        """A commit listener: queue the batch for the hub thread (runs under the store lock)."""
        with self._lock:
            if self._closed:
                return
            self._batches.append((revision, list(changes)))
        self._wake()

    def restart(self, why: str) -> None:
        """Commits may have been missed (a gap listener): end every stream so that each
        NVE reconnects from its own revision and catches up from the change log."""
        with self._lock:
            if self._closed:
                return
            self._gap = why
            self._generation += 1  # pages read before now may miss what the feed missed
        self._wake()

    def attach(self, sock: socket.socket, nve_id: str, since: int) -> Subscriber:
        """Serve ``nve_id``'s stream on ``sock`` (already switched); wait on ``.done``."""
        sub = Subscriber(sock, nve_id, since)
        with self._lock:
            if self._closed:
                sub.done.set()
                return sub
            self._reading += 1
        self._to_read.put(sub)
        return sub

    def close(self) -> None:
        """Close every stream and stop the thread. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self.store.remove_listener(self.publish)
        if self._gap_feed:
            self.store.remove_gap_listener(self.restart)
        self._wake()
        self._thread.join(timeout=5)
        for _ in self._admitters:
            self._to_read.put(None)
        for thread in self._admitters:
            thread.join(timeout=5)
        self.acks.close()
        while True:
            try:
                waiting = self._to_read.get_nowait()
            except queue.Empty:
                break
            if waiting is not None:
                self._drop(waiting, "the directory is stopping")
        for sub in list(self._subs) + self._joining:
            self._drop(sub, "the directory is stopping")
        with contextlib.suppress(Exception):
            self._sel.close()
        self._wake_r.close()
        self._wake_w.close()

    def _wake(self) -> None:
        with self._lock:
            if self._woken:
                return
            self._woken = True
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")

    # ---------------------------------------------------------- the thread

    def _loop(self) -> None:
        while True:
            with self._lock:
                closed = self._closed
            if closed:
                return
            try:
                ready = self._sel.select(timeout=1.0)
                acks: dict[str, int] = {}
                for key, mask in ready:
                    if key.data is None:
                        self._drain_wake()
                        continue
                    sub: Subscriber = key.data
                    if mask & selectors.EVENT_READ:
                        self._read(sub, acks)
                    if mask & selectors.EVENT_WRITE and sub in self._subs:
                        self._flush(sub)
                if acks:
                    self.acks.add(acks)
                self._restart_if_gap()
                self._admit()
                self._deliver()
            except Exception:  # the hub must not die silently: every stream depends on it
                LOG.exception("NVA stream hub iteration failed")

    def _drain_wake(self) -> None:
        """Empty the wake-up socket, then let the next publish wake us again.

        In this order: a publish in between finds ``_woken`` still set and
        sends nothing, but its batch is taken by this same loop iteration.
        (Cleared first, a wake-up byte could be drained with ``_woken`` left
        set and nothing pending: every later batch then waited for the select
        timeout, 0.5 s on average, as the first measurements showed.)
        """
        with contextlib.suppress(OSError):
            while self._wake_r.recv(4096):
                pass
        with self._lock:
            self._woken = False

    def _read(self, sub: Subscriber, acks: dict[str, int]) -> None:
        try:
            data = sub.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as err:
            self._drop(sub, f"read failed: {err}")
            return
        if not data:
            self._drop(sub, "the NVE closed the stream")
            return
        if not sub.inbuf and data[-1:] == b"\n" and data.count(b"\n") == 1:
            # One whole line, the common case (an ack per move): no buffering.
            self._take_ack(sub, data[:-1], acks)
            return
        sub.inbuf += data
        while True:
            end = sub.inbuf.find(b"\n")
            if end < 0:
                if len(sub.inbuf) > MAX_LINE:
                    self._drop(sub, "line too long")
                return
            line = bytes(sub.inbuf[:end])
            del sub.inbuf[: end + 1]
            if not self._take_ack(sub, line, acks):
                return

    def _take_ack(self, sub: Subscriber, line: bytes, acks: dict[str, int]) -> bool:
        """Note one line of ``sub`` (blank, or an ack) in ``acks``; False if it is
        neither (``sub`` is dropped)."""
        if not line.strip():
            return True
        revision = _ack_revision(line)
        if revision is None:
            self._drop(sub, f"not an ack: {line[:80]!r}")
            return False
        if revision > acks.get(sub.nve_id, -1):
            acks[sub.nve_id] = revision
        return True

    def _restart_if_gap(self) -> None:
        with self._lock:
            why, self._gap = self._gap, None
            if why is None:
                return
            batches, self._batches = list(self._batches), collections.deque()
        self._encodings.clear()  # whatever was missed, nothing encoded before is trusted
        LOG.warning("NVA stream: ending %d streams: %s", len(self._subs), why)
        del batches  # the reconnecting NVEs read them from the change log
        line = json.dumps(
            {
                "error": {
                    "code": Unavailable.code,
                    "message": f"the directory restarts its streams: {why}",
                    "hint": "reconnect from the revision reached",
                }
            }
        ).encode("utf-8")
        for sub in list(self._subs):
            self._send(sub, line + b"\n")
            self._drop(sub, why)

    def _read_pages(self) -> None:
        """An admitter: read new streams' catch-up pages, then hand them to the hub."""
        while True:
            sub = self._to_read.get()
            if sub is None:
                return
            with self._lock:
                sub.generation = self._generation
            try:
                sub.page = self.store.changes_since(sub.nve_id, sub.position, 0.0)
                sub.vnis = frozenset(self.store.get_nve(sub.nve_id)["vnis"])
            except (NvaError, OSError) as err:
                with self._lock:
                    self._reading -= 1
                self._error(sub, err)
                continue
            except Exception as err:  # an admitter must not die: later streams need it
                LOG.exception("NVA stream: reading the page of %s failed", sub.nve_id)
                with self._lock:
                    self._reading -= 1
                self._error(sub, err)
                continue
            with self._lock:
                self._reading -= 1
                closed = self._closed
                if not closed:
                    self._joining.append(sub)
            if closed:
                self._drop(sub, "the directory is stopping")
            else:
                self._wake()

    def _admit(self) -> None:
        """New streams, their page read: send it, and catch up what came meanwhile."""
        with self._lock:
            joining, self._joining = self._joining, []
            generation = self._generation
        for sub in joining:
            if sub.generation != generation:  # read before a gap: it may miss commits
                self._error(sub, Unavailable("the directory restarts its streams"))
                continue
            try:
                sub.sock.setblocking(False)
            except OSError as err:
                self._drop(sub, str(err))
                continue
            revision, changes = sub.page
            self._subs.add(sub)
            self._index(sub)
            self._sel.register(sub.sock, selectors.EVENT_READ, sub)
            sub.position = revision
            self._send(sub, self._line(revision, [self._encode(c) for c in changes]))
            try:
                if revision < self._high:  # commits delivered while its page was read
                    self._unindex(sub)
                    sub.vnis = frozenset(self.store.get_nve(sub.nve_id)["vnis"])
                    self._index(sub)
                    self._catch_up(sub)
                elif changes and revision < self.store.revision:  # a truncated page
                    self._catch_up(sub)
            except NvaError as err:
                self._error(sub, err)

    def _catch_up(self, sub: Subscriber) -> None:
        while sub in self._subs and sub.position < max(self._high, self.store.revision):
            revision, changes = self.store.changes_since(sub.nve_id, sub.position, 0.0)
            if revision <= sub.position:
                return
            sub.position = revision
            self._send(sub, self._line(revision, [self._encode(c) for c in changes]))

    def _encode(self, change: dict[str, Any]) -> bytes:
        """``change`` as JSON, encoded once per change for every stream.

        Keyed by revision and creation time: a change of the log never changes,
        and a directory reset under the server (revisions from 1 again) makes
        new changes with other times.
        """
        key = (change.get("revision"), change.get("created_at"))
        data = self._encodings.get(key)
        if data is None:
            data = self._encodings[key] = _encoded(change)
            if len(self._encodings) > ENCODED_KEEP:
                self._encodings.popitem(last=False)
        return data

    def _deliver(self) -> None:
        """Each queued commit to the streams of its VNs (and of the NVEs it targets)."""
        while True:
            with self._lock:
                if not self._batches:
                    return
                revision, changes = self._batches.popleft()
            self._high = max(self._high, revision)
            reached: set[Subscriber] = set()
            for change in changes:
                target = change.get("target_nve")
                if target is not None:
                    reached |= self._by_nve.get(target, set())
                else:
                    reached |= self._by_vni.get(change["vni"], set())
            encoded = [(c, self._encode(c)) for c in changes] if reached else []
            lines: dict[tuple[int, ...], bytes] = {}
            # Streams that had every earlier commit get the changes of their VNs, the
            # same for every stream of the same VNs: one line each, picked once.
            first = min((c["revision"] for c in changes), default=revision)
            untargeted = all(c.get("target_nve") is None for c in changes)
            by_vnis: dict[frozenset[int], bytes] = {}
            for sub in reached:
                if revision <= sub.position:
                    continue  # its catch-up already had this commit
                if untargeted and sub.position < first:
                    line = by_vnis.get(sub.vnis)
                    if line is None:
                        chosen = [data for c, data in encoded if c["vni"] in sub.vnis]
                        line = by_vnis[sub.vnis] = self._line(revision, chosen)
                    sub.position = revision
                    self._send(sub, line)
                    continue
                picked = [
                    (c["revision"], data)
                    for c, data in encoded
                    if c["revision"] > sub.position
                    and c["vni"] in sub.vnis
                    and c.get("target_nve") in (None, sub.nve_id)
                ]
                sub.position = revision
                key = tuple(r for r, _ in picked)
                line = lines.get(key)
                if line is None:
                    line = lines[key] = self._line(revision, [d for _, d in picked])
                self._send(sub, line)
            for change in changes:  # an NVE that joined or left a VN: follow its VNs
                if change.get("kind") == "nve":
                    nve = change.get("nve") or {}
                    for sub in list(self._by_nve.get(str(nve.get("id")), ())):
                        self._unindex(sub)
                        sub.vnis = frozenset(nve.get("vnis") or ())
                        self._index(sub)

    @staticmethod
    def _line(revision: int, changes: list[bytes]) -> bytes:
        return b'{"revision": %d, "changes": [%s]}\n' % (revision, b", ".join(changes))

    # ----------------------------------------------------------- plumbing

    def _index(self, sub: Subscriber) -> None:
        self._by_nve.setdefault(sub.nve_id, set()).add(sub)
        for vni in sub.vnis:
            self._by_vni.setdefault(vni, set()).add(sub)

    def _unindex(self, sub: Subscriber) -> None:
        self._by_nve.get(sub.nve_id, set()).discard(sub)
        for vni in sub.vnis:
            self._by_vni.get(vni, set()).discard(sub)

    def _send(self, sub: Subscriber, data: bytes) -> None:
        if sub.out:
            sub.out += data
        else:
            try:
                sent = sub.sock.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as err:
                self._drop(sub, f"write failed: {err}")
                return
            if sent < len(data):
                sub.out += data[sent:]
        if len(sub.out) > MAX_BACKLOG:
            self._drop(sub, f"more than {MAX_BACKLOG} bytes unread")
        elif sub.out and not sub.writing:
            sub.writing = True
            self._sel.modify(sub.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, sub)

    def _flush(self, sub: Subscriber) -> None:
        try:
            sent = sub.sock.send(sub.out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as err:
            self._drop(sub, f"write failed: {err}")
            return
        del sub.out[:sent]
        if not sub.out and sub.writing:
            sub.writing = False
            self._sel.modify(sub.sock, selectors.EVENT_READ, sub)

    def _error(self, sub: Subscriber, err: Exception) -> None:
        """Tell the NVE why its stream ends (a line with the error), then end it."""
        message = getattr(err, "message", str(err))
        body = {"error": {"code": getattr(err, "code", "internal_error"), "message": message}}
        hint = getattr(err, "hint", None)
        if hint:
            body["error"]["hint"] = hint
        with contextlib.suppress(OSError):
            sub.sock.setblocking(True)
            sub.sock.settimeout(1.0)
            sub.sock.sendall(json.dumps(body).encode("utf-8") + b"\n")
        self._drop(sub, message)

    def _drop(self, sub: Subscriber, why: str) -> None:
        LOG.debug("NVA stream of %s ends: %s", sub.nve_id, why)
        if sub in self._subs:
            self._subs.discard(sub)
            self._unindex(sub)
            with contextlib.suppress(KeyError, ValueError, OSError):
                self._sel.unregister(sub.sock)
        with contextlib.suppress(OSError):
            sub.sock.shutdown(socket.SHUT_RDWR)
        sub.done.set()
