"""The state service's HTTP(S) server (standard library, one thread per
connection), in the style of the directory's server: token on every
request, JSON answers and errors, bounded request bodies.

Exports are streamed with chunked transfer encoding as the kinds produce
their entries; imports are read piece by piece into the bundle reader
(Content-Length or chunked uploads), which enforces the limits as it
goes. What a route does is the StateHost's business; this module only
speaks HTTP.

Memory (issue 13): the reader keeps a bundle's raw chunks until its
signature (at the end) verifies, so one import holds up to ``[state]
max_bundle_bytes``; at most ``[state] max_concurrent_imports`` imports are
served at once, and further uploads are answered 503 with Retry-After
before their body is read. Replays: a bundle that was applied already (its
seq taken), or exported before its migration closed here, is answered 409
with the refusal report, nothing installed.
Peers: a request with a peer's own token ([state] peer_token_digests), or
over a client certificate naming it ([state] tls_peer_identity), is served
only for a migration whose other end that peer is (StateHost.resolve).
"""

from __future__ import annotations

import logging
import math
import re
import ssl
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, ClassVar, cast
from urllib.parse import parse_qs, urlsplit

from vmm_orchestrator.errors import ConfigError
from vmm_orchestrator.httpapi import (
    DRAIN_LIMIT,
    JsonHttpServer,
    JsonRequestHandler,
    Routes,
    error_body,
    internal_error_body,
    single_values,
    url_host,
)
from vmm_orchestrator.model import Migration, Role
from vmm_state.bundle import KIND_RE, MalformedBundle, OversizedBundle, ReplayedBundle
from vmm_state.importer import ImportReport
from vmm_state.wire import (
    BUNDLE_TYPE,
    LABEL_RE,
    MIGRATION_HEADER,
    PIECE,
    TOKEN_HEADER,
    BadRequest,
    MethodNotAllowed,
    NotFound,
    ServiceError,
    TlsFiles,
    Unauthorized,
    Unavailable,
)

if TYPE_CHECKING:
    from vmm_state.service import StateHost

LOG = logging.getLogger(__name__)


def _query(raw: str, allowed: set[str]) -> dict[str, str]:
    """Single-valued query parameters; unknown or repeated ones are a client bug."""
    return single_values(parse_qs(raw, keep_blank_values=True), allowed, BadRequest)


def _label(query: dict[str, str], default: str | None) -> str | None:
    label = query.get("label", default)
    if label is not None and not LABEL_RE.match(label):
        raise BadRequest(f"label {label!r} is not a short lower-case word")
    return label


class _HttpServer(JsonHttpServer):
    """The shared JSON server, knowing its host."""

    #: Seconds a client is told to wait when every import slot is busy.
    RETRY_AFTER = 1

    def __init__(self, address: tuple[str, int], host: StateHost) -> None:
        self.host = host
        s = host.settings
        super().__init__(
            address,
            _Handler,
            s.token,
            max_connections=s.max_connections,
            request_deadline=s.request_deadline,
        )

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A connection that failed outside a request (TLS handshake, reset): log, no traceback."""
        LOG.info("state service connection from %s failed", client_address, exc_info=True)


class _Body:
    """A request body read in pieces: Content-Length or chunked (streamed uploads).

    The framing state lives here, not in a generator, so that a body whose
    reading was abandoned (the bundle was refused half way) can still be
    drained from exactly where it stopped.
    """

    def __init__(self, handler: _Handler) -> None:
        self.rfile = handler.rfile
        self.chunked = "chunked" in handler.headers.get("Transfer-Encoding", "").lower()
        raw = handler.headers.get("Content-Length")
        if not self.chunked and raw is not None and not raw.strip().isdigit():
            raise BadRequest(f"invalid Content-Length {raw!r}")
        #: Bytes left in the body (sized) or in the current chunk (chunked).
        self.left = 0 if self.chunked or raw is None else int(raw)
        self.complete = not self.chunked and self.left == 0
        self.read = 0

    def pieces(self) -> Iterator[bytes]:
        """The body's (remaining) bytes; MalformedBundle if it ends early or is mis-framed."""
        while True:
            try:
                piece = self._next()
            except OSError as err:
                raise MalformedBundle(
                    f"receiving the bundle failed after {self.read} bytes: {err}"
                ) from err
            if not piece:
                return
            yield piece

    def _next(self) -> bytes:
        """The next piece of the body, b"" at its end."""
        if self.complete:
            return b""
        if self.chunked and self.left == 0:
            if self.read:  # the CRLF that ends the previous chunk
                if self.rfile.readline(1024) not in (b"\r\n", b"\n"):
                    raise MalformedBundle("a body chunk is not followed by CRLF")
            line = self.rfile.readline(1024)
            try:
                self.left = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise MalformedBundle(f"bad chunk size line {line[:40]!r} in the body") from None
            if self.left == 0:
                while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                self.complete = True
                return b""
        data = self.rfile.read(min(self.left, PIECE))
        if not data:
            raise MalformedBundle(f"the request body ended early, after {self.read} bytes")
        self.read += len(data)
        self.left -= len(data)
        if not self.chunked and self.left == 0:
            self.complete = True
        return data

    def drain(self) -> bool:
        """Read and drop what is left, up to DRAIN_LIMIT; False if the connection must close."""
        try:
            for _ in self.pieces():
                if self.read > DRAIN_LIMIT:
                    return False
        except MalformedBundle:
            return False
        return self.complete


