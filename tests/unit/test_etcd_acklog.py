"""The ack log's pure rules (vmm_etcd.acklog): highest wins, epochs filter, bad values."""

from __future__ import annotations

from vmm_etcd.acklog import batch_value, better, entries, fold, snapshot_value
from vmm_etcd.kv import KeyValue


def _kv(value: str) -> KeyValue:
    return KeyValue("/p/acklog/w/1", value, 1, 1, 1, 0)


def test_the_higher_ack_wins_and_of_equal_ones_the_earlier() -> None:
    assert better((5, 2.0), (4, 1.0)) == (5, 2.0)
    assert better((4, 1.0), (5, 2.0)) == (5, 2.0)
    assert better((5, 2.0), (5, 1.0)) == (5, 1.0)
    assert better((5, None), (5, 1.0)) == (5, 1.0)
    assert better(None, (1, None)) == (1, None)
    assert better(None, None) is None


def test_a_batch_and_a_snapshot_read_back_with_their_times() -> None:
    batch = _kv(batch_value(100.5, {"a": (7, 11), "b": (6, 12)}))
    snap = _kv(snapshot_value({"a": (9, 11, 200.25), "c": (3, 13, None)}))
    assert sorted(entries(batch.value)) == [("a", 7, 11, 100.5), ("b", 6, 12, 100.5)]
    assert sorted(entries(snap.value)) == [("a", 9, 11, 200.25), ("c", 3, 13, None)]
    assert fold([batch, snap], {"a": 11, "b": 12, "c": 13}) == {
        "a": (9, 200.25),
        "b": (6, 100.5),
        "c": (3, None),
    }


def test_entries_of_another_epoch_do_not_count() -> None:
    """An NVE deleted and registered again has a new record (a new create revision)."""
    batch = _kv(batch_value(1.0, {"a": (7, 11), "b": (6, 12)}))
    assert fold([batch], {"a": 99, "b": 12}) == {"b": (6, 1.0)}


def test_malformed_values_and_entries_hold_nothing() -> None:
    assert list(entries("not json")) == []
    assert list(entries('{"acks": 3}')) == []
    assert list(entries('{"at": 1, "acks": {"a": ["x", 1], "b": [2, 3]}}')) == [("b", 2, 3, 1.0)]
