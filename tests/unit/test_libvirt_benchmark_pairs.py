"""benchmarks/libvirt_migration.py's pairing of orchestrated migrations with the
neighbouring ones made with the orchestrator off (``--paired-alone``), without a lab."""

from __future__ import annotations

import importlib.util
import pathlib
import sys
from collections.abc import Iterator
from types import ModuleType, SimpleNamespace

import pytest

pytest.importorskip("libvirt", reason="the benchmark imports the libvirt lab")

BENCH = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "libvirt_migration.py"


@pytest.fixture(scope="module")
def bench() -> Iterator[ModuleType]:
    spec = importlib.util.spec_from_file_location("libvirt_migration_under_test", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


def _on(src: str, dst: str, wall: float, downtime: float) -> SimpleNamespace:
    return SimpleNamespace(source=src, destination=dst, wall_ms=wall, libvirt_downtime_ms=downtime)


def test_each_orchestrated_migration_meets_its_same_direction_neighbours(
    bench: ModuleType,
) -> None:
    off = bench.AloneRun
    # on h1->h2, off pair (h2->h1, h1->h2), on h2->h1, off pair (h1->h2, h2->h1)
    with_it = [_on("h1", "h2", 1000.0, 100.0), _on("h2", "h1", 900.0, 50.0)]
    alone = [
        [off("h2", "h1", 800.0, 40.0), off("h1", "h2", 850.0, 60.0)],
        [off("h1", "h2", 700.0, 20.0), off("h2", "h1", 880.0, 80.0)],
    ]
    lines = bench.alone_report(with_it, alone)
    text = "\n".join(lines)
    # h1->h2: only the pair after it holds an h1->h2 neighbour (850): +150.
    # h2->h1: before it 800, after it 880: mean 840, +60. Median of (150, 60): +105.
    assert "median +105.0 ms [+60.0 - +150.0] over 2 orchestrated migrations" in text, text
    # Less downtime: h1->h2 (1000-100) - (850-60) = +110; h2->h1 (900-50) - mean(760, 800) = +70.
    assert "median +90.0 ms [+70.0 - +110.0]" in text, text
    assert "(4 migrations)" in text, text


def test_nothing_to_pair_prints_nothing(bench: ModuleType) -> None:
    assert bench.alone_report([_on("h1", "h2", 1000.0, 100.0)], []) == []
    # A pair in the other direction only (never the case in run_mode) pairs nothing.
    off = bench.AloneRun
    assert bench.alone_report([_on("h1", "h2", 1.0, 0.0)], [[off("h2", "h1", 1.0, 0.0)]]) == []
