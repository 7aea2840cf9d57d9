"""The engine: run the configured stages for each migration event, journalled.

One ``Pipeline`` serves one host. For each ``MigrationEvent`` it runs the
stages of (event.phase, event.role) in the order of ``[pipeline] stages``,
writing every step to the host's ``Journal`` first, so that:

* a failing stage reverts what this migration already changed on this host
  (newest first) instead of leaving the network half moved;
* ABORTED reverts everything done so far;
* duplicate or late events are harmless (a phase runs once per migration);
* after a crash, ``Pipeline.recover`` finishes or reverts what was in flight.

Stages run in worker threads so the engine can stop waiting at a deadline.
A Python thread cannot be killed: a stage that overruns keeps running in the
background while the engine reverts around it. Stages must therefore honour
``ctx.remaining()`` in everything that can block (socket timeouts, polls).

``Dispatcher`` feeds events to a pipeline: one migration's events strictly in
arrival order, different migrations in parallel.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, Self, TypeVar

import tenacity
from oslo_config import cfg

from vmm_orchestrator import journal as jr
from vmm_orchestrator.errors import ConfigError, StageFailed, TransientError
from vmm_orchestrator.journal import Journal, MigrationRecord, StageRun
from vmm_orchestrator.model import (
    ORDERED_PHASES,
    Migration,
    MigrationEvent,
    Phase,
    Role,
)
from vmm_orchestrator.options import require
from vmm_orchestrator.plugin_loader import load_named
from vmm_orchestrator.stage import HostContext, Stage, StageContext

LOG = logging.getLogger(__name__)

T = TypeVar("T")

#: The stevedore namespace stages are registered in (see setup.py).
NAMESPACE = "vmm_orchestrator.stages"
GROUP = "pipeline"

#: ``nve_prepare`` first, and beside the rest (``Stage.alongside``): the destination
#: holds the VM's frames from PREPARE on, whatever the directory's round trip costs
#: (under an etcd evacuation it came after the pause otherwise), while the veto does
#: not wait for it; a veto only reverts a local expectation.
DEFAULT_STAGES = [
    "nve_prepare",
    "nva_prestage",
    "announce",
    "nve_plug",
    "peer_update",
    "inflight_tunnel",
    "arp_refresh",
    "hold_timer",
]

PIPELINE_OPTS: list[cfg.Opt] = [
    cfg.ListOpt(
        "stages",
        default=DEFAULT_STAGES,
        help="Stages to run, by entry point name in the vmm_orchestrator.stages namespace. "
        "Each stage declares the phase and role it runs in; within one phase and role the "
        "stages run in the order of this list. A stage not listed never runs.",
    ),
    cfg.StrOpt(
        "journal",
        default="/var/lib/vmm-orchestrator/journal.sqlite",
        help="Path of this host's sqlite journal of migrations and stage runs. It lets a "
        "restarted orchestrator finish or revert migrations that were in flight.",
    ),
    cfg.FloatOpt(
        "retry_backoff",
        default=0.05,
        min=0.0,
        help="Seconds to wait before retrying a stage that failed with a transient error; "
        "the wait doubles at each further attempt and never reaches past the deadline.",
    ),
    cfg.IntOpt(
        "workers",
        default=8,
        min=1,
        help="How many migrations the dispatcher handles at the same time (events of one "
        "migration always run one after another), in each of its two lanes: COMPLETED, "
        "whose hold timer waits for seconds, has a lane of its own.",
    ),
]

#: The last phase of each role on a successful migration (libvirt: the
#: source sees the migration complete, the destination sees the VM resume).
TERMINAL_PHASE = {Role.SOURCE: Phase.COMPLETED, Role.DESTINATION: Phase.RESUMED}

#: What a recovery ``locate`` answers when the hypervisor still runs the
#: migration's job: neither finished nor failed, so nothing is reverted;
#: the phase reached is finished and the events still to come drive the rest.
IN_FLIGHT = "<migration in flight>"


def register_opts(conf: cfg.ConfigOpts) -> None:
    """Register the [pipeline] options; calling it again is harmless."""
    conf.register_opts(PIPELINE_OPTS, group=GROUP)


def list_opts() -> list[tuple[str, list[cfg.Opt]]]:
    """The engine's options, for oslo-config-generator."""
    return [(GROUP, PIPELINE_OPTS)]


# -- loading ------------------------------------------------------------------


def load_stages(conf: cfg.ConfigOpts, names: list[str]) -> list[Stage]:
    """Instantiate the named stages (in ``names`` order) through stevedore.

    Raises ConfigError, naming the culprit, for a name listed twice, a name
    with no entry point (listing the available ones), an entry point that
    cannot be imported or instantiated, and a plugin that is not a Stage:
    a pipeline silently missing a stage would leave the network behind.
    """
    loaded = load_named(
        NAMESPACE,
        list(names),
        conf,
        base=Stage,
        item="stage",
        noun="stage",
        option="[pipeline] stages",
        available_hint=lambda names: f"available stages: {', '.join(names) or 'none installed'}",
    )
    for name, stage in loaded:
        if stage.alongside and not stage.best_effort:
            raise ConfigError(
                f"stage {name} runs alongside the others but can fail the phase",
                hint="a stage that runs alongside must be best_effort; fix the plugin",
            )
    return [stage for _, stage in loaded]


