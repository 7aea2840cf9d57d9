"""The directory's HTTP JSON API, served by the standard library.

``vmm nva serve`` runs this on one host; NVE agents and orchestrators on
every host talk to it with :class:`vmm_orchestrator.nva.client.NvaClient`.
ThreadingHTTPServer gives one thread per connection, which long-poll
watches need (each holds its thread while it waits) and which is plenty
for a directory that sees a handful of requests per migration.

Every request must carry a token: the directory decides where traffic
goes, so an unauthenticated write could hijack a VM's traffic. The admin
token (``[nva] token``) may do everything. Per-NVE tokens (``[nva]
nve_tokens`` / ``nve_tokens_file``, issue 13) are scoped to their NVE's own
records, so a host holding its token cannot re-register another NVE's VTEP
or push another NVE's endpoint to a third NVE. Every known token is compared
in constant time on every request. What an NVE token may do (anything else
is 403 and changes nothing; S is the set of NVE ids the token names)::

    GET  /v1/nves, /v1/nves/<id>, /v1/endpoints (list, find),
         /v1/endpoints/<vni>/<mac>, /v1/acks, /v1/health     yes (reads)
    POST /v1/nves                       only {"id"} in S (its own VTEP and VNs)
    POST /v1/nves/<id>/ack              only <id> in S
    POST /v1/acks                       only acks of NVEs in S
    GET  /v1/watch, /v1/stream          only ?nve= in S
    POST .../move                       only {"nve"} in S (a MAC learned here)
    POST .../prestage                   {"nve"} in S (the destination, or a cold
                                        start here), or the endpoint is at an NVE
                                        in S (the source)
    POST .../commit, .../abort          the endpoint is at, or pending to, an NVE
                                        in S (source or destination of the move)
    POST .../expire                     the endpoint is at, or pending to, an NVE
                                        in S (a destination flushing laggards)
    POST /v1/endpoints, DELETE /v1/endpoints/..., DELETE /v1/nves/<id>,
    POST .../release                    admin only

These are the calls an NVE agent host makes for itself: the NVE agent
(register, snapshot, watch/stream, ack, learned moves), the pipeline's
directory stages run by the same agent (nva_prestage at the destination,
peer_update's commit, acks and expire), the libvirt daemon's cold start
(prestage, commit, abort to itself) and the state service's voucher (reads).
Scoped checks that read the endpoint and the write that follows run under
one lock, so two NVE-scoped requests cannot slip between check and write.

NVE agents that follow the directory at scale open one stream each
(``GET /v1/stream`` with ``Upgrade: vmm-nva-stream/1``, served by
:mod:`vmm_orchestrator.nva.stream`) instead of long-polling ``/v1/watch``,
and ack on that stream; ``POST /v1/acks`` records many acks in one
request and one transaction. The long-poll and the single ack stay for
older agents and for backends without a commit feed (the etcd store
streams too: its commit feed is one etcd watch, vmm_etcd.feed).
"""

from __future__ import annotations

import dataclasses
import hmac
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, Self, cast
from urllib.parse import parse_qs, urlsplit

from oslo_config import cfg

from vmm_orchestrator.errors import ConfigError
from vmm_orchestrator.httpapi import (
    DRAIN_LIMIT,
    TOKEN_HEADER,
    JsonHttpServer,
    JsonRequestHandler,
    Routes,
    error_body,
    internal_error_body,
    single_values,
    url_host,
)
from vmm_orchestrator.nva import options
from vmm_orchestrator.nva.errors import (
    BadRequest,
    Forbidden,
    MethodNotAllowed,
    NotFound,
    NvaError,
    PayloadTooLarge,
    Unauthorized,
)
from vmm_orchestrator.nva.store import NvaStore, check_nve_id, check_revision, check_timeout
from vmm_orchestrator.nva.stream import PROTOCOL, StreamHub
from vmm_orchestrator.options import require

LOG = logging.getLogger(__name__)

_INT_RE = re.compile(r"^[0-9]{1,15}$")


# ---------------------------------------------------------------- credentials


@dataclasses.dataclass(frozen=True)
class Principal:
    """Who a request acts as: the admin, or the NVEs one scoped token names."""

    admin: bool
    nves: frozenset[str] = frozenset()

    def name(self) -> str:
        return "admin" if self.admin else "NVE " + ", ".join(sorted(self.nves))


ADMIN = Principal(admin=True)


