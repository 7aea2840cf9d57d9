"""Batched acks on the etcd directory (issue 16 item 3), against a real etcd."""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from vmm_etcd import acklog
from vmm_etcd import kv as kvmod
from vmm_etcd.acklog import COMPACT_EVERY, FOLD_KEYS
from vmm_etcd.client import EtcdNvaClient
from vmm_etcd.cluster import LocalEtcdCluster
from vmm_etcd.kv import EtcdKV
from vmm_orchestrator.nva.errors import NotFound

VNI = 5001


@pytest.fixture(scope="module")
def etcd() -> Iterator[LocalEtcdCluster]:
    with LocalEtcdCluster(1) as cluster:
        yield cluster


@pytest.fixture
def client(etcd: LocalEtcdCluster) -> Iterator[EtcdNvaClient]:
    with EtcdNvaClient(EtcdKV(etcd.endpoints), f"/test-{secrets.token_hex(4)}/") as c:
        for i in range(70):  # more than one transaction's worth (max_txn_ops 128)
            c.register_nve(f"nve{i:02d}", f"192.0.2.{i + 1}", [VNI])
        c.add_endpoint(VNI, "52:54:00:00:00:01", [], [], "nve00")
        yield c


def test_acks_from_many_nves_are_written_in_batches(client: EtcdNvaClient) -> None:
    revision = client.revision
    calls: list[int] = []
    record = client.record_acks

    def counting(acks: dict[str, int]) -> dict[str, str]:
        calls.append(len(acks))
        return record(acks)

    client.record_acks = counting  # type: ignore[method-assign]
    for i in range(70):
        client.ack_async(f"nve{i:02d}", revision)
    deadline = time.monotonic() + 10
    nves = [f"nve{i:02d}" for i in range(70)]
    while True:
        acks = client.acks(VNI, revision, nves=nves)
        if all(a["acked_revision"] == revision for a in acks.values()):
            break
        assert time.monotonic() < deadline, "the queued acks were not written"
        time.sleep(0.02)
    assert sum(calls) == 70 and len(calls) < 70  # group commit: fewer writes than acks


def test_a_batch_with_a_refused_ack_still_writes_the_others(client: EtcdNvaClient) -> None:
    revision = client.revision
    errors = client.record_acks({"nve01": revision, "ghost": revision, "nve02": revision + 9})
    assert set(errors) == {"ghost", "nve02"}
    assert client.get_nve("nve01")["acked_revision"] == revision
    assert client.record_acks({"nve01": revision - 1}) == {}  # never backwards, no error
    assert client.get_nve("nve01")["acked_revision"] == revision
    result = client.ack_many({"nve03": revision})
    assert result["acked"]["nve03"]["acked_revision"] == revision and not result["errors"]


# ------------------------------------------------------------- the ack log


def _log_keys(client: EtcdNvaClient) -> list[str]:
    answer = client.kv.read(kvmod.get_prefix(client.keys.ack_log), what="test")
    return [item.key for item in answer.kvs(0)]


def _own_key(client: EtcdNvaClient, nve: str) -> int | None:
    """The revision in the NVE's own ack key (None: no such key)."""
    found = client.kv.read(kvmod.get(client.keys.ack(nve)), what="test").one(0)
    return None if found is None else int(found.value.partition("|")[0])


def test_a_batch_of_acks_is_one_key_and_every_reader_sees_it(client: EtcdNvaClient) -> None:
    revision = client.revision
    nves = [f"nve{i:02d}" for i in range(70)]
    assert client.record_acks(dict.fromkeys(nves, revision)) == {}
    assert len(_log_keys(client)) == 1  # not 70 puts
    assert _own_key(client, "nve05") is None  # neither registration nor the batch wrote one
    assert client.get_nve("nve05")["acked_revision"] == revision
    listed = {n["id"]: n for n in client.list_nves(VNI)}
    assert all(listed[n]["acked_revision"] == revision for n in nves)
    acks = client.acks(VNI, revision, nves=nves)
    assert all(a["acked_revision"] == revision and a["acked_at"] for a in acks.values())


