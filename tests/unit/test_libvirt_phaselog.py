"""vmm_lab.libvirt.phaselog: a migration's phases from libvirtd debug lines (the
lines' shapes are libvirt 9.0's, as the libvirt lab's daemons write them)."""

from __future__ import annotations

import datetime

from vmm_lab.libvirt import phaselog

DAY = "2026-12-07 10:00:"


def _line(sec: str, thread: int, function: str, message: str) -> str:
    return f"{DAY}{sec}+0000: {thread}: debug : {function}:123 : {message}"


SOURCE = "\n".join(
    [
        _line("00.000", 7, "qemuMigrationSrcPerform", "driver=0x1, conn=0x2, vm=0x3"),
        _line("00.002", 7, "qemuDomainObjEnterRemote", "Entering remote (vm=0x3 name=g)"),
        _line("00.003", 7, "qemuDomainObjExitRemote", "Exited remote (vm=0x3 name=g)"),
        _line("00.005", 7, "qemuDomainObjEnterRemote", "Entering remote (vm=0x3 name=g)"),
        "  <a continuation line without a timestamp>",
        _line("00.405", 7, "qemuDomainObjExitRemote", "Exited remote (vm=0x3 name=g)"),
        _line("00.530", 9, "qemuProcessHandleStop", "Transitioned guest g to paused state"),
        _line("00.700", 9, "qemuProcessHandleMigrationStatus", "changed state to device"),
        _line("00.730", 9, "qemuProcessHandleMigrationStatus", "of g changed state to completed"),
        _line("00.732", 7, "qemuDomainObjEnterRemote", "Entering remote (vm=0x3 name=g)"),
        _line("00.770", 7, "qemuDomainObjExitRemote", "Exited remote (vm=0x3 name=g)"),
        _line("00.975", 7, "virRunScript", "Calling hook /h id=g op=stopped subop=end extra=-"),
        _line("00.983", 7, "virRunScript", "Calling hook /h id=g op=release subop=end extra=-"),
        _line("00.990", 7, "qemuDomainObjEnterRemote", "Entering remote (vm=0x3 name=g)"),
        # the next migration, from this host: not part of this one
        _line("09.000", 7, "qemuMigrationSrcPerform", "driver=0x1, conn=0x2, vm=0x3"),
        _line("09.100", 7, "virRunScript", "Calling hook /h id=g op=stopped subop=end extra=-"),
        _line("09.110", 7, "qemuProcessStop", "Shutting down"),
    ]
)
DESTINATION = "\n".join(
    [
        _line("00.006", 3, "virRunScript", "Calling hook /h id=g op=migrate subop=begin extra=-"),
        _line("00.030", 3, "qemuMigrationDstPrepareFresh", "Using hook-filtered domain XML"),
        _line("00.031", 4, "qemuProcessInit", "another thread: not the hook's end"),
        _line("00.040", 3, "virRunScript", "Calling hook /h id=g op=prepare subop=begin extra=-"),
        _line("00.043", 3, "qemuProcessPrepareDomain", "Generating domain security label"),
    ]
)


def _epoch(sec: str) -> float:
    stamp = datetime.datetime.strptime(f"{DAY}{sec}", "%Y-%m-%d %H:%M:%S.%f")
    return stamp.replace(tzinfo=datetime.UTC).timestamp()


def test_phases_and_hooks_of_one_migration() -> None:
    logs = {"h1": phaselog.parse(SOURCE), "h2": phaselog.parse(DESTINATION)}
    # The caller's clock saw the call begin 50 ms before libvirtd logged it; 1000 ms wall.
    (found,) = phaselog.migration_phases(logs, [("h1", _epoch("00.000") - 0.05, 1000.0)])
    assert found is not None
    assert found.prepare_ms == 400.0  # the longest remote call before the pause
    assert found.live_ms == 125.0
    assert found.final_copy_ms == 200.0
    assert found.finish_ms == 38.0
    assert found.finished_ms == 770.0
    assert found.confirm_ms(1000.0) == 230.0
    calls = [(h.host, h.call, round(h.ms, 1)) for h in found.hooks]
    assert sorted(calls) == [
        ("h1", "release end", 7.0),
        ("h1", "stopped end", 8.0),
        ("h2", "migrate begin", 24.0),
        ("h2", "prepare begin", 3.0),
    ]
    assert round(found.hook_ms, 1) == 42.0


def test_a_migration_the_log_does_not_show_is_none() -> None:
    logs = {"h1": phaselog.parse(SOURCE), "h2": phaselog.parse(DESTINATION)}
    assert phaselog.migration_phases(logs, [("h1", _epoch("05.000"), 1000.0)]) == [None]
    assert phaselog.migration_phases(logs, [("h2", _epoch("00.000"), 1000.0)]) == [None]


def test_without_pause_or_completion_only_what_is_known() -> None:
    text = "\n".join(
        [
            _line("00.000", 7, "qemuMigrationSrcPerform", "vm=0x3"),
            _line("00.010", 7, "qemuDomainObjEnterRemote", "Entering remote"),
            _line("00.300", 7, "qemuDomainObjExitRemote", "Exited remote"),
        ]
    )
    logs = {"h1": phaselog.parse(text)}
    (found,) = phaselog.migration_phases(logs, [("h1", _epoch("00.000"), 500.0)])
    assert found is not None
    assert found.prepare_ms == 290.0
    assert (found.live_ms, found.final_copy_ms, found.finish_ms) == (None, None, None)
    assert found.confirm_ms(500.0) is None
