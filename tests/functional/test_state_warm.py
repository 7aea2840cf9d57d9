"""Warm mobility in the lab (issue 14 item 5): a planned move's state is
mirrored to the destination ahead of it, so that PREPARE moves only the rest.

``lab_site(..., state=True)`` runs the real pipeline with the state stages.
2,000 conntrack sessions of vm1 are in h1's table. With warm mobility a
relay (``vmm_state.warm.WarmMirror``, what ``vmm state warm`` runs) mirrors
them to h2 every half second: the entries are at h2 before the migration
starts. Then sessions are created and destroyed at h1, the VM migrates, and
``state_precopy`` must find the mirror and move only what changed since
(the figures it notes in the timeline), and h2 must end with exactly h1's
sessions. The control run, without a plan, moves every session at PREPARE.
Run with ``-s`` to see the figures.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import secrets
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest
from oslo_config import cfg

from vmm_lab import proofs
from vmm_lab.linux import options as lab_options
from vmm_lab.linux.demo import LabSite, PortProfile, lab_site
from vmm_lab.linux.topology import lab_namespaces, new_prefix
from vmm_linux.netns import socket_in
from vmm_orchestrator.engine import PhaseReport
from vmm_orchestrator.model import Phase
from vmm_state import warm
from vmm_state.kinds import _ctnetlink as ctnl

SESSIONS = 2000
CREATED, DESTROYED = 60, 40  # after the mirror, before the move
PEER_NET = "198.51.100."  # the sessions' far ends (never routed: the entries are what count)
SERVICE = proofs.SERVICE + 7


def state_conf() -> cfg.ConfigOpts:
    conf = cfg.ConfigOpts()
    conf(args=[], default_config_files=[])
    try:  # every plugin's options, where the core offers it
        from vmm_orchestrator.options import register_all
    except ImportError:
        pass
    else:
        register_all(conf)
    lab_options.register_opts(conf)
    from vmm_linux import agent
    from vmm_linux.stages import HoldTimer
    from vmm_orchestrator.stage import register_stage_opts

    agent.register_opts(conf)
    conf.set_override("watch_timeout", 1.0, group="nve_agent")
    register_stage_opts(conf, HoldTimer)
    conf.set_override("hold_time", 0.5, group="stage_hold_timer")
    warm.register_opts(conf)
    return conf


def session(vm_ip: str, i: int) -> ctnl.Conn:
    """An established TCP session the VM started to a far peer (an hour to live)."""
    orig = ctnl.Tuple(
        socket.AF_INET, ctnl.IPPROTO_TCP, vm_ip, PEER_NET + str(1 + i % 200), 20000 + i, 443
    )
    return ctnl.Conn(
        orig,
        orig.inverse(),
        timeout=3600,
        status=ctnl.IPS_SEEN_REPLY | ctnl.IPS_ASSURED,
        tcp_state=3,
        tcp_wscale_orig=7,
        tcp_wscale_reply=7,
        tcp_flags_orig=0,
        tcp_flags_reply=0,
    )


def apply(ns: str, ops: list[tuple[str, ctnl.Conn]]) -> None:
    with ctnl.ctnetlink(ns) as nl:
        assert nl.apply(ops) == [0] * len(ops)


def far_sessions(ns: str, vm_ip: str) -> set[tuple[Any, ...]]:
    """The VM's sessions with the far peers in ``ns`` (their original tuples)."""
    with ctnl.ctnetlink(ns) as nl:
        found = nl.dump(lambda o, r: o.src == vm_ip, addresses={vm_ip})
    return {c.orig.key() for c in found if str(c.orig.dst).startswith(PEER_NET)}


def stage_notes(reports: list[PhaseReport], stage: str) -> dict[str, Any]:
    for report in reports:
        for timing in report.timeline:
            if timing.stage == stage:
                return dict(timing.notes)
    raise AssertionError(f"stage {stage} did not run")


