"""What the token-authenticated JSON HTTP servers share (standard library).

The directory's server (:mod:`vmm_orchestrator.nva.server`) and the state
service's server (a plugin) are built on this: errors that carry their HTTP
status and code, a route table, single-valued query parameters, a threading
server that tracks its connections so stop() can cut idle keep-alives, and a
request handler that checks the shared token in constant time, answers JSON
(http.server's own errors too) and logs quietly.

The server cannot be starved by slow or idle clients (issue 13): a
connection limit that evicts the longest-waiting connection without a
complete request head instead of refusing a newcomer, total deadlines for a
request's head and body, and an accept loop that never spins; see
:mod:`vmm_orchestrator.connlimit` for the rules and why no library.

What a service does with a request body (read it whole, stream it, drain it)
stays with that service; this module knows no service.
"""

from __future__ import annotations

import errno
import functools
import hmac
import http.server
import io
import json
import logging
import re
import resource
import socket
import ssl
import time
from collections.abc import Callable
from typing import Any, ClassVar, Generic, TypeVar, cast
from urllib.parse import unquote

from vmm_orchestrator.connlimit import Conn, ConnectionTable, DeadlineReader, WaitingRoom
from vmm_orchestrator.errors import TransientError, VmmError

LOG = logging.getLogger(__name__)

#: The header every request carries the shared token in.
TOKEN_HEADER = "X-Auth-Token"
#: Seconds an idle keep-alive connection (or a slow body) may hold a thread.
IDLE_TIMEOUT = 60.0
#: Bodies we refuse are still read (and dropped) up to this size so the
#: client sees our answer instead of a connection reset; larger ones make us
#: close the connection instead.
DRAIN_LIMIT = 16 * 1024 * 1024
#: Connections a server keeps open at most (each is a thread): an NVE agent
#: holds one stream, so this is well above the 1,000 agents benchmarked.
MAX_CONNECTIONS = 4096
#: Seconds a request head may take, from the accept or from its first byte.
REQUEST_DEADLINE = 5.0
#: A body earns one more second of reading per this many bytes.
BODY_MIN_RATE = 64 * 1024
#: Descriptors kept free for the service itself (database, logs, clients).
_FD_RESERVE = 64
#: Errors of accept() that mean "no descriptor or memory now", not "bad client".
_ACCEPT_EXHAUSTED = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}

T = TypeVar("T")


class ApiError(VmmError):
    """An error answer of a JSON API; ``http_status`` and ``code`` go on the wire."""

    http_status: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"


# The one family of the project's API errors: each status once, here. A
# service derives its own classes from these and from its own base (the
# directory's NvaError, the state service's ServiceError), so a caller may
# catch "any directory error" or "any 404" alike.


class BadRequest(ApiError):
    """The request is malformed: bad JSON, a wrong field type, a value refused."""

    http_status = 400
    code = "bad_request"


class Unauthorized(ApiError):
    """The X-Auth-Token header is missing or does not match the server's token."""

    http_status = 401
    code = "unauthorized"


class Forbidden(ApiError):
    """The caller may not do this (to this record)."""

    http_status = 403
    code = "forbidden"


class NotFound(ApiError):
    """No such record or route."""

    http_status = 404
    code = "not_found"


class MethodNotAllowed(ApiError):
    """The route exists but not for this HTTP method."""

    http_status = 405
    code = "method_not_allowed"


class Conflict(ApiError):
    """The request contradicts the service's state."""

    http_status = 409
    code = "conflict"


class Gone(Conflict):
    """What was asked for is no longer kept (a pruned change log): start over."""

    http_status = 410
    code = "gone"


class PayloadTooLarge(ApiError):
    """The request body is larger than the service accepts."""

    http_status = 413
    code = "payload_too_large"


class Unavailable(ApiError, TransientError):
    """The service cannot answer now: worth retrying."""

    http_status = 503
    code = "unavailable"


def error_body(err: ApiError) -> dict[str, Any]:
    """The JSON every error answer carries."""
    detail: dict[str, Any] = {"code": err.code, "message": err.message}
    if err.hint:
        detail["hint"] = err.hint
    return {"error": detail}


def internal_error_body() -> dict[str, Any]:
    """The JSON of a 500: a bug or a backend failure, logged but not told."""
    return {"error": {"code": "internal_error", "message": "internal error"}}


def single_values(
    query: dict[str, list[str]], allowed: set[str], bad_request: type[ApiError]
) -> dict[str, str]:
    """Single-valued query parameters; unknown or repeated ones are a client bug."""
    unknown = sorted(set(query) - allowed)
    if unknown:
        raise bad_request(
            f"unknown query parameter(s) {', '.join(unknown)}; expected some of "
            f"{', '.join(sorted(allowed)) or 'none'}"
        )
    out = {}
    for name, values in query.items():
        if len(values) != 1:
            raise bad_request(f"query parameter {name} given {len(values)} times")
        out[name] = values[0]
    return out


