"""State on OVN: a TCP session through a stateful ACL survives a migration only
if the VM's conntrack entries move from the source chassis' zone to the
destination's (userspace datapath: dump-conntrack, then packet-out with
ct(commit,zone=Z)).

The session is a download: the peer (vm3, ch3) streams to the migrating VM,
which only ACKs. Security group on the VM's port: from-lport allow-related,
to-lport drop (nothing may open a session to the VM).
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest
from oslo_config import cfg

lab_mod = pytest.importorskip("vmm_ovn.lab")
from vmm_orchestrator.model import Migration, Phase, Role, Vif, Workload  # noqa: E402
from vmm_ovn import conntrack, demo  # noqa: E402
from vmm_ovn.chassis import OvnChassis  # noqa: E402
from vmm_ovn.netns import socket_in  # noqa: E402
from vmm_ovn.state import OvnConntrackKind  # noqa: E402
from vmm_state.kind import KindContext, PoisonedEntry  # noqa: E402

pytestmark = pytest.mark.skipif(
    bool(lab_mod.missing_binaries()),
    reason="OVN/OVS not installed: apt-get install ovn-central ovn-host openvswitch-switch",
)

PLACEMENT = [("vm1", "ch1"), ("vm2", "ch1"), ("vm3", "ch3"), ("vm4", "ch1")]
PORT = 5001


@pytest.fixture(scope="module")
def lab() -> Iterator[lab_mod.OvnLab]:
    with lab_mod.ovn_lab(lab_mod.new_prefix(), vms=PLACEMENT, vni=demo.VNI) as running:
        for vm in ("vm1", "vm4"):
            running.nbctl(
                "acl-add", "sw0", "from-lport", "1002", f'inport == "{vm}" && ip4', "allow-related"
            )
            running.nbctl("acl-add", "sw0", "to-lport", "1002", f'outport == "{vm}" && ip4', "drop")
        running.nbctl("--wait=hv", "sync")
        yield running


class Download:
    """vm3 streams 1 KiB every 5 ms to the VM; the VM's receive times are kept."""

    def __init__(self, lab: lab_mod.OvnLab, vm: lab_mod.Vm, peer: lab_mod.Vm, port: int) -> None:
        self.stop = threading.Event()
        self.received: list[tuple[float, int]] = []
        self.error: str | None = None
        self.srv = socket_in(peer.netns, socket.AF_INET, socket.SOCK_STREAM)
        self.srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.srv.bind((peer.ipv4, port))
        self.srv.listen(1)
        self.cli = socket_in(vm.netns, socket.AF_INET, socket.SOCK_STREAM)
        self.cli.settimeout(5)
        self.cli.connect((peer.ipv4, port))
        self.conn, _ = self.srv.accept()
        self.threads = [
            threading.Thread(target=self._send, daemon=True),
            threading.Thread(target=self._recv, daemon=True),
        ]
        for t in self.threads:
            t.start()

    def _send(self) -> None:
        chunk = b"d" * 1024
        try:
            while not self.stop.is_set():
                self.conn.sendall(chunk)
                time.sleep(0.005)
        except OSError as exc:
            self.error = f"sender: {exc}"

    def _recv(self) -> None:
        self.cli.settimeout(0.2)
        while not self.stop.is_set():
            try:
                data = self.cli.recv(65536)
            except TimeoutError:
                continue
            except OSError as exc:
                self.error = f"receiver: {exc}"
                return
            if not data:
                self.error = "connection closed"
                return
            self.received.append((time.monotonic(), len(data)))

    def first_after(self, t: float) -> float | None:
        later = [at for at, _ in self.received if at > t]
        return later[0] if later else None

    def close(self) -> None:
        self.stop.set()
        for s in (self.cli, self.conn, self.srv):
            s.close()
        for t in self.threads:
            t.join(timeout=2)


def _kind(lab: lab_mod.OvnLab, chassis: str) -> OvnConntrackKind:
    conf = cfg.ConfigOpts()
    conf([], project="vmm-orchestrator-test", default_config_files=[])
    kind = OvnConntrackKind(conf)
    conf.set_override("ovsdb_connection", lab.chassis[chassis].db, group="ovn")
    conf.set_override("vswitchd_ctl", lab.chassis[chassis].vswitchd_ctl, group=kind.group)
    return kind


