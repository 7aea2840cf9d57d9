"""Several orchestrator instances on one etcd: each migration is handled exactly once,
and a crashed instance's migrations are taken over and finished or reverted.

Instance A runs in a child process (this file run as a script) so that it can
really crash: it is SIGKILLed while it holds two migrations' leases, one
between two events and one in the middle of a stage. Instance B, in the test
process, takes both over once A's lease has expired. Every stage run, revert
and completion is counted in etcd itself, so what A did before it died is
counted too.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
from oslo_config import cfg

from vmm_etcd import kv as kvmod
from vmm_etcd.client import EtcdNvaClient
from vmm_etcd.cluster import LocalEtcdCluster
from vmm_etcd.ha import HaPipeline
from vmm_etcd.journal import EtcdJournal, OwnershipLost
from vmm_etcd.kv import EtcdKV
from vmm_etcd.locks import InstanceLease, MigrationLocks
from vmm_orchestrator import journal as jr
from vmm_orchestrator.engine import Dispatcher, PhaseReport
from vmm_orchestrator.model import Migration, MigrationEvent, Phase, Role, Vif, Workload
from vmm_orchestrator.options import new_conf
from vmm_orchestrator.stage import HostContext, Stage, StageContext
from vmm_orchestrator.stages import NvaPrestage, PeerUpdate

VNI = 700
HOST = "hv-b"  # the destination host both instances serve
LEASE_TTL = 2  # seconds; etcd's minimum with the test cluster's timers


# ------------------------------------------------------------------- stages


def _record(ctx: StageContext, stage: str, kind: str) -> None:
    """Count a stage event in etcd: <prefix>test/<migration>/<stage>/<kind>/<unique>."""
    host = ctx.host
    key = f"{host.nva.keys.prefix}test/{ctx.migration.id}/{stage}/{kind}/{uuid.uuid4().hex}"
    host.nva.kv.txn(success=[kvmod.put(key, host.services["instance"])])


class CountedPrestage(NvaPrestage):
    def run(self, ctx: StageContext) -> dict[str, Any]:
        _record(ctx, self.name, "run")
        record = super().run(ctx)
        _record(ctx, self.name, "done")
        return record

    def revert(self, ctx: StageContext, record: dict[str, Any] | None) -> None:
        _record(ctx, self.name, "revert")
        super().revert(ctx, record)


class Gate(Stage):
    """A PREPARE stage after the prestage; hangs for the migration named in the host's
    "hang_on" service, so the instance can be killed in the middle of it."""

    name = "gate"
    phase = Phase.PREPARE
    role = Role.DESTINATION
    default_deadline = 30.0
    default_attempts = 1

    def run(self, ctx: StageContext) -> dict[str, Any]:
        _record(ctx, self.name, "run")
        if ctx.host.services.get("hang_on") == ctx.migration.id:
            print(f"HANG {ctx.migration.id}", flush=True)
            threading.Event().wait()
        _record(ctx, self.name, "done")
        return {"by": ctx.host.services["instance"]}

    def revert(self, ctx: StageContext, record: dict[str, Any] | None) -> None:
        _record(ctx, self.name, "revert")


class CountedPeerUpdate(PeerUpdate):
    opts: ClassVar[list[cfg.Opt]] = PeerUpdate.opts

    def run(self, ctx: StageContext) -> dict[str, Any]:
        _record(ctx, self.name, "run")
        record = super().run(ctx)
        _record(ctx, self.name, "done")
        return record


# ---------------------------------------------------------------- instances


def migration(mid: str, mac: str) -> Migration:
    vif = Vif(mac=mac, vni=VNI, ipv4=(f"10.70.0.{int(mac[-2:], 16)}",), port="tap0")
    return Migration(
        id=mid, workload=Workload(f"vm-{mid}", (vif,)), source="hv-a", destination=HOST
    )


M1 = migration("m1", "52:54:00:70:00:01")
M2 = migration("m2", "52:54:00:70:00:02")
M3 = migration("m3", "52:54:00:70:00:03")


def event(m: Migration, phase: Phase) -> MigrationEvent:
    return MigrationEvent(m, phase, Role.DESTINATION, time.monotonic())


class Instance:
    """One orchestrator instance for HOST: its directory client, lease, journal, pipeline."""

    def __init__(
        self, endpoints: list[str], prefix: str, name: str, hang_on: str | None = None
    ) -> None:
        conf = new_conf()
        self.nva = EtcdNvaClient(EtcdKV(endpoints), prefix)
        self.kv = EtcdKV(endpoints)
        self.lease = InstanceLease(self.kv, LEASE_TTL, instance=name)
        self.locks = MigrationLocks(self.kv, HOST, self.lease, prefix)
        self.journal = EtcdJournal(self.kv, HOST, prefix)
        Gate.register_opts(conf)  # the test's own stage is no entry point
        stages = [CountedPrestage(conf), Gate(conf), CountedPeerUpdate(conf)]
        conf.set_override("ack_timeout", 0.05, group="stage_peer_update")
        services = {"instance": name, "hang_on": hang_on}
        self.host = HostContext(HOST, self.nva, services)
        self.pipeline = HaPipeline(
            conf, self.host, self.journal, self.locks, stages, claim_timeout=10.0
        )

    def close(self) -> None:
        self.lease.close(revoke=True)
        self.nva.close()
        self.kv.close()


def child_main(endpoints: str, prefix: str) -> None:
    """Instance A: finish PREPARE of m1, then hang in the middle of m2's PREPARE."""
    a = Instance(endpoints.split(","), prefix, "A", hang_on="m2")
    report = a.pipeline.handle(event(M1, Phase.PREPARE))
    print(f"DONE m1 {report.ok} {report.error}", flush=True)
    a.pipeline.handle(event(M2, Phase.PREPARE))
    print("NOT REACHED", flush=True)