# -- reports ------------------------------------------------------------------


#: Where a phase's outcome goes as soon as it is known: None (it succeeds) or the error.
Decided = concurrent.futures.Future[str | None]


def _run_into(future: concurrent.futures.Future[T], fn: Callable[..., T], *args: Any) -> None:
    """Run ``fn`` in this thread and hand its result (or error) to ``future``."""
    try:
        future.set_result(fn(*args))
    except BaseException as err:  # the waiting phase re-raises it
        future.set_exception(err)


def _settle(decided: Decided | None, outcome: str | None) -> None:
    """Give ``decided`` its outcome, once (later outcomes are dropped)."""
    if decided is not None and not decided.done():
        with contextlib.suppress(concurrent.futures.InvalidStateError):
            decided.set_result(outcome)


@dataclasses.dataclass(frozen=True)
class StageTiming:
    """One stage run or revert on the timeline of a phase.

    ``started_offset_ms`` counts from the hypervisor signal
    (``MigrationEvent.monotonic``), so the timeline shows how long the
    network lagged behind the VM, not just how long each stage took.
    """

    stage: str
    phase: Phase
    started_offset_ms: float
    duration_ms: float
    attempts: int
    outcome: str  # 'ok' | 'failed' | 'reverted'
    notes: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class PhaseReport:
    """What handling one event (or recovering one migration) did.

    ``ok`` is False when a stage failed (then ``error`` says which and why
    and ``reverted`` lists what was undone, newest first) or when a revert
    itself failed. ``detail`` says why nothing ran (ignored event) or what
    recovery decided.
    """

    migration_id: str
    host: str
    phase: Phase
    role: Role
    ok: bool
    error: str | None = None
    reverted: list[str] = dataclasses.field(default_factory=list)
    timeline: list[StageTiming] = dataclasses.field(default_factory=list)
    detail: str | None = None


@dataclasses.dataclass
class _CallResult:
    ok: bool
    value: Any = None
    error: str | None = None
    attempts: int = 0


def _in_thread(fn: Callable[[], T], name: str) -> concurrent.futures.Future[T]:
    """Run ``fn`` in a new daemon thread; its outcome lands in the returned Future.

    Not a ThreadPoolExecutor: a stage stuck past its deadline would hold a
    pool worker forever and, worse, block interpreter exit (pool threads are
    joined at exit). A daemon thread is abandoned cleanly.
    """
    future: concurrent.futures.Future[T] = concurrent.futures.Future()

    def target() -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            result = fn()
        except BaseException as err:
            future.set_exception(err)
        else:
            future.set_result(result)

    threading.Thread(target=target, name=name, daemon=True).start()
    return future


def _describe(err: BaseException) -> str:
    text = str(err)
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


# -- observers ----------------------------------------------------------------

#: ``observer(pipeline, report, origin_monotonic)``: called after every
#: PhaseReport a pipeline produces (events and recovery), in the thread that
#: produced it, so metrics and history hang off one place. Keep it quick.
Observer = Callable[["Pipeline", PhaseReport, float], None]

_OBSERVERS: list[Observer] = []
_OBSERVERS_GUARD = threading.Lock()


def add_observer(observer: Observer) -> None:
    """Have ``observer`` called for every PhaseReport of every pipeline (once)."""
    with _OBSERVERS_GUARD:
        if observer not in _OBSERVERS:
            _OBSERVERS.append(observer)


def remove_observer(observer: Observer) -> None:
    """Stop calling ``observer``; harmless when it was not added."""
    with _OBSERVERS_GUARD:
        if observer in _OBSERVERS:
            _OBSERVERS.remove(observer)


def _log_fields(
    host: str, migration_id: str, phase: Phase, role: Role | None = None, **more: Any
) -> dict[str, Any]:
    """``extra`` of a log record: what a JSON log shipper indexes (see logs.py)."""
    fields = {"host": host, "migration_id": migration_id, "phase": phase.value, **more}
    if role is not None:
        fields["role"] = role.value
    return fields


