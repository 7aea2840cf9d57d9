"""What a paused reader's tap queued goes on, in order, through the in-flight port.

Real kernel parts: a tap in a namespace of the test's own (its reader is
this test process, standing in for a paused QEMU: it simply does not read),
a veth pair whose one end stands for the VN's in-flight port and whose other
end the test captures on.
``vmm_linux.leftovers`` borrows the tap's descriptor with pidfd_getfd(2), as it
does QEMU's on the libvirt lab.
"""

from __future__ import annotations

import fcntl
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest

from vmm_kernel import netns as netns_mod
from vmm_kernel import tapqueue
from vmm_linux import leftovers
from vmm_linux.leftovers import Leftovers

TUNSETIFF = 0x400454CA
TUNSETVNETHDRSZ = 0x400454D8
IFF_TAP, IFF_NO_PI, IFF_VNET_HDR = 0x0002, 0x1000, 0x4000
#: As QEMU opens a virtio NIC's tap under libvirt: a 12-byte virtio-net header (mergeable buffers).
HDR = 12
MAC = "02:00:00:aa:00:01"
PEER = "02:00:00:aa:00:02"


def _ip(netns: str, *args: str) -> None:
    subprocess.run(["ip", "-n", netns, *args], check=True)


def _frame(dst: str, seq: int) -> bytes:
    payload = b"VMMLEFT" + seq.to_bytes(4, "big")
    return (
        bytes.fromhex(dst.replace(":", ""))
        + bytes.fromhex(PEER.replace(":", ""))
        + (b"\x88\xb5" + payload.ljust(46, b"\0"))
    )


def _wire(netns: str, tap: str, inflight: str, capture: str) -> tuple[socket.socket, socket.socket]:
    """The veth pair ``inflight``/``capture`` (the in-flight port, and where the test
    sees what left by it), up with ``tap``; (a socket whose frames the bridge would
    send into ``tap``, one capturing on ``capture``)."""
    _ip(netns, "link", "add", inflight, "type", "veth", "peer", "name", capture)
    for dev in (tap, inflight, capture):
        _ip(netns, "link", "set", dev, "up")
    send = netns_mod.socket_in(netns, socket.AF_PACKET, socket.SOCK_RAW)
    send.bind((tap, 0))
    cap = netns_mod.socket_in(netns, socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x88B5))
    cap.bind((capture, 0))
    cap.settimeout(0.5)
    return send, cap


@pytest.fixture
def lab(netns: str) -> Iterator[dict[str, object]]:
    """A tap ``tapl0`` read (not) by this process, and ``vil0``/``vcap0`` veths."""
    # no IPv6 on them: the kernel's own MLD reports would queue in the tap too
    subprocess.run(
        ["ip", "netns", "exec", netns, "sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1"],
        check=True,
    )
    with netns_mod.entered(netns):
        tap_fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
        flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR
        fcntl.ioctl(tap_fd, TUNSETIFF, struct.pack("16sH", b"tapl0", flags))
        fcntl.ioctl(tap_fd, TUNSETVNETHDRSZ, struct.pack("i", HDR))
    send, cap = _wire(netns, "tapl0", "vil0", "vcap0")
    service = Leftovers(netns)
    try:
        yield {
            "netns": netns,
            "tap": tap_fd,
            "send": send,
            "cap": cap,
            "service": service,
        }
    finally:
        service.close()
        send.close()
        cap.close()
        os.close(tap_fd)


def _captured(cap: socket.socket) -> list[int]:
    seqs = []
    while True:
        try:
            data = cap.recv(2048)
        except TimeoutError:
            return seqs
        if data[14:21] == b"VMMLEFT":
            seqs.append(int.from_bytes(data[21:25], "big"))


def _located(service: Leftovers, port: str) -> None:
    service.locate(port)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        lookup = service._readers[port]
        if lookup.done():
            assert lookup.result(), f"no reader of {port} found"
            return
        time.sleep(0.01)
    raise AssertionError("the lookup did not finish")


