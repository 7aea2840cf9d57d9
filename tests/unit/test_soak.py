"""benchmarks/soak.py's own logic, without a lab: what counts as returned to
the starting value, what it reports about native memory and about growth."""

from __future__ import annotations

import importlib.util
import pathlib
import tracemalloc
from collections import Counter
from types import ModuleType

import pytest

SOAK = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "soak.py"


@pytest.fixture(scope="module")
def soak() -> ModuleType:
    spec = importlib.util.spec_from_file_location("soak_under_test", SOAK)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rss_may_move_10_percent_either_way(soak: ModuleType) -> None:
    assert soak.returned("rss_kib", 100_000, 110_000)
    assert soak.returned("rss_kib", 100_000, 90_000)
    assert not soak.returned("rss_kib", 100_000, 110_001)
    assert not soak.returned("rss_kib", 104_800, 137_900)  # the run that opened this


def test_descriptors_and_threads_may_only_drop(soak: ModuleType) -> None:
    for key in ("descriptors", "threads"):
        assert soak.returned(key, 95, 95) and soak.returned(key, 97, 95)
        assert not soak.returned(key, 95, 96)


def test_every_other_count_must_be_equal(soak: ModuleType) -> None:
    for key in ("namespaces", "fdb_h1", "nft_h2", "conntrack_h3"):
        assert soak.returned(key, 34, 34)
        assert not soak.returned(key, 34, 33) and not soak.returned(key, 34, 35)


def test_native_memory_reports_rss_kinds_the_heap_and_sqlite(soak: ModuleType) -> None:
    import sqlite3

    figures = soak.native_memory()
    assert figures["heap_used_kib"] > 0 and figures["heap_free_kib"] >= 0  # glibc >= 2.33
    assert figures["rss_anon_kib"] > 0 and figures["rss_file_kib"] > 0
    conn = sqlite3.connect(":memory:")
    try:
        conn.execute("CREATE TABLE t (x TEXT)")
        conn.executemany("INSERT INTO t VALUES (?)", [("x" * 1000,)] * 2000)
        assert soak.native_memory()["sqlite_kib"] >= figures["sqlite_kib"] + 1000
    finally:
        conn.close()


class Kept:
    def __init__(self) -> None:
        self.payload = bytearray(1000)


def test_growth_names_the_line_that_kept_memory(
    soak: ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    tracemalloc.start(5)
    try:
        first = tracemalloc.take_snapshot()
        census = soak.object_census()
        kept = [Kept() for _ in range(300)]  # the "leak"
        soak.print_growth(first, census, 300, 5)
    finally:
        tracemalloc.stop()
    out = capsys.readouterr().out
    assert "self.payload = bytearray(1000)" in out  # by traceback, where it was allocated
    assert "Kept: +300" in out  # containers the collector sees, by type
    assert len(kept) == 300
    assert isinstance(census, Counter)