def parse_token_file(text: str, path: str) -> dict[str, str]:
    """``<nve-id> <token>`` lines ('#' comments, blank lines ignored) -> {nve: token}."""
    out: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ConfigError(
                f"{path} line {number}: expected '<nve-id> <token>', got {len(parts)} field(s)",
                hint="one NVE a line; tokens may not contain spaces or '#'",
            )
        nve, token = parts
        check_nve_id(nve, "nve id")
        if nve in out:
            raise ConfigError(f"{path} line {number}: NVE {nve} is listed twice")
        out[nve] = token
    return out


class Credentials:
    """The admin token and the per-NVE tokens, matched in constant time.

    ``identify`` compares the given token with every known one (no early
    exit), so the time taken does not tell which token nearly matched. The
    tokens file is read again when its modification time changes (looked
    at most once a second); a file that became unreadable or invalid keeps
    the tokens in force and is logged.
    """

    RECHECK = 1.0

    def __init__(
        self,
        admin: str,
        nve_tokens: Mapping[str, str] | None = None,
        path: str | None = None,
    ) -> None:
        if not admin:
            raise ConfigError(
                "the NVA server needs a token", hint="set [nva] token to a shared secret"
            )
        self._admin = admin.encode("utf-8")
        self._static = dict(nve_tokens or {})
        self._path = path
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._checked = 0.0
        from_file = self._read_file() if path else {}
        self._table = self._build({**self._static, **from_file})

    @property
    def admin_token(self) -> str:
        return self._admin.decode("utf-8")

    def _read_file(self) -> dict[str, str]:
        assert self._path is not None
        try:
            st = os.stat(self._path)
            with open(self._path, encoding="utf-8") as fh:
                text = fh.read()
        except OSError as err:
            raise ConfigError(
                f"cannot read [nva] nve_tokens_file {self._path}: {err}",
                hint="create it with one '<nve-id> <token>' line per host",
            ) from err
        if st.st_mode & 0o004:
            LOG.warning("%s is world-readable: any local user can act as its NVEs", self._path)
        self._stamp = (st.st_mtime_ns, st.st_size)
        return parse_token_file(text, self._path)

    def _build(self, tokens: Mapping[str, str]) -> list[tuple[bytes, frozenset[str]]]:
        by_token: dict[bytes, set[str]] = {}
        for nve, token in tokens.items():
            check_nve_id(nve, "nve id")
            if not token:
                raise ConfigError(f"the token of NVE {nve} is empty", hint="give it a secret")
            raw = token.encode("utf-8")
            if hmac.compare_digest(raw, self._admin):
                raise ConfigError(
                    f"the token of NVE {nve} is the admin token ([nva] token)",
                    hint="give each host a token of its own",
                )
            by_token.setdefault(raw, set()).add(nve)
        return [(raw, frozenset(nves)) for raw, nves in by_token.items()]

    def _refresh(self) -> None:
        now = time.monotonic()
        if self._path is None or now - self._checked < self.RECHECK:
            return
        with self._lock:
            if now - self._checked < self.RECHECK:
                return
            self._checked = now
            try:
                st = os.stat(self._path)
                if (st.st_mtime_ns, st.st_size) == self._stamp:
                    return
                table = self._build({**self._static, **self._read_file()})
            except (OSError, ConfigError) as err:
                LOG.error("keeping the NVE tokens in force: %s", err)
                return
            self._table = table
            LOG.info("NVE tokens reloaded from %s (%d tokens)", self._path, len(table))

    def identify(self, given: bytes) -> Principal | None:
        """The principal ``given`` authenticates, or None."""
        self._refresh()
        found: Principal | None = None
        if hmac.compare_digest(given, self._admin):
            found = ADMIN
        for raw, nves in self._table:
            if hmac.compare_digest(given, raw) and found is None:
                found = Principal(admin=False, nves=nves)
        return found


# ----------------------------------------------------------------- requests


@dataclasses.dataclass
class Request:
    """What a route handler gets: path captures, query string, JSON body and caller."""

    args: tuple[str, ...]
    query: dict[str, list[str]]
    body: dict[str, Any]
    principal: Principal = ADMIN


Response = tuple[int, Any]
Handler = Callable[[Request], Response]


# ------------------------------------------------------------ request parsing


def _query(req: Request, allowed: set[str]) -> dict[str, str]:
    """Single-valued query parameters; unknown or repeated ones are a client bug."""
    return single_values(req.query, allowed, BadRequest)


