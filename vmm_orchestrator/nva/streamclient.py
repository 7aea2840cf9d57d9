"""An NVE's end of the directory's change stream (see :mod:`vmm_orchestrator.nva.stream`).

A plain socket, not requests: after the ``101 Switching Protocols`` answer
the connection carries JSON lines both ways, which an HTTP library does not
offer. :class:`ChangeStream` reads ``{"revision", "changes"}`` lines with
a deadline and writes ``{"ack": R}`` lines; :class:`NvaClient.watch`
and :class:`NvaClient.ack_async` use one per NVE.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from typing import Any
from urllib.parse import quote, urlsplit

from vmm_orchestrator.nva import store as core
from vmm_orchestrator.nva.errors import BY_STATUS, NvaError, Unavailable
from vmm_orchestrator.nva.stream import PROTOCOL

TOKEN_HEADER = "X-Auth-Token"
_BY_CODE = {cls.code: cls for cls in BY_STATUS.values()}
#: How a directory that does not stream says so (older ones: no such route).
_NO_STREAM = ("no such route", "this directory's backend cannot stream", "/v1/stream needs")

#: TCP keepalive: a directory cut off by the network is noticed in about 20 s.
_KEEPALIVE_IDLE, _KEEPALIVE_INTERVAL, _KEEPALIVE_COUNT = 10, 3, 3


class StreamRefused(NvaError):
    """The server does not offer streams (an older directory, or etcd behind it)."""


class ChangeStream:
    """One NVE's stream of changes from ``since`` on; ``position`` is where it stands."""

    def __init__(self, url: str, token: str, nve: str, since: int, timeout: float) -> None:
        parts = urlsplit(url)
        if parts.scheme != "http":
            raise StreamRefused(f"streams need an http:// directory URL, not {url!r}")
        self.nve = nve
        self.position = since
        self._buf = bytearray()
        #: Every read lands here first: recv(1 MiB) would allocate a megabyte per read.
        self._chunk = memoryview(bytearray(1 << 20))
        self._send_lock = threading.Lock()
        self._closed = False
        self.broken: str | None = None
        host = parts.hostname or "127.0.0.1"
        port = parts.port or 80
        try:
            self._sock = socket.create_connection((host, port), timeout=timeout)
        except OSError as err:
            raise Unavailable(
                f"cannot reach the NVA at {url} to stream: {err}",
                hint="is `vmm nva serve` running? check [nva] url",
            ) from err
        try:
            self._handshake(parts, host, token, since, timeout)
        except BaseException:
            self._sock.close()
            raise
        with contextlib.suppress(OSError):
            self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, _KEEPALIVE_IDLE)
            self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, _KEEPALIVE_INTERVAL)
            self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, _KEEPALIVE_COUNT)

    def _handshake(self, parts: Any, host: str, token: str, since: int, timeout: float) -> None:
        path = f"{parts.path.rstrip('/')}/v1/stream?nve={quote(self.nve, safe='')}&since={since}"
        request = (
            f"GET {path} HTTP/1.1\r\nHost: {parts.netloc or host}\r\n"
            f"Connection: Upgrade\r\nUpgrade: {PROTOCOL}\r\nAccept: application/json\r\n"
        ).encode("latin-1")
        request += TOKEN_HEADER.encode() + b": " + token.encode("utf-8") + b"\r\n\r\n"
        self._sock.settimeout(timeout)
        try:
            self._sock.sendall(request)
            while b"\r\n\r\n" not in self._buf:
                data = self._sock.recv(65536)
                if not data:
                    raise Unavailable("the NVA closed the connection before answering a stream")
                self._buf += data
                if len(self._buf) > 65536:
                    raise NvaError("the NVA's answer to a stream request has oversized headers")
        except OSError as err:
            raise Unavailable(f"the NVA did not answer a stream request: {err}") from err
        head, _, rest = bytes(self._buf).partition(b"\r\n\r\n")
        self._buf = bytearray(rest)
        lines = head.decode("latin-1").split("\r\n")
        try:
            status = int(lines[0].split()[1])
        except (IndexError, ValueError):
            raise NvaError(f"the NVA answered a stream request with {lines[0]!r}") from None
        if status == 101:
            return
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length") or 0)
        with contextlib.suppress(OSError):
            while len(self._buf) < length:
                data = self._sock.recv(65536)
                if not data:
                    break
                self._buf += data
        message, hint = f"HTTP {status}", None
        with contextlib.suppress(ValueError, AttributeError, TypeError):
            error = json.loads(bytes(self._buf[:length]))["error"]
            message, hint = error["message"], error.get("hint")
        if status in (400, 404, 405) and message.startswith(_NO_STREAM):
            raise StreamRefused(message, hint=hint)
        cls = BY_STATUS.get(status, NvaError)
        raise cls(message, hint=hint)

    # ------------------------------------------------------------ reading

    def get(self, timeout: float) -> tuple[int, list[dict[str, Any]]] | None:
        """The next changes (answers already here merged, up to a page), or None when
        none came within ``timeout`` s (``position`` may still have moved on).

        Raises the directory's error if it ended the stream with one, else
        Unavailable once the stream is broken.
        """
        if self.broken is not None:
            raise Unavailable(f"the NVA stream of {self.nve} ended: {self.broken}")
        deadline = time.monotonic() + max(0.0, timeout)
        changes: list[dict[str, Any]] = []
        while not changes:  # an answer without changes only moves the position on
            line = self._line(deadline)
            if line is None:
                return None
            revision, changes = self._parse(line)
            self.position = max(self.position, revision)
        while len(changes) < core.CHANGES_PAGE:
            more = self._line(None)
            if more is None:
                break
            revision, extra = self._parse(more)
            changes.extend(extra)
            self.position = max(self.position, revision)
        return self.position, changes

    def _parse(self, line: bytes) -> tuple[int, list[dict[str, Any]]]:
        try:
            message = json.loads(line)
        except ValueError:
            self._break(f"not JSON: {line[:80]!r}")
            raise Unavailable(f"the NVA stream of {self.nve} sent garbage") from None
        if "error" in message:
            error = message["error"]
            self._break(str(error.get("message")))
            cls = _BY_CODE.get(error.get("code"), NvaError)
            raise cls(str(error.get("message")), hint=error.get("hint"))
        return int(message["revision"]), list(message.get("changes") or [])

    def _line(self, deadline: float | None) -> bytes | None:
        """One line; ``deadline`` None: only one already here or readable at once."""
        while True:
            end = self._buf.find(b"\n")
            if end >= 0:
                line = bytes(self._buf[:end])
                del self._buf[: end + 1]
                return line
            if deadline is None:
                wait = 0.0
            else:
                wait = deadline - time.monotonic()
                if wait <= 0:
                    return None
            try:
                self._sock.settimeout(wait if wait > 0 else 0.0)
                got = self._sock.recv_into(self._chunk)
            except (TimeoutError, BlockingIOError, InterruptedError):
                return None
            except OSError as err:
                self._break(str(err))
                raise Unavailable(f"the NVA stream of {self.nve} broke: {err}") from err
            if not got:
                self._break("the NVA closed it")
                raise Unavailable(f"the NVA closed the stream of {self.nve}")
            self._buf += self._chunk[:got]

    # ------------------------------------------------------------ writing

    def ack(self, revision: int) -> None:
        """Send an ack; the directory writes it with the others that arrive with it."""
        data = b'{"ack": %d}\n' % int(revision)
        with self._send_lock:
            try:
                self._sock.sendall(data)
            except OSError as err:
                self._break(str(err))
                raise Unavailable(f"the NVA stream of {self.nve} broke: {err}") from err

    def _break(self, why: str) -> None:
        if self.broken is None:
            self.broken = why

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._break("closed")
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