def test_the_own_key_of_an_nve_still_counts_beside_the_log(client: EtcdNvaClient) -> None:
    """Older agents ack one by one (acks/<nve>): readers take the higher of both."""
    first = client.revision
    client.add_endpoint(VNI, "52:54:00:00:00:02", [], [], "nve00")
    second = client.revision
    client.record_acks({"nve01": first, "nve02": second})
    client.ack("nve01", second)  # the single ack: its own key, above the log
    assert _own_key(client, "nve01") == second
    assert client.get_nve("nve01")["acked_revision"] == second
    assert client.ack("nve02", first)["acked_revision"] == second  # the log's, not lower
    assert client.acks(VNI, second, nves=["nve01", "nve02"]) == {
        "nve01": client.acks(VNI, second, nves=["nve01"])["nve01"],
        "nve02": client.acks(VNI, second, nves=["nve02"])["nve02"],
    }
    assert all(
        a["acked_revision"] == second
        for a in client.acks(VNI, second, nves=["nve01", "nve02"]).values()
    )


def test_a_registered_again_nve_does_not_inherit_logged_acks(
    client: EtcdNvaClient, etcd: LocalEtcdCluster
) -> None:
    revision = client.revision
    client.record_acks({"nve03": revision, "nve04": revision})
    other = EtcdNvaClient(EtcdKV(etcd.endpoints), client.keys.prefix)
    try:  # another process deletes and registers nve03 again behind the writer's back
        other.delete_nve("nve03")
        other.register_nve("nve03", "192.0.2.4", [VNI])
        assert client.get_nve("nve03")["acked_revision"] == 0
        assert client.get_nve("nve04")["acked_revision"] == revision
        # The writer's epochs are stale; the batch is still written, with the new epoch.
        later = client.revision
        assert client.record_acks({"nve03": later}) == {}
        assert other.get_nve("nve03")["acked_revision"] == later
    finally:
        other.close()


def test_waiting_for_acks_wakes_on_a_logged_batch(client: EtcdNvaClient) -> None:
    revision = client.revision
    nves = ["nve10", "nve11"]
    timer = threading.Timer(0.2, client.record_acks, args=(dict.fromkeys(nves, revision),))
    timer.start()
    started = time.monotonic()
    try:
        acks = client.acks(VNI, revision, nves=nves, timeout=5.0)
    finally:
        timer.join()
    assert all(a["acked_revision"] == revision for a in acks.values())
    assert time.monotonic() - started < 4.0  # woken by the watch, not the timeout


def test_the_log_is_folded_and_keeps_every_current_ack(client: EtcdNvaClient) -> None:
    revision = client.revision
    client.record_acks({"nve69": revision})  # then deleted: its entry must go
    client.delete_nve("nve69")
    acked = [f"nve{i:02d}" for i in range(COMPACT_EVERY - 2)]
    for nve in acked:  # batches of one NVE each: many keys
        client.record_acks({nve: revision})
    assert len(_log_keys(client)) == COMPACT_EVERY - 1
    client.record_acks({"nve60": revision})  # the batch that makes it fold
    keys = _log_keys(client)
    assert len(keys) == 1, keys
    value = client.kv.read(kvmod.get(keys[0]), what="test").one(0)
    assert value is not None
    folded = {n for n, *_ in acklog.entries(value.value)}
    assert "nve69" not in folded and "nve60" in folded
    listed = {n["id"]: n["acked_revision"] for n in client.list_nves(VNI)}
    assert all(listed[n] == revision for n in [*acked, "nve60"])
    assert listed["nve61"] == 0


def _ranges_read(client: EtcdNvaClient, index: int) -> list[int | None]:
    """Keys each wait for acks gets back in its range at ``index`` (None when the compare
    of the cached generations held and the range was not read at all)."""
    returned: list[int | None] = []
    txn = client.kv.txn

    def counting(
        compare: Any = (), success: Any = (), failure: Any = (), what: str = ""
    ) -> kvmod.TxnResult:
        answer = txn(compare, success, failure, what)
        if what == "read the acks":
            cached = bool(compare) and answer.succeeded
            returned.append(None if cached else len(answer.kvs(index)))
        return answer

    client.kv.txn = counting  # type: ignore[method-assign]
    return returned


def test_waiting_for_acks_reads_only_the_records_written_since_and_sees_deletes(
    client: EtcdNvaClient, etcd: LocalEtcdCluster
) -> None:
    revision = client.revision
    assert len(client.acks(VNI, 0)) == 70  # fills the cache: every record
    reads = _ranges_read(client, 3)  # the records' range
    assert len(client.acks(VNI, 0)) == 70
    assert reads == [None]  # no record written since: the range not even read
    other = EtcdNvaClient(EtcdKV(etcd.endpoints), client.keys.prefix)
    try:
        other.register_nve("late", "192.0.2.200", [VNI])
        other.register_nve("nve00", "192.0.2.1", [VNI + 1])  # rewritten: leaves the VN
        acks = client.acks(VNI, 0)
        assert "late" in acks and "nve00" not in acks and len(acks) == 70
        assert reads[-1] == 2
        other.delete_nve("nve05")  # fewer records than cached: read them all again
        acks = client.acks(VNI, 0)
        assert "nve05" not in acks and len(acks) == 69 and reads[-1] == 70
        with pytest.raises(NotFound):
            client.acks(VNI, revision, nves=["nve05"])
    finally:
        other.close()


