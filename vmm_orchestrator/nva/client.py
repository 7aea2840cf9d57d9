"""Client of the directory's HTTP API, for orchestrators and NVE agents.

Each method is one request and raises the same exceptions the store
raises in-process (NotFound, Conflict, ...), carrying the server's message.
When the directory cannot be reached or does not answer in time it raises
Unavailable, a TransientError, so pipeline stages retry it.

``watch`` is the exception: by default each NVE gets one stream
(:mod:`vmm_orchestrator.nva.streamclient`) on which the directory pushes
its changes and ``ack_async`` sends its acks, instead of a long-poll and an
ack request per change (issue 16: a request-response round per peer per
move made the fan-out to 1,000 NVEs take seconds). A directory that cannot
stream is long-polled as before.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Any, Self
from urllib.parse import quote

import requests
from oslo_config import cfg

from vmm_orchestrator.errors import ConfigError
from vmm_orchestrator.httpclient import HttpClient, connection_reason, error_parts
from vmm_orchestrator.nva import options
from vmm_orchestrator.nva.errors import (
    BY_STATUS,
    BadRequest,
    NvaError,
    Unauthorized,
    Unavailable,
)
from vmm_orchestrator.nva.streamclient import ChangeStream, StreamRefused
from vmm_orchestrator.options import require

LOG = logging.getLogger(__name__)


TOKEN_HEADER = "X-Auth-Token"

UNAVAILABLE_HINT = "is `vmm nva serve` running? check [nva] url"


def _seg(value: Any) -> str:
    """One URL path segment: MACs keep their meaning, slashes cannot sneak in."""
    return quote(str(value), safe="")


class NvaClient:
    """Client of the NVA API; one instance may be shared between threads
    (calls borrow a Session from :class:`vmm_orchestrator.httpclient.HttpClient`)."""

    def __init__(self, url: str, token: str, timeout: float = 2.0, stream: bool = True) -> None:
        if not token:
            raise ConfigError(
                "the NVA client needs a token",
                hint="set [nva] token to the shared secret of `vmm nva serve`",
            )
        self.url = url.rstrip("/")
        self.timeout = timeout
        # Bytes so a non-ASCII token reaches the server as its UTF-8 encoding.
        self._http = HttpClient(
            self.url, {TOKEN_HEADER: token.encode("utf-8"), "Accept": "application/json"}
        )
        self._token = token
        #: Whether watch() streams (False: long-polls, as for a directory that cannot stream).
        self.streaming = stream
        self._streams: dict[str, ChangeStream] = {}
        self._streams_lock = threading.Lock()

    @classmethod
    def from_conf(cls, conf: cfg.ConfigOpts) -> NvaClient:
        """A client for ``[nva] url`` with ``[nva] token`` and ``[nva] request_timeout``."""
        require(conf, options.GROUP, "the directory client")
        group = conf[options.GROUP]
        return cls(group.url, group.token, timeout=group.request_timeout)

    def close(self) -> None:
        """Release the pooled connections and close every NVE's stream."""
        with self._streams_lock:
            streams, self._streams = list(self._streams.values()), {}
        for stream in streams:
            stream.close()
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ transport

    def _request(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, Any] | None = None,
        body: dict[str, Any] | None = None,
        wait: float = 0.0,
    ) -> Any:
        """Send one request; ``wait`` is how long the server may hold it on purpose."""
        timeout = wait + self.timeout
        try:
            resp = self._http.request(method, path, params=params, json=body, timeout=timeout)
        except requests.ConnectionError as err:
            raise Unavailable(
                f"cannot reach the NVA at {self.url} ({method} {path}): {connection_reason(err)}",
                hint=UNAVAILABLE_HINT,
            ) from err
        except requests.Timeout as err:
            raise Unavailable(
                f"the NVA at {self.url} did not answer {method} {path} within {timeout:g} s",
                hint=UNAVAILABLE_HINT,
            ) from err
        except requests.RequestException as err:
            raise ConfigError(
                f"cannot send a request to the NVA at {self.url!r}: {err}",
                hint="check [nva] url",
            ) from err
        return self._decode(resp, method, path)

    def _decode(self, resp: requests.Response, method: str, path: str) -> Any:
        """The JSON answer, or the exception class the status stands for."""
        if resp.status_code < 400:
            try:
                return resp.json()
            except ValueError:
                raise NvaError(
                    f"{method} {path} at {self.url} answered HTTP {resp.status_code} without JSON",
                    hint="check that [nva] url points at `vmm nva serve`",
                ) from None
        message, hint, _code = error_parts(resp)
        cls = BY_STATUS.get(resp.status_code)
        if cls is None:
            cls = Unavailable if resp.status_code in (502, 504) else NvaError
            message = f"{method} {path} at {self.url} failed: {message}"
        if hint is None and cls is Unauthorized:
            hint = "check that [nva] token matches the server's"
        if hint is None and cls is Unavailable:
            hint = UNAVAILABLE_HINT
        raise cls(message, hint=hint)

    @staticmethod
    def _endpoint_path(vni: int, mac: str, action: str = "") -> str:
        path = f"/v1/endpoints/{_seg(vni)}/{_seg(mac)}"
        return f"{path}/{action}" if action else path

    # ----------------------------------------------------------------- NVEs

    def register_nve(self, nve_id: str, vtep: str, vnis: Sequence[int]) -> dict[str, Any]:
        """Add or update an NVE and the VNIs it serves."""
        body = {"id": nve_id, "vtep": vtep, "vnis": list(vnis)}
        result: dict[str, Any] = self._request("POST", "/v1/nves", body=body)
        return result

    def list_nves(self, vni: int | None = None) -> list[dict[str, Any]]:
        """All NVEs, or those serving ``vni``."""
        params = None if vni is None else {"vni": vni}
        nves: list[dict[str, Any]] = self._request("GET", "/v1/nves", params=params)["nves"]
        return nves

    def get_nve(self, nve_id: str) -> dict[str, Any]:
        """One NVE, with the revision it last acked."""
        result: dict[str, Any] = self._request("GET", f"/v1/nves/{_seg(nve_id)}")
        return result

    def delete_nve(self, nve_id: str) -> dict[str, Any]:
        """Remove an NVE that serves no endpoint; peers drop it from their flood lists."""
        result: dict[str, Any] = self._request("DELETE", f"/v1/nves/{_seg(nve_id)}")
        return result

    def ack(self, nve_id: str, revision: int) -> dict[str, Any]:
        """Report that ``nve_id`` applied every change up to ``revision``."""
        body = {"revision": revision}
        result: dict[str, Any] = self._request("POST", f"/v1/nves/{_seg(nve_id)}/ack", body=body)
        return result

    # ------------------------------------------------------------ endpoints

    def add_endpoint(
        self,
        vni: int,
        mac: str,
        ipv4: Sequence[str] | None,
        ipv6: Sequence[str] | None,
        nve: str,
        sticky: bool = False,
    ) -> dict[str, Any]:
        """Add an endpoint at ``nve``; repeating an identical add returns the existing one.

        A ``sticky`` (static) endpoint never moves.
        """
        body: dict[str, Any] = {
            "vni": vni,
            "mac": mac,
            "ipv4": list(ipv4 or ()),
            "ipv6": list(ipv6 or ()),
            "nve": nve,
        }
        if sticky:
            body["sticky"] = True
        result: dict[str, Any] = self._request("POST", "/v1/endpoints", body=body)
        return result

    def get_endpoint(self, vni: int, mac: str) -> dict[str, Any]:
        """One endpoint by (VNI, MAC)."""
        result: dict[str, Any] = self._request("GET", self._endpoint_path(vni, mac))
        return result

    def find(self, vni: int, ip: str | None = None, mac: str | None = None) -> dict[str, Any]:
        """Look an endpoint up by IP or MAC (the cache-miss path); NotFound if none."""
        if ip is None and mac is None:
            # Without either the server would list the whole VN; refuse like the store does.
            raise BadRequest("find needs an ip or a mac to look up")
        params: dict[str, Any] = {"vni": vni}
        if ip is not None:
            params["ip"] = ip
        if mac is not None:
            params["mac"] = mac
        found: dict[str, Any] = self._request("GET", "/v1/endpoints", params=params)["endpoints"][0]
        return found

    def snapshot(self, vni: int | None = None) -> tuple[int, list[dict[str, Any]]]:
        """Endpoints plus a revision to watch from, for an agent (re)loading its tables."""
        params = None if vni is None else {"vni": vni}
        answer = self._request("GET", "/v1/endpoints", params=params)
        return int(answer["revision"]), list(answer["endpoints"])

    def list_endpoints(self, vni: int | None = None) -> list[dict[str, Any]]:
        """All endpoints, or those of one VN."""
        return self.snapshot(vni)[1]

    def delete_endpoint(self, vni: int, mac: str) -> dict[str, Any]:
        """Remove an endpoint; returns it with the revision of the delete."""
        result: dict[str, Any] = self._request("DELETE", self._endpoint_path(vni, mac))
        return result

    # ------------------------------------------------------------ migration

    def prestage(self, vni: int, mac: str, nve: str, migration_id: str) -> dict[str, Any]:
        """Mark ``nve`` as the endpoint's next home; traffic is not moved yet."""
        body = {"nve": nve, "migration_id": migration_id}
        path = self._endpoint_path(vni, mac, "prestage")
        result: dict[str, Any] = self._request("POST", path, body=body)
        return result

    def commit(self, vni: int, mac: str, migration_id: str) -> dict[str, Any]:
        """Move the endpoint to its prestaged NVE: {"endpoint", "revision", "committed_at"}."""
        path = self._endpoint_path(vni, mac, "commit")
        result: dict[str, Any] = self._request("POST", path, body={"migration_id": migration_id})
        return result

    def abort(self, vni: int, mac: str, migration_id: str) -> dict[str, Any]:
        """Forget a prestage; the endpoint stays where it is."""
        path = self._endpoint_path(vni, mac, "abort")
        result: dict[str, Any] = self._request("POST", path, body={"migration_id": migration_id})
        return result

    def move(self, vni: int, mac: str, nve: str, seq: int | None = None) -> dict[str, Any]:
        """Report the MAC at ``nve`` (locally learned); Conflict if ``seq`` is stale."""
        body: dict[str, Any] = {"nve": nve}
        if seq is not None:
            body["seq"] = seq
        path = self._endpoint_path(vni, mac, "move")
        result: dict[str, Any] = self._request("POST", path, body=body)
        return result

    def release(self, vni: int, mac: str) -> dict[str, Any]:
        """Unfreeze a MAC the directory froze as flapping; returns the endpoint."""
        result: dict[str, Any] = self._request(
            "POST", self._endpoint_path(vni, mac, "release"), body={}
        )
        return result

    def expire(self, vni: int, mac: str, nves: Sequence[str]) -> dict[str, Any]:
        """Ask ``nves`` to drop their cached entry for ``mac`` and look it up again."""
        path = self._endpoint_path(vni, mac, "expire")
        result: dict[str, Any] = self._request("POST", path, body={"nves": list(nves)})
        return result

    # ----------------------------------------------------- watch, acks, health

    def watch(self, nve: str, since: int, timeout: float = 0.0) -> tuple[int, list[dict[str, Any]]]:
        """The changes for ``nve`` after ``since``, waiting up to ``timeout`` s:
        (revision to ack, changes).

        Streamed: the first call (or one whose ``since`` is not where the
        stream stands, as after a resync) opens the NVE's stream from
        ``since``; later calls take what the directory pushed. A broken
        stream raises Unavailable and the next call opens a new one.
        """
        if self.streaming:
            try:
                return self._stream_watch(nve, since, timeout)
            except StreamRefused as err:
                LOG.info("the NVA at %s does not stream (%s); long-polling", self.url, err)
                self.streaming = False
        return self.poll(nve, since, timeout)

    def poll(self, nve: str, since: int, timeout: float = 0.0) -> tuple[int, list[dict[str, Any]]]:
        """Long-poll the changes for ``nve`` after ``since``: (revision to ack, changes)."""
        params = {"nve": nve, "since": since, "timeout": timeout}
        answer = self._request("GET", "/v1/watch", params=params, wait=timeout)
        return int(answer["revision"]), list(answer["changes"])

    def _stream_watch(
        self, nve: str, since: int, timeout: float
    ) -> tuple[int, list[dict[str, Any]]]:
        with self._streams_lock:
            stream = self._streams.get(nve)
        if stream is None or stream.position != since or stream.broken is not None:
            if stream is not None:
                stream.close()
            stream = ChangeStream(self.url, self._token, nve, since, self.timeout)
            with self._streams_lock:
                old = self._streams.get(nve)
                self._streams[nve] = stream
            if old is not None and old is not stream:
                old.close()
        try:
            answer = stream.get(timeout)
        except NvaError:
            with self._streams_lock:
                if self._streams.get(nve) is stream:
                    del self._streams[nve]
            stream.close()
            raise
        if answer is None:
            return stream.position, []
        return answer

    @property
    def open_streams(self) -> int:
        """NVE streams open now (one per NVE this client follows the directory for)."""
        with self._streams_lock:
            return sum(1 for s in self._streams.values() if s.broken is None)

    def close_stream(self, nve_id: str) -> None:
        """Close ``nve_id``'s stream (its agent stopped following); the next watch opens one."""
        with self._streams_lock:
            stream = self._streams.pop(nve_id, None)
        if stream is not None:
            stream.close()

    def ack_async(self, nve_id: str, revision: int) -> None:
        """Report ``revision`` applied without waiting for the answer: on the NVE's
        stream when it has one (the directory writes acks that arrive together in one
        transaction), else as :meth:`ack`."""
        with self._streams_lock:
            stream = self._streams.get(nve_id)
        if stream is not None and stream.broken is None:
            try:
                stream.ack(revision)
                return
            except NvaError:
                pass  # the stream broke: ack by request, the next watch reconnects
        self.ack(nve_id, revision)

    def ack_many(self, acks: dict[str, int]) -> dict[str, Any]:
        """Many NVEs' acks in one request and one transaction:
        {"acked": {id: nve}, "errors": {id: message}}."""
        result: dict[str, Any] = self._request("POST", "/v1/acks", body={"acks": dict(acks)})
        return result

    def acks(
        self,
        vni: int,
        min_revision: int,
        nves: Sequence[str] | None = None,
        timeout: float = 0.0,
    ) -> dict[str, dict[str, Any]]:
        """Wait up to ``timeout`` s for the NVEs to ack ``min_revision``; their ack state."""
        params: dict[str, Any] = {
            "vni": vni,
            "min_revision": min_revision,
            "timeout": timeout,
        }
        if nves is not None:
            params["nves"] = ",".join(nves)
        acks: dict[str, dict[str, Any]] = self._request(
            "GET", "/v1/acks", params=params, wait=timeout
        )["acks"]
        return acks

    def health(self) -> dict[str, Any]:
        """{"revision": R} when the directory is up and the token is right."""
        result: dict[str, Any] = self._request("GET", "/v1/health")
        return result
