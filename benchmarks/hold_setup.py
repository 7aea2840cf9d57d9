"""What the Linux NVE's hold costs to set up, alone and 20 at once (issue 16).

In a namespace of its own with one VN: the time of one spare hold's build,
of one ``expect`` that arms a spare, of 20 ``expect`` at once (an evacuation:
one spare per VN, so most build their hold then), and the CPU the hold
watcher spends while 20 holds wait. Prints the load average with them: this
machine's two cores are shared, so compare figures taken at similar load.

Run as root:  .venv/bin/python benchmarks/hold_setup.py [--runs 5]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import os
import secrets
import socket
import statistics
import subprocess
import time

from pyroute2 import NetNS

from vmm_linux.netns import socket_in
from vmm_linux.nve import LinuxNve

MAC = "52:54:00:00:66:0a"
ETHERTYPE = b"\x88\xb5"


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 1)


def _wait_spare(nve: LinuxNve, vni: int) -> None:
    deadline = time.monotonic() + 20
    while vni not in nve._spares and time.monotonic() < deadline:
        time.sleep(0.02)


def measure(nve: LinuxNve, runs: int) -> dict[str, float]:
    _wait_spare(nve, 100)
    builds = []
    for _ in range(runs):
        start = time.perf_counter()
        hold = nve._build_hold(100)
        builds.append(time.perf_counter() - start)
        nve._discard(hold)
    arms = []
    for i in range(runs):
        _wait_spare(nve, 100)
        mac = f"52:54:00:00:01:{i:02x}"
        start = time.perf_counter()
        nve.expect(100, mac, f"tap-a{i}")
        arms.append(time.perf_counter() - start)
        nve.unplug(100, mac)
    _wait_spare(nve, 100)

    def one(i: int) -> float:
        start = time.perf_counter()
        nve.expect(100, f"52:54:00:00:02:{i:02x}", f"tap-b{i}")
        return time.perf_counter() - start

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        concurrent_arms = list(pool.map(one, range(20)))
    wall = time.perf_counter() - start
    time.sleep(1.0)  # the spare builders settle
    cpu, since = time.process_time(), time.monotonic()
    time.sleep(3.0)
    watcher = (time.process_time() - cpu) / (time.monotonic() - since)
    for i in range(20):
        nve.unplug(100, f"52:54:00:00:02:{i:02x}")
    return {
        "build_ms": _ms(statistics.median(builds)),
        "arm_ms": _ms(statistics.median(arms)),
        "arm20_median_ms": _ms(statistics.median(concurrent_arms)),
        "arm20_wall_ms": _ms(wall),
        "waiting20_cpu_pct": round(100.0 * watcher, 1),
    }


def _sh(ns: str, script: str) -> None:
    subprocess.run(["ip", "netns", "exec", ns, "sh", "-ec", script], check=True)


def release_once(ns: str, nve: LinuxNve, frames: int) -> tuple[float, float, bool]:
    """(ms to the first held frame, ms to the last, all in order) after the join."""
    _wait_spare(nve, 100)
    nve.expect(100, MAC, "tap-r")
    dst = bytes.fromhex(MAC.replace(":", ""))
    with socket_in(ns, socket.AF_PACKET, socket.SOCK_RAW, 0) as sock:
        sock.bind((nve._holds[(100, MAC)].stall, 0))
        sock.setsockopt(socket.SOL_SOCKET, 32, 16 << 20)  # SO_SNDBUFFORCE
        for i in range(frames):
            frame = dst + bytes.fromhex("020000000001") + ETHERTYPE + i.to_bytes(4, "big")
            sock.send(frame + bytes(100 - len(frame)))
    _sh(ns, "ip link add tap-r type veth peer name vm-r; ip link set vm-r up; ip link set tap-r up")
    ipr = NetNS(ns)
    recv = socket_in(ns, socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
    try:
        recv.setsockopt(socket.SOL_SOCKET, 33, 16 << 20)  # SO_RCVBUFFORCE
        recv.bind(("vm-r", 0))
        recv.settimeout(2.0)
        time.sleep(0.3)  # the port is there (and deepened) before it joins
        bridge, port = (ipr.link_lookup(ifname=name)[0] for name in ("br-100", "tap-r"))
        joined = time.monotonic()
        ipr.link("set", index=port, master=bridge)
        seqs: list[int] = []
        first = last = joined
        with contextlib.suppress(TimeoutError):
            while len(seqs) < frames:
                frame = recv.recv(2048)
                if frame[12:14] == ETHERTYPE and frame[:6] == dst:
                    last = time.monotonic()
                    first = first if seqs else last
                    seqs.append(int.from_bytes(frame[14:18], "big"))
        ok = seqs == list(range(frames))
        if not ok:
            out = next((i for i, seq in enumerate(seqs) if seq != i), len(seqs))
            print(f"  release: {len(seqs)} of {frames} frames, first out of place at {out}")
        return _ms(first - joined), _ms(last - joined), ok
    finally:
        recv.close()
        nve.unplug(100, MAC)
        _sh(ns, "ip link del tap-r")
        ipr.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    ns = f"vmmhs{os.getpid() % 10000}{secrets.token_hex(2)}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    nve = None
    try:
        subprocess.run(["ip", "netns", "exec", ns, "sh", "-ec", "ip link set lo up"], check=True)
        nve = LinuxNve(ns, "127.0.0.1")
        nve.ensure_vn(100)
        load = open("/proc/loadavg").read().split()[:3]
        figures = measure(nve, args.runs)
        releases = [release_once(ns, nve, 600) for _ in range(args.runs)]
        load += open("/proc/loadavg").read().split()[:3]
        print(
            f"one spare build {figures['build_ms']} ms, one arm (spare ready) "
            f"{figures['arm_ms']} ms (medians of {args.runs})"
        )
        print(
            f"20 expect at once: median {figures['arm20_median_ms']} ms, "
            f"all done after {figures['arm20_wall_ms']} ms"
        )
        print(f"hold watcher with 20 holds waiting: {figures['waiting20_cpu_pct']} % of a CPU")
        print(
            "release of 600 held frames, from the join: first "
            f"{statistics.median(r[0] for r in releases)} ms, last "
            f"{statistics.median(r[1] for r in releases)} ms (medians of {args.runs}); "
            f"all in order: {all(r[2] for r in releases)}"
        )
        print(f"load average before {' '.join(load[:3])}, after {' '.join(load[3:])}")
    finally:
        if nve is not None:
            nve.close()
        subprocess.run(["ip", "netns", "del", ns], check=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