def _migrate(lab: lab_mod.OvnLab, orch: demo.Orchestrators, name: str, move_state: bool) -> dict:
    vm, peer = lab.vms[name], lab.vms["vm3"]
    vif = Vif(mac=vm.mac, vni=demo.VNI, ipv4=(vm.ipv4,), ipv6=(vm.ipv6,), port=vm.name)
    mig = Migration(f"{name}-ct", Workload(name, (vif,)), "ch1", "ch2")
    download = Download(lab, vm, peer, PORT + int(name[-1]))
    figures: dict = {}
    try:
        time.sleep(0.5)
        lab.preplug(vm, "ch2")
        assert (
            orch.submit("ch2", mig, Phase.PREPARE, Role.DESTINATION, time.monotonic()).result(30).ok
        )
        src, dst = OvnChassis(lab.chassis["ch1"].db), OvnChassis(lab.chassis["ch2"].db)
        try:
            dst_zone = dst.db.wait_for(lambda: dst.ct_zone(vm.lsp), 5.0)
            src_zone = src.ct_zone(vm.lsp)
            assert src_zone and dst_zone, "no conntrack zone for the port on both chassis"
            before = len(download.received)
            ctx = KindContext(netns=None, vifs=(vif,), migration_id=mig.id)
            exporter, importer = _kind(lab, "ch1"), _kind(lab, "ch2")
            paused_at = lab.pause(vm)
            if move_state:
                # Through the state kind, as the state stages carry it. The export
                # comes first at SWITCHOVER (state_delta before inflight_tunnel):
                # the switch releases the port at the source, whose zone goes.
                exported = list(exporter.export(ctx))
            switchover = orch.submit("ch1", mig, Phase.SWITCHOVER, Role.SOURCE, paused_at)
            if move_state:
                for entry in exported:
                    importer.check(ctx, entry)
                result = importer.import_(ctx, exported)
                assert result.ok, result.detail
                figures["moved"] = exported
                figures["installed"] = result.installed
                figures["moved_ms"] = round((time.monotonic() - paused_at) * 1000.0, 1)
            assert switchover.result(30).ok
            time.sleep(max(0.0, paused_at + 0.25 - time.monotonic()))
            resumed_at = lab.resume(vm)
            resumed = orch.submit("ch2", mig, Phase.RESUMED, Role.DESTINATION, resumed_at)
            assert resumed.result(30).ok
            time.sleep(max(0.0, resumed_at + 3.0 - time.monotonic()))
            assert (
                orch.submit("ch1", mig, Phase.COMPLETED, Role.SOURCE, time.monotonic())
                .result(30)
                .ok
            )
            lab.finish(vm)
            first = download.first_after(resumed_at)
            figures.update(
                received_before=before,
                stall_ms=None if first is None else round((first - resumed_at) * 1000.0, 1),
                bytes_after=sum(n for at, n in download.received if at > resumed_at),
                error=download.error,
                dst_entries=conntrack.dump(lab.chassis["ch2"].vswitchd_ctl, dst_zone),
            )
        finally:
            src.close()
            dst.close()
    finally:
        download.close()
    return figures


def test_tcp_survives_through_stateful_acl_only_with_moved_conntrack(lab: lab_mod.OvnLab) -> None:
    conf = cfg.ConfigOpts()
    conf([], project="vmm-orchestrator-test", default_config_files=[])
    orch = demo.Orchestrators(conf, lab)
    try:
        without = _migrate(lab, orch, "vm1", move_state=False)
        with_state = _migrate(lab, orch, "vm4", move_state=True)
    finally:
        orch.close()
    print(f"\nwithout state: {without}\nwith state: {with_state}")
    # Baseline: the peer's packets are ct.new in the destination's zone and the
    # to-lport ACL drops them; the VM only ACKs, so nothing reopens the entry.
    assert without["received_before"] > 0
    assert without["stall_ms"] is None or without["stall_ms"] > 1000.0
    # With the VM's entry moved into the destination's zone, the stream resumes
    # with the peer's next retransmission and the connection survives.
    assert [e["dport"] for e in with_state["moved"]] == [PORT + 4]
    assert with_state["installed"] == 1
    assert with_state["error"] is None
    assert with_state["stall_ms"] is not None and with_state["stall_ms"] < 1000.0
    assert with_state["bytes_after"] > 100 * 1024
    assert any(e.dport == PORT + 4 and e.state == "ESTABLISHED" for e in with_state["dst_entries"])


def test_state_kind_refuses_entries_of_other_addresses(lab: lab_mod.OvnLab) -> None:
    vm = lab.vms["vm2"]
    vif = Vif(mac=vm.mac, vni=demo.VNI, ipv4=(vm.ipv4,), ipv6=(vm.ipv6,), port=vm.name)
    ctx = KindContext(netns=None, vifs=(vif,), migration_id="poison")
    kind = _kind(lab, "ch1")
    poisoned = {"lsp": "vm2", "proto": "tcp", "src": "10.0.0.3", "dst": "10.0.0.4",
                "sport": 1, "dport": 2, "zone": 1}  # fmt: skip
    with pytest.raises(PoisonedEntry):
        kind.check(ctx, poisoned)
    kind.check(ctx, {**poisoned, "src": vm.ipv4})
