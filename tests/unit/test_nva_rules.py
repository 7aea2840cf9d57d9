"""The directory's shared rules: what it refuses (issue 13), move-flap protection and
sticky MACs (issue 14), NVE membership in the change log (issue 9) and pruning.

Every test takes the ``store`` fixture, so tests/functional/test_etcd_store.py
runs them against the etcd store as well.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import pytest

from vmm_orchestrator.nva.errors import BadRequest, Conflict, Gone, Invalid, NotFound
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


def _add(store: Any, mac: str = MAC, nve: str = "host-a", **kw: Any) -> dict[str, Any]:
    return store.add_endpoint(VNI, mac, ["10.0.0.1" if mac == MAC else "10.0.0.2"], [], nve, **kw)


def _policy(store: Any, **changes: Any) -> None:
    store.mobility = dataclasses.replace(store.mobility, **changes)


def _migrate(store: Any, to: str, migration_id: str) -> dict[str, Any]:
    store.prestage(VNI, MAC, to, migration_id)
    return store.commit(VNI, MAC, migration_id)["endpoint"]


# --------------------------------------------------- what the kernel would refuse


@pytest.mark.parametrize(
    ("mac", "words"),
    [
        ("01:00:5e:00:00:01", "multicast"),
        ("33:33:00:00:00:01", "multicast"),
        ("ff:ff:ff:ff:ff:ff", "broadcast"),
        ("FF-FF-FF-FF-FF-FF", "broadcast"),
        ("00:00:00:00:00:00", "all zeros"),
    ],
)
def test_macs_the_kernel_refuses_are_refused(store: Any, mac: str, words: str) -> None:
    before = store.revision
    with pytest.raises(Invalid, match=words) as info:
        store.add_endpoint(VNI, mac, [], [], "host-a")
    assert info.value.http_status == 400
    with pytest.raises(BadRequest, match=words):
        store.move(VNI, mac, "host-b")
    assert store.revision == before and store.list_endpoints() == []


@pytest.mark.parametrize(
    ("ipv4", "ipv6", "words"),
    [
        ([], ["fe80::1%eth0"], "zone id"),
        ([], ["2001:db8::1%1"], "zone id"),
        ([], ["::ffff:10.0.0.9"], "IPv4-mapped"),
        ([], ["::1"], "loopback"),
        (["127.0.0.1"], [], "loopback"),
        (["255.255.255.255"], [], "broadcast"),
        (["224.0.0.1"], [], "not a unicast"),
        (["0.0.0.0"], [], "not a unicast"),
    ],
)
def test_addresses_the_kernel_refuses_are_refused(
    store: Any, ipv4: list[str], ipv6: list[str], words: str
) -> None:
    with pytest.raises(BadRequest, match=words):
        store.add_endpoint(VNI, MAC, ipv4, ipv6, "host-a")
    assert store.list_endpoints() == []


def test_a_zone_id_cannot_slip_past_duplicate_address_detection(store: Any) -> None:
    store.add_endpoint(VNI, MAC, [], ["fe80::1"], "host-a")
    with pytest.raises(BadRequest, match="zone id"):
        store.add_endpoint(VNI, MAC2, [], ["fe80::1%eth0"], "host-b")
    with pytest.raises(Conflict, match="duplicate address"):
        store.add_endpoint(VNI, MAC2, [], ["FE80::1"], "host-b")
    with pytest.raises(BadRequest, match="zone id"):
        store.find(VNI, ip="fe80::1%eth0")
    assert store.find(VNI, ip="fe80::1")["mac"] == MAC


# ------------------------------------------------------ NVEs in the change log


def test_nve_membership_is_a_change_for_its_vns_only_when_the_flood_list_changes(
    store: Any,
) -> None:
    start = store.revision
    store.register_nve("host-b", "192.0.2.2", [VNI])  # a restarting agent: no change
    assert store.revision == start
    store.register_nve("host-d", "192.0.2.4", [VNI])
    revision, changes = store.changes_since("host-a", start)
    assert [(c["kind"], c["vni"], c["nve"]["id"], c["member"]) for c in changes] == [
        ("nve", VNI, "host-d", True)
    ]
    assert changes[0]["nve"]["vtep"] == "192.0.2.4"
    # A new VTEP and a VN left, in one registration.
    store.register_nve("host-a", "192.0.2.11", [VNI])
    _, changes = store.changes_since("host-c", revision)
    assert [(c["vni"], c["member"], c["nve"]["vtep"]) for c in changes] == [
        (OTHER_VNI, False, "192.0.2.11")
    ]
    _, changes = store.changes_since("host-b", revision)
    assert [(c["vni"], c["member"], c["nve"]["vtep"]) for c in changes] == [
        (VNI, True, "192.0.2.11")
    ]


def test_an_nve_goes_away_only_when_it_serves_nothing(store: Any) -> None:
    _add(store, nve="host-b")
    with pytest.raises(Conflict, match=r"NVE 'host-b' still serves endpoints \(52:54:00:00:00:01"):
        store.delete_nve("host-b")
    _add(store, MAC2)
    store.prestage(VNI, MAC2, "host-b", "m1")
    store.delete_endpoint(VNI, MAC)
    with pytest.raises(Conflict, match="still serves endpoints"):  # a pending migration to it
        store.delete_nve("host-b")
    store.abort(VNI, MAC2, "m1")
    start = store.revision
    gone = store.delete_nve("host-b")
    assert (gone["id"], gone["vtep"]) == ("host-b", "192.0.2.2")
    assert [n["id"] for n in store.list_nves(VNI)] == ["host-a"]
    _, changes = store.changes_since("host-a", start)
    assert [(c["kind"], c["vni"], c["nve"]["id"], c["member"]) for c in changes] == [
        ("nve", VNI, "host-b", False)
    ]
    with pytest.raises(NotFound):
        store.delete_nve("host-b")


# -------------------------------------------------------- move-flap protection


def test_a_flapping_mac_is_frozen_visible_and_released(store: Any) -> None:
    _policy(store, move_limit=3)
    _add(store)
    for nve in ("host-b", "host-a", "host-b"):
        store.move(VNI, MAC, nve)
    before = store.revision
    with pytest.raises(
        Conflict, match=r"now frozen at host-b as a flapping MAC \(4 moves in 180 s"
    ):
        store.move(VNI, MAC, "host-a")
    endpoint = store.get_endpoint(VNI, MAC)
    assert (endpoint["nve"], endpoint["seq"], endpoint["frozen"]) == ("host-b", 3, True)
    assert "over the limit of 3" in endpoint["frozen_reason"]
    assert [m["planned"] for m in endpoint["moves"]] == [False] * 4
    assert store.revision == before  # NVEs had nothing to apply
    with pytest.raises(Conflict, match=r"frozen at host-b.*move to host-a refused") as info:
        store.move(VNI, MAC, "host-a")
    assert "vmm nva endpoint release" in str(info.value)
    with pytest.raises(Conflict, match=r"frozen.*pre-stage refused"):
        store.prestage(VNI, MAC, "host-a", "m1")
    released = store.release(VNI, MAC)
    assert (released["frozen"], released["frozen_reason"], released["moves"]) == (False, None, [])
    assert store.move(VNI, MAC, "host-a")["nve"] == "host-a"


def test_moves_outside_the_window_do_not_count(store: Any, monkeypatch: Any) -> None:
    _policy(store, move_limit=2, move_window=60.0)
    _add(store)
    now = [1000.0]
    monkeypatch.setattr("time.time", lambda: now[0])
    for nve in ("host-b", "host-a", "host-b", "host-a", "host-b"):
        now[0] += 31.0  # two moves per window at most
        store.move(VNI, MAC, nve)
    assert store.get_endpoint(VNI, MAC)["frozen"] is False
    now[0] += 1.0  # a third move within 60 s
    with pytest.raises(Conflict, match="frozen"):
        store.move(VNI, MAC, "host-a")


def test_back_and_forth_migrations_and_their_echoes_never_freeze_with_the_defaults(
    store: Any,
) -> None:
    """A load balancer moving a VM back and forth (and each migration's own echo:
    QEMU's announcements learned at the destination, a stale frame at the source)."""
    _add(store)
    where = "host-a"
    for i in range(12):
        to = "host-b" if where == "host-a" else "host-a"
        endpoint = _migrate(store, to, f"lb-{i}")
        store.move(VNI, MAC, where)  # a stale frame at the source...
        store.move(VNI, MAC, to)  # ...and the guest's next announcement at the destination
        where = to
    endpoint = store.get_endpoint(VNI, MAC)
    assert endpoint["frozen"] is False and endpoint["nve"] == where
    assert all(m["planned"] for m in endpoint["moves"])  # the echoes were not counted


def test_a_planned_migration_counts_once_even_if_its_first_frame_moves_it(store: Any) -> None:
    _add(store)
    store.prestage(VNI, MAC, "host-b", "m1")
    learned = store.move(VNI, MAC, "host-b")  # the VM's first frame at the destination
    assert [(m["planned"], m["migration_id"]) for m in learned["moves"]] == [(True, "m1")]
    committed = store.commit(VNI, MAC, "m1")["endpoint"]
    assert len(committed["moves"]) == 1 and committed["nve"] == "host-b"


def test_learned_moves_between_other_nves_after_a_migration_still_count(store: Any) -> None:
    store.register_nve("host-d", "192.0.2.4", [VNI])
    _policy(store, move_limit=2)
    _add(store)
    _migrate(store, "host-b", "m1")  # counted (once), never trips by itself
    store.move(VNI, MAC, "host-d")  # not the migration's pair: counted
    with pytest.raises(Conflict, match="frozen"):
        store.move(VNI, MAC, "host-b")


def test_a_sticky_mac_never_moves(store: Any) -> None:
    sticky = _add(store, sticky=True)
    assert sticky["sticky"] is True
    assert _add(store, sticky=True) == sticky  # the same add again is harmless
    with pytest.raises(Conflict, match="already exists"):
        _add(store)  # not sticky: another endpoint
    with pytest.raises(Conflict, match=r"sticky .static. and never moves; move to host-b refused"):
        store.move(VNI, MAC, "host-b")
    with pytest.raises(Conflict, match=r"sticky.*pre-stage refused"):
        store.prestage(VNI, MAC, "host-b", "m1")
    endpoint = store.get_endpoint(VNI, MAC)
    assert (endpoint["nve"], endpoint["seq"], endpoint["state"]) == ("host-a", 0, "active")
    with pytest.raises(BadRequest, match="sticky must be true or false"):
        store.add_endpoint(VNI, MAC2, [], [], "host-a", sticky="yes")


# ----------------------------------------------------------------- pruning


def test_the_change_log_keeps_a_window_and_a_watcher_behind_it_resyncs(store: Any) -> None:
    store.keep_changes = 10
    start = store.revision
    _add(store)
    for _ in range(15):
        store.expire(VNI, MAC, ["host-a"])
    assert store.pruned_revision > start
    with pytest.raises(Gone, match="no longer in the change log") as info:
        store.changes_since("host-a", start)
    assert isinstance(info.value, Conflict) and info.value.http_status == 410
    assert "resynchronize from a full endpoint list" in str(info.value)
    # Within the window the watch answers as before.
    revision, changes = store.changes_since("host-a", store.revision - 5)
    assert revision == store.revision and len(changes) == 5
    # Pruning never loses the revision counter.
    _add(store, MAC2)
    assert store.revision == start + 17