def _int(value: str, name: str) -> int:
    if not _INT_RE.match(value):
        raise BadRequest(f"{name} must be an integer >= 0, got {value!r}")
    return int(value)


def _opt_int(query: dict[str, str], name: str) -> int | None:
    return None if name not in query else _int(query[name], name)


def _req_int(query: dict[str, str], name: str) -> int:
    if name not in query:
        raise BadRequest(f"query parameter {name} is required")
    return _int(query[name], name)


def _timeout(query: dict[str, str], cap: float) -> float:
    """The client's wait, cut to the server's cap so no request holds a thread for long."""
    if "timeout" not in query:
        return 0.0
    try:
        value = float(query["timeout"])
    except ValueError:
        raise BadRequest(f"timeout must be a number of seconds, got {query['timeout']!r}") from None
    return min(check_timeout(value), cap)


def _fields(
    body: dict[str, Any],
    required: set[str],
    optional: frozenset[str] | set[str] = frozenset(),
) -> None:
    """Refuse missing and unknown fields: a typo must not silently mean 'absent'."""
    missing = sorted(required - set(body))
    if missing:
        raise BadRequest(f"missing field(s): {', '.join(missing)}")
    unknown = sorted(set(body) - required - optional)
    if unknown:
        allowed = ", ".join(sorted(required | optional))
        raise BadRequest(f"unknown field(s): {', '.join(unknown)}; expected {allowed}")


def _path_vni(value: str) -> int:
    if not _INT_RE.match(value):
        raise BadRequest(f"vni in the path must be an integer, got {value!r}")
    return int(value)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


#: Deepest nesting of arrays and objects a body may have ([nva] max_json_depth).
MAX_JSON_DEPTH = 32


def json_depth_over(data: bytes, limit: int) -> bool:
    """Whether ``data`` nests arrays/objects deeper than ``limit``, found before parsing.

    The parser recurses once per level, so a body nested thousands deep
    would exhaust Python's stack (a 500 and a traceback); brackets inside
    strings do not count.
    """
    if data.count(b"[") + data.count(b"{") <= limit:
        return False
    depth = 0
    in_string = escaped = False
    for byte in data:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):  # [ {
            depth += 1
            if depth > limit:
                return True
        elif byte in (0x5D, 0x7D):  # ] }
            depth -= 1
    return False


def parse_json_body(data: bytes, max_depth: int = MAX_JSON_DEPTH) -> dict[str, Any]:
    """Decode a request body, which must be a JSON object nested at most ``max_depth`` deep."""
    if json_depth_over(data, max_depth):
        raise BadRequest(f"request body nests arrays or objects more than {max_depth} deep")
    try:
        body = json.loads(data.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError) as err:
        raise BadRequest(f"request body is not valid JSON: {err}") from None
    except RecursionError:  # belt and braces: the check above should have caught it
        raise BadRequest(f"request body nests more than {max_depth} deep") from None
    if not isinstance(body, dict):
        raise BadRequest(f"request body must be a JSON object, got {type(body).__name__}")
    return body


# ----------------------------------------------------------------- the API