class _Handler(JsonRequestHandler):
    """Authenticates, routes, streams exports and imports, answers JSON."""

    server_version = "vmm-state/1"
    log = LOG
    client_name = "state"
    unauthorized = Unauthorized

    _MIG = r"^/v1/state/([^/]+)"
    ROUTES: ClassVar[Routes[str]] = Routes(
        [
            (re.compile(_MIG + "$"), {"GET": "export", "POST": "import_", "DELETE": "revert"}),
            (re.compile(_MIG + "/synced$"), {"GET": "synced", "POST": "held"}),
            (re.compile(_MIG + "/commit$"), {"POST": "commit"}),
            (re.compile(r"^/v1/health$"), {"GET": "health"}),
        ],
        NotFound,
        MethodNotAllowed,
    )

    @property
    def _srv(self) -> _HttpServer:
        return cast(_HttpServer, self.server)

    @property
    def _host(self) -> StateHost:
        return self._srv.host

    def setup_connection(self) -> None:
        """TLS handshake here (in the connection's thread, not the accept loop)."""
        if isinstance(self.connection, ssl.SSLSocket):
            self.connection.settimeout(self.timeout)
            self.connection.do_handshake()

    #: The peer whose own token the request carries (None: this host's / the shared one).
    _peer: str | None = None

    def _authenticate(self) -> None:
        """This host's token (or the shared one), or a peer's own token by its digest."""
        self._peer = None
        given = self.headers.get(TOKEN_HEADER)
        if given is None:
            self.close_connection = True
            raise Unauthorized(f"missing {TOKEN_HEADER} header")
        # Headers arrive decoded as latin-1: re-encode to get the bytes sent.
        settings = self._host.settings
        ok, peer = settings.identify(given.encode("latin-1", "replace"))
        if not ok:
            self.close_connection = True
            raise Unauthorized(f"invalid {TOKEN_HEADER}")
        if settings.tls_peer_identity and isinstance(self.connection, ssl.SSLSocket):
            named = _common_name(self.connection.getpeercert())
            if named is None or (peer is not None and peer != named):
                self.close_connection = True
                raise Unauthorized(
                    f"the client certificate names {named or 'no host (no CN)'}"
                    + (f", the token is {peer}'s" if peer else ""),
                    hint="issue each host a certificate with CN=<its NVE id>",
                )
            peer = None if named == self._host.name else named
        self._peer = peer

    def _dispatch(self, method: str) -> None:
        self._streaming = False
        self._body: _Body | None = None
        try:
            self._body = _Body(self)
            self._authenticate()
            action, args = self._route(method)
            getattr(self, action)(*args)
        except Unavailable as err:  # busy: answer now, do not read (drain) a large upload
            self.close_connection = True
            retry = {"Retry-After": str(self._srv.RETRY_AFTER)}
            self._answer_error(err.http_status, error_body(err), retry, drain=False)
        except ServiceError as err:
            self._answer_error(err.http_status, error_body(err))
        except Exception:
            LOG.exception("state request %s %s failed", method, self.path)
            self._answer_error(500, internal_error_body())

    def _answer_error(
        self,
        status: int,
        body: dict[str, Any],
        headers: dict[str, str] | None = None,
        drain: bool = True,
    ) -> None:
        if self._streaming:  # the answer has begun: all we can do is cut it short
            self.close_connection = True
            return
        if not drain or self._body is None or not self._body.drain():
            self.close_connection = True
        self._send_json(status, body, headers)

    def _route(self, method: str) -> tuple[str, tuple[str, ...]]:
        return self.ROUTES.match(method, urlsplit(self.path).path)

    def _query(self, allowed: set[str]) -> dict[str, str]:
        return _query(urlsplit(self.path).query, allowed)

    def _migration(self, migration_id: str, role: Role | None) -> Migration:
        description = self.headers.get(MIGRATION_HEADER)
        return self._host.resolve(migration_id, description, role, self._peer)

    # -- routes -----------------------------------------------------------------

    def export(self, migration_id: str) -> None:
        query = self._query({"label", "kinds", "since"})
        label = _label(query, "precopy")
        assert label is not None
        kinds = None
        if "kinds" in query:
            kinds = [k for k in query["kinds"].split(",") if k]
            bad = [k for k in kinds if not KIND_RE.match(k)]
            if bad or len(set(kinds)) != len(kinds):
                raise BadRequest(f"kinds must be distinct kind names, got {query['kinds']!r}")
        since = None
        if "since" in query:
            try:
                since = float(query["since"])
            except ValueError:
                since = math.nan
            if not math.isfinite(since):
                raise BadRequest(f"since must be a time in seconds, got {query['since']!r}")
        migration = self._migration(migration_id, Role.SOURCE)
        pieces = self._host.export(migration, label, kinds, since)
        self._finish_body()
        self.send_response(200)
        self.send_header("Content-Type", BUNDLE_TYPE)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self._streaming = True
        buf = bytearray()
        try:
            for piece in pieces:
                buf += piece
                if len(buf) >= PIECE:
                    self._write_chunk(bytes(buf))
                    buf.clear()
            if buf:
                self._write_chunk(bytes(buf))
            self.wfile.write(b"0\r\n\r\n")
        except OSError as err:
            LOG.info(
                "state export of %s to %s broke off: %s", migration_id, self.client_address[0], err
            )
            self.close_connection = True

    def _write_chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n" % len(data) + data + b"\r\n")

    def import_(self, migration_id: str) -> None:
        query = self._query({"label"})
        label = _label(query, None)
        if label is None:
            raise BadRequest("query parameter label is required (e.g. label=delta)")
        migration = self._migration(migration_id, Role.DESTINATION)
        assert self._body is not None
        limit = self._host.settings.max_bundle_bytes
        if not self._body.chunked and self._body.left > limit:
            # Refused as the reader would refuse it, without reading (or draining) it.
            self.close_connection = True
            err = OversizedBundle(
                f"bundle of {self._body.left} bytes is larger than {limit} bytes ([state] "
                "max_bundle_bytes); it was refused before it was read"
            )
            report = ImportReport.refused(migration.id, label, self._host.kinds, err)
            self._send_json(200, report.to_dict())
            return
        slots = self._host.import_slots
        if not slots.acquire(blocking=False):
            raise Unavailable(
                f"host {self._host.name} is importing "
                f"{self._host.settings.max_concurrent_imports} bundles already "
                "([state] max_concurrent_imports); retry shortly",
                hint=f"retry after {self._srv.RETRY_AFTER} s",
            )
        try:
            report = self._host.import_pieces(migration, self._body.pieces(), label)
        finally:
            slots.release()
        if not self._body.drain():
            self.close_connection = True
        if report.error is not None and report.error.startswith(f"{ReplayedBundle.code}:"):
            message = report.error.split(": ", 1)[-1]
            self._send_json(
                409,
                {"error": {"code": ReplayedBundle.code, "message": message}}
                | {"report": report.to_dict()},
            )
            return
        self._send_json(200, report.to_dict())

    def revert(self, migration_id: str) -> None:
        label = _label(self._query({"label"}), None)
        migration = self._migration(migration_id, None)
        reverted, errors = self._host.revert_imports(migration, label)
        self._finish_body()
        self._send_json(200, {"reverted": reverted, "errors": errors})

    def synced(self, migration_id: str) -> None:
        self._query(set())
        migration = self._migration(migration_id, Role.DESTINATION)
        self._finish_body()
        self._send_json(200, {"kinds": self._host.importer.synced(migration.id)})

    def held(self, migration_id: str) -> None:
        """The destination tells the source (this host) what it now holds of a
        migration it imports (``?kinds=kind@exported_at,...``), at PREPARE: the
        source settles at once and needs not ask inside the pause."""
        query = self._query({"kinds"})
        held: dict[str, float] = {}
        for item in filter(None, query.get("kinds", "").split(",")):
            kind, sep, at = item.partition("@")
            try:
                if not sep or not KIND_RE.match(kind) or kind in held:
                    raise ValueError(item)
                held[kind] = float(at)
            except ValueError:
                raise BadRequest(f"kinds must be distinct kind@time pairs, got {item!r}") from None
        migration = self._migration(migration_id, Role.SOURCE)
        settled = self._host.held(migration, held)
        self._finish_body()
        self._send_json(200, {"settled": settled})

    def commit(self, migration_id: str) -> None:
        self._query(set())
        migration = self._migration(migration_id, None)
        dropped = self._host.importer.forget(migration.id)
        self._host.forget(migration.id)
        self._finish_body()
        self._send_json(200, {"committed": dropped})

    def health(self) -> None:
        self._query(set())
        self._finish_body()
        self._send_json(200, {"host": self._host.name, "kinds": list(self._host.kinds)})

    # -- answers ------------------------------------------------------------------

    def _finish_body(self) -> None:
        if self._body is not None and not self._body.drain():
            self.close_connection = True

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Answer http.server's own errors (bad request line, ...) in JSON too."""
        self._streaming = False
        super().send_error(code, message, explain)


