"""The directory over HTTP against hostile or broken input, and an NVE agent that
falls behind a pruned change log (issues 13 and 14).

The agent runs here on a stand-in NVE (it records what it was told), so this
needs neither root nor namespaces; the real kernel is in
tests/functional/test_nve_agent_directory.py.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from vmm_linux.agent import NveAgent
from vmm_orchestrator.nva.client import NvaClient
from vmm_orchestrator.nva.errors import BadRequest, Conflict, Gone
from vmm_orchestrator.nva.server import NvaServer, json_depth_over, parse_json_body
from vmm_orchestrator.nva.store import NvaStore

TOKEN = "hardening-token"
VNI = 100
MAC = "52:54:00:00:00:01"
MAC2 = "52:54:00:00:00:02"


@pytest.fixture
def server() -> Iterator[NvaServer]:
    store = NvaStore(":memory:")
    srv = NvaServer(store, TOKEN, "127.0.0.1", 0, watch_max_timeout=2.0)
    srv.start()
    yield srv
    srv.stop()
    store.close()


@pytest.fixture
def client(server: NvaServer) -> Iterator[NvaClient]:
    with NvaClient(server.url, TOKEN, timeout=2.0) as c:
        c.register_nve("host-a", "192.0.2.1", [VNI])
        c.register_nve("host-b", "192.0.2.2", [VNI])
        yield c


def _post(server: NvaServer, path: str, data: bytes) -> requests.Response:
    return requests.post(
        server.url + path,
        data=data,
        headers={"X-Auth-Token": TOKEN, "Content-Type": "application/json"},
        timeout=5,
    )


# ------------------------------------------------------------------ JSON depth


@pytest.mark.parametrize("depth", [33, 5000, 100_000])
def test_deeply_nested_json_is_a_400_not_a_500(
    server: NvaServer, client: NvaClient, depth: int, caplog: pytest.LogCaptureFixture
) -> None:
    body = b'{"vni": 100, "mac": "52:54:00:00:00:09", "nve": "host-a", "ipv4": '
    body += b"[" * depth + b"]" * depth + b"}"
    with caplog.at_level(logging.ERROR):
        resp = _post(server, "/v1/endpoints", body)
    assert resp.status_code == 400, resp.text
    assert "nests arrays or objects more than 32 deep" in resp.json()["error"]["message"]
    assert "Traceback" not in caplog.text
    assert client.health()["revision"] == server.store.revision  # the server still answers


def test_nesting_within_the_bound_and_brackets_in_strings_are_fine() -> None:
    assert not json_depth_over(b'{"a": "' + b"[" * 1000 + b'"}', 32)
    assert not json_depth_over(b'{"a": "\\"' + b"[" * 100 + b'"}', 32)
    assert json_depth_over(b'{"a": ' + b"[" * 32 + b"]" * 32 + b"}", 32)
    assert parse_json_body(b'{"a": [[[]]]}', 4) == {"a": [[[]]]}
    with pytest.raises(BadRequest, match="more than 3 deep"):
        parse_json_body(b'{"a": [[[]]]}', 3)


# ------------------------------------------------ refusals and new routes over HTTP


def test_the_api_refuses_what_the_kernel_refuses_with_400(client: NvaClient) -> None:
    for mac in ("01:00:5e:00:00:01", "ff:ff:ff:ff:ff:ff", "00:00:00:00:00:00"):
        with pytest.raises(BadRequest):
            client.add_endpoint(VNI, mac, [], [], "host-a")
    with pytest.raises(BadRequest, match="zone id"):
        client.add_endpoint(VNI, MAC, [], ["fe80::1%eth0"], "host-a")
    with pytest.raises(BadRequest, match="zone id"):
        client.find(VNI, ip="fe80::1%25eth0")  # percent-encoded on the wire
    assert client.list_endpoints() == []


def test_sticky_release_and_nve_delete_over_http(server: NvaServer, client: NvaClient) -> None:
    assert client.add_endpoint(VNI, MAC, [], [], "host-a", sticky=True)["sticky"] is True
    with pytest.raises(Conflict, match="sticky"):
        client.move(VNI, MAC, "host-b")
    client.add_endpoint(VNI, MAC2, [], [], "host-a")
    server.store.mobility = server.store.mobility.__class__(move_limit=1)
    client.move(VNI, MAC2, "host-b")
    with pytest.raises(Conflict, match="frozen"):
        client.move(VNI, MAC2, "host-a")
    assert client.get_endpoint(VNI, MAC2)["frozen"] is True
    assert client.release(VNI, MAC2)["frozen"] is False
    assert client.move(VNI, MAC2, "host-a")["nve"] == "host-a"
    assert client.delete_nve("host-b")["id"] == "host-b"
    assert [n["id"] for n in client.list_nves()] == ["host-a"]
    resp = _post(server, f"/v1/endpoints/{VNI}/{MAC2}/release", b'{"why": 1}')
    assert resp.status_code == 400 and "unknown field" in resp.json()["error"]["message"]


def test_a_watch_behind_the_pruned_log_is_410_gone(server: NvaServer, client: NvaClient) -> None:
    server.store.keep_changes = 10
    client.add_endpoint(VNI, MAC, [], [], "host-a")
    for _ in range(15):
        client.expire(VNI, MAC, ["host-a"])
    with pytest.raises(Gone, match="no longer in the change log"):
        client.watch("host-a", 1)
    resp = requests.get(
        server.url + "/v1/watch",
        params={"nve": "host-a", "since": 1},
        headers={"X-Auth-Token": TOKEN},
        timeout=5,
    )
    assert resp.status_code == 410 and resp.json()["error"]["code"] == "gone"


# ------------------------------------------------------------- SQLite files


def test_a_database_from_before_the_mobility_columns_opens(tmp_path: Path) -> None:
    path = str(tmp_path / "old.sqlite")
    db = sqlite3.connect(path)
    db.executescript(
        """
        CREATE TABLE nves (id TEXT PRIMARY KEY, vtep TEXT NOT NULL, vnis TEXT NOT NULL,
            acked_revision INTEGER NOT NULL DEFAULT 0, acked_at REAL);
        CREATE TABLE endpoints (vni INTEGER NOT NULL, mac TEXT NOT NULL, ipv4 TEXT NOT NULL,
            ipv6 TEXT NOT NULL, nve TEXT NOT NULL, state TEXT NOT NULL, seq INTEGER NOT NULL
            DEFAULT 0, pending_nve TEXT, migration_id TEXT, last_migration_id TEXT,
            last_commit_revision INTEGER, committed_at REAL, revision INTEGER NOT NULL,
            updated_at REAL NOT NULL, PRIMARY KEY (vni, mac));
        CREATE TABLE changes (revision INTEGER PRIMARY KEY, vni INTEGER NOT NULL,
            target_nve TEXT, kind TEXT NOT NULL, payload TEXT NOT NULL, created_at REAL NOT NULL);
        """
    )
    db.execute("INSERT INTO nves VALUES ('host-a', '192.0.2.1', '[100]', 0, NULL)")
    db.execute("INSERT INTO nves VALUES ('host-b', '192.0.2.2', '[100]', 0, NULL)")
    db.execute(
        "INSERT INTO endpoints VALUES (100, ?, '[]', '[]', 'host-a', 'active', 2, NULL, NULL,"
        " NULL, NULL, NULL, 7, 0)",
        (MAC,),
    )
    db.execute("INSERT INTO changes VALUES (7, 100, NULL, 'endpoint', '{}', 0)")
    db.commit()
    db.close()
    store = NvaStore(path)
    try:
        endpoint = store.get_endpoint(VNI, MAC)
        assert (endpoint["seq"], endpoint["sticky"], endpoint["frozen"]) == (2, False, False)
        assert store.move(VNI, MAC, "host-b")["seq"] == 3
        assert store.revision == 8
    finally:
        store.close()


def test_a_bad_entry_from_an_older_directory_can_be_read_and_deleted(tmp_path: Path) -> None:
    store = NvaStore(str(tmp_path / "nva.sqlite"))
    try:
        store.register_nve("host-a", "192.0.2.1", [VNI])
        with store._tx() as db:
            db.execute(
                "INSERT INTO endpoints (vni, mac, ipv4, ipv6, nve, state, seq, revision,"
                " updated_at) VALUES (100, '01:00:5e:00:00:01', '[]', '[]', 'host-a', 'active',"
                " 0, 1, 0)"
            )
        assert store.get_endpoint(VNI, "01:00:5E:00:00:01")["nve"] == "host-a"
        with pytest.raises(BadRequest, match="multicast"):
            store.move(VNI, "01:00:5e:00:00:01", "host-a")
        assert store.delete_endpoint(VNI, "01:00:5e:00:00:01")["mac"] == "01:00:5e:00:00:01"
        assert store.list_endpoints() == []
    finally:
        store.close()


def test_the_pruned_revision_survives_a_restart(tmp_path: Path) -> None:
    path = str(tmp_path / "nva.sqlite")
    store = NvaStore(path, keep_changes=10)
    store.register_nve("host-a", "192.0.2.1", [VNI])
    store.add_endpoint(VNI, MAC, [], [], "host-a")
    for _ in range(20):
        store.expire(VNI, MAC, ["host-a"])
    pruned, revision = store.pruned_revision, store.revision
    store.close()
    assert pruned > 0
    again = NvaStore(path, keep_changes=10)
    try:
        assert (again.pruned_revision, again.revision) == (pruned, revision)
        with pytest.raises(Gone):
            again.changes_since("host-a", pruned - 1)
        assert len(again.changes_since("host-a", pruned)[1]) == revision - pruned
    finally:
        again.close()


# ------------------------------------------- an agent behind the pruned log


class StandInNve:
    """Records what the agent tells its NVE (the methods NveAgent uses)."""

    netns = None
    local_vtep = "192.0.2.1"

    def __init__(self) -> None:
        self.remote: dict[tuple[int, str], str] = {}
        self.flood: dict[int, list[str]] = {}
        self.forgotten: list[tuple[int, str]] = []

    def ensure_vn(self, vni: int) -> None:
        self.flood.setdefault(vni, [])

    def set_flood_list(self, vni: int, vteps: list[str]) -> None:
        self.flood[vni] = sorted(vteps)

    def set_remote(self, vni: int, mac: str, vtep: str, ips: tuple[str, ...] = ()) -> None:
        self.remote[(vni, mac)] = vtep

    def clear_remote(self, vni: int, mac: str) -> None:
        self.remote.pop((vni, mac), None)

    def forget(self, vni: int, mac: str) -> None:
        self.remote.pop((vni, mac), None)
        self.forgotten.append((vni, mac))

    def inflight(self, vni: int, mac: str) -> str | None:
        return None

    def local_port(self, vni: int, mac: str) -> str | None:
        return None


def _wait(predicate: Any, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return bool(predicate())


def test_an_agent_behind_the_pruned_log_resyncs_and_drops_what_was_deleted(
    server: NvaServer, client: NvaClient
) -> None:
    store = server.store
    store.keep_changes = 10
    client.add_endpoint(VNI, MAC, [], [], "host-b")
    client.add_endpoint(VNI, MAC2, [], [], "host-b")
    nve = StandInNve()
    agent = NveAgent(
        "host-a", nve, NvaClient(server.url, TOKEN), [VNI], watch_timeout=0.2,
        retry_interval=0.05, local_learning=False, address_guard=False,
    )  # fmt: skip
    agent.start()
    try:
        assert nve.remote == {(VNI, MAC): "192.0.2.2", (VNI, MAC2): "192.0.2.2"}
        assert nve.flood == {VNI: ["192.0.2.2"]}
        agent.stop()  # the agent falls behind...
        behind = agent.revision
        client.delete_endpoint(VNI, MAC2)  # ...while an endpoint goes away
        client.register_nve("host-c", "192.0.2.3", [VNI])  # and a peer arrives
        for _ in range(15):
            client.expire(VNI, MAC, ["host-b"])
        assert store.pruned_revision > behind
        agent._stop.clear()
        agent._spawn(agent._watch_loop, "watch-again")  # the watch alone, no fresh start
        assert _wait(lambda: agent.revision == store.revision)
        assert nve.remote == {(VNI, MAC): "192.0.2.2"}
        assert (VNI, MAC2) in nve.forgotten
        assert nve.flood == {VNI: ["192.0.2.2", "192.0.2.3"]}
        assert _wait(lambda: client.get_nve("host-a")["acked_revision"] == store.revision)
    finally:
        agent.stop()


def test_the_agent_follows_registrations_and_skips_what_it_cannot_apply(
    server: NvaServer, client: NvaClient
) -> None:
    nve = StandInNve()
    agent = NveAgent(
        "host-a", nve, NvaClient(server.url, TOKEN), [VNI], watch_timeout=0.2,
        local_learning=False, address_guard=False,  # the stand-in has no namespace
    )  # fmt: skip
    agent.start()
    try:
        assert nve.flood == {VNI: ["192.0.2.2"]}
        client.register_nve("host-c", "192.0.2.3", [VNI])
        assert _wait(lambda: nve.flood == {VNI: ["192.0.2.2", "192.0.2.3"]})
        # A change the agent cannot apply (written behind the API's checks) is skipped.
        with server.store._tx() as db:
            revision = server.store._next_revision()
            bad = {"vni": VNI, "mac": "01:00:5e:00:00:01", "nve": "host-b", "seq": 0}
            server.store._record(db, revision, VNI, "endpoint", {"endpoint": bad})
        client.delete_nve("host-c")
        assert _wait(lambda: nve.flood == {VNI: ["192.0.2.2"]})
        assert agent.rejected_entries == 1 and agent.errors == 0
        assert (VNI, bad["mac"]) not in nve.remote
    finally:
        agent.stop()
