"""Tests of the engine: stage order, failure and revert, retries, deadlines, dispatch.

Test stages are built by ``make_stage`` and passed as ``stages=``; they record
"run <name>" / "revert <name>" into a shared list so that each test can assert
the exact order of what happened.
"""

from __future__ import annotations

import concurrent.futures
import importlib.metadata
import itertools
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any
from unittest import mock

import pytest
import stevedore
from oslo_config import cfg

from vmm_orchestrator import engine
from vmm_orchestrator.engine import Dispatcher, Pipeline, load_stages
from vmm_orchestrator.errors import ConfigError, StageFailed, TransientError
from vmm_orchestrator.journal import Journal
from vmm_orchestrator.model import Migration, MigrationEvent, Phase, Role, Vif, Workload
from vmm_orchestrator.stage import HostContext, Stage, StageContext

S, D = Role.SOURCE, Role.DESTINATION
PREP, SWITCH, RESUMED, DONE, ABORT = (
    Phase.PREPARE,
    Phase.SWITCHOVER,
    Phase.RESUMED,
    Phase.COMPLETED,
    Phase.ABORTED,
)

RunHook = Callable[[StageContext], Any]
RevertHook = Callable[[StageContext, Any], None]


def make_stage(
    name: str,
    phase: Phase,
    role: Role,
    log: list[str],
    run: RunHook | None = None,
    revert: RevertHook | None = None,
    deadline: float = 2.0,
    attempts: int = 3,
) -> type[Stage]:
    """A Stage subclass that logs its calls; ``run``/``revert`` hooks add behaviour."""

    def do_run(self: Stage, ctx: StageContext) -> Any:
        log.append(f"run {name}")
        return run(ctx) if run else {"by": name}

    def do_revert(self: Stage, ctx: StageContext, record: Any) -> None:
        log.append(f"revert {name}")
        if revert:
            revert(ctx, record)

    attrs = {
        "name": name,
        "phase": phase,
        "role": role,
        "default_deadline": deadline,
        "default_attempts": attempts,
        "run": do_run,
        "revert": do_revert,
    }
    return type(f"Stage_{name}", (Stage,), attrs)


def migration(mid: str = "m1") -> Migration:
    vif = Vif(mac="52:54:00:00:00:01", vni=100, ipv4=("10.0.0.5",))
    return Migration(id=mid, workload=Workload("vm1", (vif,)), source="hv1", destination="hv2")


def event(phase: Phase, role: Role = S, mid: str = "m1") -> MigrationEvent:
    return MigrationEvent(migration(mid), phase, role, time.monotonic())


@pytest.fixture
def conf() -> cfg.ConfigOpts:
    conf = cfg.ConfigOpts()
    engine.register_opts(conf)
    conf.set_override("retry_backoff", 0.001, group="pipeline")
    return conf


@pytest.fixture
def journal() -> Iterator[Journal]:
    j = Journal(":memory:")
    yield j
    j.close()


@pytest.fixture
def log() -> list[str]:
    return []


def pipeline(conf: cfg.ConfigOpts, journal: Journal, classes: list[type[Stage]]) -> Pipeline:
    for cls in classes:
        cls.register_opts(conf)  # the test's own stages are no entry points
    stages = [cls(conf) for cls in classes]
    return Pipeline(conf, HostContext("hv1", nva=None), journal, stages=stages)


# -- options and loading -----------------------------------------------------


def test_register_opts_is_idempotent_and_has_the_documented_defaults() -> None:
    conf = cfg.ConfigOpts()
    engine.register_opts(conf)
    engine.register_opts(conf)
    assert conf.pipeline.stages == engine.DEFAULT_STAGES
    assert conf.pipeline.retry_backoff == 0.05
    assert conf.pipeline.workers == 8
    assert conf.pipeline.journal.endswith("journal.sqlite")


def test_every_default_stage_is_declared_as_an_entry_point() -> None:
    declared = {ep.name for ep in importlib.metadata.entry_points(group=engine.NAMESPACE)}
    missing = set(engine.DEFAULT_STAGES) - declared
    assert not missing, f"not in setup.py (or the package needs reinstalling): {missing}"


