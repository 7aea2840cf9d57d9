"""The daemon's end of the libvirt hook relay: a unix socket, one JSON request
per connection, one JSON answer.

libvirtd runs its hooks synchronously and waits for them, so the relay
script (etc/libvirt/hooks/qemu.d/vmm-orchestrator) must not call back into
libvirt; it forwards the call here and waits a short, bounded time.

Request (one line of JSON, then the client shuts down its sending side)::

    {"guest": "vm1", "op": "migrate", "sub_op": "begin", "extra": "-",
     "xml": "<domain ...>", "expires": 81234.5}

Answer: ``{"allow": bool, "reason": str}``, plus ``"error": true`` when the
daemon could not decide (a bug, a malformed request): the relay then applies
its fail-open/fail-closed policy, as when the daemon is unreachable.

``expires`` (optional; the relay sends it for the calls it waits for) is the
CLOCK_MONOTONIC time at which the relay stops waiting. The relay has then
already let libvirt go on (fail-open) or refused (fail-closed) without the
agent, so a request read after it (an agent that hung, then resumed) is
answered as expired and never handed to the handler: no PREPARE runs for a
migration the relay already decided. A request whose handler allowed it but
whose answer came too late (or found the relay gone) is handed to
``on_abandoned``, so the daemon can revert what the handler did. Calls the
relay does not wait for (it never vetoes them: by default only "stopped end"
and "release end"; the relay answers every other unguarded call itself,
without asking) come without ``expires``; the client either closes without
reading the answer or, delivering from the background, reads it only to
know the call was handled before it lets a guarded call through.

The same socket is the agent's local API: ``{"op": "ping"}`` answers allow
with the host's name (a health check), ``{"op": "status"}`` adds the
connection state, the domains under way and the last phase reports.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import stat
import threading
import time
from collections.abc import Callable
from typing import Any

from vmm_orchestrator.errors import ConfigError

LOG = logging.getLogger(__name__)

#: Requests of the local API that are no hook call (health check, state).
LOCAL_OPS = ("ping", "status")

#: Largest request accepted: a domain XML with many devices is ~100 KiB.
MAX_REQUEST = 8 * 1024 * 1024

Handler = Callable[[dict[str, Any]], dict[str, Any]]
#: Told of a request whose allowing answer the relay never took: (request, answer).
Abandoned = Callable[[dict[str, Any], dict[str, Any]], None]


class BadRequest(ValueError):
    """The request is not a hook call this server understands."""


def parse_request(data: bytes) -> dict[str, Any]:
    """The request as a dict with string guest/op/sub_op (and optional extra, xml)."""
    try:
        request = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadRequest(f"not JSON: {exc}") from None
    if not isinstance(request, dict):
        raise BadRequest("not a JSON object")
    if request.get("op") in LOCAL_OPS:
        return request
    for key in ("guest", "op", "sub_op"):
        if not isinstance(request.get(key), str) or not request[key]:
            raise BadRequest(f"'{key}' must be a non-empty string")
    for key in ("extra", "xml"):
        if key in request and not isinstance(request[key], str):
            raise BadRequest(f"'{key}' must be a string")
    expires = request.get("expires")
    if expires is not None and (isinstance(expires, bool) or not isinstance(expires, int | float)):
        raise BadRequest("'expires' must be a number (CLOCK_MONOTONIC seconds)")
    return request


def expired(request: dict[str, Any], now: float | None = None) -> bool:
    """Whether the relay stopped waiting for this request (False if it set no deadline)."""
    expires = request.get("expires")
    if expires is None:
        return False
    return (time.monotonic() if now is None else now) >= float(expires)


class HookServer:
    """Serve hook requests on unix socket ``path`` with ``handler``.

    Each connection gets its own short-lived thread, so a slow synchronous
    PREPARE for one VM does not hold up hook calls for others. ``timeout``
    bounds reading a request and writing the answer, and how long ``stop``
    waits for requests under way. ``on_abandoned`` is told of each allowed
    request whose answer the relay did not take (see the module docstring).
    """

    def __init__(
        self,
        path: str,
        handler: Handler,
        timeout: float = 5.0,
        on_abandoned: Abandoned | None = None,
    ) -> None:
        self.path = path
        self.handler = handler
        self.timeout = timeout
        self.on_abandoned = on_abandoned
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._in_flight: set[threading.Thread] = set()
        self._in_flight_lock = threading.Lock()

    def start(self) -> None:
        """Bind (replacing a stale socket file, refusing a live one) and serve."""
        directory = os.path.dirname(os.path.abspath(self.path))
        try:
            os.makedirs(directory, mode=0o755, exist_ok=True)
        except OSError as exc:
            raise ConfigError(
                f"cannot create the directory of hook socket {self.path}: {exc.strerror}",
                hint="check [agent] hook_socket and the daemon's permissions",
            ) from None
        self._remove_stale()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(self.path)
            # Only root (libvirtd runs hooks as root) may ask for a decision.
            os.chmod(self.path, 0o600)
            sock.listen(64)
        except OSError as exc:
            sock.close()
            raise ConfigError(
                f"cannot listen on hook socket {self.path}: {exc.strerror}",
                hint="check [agent] hook_socket",
            ) from None
        self._sock = sock
        self._stopping.clear()
        self._thread = threading.Thread(
            target=self._accept_loop, name=f"hook-{os.path.basename(self.path)}", daemon=True
        )
        self._thread.start()
        LOG.info("hook relay endpoint listening on %s", self.path)

    def _remove_stale(self) -> None:
        try:
            mode = os.lstat(self.path).st_mode
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(mode):
            raise ConfigError(
                f"hook socket path {self.path} exists and is not a socket",
                hint="remove it or point [agent] hook_socket elsewhere",
            )
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(0.5)
        try:
            probe.connect(self.path)
        except OSError:
            os.unlink(self.path)  # left by a daemon that died
            return
        finally:
            probe.close()
        raise ConfigError(
            f"another process already serves hook socket {self.path}",
            hint="stop the other vmm agent, or give this host another hook_socket",
        )

    def stop(self, timeout: float | None = None) -> None:
        """Stop listening, then wait (``timeout``, default the request bound) for the
        requests under way: a PREPARE that runs when the agent is told to stop finishes
        and is answered rather than cut off."""
        self._stopping.set()
        sock, self._sock = self._sock, None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        if self._thread is not None:
            self._thread.join(2.0)
            self._thread = None
        end = time.monotonic() + (self.timeout if timeout is None else timeout)
        with self._in_flight_lock:
            running = list(self._in_flight)
        for thread in running:
            thread.join(max(0.0, end - time.monotonic()))
        if any(t.is_alive() for t in running):
            LOG.warning("hook socket %s: stopped with requests still under way", self.path)

    @property
    def in_flight(self) -> int:
        """Requests being answered now."""
        with self._in_flight_lock:
            return len(self._in_flight)

    def _accept_loop(self) -> None:
        sock = self._sock
        assert sock is not None
        while not self._stopping.is_set():
            try:
                conn, _ = sock.accept()
            except OSError:
                if self._stopping.is_set():
                    return
                LOG.exception("hook socket %s: accept failed", self.path)
                continue
            thread = threading.Thread(
                target=self._serve_one, args=(conn,), name="hook-request", daemon=True
            )
            with self._in_flight_lock:
                self._in_flight.add(thread)
            thread.start()

    def _serve_one(self, conn: socket.socket) -> None:
        try:
            with conn:
                conn.settimeout(self.timeout)
                try:
                    data = self._read(conn)
                except (OSError, BadRequest) as exc:
                    LOG.warning("hook socket %s: unreadable request: %s", self.path, exc)
                    return
                request, answer, handled = self._decide(data)
                delivered = True
                try:
                    conn.sendall(json.dumps(answer).encode("utf-8") + b"\n")
                except OSError:
                    delivered = False
                # Only a relay that waits (it sent "expires") reads the answer.
                waited = request.get("expires") is not None
                if handled and waited and answer.get("allow"):
                    if not delivered or expired(request):
                        self._abandoned(request, answer)
        finally:
            with self._in_flight_lock:
                self._in_flight.discard(threading.current_thread())

    def _abandoned(self, request: dict[str, Any], answer: dict[str, Any]) -> None:
        LOG.warning(
            "hook %s %s for %s: allowed after the relay stopped waiting; it decided alone",
            request.get("op"),
            request.get("sub_op"),
            request.get("guest"),
        )
        if self.on_abandoned is not None:
            try:
                self.on_abandoned(request, answer)
            except Exception:
                LOG.exception("hook socket %s: handling an abandoned answer failed", self.path)

    @staticmethod
    def _read(conn: socket.socket) -> bytes:
        chunks: list[bytes] = []
        size = 0
        while True:
            chunk = conn.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
            if size > MAX_REQUEST:
                raise BadRequest(f"request larger than {MAX_REQUEST} bytes")
            if chunk.endswith(b"\n"):
                break
        return b"".join(chunks)

    def answer(self, data: bytes) -> dict[str, Any]:
        """The answer to one raw request; never raises."""
        return self._decide(data)[1]

    def _decide(self, data: bytes) -> tuple[dict[str, Any], dict[str, Any], bool]:
        """(request, answer, whether the handler ran); never raises."""
        try:
            request = parse_request(data)
        except BadRequest as exc:
            return {}, {"allow": False, "reason": f"bad request: {exc}", "error": True}, False
        if expired(request):
            LOG.warning(
                "hook %s %s for %s: read after the relay stopped waiting; not handled",
                request.get("op"),
                request.get("sub_op"),
                request.get("guest"),
            )
            reason = "the relay stopped waiting before the agent read the request"
            return request, {"allow": False, "reason": reason, "error": True}, False
        try:
            answer = self.handler(request)
        except Exception as exc:
            LOG.exception(
                "hook %s %s for %s failed",
                request.get("op"),
                request.get("sub_op"),
                request.get("guest"),
            )
            return (
                request,
                {"allow": False, "reason": f"the daemon failed: {exc}", "error": True},
                True,
            )
        answer.setdefault("reason", "")
        return request, answer, True
