"""Conformance: the same contract cases over every installed implementation.

A new backend registers its entry point and passes these cases
(:mod:`vmm_orchestrator.contracts` says what each contract promises):

* :class:`Directory` / :class:`NveDirectory`: the embedded directory (its
  HTTP client against ``vmm nva serve``'s server) and the etcd directory
  (its client against a real etcd started here). The Neutron directory's
  cases against real Keystone + Neutron are in tests/openstack/.
* :class:`JournalStore`: SQLite and etcd, through the composition root's
  journal entry points.
* :class:`HostDriver` / :class:`NveDriver` / :class:`AnnouncerPool`: every
  ``vmm_orchestrator.host_drivers`` entry point that runs here (the Linux
  NVE, in a namespace).
* :class:`MigrationLock`: etcd leases.
"""

from __future__ import annotations

import secrets
import subprocess
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from oslo_config import cfg
from stevedore import ExtensionManager

from vmm_etcd.backends import EtcdBackend, EtcdMigrationLock
from vmm_etcd.cluster import EtcdNotAvailable, LocalEtcdCluster, local_etcd
from vmm_orchestrator import agent, contracts
from vmm_orchestrator.contracts import HostSpec
from vmm_orchestrator.model import Migration, Phase, Role, Vif, Workload
from vmm_orchestrator.nva import errors as nva_errors
from vmm_orchestrator.nva.client import NvaClient
from vmm_orchestrator.nva.server import NvaServer
from vmm_orchestrator.nva.store import NvaStore
from vmm_orchestrator.options import new_conf

pytestmark = pytest.mark.functional

VNI = 4242
MAC = "02:00:00:00:42:01"
MAC2 = "02:00:00:00:42:02"


@pytest.fixture(scope="module")
def etcd() -> Iterator[LocalEtcdCluster]:
    try:
        with local_etcd(1) as cluster:
            yield cluster
    except EtcdNotAvailable as exc:
        pytest.skip(f"{exc}")


def etcd_conf(cluster: LocalEtcdCluster) -> cfg.ConfigOpts:
    conf = new_conf()
    EtcdBackend.kv_from_conf(conf)  # registers [nva_etcd]
    conf.set_override("endpoints", cluster.endpoints, group="nva_etcd")
    conf.set_override("prefix", f"/c{secrets.token_hex(4)}/", group="nva_etcd")
    conf.set_override("lease_ttl", 2, group="nva_etcd")
    return conf


# -- directories ---------------------------------------------------------------------


@pytest.fixture(params=["embedded", "etcd"])
def directory(request: pytest.FixtureRequest, etcd: LocalEtcdCluster) -> Iterator[Any]:
    if request.param == "embedded":
        token = secrets.token_urlsafe(16)
        server = NvaServer(NvaStore(":memory:"), token, "127.0.0.1", 0)
        server.start()
        client = NvaClient(server.url, token)
        try:
            yield client
        finally:
            client.close()
            server.stop()
    else:
        client = EtcdBackend.from_conf(etcd_conf(etcd))
        try:
            yield client
        finally:
            client.close()


def arrange(d: Any) -> None:
    d.register_nve("nve-a", "192.0.2.1", [VNI])
    d.register_nve("nve-b", "192.0.2.2", [VNI])
    d.register_nve("nve-c", "192.0.2.3", [VNI + 1])
    d.add_endpoint(VNI, MAC, ["198.51.100.5"], ["2001:db8::5"], "nve-a")


def test_directory_implements_the_protocols(directory: Any) -> None:
    assert isinstance(directory, contracts.Directory)
    assert isinstance(directory, contracts.NveDirectory)


def test_prestage_commit_moves_with_a_higher_sequence(directory: Any) -> None:
    arrange(directory)
    before = directory.get_endpoint(VNI, MAC)
    pending = directory.prestage(VNI, MAC, "nve-b", "m1")
    assert pending["state"] == "pending" and pending["pending_nve"] == "nve-b"
    assert directory.get_endpoint(VNI, MAC)["nve"] == "nve-a"  # traffic still follows a
    done = directory.commit(VNI, MAC, "m1")
    after = directory.get_endpoint(VNI, MAC)
    assert (after["nve"], after["state"]) == ("nve-b", "active")
    assert after["seq"] == before["seq"] + 1
    assert int(done["revision"]) > 0 and "committed_at" in done