def test_load_stages_unknown_name_names_it_and_lists_the_available_ones(
    conf: cfg.ConfigOpts,
) -> None:
    with pytest.raises(ConfigError) as err:
        load_stages(conf, ["no_such_stage"])
    text = str(err.value)
    assert "no_such_stage" in text
    # Declared in setup.py; listed without being imported.
    assert "available stages:" in text and "nva_prestage" in text and "hold_timer" in text


def test_load_stages_rejects_a_name_listed_twice(conf: cfg.ConfigOpts) -> None:
    with pytest.raises(ConfigError, match=r"more than once.*nve_plug"):
        load_stages(conf, ["nve_plug", "announce", "nve_plug"])


_LOADED: list[str] = []
LoadableA = make_stage("loadable_a", PREP, S, _LOADED)
LoadableB = make_stage("loadable_b", PREP, S, _LOADED)


@pytest.fixture
def fake_entry_points(monkeypatch: pytest.MonkeyPatch) -> None:
    """Point the stage namespace at this module's classes (and one broken entry)."""
    eps = [
        importlib.metadata.EntryPoint(f"loadable_{x}", f"{__name__}:Loadable{x.upper()}", ns)
        for x, ns in (("a", engine.NAMESPACE), ("b", engine.NAMESPACE))
    ]
    eps.append(
        importlib.metadata.EntryPoint("broken", "no_such_module_xyz:Stage", engine.NAMESPACE)
    )
    monkeypatch.setitem(stevedore.ExtensionManager.ENTRY_POINT_CACHE, engine.NAMESPACE, eps)


@pytest.mark.usefixtures("fake_entry_points")
def test_load_stages_through_stevedore_keeps_the_listed_order(conf: cfg.ConfigOpts) -> None:
    stages = load_stages(conf, ["loadable_b", "loadable_a"])
    assert [s.name for s in stages] == ["loadable_b", "loadable_a"]
    # invoke_args=(conf,): each stage registered its group in our conf.
    assert conf.stage_loadable_b.deadline == 2.0


@pytest.mark.usefixtures("fake_entry_points")
def test_load_stages_reports_an_entry_point_that_cannot_be_imported(
    conf: cfg.ConfigOpts,
) -> None:
    with pytest.raises(ConfigError, match=r"broken .*could not be loaded"):
        load_stages(conf, ["loadable_a", "broken"])


# -- order -------------------------------------------------------------------


def test_stages_run_in_list_order_within_their_phase_and_role(
    conf: cfg.ConfigOpts, journal: Journal, log: list[str]
) -> None:
    classes = [
        make_stage("a", PREP, S, log),
        make_stage("b", PREP, D, log),
        make_stage("c", PREP, S, log),
        make_stage("d", SWITCH, S, log),
        make_stage("e", PREP, S, log),
    ]
    report = pipeline(conf, journal, classes).handle(event(PREP, S))
    assert report.ok and report.error is None
    assert log == ["run a", "run c", "run e"]
    assert [t.stage for t in report.timeline] == ["a", "c", "e"]
    assert all(t.outcome == "ok" and t.attempts == 1 for t in report.timeline)
    assert report.timeline[0].started_offset_ms >= 0

    log.clear()
    other = Journal(":memory:")
    pipeline(conf, other, list(reversed(classes))).handle(event(PREP, S))
    assert log == ["run e", "run c", "run a"]


def test_the_journal_keeps_each_record_and_stage_notes_reach_the_timeline(
    conf: cfg.ConfigOpts, journal: Journal, log: list[str]
) -> None:
    def run(ctx: StageContext) -> dict[str, Any]:
        ctx.note(peers=3)
        return {"port": "tap0"}

    report = pipeline(conf, journal, [make_stage("a", PREP, S, log, run=run)]).handle(event(PREP))
    assert report.timeline[0].notes == {"peers": 3}
    [done] = journal.completed_stages("m1")
    assert (done.stage, done.record, done.state) == ("a", {"port": "tap0"}, "completed")


# -- failure and revert --------------------------------------------------------


def fail(ctx: StageContext) -> Any:
    raise ValueError("NVE refused the port")


