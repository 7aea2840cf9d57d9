"""State on OVN, as a demo: a TCP download through a stateful ACL (security
group) across a migration, with and without moving the VM's conntrack
entries (the ``ovn_conntrack`` state kind: dump-conntrack at the source
chassis, ct(commit) packet-outs into the destination's zone).

Security group on each migrating VM's port: ``from-lport allow-related``
and ``to-lport drop`` (nothing may open a session to the VM). The peer
(vm3, ch3) streams 1 KiB every 5 ms to the VM, which only ACKs: without its
entry the destination's zone sees the peer's packets as ``ct.new`` and drops
them, and nothing the VM sends reopens it.

Entry point for ``vmm lab state-demo --backend ovn``: :func:`run_state_demo`.
The export runs before the SWITCHOVER's switch (``state_delta`` before
``inflight_tunnel`` on OVN): the switch releases the port at the source,
whose zone then goes.
"""

from __future__ import annotations

import socket
import sys
import threading
import time
from typing import Any

from oslo_config import cfg

from vmm_kernel.netns import socket_in
from vmm_lab.ovn import demo
from vmm_lab.ovn import lab as lab_mod
from vmm_orchestrator import options
from vmm_orchestrator.model import Migration, Phase, Role, Vif, Workload
from vmm_orchestrator.statekind import KindContext
from vmm_ovn import conntrack
from vmm_ovn.chassis import OvnChassis
from vmm_ovn.state import OvnConntrackKind

PLACEMENT = [("vm1", "ch1"), ("vm2", "ch1"), ("vm3", "ch3"), ("vm4", "ch1")]
PORT = 5001
DOWNTIME_S = 0.25
OBSERVE_S = 3.0


def secure(lab: lab_mod.OvnLab, vms: list[str]) -> None:
    """The security group: the VMs may open sessions, nothing may open one to them."""
    for vm in vms:
        lab.nbctl(
            "acl-add", "sw0", "from-lport", "1002", f'inport == "{vm}" && ip4', "allow-related"
        )
        lab.nbctl("acl-add", "sw0", "to-lport", "1002", f'outport == "{vm}" && ip4', "drop")
    lab.nbctl("--wait=hv", "sync")


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


def state_kind(lab: lab_mod.OvnLab, chassis: str) -> OvnConntrackKind:
    """The state kind as the agent of ``chassis`` would configure it ([ovn])."""
    conf = options.new_conf()
    kind = OvnConntrackKind(conf)
    conf.set_override("ovsdb_connection", lab.chassis[chassis].db, group="ovn")
    conf.set_override("vswitchd_ctl", lab.chassis[chassis].vswitchd_ctl, group=kind.group)
    return kind


def migrate_download(
    lab: lab_mod.OvnLab, orch: demo.Orchestrators, name: str, move_state: bool
) -> dict[str, Any]:
    """Migrate ``name`` ch1 -> ch2 during a download from vm3; the figures."""
    vm, peer = lab.vms[name], lab.vms["vm3"]
    vif = Vif(mac=vm.mac, vni=demo.VNI, ipv4=(vm.ipv4,), ipv6=(vm.ipv6,), port=vm.name)
    mig = Migration(f"{name}-ct", Workload(name, (vif,)), "ch1", "ch2")
    download = Download(lab, vm, peer, PORT + int(name[-1]))
    figures: dict[str, Any] = {}
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
            exporter, importer = state_kind(lab, "ch1"), state_kind(lab, "ch2")
            for kind in (exporter, importer):  # long-lived in an agent: connect them now
                assert kind.unavailable(ctx) is None
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
            time.sleep(max(0.0, paused_at + DOWNTIME_S - time.monotonic()))
            resumed_at = lab.resume(vm)
            resumed = orch.submit("ch2", mig, Phase.RESUMED, Role.DESTINATION, resumed_at)
            assert resumed.result(30).ok
            time.sleep(max(0.0, resumed_at + OBSERVE_S - time.monotonic()))
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


def run_state_demo(conf: cfg.ConfigOpts | None = None) -> int:
    """Both runs on one lab and a side-by-side table; 0 only if the session survived
    with state and the baseline showed the stall it fixes."""
    if conf is None:
        conf = options.new_conf()
    with lab_mod.ovn_lab(vms=PLACEMENT, vni=demo.VNI) as lab:
        secure(lab, ["vm1", "vm4"])
        orch = demo.Orchestrators(conf, lab)
        try:
            runs = {
                "without state": migrate_download(lab, orch, "vm1", move_state=False),
                "with ovn_conntrack": migrate_download(lab, orch, "vm4", move_state=True),
            }
        finally:
            orch.close()
    rows = [
        {
            "mode": mode,
            "moved": len(r.get("moved", [])),
            "moved_ms": r.get("moved_ms", "-"),
            "stall": "none in 3 s" if r["stall_ms"] is None else f"{r['stall_ms']:.1f}",
            "kib": r["bytes_after"] // 1024,
            "survived": "yes" if r["stall_ms"] is not None and r["error"] is None else "NO",
        }
        for mode, r in runs.items()
    ]
    from vmm_lab.linux import probe

    print("== TCP download through a stateful ACL, VM ch1 -> ch2 (OVN lab) ==")
    print(
        probe.format_table(
            rows,
            [
                ("mode", "mode"),
                ("moved", "entries moved"),
                ("moved_ms", "pause->imported ms"),
                ("stall", "resume->first data ms"),
                ("kib", "KiB after resume"),
                ("survived", "session survived"),
            ],
        )
    )
    ok = rows[1]["survived"] == "yes" and rows[0]["survived"] == "NO"
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(run_state_demo())
