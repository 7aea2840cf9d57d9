"""Step into a named network namespace, open sockets there, run tools there.

A socket keeps the namespace it was created in, and setns(2) for the
network namespace changes only the calling thread, so a thread can step
into a namespace, open a socket and step back while other threads go on.
Python 3.11 has no os.setns, hence the small ctypes call. Tools (iproute2's
``bridge``, ``conntrack``) run under ``ip netns exec``.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import socket
import subprocess
import threading
from collections.abc import Iterator
from typing import Any

CLONE_NEWNET = 0x40000000
NETNS_RUN_DIR = "/run/netns"

_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns failed: {os.strerror(err)}")


@contextlib.contextmanager
def entered(netns: str | None) -> Iterator[None]:
    """Run the body with this thread in ``netns`` (None: stay where we are)."""
    if not netns:
        yield
        return
    path = os.path.join(NETNS_RUN_DIR, netns)
    try:
        target = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise OSError(f"network namespace {netns!r} does not exist ({path})") from None
    own = os.open(
        f"/proc/self/task/{threading.get_native_id()}/ns/net",
        os.O_RDONLY | os.O_CLOEXEC,
    )
    try:
        _setns(target)
        try:
            yield
        finally:
            _setns(own)
    finally:
        os.close(target)
        os.close(own)


def socket_in(netns: str | None, family: int, type_: int, proto: int = 0) -> socket.socket:
    """A socket created inside ``netns``."""
    with entered(netns):
        return socket.socket(family, type_, proto)


class RecvBuffer:
    """One buffer a socket's loop reads every message into.

    ``sock.recv(n)`` allocates n bytes per call and shrinks them to what
    arrived: the NVE agent's netlink loop alone allocated 2.7 GB over 100
    lab migrations that way (memray, native traces), churn the allocator
    partly keeps as resident memory. Reading into one buffer allocates only
    what arrived.
    """

    def __init__(self, size: int) -> None:
        self._buf = bytearray(size)
        self._view = memoryview(self._buf)

    def recv(self, sock: socket.socket) -> bytes:
        """The next message (b"" at end of stream); timeouts and errors as sock.recv."""
        n = sock.recv_into(self._buf)
        return bytes(self._view[:n])


#: Bytes a pyroute2 handle reads at a time. The kernel makes a dump message
#: at most 32 KiB (it sizes them by the reader's buffer, capped there) and a
#: single reply far less; asyncio's datagram transport reads 256 KiB each time.
NETLINK_READ = 64 * 1024


def lean_iproute(ipr: Any) -> Any:
    """A pyroute2 handle that keeps nothing it was not asked for
    (:func:`drop_unclaimed`) and reads :data:`NETLINK_READ` bytes at a time.

    Each read allocates its full size and keeps what arrived: 256 KiB for a
    few hundred bytes, many times per migration, churn that glibc keeps as
    resident memory (the soak's heap grew 1.5 MB "free" over 300 lab
    migrations at 256 KiB, 0.4 MB at 64 KiB). Call it in the thread that
    uses the handle (pyroute2 keeps its transport per thread); another
    pyroute2 is returned unchanged.
    """
    drop_unclaimed(ipr)
    local = getattr(getattr(ipr, "asyncore", None), "local", None)
    transport = getattr(local, "transport", None)
    if transport is not None and isinstance(getattr(transport, "max_size", None), int):
        transport.max_size = NETLINK_READ
    return ipr


def drop_unclaimed(ipr: Any) -> Any:
    """Make a pyroute2 handle drop the netlink messages no request of it waits for.

    pyroute2 0.9 ends a ``get`` request (``link_lookup(ifname=...)``,
    ``get_links(index)``, ``link("get")``) at the kernel's reply, but asks for
    an ACK too; the ACK comes after the request freed its sequence number, so
    the handle files it with the multicast events, a queue that only
    ``get()`` on a handle bound to groups reads. Our handles listen to no
    group and never read it: every lookup left a message there for good
    (300 after 100 lookups), each a 36-byte remnant of a 256 KiB receive
    that pins its place in the allocator's heap. That is about 14 per lab
    migration, most of the soak's RSS growth (benchmarks/soak.py).

    Call it in the thread that uses the handle (pyroute2 keeps a queue per
    thread); a pyroute2 without that queue is returned unchanged.
    """
    asyncore = getattr(ipr, "asyncore", None)
    queue = getattr(getattr(asyncore, "local", None), "msg_queue", None)
    queues = getattr(queue, "queues", None)
    put = getattr(queue, "put_nowait", None)
    if queue is None or not isinstance(queues, dict) or put is None:
        return ipr

    def put_claimed(tag: int, message: bytes) -> None:
        if tag and tag in queues:
            put(tag, message)

    queue.put_nowait = put_claimed
    return ipr


def namespace_inode(netns: str | None) -> int:
    """The inode of ``netns`` (0: ours; -1: gone): a namespace deleted and made
    again under its name is another namespace."""
    if not netns:
        return 0
    try:
        return os.stat(os.path.join(NETNS_RUN_DIR, netns)).st_ino
    except OSError:
        return -1


#: How iproute2, conntrack and nft word the errno they got from the kernel.
_MESSAGES = {
    "no such file or directory": errno.ENOENT,
    "no such device": errno.ENODEV,
    "file exists": errno.EEXIST,
    "operation not supported": errno.EOPNOTSUPP,
    "not supported": errno.EOPNOTSUPP,
    "unknown device type": errno.EOPNOTSUPP,
    "invalid argument": errno.EINVAL,
    "cannot allocate memory": errno.ENOMEM,
    "no space left on device": errno.ENOSPC,
    "too many open files in system": errno.ENFILE,
    "no buffer space available": errno.ENOBUFS,
    "argument list too long": errno.E2BIG,
    "operation not permitted": errno.EPERM,
    "permission denied": errno.EACCES,
    "device or resource busy": errno.EBUSY,
    "numerical result out of range": errno.ERANGE,
}


def errno_of(message: str) -> int:
    """Our best reading of the errno behind a tool's error message (EINVAL if none)."""
    low = message.lower()
    for text, code in _MESSAGES.items():
        if text in low:
            return code
    return errno.EINVAL


class CommandFailed(OSError):
    """A tool answered non-zero; ``errno`` is our best reading of its message."""

    def __init__(self, argv: list[str], stderr: str) -> None:
        super().__init__(errno_of(stderr), f"`{' '.join(argv)}`: {stderr.strip()}")
        self.argv = argv
        self.stderr = stderr


def run(netns: str | None, *args: str, input_: str | None = None, check: bool = True) -> str:
    """Run a tool inside ``netns`` (None: here); its stdout, or CommandFailed."""
    argv = ["ip", "netns", "exec", netns, *args] if netns else list(args)
    proc = subprocess.run(argv, capture_output=True, text=True, input=input_)
    if check and proc.returncode != 0:
        raise CommandFailed(list(args), proc.stderr or f"exit status {proc.returncode}")
    return proc.stdout
