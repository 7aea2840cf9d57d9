"""The walking skeleton end to end, in real namespaces with real kernel tables."""

from __future__ import annotations

import json
import re

from oslo_config import cfg

from vmm_lab.linux.demo import lab_site, run_mode
from vmm_lab.linux.hypervisor import LabHypervisor
from vmm_lab.linux.topology import in_ns
from vmm_orchestrator.model import MigrationEvent, Phase, Role

VNI = 100


def ping(src_ns: str, dst: str, count: int = 5) -> int:
    """How many of ``count`` pings got an answer."""
    out = in_ns(src_ns, "ping", "-c", str(count), "-i", "0.05", "-W", "1", dst, check=False)
    found = re.search(r"(\d+) received", out)
    return int(found.group(1)) if found else 0


def tx_packets(ns: str, dev: str) -> int:
    data = json.loads(in_ns(ns, "ip", "-s", "-j", "link", "show", dev))
    return int(data[0]["stats64"]["tx"]["packets"])


def test_orchestrated_migration_loses_nothing_after_resume_v4_and_v6(lab_conf, prefix):
    result = run_mode(lab_conf, "orchestrated", prefix)
    names = {s.stream for s in result.streams}
    assert {"vm2-v4", "vm2-v6", "vm3-v4", "vm3-v6", "gw-v4", "gw-v6"} <= names
    for stream in result.streams:
        assert stream.sent > 500, stream
        assert stream.lost_after_resume == 0, stream
        assert stream.converged, stream
    assert not result.errors
    assert result.gateway_fdb_vtep == result.destination_vtep
    assert all(v is not None for v in result.convergence_ms.values()), result.convergence_ms
    assert result.critical_path_ms is not None and result.critical_path_ms >= 0


def test_rarp_baseline_does_lose_after_resume(lab_conf, prefix):
    """The control: the same measurement sees the loss that QEMU's RARP alone leaves."""
    result = run_mode(lab_conf, "rarp", prefix)
    remote = [s for s in result.streams if not s.stream.startswith("vm3")]
    assert sum(s.lost_after_resume for s in remote) > 0, remote


def test_tables_point_to_the_new_place(lab_conf: cfg.ConfigOpts, prefix):
    with lab_site(lab_conf, prefix, orchestrated=True) as site:
        lab = site.lab
        vm1, gw = lab.vms["vm1"], lab.vms["gw"]
        assert ping(gw.netns, vm1.ipv4) == 5
        hyper = LabHypervisor(lab, site.dispatchers, qemu_rarp=False)
        _, futures = hyper.migrate(vm1, "h2", 50)
        reports = [f.result(timeout=30) for f in futures]
        assert all(r.ok for r in reports), [r.error for r in reports]
        h2_vtep = lab.hosts["h2"].vtep
        for name in ("h1", "h3"):
            assert site.hosts[name].nve.vxlan_dst(VNI, vm1.mac) == h2_vtep, name
        # the hold timer has expired: the old NVE forwards over the regular VXLAN port
        assert site.hosts["h1"].nve.master_port(VNI, vm1.mac) == "vx-100"
        assert site.hosts["h1"].nve.vxlan_dst(VNI, vm1.mac, inflight=True) is None
        assert site.hosts["h3"].nve.master_port(VNI, vm1.mac) == "vx-100"
        assert site.hosts["h2"].nve.master_port(VNI, vm1.mac) == vm1.port
        assert site.hosts["h2"].nve.expectations(VNI) == set()
        endpoint = site.client().get_endpoint(VNI, vm1.mac)
        assert (endpoint["nve"], endpoint["seq"], endpoint["state"]) == ("h2", 1, "active")
        neigh = in_ns(gw.netns, "ip", "neigh", "show", vm1.ipv4, "dev", "eth0")
        assert vm1.mac in neigh and "FAILED" not in neigh, neigh
        assert ping(gw.netns, vm1.ipv4) == 5
        assert ping(lab.vms["vm2"].netns, vm1.ipv6) == 5