def test_a_reader_folds_a_log_that_many_writers_grew(
    client: EtcdNvaClient, etcd: LocalEtcdCluster
) -> None:
    """Agents writing to etcd directly are many writers, each folding only every
    COMPACT_EVERY batches of its own: the reader of acks folds what they left."""
    revision = client.revision
    writers = [EtcdNvaClient(EtcdKV(etcd.endpoints), client.keys.prefix) for _ in range(3)]
    try:
        for i in range(FOLD_KEYS // 3 + 1):
            for w, writer in enumerate(writers):
                writer.record_acks({f"nve{(3 * i + w) % 70:02d}": revision})
    finally:
        for writer in writers:
            writer.close()
    assert len(_log_keys(client)) > FOLD_KEYS
    acks = client.acks(VNI, revision)  # sees them all, and folds in the background
    assert sum(a["acked_revision"] == revision for a in acks.values()) == 66
    deadline = time.monotonic() + 10
    while len(_log_keys(client)) > 2:
        assert time.monotonic() < deadline, "the reader did not fold the log"
        time.sleep(0.05)
    acks = client.acks(VNI, revision)
    assert sum(a["acked_revision"] == revision for a in acks.values()) == 66


def test_reading_an_nves_ack_fetches_only_the_log_keys_written_since(
    client: EtcdNvaClient, etcd: LocalEtcdCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """...and of those only other writers': this process's own keys are known as written."""
    revision = client.revision
    client.record_acks({"nve20": revision, "nve21": revision})
    client.record_acks({"nve22": revision})
    assert client.get_nve("nve21")["acked_revision"] == revision  # reads the whole log
    parsed: list[str] = []
    real = acklog.entries

    def counting(value: str) -> list[tuple[str, int, int, float | None]]:
        found = real(value)
        parsed.extend(n for n, *_ in found)
        return found

    monkeypatch.setattr(acklog, "entries", counting)
    assert client.get_nve("nve22")["acked_revision"] == revision
    assert parsed == []  # nothing new in the log: no value read or parsed
    client.record_acks({"nve23": revision})
    assert client.get_nve("nve23")["acked_revision"] == revision
    assert parsed == []  # its own new key: neither fetched nor parsed again
    with EtcdNvaClient(EtcdKV(etcd.endpoints), client.keys.prefix) as other:
        other.record_acks({"nve24": revision})
    assert client.get_nve("nve24")["acked_revision"] == revision
    assert parsed == ["nve24"]  # only another writer's new key
    assert {n["id"] for n in client.list_nves(VNI) if n["acked_revision"] == revision} == {
        "nve20",
        "nve21",
        "nve22",
        "nve23",
        "nve24",
    }


# ------------------------------------------ waiting for acks this process writes


def _count_watches(client: EtcdNvaClient, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Every etcd watch the client's wait for acks opens: its start revision."""
    opened: list[int] = []
    real = client._watch

    def counting(key: str, start_revision: int, prefix: bool = False) -> Any:
        opened.append(start_revision)
        return real(key, start_revision, prefix)

    monkeypatch.setattr(client, "_watch", counting)
    return opened


def _later(delay: float, action: Any) -> threading.Thread:
    def run() -> None:
        time.sleep(delay)
        action()

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_a_wait_for_acks_this_process_writes_needs_no_etcd_watch(
    client: EtcdNvaClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`vmm nva serve` writes its streams' acks and answers the wait for them."""
    nves = [f"nve{i:02d}" for i in range(70)]
    client.record_acks(dict.fromkeys(nves, client.revision))  # they ack through here
    client.add_endpoint(VNI, "52:54:00:00:00:03", [], [], "nve00")
    revision = client.revision
    opened = _count_watches(client, monkeypatch)
    writer = _later(0.1, lambda: client.record_acks(dict.fromkeys(nves, revision)))
    try:
        acks = client.acks(VNI, revision, nves=nves, timeout=10)
    finally:
        writer.join()
    assert all(a["acked_revision"] == revision and a["acked_at"] for a in acks.values())
    assert opened == []
    # Durable, not only in this process's memory: another process reads the same.
    assert client.kv.read(kvmod.get_prefix(client.keys.ack_log), what="test").kvs(0)


def test_acks_written_elsewhere_still_end_a_wait_that_waited_here_first(
    client: EtcdNvaClient, etcd: LocalEtcdCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vmm_etcd import store

    monkeypatch.setattr(store, "LOCAL_WAIT", 0.2)
    nves = ["nve10", "nve11"]
    client.record_acks(dict.fromkeys(nves, client.revision))
    client.add_endpoint(VNI, "52:54:00:00:00:04", [], [], "nve00")
    revision = client.revision
    opened = _count_watches(client, monkeypatch)
    other = EtcdNvaClient(EtcdKV(etcd.endpoints), client.keys.prefix)
    writer = _later(0.05, lambda: other.record_acks(dict.fromkeys(nves, revision)))
    try:  # the NVEs moved to another server: their acks come from its writer
        acks = client.acks(VNI, revision, nves=nves, timeout=10)
    finally:
        writer.join()
        other.close()
    assert all(a["acked_revision"] == revision for a in acks.values())
    assert len(opened) == 1  # after the local wait, the watch from the read on
    assert not client._local.knows(nves)  # the next wait watches at once


def test_an_ack_written_here_for_an_nve_registered_again_does_not_count(
    client: EtcdNvaClient, etcd: LocalEtcdCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vmm_etcd import store

    monkeypatch.setattr(store, "LOCAL_WAIT", 0.1)
    revision = client.revision
    client.record_acks({"nve12": revision})
    with EtcdNvaClient(EtcdKV(etcd.endpoints), client.keys.prefix) as other:
        other.delete_nve("nve12")  # behind this process's back: its memory has the old epoch
        other.register_nve("nve12", "192.0.2.13", [VNI])
    acks = client.acks(VNI, revision, nves=["nve12"], timeout=0.4)
    assert acks["nve12"]["acked_revision"] == 0


def test_the_wait_for_acks_reads_the_nves_own_ack_keys_only_when_written(
    client: EtcdNvaClient,
) -> None:
    """Agents ack their first sync one by one (acks/<nve>): every NVE may have such a key,
    and reading them all on each move cost etcd ~10 us per NVE."""
    revision = client.revision
    nves = [f"nve{i:02d}" for i in range(30)]
    for nve in nves:
        client.ack(nve, revision)  # the own keys
    returned = _ranges_read(client, 4)  # the own ack keys' range
    assert all(a["acked_revision"] == revision for a in client.acks(VNI, revision, nves).values())
    assert all(a["acked_revision"] == revision for a in client.acks(VNI, revision, nves).values())
    assert returned[-1] is None  # nothing written since: the range not even read
    client.add_endpoint(VNI, "52:54:00:00:00:05", [], [], "nve00")
    later = client.revision
    client.ack("nve07", later)  # a single ack written since: read, and only it
    acks = client.acks(VNI, later, nves)
    assert returned[-1] == 1
    assert acks["nve07"]["acked_revision"] == later and acks["nve08"]["acked_revision"] == revision
    client.delete_nve("nve29")  # a key gone: the cache cannot tell from what was written
    client.ack("nve28", later)
    acks = client.acks(VNI, later, nves[:29])
    assert returned[-1] == 29 and acks["nve28"]["acked_revision"] == later


def test_a_key_removed_without_its_generation_is_noticed_by_the_count(
    client: EtcdNvaClient,
) -> None:
    """A writer that does not rewrite the generation key (an older version): the cached
    read still compares how many keys there are."""
    revision = client.revision
    client.ack("nve03", revision)
    assert client.acks(VNI, revision, ["nve03"])["nve03"]["acked_revision"] == revision
    client.kv.txn([], [kvmod.delete(client.keys.ack("nve03"))], what="test")
    assert client.acks(VNI, revision, ["nve03"])["nve03"]["acked_revision"] == 0


def test_a_process_that_writes_acks_and_never_reads_them_keeps_a_folds_worth(
    client: EtcdNvaClient,
) -> None:
    """Its own keys are remembered as written; a fold of the log forgets those it deleted
    (an agent writing to etcd directly writes a batch per move for as long as it runs)."""
    revision = client.revision
    for i in range(COMPACT_EVERY + 5):
        client.record_acks({f"nve{i % 70:02d}": revision})
    remembered = len(client._log_cache._known)
    assert remembered <= 8, remembered
    acks = client.acks(VNI, revision, [f"nve{i:02d}" for i in range(COMPACT_EVERY + 5)])
    assert all(a["acked_revision"] == revision for a in acks.values())
