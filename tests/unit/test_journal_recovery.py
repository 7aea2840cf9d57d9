"""Tests of the journal and of recovery after a crash.

The key tests kill a real orchestrator process with SIGKILL in the middle of
a phase and recover from its journal file: the journal must have kept every
step, and ``Pipeline.recover`` must revert (VM still at the source) or finish
(VM at the destination) what was in flight.

The child process imports this very module (``crash_main``) so that both
processes build the same pipeline.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vmm_orchestrator import options
from vmm_orchestrator.engine import IN_FLIGHT, Pipeline
from vmm_orchestrator.errors import ConfigError
from vmm_orchestrator.journal import Journal
from vmm_orchestrator.model import Migration, MigrationEvent, Phase, Role, Vif, Workload
from vmm_orchestrator.stage import HostContext, Stage, StageContext

SOURCE, DESTINATION = "hv1", "hv2"


def migration(mid: str = "m1") -> Migration:
    vif = Vif(mac="52:54:00:00:00:01", vni=100, ipv4=("10.0.0.5",))
    return Migration(
        id=mid, workload=Workload("vm1", (vif,)), source=SOURCE, destination=DESTINATION
    )


def event(phase: Phase, mid: str = "m1", role: Role = Role.SOURCE) -> MigrationEvent:
    return MigrationEvent(migration(mid), phase, role, time.monotonic())


# -- journal ------------------------------------------------------------------


@pytest.fixture
def journal() -> Iterator[Journal]:
    j = Journal(":memory:")
    yield j
    j.close()


def test_journal_records_a_migration_and_its_stages(journal: Journal) -> None:
    m = migration()
    journal.begin_migration(m, Role.SOURCE)
    journal.begin_migration(m, Role.DESTINATION)  # idempotent: keeps the first
    journal.phase_started("m1", Phase.PREPARE)
    assert journal.stage_started("m1", Phase.PREPARE, "a") == 1
    assert journal.stage_started("m1", Phase.PREPARE, "b") == 2
    journal.stage_checkpoint("m1", Phase.PREPARE, "b", {"step": 1})
    journal.stage_completed("m1", Phase.PREPARE, "b", {"port": "tap0"}, attempts=2)
    journal.stage_completed("m1", Phase.PREPARE, "a", None)
    journal.phase_completed("m1", Phase.PREPARE)

    rec = journal.get("m1")
    assert rec is not None
    assert rec.migration == m and rec.role is Role.SOURCE and rec.status == "running"
    assert rec.last_phase is Phase.PREPARE and rec.phases == {Phase.PREPARE: "completed"}
    assert [r.stage for r in journal.completed_stages("m1")] == ["b", "a"]  # completion order
    b = journal.stage_run("m1", Phase.PREPARE, "b")
    assert b is not None
    assert (b.record, b.checkpoint, b.attempts, b.seq) == ({"port": "tap0"}, {"step": 1}, 2, 2)
    assert b.ended is not None and b.ended >= b.started
    assert journal.get("nope") is None


def test_a_restarted_stage_keeps_its_checkpoint_and_loses_its_outcome(journal: Journal) -> None:
    journal.begin_migration(migration(), Role.SOURCE)
    journal.stage_started("m1", Phase.PREPARE, "a")
    journal.stage_checkpoint("m1", Phase.PREPARE, "a", {"step": 2})
    journal.stage_failed("m1", Phase.PREPARE, "a", "boom")
    assert journal.stage_started("m1", Phase.PREPARE, "a") == 2
    run = journal.stage_run("m1", Phase.PREPARE, "a")
    assert run is not None
    assert (run.state, run.checkpoint, run.error) == ("started", {"step": 2}, None)


def test_unfinished_lists_running_migrations_only(journal: Journal) -> None:
    for mid in ("m1", "m2", "m3"):
        journal.begin_migration(migration(mid), Role.SOURCE)
    journal.set_status("m1", "done")
    journal.set_status("m3", "reverted")
    assert [r.id for r in journal.unfinished()] == ["m2"]
    with pytest.raises(ValueError, match="status"):
        journal.set_status("m2", "finished")
    with pytest.raises(KeyError):
        journal.set_status("unknown", "done")
    with pytest.raises(KeyError, match="not started"):
        journal.stage_completed("m2", Phase.PREPARE, "never", None)


def test_every_write_is_on_disk_at_once(tmp_path: Path) -> None:
    path = str(tmp_path / "sub" / "journal.sqlite")  # the directory is created
    writer = Journal(path, fsync=True)
    writer.begin_migration(migration(), Role.DESTINATION)
    writer.phase_started("m1", Phase.PREPARE)
    writer.stage_started("m1", Phase.PREPARE, "a")
    writer.stage_checkpoint("m1", Phase.PREPARE, "a", {"k": "v"})
    # a second connection (another process would see the same) reads it all
    reader = Journal(path)
    run = reader.stage_run("m1", Phase.PREPARE, "a")
    assert run is not None and run.checkpoint == {"k": "v"} and run.state == "started"
    rec = reader.get("m1")
    assert rec is not None and rec.role is Role.DESTINATION
    writer.close()
    reader.close()


def test_the_journal_is_safe_to_use_from_several_threads(journal: Journal) -> None:
    journal.begin_migration(migration(), Role.SOURCE)

    def work(n: int) -> None:
        for i in range(20):
            name = f"s{n}-{i}"
            journal.stage_started("m1", Phase.PREPARE, name)
            journal.stage_completed("m1", Phase.PREPARE, name, {"i": i})

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done = journal.completed_stages("m1")
    assert len(done) == 80
    rec = journal.get("m1")
    assert rec is not None
    assert sorted(r.seq for r in rec.stages) == list(range(1, 81))  # no sequence number reused


def test_an_unusable_journal_path_is_a_config_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ConfigError, match="journal"):
        Journal(str(blocker / "journal.sqlite"))


# -- the stages both processes use --------------------------------------------


def _append(log_path: str, line: str) -> None:
    """One write per line with O_APPEND: a SIGKILL cannot leave half a line."""
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


class _LoggingStage(Stage):
    """Appends "run <name>" / "revert <name>" to ``log_path``."""

    log_path = ""

    def run(self, ctx: StageContext) -> dict[str, Any] | None:
        _append(self.log_path, f"run {self.name}")
        return {"by": self.name}

    def revert(self, ctx: StageContext, record: dict[str, Any] | None) -> None:
        _append(self.log_path, f"revert {self.name}")


class Alpha(_LoggingStage):
    name, phase, role = "alpha", Phase.PREPARE, Role.SOURCE


class Beta(_LoggingStage):
    name, phase, role = "beta", Phase.PREPARE, Role.SOURCE


class Gamma(_LoggingStage):
    name, phase, role = "gamma", Phase.SWITCHOVER, Role.SOURCE


class Blocker(_LoggingStage):
    """Checkpoints, tells the test it is inside SWITCHOVER, then hangs (first run only).

    A re-run finds its checkpoint in ``ctx.saved`` and completes; its revert
    logs what it found so the test can see the checkpoint survived the kill.
    """

    name, phase, role = "blocker", Phase.SWITCHOVER, Role.SOURCE
    default_deadline = 60.0
    marker_path = ""

    def run(self, ctx: StageContext) -> dict[str, Any] | None:
        _append(self.log_path, f"run {self.name}")
        if ctx.saved:
            _append(self.log_path, f"saved {ctx.saved['tunnel']}")
            return {"tunnel": ctx.saved["tunnel"]}
        ctx.checkpoint({"tunnel": "vx-42"})
        Path(self.marker_path).write_text("ready")
        threading.Event().wait()  # the test kills us here
        return None

    def revert(self, ctx: StageContext, record: dict[str, Any] | None) -> None:
        _append(self.log_path, f"revert {self.name}")
        _append(self.log_path, f"saved {ctx.saved.get('tunnel')} record {record}")


class Hold(_LoggingStage):
    name, phase, role = "hold", Phase.COMPLETED, Role.SOURCE


STAGES: list[type[Stage]] = [Alpha, Beta, Gamma, Blocker, Hold]


def build_pipeline(journal_path: str, log_path: str, marker_path: str = "") -> Pipeline:
    _LoggingStage.log_path = log_path
    Blocker.marker_path = marker_path
    conf = options.new_conf()
    for cls in STAGES:
        cls.register_opts(conf)  # the test's own stages are no entry points
    stages = [cls(conf) for cls in STAGES]
    return Pipeline(conf, HostContext(SOURCE, nva=None), Journal(journal_path), stages=stages)


def crash_main(journal_path: str, log_path: str, marker_path: str) -> None:
    """The child process: PREPARE, then SWITCHOVER, which hangs in Blocker."""
    pipe = build_pipeline(journal_path, log_path, marker_path)
    assert pipe.handle(event(Phase.PREPARE)).ok
    pipe.handle(event(Phase.SWITCHOVER))
    raise SystemExit("SWITCHOVER returned; the test expected to kill us inside it")


# -- crash and recover ----------------------------------------------------------


@pytest.fixture
def crashed(tmp_path: Path) -> tuple[str, str]:
    """Run the child until it hangs inside SWITCHOVER, SIGKILL it; give (journal, log)."""
    journal_path = str(tmp_path / "journal.sqlite")
    log_path = str(tmp_path / "stages.log")
    marker = tmp_path / "ready"
    script = tmp_path / "child.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import sys
            sys.path.insert(0, {os.path.dirname(__file__)!r})
            import {Path(__file__).stem} as t
            t.crash_main({journal_path!r}, {log_path!r}, {str(marker)!r})
            """
        )
    )
    child = subprocess.Popen([sys.executable, str(script)], stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while not marker.exists():
            if child.poll() is not None:
                pytest.fail(f"child exited early: {child.stderr.read().decode()}")  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "child never reached SWITCHOVER"
            time.sleep(0.01)
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait(timeout=10) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        if child.stderr is not None:
            child.stderr.close()
    return journal_path, log_path


def lines(log_path: str) -> list[str]:
    return Path(log_path).read_text().splitlines()


def test_the_journal_survives_sigkill_with_the_stage_in_flight(crashed: tuple[str, str]) -> None:
    journal_path, log_path = crashed
    assert lines(log_path) == ["run alpha", "run beta", "run gamma", "run blocker"]
    journal = Journal(journal_path)
    [rec] = journal.unfinished()
    assert rec.last_phase is Phase.SWITCHOVER
    assert rec.phases == {Phase.PREPARE: "completed", Phase.SWITCHOVER: "started"}
    states = {r.stage: r.state for r in rec.stages}
    assert states == {
        "alpha": "completed",
        "beta": "completed",
        "gamma": "completed",
        "blocker": "started",
    }
    blocker = journal.stage_run("m1", Phase.SWITCHOVER, "blocker")
    assert blocker is not None and blocker.checkpoint == {"tunnel": "vx-42"}
    journal.close()


def test_recovery_reverts_newest_first_when_the_vm_is_still_at_the_source(
    crashed: tuple[str, str],
) -> None:
    journal_path, log_path = crashed
    pipe = build_pipeline(journal_path, log_path)
    located: list[str] = []

    def locate(m: Migration) -> str:
        located.append(m.id)
        return m.source

    [report] = pipe.recover(locate)

    assert located == ["m1"]
    assert report.ok and report.detail is not None and "reverted" in report.detail
    assert report.reverted == ["blocker", "gamma", "beta", "alpha"]
    assert lines(log_path)[4:] == [
        "revert blocker",
        "saved vx-42 record None",  # the cut-short stage reverts from its checkpoint
        "revert gamma",
        "revert beta",
        "revert alpha",
    ]
    rec = pipe.journal.get("m1")
    assert rec is not None and rec.status == "reverted"
    assert pipe.journal.unfinished() == []
    assert pipe.recover(locate) == []  # nothing left to do
    ignored = pipe.handle(event(Phase.COMPLETED))
    assert ignored.detail is not None and "reverted" in ignored.detail
    assert "run hold" not in lines(log_path)


def test_recovery_finishes_when_the_vm_runs_at_the_destination(
    crashed: tuple[str, str],
) -> None:
    journal_path, log_path = crashed
    pipe = build_pipeline(journal_path, log_path)

    [report] = pipe.recover(lambda m: m.destination)

    assert report.ok and report.detail is not None and "finished" in report.detail
    # The VM runs at the destination: the phases missed while down run too
    # (COMPLETED's event came and went while this host was down).
    assert report.phase is Phase.COMPLETED and report.reverted == []
    # the stage cut short runs again with its checkpoint back, then COMPLETED's
    assert lines(log_path)[4:] == ["run blocker", "saved vx-42", "run hold"]
    blocker = pipe.journal.stage_run("m1", Phase.SWITCHOVER, "blocker")
    assert blocker is not None and blocker.state == "completed"
    assert blocker.record == {"tunnel": "vx-42"}
    rec = pipe.journal.get("m1")
    assert rec is not None and rec.status == "done"
    assert rec.phases[Phase.SWITCHOVER] == rec.phases[Phase.COMPLETED] == "completed"
    # a COMPLETED event that still arrives changes nothing
    assert pipe.handle(event(Phase.COMPLETED)).ok
    assert lines(log_path)[-1] == "run hold" and lines(log_path).count("run hold") == 1
    assert not any(line.startswith("revert") for line in lines(log_path))


def test_recovery_in_flight_finishes_only_the_phase_reached(
    crashed: tuple[str, str],
) -> None:
    journal_path, log_path = crashed
    pipe = build_pipeline(journal_path, log_path)

    [report] = pipe.recover(lambda m: IN_FLIGHT)

    assert report.ok and report.phase is Phase.SWITCHOVER and report.reverted == []
    assert lines(log_path)[4:] == ["run blocker", "saved vx-42"]
    rec = pipe.journal.get("m1")
    assert rec is not None and rec.status == "running"  # the source still awaits COMPLETED
    assert pipe.handle(event(Phase.COMPLETED)).ok
    assert pipe.journal.get("m1").status == "done"  # type: ignore[union-attr]


# -- the recovery rule without locate (crash simulated in the journal) -------------


def simulated_crash(tmp_path: Path, reached: Phase, role: Role = Role.SOURCE) -> Pipeline:
    """A journal as a crash inside ``reached`` leaves it: alpha done, ``reached`` started."""
    pipe = build_pipeline(str(tmp_path / "j.sqlite"), str(tmp_path / "log"))
    j = pipe.journal
    j.begin_migration(migration(), role)
    j.phase_started("m1", Phase.PREPARE)
    j.stage_started("m1", Phase.PREPARE, "alpha")
    j.stage_completed("m1", Phase.PREPARE, "alpha", {"by": "alpha"})
    j.stage_started("m1", Phase.PREPARE, "beta")
    j.stage_completed("m1", Phase.PREPARE, "beta", {"by": "beta"})
    j.phase_completed("m1", Phase.PREPARE)
    j.phase_started("m1", reached)
    return pipe


def test_without_locate_a_migration_before_resumed_is_reverted(tmp_path: Path) -> None:
    pipe = simulated_crash(tmp_path, Phase.SWITCHOVER)
    [report] = pipe.recover()
    assert report.reverted == ["beta", "alpha"]
    assert report.detail is not None and "last phase reached: SWITCHOVER" in report.detail
    rec = pipe.journal.get("m1")
    assert rec is not None and rec.status == "reverted"


def test_without_locate_a_migration_at_completed_is_finished(tmp_path: Path) -> None:
    pipe = simulated_crash(tmp_path, Phase.COMPLETED)
    [report] = pipe.recover()
    assert report.ok and report.reverted == [] and report.phase is Phase.COMPLETED
    assert lines(str(tmp_path / "log")) == ["run hold"]
    rec = pipe.journal.get("m1")
    assert rec is not None and rec.status == "done"


def test_a_migration_whose_revert_had_begun_is_reverted_even_at_the_destination(
    tmp_path: Path,
) -> None:
    pipe = simulated_crash(tmp_path, Phase.SWITCHOVER)
    pipe.journal.stage_started("m1", Phase.SWITCHOVER, "gamma")
    pipe.journal.stage_failed("m1", Phase.SWITCHOVER, "gamma", "boom")
    pipe.journal.stage_reverted("m1", Phase.PREPARE, "beta")  # crash right after this
    [report] = pipe.recover(lambda m: m.destination)
    assert report.reverted == ["alpha"]
    assert lines(str(tmp_path / "log")) == ["revert alpha"]


def test_a_failing_locate_leaves_the_migration_running(tmp_path: Path) -> None:
    pipe = simulated_crash(tmp_path, Phase.SWITCHOVER)

    def locate(m: Migration) -> str:
        raise ConnectionError("NVA unreachable")

    [report] = pipe.recover(locate)
    assert not report.ok and report.error is not None and "NVA unreachable" in report.error
    assert [r.id for r in pipe.journal.unfinished()] == ["m1"]
    assert not Path(tmp_path / "log").exists()  # nothing ran, nothing reverted