# -------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def etcd() -> Iterator[LocalEtcdCluster]:
    with LocalEtcdCluster(1) as cluster:
        yield cluster


@pytest.fixture
def site(etcd: LocalEtcdCluster) -> Iterator[tuple[str, EtcdNvaClient]]:
    """A directory with the source and destination NVEs and the VMs at the source."""
    prefix = f"/ha-{secrets.token_hex(4)}/"
    admin = EtcdNvaClient(EtcdKV(etcd.endpoints), prefix)
    admin.register_nve("hv-a", "192.0.2.1", [VNI])
    admin.register_nve(HOST, "192.0.2.2", [VNI])
    for m in (M1, M2, M3):
        vif = m.workload.vifs[0]
        admin.add_endpoint(VNI, vif.mac, list(vif.ipv4), [], "hv-a")
    yield prefix, admin
    admin.close()


def counts(admin: EtcdNvaClient, mid: str) -> dict[tuple[str, str], list[str]]:
    """(stage, kind) -> instances that did it, for one migration."""
    base = f"{admin.keys.prefix}test/{mid}/"
    found: dict[tuple[str, str], list[str]] = {}
    for item in admin.kv.read(kvmod.get_prefix(base)).kvs(0):
        stage, kind, _ = item.key[len(base) :].split("/")
        found.setdefault((stage, kind), []).append(item.value)
    return found