def _log_report(report: PhaseReport) -> None:
    """One INFO line per stage outcome and one per phase, each with the migration id.

    Reports of ignored events carry nothing new (the engine said why already).
    """
    if report.ok and not report.timeline and (report.detail or "").startswith("ignored"):
        return
    for t in report.timeline:
        LOG.log(
            logging.WARNING if t.outcome == "failed" else logging.INFO,
            "host %s: migration %s %s stage %s %s in %.1f ms (+%.1f ms from the event, "
            "%d attempt(s))",
            report.host,
            report.migration_id,
            t.phase.value,
            t.stage,
            t.outcome,
            t.duration_ms,
            t.started_offset_ms,
            t.attempts,
            extra=_log_fields(
                report.host,
                report.migration_id,
                t.phase,
                report.role,
                stage=t.stage,
                outcome=t.outcome,
                duration_ms=round(t.duration_ms, 3),
                figures=t.notes,
            ),
        )
    if report.ok:
        outcome = "ok"
    elif report.reverted:
        outcome = f"failed: {report.error}; reverted: {', '.join(report.reverted)}"
    else:
        outcome = f"failed: {report.error}"
    if report.ok and report.reverted:
        outcome = f"ok; reverted: {', '.join(report.reverted)}"
    end = max((t.started_offset_ms + t.duration_ms for t in report.timeline), default=0.0)
    LOG.log(
        logging.INFO if report.ok else logging.ERROR,
        "host %s: migration %s %s as %s %s (%d stage run(s), %.1f ms from the event)%s",
        report.host,
        report.migration_id,
        report.phase.value,
        report.role.value,
        outcome,
        len(report.timeline),
        end,
        f"; {report.detail}" if report.detail else "",
        extra=_log_fields(
            report.host,
            report.migration_id,
            report.phase,
            report.role,
            outcome="ok" if report.ok else "failed",
            duration_ms=round(end, 3),
            reverted=list(report.reverted),
        ),
    )


# -- pipeline -----------------------------------------------------------------


