"""Client of the directory's HTTP API, for orchestrators and NVE agents.

Each method is one request and raises the same exceptions the store
raises in-process (NotFound, Conflict, ...), carrying the server's message.
When the directory cannot be reached or does not answer in time it raises
Unavailable, a TransientError, so pipeline stages retry it.
"""

from __future__ import annotations

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

TOKEN_HEADER = "X-Auth-Token"

UNAVAILABLE_HINT = "is `vmm nva serve` running? check [nva] url"


def _seg(value: Any) -> str:
    """One URL path segment: MACs keep their meaning, slashes cannot sneak in."""
    return quote(str(value), safe="")


class NvaClient:
    """Client of the NVA API; one instance may be shared between threads
    (calls borrow a Session from :class:`vmm_orchestrator.httpclient.HttpClient`)."""

    def __init__(self, url: str, token: str, timeout: float = 2.0) -> None:
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

    @classmethod
    def from_conf(cls, conf: cfg.ConfigOpts) -> NvaClient:
        """A client for ``[nva] url`` with ``[nva] token`` and ``[nva] request_timeout``."""
        options.register_opts(conf)
        group = conf[options.GROUP]
        return cls(group.url, group.token, timeout=group.request_timeout)

    def close(self) -> None:
        """Release the pooled connections."""
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
        """Long-poll the changes for ``nve`` after ``since``: (revision to ack, changes)."""
        params = {"nve": nve, "since": since, "timeout": timeout}
        answer = self._request("GET", "/v1/watch", params=params, wait=timeout)
        return int(answer["revision"]), list(answer["changes"])

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
