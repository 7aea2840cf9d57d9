"""A second VM claiming a migrating VM's MAC and addresses on the migration's
destination, in the namespace lab with the full pipeline (issue 14 item 4).

The spoofer sends forged RARPs (the victim's MAC), GARPs and unsolicited NAs
(the victim's addresses with its own MAC) every few milliseconds for the
whole migration. The migration must end exactly as without it: one planned
move in the directory, the victim pinned to its own port, the gateway's
caches pointing at the victim, and its traffic reaching the victim alone.
"""

from __future__ import annotations

import json
import re
import socket
import struct
import threading
import time

from oslo_config import cfg

from vmm_linux.netns import socket_in
from vmm_orchestrator import frames

try:  # the lab is moving out of the product plugins (issue 9)
    from vmm_lab.linux.demo import lab_site
    from vmm_lab.linux.hypervisor import LabHypervisor
    from vmm_lab.linux.topology import LabVm, in_ns
except ImportError:  # pragma: no cover - before the move
    from vmm_linux.lab.demo import lab_site  # type: ignore[no-redef]
    from vmm_linux.lab.hypervisor import LabHypervisor  # type: ignore[no-redef]
    from vmm_linux.lab.topology import LabVm, in_ns  # type: ignore[no-redef]

VNI = 100
ETH_P_ALL = 0x0003


def ping(src_ns: str, dst: str, count: int = 5) -> int:
    out = in_ns(src_ns, "ping", "-c", str(count), "-i", "0.05", "-W", "1", dst, check=False)
    found = re.search(r"(\d+) received", out)
    return int(found.group(1)) if found else 0


def neigh_mac(vm: LabVm, ip: str) -> str | None:
    out = in_ns(vm.netns, "ip", "-j", "neigh", "show", ip, "dev", "eth0")
    entries = json.loads(out or "[]")
    return entries[0].get("lladdr") if entries else None


class Spoofer:
    """Sends the forged frames from ``attacker``'s eth0 until stopped."""

    def __init__(self, attacker: LabVm, victim: LabVm) -> None:
        self.sent = 0
        self._frames = [
            frames.rarp(victim.mac),
            frames.gratuitous_arp_request(victim.mac, victim.ipv4),
            frames.gratuitous_arp_request(attacker.mac, victim.ipv4),
            frames.unsolicited_na(attacker.mac, victim.ipv6),
        ]
        self._sock = socket_in(attacker.netns, socket.AF_PACKET, socket.SOCK_RAW, 0)
        self._sock.bind(("eth0", 0))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for frame in self._frames:
                self._sock.send(frame)
                self.sent += 1
            time.sleep(0.005)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(timeout=5)
        self._sock.close()
        return self.sent


def echo_requests_seen(vm: LabVm, ip: str, during: threading.Thread) -> int:
    """ICMP echo requests to ``ip`` reaching ``vm``'s eth0 while ``during`` runs."""
    sock = socket_in(vm.netns, socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    target = socket.inet_aton(ip)
    seen = 0
    try:
        sock.bind(("eth0", 0))
        sock.settimeout(0.1)
        during.start()
        while during.is_alive():
            try:
                data, addr = sock.recvfrom(65536)
            except TimeoutError:
                continue
            if addr[2] == socket.PACKET_OUTGOING or len(data) < 35:
                continue
            if struct.unpack("!H", data[12:14])[0] == 0x0800 and data[23] == 1:
                if data[30:34] == target and data[34] == 8:
                    seen += 1
    finally:
        sock.close()
    return seen


def test_a_vm_spoofing_the_migrating_vm_at_its_destination_moves_nothing(
    lab_conf: cfg.ConfigOpts, prefix: str
) -> None:
    with lab_site(lab_conf, prefix, orchestrated=True) as site:
        lab = site.lab
        vm1, gw = lab.vms["vm1"], lab.vms["gw"]
        attacker = lab.vms["vm4"]  # on h2, the destination
        assert attacker.host == "h2"
        assert ping(gw.netns, vm1.ipv4) == 5 and ping(gw.netns, vm1.ipv6) == 5
        time.sleep(1.2)  # past the neighbour locktime: a forged update would be taken

        spoofer = Spoofer(attacker, vm1)
        try:
            time.sleep(0.3)  # spoofing before the migration starts...
            hyper = LabHypervisor(lab, site.dispatchers, qemu_rarp=True)
            _, futures = hyper.migrate(vm1, "h2", 50)
            reports = [f.result(timeout=30) for f in futures]
            time.sleep(0.3)  # ...and after it ended
        finally:
            sent = spoofer.stop()
        assert all(r.ok for r in reports), [r.error for r in reports]
        assert sent > 100

        client = site.client()
        endpoint = client.get_endpoint(VNI, vm1.mac)
        assert (endpoint["nve"], endpoint["seq"], endpoint["state"]) == ("h2", 1, "active")
        assert [m["planned"] for m in endpoint["moves"]] == [True]  # the migration, once
        assert client.find(VNI, ip=vm1.ipv4)["mac"] == vm1.mac
        assert client.find(VNI, ip=vm1.ipv6)["mac"] == vm1.mac
        h2 = site.hosts["h2"]
        assert h2.agent.refused_moves > 0 and h2.agent.reported_moves == 0
        assert h2.nve.master_port(VNI, vm1.mac) == vm1.port
        for name in ("h1", "h3"):
            assert site.hosts[name].nve.vxlan_dst(VNI, vm1.mac) == lab.hosts["h2"].vtep, name
        assert neigh_mac(gw, vm1.ipv4) == vm1.mac
        assert neigh_mac(gw, vm1.ipv6) == vm1.mac

        # The victim keeps its traffic: every ping of the gateway reaches it, none the attacker.
        answered: list[int] = []
        pinger = threading.Thread(target=lambda: answered.append(ping(gw.netns, vm1.ipv4, 20)))
        assert echo_requests_seen(attacker, vm1.ipv4, pinger) == 0
        assert answered == [20]
        assert ping(attacker.netns, vm1.ipv4) == 5  # its own host's bridge is right too
