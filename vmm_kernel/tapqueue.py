"""Read the frames a tap queued for a reader that stopped reading it.

A paused guest's hypervisor stops reading its tap, and the kernel keeps
queueing the frames the bridge sends there (up to the tap's ``txqueuelen``).
At a live migration's final copy those frames are lost with the old QEMU:
measured on the libvirt lab, 20-40 ms of frames per migration, everything
that reached the source between the pause and the in-flight tunnel. Nothing
in netlink or tc takes frames back out of a tap's queue; only a read(2) on
the tap's file does, and that file is the hypervisor's.

``pidfd_getfd(2)`` (Linux 5.6) copies another process's descriptor into
ours: the same open file, so the same queue. Reading it while the hypervisor
is paused takes the queued frames in order, and nothing else changes for the
hypervisor (the file's flags are shared, so we never change them: each read
follows a poll that said a frame is there). It needs root (ptrace access to
the reader); a Yama ``ptrace_scope`` of 3 forbids it, and then the frames
stay where they are, as before.

Finding the reader: ``/proc/<pid>/fdinfo/<fd>`` of a tun file names its
device (``iff:``); device names are per network namespace, so the borrowed
file's ``TUNGETDEVNETNS`` is compared with the namespace asked for. The scan
of every process's descriptors took 12 ms for 1,424 descriptors on this
machine, which is why :func:`find_readers` is meant to run ahead of the
pause and :func:`still_reads` (one readlink and one fdinfo read, about
20 us) to check the result at the pause.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import fcntl
import os
import select
import struct

#: pidfd_getfd(2): the same number on every architecture (the syscall table was unified).
SYS_PIDFD_GETFD = 438
TUNGETIFF = 0x800454D2
TUNGETVNETHDRSZ = 0x800454D7
TUNGETDEVNETNS = 0x54E3
IFF_VNET_HDR = 0x4000
#: struct virtio_net_hdr without num_buffers: what a packet socket's PACKET_VNET_HDR takes.
VNET_HDR_LEN = 10
TUN_DEVICE = "/dev/net/tun"
#: A frame never exceeds this (64 KiB GSO frame plus the header).
READ_SIZE = 65536 + 64

_libc = ctypes.CDLL(None, use_errno=True)


class TapQueueError(OSError):
    """A tap's reader cannot be borrowed (gone, or not permitted)."""


def netns_inode(path: str) -> int:
    """The inode that identifies a network namespace (``/run/netns/<name>`` or a
    ``/proc/.../ns/net`` link)."""
    return os.stat(path).st_ino


def _tun_name(pid: int, fd: int) -> str | None:
    """The device a tun descriptor of ``pid`` is attached to, or None."""
    try:
        if os.readlink(f"/proc/{pid}/fd/{fd}") != TUN_DEVICE:
            return None
        with open(f"/proc/{pid}/fdinfo/{fd}", encoding="ascii", errors="replace") as info:
            for line in info:
                if line.startswith("iff:"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        return None
    return None


def still_reads(pid: int, fd: int, port: str) -> bool:
    """Whether descriptor ``fd`` of ``pid`` is still a tun file of ``port``."""
    return _tun_name(pid, fd) == port


def find_readers(port: str) -> list[tuple[int, int]]:
    """Every (pid, fd) holding a tun file attached to a device named ``port``, in
    any namespace (:class:`BorrowedTap` checks which one)."""
    found: list[tuple[int, int]] = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for name in fds:
            if _tun_name(pid, int(name)) == port:
                found.append((pid, int(name)))
    return found


def _pidfd_getfd(pid: int, fd: int) -> int:
    pidfd = os.pidfd_open(pid)
    try:
        got = _libc.syscall(SYS_PIDFD_GETFD, pidfd, fd, 0)
        if got < 0:
            err = ctypes.get_errno()
            raise TapQueueError(err, f"cannot borrow fd {fd} of pid {pid}: {os.strerror(err)}")
        return int(got)
    finally:
        os.close(pidfd)


@dataclasses.dataclass
class BorrowedTap:
    """Our copy of a tap reader's descriptor: the same queue, read while it is paused."""

    fd: int
    port: str
    #: Bytes of virtio-net header in front of each frame read (0: none).
    vnet_hdr: int
    #: The reader's process (the hypervisor) it was borrowed from.
    pid: int = 0

    @classmethod
    def borrow(cls, pid: int, fd: int, port: str, netns_ino: int) -> BorrowedTap:
        """Copy ``pid``'s ``fd``; raises TapQueueError unless it is ``port``'s tun
        file in the namespace whose inode is ``netns_ino``."""
        own = _pidfd_getfd(pid, fd)
        try:
            raw = fcntl.ioctl(own, TUNGETIFF, bytes(40))
            name = raw[:16].split(b"\0", 1)[0].decode()
            flags = struct.unpack_from("H", raw, 16)[0]
            ns = fcntl.ioctl(own, TUNGETDEVNETNS)
            try:
                same = os.fstat(ns).st_ino == netns_ino
            finally:
                os.close(ns)
            if name != port or not same:
                raise TapQueueError(f"fd {fd} of pid {pid} is {name}, elsewhere")
            hdr = 0
            if flags & IFF_VNET_HDR:
                hdr = struct.unpack("i", fcntl.ioctl(own, TUNGETVNETHDRSZ, bytes(4)))[0]
            return cls(own, port, hdr, pid)
        except BaseException:
            os.close(own)
            raise

    def read_queued(self, limit: int = 4096) -> list[tuple[bytes, bytes]]:
        """The frames queued now, oldest first, as (virtio-net header, frame);
        the header is :data:`VNET_HDR_LEN` bytes (zeros when the tap has none)."""
        out: list[tuple[bytes, bytes]] = []
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        while len(out) < limit and poller.poll(0):
            try:
                data = os.read(self.fd, READ_SIZE)
            except (BlockingIOError, InterruptedError):
                break
            if not data:
                break
            if self.vnet_hdr:
                out.append((data[:VNET_HDR_LEN], data[self.vnet_hdr :]))
            else:
                out.append((bytes(VNET_HDR_LEN), data))
        return out

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)
