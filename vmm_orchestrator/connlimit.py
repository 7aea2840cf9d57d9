"""Connection bookkeeping that keeps a thread-per-connection server from being starved.

Issue 13: about 1,000 half-open connections used up the directory's
descriptors, a byte every 20 s held a connection forever (the 60 s timeout
was per ``recv``), and the accept loop spun a core when ``accept`` failed.
The JSON servers (:mod:`vmm_orchestrator.httpapi`) keep their design, one
thread per connection, and add the rules kept here:

* **A connection limit that cannot lock legitimate clients out.** At the
  limit, a new connection evicts the connection that has waited longest
  without delivering an authenticated request head (a fresh connection that
  has sent nothing or only part of its head, a keep-alive connection idle
  between requests, or a request whose token was not yet accepted, such as
  a tokenless one trickling a body the server drains before its 401).
  Connections in an authenticated request, a long-poll watch or a stream
  are never evicted. Only when every connection is busy is the new one
  answered 503 with Retry-After (by the accept loop, without a thread).
* **Total deadlines, not per-recv timeouts.** A request head must arrive
  whole within ``head_timeout`` seconds (counted from the accept, or from the
  first byte of a later request on a keep-alive connection); a keep-alive
  connection may wait ``idle_timeout`` for that first byte. A body may make
  the server wait in ``recv`` ``head_timeout`` seconds in total before its
  request is authenticated, ``idle_timeout`` after, plus one second per
  ``body_min_rate`` bytes it brings (time a service spends between reads is
  not counted against the client). This is Apache's ``mod_reqtimeout``
  rule; a slow-drip client is cut at its deadline.
* **No thread before the first byte.** A fresh connection waits in a
  :class:`WaitingRoom` (one thread, a selector) until it sends something;
  only then does it get its handler thread. Silent and half-open
  connections cost a descriptor, not a thread, and when thousands of them
  close at once that one thread closes them: no storm of thread wake-ups
  for a request to queue behind.
* **A backstop.** The accept loop shuts down every connection still waiting
  for its head past the deadline (also one stuck in a TLS handshake, which
  does not read through the deadline reader), and evicts one when
  ``accept`` fails for lack of descriptors, then pauses instead of spinning
  (the stdlib loop retried at once: the core spun at 98%).

Why not a library: cheroot and waitress are WSGI servers with a fixed
worker pool and their own keep-alive handling. A long-poll watch (up to
30 s) or an NVE's ``/v1/stream`` (held for the agent's life, the socket
handed to the stream hub after ``101 Switching Protocols``) would each pin
a pool worker, so 1,000 NVE agents would need a pool of 1,000 anyway, and
neither hands a handler its socket after an upgrade through a public API;
moving both services to WSGI would rewrite their handlers. What those
servers would have added against slow clients is the rules above: a table,
a reader and a selector thread, with the handlers unchanged.
"""

from __future__ import annotations

import collections
import contextlib
import enum
import io
import logging
import selectors
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

LOG = logging.getLogger(__name__)


class Phase(enum.Enum):
    """Where a connection is in its request cycle."""

    #: Keep-alive: a request was answered, nothing of the next has arrived.
    IDLE = "idle"
    #: Receiving a request head (a fresh connection starts here).
    HEAD = "head"
    #: The head is complete, its token not yet accepted (a 401's body being drained).
    REQUEST = "request"
    #: Authenticated: reading its body, serving, long-polling or streaming.
    BUSY = "busy"


#: Phases whose reads draw on the body's budget instead of the head's deadline.
_BODY_PHASES = (Phase.REQUEST, Phase.BUSY)


class Conn:
    """One connection's phase and deadlines, as the table and its reader see them."""

    __slots__ = ("budget", "closing", "deadline", "phase", "since", "sock")

    def __init__(self, sock: Any, now: float, deadline: float) -> None:
        self.sock = sock
        self.phase = Phase.HEAD
        #: When the connection entered its current phase (eviction order).
        self.since = now
        #: IDLE/HEAD: the monotonic time by which the head must be complete.
        self.deadline = deadline
        #: REQUEST/BUSY: seconds the server may still wait in recv for the body.
        self.budget = 0.0
        #: Evicted or past its deadline: reads end, the thread closes it.
        self.closing = ""


