"""etcd v3 through its gRPC gateway (JSON over HTTP), on top of etcd3gw.

etcd3gw gives one member's HTTP plumbing (``Etcd3Client.post``, the API
path, TLS). The directory needs more than one member and more than
etcd3gw's helpers, so this module adds:

* failover: a request that cannot reach a member, or that the member cannot
  serve (no leader, timed out), is tried on the next member; when none can
  serve it the caller gets the directory's :class:`Unavailable`, naming the
  endpoints and what to check;
* transactions that mix compares, puts, deletes and ranges, read back as
  :class:`TxnResult`;
* leases (grant, keep-alive, revoke) and streaming watches
  (:mod:`vmm_etcd.watch` uses :meth:`EtcdKV.open_stream`).

A request that timed out may still have been applied. Every write in this
package is therefore a compare-and-swap on the mod revisions it read, so a
retry either finds its own earlier write (and does nothing more) or redoes
the work on fresh state; nothing is applied twice.

One ``EtcdKV`` may be shared between threads: a request borrows a
Session no other request uses meanwhile (requests does not promise a
Session is thread-safe) and gives it back, so connections are reused
across threads without one Session per thread piling up.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import logging
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any
from urllib.parse import urlsplit

import requests
from etcd3gw import exceptions as etcd_exc
from etcd3gw.client import Etcd3Client

from vmm_orchestrator.errors import ConfigError
from vmm_orchestrator.nva.errors import NvaError, Unavailable

LOG = logging.getLogger(__name__)

#: gRPC status codes (in the gateway's error bodies) that mean "this member
#: cannot serve the request now", so another member may.
_RETRY_ELSEWHERE_CODES = {4, 14}  # DEADLINE_EXCEEDED, UNAVAILABLE
_RETRY_ELSEWHERE_TEXT = (
    "no leader",
    "leader changed",
    "request timed out",
    "timed out",
    "not capable",
    "too many requests",
    "server stopped",
)


#: Pause between two rounds over the members while none can serve a request.
_RETRY_PAUSE = 0.05


class _MemberCannotServe(Exception):
    """One member could not serve a request (down, no leader, timed out)."""


def b64(data: str | bytes) -> str:
    """etcd's gateway carries keys and values as base64 strings."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    return base64.b64encode(raw).decode("ascii")


def unb64(text: str | None) -> str:
    """A base64 key or value from the gateway, as text (absent means empty)."""
    return base64.b64decode(text or "").decode("utf-8")


def prefix_end(prefix: str) -> bytes:
    """The range end that makes ``[prefix, end)`` hold exactly the keys under ``prefix``."""
    raw = bytearray(prefix.encode("utf-8"))
    while raw and raw[-1] == 0xFF:
        raw.pop()
    if not raw:
        return b"\0"  # every key
    raw[-1] += 1
    return bytes(raw)


@dataclasses.dataclass(frozen=True)
class KeyValue:
    """One key as etcd holds it; revisions are etcd's (not the directory's)."""

    key: str
    value: str
    create_revision: int
    mod_revision: int
    version: int
    lease: int

    @classmethod
    def from_json(cls, kv: dict[str, Any]) -> KeyValue:
        return cls(
            key=unb64(kv.get("key")),
            value=unb64(kv.get("value")),
            create_revision=int(kv.get("create_revision", 0)),
            mod_revision=int(kv.get("mod_revision", 0)),
            version=int(kv.get("version", 0)),
            lease=int(kv.get("lease", 0)),
        )


# --------------------------------------------------------- request builders


def cmp_mod(key: str, mod_revision: int) -> dict[str, Any]:
    """Compare: the key was last written at ``mod_revision`` (0: it does not exist)."""
    return {"key": b64(key), "target": "MOD", "result": "EQUAL", "mod_revision": mod_revision}


def cmp_exists(key: str) -> dict[str, Any]:
    """Compare: the key exists."""
    return {"key": b64(key), "target": "CREATE", "result": "GREATER", "create_revision": 0}


def cmp_value(key: str, result: str, value: str) -> dict[str, Any]:
    """Compare the key's value bytewise: EQUAL, NOT_EQUAL, GREATER or LESS (absent: false)."""
    return {"key": b64(key), "target": "VALUE", "result": result, "value": b64(value)}


def put(key: str, value: str, lease: int = 0) -> dict[str, Any]:
    request: dict[str, Any] = {"key": b64(key), "value": b64(value)}
    if lease:
        request["lease"] = lease
    return {"request_put": request}


def delete(key: str) -> dict[str, Any]:
    return {"request_delete_range": {"key": b64(key)}}


def get(key: str, revision: int = 0) -> dict[str, Any]:
    request: dict[str, Any] = {"key": b64(key)}
    if revision:
        request["revision"] = revision
    return {"request_range": request}


