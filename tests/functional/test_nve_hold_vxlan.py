"""The Linux NVE's hold, fed over VXLAN: what a peer sends for an expected MAC
whose port does not exist yet is forwarded by the hold's nftables map on the
VXLAN port's ingress into the stalled queue, and reaches the port in order,
before later frames, once it joins the bridge.

Two namespaces: the destination host (the NVE) and a peer host with a VXLAN
device of the same VNI that sends numbered frames, linked by a veth pair.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import select
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from vmm_linux.netns import socket_in
from vmm_linux.nve import LinuxNve

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (namespaces, nft)")

MAC = "52:54:00:00:65:0a"
OTHER = "52:54:00:00:65:0b"
SO_SNDBUFFORCE = 32
SO_RCVBUFFORCE = 33
ETHERTYPE = b"\x88\xb5"


def _sh(ns: str, script: str) -> str:
    return subprocess.run(
        ["ip", "netns", "exec", ns, "sh", "-ec", script], check=True, capture_output=True, text=True
    ).stdout


@contextlib.contextmanager
def _site(**kwargs: object) -> Iterator[tuple[str, str, LinuxNve]]:
    """(destination namespace, peer namespace, the destination's NVE)."""
    tag = f"{os.getpid() % 10000}{secrets.token_hex(2)}"
    dst, peer = f"vmmhvd{tag}", f"vmmhvp{tag}"
    nves: list[LinuxNve] = []
    try:
        for ns in (dst, peer):
            subprocess.run(["ip", "netns", "add", ns], check=True)
        subprocess.run(
            [
                "ip",
                "link",
                "add",
                "hv0",
                "netns",
                dst,
                "type",
                "veth",
                "peer",
                "hv1",
                "netns",
                peer,
            ],
            check=True,
        )
        _sh(dst, "ip link set lo up; ip addr add 10.231.0.2/24 dev hv0; ip link set hv0 up")
        _sh(
            peer,
            "ip link set lo up; ip addr add 10.231.0.1/24 dev hv1; ip link set hv1 up\n"
            "ip link add vxp type vxlan id 100 dstport 4789 local 10.231.0.1 nolearning\n"
            "bridge fdb append 00:00:00:00:00:00 dev vxp dst 10.231.0.2\n"
            "sysctl -qw net.ipv6.conf.vxp.disable_ipv6=1; ip link set vxp up",
        )
        nve = LinuxNve(dst, "10.231.0.2", **kwargs)  # type: ignore[arg-type]
        nves.append(nve)
        nve.ensure_vn(100)
        yield dst, peer, nve
    finally:
        for nve in nves:
            nve.close()
        for ns in (dst, peer):
            subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)


def _send(peer: str, mac: str, seqs: range) -> None:
    """Numbered frames for ``mac``, sent over the peer's VXLAN device."""
    sock = socket_in(peer, socket.AF_PACKET, socket.SOCK_RAW, 0)
    with sock:
        sock.bind(("vxp", 0))
        sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, 16 * 1024 * 1024)
        dst = bytes.fromhex(mac.replace(":", ""))
        for i in seqs:
            frame = dst + bytes.fromhex("020000000009") + ETHERTYPE + i.to_bytes(4, "big")
            sock.send(frame + bytes(64 - len(frame)))
            if i % 50 == 49:
                time.sleep(0.002)  # the underlay veth's backlog is 1000 frames


def _plug(ns: str) -> socket.socket:
    """The VM's port (tap-x; the VM reads vm-x), joined to the bridge."""
    _sh(ns, "ip link add tap-x type veth peer name vm-x; ip link set vm-x up; ip link set tap-x up")
    recv = socket_in(ns, socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
    recv.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 16 * 1024 * 1024)
    recv.bind(("vm-x", 0))
    recv.settimeout(2.0)  # a loaded machine may take a while to release
    _sh(ns, "ip link set tap-x master br-100")
    return recv


def _read(recv: socket.socket, mac: str) -> list[int]:
    seqs = []
    want = bytes.fromhex(mac.replace(":", ""))
    with contextlib.suppress(TimeoutError):
        while True:
            frame = recv.recv(2048)
            if frame[12:14] == ETHERTYPE and frame[:6] == want:
                seqs.append(int.from_bytes(frame[14:18], "big"))
    return seqs


def _map_elements(ns: str) -> list[object]:
    out = _sh(ns, "nft -j list map netdev vmm_hold held_100")
    for item in json.loads(out)["nftables"]:
        if "map" in item:
            return list(item["map"].get("elem", []))
    raise AssertionError(out)


def _wait(predicate: object, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.02)
    return False


def test_frames_over_vxlan_are_held_and_released_in_order_before_later_ones() -> None:
    with _site() as (dst, peer, nve):
        nve.expect(100, MAC, "tap-x")
        assert nve.holding(100, MAC)
        assert len(_map_elements(dst)) == 1  # the MAC -> its hold's device
        _send(peer, MAC, range(200))
        _send(peer, OTHER, range(20))  # not expected here: not held
        time.sleep(0.2)
        recv = _plug(dst)
        with recv:
            _send(peer, MAC, range(200, 300))  # after the resume: behind the held ones
            seqs = _read(recv, MAC)
        assert seqs == list(range(300))  # every frame, once, in order
        report = nve.hold_report(100, MAC)
        # the 200 sent before the port joined; under load the release may still run
        # when the next ones come, and they queue behind it (in order, above)
        assert report is not None and 200 <= report["held"] <= 300, report
        assert report["dropped"] == 0
        assert _wait(lambda: nve.hold_report(100, MAC)["outcome"] == "released")  # type: ignore[index]
        assert _wait(lambda: not _map_elements(dst))  # the map lets the bridge take over


