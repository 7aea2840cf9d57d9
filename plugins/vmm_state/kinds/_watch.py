"""Cheap "did anything change?" checks for kinds whose delta is their whole set.

The bridge kinds and the control-plane nftables sets have no per-entry
change tracking: their delta inside the pause is the VM's whole set, read
with a listing that costs milliseconds (a ``bridge`` run, an nft listing).
Most of the time nothing changed since the pre-copy, and the destination
has it all. These checks answer that question for a fraction of that cost,
so such a kind sends nothing and lists nothing:

* :class:`MdbWatch`: subscribed (before the pre-copy's listing) to the
  bridge's multicast-database notifications (``RTNLGRP_MDB``: every
  membership added or removed, learnt or configured); any notification, or
  a lost one (ENOBUFS), means "changed".
* :class:`GenerationReader`: the namespace's nftables ruleset generation,
  which every committed nftables transaction raises (an element added or
  removed by a control plane, such as the DHCP snooper's bindings).
  Elements a rule adds from the packet path (meters) do not raise it: kinds
  whose sets the packet path fills must not use it.

:class:`Settled` keeps, per migration, what the destination is known to
hold (``StateKind.settle``), with the rule that makes it safe: a change
read before an export began is in that export.
"""

from __future__ import annotations

import errno
import socket
import struct
import threading
import time
from typing import Any, ClassVar

from vmm_kernel.netns import socket_in

_NLMSGHDR = struct.Struct("=IHHII")
_NFGENMSG = struct.Struct("=BBH")
NETLINK_NETFILTER = 12
NFNL_SUBSYS_NFTABLES = 10
NFT_MSG_GETGEN = 16
NFT_MSG_NEWGEN = 15
NFTA_GEN_ID = 1
NLM_F_REQUEST = 1
NLMSG_ERROR = 2
RTNLGRP_MDB = 26
RTM_NEWMDB, RTM_DELMDB = 84, 85
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1


