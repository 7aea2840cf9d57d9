"""The real-libvirt lab with the orchestrator switched off and on again
(vmm_lab.libvirt.site.orchestrator_off), which benchmarks/libvirt_migration.py
``--paired-alone`` uses to measure what the orchestrator adds to a migration's
wall time against libvirt alone in the same lab.

Off, a migration there and back runs no hook process (libvirtd finds no relay
in qemu.d) and no phase on either agent; on again, the relay is back, the
directory places the guest where it runs, and the next migration is the
orchestrator's: PREPARE through the relay at "migrate begin" on the
destination, the four phases under one id, nothing lost after the resume.
"""

from __future__ import annotations

import filecmp
import os
import time
from collections.abc import Iterator

import pytest

libvirt = pytest.importorskip("libvirt", reason="libvirt-python is not installed")

from vmm_lab.libvirt import demo as lv_demo  # noqa: E402
from vmm_lab.libvirt import site as lv_site  # noqa: E402
from vmm_lab.libvirt.migrate import domain_state, migrate  # noqa: E402
from vmm_lab.linux.topology import lab_namespaces, new_prefix  # noqa: E402
from vmm_orchestrator import metrics  # noqa: E402
from vmm_orchestrator.model import Phase  # noqa: E402

pytestmark = pytest.mark.functional

HOLD_TIME_S = 1.0
#: How long phases could take to show up if a hook or an event still reached an agent.
QUIET_S = 1.0


@pytest.fixture(scope="module")
def ls() -> Iterator[lv_site.LibvirtSite]:
    problem = lv_site.platform_problem()
    if problem:
        pytest.skip(problem)
    conf = lv_site.lab_conf(orchestrated=True)
    conf.set_override("hold_time", HOLD_TIME_S, group="stage_hold_timer")
    prefix = new_prefix()
    workdir = ""
    with lv_site.libvirt_site(conf, prefix, orchestrated=True) as site:
        workdir = site.workdir
        yield site
    assert not lab_namespaces(prefix)
    assert not os.path.exists(workdir)


def _hook_calls(op: str, sub_op: str) -> float:
    """Hook calls the agents (this process) answered so far."""
    labels = {"operation": op, "sub_operation": sub_op}
    value = metrics.REGISTRY.get_sample_value("vmm_hook_calls_total", labels)
    return value or 0.0


def _relay_in_place(ls: lv_site.LibvirtSite) -> list[bool]:
    paths = [h.path(lv_site.HOOK_PATH) for h in ls.hosts.values()]
    return [os.path.exists(p) and filecmp.cmp(p, lv_site.RELAY, shallow=False) for p in paths]


def test_off_there_and_back_runs_no_hook_and_no_phase(ls: lv_site.LibvirtSite) -> None:
    assert ls.where == "h1" and _relay_in_place(ls) == [True, True]
    marks = lv_demo.report_marks(ls)
    calls = {c: _hook_calls(*c) for c in (("migrate", "begin"), ("stopped", "end"))}
    seq = ls.client().get_endpoint(ls.vni, ls.guest.mac)["seq"]
    with lv_site.orchestrator_off(ls):
        assert _relay_in_place(ls) == [False, False]
        assert not any(a.source.connected for a in ls.agents.values())
        for src, dst in (("h1", "h2"), ("h2", "h1")):
            record = migrate(ls.guest.name, ls.hosts[src], ls.hosts[dst])
            ls.where = dst
            assert record.error is None and record.downtime_ms is not None, record
        time.sleep(QUIET_S)
        assert lv_demo.reports_of(ls, marks) == []
        assert {c: _hook_calls(*c) for c in calls} == calls
    assert _relay_in_place(ls) == [True, True]
    assert all(a.source.connected and a.reconciled.is_set() for a in ls.agents.values())
    assert domain_state(ls.hosts["h1"], ls.guest.name) == libvirt.VIR_DOMAIN_RUNNING
    endpoint = ls.client().get_endpoint(ls.vni, ls.guest.mac)
    # Back where it runs; the NVEs' local learning may have moved it meanwhile.
    assert (endpoint["nve"], endpoint["state"]) == ("h1", "active"), endpoint
    assert endpoint["seq"] >= seq
    assert lv_demo.reports_of(ls, marks) == []


def test_on_again_the_next_migration_is_the_orchestrators(ls: lv_site.LibvirtSite) -> None:
    assert ls.where == "h1"
    before = ls.client().get_endpoint(ls.vni, ls.guest.mac)
    begins = _hook_calls("migrate", "begin")
    res = lv_demo.measured_migration(ls, "h2")
    assert _hook_calls("migrate", "begin") == begins + 1  # the veto point is back
    assert not res.errors, res.errors
    assert res.lost_after_resume == 0, res.streams
    ran = {(r.host, r.phase) for r in res.reports}
    assert ran >= {
        ("h2", Phase.PREPARE),
        ("h2", Phase.RESUMED),
        ("h1", Phase.SWITCHOVER),
        ("h1", Phase.COMPLETED),
    }, ran
    assert all(r.ok for r in res.reports), [r for r in res.reports if not r.ok]
    after = res.directory
    assert (after["nve"], after["seq"]) == ("h2", before["seq"] + 1), after
    assert res.migration_ids == [after["last_migration_id"]], res.migration_ids