def test_hold_devices_send_nothing_of_their_own_and_drain_on_one_cpu() -> None:
    """No IPv6 link-local address (no DAD, RS or MLD frame enters the queue) and
    receive packet steering pinned to one CPU (two reordered the drain)."""
    with _site() as (dst, _peer, nve):
        nve.expect(100, MAC, "tap-x")
        hold = nve._holds[(100, MAC)]
        for dev in (hold.stall, hold.recv):
            assert _sh(dst, f"ip -6 addr show dev {dev}").strip() == ""
            assert _sh(dst, f"cat /proc/sys/net/ipv6/conf/{dev}/addr_gen_mode").strip() == "1"
        assert int(_sh(dst, f"cat /sys/class/net/{hold.recv}/queues/rx-0/rps_cpus"), 16) == 1
        qdiscs = _sh(dst, f"tc qdisc show dev {hold.stall}")
        assert "tbf 1: root" in qdiscs and "rate 8bit" in qdiscs
        assert "pfifo 10: parent 1:1 limit 4096p" in qdiscs


def test_a_restarted_driver_removes_what_a_killed_one_left() -> None:
    """A driver with the same hold tag (the agent restarted) empties the VN's
    hold map and deletes the hold devices of its predecessor."""
    with _site(hold_tag="ab12") as (dst, _peer, nve):
        nve.expect(100, MAC, "tap-x")
        hold = nve._holds[(100, MAC)]
        assert hold.stall.startswith("vmhab12")
        assert _wait(lambda: 100 in nve._spares)  # the next spare, built in the background
        gone = {hold.stall_idx, hold.recv_idx, nve._spares[100].stall_idx}
        successor = LinuxNve(dst, "10.231.0.2", hold_tag="ab12", hold=True)
        try:
            successor.ensure_vn(100)
            assert not _map_elements(dst)
            # by index: the successor names its own spare as the first one was named
            indexes = {
                int(line.split(":")[0]) for line in _sh(dst, "ip -o link show").split("\n") if line
            }
            assert not gone & indexes
        finally:
            successor.close()


def test_a_port_that_appears_before_joining_is_deepened_before_the_release() -> None:
    """A new txqueuelen deactivates the device for a moment (frames sent then
    are dropped; done during the drain it reordered 3 of 10 releases of 600
    frames), so the watcher deepens the port when it appears, off the bridge."""
    with _site() as (dst, peer, nve):
        nve.expect(100, MAC, "tap-x")
        _send(peer, MAC, range(100))
        _sh(dst, "ip link add tap-x type veth peer name vm-x; ip link set vm-x up")
        _sh(dst, "ip link set tap-x up")

        def txqlen() -> int:
            return int(_sh(dst, "cat /sys/class/net/tap-x/tx_queue_len"))

        assert _wait(lambda: txqlen() == nve.hold_limits.queue_frames(nve.mtu))
        assert nve.holding(100, MAC)  # deepened, not released: it is not on the bridge
        recv = socket_in(dst, socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
        with recv:
            recv.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 16 * 1024 * 1024)
            recv.bind(("vm-x", 0))
            recv.settimeout(2.0)
            _sh(dst, "ip link set tap-x master br-100")
            assert _read(recv, MAC) == list(range(100))


ARM_AND_WAIT = """
import sys, time
from vmm_linux.nve import LinuxNve
nve = LinuxNve(sys.argv[1], "10.231.0.2", hold_tag="dead", hold=True)
nve.ensure_vn(100)
nve.expect(100, sys.argv[2], "tap-x")
print("armed", flush=True)
time.sleep(600)
"""


def test_the_ha_peer_that_takes_over_ends_a_killed_peers_hold() -> None:
    """An HA pair shares the host: "a" ran PREPARE (armed its hold), then was
    killed with kill -9 before the resume; "b", which finishes the migration,
    never armed one. Without b ending a's map element, what arrives over VXLAN
    for the VM went into a's stalled queue for good (the guest answered no peer)."""
    with _site(hold_tag="bb01", hold=True) as (dst, peer, b):
        a = subprocess.Popen(
            [sys.executable, "-c", ARM_AND_WAIT, dst, MAC],
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        )
        try:
            assert a.stdout is not None
            assert select.select([a.stdout], [], [], 30)[0], "the peer never armed its hold"
            assert a.stdout.readline().strip() == "armed"
            assert len(_map_elements(dst)) == 1  # a's MAC -> a's hold device
        finally:
            a.kill()
            a.wait(10)
            if a.stdout is not None:
                a.stdout.close()
        recv = _plug(dst)
        with recv:
            b.plug(100, MAC, "tap-x")
            assert not _map_elements(dst)
            _send(peer, MAC, range(50))
            assert _read(recv, MAC) == list(range(50))
