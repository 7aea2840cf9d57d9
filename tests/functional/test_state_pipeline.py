"""State migration through the orchestrator's pipeline, in the real lab.

Unlike test_state_lab.py, which drives the kinds by hand, nothing here
touches a kind during a migration: ``lab_site(..., state=True)`` gives every
host the stateful firewall and a state service, the pipeline runs the state
stages (pre-copy at PREPARE, delta at SWITCHOVER, cleanup at COMPLETED,
revert at ABORTED), and the lab hypervisor behaves as QEMU with
``pause-before-switchover`` and libvirt's ports (the destination's tap from
after PREPARE; a paused guest's tap stays up), so that the delta lands
before the VM resumes and port-bound state (multicast membership) has a
port on both sides at SWITCHOVER.

The proofs (vmm_lab.proofs) run once with the state stages and once
without: with them every proof holds, without them every proof breaks.
Then an aborted and a refused migration must leave nothing at the
destination that was not there before.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any, cast

import pytest
from oslo_config import cfg

from vmm_lab import proofs
from vmm_lab.linux.demo import LabSite, lab_site
from vmm_lab.linux.hypervisor import LabHypervisor, LabMigration, MigrationVetoed
from vmm_lab.linux.topology import Lab, LabVm, lab_namespaces, new_prefix
from vmm_linux.netns import socket_in
from vmm_orchestrator.engine import PhaseReport
from vmm_orchestrator.model import Phase, Role
from vmm_orchestrator.options import new_conf
from vmm_orchestrator.statekind import KindContext

STATE_STAGES = {"state_precopy", "state_delta", "state_cleanup"}
#: Entry fields that change on their own (lifetimes, counters): not part of an entry's identity.
VOLATILE = {"timeout", "expires", "age", "timer", "counter", "limit", "status", "tcp", "lease"}


def state_conf() -> cfg.ConfigOpts:
    """Defaults with short timers (the conftest's lab_conf is per test; the labs here
    are per module)."""
    conf = new_conf()

    conf.set_override("watch_timeout", 1.0, group="nve_agent")
    conf.set_override("hold_time", 0.5, group="stage_hold_timer")
    return conf


def hypervisor(site: LabSite) -> LabHypervisor:
    return site.state_hypervisor()


def kind_figures(reports: list[PhaseReport], stage: str) -> dict[str, dict[str, Any]]:
    """What ``stage`` noted per kind."""
    for report in reports:
        for timing in report.timeline:
            if timing.stage == stage:
                return dict(timing.notes.get("kinds", {}))
    raise AssertionError(f"stage {stage} did not run: {[r.timeline for r in reports]}")


def holdings(site: LabSite, host: str, vm: LabVm) -> dict[str, set[str]]:
    """The VM's entries on ``host``, per kind, as the kinds themselves read them
    (identities only: lifetimes and counters change on their own)."""
    state = site.states[host]
    ctx = KindContext(site.lab.hosts[host].netns, (vm.vif,), "holdings")
    return {
        name: {
            json.dumps({k: v for k, v in entry.items() if k not in VOLATILE}, sort_keys=True)
            for entry in kind.export(ctx)
        }
        for name, kind in state.kinds.items()
    }


def gained(before: dict[str, set[str]], after: dict[str, set[str]]) -> dict[str, set[str]]:
    """Entries ``after`` holds that ``before`` did not, per kind (empty kinds left out)."""
    return {k: after[k] - before.get(k, set()) for k in after if after[k] - before.get(k, set())}


# -- with and without the state stages -------------------------------------------


#: A second service of vm1, for a client on vm1's own host (vm3 on h1).
NEIGHBOUR_SERVICE = proofs.SERVICE + 1


@dataclasses.dataclass
class Moved:
    with_state: bool
    site: LabSite
    proofs: proofs.ProofLab
    record: LabMigration
    reports: list[PhaseReport]
    #: vm3's connection to vm1: a peer that stays on the source host.
    neighbour: socket.socket


@pytest.fixture(scope="module", params=["with_state", "without_state"])
def moved(request: pytest.FixtureRequest) -> Iterator[Moved]:
    with_state = request.param == "with_state"
    prefix = new_prefix()
    try:
        with lab_site(
            state_conf(), prefix, orchestrated=True, state=True, move_state=with_state
        ) as site:
            setup = proofs.arrange(site)
            vm1, vm3 = site.lab.vms["vm1"], site.lab.vms["vm3"]
            profile = site.profiles["vm1"]
            services = (*profile.services, NEIGHBOUR_SERVICE)
            site.set_profile("vm1", dataclasses.replace(profile, services=services))
            server = proofs.EchoServer(vm1.netns, vm1.ipv4, NEIGHBOUR_SERVICE)
            neighbour = socket_in(vm3.netns, socket.AF_INET, socket.SOCK_STREAM)
            try:
                neighbour.settimeout(3)
                neighbour.connect((vm1.ipv4, NEIGHBOUR_SERVICE))
                assert proofs.echo(neighbour, b"hello from the neighbour")
                record, futures = hypervisor(site).migrate(vm1, "h2", 50)
                reports = [f.result(timeout=60) for f in futures]
                yield Moved(with_state, site, setup, record, reports, neighbour)
            finally:
                neighbour.close()
                server.close()
                setup.close()
    finally:
        assert not lab_namespaces(prefix), "namespaces left behind"


def test_the_vm_moved_through_the_pipeline(moved: Moved) -> None:
    """The proofs' baseline held at h1, and every phase went through on every host."""
    assert moved.proofs.problems() == []
    assert moved.record.aborted is None
    assert all(r.ok for r in moved.reports), [r.error for r in moved.reports]
    assert moved.site.lab.vms["vm1"].host == "h2"
    ran = {t.stage for r in moved.reports for t in r.timeline}
    wait = moved.record.switchover_wait_ms
    assert wait is not None and moved.record.downtime_ms >= wait + 50 * 0.9
    if not moved.with_state:
        assert not ran & STATE_STAGES
        return
    assert STATE_STAGES <= ran
    precopy = kind_figures(moved.reports, "state_precopy")
    delta = kind_figures(moved.reports, "state_delta")
    assert {k: f["result"] for k, f in delta.items()} == dict.fromkeys(precopy, "SUCCESS")
    assert precopy["conntrack"]["installed"] >= 1
    # what the other tests read at h2 through the kinds is really there
    held = holdings(moved.site, "h2", moved.site.lab.vms["vm1"])
    assert all(held[k] for k in ("conntrack", "nft_sets", "dhcp_snooping", "mdb")), held
    # no port at h2 during PREPARE: the membership comes with the delta, before the resume
    assert precopy["mdb"]["reason"] == "unsupported"
    assert delta["mdb"]["installed"] == 1