def test_queued_frames_go_on_in_order_and_arrivals_during_the_switch_too(lab) -> None:
    send, cap, service = lab["send"], lab["cap"], lab["service"]
    _located(service, "tapl0")
    for seq in range(20):  # queued while the reader is "paused"
        send.send(_frame(MAC, seq))
    send.send(_frame("ff:ff:ff:ff:ff:ff", 999))  # flooded everywhere already: stays out
    before = sys.getswitchinterval()
    with service.forwarding(MAC, "tapl0", "vil0") as report:
        # the forwarding thread waits for the GIL less than a stream's frame spacing
        assert sys.getswitchinterval() == pytest.approx(leftovers.SWITCH_INTERVAL_S)
        time.sleep(0.05)
        for seq in range(20, 30):  # still reach the tap until the bridge entry moves
            send.send(_frame(MAC, seq))
        time.sleep(0.05)
    assert sys.getswitchinterval() == before
    assert report.found
    assert report.forwarded == 30
    assert report.skipped == 1
    assert _captured(cap) == list(range(30))
    # the tap's queue is empty: nothing is left for the old reader
    os.set_blocking(lab["tap"], False)
    with pytest.raises(BlockingIOError):
        os.read(lab["tap"], 2048)


def test_a_port_nobody_located_keeps_its_queue(lab) -> None:
    send, cap, service = lab["send"], lab["cap"], lab["service"]
    for seq in range(3):
        send.send(_frame(MAC, seq))
    with service.forwarding(MAC, "tapl0", "vil0") as report:
        pass
    assert not report.found
    assert _captured(cap) == []
    os.set_blocking(lab["tap"], False)
    assert len(os.read(lab["tap"], 2048)) == HDR + 60  # still queued for its reader


def test_a_tap_of_the_same_name_in_another_namespace_is_not_borrowed(lab, prefix) -> None:
    other = f"{prefix}x"
    subprocess.run(["ip", "netns", "add", other], check=True)
    try:
        service = Leftovers(other)  # the NVE's namespace is another one
        try:
            _located(service, "tapl0")  # the name is found, in the wrong namespace
            lab["send"].send(_frame(MAC, 1))
            with service.forwarding(MAC, "tapl0", "vil0") as report:
                pass
            assert not report.found
        finally:
            service.close()
    finally:
        subprocess.run(["ip", "netns", "delete", other], check=False)
    os.set_blocking(lab["tap"], False)
    assert len(os.read(lab["tap"], 2048)) == HDR + 60


def test_borrowing_takes_the_taps_virtio_net_header_size(lab) -> None:
    pid, fd = os.getpid(), lab["tap"]
    ino = tapqueue.netns_inode(os.path.join(netns_mod.NETNS_RUN_DIR, lab["service"].netns))
    tap = tapqueue.BorrowedTap.borrow(pid, fd, "tapl0", ino)
    try:
        assert tap.vnet_hdr == HDR
        assert tapqueue.still_reads(pid, fd, "tapl0")
        assert not tapqueue.still_reads(pid, fd, "tapl1")
    finally:
        tap.close()


def test_locating_again_checks_the_reader_found_instead_of_scanning(lab, monkeypatch) -> None:
    """A migration's first iteration locates again; while the reader found at the
    domain's start still holds the tap, no scan of every process competes with
    QEMU's first pass. A reader that let go is looked for again."""
    service = lab["service"]
    scans: list[str] = []
    scan = tapqueue.find_readers

    def counted(port: str) -> list[tuple[int, int]]:
        scans.append(port)
        return scan(port)

    monkeypatch.setattr(tapqueue, "find_readers", counted)
    _located(service, "tapl0")
    service.locate("tapl0")
    assert scans == ["tapl0"]
    ((pid, fd),) = service._readers["tapl0"].result()
    assert (pid, fd) == (os.getpid(), lab["tap"])
    moved = os.dup(lab["tap"])  # the reader's descriptor changes (QEMU restarted)
    os.close(lab["tap"])
    try:
        service.locate("tapl0")
        deadline = time.monotonic() + 10
        while len(scans) < 2 or not service._readers["tapl0"].done():
            assert time.monotonic() < deadline, "not looked for again"
            time.sleep(0.01)
        assert service._readers["tapl0"].result() == [(os.getpid(), moved)]
    finally:
        os.dup2(moved, lab["tap"])
        os.close(moved)


