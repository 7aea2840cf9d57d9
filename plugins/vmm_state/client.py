"""Client of a peer's state service (requests): pull an export into a
bundle reader, push a bundle and get the per-kind answer, ask what the
peer imported, make it revert or commit.

Every call takes the stage's deadline and never waits past it; a peer that
cannot be reached, times out or breaks off raises TransferFailed (which
the stages answer as FAIL/transfer_failed, subject to the policy).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from typing import Any
from urllib.parse import quote

import requests

from vmm_orchestrator.errors import ConfigError
from vmm_orchestrator.httpclient import HttpClient, connection_reason, error_parts
from vmm_orchestrator.model import Migration
from vmm_state.bundle import BundleError, BundleReader
from vmm_state.importer import ImportReport
from vmm_state.wire import (
    BUNDLE_TYPE,
    BY_STATUS,
    MIGRATION_HEADER,
    PIECE,
    TOKEN_HEADER,
    ServiceError,
    TlsFiles,
    TransferFailed,
    Unauthorized,
    encode_migration,
)


def _seg(value: str) -> str:
    return quote(value, safe="")


class StateClient:
    """Client of one peer's state service; safe to share between threads.

    Each call borrows a pooled Session for itself (vmm_orchestrator.httpclient).
    Every call takes the stage's deadline (a time.monotonic() value) and
    never waits past it.
    """

    def __init__(
        self,
        url: str,
        token: str,
        connect_timeout: float = 2.0,
        read_timeout: float = 30.0,
        tls: TlsFiles | None = None,
    ) -> None:
        if not token:
            raise ConfigError("the state client needs a token", hint="set [state] token")
        self.url = url.rstrip("/")
        if tls is not None and not self.url.startswith("https://"):
            raise ConfigError(
                f"state service URL {self.url} is not https although TLS is configured",
                hint="use https:// URLs in [state] peers",
            )
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.tls = tls
        # Peers are reached directly on the management network: no proxy from the
        # environment, and no REQUESTS_CA_BUNDLE overriding [state] ca_file.
        self._http = HttpClient(
            self.url,
            {TOKEN_HEADER: token.encode("utf-8")},
            trust_env=False,
            verify=tls.ca if tls is not None else True,
            cert=(tls.cert, tls.key) if tls is not None else None,
        )

    def close(self) -> None:
        self._http.close()

    def _timeout(self, deadline: float, what: str) -> tuple[float, float]:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TransferFailed(f"no time left before the stage deadline to {what} at {self.url}")
        return (min(self.connect_timeout, left), min(self.read_timeout, left))

    def _send(
        self,
        method: str,
        path: str,
        migration: Migration,
        deadline: float,
        what: str,
        session: requests.Session | None = None,
        **kw: Any,
    ) -> requests.Response:
        """One request; with ``session`` (a streamed answer) on it, else on a
        pooled one for this call alone."""
        headers = {MIGRATION_HEADER: encode_migration(migration), **kw.pop("headers", {})}
        timeout = self._timeout(deadline, what)
        try:
            if session is not None:
                resp = session.request(
                    method, self.url + path, headers=headers, timeout=timeout, **kw
                )
            else:
                resp = self._http.request(method, path, headers=headers, timeout=timeout, **kw)
        except requests.RequestException as err:
            raise TransferFailed(f"cannot {what} at {self.url}: {_short(err)}") from err
        except BundleError:
            raise
        except ServiceError:
            raise
        except Exception as err:  # the body generator (our export) broke
            raise TransferFailed(f"cannot {what} at {self.url}: {err!r}") from err
        if resp.status_code >= 400:
            raise self._error(resp, what)
        return resp

    def _error(self, resp: requests.Response, what: str) -> ServiceError:
        message, hint, _code = error_parts(resp)
        cls = BY_STATUS.get(resp.status_code, TransferFailed)
        if cls is Unauthorized and hint is None:
            hint = "check that [state] token is the same on both hosts"
        return cls(f"{self.url} refused to {what}: {message}", hint=hint)

    def _json(self, resp: requests.Response, what: str) -> Any:
        try:
            return resp.json()
        except ValueError:
            raise TransferFailed(f"{self.url} answered {what} without JSON") from None

    def pull(
        self,
        migration: Migration,
        reader: BundleReader,
        *,
        label: str,
        kinds: list[str] | None = None,
        since: float | None = None,
        deadline: float,
    ) -> None:
        """Stream an export into ``reader`` (which enforces the limits as it goes)."""
        params: dict[str, str] = {"label": label}
        if kinds is not None:
            params["kinds"] = ",".join(kinds)
        if since is not None:
            params["since"] = repr(since)
        what = f"export the state of {migration.id}"
        path = f"/v1/state/{_seg(migration.id)}"
        with self._http.session() as session:
            resp = self._send(
                "GET", path, migration, deadline, what, session, params=params, stream=True
            )
            self._read_export(resp, migration, reader, deadline)

    def _read_export(
        self, resp: requests.Response, migration: Migration, reader: BundleReader, deadline: float
    ) -> None:
        try:
            for piece in resp.iter_content(PIECE):
                reader.feed(piece)
                if time.monotonic() > deadline:
                    raise TransferFailed(
                        f"the export of {migration.id} from {self.url} did not finish before "
                        f"the stage deadline ({reader.size} bytes received)"
                    )
        except requests.RequestException as err:
            raise TransferFailed(
                f"the export of {migration.id} from {self.url} broke off after "
                f"{reader.size} bytes: {_short(err)}"
            ) from err
        finally:
            resp.close()

    def push(
        self, migration: Migration, pieces: Iterable[bytes], *, label: str, deadline: float
    ) -> ImportReport:
        """Stream a bundle to the peer, which imports it; its per-kind answer."""
        what = f"import the {label} state of {migration.id}"
        resp = self._send(
            "POST",
            f"/v1/state/{_seg(migration.id)}",
            migration,
            deadline,
            what,
            params={"label": label},
            data=_until(pieces, deadline),
            headers={"Content-Type": BUNDLE_TYPE},
        )
        try:
            return ImportReport.from_dict(self._json(resp, what))
        except ValueError as err:
            raise TransferFailed(f"{self.url} answered {what} with {err}") from None

    def synced(self, migration: Migration, deadline: float) -> dict[str, float]:
        """Per kind, the source-clock time of the newest export the peer imported."""
        what = f"tell what it imported for {migration.id}"
        path = f"/v1/state/{_seg(migration.id)}/synced"
        resp = self._send("GET", path, migration, deadline, what)
        data = self._json(resp, what)
        try:
            return {str(k): float(v) for k, v in data["kinds"].items()}
        except (KeyError, TypeError, ValueError, AttributeError):
            raise TransferFailed(f"{self.url} answered {what} with a garbled body") from None

    def revert(self, migration: Migration, label: str | None, deadline: float) -> dict[str, Any]:
        """Make the peer undo its imports for ``migration`` (of ``label``, or all)."""
        params = {"label": label} if label else {}
        what = f"revert its imports of {migration.id}"
        resp = self._send(
            "DELETE", f"/v1/state/{_seg(migration.id)}", migration, deadline, what, params=params
        )
        result: dict[str, Any] = self._json(resp, what)
        return result

    def tell_held(
        self, migration: Migration, held: dict[str, float], deadline: float
    ) -> dict[str, Any]:
        """Destination: tell the source what it now holds of ``migration`` (its
        ``synced``): the source settles and skips asking inside the pause."""
        what = f"take what this host holds of {migration.id}"
        kinds = ",".join(f"{k}@{at!r}" for k, at in sorted(held.items()))
        path = f"/v1/state/{_seg(migration.id)}/synced"
        resp = self._send("POST", path, migration, deadline, what, params={"kinds": kinds})
        result: dict[str, Any] = self._json(resp, what)
        return result

    def commit(self, migration: Migration, deadline: float) -> dict[str, Any]:
        """Tell the peer the VM stays there: its imports are final."""
        what = f"commit its imports of {migration.id}"
        path = f"/v1/state/{_seg(migration.id)}/commit"
        resp = self._send("POST", path, migration, deadline, what)
        result: dict[str, Any] = self._json(resp, what)
        return result

    def health(self, deadline: float) -> dict[str, Any]:
        try:
            resp = self._http.request(
                "GET", "/v1/health", timeout=self._timeout(deadline, "answer a health check")
            )
        except requests.RequestException as err:
            raise TransferFailed(f"cannot reach {self.url}: {_short(err)}") from err
        if resp.status_code >= 400:
            raise self._error(resp, "answer a health check")
        result: dict[str, Any] = self._json(resp, "health")
        return result


def _short(err: Exception) -> str:
    """The useful part of requests' long error texts ('Connection refused', 'timed out')."""
    reason = connection_reason(err)
    if reason != type(err).__name__:
        return reason
    if isinstance(err, requests.Timeout):
        return "timed out"
    return f"{type(err).__name__}: {err}"


def _until(pieces: Iterable[bytes], deadline: float) -> Iterator[bytes]:
    """Pieces of an upload, stopping it (TransferFailed) once the deadline passed."""
    for piece in pieces:
        if time.monotonic() > deadline:
            raise TransferFailed("the upload did not finish before the stage deadline")
        yield piece