@pytest.mark.parametrize("moved", ["with_state"], indirect=True)
def test_the_source_keeps_nothing_after_completed(moved: Moved) -> None:
    """Only with the state stages: without them nobody cleans the source."""
    assert moved.with_state
    vm1, vm3 = moved.site.lab.vms["vm1"], moved.site.lab.vms["vm3"]
    left = holdings(moved.site, "h1", vm1)
    assert left["nft_sets"] == set() and left["dhcp_snooping"] == set()
    # sessions with vm3 (still on h1) stay: see the neighbour's test below
    tcp = [json.loads(e) for e in left["conntrack"] if json.loads(e)["proto"] == "tcp"]
    assert not [e for e in tcp if vm3.ipv4 not in (e["orig"]["src"], e["orig"]["dst"])], tcp


def verdict(moved: Moved, observation: proofs.Observation) -> proofs.Verdict:
    return proofs.judge({observation.proof: observation}, moved.with_state)[0]


def test_tcp_session_through_the_stateful_firewall(moved: Moved) -> None:
    found = verdict(moved, proofs.observe_tcp(moved.proofs))
    assert found.ok, f"expected: {found.expected}; observed: {found.observed}"


def test_dhcp_snooping_filter(moved: Moved) -> None:
    found = verdict(moved, proofs.observe_dhcp_snooping(moved.proofs))
    assert found.ok, f"expected: {found.expected}; observed: {found.observed}"


def test_blacklisted_flooder(moved: Moved) -> None:
    found = verdict(moved, proofs.observe_blacklist(moved.proofs))
    assert found.ok, f"expected: {found.expected}; observed: {found.observed}"


