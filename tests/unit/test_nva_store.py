"""Semantics of the directory store: EVPN-like sequence numbers, DAD, watch, acks."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from vmm_orchestrator.errors import TransientError, VmmError
from vmm_orchestrator.nva.errors import BadRequest, Conflict, NotFound, Unavailable
from vmm_orchestrator.nva.store import NvaStore

VNI = 100
OTHER_VNI = 200
MAC = "52:54:00:00:00:01"
MAC2 = "52:54:00:00:00:02"


@pytest.fixture
def store() -> Iterator[NvaStore]:
    s = NvaStore(":memory:")
    s.register_nve("host-a", "192.0.2.1", [VNI, OTHER_VNI])
    s.register_nve("host-b", "192.0.2.2", [VNI])
    s.register_nve("host-c", "192.0.2.3", [OTHER_VNI])
    yield s
    s.close()


def _add(
    store: NvaStore, mac: str = MAC, ip: str = "10.0.0.1", nve: str = "host-a"
) -> dict[str, Any]:
    return store.add_endpoint(VNI, mac, [ip], ["2001:db8::1" if mac == MAC else "2001:db8::2"], nve)


def _later(delay: float, fn: Callable[..., object], *args: object) -> threading.Thread:
    """Run fn(*args) after delay in a thread, to wake a long-poll."""

    def run() -> None:
        time.sleep(delay)
        fn(*args)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


# ------------------------------------------------------------------ endpoints


def test_add_endpoint_is_active_with_seq_zero_and_idempotent(store: NvaStore) -> None:
    ep = _add(store)
    assert (ep["state"], ep["seq"], ep["nve"], ep["vtep"]) == ("active", 0, "host-a", "192.0.2.1")
    again, created = store.create_endpoint(
        VNI, MAC.upper(), ["10.0.0.1"], ["2001:db8::1"], "host-a"
    )
    assert created is False
    assert again == ep


def test_add_endpoint_with_other_attributes_conflicts(store: NvaStore) -> None:
    _add(store)
    with pytest.raises(Conflict, match="already exists"):
        store.add_endpoint(VNI, MAC, ["10.0.0.9"], [], "host-a")


def test_add_endpoint_unknown_nve_is_not_found(store: NvaStore) -> None:
    with pytest.raises(NotFound, match="no NVE 'nowhere'"):
        store.add_endpoint(VNI, MAC, ["10.0.0.1"], [], "nowhere")


@pytest.mark.parametrize(
    ("ipv4", "ipv6", "taken"),
    [(["10.0.0.1"], [], "10.0.0.1"), ([], ["2001:DB8:0::1"], "2001:db8::1")],
    ids=["ipv4", "ipv6"],
)
def test_duplicate_address_in_vn_conflicts(
    store: NvaStore, ipv4: list[str], ipv6: list[str], taken: str
) -> None:
    _add(store)
    with pytest.raises(Conflict) as info:
        store.add_endpoint(VNI, MAC2, ipv4, ipv6, "host-b")
    assert f"{taken} (held by {MAC})" in str(info.value)
    with pytest.raises(NotFound):
        store.get_endpoint(VNI, MAC2)  # nothing half-applied


def test_same_address_in_another_vn_is_fine(store: NvaStore) -> None:
    _add(store)
    ep = store.add_endpoint(OTHER_VNI, MAC2, ["10.0.0.1"], [], "host-c")
    assert ep["ipv4"] == ["10.0.0.1"]


def test_prestage_rechecks_duplicate_addresses(store: NvaStore) -> None:
    _add(store)
    _add(store, MAC2, "10.0.0.2", "host-b")
    # Simulate an address that became duplicate behind the API's back.
    with store._tx() as db:
        db.execute("UPDATE endpoints SET ipv4 = '[\"10.0.0.1\"]' WHERE mac = ?", (MAC2,))
    with pytest.raises(Conflict, match="duplicate address"):
        store.prestage(VNI, MAC, "host-b", "m1")
    assert store.get_endpoint(VNI, MAC)["state"] == "active"


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda s: s.add_endpoint(0, MAC, [], [], "host-a"), "vni must be an integer from 1"),
        (lambda s: s.add_endpoint(2**24, MAC, [], [], "host-a"), "16777215"),
        (lambda s: s.add_endpoint(VNI, "52:54:00", [], [], "host-a"), "not a MAC"),
        (lambda s: s.add_endpoint(VNI, MAC, ["10.0.0.300"], [], "host-a"), "not an IP"),
        (lambda s: s.add_endpoint(VNI, MAC, ["2001:db8::1"], [], "host-a"), "not IPv4"),
        (lambda s: s.add_endpoint(VNI, MAC, "10.0.0.1", [], "host-a"), "must be a list"),
        (lambda s: s.register_nve("a/b", "192.0.2.9", [VNI]), "NVE id"),
        (lambda s: s.find(VNI), "needs an ip or a mac"),
    ],
)
def test_validation_is_bad_request_with_precise_message(
    store: NvaStore, call: Callable[[NvaStore], object], message: str
) -> None:
    with pytest.raises(BadRequest, match=message):
        call(store)


def test_find_by_ip_and_by_mac(store: NvaStore) -> None:
    _add(store)
    assert store.find(VNI, ip="10.0.0.1")["mac"] == MAC
    assert store.find(VNI, ip="2001:db8:0:0::1")["mac"] == MAC
    assert store.find(VNI, mac=MAC.replace(":", "-"))["ipv4"] == ["10.0.0.1"]
    with pytest.raises(NotFound):
        store.find(VNI, ip="10.0.0.99")
    with pytest.raises(NotFound):
        store.find(OTHER_VNI, ip="10.0.0.1")


def test_delete_endpoint_records_a_change(store: NvaStore) -> None:
    _add(store)
    deleted = store.delete_endpoint(VNI, MAC)
    assert deleted["revision"] == store.revision
    with pytest.raises(NotFound):
        store.get_endpoint(VNI, MAC)
    _, changes = store.changes_since("host-b", deleted["revision"] - 1)
    assert [(c["kind"], c["mac"]) for c in changes] == [("endpoint_deleted", MAC)]


# ------------------------------------------------------------------ migration


def test_prestage_and_abort_leave_nve_and_seq_alone(store: NvaStore) -> None:
    _add(store)
    revision = store.revision
    pending = store.prestage(VNI, MAC, "host-b", "m1")
    assert (pending["state"], pending["pending_nve"], pending["migration_id"]) == (
        "pending",
        "host-b",
        "m1",
    )
    assert (pending["nve"], pending["seq"]) == ("host-a", 0)
    assert store.prestage(VNI, MAC, "host-b", "m1")["state"] == "pending"  # idempotent
    aborted = store.abort(VNI, MAC, "m1")
    assert (aborted["state"], aborted["nve"], aborted["seq"]) == ("active", "host-a", 0)
    assert aborted["pending_nve"] is None and aborted["migration_id"] is None
    assert store.abort(VNI, MAC, "m1")["state"] == "active"  # idempotent
    assert store.revision == revision  # NVEs had nothing to apply


def test_prestage_errors(store: NvaStore) -> None:
    _add(store)
    with pytest.raises(NotFound):
        store.prestage(VNI, MAC2, "host-b", "m1")
    with pytest.raises(NotFound):
        store.prestage(VNI, MAC, "nowhere", "m1")
    with pytest.raises(Conflict, match="does not serve VNI 100"):
        store.prestage(VNI, MAC, "host-c", "m1")
    store.prestage(VNI, MAC, "host-b", "m1")
    with pytest.raises(Conflict, match="already pending for migration m1"):
        store.prestage(VNI, MAC, "host-b", "m2")
    with pytest.raises(Conflict):
        store.abort(VNI, MAC, "m2")
    assert store.get_endpoint(VNI, MAC)["migration_id"] == "m1"


def test_commit_bumps_seq_by_one_and_is_idempotent(store: NvaStore) -> None:
    _add(store)
    store.prestage(VNI, MAC, "host-b", "m1")
    first = store.commit(VNI, MAC, "m1")
    ep = first["endpoint"]
    assert (ep["nve"], ep["vtep"], ep["seq"], ep["state"]) == ("host-b", "192.0.2.2", 1, "active")
    assert ep["pending_nve"] is None and ep["last_migration_id"] == "m1"
    assert first["revision"] == store.revision == ep["revision"]
    assert abs(first["committed_at"] - time.time()) < 5
    again = store.commit(VNI, MAC, "m1")
    assert again == first
    assert store.get_endpoint(VNI, MAC)["seq"] == 1
    store.prestage(VNI, MAC, "host-a", "m2")
    assert store.commit(VNI, MAC, "m2")["endpoint"]["seq"] == 2


def test_commit_errors(store: NvaStore) -> None:
    _add(store)
    with pytest.raises(NotFound, match="no pending migration m1"):
        store.commit(VNI, MAC, "m1")
    store.prestage(VNI, MAC, "host-b", "m1")
    with pytest.raises(Conflict, match="pending for migration m1, not m2"):
        store.commit(VNI, MAC, "m2")
    with pytest.raises(NotFound):
        store.commit(VNI, MAC2, "m1")


def test_move_bumps_seq_and_rejects_stale_seq(store: NvaStore) -> None:
    _add(store)
    moved = store.move(VNI, MAC, "host-b")
    assert (moved["nve"], moved["seq"]) == ("host-b", 1)
    assert store.move(VNI, MAC, "host-b") == moved  # already there: no-op
    with pytest.raises(Conflict, match="stale sequence 1"):
        store.move(VNI, MAC, "host-a", seq=1)
    with pytest.raises(Conflict, match="stale sequence 0"):
        store.move(VNI, MAC, "host-a", seq=0)
    assert store.get_endpoint(VNI, MAC)["nve"] == "host-b"
    assert store.move(VNI, MAC, "host-a", seq=2)["seq"] == 2


def test_state_survives_reopen(tmp_path: Path) -> None:
    path = str(tmp_path / "nva.sqlite")
    s = NvaStore(path)
    s.register_nve("host-a", "192.0.2.1", [VNI])
    s.register_nve("host-b", "192.0.2.2", [VNI])
    _add(s)
    s.move(VNI, MAC, "host-b")
    revision = s.revision
    s.close()
    reopened = NvaStore(path)
    try:
        assert reopened.revision == revision
        assert reopened.get_endpoint(VNI, MAC)["seq"] == 1
    finally:
        reopened.close()


def test_failed_operation_does_not_consume_a_revision(store: NvaStore) -> None:
    _add(store)
    revision = store.revision
    with pytest.raises(Conflict):
        store.expire(VNI, MAC, ["host-b", "host-c"])  # host-c does not serve VNI 100
    assert store.revision == revision
    assert store.expire(VNI, MAC, ["host-b"])["revision"] == revision + 1


# ------------------------------------------------------------------ watch


def test_watch_returns_only_the_nves_vnis_and_its_targeted_changes(store: NvaStore) -> None:
    start = store.revision  # after the fixture's NVE registrations
    store.add_endpoint(OTHER_VNI, MAC2, ["10.1.0.2"], [], "host-c")
    _add(store)
    store.expire(VNI, MAC, ["host-a"])
    store.expire(VNI, MAC, ["host-b"])

    revision, changes = store.changes_since("host-b", start)
    assert revision == store.revision
    assert [c["kind"] for c in changes] == ["endpoint", "expire"]
    assert all(c["vni"] == VNI for c in changes)
    assert changes[0]["endpoint"]["mac"] == MAC
    assert (changes[1]["mac"], changes[1]["target_nve"]) == (MAC, "host-b")

    _, for_c = store.changes_since("host-c", start)
    assert [(c["vni"], c["endpoint"]["mac"]) for c in for_c] == [(OTHER_VNI, MAC2)]

    _, for_a = store.changes_since("host-a", start)
    assert [c["kind"] for c in for_a] == ["endpoint", "endpoint", "expire"]
    assert for_a[2]["target_nve"] == "host-a"
    # Nothing new after the current revision.
    assert store.changes_since("host-a", revision) == (revision, [])


def test_watch_errors(store: NvaStore) -> None:
    with pytest.raises(NotFound):
        store.changes_since("nowhere", 0)
    with pytest.raises(Conflict, match="ahead of the directory"):
        store.changes_since("host-a", store.revision + 5)


def test_long_poll_wakes_on_a_change(store: NvaStore) -> None:
    _add(store)
    since = store.revision
    thread = _later(0.1, store.move, VNI, MAC, "host-b")
    started = time.monotonic()
    revision, changes = store.changes_since("host-b", since, timeout=5.0)
    elapsed = time.monotonic() - started
    thread.join()
    assert 0.05 <= elapsed < 1.0
    assert revision == since + 1
    assert [(c["kind"], c["endpoint"]["nve"], c["endpoint"]["seq"]) for c in changes] == [
        ("endpoint", "host-b", 1)
    ]


def test_long_poll_ignores_other_vnis_and_times_out(store: NvaStore) -> None:
    since = store.revision
    thread = _later(0.05, store.add_endpoint, OTHER_VNI, MAC2, [], [], "host-c")
    started = time.monotonic()
    revision, changes = store.changes_since("host-b", since, timeout=0.4)
    thread.join()
    assert time.monotonic() - started >= 0.35
    assert changes == []
    assert revision == since + 1  # still moves the NVE past the irrelevant change


def test_watch_pages_a_long_backlog(store: NvaStore, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("vmm_orchestrator.nva.store.CHANGES_PAGE", 2)
    start = store.revision  # after the fixture's NVE registrations
    _add(store)
    store.expire(VNI, MAC, ["host-a"])
    store.expire(VNI, MAC, ["host-a"])
    revision, changes = store.changes_since("host-a", start)
    assert [c["revision"] - start for c in changes] == [1, 2]
    assert revision == start + 2
    revision, changes = store.changes_since("host-a", revision)
    assert [c["revision"] - start for c in changes] == [3]
    assert revision == start + 3


# ------------------------------------------------------------------ acks


def test_ack_never_goes_backwards(store: NvaStore) -> None:
    _add(store)
    store.move(VNI, MAC, "host-b")
    before = time.time()
    acked = store.ack("host-b", 2)
    assert acked["acked_revision"] == 2 and acked["acked_at"] >= before
    assert store.ack("host-b", 1)["acked_revision"] == 2
    with pytest.raises(Conflict):
        store.ack("host-b", 99)
    with pytest.raises(NotFound):
        store.ack("nowhere", 1)


def test_acks_wait_for_every_serving_nve(store: NvaStore) -> None:
    _add(store)
    target = store.move(VNI, MAC, "host-b")["revision"]
    store.ack("host-a", target)
    thread = _later(0.1, store.ack, "host-b", target)
    started = time.monotonic()
    acks = store.acks(VNI, target, timeout=5.0)
    elapsed = time.monotonic() - started
    thread.join()
    assert 0.05 <= elapsed < 1.0
    assert set(acks) == {"host-a", "host-b"}  # host-c does not serve the VNI
    assert all(a["acked_revision"] >= target for a in acks.values())


def test_acks_time_out_with_the_laggards_visible(store: NvaStore) -> None:
    _add(store)
    target = store.revision
    store.ack("host-a", target)
    started = time.monotonic()
    acks = store.acks(VNI, target, nves=["host-a", "host-b"], timeout=0.2)
    assert time.monotonic() - started >= 0.15
    assert acks["host-a"]["acked_revision"] == target
    assert acks["host-b"] == {"acked_revision": 0, "acked_at": None}


def test_errors_are_vmm_errors_and_unavailable_is_transient() -> None:
    assert issubclass(Conflict, VmmError)
    assert issubclass(Unavailable, TransientError)
    assert (BadRequest.http_status, NotFound.http_status, Conflict.http_status) == (400, 404, 409)


def test_store_is_thread_safe(store: NvaStore) -> None:
    start = store.revision  # after the fixture's NVE registrations
    for i in range(20):
        store.add_endpoint(VNI, f"52:54:00:00:01:{i:02x}", [f"10.0.1.{i + 1}"], [], "host-a")
    errors: list[BaseException] = []

    def mover(i: int) -> None:
        mac = f"52:54:00:00:01:{i:02x}"
        try:
            for nve in ("host-b", "host-a", "host-b"):
                store.move(VNI, mac, nve)
        except BaseException as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=mover, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert all(e["seq"] == 3 for e in store.list_endpoints(VNI))
    _, changes = store.changes_since("host-b", start + 20)
    assert [c["revision"] - start for c in changes] == list(range(21, 81))
