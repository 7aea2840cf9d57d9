"""NVE agents following the directory in real namespaces: flood lists that follow
registrations, entries the kernel refuses, and local learning that a forged
frame cannot turn into a hijack (issues 9, 13 and 14).

Each test builds its own lab (underlay + hosts from vmm_linux.lab.topology),
a directory served over HTTP, and real ``NveAgent``s; the fixture tears all
of it down however the test ends.
"""

from __future__ import annotations

import dataclasses
import json
import re
import secrets
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from vmm_linux.agent import NveAgent
from vmm_orchestrator import frames

try:  # the lab is moving out of the product plugins (issue 9)
    from vmm_lab.linux.topology import Lab, LabVm, in_ns
except ImportError:  # pragma: no cover - before the move
    from vmm_linux.lab.topology import Lab, LabVm, in_ns  # type: ignore[no-redef]
from vmm_linux.netns import socket_in
from vmm_linux.nve import LinuxNve, vxlan_name
from vmm_orchestrator.nva.client import NvaClient
from vmm_orchestrator.nva.server import NvaServer
from vmm_orchestrator.nva.store import NvaStore

VNI = 120
ETH_P_ALL = 0x0003


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return bool(predicate())


def ping(src_ns: str, dst: str, count: int = 5) -> int:
    """How many of ``count`` pings got an answer."""
    out = in_ns(src_ns, "ping", "-c", str(count), "-i", "0.05", "-W", "1", dst, check=False)
    found = re.search(r"(\d+) received", out)
    return int(found.group(1)) if found else 0


def send_from(vm: LabVm, *raw: bytes) -> None:
    """Put frames on the VM's eth0 as its guest would (any source MAC it likes)."""
    sock = socket_in(vm.netns, socket.AF_PACKET, socket.SOCK_RAW, 0)
    try:
        sock.bind(("eth0", 0))
        for frame in raw:
            sock.send(frame)
            time.sleep(0.02)
    finally:
        sock.close()