def test_old_nve_tunnels_for_a_stale_peer_until_the_hold_timer(lab_conf, prefix):
    lab_conf.set_override("hold_time", 2.0, group="stage_hold_timer")
    with lab_site(lab_conf, prefix, orchestrated=True) as site:
        lab = site.lab
        vm1, vm2 = lab.vms["vm1"], lab.vms["vm2"]
        h1, h3 = lab.hosts["h1"], site.hosts["h3"]
        assert ping(vm2.netns, vm1.ipv4) == 5
        h3.agent.stop()  # a peer NVE that misses the update keeps pointing at h1
        hyper = LabHypervisor(lab, site.dispatchers, qemu_rarp=False)
        _, futures = hyper.migrate(vm1, "h2", 50)
        resumed = futures[2].result(timeout=30)
        notes = {t.stage: t.notes for t in resumed.timeline}
        assert notes["peer_update"]["laggards"] == ["h3"]
        assert h3.nve.vxlan_dst(VNI, vm1.mac) == h1.vtep
        before = tx_packets(h1.netns, "vi-100")
        assert ping(vm2.netns, vm1.ipv4) == 5
        assert tx_packets(h1.netns, "vi-100") >= before + 5
        completed = futures[3].result(timeout=30)
        assert completed.ok, completed.error
        assert site.hosts["h1"].nve.vxlan_dst(VNI, vm1.mac, inflight=True) is None
        assert ping(vm2.netns, vm1.ipv4, count=3) == 0  # tunnel gone, peer still stale
        h3.agent.start()  # the peer comes back and loads the directory again
        assert h3.agent.wait_synced(5)
        assert h3.nve.vxlan_dst(VNI, vm1.mac) == lab.hosts["h2"].vtep
        assert ping(vm2.netns, vm1.ipv4) == 5


def test_aborted_migration_leaves_everything_as_before(lab_conf, prefix):
    with lab_site(lab_conf, prefix, orchestrated=True) as site:
        lab = site.lab
        vm1, vm2 = lab.vms["vm1"], lab.vms["vm2"]
        h1_vtep = lab.hosts["h1"].vtep
        hyper = LabHypervisor(lab, site.dispatchers, qemu_rarp=False)
        from vmm_orchestrator.model import Migration

        mig = Migration("mig-abort", vm1.workload, "h1", "h2")

        def emit(host: str, phase: Phase, role: Role):
            event = MigrationEvent(mig, phase, role, 0.0)
            return site.dispatchers[host].submit(event).result(timeout=30)

        assert emit("h2", Phase.PREPARE, Role.DESTINATION).ok
        # PREPARE expects the MAC on its port (not there yet): no pin, a filter
        assert site.hosts["h2"].nve.expectations(VNI) == {(vm1.mac, vm1.port)}
        assert site.hosts["h2"].nve.master_port(VNI, vm1.mac) is None
        assert emit("h1", Phase.SWITCHOVER, Role.SOURCE).ok
        assert site.hosts["h1"].nve.master_port(VNI, vm1.mac) == "vi-100"
        assert site.client().get_endpoint(VNI, vm1.mac)["pending_nve"] == "h2"
        # the migration fails: both ends are told
        assert emit("h2", Phase.ABORTED, Role.DESTINATION).ok
        assert emit("h1", Phase.ABORTED, Role.SOURCE).ok
        endpoint = site.client().get_endpoint(VNI, vm1.mac)
        assert (endpoint["nve"], endpoint["seq"], endpoint["pending_nve"]) == ("h1", 0, None)
        assert site.hosts["h1"].nve.master_port(VNI, vm1.mac) == vm1.port
        assert site.hosts["h2"].nve.master_port(VNI, vm1.mac) == "vx-100"
        assert site.hosts["h2"].nve.vxlan_dst(VNI, vm1.mac) == h1_vtep
        assert site.hosts["h2"].nve.expectations(VNI) == set()
        assert ping(vm2.netns, vm1.ipv4) == 5
        del hyper
