"""The OVN plugin against a real OVN lab (OVS userspace datapath in namespaces).

One lab per module (bring-up about 2 s, teardown about 1 s); each test uses
its own VM so the tests do not depend on each other's order. Needs root
(namespaces) and Debian's ovn-central, ovn-host and openvswitch-switch.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Iterator

import pytest

from vmm_orchestrator.errors import TransientError
from vmm_orchestrator.model import Migration, Phase, Role, Vif, Workload
from vmm_orchestrator.nva import errors as nva_errors
from vmm_orchestrator.options import new_conf
from vmm_orchestrator.stage import HostContext, StageContext

lab_mod = pytest.importorskip("vmm_lab.ovn.lab")
from vmm_lab.ovn import demo  # noqa: E402
from vmm_ovn.announce import OvnAnnouncer  # noqa: E402
from vmm_ovn.chassis import OvnChassis  # noqa: E402
from vmm_ovn.directory import OvnNbDirectory  # noqa: E402
from vmm_ovn.nve import OvnNve  # noqa: E402
from vmm_ovn.stages import OvnConvergence  # noqa: E402

VNI = demo.VNI
PLACEMENT = [
    ("vm1", "ch1"),  # the orchestrated migration
    ("vm2", "ch1"),  # peer on the source chassis
    ("vm3", "ch3"),  # peer on a third chassis
    ("vm4", "ch1"),  # the directory test's port
    ("vm5", "ch1"),  # the barrier test's port
    ("vm6", "ch1"),  # the stalled-controller test's port
    ("vm7", "ch1"),  # the Neutron-managed convergence test's port
]

pytestmark = pytest.mark.skipif(
    bool(lab_mod.missing_binaries()),
    reason="OVN/OVS not installed: apt-get install ovn-central ovn-host openvswitch-switch",
)


def _namespaces(prefix: str) -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(prefix)]


@pytest.fixture(scope="module")
def lab() -> Iterator[lab_mod.OvnLab]:
    prefix = lab_mod.new_prefix()
    with lab_mod.ovn_lab(prefix, vms=PLACEMENT, vni=VNI) as running:
        yield running
    assert _namespaces(prefix) == [], "the OVN lab left namespaces behind"


def _vif(vm: lab_mod.Vm) -> Vif:
    return Vif(mac=vm.mac, vni=VNI, ipv4=(vm.ipv4,), ipv6=(vm.ipv6,), port=vm.name)


def test_lab_teardown_leaves_nothing_even_on_failure() -> None:
    prefix = lab_mod.new_prefix()
    seen: dict[str, object] = {}
    with pytest.raises(RuntimeError, match="boom"):
        with lab_mod.ovn_lab(prefix, chassis=1, vms=[("vm1", "ch1")]) as small:
            seen["namespaces"] = list(small.namespaces)
            seen["workdir"] = small.workdir
            pids = []
            for pidfile in small.pidfiles:
                with open(pidfile, encoding="ascii") as f:
                    pids.append(int(f.read().strip()))
            seen["pids"] = pids
            # The lab really works before it is torn down: vm1's port is installed.
            out = small.chassis["ch1"].vsctl(
                "get", "Interface", "vm1-p0", "external_ids:ovn-installed"
            )
            assert out.strip().strip('"') == "true"
            raise RuntimeError("boom")
    assert len(seen["pids"]) == 2 + 1 + 3  # NB, SB, northd; ovsdb, vswitchd, controller
    assert _namespaces(prefix) == []
    assert not os.path.exists(str(seen["workdir"]))
    for pid in seen["pids"]:  # type: ignore[attr-defined]
        alive = os.path.exists(f"/proc/{pid}")
        if alive:  # a zombie waiting for init is dead too
            with open(f"/proc/{pid}/stat", encoding="ascii") as f:
                alive = f.read().split(")")[-1].split()[0] != "Z"
        assert not alive, f"daemon {pid} survived the teardown"


def test_barrier_waits_for_ovn_installed(lab: lab_mod.OvnLab) -> None:
    vm = lab.vms["vm5"]
    chassis = OvnChassis(lab.chassis["ch2"].db, barrier_timeout=10.0)
    try:
        # A port whose logical port does not exist is never installed: the barrier holds.
        lab.chassis["ch2"].vsctl(
            "add-port", "br-int", "ghost", "--", "set", "Interface", "ghost", "type=internal",
            "external_ids:iface-id=no-such-lsp", "external_ids:attached-mac=0a:00:00:00:0f:0f",
        )  # fmt: skip
        held = chassis.wait_ready("0a:00:00:00:0f:0f", timeout=0.5)
        assert not held.ok and "not installed" in held.reason
        # The destination's port of a multi-chassis binding: plugged, then installed.
        lab.nbctl("set", "Logical_Switch_Port", vm.lsp, 'options:requested-chassis="ch1,ch2"')
        port = lab.preplug(vm, "ch2")
        result = chassis.wait_ready(vm.mac, port)
        installed = lab.chassis["ch2"].vsctl("get", "Interface", port, "external_ids:ovn-installed")
        assert result.ok, result.reason
        assert installed.strip().strip('"') == "true"
        assert result.port == port and result.iface_id == vm.lsp
        assert result.installed_ts_ms is not None
        print(f"barrier: plug -> ovn-installed waited {result.waited_ms:.1f} ms")
    finally:
        lab.chassis["ch2"].vsctl("--if-exists", "del-port", "br-int", "ghost")
        lab.cancel(vm)
        chassis.close()


def test_barrier_holds_while_ovn_controller_is_stalled(lab: lab_mod.OvnLab) -> None:
    """The loaded-host case: ovn-controller claims late. plug() must not report the
    VM ready before the flows exist, and must pass as soon as they do."""
    vm = lab.vms["vm6"]
    ctl = lab.chassis["ch2"].controller_ctl()
    chassis = OvnChassis(lab.chassis["ch2"].db, barrier_timeout=0.5)
    nve = OvnNve(chassis)
    resumer: threading.Timer | None = None
    try:
        lab.nbctl("set", "Logical_Switch_Port", vm.lsp, 'options:requested-chassis="ch1,ch2"')
        subprocess.run(["ovn-appctl", "-t", ctl, "debug/pause"], check=True, capture_output=True)
        port = lab.preplug(vm, "ch2")
        with pytest.raises(TransientError, match="not installed"):
            nve.plug(VNI, vm.mac, port, [vm.ipv4])
        chassis.barrier_timeout = 10.0
        resumer = threading.Timer(
            0.8, subprocess.run, (["ovn-appctl", "-t", ctl, "debug/resume"],), {"check": True}
        )
        started = time.monotonic()
        resumer.start()
        nve.plug(VNI, vm.mac, port, [vm.ipv4])
        waited = (time.monotonic() - started) * 1000.0
        barrier = nve.last_barrier[vm.mac]
        assert barrier.ok and barrier.installed_ts_ms is not None
        assert 800.0 <= waited < 10000.0
        print(f"barrier held {waited:.0f} ms while ovn-controller was paused for 800 ms")
    finally:
        if resumer is not None:
            resumer.join()
        subprocess.run(["ovn-appctl", "-t", ctl, "debug/resume"], capture_output=True)
        lab.cancel(vm)
        nve.close()


def test_packet_out_announcement_updates_a_peers_neighbours(lab: lab_mod.OvnLab) -> None:
    """GARP (IPv4), unicast ARP reply (to a 'gateway') and unsolicited NA (IPv6,
    Override) injected from the VM's own port reach a peer on another chassis
    and replace its stale entries."""
    vm, peer = lab.vms["vm2"], lab.vms["vm3"]
    wrong = "0a:00:00:00:00:99"
    for addr in (vm.ipv4, vm.ipv6):
        lab.ns_run(
            peer.netns, "ip", "neigh", "replace", addr, "lladdr", wrong,
            "dev", peer.link, "nud", "stale",
        )  # fmt: skip
    chassis = OvnChassis(lab.chassis[vm.chassis].db)
    try:
        announcer = OvnAnnouncer(chassis, [0], gateways=[(peer.ipv4, peer.mac)], activation=False)
        handle = announcer.announce(_vif(vm))
        assert handle.errors == [] and handle.frames_sent == 3  # GARP, ARP reply, NA
        assert handle.port == vm.port and handle.barrier is not None and handle.barrier.ok

        def entries() -> dict[str, str]:
            found = {}
            for addr in (vm.ipv4, vm.ipv6):
                found[addr] = lab.ns_run(peer.netns, "ip", "neigh", "show", addr, "dev", peer.link)
            return found

        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            seen = entries()
            if all(vm.mac in out for out in seen.values()):
                break
            time.sleep(0.02)
        assert vm.mac in seen[vm.ipv4], f"IPv4 entry not updated: {seen[vm.ipv4]!r}"
        assert vm.mac in seen[vm.ipv6], f"IPv6 entry not updated by the NA: {seen[vm.ipv6]!r}"
    finally:
        chassis.close()


def test_orchestrated_migration_loses_nothing_after_resume(lab: lab_mod.OvnLab) -> None:
    conf = new_conf()
    settings = demo.Settings(
        rate=200, warmup_s=0.5, downtime_ms=250.0, observe_s=1.5, neutron_delay_s=0.8
    )
    orch = demo.Orchestrators(conf, lab)
    try:
        result = demo.run_mode(conf, lab, demo.MODE_ORCHESTRATED, "vm1", settings, orch)
    finally:
        orch.close()
    print(demo.render([result]))
    assert result.errors == []
    assert len(result.streams) == 5
    assert all(s.sent > 0 and s.converged for s in result.streams)
    # The pause really fell inside the streams (a paused VM receives nothing) ...
    assert all(s.lost_while_paused > 0 for s in result.streams)
    # ... and nothing was lost once it ran at the destination.
    assert result.lost_after_resume == 0
    assert set(result.convergence_ms) == {"ch1", "ch2", "ch3"}
    assert all(v is not None for v in result.convergence_ms.values())
    assert result.first_announce_ms is not None
    assert lab.vms["vm1"].chassis == "ch2"
    options = lab.nbctl("get", "Logical_Switch_Port", "vm1", "options")
    assert "requested-chassis=ch2" in options and "activation-strategy" not in options


def test_nb_directory_prestage_commit_abort(lab: lab_mod.OvnLab) -> None:
    vm = lab.vms["vm4"]
    directory = OvnNbDirectory(lab.nb, lab.sb)
    try:

        def options() -> str:
            return lab.nbctl("get", "Logical_Switch_Port", vm.lsp, "options")

        before = options()
        staged = directory.prestage(VNI, vm.mac, "ch2", "m-abort")
        assert staged["state"] == "pending" and staged["pending_nve"] == "ch2"
        assert (
            'requested-chassis="ch1,ch2"' in options() and "activation-strategy=rarp" in options()
        )
        assert directory.prestage(VNI, vm.mac, "ch2", "m-abort")["repeat"] is True
        with pytest.raises(nva_errors.Conflict):
            directory.prestage(VNI, vm.mac, "ch3", "m-other")
        assert directory.abort(VNI, vm.mac, "m-abort")["restored"] is True
        assert options() == before
        assert directory.abort(VNI, vm.mac, "m-abort")["restored"] is False

        directory.prestage(VNI, vm.mac, "ch2", "m-commit")
        committed = directory.commit(VNI, vm.mac, "m-commit")
        assert committed["endpoint"]["nve"] == "ch2"
        assert "requested-chassis=ch2" in options() and "activation-strategy" not in options()
        acks = directory.acks(VNI, committed["revision"], timeout=5.0)
        assert set(acks) == {"ch1", "ch2", "ch3"}
        for ack in acks.values():
            assert ack["acked_revision"] >= committed["revision"]
            assert ack["acked_at"] >= committed["committed_at"] - 0.001
        assert directory.commit(VNI, vm.mac, "m-commit")["repeat"] is True

        # Duplicate address detection against the NB (a port that got vm4's
        # IPv4 around ovn-nbctl's own check) vetoes the next move.
        lab.nbctl(
            "lsp-add", "sw0", "dup", "--", "set", "Logical_Switch_Port", "dup",
            f'addresses="0a:00:00:00:0d:0d {vm.ipv4}"',
        )  # fmt: skip
        try:
            with pytest.raises(nva_errors.Conflict, match="duplicate address"):
                directory.prestage(VNI, vm.mac, "ch3", "m-dad")
            assert "vmm:migration-id" not in lab.nbctl(
                "get", "Logical_Switch_Port", vm.lsp, "external_ids"
            )
        finally:
            lab.nbctl("lsp-del", "dup")
        # With Neutron writing the NB, the directory never writes.
        readonly = OvnNbDirectory(lab.nb, lab.sb, neutron_managed=True)
        try:
            with pytest.raises(nva_errors.Conflict, match="Neutron"):
                readonly.prestage(VNI, vm.mac, "ch1", "m-neutron")
            assert readonly.get_nve("ch3")["vtep"] == lab.chassis["ch3"].ip
        finally:
            readonly.close()
    finally:
        directory.close()


def test_convergence_stage_when_neutron_writes_the_nb(lab: lab_mod.OvnLab) -> None:
    """With Neutron in charge the plugin only reads OVN (and bumps nb_cfg as
    --wait=hv does): the stage waits for Neutron's activation, then reports
    when each chassis applied it."""
    vm = lab.vms["vm7"]
    conf = new_conf()
    stage = OvnConvergence(conf)
    reader = OvnNbDirectory(lab.nb, lab.sb, neutron_managed=True)
    vif = _vif(vm)
    migration = Migration("neutron-move", Workload(vm.name, (vif,)), "ch1", "ch2")
    ctx = StageContext(
        migration=migration,
        phase=Phase.RESUMED,
        role=Role.DESTINATION,
        host=HostContext(name="ch2", nva=None, services={"ovn_reader": reader}),
        deadline=time.monotonic() + 10.0,
    )
    # "Neutron" activates the destination's binding 0.3 s after the resume.
    neutron = threading.Timer(
        0.3, lab.nbctl, ("set", "Logical_Switch_Port", vm.lsp, "options:requested-chassis=ch2")
    )
    try:
        neutron.start()
        record = stage.run(ctx)
    finally:
        neutron.join()
        reader.close()
    notes = ctx.notes
    assert set(notes["ovn_convergence_ms"]) == {"ch1", "ch2", "ch3"} == set(record["chassis"])
    assert notes["ovn_laggards"] == []
    assert notes["ovn_bound_ms"] >= 250.0
    assert all(ms >= notes["ovn_bound_ms"] - 1.0 for ms in notes["ovn_convergence_ms"].values())
    print(f"Neutron-managed convergence: {notes}")
