"""Netlink attributes (type-length-value, 4-byte aligned), packed and read by hand.

Shared by the raw netlink clients that skip pyroute2 for speed (each module
says why: the conntrack codec, the Linux NVE's hold set-up). A level of
attributes is read into a dict by type, payloads as memoryviews of the
message (no copies).
"""

from __future__ import annotations

import struct

NLA_TYPE_MASK = 0x3FFF
NLA_F_NESTED = 0x8000
_NLATTR = struct.Struct("=HH")


def pack(kind: int, payload: bytes) -> bytes:
    """One attribute, padded to 4 bytes."""
    length = _NLATTR.size + len(payload)
    return _NLATTR.pack(length, kind) + payload + b"\0" * (-length & 3)


def parse(
    data: bytes | memoryview, start: int = 0, end: int | None = None
) -> dict[int, memoryview]:
    """type -> payload of each attribute of one level in ``data[start:end]``."""
    view = memoryview(data)
    end = len(view) if end is None else end
    out: dict[int, memoryview] = {}
    pos = start
    while pos + 4 <= end:
        length, kind = _NLATTR.unpack_from(view, pos)
        if length < 4:
            break
        out[kind & NLA_TYPE_MASK] = view[pos + 4 : pos + length]
        pos += (length + 3) & ~3
    return out
