"""The directory's semantics on etcd: the embedded store's own tests, run against both
stores, plus what only a shared, networked directory has to get right.

A real etcd (Debian's etcd-server) runs on loopback for the module; every
test gets its own key prefix, so tests never see each other's data.
"""

from __future__ import annotations

import importlib.util
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from stevedore import driver

from vmm_etcd import kv as kvmod
from vmm_etcd.backends import EtcdBackend
from vmm_etcd.client import EtcdNvaClient
from vmm_etcd.cluster import LocalEtcdCluster, free_port
from vmm_etcd.journal import EtcdJournal
from vmm_etcd.kv import EtcdKV
from vmm_etcd.store import EtcdNvaStore
from vmm_orchestrator.errors import ConfigError, TransientError
from vmm_orchestrator.journal import Journal
from vmm_orchestrator.nva.client import NvaClient
from vmm_orchestrator.nva.errors import Conflict, Gone, NotFound, NvaError, Unavailable
from vmm_orchestrator.nva.server import NvaServer
from vmm_orchestrator.nva.store import NvaStore
from vmm_orchestrator.options import new_conf

UNIT = Path(__file__).resolve().parents[1] / "unit"


def _load(name: str) -> ModuleType:
    """A unit-test module by path (tests/unit is not a package)."""
    spec = importlib.util.spec_from_file_location(f"etcd_shared_{name}", UNIT / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


semantics = _load("test_nva_store")
rules = _load("test_nva_rules")
journal_tests = _load("test_journal_recovery")

#: Scenarios of tests/unit/test_nva_store.py that poke at SQLite itself or build their
#: own NvaStore; each has an etcd counterpart below.
_STORE_ONLY = {
    "test_prestage_rechecks_duplicate_addresses",
    "test_state_survives_reopen",
    "test_errors_are_vmm_errors_and_unavailable_is_transient",
}
for _name in dir(semantics):
    if _name.startswith("test_") and _name not in _STORE_ONLY:
        globals()[_name] = getattr(semantics, _name)

# The shared rules (validation, NVE membership, move-flap freeze, sticky MACs, pruning).
for _name in dir(rules):
    if _name.startswith("test_"):
        globals()[f"{_name}_rule"] = getattr(rules, _name)

# The journal scenarios that take the `journal` fixture run against EtcdJournal too.
for _name in (
    "test_journal_records_a_migration_and_its_stages",
    "test_a_restarted_stage_keeps_its_checkpoint_and_loses_its_outcome",
    "test_unfinished_lists_running_migrations_only",
    "test_the_journal_is_safe_to_use_from_several_threads",
):
    globals()[f"{_name}_on_both_journals"] = getattr(journal_tests, _name)

VNI, OTHER_VNI = semantics.VNI, semantics.OTHER_VNI
MAC, MAC2 = semantics.MAC, semantics.MAC2


@pytest.fixture(scope="module")
def etcd() -> Iterator[LocalEtcdCluster]:
    with LocalEtcdCluster(1) as cluster:
        yield cluster


def new_prefix() -> str:
    return f"/test-{secrets.token_hex(4)}/"


def etcd_store(cluster: LocalEtcdCluster, prefix: str | None = None, **kw: Any) -> EtcdNvaStore:
    return EtcdNvaStore(EtcdKV(cluster.endpoints), prefix or new_prefix(), **kw)


def _populate(s: Any) -> None:
    s.register_nve("host-a", "192.0.2.1", [VNI, OTHER_VNI])
    s.register_nve("host-b", "192.0.2.2", [VNI])
    s.register_nve("host-c", "192.0.2.3", [OTHER_VNI])


@pytest.fixture(params=["embedded", "etcd"])
def store(request: pytest.FixtureRequest, etcd: LocalEtcdCluster) -> Iterator[Any]:
    """The same three NVEs as the unit tests' fixture, in either store."""
    s: Any = NvaStore(":memory:") if request.param == "embedded" else etcd_store(etcd)
    _populate(s)
    yield s
    s.close()


@pytest.fixture(params=["sqlite", "etcd"])
def journal(request: pytest.FixtureRequest, etcd: LocalEtcdCluster) -> Iterator[Any]:
    if request.param == "sqlite":
        j: Any = Journal(":memory:")
    else:
        j = EtcdJournal(EtcdKV(etcd.endpoints), "hv1", new_prefix(), owns_kv=True)
    yield j
    j.close()


@pytest.fixture
def estore(etcd: LocalEtcdCluster) -> Iterator[EtcdNvaStore]:
    s = etcd_store(etcd)
    _populate(s)
    yield s
    s.close()


def test_commit_after_the_target_nve_moved_its_vtep_points_at_the_new_vtep(store: Any) -> None:
    """The etcd store remembers the target's VTEP at prestage to save the commit a read;
    a VTEP that changed in between must still win (as it does in the embedded store)."""
    semantics._add(store)
    store.prestage(VNI, MAC, "host-b", "m1")
    store.register_nve("host-b", "192.0.2.22", [VNI])
    endpoint = store.commit(VNI, MAC, "m1")["endpoint"]
    assert (endpoint["nve"], endpoint["vtep"], endpoint["seq"]) == ("host-b", "192.0.2.22", 1)


# ------------------------------------------------- counterparts of SQLite-only tests


def test_prestage_rechecks_duplicate_addresses(estore: EtcdNvaStore) -> None:
    semantics._add(estore)
    semantics._add(estore, MAC2, "10.0.0.2", "host-b")
    # An address that became duplicate behind the API's back (the address index says so).
    estore.kv.txn(success=[kvmod.put(estore.keys.address(VNI, "10.0.0.1"), MAC2)])
    with pytest.raises(Conflict, match=r"duplicate address.*10\.0\.0\.1 \(held by "):
        estore.prestage(VNI, MAC, "host-b", "m1")
    assert estore.get_endpoint(VNI, MAC)["state"] == "active"


def test_state_survives_reopen(etcd: LocalEtcdCluster) -> None:
    prefix = new_prefix()
    s = etcd_store(etcd, prefix)
    s.register_nve("host-a", "192.0.2.1", [VNI])
    s.register_nve("host-b", "192.0.2.2", [VNI])
    semantics._add(s)
    s.move(VNI, MAC, "host-b")
    revision = s.revision
    s.close()
    reopened = etcd_store(etcd, prefix)
    try:
        assert reopened.revision == revision
        assert reopened.get_endpoint(VNI, MAC)["seq"] == 1
    finally:
        reopened.close()


def test_unreachable_etcd_is_unavailable_and_names_the_endpoints() -> None:
    endpoints = [f"http://127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]
    s = EtcdNvaStore(EtcdKV(endpoints, timeout=0.5), new_prefix())
    with pytest.raises(Unavailable) as info:
        s.get_endpoint(VNI, MAC)
    text = str(info.value)
    assert isinstance(info.value, TransientError)
    assert endpoints[0] in text and endpoints[1] in text and "Connection refused" in text
    assert "etcdctl" in text and "[nva_etcd] endpoints" in text


def test_bad_endpoint_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"invalid etcd endpoint.*\[nva_etcd\] endpoints"):
        EtcdKV(["http://no-port"])
    with pytest.raises(ConfigError, match="no etcd endpoint"):
        EtcdKV([])


# ------------------------------------------------------ shared by several processes


def test_two_stores_racing_never_fork_a_sequence(etcd: LocalEtcdCluster) -> None:
    """Two directory processes (two stores, two write locks) moving the same endpoints:
    etcd's compare-and-swap makes every move apply exactly once, gaplessly numbered."""
    prefix = new_prefix()
    one, two = etcd_store(etcd, prefix), etcd_store(etcd, prefix)
    _populate(one)
    macs = [f"52:54:00:00:02:{i:02x}" for i in range(4)]
    for i, mac in enumerate(macs):
        one.add_endpoint(VNI, mac, [f"10.0.2.{i + 1}"], [], "host-a")
    start = one.revision
    errors: list[BaseException] = []

    def mover(s: EtcdNvaStore, mac: str) -> None:
        try:
            for nve in ("host-b", "host-a", "host-b"):
                s.move(VNI, mac, nve)
        except BaseException as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=mover, args=(s, m)) for s in (one, two) for m in macs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    _, changes = one.changes_since("host-b", start)
    revisions = [c["revision"] for c in changes]
    assert revisions == list(range(start + 1, one.revision + 1))  # no gap, no duplicate
    per_mac = {
        m: [c["endpoint"]["seq"] for c in changes if c["endpoint"]["mac"] == m] for m in macs
    }
    for mac, seqs in per_mac.items():
        assert seqs == list(range(1, len(seqs) + 1)), mac  # every seq once, in order
        assert one.get_endpoint(VNI, mac)["seq"] == len(seqs)
    one.close()
    two.close()