def test_locating_after_close_does_nothing(monkeypatch) -> None:
    """A lookup that close() cancelled is no reader to check: the event thread that
    locates a tap as the agent stops must not fail on it."""
    gate = threading.Event()
    monkeypatch.setattr(tapqueue, "find_readers", lambda port: (gate.wait(5), [])[1])
    service = Leftovers(None)
    try:
        service.locate("tap-a")  # runs, blocked
        service.locate("tap-b")  # queued behind it
        service.close()  # cancels tap-b's
        assert service._readers["tap-b"].cancelled()
        service.locate("tap-b")
    finally:
        gate.set()


# -- follow: from the pause, forward to the destination's hold; give back on resume ----


def _queued_seqs(tap_fd: int) -> list[int]:
    """The probe numbers the tap holds for its reader now, oldest first."""
    os.set_blocking(tap_fd, False)
    seqs = []
    while True:
        try:
            data = os.read(tap_fd, 2048)
        except BlockingIOError:
            return seqs
        seqs.append(int.from_bytes(data[HDR + 21 : HDR + 25], "big"))


def test_a_followed_tap_goes_on_in_order_from_the_pause_and_switchover_carries_on(lab) -> None:
    send, cap, service = lab["send"], lab["cap"], lab["service"]
    _located(service, "tapl0")
    for seq in range(5):  # queued before the agent heard of the pause
        send.send(_frame(MAC, seq))
    before = sys.getswitchinterval()
    assert service.follow(MAC, "tapl0", "vil0")
    assert service.follow(MAC, "tapl0", "vil0")  # the pause seen again: the same follow
    assert sys.getswitchinterval() == pytest.approx(leftovers.SWITCH_INTERVAL_S)
    for seq in range(5, 10):
        send.send(_frame(MAC, seq))
    assert _captured(cap) == list(range(10))  # at once, in order, before SWITCHOVER
    with service.forwarding(MAC, "tapl0", "vil0") as report:  # SWITCHOVER carries on with it
        assert service.follow(MAC, "tapl0", "vil0")  # and a pause seen now starts no reader
        send.send(_frame(MAC, 10))
        time.sleep(0.05)
    assert report.followed and report.found
    assert report.early == 10 and report.forwarded == 11
    assert report.note()["early"] == 10
    assert _captured(cap) == [10]
    assert _queued_seqs(lab["tap"]) == []
    assert not service.following("tapl0")
    assert sys.getswitchinterval() == before
    service.unfollow("tapl0", drain=False)  # the hold timer's end: nothing to give back
    assert _queued_seqs(lab["tap"]) == []


def test_a_vm_that_resumes_here_gets_back_what_the_follow_sent_on(lab) -> None:
    send, cap, service = lab["send"], lab["cap"], lab["service"]
    _located(service, "tapl0")
    assert service.follow(MAC, "tapl0", "vil0")
    for seq in range(3):
        send.send(_frame(MAC, seq))
    send.send(_frame("ff:ff:ff:ff:ff:ff", 999))  # flooded everywhere already: not sent on
    assert _captured(cap) == [0, 1, 2]  # to the destination's hold
    with service._lock:
        session = service._following["tapl0"]
    service.unfollow("tapl0", drain=False)  # the migration failed: the VM runs here again
    send.send(_frame(MAC, 3))
    assert _captured(cap) == []  # nothing more goes on
    # every frame the follow read, the broadcast too, in order, for its reader
    assert _queued_seqs(lab["tap"]) == [0, 1, 2, 999, 3]
    assert session.report.given_back == 4 and session.report.give_back_dropped == 0
    assert not service.following("tapl0")