class ConnectionTable:
    """The open connections of one server: limit, eviction order, deadlines."""

    def __init__(
        self,
        limit: int,
        head_timeout: float,
        idle_timeout: float,
        body_min_rate: float,
    ) -> None:
        if limit < 1 or head_timeout <= 0 or idle_timeout <= 0 or body_min_rate <= 0:
            raise ValueError("limit, timeouts and body_min_rate must be positive")
        self.limit = limit
        self.head_timeout = head_timeout
        self.idle_timeout = idle_timeout
        self.body_min_rate = body_min_rate
        self._lock = threading.Lock()
        #: Every connection admitted and not yet released, by socket.
        self._conns: dict[Any, Conn] = {}
        #: IDLE, HEAD and REQUEST connections, oldest first: the eviction order.
        self._waiting: collections.OrderedDict[Conn, None] = collections.OrderedDict()
        #: Connections counted against the limit (admitted, not closing).
        self._live = 0
        self._next_reap = 0.0
        #: Totals since start, for tests and logs.
        self.evicted = 0
        self.refused = 0
        self.expired = 0

    # ------------------------------------------------------------- accept loop

    def admit(self, sock: Any) -> Conn | None:
        """Count a new connection in, evicting the longest-waiting one at the limit.

        None when every connection is busy: the caller refuses this one.
        """
        now = time.monotonic()
        with self._lock:
            if self._live >= self.limit:
                victim = self._take_oldest_waiting("evicted")
                if victim is None:
                    self.refused += 1
                    return None
                self.evicted += 1
                _cut(victim.sock)
            conn = Conn(sock, now, now + self.head_timeout)
            self._conns[sock] = conn
            self._waiting[conn] = None
            self._live += 1
        return conn

    def evict_one(self) -> bool:
        """Cut the longest-waiting connection (accept ran out of descriptors)."""
        with self._lock:
            victim = self._take_oldest_waiting("evicted")
            if victim is None:
                return False
            self.evicted += 1
            _cut(victim.sock)
            return True

    def reap(self, now: float | None = None) -> int:
        """Cut connections waiting past their deadline; cheap when called often."""
        now = time.monotonic() if now is None else now
        if now < self._next_reap:
            return 0
        self._next_reap = now + 0.1
        with self._lock:
            late = [c for c in self._waiting if c.phase is not Phase.REQUEST and c.deadline <= now]
            for conn in late:
                self._close_locked(conn, "deadline")
                _cut(conn.sock)
            self.expired += len(late)
        return len(late)

    def release(self, sock: Any) -> None:
        """The connection is closed: forget it."""
        with self._lock:
            conn = self._conns.pop(sock, None)
            if conn is None:
                return
            self._waiting.pop(conn, None)
            if not conn.closing:
                self._live -= 1

    def closing(self) -> int:
        """Connections cut but not yet closed by their thread or the waiting room."""
        with self._lock:
            return len(self._conns) - self._live

    def sockets(self) -> list[Any]:
        with self._lock:
            return list(self._conns)

    def get(self, sock: Any) -> Conn | None:
        with self._lock:
            return self._conns.get(sock)

    def counts(self) -> dict[str, int]:
        """Connections per phase (and closing), for tests and logs."""
        with self._lock:
            out = {p.value: 0 for p in Phase}
            out["closing"] = 0
            for conn in self._conns.values():
                out["closing" if conn.closing else conn.phase.value] += 1
            return out

    # ------------------------------------------------------ connection's thread

    def idle(self, conn: Conn) -> None:
        """A request was answered; the connection waits for the next one."""
        now = time.monotonic()
        with self._lock:
            if conn.closing:
                return
            conn.phase, conn.since, conn.deadline = Phase.IDLE, now, now + self.idle_timeout
            self._waiting.pop(conn, None)
            self._waiting[conn] = None  # youngest again

    def head_done(self, conn: Conn) -> None:
        """The request head is complete: its body's budget starts; still evictable."""
        with self._lock:
            if conn.phase is not Phase.BUSY:
                conn.phase, conn.budget = Phase.REQUEST, self.head_timeout

    def busy(self, conn: Conn) -> None:
        """The request is authenticated: no longer evictable, its body may take longer."""
        with self._lock:
            conn.phase, conn.budget = Phase.BUSY, max(conn.budget, self.idle_timeout)
            self._waiting.pop(conn, None)

    def read_timeout(self, conn: Conn) -> float | None:
        """The socket timeout for the next recv, None once the deadline has passed."""
        if conn.closing:
            return None
        if conn.phase in _BODY_PHASES:
            left = conn.budget
        else:
            left = conn.deadline - time.monotonic()
        if left <= 0:
            self.expire(conn)
            return None
        return min(left, self.idle_timeout)

    def expire(self, conn: Conn) -> None:
        """The connection missed its deadline: it closes after this request."""
        with self._lock:
            if not conn.closing:
                self.expired += 1
            self._close_locked(conn, "deadline")

    def received(self, conn: Conn, nbytes: int, waited: float) -> None:
        """Account a recv: the first bytes of a request start its head deadline;
        a body's bytes buy it time."""
        if conn.phase in _BODY_PHASES:
            conn.budget += nbytes / self.body_min_rate - waited
        elif conn.phase is Phase.IDLE and nbytes > 0:
            now = time.monotonic()
            with self._lock:
                if conn.phase is Phase.IDLE and not conn.closing:
                    conn.phase, conn.deadline = Phase.HEAD, now + self.head_timeout

    # ----------------------------------------------------------------- helpers

    def _take_oldest_waiting(self, why: str) -> Conn | None:
        if not self._waiting:
            return None
        conn = next(iter(self._waiting))
        self._close_locked(conn, why)
        return conn

    def _close_locked(self, conn: Conn, why: str) -> None:
        if conn.closing:
            return
        conn.closing = why
        self._waiting.pop(conn, None)
        self._live -= 1