class Pipeline:
    """The stages of one host, run per event and journalled.

    ``stages`` defaults to ``load_stages(conf, conf.pipeline.stages)``; the
    order of the list is the run order within each (phase, role). ``clock``
    must share time.monotonic's origin (events and ``ctx.remaining()`` use
    it); tests may wrap it.

    ``handle`` is safe to call from several threads for different
    migrations; calls for one migration are serialized.
    """

    def __init__(
        self,
        conf: cfg.ConfigOpts,
        host: HostContext,
        journal: Journal,
        stages: list[Stage] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        require(conf, GROUP, "the pipeline")
        self.conf = conf
        self.host = host
        self.journal = journal
        self._clock = clock
        self.stages = (
            list(stages) if stages is not None else load_stages(conf, conf.pipeline.stages)
        )
        self._by_name = self._index(self.stages)
        self._groups: dict[tuple[Phase, Role], list[Stage]] = collections.defaultdict(list)
        for stage in self.stages:
            self._groups[(stage.phase, stage.role)].append(stage)
        self._locks: dict[str, tuple[threading.Lock, int]] = {}
        self._locks_guard = threading.Lock()

    @staticmethod
    def _index(stages: list[Stage]) -> dict[str, Stage]:
        by_name: dict[str, Stage] = {}
        for stage in stages:
            if stage.name in by_name:
                raise ConfigError(f"two stages are named {stage.name}")
            if stage.phase not in ORDERED_PHASES:
                raise ConfigError(
                    f"stage {stage.name} declares phase {stage.phase.value}; stages run in "
                    f"{', '.join(p.value for p in ORDERED_PHASES)} (ABORTED only reverts)"
                )
            by_name[stage.name] = stage
        return by_name

    def stages_for(self, phase: Phase, role: Role) -> list[Stage]:
        """The stages that run in ``phase`` for ``role``, in run order."""
        return list(self._groups.get((phase, role), []))

    # -- events ---------------------------------------------------------------

    def handle(self, event: MigrationEvent, decided: Decided | None = None) -> PhaseReport:
        """Run the stages of the event's phase and role; never raises for a stage.

        A stage failure reverts the migration's completed stages on this host
        and is reported with ``ok=False``. Journal errors (disk full) do raise:
        the engine cannot work without its journal. The report goes to the
        observers (:func:`add_observer`) before it is returned.

        ``decided`` gets the phase's outcome as soon as it is known: None
        (it succeeds) once every stage that can fail it ran, before the
        best-effort stages after them, or the error. A hypervisor hook that
        vetoes on the outcome (libvirt's ``migrate begin``) answers from it
        while the rest of the phase goes on.
        """
        try:
            report = self._handle(event, decided)
        except BaseException as err:
            _settle(decided, f"the engine failed: {_describe(err)}")
            raise
        _settle(decided, None if report.ok else report.error or "failed")
        self._observe(report, event.monotonic)
        return report

    def _handle(self, event: MigrationEvent, decided: Decided | None = None) -> PhaseReport:
        with self._migration_lock(event.migration.id):
            self.journal.begin_migration(event.migration, event.role)
            record = self.journal.get(event.migration.id)
            assert record is not None  # begin_migration just wrote it
            ignored = self._ignored(record, event)
            if ignored is not None:
                return ignored
            LOG.info(
                "host %s: migration %s %s as %s",
                self.host.name,
                event.migration.id,
                event.phase.value,
                event.role.value,
                extra=_log_fields(self.host.name, event.migration.id, event.phase, event.role),
            )
            if event.phase is Phase.ABORTED:
                return self._abort(event.migration, event.role, event.monotonic)
            return self._run_phase(
                event.migration, event.role, event.phase, event.monotonic, decided
            )

    def _ignored(self, record: MigrationRecord, event: MigrationEvent) -> PhaseReport | None:
        """A report for an event that must not run anything, else None."""
        mid = record.id
        if record.role is not event.role:
            error = (
                f"migration {mid} is journalled on host {self.host.name} as "
                f"{record.role.value}; the {event.phase.value} event for role "
                f"{event.role.value} is ignored"
            )
            LOG.error(error)
            return self._report(event.migration, event.role, event.phase, ok=False, error=error)
        if record.status in (jr.DONE, jr.REVERTED):
            detail = f"ignored: migration {mid} is already {record.status}"
        elif record.status == jr.FAILED and event.phase is not Phase.ABORTED:
            error = (
                f"migration {mid} failed earlier on host {self.host.name} and was reverted; "
                f"{event.phase.value} is not run"
            )
            LOG.warning(error)
            return self._report(event.migration, event.role, event.phase, ok=False, error=error)
        elif record.phases.get(event.phase) == jr.COMPLETED:
            detail = f"ignored: phase {event.phase.value} of migration {mid} already completed"
        else:
            return None
        LOG.info("host %s: %s", self.host.name, detail)
        return self._report(event.migration, event.role, event.phase, ok=True, detail=detail)

    def _report(
        self, migration: Migration, role: Role, phase: Phase, ok: bool = True, **kw: Any
    ) -> PhaseReport:
        return PhaseReport(migration.id, self.host.name, phase, role, ok, **kw)

    def _run_phase(
        self,
        migration: Migration,
        role: Role,
        phase: Phase,
        origin: float,
        decided: Decided | None = None,
    ) -> PhaseReport:
        """Run the phase's stages not yet completed; on a failure revert the migration."""
        report = self._report(migration, role, phase)
        self.journal.phase_started(migration.id, phase)
        stages = self.stages_for(phase, role)
        # After the last stage that can fail the phase, its success is known.
        binding = max((i for i, s in enumerate(stages) if not s.best_effort), default=-1)
        beside: list[tuple[Stage, concurrent.futures.Future[tuple[StageTiming, _CallResult]]]] = []

        def join_beside() -> None:
            for side, running in beside:
                timing, result = running.result()
                report.timeline.append(timing)
                if not result.ok:
                    self._best_effort_failed(report, side, migration, phase, timing, result)
            beside.clear()

        for index, stage in enumerate(stages):
            if index > binding:
                _settle(decided, None)
            previous = self.journal.stage_run(migration.id, phase, stage.name)
            if previous is not None and previous.state == jr.COMPLETED:
                continue  # completed before a crash; the journal holds its record
            if stage.alongside and stage.best_effort:
                running: concurrent.futures.Future[tuple[StageTiming, _CallResult]]
                running = concurrent.futures.Future()
                journalled = threading.Event()
                args = (running, self._run_stage, stage, migration, role, phase, origin)
                threading.Thread(
                    target=_run_into,
                    args=(*args, journalled),
                    name=f"stage-{stage.name}",
                    daemon=True,
                ).start()
                # In the journal before the next stage, as in the list: reverts go newest first.
                while not journalled.wait(0.05) and not running.done():
                    pass  # (done first: the journal failed; the join below raises it)
                beside.append((stage, running))
                continue
            timing, result = self._run_stage(stage, migration, role, phase, origin)
            report.timeline.append(timing)
            if not result.ok and stage.best_effort:
                self._best_effort_failed(report, stage, migration, phase, timing, result)
                continue
            if not result.ok:
                join_beside()  # what runs beside is reverted with the rest, once it ran
                self.journal.phase_failed(migration.id, phase)
                return self._fail(report, stage.name, result.error or "failed", origin)
        _settle(decided, None)  # every stage that could fail the phase passed
        join_beside()
        self.journal.phase_completed(migration.id, phase)
        if self._is_last_phase(role, phase):
            self.journal.set_status(migration.id, jr.DONE)
            LOG.info("host %s: migration %s done", self.host.name, migration.id)
        return report

    def _best_effort_failed(
        self,
        report: PhaseReport,
        stage: Stage,
        migration: Migration,
        phase: Phase,
        timing: StageTiming,
        result: _CallResult,
    ) -> None:
        """Best effort (e.g. one more announcement): its failure is reported, and the
        migration goes on. Journalled as completed so that neither a later failure
        nor recovery treats it as a failed migration."""
        error = result.error or "failed"
        LOG.warning(
            "host %s: best-effort stage %s of migration %s failed (%s); going on",
            self.host.name,
            stage.name,
            migration.id,
            error,
        )
        self.journal.stage_completed(
            migration.id, phase, stage.name, {"best_effort_failed": error}, timing.attempts
        )
        note = f"best-effort stage {stage.name} failed: {error}"
        report.detail = f"{report.detail}; {note}" if report.detail else note

    def _is_last_phase(self, role: Role, phase: Phase) -> bool:
        """Whether nothing is left for ``role`` after ``phase`` succeeded.

        That is the role's terminal phase (or later), unless stages are
        configured for this role in a later phase.
        """
        index = ORDERED_PHASES.index(phase)
        if index < ORDERED_PHASES.index(TERMINAL_PHASE[role]):
            return False
        return not any(self._groups.get((p, role)) for p in ORDERED_PHASES[index + 1 :])

    def _fail(self, report: PhaseReport, stage: str, error: str, origin: float) -> PhaseReport:
        report.ok = False
        report.error = f"stage {stage} failed in {report.phase.value}: {error}"
        LOG.error(
            "host %s: migration %s: %s; reverting",
            self.host.name,
            report.migration_id,
            report.error,
        )
        record = self.journal.get(report.migration_id)
        assert record is not None
        revert_errors = self._revert_all(record, origin, report)
        if revert_errors:
            report.error += "; revert errors: " + "; ".join(revert_errors)
        self.journal.set_status(report.migration_id, jr.FAILED)
        return report

    def _abort(self, migration: Migration, role: Role, origin: float) -> PhaseReport:
        """Revert every stage this migration ran on this host, newest first."""
        report = self._report(migration, role, Phase.ABORTED)
        self.journal.phase_started(migration.id, Phase.ABORTED)
        record = self.journal.get(migration.id)
        assert record is not None
        revert_errors = self._revert_all(record, origin, report)
        if revert_errors:
            report.ok = False
            report.error = "revert errors: " + "; ".join(revert_errors)
        self.journal.phase_completed(migration.id, Phase.ABORTED)
        self.journal.set_status(migration.id, jr.REVERTED)
        return report

    # -- stage calls ----------------------------------------------------------

    def _run_stage(
        self,
        stage: Stage,
        migration: Migration,
        role: Role,
        phase: Phase,
        origin: float,
        journalled: threading.Event | None = None,
    ) -> tuple[StageTiming, _CallResult]:
        previous = self.journal.stage_run(migration.id, phase, stage.name)
        saved = dict(previous.checkpoint) if previous is not None else {}
        self.journal.stage_started(migration.id, phase, stage.name)
        if journalled is not None:
            journalled.set()
        abandoned = threading.Event()
        ctx = self._context(stage, migration, role, phase, saved, abandoned)
        start = self._clock()
        result = self._call(stage, "run", lambda: stage.run(ctx), ctx.deadline, abandoned)
        if result.ok:
            result = self._check_record(stage, result)
        if result.ok:
            self.journal.stage_completed(
                migration.id, phase, stage.name, result.value, result.attempts
            )
        else:
            self.journal.stage_failed(
                migration.id,
                phase,
                stage.name,
                result.error or "failed",
                result.attempts,
            )
        outcome = "ok" if result.ok else "failed"
        timing = self._timing(stage.name, phase, origin, start, result, outcome, ctx.notes)
        return timing, result

    @staticmethod
    def _check_record(stage: Stage, result: _CallResult) -> _CallResult:
        """The journal keeps run()'s record as JSON; anything else is a stage bug."""
        try:
            json.dumps(result.value)
        except (TypeError, ValueError) as err:
            return _CallResult(
                False,
                error=f"run() returned a record that is not JSON-able: {err}",
                attempts=result.attempts,
            )
        return result

    def _context(
        self,
        stage: Stage,
        migration: Migration,
        role: Role,
        phase: Phase,
        saved: dict[str, Any],
        abandoned: threading.Event,
    ) -> StageContext:
        """A context whose checkpoint writes the journal, until the call is abandoned.

        Once the engine has given up on a call (deadline), a late checkpoint
        from the still-running thread is refused (it raises StageFailed), so
        it cannot overwrite what a revert or a recovery relies on.
        """

        def checkpoint(data: dict[str, Any]) -> None:
            if abandoned.is_set():
                raise StageFailed(
                    f"stage {stage.name} passed its deadline; its checkpoint is refused"
                )
            self.journal.stage_checkpoint(migration.id, phase, stage.name, data)

        return StageContext(
            migration=migration,
            phase=phase,
            role=role,
            host=self.host,
            deadline=self._clock() + float(stage.options.deadline),
            saved=saved,
            checkpoint=checkpoint,
        )

    def _call(
        self,
        stage: Stage,
        what: str,
        action: Callable[[], Any],
        deadline: float,
        abandoned: threading.Event,
    ) -> _CallResult:
        """Call ``action`` in a worker thread with retries; wait at most until ``deadline``.

        TransientError is retried up to the stage's ``attempts`` with
        exponential backoff from ``[pipeline] retry_backoff``; no retry starts
        (or waits) past the deadline. Any other exception fails at once.
        """
        max_attempts = int(stage.options.attempts)
        attempts = 0
        stopped_by_deadline = False

        def stop(state: tenacity.RetryCallState) -> bool:
            nonlocal stopped_by_deadline
            if abandoned.is_set() or state.attempt_number >= max_attempts:
                return True
            if self._clock() + state.upcoming_sleep >= deadline:
                stopped_by_deadline = True
                return True
            return False

        def pause(seconds: float) -> None:
            abandoned.wait(seconds)  # wakes at once when the engine gives up

        def attempt() -> Any:
            nonlocal attempts
            attempts += 1
            return action()

        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(TransientError),
            stop=stop,
            wait=tenacity.wait_exponential(multiplier=float(self.conf.pipeline.retry_backoff)),
            sleep=pause,
            reraise=True,
        )
        future = _in_thread(lambda: retrying(attempt), name=f"stage-{stage.name}-{what}")
        done, _ = concurrent.futures.wait([future], timeout=max(0.0, deadline - self._clock()))
        if not done:
            abandoned.set()
            budget = float(stage.options.deadline)
            return _CallResult(
                False,
                error=f"{what}() passed its deadline of {budget:g}s and was abandoned "
                "(its thread may still be running)",
                attempts=attempts,
            )
        err = future.exception()
        if err is None:
            return _CallResult(True, value=future.result(), attempts=attempts)
        return _CallResult(
            False,
            error=self._error_text(err, attempts, stopped_by_deadline),
            attempts=attempts,
        )

    @staticmethod
    def _error_text(err: BaseException, attempts: int, stopped_by_deadline: bool) -> str:
        text = _describe(err)
        if not isinstance(err, TransientError):
            return text
        if stopped_by_deadline:
            return f"{text} (after {attempts} attempt(s); no time left before the deadline)"
        return f"{text} (after {attempts} attempt(s))"

    def _timing(
        self,
        name: str,
        phase: Phase,
        origin: float,
        start: float,
        result: _CallResult,
        outcome: str,
        notes: dict[str, Any],
    ) -> StageTiming:
        """The timeline entry of a call that started at ``start``, ending now."""
        return StageTiming(
            stage=name,
            phase=phase,
            started_offset_ms=(start - origin) * 1000.0,
            duration_ms=(self._clock() - start) * 1000.0,
            attempts=result.attempts,
            outcome=outcome,
            notes=dict(notes),
        )

    # -- reverting ------------------------------------------------------------

    def _revert_all(self, record: MigrationRecord, origin: float, report: PhaseReport) -> list[str]:
        """Revert the migration's stages newest first; return the revert errors.

        Each revert's failure is logged and journalled but does not stop the
        others: leaving one thing behind beats leaving everything behind.
        """
        errors: list[str] = []
        for run in self._to_revert(record):
            timing, error = self._revert_stage(record, run, origin)
            report.timeline.append(timing)
            if error is None:
                report.reverted.append(run.stage)
            else:
                errors.append(f"{run.stage}: {error}")
        return errors

    def _to_revert(self, record: MigrationRecord) -> list[StageRun]:
        """Stages to revert, newest first.

        A stage still 'started' was cut short by a crash: it is the newest
        (stages of a migration run one at a time, but for those that run
        alongside: their order among themselves does not matter) and may have done part of
        its work, which its revert must tolerate. Then the completed stages
        in reverse completion order.
        """
        interrupted = sorted(
            (r for r in record.stages if r.state == jr.STARTED),
            key=lambda r: r.seq,
            reverse=True,
        )
        completed = list(reversed(self.journal.completed_stages(record.id)))
        return interrupted + completed

    def _revert_stage(
        self, record: MigrationRecord, run: StageRun, origin: float
    ) -> tuple[StageTiming, str | None]:
        stage = self._by_name.get(run.stage)
        start = self._clock()
        if stage is None:
            result = _CallResult(
                False,
                error=f"stage {run.stage} is no longer configured; cannot revert it",
            )
            notes: dict[str, Any] = {}
        else:
            abandoned = threading.Event()
            ctx = self._context(
                stage,
                record.migration,
                record.role,
                run.phase,
                dict(run.checkpoint),
                abandoned,
            )
            result = self._call(
                stage,
                "revert",
                lambda: stage.revert(ctx, run.record),
                ctx.deadline,
                abandoned,
            )
            notes = dict(ctx.notes)
        if not result.ok:
            LOG.error(
                "host %s: migration %s: revert of %s failed: %s",
                self.host.name,
                record.id,
                run.stage,
                result.error,
            )
        self.journal.stage_reverted(
            record.id, run.phase, run.stage, None if result.ok else result.error
        )
        outcome = "reverted" if result.ok else "failed"
        timing = self._timing(run.stage, run.phase, origin, start, result, outcome, notes)
        return timing, None if result.ok else result.error

    # -- recovery -------------------------------------------------------------

    def recover(self, locate: Callable[[Migration], str | None] | None = None) -> list[PhaseReport]:
        """Finish or revert every migration the journal says is still running.

        Call it once at start-up, before handling new events. For each
        unfinished migration the decision is:

        * REVERTED when a stage had failed or a revert had begun (the engine
          had already decided), or when ABORTED was being handled;
        * otherwise, with ``locate`` (which returns the NVE/host where the
          workload runs now, None when unknown, or IN_FLIGHT while the
          hypervisor still runs the migration's job): FINISHED when it runs
          at the migration's destination or is in flight, REVERTED otherwise
          (including unknown);
        * without ``locate``: FINISHED when the last phase reached is RESUMED
          or COMPLETED (the VM already runs at the destination), else REVERTED.

        FINISHED re-runs the stages not completed in the last phase reached
        (a stage cut short gets its checkpoint back as ``ctx.saved``); when
        the workload is known to run at the destination it also runs every
        later phase of the role (their events were missed while this host
        was down); the migration becomes 'done' when the role's last phase
        ran, else it stays 'running' for the next events (in flight).
        REVERTED reverts the stages run so far, newest first (the stage cut
        short included), like ABORTED, and the migration becomes 'reverted'.
        When ``locate`` raises, the migration is left running and the
        report says why.
        """
        reports = []
        for record in self.journal.unfinished():
            with self._migration_lock(record.id):
                current = self.journal.get(record.id)
                if current is None or current.status != jr.RUNNING:
                    continue
                reports.append(self._recover_one(current, locate))
        return reports

    def _recover_one(
        self, record: MigrationRecord, locate: Callable[[Migration], str | None] | None
    ) -> PhaseReport:
        phase = record.last_phase or Phase.PREPARE
        try:
            finish, why, arrived = self._recovery_decision(record, locate)
        except Exception as err:
            error = f"cannot locate workload {record.migration.workload.name}: {_describe(err)}"
            LOG.error(
                "host %s: migration %s left running: %s",
                self.host.name,
                record.id,
                error,
            )
            report = self._report(record.migration, record.role, phase, ok=False, error=error)
            self._observe(report, self._clock())
            return report
        LOG.warning(
            "host %s: recovering migration %s: %s (%s)",
            self.host.name,
            record.id,
            "finishing" if finish else "reverting",
            why,
        )
        origin = self._clock()
        if not finish:
            report = self._abort(record.migration, record.role, origin)
        elif arrived:
            report = self._finish_missed(record, phase, origin)
        elif record.phases.get(phase) == jr.COMPLETED:
            report = self._report(record.migration, record.role, phase)
            if self._is_last_phase(record.role, phase):
                self.journal.set_status(record.id, jr.DONE)
        else:
            report = self._run_phase(record.migration, record.role, phase, origin)
        report.detail = f"recovered: {'finished' if finish else 'reverted'} ({why})"
        self._observe(report, origin)
        return report

    def _finish_missed(self, record: MigrationRecord, reached: Phase, origin: float) -> PhaseReport:
        """The VM runs at the destination: run the phase reached and every later
        one of the role up to its last (their events came while this host was
        down and will not come again); the last report."""
        report = self._report(record.migration, record.role, reached)
        for phase in ORDERED_PHASES[ORDERED_PHASES.index(reached) :]:
            if record.phases.get(phase) == jr.COMPLETED:
                continue
            report = self._run_phase(record.migration, record.role, phase, origin)
            if not report.ok or self._is_last_phase(record.role, phase):
                break
        return report

    @staticmethod
    def _recovery_decision(
        record: MigrationRecord, locate: Callable[[Migration], str | None] | None
    ) -> tuple[bool, str, bool]:
        """(finish?, why, arrived?) following the rule in ``recover``'s docstring;
        ``arrived``: the VM is known to run at the destination, so the phases
        missed meanwhile are run too, not only the one reached."""
        if any(r.state in (jr.STAGE_FAILED, jr.STAGE_REVERTED) for r in record.stages):
            return False, "a stage had failed and reverting had begun", False
        if record.last_phase is Phase.ABORTED:
            return False, "ABORTED was being handled", False
        if locate is not None:
            where = locate(record.migration)
            if where == IN_FLIGHT:
                return True, "the hypervisor still runs the migration's job", False
            at_destination = where is not None and where == record.migration.destination
            return at_destination, f"workload runs at {where or 'an unknown place'}", at_destination
        reached = record.last_phase in (Phase.RESUMED, Phase.COMPLETED)
        last = record.last_phase.value if record.last_phase else "none"
        return reached, f"last phase reached: {last}", False

    # -- observers ------------------------------------------------------------

    def _observe(self, report: PhaseReport, origin: float) -> None:
        """Log the report (a line per stage outcome and one for the phase), then
        hand it to every observer; an observer's failure is logged, never raised.

        ``origin`` is the monotonic time the report's offsets count from (the
        event's, or the start of a recovery).
        """
        _log_report(report)
        for observer in list(_OBSERVERS):
            try:
                observer(self, report, origin)
            except Exception:
                LOG.exception(
                    "host %s: observer %r failed on migration %s",
                    self.host.name,
                    observer,
                    report.migration_id,
                )

    # -- locking --------------------------------------------------------------

    @contextlib.contextmanager
    def _migration_lock(self, migration_id: str) -> Iterator[None]:
        """Serialize work on one migration; the lock is dropped when unused."""
        with self._locks_guard:
            lock, users = self._locks.get(migration_id, (threading.Lock(), 0))
            self._locks[migration_id] = (lock, users + 1)
        try:
            with lock:
                yield
        finally:
            with self._locks_guard:
                lock, users = self._locks[migration_id]
                if users == 1:
                    del self._locks[migration_id]
                else:
                    self._locks[migration_id] = (lock, users - 1)