def test_a_failing_stage_reverts_completed_stages_newest_first_across_phases(
    conf: cfg.ConfigOpts, journal: Journal, log: list[str]
) -> None:
    records: list[tuple[str, Any]] = []

    def keep(ctx: StageContext, record: Any) -> None:
        records.append((ctx.phase.value, record))

    classes = [
        make_stage("p1", PREP, S, log, revert=keep),
        make_stage("p2", PREP, S, log, revert=keep),
        make_stage("s1", SWITCH, S, log, revert=keep),
        make_stage("s2", SWITCH, S, log, run=fail),
        make_stage("s3", SWITCH, S, log),
    ]
    pipe = pipeline(conf, journal, classes)
    assert pipe.handle(event(PREP)).ok

    report = pipe.handle(event(SWITCH))

    assert not report.ok
    assert report.error is not None
    assert "s2" in report.error and "NVE refused the port" in report.error
    assert log == ["run p1", "run p2", "run s1", "run s2", "revert s1", "revert p2", "revert p1"]
    assert report.reverted == ["s1", "p2", "p1"]
    # revert got the record run() returned, in the stage's own phase
    assert records == [
        ("SWITCHOVER", {"by": "s1"}),
        ("PREPARE", {"by": "p2"}),
        ("PREPARE", {"by": "p1"}),
    ]
    assert [(t.stage, t.outcome) for t in report.timeline] == [
        ("s1", "ok"),
        ("s2", "failed"),
        ("s1", "reverted"),
        ("p2", "reverted"),
        ("p1", "reverted"),
    ]
    rec = journal.get("m1")
    assert rec is not None and rec.status == "failed"
    states = {(r.phase, r.stage): r.state for r in rec.stages}
    assert states[(SWITCH, "s2")] == "failed" and states[(PREP, "p1")] == "reverted"
    assert journal.completed_stages("m1") == []


def test_a_failing_revert_is_recorded_and_does_not_stop_the_others(
    conf: cfg.ConfigOpts, journal: Journal, log: list[str]
) -> None:
    def broken(ctx: StageContext, record: Any) -> None:
        raise RuntimeError("port already gone")

    classes = [
        make_stage("p1", PREP, S, log),
        make_stage("p2", PREP, S, log, revert=broken),
        make_stage("p3", PREP, S, log),
        make_stage("p4", PREP, S, log, run=fail),
    ]
    report = pipeline(conf, journal, classes).handle(event(PREP))
    assert log[-3:] == ["revert p3", "revert p2", "revert p1"]
    assert report.reverted == ["p3", "p1"]
    assert report.error is not None and "port already gone" in report.error
    run = journal.stage_run("m1", PREP, "p2")
    assert run is not None and run.error is not None and "port already gone" in run.error


def test_events_after_a_failure_do_not_run_but_aborted_still_closes_it(
    conf: cfg.ConfigOpts, journal: Journal, log: list[str]
) -> None:
    classes = [make_stage("p1", PREP, S, log, run=fail), make_stage("s1", SWITCH, S, log)]
    pipe = pipeline(conf, journal, classes)
    assert not pipe.handle(event(PREP)).ok
    later = pipe.handle(event(SWITCH))
    assert not later.ok and later.error is not None and "failed earlier" in later.error
    assert "run s1" not in log
    assert pipe.handle(event(ABORT)).ok
    rec = journal.get("m1")
    assert rec is not None and rec.status == "reverted"


# -- retries and deadlines -----------------------------------------------------


def test_a_transient_error_is_retried_until_it_succeeds(
    conf: cfg.ConfigOpts, journal: Journal, log: list[str]
) -> None:
    failures = iter([TransientError("NVA busy"), TransientError("NVA busy")])

    def flaky(ctx: StageContext) -> Any:
        err = next(failures, None)
        if err is not None:
            raise err
        return {"ok": True}

    report = pipeline(conf, journal, [make_stage("a", PREP, S, log, run=flaky)]).handle(event(PREP))
    assert report.ok
    assert log == ["run a"] * 3
    assert report.timeline[0].attempts == 3
    run = journal.stage_run("m1", PREP, "a")
    assert run is not None and run.attempts == 3 and run.state == "completed"


