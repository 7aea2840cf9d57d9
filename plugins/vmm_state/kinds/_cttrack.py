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

``settle(upto)``: the destination confirmed it holds an export that began at
``upto`` (time.monotonic() here); every change read before then is in it
(a full dump reads the kernel after the change, a delta sends every change
recorded), so those changes are dropped and the next delta carries only
what changed since that transfer. A gap (lost events) read before ``upto``
is closed too: that export was a resync.

Timeouts only change with packets and raise no event, so for the pre-copy's
entries whose timeout was short (under ``refresh_below`` seconds) the
tracker remembers their names and re-reads them at the switchover as well.
"""

from __future__ import annotations

import dataclasses
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
        #: losses a settled resync covers (``lost`` above it: the next delta is a resync)
        self._covered = 0
        #: (monotonic time, ``lost``) of the newest loss read (``settle`` may close it)
        self._gap: tuple[float, int] | None = None
        #: the reader died: every later delta is a resync
        self._dead = False
        #: monotonic time the destination was found to lack settled changes (``unsettle``)
        self._forced: float | None = None
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
                        self._dead = True
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
                        self._gap = (time.monotonic(), self.lost)
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
            if self._dead or self.lost > self._covered or self._forced is not None:
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
                else:  # a copy: the recorded state stays as the event left it
                    changed[key] = dataclasses.replace(conn, timeout=max(0, int(left)))
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

    def settle(self, upto: float) -> int:
        """The destination holds an export that began at ``upto`` (time.monotonic()):
        forget the changes read before then; returns how many were dropped.

        A settled entry that still lives with a short remaining timeout joins
        the entries re-read at every switchover (packets refresh timeouts
        without events); a destroyed one leaves them.
        """
        try:
            self.pump()  # what is queued was read before now, maybe before upto
        except OSError as err:
            LOG.warning("conntrack events in %s unreadable while settling: %r", self.netns, err)
        with self._lock:
            if self._gap is not None and self._gap[0] < upto:
                self._covered = max(self._covered, self._gap[1])  # that export was a resync
                self._gap = None
            if self._forced is not None and self._forced < upto:
                self._forced = None  # as was that one
            dropped = [key for key, change in self.changes.items() if change[2] < upto]
            for key in dropped:
                gone, conn, at = self.changes.pop(key)
                if gone:
                    self.short.pop(key, None)
                elif conn.timeout - (upto - at) < self.refresh_below:
                    self.short[key] = conn
            return len(dropped)

    def unsettle(self) -> None:
        """The destination no longer holds changes this tracker forgot (it reverted
        a transfer that was settled): the next delta is a resync."""
        with self._lock:
            self._forced = time.monotonic()

    def stop(self) -> None:
        """Unsubscribe. Idempotent."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        with self._lock:
            self._sock.close()