def get_prefix(
    prefix: str,
    start: str | None = None,
    limit: int = 0,
    revision: int = 0,
    *,
    keys_only: bool = False,
    count_only: bool = False,
    min_create_revision: int = 0,
    min_mod_revision: int = 0,
) -> dict[str, Any]:
    """Keys under ``prefix`` from ``start`` (a key under it) on, in key order.

    ``keys_only``: without values (revisions only); ``count_only``: only how
    many (:meth:`TxnResult.count`); ``min_create_revision`` /
    ``min_mod_revision``: only keys created / written at or after that etcd
    revision.
    """
    request: dict[str, Any] = {
        "key": b64(start if start is not None else prefix),
        "range_end": base64.b64encode(prefix_end(prefix)).decode("ascii"),
    }
    if limit:
        request["limit"] = limit
    if revision:
        request["revision"] = revision
    if keys_only:
        request["keys_only"] = True
    if count_only:
        request["count_only"] = True
    if min_create_revision:
        request["min_create_revision"] = min_create_revision
    if min_mod_revision:
        request["min_mod_revision"] = min_mod_revision
    return {"request_range": request}


def get_range(start: str, end: str | bytes, *, min_create_revision: int = 0) -> dict[str, Any]:
    """Keys from ``start`` up to (not including) ``end``, in key order."""
    raw_end = end.encode("utf-8") if isinstance(end, str) else end
    request: dict[str, Any] = {"key": b64(start), "range_end": b64(raw_end)}
    if min_create_revision:
        request["min_create_revision"] = min_create_revision
    return {"request_range": request}


@dataclasses.dataclass(frozen=True)
class TxnResult:
    """What a transaction answered: which branch ran, at which etcd revision, its results."""

    succeeded: bool
    revision: int
    responses: list[dict[str, Any]]

    def kvs(self, index: int) -> list[KeyValue]:
        """The keys read by the range request at ``index`` in the branch that ran."""
        answer = self.responses[index].get("response_range", {})
        return [KeyValue.from_json(kv) for kv in answer.get("kvs", [])]

    def one(self, index: int) -> KeyValue | None:
        """The key read by a single-key range request, or None when it does not exist."""
        found = self.kvs(index)
        return found[0] if found else None

    def count(self, index: int) -> int:
        """How many keys the range at ``index`` matched (before any filter or limit)."""
        return int(self.responses[index].get("response_range", {}).get("count", 0))

    def more(self, index: int) -> bool:
        """Whether the range at ``index`` stopped at its limit with keys left."""
        return bool(self.responses[index].get("response_range", {}).get("more", False))


# ---------------------------------------------------------------- endpoints


@dataclasses.dataclass(frozen=True)
class Endpoint:
    """One member's client URL, split for etcd3gw."""

    protocol: str
    host: str
    port: int

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.protocol}://{host}:{self.port}"


def parse_endpoint(text: str) -> Endpoint:
    """``http://host:port`` (or ``host:port``, meaning http) -> Endpoint; ConfigError if bad."""
    raw = text.strip()
    if "://" not in raw:
        raw = f"http://{raw}"
    parts = urlsplit(raw)
    try:
        port = parts.port
    except ValueError:
        port = None
    if parts.scheme not in ("http", "https") or not parts.hostname or port is None:
        raise ConfigError(
            f"invalid etcd endpoint {text!r}",
            hint="set [nva_etcd] endpoints to URLs like http://192.0.2.10:2379",
        )
    if parts.path not in ("", "/"):
        raise ConfigError(
            f"etcd endpoint {text!r} has a path; give only scheme, host and port",
            hint="the API path is [nva_etcd] api_path",
        )
    return Endpoint(parts.scheme, parts.hostname, port)


def _grpc_error(exc: etcd_exc.Etcd3Exception) -> tuple[int | None, str]:
    """(gRPC code, message) from the gateway's error body, as far as it says."""
    text = exc.detail_text or ""
    try:
        body = json.loads(text)
    except (TypeError, ValueError):
        return None, text.strip() or type(exc).__name__
    if not isinstance(body, dict):
        return None, text.strip()
    message = body.get("error") or body.get("message") or text
    code = body.get("code")
    return (code if isinstance(code, int) else None), str(message)