def test_a_transaction_too_big_for_etcd_is_refused_clearly(etcd: LocalEtcdCluster) -> None:
    s = etcd_store(etcd, max_txn_ops=4)
    for i in range(5):
        s.register_nve(f"n{i}", f"192.0.2.{i + 1}", [VNI])
    s.add_endpoint(VNI, MAC, ["10.0.0.1"], [], "n0")
    revision = s.revision
    with pytest.raises(NvaError, match=r"max_txn_ops \(4\)"):
        s.expire(VNI, MAC, [f"n{i}" for i in range(5)])
    assert s.revision == revision
    s.close()


def test_nva_server_serves_the_etcd_store(etcd: LocalEtcdCluster) -> None:
    """`vmm nva serve` on etcd: HTTP clients see the same API and long-polls."""
    store = etcd_store(etcd)
    token = secrets.token_urlsafe(8)
    server = NvaServer(store, token, "127.0.0.1", 0)  # type: ignore[arg-type]
    server.start()
    try:
        client = NvaClient(server.url, token)
        _populate(client)
        client.add_endpoint(VNI, MAC, ["10.0.0.1"], [], "host-a")
        since = client.health()["revision"]
        later = threading.Timer(0.1, store.move, args=(VNI, MAC, "host-b"))
        later.start()
        revision, changes = client.watch("host-b", since, timeout=5.0)
        later.join()
        assert [c["endpoint"]["nve"] for c in changes] == ["host-b"]
        client.ack("host-b", revision)
        assert client.acks(VNI, revision, nves=["host-b"])["host-b"]["acked_revision"] == revision
        with pytest.raises(Conflict, match="stale sequence"):
            client.move(VNI, MAC, "host-a", seq=1)
    finally:
        server.stop()
        store.close()


