"""`vmm nva serve` in front of etcd streams the directory to NVE agents (issue 16 item 3).

Against a real etcd (Debian's etcd-server, started on loopback by
LocalEtcdCluster): two servers over one etcd prefix, each holding one etcd
watch on the change log and one stream per NVE agent. A move committed in
etcd by anyone (an orchestrator writing to etcd directly, or through either
server) reaches the real NveAgents on both servers within a bound, and their
acks, sent on the streams, land in etcd.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from vmm_etcd.backends import EtcdServedBackend
from vmm_etcd.client import EtcdNvaClient
from vmm_etcd.cluster import LocalEtcdCluster
from vmm_etcd.kv import EtcdKV
from vmm_etcd.store import EtcdNvaStore
from vmm_linux.agent import NveAgent
from vmm_orchestrator.nva.client import NvaClient
from vmm_orchestrator.nva.server import NvaServer
from vmm_orchestrator.options import new_conf

VNI = 6001
MAC = "52:54:00:60:01:01"
TOKEN = secrets.token_urlsafe(8)
#: A move reaches every agent within this (measured: a few ms; the bound leaves room
#: for a loaded 2-core machine, and is far below the agents' 25 s watch timeout).
BOUND_S = 1.0


class RecordingNve:
    """An NVE that records where each MAC was programmed, and when."""

    def __init__(self, vtep: str) -> None:
        self.local_vtep = vtep
        self.at: dict[str, tuple[str, float]] = {}
        self.changed = threading.Condition()

    def ensure_vn(self, vni: int) -> None:
        pass

    def set_flood_list(self, vni: int, vteps: list[str]) -> None:
        pass

    def set_remote(self, vni: int, mac: str, vtep: str, ips: tuple[str, ...] = ()) -> None:
        with self.changed:
            self.at[mac] = (vtep, time.monotonic())
            self.changed.notify_all()

    def clear_remote(self, vni: int, mac: str) -> None:
        pass

    def forget(self, vni: int, mac: str) -> None:
        pass

    def inflight(self, vni: int, mac: str) -> str | None:
        return None

    def wait_for(self, mac: str, vtep: str, timeout: float) -> float | None:
        """Monotonic time ``mac`` was programmed at ``vtep``, waiting up to ``timeout``."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while self.at.get(mac, ("", 0.0))[0] != vtep:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self.changed.wait(remaining)
            return self.at[mac][1]

    def close(self) -> None:
        pass


@pytest.fixture(scope="module")
def etcd() -> Iterator[LocalEtcdCluster]:
    with LocalEtcdCluster(1) as cluster:
        yield cluster


@pytest.fixture
def site(etcd: LocalEtcdCluster) -> Iterator[dict[str, Any]]:
    """Two servers over one etcd prefix, an admin writing to etcd directly, 4 agents."""
    prefix = f"/stream-{secrets.token_hex(4)}/"
    admin = EtcdNvaClient(EtcdKV(etcd.endpoints), prefix)
    stores = [EtcdNvaStore(EtcdKV(etcd.endpoints), prefix) for _ in range(2)]
    servers = [NvaServer(store, TOKEN, "127.0.0.1", 0) for store in stores]
    clients: list[NvaClient] = []
    agents: list[NveAgent] = []
    nves: dict[str, RecordingNve] = {}
    try:
        for name, vtep in (("src", "192.0.2.1"), ("dst", "192.0.2.2")):
            admin.register_nve(name, vtep, [VNI])
        admin.add_endpoint(VNI, MAC, ["198.19.60.1"], [], "src")
        for server in servers:
            server.start()
        for i in range(4):
            client = NvaClient(servers[i % 2].url, TOKEN)  # two agents per server
            clients.append(client)
            nves[f"peer{i}"] = RecordingNve(f"192.0.2.{10 + i}")
            agent = NveAgent(
                f"peer{i}",
                nves[f"peer{i}"],  # type: ignore[arg-type]
                client,
                [VNI],
                watch_timeout=25.0,
                retry_interval=0.1,
                local_learning=False,
            )
            agent.start()
            agents.append(agent)
        deadline = time.monotonic() + 10
        while sum(c.open_streams for c in clients) < 4:  # every agent is streaming
            assert time.monotonic() < deadline, "the agents did not open their streams"
            time.sleep(0.02)
        yield {
            "admin": admin,
            "servers": servers,
            "stores": stores,
            "clients": clients,
            "agents": agents,
            "nves": nves,
        }
    finally:
        for agent in agents:
            agent._stop.set()
        for client in clients:
            client.close()  # ends the streams: the agents' watches return at once
        for agent in agents:
            agent.stop()
        for server in servers:
            server.stop()
        for store in stores:
            store.close()
        admin.close()


def _move(writer: Any, target: str, migration_id: str) -> tuple[int, float]:
    writer.prestage(VNI, MAC, target, migration_id)
    t0 = time.monotonic()
    return int(writer.commit(VNI, MAC, migration_id)["revision"]), t0


def _acked(admin: EtcdNvaClient, revision: int, nves: list[str]) -> bool:
    acks = admin.acks(VNI, revision, nves=nves, timeout=BOUND_S * 5)
    return all(a["acked_revision"] >= revision for a in acks.values())


