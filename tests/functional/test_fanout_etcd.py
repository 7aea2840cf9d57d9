"""Batched acks on the etcd directory (issue 16 item 3), against a real etcd."""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator

import pytest

from vmm_etcd.client import EtcdNvaClient
from vmm_etcd.cluster import LocalEtcdCluster
from vmm_etcd.kv import EtcdKV

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