# -- dispatcher ---------------------------------------------------------------


#: Phases that may take seconds (the source's hold timer keeps the in-flight
#: tunnel for ``hold_time``): they run in a lane of their own.
SLOW_PHASES = frozenset({Phase.COMPLETED})


class Dispatcher:
    """Feed events to a pipeline: per migration in order, across migrations in parallel.

    Each migration with pending events has one queue, drained by one pool
    thread at a time, so its events run strictly in arrival order while
    other migrations proceed on other threads (``[pipeline] workers``).

    Two lanes of ``workers`` threads each: COMPLETED (``SLOW_PHASES``), whose
    hold timer keeps a thread for seconds, runs in its own, so that in an
    evacuation the later VMs' SWITCHOVER and RESUMED never wait behind the
    first VMs' hold timers (with one lane of 8, the 9th VM's SWITCHOVER
    waited up to ``hold_time``). A queue moves to the other lane when its
    next event belongs there; the order within a migration is unchanged.
    """

    def __init__(self, pipeline: Pipeline, workers: int | None = None) -> None:
        self.pipeline = pipeline
        size = workers if workers is not None else int(pipeline.conf.pipeline.workers)
        prefix = f"vmm-dispatch-{pipeline.host.name}"
        self._pools = {
            slow: concurrent.futures.ThreadPoolExecutor(
                max_workers=size, thread_name_prefix=f"{prefix}-slow" if slow else prefix
            )
            for slow in (False, True)
        }
        self._lock = threading.Lock()
        self._queues: dict[
            str,
            collections.deque[
                tuple[MigrationEvent, concurrent.futures.Future[PhaseReport], Decided | None]
            ],
        ] = {}
        self._closed = False

    def submit(
        self, event: MigrationEvent, decided: Decided | None = None
    ) -> concurrent.futures.Future[PhaseReport]:
        """Queue ``event``; the Future gets its PhaseReport (or the engine's exception),
        ``decided`` the phase's outcome as soon as it is known (see Pipeline.handle)."""
        future: concurrent.futures.Future[PhaseReport] = concurrent.futures.Future()
        mid = event.migration.id
        with self._lock:
            if self._closed:
                raise RuntimeError("the dispatcher is closed")
            queue = self._queues.get(mid)
            if queue is not None:
                queue.append((event, future, decided))
                return future
            self._queues[mid] = collections.deque([(event, future, decided)])
            slow = event.phase in SLOW_PHASES
            self._pools[slow].submit(self._drain, mid, slow)
        return future

    def _drain(self, mid: str, slow: bool) -> None:
        while True:
            with self._lock:
                queue = self._queues[mid]
                if not queue:
                    del self._queues[mid]
                    return
                event, future, decided = queue[0]
                if (event.phase in SLOW_PHASES) is not slow:
                    try:  # the other lane takes the queue over, from this event on
                        self._pools[not slow].submit(self._drain, mid, not slow)
                        return
                    except RuntimeError:  # that lane is shut down (closing): go on here
                        pass
                queue.popleft()
            if not future.set_running_or_notify_cancel():
                _settle(decided, "cancelled")
                continue
            try:
                future.set_result(self.pipeline.handle(event, decided))
            except BaseException as err:
                LOG.exception("host %s: handling %s failed", self.pipeline.host.name, mid)
                future.set_exception(err)

    def close(self, wait: bool = True) -> None:
        """Refuse new events; with ``wait``, return once queued events are handled."""
        with self._lock:
            self._closed = True
        for slow in (False, True):  # the fast lane may still hand queues to the slow one
            self._pools[slow].shutdown(wait=wait)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
