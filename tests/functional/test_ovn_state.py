"""State on OVN: a TCP session through a stateful ACL survives a migration only
if the VM's conntrack entries move from the source chassis' zone to the
destination's (:mod:`vmm_lab.ovn.state_demo`, through the ``ovn_conntrack`` kind).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from vmm_orchestrator.model import Vif
from vmm_orchestrator.options import new_conf

lab_mod = pytest.importorskip("vmm_lab.ovn.lab")
from vmm_lab.ovn import demo, state_demo  # noqa: E402
from vmm_orchestrator.statekind import KindContext, PoisonedEntry  # noqa: E402

pytestmark = pytest.mark.skipif(
    bool(lab_mod.missing_binaries()),
    reason="OVN/OVS not installed: apt-get install ovn-central ovn-host openvswitch-switch",
)


@pytest.fixture(scope="module")
def lab() -> Iterator[lab_mod.OvnLab]:
    with lab_mod.ovn_lab(lab_mod.new_prefix(), vms=state_demo.PLACEMENT, vni=demo.VNI) as running:
        state_demo.secure(running, ["vm1", "vm4"])
        yield running


def test_tcp_survives_through_stateful_acl_only_with_moved_conntrack(lab: lab_mod.OvnLab) -> None:
    conf = new_conf()
    orch = demo.Orchestrators(conf, lab)
    try:
        without = state_demo.migrate_download(lab, orch, "vm1", move_state=False)
        with_state = state_demo.migrate_download(lab, orch, "vm4", move_state=True)
    finally:
        orch.close()
    print(f"\nwithout state: {without}\nwith state: {with_state}")
    # Baseline: the peer's packets are ct.new in the destination's zone and the
    # to-lport ACL drops them; the VM only ACKs, so nothing reopens the entry.
    assert without["received_before"] > 0
    assert without["stall_ms"] is None or without["stall_ms"] > 1000.0
    # With the VM's entry moved into the destination's zone, the stream resumes
    # with the peer's next retransmission and the connection survives.
    assert [e["dport"] for e in with_state["moved"]] == [state_demo.PORT + 4]
    assert with_state["installed"] == 1
    assert with_state["error"] is None
    assert with_state["stall_ms"] is not None and with_state["stall_ms"] < 1000.0
    assert with_state["bytes_after"] > 100 * 1024
    assert any(
        e.dport == state_demo.PORT + 4 and e.state == "ESTABLISHED"
        for e in with_state["dst_entries"]
    )


def test_state_kind_refuses_entries_of_other_addresses(lab: lab_mod.OvnLab) -> None:
    vm = lab.vms["vm2"]
    vif = Vif(mac=vm.mac, vni=demo.VNI, ipv4=(vm.ipv4,), ipv6=(vm.ipv6,), port=vm.name)
    ctx = KindContext(netns=None, vifs=(vif,), migration_id="poison")
    kind = state_demo.state_kind(lab, "ch1")
    poisoned = {"lsp": "vm2", "proto": "tcp", "src": "10.0.0.3", "dst": "10.0.0.4",
                "sport": 1, "dport": 2, "zone": 1}  # fmt: skip
    with pytest.raises(PoisonedEntry):
        kind.check(ctx, poisoned)
    kind.check(ctx, {**poisoned, "src": vm.ipv4})