def test_abort_restores_and_is_idempotent(directory: Any) -> None:
    arrange(directory)
    before = directory.get_endpoint(VNI, MAC)
    directory.prestage(VNI, MAC, "nve-b", "m2")
    directory.abort(VNI, MAC, "m2")
    directory.abort(VNI, MAC, "m2")
    after = directory.get_endpoint(VNI, MAC)
    assert (after["nve"], after["state"], after["seq"]) == ("nve-a", "active", before["seq"])


def test_prestage_at_an_nve_outside_the_vn_is_refused(directory: Any) -> None:
    arrange(directory)
    with pytest.raises(nva_errors.NvaError):
        directory.prestage(VNI, MAC, "nve-c", "m3")
    assert directory.get_endpoint(VNI, MAC)["state"] == "active"


def test_a_duplicate_address_is_refused(directory: Any) -> None:
    arrange(directory)
    with pytest.raises(nva_errors.Conflict):
        directory.add_endpoint(VNI, MAC2, ["198.51.100.5"], [], "nve-b")


def test_commit_of_another_migration_is_refused(directory: Any) -> None:
    arrange(directory)
    directory.prestage(VNI, MAC, "nve-b", "m4")
    with pytest.raises(nva_errors.NvaError):
        directory.commit(VNI, MAC, "not-m4")
    assert directory.get_endpoint(VNI, MAC)["nve"] == "nve-a"


def test_acks_report_each_nve_and_expire_is_accepted(directory: Any) -> None:
    arrange(directory)
    directory.prestage(VNI, MAC, "nve-b", "m5")
    revision = int(directory.commit(VNI, MAC, "m5")["revision"])
    directory.ack("nve-a", revision)
    acks = directory.acks(VNI, revision, timeout=0.2)
    assert {"nve-a", "nve-b"} <= set(acks)
    assert int(acks["nve-a"]["acked_revision"]) >= revision
    assert int(acks["nve-b"].get("acked_revision") or 0) < revision
    directory.expire(VNI, MAC, ["nve-b"])


def test_watch_delivers_the_move_to_the_vn(directory: Any) -> None:
    arrange(directory)
    revision, _ = directory.snapshot(VNI)
    directory.prestage(VNI, MAC, "nve-b", "m6")
    directory.commit(VNI, MAC, "m6")
    _, changes = directory.watch("nve-a", revision, timeout=2.0)
    endpoints = [c.get("endpoint") or {} for c in changes]
    moved = [e for e in endpoints if e.get("mac") == MAC and e.get("nve") == "nve-b"]
    assert moved, changes


# -- journals --------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "etcd"])
def journal(request: pytest.FixtureRequest, etcd: LocalEtcdCluster, tmp_path: Any) -> Iterator[Any]:
    conf = etcd_conf(etcd)
    spec = HostSpec("hv1", "192.0.2.1", (VNI,), None, str(tmp_path / "journal.sqlite"))
    factory = agent.load_plugin(contracts.JOURNALS, request.param, "[agent] journal_backend")
    j = factory(conf, spec, None)
    yield j
    j.close()


def _migration() -> Migration:
    vif = Vif(MAC, VNI, ipv4=("198.51.100.5",))
    return Migration(str(uuid.uuid4()), Workload("vm", (vif,)), "hv0", "hv1")


def test_journal_is_a_journal_store(journal: Any) -> None:
    assert isinstance(journal, contracts.JournalStore)