class EchoCounter:
    """Counts ICMP echo requests to ``ip`` that reach ``vm``'s eth0."""

    def __init__(self, vm: LabVm, ip: str) -> None:
        self.count = 0
        self._ip = socket.inet_aton(ip)
        self._stop = threading.Event()
        self._sock = socket_in(vm.netns, socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        self._sock.bind(("eth0", 0))
        self._sock.settimeout(0.1)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data, addr = self._sock.recvfrom(65536)
            except TimeoutError:
                continue
            if addr[2] == socket.PACKET_OUTGOING or len(data) < 35:
                continue
            ethertype = struct.unpack("!H", data[12:14])[0]
            # IPv4, ICMP, to the address, echo request
            if ethertype == 0x0800 and data[23] == 1 and data[30:34] == self._ip:
                if data[34] == 8:
                    self.count += 1

    def close(self) -> int:
        self._stop.set()
        self._thread.join(timeout=2)
        self._sock.close()
        return self.count


@dataclasses.dataclass
class Site:
    lab: Lab
    store: NvaStore
    server: NvaServer
    token: str
    admin: NvaClient
    nves: dict[str, LinuxNve] = dataclasses.field(default_factory=dict)
    agents: dict[str, NveAgent] = dataclasses.field(default_factory=dict)

    def vtep(self, host: str) -> str:
        return self.lab.hosts[host].vtep

    def start(self, host: str, **kwargs: Any) -> NveAgent:
        """Start host's NVE agent (which registers its NVE)."""
        lab_host = self.lab.hosts[host]
        nve = LinuxNve(lab_host.netns, lab_host.vtep)
        self.nves[host] = nve
        agent = NveAgent(
            host, nve, NvaClient(self.server.url, self.token), [VNI], watch_timeout=0.5, **kwargs
        )
        self.agents[host] = agent
        agent.start()
        return agent

    def flood(self, host: str) -> set[str]:
        """The VTEPs host's NVE floods BUM frames of the VN to (all-zero entries)."""
        out = in_ns(
            self.lab.hosts[host].netns, "bridge", "-j", "fdb", "show", "dev", vxlan_name(VNI)
        )
        return {e["dst"] for e in json.loads(out or "[]") if e.get("mac") == "00:00:00:00:00:00"}

    def add_vm(self, name: str, host: str, gateway: bool = False) -> LabVm:
        """A VM on host's bridge, registered in the directory there."""
        vm = self.lab.add_vm(name, host, gateway=gateway)
        self.admin.add_endpoint(VNI, vm.mac, [vm.ipv4], [vm.ipv6], host)
        return vm


@pytest.fixture
def site(prefix: str) -> Iterator[Site]:
    lab = Lab(prefix, vni=VNI)
    token = secrets.token_urlsafe(16)
    store = NvaStore(":memory:")
    server = NvaServer(store, token, "127.0.0.1", 0)
    s = None
    try:
        lab.build_underlay()
        for name in ("h1", "h2", "h3"):
            lab.add_host(name)
        server.start()
        s = Site(lab, store, server, token, NvaClient(server.url, token))
        yield s
    finally:
        if s is not None:
            for agent in s.agents.values():
                agent.stop()
            for nve in s.nves.values():
                nve.close()
            s.admin.close()
        server.stop()
        store.close()
        lab.teardown()


# ----------------------------------------------------- flood lists (issue 9)


def test_flood_lists_follow_nve_registrations_at_any_time(site: Site) -> None:
    """h1 starts alone; peers that register later (or leave) reach its flood list."""
    site.start("h1")
    assert site.flood("h1") == set()  # nobody else yet
    vm1 = site.add_vm("vm1", "h1")

    site.start("h2")  # registers after h1 loaded the directory
    assert wait_for(lambda: site.flood("h1") == {site.vtep("h2")}), site.flood("h1")
    assert site.flood("h2") == {site.vtep("h1")}
    vm2 = site.add_vm("vm2", "h2")
    # vm1's ARP request for vm2 reaches h2 only through h1's flood list.
    assert ping(vm1.netns, vm2.ipv4) == 5
    assert ping(vm2.netns, vm1.ipv6) == 5

    # An NVE registered by an operator, no agent yet: both agents flood to it...
    site.admin.register_nve("h3", site.vtep("h3"), [VNI])
    want = {site.vtep("h2"), site.vtep("h3")}
    assert wait_for(lambda: site.flood("h1") == want), site.flood("h1")
    assert wait_for(lambda: site.flood("h2") == {site.vtep("h1"), site.vtep("h3")})
    # ...and stop when it goes away.
    site.admin.delete_nve("h3")
    assert wait_for(lambda: site.flood("h1") == {site.vtep("h2")}), site.flood("h1")
    assert wait_for(lambda: site.flood("h2") == {site.vtep("h1")}), site.flood("h2")
    # An NVE that leaves the VN (re-registers without it) leaves the flood list too.
    site.admin.register_nve("h3", site.vtep("h3"), [VNI])
    assert wait_for(lambda: site.vtep("h3") in site.flood("h1"))
    site.admin.register_nve("h3", site.vtep("h3"), [VNI + 1])
    assert wait_for(lambda: site.flood("h1") == {site.vtep("h2")}), site.flood("h1")
    assert ping(vm1.netns, vm2.ipv4) == 5
    assert site.agents["h1"].rejected_entries == 0


# --------------------------------------------- entries the kernel refuses (issue 13)


def _inject(store: NvaStore, mac: str, nve: str, ipv4: list[str], ipv6: list[str]) -> None:
    """Write an endpoint and its change behind the API's checks, as an older directory did."""
    with store._tx() as db:
        revision = store._next_revision()
        db.execute(
            "INSERT INTO endpoints (vni, mac, ipv4, ipv6, nve, state, seq, revision, updated_at)"
            " VALUES (?, ?, ?, ?, ?, 'active', 0, ?, ?)",
            (VNI, mac, json.dumps(ipv4), json.dumps(ipv6), nve, revision, time.time()),
        )
        endpoint = {"vni": VNI, "mac": mac, "ipv4": ipv4, "ipv6": ipv6, "nve": nve, "seq": 0}
        store._record(db, revision, VNI, "endpoint", {"endpoint": endpoint})


def test_an_agent_skips_entries_it_cannot_apply_counts_them_and_starts(site: Site) -> None:
    site.admin.register_nve("h2", site.vtep("h2"), [VNI])
    site.admin.register_nve("h3", site.vtep("h3"), [VNI])
    good = "52:54:00:00:78:01"
    site.admin.add_endpoint(VNI, good, ["198.19.120.50"], [], "h2")
    _inject(site.store, "01:00:5e:00:00:01", "h2", [], [])  # multicast
    _inject(site.store, "ff:ff:ff:ff:ff:ff", "h2", [], [])  # broadcast
    _inject(site.store, "00:00:00:00:00:00", "h2", [], [])  # all zeros
    _inject(site.store, "52:54:00:00:78:02", "h2", [], ["fe80::2%eth0"])  # a zone id

    agent = site.start("h1")  # starts regardless
    assert agent.wait_synced(5)
    assert agent.rejected_entries == 4
    nve = site.nves["h1"]
    assert nve.vxlan_dst(VNI, good) == site.vtep("h2")
    assert site.admin.get_nve("h1")["acked_revision"] == site.store.revision

    # A bad entry arriving through the watch is skipped; later changes still apply.
    _inject(site.store, "33:33:00:00:00:01", "h3", [], [])
    moved = site.admin.move(VNI, good, "h3")
    assert wait_for(lambda: nve.vxlan_dst(VNI, good) == site.vtep("h3"))
    assert wait_for(lambda: site.admin.get_nve("h1")["acked_revision"] >= moved["revision"])
    assert agent.rejected_entries == 5
    assert agent.errors == 0  # the watch never broke
    stats = agent.stats()
    assert (stats["rejected_entries"], stats["watch_errors"]) == (5, 0)


# ------------------------------------------------------ no hijack (issues 13, 14)


def test_a_spoofing_vm_moves_nothing_and_the_victim_keeps_its_traffic(site: Site) -> None:
    for host in ("h1", "h2", "h3"):
        site.start(host)
    victim = site.add_vm("victim", "h1")
    attacker = site.add_vm("attacker", "h2")
    gw = site.add_vm("gw", "h3", gateway=True)
    assert ping(gw.netns, victim.ipv4) == 5

    # The attacker forges the victim's MAC: QEMU-style RARPs, a GARP for the victim's
    # IPv4 address and an unsolicited NA for its IPv6 address.
    forged = [frames.rarp(victim.mac) for _ in range(5)]
    forged += [frames.gratuitous_arp_request(victim.mac, victim.ipv4)]
    forged += [frames.unsolicited_na(victim.mac, victim.ipv6)]
    send_from(attacker, *forged)
    h2 = site.agents["h2"]
    assert wait_for(lambda: h2.refused_moves >= 1), "h2 never saw the forged frames"
    time.sleep(0.5)  # time for a move, had one been reported

    endpoint = site.admin.get_endpoint(VNI, victim.mac)
    assert (endpoint["nve"], endpoint["seq"], endpoint["moves"]) == ("h1", 0, [])
    assert h2.reported_moves == 0
    for host in ("h2", "h3"):
        assert site.nves[host].vxlan_dst(VNI, victim.mac) == site.vtep("h1"), host
    # h2's bridge learned the victim on the attacker's port; the agent points it back.
    assert wait_for(lambda: site.nves["h2"].master_port(VNI, victim.mac) == vxlan_name(VNI))

    # The victim keeps its traffic: the gateway's pings reach it, none reach the attacker.
    counter = EchoCounter(attacker, victim.ipv4)
    try:
        answered = ping(gw.netns, victim.ipv4, count=20)
    finally:
        seen_by_attacker = counter.close()
    assert answered == 20
    assert seen_by_attacker == 0
    # And so does a VM on the attacker's own host.
    assert ping(attacker.netns, victim.ipv4) == 5


def test_learning_still_moves_a_vm_onto_a_port_configured_for_its_mac(site: Site) -> None:
    """A VM moved without any orchestrator (the lab's baseline): its port's peer has
    its MAC, so its first frame at the new host is reported as a move."""
    for host in ("h1", "h2", "h3"):
        site.start(host)
    vm = site.add_vm("vm", "h1")
    gw = site.add_vm("gw", "h3", gateway=True)
    assert ping(gw.netns, vm.ipv4) == 5
    site.lab.pause(vm)
    site.lab.move(vm, "h2")
    send_from(vm, frames.rarp(vm.mac))
    assert wait_for(lambda: site.admin.get_endpoint(VNI, vm.mac)["nve"] == "h2")
    endpoint = site.admin.get_endpoint(VNI, vm.mac)
    assert endpoint["seq"] == 1 and endpoint["moves"][0]["planned"] is False
    assert site.agents["h2"].reported_moves == 1 and site.agents["h2"].refused_moves == 0
    assert wait_for(lambda: site.nves["h3"].vxlan_dst(VNI, vm.mac) == site.vtep("h2"))
    assert ping(gw.netns, vm.ipv4) == 5


def test_learning_moves_a_mac_whose_migration_is_pending_to_this_nve(site: Site) -> None:
    """Pre-staged at h2 (a migration in progress): the MAC's first frame on its own
    port there is the migration's, and counts as the planned move the commit then
    finds done. The same MAC from another VM's port at h2 meanwhile moves nothing."""
    for host in ("h1", "h2"):
        site.start(host)
    vm = site.add_vm("vm", "h1")
    other = site.add_vm("other", "h2")
    site.admin.prestage(VNI, vm.mac, "h2", "mig-1")
    send_from(other, frames.rarp(vm.mac))  # pending here, but from another VM's port
    assert wait_for(lambda: site.agents["h2"].refused_moves > 0)
    assert site.admin.get_endpoint(VNI, vm.mac)["nve"] == "h1"
    assert site.agents["h2"].reported_moves == 0
    site.lab.pause(vm)
    site.lab.move(vm, "h2")
    time.sleep(0.3)  # past the refusal hold-down of the spoofed frame
    send_from(vm, frames.rarp(vm.mac))  # its own port at the destination
    assert wait_for(lambda: site.admin.get_endpoint(VNI, vm.mac)["nve"] == "h2")
    committed = site.admin.commit(VNI, vm.mac, "mig-1")["endpoint"]
    assert committed["nve"] == "h2" and committed["seq"] == 2
    assert [m["planned"] for m in committed["moves"]] == [True]  # counted once


def _neigh_mac(vm: LabVm, ip: str) -> str | None:
    out = in_ns(vm.netns, "ip", "-j", "neigh", "show", ip, "dev", "eth0")
    entries = json.loads(out or "[]")
    return entries[0].get("lladdr") if entries else None


def _guard_drops(site: Site, host: str) -> int:
    out = in_ns(
        site.lab.hosts[host].netns, "nft", "-j", "list", "chain", "bridge", "vmm_guard", "pre"
    )
    return sum(
        item["rule"]["expr"][-2]["counter"]["packets"]
        for item in json.loads(out)["nftables"]
        if "rule" in item and "counter" in item["rule"]["expr"][-2]
    )


@pytest.mark.parametrize("guard", [True, False], ids=["guarded", "control-unguarded"])
def test_a_vm_claiming_another_vms_address_moves_nothing(site: Site, guard: bool) -> None:
    """A GARP and an unsolicited NA from the attacker's own MAC for the victim's
    addresses: the directory moves nothing either way; with the address guard the
    gateway's caches keep the victim (the unguarded control shows the threat)."""
    for host in ("h1", "h2", "h3"):
        site.start(host, address_guard=guard)
    victim = site.add_vm("victim", "h1")
    attacker = site.add_vm("attacker", "h2")
    gw = site.add_vm("gw", "h3", gateway=True)
    assert ping(gw.netns, victim.ipv4) == 5 and ping(gw.netns, victim.ipv6) == 5
    assert _neigh_mac(gw, victim.ipv4) == victim.mac
    time.sleep(1.2)  # past the neighbour locktime, so an update would be taken
    claims = [frames.gratuitous_arp_request(attacker.mac, victim.ipv4)] * 3
    claims += [frames.unsolicited_na(attacker.mac, victim.ipv6)] * 3
    send_from(attacker, *claims)
    time.sleep(0.5)

    # The directory and every NVE still bind the victim's addresses to the victim.
    assert site.admin.find(VNI, ip=victim.ipv4)["mac"] == victim.mac
    assert site.admin.find(VNI, ip=victim.ipv6)["mac"] == victim.mac
    endpoint = site.admin.get_endpoint(VNI, victim.mac)
    assert (endpoint["nve"], endpoint["seq"]) == ("h1", 0)
    assert site.agents["h2"].reported_moves == 0
    if not guard:
        # The threat is real: the gateway now sends the victim's traffic to the attacker.
        assert _neigh_mac(gw, victim.ipv4) == attacker.mac
        assert _neigh_mac(gw, victim.ipv6) == attacker.mac
        return
    assert _guard_drops(site, "h2") == 6
    assert _neigh_mac(gw, victim.ipv4) == victim.mac
    assert _neigh_mac(gw, victim.ipv6) == victim.mac
    counter = EchoCounter(attacker, victim.ipv4)
    try:
        answered = ping(gw.netns, victim.ipv4, count=20)
    finally:
        seen_by_attacker = counter.close()
    assert (answered, seen_by_attacker) == (20, 0)
    # The victim's own announcements still pass the guard on its host.
    send_from(victim, frames.gratuitous_arp_request(victim.mac, victim.ipv4))
    assert _guard_drops(site, "h1") == 0
    assert site.agents["h2"].guard is not None and site.agents["h2"].guard.failures == 0
