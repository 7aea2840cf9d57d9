"""Raw rtnetlink requests for the Linux NVE's hold: the few it makes many times.

pyroute2 0.9 spends about half a millisecond of Python (its asyncio loop,
message classes) on every request. The hold watcher reads each waiting
hold's queue and port every 20 ms: with 20 holds armed (an evacuation) that
was a whole CPU of this 2-core machine (98 %, ``benchmarks/hold_setup.py``),
taken from the migrations themselves. Packed and parsed here with
``struct`` a request costs tens of microseconds.

Also the one request pyroute2 cannot make: a tbf with TCA_TBF_BURST.

One :class:`RawLink` belongs to one thread (its socket is not shared).
"""

from __future__ import annotations

import errno
import itertools
import os
import socket
import struct

from pyroute2 import NetlinkError

from vmm_kernel import nlattr
from vmm_kernel.netns import socket_in

NETLINK_ROUTE = 0
NLMSG_ERROR, NLMSG_DONE = 2, 3
RTM_NEWLINK, RTM_DELLINK, RTM_GETLINK, RTM_NEWQDISC, RTM_GETQDISC = 16, 17, 18, 36, 38
RTM_NEWTFILTER = 44
NLM_F_REQUEST, NLM_F_ACK, NLM_F_ECHO = 0x1, 0x4, 0x8
NLM_F_REPLACE, NLM_F_EXCL, NLM_F_CREATE = 0x100, 0x200, 0x400
NLA_TYPE_MASK = 0x3FFF
IFLA_IFNAME, IFLA_MTU, IFLA_MASTER, IFLA_TXQLEN = 3, 4, 10, 13
IFLA_LINKINFO, IFLA_AF_SPEC, IFLA_EXT_MASK = 18, 26, 29
IFLA_INFO_KIND, IFLA_INFO_DATA, VETH_INFO_PEER = 1, 2, 1
IFLA_INET6_ADDR_GEN_MODE, IN6_ADDR_GEN_MODE_NONE = 8, 1
IFF_UP = 0x1
NLA_F_NESTED = 0x8000
TC_H_CLSACT, TC_H_CLSACT_HANDLE, TC_H_CLSACT_INGRESS = 0xFFFFFFF1, 0xFFFF0000, 0xFFFFFFF2
ETH_P_ALL = 0x0003
TCA_U32_SEL, TCA_U32_ACT, TC_U32_TERMINAL = 5, 7, 1
TCA_ACT_KIND, TCA_ACT_OPTIONS, TCA_MIRRED_PARMS = 1, 2, 2
TC_ACT_STOLEN, TCA_EGRESS_REDIR = 4, 1
RTEXT_FILTER_SKIP_STATS = 1 << 3
TCA_KIND, TCA_OPTIONS, TCA_STATS2 = 1, 2, 7
TCA_STATS_QUEUE = 3
TCA_TBF_PARMS, TCA_TBF_BURST = 1, 6
TC_H_ROOT = 0xFFFFFFFF
TC_LINKLAYER_ETHERNET = 1


#: Attributes packed and read as the conntrack codec does (vmm_kernel.nlattr).
_attr = nlattr.pack
attrs = nlattr.parse


def tbf_request(seq: int, index: int, rate: int, burst: int, limit: int, create: bool) -> bytes:
    """RTM_NEWQDISC for the root tbf (handle 1:) of ``index``: ``rate`` bytes a
    second, ``burst`` bytes, ``limit`` (bytes for a new tbf's default fifo; a
    change sets the child fifo's limit, in frames for a pfifo).

    pyroute2 0.9's tbf has no TCA_TBF_BURST: the kernel then takes the burst
    from the legacy ``buffer`` (a u32 of 64 ns ticks, at most 275 s), which
    at a byte a second is 275 bytes, less than one frame, and tbf drops every
    larger frame. ``tc`` sends the burst in bytes, and so does this. (A
    subclass of pyroute2's tcmsg with its own attribute map is no way out:
    pyroute2 compiles a map once per class hierarchy, and the subclass then
    silently encodes with its parent's.)
    """
    # struct tc_tbf_qopt: rate and peakrate (tc_ratespec: cell_log, linklayer,
    # overhead, cell_align, mpu, rate), limit, buffer, mtu
    ratespec = struct.pack("=BBHhHI", 0, TC_LINKLAYER_ETHERNET, 0, 0, 0, rate)
    qopt = ratespec + bytes(12) + struct.pack("=III", limit, 0, 0)
    options = _attr(TCA_TBF_PARMS, qopt) + _attr(TCA_TBF_BURST, struct.pack("=I", burst))
    body = struct.pack("=BBHiIII", socket.AF_UNSPEC, 0, 0, index, 0x10000, TC_H_ROOT, 0)
    body += _attr(TCA_KIND, b"tbf\0") + _attr(TCA_OPTIONS, options)
    flags = NLM_F_REQUEST | NLM_F_ACK | (NLM_F_CREATE | NLM_F_EXCL if create else NLM_F_REPLACE)
    return struct.pack("=IHHII", 16 + len(body), RTM_NEWQDISC, flags, seq, 0) + body