def test_retries_stop_at_the_stage_attempts_and_other_errors_are_not_retried(
    conf: cfg.ConfigOpts, journal: Journal, log: list[str]
) -> None:
    def busy(ctx: StageContext) -> Any:
        raise TransientError("NVA busy")

    classes = [make_stage("t", PREP, S, log, run=busy, attempts=2)]
    report = pipeline(conf, journal, classes).handle(event(PREP))
    assert not report.ok and report.error is not None and "after 2 attempt(s)" in report.error
    assert log == ["run t", "run t"]

    log.clear()
    other = Journal(":memory:")
    report = pipeline(conf, other, [make_stage("v", PREP, S, log, run=fail)]).handle(event(PREP))
    assert log == ["run v"] and report.timeline[0].attempts == 1


def test_no_retry_is_started_past_the_deadline(
    conf: cfg.ConfigOpts, journal: Journal, log: list[str]
) -> None:
    conf.set_override("retry_backoff", 30.0, group="pipeline")

    def busy(ctx: StageContext) -> Any:
        raise TransientError("NVA busy")

    classes = [make_stage("t", PREP, S, log, run=busy, attempts=5, deadline=1.0)]
    report = pipeline(conf, journal, classes).handle(event(PREP))
    assert not report.ok and report.error is not None and "deadline" in report.error
    assert log == ["run t"]


def test_a_stage_past_its_deadline_fails_and_reverts_the_others(
    conf: cfg.ConfigOpts, journal: Journal, log: list[str]
) -> None:
    release = threading.Event()
    late: list[BaseException] = []

    def hang(ctx: StageContext) -> Any:
        release.wait(5)
        try:
            ctx.checkpoint({"too": "late"})
        except StageFailed as err:
            late.append(err)
        return None

    classes = [
        make_stage("a", PREP, S, log),
        make_stage("slow", PREP, S, log, run=hang, deadline=0.1),
    ]
    report = pipeline(conf, journal, classes).handle(event(PREP))
    release.set()
    assert not report.ok
    assert report.error is not None and "slow" in report.error and "deadline" in report.error
    assert report.reverted == ["a"]
    # the abandoned thread may not write the journal any more
    for _ in range(500):
        if late:
            break
        time.sleep(0.01)
    assert late and "deadline" in str(late[0])
    run = journal.stage_run("m1", PREP, "slow")
    assert run is not None and run.checkpoint == {} and run.state == "failed"


# -- aborted, done, duplicates ---------------------------------------------------


def test_aborted_reverts_everything_newest_first_and_later_events_are_ignored(
    conf: cfg.ConfigOpts, journal: Journal, log: list[str]
) -> None:
    classes = [
        make_stage("p1", PREP, S, log),
        make_stage("p2", PREP, S, log),
        make_stage("s1", SWITCH, S, log),
        make_stage("c1", DONE, S, log),
    ]
    pipe = pipeline(conf, journal, classes)
    pipe.handle(event(PREP))
    pipe.handle(event(SWITCH))
    report = pipe.handle(event(ABORT))
    assert report.ok and report.phase is ABORT
    assert report.reverted == ["s1", "p2", "p1"]
    assert log[3:] == ["revert s1", "revert p2", "revert p1"]
    rec = journal.get("m1")
    assert rec is not None and rec.status == "reverted"

    ignored = pipe.handle(event(DONE))
    assert ignored.ok and ignored.detail is not None and "reverted" in ignored.detail
    assert "run c1" not in log


def test_a_duplicate_event_does_not_run_its_phase_twice(
    conf: cfg.ConfigOpts, journal: Journal, log: list[str]
) -> None:
    pipe = pipeline(conf, journal, [make_stage("p1", PREP, S, log)])
    pipe.handle(event(PREP))
    again = pipe.handle(event(PREP))
    assert log == ["run p1"]
    assert again.ok and again.timeline == []
    assert again.detail is not None and "already completed" in again.detail


