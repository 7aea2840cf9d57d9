"""Warm plans without a kernel: the plan syntax, the mirror's identity, how a
real migration is matched to a plan, and configured plans that wait for the
directory (vmm_state.warm). The transfer itself is proven in the lab:
tests/functional/test_state_warm.py."""

from __future__ import annotations

import secrets
import time
from typing import Any

import pytest
from oslo_config import cfg

from vmm_orchestrator.errors import ConfigError, TransientError
from vmm_orchestrator.model import Migration, Vif, Workload
from vmm_state import warm
from vmm_state.service import StateHost, StateSettings
from vmm_state.wire import MID_RE

VIF = Vif("52:54:00:00:64:0a", 100, ("198.19.100.10",), ("fd00:100::10",), "tap-vm1")
VM = Workload("vm1", (VIF,))


def host(name: str) -> StateHost:
    key = secrets.token_bytes(32)
    settings = StateSettings(key_id="t", key=key, verify_keys={"t": key}, token="tok")
    return StateHost(name, None, {}, settings)


class Directory:
    """An NvaClient stand-in: unreachable for the first ``down`` calls."""

    def __init__(self, down: int = 0, at: str = "h1", pending: str | None = None) -> None:
        self.down = down
        self.calls = 0
        self.at, self.pending = at, pending

    def get_endpoint(self, vni: int, mac: str) -> dict[str, Any]:
        self.calls += 1
        if self.calls <= self.down:
            raise TransientError("the directory is not reachable")
        return {
            "vni": vni,
            "mac": mac,
            "ipv4": list(VIF.ipv4),
            "ipv6": list(VIF.ipv6),
            "nve": self.at,
            "pending_nve": self.pending,
        }


def test_plan_lines_parse_and_bad_ones_say_why() -> None:
    spec = warm.PlanSpec.parse("vm1 h1 h2 100:52:54:00:00:64:0A,200:52:54:00:00:64:0b")
    assert (spec.name, spec.source, spec.destination) == ("vm1", "h1", "h2")
    assert spec.nics == ((100, "52:54:00:00:64:0a"), (200, "52:54:00:00:64:0b"))
    for bad in ("vm1 h1 h2", "vm1 h1 h2 52:54:00:00:64:0a", "vm1 h1 h2 x:52:54", "vm1 h1 h1 1:aa"):
        with pytest.raises(ConfigError):
            warm.PlanSpec.parse(bad)


def test_the_mirror_identity_is_the_same_everywhere_and_a_valid_migration_id() -> None:
    a = warm.mirror_migration(VM, "h1", "h2")
    assert a == warm.mirror_migration(VM, "h1", "h2")
    assert MID_RE.match(a.id) and a.id == warm.mirror_id("vm1", "h1", "h2")
    assert a.id != warm.mirror_id("vm1", "h2", "h1") != warm.mirror_id("vm2", "h1", "h2")
    assert a.workload.vifs[0].port is None  # the plan's description needs no hypervisor data


def test_a_migration_matches_its_plan_only() -> None:
    plan = warm.Plan(warm.mirror_migration(VM, "h1", "h2"), time.monotonic() + 60)
    assert plan.matches(Migration("mig-1", VM, "h1", "h2"))
    assert not plan.matches(Migration("mig-2", VM, "h1", "h3"))
    other_nic = Workload("vm1", (Vif("52:54:00:00:64:0b", 100, VIF.ipv4, VIF.ipv6, "t"),))
    assert not plan.matches(Migration("mig-3", other_nic, "h1", "h2"))


def test_configured_plans_wait_for_the_directory_and_expire() -> None:
    conf = cfg.ConfigOpts()
    conf(args=[], default_config_files=[])
    warm.register_opts(conf)
    conf.set_override(
        "plan", ["vm1 h1 h2 100:52:54:00:00:64:0a", "vm9 h3 h4 100:52:54:00:00:64:99"], "state_warm"
    )
    conf.set_override("interval", 0.1, "state_warm")
    conf.set_override("lifetime", 1.0, "state_warm")
    dst = host("h2")
    directory = Directory(down=2)
    service = warm.WarmService.from_conf(conf, dst, nva=directory)
    try:
        assert [s.name for s in service.pending] == ["vm1"]  # vm9's plan is not this host's
        deadline = time.monotonic() + 10
        while service.pending and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not service.pending and directory.calls >= 3
        plan = service.find(Migration("mig-1", VM, "h1", "h2"))
        assert plan is not None and plan.migration.workload.vifs[0].ipv4 == VIF.ipv4
        while plan.ended is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert plan.ended == "the plan's lifetime is over"
        assert service.find(Migration("mig-1", VM, "h1", "h2")) is None
    finally:
        service.close()


def test_a_plan_taken_over_is_left_to_its_migration() -> None:
    dst = host("h2")
    service = warm.WarmService(dst, interval=0.05, lifetime=0.2)
    try:
        plan = service.plan(VM, "h1", "h2")
        service.hand_over(plan, Migration("mig-1", VM, "h1", "h2"))
        time.sleep(0.5)
        assert plan.ended is None  # no expiry while a migration holds it
        service.cancel(plan.migration.id)
        assert plan.ended == "cancelled" and plan.handed_over == "mig-1"
    finally:
        service.close()


def test_the_state_service_entry_point_attaches_the_configured_plans() -> None:
    from vmm_orchestrator.contracts import HostSpec
    from vmm_orchestrator.options import new_conf
    from vmm_state import options

    conf = new_conf()  # every plugin's options, registered once at load
    conf.set_override("key", secrets.token_hex(16), options.GROUP)
    conf.set_override("token", "tok", options.GROUP)
    spec = HostSpec("h2", "192.0.2.2", (100,), None, ":memory:")
    bare = warm.open_state_service(conf, spec, Directory(), {})
    assert warm.service_of(bare) is None  # no plan: nothing runs
    conf.set_override("plan", ["vm1 h1 h2 100:52:54:00:00:64:0a"], "state_warm")
    planned = warm.open_state_service(conf, spec, Directory(), {})
    service = warm.service_of(planned)
    try:
        assert service is not None
        assert service.find(Migration("mig-1", VM, "h1", "h2")) is not None
    finally:
        assert service is not None
        service.close()


@pytest.mark.parametrize(
    ("at", "pending"), [("h2", None), ("h1", "h2")], ids=["vm-elsewhere", "move-pending"]
)
def test_the_source_leaves_the_mirror_alone_unless_the_vm_is_here_and_staying(
    at: str, pending: str | None
) -> None:
    src = host("h1")
    service = warm.WarmService(src, interval=60, nva=Directory(at=at, pending=pending))
    try:
        plan = service.plan(VM, "h1", "h2")
        assert not service.here(plan)
        assert service.tick(plan) is None and plan.refreshes == []
        service.nva = Directory()
        assert service.here(plan)
    finally:
        service.close()