class Api:
    """The routes, mapped onto store operations; knows nothing about sockets."""

    def __init__(self, store: NvaStore, watch_max_timeout: float) -> None:
        self.store = store
        self.watch_max_timeout = watch_max_timeout
        #: The streams' hub, while the server runs on a store with a commit feed.
        self.hub: StreamHub | None = None
        ep = r"^/v1/endpoints/([^/]+)/([^/]+)"
        self.routes: Routes[Handler] = Routes(
            [
                (
                    re.compile(r"^/v1/nves$"),
                    {"GET": self.list_nves, "POST": self.register_nve},
                ),
                (
                    re.compile(r"^/v1/nves/([^/]+)$"),
                    {"GET": self.get_nve, "DELETE": self.delete_nve},
                ),
                (re.compile(r"^/v1/nves/([^/]+)/ack$"), {"POST": self.ack}),
                (
                    re.compile(r"^/v1/endpoints$"),
                    {"GET": self.list_endpoints, "POST": self.add_endpoint},
                ),
                (
                    re.compile(ep + "$"),
                    {"GET": self.get_endpoint, "DELETE": self.delete_endpoint},
                ),
                (re.compile(ep + "/prestage$"), {"POST": self.prestage}),
                (re.compile(ep + "/commit$"), {"POST": self.commit}),
                (re.compile(ep + "/abort$"), {"POST": self.abort}),
                (re.compile(ep + "/move$"), {"POST": self.move}),
                (re.compile(ep + "/expire$"), {"POST": self.expire}),
                (re.compile(ep + "/release$"), {"POST": self.release}),
                (re.compile(r"^/v1/watch$"), {"GET": self.watch}),
                (re.compile(r"^/v1/acks$"), {"GET": self.acks, "POST": self.ack_many}),
                (re.compile(r"^/v1/stream$"), {"GET": self.stream_without_upgrade}),
                (re.compile(r"^/v1/health$"), {"GET": self.health}),
            ],
            NotFound,
            MethodNotAllowed,
        )

        #: What an NVE-scoped token may call: handler name -> (check, under the lock).
        #: A handler missing here is admin only. See the module docstring's table.
        self.scopes: dict[str, tuple[Callable[[Request], None], bool]] = {
            "list_nves": (_anyone, False),
            "get_nve": (_anyone, False),
            "list_endpoints": (_anyone, False),
            "get_endpoint": (_anyone, False),
            "acks": (_anyone, False),
            "health": (_anyone, False),
            "stream_without_upgrade": (_anyone, False),
            "watch": (self._scope_watch, False),
            "register_nve": (self._scope_register, False),
            "ack": (self._scope_ack, False),
            "ack_many": (self._scope_ack_many, False),
            "move": (self._scope_move, False),
            "prestage": (self._scope_prestage, True),
            "commit": (self._scope_endpoint, True),
            "abort": (self._scope_endpoint, True),
            "expire": (self._scope_endpoint, True),
        }
        self._scoped = threading.Lock()

    def match(self, method: str, path: str) -> tuple[Handler, tuple[str, ...]]:
        """The handler and decoded path captures, or 404 / 405."""
        return self.routes.match(method, path)

    def call(self, handler: Handler, req: Request) -> Response:
        """Run ``handler`` if the request's principal may (403 otherwise, nothing changed)."""
        if req.principal.admin:
            return handler(req)
        name = getattr(handler, "__name__", "")
        scope = self.scopes.get(name)
        if scope is None:
            raise _forbidden(req.principal, f"call {name.replace('_', ' ')}", admin_only=True)
        check, locked = scope
        if not locked:
            check(req)
            return handler(req)
        with self._scoped:  # the endpoint read by the check is the one the write sees
            check(req)
            return handler(req)

    # scopes of NVE tokens (the principal is never the admin here)

    def _scope_watch(self, req: Request) -> None:
        for nve in req.query.get("nve", []):
            _own(req.principal, nve, "watch the changes of NVE")

    def check_stream(self, principal: Principal, nve: str) -> None:
        """A stream is a watch: an NVE token streams only as its own NVE."""
        if not principal.admin:
            _own(principal, nve, "stream the changes of NVE")

    def _scope_register(self, req: Request) -> None:
        _fields(req.body, {"id", "vtep"}, {"vnis"})
        _own(req.principal, req.body["id"], "register NVE")

    def _scope_ack(self, req: Request) -> None:
        _own(req.principal, req.args[0], "ack for NVE")

    def _scope_ack_many(self, req: Request) -> None:
        _fields(req.body, {"acks"})
        acks = req.body["acks"]
        if not isinstance(acks, dict):
            raise BadRequest("acks must be an object {nve: revision}")
        for nve in acks:
            _own(req.principal, nve, "ack for NVE")

    def _scope_move(self, req: Request) -> None:
        _fields(req.body, {"nve"}, {"seq"})
        _own(req.principal, req.body["nve"], "report a MAC learned at NVE")

    def _endpoint_of(self, req: Request) -> dict[str, Any]:
        return self.store.get_endpoint(_path_vni(req.args[0]), req.args[1])

    def _scope_prestage(self, req: Request) -> None:
        _fields(req.body, {"nve", "migration_id"})
        if req.body["nve"] in req.principal.nves:
            return  # moving it here: this host is the destination (or a cold start here)
        ep = self._endpoint_of(req)
        if ep.get("nve") not in req.principal.nves:
            raise _forbidden(
                req.principal,
                f"pre-stage {req.args[1]} (at {ep.get('nve')}) to {req.body['nve']}: "
                "it is neither the source nor the destination of that move",
            )

    def _scope_endpoint(self, req: Request) -> None:
        ep = self._endpoint_of(req)
        ends = {ep.get("nve"), ep.get("pending_nve")} - {None}
        if not ends & req.principal.nves:
            what = req.args[1]
            raise _forbidden(
                req.principal,
                f"change the move of {what} (at {ep.get('nve')}, pending to "
                f"{ep.get('pending_nve')}): it is neither its source nor its destination",
            )

    def allowed(self, path: str) -> list[str]:
        """Methods a path accepts, for the Allow header of a 405."""
        return self.routes.allowed(path)

    # NVEs

    def register_nve(self, req: Request) -> Response:
        _query(req, set())
        _fields(req.body, {"id", "vtep"}, {"vnis"})
        b = req.body
        return 200, self.store.register_nve(b["id"], b["vtep"], b.get("vnis", []))

    def list_nves(self, req: Request) -> Response:
        query = _query(req, {"vni"})
        return 200, {"nves": self.store.list_nves(_opt_int(query, "vni"))}

    def get_nve(self, req: Request) -> Response:
        _query(req, set())
        return 200, self.store.get_nve(req.args[0])

    def delete_nve(self, req: Request) -> Response:
        _query(req, set())
        return 200, self.store.delete_nve(req.args[0])

    def ack(self, req: Request) -> Response:
        _query(req, set())
        _fields(req.body, {"revision"})
        return 200, self.store.ack(req.args[0], req.body["revision"])

    # endpoints

    def add_endpoint(self, req: Request) -> Response:
        _query(req, set())
        _fields(req.body, {"vni", "mac", "nve"}, {"ipv4", "ipv6", "sticky"})
        b = req.body
        endpoint, created = self.store.create_endpoint(
            b["vni"], b["mac"], b.get("ipv4"), b.get("ipv6"), b["nve"], b.get("sticky", False)
        )
        return (201 if created else 200), endpoint

    def list_endpoints(self, req: Request) -> Response:
        """List a VN, or look one endpoint up by IP or MAC (404 when there is none).

        The revision is read before the list, so an agent that loads this
        list and then watches from that revision misses nothing (it may see
        a change twice, which the sequence numbers make harmless).
        """
        query = _query(req, {"vni", "ip", "mac"})
        revision = self.store.revision
        vni = _opt_int(query, "vni")
        if "ip" in query or "mac" in query:
            if vni is None:
                raise BadRequest("looking up by ip or mac needs the vni too")
            found = self.store.find(vni, ip=query.get("ip"), mac=query.get("mac"))
            return 200, {"revision": revision, "endpoints": [found]}
        return 200, {"revision": revision, "endpoints": self.store.list_endpoints(vni)}

    def get_endpoint(self, req: Request) -> Response:
        _query(req, set())
        return 200, self.store.get_endpoint(_path_vni(req.args[0]), req.args[1])

    def delete_endpoint(self, req: Request) -> Response:
        _query(req, set())
        return 200, self.store.delete_endpoint(_path_vni(req.args[0]), req.args[1])

    def prestage(self, req: Request) -> Response:
        _query(req, set())
        _fields(req.body, {"nve", "migration_id"})
        vni, mac = _path_vni(req.args[0]), req.args[1]
        return 200, self.store.prestage(vni, mac, req.body["nve"], req.body["migration_id"])

    def commit(self, req: Request) -> Response:
        _query(req, set())
        _fields(req.body, {"migration_id"})
        vni, mac = _path_vni(req.args[0]), req.args[1]
        return 200, self.store.commit(vni, mac, req.body["migration_id"])

    def abort(self, req: Request) -> Response:
        _query(req, set())
        _fields(req.body, {"migration_id"})
        vni, mac = _path_vni(req.args[0]), req.args[1]
        return 200, self.store.abort(vni, mac, req.body["migration_id"])

    def move(self, req: Request) -> Response:
        _query(req, set())
        _fields(req.body, {"nve"}, {"seq"})
        vni, mac = _path_vni(req.args[0]), req.args[1]
        return 200, self.store.move(vni, mac, req.body["nve"], req.body.get("seq"))

    def release(self, req: Request) -> Response:
        _query(req, set())
        _fields(req.body, set())
        vni, mac = _path_vni(req.args[0]), req.args[1]
        return 200, self.store.release(vni, mac)

    def expire(self, req: Request) -> Response:
        _query(req, set())
        _fields(req.body, {"nves"})
        vni, mac = _path_vni(req.args[0]), req.args[1]
        return 200, self.store.expire(vni, mac, req.body["nves"])

    # watch, acks, health

    def watch(self, req: Request) -> Response:
        query = _query(req, {"nve", "since", "timeout"})
        if "nve" not in query:
            raise BadRequest("query parameter nve is required")
        since = _opt_int(query, "since") or 0
        timeout = _timeout(query, self.watch_max_timeout)
        revision, changes = self.store.changes_since(query["nve"], since, timeout)
        return 200, {"revision": revision, "changes": changes}

    def acks(self, req: Request) -> Response:
        query = _query(req, {"vni", "min_revision", "nves", "timeout"})
        vni, min_revision = _req_int(query, "vni"), _req_int(query, "min_revision")
        nves = None
        if "nves" in query:
            nves = [n for n in query["nves"].split(",") if n]
        timeout = _timeout(query, self.watch_max_timeout)
        acks = self.store.acks(vni, min_revision, nves, timeout)
        complete = all(a["acked_revision"] >= min_revision for a in acks.values())
        return 200, {"acks": acks, "complete": complete}

    def ack_many(self, req: Request) -> Response:
        """A batch of acks ({"acks": {nve: revision}}), written in one transaction."""
        _query(req, set())
        _fields(req.body, {"acks"})
        return 200, self.store.ack_many(req.body["acks"])

    def stream_without_upgrade(self, req: Request) -> Response:
        raise BadRequest(
            f"/v1/stream needs the headers 'Connection: Upgrade' and 'Upgrade: {PROTOCOL}'",
            hint="use /v1/watch to long-poll instead",
        )

    def stream_args(self, req: Request) -> tuple[str, int]:
        """(nve, since) of a stream request, checked as a watch would check them."""
        query = _query(req, {"nve", "since"})
        if "nve" not in query:
            raise BadRequest("query parameter nve is required")
        if self.hub is None:
            raise NotFound(
                "this directory's backend cannot stream changes",
                hint="use /v1/watch to long-poll instead",
            )
        nve = check_nve_id(query["nve"])
        since = check_revision(_opt_int(query, "since") or 0, "since")
        self.store.changes_since(nve, since, 0.0)  # NotFound / Conflict / Gone, as HTTP
        return nve, since

    def health(self, req: Request) -> Response:
        _query(req, set())
        return 200, {"revision": self.store.revision}