def test_journal_keeps_stages_checkpoints_and_status(journal: Any) -> None:
    m = _migration()
    journal.begin_migration(m, Role.DESTINATION)
    journal.phase_started(m.id, Phase.PREPARE)
    journal.stage_started(m.id, Phase.PREPARE, "a")
    journal.stage_checkpoint(m.id, Phase.PREPARE, "a", {"step": 1})
    journal.stage_completed(m.id, Phase.PREPARE, "a", {"did": "x"})
    journal.stage_started(m.id, Phase.PREPARE, "b")
    journal.stage_failed(m.id, Phase.PREPARE, "b", "boom")
    journal.stage_reverted(m.id, Phase.PREPARE, "a")
    record = journal.get(m.id)
    assert record.migration == m and record.role is Role.DESTINATION
    assert record.status == "running" and [r.id for r in journal.unfinished()] == [m.id]
    runs = {r.stage: r for r in record.stages}
    assert runs["a"].record == {"did": "x"} and runs["a"].checkpoint == {"step": 1}
    assert runs["a"].state == "reverted" and runs["b"].state == "failed"
    assert runs["b"].error == "boom"
    journal.set_status(m.id, "reverted")
    assert journal.get(m.id).status == "reverted" and journal.unfinished() == []


def test_journal_of_sqlite_refuses_a_shared_lock(tmp_path: Any) -> None:
    from vmm_orchestrator.errors import ConfigError
    from vmm_orchestrator.journal import open_sqlite

    spec = HostSpec("hv1", "192.0.2.1", (VNI,), None, str(tmp_path / "j.sqlite"))
    with pytest.raises(ConfigError, match="journal_backend = etcd"):
        open_sqlite(None, spec, lock=object())


# -- migration locks ---------------------------------------------------------------------


def test_etcd_lock_is_a_migration_lock(etcd: LocalEtcdCluster) -> None:
    conf = etcd_conf(etcd)
    spec = HostSpec("hv1", "192.0.2.1", (VNI,), None, "")
    lock = EtcdMigrationLock.open(conf, spec)
    other = EtcdMigrationLock.open(conf, spec)
    try:
        assert isinstance(lock, contracts.MigrationLock)
        assert lock.instance != other.instance
        assert lock.try_claim("m1").name == "NEW"
        assert other.owner_of("m1") == lock.token
        assert other.try_claim("m1").name != "NEW"
        lock.release("m1")
        assert other.owner_of("m1") is None
    finally:
        lock.close()
        other.close()


# -- host drivers ----------------------------------------------------------------------------


def host_drivers() -> list[str]:
    return sorted(ExtensionManager(contracts.HOST_DRIVERS).names())


@pytest.mark.parametrize("name", [n for n in host_drivers() if n == "linux"])
def test_host_driver_offers_an_idempotent_nve(
    name: str, netns: str, directory: Any, tmp_path: Any
) -> None:
    """Each NveDriver call twice in a row, and the undo calls on nothing, never fail."""
    directory.register_nve("nve-a", "192.0.2.1", [VNI])
    conf = new_conf()
    subprocess.run(
        ["ip", "-n", netns, "link", "add", "p-vm", "type", "veth", "peer", "name", "p-peer"],
        check=True,
    )
    subprocess.run(["ip", "-n", netns, "link", "set", "lo", "up"], check=True)
    spec = HostSpec("nve-a", "127.0.0.1", (VNI,), netns, str(tmp_path / "j.sqlite"))
    factory = agent.load_plugin(contracts.HOST_DRIVERS, name, "[agent] host_driver")
    driver = factory(conf, spec, directory)
    try:
        assert isinstance(driver, contracts.HostDriver)
        nve = driver.services["nve"]
        assert isinstance(nve, contracts.NveDriver)
        assert hasattr(driver.services["announcers"], "for_vni")
        nve.ensure_vn(VNI)  # the hypervisor attaches the VM's port to the VN's bridge
        bridge = f"br-{VNI}"
        subprocess.run(
            ["ip", "-n", netns, "link", "set", "p-vm", "master", bridge, "up"], check=True
        )
        for _ in range(2):
            nve.ensure_vn(VNI)
            nve.expect(VNI, MAC, "p-vm", ("198.51.100.5",))
            nve.plug(VNI, MAC, "p-vm", ("198.51.100.5",))
            nve.start_inflight(VNI, MAC, "127.0.0.2")
        for _ in range(2):
            nve.stop_inflight(VNI, MAC)
            nve.unplug(VNI, MAC)
    finally:
        driver.stop()
