"""The Linux NVE's hold: frames for an incoming VM whose port does not exist
yet wait in a bounded per-VM queue and reach the port, in order, once it joins
the bridge; frames beyond the bound are dropped and counted.

Frames are put straight into the hold's queue (what the tc redirect on the
VXLAN port does for frames that arrive over VXLAN), so no second host is
needed.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import subprocess
import time
from collections.abc import Iterator

import pytest

from vmm_linux.netns import socket_in
from vmm_linux.nve import LinuxNve

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (namespaces, tc)")

MAC = "52:54:00:00:64:0a"
SO_SNDBUFFORCE = 32
SO_RCVBUFFORCE = 33


def _sh(ns: str, script: str) -> None:
    subprocess.run(["ip", "netns", "exec", ns, "sh", "-ec", script], check=True)


@contextlib.contextmanager
def _host(**limits: int) -> Iterator[tuple[str, LinuxNve]]:
    ns = f"vmmhold{os.getpid() % 10000}{secrets.token_hex(2)}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    nve = None
    try:
        _sh(ns, "ip link set lo up; ip addr add 127.0.0.2/8 dev lo")
        nve = LinuxNve(ns, "127.0.0.2", **limits)  # type: ignore[arg-type]
        nve.ensure_vn(100)
        yield ns, nve
    finally:
        if nve is not None:
            nve.close()
        subprocess.run(["ip", "netns", "del", ns], check=False)


def _fill(ns: str, dev: str, count: int) -> None:
    sock = socket_in(ns, socket.AF_PACKET, socket.SOCK_RAW, 0)
    with sock:
        sock.bind((dev, 0))
        sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, 16 * 1024 * 1024)
        dst = bytes.fromhex(MAC.replace(":", ""))
        for i in range(count):
            frame = dst + bytes.fromhex("020000000001") + b"\x88\xb5" + i.to_bytes(4, "big")
            with contextlib.suppress(OSError):  # ENOBUFS: the queue dropped it (full)
                sock.send(frame + bytes(64 - len(frame)))


def _plug_and_receive(ns: str) -> list[int]:
    """Create the VM's port, join it to the bridge, return the seqs the VM got."""
    _sh(ns, "ip link add tap-x type veth peer name vm-x; ip link set vm-x up; ip link set tap-x up")
    recv = socket_in(ns, socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
    with recv:
        recv.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 16 * 1024 * 1024)
        recv.bind(("vm-x", 0))
        recv.settimeout(2.0)  # a loaded machine may take a while to release
        _sh(ns, "ip link set tap-x master br-100")
        seqs = []
        with contextlib.suppress(TimeoutError):
            while True:
                frame = recv.recv(2048)
                if frame[12:14] == b"\x88\xb5" and frame[:6] == bytes.fromhex(MAC.replace(":", "")):
                    seqs.append(int.from_bytes(frame[14:18], "big"))
    return seqs


@pytest.mark.parametrize("spare", [False, True], ids=["built-at-prepare", "spare"])
def test_held_frames_reach_the_port_in_order_when_it_joins_the_bridge(spare: bool) -> None:
    """With the devices built at PREPARE or ahead of it (a spare, whose bucket
    had time to refill: it must be spent again, or a frame slips by)."""
    with _host() as (ns, nve):
        if spare:
            deadline = time.monotonic() + 20
            while 100 not in nve._spares and time.monotonic() < deadline:
                time.sleep(0.05)
            assert 100 in nve._spares
            time.sleep(1.5)  # the bucket refills 1 B/s meanwhile
        else:
            nve._spares.clear()  # (a spare not built yet: PREPARE builds the devices)
        nve.expect(100, MAC, "tap-x")
        assert nve.holding(100, MAC)
        stall = nve._holds[(100, MAC)].stall
        _fill(ns, stall, 300)
        time.sleep(0.1)
        seqs = _plug_and_receive(ns)
        assert seqs == list(range(300))  # all of them, in order, once
        report = nve.hold_report(100, MAC)
        assert report is not None and report["held"] == 300 and report["dropped"] == 0
        assert not nve.holding(100, MAC)


def test_frames_beyond_the_bound_are_dropped_and_counted() -> None:
    with _host(hold_frames=50) as (ns, nve):
        nve.expect(100, MAC, "tap-x")
        _fill(ns, nve._holds[(100, MAC)].stall, 80)
        time.sleep(0.1)
        seqs = _plug_and_receive(ns)
        assert seqs == list(range(50))  # the first 50 wait, the rest never queue
        report = nve.hold_report(100, MAC)
        assert report is not None and report["held"] == 50 and report["dropped"] == 30


def test_an_existing_port_holds_by_itself_and_nothing_is_set_up() -> None:
    with _host() as (ns, nve):
        _sh(ns, "ip link add tap-x type veth peer name vm-x")
        nve.expect(100, MAC, "tap-x")
        assert not nve.holding(100, MAC) and nve.hold_report(100, MAC) is None
        # ... but its queue (a tap's, while QEMU does not read it) is made as deep as a hold
        out = subprocess.run(
            ["ip", "netns", "exec", ns, "cat", "/sys/class/net/tap-x/tx_queue_len"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert int(out) == nve.hold_limits.queue_frames(nve.mtu) == 4096


def test_a_tap_nobody_reads_queues_in_order_up_to_its_txqueuelen() -> None:
    """What libvirt's destination tap does while the incoming guest is paused
    (QEMU does not read it): it keeps up to txqueuelen frames, in order, and
    counts the rest in tx_dropped. The NVE relies on it and deepens it."""
    import fcntl
    import struct

    from vmm_linux.netns import entered

    tunsetiff, iff_tap, iff_no_pi, iff_vnet_hdr = 0x400454CA, 0x0002, 0x1000, 0x4000
    with _host() as (ns, _nve):
        with entered(ns):
            fd = os.open("/dev/net/tun", os.O_RDWR)
        try:
            flags = iff_tap | iff_no_pi | iff_vnet_hdr  # as QEMU opens it
            fcntl.ioctl(fd, tunsetiff, struct.pack("16sH", b"tap-x", flags))
            _sh(ns, "ip link set tap-x master br-100 up; ip link set tap-x txqueuelen 100")
            _sh(ns, f"bridge fdb replace {MAC} dev tap-x master static")
            _sh(ns, "ip link add s1 type veth peer name s2; ip link set s2 up")
            _sh(ns, "ip link set s1 master br-100 up")
            time.sleep(0.3)  # both ports forwarding (carrier comes up asynchronously)
            _fill(ns, "s2", 150)
            time.sleep(0.2)
            seqs = []
            os.set_blocking(fd, False)
            with contextlib.suppress(BlockingIOError):
                while True:
                    frame = os.read(fd, 4096)[10:]  # after the virtio-net header
                    if frame[12:14] == b"\x88\xb5":
                        seqs.append(int.from_bytes(frame[14:18], "big"))
            assert seqs == list(range(len(seqs))) and 90 <= len(seqs) <= 100
            dropped = subprocess.run(
                ["ip", "netns", "exec", ns, "cat", "/sys/class/net/tap-x/statistics/tx_dropped"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            assert int(dropped) >= 50
        finally:
            os.close(fd)
