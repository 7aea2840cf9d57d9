"""Cold mobility (issue 14 item 5, draft-ietf-nvo3-vmm section 7): the rule that a
domain started outside any migration is a candidate (phases), the per-NIC
verdict from the directory (phases.cold_verdict), and the libvirt agent's
cold move against a real in-memory directory with a recording data plane.
"""

from __future__ import annotations

import collections
import threading
import types
from typing import Any

import pytest

from vmm_libvirt import phases
from vmm_libvirt.daemon import HostAgent
from vmm_libvirt.phases import Cold, Event, Lifecycle, Observed, Tracker, cold_verdict
from vmm_orchestrator.model import Phase, Role, Vif, Workload
from vmm_orchestrator.nva.store import NvaStore
from vmm_orchestrator.stage import HostContext

UUID = "6c1f5e62-2b0c-4e43-9d7a-0a0b0c0d0e01"
VNI = 100
MAC = "52:54:00:00:64:0a"
STARTED_BOOTED = Lifecycle(Event.STARTED, phases.STARTED_BOOTED)
STARTED_RESTORED = Lifecycle(Event.STARTED, phases.STARTED_RESTORED)
STARTED_MIGRATED = Lifecycle(Event.STARTED, phases.STARTED_MIGRATED)


# -- the rule: which starts are cold-move candidates --------------------------------


@pytest.mark.parametrize("signal", [STARTED_BOOTED, STARTED_RESTORED])
def test_a_start_outside_any_migration_is_a_cold_move_candidate(signal: Lifecycle) -> None:
    decision = Tracker().apply(UUID, signal)
    assert decision.started and decision.transitions == ()


def test_a_migration_start_is_not_a_cold_move() -> None:
    decision = Tracker().apply(UUID, STARTED_MIGRATED)
    assert decision.started is None
    assert [(t.phase, t.role) for t in decision.transitions] == [(Phase.PREPARE, Role.DESTINATION)]


def test_a_boot_while_a_migration_was_under_way_aborts_it_and_is_no_cold_move() -> None:
    tracker = Tracker()
    tracker.apply(UUID, STARTED_MIGRATED)  # PREPARE ran here
    decision = tracker.apply(UUID, STARTED_BOOTED)
    assert decision.started is None
    assert [t.phase for t in decision.transitions] == [Phase.ABORTED]


def test_reconcile_checks_a_booted_domain_found_running() -> None:
    booted = Observed(True, phases.STATE_RUNNING, phases.RUNNING_BOOTED)
    migrated = Observed(True, phases.STATE_RUNNING, phases.RUNNING_MIGRATED)
    assert Tracker().reconcile({UUID: booted})[UUID].started
    assert Tracker().reconcile({UUID: migrated})[UUID].started is None


def test_other_lifecycle_events_are_no_cold_move() -> None:
    tracker = Tracker()
    for signal in (Lifecycle(Event.DEFINED, 0), Lifecycle(Event.RESUMED, 0)):
        assert tracker.apply(UUID, signal).started is None


# -- the verdict per NIC ----------------------------------------------------------------


def endpoint(**fields: Any) -> dict[str, Any]:
    base = {"mac": MAC, "nve": "h1", "state": "active", "moves": []}
    base.update(fields)
    return base


def test_cold_verdicts() -> None:
    now = 1000.0
    assert cold_verdict(endpoint(), "h2", now)[0] is Cold.MOVE
    assert cold_verdict(endpoint(), "h1", now)[0] is Cold.HERE
    pending = endpoint(state="pending", pending_nve="h3", migration_id="m1")
    assert cold_verdict(pending, "h2", now)[0] is Cold.IN_FLIGHT
    assert cold_verdict(endpoint(sticky=True), "h2", now)[0] is Cold.REFUSED
    verdict, reason = cold_verdict(endpoint(frozen=True, frozen_reason="6 moves"), "h2", now)
    assert verdict is Cold.REFUSED and "vmm nva endpoint release" in reason
    learned = {"at": now - 2, "from": "h1", "to": "h2", "planned": False}
    assert cold_verdict(endpoint(nve="h2", moves=[learned]), "h2", now)[0] is Cold.LEARNED
    old = dict(learned, at=now - 3600)
    assert cold_verdict(endpoint(nve="h2", moves=[old]), "h2", now)[0] is Cold.HERE
    planned = dict(learned, planned=True)
    assert cold_verdict(endpoint(nve="h2", moves=[planned]), "h2", now)[0] is Cold.HERE