@dataclasses.dataclass
class Run:
    warm: bool
    reports: list[PhaseReport]
    #: sessions at h2 before the migration started (the mirror's work)
    mirrored: int
    #: h1's sessions at the switchover, and h2's after the move
    expected: set[tuple[Any, ...]]
    arrived: set[tuple[Any, ...]]
    #: the plan's refreshes (control: those of the plan that expired)
    refreshes: list[warm.Refresh]
    relay_outcome: str | None
    echoed: bool
    #: what `vmm state warm status` printed while the mirror was up (warm run)
    status: str = ""


def wait_for(check: Any, timeout: float, what: str) -> None:
    ends = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < ends, f"timed out waiting for {what}"
        time.sleep(0.05)


def move(site: LabSite, use_warm: bool) -> Run:
    vm1, vm3 = site.lab.vms["vm1"], site.lab.vms["vm3"]
    h1, h2 = site.lab.hosts["h1"].netns, site.lab.hosts["h2"].netns
    apply(h1, [("create", session(vm1.ipv4, i)) for i in range(SESSIONS)])
    site.set_profile("vm1", PortProfile(services=(SERVICE,)))
    server = proofs.EchoServer(vm1.netns, vm1.ipv4, SERVICE)
    client = socket_in(vm3.netns, socket.AF_INET, socket.SOCK_STREAM)
    directories = {name: site.client() for name in ("h1", "h2")}
    services = {
        name: warm.attach(
            site.states[name],
            warm.WarmService(site.states[name], ["conntrack"], interval=0.5, nva=nva),
        )
        for name, nva in directories.items()
    }
    try:
        client.settimeout(3)
        client.connect((vm1.ipv4, SERVICE))
        assert proofs.echo(client, b"before")
        if use_warm:
            plan = services["h1"].plan(vm1.workload, "h1", "h2")
            services["h2"].plan(vm1.workload, "h1", "h2")
            wait_for(lambda: len(plan.refreshes) >= 2, 30, "two mirror refreshes")
            status = warm_status(site)
        else:
            expired = expiry(site, services)
        mirrored = len(far_sessions(h2, vm1.ipv4))
        # the VM keeps working after the last refresh: sessions come and go
        apply(h1, [("create", session(vm1.ipv4, SESSIONS + i)) for i in range(CREATED)])
        apply(h1, [("delete", session(vm1.ipv4, i)) for i in range(DESTROYED)])
        expected = far_sessions(h1, vm1.ipv4)
        hv = site.state_hypervisor()
        record, futures = hv.migrate(vm1, "h2", 50)
        reports = [f.result(timeout=60) for f in futures]
        assert record.aborted is None
        assert all(r.ok for r in reports), [r.error for r in reports]
        arrived = far_sessions(h2, vm1.ipv4)
        echoed = proofs.echo(client, b"after the move")
        if use_warm:
            refreshes, outcome = list(plan.refreshes), plan.ended
        else:
            refreshes, outcome = expired, None
        return Run(
            use_warm,
            reports,
            mirrored,
            expected,
            arrived,
            refreshes,
            outcome,
            echoed,
            status if use_warm else "",
        )
    finally:
        for service in services.values():
            service.close()
        for nva in directories.values():
            nva.close()
        client.close()
        server.close()


def warm_status(site: LabSite) -> str:
    """`vmm state warm status` on the lab's configuration (the command's run, called
    directly: its entry point is the lead's to add)."""
    from vmm_orchestrator.nva import options as nva_options
    from vmm_state import options as state_options

    conf = cfg.ConfigOpts()
    conf(args=[], default_config_files=[])
    nva_options.register_opts(conf)
    state_options.register_opts(conf)
    warm.register_opts(conf)
    conf.set_override("url", site.server.url, "nva")
    conf.set_override("token", site.token, "nva")
    conf.set_override("key", secrets.token_hex(16), "state")
    conf.set_override("token", site.states["h2"].settings.token, "state")
    conf.set_override("peers", {n: s.url for n, s in site.states.items()}, "state")
    vm1 = site.lab.vms["vm1"]
    plan = f"vm1 h1 h2 {vm1.vni}:{vm1.mac}"
    conf.set_override("plan", [plan], "state_warm")
    command = warm.StateCommand()
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert command.run(conf, parser.parse_args(["warm", "status"])) == 0
    return out.getvalue()