def _cut(sock: Any) -> None:
    """Wake the connection's thread (its recv returns EOF); the thread closes the socket.

    Called under the table's lock: the thread releases the connection (under
    that lock) before it closes the socket, so its descriptor cannot have been
    reused for another connection by then.
    """
    try:
        if isinstance(sock, socket.socket):
            # The plain socket's shutdown: an SSLSocket's own would drop its TLS
            # state under the thread that is using it.
            socket.socket.shutdown(sock, socket.SHUT_RDWR)
        else:
            sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


class DeadlineReader(io.RawIOBase):
    """The raw stream under a handler's ``rfile``: every recv bounded by the table's deadlines.

    A head that misses its deadline raises TimeoutError (http.server then
    closes the connection quietly); a body that does ends early (EOF), which
    the services already answer as a truncated body.
    """

    def __init__(self, sock: Any, table: ConnectionTable, conn: Conn) -> None:
        super().__init__()
        self._sock = sock
        self._table = table
        self._conn = conn

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        conn = self._conn
        timeout = self._table.read_timeout(conn)
        if timeout is None:
            return self._late()
        self._sock.settimeout(timeout)
        start = time.monotonic()
        try:
            nbytes: int = self._sock.recv_into(buffer)
        except TimeoutError:  # the deadline, or idle_timeout with no byte at all
            self._table.received(conn, 0, time.monotonic() - start)
            self._table.expire(conn)
            return self._late()
        self._table.received(conn, nbytes, time.monotonic() - start)
        if nbytes == 0 and conn.closing and conn.phase not in _BODY_PHASES:
            return self._late()  # evicted or cut by the reaper: not a clean end
        return nbytes

    def _late(self) -> int:
        conn = self._conn
        if conn.phase in _BODY_PHASES:
            return 0
        raise TimeoutError(
            f"connection {conn.closing or 'deadline'}: no complete request head within "
            f"{self._table.head_timeout:g} s"
        )


class WaitingRoom:
    """Fresh connections, without a thread, until their first byte (or their end) arrives.

    ``start(sock, address)`` hands a connection that has sent something to
    its handler thread; ``close(sock)`` releases and closes one that ended,
    was evicted or missed its deadline (the table's cut makes it readable).
    """

    def __init__(
        self,
        table: ConnectionTable,
        start: Callable[[Any, Any], None],
        close: Callable[[Any], None],
    ) -> None:
        self._table = table
        self._start = start
        self._close = close
        self._lock = threading.Lock()
        self._pending: list[tuple[Any, Any]] = []
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ)

    def add(self, sock: Any, address: Any) -> None:
        """Wait for this admitted connection's first byte."""
        with self._lock:
            if self._stopping:
                refused = True
            else:
                refused = False
                self._pending.append((sock, address))
                if self._thread is None:
                    self._thread = threading.Thread(
                        target=self._run, name="http-waiting-room", daemon=True
                    )
                    self._thread.start()
        if refused:
            self._close(sock)
            return
        with contextlib.suppress(OSError):  # a full pipe: a wake-up is pending anyway
            self._wake_w.send(b"\0")

    def waiting(self) -> int:
        """Connections waiting here now (for tests and logs)."""
        return len(self._sel.get_map()) - 1

    def stop(self) -> None:
        """Close every waiting connection and end the thread. Idempotent."""
        with self._lock:
            if self._stopping:
                return
            self._stopping = True
            thread = self._thread
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")
        if thread is not None:
            thread.join(timeout=5)
        else:
            self._drain_all()

    def _run(self) -> None:
        try:
            while True:
                with self._lock:
                    pending, self._pending = self._pending, []
                    stopping = self._stopping
                if stopping:
                    break
                for sock, address in pending:
                    try:
                        self._sel.register(sock, selectors.EVENT_READ, address)
                    except (ValueError, OSError):  # closed meanwhile (server stopping)
                        self._close(sock)
                for key, _mask in self._sel.select(timeout=1.0):
                    if key.fileobj is self._wake_r:
                        with contextlib.suppress(OSError):
                            while self._wake_r.recv(4096):
                                pass
                        continue
                    self._sel.unregister(key.fileobj)
                    self._ready(key.fileobj, key.data)
        except Exception:  # a bug: log it, close what waits rather than hold it forever
            LOG.exception("the HTTP waiting room failed")
        finally:
            self._drain_all()

    def _ready(self, sock: Any, address: Any) -> None:
        conn = self._table.get(sock)
        if conn is None or conn.closing:
            self._close(sock)
            return
        try:
            # The plain socket's recv: before a TLS handshake these are raw bytes.
            first = socket.socket.recv(sock, 1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            self._sel.register(sock, selectors.EVENT_READ, address)
            return
        except OSError:  # reset by the client
            self._close(sock)
            return
        if not first:  # the client closed before sending anything
            self._close(sock)
            return
        self._start(sock, address)

    def _drain_all(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        socks = [s for s, _ in pending]
        for key in list(self._sel.get_map().values()):
            if key.fileobj is not self._wake_r:
                self._sel.unregister(key.fileobj)
                socks.append(key.fileobj)
        for sock in socks:
            self._close(sock)
        self._sel.close()
        self._wake_r.close()
        self._wake_w.close()
