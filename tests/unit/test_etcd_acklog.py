"""The ack log's pure rules (vmm_etcd.acklog): highest wins, epochs filter, bad values."""

from __future__ import annotations

import base64
import json
from unittest.mock import Mock

from vmm_etcd.acklog import (
    PACKED,
    AckLogWriter,
    LogCache,
    batch_value,
    better,
    entries,
    fold,
    snapshot_value,
)
from vmm_etcd.keys import Keys
from vmm_etcd.kv import KeyValue, TxnResult, b64


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


# ------------------------------------------------------------- the reader's cache


def _listing(revision: int, *ranges: list[tuple[str, str, int]]) -> TxnResult:
    """A read's answer: the ranges of (key, value, create revision), at ``revision``."""
    responses = [
        {
            "response_range": {
                "kvs": [
                    {"key": b64(k), "value": b64(v), "create_revision": c, "mod_revision": c}
                    for k, v, c in kvs
                ]
            }
        }
        for kvs in ranges
    ]
    return TxnResult(True, revision, responses)


KEYS = Keys("/p/")


def test_the_cache_folds_each_new_key_once_and_again_when_keys_went() -> None:
    cache = LogCache(KEYS)
    k1, k2, k3 = (f"{KEYS.ack_log}w/{i}" for i in (1, 2, 3))
    v1 = batch_value(1.0, {"a": (5, 11), "b": (5, 12)})
    view = cache.read(_listing(10, [(k1, "", 10)], [(k1, v1, 10)]), 0)
    assert view is not None and view.keys == 1
    assert view.fold({"a": 11, "b": 12}) == {"a": (5, 1.0), "b": (5, 1.0)}
    v2 = batch_value(2.0, {"a": (7, 11)})
    view = cache.read(_listing(20, [(k1, "", 10), (k2, "", 20)], [(k2, v2, 20)]), 0)
    assert view is not None and view.fold({"a": 11, "b": 12}) == {"a": (7, 2.0), "b": (5, 1.0)}
    assert view.fold({"a": 99}) == {}  # another epoch: not this NVE's
    # A fold wrote k3 (b's record is gone: its entry dropped) and deleted k1 and k2.
    v3 = snapshot_value({"a": (7, 11, 2.0)})
    view = cache.read(_listing(30, [(k3, "", 30)], [(k3, v3, 30)]), 0)
    assert view is not None and view.keys == 1
    assert view.fold({"a": 11, "b": 12}) == {"a": (7, 2.0)}


def test_a_listed_key_the_cache_does_not_know_asks_for_a_full_read() -> None:
    cache = LogCache(KEYS)
    assert cache.read(_listing(10, [(f"{KEYS.ack_log}w/1", "", 10)], []), 0) is None


def test_the_writers_own_keys_are_never_fetched() -> None:
    kv = Mock()
    writer = AckLogWriter(kv, KEYS, 128)
    cache = LogCache(KEYS, own=writer)
    other = f"{KEYS.ack_log}0other/1"
    cache.read(_listing(5, [(other, "", 5)], [(other, batch_value(1.0, {"b": (2, 12)}), 5)]), 0)
    mine = f"{writer.prefix}{'1'.zfill(20)}"
    writer._written_at(6, [(mine, [("a", 3, 11, 2.0)])])  # as write() does
    listing, *fetch = cache.requests()
    assert listing["request_range"]["keys_only"]
    fetched = [
        (
            base64.b64decode(r["request_range"]["key"]),
            base64.b64decode(r["request_range"]["range_end"]),
        )
        for r in fetch
    ]
    own = writer.prefix.encode()
    assert all(not (start <= own < end) for start, end in fetched)  # the own prefix left out
    assert all(r["request_range"]["min_create_revision"] == 6 for r in fetch)
    view = cache.read(_listing(6, [(other, "", 5), (mine, "", 6)], [], []), 0)
    assert view is not None and view.fold({"a": 11, "b": 12}) == {"a": (3, 2.0), "b": (2, 1.0)}


def test_a_long_batch_is_stored_compressed_and_reads_back() -> None:
    acks = {f"peer{i:04d}": (123456, 5000 + i) for i in range(1000)}
    value = batch_value(7.25, acks)
    assert value.startswith(PACKED) and len(value) < len(json.dumps(acks)) / 2
    assert sorted(entries(value)) == sorted((n, r, e, 7.25) for n, (r, e) in acks.items())
    snap = snapshot_value({n: (r, e, 1.5) for n, (r, e) in acks.items()})
    assert snap.startswith(PACKED) and len(entries(snap)) == 1000
    assert not batch_value(1.0, {"a": (1, 2)}).startswith(PACKED)  # short: plain JSON


def test_a_damaged_compressed_value_holds_nothing() -> None:
    assert entries(PACKED + "not base64 !") == []
    assert entries(PACKED + base64.b64encode(b"not zlib").decode()) == []