# ------------------------------------------------------------- the agents' client


@pytest.fixture
def pair(etcd: LocalEtcdCluster) -> Iterator[tuple[EtcdNvaStore, EtcdNvaClient]]:
    prefix = new_prefix()
    orchestrator = etcd_store(etcd, prefix)
    _populate(orchestrator)
    agent = EtcdNvaClient(EtcdKV(etcd.endpoints), prefix)
    yield orchestrator, agent
    agent.close()
    orchestrator.close()


def _later(delay: float, fn: Callable[..., object], *args: object) -> threading.Timer:
    timer = threading.Timer(delay, fn, args=args)
    timer.start()
    return timer


def test_client_watch_streams_its_vns_changes_only(
    pair: tuple[EtcdNvaStore, EtcdNvaClient],
) -> None:
    orchestrator, agent = pair
    start = orchestrator.revision  # after the NVE registrations
    orchestrator.add_endpoint(VNI, MAC, ["10.0.0.1"], [], "host-a")
    revision, changes = agent.watch("host-b", start, timeout=0)
    assert [c["revision"] - start for c in changes] == [1] and revision == start + 1
    # The watch is now a live etcd stream: a change in another VN moves nothing...
    orchestrator.add_endpoint(OTHER_VNI, MAC2, ["10.1.0.2"], [], "host-c")
    assert agent.watch("host-b", revision, timeout=0.3) == (revision, [])
    # ...a change in ours arrives as soon as it commits, and so does an expire aimed at us.
    timer = _later(0.1, orchestrator.move, VNI, MAC, "host-b")
    started = time.monotonic()
    revision, changes = agent.watch("host-b", revision, timeout=5.0)
    timer.join()
    assert time.monotonic() - started < 1.0
    assert [(c["kind"], c["endpoint"]["nve"], c["endpoint"]["seq"]) for c in changes] == [
        ("endpoint", "host-b", 1)
    ]
    orchestrator.expire(VNI, MAC, ["host-a"])
    orchestrator.expire(VNI, MAC, ["host-b"])
    revision, changes = agent.watch("host-b", revision, timeout=5.0)
    if not changes:  # the two expires may come as two batches
        revision, changes = agent.watch("host-b", revision, timeout=5.0)
    assert [(c["kind"], c["target_nve"]) for c in changes] == [("expire", "host-b")]
    assert revision == orchestrator.revision
    # A resync (since earlier than where the stream is) reads the log again.
    _, again = agent.watch("host-b", start, timeout=0)
    assert [c["revision"] - start for c in again] == [1, 3, 5]


def test_client_watch_reports_a_broken_stream_then_recovers(
    pair: tuple[EtcdNvaStore, EtcdNvaClient],
) -> None:
    orchestrator, agent = pair
    revision, _ = agent.watch("host-b", 0, timeout=0)
    # Cut the stream's connection, as when the member serving it dies.
    stream = agent._subs["host-b"].stream
    with socket.socket(fileno=os.dup(stream._resp.raw.fileno())) as sock:
        sock.shutdown(socket.SHUT_RDWR)
    with pytest.raises(Unavailable):
        agent.watch("host-b", revision, timeout=1.0)
    orchestrator.add_endpoint(VNI, MAC, ["10.0.0.1"], [], "host-a")
    revision, changes = agent.watch("host-b", revision, timeout=1.0)
    assert [c["endpoint"]["mac"] for c in changes] == [MAC]


