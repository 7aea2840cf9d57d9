"""The libvirt benchmark's view of held frames on their way in: which probes sent
while the guest was paused entered its destination tap, and when
(vmm_lab.libvirt.migrate.TapArrivals, held_lateness_ms).

Real kernel parts: a veth named like a guest's tap in a namespace of the test's
own; frames transmitted through it are what the bridge sends to QEMU.
"""

from __future__ import annotations

import socket
import subprocess
import time

from vmm_kernel.netns import socket_in
from vmm_lab.libvirt.migrate import TapArrivals, held_lateness_ms
from vmm_lab.linux import probe

GUEST = "52:54:00:ab:00:01"
OTHER = "52:54:00:ab:00:02"


def _frame(dst: str, seq: int, sent_ns: int) -> bytes:
    payload = probe.encode("s1", seq, sent_ns)
    eth = bytes.fromhex(dst.replace(":", "")) + bytes.fromhex("020000000001") + b"\x88\xb5"
    return eth + payload.ljust(46, b"\0")


def test_probes_into_the_tap_are_seen_with_their_send_times(netns: str) -> None:
    subprocess.run(
        ["ip", "-n", netns, "link", "add", "vnet9", "type", "veth", "peer", "name", "vnet9p"],
        check=True,
    )
    for dev in ("vnet9", "vnet9p"):
        subprocess.run(["ip", "-n", netns, "link", "set", dev, "up"], check=True)
    watch = TapArrivals(netns, GUEST, "vnet9")
    try:
        out = socket_in(netns, socket.AF_PACKET, socket.SOCK_RAW)
        with out:
            out.bind(("vnet9", 0))
            base = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
            for seq in range(5):
                out.send(_frame(GUEST, seq, base + seq))
            out.send(_frame(OTHER, 99, base))  # another MAC: not the guest's
        deadline = time.monotonic() + 5
        while len(watch.seen) < 5 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        seen = watch.close()
    assert sorted(seen) == [("s1", seq) for seq in range(5)]
    assert all(sent == base + seq and at >= base for (_, seq), (sent, at) in seen.items())


def test_lateness_counts_only_what_was_sent_while_paused() -> None:
    seen = {
        ("s", 1): (100, 150),  # before the pause
        ("s", 2): (1_000, 1_200),  # held, in before the resume at 5 ms
        ("s", 3): (4_000_000, 7_000_000),  # held, in 2 ms after the resume
        ("s", 4): (6_000_000, 6_100_000),  # after the resume
    }
    assert held_lateness_ms(seen, 1_000, 5_000_000) == (2, 2.0)
    assert held_lateness_ms({("s", 2): (1_000, 1_200)}, 1_000, 5_000_000) == (1, 0.0)
    assert held_lateness_ms({}, 1_000, 5_000_000) == (0, None)