class StateServer:
    """A StateHost's HTTP(S) service, in a background thread."""

    def __init__(self, host: StateHost) -> None:
        self.host = host
        self._httpd: _HttpServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        if self._httpd is None:
            raise RuntimeError("the state server is not started")
        scheme = "https" if self.host.settings.tls else "http"
        port = self._httpd.server_address[1]
        return f"{scheme}://{url_host(self.host.settings.bind_host)}:{port}"

    def start(self) -> None:
        """Bind and serve; returns once the socket listens."""
        if self._thread is not None:
            return
        s = self.host.settings
        try:
            httpd = _HttpServer((s.bind_host, s.bind_port), self.host)
        except OSError as err:
            raise ConfigError(
                f"the state service of host {self.host.name} cannot listen on "
                f"{s.bind_host}:{s.bind_port}: {err}",
                hint="check [state] bind_host and bind_port",
            ) from err
        if s.tls is not None:
            try:
                httpd.socket = _server_tls(s.tls).wrap_socket(
                    httpd.socket, server_side=True, do_handshake_on_connect=False
                )
            except (OSError, ssl.SSLError) as err:
                httpd.server_close()
                raise ConfigError(
                    f"cannot use the TLS files of [state] cert_file/key_file/ca_file: {err}",
                    hint="check the paths and that the key matches the certificate",
                ) from err
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"state-http-{self.host.name}",
            daemon=True,
        )
        self._thread.start()
        LOG.info("state service of host %s listening on %s", self.host.name, self.url)

    def stop(self) -> None:
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        httpd.shutdown()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        httpd.server_close()
        httpd.close_connections()


def _common_name(cert: Any) -> str | None:
    """The subject CN of a peer certificate (getpeercert's form), or None."""
    for rdn in (cert or {}).get("subject", ()):
        for name, value in rdn:
            if name == "commonName":
                return str(value)
    return None


def _server_tls(tls: TlsFiles) -> ssl.SSLContext:
    """Mutual TLS: present our certificate, demand one signed by the CA."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(tls.cert, tls.key)
    ctx.load_verify_locations(tls.ca)
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx
