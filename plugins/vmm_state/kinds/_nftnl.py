"""nftables set elements read straight from the kernel (NFT_MSG_GETSETELEM).

The ``nft_sets`` kind lists its dynamic sets again at the switchover, inside
the VM's pause: their elements are added by packets (``add @set`` in a rule,
nft's dynset), which raise no ruleset generation and send no notification,
so only a fresh read tells what changed. Through libnftables
(:func:`vmm_state.kinds._nft.list_set`) each set's listing makes nft build
its cache of the ruleset, then print JSON that Python parses: the lab
firewall's four sets took 1.25-1.5 ms on a quiet machine, 4-8 ms inside the
lab's pause (1,000 sessions of traffic on 2 shared cores,
``benchmarks/state_sessions.py``). This module asks the kernel for just
those sets over one netlink socket and decodes only the elements that name
the VM. Measured with the lab's sets, one element in one of them:

* an element dump costs what the set's hash table has in buckets, not in
  elements: a ``size 65535`` set has 131,072, walked in 0.15 ms even empty
  (8 us for a set without ``size``). Four dumps: 0.78-0.95 ms.
* so each set is first asked its element count (``GETSET``; the kernel
  answers ``NFTA_SET_COUNT`` since 6.16), and an empty set is not dumped:
  0.44-0.48 ms for the four (a kernel without the count dumps every set).
* reading the sets side by side in two threads was slower (0.89 ms against
  0.78 ms in a row, on 2 busy cores): one socket, one set after the other.
* inside the lab's pause what remained was waiting for the GIL after each
  blocking call (the stage's own thread runs meanwhile): the socket is
  opened before the pause (:class:`Reader`), and send/receive go through
  libc with the GIL held (:func:`_send`). The kind's export there, median
  of 12 runs: 5.7 ms with libnftables, 2.9 ms with this reader on Python's
  socket calls, 0.85 ms (6 runs) with the GIL held.

The destination's import looks the delta's elements up one by one
(:meth:`Reader.lookup`) instead of listing the whole set.

pyroute2 (0.9.7) has nftables messages, but its ``set_elems("get")`` reads
only the first message of a dump (a set larger than one message loses
elements), decodes no ``limit``, and took 1.65 ms for the four sets
(an asyncio loop per call): no faster than libnftables.

What is decoded: sets whose key fields are all IPv4 or IPv6 addresses (the
flood meters and blacklists), each element with its timeout, its expiry and
its ``limit`` and ``counter`` expressions, into the entries
:func:`~vmm_state.kinds._nft.list_set` gives (checked against it in
``tests/functional/test_state_nftnl.py``); one difference: an element with
both a limit and a counter has both here, where nft's JSON shows only the
first. Anything else (another field type, an interval or map set, another
expression, a flagged element) raises :class:`Unsupported`, and the caller
lists that set through libnftables instead: never a guess.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from vmm_kernel.netns import socket_in

NETLINK_NETFILTER = 12
TIMEOUT = 5  # seconds a kernel answer may take (it takes microseconds)
DUMP_ATTEMPTS = 5  # dumps of a set whose hash table is being resized (see Reader._elements)
NFNL_SUBSYS_NFTABLES = 10
NFT_MSG_NEWSET, NFT_MSG_GETSET = 9, 10
NFT_MSG_NEWSETELEM, NFT_MSG_GETSETELEM = 12, 13
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLA_TYPE_MASK = 0x3FFF
NLA_F_NESTED = 0x8000

NFTA_SET_TABLE, NFTA_SET_NAME, NFTA_SET_FLAGS, NFTA_SET_KEY_TYPE, NFTA_SET_KEY_LEN = 1, 2, 3, 4, 5
NFTA_SET_DESC, NFTA_SET_TIMEOUT, NFTA_SET_COUNT = 9, 11, 20
NFTA_SET_DESC_SIZE = 1
NFT_SET_INTERVAL, NFT_SET_MAP, NFT_SET_TIMEOUT, NFT_SET_OBJECT = 0x4, 0x8, 0x10, 0x40
NFTA_SET_ELEM_LIST_TABLE, NFTA_SET_ELEM_LIST_SET, NFTA_SET_ELEM_LIST_ELEMENTS = 1, 2, 3
NFTA_LIST_ELEM = 1
NFTA_SET_ELEM_KEY, NFTA_SET_ELEM_DATA, NFTA_SET_ELEM_FLAGS = 1, 2, 3
NFTA_SET_ELEM_TIMEOUT, NFTA_SET_ELEM_EXPIRATION, NFTA_SET_ELEM_EXPR = 4, 5, 7
NFTA_SET_ELEM_OBJREF, NFTA_SET_ELEM_KEY_END, NFTA_SET_ELEM_EXPRESSIONS = 9, 10, 11
NFTA_DATA_VALUE = 1
NFTA_EXPR_NAME, NFTA_EXPR_DATA = 1, 2
NFTA_LIMIT_RATE, NFTA_LIMIT_UNIT, NFTA_LIMIT_BURST = 1, 2, 3
NFTA_LIMIT_TYPE, NFTA_LIMIT_FLAGS = 4, 5
NFT_LIMIT_PKT_BYTES, NFT_LIMIT_F_INV = 1, 1
NFTA_COUNTER_BYTES, NFTA_COUNTER_PACKETS = 1, 2

#: nft's family names -> NFPROTO_*
FAMILIES = {"ip": 2, "ip6": 10, "inet": 1, "arp": 3, "bridge": 7, "netdev": 5}
#: nft datatype ids (TYPE_IPADDR, TYPE_IP6ADDR) -> (name, bytes, address family)
_ADDRESS = {7: ("ipv4_addr", 4, socket.AF_INET), 8: ("ipv6_addr", 16, socket.AF_INET6)}
_TYPE_BITS = 6  # a concatenation's key type: one 6-bit datatype id per field
_PER = {1: "second", 60: "minute", 3600: "hour", 86400: "day", 604800: "week"}
_DATA_UNITS = ("bytes", "kbytes", "mbytes")

_NLMSGHDR = struct.Struct("=IHHII")
_NFGENMSG = struct.Struct("=BBH")
_NLA = struct.Struct("=HH")
_BE32 = struct.Struct(">I")
_BE64 = struct.Struct(">Q")


class Unsupported(Exception):
    """A set or element this reader does not decode: list it with libnftables."""


class SetLayout:
    """What decoding a set's elements needs, from the kernel's GETSET answer."""

    __slots__ = ("default_timeout", "fields", "size", "timeout_flag", "types")

    def __init__(self, attrs: dict[int, bytes], name: str) -> None:
        flags = _BE32.unpack(attrs[NFTA_SET_FLAGS])[0] if NFTA_SET_FLAGS in attrs else 0
        if flags & (NFT_SET_INTERVAL | NFT_SET_MAP | NFT_SET_OBJECT):
            raise Unsupported(f"set {name} is an interval, map or object set")
        key_type = _BE32.unpack(attrs[NFTA_SET_KEY_TYPE])[0]
        key_len = _BE32.unpack(attrs[NFTA_SET_KEY_LEN])[0]
        ids: list[int] = []
        while key_type:
            ids.insert(0, key_type & ((1 << _TYPE_BITS) - 1))
            key_type >>= _TYPE_BITS
        if not ids or any(i not in _ADDRESS for i in ids):
            raise Unsupported(f"set {name} has a key field that is not an address")
        #: per key field: (offset in the key, length, address family)
        self.fields: list[tuple[int, int, int]] = []
        offset = 0
        for i in ids:
            _, length, family = _ADDRESS[i]
            self.fields.append((offset, length, family))
            offset += length  # addresses fill whole 32-bit registers: no padding
        if offset != key_len:
            raise Unsupported(f"set {name}: key of {key_len} bytes, fields of {offset}")
        self.types = [_ADDRESS[i][0] for i in ids]
        timeout = attrs.get(NFTA_SET_TIMEOUT)
        self.default_timeout = None if timeout is None else _BE64.unpack(timeout)[0] // 1000
        self.timeout_flag = bool(flags & NFT_SET_TIMEOUT) or timeout is not None
        desc = attrs.get(NFTA_SET_DESC, b"")
        size = _attr_map(desc, 0, len(desc)).get(NFTA_SET_DESC_SIZE)
        self.size = None if size is None else _BE32.unpack(size)[0]

    def key_bytes(self, key: list[Any]) -> bytes:
        """An element key (text values) as the kernel holds it; Unsupported
        unless each value is an address of its field's family."""
        if not isinstance(key, list) or len(key) != len(self.fields):
            raise Unsupported(f"key {key!r} does not fit the set")
        out = b""
        for value, (_, _, family) in zip(key, self.fields, strict=True):
            try:
                out += socket.inet_pton(family, value)
            except (OSError, TypeError, ValueError):
                raise Unsupported(f"{value!r} is not an address of the set's field") from None
        return out


def _attrs(data: bytes, start: int, end: int) -> Iterator[tuple[int, int, int]]:
    """(type, payload start, payload end) of each netlink attribute in data[start:end]."""
    pos = start
    while pos + 4 <= end:
        length, kind = _NLA.unpack_from(data, pos)
        if length < 4 or pos + length > end:
            raise OSError(errno.EPROTO, "nftables: a truncated netlink attribute")
        yield kind & NLA_TYPE_MASK, pos + 4, pos + length
        pos += (length + 3) & ~3


def _attr_map(data: bytes, start: int, end: int) -> dict[int, bytes]:
    return {kind: data[a:b] for kind, a, b in _attrs(data, start, end)}


def _rate(value: int) -> tuple[int, str]:
    """A byte rate in nft's largest whole unit (nft's get_rate)."""
    unit = 0
    while value and unit + 1 < len(_DATA_UNITS) and value % 1024 == 0:
        value //= 1024
        unit += 1
    return value, _DATA_UNITS[unit]


def _expression(data: bytes, start: int, end: int) -> tuple[str, dict[str, Any]]:
    """One element expression as nft's JSON names it: ("limit" | "counter", fields)."""
    attrs = _attr_map(data, start, end)
    name = attrs.get(NFTA_EXPR_NAME, b"").rstrip(b"\0").decode("ascii", "replace")
    raw = attrs.get(NFTA_EXPR_DATA, b"")
    fields = _attr_map(raw, 0, len(raw))
    if name == "counter":
        return name, {
            "packets": _BE64.unpack(fields.get(NFTA_COUNTER_PACKETS, bytes(8)))[0],
            "bytes": _BE64.unpack(fields.get(NFTA_COUNTER_BYTES, bytes(8)))[0],
        }
    if name == "limit":
        rate = _BE64.unpack(fields[NFTA_LIMIT_RATE])[0]
        per = _PER.get(_BE64.unpack(fields[NFTA_LIMIT_UNIT])[0])
        if per is None:
            raise Unsupported("a limit per an unnamed time unit")
        burst = _BE32.unpack(fields[NFTA_LIMIT_BURST])[0] if NFTA_LIMIT_BURST in fields else 0
        kind = _BE32.unpack(fields[NFTA_LIMIT_TYPE])[0] if NFTA_LIMIT_TYPE in fields else 0
        flags = _BE32.unpack(fields[NFTA_LIMIT_FLAGS])[0] if NFTA_LIMIT_FLAGS in fields else 0
        limit: dict[str, Any] = {"rate": rate, "burst": burst, "per": per}
        if flags & NFT_LIMIT_F_INV:
            limit["inv"] = True
        if kind == NFT_LIMIT_PKT_BYTES:
            limit["rate"], limit["rate_unit"] = _rate(rate)
            limit["burst"], limit["burst_unit"] = _rate(burst)
        elif kind != 0:
            raise Unsupported(f"a limit of type {kind}")
        return name, limit
    raise Unsupported(f"an element expression {name!r}")


class Reader:
    """A netlink socket in a namespace that reads sets, one caller at a time.

    Opened ahead (``NftSetsKind.track``, outside the pause) and kept for a
    migration, so that a read inside the pause makes no namespace switch:
    every blocking call hands the GIL over, and in the lab's pause (many
    threads, 2 busy cores) each such hand-over took up to milliseconds
    (measured: opening the socket 0.9-4.6 ms there, 0.03 ms on a quiet
    machine). For the same reason the socket blocks with a kernel timeout
    (``SO_RCVTIMEO``) rather than Python's, which polls before every call.
    """

    def __init__(self, netns: str | None) -> None:
        self.netns = netns
        self._lock = threading.Lock()
        self._buf = bytearray(1 << 16)
        self._seq = 0
        self._sock: socket.socket | None = None
        self._open()

    def _open(self) -> None:
        sock = socket_in(self.netns, socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        try:
            timeout = struct.pack("ll", int(TIMEOUT), 0)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeout)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeout)
            sock.bind((0, 0))
        except OSError:
            sock.close()
            raise
        self._sock = sock

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None

    def read(
        self, sets: list[tuple[str, str, str, int]], mine: Callable[[str], bool]
    ) -> dict[tuple[str, str, str], list[dict[str, Any]] | BaseException]:
        """See :func:`read_sets`."""
        out: dict[tuple[str, str, str], list[dict[str, Any]] | BaseException] = {}
        tables: dict[tuple[str, str], list[tuple[str, int]]] = {}
        for family, table, name, field in sets:
            tables.setdefault((family, table), []).append((name, field))
        with self._lock:
            for (family, table), members in tables.items():
                for (name, _), answer in zip(
                    members, self._read_table(family, table, members, mine), strict=True
                ):
                    out[(family, table, name)] = answer
        return {(f, t, n): out[(f, t, n)] for f, t, n, _ in sets}

    def _read_table(
        self,
        family: str,
        table: str,
        members: list[tuple[str, int]],
        mine: Callable[[str], bool],
    ) -> list[list[dict[str, Any]] | BaseException]:
        proto = FAMILIES.get(family)
        if proto is None:
            return [Unsupported(f"family {family}") for _ in members]
        try:
            # One dump of the table's set declarations: each set's layout and count.
            declared: dict[str, dict[int, bytes]] = {}
            for data, start, end in self._request(
                NFT_MSG_GETSET, NLM_F_DUMP, proto, [(NFTA_SET_TABLE, _text(table))]
            ):
                found = _attr_map(data, start, end)
                declared[found.get(NFTA_SET_NAME, b"").rstrip(b"\0").decode()] = found
        except OSError as exc:
            self._reset()
            return [exc for _ in members]
        answers: list[list[dict[str, Any]] | BaseException] = []
        for name, field in members:
            if name not in declared:
                answers.append(LookupError(f"set {family} {table} {name} not found"))
                continue
            try:
                answers.append(self._elements(proto, table, name, field, declared[name], mine))
            except Unsupported as exc:
                answers.append(exc)
            except OSError as exc:
                self._reset()
                answers.append(exc)
        return answers

    def _elements(
        self,
        proto: int,
        table: str,
        name: str,
        field: int,
        attrs: dict[int, bytes],
        mine: Callable[[str], bool],
    ) -> list[dict[str, Any]]:
        layout = SetLayout(attrs, name)
        count = attrs.get(NFTA_SET_COUNT)
        if field >= len(layout.fields) or (count is not None and _BE32.unpack(count)[0] == 0):
            return []  # empty: no dump (its cost is the set's hash buckets, not its elements)
        offset, length, address_family = layout.fields[field]
        key_len = layout.fields[-1][0] + layout.fields[-1][1]
        verdicts: dict[bytes, bool] = {}  # the field holds few distinct addresses

        def wanted(key: bytes) -> bool:
            return _mine(key, offset, length, address_family, verdicts, mine)

        listing = [(NFTA_SET_ELEM_LIST_TABLE, _text(table)), (NFTA_SET_ELEM_LIST_SET, _text(name))]
        for attempt in range(DUMP_ATTEMPTS):
            elements: list[dict[str, Any]] = []
            refused: Unsupported | None = None
            seen: set[bytes] = set()
            doubled = 0
            for data, start, end in self._request(NFT_MSG_GETSETELEM, NLM_F_DUMP, proto, listing):
                if refused is not None:
                    continue  # read the dump to its end: the socket stays usable
                try:
                    for kind, a, b in _attrs(data, start, end):
                        if kind != NFTA_SET_ELEM_LIST_ELEMENTS:
                            continue
                        for item, ea, eb in _attrs(data, a, b):
                            if item != NFTA_LIST_ELEM:
                                continue
                            key = _identity(data, ea, eb, key_len)
                            if key in seen:
                                doubled += 1
                                continue
                            seen.add(key)
                            if not _may_be_mine(data, ea, key_len, offset, length, verdicts):
                                continue
                            entry = _whole_element(data, ea, eb, layout, wanted)
                            if entry is not None:
                                elements.append(entry)
                except Unsupported as exc:
                    refused = exc
            if refused is not None:
                raise refused
            if not doubled:
                return elements
            # The table was rehashed (grown or shrunk) between two parts of the dump:
            # the kernel resumes a dump by skipping as many elements as it sent, in
            # the new order, so as many were missed as came twice (measured: 1,301
            # of 10,000 right after 33 deletions). Read it again.
            time.sleep(0.001 * (attempt + 1))
        raise Unsupported(f"set {table} {name} changed its hash table in {DUMP_ATTEMPTS} dumps")

    def lookup(
        self, family: str, table: str, name: str, keys: list[list[Any]]
    ) -> tuple[SetLayout, int | None, list[dict[str, Any]]]:
        """A set's layout, element count (None: the kernel does not say) and
        those of ``keys`` it holds, as list_set gives them: one ``GETSET`` and
        one ``GETSETELEM`` per key, all in one send. A lookup costs the same in
        a set of any size, where a dump walks every hash bucket and element
        (the destination's import inside the pause needs only these).
        LookupError: no such set; Unsupported: read it with libnftables."""
        proto = FAMILIES.get(family)
        if proto is None:
            raise Unsupported(f"family {family}")
        with self._lock:
            try:
                return self._lookup(proto, table, name, keys)
            except OSError as exc:
                self._reset()
                if exc.errno == errno.ENOENT:
                    raise LookupError(f"set {family} {table} {name} not found") from None
                raise

    def _lookup(
        self, proto: int, table: str, name: str, keys: list[list[Any]]
    ) -> tuple[SetLayout, int | None, list[dict[str, Any]]]:
        names = [(NFTA_SET_TABLE, _text(table)), (NFTA_SET_NAME, _text(name))]
        answers = [_attr_map(*m) for m in self._request(NFT_MSG_GETSET, 0, proto, names)]
        if not answers:
            raise OSError(errno.EPROTO, f"nftables: no answer about set {table} {name}")
        layout = SetLayout(answers[0], name)
        count = answers[0].get(NFTA_SET_COUNT)
        wanted = [layout.key_bytes(k) for k in keys]
        found: list[dict[str, Any]] = []
        if not wanted:
            return layout, None if count is None else _BE32.unpack(count)[0], found
        requests = []
        for raw in wanted:
            key = _NLA.pack(4 + len(raw), NFTA_DATA_VALUE) + raw  # addresses: 4-byte aligned
            elem = _NLA.pack(4 + len(key), NFTA_SET_ELEM_KEY | NLA_F_NESTED) + key
            item = _NLA.pack(4 + len(elem), NFTA_LIST_ELEM | NLA_F_NESTED) + elem
            requests.append(
                [
                    (NFTA_SET_ELEM_LIST_TABLE, _text(table)),
                    (NFTA_SET_ELEM_LIST_SET, _text(name)),
                    (NFTA_SET_ELEM_LIST_ELEMENTS | NLA_F_NESTED, item),
                ]
            )
        for data, start, end in self._batch(NFT_MSG_GETSETELEM, proto, requests):
            for kind, a, b in _attrs(data, start, end):
                if kind != NFTA_SET_ELEM_LIST_ELEMENTS:
                    continue
                for item_kind, ea, eb in _attrs(data, a, b):
                    if item_kind == NFTA_LIST_ELEM:
                        entry = _whole_element(data, ea, eb, layout)
                        if entry is not None:
                            found.append(entry)
        return layout, None if count is None else _BE32.unpack(count)[0], found

    def _batch(
        self, msg_type: int, family: int, requests: list[list[tuple[int, bytes]]]
    ) -> Iterator[tuple[bytes, int, int]]:
        """Send one (non-dump) request per item in one send; yield each answer
        message found; an answer of ENOENT (no such element) is skipped."""
        if self._sock is None:
            self._open()
        sock = self._sock
        assert sock is not None
        first = self._seq + 1
        out = b""
        for attrs in requests:
            self._seq += 1
            body = _NFGENMSG.pack(family, 0, 0) + _payload(attrs)
            kind = (NFNL_SUBSYS_NFTABLES << 8) | msg_type
            out += _NLMSGHDR.pack(16 + len(body), kind, NLM_F_REQUEST, self._seq, 0) + body
        pending = set(range(first, self._seq + 1))
        _send(sock, out)
        while pending:
            n = _recv_into(sock, self._buf)
            data = bytes(memoryview(self._buf)[:n])
            for pos, end, mtype, mseq in _messages(data, n):
                if mseq in pending:
                    pending.discard(mseq)
                    if mtype == NLMSG_ERROR:
                        code = -struct.unpack_from("=i", data, pos + 16)[0]
                        if code and code != errno.ENOENT:
                            raise OSError(code, f"nftables: {errno.errorcode.get(code, code)}")
                    else:
                        yield data, pos + 16 + _NFGENMSG.size, end

    def _reset(self) -> None:
        """A fresh socket after a failure (an answer may be left half read, and the
        kernel runs one dump per socket at a time); none if that fails too."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        try:
            self._open()
        except OSError:
            pass  # the next request says so

    def _request(
        self, msg_type: int, flags: int, family: int, attrs: list[tuple[int, bytes]]
    ) -> Iterator[tuple[bytes, int, int]]:
        """Send one request; yield (data, payload start, end) of each answer
        message (after its nfgenmsg) until the answer is complete."""
        if self._sock is None:
            self._open()
        sock = self._sock
        assert sock is not None
        body = _NFGENMSG.pack(family, 0, 0) + _payload(attrs)
        self._seq += 1
        seq = self._seq
        kind = (NFNL_SUBSYS_NFTABLES << 8) | msg_type
        _send(sock, _NLMSGHDR.pack(16 + len(body), kind, NLM_F_REQUEST | flags, seq, 0) + body)
        dump = bool(flags & NLM_F_DUMP)
        while True:
            n = _recv_into(sock, self._buf)
            data = bytes(memoryview(self._buf)[:n])
            for pos, end, mtype, mseq in _messages(data, n):
                if mseq == seq:
                    if mtype == NLMSG_ERROR:
                        code = -struct.unpack_from("=i", data, pos + 16)[0]
                        if code:
                            raise OSError(code, f"nftables: {errno.errorcode.get(code, code)}")
                        return
                    if mtype == NLMSG_DONE:
                        return
                    yield data, pos + 16 + _NFGENMSG.size, end
                    if not dump:
                        return


def _messages(data: bytes, n: int) -> Iterator[tuple[int, int, int, int]]:
    """(start, end, type, sequence) of each netlink message in ``data[:n]``."""
    pos = 0
    while pos + 16 <= n:
        length, mtype, _flags, mseq, _pid = _NLMSGHDR.unpack_from(data, pos)
        if length < 16 or pos + length > n:
            raise OSError(errno.EPROTO, "nftables: a truncated netlink message")
        yield pos, pos + length, mtype, mseq
        pos = (pos + length + 3) & ~3


# The kernel answers a netlink request within the send (and the next part of a
# dump within the receive): these calls never wait for anything. Made through
# libc with the GIL held (ctypes.PyDLL), a read inside the pause runs to its
# end once its thread has the GIL, instead of queueing for it again after
# every call behind the stage's own thread (in the lab's pause the four
# sets' read took 2.2-3.6 ms so, 0.4 ms alone). MSG_DONTWAIT: should an
# answer not be there yet, the usual call (which releases the GIL) waits.
try:
    _LIBC: Any = ctypes.PyDLL(None, use_errno=True)
    _LIBC.send.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_int]
    _LIBC.send.restype = ctypes.c_ssize_t
    _LIBC.recv.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    _LIBC.recv.restype = ctypes.c_ssize_t
except (OSError, AttributeError):  # no libc symbols: Python's calls
    _LIBC = None
MSG_DONTWAIT = 0x40


def _send(sock: socket.socket, data: bytes) -> None:
    if _LIBC is not None:
        n = _LIBC.send(sock.fileno(), data, len(data), MSG_DONTWAIT)
        if n == len(data):
            return
        code = ctypes.get_errno()
        if n >= 0 or code not in (errno.EAGAIN, errno.EINTR):
            raise OSError(code or errno.EIO, f"nftables: send: {os.strerror(code)}")
    sock.send(data)


def _recv_into(sock: socket.socket, buf: bytearray) -> int:
    if _LIBC is not None:
        view = (ctypes.c_char * len(buf)).from_buffer(buf)
        n = int(_LIBC.recv(sock.fileno(), view, len(buf), MSG_DONTWAIT))
        if n >= 0:
            return n
        code = ctypes.get_errno()
        if code not in (errno.EAGAIN, errno.EINTR):
            raise OSError(code, f"nftables: recv: {os.strerror(code)}")
    return sock.recv_into(buf)


def _text(value: str) -> bytes:
    return value.encode() + b"\0"


def _payload(attrs: list[tuple[int, bytes]]) -> bytes:
    return b"".join(_NLA.pack(4 + len(v), k) + v + b"\0" * (-len(v) % 4) for k, v in attrs)


def read_sets(
    netns: str | None,
    sets: list[tuple[str, str, str, int]],
    mine: Callable[[str], bool],
    reader: Reader | None = None,
) -> dict[tuple[str, str, str], list[dict[str, Any]] | BaseException]:
    """The elements of each ``(family, table, set, field)`` whose key has, at
    position ``field``, an address ``mine(text)`` accepts, as
    :func:`vmm_state.kinds._nft.list_set` gives them; through ``reader``, or a
    socket opened for this call.

    Per set: its elements, or the exception that stopped its reading there
    (LookupError: no such set; :class:`Unsupported`: list it with libnftables;
    OSError: the kernel refused). An empty set is answered from its element
    count, without a dump.
    """
    if reader is not None:
        return reader.read(sets, mine)
    own = Reader(netns)
    try:
        return own.read(sets, mine)
    finally:
        own.close()


def _identity(data: bytes, start: int, end: int, key_len: int) -> bytes:
    """What tells an element from another in a dump: its key (the kernel's first
    attribute), else all of it."""
    if start + 8 + key_len <= end:
        _, atype = _NLA.unpack_from(data, start)
        vlen, vtype = _NLA.unpack_from(data, start + 4)
        if (
            atype & NLA_TYPE_MASK == NFTA_SET_ELEM_KEY
            and vtype & NLA_TYPE_MASK == NFTA_DATA_VALUE
            and vlen - 4 == key_len
        ):
            return data[start + 8 : start + 8 + key_len]
    return data[start:end]


def _may_be_mine(
    data: bytes, start: int, key_len: int, offset: int, length: int, verdicts: dict[bytes, bool]
) -> bool:
    """False only for an element whose key (the kernel's first attribute) names
    an address already known not to be the VM's: most elements of a shared set
    are skipped at that, without decoding. A set of 1,000 (10,000) elements, 1%
    of them the VM's: 3.0 -> 1.7 ms (53 -> 13 ms); libnftables' listing of it
    7.5 ms (134 ms). Minimum times, on the shared machine at load 5-7."""
    if start + 12 > len(data):
        return True
    alen, atype = _NLA.unpack_from(data, start)
    vlen, vtype = _NLA.unpack_from(data, start + 4)
    if atype & NLA_TYPE_MASK != NFTA_SET_ELEM_KEY or vtype & NLA_TYPE_MASK != NFTA_DATA_VALUE:
        return True
    if vlen - 4 != key_len or alen < vlen + 4:
        return True  # decoded in full, and refused there
    value = data[start + 8 + offset : start + 8 + offset + length]
    return verdicts.get(value, True)


def _mine(
    key: bytes,  # the VM's address at the field? (verdicts: per distinct address)
    offset: int,
    length: int,
    address_family: int,
    verdicts: dict[bytes, bool],
    mine: Callable[[str], bool],
) -> bool:
    value = key[offset : offset + length]
    verdict = verdicts.get(value)
    if verdict is None:
        verdict = verdicts[value] = mine(socket.inet_ntop(address_family, value))
    return verdict


def _whole_element(
    data: bytes,
    start: int,
    end: int,
    layout: SetLayout,
    wanted: Callable[[bytes], bool] = lambda _key: True,
) -> dict[str, Any] | None:
    """One element as list_set gives it (None if ``wanted`` refuses its key)."""
    attrs = {kind: (a, b) for kind, a, b in _attrs(data, start, end)}
    where = attrs.get(NFTA_SET_ELEM_KEY)
    if where is None:
        raise Unsupported("an element without a key")
    key = b""
    for kind, a, b in _attrs(data, *where):
        if kind == NFTA_DATA_VALUE:
            key = data[a:b]
    if len(key) != layout.fields[-1][0] + layout.fields[-1][1]:
        raise Unsupported(f"an element key of {len(key)} bytes")
    if not wanted(key):
        return None
    for odd in (NFTA_SET_ELEM_DATA, NFTA_SET_ELEM_OBJREF, NFTA_SET_ELEM_KEY_END):
        if odd in attrs:
            raise Unsupported("an element with data, an object or a range")
    if NFTA_SET_ELEM_FLAGS in attrs:
        a, b = attrs[NFTA_SET_ELEM_FLAGS]
        if _BE32.unpack(data[a:b])[0]:
            raise Unsupported("a flagged element (interval end or catch-all)")
    entry: dict[str, Any] = {
        "key": [socket.inet_ntop(fam, key[o : o + n]) for o, n, fam in layout.fields],
    }
    if NFTA_SET_ELEM_TIMEOUT in attrs:
        a, b = attrs[NFTA_SET_ELEM_TIMEOUT]
        entry["timeout"] = _BE64.unpack(data[a:b])[0] // 1000
    else:
        entry["timeout"] = layout.default_timeout if layout.timeout_flag else None
    expires = None
    if NFTA_SET_ELEM_EXPIRATION in attrs:
        a, b = attrs[NFTA_SET_ELEM_EXPIRATION]
        ms = _BE64.unpack(data[a:b])[0]
        expires = ms // 1000 if ms else None
    if entry["timeout"] is not None and expires is None:
        expires = 0  # as _nft.list_set: nft leaves out an expiry under one second
    entry["expires"] = expires
    if NFTA_SET_ELEM_EXPR in attrs:
        name, value_ = _expression(data, *attrs[NFTA_SET_ELEM_EXPR])
        entry[name] = value_
    if NFTA_SET_ELEM_EXPRESSIONS in attrs:
        for kind, a, b in _attrs(data, *attrs[NFTA_SET_ELEM_EXPRESSIONS]):
            if kind == NFTA_LIST_ELEM:
                name, value_ = _expression(data, a, b)
                entry[name] = value_
    return entry


def lookup(
    netns: str | None,
    family: str,
    table: str,
    name: str,
    keys: list[list[Any]],
    reader: Reader | None = None,
) -> tuple[SetLayout, int | None, list[dict[str, Any]]]:
    """:meth:`Reader.lookup` through ``reader``, or a socket opened for this call."""
    if reader is not None:
        return reader.lookup(family, table, name, keys)
    own = Reader(netns)
    try:
        return own.lookup(family, table, name, keys)
    finally:
        own.close()