class GenerationReader:
    """One netlink socket in ``netns`` that asks for the ruleset generation.

    Opened when a migration is tracked, outside the pause: opening a socket in
    another namespace cost 0.2-2.3 ms inside the pause in the state lab (once
    40 ms), the question itself a few microseconds. Answers are matched by
    sequence number, so a late answer to an earlier question is skipped; a
    socket that failed is opened again at the next read.
    """

    def __init__(self, netns: str | None) -> None:
        self.netns = netns
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._seq = 0

    def _open(self) -> socket.socket:
        sock = socket_in(self.netns, socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        try:
            sock.settimeout(5.0)
            sock.bind((0, 0))
        except OSError:
            sock.close()
            raise
        return sock

    def read(self) -> int:
        """The generation now; OSError when the kernel does not tell."""
        with self._lock:
            if self._sock is None:
                self._sock = self._open()
            self._seq = self._seq % 0x7FFFFFFF + 1
            try:
                return self._ask(self._sock, self._seq)
            except OSError:
                self._sock.close()
                self._sock = None
                raise

    def _ask(self, sock: socket.socket, seq: int) -> int:
        kind = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETGEN
        payload = _NFGENMSG.pack(socket.AF_UNSPEC, 0, 0)
        sock.send(_NLMSGHDR.pack(16 + len(payload), kind, NLM_F_REQUEST, seq, 0) + payload)
        while True:
            data = sock.recv(65536)
            if len(data) >= 16 and _NLMSGHDR.unpack_from(data, 0)[3] == seq:
                return _generation_of(data, self.netns)

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None


def _generation_of(data: bytes, netns: str | None) -> int:
    """NFTA_GEN_ID of a NEWGEN answer."""
    length, mtype, _flags, _seq, _pid = _NLMSGHDR.unpack_from(data, 0)
    if mtype == NLMSG_ERROR:
        code = -struct.unpack_from("=i", data, 16)[0]
        raise OSError(code, f"nftables generation in {netns or 'this namespace'}: refused")
    if mtype != (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWGEN:
        raise OSError(errno.EPROTO, f"nftables generation: unexpected message {mtype}")
    pos = 16 + _NFGENMSG.size
    while pos + 4 <= length:
        alen, atype = struct.unpack_from("=HH", data, pos)
        if alen < 4:
            break
        if atype & 0x3FFF == NFTA_GEN_ID:
            return int(struct.unpack_from(">I", data, pos + 4)[0])
        pos += (alen + 3) & ~3
    raise OSError(errno.EPROTO, "nftables generation: no NFTA_GEN_ID in the answer")


class MdbWatch:
    """Multicast-database notifications of one namespace, from its creation on.

    ``changed_at()`` drains what is queued and answers the monotonic time
    the newest notification (or loss) was read, None if none ever was.
    """

    def __init__(self, netns: str | None) -> None:
        self.netns = netns
        self.sock = socket_in(netns, socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        self.sock.bind((0, 0))
        self.sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, RTNLGRP_MDB)
        self.sock.setblocking(False)
        self.last: float | None = None
        self._lock = threading.Lock()

    def changed_at(self) -> float | None:
        with self._lock:
            while True:
                try:
                    data = self.sock.recv(1 << 16)
                except BlockingIOError:
                    return self.last
                except OSError as err:
                    if err.errno != errno.ENOBUFS:
                        raise
                    self.last = time.monotonic()  # lost some: count as changed
                    continue
                pos = 0
                while pos + 16 <= len(data):
                    length, mtype = _NLMSGHDR.unpack_from(data, pos)[:2]
                    if length < 16:
                        break
                    if mtype in (RTM_NEWMDB, RTM_DELMDB):
                        self.last = time.monotonic()
                    pos += (length + 3) & ~3

    def close(self) -> None:
        self.sock.close()


class Settled:
    """Per migration: what the destination is known to hold, for a kind whose
    delta is its whole set.

    Each export calls ``seen(migration, at, token)`` with ``at`` a
    time.monotonic() taken before it reads the state it sends, and ``token``
    what it read first (a ruleset generation, read after ``at``), or ``at``
    itself for a kind that compares notification times (taken after
    draining them: a notification read before ``at`` is in the listing).
    ``settle`` (``StateKind.settle``) takes, among the exports that began at
    or after ``upto``, the smallest token: the bundle the destination holds
    is among them, so the base never claims more than it has (exports of one
    migration may overlap). ``base(migration)`` is that token, or None.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seen: dict[str, list[tuple[float, float]]] = {}
        self._base: dict[str, float] = {}

    def seen(self, migration_id: str, at: float, token: float) -> None:
        with self._lock:
            self._seen.setdefault(migration_id, []).append((at, token))

    def settle(self, migration_id: str, upto: float | None) -> bool:
        with self._lock:
            if upto is None:  # the destination lost what was settled
                self._base.pop(migration_id, None)
                return False
            seen = self._seen.get(migration_id, [])
            after = [s for s in seen if s[0] >= upto]
            if not after:
                return False
            self._base[migration_id] = min(token for _, token in after)
            self._seen[migration_id] = after
            return True

    def base(self, migration_id: str) -> float | None:
        with self._lock:
            return self._base.get(migration_id)

    def forget(self, migration_id: str) -> None:
        with self._lock:
            self._seen.pop(migration_id, None)
            self._base.pop(migration_id, None)


class SettlesWhole:
    """StateKind.settle and delta_figures for a kind whose delta is its whole set.

    Mixed in before the kind's base class; the kind keeps its ``Settled`` in
    ``_settled`` and its per-migration figures in ``_figures`` under ``_lock``.
    """

    settles: ClassVar[bool] = True
    _settled: Settled
    _figures: dict[str, dict[str, Any]]
    _lock: threading.Lock

    def settle(self, migration_id: str, upto: float | None) -> int:
        """The destination holds the export that began at ``upto`` (None: it lost
        what was settled); see ``Settled``."""
        self._settled.settle(migration_id, upto)
        return 0

    def delta_figures(self, migration_id: str) -> dict[str, Any]:
        with self._lock:
            return dict(self._figures.get(migration_id, {}))