def test_giving_back_more_than_the_tap_holds_counts_what_it_dropped(lab) -> None:
    send, service = lab["send"], lab["service"]
    _located(service, "tapl0")
    assert service.follow(MAC, "tapl0", "vil0")
    qlen = int(subprocess.run(
        ["ip", "netns", "exec", lab["netns"], "cat", "/sys/class/net/tapl0/tx_queue_len"],
        capture_output=True, text=True, check=True,
    ).stdout)  # fmt: skip
    total = qlen + 200
    with service._lock:
        session = service._following["tapl0"]
    deadline = time.monotonic() + 20
    for seq in range(total):  # at the follow's pace: the tap itself holds qlen at most
        send.send(_frame(MAC, seq))
        while session.report.forwarded < seq + 1 - 50:
            assert time.monotonic() < deadline, "the follow did not send everything on"
            time.sleep(0.001)
    while session.report.forwarded < total:
        assert time.monotonic() < deadline, "the follow did not send everything on"
        time.sleep(0.01)
    service.unfollow("tapl0", drain=False)  # its reader (this test) does not read: the tap fills
    report = session.report
    assert report.given_back + report.give_back_dropped == total
    queued = _queued_seqs(lab["tap"])
    assert len(queued) <= qlen and report.given_back == len(queued), (queued, report)
    assert queued == sorted(queued) and report.give_back_dropped >= 200


def test_a_follow_ends_when_the_host_stops(lab) -> None:
    service = lab["service"]
    _located(service, "tapl0")
    before = sys.getswitchinterval()
    assert service.follow(MAC, "tapl0", "vil0")
    service.close()
    assert not service.following("tapl0")
    assert sys.getswitchinterval() == before


def test_a_tap_whose_reader_is_unknown_is_not_followed(lab) -> None:
    assert not lab["service"].follow(MAC, "tapl0", "vil0")
    assert not lab["service"].following("tapl0")


def test_a_pause_seen_again_during_switchover_starts_no_second_reader(lab) -> None:
    send, cap, service = lab["send"], lab["cap"], lab["service"]
    _located(service, "tapl0")
    for seq in range(3):
        send.send(_frame(MAC, seq))
    with service.forwarding(MAC, "tapl0", "vil0") as report:
        assert service.following("tapl0")
        assert service.follow(MAC, "tapl0", "vil0")  # the same session
    assert report.forwarded == 3 and not report.followed
    assert not service.following("tapl0")
    assert _captured(cap) == [0, 1, 2]


def test_a_followed_tap_whose_reader_exits_sends_its_queue_on(netns: str) -> None:
    """QEMU exits (the migration completed, or the VM was destroyed) before
    SWITCHOVER took the tap: the follow ends, closing the last descriptor of
    the tap (which then goes away)."""
    subprocess.run(
        ["ip", "netns", "exec", netns, "sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1"],
        check=True,
    )
    reader = subprocess.Popen(
        [
            "ip", "netns", "exec", netns, sys.executable, "-c",
            "import fcntl, os, struct, sys\n"
            "fd = os.open('/dev/net/tun', os.O_RDWR)\n"
            f"fcntl.ioctl(fd, {TUNSETIFF}, struct.pack('16sH', b'tapx0', {IFF_TAP | IFF_NO_PI}))\n"
            "print('ready', flush=True)\n"
            "sys.stdin.read()\n",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    service = Leftovers(netns)
    try:
        assert reader.stdout is not None and reader.stdout.readline().strip() == "ready"
        send, cap = _wire(netns, "tapx0", "vil1", "vcap1")
        with send, cap:
            _located(service, "tapx0")
            assert service.follow(MAC, "tapx0", "vil1")
            for seq in range(3):
                send.send(_frame(MAC, seq))
            assert _captured(cap) == [0, 1, 2]
            reader.stdin.close()  # type: ignore[union-attr]
            assert reader.wait(10) == 0
            deadline = time.monotonic() + 5
            while service.following("tapx0") and time.monotonic() < deadline:
                time.sleep(0.01)
            assert not service.following("tapx0")
        deadline = time.monotonic() + 5  # our copy was the tap's last descriptor
        while "tapx0" in _links(netns) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert "tapx0" not in _links(netns)
    finally:
        service.close()
        if reader.poll() is None:
            reader.kill()
            reader.wait()


def _links(netns: str) -> str:
    return subprocess.run(
        ["ip", "-n", netns, "-o", "link", "show"], capture_output=True, text=True, check=True
    ).stdout