@pytest.mark.parametrize(
    ("role", "phases"),
    [
        (S, [PREP, SWITCH, RESUMED, DONE]),  # the source's last phase is COMPLETED
        (D, [PREP, SWITCH, RESUMED]),  # the destination's is RESUMED
    ],
)
def test_the_migration_is_done_after_the_last_phase_of_the_role(
    conf: cfg.ConfigOpts,
    journal: Journal,
    log: list[str],
    role: Role,
    phases: list[Phase],
) -> None:
    classes = [make_stage(f"x{i}", p, role, log) for i, p in enumerate([PREP, SWITCH, RESUMED])]
    pipe = pipeline(conf, journal, classes)
    statuses = []
    for phase in phases:
        assert pipe.handle(event(phase, role)).ok
        rec = journal.get("m1")
        assert rec is not None
        statuses.append(rec.status)
    assert statuses == ["running"] * (len(phases) - 1) + ["done"]
    late = pipe.handle(event(DONE, role))
    assert late.detail is not None and "done" in late.detail


def test_a_destination_with_completed_stages_is_done_only_after_completed(
    conf: cfg.ConfigOpts, journal: Journal, log: list[str]
) -> None:
    classes = [make_stage("r", RESUMED, D, log), make_stage("c", DONE, D, log)]
    pipe = pipeline(conf, journal, classes)
    pipe.handle(event(RESUMED, D))
    rec = journal.get("m1")
    assert rec is not None and rec.status == "running"
    pipe.handle(event(DONE, D))
    rec = journal.get("m1")
    assert rec is not None and rec.status == "done"
    assert log == ["run r", "run c"]


def test_an_event_for_the_other_role_of_a_journalled_migration_is_refused(
    conf: cfg.ConfigOpts, journal: Journal, log: list[str]
) -> None:
    pipe = pipeline(conf, journal, [make_stage("p", PREP, S, log), make_stage("q", PREP, D, log)])
    pipe.handle(event(PREP, S))
    wrong = pipe.handle(event(SWITCH, D))
    assert not wrong.ok and wrong.error is not None and "journalled" in wrong.error
    assert log == ["run p"]


def test_a_stage_declared_for_aborted_is_a_config_error(
    conf: cfg.ConfigOpts, journal: Journal, log: list[str]
) -> None:
    with pytest.raises(ConfigError, match="ABORTED"):
        pipeline(conf, journal, [make_stage("x", ABORT, S, log)])


# -- dispatcher ------------------------------------------------------------------


def test_dispatcher_runs_one_migrations_events_one_after_another_in_order(
    conf: cfg.ConfigOpts, journal: Journal
) -> None:
    spans: list[tuple[str, float, float]] = []
    lock = threading.Lock()

    def timed(name: str, pause: float) -> RunHook:
        def run(ctx: StageContext) -> Any:
            start = time.monotonic()
            time.sleep(pause)  # gives a wrongly parallel dispatcher time to overlap
            with lock:
                spans.append((name, start, time.monotonic()))
            return None

        return run

    log: list[str] = []
    classes = [
        make_stage("p", PREP, S, log, run=timed("p", 0.05)),
        make_stage("s", SWITCH, S, log, run=timed("s", 0.02)),
        make_stage("c", DONE, S, log, run=timed("c", 0.0)),
    ]
    with Dispatcher(pipeline(conf, journal, classes)) as dispatcher:
        futures = [dispatcher.submit(event(p)) for p in (PREP, SWITCH, DONE)]
        reports = [f.result(timeout=5) for f in futures]
    assert [r.phase for r in reports] == [PREP, SWITCH, DONE]
    assert all(r.ok for r in reports)
    assert [name for name, _, _ in spans] == ["p", "s", "c"]
    for (_, _, end), (_, start, _) in itertools.pairwise(spans):
        assert end <= start


def test_dispatcher_runs_two_migrations_at_the_same_time(
    conf: cfg.ConfigOpts, journal: Journal
) -> None:
    # Each migration's stage waits until the other one is inside its stage
    # too: this can only succeed when both run at the same time.
    barrier = threading.Barrier(2, timeout=5)
    inside: list[tuple[str, float]] = []

    def meet(ctx: StageContext) -> Any:
        inside.append((ctx.migration.id, time.monotonic()))
        barrier.wait()
        return None

    log: list[str] = []
    pipe = pipeline(conf, journal, [make_stage("p", PREP, S, log, run=meet, deadline=6)])
    dispatcher = Dispatcher(pipe, workers=2)
    try:
        first = dispatcher.submit(event(PREP, mid="m1"))
        second = dispatcher.submit(event(PREP, mid="m2"))
        assert first.result(timeout=8).ok and second.result(timeout=8).ok
    finally:
        dispatcher.close()
    assert sorted(mid for mid, _ in inside) == ["m1", "m2"]
    with pytest.raises(RuntimeError, match="closed"):
        dispatcher.submit(event(SWITCH))