def expiry(site: LabSite, services: dict[str, warm.WarmService]) -> list[warm.Refresh]:
    """A plan nobody migrates: its mirror reaches h2, and at the end of the plan's
    lifetime h2 removes it by itself (the source too: either end suffices)."""
    vm1 = site.lab.vms["vm1"]
    h2 = site.lab.hosts["h2"].netns
    plan = services["h1"].plan(vm1.workload, "h1", "h2", lifetime=3.0)
    services["h2"].plan(vm1.workload, "h1", "h2", lifetime=3.0)
    wait_for(lambda: len(far_sessions(h2, vm1.ipv4)) == SESSIONS, 30, "the mirror at h2")
    wait_for(lambda: not far_sessions(h2, vm1.ipv4), 30, "the expired mirror to go")
    wait_for(lambda: plan.ended is not None, 10, "the source's plan to end")
    assert plan.ended == "the plan's lifetime is over"
    assert not far_sessions(h2, vm1.ipv4), "the source pushed the mirror again after its end"
    mid = warm.mirror_id("vm1", "h1", "h2")
    assert site.states["h2"].importer.synced(mid) == {}
    assert not site.states["h2"].importer.ledger.entries(mid)
    return list(plan.refreshes)


@pytest.fixture(scope="module", params=["warm", "control"])
def run(request: pytest.FixtureRequest) -> Iterator[Run]:
    prefix = new_prefix()
    try:
        with lab_site(state_conf(), prefix, orchestrated=True, state=True) as site:
            yield move(site, request.param == "warm")
    finally:
        assert not lab_namespaces(prefix), "namespaces left behind"


def figures(run: Run) -> dict[str, Any]:
    pre = stage_notes(run.reports, "state_precopy")
    delta = stage_notes(run.reports, "state_delta")
    ct_pre, ct_delta = pre["kinds"]["conntrack"], delta["kinds"]["conntrack"]
    return {
        "run": "warm" if run.warm else "control",
        "mirrored_before_move": run.mirrored,
        "refreshes": [
            (r.modes.get("conntrack"), r.entries.get("conntrack"), r.bytes) for r in run.refreshes
        ],
        "precopy_entries": ct_pre["entries"],
        "precopy_bytes": pre["bytes"],
        "precopy_ms": pre["transfer_ms"],
        "delta_entries": ct_delta["entries"],
        "delta_ms": delta.get("delta_ms"),
        "sessions_at_h2": len(run.arrived),
        "expected": len(run.expected),
        "warm_note": pre.get("warm"),
    }