def test_multicast_without_a_new_report(moved: Moved) -> None:
    found = verdict(moved, proofs.observe_multicast(moved.proofs))
    assert found.ok, f"expected: {found.expected}; observed: {found.observed}"


@pytest.mark.parametrize("moved", ["with_state"], indirect=True)
def test_a_session_with_a_peer_left_on_the_source_survives(moved: Moved) -> None:
    """Only with state: without it no session survives the move."""
    assert moved.with_state
    assert proofs.echo(moved.neighbour, b"hello again from the neighbour")


# -- aborted and refused migrations ------------------------------------------------


def test_aborted_and_refused_migrations_leave_nothing_at_the_destination(
    prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ABORTED after the pre-copy, ABORTED after the delta, a poisoned bundle and a
    bundle signed with another key: afterwards h2 holds none of vm1's state it did not
    hold before (it has some of its own: the flooder on h2 sent its SYNs through h2's
    conntrack), and vm1 still works at h1."""
    with lab_site(state_conf(), prefix, orchestrated=True, state=True) as site:
        setup = proofs.arrange(site)
        try:
            assert setup.problems() == []
            hyper = hypervisor(site)
            vm1 = site.lab.vms["vm1"]
            before = holdings(site, "h2", vm1)

            # cancelled after PREPARE: the pre-copy had installed every non-port kind
            record, futures = hyper.migrate(vm1, "h2", 50, abort_after=Phase.PREPARE)
            reports = [f.result(timeout=60) for f in futures]
            assert record.aborted and vm1.host == "h1"
            assert all(r.ok for r in reports), [r.error for r in reports]
            assert [r.phase for r in reports] == [Phase.PREPARE, Phase.ABORTED, Phase.ABORTED]
            installed = kind_figures(reports, "state_precopy")
            assert all(installed[k]["installed"] >= 1 for k in ("conntrack", "nft_sets"))
            assert installed["dhcp_snooping"]["installed"] >= 1
            assert gained(before, holdings(site, "h2", vm1)) == {}
            assert proofs.echo(setup.client, setup.tag("after the first abort"))

            # cancelled after SWITCHOVER: the delta too (the membership included) was in
            record, futures = hyper.migrate(vm1, "h2", 50, abort_after=Phase.SWITCHOVER)
            reports = [f.result(timeout=60) for f in futures]
            assert record.aborted and vm1.host == "h1"
            assert all(r.ok for r in reports), [r.error for r in reports]
            assert kind_figures(reports, "state_delta")["mdb"]["installed"] == 1
            assert gained(before, holdings(site, "h2", vm1)) == {}
            assert proofs.echo(setup.client, setup.tag("after the second abort"))
            # the pause kept the source port's membership (a paused guest's tap stays up)
            assert proofs.holds(proofs.observe_multicast(setup), with_state=True)

            # a poisoned entry, properly signed by the source: nothing of the bundle is taken
            nft_sets = site.states["h1"].kinds["nft_sets"]
            honest = nft_sets.export
            vm2 = site.lab.vms["vm2"]

            def poisoned(ctx: KindContext, since: float | None = None) -> Iterator[dict[str, Any]]:
                yield from honest(ctx, since)
                yield {
                    "family": "inet",
                    "table": "vmm_fw",
                    "set": "blacklist_v4",
                    "key": [vm1.ipv4, vm2.ipv4],  # would blacklist vm1 for vm2
                    "timeout": 60,
                    "expires": 60,
                }

            with monkeypatch.context() as patch:
                patch.setattr(nft_sets, "export", poisoned)
                with pytest.raises(MigrationVetoed, match=r"policy_conflict.*poisoned"):
                    hyper.migrate(vm1, "h2", 50)
            assert gained(before, holdings(site, "h2", vm1)) == {}

            # a bundle signed with another key (a tampered or foreign bundle)
            h1 = site.states["h1"]
            with monkeypatch.context() as patch:
                patch.setattr(h1, "settings", dataclasses.replace(h1.settings, key=b"k" * 32))
                with pytest.raises(MigrationVetoed, match=r"policy_conflict.*bad_signature"):
                    hyper.migrate(vm1, "h2", 50)
            assert gained(before, holdings(site, "h2", vm1)) == {}
            assert vm1.host == "h1"
            assert proofs.echo(setup.client, setup.tag("after the refusals"))
        finally:
            setup.close()


# -- the hold itself (no namespaces: a fake lab and fake dispatchers) ---------------


class FakeLab:
    """Records the port operations LabHypervisor asks for."""

    def __init__(self) -> None:
        self.hosts = {"h1": object(), "h2": object()}
        self.calls: list[tuple[str, float]] = []

    def pause(self, vm: LabVm) -> float:
        self.calls.append(("pause", time.monotonic()))
        return time.monotonic()

    def move(self, vm: LabVm, destination: str, resume_at: float | None = None) -> float:
        assert resume_at is not None
        self.calls.append(("move", resume_at))
        vm.host = destination
        return max(time.monotonic(), resume_at)

    def resume_in_place(self, vm: LabVm) -> float:
        self.calls.append(("resume_in_place", time.monotonic()))
        return time.monotonic()


@dataclasses.dataclass
class FakeReport:
    host: str
    ok: bool = True
    error: str | None = None


class FakeDispatcher:
    """Answers every phase at once, except SWITCHOVER: as ``switchover`` says
    (a report after ``delay`` seconds, or never)."""

    def __init__(self, host: str, events: list[Any], switchover: FakeReport | None, delay: float):
        self.host, self.events, self.switchover, self.delay = host, events, switchover, delay

    def submit(self, event: Any) -> concurrent.futures.Future[Any]:
        self.events.append((self.host, event.phase, event.role))
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        if event.phase is not Phase.SWITCHOVER:
            future.set_result(FakeReport(self.host))
        elif self.switchover is not None:
            threading.Timer(self.delay, future.set_result, (self.switchover,)).start()
        return future


def fake_hypervisor(
    switchover: FakeReport | None, delay: float = 0.0, **options: Any
) -> tuple[LabHypervisor, FakeLab, LabVm, list[Any]]:
    lab, events = FakeLab(), list[Any]()
    dispatchers = {h: FakeDispatcher(h, events, switchover, delay) for h in ("h1", "h2")}
    vm = LabVm("vm1", "ns-vm1", "52:54:00:00:64:0a", 100, "10.0.0.10", "fd00::a", "tap-vm1", "h1")
    hyper = LabHypervisor(cast(Lab, lab), dispatchers, qemu_rarp=False, **options)
    return hyper, lab, vm, events


def test_hold_switchover_resumes_only_after_the_report() -> None:
    hyper, lab, vm, _events = fake_hypervisor(FakeReport("h1"), delay=0.2, hold_switchover=True)
    record, _futures = hyper.migrate(vm, "h2", 30)
    assert record.aborted is None and vm.host == "h2"
    assert record.switchover_wait_ms is not None and record.switchover_wait_ms >= 200
    (_, paused), (_, resume_at) = lab.calls
    # the final copy (downtime_ms) starts once the report is in: QEMU sends the
    # device state only after migrate-continue
    assert resume_at - paused >= 0.2 + 0.03
    assert record.downtime_ms >= record.switchover_wait_ms + 30 - 0.01  # float rounding


def test_without_the_hold_the_lab_does_not_wait() -> None:
    hyper, lab, vm, _events = fake_hypervisor(None)  # SWITCHOVER never answers
    record, futures = hyper.migrate(vm, "h2", 30)
    assert record.switchover_wait_ms is None and record.aborted is None
    assert [c for c, _ in lab.calls] == ["pause", "move"]
    assert not futures[1].done()


@pytest.mark.parametrize(
    ("switchover", "why"),
    [(FakeReport("h1", ok=False, error="delta refused"), "delta refused"), (None, "within 0.3s")],
)
def test_a_failed_or_late_switchover_cancels_the_migration(
    switchover: FakeReport | None, why: str
) -> None:
    hyper, lab, vm, events = fake_hypervisor(
        switchover, hold_switchover=True, switchover_timeout=0.3
    )
    record, _futures = hyper.migrate(vm, "h2", 30)
    assert record.aborted is not None and why in record.aborted
    assert vm.host == "h1"
    assert [c for c, _ in lab.calls] == ["pause", "resume_in_place"]
    aborted = {(h, r) for h, p, r in events if p is Phase.ABORTED}
    assert aborted == {("h2", Role.DESTINATION), ("h1", Role.SOURCE)}