def test_a_long_completed_phase_does_not_hold_up_another_migrations_switchover(
    conf: cfg.ConfigOpts, journal: Journal
) -> None:
    """One worker per lane: m1's COMPLETED (a hold timer) blocks its lane, yet m2's
    SWITCHOVER and m1's later events still run, each migration's in order."""
    release, holding = threading.Event(), threading.Event()
    ran: list[str] = []

    def hold(ctx: StageContext) -> Any:
        ran.append(f"hold {ctx.migration.id}")
        holding.set()
        assert release.wait(5)
        return None

    def note(name: str) -> Callable[[StageContext], Any]:
        def run(ctx: StageContext) -> Any:
            ran.append(f"{name} {ctx.migration.id}")
            return None

        return run

    log: list[str] = []
    classes = [
        make_stage("tunnel", SWITCH, S, log, run=note("tunnel")),
        make_stage("timer", DONE, S, log, run=hold, deadline=10),
    ]
    with Dispatcher(pipeline(conf, journal, classes), workers=1) as dispatcher:
        m1_switch = dispatcher.submit(event(SWITCH, mid="m1"))
        m1_done = dispatcher.submit(event(DONE, mid="m1"))
        assert m1_switch.result(timeout=5).ok
        assert holding.wait(5)  # m1's hold timer occupies its lane's only thread
        m2_switch = dispatcher.submit(event(SWITCH, mid="m2"))
        assert m2_switch.result(timeout=5).ok  # while m1's hold timer still runs
        assert not m1_done.done()
        release.set()
        assert m1_done.result(timeout=5).ok
    assert ran.index("tunnel m1") < ran.index("hold m1") < ran.index("tunnel m2"), ran


def test_dispatcher_delivers_an_engine_exception_through_the_future(
    conf: cfg.ConfigOpts, log: list[str]
) -> None:
    broken = Journal(":memory:")
    pipe = pipeline(conf, broken, [make_stage("p", PREP, S, log)])
    broken.close()  # every journal access now raises
    with Dispatcher(pipe) as dispatcher:
        future = dispatcher.submit(event(PREP))
        with pytest.raises(Exception, match="closed"):
            future.result(timeout=5)


def test_a_best_effort_stage_failure_neither_stops_nor_reverts(
    conf: cfg.ConfigOpts, journal: Journal, log: list[str]
) -> None:
    """A failed announcement must not unplug a VM that already runs at its destination."""
    shout = make_stage("shout", RESUMED, D, log, run=fail)
    shout.best_effort = True
    classes = [make_stage("plug", RESUMED, D, log), shout, make_stage("commit", RESUMED, D, log)]
    pipe = pipeline(conf, journal, classes)

    report = pipe.handle(event(RESUMED, D))

    assert report.ok, report.error
    assert [t.stage for t in report.timeline] == ["plug", "shout", "commit"]
    assert not report.reverted
    assert "shout" in (report.detail or "")
    record = journal.get("m1")
    assert record is not None and record.status == "done"
    assert not any(line.startswith("revert") for line in log), log


def test_the_outcome_is_decided_once_every_stage_that_can_fail_the_phase_ran(
    conf: cfg.ConfigOpts, journal: Journal, log: list[str]
) -> None:
    """libvirt's hook answers from ``decided``: after the binding stages, while a
    best-effort stage (the NVE's preparation) still runs."""
    release = threading.Event()

    def slow(ctx: StageContext) -> Any:
        assert release.wait(5)
        return None

    tail = make_stage("expect", PREP, D, log, run=slow, deadline=10)
    tail.best_effort = True
    classes = [make_stage("prestage", PREP, D, log), tail]
    decided: concurrent.futures.Future[str | None] = concurrent.futures.Future()
    with Dispatcher(pipeline(conf, journal, classes)) as dispatcher:
        report = dispatcher.submit(event(PREP, D), decided)
        assert decided.result(timeout=5) is None  # allowed, while "expect" still runs
        assert log[0] == "run prestage" and not report.done()
        release.set()
        assert report.result(timeout=5).ok


