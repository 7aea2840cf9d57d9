"""One HTTP client base for the project's JSON services (directory, state service).

The engine runs every stage in a thread of its own, so a client shared by
stages meets a new thread at almost every call. A requests Session per
thread (what both clients did before) therefore opened one connection per
stage call and never closed it: the soak benchmark (benchmarks/soak.py)
counted about six descriptors and three server threads more per migration.
Here a small pool lends each call a Session of its own for the duration of
the call (requests does not promise a Session is thread-safe) and takes it
back afterwards, so connections are reused across threads and their number
is bounded by the calls in flight at once, not by the threads ever seen.

:func:`error_parts` reads the error body every service of the project
answers (:func:`vmm_orchestrator.httpapi.error_body`); each client maps it to
its own subclasses of :class:`vmm_orchestrator.httpapi.ApiError`, the one
error family of the project's APIs.
"""

from __future__ import annotations

import contextlib
import re
import threading
from collections.abc import Iterator, Mapping
from typing import Any

import requests

_ERRNO_RE = re.compile(r"\[Errno -?\d+\] ([^'\")]+)")


def connection_reason(err: Exception) -> str:
    """The useful part of requests' long connection-error text ('Connection refused')."""
    found = _ERRNO_RE.search(str(err))
    return found.group(1).strip() if found else type(err).__name__


def error_parts(resp: requests.Response) -> tuple[str, str | None, str | None]:
    """(message, hint, code) of an error answer; a body that is not the project's
    error JSON gives the HTTP status line as the message."""
    try:
        payload = resp.json()
    except ValueError:
        payload = None
    error = payload.get("error") if isinstance(payload, dict) else None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        hint = error.get("hint")
        code = error.get("code")
        return (
            error["message"],
            hint if isinstance(hint, str) else None,
            code if isinstance(code, str) else None,
        )
    return f"HTTP {resp.status_code} {resp.reason}", None, None


class HttpClient:
    """Sessions to one service, lent to one call at a time.

    ``headers`` go with every request (the token). ``trust_env`` False
    ignores proxies and CA bundles from the environment; ``verify`` and
    ``cert`` are requests' TLS settings. ``max_idle`` bounds the Sessions
    kept between calls (each holds its keep-alive connection).
    """

    def __init__(
        self,
        url: str,
        headers: Mapping[str, str | bytes],
        *,
        trust_env: bool = True,
        verify: Any = True,
        cert: Any = None,
        max_idle: int = 8,
    ) -> None:
        self.url = url.rstrip("/")
        self._headers = dict(headers)
        self._trust_env = trust_env
        self._verify = verify
        self._cert = cert
        self._max_idle = max_idle
        self._idle: list[requests.Session] = []
        self._lent: set[requests.Session] = set()
        self._lock = threading.Lock()
        self._closed = False

    def _new_session(self) -> requests.Session:
        session = requests.Session()
        session.trust_env = self._trust_env
        session.headers.update(self._headers)
        session.verify = self._verify
        if self._cert is not None:
            session.cert = self._cert
        return session

    @contextlib.contextmanager
    def session(self) -> Iterator[requests.Session]:
        """A Session for this call alone (a response streamed from it must be
        read before the block ends)."""
        with self._lock:
            session = self._idle.pop() if self._idle else None
        if session is None:
            session = self._new_session()
        with self._lock:
            self._lent.add(session)
        try:
            yield session
        finally:
            with self._lock:
                self._lent.discard(session)
                keep = not self._closed and len(self._idle) < self._max_idle
                if keep:
                    self._idle.append(session)
            if not keep:
                session.close()

    def request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        """One request whose body is read in full (``stream`` must not be set)."""
        with self.session() as session:
            resp = session.request(method, self.url + path, **kwargs)
            resp.content  # noqa: B018 - read it all before the Session goes back
            return resp

    @property
    def open_sessions(self) -> int:
        with self._lock:
            return len(self._idle) + len(self._lent)

    def close(self) -> None:
        """Close every idle Session; one still lent is closed when it comes back."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for session in idle:
            session.close()
