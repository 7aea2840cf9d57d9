"""The old NVE refreshes its ARP cache (issue 14 item 2, draft-ietf-nvo3-vmm 4.2).

A router lives on the source host h1 (its leg ``rtr`` is a port of the VN
bridge, in h1's namespace) and has a REACHABLE neighbour entry for vm1,
confirmed while vm1 was attached to h1. vm1 live-migrates to h2 through the
full pipeline. Without a refresh nothing re-checks that entry for ~30 s:
the test first shows that no ARP from the router reaches vm1 in a second.
Then the source's COMPLETED stage ``arp_refresh`` runs: the kernel probes
the entry at once, the unicast probe reaches vm1 *at h2* (through the
updated forwarding entries) and vm1's answer confirms the entry there. An
entry of another VM on the host is not touched.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time

from oslo_config import cfg

from vmm_lab.linux.demo import lab_site
from vmm_lab.linux.hypervisor import LabHypervisor
from vmm_lab.linux.topology import LabVm, in_ns
from vmm_linux.netns import socket_in
from vmm_linux.refresh import ArpRefresh, revalidate, stale_candidates
from vmm_orchestrator import frames
from vmm_orchestrator.engine import Pipeline
from vmm_orchestrator.journal import Journal
from vmm_orchestrator.model import Migration, MigrationEvent, Phase, Role

VNI = 100
ETH_P_ALL = 0x0003
RTR_MAC = "02:5e:00:00:00:fa"
RTR_IP = "198.19.100.250"
RTR_IP6 = "fd00:100::fa"


def arps_from(vm: LabVm, sender_mac: str, seconds: float) -> int:
    """ARP requests from ``sender_mac`` arriving at ``vm``'s eth0 within ``seconds``."""
    sock = socket_in(vm.netns, socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    try:
        sock.bind(("eth0", 0))
        sock.settimeout(0.05)
        seen = 0
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            try:
                data, addr = sock.recvfrom(2048)
            except TimeoutError:
                continue
            if addr[2] == 4 or data[12:14] != b"\x08\x06":
                continue
            arp = frames.parse_arp(data)
            if arp["op"] == frames.ARPOP_REQUEST and arp["sha"] == sender_mac:
                seen += 1
        return seen
    finally:
        sock.close()


def neigh(ns: str, ip: str) -> dict:
    out = json.loads(in_ns(ns, "ip", "-j", "neigh", "show", ip, "dev", "rtr"))
    return out[0] if out else {}


def test_stale_candidates_rule() -> None:
    entries = [
        {"dst": "10.0.0.5", "lladdr": "52:54:00:00:00:05", "state": 0x02, "flags": 0},
        {"dst": "10.0.0.6", "lladdr": "52:54:00:00:00:06", "state": 0x04, "flags": 0},
        {"dst": "10.0.0.7", "lladdr": "52:54:00:00:00:05", "state": 0x40, "flags": 0},  # NOARP
        {"dst": "10.0.0.8", "lladdr": "52:54:00:00:00:05", "state": 0x80, "flags": 0},  # PERM
        {"dst": "10.0.0.9", "lladdr": "52:54:00:00:00:09", "state": 0x08, "flags": 0},
        {"dst": "fd00::9", "lladdr": "52:54:00:00:00:aa", "state": 0x04, "flags": 0},
    ]
    got = stale_candidates(entries, ["52:54:00:00:00:05"], ["10.0.0.9", "fd00::9"])
    assert [e["dst"] for e in got] == ["10.0.0.5", "10.0.0.9", "fd00::9"]


def test_the_old_host_revalidates_its_neighbour_entries_of_a_departed_vm(
    lab_conf: cfg.ConfigOpts, prefix: str
) -> None:
    with lab_site(lab_conf, prefix, orchestrated=True) as site:
        lab = site.lab
        vm1, vm3 = lab.vms["vm1"], lab.vms["vm3"]  # both on h1
        h1 = lab.hosts["h1"]
        # A router on h1: its leg is a port of the VN bridge in h1's namespace.
        in_ns(h1.netns, "ip", "link", "add", "rtr", "type", "veth", "peer", "name", "rtr-p")
        in_ns(h1.netns, "ip", "link", "set", "rtr", "address", RTR_MAC, "mtu", "1450", "up")
        in_ns(h1.netns, "ip", "addr", "add", f"{RTR_IP}/24", "dev", "rtr")
        in_ns(h1.netns, "ip", "addr", "add", f"{RTR_IP6}/64", "dev", "rtr", "nodad")
        in_ns(h1.netns, "ip", "link", "set", "rtr-p", "master", f"br-{VNI}", "mtu", "1450")
        in_ns(h1.netns, "ip", "link", "set", "rtr-p", "up")
        site.client().add_endpoint(VNI, RTR_MAC, [RTR_IP], [RTR_IP6], "h1")
        site.hosts["h1"].nve.plug(VNI, RTR_MAC, "rtr-p", (RTR_IP, RTR_IP6))
        for vm in (vm1, vm3):
            for ip in (vm.ipv4, vm.ipv6):
                in_ns(h1.netns, "ping", "-c", "2", "-i", "0.2", "-W", "1", "-I", "rtr", ip)
                assert neigh(h1.netns, ip).get("state") == ["REACHABLE"], (vm.name, ip)
        vm3_before = neigh(h1.netns, vm3.ipv4)

        hyper = LabHypervisor(lab, site.dispatchers, qemu_rarp=True)
        _record, futures = hyper.migrate(vm1, "h2", 50)
        reports = [f.result(timeout=30) for f in futures]
        assert all(r.ok for r in reports), [r.error for r in reports]
        assert vm1.host == "h2"

        # Without a refresh the router does not re-check vm1 (REACHABLE for ~30 s).
        assert arps_from(vm1, RTR_MAC, 1.0) == 0
        assert neigh(h1.netns, vm1.ipv4).get("state") == ["REACHABLE"]

        # The source's COMPLETED with the stage, through the engine as [pipeline] stages
        # would run it (the entry point arp_refresh is not installed in this tree yet).
        host = next(h for h in site.assembly.hosts if h.name == "h1")
        mig = Migration("refresh-test", vm1.workload, "h1", "h2")
        journal = Journal(":memory:")
        pipeline = Pipeline(lab_conf, host.context, journal, [ArpRefresh(lab_conf)])
        seen: list[int] = []
        capture = threading.Thread(target=lambda: seen.append(arps_from(vm1, RTR_MAC, 1.5)))
        capture.start()
        time.sleep(0.2)
        try:
            event = MigrationEvent(mig, Phase.COMPLETED, Role.SOURCE, time.monotonic())
            report = pipeline.handle(event)
        finally:
            capture.join()
            journal.close()
        assert report.ok, report.error
        assert [(t.stage, t.outcome) for t in report.timeline] == [("arp_refresh", "ok")]
        assert report.timeline[0].notes == {"probed": 2, "deleted": 0}
        result = revalidate(h1.netns, [vm1.mac], [vm1.ipv4, vm1.ipv6])  # probing again is fine
        assert result["deleted"] == [], result
        assert sorted(p.split()[0] for p in result["probed"]) == sorted([vm1.ipv4, vm1.ipv6])
        assert seen and seen[0] >= 1, "the probe must reach vm1 at its new host"
        for ip in (vm1.ipv4, vm1.ipv6):
            deadline = time.monotonic() + 3
            while neigh(h1.netns, ip).get("state") != ["REACHABLE"]:
                assert time.monotonic() < deadline, neigh(h1.netns, ip)
                time.sleep(0.05)
            assert neigh(h1.netns, ip).get("lladdr") == vm1.mac
        after = neigh(h1.netns, vm3.ipv4)  # another VM's entry is left as it was
        assert after.get("state") == vm3_before.get("state") == ["REACHABLE"]
        with contextlib.suppress(Exception):
            in_ns(h1.netns, "ip", "link", "del", "rtr")
