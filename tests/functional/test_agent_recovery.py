"""kill -9 of the real agent process at each phase boundary, on both hosts.

The operator's setup of tests/functional/test_agent_e2e.py (a ``vmm agent``
process per libvirt host from its config file, ``vmm nva serve``, the hook
relay, ``virsh migrate --live --p2p``), without the state stages. Each case
starts a bandwidth-limited migration, kills one agent with SIGKILL when its
journal shows the chosen point, lets the migration run its course, restarts
the agent, and checks the reality, not only the journal:

* the directory holds the guest active where libvirt runs it, nothing pending;
* every NVE's kernel table points at that host (the host itself: the tap);
* no in-flight tunnel entry is left on any host (``vi-<vni>``);
* no journal of either agent has a migration still running;
* the guest answers, and it can migrate again (the next case does).

The matrix (host x point): the destination after PREPARE, the destination
after RESUMED began, the source after SWITCHOVER (before COMPLETED), and the
source in the middle of COMPLETED (the hold timer).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

libvirt = pytest.importorskip("libvirt", reason="libvirt-python is not installed")

from vmm_lab.libvirt import site as lv_site  # noqa: E402
from vmm_lab.libvirt.agents import AgentProcess  # noqa: E402
from vmm_lab.libvirt.migrate import migrate  # noqa: E402
from vmm_lab.linux.topology import in_ns, lab_namespaces, new_prefix  # noqa: E402
from vmm_linux.nve import inflight_name, vxlan_name  # noqa: E402
from vmm_orchestrator import journal as jr  # noqa: E402
from vmm_orchestrator.model import Phase  # noqa: E402

pytestmark = pytest.mark.functional

HOLD_TIME_S = 3.0
SETTLE_S = 40.0
BANDWIDTH_MIB_S = 16


@pytest.fixture(scope="module")
def ls() -> Iterator[lv_site.LibvirtSite]:
    problem = lv_site.platform_problem()
    if problem:
        pytest.skip(problem)
    prefix = new_prefix()
    with lv_site.agent_site(prefix, HOLD_TIME_S) as site:
        yield site
    assert not lab_namespaces(prefix)


def running(process: AgentProcess) -> list[str]:
    return [r.id for r in process.migrations() if r.status == jr.RUNNING]


def phase_state(process: AgentProcess, phase: Phase) -> str | None:
    """The state of ``phase`` in the newest running migration of this agent."""
    for record in process.migrations():
        if record.status == jr.RUNNING and phase in record.phases:
            return record.phases[phase]
    return None


def fdb(netns: str, vni: int, mac: str) -> dict[str, Any]:
    out = in_ns(netns, "bridge", "-j", "fdb", "show", check=False)
    found: dict[str, Any] = {}
    for entry in json.loads(out or "[]"):
        if entry.get("mac") != mac:
            continue
        if entry.get("master") == f"br-{vni}" and "dst" not in entry:
            found.setdefault("ports", []).append(entry.get("ifname"))
        if "dst" in entry:
            found.setdefault("dst", {})[entry.get("ifname")] = entry["dst"]
    return found


def check_reality(ls: lv_site.LibvirtSite, where: str) -> None:
    deadline = time.monotonic() + SETTLE_S
    while True:
        entry = ls.client().get_endpoint(ls.vni, ls.guest.mac)
        left = {name: running(p) for name, p in ls.processes.items()}
        tables = {
            name: fdb(ls.lab_site.lab.hosts[name].netns, ls.vni, ls.guest.mac)
            for name in ("h1", "h2", "h3")
        }
        vtep = ls.lab_site.lab.hosts[where].vtep
        good = (
            (entry["nve"], entry["state"], entry["pending_nve"]) == (where, "active", None)
            and not any(left.values())
            and all(inflight_name(ls.vni) not in t.get("dst", {}) for t in tables.values())
            and all(
                t.get("dst", {}).get(vxlan_name(ls.vni)) == vtep
                for name, t in tables.items()
                if name != where
            )
            and ls.guest.tap in tables[where].get("ports", [])
        )
        if good:
            break
        if time.monotonic() > deadline:
            pytest.fail(f"not converged at {where}: {entry} running={left} fdb={tables}")
        time.sleep(0.2)
    lv_site.wait_ping(ls.netns("vm2"), ls.ipv4, timeout=10)


def crash_during_migration(
    ls: lv_site.LibvirtSite, victim_role: str, reached: Callable[[AgentProcess], bool]
) -> str:
    """Migrate to the other host; SIGKILL the ``victim_role`` agent once ``reached``."""
    src, dst = ls.where, ls.other(ls.where)
    victim = ls.processes[src if victim_role == "source" else dst]
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            migrate(
                ls.guest.name,
                ls.hosts[src],
                ls.hosts[dst],
                virsh=True,
                bandwidth_mib_s=BANDWIDTH_MIB_S,
            )
        except Exception as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.monotonic() + 60
    while not reached(victim):
        if time.monotonic() > deadline:
            thread.join(timeout=90)
            pytest.fail(f"the {victim_role}'s agent never reached the kill point")
        time.sleep(0.005)
    victim.kill()
    thread.join(timeout=120)
    time.sleep(1.0)  # events the dead agent misses
    victim.start()
    where = src if "error" in outcome else dst
    ls.where = where
    print(f"\nkill -9 of the {victim_role} ({victim.name}): VM at {where} {outcome}")
    return where


@pytest.mark.parametrize(
    ("role", "point"),
    [
        ("destination", Phase.PREPARE),
        ("destination", Phase.RESUMED),
        ("source", Phase.SWITCHOVER),
        ("source", Phase.COMPLETED),
    ],
    ids=["dst-after-PREPARE", "dst-in-RESUMED", "src-after-SWITCHOVER", "src-in-COMPLETED"],
)
def test_kill_9_at_a_phase_boundary_recovers_from_reality(
    ls: lv_site.LibvirtSite, role: str, point: Phase
) -> None:
    def reached(process: AgentProcess) -> bool:
        state = phase_state(process, point)
        if point in (Phase.RESUMED, Phase.COMPLETED):
            return state is not None  # in the middle of it
        return state == "completed"  # just after it

    where = crash_during_migration(ls, role, reached)
    check_reality(ls, where)