def _anyone(req: Request) -> None:
    """Reads: any authenticated caller (the directory's contents are not secret to NVEs)."""


def _forbidden(principal: Principal, what: str, admin_only: bool = False) -> Forbidden:
    hint = (
        "this needs the admin token ([nva] token of `vmm nva serve`)"
        if admin_only
        else "an NVE token acts only on its own NVE's records; use the admin token"
    )
    return Forbidden(f"the token of {principal.name()} may not {what}", hint=hint)


def _own(principal: Principal, nve: Any, what: str) -> None:
    if not isinstance(nve, str) or nve not in principal.nves:
        raise _forbidden(principal, f"{what} {nve}")


# ------------------------------------------------------------- HTTP plumbing


class _HttpServer(JsonHttpServer):
    """The shared JSON server, knowing its API and body limit."""

    #: Many NVE agents connect at once when a site starts (each opens its stream);
    #: the default of 5 pending connections makes the kernel reset the rest, and
    #: 128 made a thousand agents wait for SYN retransmissions (1 s, 3 s, ...).
    request_queue_size = 4096

    def __init__(
        self,
        address: tuple[str, int],
        api: Api,
        credentials: Credentials,
        max_body: int,
        max_json_depth: int = MAX_JSON_DEPTH,
        max_connections: int | None = None,
        request_deadline: float | None = None,
    ) -> None:
        self.api = api
        self.credentials = credentials
        self.max_body_bytes = max_body
        self.max_json_depth = max_json_depth
        # The shared base keeps the admin token; _RequestHandler checks them all.
        super().__init__(
            address,
            _RequestHandler,
            credentials.admin_token,
            max_connections=max_connections,
            request_deadline=request_deadline,
        )