class RawLink:
    """A raw rtnetlink socket in a namespace, for one thread."""

    def __init__(self, netns: str | None, timeout: float = 10.0) -> None:
        self._sock = socket_in(netns, socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE)
        self._sock.bind((0, 0))
        self._sock.settimeout(timeout)
        self._seq = itertools.count(1)
        self._buf = bytearray(65536)

    def close(self) -> None:
        self._sock.close()

    def _ask(self, kind: int, flags: int, body: bytes) -> memoryview | None:
        """Send one request; the payload of its one answer (None: an ACK).
        NetlinkError if the kernel refused it."""
        seq = next(self._seq)
        self._sock.send(struct.pack("=IHHII", 16 + len(body), kind, flags, seq, 0) + body)
        view = memoryview(self._buf)
        while True:
            size = self._sock.recv_into(self._buf)
            offset = 0
            while offset + 16 <= size:
                length, got_kind, _flags, got_seq = struct.unpack_from("=IHHI", view, offset)
                if length < 16:
                    break
                if got_seq == seq:
                    if got_kind == NLMSG_ERROR:
                        code = struct.unpack_from("=i", view, offset + 16)[0]
                        if code:
                            raise NetlinkError(-code, os.strerror(-code))
                        return None
                    if got_kind != NLMSG_DONE:
                        return view[offset + 16 : offset + length]
                offset += (length + 3) & ~3

    def tbf(self, index: int, rate: int, burst: int, limit: int, create: bool) -> None:
        """Add or change ``index``'s root tbf (see :func:`tbf_request`)."""
        request = tbf_request(0, index, rate, burst, limit, create)
        kind, flags = struct.unpack_from("=HH", request, 4)
        self._ask(kind, flags, request[16:])

    def queue(self, index: int, parent: int, handle: int) -> tuple[int, int] | None:
        """(qlen, drops) of the qdisc ``handle`` under ``parent`` on ``index``;
        None if it is not there (the device went)."""
        body = struct.pack("=BBHiIII", socket.AF_UNSPEC, 0, 0, index, handle, parent, 0)
        try:
            # The kernel (6.18) answers a qdisc "get" only with NLM_F_ECHO (and
            # then also tells RTNLGRP_TC listeners; nothing here listens there).
            reply = self._ask(RTM_GETQDISC, NLM_F_REQUEST | NLM_F_ECHO, body)
        except NetlinkError:
            return None
        if reply is None:
            return None
        stats = attrs(reply, 20).get(TCA_STATS2)
        queue = attrs(stats).get(TCA_STATS_QUEUE) if stats is not None else None
        if queue is None or len(queue) < 12:
            return None
        qlen, _backlog, drops = struct.unpack_from("=III", queue)
        return qlen, drops

    def add_veth(self, name: str, peer: str, mtu: int) -> None:
        """Create the veth pair ``name`` / ``peer`` (down), both with ``mtu``."""
        names = _attr(IFLA_MTU, struct.pack("=I", mtu))
        peer_msg = struct.pack("=BBHiII", socket.AF_UNSPEC, 0, 0, 0, 0, 0)
        peer_msg += _attr(IFLA_IFNAME, peer.encode() + b"\0") + names
        info = _attr(IFLA_INFO_KIND, b"veth")
        info += _attr(IFLA_INFO_DATA | NLA_F_NESTED, _attr(VETH_INFO_PEER, peer_msg))
        body = struct.pack("=BBHiII", socket.AF_UNSPEC, 0, 0, 0, 0, 0)
        body += _attr(IFLA_IFNAME, name.encode() + b"\0") + names
        body += _attr(IFLA_LINKINFO | NLA_F_NESTED, info)
        self._ask(RTM_NEWLINK, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL, body)

    def no_ipv6_link_local(self, index: int) -> None:
        """IFLA_INET6_ADDR_GEN_MODE none: the device gets no link-local address
        when it comes up, so it sends no DAD, router solicitation or MLD frame."""
        mode = _attr(IFLA_INET6_ADDR_GEN_MODE, struct.pack("=B", IN6_ADDR_GEN_MODE_NONE))
        spec = _attr(IFLA_AF_SPEC | NLA_F_NESTED, _attr(socket.AF_INET6 | NLA_F_NESTED, mode))
        body = struct.pack("=BBHiII", socket.AF_UNSPEC, 0, 0, index, 0, 0) + spec
        self._ask(RTM_NEWLINK, NLM_F_REQUEST | NLM_F_ACK, body)

    def up(self, index: int) -> None:
        body = struct.pack("=BBHiII", socket.AF_UNSPEC, 0, 0, index, IFF_UP, IFF_UP)
        self._ask(RTM_NEWLINK, NLM_F_REQUEST | NLM_F_ACK, body)

    def add_qdisc(self, index: int, kind: str, parent: int, handle: int, options: bytes) -> None:
        """A new qdisc; ``options`` is TCA_OPTIONS' payload (b"": none)."""
        body = struct.pack("=BBHiIII", socket.AF_UNSPEC, 0, 0, index, handle, parent, 0)
        body += _attr(TCA_KIND, kind.encode() + b"\0")
        if options:
            body += _attr(TCA_OPTIONS, options)
        self._ask(RTM_NEWQDISC, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL, body)

    def add_pfifo(self, index: int, parent: int, handle: int, limit: int) -> None:
        """A pfifo (struct tc_fifo_qopt: the limit in frames)."""
        self.add_qdisc(index, "pfifo", parent, handle, struct.pack("=I", limit))

    def add_clsact(self, index: int) -> None:
        self.add_qdisc(index, "clsact", TC_H_CLSACT, TC_H_CLSACT_HANDLE, b"")

    def redirect_all(self, index: int, target: int) -> None:
        """On ``index``'s clsact ingress, redirect every frame to ``target``'s
        egress: ``tc filter add dev X ingress protocol all u32 match u32 0 0
        action mirred egress redirect dev Y``."""
        # struct tc_u32_sel (flags, offshift, nkeys, offmask, off, offoff, hoff,
        # hmask) with one tc_u32_key (mask, val, off, offmask) that matches all
        sel = struct.pack("=BBBxHHhhI", TC_U32_TERMINAL, 0, 1, 0, 0, 0, 0, 0)
        sel += struct.pack("=IIii", 0, 0, 0, 0)
        # struct tc_mirred: tc_gen (index, capab, action, refcnt, bindcnt), eaction, ifindex
        mirred = struct.pack("=IIiiiiI", 0, 0, TC_ACT_STOLEN, 0, 0, TCA_EGRESS_REDIR, target)
        action = _attr(TCA_ACT_KIND, b"mirred\0")
        action += _attr(TCA_ACT_OPTIONS | NLA_F_NESTED, _attr(TCA_MIRRED_PARMS, mirred))
        actions = _attr(1 | NLA_F_NESTED, action)  # the first (and only) action
        options = _attr(TCA_U32_SEL, sel) + _attr(TCA_U32_ACT | NLA_F_NESTED, actions)
        info = socket.htons(ETH_P_ALL)  # priority 0: the kernel picks one
        body = struct.pack("=BBHiIII", socket.AF_UNSPEC, 0, 0, index, 0, TC_H_CLSACT_INGRESS, info)
        body += _attr(TCA_KIND, b"u32\0") + _attr(TCA_OPTIONS | NLA_F_NESTED, options)
        self._ask(RTM_NEWTFILTER, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL, body)

    def set_txqlen(self, index: int, frames: int) -> None:
        body = struct.pack("=BBHiII", socket.AF_UNSPEC, 0, 0, index, 0, 0)
        body += _attr(IFLA_TXQLEN, struct.pack("=I", frames))
        self._ask(RTM_NEWLINK, NLM_F_REQUEST | NLM_F_ACK, body)

    def delete_link(self, index: int) -> bool:
        """Delete device ``index`` (a veth takes its peer along); False if it was gone."""
        body = struct.pack("=BBHiII", socket.AF_UNSPEC, 0, 0, index, 0, 0)
        try:
            self._ask(RTM_DELLINK, NLM_F_REQUEST | NLM_F_ACK, body)
        except NetlinkError as exc:
            if exc.code in (errno.ENODEV, errno.ENOENT):
                return False
            raise
        return True

    def link(self, name: str) -> tuple[int, int, int] | None:
        """(ifindex, master ifindex or 0, txqueuelen) of device ``name``; None if
        there is none."""
        body = struct.pack("=BBHiII", socket.AF_UNSPEC, 0, 0, 0, 0, 0)
        body += _attr(IFLA_IFNAME, name.encode() + b"\0")
        body += _attr(IFLA_EXT_MASK, struct.pack("=I", RTEXT_FILTER_SKIP_STATS))
        try:
            reply = self._ask(RTM_GETLINK, NLM_F_REQUEST, body)
        except NetlinkError:  # ENODEV
            return None
        if reply is None:
            return None
        index = struct.unpack_from("=i", reply, 4)[0]
        found = attrs(reply, 16)
        master, txqlen = found.get(IFLA_MASTER), found.get(IFLA_TXQLEN)
        return (
            index,
            struct.unpack_from("=I", master)[0] if master is not None else 0,
            struct.unpack_from("=I", txqlen)[0] if txqlen is not None else 0,
        )
