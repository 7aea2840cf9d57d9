"""One etcd watch, read by a daemon thread and waited on with a timeout.

etcd3gw's own Watcher runs callbacks on a thread pool and cannot be waited
on with a deadline; the directory needs "the next events, or nothing within
T seconds" and a clean cancel from another thread (closing the store must
wake its long-polls). So the stream is read here: the gateway sends one JSON
message per line, and each batch of events (one etcd revision) goes into a
queue that :meth:`WatchStream.get` waits on.

A watch started at revision R delivers every change from R on, in revision
order, even those made before the stream opened: that is what lets a reader
take a snapshot at revision H and then watch from H + 1 without a gap.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import queue
import socket
import threading
from typing import Any

import requests

from vmm_etcd.kv import EtcdKV, KeyValue, b64, prefix_end
from vmm_orchestrator.nva.errors import Unavailable

LOG = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class WatchEvent:
    """A key was put or deleted at ``kv.mod_revision``."""

    kind: str  # "PUT" | "DELETE"
    kv: KeyValue


@dataclasses.dataclass(frozen=True)
class _Broken:
    reason: str


class WatchStream:
    """Watch ``key`` (or every key under it with ``prefix``) from ``start_revision`` on.

    ``sink`` lets several streams feed one queue; by default the stream has
    its own. Items in the queue are lists of events (one etcd revision each).
    """

    def __init__(
        self,
        kv: EtcdKV,
        key: str,
        *,
        start_revision: int,
        prefix: bool = False,
        range_end: bytes | None = None,
    ) -> None:
        create: dict[str, Any] = {"key": b64(key), "start_revision": max(1, start_revision)}
        end = prefix_end(key) if prefix else range_end
        if end is not None:
            create["range_end"] = b64(end)
        self.key = key
        #: Set when etcd cancelled the watch because history from its revision was
        #: compacted away: the reader missed changes and must read the state anew.
        self.compacted_revision: int | None = None
        self._queue: queue.Queue[list[WatchEvent] | _Broken] = queue.Queue()
        self._closed = threading.Event()
        self._session, self._resp, self.member = kv.open_stream(
            "/watch", {"create_request": create}, f"watch {key}"
        )
        _keepalive(self._resp)
        self._thread = threading.Thread(target=self._read, name=f"etcd-watch {key}", daemon=True)
        self._thread.start()

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def get(self, timeout: float) -> list[WatchEvent] | None:
        """The next batch of events, or None when none came within ``timeout`` s.

        Raises Unavailable once the stream broke (member gone, watch
        cancelled): the caller must read the state again and watch anew.
        """
        try:
            item = self._queue.get(timeout=max(0.0, timeout))
        except queue.Empty:
            return None
        if isinstance(item, _Broken):
            self._queue.put(item)  # stays broken for every later call
            raise Unavailable(
                f"the etcd watch of {self.key} at {self.member} ended: {item.reason}",
                hint="read the directory again and watch from there",
            )
        return item

    def get_nowait(self) -> list[WatchEvent] | None:
        """A batch that is already there, or None; never waits."""
        try:
            item = self._queue.get_nowait()
        except queue.Empty:
            return None
        if isinstance(item, _Broken):
            self._queue.put(item)
            return None
        return item

    def close(self) -> None:
        """Stop the watch and its thread; a waiting get() then reports the stream broken."""
        if self._closed.is_set():
            return
        self._closed.set()
        # Shut the socket down so the reader's blocking read returns at once.
        with contextlib.suppress(Exception):
            sock = socket.socket(fileno=_dup_fd(self._resp))
            try:
                sock.shutdown(socket.SHUT_RDWR)
            finally:
                sock.close()
        with contextlib.suppress(Exception):
            self._resp.close()
        with contextlib.suppress(Exception):
            self._session.close()
        self._queue.put(_Broken("closed"))

    # ------------------------------------------------------------ the reader

    def _read(self) -> None:
        reason = "the member closed the stream"
        try:
            buffer = b""
            for chunk in self._resp.iter_content(chunk_size=None):
                buffer += chunk
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    if line.strip():
                        self._message(json.loads(line))
        except _Cancelled as exc:
            reason = str(exc)
        except (requests.RequestException, OSError, ValueError) as exc:
            reason = f"{type(exc).__name__}: {exc}"
        except Exception as exc:  # a reader must never die silently...
            if not self._closed.is_set():  # ...unless close() pulled the stream away
                LOG.exception("etcd watch of %s failed", self.key)
            reason = f"{type(exc).__name__}: {exc}"
        if not self._closed.is_set():
            LOG.info("etcd watch of %s at %s ended: %s", self.key, self.member, reason)
            self._queue.put(_Broken(reason))

    def _message(self, message: dict[str, Any]) -> None:
        if "error" in message:
            error = message["error"]
            text = error.get("message", error) if isinstance(error, dict) else error
            raise _Cancelled(f"etcd answered an error: {text}")
        result = message.get("result", {})
        if result.get("canceled"):
            why = result.get("cancel_reason") or "cancelled"
            compacted = result.get("compact_revision")
            if compacted:
                self.compacted_revision = int(compacted)
                why = f"history before revision {compacted} was compacted"
            raise _Cancelled(why)
        events = [
            WatchEvent(e.get("type", "PUT"), KeyValue.from_json(e["kv"]))
            for e in result.get("events", [])
        ]
        if events:
            self._queue.put(events)


class _Cancelled(Exception):
    """etcd ended the watch on purpose."""


#: A silent watch connection is probed after this many seconds, then every
#: _KEEPALIVE_INTERVAL s, and counted dead after _KEEPALIVE_COUNT unanswered probes:
#: a member cut off by the network is noticed in about 20 s, not hours.
_KEEPALIVE_IDLE, _KEEPALIVE_INTERVAL, _KEEPALIVE_COUNT = 10, 3, 3


def _keepalive(resp: requests.Response) -> None:
    """TCP keepalive on the stream's connection (best effort)."""
    with contextlib.suppress(Exception):
        with socket.socket(fileno=_dup_fd(resp)) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, _KEEPALIVE_IDLE)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, _KEEPALIVE_INTERVAL)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, _KEEPALIVE_COUNT)


def _dup_fd(resp: requests.Response) -> int:
    """A duplicate of the stream's socket descriptor (shutdown acts on the shared socket)."""
    return os.dup(resp.raw.fileno())