def test_a_binding_stage_failure_is_the_decided_outcome(
    conf: cfg.ConfigOpts, journal: Journal, log: list[str]
) -> None:
    tail = make_stage("expect", PREP, D, log)
    tail.best_effort = True
    classes = [make_stage("prestage", PREP, D, log, run=fail), tail]
    decided: concurrent.futures.Future[str | None] = concurrent.futures.Future()
    report = pipeline(conf, journal, classes).handle(event(PREP, D), decided)
    assert not report.ok
    outcome = decided.result(timeout=0)
    assert outcome is not None and "NVE refused the port" in outcome, outcome
    assert "run expect" not in log  # nothing after the failed stage ran


def test_a_phase_of_best_effort_stages_only_is_decided_before_they_run(
    conf: cfg.ConfigOpts, journal: Journal, log: list[str]
) -> None:
    seen: list[bool] = []
    decided: concurrent.futures.Future[str | None] = concurrent.futures.Future()

    def look(ctx: StageContext) -> Any:
        seen.append(decided.done())
        return None

    only = make_stage("expect", PREP, D, log, run=look)
    only.best_effort = True
    assert pipeline(conf, journal, [only]).handle(event(PREP, D), decided).ok
    assert seen == [True] and decided.result(timeout=0) is None


def test_a_stage_alongside_starts_first_and_the_outcome_does_not_wait_for_it(
    conf: cfg.ConfigOpts, journal: Journal, log: list[str]
) -> None:
    """The destination's hold (nve_prepare) runs beside the directory's pre-stage:
    it starts before it, the hook's answer does not wait for it, the phase does."""
    release, started = threading.Event(), threading.Event()

    def hold(ctx: StageContext) -> Any:
        started.set()
        assert release.wait(5)
        return {"held": True}

    def prestage(ctx: StageContext) -> Any:
        assert started.wait(5)  # the stage listed first is already running
        return None

    side = make_stage("expect", PREP, D, log, run=hold, deadline=10)
    side.best_effort, side.alongside = True, True
    classes = [side, make_stage("prestage", PREP, D, log, run=prestage)]
    decided: concurrent.futures.Future[str | None] = concurrent.futures.Future()
    with Dispatcher(pipeline(conf, journal, classes)) as dispatcher:
        report = dispatcher.submit(event(PREP, D), decided)
        assert decided.result(timeout=5) is None  # answered while "expect" still runs
        assert not report.done()  # the phase waits for it
        release.set()
        done = report.result(timeout=5)
    assert done.ok
    assert [t.stage for t in done.timeline] == ["prestage", "expect"]
    record = journal.get("m1")
    assert record is not None
    assert {r.stage: r.state for r in record.stages} == {
        "expect": "completed",
        "prestage": "completed",
    }


def test_a_veto_reverts_the_stage_alongside_once_it_ran(
    conf: cfg.ConfigOpts, journal: Journal, log: list[str]
) -> None:
    def slow(ctx: StageContext) -> Any:
        time.sleep(0.2)
        return None

    side = make_stage("expect", PREP, D, log, run=slow)
    side.best_effort, side.alongside = True, True
    classes = [side, make_stage("prestage", PREP, D, log, run=fail)]
    decided: concurrent.futures.Future[str | None] = concurrent.futures.Future()
    report = pipeline(conf, journal, classes).handle(event(PREP, D), decided)
    assert not report.ok and decided.result(timeout=0)
    # it finished before the revert, and was reverted with the rest
    assert log.index("run expect") < log.index("revert expect"), log


def test_a_stage_alongside_must_be_best_effort(conf: cfg.ConfigOpts) -> None:
    class Bad(Stage):
        name, phase, role, alongside = "bad", PREP, D, True

        def run(self, ctx: StageContext) -> Any:
            return None

    with mock.patch.object(engine, "load_named", return_value=[("bad", Bad(conf))]):
        with pytest.raises(ConfigError, match="must be best_effort"):
            engine.load_stages(conf, ["bad"])
