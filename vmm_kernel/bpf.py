"""Classic BPF filters for packet sockets: attaching one, and the MAC filter.

A packet socket on a busy device wakes its reader for every frame; a filter
attached to it runs in the kernel, so a thread that waits for a few frames
(the NVE's RARP responder, the libvirt lab's RARP and tap watches) costs
nothing until one comes. Classic BPF because ``SO_ATTACH_FILTER`` takes it
from any process without a compiler or the bpf(2) syscall's privileges;
four instructions compare a MAC. Python's socket module has no name for the
option, hence the constant.
"""

from __future__ import annotations

import ctypes
import socket
import struct
from collections.abc import Sequence

#: setsockopt(SOL_SOCKET, SO_ATTACH_FILTER, struct sock_fprog) on Linux.
SO_ATTACH_FILTER = 26
#: Where a MAC sits in an Ethernet frame.
DESTINATION, SOURCE = 0, 6

Program = list[tuple[int, int, int, int]]


def mac_program(mac: bytes, offset: int, ethertype: int | None = None) -> Program:
    """Accept frames with ``mac`` at ``offset`` (DESTINATION or SOURCE) and, if
    given, EtherType ``ethertype``; drop the others."""
    ld_h, ld_w, jeq, ret = 0x28, 0x20, 0x15, 0x06
    program: Program = [] if ethertype is None else [(ld_h, 0, 0, 12), (jeq, 0, 5, ethertype)]
    return [
        *program,
        (ld_w, 0, 0, offset),  # the MAC's first four bytes
        (jeq, 0, 3, int.from_bytes(mac[:4], "big")),
        (ld_h, 0, 0, offset + 4),  # and the last two
        (jeq, 0, 1, int.from_bytes(mac[4:], "big")),
        (ret, 0, 0, 0xFFFF),
        (ret, 0, 0, 0),
    ]


def attach(sock: socket.socket, program: Sequence[tuple[int, int, int, int]]) -> None:
    """Attach ``program`` to ``sock`` (frames queued before this still reach it)."""
    code = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *i) for i in program))
    fprog = struct.pack("HL", len(program), ctypes.addressof(code))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)