# -- the agent's cold move against a real directory ----------------------------------------


class Recorder:
    """Stands in for the host's NVE driver and announcer pool; records the calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def ensure_vn(self, vni: int) -> None:
        self.calls.append(("ensure_vn", vni))

    def plug(self, vni: int, mac: str, port: str, addresses: Any) -> None:
        self.calls.append(("plug", vni, mac, port, tuple(addresses)))

    def unplug(self, vni: int, mac: str) -> None:
        self.calls.append(("unplug", vni, mac))

    def for_vni(self, vni: int) -> Recorder:
        return self

    def announce(self, vif: Vif, on_first_sent: Any = None) -> None:
        self.calls.append(("announce", vif.mac))


def agent_on(store: NvaStore, host: str, nve: Recorder, announcers: Recorder) -> Any:
    """A HostAgent without libvirt: only what _cold_start uses."""
    stub = types.SimpleNamespace(
        name=host,
        context=HostContext(host, store, {"nve": nve, "announcers": announcers}),
        _lock=threading.Lock(),
        _workloads={},
        cold_moves=collections.deque(maxlen=50),
        cold_ack_timeout=0.2,
        _live_workload=lambda uuid: None,
    )
    stub._pin_and_announce = types.MethodType(HostAgent._pin_and_announce, stub)
    return stub


def ack_when_moved(store: NvaStore, nve: str) -> None:
    """Acknowledge, as ``nve``'s agent would, the revision that moved the MAC."""
    for _ in range(100):
        ep = store.get_endpoint(VNI, MAC)
        if ep["seq"] == 1:
            store.ack(nve, ep["revision"])
            return
        threading.Event().wait(0.01)


def cold_start(store: NvaStore, nve: Recorder, ann: Recorder) -> Any:
    return HostAgent._cold_start(agent_on(store, "h2", nve, ann), UUID, "vm1", "boot", WORKLOAD)


VIF = Vif(mac=MAC, vni=VNI, ipv4=("198.19.100.10",), ipv6=("fd00:100::10",), port="vnet7")
WORKLOAD = Workload(name="vm1", vifs=(VIF,))


@pytest.fixture
def store() -> NvaStore:
    s = NvaStore(":memory:")
    for name, vtep in (("h1", "198.18.0.1"), ("h2", "198.18.0.2"), ("h3", "198.18.0.3")):
        s.register_nve(name, vtep, [VNI])
    return s


def test_a_vm_started_elsewhere_moves_as_one_planned_move(store: NvaStore) -> None:
    store.add_endpoint(VNI, MAC, list(VIF.ipv4), list(VIF.ipv6), "h1")
    nve, ann = Recorder(), Recorder()
    agent = agent_on(store, "h2", nve, ann)
    # h3 applies the move at once, h1 (where the VM was shut down) never acknowledges.
    h3_acks = threading.Thread(target=ack_when_moved, args=(store, "h3"))
    h3_acks.start()
    record = HostAgent._cold_start(agent, UUID, "vm1", "STARTED/BOOTED", WORKLOAD)
    h3_acks.join()

    ep = store.get_endpoint(VNI, MAC)
    assert (ep["nve"], ep["state"], ep["seq"]) == ("h2", "active", 1)
    assert ep["ipv4"] == ["198.19.100.10"] and ep["ipv6"] == ["fd00:100::10"]  # kept
    assert [m["planned"] for m in ep["moves"]] == [True]  # counted once, as planned
    assert ep["last_migration_id"].startswith(f"cold-{UUID}-")
    assert ("plug", VNI, MAC, "vnet7", ("198.19.100.10", "fd00:100::10")) in nve.calls
    assert ann.calls == [("announce", MAC)]
    assert record is not None and record["state_imported"] is False
    assert [m["from"] for m in record["moved"]] == ["h1"]
    assert "h1" in record["laggards"][MAC] and "h3" not in record["laggards"][MAC]
    assert list(agent.cold_moves) == [record]

    # The same start seen again (a reconciliation): the directory places it here already.
    again = agent_on(store, "h2", Recorder(), Recorder())
    assert HostAgent._cold_start(again, UUID, "vm1", "reconciled", WORKLOAD) is None
    assert store.get_endpoint(VNI, MAC)["seq"] == 1