def test_client_watch_of_an_nve_without_vns_waits(
    pair: tuple[EtcdNvaStore, EtcdNvaClient],
) -> None:
    orchestrator, agent = pair
    orchestrator.register_nve("idle", "192.0.2.9", [])
    start = orchestrator.revision  # an NVE without VNs records no change
    started = time.monotonic()
    assert agent.watch("idle", start, timeout=0.3) == (start, [])
    assert time.monotonic() - started >= 0.25  # a long-poll, not a busy loop


def test_client_watch_errors_match_the_store(pair: tuple[EtcdNvaStore, EtcdNvaClient]) -> None:
    _, agent = pair
    with pytest.raises(NotFound):
        agent.watch("nowhere", 0)
    with pytest.raises(Conflict, match="ahead of the directory"):
        agent.watch("host-a", 99)


def test_backend_builds_clients_from_the_config(etcd: LocalEtcdCluster) -> None:
    conf = new_conf()
    conf.set_override("endpoints", etcd.endpoints, group="nva_etcd")
    conf.set_override("prefix", new_prefix(), group="nva_etcd")
    # Found the way the core finds every directory backend: by entry point.
    backend: Any = driver.DriverManager("vmm_orchestrator.nva_backends", "etcd").driver
    assert backend is EtcdBackend
    with backend.from_conf(conf) as client:
        _populate(client)
        assert [n["id"] for n in client.list_nves(VNI)] == ["host-a", "host-b"]
        assert client.health()["revision"] == 4  # host-a joined two VNs, host-b and -c one
    store = backend.store_from_conf(conf)
    assert [n["id"] for n in store.list_nves(OTHER_VNI)] == ["host-a", "host-c"]
    store.close()
    conf.set_override("endpoints", ["ftp://x:1"], group="nva_etcd")
    with pytest.raises(ConfigError, match="invalid etcd endpoint"):
        backend.store_from_conf(conf)


def test_pruning_deletes_old_changes_of_every_vn_from_etcd(estore: EtcdNvaStore) -> None:
    estore.keep_changes = 10
    estore.add_endpoint(OTHER_VNI, MAC2, [], [], "host-c")
    estore.register_nve("host-c", "192.0.2.3", [])  # nobody serves OTHER_VNI's log any more
    estore.register_nve("host-a", "192.0.2.1", [VNI])
    semantics._add(estore)
    for _ in range(30):
        estore.expire(VNI, MAC, ["host-a"])
    floor = estore.pruned_revision
    assert floor >= estore.revision - 11
    log = estore.kv.read(kvmod.get_prefix(estore.keys.changes)).kvs(0)
    revisions = sorted(int(item.key.rsplit("/", 1)[1]) for item in log)
    assert revisions and revisions[0] > floor  # both VNs' old changes are gone
    assert len(revisions) == estore.revision - floor


def test_client_watch_behind_the_pruned_log_is_gone(
    pair: tuple[EtcdNvaStore, EtcdNvaClient],
) -> None:
    """A live etcd stream never falls behind; an agent that comes back with an old
    revision after the log was pruned is told to re-sync, and can."""
    orchestrator, agent = pair
    orchestrator.keep_changes = 10
    orchestrator.add_endpoint(VNI, MAC, ["10.0.0.1"], [], "host-a")
    old, _ = agent.watch("host-b", 0, timeout=0)
    for _ in range(20):
        orchestrator.expire(VNI, MAC, ["host-b"])
    revision, changes = agent.watch("host-b", old, timeout=2.0)  # the live stream...
    while revision < orchestrator.revision:
        revision, more = agent.watch("host-b", revision, timeout=2.0)
        changes += more
    assert len(changes) == 20  # ...lost nothing to the pruning
    with pytest.raises(Gone, match="no longer in the change log"):
        agent.watch("host-b", old, timeout=0)  # back from an old revision: re-sync
    revision, endpoints = agent.snapshot(VNI)
    assert [e["mac"] for e in endpoints] == [MAC] and revision == orchestrator.revision
    assert agent.watch("host-b", revision, timeout=0) == (revision, [])
    orchestrator.move(VNI, MAC, "host-b")
    revision, changes = agent.watch("host-b", revision, timeout=2.0)
    assert [c["endpoint"]["nve"] for c in changes] == ["host-b"]
