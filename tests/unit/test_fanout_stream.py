"""The directory's streaming watch and batched acks (issue 16 item 3)."""

from __future__ import annotations

import secrets
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

from vmm_orchestrator.nva import stream
from vmm_orchestrator.nva.client import NvaClient
from vmm_orchestrator.nva.errors import Gone, NotFound
from vmm_orchestrator.nva.server import NvaServer
from vmm_orchestrator.nva.store import NvaStore
from vmm_orchestrator.nva.stream import _ack_revision

VNI = 5001
MAC = "52:54:00:00:00:01"
TOKEN = secrets.token_urlsafe(8)


@pytest.fixture
def server() -> Iterator[NvaServer]:
    store = NvaStore(":memory:")
    for name, vtep in (("host-a", "192.0.2.1"), ("host-b", "192.0.2.2"), ("host-c", "192.0.2.3")):
        store.register_nve(name, vtep, [VNI])
    srv = NvaServer(store, TOKEN, "127.0.0.1", 0)
    srv.start()
    yield srv
    srv.stop()
    store.close()


@pytest.fixture
def client(server: NvaServer) -> Iterator[NvaClient]:
    with NvaClient(server.url, TOKEN) as c:
        yield c


def _hub_streams(server: NvaServer) -> int:
    hub = server._api.hub
    assert hub is not None
    return hub.streams


def test_changes_are_pushed_on_one_stream_and_acks_ride_on_it(
    server: NvaServer, client: NvaClient
) -> None:
    since = client.health()["revision"]
    assert client.watch("host-b", since, timeout=0.05) == (since, [])  # opens the stream
    assert client.open_streams == 1 and _hub_streams(server) == 1
    revision = since
    for i in range(20):  # every commit arrives at once, none waits for a poll interval
        mac = f"52:54:00:00:01:{i:02x}"
        started = time.monotonic()
        client.add_endpoint(VNI, mac, [], [], "host-a")
        revision, changes = client.watch("host-b", revision, timeout=2.0)
        assert time.monotonic() - started < 0.5
        assert [c["endpoint"]["mac"] for c in changes] == [mac]
    client.ack_async("host-b", revision)
    deadline = time.monotonic() + 2
    while client.get_nve("host-b")["acked_revision"] != revision:
        assert time.monotonic() < deadline, "the ack on the stream was not recorded"
        time.sleep(0.01)
    assert client.open_streams == 1  # still the one stream: no request per change
    client.close_stream("host-b")
    assert client.open_streams == 0


def test_a_stream_catches_up_from_since_and_skips_other_nves_targets(
    client: NvaClient,
) -> None:
    start = client.health()["revision"]
    client.add_endpoint(VNI, MAC, [], [], "host-a")
    client.expire(VNI, MAC, ["host-c"])  # targets host-c only
    revision, changes = client.watch("host-b", start, timeout=1.0)
    assert [c["kind"] for c in changes] == ["endpoint"]
    assert revision == client.health()["revision"]
    revision, changes = client.watch("host-c", start, timeout=1.0)
    assert [c["kind"] for c in changes] == ["endpoint", "expire"]


def test_a_stream_is_refused_like_a_watch(server: NvaServer, client: NvaClient) -> None:
    with pytest.raises(NotFound, match="no NVE 'nowhere'"):
        client.watch("nowhere", 0, timeout=0.1)
    server.store.keep_changes = 2
    for i in range(5):
        client.add_endpoint(VNI, f"52:54:00:00:02:{i:02x}", [], [], "host-a")
    with pytest.raises(Gone):
        client.watch("host-b", 1, timeout=0.1)
    assert client.streaming  # an error about the NVE is not "cannot stream"


def test_a_directory_that_cannot_stream_is_long_polled(
    server: NvaServer, client: NvaClient
) -> None:
    hub, server._api.hub = server._api.hub, None  # as a backend without a commit feed
    try:
        since = client.health()["revision"]
        client.add_endpoint(VNI, MAC, [], [], "host-a")
        revision, changes = client.watch("host-b", since, timeout=1.0)
        assert [c["endpoint"]["mac"] for c in changes] == [MAC]
        assert not client.streaming and client.open_streams == 0
        client.ack_async("host-b", revision)  # no stream: one request
        assert client.get_nve("host-b")["acked_revision"] == revision
    finally:
        server._api.hub = hub


def test_ack_many_writes_a_batch_and_names_the_refused(client: NvaClient) -> None:
    client.add_endpoint(VNI, MAC, [], [], "host-a")
    revision = client.health()["revision"]
    result = client.ack_many({"host-b": revision, "host-c": revision, "ghost": 1})
    assert set(result["acked"]) == {"host-b", "host-c"}
    assert result["acked"]["host-b"]["acked_revision"] == revision
    assert "ghost" in result["errors"]
    acks = client.acks(VNI, revision, nves=["host-b", "host-c"])
    assert all(a["acked_revision"] == revision for a in acks.values())
    again = client.ack_many({"host-b": revision - 1})  # never backwards
    assert again["acked"]["host-b"]["acked_revision"] == revision
    ahead = client.ack_many({"host-b": revision + 5})
    assert "directory is at" in ahead["errors"]["host-b"]