class Routes(Generic[T]):
    """Path patterns, each with what each of its methods maps to."""

    def __init__(
        self,
        routes: list[tuple[re.Pattern[str], dict[str, T]]],
        not_found: type[ApiError],
        method_not_allowed: type[ApiError],
    ) -> None:
        self.routes = routes
        self._not_found = not_found
        self._method_not_allowed = method_not_allowed

    def match(self, method: str, path: str) -> tuple[T, tuple[str, ...]]:
        """What the route maps the method to and the decoded path captures, or 404 / 405."""
        for pattern, methods in self.routes:
            found = pattern.match(path)
            if found is None:
                continue
            if method not in methods:
                raise self._method_not_allowed(
                    f"{method} is not allowed on {path}; use {', '.join(sorted(methods))}"
                )
            return methods[method], tuple(unquote(g) for g in found.groups())
        raise self._not_found(f"no such route: {path}")

    def allowed(self, path: str) -> list[str]:
        """Methods a path accepts, for the Allow header of a 405."""
        for pattern, methods in self.routes:
            if pattern.match(path):
                return sorted(methods)
        return []


def url_host(host: str) -> str:
    """A host clients can reach: wildcards mean loopback, IPv6 gets brackets."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


class JsonHttpServer(http.server.ThreadingHTTPServer):
    """ThreadingHTTPServer that knows its token and bounds its open connections.

    Tracking connections lets stop() cut idle keep-alive connections, whose
    threads would otherwise go on serving requests after the server stopped,
    and keeps slow clients from starving the server (``connections``, a
    :class:`~vmm_orchestrator.connlimit.ConnectionTable`). An IPv6 address
    gets an IPv6 socket.
    """

    daemon_threads = True
    block_on_close = False
    #: Connections the kernel queues before accept (the stdlib's 5 drops the rest
    #: for a SYN retransmission, 1 s, while the accept loop is busy evicting).
    request_queue_size = 1024
    #: Defaults of the starvation guards; the constructor's arguments override them.
    max_connections: ClassVar[int] = MAX_CONNECTIONS
    request_deadline: ClassVar[float] = REQUEST_DEADLINE
    body_min_rate: ClassVar[float] = BODY_MIN_RATE

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[JsonRequestHandler],
        token: str,
        *,
        max_connections: int | None = None,
        request_deadline: float | None = None,
        body_min_rate: float | None = None,
    ) -> None:
        self.token = token.encode("utf-8")
        self.connections = ConnectionTable(
            _fit_descriptors(max_connections or self.max_connections),
            head_timeout=request_deadline or self.request_deadline,
            idle_timeout=handler.timeout or IDLE_TIMEOUT,
            body_min_rate=body_min_rate or self.body_min_rate,
        )
        self.waiting_room = WaitingRoom(
            self.connections, self._start_handler, self.shutdown_request
        )
        self._exhausted_logged = 0.0
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, handler)

    def get_request(self) -> tuple[Any, Any]:
        try:
            return super().get_request()
        except OSError as err:
            if err.errno in _ACCEPT_EXHAUSTED:
                self._accept_exhausted(err)
            raise

    def _accept_exhausted(self, err: OSError) -> None:
        """accept() found no descriptor: free one and pause, instead of spinning on it."""
        evicted = self.connections.evict_one()
        now = time.monotonic()
        if now - self._exhausted_logged > 10:
            self._exhausted_logged = now
            LOG.warning(
                "cannot accept connections on %s: %s (%d open; evicted a waiting one: %s); "
                "raise LimitNOFILE or lower the connection limit",
                self.server_address,
                err,
                len(self.connections.sockets()),
                "yes" if evicted else "no",
            )
        time.sleep(0.05)

    def process_request(self, request: Any, client_address: Any) -> None:
        """Admit (or refuse) the connection; it gets a thread once it sends something."""
        self._let_cut_connections_close()
        if self.connections.admit(request) is None:
            _refuse_busy(request)
            self.shutdown_request(request)
            return
        self.waiting_room.add(request, client_address)

    def _let_cut_connections_close(self) -> None:
        """Under a flood of evictions, wait (up to 50 ms) for the cut connections to be
        closed before taking more: their descriptors count too. Newcomers wait in the
        kernel's backlog meanwhile."""
        end = time.monotonic() + 0.05
        while self.connections.closing() > _FD_RESERVE // 2 and time.monotonic() < end:
            time.sleep(0.001)

    def _start_handler(self, request: Any, client_address: Any) -> None:
        """The connection's first bytes arrived: serve it in a thread of its own."""
        try:
            super().process_request(request, client_address)
        except Exception:  # no thread to be had: this connection is lost, not the server
            self.handle_error(request, client_address)
            self.shutdown_request(request)

    def server_close(self) -> None:
        super().server_close()
        self.waiting_room.stop()

    def service_actions(self) -> None:
        """Run by the accept loop between polls: cut connections past their deadline."""
        super().service_actions()
        self.connections.reap()

    def shutdown_request(self, request: Any) -> None:
        self.connections.release(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        for conn in self.connections.sockets():
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def _fit_descriptors(limit: int) -> int:
    """The connection limit, lowered to what the descriptor limit allows."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or limit <= soft - _FD_RESERVE:
        return limit
    fitted = max(1, soft - _FD_RESERVE)
    LOG.warning(
        "connection limit %d lowered to %d: the process may open only %d descriptors "
        "(raise LimitNOFILE in the service's unit)",
        limit,
        fitted,
        soft,
    )
    return fitted


_BUSY_BODY = json.dumps(
    {
        "error": {
            "code": Unavailable.code,
            "message": "too many connections, all of them busy",
            "hint": "retry after the Retry-After seconds",
        }
    }
).encode("utf-8")
_BUSY_ANSWER = (
    b"HTTP/1.1 503 Service Unavailable\r\n"
    b"Content-Type: application/json\r\n"
    b"Retry-After: 1\r\n"
    b"Connection: close\r\n"
    b"Content-Length: " + str(len(_BUSY_BODY)).encode() + b"\r\n\r\n" + _BUSY_BODY
)


def _refuse_busy(request: Any) -> None:
    """Answer 503 from the accept loop: never blocks, never waits for the request."""
    if isinstance(request, ssl.SSLSocket):
        return  # no handshake yet: closing is all we can do without waiting
    try:
        request.setblocking(False)
        try:
            request.recv(65536)  # what already came: closing over unread data resets
        except OSError:
            pass
        request.send(_BUSY_ANSWER)
    except OSError:
        pass


class JsonRequestHandler(http.server.BaseHTTPRequestHandler):
    """Token check, JSON answers and quiet logging; subclasses route in ``_dispatch``."""

    protocol_version = "HTTP/1.1"
    timeout = IDLE_TIMEOUT

    #: Where the handler logs, and how it names its clients in log lines.
    log: ClassVar[logging.Logger] = LOG
    client_name: ClassVar[str] = "API"
    #: Raised for a missing or wrong token.
    unauthorized: ClassVar[type[ApiError]]
    #: This connection in the server's table (None: the server does not track it).
    _conn: Conn | None = None

    @property
    def _srv(self) -> JsonHttpServer:
        return cast(JsonHttpServer, self.server)

    def setup(self) -> None:
        """Read through the deadline reader; disable Nagle: headers and body go out in two
        writes, and with Nagle plus the peer's delayed ACK every answer on a keep-alive
        connection would wait ~40 ms."""
        super().setup()
        table = self._srv.connections
        self._conn = table.get(self.request)
        if self._conn is not None:
            self.rfile.close()  # a makefile() would keep the socket open after close()
            self.rfile = io.BufferedReader(DeadlineReader(self.connection, table, self._conn))
        self.setup_connection()
        try:
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass

    def setup_connection(self) -> None:
        """Hook run in the connection's thread before Nagle is disabled (a TLS handshake)."""

    def handle(self) -> None:
        """Requests until the connection closes, the keep-alive waits counted as idle."""
        self.close_connection = True
        self.handle_one_request()
        while not self.close_connection:
            if self._conn is not None:
                self._srv.connections.idle(self._conn)
            self.handle_one_request()

    def parse_request(self) -> bool:
        """The head is complete: its body's deadline starts (busy once authenticated)."""
        if not super().parse_request():
            return False
        if self._conn is not None:
            self._srv.connections.head_done(self._conn)
        return True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """A service's own ``_authenticate`` marks the connection busy when it succeeds too."""
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("_authenticate")
        if own is not None and not getattr(own, "_marks_busy", False):
            cls._authenticate = _marking_busy(own)  # type: ignore[method-assign,assignment]

    def _authenticated(self) -> None:
        """The token was accepted: the connection is busy (never evicted) until answered."""
        if self._conn is not None:
            self._srv.connections.busy(self._conn)

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def _dispatch(self, method: str) -> None:
        raise NotImplementedError

    def _authenticate(self) -> None:
        given = self.headers.get(TOKEN_HEADER)
        # A client without the token gets its answer and no kept-alive connection.
        if given is None:
            self.close_connection = True
            raise self.unauthorized(f"missing {TOKEN_HEADER} header")
        # Headers arrive decoded as latin-1: re-encode to get the bytes sent.
        if not hmac.compare_digest(given.encode("latin-1", "replace"), self._srv.token):
            self.close_connection = True
            raise self.unauthorized(f"invalid {TOKEN_HEADER}")
        self._authenticated()

    def _send_json(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload).encode("utf-8")
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
        except OSError as err:  # the client went away; nothing left to tell it
            self.log.debug(
                "%s client %s went away: %s", self.client_name, self.address_string(), err
            )
            self.close_connection = True

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Answer http.server's own errors (bad request line, ...) in JSON too."""
        self.close_connection = True
        text = message or explain or http.HTTPStatus(code).phrase
        self._send_json(code, {"error": {"code": f"http_{code}", "message": text}})

    def log_message(self, format: str, *args: Any) -> None:
        self.log.debug("%s %s", self.address_string(), format % args)


def _marking_busy(authenticate: Callable[[Any], None]) -> Callable[[Any], None]:
    """``authenticate``, then the connection is busy (it raised if the token was refused)."""

    @functools.wraps(authenticate)
    def wrapper(self: JsonRequestHandler) -> None:
        authenticate(self)
        self._authenticated()

    wrapper._marks_busy = True  # type: ignore[attr-defined]
    return wrapper