class _RequestHandler(JsonRequestHandler):
    """Authenticates, routes, bounds the body, and answers JSON."""

    server_version = "vmm-nva/1"
    log = LOG
    client_name = "NVA"
    unauthorized = Unauthorized

    @property
    def _srv(self) -> _HttpServer:
        return cast(_HttpServer, self.server)

    #: Set by _authenticate for each request; no rights until then.
    principal: Principal = Principal(admin=False)

    def do_OPTIONS(self) -> None:
        self._dispatch("OPTIONS")

    def _authenticate(self) -> None:
        """The admin token or an NVE's token (constant time over every known token)."""
        self.principal = Principal(admin=False)
        given = self.headers.get(TOKEN_HEADER)
        # A client without a token gets its answer and no kept-alive connection.
        if given is None:
            self.close_connection = True
            raise Unauthorized(f"missing {TOKEN_HEADER} header")
        # Headers arrive decoded as latin-1: re-encode to get the bytes sent.
        found = self._srv.credentials.identify(given.encode("latin-1", "replace"))
        if found is None:
            self.close_connection = True
            raise Unauthorized(f"invalid {TOKEN_HEADER}")
        self.principal = found

    def _dispatch(self, method: str) -> None:
        headers: dict[str, str] = {}
        try:
            if method == "GET" and self._wants_stream():
                self._stream()
                return
            status, payload = self._handle(method)
        except NvaError as err:
            status, payload = err.http_status, error_body(err)
            if isinstance(err, MethodNotAllowed):
                headers["Allow"] = ", ".join(self._srv.api.allowed(urlsplit(self.path).path))
        except Exception:  # a bug or a database failure: log it, answer 500
            LOG.exception("NVA request %s %s failed", method, self.path)
            status = 500
            payload = internal_error_body()
        self._send_json(status, payload, headers)

    def _wants_stream(self) -> bool:
        upgrade = (self.headers.get("Upgrade") or "").strip().lower()
        return upgrade == PROTOCOL and urlsplit(self.path).path == "/v1/stream"

    def _stream(self) -> None:
        """Switch this connection to the stream protocol and hand it to the hub.

        The connection's thread waits (idle) until the stream ends, so the
        server's bookkeeping closes the socket only then.
        """
        api = self._srv.api
        length = self._content_length()
        self._discard(length)
        self._authenticate()
        url = urlsplit(self.path)
        nve, since = api.stream_args(Request((), parse_qs(url.query, keep_blank_values=True), {}))
        api.check_stream(self.principal, nve)
        hub = api.hub
        if hub is None:  # stopped meanwhile
            raise NotFound("the directory is stopping")
        self.send_response(101)
        self.send_header("Upgrade", PROTOCOL)
        self.send_header("Connection", "Upgrade")
        self.end_headers()
        self.wfile.flush()
        self.close_connection = True
        sub = hub.attach(self.connection, nve, since)
        sub.done.wait()

    def _handle(self, method: str) -> Response:
        length = self._content_length()
        url = urlsplit(self.path)
        try:
            self._authenticate()
            handler, args = self._srv.api.match(method, url.path)
            if length > self._srv.max_body_bytes:
                raise PayloadTooLarge(
                    f"request body of {length} bytes is over the limit of "
                    f"{self._srv.max_body_bytes} bytes ([nva] max_body_bytes)"
                )
        except NvaError:
            self._discard(length)
            raise
        body = self._read_body(length) if method == "POST" else self._discard(length)
        query = parse_qs(url.query, keep_blank_values=True)
        return self._srv.api.call(handler, Request(args, query, body, self.principal))

    def _content_length(self) -> int:
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            raise BadRequest("chunked request bodies are not supported; send Content-Length")
        raw = self.headers.get("Content-Length")
        if raw is None:
            return 0
        if not _INT_RE.match(raw.strip()):
            self.close_connection = True
            raise BadRequest(f"invalid Content-Length {raw!r}")
        return int(raw)

    def _discard(self, length: int) -> dict[str, Any]:
        """Drop a body we will not use, keeping the connection usable if it is small."""
        if length > DRAIN_LIMIT:
            self.close_connection = True
            return {}
        try:
            while length > 0:
                chunk = self.rfile.read(min(length, 65536))
                if not chunk:
                    break
                length -= len(chunk)
        except OSError:
            self.close_connection = True
        if length:
            self.close_connection = True
        return {}

    def _read_body(self, length: int) -> dict[str, Any]:
        if length == 0:
            return {}
        data = self.rfile.read(length)
        if len(data) != length:
            self.close_connection = True
            raise BadRequest(f"request body ended after {len(data)} of {length} bytes")
        return parse_json_body(data, self._srv.max_json_depth)