def test_sessions_survive_and_the_precopy_moves_only_the_remainder(run: Run) -> None:
    f = figures(run)
    print(f"\nwarm mobility figures: {f}")
    assert run.expected and run.arrived == run.expected, (
        len(run.expected - run.arrived),
        len(run.arrived - run.expected),
    )
    assert run.echoed, "vm3's TCP connection to vm1 broke in the move"
    assert f["expected"] == SESSIONS + CREATED - DESTROYED
    if run.warm:
        assert run.mirrored == SESSIONS, "the mirror was not at h2 before the move"
        first, *later = run.refreshes
        assert first.modes == {"conntrack": "full"} and first.entries["conntrack"] >= SESSIONS
        assert later and all(r.modes == {"conntrack": "delta"} for r in later), later
        assert all(r.entries["conntrack"] < SESSIONS // 10 for r in later), later
        assert f["warm_note"]["mirror"] == warm.mirror_id("vm1", "h1", "h2")
        # only what changed since the mirror moved at PREPARE (< 10% of the sessions)
        assert f["precopy_entries"] < SESSIONS // 10, f
        assert f["precopy_entries"] >= CREATED, f
        assert stage_notes(run.reports, "state_delta")["warm"]["mirror"] == f["warm_note"]["mirror"]
        # the source settled what PREPARE moved: nothing changed since, nothing is sent again
        assert f["delta_entries"] == 0, f
        assert run.relay_outcome == "the VM moved"
        print(run.status)
        line = run.status.splitlines()[1]
        assert line.startswith("vm1") and warm.mirror_id("vm1", "h1", "h2") in line, run.status
        assert "conntrack" in line and "s old" in line, run.status
    else:  # the expired mirror left nothing behind; the control moved everything at PREPARE
        assert run.refreshes and run.refreshes[0].entries["conntrack"] >= SESSIONS
        assert run.mirrored == 0
        assert f["warm_note"] is None
        assert f["precopy_entries"] >= SESSIONS + CREATED - DESTROYED, f
        assert f["delta_entries"] == 0, f  # the pre-copy's changes are not sent again


@pytest.mark.parametrize("abort_after", [Phase.PREPARE, Phase.SWITCHOVER])
def test_an_aborted_move_gives_the_plan_back_and_the_next_one_adopts_again(
    abort_after: Phase,
) -> None:
    """ABORTED reverts everything of the move at h2, mirror included; the plan goes
    on (a whole mirror again) and the next attempt of the move adopts it."""
    prefix = new_prefix()
    try:
        with lab_site(state_conf(), prefix, orchestrated=True, state=True) as site:
            vm1 = site.lab.vms["vm1"]
            h1, h2 = site.lab.hosts["h1"].netns, site.lab.hosts["h2"].netns
            apply(h1, [("create", session(vm1.ipv4, i)) for i in range(SESSIONS)])
            directories = {name: site.client() for name in ("h1", "h2")}
            services = {
                name: warm.attach(
                    site.states[name],
                    warm.WarmService(site.states[name], ["conntrack"], interval=0.5, nva=nva),
                )
                for name, nva in directories.items()
            }
            try:
                plan = services["h1"].plan(vm1.workload, "h1", "h2")
                services["h2"].plan(vm1.workload, "h1", "h2")
                wait_for(lambda: len(plan.refreshes) >= 2, 30, "two mirror refreshes")
                hv = site.state_hypervisor()
                record, futures = hv.migrate(vm1, "h2", 50, abort_after=abort_after)
                aborted = [f.result(timeout=60) for f in futures]
                assert record.aborted is not None and vm1.host == "h1"
                assert stage_notes(aborted, "state_precopy")["warm"]["mirror"] == plan.migration.id
                seen = len(plan.refreshes)
                wait_for(
                    lambda: any(r.modes == {"conntrack": "full"} for r in plan.refreshes[seen:]),
                    30,
                    "the mirror rebuilt whole",
                )
                wait_for(
                    lambda: len(far_sessions(h2, vm1.ipv4)) == SESSIONS, 30, "the mirror again"
                )
                record, futures = hv.migrate(vm1, "h2", 50)
                reports = [f.result(timeout=60) for f in futures]
                assert record.aborted is None and all(r.ok for r in reports)
                pre = stage_notes(reports, "state_precopy")
                print(f"\nafter an abort at {abort_after.name}: {pre['kinds']['conntrack']}")
                assert pre["warm"]["mirror"] == plan.migration.id
                assert pre["kinds"]["conntrack"]["entries"] < SESSIONS // 10
                assert far_sessions(h2, vm1.ipv4) == {
                    session(vm1.ipv4, i).orig.key() for i in range(SESSIONS)
                }
            finally:
                for service in services.values():
                    service.close()
                for nva in directories.values():
                    nva.close()
    finally:
        assert not lab_namespaces(prefix), "namespaces left behind"