class EtcdKV:
    """Requests to an etcd cluster through any of its members' gateways."""

    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        api_path: str = "/v3/",
        timeout: float = 2.0,
        ca_cert: str | None = None,
        cert_key: str | None = None,
        cert_cert: str | None = None,
    ) -> None:
        if not endpoints:
            raise ConfigError(
                "no etcd endpoint is configured",
                hint="set [nva_etcd] endpoints to the client URLs of the etcd members",
            )
        self.endpoints = [parse_endpoint(e) for e in endpoints]
        self.api_path = "/" + api_path.strip("/") + "/"
        self.timeout = timeout
        self._tls = {"ca_cert": ca_cert, "cert_key": cert_key, "cert_cert": cert_cert}
        self._proxies, self._env_verify = _environment(
            [e.url + self.api_path for e in self.endpoints]
        )
        # Idle per-member client sets, lent to one request at a time: connections are
        # reused across threads (stages run in short-lived threads), and there are never
        # more of them than requests in flight at once.
        self._idle: list[list[Etcd3Client]] = []
        self._sessions: list[requests.Session] = []
        self._lock = threading.Lock()
        self._preferred = 0
        self._closed = False

    # -------------------------------------------------------------- plumbing

    def describe(self) -> str:
        """The endpoints, for messages."""
        return ", ".join(e.url for e in self.endpoints)

    def unavailable(self, what: str, reasons: Iterable[str]) -> Unavailable:
        """The error for "no member could serve ``what``", saying what to check."""
        detail = "; ".join(reasons)
        return Unavailable(
            f"the etcd directory cannot {what}: no member of {self.describe()} could serve "
            f"it ({detail})",
            hint="check that etcd runs and has quorum (etcdctl --endpoints="
            f"{','.join(e.url for e in self.endpoints)} endpoint health) and that "
            "[nva_etcd] endpoints and api_path are right",
        )

    def session(self) -> requests.Session:
        """A new Session with this cluster's TLS settings (the caller closes it).

        It does not look at the environment on each request (``trust_env``):
        requests then scans every environment variable for proxy settings,
        about 0.3 ms per etcd request in `vmm nva serve` (issue 16's profile).
        What the environment says (proxies, ``no_proxy``, a CA bundle) is read
        once, when this object is made, and given to every request.
        """
        session = requests.Session()
        session.trust_env = False
        if self._tls["ca_cert"]:
            session.verify = self._tls["ca_cert"]
        elif self._env_verify is not None:
            session.verify = self._env_verify
        if self._tls["cert_cert"] and self._tls["cert_key"]:
            session.cert = (self._tls["cert_cert"], self._tls["cert_key"])
        return session

    @contextlib.contextmanager
    def _clients(self) -> Iterator[list[Etcd3Client]]:
        """An etcd3gw client per member, on one Session nobody else uses meanwhile."""
        with self._lock:
            clients = self._idle.pop() if self._idle else None
        if clients is None:
            session = self.session()
            with self._lock:
                self._sessions.append(session)
            clients = [
                Etcd3Client(
                    host=e.host,
                    port=e.port,
                    protocol=e.protocol,
                    timeout=self.timeout,
                    api_path=self.api_path,
                    session=session,
                )
                for e in self.endpoints
            ]
        try:
            yield clients
        finally:
            with self._lock:
                if not self._closed:
                    self._idle.append(clients)

    def _order(self) -> list[int]:
        """Member indexes to try: the last one that worked first."""
        first = self._preferred
        return [(first + i) % len(self.endpoints) for i in range(len(self.endpoints))]

    def _worked(self, index: int) -> None:
        if self._preferred != index:
            LOG.info("etcd: now using %s", self.endpoints[index].url)
            self._preferred = index

    def close(self) -> None:
        """Close every session this object opened; it cannot be used afterwards."""
        with self._lock:
            self._closed = True
            sessions, self._sessions = self._sessions, []
            self._idle.clear()
        for session in sessions:
            session.close()

    # --------------------------------------------------------------- requests

    def call(self, path: str, body: dict[str, Any], what: str) -> dict[str, Any]:
        """POST ``body`` to the gateway's ``path`` on the first member that can serve it.

        Members are tried in turn, and again for up to ``timeout`` seconds:
        a leader election (a member just died) makes every member refuse
        for a moment, and waiting it out beats failing the migration.
        """
        if self._closed:
            raise NvaError("the etcd connection is closed")
        deadline = time.monotonic() + self.timeout
        with self._clients() as clients:
            while True:
                reasons: list[str] = []
                for index in self._order():
                    try:
                        answer = self._post(clients[index], index, path, body, what)
                    except _MemberCannotServe as exc:
                        reasons.append(f"{self.endpoints[index].url}: {exc}")
                        continue
                    self._worked(index)
                    return answer
                if time.monotonic() >= deadline:
                    raise self.unavailable(what, reasons)
                time.sleep(_RETRY_PAUSE)

    def _post(
        self, client: Etcd3Client, index: int, path: str, body: dict[str, Any], what: str
    ) -> dict[str, Any]:
        url = f"{client.protocol}://{client.host}:{client.port}"
        try:
            answer: dict[str, Any] = client.post(
                client.get_url(path), json=body, proxies=self._proxies[index]
            )
        except (etcd_exc.ConnectionFailedError, etcd_exc.ConnectionTimeoutError) as exc:
            raise _MemberCannotServe(_short(exc)) from exc
        except etcd_exc.Etcd3Exception as exc:
            code, message = _grpc_error(exc)
            if code in _RETRY_ELSEWHERE_CODES or any(
                t in message.lower() for t in _RETRY_ELSEWHERE_TEXT
            ):
                raise _MemberCannotServe(message) from exc
            raise NvaError(
                f"etcd at {url} refused to {what}: {message}",
                hint="this is a bug or an etcd setting (e.g. --max-txn-ops); "
                "see the etcd member's log",
            ) from exc
        except requests.RequestException as exc:  # bad URL, TLS files, ...
            raise ConfigError(
                f"cannot send a request to etcd at {url}: {exc}",
                hint="check [nva_etcd] endpoints and the TLS options",
            ) from exc
        return answer

    def txn(
        self,
        compare: Sequence[dict[str, Any]] = (),
        success: Sequence[dict[str, Any]] = (),
        failure: Sequence[dict[str, Any]] = (),
        what: str = "run a transaction",
    ) -> TxnResult:
        """One etcd transaction: if every compare holds run ``success``, else ``failure``."""
        body = {"compare": list(compare), "success": list(success), "failure": list(failure)}
        answer = self.call("/kv/txn", body, what)
        return TxnResult(
            succeeded=bool(answer.get("succeeded", False)),
            revision=int(answer.get("header", {}).get("revision", 0)),
            responses=list(answer.get("responses", [])),
        )

    def read(self, *requests_: dict[str, Any], what: str = "read") -> TxnResult:
        """Several ranges read at one etcd revision (a transaction without compares)."""
        return self.txn(success=requests_, what=what)

    # ----------------------------------------------------------------- leases

    def grant(self, ttl: int) -> tuple[int, int]:
        """A new lease: (id, the TTL etcd granted, which may be longer than asked)."""
        answer = self.call("/lease/grant", {"TTL": ttl, "ID": 0}, "grant a lease")
        return int(answer["ID"]), int(answer.get("TTL", ttl))

    def keepalive(self, lease: int) -> int:
        """Renew ``lease``; its new TTL, or -1 when it has already expired."""
        answer = self.call("/lease/keepalive", {"ID": lease}, "renew a lease")
        return int(answer.get("result", {}).get("TTL", -1))

    def revoke(self, lease: int) -> None:
        """End ``lease`` now: etcd deletes every key attached to it."""
        self.call("/kv/lease/revoke", {"ID": lease}, "revoke a lease")

    # ---------------------------------------------------------------- streams

    def open_stream(
        self, path: str, body: dict[str, Any], what: str
    ) -> tuple[requests.Session, requests.Response, str]:
        """Start a streaming request (a watch) on the first member that answers.

        Returns the session (the caller closes it with the stream), the
        response whose body streams, and the member's URL.
        """
        if self._closed:
            raise NvaError("the etcd connection is closed")
        reasons: list[str] = []
        for index in self._order():
            endpoint = self.endpoints[index]
            session = self.session()
            url = endpoint.url + self.api_path + path.lstrip("/")
            try:
                # No read timeout: a watch is silent until something changes.
                resp = session.post(
                    url,
                    json=body,
                    stream=True,
                    timeout=(self.timeout, None),
                    proxies=self._proxies[index],
                )
            except requests.RequestException as exc:
                session.close()
                reasons.append(f"{endpoint.url}: {_short(exc)}")
                continue
            if resp.status_code != 200:
                reasons.append(f"{endpoint.url}: HTTP {resp.status_code} {resp.text[:200]}")
                resp.close()
                session.close()
                continue
            self._worked(index)
            return session, resp, endpoint.url
        raise self.unavailable(what, reasons)


def _environment(urls: Sequence[str]) -> tuple[list[dict[str, str]], str | None]:
    """What the environment tells requests for each of ``urls``: (proxies per URL,
    honouring ``no_proxy``; the CA bundle of REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE, if any)."""
    with requests.Session() as probe:
        settings = [probe.merge_environment_settings(u, {}, None, None, None) for u in urls]
    verify = next((s["verify"] for s in settings if isinstance(s["verify"], str)), None)
    return [dict(s["proxies"]) for s in settings], verify


def _short(exc: BaseException) -> str:
    """The useful end of requests' long error texts ('Connection refused')."""
    text = str(exc)
    if isinstance(exc, etcd_exc.Etcd3Exception) and exc.detail_text:
        text = exc.detail_text
    for marker in ("Connection refused", "timed out", "Name or service not known"):
        if marker in text:
            return marker
    return text[-160:] or type(exc).__name__
