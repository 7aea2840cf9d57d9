"""The source's hold timer keeps the in-flight tunnel until the peers applied the move.

Stand-ins (named so): a scripted directory (the real embedded and etcd ones
are driven by the lab tests, tests/functional/test_lab_migration.py and the
evacuation benchmark) and a recording NVE.
"""

from __future__ import annotations

import time
from typing import Any

from oslo_config import cfg

from vmm_linux.stages import HoldTimer
from vmm_orchestrator.model import Migration, Phase, Role, Vif, Workload
from vmm_orchestrator.stage import HostContext, StageContext

MAC = "52:54:00:00:00:01"


class ScriptedDirectory:
    """Stand-in directory: the commit lands after ``commit_after`` s, peer ``h3``
    acknowledges it ``ack_after`` s later (never if None)."""

    def __init__(self, commit_after: float, ack_after: float | None) -> None:
        self.t0 = time.time()
        self.commit_after, self.ack_after = commit_after, ack_after
        self.ack_waits: list[float] = []

    def get_endpoint(self, vni: int, mac: str) -> dict[str, Any]:
        if time.time() - self.t0 < self.commit_after:
            return {"migration_id": "m1", "last_migration_id": None, "revision": 7}
        return {"migration_id": None, "last_migration_id": "m1", "revision": 9}

    def acks(self, vni: int, min_revision: int, nves: Any = None, timeout: float = 0.0) -> Any:
        self.ack_waits.append(timeout)
        acked_at = None if self.ack_after is None else self.t0 + self.commit_after + self.ack_after
        wait = timeout if acked_at is None else min(timeout, max(0.0, acked_at - time.time()))
        time.sleep(wait)
        h3 = 9 if acked_at is not None and time.time() >= acked_at else 7
        peers = {"h1": 9, "h2": 9, "h3": h3}
        return {nve: {"acked_revision": rev} for nve, rev in peers.items()}


class RecordingNve:
    def __init__(self) -> None:
        self.stopped_at: float | None = None

    def unplug(self, vni: int, mac: str) -> None:
        pass

    def stop_inflight(self, vni: int, mac: str) -> None:
        self.stopped_at = time.time()


def _run(nva: Any, hold_time: float, hold_max: float, until_acked: bool = True) -> tuple:
    conf = cfg.ConfigOpts()
    HoldTimer.register_opts(conf)
    stage = HoldTimer(conf)
    group = "stage_hold_timer"
    conf.set_override("hold_time", hold_time, group=group)
    conf.set_override("hold_max", hold_max, group=group)
    conf.set_override("hold_until_acked", until_acked, group=group)
    nve = RecordingNve()
    vif = Vif(mac=MAC, vni=42, port="vnet0")
    ctx = StageContext(
        Migration("m1", Workload("vm", (vif,)), "h1", "h2"),
        Phase.COMPLETED,
        Role.SOURCE,
        HostContext("h1", nva, {"nve": nve}),
        time.monotonic() + 10,
    )
    started = time.time()
    stage.run(ctx)
    return nve.stopped_at - started, ctx.notes


def test_the_tunnel_stays_until_the_last_peer_acknowledged() -> None:
    held, notes = _run(ScriptedDirectory(commit_after=0.3, ack_after=0.5), 0.1, 5.0)
    assert 0.75 <= held < 2.0, held  # commit at 0.3 s + the last ack 0.5 s later
    assert notes["unacked"] == []


def test_a_peer_that_never_acknowledges_is_waited_for_until_hold_max() -> None:
    held, notes = _run(ScriptedDirectory(commit_after=0.0, ack_after=None), 0.1, 0.6)
    assert 0.55 <= held < 1.5, held
    assert notes["unacked"] == ["h3"]


def test_hold_time_alone_when_told_so_or_when_the_directory_keeps_no_acks() -> None:
    held, _ = _run(ScriptedDirectory(commit_after=0.0, ack_after=None), 0.2, 5.0, False)
    assert 0.15 <= held < 0.6, held
    held, notes = _run(object(), 0.2, 5.0)  # no get_endpoint/acks: Neutron's, OVN's
    assert 0.15 <= held < 0.6, held
    assert notes["unacked"] == []


def test_a_move_the_directory_forgot_is_not_waited_for() -> None:
    class Reverted(ScriptedDirectory):
        def get_endpoint(self, vni: int, mac: str) -> dict[str, Any]:
            return {"migration_id": None, "last_migration_id": "m0", "revision": 5}

    held, _ = _run(Reverted(0.0, None), 0.1, 5.0)
    assert held < 0.5, held


def test_a_directory_whose_endpoints_carry_no_revision_is_not_waited_for() -> None:
    class NoRevision(ScriptedDirectory):  # as OVN's directory answers
        def get_endpoint(self, vni: int, mac: str) -> dict[str, Any]:
            return {"migration_id": None, "last_migration_id": "m1"}

    held, notes = _run(NoRevision(0.0, None), 0.1, 5.0)
    assert held < 0.5, held
    assert notes["unacked"] == []
