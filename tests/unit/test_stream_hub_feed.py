"""The stream hub's seams for a store fed from elsewhere (etcd): gaps and the ack writer."""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from vmm_orchestrator.nva.client import NvaClient
from vmm_orchestrator.nva.errors import Unavailable
from vmm_orchestrator.nva.server import NvaServer
from vmm_orchestrator.nva.store import NvaStore
from vmm_orchestrator.nva.stream import AckWriter, StreamHub

VNI = 5002
TOKEN = secrets.token_urlsafe(8)


class GapStore(NvaStore):
    """The embedded store, plus the gap seam an etcd-fed store offers."""

    def __init__(self) -> None:
        super().__init__(":memory:")
        self.gap_listeners: list[Any] = []

    def add_gap_listener(self, listener: Any) -> None:
        self.gap_listeners.append(listener)

    def remove_gap_listener(self, listener: Any) -> None:
        self.gap_listeners.remove(listener)


@pytest.fixture
def server() -> Iterator[NvaServer]:
    store = GapStore()
    for name, vtep in (("host-a", "192.0.2.1"), ("host-b", "192.0.2.2")):
        store.register_nve(name, vtep, [VNI])
    srv = NvaServer(store, TOKEN, "127.0.0.1", 0)
    srv.start()
    yield srv
    srv.stop()
    assert store.gap_listeners == []  # the hub let go of the store's gap seam
    store.close()


def test_a_gap_ends_every_stream_and_the_nve_catches_up_on_reconnect(
    server: NvaServer,
) -> None:
    store = server.store
    assert isinstance(store, GapStore) and len(store.gap_listeners) == 1
    with NvaClient(server.url, TOKEN) as client:
        since = client.health()["revision"]
        assert client.watch("host-b", since, timeout=0.05) == (since, [])
        store.gap_listeners[0]("the feed missed commits")  # as the etcd feed reports one
        store.add_endpoint(VNI, "52:54:00:00:05:01", [], [], "host-a")
        with pytest.raises(Unavailable, match="restarts its streams"):
            client.watch("host-b", since, timeout=2.0)
        revision, changes = client.watch("host-b", since, timeout=2.0)  # a new stream
        assert [c["endpoint"]["mac"] for c in changes] == ["52:54:00:00:05:01"]
        assert revision == store.revision and client.open_streams == 1


def test_acks_are_written_off_the_hub_thread_in_merged_batches() -> None:
    store = NvaStore(":memory:")
    for i in range(50):
        store.register_nve(f"nve{i:02d}", f"192.0.2.{i + 1}", [VNI])
    revision = store.revision
    gate = threading.Event()
    written: list[dict[str, int]] = []
    record = store.record_acks

    def slow(acks: dict[str, int]) -> dict[str, str]:
        gate.wait(5)  # the first write is in flight while the others arrive
        written.append(dict(acks))
        return record(acks)

    store.record_acks = slow  # type: ignore[method-assign]
    writer = AckWriter(store)
    try:
        for i in range(50):
            writer.add({f"nve{i:02d}": revision - 1})
            writer.add({f"nve{i:02d}": revision})  # the higher one wins
        gate.set()
        deadline = time.monotonic() + 5
        while sum(len(w) for w in written) < 50 or any(
            n["acked_revision"] != revision for n in store.list_nves(VNI)
        ):
            assert time.monotonic() < deadline, "the acks were not written"
            time.sleep(0.01)
        assert len(written) <= 3  # merged while the first write waited, not 100 writes
    finally:
        writer.close()
        store.close()


def test_a_hub_over_a_store_without_a_gap_seam_still_streams() -> None:
    store = NvaStore(":memory:")
    hub = StreamHub(store)
    try:
        assert hub.streams == 0 and not hasattr(store, "add_gap_listener")
    finally:
        hub.close()
        store.close()


class SlowPageStore(NvaStore):
    """Holds the hub's catch-up read of host-b until told, as a slow etcd read would."""

    def __init__(self) -> None:
        super().__init__(":memory:")
        self.reading = threading.Event()
        self.release = threading.Event()
        self.calls = 0

    def changes_since(self, nve_id: str, revision: int, timeout: float = 0.0) -> Any:
        answer = super().changes_since(nve_id, revision, timeout)
        if nve_id == "host-b":
            self.calls += 1
        if nve_id == "host-b" and self.calls == 2:  # the 1st: the server checks the request
            self.reading.set()
            self.release.wait(5)  # the page is now older than what the hub delivers
        return answer


def test_a_commit_delivered_while_a_page_was_read_still_reaches_the_new_stream() -> None:
    store = SlowPageStore()
    for name, vtep in (("host-a", "192.0.2.1"), ("host-b", "192.0.2.2")):
        store.register_nve(name, vtep, [VNI])
    server = NvaServer(store, TOKEN, "127.0.0.1", 0)
    server.start()
    try:
        with NvaClient(server.url, TOKEN) as watcher, NvaClient(server.url, TOKEN) as other:
            since = store.revision
            other.watch("host-a", since, timeout=0.05)  # a stream the hub delivers to
            opened = threading.Thread(target=watcher.watch, args=("host-b", since, 0.05))
            opened.start()
            assert store.reading.wait(5)
            store.add_endpoint(VNI, "52:54:00:00:05:02", [], [], "host-a")
            revision = store.revision
            deadline = time.monotonic() + 5
            while other.watch("host-a", since, timeout=0.1)[0] < revision:  # hub delivered it
                assert time.monotonic() < deadline
            store.release.set()
            opened.join(5)
            got, changes = watcher.watch("host-b", since, timeout=2.0)
            if not changes:
                got, changes = watcher.watch("host-b", got, timeout=2.0)
            assert [c["endpoint"]["mac"] for c in changes] == ["52:54:00:00:05:02"]
            assert got == revision
    finally:
        server.stop()
        store.close()
