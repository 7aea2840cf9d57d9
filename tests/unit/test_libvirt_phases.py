"""The phase rules: libvirt signals (in the orders measured on the lab, see
LIBVIRT-LAB.md) -> the phases each host runs, and reconciliation after a
reconnection. Pure: the sequences are fed to ``phases.Tracker`` by hand.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import pytest

from vmm_libvirt import phases
from vmm_libvirt.phases import (
    Event,
    Hook,
    Iteration,
    JobCompleted,
    JobProgress,
    Lifecycle,
    Observed,
    Tracker,
)
from vmm_orchestrator.model import Phase, Role

S, D = Role.SOURCE, Role.DESTINATION
UUID = "6c1f5e62-2b0c-4e43-9d7a-0a0b0c0d0e01"

STARTED_MIGRATED = Lifecycle(Event.STARTED, phases.STARTED_MIGRATED)
STARTED_BOOTED = Lifecycle(Event.STARTED, 0)
SUSPENDED_MIGRATED = Lifecycle(Event.SUSPENDED, phases.SUSPENDED_MIGRATED)
SUSPENDED_PAUSED = Lifecycle(Event.SUSPENDED, 0)
SUSPENDED_POSTCOPY = Lifecycle(Event.SUSPENDED, phases.SUSPENDED_POSTCOPY)
RESUMED_MIGRATED = Lifecycle(Event.RESUMED, phases.RESUMED_MIGRATED)
RESUMED_POSTCOPY = Lifecycle(Event.RESUMED, phases.RESUMED_POSTCOPY)
RESUMED_UNPAUSED = Lifecycle(Event.RESUMED, 0)
STOPPED_MIGRATED = Lifecycle(Event.STOPPED, phases.STOPPED_MIGRATED)
STOPPED_FAILED = Lifecycle(Event.STOPPED, 5)
STOPPED_DESTROYED = Lifecycle(Event.STOPPED, 1)
DEFINED_ADDED = Lifecycle(Event.DEFINED, 0)


def run(
    signals: Sequence[phases.Signal], tracker: Tracker | None = None
) -> list[tuple[Phase, Role]]:
    """Feed ``signals`` for one domain; the (phase, role) decided, in order."""
    tracker = tracker or Tracker()
    out = []
    for signal in signals:
        out += [(t.phase, t.role) for t in tracker.apply(UUID, signal).transitions]
    return out


# -- a successful precopy migration A -> B, as measured ------------------------------


def test_precopy_source_switches_over_only_once_the_job_completed() -> None:
    # A: MIGRATION_ITERATION 1; SUSPENDED/MIGRATED; MIGRATION_ITERATION 2;
    #    STOPPED/MIGRATED; JOB_COMPLETED
    tracker = Tracker()
    assert run([Iteration(1), SUSPENDED_MIGRATED, Iteration(2)], tracker) == []
    assert tracker.get(UUID).paused
    assert run([STOPPED_MIGRATED, JobCompleted(phases.JOB_MIGRATION_OUT)], tracker) == [
        (Phase.SWITCHOVER, S),
        (Phase.COMPLETED, S),
    ]


def test_precopy_destination_prepares_then_resumes() -> None:
    # B: STARTED/MIGRATED; DEFINED/ADDED; RESUMED/MIGRATED; JOB_COMPLETED (incoming)
    signals: list[phases.Signal] = [
        STARTED_MIGRATED,
        DEFINED_ADDED,
        RESUMED_MIGRATED,
        JobCompleted(phases.JOB_MIGRATION_IN),
    ]
    assert run(signals) == [(Phase.PREPARE, D), (Phase.RESUMED, D)]


def test_job_completed_alone_completes_a_known_outgoing_migration() -> None:
    # A STOPPED/MIGRATED lost (say, a reconnect in between): JOB_COMPLETED still ends it.
    assert run([Iteration(1), SUSPENDED_MIGRATED, JobCompleted(None)]) == [
        (Phase.SWITCHOVER, S),
        (Phase.COMPLETED, S),
    ]


def test_job_completed_on_an_unrelated_domain_decides_nothing() -> None:
    assert run([JobCompleted(None)]) == []


# -- post-copy ---------------------------------------------------------------------


def test_postcopy_source_switches_over_at_suspended_postcopy() -> None:
    # Post-copy adds A SUSPENDED/POSTCOPY: the VM runs at B from then on.
    tracker = Tracker()
    assert run([Iteration(1), SUSPENDED_MIGRATED, SUSPENDED_POSTCOPY], tracker) == [
        (Phase.SWITCHOVER, S)
    ]
    assert run([STOPPED_MIGRATED, JobCompleted(None)], tracker) == [(Phase.COMPLETED, S)]


def test_postcopy_destination_resumes_at_resumed_postcopy_once() -> None:
    # ... then B RESUMED/POSTCOPY before B RESUMED/MIGRATED.
    assert run([STARTED_MIGRATED, RESUMED_POSTCOPY, RESUMED_MIGRATED]) == [
        (Phase.PREPARE, D),
        (Phase.RESUMED, D),
    ]


# -- failures ------------------------------------------------------------------------


def test_destination_abort_during_precopy_aborts_what_prepare_did() -> None:
    # domjobabort, or kill -9 of the destination QEMU: B STARTED/MIGRATED, STOPPED/FAILED.
    assert run([STARTED_MIGRATED, STOPPED_FAILED]) == [(Phase.PREPARE, D), (Phase.ABORTED, D)]


def test_source_resuming_after_switchover_pause_is_a_failed_migration_with_nothing_to_revert() -> (
    None
):
    tracker = Tracker()
    decision = None
    for signal in (Iteration(1), SUSPENDED_MIGRATED, RESUMED_MIGRATED):
        decision = tracker.apply(UUID, signal)
    assert decision is not None and decision.transitions == ()
    assert decision.note and "nothing had run here" in decision.note
    assert tracker.get(UUID) == phases.Track()


def test_source_resuming_after_postcopy_switchover_aborts() -> None:
    assert run([Iteration(1), SUSPENDED_POSTCOPY, RESUMED_MIGRATED]) == [
        (Phase.SWITCHOVER, S),
        (Phase.ABORTED, S),
    ]


def test_operator_pause_during_migration_is_a_plain_pause() -> None:
    # virsh suspend during an outgoing migration also gives SUSPENDED/MIGRATED.
    tracker = Tracker()
    assert run([Iteration(1), SUSPENDED_MIGRATED], tracker) == []
    decision = tracker.apply(UUID, RESUMED_UNPAUSED)
    assert decision.transitions == ()
    assert decision.note and "plain pause" in decision.note
    assert not tracker.get(UUID).paused
    # The migration goes on and completes later: that is the switchover.
    assert run([Iteration(2), SUSPENDED_MIGRATED, STOPPED_MIGRATED], tracker) == [
        (Phase.SWITCHOVER, S),
        (Phase.COMPLETED, S),
    ]


def test_plain_pause_and_resume_outside_a_migration_decide_nothing() -> None:
    assert run([STARTED_BOOTED, SUSPENDED_PAUSED, RESUMED_UNPAUSED, STOPPED_DESTROYED]) == []


def test_stopped_migrated_without_history_still_completes() -> None:
    # The daemon restarted mid-migration: STOPPED/MIGRATED alone is unambiguous.
    assert run([STOPPED_MIGRATED]) == [(Phase.SWITCHOVER, S), (Phase.COMPLETED, S)]


def test_resumed_migrated_without_prepare_runs_both() -> None:
    # The hook and STARTED/MIGRATED were missed: PREPARE must still come before RESUMED.
    assert run([RESUMED_MIGRATED]) == [(Phase.PREPARE, D), (Phase.RESUMED, D)]


def test_duplicate_events_decide_nothing_more() -> None:
    signals = [STARTED_MIGRATED, STARTED_MIGRATED, RESUMED_MIGRATED, RESUMED_MIGRATED]
    assert run(signals) == [(Phase.PREPARE, D), (Phase.PREPARE, D), (Phase.RESUMED, D)]
    # (a second STARTED/MIGRATED is a new incoming attempt; RESUMED once)


def test_a_vm_that_arrived_can_leave_again() -> None:
    tracker = Tracker()
    assert run([STARTED_MIGRATED, RESUMED_MIGRATED], tracker) == [
        (Phase.PREPARE, D),
        (Phase.RESUMED, D),
    ]
    assert run([Iteration(1), SUSPENDED_MIGRATED, STOPPED_MIGRATED], tracker) == [
        (Phase.SWITCHOVER, S),
        (Phase.COMPLETED, S),
    ]


# -- early switchover ([libvirt] early_switchover, on by default) ---------------------
#
# The job statistics the event source hands in after the source's pause, as
# measured on the libvirt lab (libvirt 9.0, QEMU 7.2, 300 ms allowed downtime):
# at the real switchover QEMU had 0 or 58 MiB left at 314-444 MB/s; at an
# operator's pause (virsh suspend) of a 1 MiB/s migration, 127 MiB at 1.07 MB/s.

REAL_PAUSE = JobProgress(True, remaining=58_458_112, bps=444_400_196, max_downtime_ms=300)
REAL_PAUSE_ALL_SENT = JobProgress(True, remaining=0, bps=314_181_855, max_downtime_ms=300)
OPERATOR_PAUSE = JobProgress(True, remaining=132_972_544, bps=1_067_220, max_downtime_ms=300)
#: The same paused migration once it converged (nothing dirties a paused VM).
OPERATOR_PAUSE_CONVERGED = JobProgress(True, remaining=196_608, bps=1_069_668, max_downtime_ms=300)


def test_job_progress_is_final_by_qemus_own_switchover_test() -> None:
    assert REAL_PAUSE.final and REAL_PAUSE_ALL_SENT.final and OPERATOR_PAUSE_CONVERGED.final
    assert not OPERATOR_PAUSE.final
    assert JobProgress(active=False).final  # the job ended: completed or failed
    # Statistics that cannot tell (no bandwidth measured yet, nothing reported): not final.
    assert not JobProgress(True, remaining=10_000_000, bps=0, max_downtime_ms=300).final
    assert not JobProgress(True).final
    # Beyond the slack: 3 x what fits in the allowed downtime is still iterating.
    assert not JobProgress(True, remaining=3 * 300 * 1000, bps=1_000_000, max_downtime_ms=300).final
    # QEMU too busy to answer (it holds its lock for the whole final copy): final.
    busy = JobProgress(True, busy_ms=20)
    assert busy.final and "busy" in str(busy)


def test_a_busy_qemu_at_the_pause_switches_over_then_and_once() -> None:
    tracker = Tracker()
    assert run([SUSPENDED_MIGRATED, JobProgress(True, busy_ms=20)], tracker) == [
        (Phase.SWITCHOVER, S)
    ]
    assert run([REAL_PAUSE_ALL_SENT, STOPPED_MIGRATED], tracker) == [(Phase.COMPLETED, S)]
    # Not paused by a migration (a plain pause): a busy QEMU decides nothing.
    assert run([SUSPENDED_PAUSED, JobProgress(True, busy_ms=20)], Tracker()) == []


def test_defaults_switch_over_at_the_pause_of_the_final_phase() -> None:
    tracker = Tracker()  # the defaults: early_switchover on
    assert run([Iteration(1), Iteration(2), SUSPENDED_MIGRATED], tracker) == []
    assert run([REAL_PAUSE], tracker) == [(Phase.SWITCHOVER, S)]
    assert run([Iteration(3), REAL_PAUSE_ALL_SENT], tracker) == []  # once
    assert run([STOPPED_MIGRATED, JobCompleted(phases.JOB_MIGRATION_OUT)], tracker) == [
        (Phase.COMPLETED, S)
    ]


def test_defaults_do_not_switch_over_at_an_operators_pause() -> None:
    tracker = Tracker()
    decision = None
    for signal in (Iteration(1), SUSPENDED_MIGRATED, OPERATOR_PAUSE):
        decision = tracker.apply(UUID, signal)
    assert decision is not None and decision.transitions == ()
    assert decision.note and "not the switchover" in decision.note
    assert tracker.get(UUID).paused and Phase.SWITCHOVER not in tracker.get(UUID).done
    # libvirt refuses to resume it during the job: the paused VM's migration converges
    # and switches over later (QEMU stops it no second time: no new SUSPENDED).
    assert run([Iteration(2), OPERATOR_PAUSE_CONVERGED], tracker) == [(Phase.SWITCHOVER, S)]
    assert run([STOPPED_MIGRATED], tracker) == [(Phase.COMPLETED, S)]


def test_an_operators_pause_then_an_abort_leaves_nothing_to_revert() -> None:
    # domjobabort: libvirt resumes the source VM (RESUMED/MIGRATED, migration cancelled).
    tracker = Tracker()
    decision = None
    for signal in (Iteration(1), SUSPENDED_MIGRATED, OPERATOR_PAUSE, RESUMED_MIGRATED):
        decision = tracker.apply(UUID, signal)
    assert decision is not None and decision.transitions == ()
    assert tracker.get(UUID) == phases.Track()


def test_an_operators_pause_that_is_resumed_is_a_plain_pause() -> None:
    # (a driver that lets an operator resume during the job)
    tracker = Tracker()
    assert run([Iteration(1), SUSPENDED_MIGRATED, OPERATOR_PAUSE], tracker) == []
    decision = tracker.apply(UUID, RESUMED_UNPAUSED)
    assert decision.transitions == () and decision.note and "plain pause" in decision.note
    assert not tracker.get(UUID).paused
    # Statistics arriving after the resume decide nothing.
    assert run([REAL_PAUSE], tracker) == []


def test_early_switchover_then_failure_or_resume_aborts() -> None:
    for resumed in (RESUMED_MIGRATED, RESUMED_UNPAUSED):
        signals: list[phases.Signal] = [Iteration(1), SUSPENDED_MIGRATED, REAL_PAUSE, resumed]
        assert run(signals) == [(Phase.SWITCHOVER, S), (Phase.ABORTED, S)]


def test_job_progress_without_a_pause_or_a_migration_decides_nothing() -> None:
    assert run([REAL_PAUSE]) == []  # no migration known
    assert run([Iteration(1), REAL_PAUSE]) == []  # the VM still runs
    assert run([STARTED_MIGRATED, SUSPENDED_MIGRATED, REAL_PAUSE]) == [(Phase.PREPARE, D)]


def test_without_early_switchover_the_source_waits_for_the_completion() -> None:
    tracker = Tracker(early_switchover=False)
    assert run([Iteration(1), SUSPENDED_MIGRATED, REAL_PAUSE_ALL_SENT], tracker) == []
    assert run([STOPPED_MIGRATED], tracker) == [(Phase.SWITCHOVER, S), (Phase.COMPLETED, S)]


def test_early_switchover_when_reconciling_a_migration_paused_for_switchover() -> None:
    final = Observed(
        True, phases.STATE_PAUSED, phases.PAUSED_MIGRATION, phases.JOB_MIGRATION_OUT, REAL_PAUSE
    )
    assert reconcile(Tracker(), {UUID: final}) == [(Phase.SWITCHOVER, S, False)]
    operator = dataclasses.replace(final, progress=OPERATOR_PAUSE)
    tracker = Tracker()
    assert reconcile(tracker, {UUID: operator}) == []
    assert tracker.get(UUID).paused  # a candidate: later statistics or the completion decide
    unknown = dataclasses.replace(final, progress=None)
    assert reconcile(Tracker(), {UUID: unknown}) == []
    assert reconcile(Tracker(early_switchover=False), {UUID: final}) == []


# -- the hook --------------------------------------------------------------------------


def test_hook_migrate_begin_prepares_and_the_started_event_does_not_repeat_it() -> None:
    signals: list[phases.Signal] = [
        Hook("migrate", "begin"),
        Hook("prepare", "begin"),
        Hook("start", "begin"),
        STARTED_MIGRATED,
        Hook("started", "begin"),
        RESUMED_MIGRATED,
    ]
    assert run(signals) == [(Phase.PREPARE, D), (Phase.RESUMED, D)]


def test_hook_release_after_a_failed_incoming_start_aborts() -> None:
    assert run([Hook("migrate", "begin"), Hook("stopped", "end"), Hook("release", "end")]) == [
        (Phase.PREPARE, D),
        (Phase.ABORTED, D),
    ]


def test_hook_release_of_an_ordinary_vm_decides_nothing() -> None:
    assert run([STARTED_BOOTED, Hook("stopped", "end"), Hook("release", "end")]) == []


def test_a_vetoed_migration_is_forgotten_and_a_retry_prepares_again() -> None:
    tracker = Tracker()
    assert run([Hook("migrate", "begin")], tracker) == [(Phase.PREPARE, D)]
    tracker.forget(UUID)  # what the daemon does when PREPARE vetoed it
    assert run([STARTED_MIGRATED], tracker) == [(Phase.PREPARE, D)]


def test_under_way_lists_migrations_until_their_last_phase_here() -> None:
    tracker = Tracker()
    run([STARTED_MIGRATED], tracker)  # PREPARE ran: RESUMED still to come
    assert set(tracker.under_way()) == {UUID}
    run([RESUMED_MIGRATED], tracker)
    assert tracker.under_way() == {}
    run([Iteration(1), SUSPENDED_MIGRATED, REAL_PAUSE], tracker)  # source: SWITCHOVER ran
    assert set(tracker.under_way()) == {UUID}
    run([STOPPED_MIGRATED], tracker)
    assert tracker.under_way() == {}


# -- reconciliation ----------------------------------------------------------------------


def running(reason: int = 1, job: int | None = None) -> Observed:
    return Observed(True, phases.STATE_RUNNING, reason, job)


def paused(reason: int, job: int | None = None) -> Observed:
    return Observed(True, phases.STATE_PAUSED, reason, job)


def shutoff(reason: int) -> Observed:
    return Observed(False, phases.STATE_SHUTOFF, reason)


def reconcile(tracker: Tracker, observed: dict[str, Observed]) -> list[tuple[Phase, Role, bool]]:
    decisions = tracker.reconcile(observed)
    return [(t.phase, t.role, t.confirm) for d in decisions.values() for t in d.transitions]


def test_reconcile_resumes_an_incoming_migration_that_finished_while_disconnected() -> None:
    tracker = Tracker()
    run([STARTED_MIGRATED], tracker)
    assert reconcile(tracker, {UUID: running(phases.RUNNING_MIGRATED)}) == [
        (Phase.RESUMED, D, False)
    ]


def test_reconcile_waits_for_an_incoming_migration_still_in_progress() -> None:
    tracker = Tracker()
    run([STARTED_MIGRATED], tracker)
    obs = paused(phases.PAUSED_MIGRATION, phases.JOB_MIGRATION_IN)
    assert reconcile(tracker, {UUID: obs}) == []
    assert tracker.get(UUID).incoming()


def test_reconcile_aborts_an_incoming_migration_whose_domain_is_gone() -> None:
    tracker = Tracker()
    run([STARTED_MIGRATED], tracker)
    assert reconcile(tracker, {}) == [(Phase.ABORTED, D, False)]
    assert tracker.snapshot() == {}


def test_reconcile_prepares_an_incoming_migration_that_began_while_disconnected() -> None:
    obs = paused(phases.PAUSED_MIGRATION, phases.JOB_MIGRATION_IN)
    assert reconcile(Tracker(), {UUID: obs}) == [(Phase.PREPARE, D, False)]


def test_reconcile_completes_an_outgoing_migration_that_ended_while_disconnected() -> None:
    tracker = Tracker()
    run([Iteration(1), SUSPENDED_MIGRATED], tracker)
    # Persistent domain: still defined, shut off for MIGRATED.
    assert reconcile(tracker, {UUID: shutoff(phases.SHUTOFF_MIGRATED)}) == [
        (Phase.SWITCHOVER, S, False),
        (Phase.COMPLETED, S, False),
    ]
    # Seen again at the next reconnection: nothing more.
    assert reconcile(tracker, {UUID: shutoff(phases.SHUTOFF_MIGRATED)}) == []


def test_reconcile_completes_a_transient_outgoing_domain_that_vanished_if_confirmed() -> None:
    tracker = Tracker()
    run([Iteration(1)], tracker)
    # Gone could also mean destroyed: the caller asks the directory first.
    assert reconcile(tracker, {}) == [(Phase.SWITCHOVER, S, True), (Phase.COMPLETED, S, True)]


def test_reconcile_sees_a_source_that_took_its_vm_back() -> None:
    tracker = Tracker()
    run([Iteration(1), SUSPENDED_POSTCOPY], tracker)
    assert reconcile(tracker, {UUID: running(6)}) == [(Phase.ABORTED, S, False)]


def test_reconcile_flags_a_vm_that_came_by_migration_unseen_for_confirmation() -> None:
    assert reconcile(Tracker(), {UUID: running(phases.RUNNING_MIGRATED)}) == [
        (Phase.PREPARE, D, True),
        (Phase.RESUMED, D, True),
    ]
    # A VM that booted here, or one whose arrival this host saw, needs nothing.
    assert reconcile(Tracker(), {UUID: running(1)}) == []
    seen = Tracker()
    run([STARTED_MIGRATED, RESUMED_MIGRATED], seen)
    assert reconcile(seen, {UUID: running(phases.RUNNING_MIGRATED)}) == []


def test_reconcile_flags_a_vm_that_left_unseen_for_confirmation() -> None:
    assert reconcile(Tracker(), {UUID: shutoff(phases.SHUTOFF_MIGRATED)}) == [
        (Phase.SWITCHOVER, S, True),
        (Phase.COMPLETED, S, True),
    ]


def test_reconcile_switches_over_a_postcopy_under_way() -> None:
    obs = paused(phases.PAUSED_POSTCOPY, phases.JOB_MIGRATION_OUT)
    assert reconcile(Tracker(), {UUID: obs}) == [(Phase.SWITCHOVER, S, False)]


def test_reconcile_then_events_continue_the_same_track() -> None:
    tracker = Tracker()
    obs = paused(phases.PAUSED_MIGRATION, phases.JOB_MIGRATION_OUT)
    assert reconcile(tracker, {UUID: obs}) == []
    assert tracker.get(UUID).paused
    assert run([STOPPED_MIGRATED], tracker) == [(Phase.SWITCHOVER, S), (Phase.COMPLETED, S)]


# -- naming and libvirt's numbers ---------------------------------------------------------


def test_describe_names_events_as_libvirt_does() -> None:
    assert phases.describe(3, 1) == "SUSPENDED/MIGRATED"
    assert phases.describe(4, 3) == "RESUMED/POSTCOPY"
    assert phases.describe(42, 1) == "EVENT42/1"
    assert str(STOPPED_MIGRATED) == "STOPPED/MIGRATED"


def test_mirrored_constants_match_libvirt() -> None:
    libvirt = pytest.importorskip("libvirt", reason="libvirt-python is not installed")
    assert {e.name: int(e) for e in Event} == {
        e.name: getattr(libvirt, f"VIR_DOMAIN_EVENT_{e.name}") for e in Event
    }
    pairs = {
        "STARTED_MIGRATED": "VIR_DOMAIN_EVENT_STARTED_MIGRATED",
        "SUSPENDED_MIGRATED": "VIR_DOMAIN_EVENT_SUSPENDED_MIGRATED",
        "SUSPENDED_POSTCOPY": "VIR_DOMAIN_EVENT_SUSPENDED_POSTCOPY",
        "SUSPENDED_POSTCOPY_FAILED": "VIR_DOMAIN_EVENT_SUSPENDED_POSTCOPY_FAILED",
        "RESUMED_MIGRATED": "VIR_DOMAIN_EVENT_RESUMED_MIGRATED",
        "RESUMED_POSTCOPY": "VIR_DOMAIN_EVENT_RESUMED_POSTCOPY",
        "RESUMED_POSTCOPY_FAILED": "VIR_DOMAIN_EVENT_RESUMED_POSTCOPY_FAILED",
        "STOPPED_MIGRATED": "VIR_DOMAIN_EVENT_STOPPED_MIGRATED",
        "STATE_RUNNING": "VIR_DOMAIN_RUNNING",
        "STATE_PAUSED": "VIR_DOMAIN_PAUSED",
        "STATE_SHUTOFF": "VIR_DOMAIN_SHUTOFF",
        "RUNNING_MIGRATED": "VIR_DOMAIN_RUNNING_MIGRATED",
        "RUNNING_POSTCOPY": "VIR_DOMAIN_RUNNING_POSTCOPY",
        "PAUSED_MIGRATION": "VIR_DOMAIN_PAUSED_MIGRATION",
        "PAUSED_STARTING_UP": "VIR_DOMAIN_PAUSED_STARTING_UP",
        "PAUSED_POSTCOPY": "VIR_DOMAIN_PAUSED_POSTCOPY",
        "PAUSED_POSTCOPY_FAILED": "VIR_DOMAIN_PAUSED_POSTCOPY_FAILED",
        "SHUTOFF_MIGRATED": "VIR_DOMAIN_SHUTOFF_MIGRATED",
        "JOB_MIGRATION_IN": "VIR_DOMAIN_JOB_OPERATION_MIGRATION_IN",
        "JOB_MIGRATION_OUT": "VIR_DOMAIN_JOB_OPERATION_MIGRATION_OUT",
    }
    assert {ours: getattr(phases, ours) for ours in pairs} == {
        ours: getattr(libvirt, theirs) for ours, theirs in pairs.items()
    }
    for event, details in phases._EVENT_DETAILS.items():
        for value, name in details.items():
            assert getattr(libvirt, f"VIR_DOMAIN_EVENT_{event.name}_{name}") == value