def test_an_ack_does_not_wake_change_watchers(server: NvaServer) -> None:
    store = server.store
    woken: list[int] = []
    store.add_listener(lambda revision, changes: woken.append(revision))
    store.record_acks({"host-a": store.revision})
    store.ack("host-b", store.revision)
    assert woken == []  # acks record no change
    store.add_endpoint(VNI, MAC, [], [], "host-a")
    assert woken == [store.revision]


def test_a_stream_request_without_upgrade_and_a_garbage_ack_are_refused(
    server: NvaServer, client: NvaClient
) -> None:
    with pytest.raises(Exception, match="Upgrade"):
        client._request("GET", "/v1/stream", params={"nve": "host-a"})
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=2) as sock:
        sock.sendall(
            b"GET /v1/stream?nve=host-a&since=0 HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\n"
            b"Upgrade: vmm-nva-stream/1\r\nX-Auth-Token: " + TOKEN.encode() + b"\r\n\r\n"
        )
        head = sock.recv(65536)
        assert head.startswith(b"HTTP/1.1 101")
        sock.sendall(b"not an ack\n")
        sock.settimeout(2)
        data = b""
        while True:  # the hub closes a stream that sends garbage
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    assert _ack_revision(b'{"ack": 12}') == 12
    assert _ack_revision(b'{"ack":  13}') == 13
    assert _ack_revision(b'{"ack": -1}') is None
    assert _ack_revision(b"nonsense") is None


def test_streams_catching_up_over_the_same_changes_encode_each_once(
    server: NvaServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    with NvaClient(server.url, TOKEN) as admin:
        start = admin.health()["revision"]
        for i in range(5):
            admin.add_endpoint(VNI, f"52:54:00:00:02:{i:02x}", [], [], "host-a")
        end = admin.health()["revision"]
    encoded: list[int] = []
    real = stream._encoded

    def counting(change: dict[str, Any]) -> bytes:
        encoded.append(change["revision"])
        return real(change)

    monkeypatch.setattr(stream, "_encoded", counting)
    clients = [NvaClient(server.url, TOKEN) for _ in range(3)]
    try:
        for nve, c in zip(("host-a", "host-b", "host-c"), clients, strict=True):
            revision, changes = c.watch(nve, start, timeout=2.0)  # a catch-up page each
            assert revision == end and len(changes) == 5
            assert changes[0]["endpoint"]["mac"] == "52:54:00:00:02:00"
    finally:
        for c in clients:
            c.close()
    assert sorted(encoded) == list(range(start + 1, end + 1))  # each change once, not 3 times


class _SlowStore:
    """A store whose writes cost much whatever their size (as etcd's do)."""

    ack_window = 0.05

    def __init__(self) -> None:
        self.batches: list[dict[str, int]] = []

    def record_acks(self, acks: dict[str, int]) -> dict[str, str]:
        self.batches.append(dict(acks))
        return {}


def test_the_ack_writer_lets_a_burst_gather_when_the_store_asks_for_a_window() -> None:
    store = _SlowStore()
    writer = stream.AckWriter(store)
    try:
        writer.add({"a": 1})  # the first ack of a move, as the hub reads it
        time.sleep(0.01)
        writer.add({"b": 1, "a": 2})  # the rest of the burst, a round later
        deadline = time.monotonic() + 5
        while not store.batches and time.monotonic() < deadline:
            time.sleep(0.005)
    finally:
        writer.close()
    assert store.batches == [{"a": 2, "b": 1}]  # one write, each NVE's highest


def test_the_ack_writer_writes_at_once_without_a_window() -> None:
    store = _SlowStore()
    store.ack_window = 0.0
    writer = stream.AckWriter(store)
    try:
        writer.add({"a": 1})
        deadline = time.monotonic() + 5
        while not store.batches and time.monotonic() < deadline:
            time.sleep(0.001)
        assert store.batches == [{"a": 1}]
    finally:
        writer.close()


def test_closing_the_ack_writer_writes_what_is_pending_without_waiting_the_window() -> None:
    store = _SlowStore()
    store.ack_window = 30.0
    writer = stream.AckWriter(store)
    writer.add({"a": 1})
    started = time.monotonic()
    writer.close()
    assert store.batches == [{"a": 1}] and time.monotonic() - started < 5


def test_one_commit_in_two_vns_reaches_each_stream_with_its_vns_changes_only(
    server: NvaServer, client: NvaClient
) -> None:
    """The hub builds one line per set of VNs for streams that had every earlier commit."""
    other = VNI + 1
    client.register_nve("host-d", "192.0.2.4", [other])
    client.register_nve("host-e", "192.0.2.5", [VNI, other])
    since = client.health()["revision"]
    for nve in ("host-b", "host-d", "host-e"):
        assert client.watch(nve, since, timeout=0.05) == (since, [])  # streams open
    deadline = time.monotonic() + 2
    while _hub_streams(server) < 3:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    client.register_nve("host-f", "192.0.2.6", [VNI, other])  # one commit, a change per VN
    got = {}
    for nve in ("host-b", "host-d", "host-e"):
        revision, changes = client.watch(nve, since, timeout=2.0)
        got[nve] = sorted(c["vni"] for c in changes)
        assert revision == since + 2 and all(c["nve"]["id"] == "host-f" for c in changes)
    assert got == {"host-b": [VNI], "host-d": [other], "host-e": [VNI, other]}