def test_a_move_committed_in_etcd_reaches_agents_on_both_servers_and_is_acked(
    site: dict[str, Any],
) -> None:
    admin, nves = site["admin"], site["nves"]
    revision, t0 = _move(admin, "dst", "m-etcd")  # written to etcd directly
    for name, nve in nves.items():
        at = nve.wait_for(MAC, "192.0.2.2", BOUND_S)
        assert at is not None, f"{name} did not apply the move within {BOUND_S} s"
        assert at - t0 < BOUND_S
    assert _acked(admin, revision, list(nves)), "the agents' stream acks did not reach etcd"
    # Every server watches etcd once, whatever the number of agents it streams to.
    for server, store in zip(site["servers"], site["stores"], strict=True):
        assert store.feed is not None and server._api.hub.streams == 2


def test_a_move_written_through_one_server_reaches_the_other_servers_agents(
    site: dict[str, Any],
) -> None:
    admin, nves, servers = site["admin"], site["nves"], site["servers"]
    with NvaClient(servers[1].url, TOKEN) as through:
        revision, _ = _move(through, "dst", "m-b")
    for name in ("peer0", "peer2"):  # the agents of servers[0]
        assert nves[name].wait_for(MAC, "192.0.2.2", BOUND_S) is not None, name
    assert _acked(admin, revision, list(nves))
    with NvaClient(servers[0].url, TOKEN) as through:
        revision, _ = _move(through, "src", "m-a")
    for name in ("peer1", "peer3"):  # and back, through the other server
        assert nves[name].wait_for(MAC, "192.0.2.1", BOUND_S) is not None, name
    assert _acked(admin, revision, list(nves))
    assert all(agent.errors == 0 for agent in site["agents"])


def test_an_agent_moved_to_the_other_server_catches_up_from_etcd(
    site: dict[str, Any],
) -> None:
    admin, servers = site["admin"], site["servers"]
    since = admin.revision
    revision, _ = _move(admin, "dst", "m-gap")
    admin.add_endpoint(VNI, "52:54:00:60:01:02", [], [], "src")
    with NvaClient(servers[1].url, TOKEN) as other:  # an NVE that followed servers[0]
        got, changes = other.watch("peer0", since, timeout=BOUND_S)
        macs = [c["endpoint"]["mac"] for c in changes if c["kind"] == "endpoint"]
        assert macs == [MAC, "52:54:00:60:01:02"] and got == admin.revision > revision


def test_a_compacted_feed_restarts_the_streams_and_agents_recover(
    site: dict[str, Any],
) -> None:
    admin, stores, nves, agents = site["admin"], site["stores"], site["nves"], site["agents"]
    feed = stores[0].feed
    assert feed is not None
    admin.prestage(VNI, MAC, "dst", "m-compact")  # moves etcd's revision, records no change
    current = admin.kv.read(what="read the etcd revision").revision
    admin.kv.call("/kv/compaction", {"revision": current, "physical": True}, "compact")
    stream = feed._stream
    assert stream is not None
    stream.close()  # as if the member went away: the feed watches again, from before
    deadline = time.monotonic() + 5
    while feed.gaps == 0:
        assert time.monotonic() < deadline, "the feed did not notice the compaction"
        time.sleep(0.02)
    # servers[0] ended its streams (peer0, peer2); their agents reconnect and catch up.
    deadline = time.monotonic() + 5
    while not (agents[0].errors and agents[2].errors):
        assert time.monotonic() < deadline, "the streams of servers[0] were not restarted"
        time.sleep(0.02)
    assert agents[1].errors == agents[3].errors == 0  # servers[1]'s feed saw no gap
    revision, _ = _move(admin, "dst", "m-compact")
    for name, nve in nves.items():
        assert nve.wait_for(MAC, "192.0.2.2", BOUND_S * 3) is not None, name
    assert _acked(admin, revision, list(nves))
    deadline = time.monotonic() + 5
    while sum(c.open_streams for c in site["clients"]) < 4:
        assert time.monotonic() < deadline, "the agents did not stream again"
        time.sleep(0.02)


def test_the_served_backend_gives_agents_the_http_client_and_the_server_a_feed(
    etcd: LocalEtcdCluster,
) -> None:
    conf = new_conf()
    conf.set_override("endpoints", etcd.endpoints, group="nva_etcd")
    conf.set_override("prefix", f"/stream-{secrets.token_hex(4)}/", group="nva_etcd")
    conf.set_override("token", TOKEN, group="nva")
    conf.set_override("bind_port", 0, group="nva")
    store = EtcdServedBackend.store_from_conf(conf)
    server = NvaServer.from_conf(conf, store=store)
    server.start()
    try:
        conf.set_override("url", server.url, group="nva")
        with EtcdServedBackend.from_conf(conf) as client:
            assert isinstance(client, NvaClient)
            client.register_nve("peer0", "192.0.2.10", [VNI])
            since = client.health()["revision"]
            client.register_nve("src", "192.0.2.1", [VNI])
            client.add_endpoint(VNI, MAC, [], [], "src")
            revision, changes = client.watch("peer0", since, timeout=BOUND_S)
            if not any(c["kind"] == "endpoint" for c in changes):
                revision, more = client.watch("peer0", revision, timeout=BOUND_S)
                changes += more
            assert [c["endpoint"]["mac"] for c in changes if c["kind"] == "endpoint"] == [MAC]
            assert client.open_streams == 1 and store.feed is not None  # streamed, from etcd
    finally:
        server.stop()
        store.close()