def test_a_crashed_instance_is_taken_over_exactly_once(
    etcd: LocalEtcdCluster, site: tuple[str, EtcdNvaClient]
) -> None:
    prefix, admin = site
    b = Instance(etcd.endpoints, prefix, "B")
    child = subprocess.Popen(
        [sys.executable, __file__, "child", ",".join(etcd.endpoints), prefix],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    try:
        assert child.stdout is not None
        lines = [child.stdout.readline().strip() for _ in range(2)]
        assert lines[0] == "DONE m1 True None", lines
        assert lines[1] == "HANG m2", lines

        # A is alive and owns both migrations: B must not run them.
        busy = b.pipeline
        busy.claim_timeout = 0.3
        report = busy.handle(event(M1, Phase.PREPARE))
        assert not report.ok and report.detail == "handled by another instance"
        assert "A#" in (report.error or "")
        assert busy.takeover() == []
        busy.claim_timeout = 10.0

        child.send_signal(signal.SIGKILL)  # A crashes holding both leases
        child.wait(timeout=10)
        killed = time.monotonic()

        def locate(m: Migration) -> str:
            return HOST if m.id == "m1" else "hv-a"  # m1's VM resumed at B's host, m2's not

        reports: dict[str, PhaseReport] = {}
        both = threading.Event()

        def taken(report: PhaseReport) -> None:
            reports[report.migration_id] = report
            if len(reports) == 2:
                both.set()

        stop = threading.Event()
        watcher = threading.Thread(
            target=b.pipeline.serve_takeovers, args=(stop, locate, 30.0, taken), daemon=True
        )
        watcher.start()  # reacts to etcd deleting A's owner keys, not to its 30 s interval
        both.wait(10)
        took = time.monotonic() - killed
        stop.set()
        watcher.join(5)
        assert set(reports) == {"m1", "m2"}, f"takeover incomplete after {took:.1f}s"
        assert took >= LEASE_TTL - 0.5  # not before A's lease ran out
        assert reports["m1"].ok and "finished" in (reports["m1"].detail or "")
        assert reports["m2"].ok and "reverted" in (reports["m2"].detail or "")
        assert reports["m2"].reverted == ["gate", "nva_prestage"]  # newest first
        assert b.pipeline.takeover(locate) == []  # nothing is taken over twice

        # m1 goes on with B: its next event commits the move.
        resumed = b.pipeline.handle(event(M1, Phase.RESUMED))
        assert resumed.ok, resumed.error
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        b.close()

    m1, m2 = counts(admin, "m1"), counts(admin, "m2")
    # m1: A did PREPARE once; B did not redo any of it; B committed once.
    assert m1 == {
        ("nva_prestage", "run"): ["A"],
        ("nva_prestage", "done"): ["A"],
        ("gate", "run"): ["A"],
        ("gate", "done"): ["A"],
        ("peer_update", "run"): ["B"],
        ("peer_update", "done"): ["B"],
    }
    # m2: A's gate never completed; B reverted it and the prestage, once each.
    assert m2 == {
        ("nva_prestage", "run"): ["A"],
        ("nva_prestage", "done"): ["A"],
        ("gate", "run"): ["A"],
        ("gate", "revert"): ["B"],
        ("nva_prestage", "revert"): ["B"],
    }
    ep1 = admin.get_endpoint(VNI, M1.workload.vifs[0].mac)
    ep2 = admin.get_endpoint(VNI, M2.workload.vifs[0].mac)
    assert (ep1["nve"], ep1["seq"], ep1["state"]) == (HOST, 1, "active")
    assert (ep2["nve"], ep2["seq"], ep2["state"], ep2["pending_nve"]) == ("hv-a", 0, "active", None)
    journal = EtcdJournal(admin.kv, HOST, prefix)
    statuses = {m: journal.get(m).status for m in ("m1", "m2")}  # type: ignore[union-attr]
    assert statuses == {"m1": jr.DONE, "m2": jr.REVERTED}
    owners = admin.kv.read(kvmod.get_prefix(f"{prefix}owners/")).kvs(0)
    assert owners == []  # every lease given back


def test_an_event_delivered_to_two_live_instances_runs_once(
    etcd: LocalEtcdCluster, site: tuple[str, EtcdNvaClient]
) -> None:
    """Both instances get every event; the owner runs it, the other one finds it done."""
    prefix, admin = site
    x, y = Instance(etcd.endpoints, prefix, "X"), Instance(etcd.endpoints, prefix, "Y")
    try:
        with Dispatcher(x.pipeline, workers=2) as dx, Dispatcher(y.pipeline, workers=2) as dy:
            futures = []
            for phase in (Phase.PREPARE, Phase.RESUMED):
                e = event(M3, phase)
                futures += [dx.submit(e), dy.submit(e)]
            reports = [f.result(timeout=30) for f in futures]
    finally:
        x.close()
        y.close()
    assert all(r.ok for r in reports), [r.error for r in reports]
    ran = counts(admin, "m3")
    assert {k: len(v) for k, v in ran.items()} == {
        ("nva_prestage", "run"): 1,
        ("nva_prestage", "done"): 1,
        ("gate", "run"): 1,
        ("gate", "done"): 1,
        ("peer_update", "run"): 1,
        ("peer_update", "done"): 1,
    }
    assert len({who for v in ran.values() for who in v}) == 1  # all by the same instance
    ignored = [r for r in reports if (r.detail or "").startswith("ignored")]
    assert len(ignored) == 2  # the other instance's PREPARE and RESUMED
    assert admin.get_endpoint(VNI, M3.workload.vifs[0].mac)["seq"] == 1


def test_an_instance_that_lost_its_lease_cannot_write_the_journal(
    etcd: LocalEtcdCluster,
) -> None:
    prefix = f"/ha-{secrets.token_hex(4)}/"
    kv = EtcdKV(etcd.endpoints)
    lease = InstanceLease(kv, LEASE_TTL, instance="Z")
    locks = MigrationLocks(kv, HOST, lease, prefix)
    journal = EtcdJournal(kv, HOST, prefix, owner=locks)
    try:
        with pytest.raises(OwnershipLost, match="handled by nobody"):
            journal.begin_migration(M1, Role.DESTINATION)  # m1 was never claimed
        assert journal.get("m1") is None
        locks.claim("m1", timeout=1.0)
        journal.begin_migration(M1, Role.DESTINATION)
        journal.phase_started("m1", Phase.PREPARE)
        kv.revoke(lease.id)  # as if the lease had expired while this instance was paused
        with pytest.raises(OwnershipLost, match="lost its etcd lease"):
            journal.phase_completed("m1", Phase.PREPARE)
        record = journal.get("m1")
        assert record is not None and record.phases == {Phase.PREPARE: "started"}
    finally:
        lease.close(revoke=False)
        kv.close()


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "child":
        sys.path.insert(0, str(Path(__file__).parent))
        child_main(sys.argv[2], sys.argv[3])
