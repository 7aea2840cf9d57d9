"""The announcer against the real kernel: do the gateway's tables follow?

Topology (two network namespaces, created per run, always deleted)::

    [gw]  vg 10.77.0.1/24 fd77::1/64  ==veth==  vh  (port of br0)  [host]

The announcer sends on ``br0`` in ``host`` (as on a hypervisor: the VN's
bridge), the frames flood to ``gw``, and the tests read gw's neighbour
table with ``ip -j neigh`` and count what arrived with an AF_PACKET socket.

gw is set up as a gateway: ``arp_accept=1`` (take unsolicited ARP into the
table), IPv6 forwarding on (RFC 9131: only routers create entries from
untracked NAs) and ``accept_untracked_na=1`` (Linux reads the
per-interface value, so it is set on ``vg`` too).

Needs root; skipped otherwise.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import Any, Self

import pytest

from vmm_linux.announce import Announcer
from vmm_linux.netns import socket_in
from vmm_orchestrator import frames
from vmm_orchestrator.model import Vif

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
    pytest.mark.skipif(shutil.which("ip") is None, reason="needs iproute2's ip"),
]

VM_MAC = "52:54:00:77:00:10"
OLD_MAC = "02:00:00:00:00:99"
GW_IP = "10.77.0.1"
ETH_P_ALL = 0x0003
UNTRACKED_NA = "/proc/sys/net/ipv6/conf/all/accept_untracked_na"


def sh(*args: str, check: bool = True) -> str:
    res = subprocess.run(args, check=False, capture_output=True, text=True, timeout=10)
    if check and res.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({res.returncode}): {res.stderr.strip()}")
    return res.stdout


def sysctl(ns: str, key: str, value: str) -> None:
    path = "/proc/sys/" + key.replace(".", "/")
    sh("ip", "netns", "exec", ns, "sh", "-c", f"echo {value} > {path}")


class Topo:
    def __init__(self, prefix: str) -> None:
        self.gw = f"{prefix}-gw"
        self.host = f"{prefix}-host"
        self.gw_mac = ""
        self.has_untracked_na = os.path.exists(UNTRACKED_NA)

    def build(self) -> None:
        gw, host = self.gw, self.host
        sh("ip", "netns", "add", gw)
        sh("ip", "netns", "add", host)
        sh("ip", "-n", host, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", host, "link", "add", "vh", "type", "veth", "peer", "name", "vg", "netns", gw)
        for dev in ("br0", "vh"):  # no IPv6 chatter from the host side
            sysctl(host, f"net.ipv6.conf.{dev}.disable_ipv6", "1")
        sh("ip", "-n", host, "link", "set", "vh", "master", "br0")
        sh("ip", "-n", host, "link", "set", "vh", "up")
        sh("ip", "-n", host, "link", "set", "br0", "up")
        sysctl(gw, "net.ipv4.conf.all.arp_accept", "1")
        sysctl(gw, "net.ipv4.conf.vg.arp_accept", "1")
        sysctl(gw, "net.ipv6.conf.all.forwarding", "1")
        sysctl(gw, "net.ipv6.conf.vg.forwarding", "1")
        if self.has_untracked_na:
            sysctl(gw, "net.ipv6.conf.all.accept_untracked_na", "1")
            sysctl(gw, "net.ipv6.conf.vg.accept_untracked_na", "1")
        sh("ip", "-n", gw, "addr", "add", "10.77.0.1/24", "dev", "vg")
        sh("ip", "-n", gw, "addr", "add", "fd77::1/64", "dev", "vg", "nodad")
        sh("ip", "-n", gw, "link", "set", "lo", "up")
        sh("ip", "-n", gw, "link", "set", "vg", "up")
        link = json.loads(sh("ip", "-n", gw, "-j", "link", "show", "vg"))
        self.gw_mac = link[0]["address"]

    def destroy(self) -> None:
        for ns in (self.gw, self.host):
            if os.path.exists(f"/run/netns/{ns}"):
                sh("ip", "netns", "del", ns, check=False)

    def neigh(self, ip: str) -> dict[str, Any] | None:
        out = json.loads(sh("ip", "-n", self.gw, "-j", "neigh", "show", "to", ip, "dev", "vg"))
        return out[0] if out else None

    def wait_neigh(self, ip: str, mac: str, timeout: float = 1.0) -> dict[str, Any] | None:
        """The entry for ``ip`` once it has ``mac``, or the last seen entry on timeout."""
        end = time.monotonic() + timeout
        while True:
            entry = self.neigh(ip)
            if (entry and entry.get("lladdr") == mac) or time.monotonic() > end:
                return entry
            time.sleep(0.02)

    def preload(self, ip: str, mac: str = OLD_MAC) -> None:
        sh("ip", "-n", self.gw, "neigh", "replace", ip, "dev", "vg", "lladdr", mac, "nud", "stale")
        assert (self.neigh(ip) or {}).get("lladdr") == mac


@pytest.fixture(scope="module")
def topo(request: pytest.FixtureRequest) -> Topo:
    prefix = f"vmmt{os.getpid() % 10000}{secrets.token_hex(2)[:3]}"
    t = Topo(prefix)
    request.addfinalizer(t.destroy)  # before build: also cleans a half-built topology
    t.build()
    return t


@pytest.fixture(autouse=True)
def clean_neigh(topo: Topo) -> None:
    sh("ip", "-n", topo.gw, "neigh", "flush", "dev", "vg")


class Capture:
    """Frames from VM_MAC arriving on gw's vg, with their arrival time."""

    def __init__(self, ns: str) -> None:
        self.sock = socket_in(ns, socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        self.sock.bind(("vg", ETH_P_ALL))
        self.sock.settimeout(0.05)
        self.frames: list[tuple[float, bytes]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        src = frames.mac_to_bytes(VM_MAC)
        while not self._stop.is_set():
            try:
                data, addr = self.sock.recvfrom(2048)
            except TimeoutError:
                continue
            now = time.monotonic()
            if addr[2] != socket.PACKET_OUTGOING and data[6:12] == src:
                self.frames.append((now, data))

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        time.sleep(0.05)
        self._stop.set()
        self._thread.join()
        self.sock.close()

    def kinds(self) -> dict[str, list[float]]:
        out: dict[str, list[float]] = {"garp": [], "arp_reply": [], "na": [], "rarp": []}
        for t, f in self.frames:
            ethertype = int.from_bytes(f[12:14], "big")
            if ethertype in (frames.ETH_P_ARP, frames.ETH_P_RARP):
                a = frames.parse_arp(f)
                if a["op"] == 3:
                    out["rarp"].append(t)
                elif a["op"] == 1 and a["spa"] == a["tpa"]:
                    out["garp"].append(t)
                elif a["op"] == 2:
                    out["arp_reply"].append(t)
            elif ethertype == frames.ETH_P_IPV6 and frames.parse_na(f)["override"]:
                out["na"].append(t)  # parse_na verified the checksum
        return out


@pytest.fixture
def capture(topo: Topo) -> Iterator[Capture]:
    with Capture(topo.gw) as cap:
        yield cap


def send_raw(topo: Topo, frame: bytes) -> None:
    sock = socket_in(topo.host, socket.AF_PACKET, socket.SOCK_RAW, 0)
    with sock:
        sock.bind(("br0", 0))
        sock.send(frame)


# -- (a) full mode: GARP request and unsolicited NA ---------------------------


def test_full_mode_garp_creates_ipv4_entry(topo: Topo) -> None:
    vif = Vif(mac=VM_MAC, vni=77, ipv4=("10.77.0.10",))
    with Announcer(topo.host, "br0", "full", [0]) as ann:
        handle = ann.announce(vif)
        assert handle.wait(2.0)
    assert handle.sent["garp"] == 1 and handle.errors == 0
    entry = topo.wait_neigh("10.77.0.10", VM_MAC)
    assert entry is not None and entry["lladdr"] == VM_MAC, entry
    # a request does not assert reachability: the kernel files it as STALE
    assert entry["state"] == ["STALE"]


def test_full_mode_na_creates_ipv6_entry(topo: Topo) -> None:
    if not topo.has_untracked_na:
        pytest.skip(
            f"{UNTRACKED_NA} missing: this kernel predates accept_untracked_na (5.19/6.0), "
            "so an unsolicited NA cannot create a neighbour entry here"
        )
    vif = Vif(mac=VM_MAC, vni=77, ipv6=("fd77::10",))
    with Announcer(topo.host, "br0", "full", [0]) as ann:
        handle = ann.announce(vif)
        assert handle.wait(2.0)
    assert handle.sent["na"] == 1 and handle.errors == 0
    entry = topo.wait_neigh("fd77::10", VM_MAC)
    assert entry is not None and entry["lladdr"] == VM_MAC, entry


def test_full_mode_overrides_stale_entries(topo: Topo) -> None:
    # Preloaded just now, i.e. within the 1 s ARP locktime: GARP and NA with
    # the Override flag must still replace the old MAC.
    topo.preload("10.77.0.11")
    topo.preload("fd77::11")
    vif = Vif(mac=VM_MAC, vni=77, ipv4=("10.77.0.11",), ipv6=("fd77::11",))
    with Announcer(topo.host, "br0", "full", [0]) as ann:
        handle = ann.announce(vif)
        assert handle.wait(2.0)
    assert (handle.sent["garp"], handle.sent["na"]) == (1, 1)
    v4 = topo.wait_neigh("10.77.0.11", VM_MAC)
    v6 = topo.wait_neigh("fd77::11", VM_MAC)
    assert v4 is not None and v4["lladdr"] == VM_MAC, v4
    assert v6 is not None and v6["lladdr"] == VM_MAC, v6


# -- (b) unicast ARP reply to the gateway ---------------------------------------


def test_unicast_reply_creates_reachable_entry(topo: Topo) -> None:
    send_raw(topo, frames.unicast_arp_reply(VM_MAC, "10.77.0.20", topo.gw_mac, GW_IP))
    entry = topo.wait_neigh("10.77.0.20", VM_MAC)
    assert entry is not None and entry["lladdr"] == VM_MAC, entry
    # a reply addressed to the gateway proves reachability: REACHABLE, not STALE
    assert entry["state"] == ["REACHABLE"]


def test_unicast_reply_updates_entry_after_locktime(topo: Topo) -> None:
    topo.preload("10.77.0.21")
    # Within locktime (default 1 s after the entry's last update) Linux keeps
    # the first answer ("several proxies" rule): a non-gratuitous reply does
    # not override. GARP is exempt, which is why it leads every round.
    send_raw(topo, frames.unicast_arp_reply(VM_MAC, "10.77.0.21", topo.gw_mac, GW_IP))
    time.sleep(0.1)
    assert (topo.neigh("10.77.0.21") or {}).get("lladdr") == OLD_MAC
    time.sleep(1.05)
    send_raw(topo, frames.unicast_arp_reply(VM_MAC, "10.77.0.21", topo.gw_mac, GW_IP))
    entry = topo.wait_neigh("10.77.0.21", VM_MAC)
    assert entry is not None and entry["lladdr"] == VM_MAC, entry
    assert entry["state"] == ["REACHABLE"]


# -- (c) rarp mode: the QEMU baseline leaves the gateway's table alone ----------


def test_rarp_mode_does_not_update_gateway(topo: Topo, capture: Capture) -> None:
    topo.preload("10.77.0.30")
    vif = Vif(mac=VM_MAC, vni=77, ipv4=("10.77.0.30",), ipv6=("fd77::30",))
    with Announcer(topo.host, "br0", "rarp", [0, 20, 40]) as ann:
        handle = ann.announce(vif)
        assert handle.wait(2.0)
    time.sleep(0.1)
    assert handle.sent["rarp"] == 3 and handle.errors == 0
    assert len(capture.kinds()["rarp"]) == 3  # the frames did reach the gateway
    entry = topo.neigh("10.77.0.30")
    assert entry is not None and entry["lladdr"] == OLD_MAC, entry
    assert topo.neigh("fd77::30") is None


# -- (d) first-sent callback and the schedule -----------------------------------


def test_schedule_rounds_and_first_sent(topo: Topo, capture: Capture) -> None:
    schedule = [0, 60, 150, 300]
    vif = Vif(mac=VM_MAC, vni=77, ipv4=("10.77.0.40",), ipv6=("fd77::40",))
    calls: list[tuple[float, str]] = []

    def first(t: float) -> None:
        calls.append((t, threading.current_thread().name))

    with Announcer(topo.host, "br0", "full", schedule, [(GW_IP, topo.gw_mac)]) as ann:
        before = time.monotonic()
        handle = ann.announce(vif, on_first_sent=first)
        after = time.monotonic()
        # round 0 went out synchronously, the rest is pending on one thread
        assert handle.rounds_sent == 1 and not handle.done
        assert ann.pending() == len(schedule) - 1
        assert handle.wait(3.0)
    time.sleep(0.1)

    assert len(calls) == 1
    assert before <= calls[0][0] <= after
    assert calls[0][1] == threading.current_thread().name
    assert handle.first_sent_at == calls[0][0]
    assert handle.sent == {"garp": 4, "arp_reply": 4, "na": 4, "rarp": 0}
    assert handle.errors == 0 and handle.rounds_sent == 4

    seen = capture.kinds()
    assert {k: len(v) for k, v in seen.items()} == {"garp": 4, "arp_reply": 4, "na": 4, "rarp": 0}
    offsets = [round((t - seen["garp"][0]) * 1000) for t in seen["garp"]]
    for got, want in zip(offsets, schedule, strict=True):
        assert want - 5 <= got <= want + 100, (offsets, schedule)

    # Each round is GARP then the unicast reply: the reply does not change
    # the MAC (GARP just set it) but it confirms reachability.
    entry = topo.wait_neigh("10.77.0.40", VM_MAC)
    assert entry is not None and entry["lladdr"] == VM_MAC
    assert entry["state"] == ["REACHABLE"]
    assert (topo.neigh("fd77::40") or {}).get("lladdr") == VM_MAC


def test_one_scheduler_thread_for_many_vifs(topo: Topo, capture: Capture) -> None:
    vifs = [Vif(mac=VM_MAC, vni=77, ipv4=(f"10.77.0.{50 + i}",)) for i in range(5)]
    threads_before = threading.active_count()
    with Announcer(topo.host, "br0", "full", [0, 30, 60]) as ann:
        handles = [ann.announce(v) for v in vifs]
        assert threading.active_count() == threads_before + 1
        assert all(h.wait(2.0) for h in handles)
    time.sleep(0.1)
    assert len(capture.kinds()["garp"]) == 15


def test_cancel_and_close_stop_pending_rounds(topo: Topo, capture: Capture) -> None:
    vif = Vif(mac=VM_MAC, vni=77, ipv4=("10.77.0.60",))
    ann = Announcer(topo.host, "br0", "full", [0, 300, 600])
    try:
        cancelled = ann.announce(vif)
        cancelled.cancel()
        assert cancelled.wait(0.1) and cancelled.cancelled
        closed = ann.announce(vif)
    finally:
        ann.close()
    assert closed.wait(0.1) and closed.cancelled
    time.sleep(0.4)
    assert cancelled.rounds_sent == closed.rounds_sent == 1
    assert len(capture.kinds()["garp"]) == 2
    with pytest.raises(RuntimeError):
        ann.announce(vif)


def test_send_errors_are_counted_not_raised(topo: Topo) -> None:
    vif = Vif(mac=VM_MAC, vni=77, ipv4=("10.77.0.70",))
    calls: list[float] = []
    with Announcer(topo.host, "no-such-br", "full", [0, 20]) as ann:
        with pytest.raises(OSError):
            ann.open()
        handle = ann.announce(vif, on_first_sent=calls.append)
        assert handle.wait(2.0)
    assert handle.errors == 2 and handle.sent["garp"] == 0 and handle.rounds_sent == 2
    assert handle.last_error is not None and calls == []


def test_device_down_and_replaced(topo: Topo) -> None:
    vif = Vif(mac=VM_MAC, vni=77, ipv4=("10.77.0.80",))
    sh("ip", "-n", topo.host, "link", "add", "brx", "type", "bridge")
    sh("ip", "-n", topo.host, "link", "set", "brx", "up")
    with Announcer(topo.host, "brx", "full", [0]) as ann:
        assert ann.send_once(vif).errors == 0
        sh("ip", "-n", topo.host, "link", "set", "brx", "down")
        down = ann.send_once(vif)
        assert down.errors == 1 and isinstance(down.last_error, OSError)
        # deleted and recreated under the same name: the announcer rebinds
        sh("ip", "-n", topo.host, "link", "del", "brx")
        sh("ip", "-n", topo.host, "link", "add", "brx", "type", "bridge")
        sh("ip", "-n", topo.host, "link", "set", "brx", "up")
        again = ann.send_once(vif)
        assert again.errors == 0 and again.sent["garp"] == 1
    sh("ip", "-n", topo.host, "link", "del", "brx")