# ------------------------------------------------------------------ server


class NvaServer:
    """The NVA HTTP API over an NvaStore, in a background thread or the foreground."""

    def __init__(
        self,
        store: NvaStore,
        token: str | None,
        host: str = "127.0.0.1",
        port: int = 9797,
        max_body_bytes: int = 1024 * 1024,
        watch_max_timeout: float = 30.0,
        max_json_depth: int = MAX_JSON_DEPTH,
        nve_tokens: Mapping[str, str] | None = None,
        nve_tokens_file: str | None = None,
        max_connections: int | None = None,
        request_deadline: float | None = None,
    ) -> None:
        if not token:
            # An empty token would let an empty header through compare_digest.
            raise ConfigError(
                "the NVA server needs a token",
                hint="set [nva] token to a shared secret",
            )
        self.store = store
        self.host = host
        self.port = port
        self._credentials = Credentials(token, nve_tokens, nve_tokens_file)
        self._max_body_bytes = max_body_bytes
        self._max_json_depth = max_json_depth
        self._max_connections = max_connections
        self._request_deadline = request_deadline
        self._api = Api(store, watch_max_timeout)
        self._httpd: _HttpServer | None = None
        self._thread: threading.Thread | None = None
        self._serving = False

    @classmethod
    def from_conf(cls, conf: cfg.ConfigOpts, store: NvaStore | None = None) -> NvaServer:
        """A server as ``[nva]`` describes it, opening ``[nva] database`` unless given a store."""
        require(conf, options.GROUP, "the directory server")
        group = conf[options.GROUP]
        if not group.token:  # before opening the database: fail on config first
            raise ConfigError(
                "the NVA server needs a token", hint="set [nva] token to a shared secret"
            )
        return cls(
            store if store is not None else NvaStore.from_conf(conf),
            group.token,
            host=group.bind_host,
            port=group.bind_port,
            max_body_bytes=group.max_body_bytes,
            watch_max_timeout=group.watch_max_timeout,
            max_json_depth=group.max_json_depth,
            nve_tokens=group.nve_tokens,
            nve_tokens_file=group.nve_tokens_file,
            max_connections=group.max_connections,
            request_deadline=group.request_deadline,
        )

    @property
    def stream_hub(self) -> StreamHub | None:
        """The hub serving the NVE streams (None: not started, or a backend without a feed)."""
        return self._api.hub

    @property
    def url(self) -> str:
        """Base URL of the running server (with the real port when port 0 was asked)."""
        if self._httpd is None:
            raise RuntimeError("the NVA server is not started")
        port = self._httpd.server_address[1]
        return f"http://{url_host(self.host)}:{port}"

    def _bind(self) -> _HttpServer:
        if self._httpd is None:
            try:
                self._httpd = _HttpServer(
                    (self.host, self.port),
                    self._api,
                    self._credentials,
                    self._max_body_bytes,
                    self._max_json_depth,
                    max_connections=self._max_connections,
                    request_deadline=self._request_deadline,
                )
            except OSError as err:
                raise ConfigError(
                    f"the NVA server cannot listen on {self.host}:{self.port}: {err}",
                    hint="check [nva] bind_host and bind_port; is another `vmm nva serve` running?",
                ) from err
            if self._api.hub is None and hasattr(self.store, "add_listener"):
                self._api.hub = StreamHub(self.store)
        return self._httpd

    def start(self) -> None:
        """Listen and serve in a daemon thread; returns once the socket is bound."""
        httpd = self._bind()
        if self._thread is not None:
            return
        self._serving = True
        self._thread = threading.Thread(
            target=httpd.serve_forever,
            # stop() waits up to one poll interval; keep it short for in-process users.
            kwargs={"poll_interval": 0.02},
            name="nva-http",
            daemon=True,
        )
        self._thread.start()
        LOG.info("NVA API listening on %s", self.url)

    def serve_forever(self) -> None:
        """Serve in this thread until stop() is called from another one (or Ctrl-C)."""
        httpd = self._bind()
        self._serving = True
        LOG.info("NVA API listening on %s", self.url)
        try:
            httpd.serve_forever(poll_interval=0.5)
        finally:
            self._serving = False
            self._close()

    def stop(self) -> None:
        """Stop accepting, cut open connections and release the port. Idempotent."""
        httpd = self._httpd
        if httpd is None:
            return
        if self._serving:
            httpd.shutdown()
            self._serving = False
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        self._close()

    def _close(self) -> None:
        hub, self._api.hub = self._api.hub, None
        if hub is not None:
            hub.close()
        httpd, self._httpd = self._httpd, None
        if httpd is not None:
            httpd.server_close()
            httpd.close_connections()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
