"""Change tracking for one migrating VM's conntrack entries (the source's side).

Subscribed to the ctnetlink event groups NEW, UPDATE and DESTROY *before*
the pre-copy dump, so that nothing that changes between the dump and the
switchover is missed: an entry the dump saw and that changes later shows up
as an event, and so does one the dump missed because it was created while
the dump ran. Events that overlap the dump are simply sent again in the
delta (the destination replaces).

A reader thread keeps the socket's 32 MiB buffer drained; each event is
filtered on the VM's addresses (raw bytes, before decoding) and only the
newest state per entry (original tuple and zone) is kept. ``delta()``
drains what is still queued, then answers:

* the entries created or changed since the pre-copy (their state from the
  event; an UPDATE event that lacks the TCP state, or an entry whose
  remaining timeout is short, is read back from the kernel in one batched
  GET, so its timeout is the current one: "refreshed timeouts where they
  matter"),
* the entries destroyed since the pre-copy,

or None when an event was lost (ENOBUFS: the kernel dropped events because
the reader fell behind): the caller then sends a full resync, counted and
reported. A gap is never silent.

Timeouts only change with packets and raise no event, so for the pre-copy's
entries whose timeout was short (under ``refresh_below`` seconds) the
tracker remembers their names and re-reads them at the switchover as well.
"""

from __future__ import annotations

import errno
import logging
import select
import socket
import threading
import time
from typing import Any

from vmm_state.kinds import _ctnetlink as ctnl

LOG = logging.getLogger(__name__)

Key = tuple[Any, ...]


def key_of(conn: ctnl.Conn) -> Key:
    """An entry's name: original tuple and zone."""
    o = conn.orig
    return (
        o.family,
        o.proto,
        o.src,
        o.dst,
        o.sport,
        o.dport,
        o.icmp_id,
        o.icmp_type,
        o.icmp_code,
        conn.zone,
    )


class Tracker:
    """Events of one VM's entries in one namespace, from ``start`` until ``stop``."""

    def __init__(
        self,
        netns: str | None,
        addresses: set[str],
        refresh_below: float,
        lifetime: float,
    ) -> None:
        self.netns = netns
        self.addresses = set(addresses)
        self.raw = frozenset(
            socket.inet_pton(socket.AF_INET6 if ":" in a else socket.AF_INET, a) for a in addresses
        )
        self.refresh_below = refresh_below
        self.deadline = time.monotonic() + lifetime
        self.started = time.time()
        #: key -> (destroyed, newest state, monotonic time of the event)
        self.changes: dict[Key, tuple[bool, ctnl.Conn, float]] = {}
        #: names of the pre-copy's short-lived entries, re-read at the switchover
        self.short: dict[Key, ctnl.Conn] = {}
        #: ids of sessions that may lack the kernel's event extension
        self.legacy: frozenset[int] = frozenset()
        self.events = 0
        self.lost = 0
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._sock = ctnl.EventSocket(netns)
        self._thread = threading.Thread(
            target=self._run, name=f"ct-track-{netns or 'host'}", daemon=True
        )
        self._thread.start()

    # -- reading ---------------------------------------------------------------

    def _run(self) -> None:
        fd = self._sock.sock.fileno()
        while not self._stopped.is_set():
            if time.monotonic() > self.deadline:
                LOG.warning("conntrack tracking in %s outlived its lifetime; stopped", self.netns)
                self.stop()
                return
            try:
                ready, _, _ = select.select([fd], [], [], 0.2)
            except (OSError, ValueError):
                return  # closed under us by stop()
            if ready:
                try:
                    self.pump()
                except Exception as err:  # a reader that dies must not leave a silent gap
                    LOG.error("conntrack event reader in %s failed: %r", self.netns, err)
                    with self._lock:
                        self.lost += 1
                    return

    def pump(self) -> None:
        """Read every queued event now."""
        with self._lock:
            if self._stopped.is_set():
                return
            while True:
                try:
                    batch = self._sock.read()
                except OSError as err:
                    if err.errno == errno.ENOBUFS:
                        self.lost += 1
                        LOG.warning(
                            "conntrack events lost in %s (socket overrun): the switchover "
                            "will send a full resync",
                            self.netns,
                        )
                        continue  # the socket works on; what is queued is still valid
                    raise
                if not batch:
                    return
                now = time.monotonic()
                raw = self.raw
                for destroyed, data, start, end in batch:
                    conn = ctnl.parse_conn(data, start, end, raw)
                    if conn is None:
                        continue
                    self.events += 1
                    self.changes[key_of(conn)] = (destroyed, conn, now)

    def note_export(self, conns: list[ctnl.Conn]) -> None:
        """Remember the pre-copy's entries to re-read at the switchover: those
        whose timeout runs out soon, and those that may raise no events (they
        existed before the kernel was told to keep events, see ``legacy``)."""
        legacy = self.legacy
        with self._lock:
            for conn in conns:
                if conn.timeout < self.refresh_below or (legacy and conn.id in legacy):
                    self.short[key_of(conn)] = conn

    # -- the delta ---------------------------------------------------------------

    def delta(self) -> tuple[list[ctnl.Conn], list[ctnl.Conn], dict[str, int]] | None:
        """(changed entries with current timeouts, destroyed entries, figures),
        or None if an event was lost (send everything instead)."""
        try:
            self.pump()
        except OSError as err:
            LOG.error("conntrack events in %s unreadable: %r", self.netns, err)
            return None
        with self._lock:
            if self.lost:
                return None
            now = time.monotonic()
            changed: dict[Key, ctnl.Conn] = {}
            destroyed: list[ctnl.Conn] = []
            reread: dict[Key, ctnl.Conn] = {}
            for key, (gone, conn, at) in self.changes.items():
                if gone:
                    destroyed.append(conn)
                    continue
                left = conn.timeout - (now - at)
                incomplete = conn.orig.proto == ctnl.IPPROTO_TCP and conn.tcp_state is None
                if incomplete or left < self.refresh_below:
                    reread[key] = conn
                else:
                    conn.timeout = max(0, int(left))
                    changed[key] = conn
            for key, conn in self.short.items():
                if key not in self.changes:
                    reread[key] = conn
            figures = {"events": self.events, "reread": len(reread)}
        if reread:
            with ctnl.ctnetlink(self.netns) as nl:
                fresh = nl.get_many(list(reread.values()))
            for (key, old), now_conn in zip(reread.items(), fresh, strict=True):
                if now_conn is None:
                    destroyed.append(old)
                else:
                    changed[key] = now_conn
        return list(changed.values()), destroyed, figures

    def stop(self) -> None:
        """Unsubscribe. Idempotent."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        with self._lock:
            self._sock.close()