def test_an_ordinary_boot_where_the_vm_lives_moves_nothing(store: NvaStore) -> None:
    store.add_endpoint(VNI, MAC, list(VIF.ipv4), [], "h2")
    nve, ann = Recorder(), Recorder()
    assert (
        HostAgent._cold_start(agent_on(store, "h2", nve, ann), UUID, "vm1", "boot", WORKLOAD)
        is None
    )
    assert nve.calls == [] and ann.calls == []
    assert store.get_endpoint(VNI, MAC)["seq"] == 0


def test_a_sticky_mac_does_not_follow_a_cold_start(store: NvaStore) -> None:
    store.add_endpoint(VNI, MAC, list(VIF.ipv4), [], "h1", sticky=True)
    nve, ann = Recorder(), Recorder()
    assert (
        HostAgent._cold_start(agent_on(store, "h2", nve, ann), UUID, "vm1", "boot", WORKLOAD)
        is None
    )
    assert store.get_endpoint(VNI, MAC)["nve"] == "h1"
    assert nve.calls == [] and ann.calls == []


def test_a_pending_live_migration_is_left_to_its_pipeline(store: NvaStore) -> None:
    store.add_endpoint(VNI, MAC, list(VIF.ipv4), [], "h1")
    store.prestage(VNI, MAC, "h3", "live-1")
    nve, ann = Recorder(), Recorder()
    assert (
        HostAgent._cold_start(agent_on(store, "h2", nve, ann), UUID, "vm1", "boot", WORKLOAD)
        is None
    )
    ep = store.get_endpoint(VNI, MAC)
    assert (ep["state"], ep["pending_nve"], ep["migration_id"]) == ("pending", "h3", "live-1")


def test_a_move_already_learned_by_the_nve_agent_is_pinned_and_announced(store: NvaStore) -> None:
    store.add_endpoint(VNI, MAC, list(VIF.ipv4), [], "h1")
    store.move(VNI, MAC, "h2")  # the NVE agent's local learning was quicker than the event
    nve, ann = Recorder(), Recorder()
    record = cold_start(store, nve, ann)
    assert record is not None and record["learned"] == [MAC]
    assert ("plug", VNI, MAC, "vnet7", ("198.19.100.10", "fd00:100::10")) in nve.calls
    assert ann.calls == [("announce", MAC)]
    assert store.get_endpoint(VNI, MAC)["seq"] == 1  # no second move


def test_a_refused_commit_is_undone(store: NvaStore, monkeypatch: pytest.MonkeyPatch) -> None:
    from vmm_orchestrator.nva import errors

    store.add_endpoint(VNI, MAC, list(VIF.ipv4), [], "h1")

    def refuse(*_a: Any) -> Any:
        raise errors.Conflict("refused for the test")

    monkeypatch.setattr(store, "commit", refuse)
    nve, ann = Recorder(), Recorder()
    record = cold_start(store, nve, ann)
    assert record is not None and record["moved"] == []
    assert "refused for the test" in record["skipped"][MAC]
    ep = store.get_endpoint(VNI, MAC)
    assert (ep["nve"], ep["state"]) == ("h1", "active")  # prestage aborted
    assert ("unplug", VNI, MAC) in nve.calls and ann.calls == []
