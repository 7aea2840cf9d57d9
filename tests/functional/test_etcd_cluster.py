"""A three-member etcd cluster loses its leader in the middle of a migration
(between pre-stage and commit): the commit still happens, every NVE agent
applies and acknowledges it, and nothing is lost from the change log, not
even on the member that was down once it comes back.

The NVE agents are the real ``vmm_linux`` agents talking to etcd directly
(their kernel side is a recorder: this test is about the directory).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from typing import Any

import pytest

from vmm_etcd import kv as kvmod
from vmm_etcd.client import EtcdNvaClient
from vmm_etcd.cluster import LocalEtcdCluster
from vmm_etcd.kv import EtcdKV
from vmm_etcd.store import EtcdNvaStore
from vmm_linux.agent import NveAgent

VNI = 800
MAC = "52:54:00:80:00:01"
NVES = {"a": "192.0.2.11", "b": "192.0.2.12", "c": "192.0.2.13"}


class RecordingNve:
    """The kernel side of an NVE, reduced to what the agent tells it."""

    def __init__(self, vtep: str) -> None:
        self.local_vtep = vtep
        self.remote: dict[tuple[int, str], str] = {}

    def ensure_vn(self, vni: int) -> None:
        pass

    def set_flood_list(self, vni: int, vteps: list[str]) -> None:
        pass

    def set_remote(self, vni: int, mac: str, vtep: str, ips: tuple[str, ...] = ()) -> None:
        self.remote[(vni, mac)] = vtep

    def clear_remote(self, vni: int, mac: str) -> None:
        self.remote.pop((vni, mac), None)

    def forget(self, vni: int, mac: str) -> None:
        self.remote.pop((vni, mac), None)

    def inflight(self, vni: int, mac: str) -> str | None:
        return None


@pytest.fixture
def cluster() -> Iterator[LocalEtcdCluster]:
    with LocalEtcdCluster(3) as running:
        yield running


def wait_for(condition: Any, timeout: float, what: str) -> float:
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"{what} not reached within {timeout}s")
        time.sleep(0.02)
    return time.monotonic() - start


def test_losing_the_leader_between_prestage_and_commit_loses_nothing(
    cluster: LocalEtcdCluster,
) -> None:
    prefix = f"/cluster-{secrets.token_hex(4)}/"
    leader = cluster.leader()
    others = [m.client_url for m in cluster.members if m is not leader]
    # The orchestrator talks to the leader first; each agent to a different member.
    orchestrator = EtcdNvaStore(EtcdKV([leader.client_url, *others], timeout=3.0), prefix)
    agents: dict[str, NveAgent] = {}
    clients = []
    try:
        for i, (name, vtep) in enumerate(NVES.items()):
            order = cluster.endpoints[i:] + cluster.endpoints[:i]
            client = EtcdNvaClient(EtcdKV(order, timeout=3.0), prefix)
            clients.append(client)
            agents[name] = NveAgent(
                name,
                RecordingNve(vtep),  # type: ignore[arg-type]
                client,
                [VNI],
                watch_timeout=0.5,
                retry_interval=0.1,
                local_learning=False,
            )
            agents[name].start()
        start = orchestrator.revision  # the NVEs' registrations are changes too
        orchestrator.add_endpoint(VNI, MAC, ["10.80.0.1"], [], "a")
        wait_for(lambda: all(a.placement.get((VNI, MAC)) == "a" for a in agents.values()), 5, "a")
        orchestrator.prestage(VNI, MAC, "b", "m1")

        cluster.stop(leader)  # kill -9, in the middle of the migration

        started = time.monotonic()
        result = orchestrator.commit(VNI, MAC, "m1")
        commit_s = time.monotonic() - started
        endpoint = result["endpoint"]
        assert (endpoint["nve"], endpoint["seq"], endpoint["state"]) == ("b", 1, "active")
        assert result["revision"] == start + 2
        assert orchestrator.commit(VNI, MAC, "m1") == result  # a retried commit: same answer

        applied_s = wait_for(
            lambda: all(a.placement.get((VNI, MAC)) == "b" for a in agents.values()),
            10,
            "every agent applying the commit",
        )
        acks = orchestrator.acks(VNI, result["revision"], timeout=10.0)
        acked = {n: a["acked_revision"] >= start + 2 for n, a in acks.items()}
        assert acked == dict.fromkeys(NVES, True)
        # The agent whose watch ran on the dead member noticed, resynced elsewhere.
        watcher_of_leader = list(NVES)[cluster.endpoints.index(leader.client_url)]
        assert agents[watcher_of_leader].errors >= 1
        for name, agent in agents.items():
            assert agent.applied[(VNI, MAC)] == 1, name
            expected = None if name == "b" else NVES["b"]
            assert agent.nve.remote.get((VNI, MAC)) == expected, name  # type: ignore[attr-defined]

        # Nothing lost: the change log is complete and gapless, the move recorded once.
        _, changes = orchestrator.changes_since("c", start)
        moves = [c for c in changes if "endpoint" in c]
        seen = [(c["revision"] - start, c["endpoint"]["nve"], c["endpoint"]["seq"]) for c in moves]
        assert seen == [
            (1, "a", 0),
            (2, "b", 1),
        ]
        # The member that was down catches up with everything once it is back.
        cluster.restart(leader)
        back = EtcdKV([leader.client_url])
        try:
            log = back.read(kvmod.get_prefix(orchestrator.keys.changes)).kvs(0)
            assert len(log) == start + 2
            counter = back.read(kvmod.get(orchestrator.keys.revision)).one(0)
            assert counter is not None and int(counter.value) == start + 2
        finally:
            back.close()
        print(
            f"\ncommit with the leader down took {commit_s * 1000:.0f} ms; "
            f"all agents applied it {applied_s * 1000:.0f} ms later"
        )
    finally:
        for agent in agents.values():
            agent.stop()
        for client in clients:
            client.close()
        orchestrator.close()
