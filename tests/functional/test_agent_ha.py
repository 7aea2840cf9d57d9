"""Two `vmm agent` processes for the same hosts, sharing a journal and leases on etcd.

The HA pair is configured only (``[agent] journal_backend = etcd``,
``migration_lock = etcd``, ``[nva_etcd]``): agents "a" and "b" both serve
the libvirt lab's h1 and h2 and both receive libvirt's events; the hook
relays talk to "a". A real etcd server is started for the module.

1. A live migration is handled once: across both agents' logs each phase
   ran its stages exactly once (the other instance reports it ignored).
2. kill -9 of the instance handling a migration (after its PREPARE): the
   other finishes it once the dead one's lease expires; the directory ends
   active at the destination, nothing runs in the shared journal, and the
   guest answers.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

libvirt = pytest.importorskip("libvirt", reason="libvirt-python is not installed")

from vmm_etcd.cluster import EtcdNotAvailable, local_etcd  # noqa: E402
from vmm_etcd.journal import EtcdJournal  # noqa: E402
from vmm_etcd.kv import EtcdKV  # noqa: E402
from vmm_lab.libvirt import site as lv_site  # noqa: E402
from vmm_lab.libvirt.migrate import migrate  # noqa: E402
from vmm_lab.linux.topology import new_prefix  # noqa: E402

pytestmark = pytest.mark.functional

SETTLE_S = 40.0


@pytest.fixture(scope="module")
def ha() -> Iterator[tuple[lv_site.LibvirtSite, dict[str, Any]]]:
    problem = lv_site.platform_problem()
    if problem:
        pytest.skip(problem)
    try:
        cluster_cm = local_etcd(1)
        cluster = cluster_cm.__enter__()
    except EtcdNotAvailable as exc:
        pytest.skip(f"{exc}")
    etcd = {"endpoints": cluster.endpoints, "prefix": f"/{new_prefix()}/"}
    try:
        with lv_site.agent_site(new_prefix(), 1.0, ha_etcd=etcd) as site:
            yield site, etcd
    finally:
        cluster_cm.__exit__(None, None, None)


def stage_runs(site: lv_site.LibvirtSite, migration_id: str, phase: str) -> list[str]:
    """Log lines, across both agents, of ``phase`` running its stages for the migration."""
    pattern = re.compile(rf"migration {re.escape(migration_id)} {phase} as \w+: ok \[")
    lines = []
    for name, process in site.processes.items():
        for line in process.log_tail(10**7).splitlines():
            if pattern.search(line):
                lines.append(f"{name}: {line}")
    return lines


def unfinished(etcd: dict[str, Any]) -> list[str]:
    kv = EtcdKV(etcd["endpoints"])
    try:
        running = []
        for host in ("h1", "h2"):
            journal = EtcdJournal(kv, host, etcd["prefix"])
            running += [f"{host}:{r.id}" for r in journal.unfinished()]
        return running
    finally:
        kv.close()


def wait_active(site: lv_site.LibvirtSite, host: str) -> dict[str, Any]:
    deadline = time.monotonic() + SETTLE_S
    while True:
        entry = site.client().get_endpoint(site.vni, site.guest.mac)
        if (entry["nve"], entry["state"]) == (host, "active") or time.monotonic() > deadline:
            return entry
        time.sleep(0.1)


def wait_no_unfinished(etcd: dict[str, Any]) -> list[str]:
    deadline = time.monotonic() + SETTLE_S
    while True:
        left = unfinished(etcd)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.3)


def test_each_migration_is_handled_once(ha: tuple[lv_site.LibvirtSite, dict[str, Any]]) -> None:
    site, etcd = ha
    src, dst = site.where, site.other(site.where)
    before = site.client().get_endpoint(site.vni, site.guest.mac)
    migrate(site.guest.name, site.hosts[src], site.hosts[dst], virsh=True)
    site.where = dst
    entry = wait_active(site, dst)
    assert (entry["nve"], entry["seq"]) == (dst, before["seq"] + 1), entry
    assert not wait_no_unfinished(etcd)
    mid = entry["last_migration_id"]
    deadline = time.monotonic() + SETTLE_S
    while time.monotonic() < deadline and not stage_runs(site, mid, "COMPLETED"):
        time.sleep(0.2)
    for phase in ("PREPARE", "SWITCHOVER", "RESUMED", "COMPLETED"):
        runs = stage_runs(site, mid, phase)
        assert len(runs) == 1, (phase, runs)


def test_killed_instance_is_taken_over(ha: tuple[lv_site.LibvirtSite, dict[str, Any]]) -> None:
    site, etcd = ha
    src, dst = site.where, site.other(site.where)
    before = site.client().get_endpoint(site.vni, site.guest.mac)
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            migrate(
                site.guest.name, site.hosts[src], site.hosts[dst], virsh=True, bandwidth_mib_s=8
            )
        except Exception as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:  # "a" ran PREPARE (the hook): it holds the lease
        if site.client().get_endpoint(site.vni, site.guest.mac)["state"] == "pending":
            break
        time.sleep(0.02)
    site.processes["a"].kill()
    thread.join(timeout=90)
    moved = "error" not in outcome
    expected = dst if moved else src
    if moved:
        site.where = dst
    entry = wait_active(site, expected)
    print(f"\nkill -9 of agent a: migration {'completed' if moved else 'failed'}: {entry}")
    assert (entry["nve"], entry["state"], entry["pending_nve"]) == (expected, "active", None)
    if moved:
        assert entry["seq"] == before["seq"] + 1
        mid = entry["last_migration_id"]
        deadline = time.monotonic() + SETTLE_S
        while time.monotonic() < deadline and not stage_runs(site, mid, "RESUMED"):
            time.sleep(0.2)
        runs = stage_runs(site, mid, "RESUMED")
        assert len(runs) == 1 and runs[0].startswith("b:"), runs
    assert not wait_no_unfinished(etcd)
    lv_site.wait_ping(site.netns("vm2"), site.ipv4, timeout=10)
    site.processes["a"].start()
