"""Smoke runs of the scale-out benchmarks with tiny sizes: they build what they
measure (real etcd, namespace NVEs, the lab), print their tables and clean up.

The figures themselves come from full runs (see the benchmarks' docstrings);
here only the machinery and the built-in correctness checks are asserted.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run a benchmark; should it crash, Python's fault handler prints every thread's
    stack on its stderr, which the test prints."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=150,
        env={**os.environ, "PYTHONFAULTHANDLER": "1"},
    )
    print(result.stdout[-3000:], result.stderr[-3000:])
    return result


def test_fanout_benchmark_runs_with_both_directories() -> None:
    result = run("fanout.py", "--peers", "2,3", "--real", "1", "--runs", "1", "--workers", "2")
    assert result.returncode == 0
    out = result.stdout
    assert "embedded applied ms" in out and "etcd applied ms" in out
    assert "MISSED" not in out
    assert "the first 1 peers (at most) are hosts from the composition root" in out


def test_evacuation_benchmark_runs_and_checks_itself() -> None:
    result = run(
        "evacuation.py",
        *("--vms", "2", "--directory", "etcd", "--rate", "50"),
        *("--warmup", "0.3", "--observe", "0.5", "--hold", "0.2"),
    )
    out = result.stdout
    assert "== Summary" in out, result.stderr[-2000:]
    summary = out.split("== Summary")[1]
    assert "8/8 ok" in summary  # 4 phase events x 2 VMs
    assert "all pass" in summary  # journals, directory and every NVE agent agree
    assert "PROBLEM" not in out


# -- the etcd-served mode (`vmm nva serve` in front of etcd) ------------------------------


def test_fanout_measures_agents_streaming_from_a_server_in_front_of_etcd() -> None:
    result = run(
        "fanout.py",
        *("--peers", "3", "--real", "1", "--runs", "1", "--workers", "2"),
        *("--directories", "etcd,etcd-served"),
    )
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    assert "etcd applied ms" in out and "etcd-served applied ms" in out
    assert "of which etcd" in out  # the directory's cost split: server + etcd
    assert "MISSED" not in out


def test_evacuation_through_a_server_in_front_of_etcd_checks_itself() -> None:
    result = run(
        "evacuation.py",
        *("--vms", "2", "--directory", "etcd-served", "--rate", "50", "--timeline"),
        *("--warmup", "0.3", "--observe", "0.5", "--hold", "0.2"),
    )
    out = result.stdout
    assert "== Summary" in out, result.stderr[-2000:]
    summary = out.split("== Summary")[1]
    assert "etcd-served" in summary and "8/8 ok" in summary and "all pass" in summary
    assert "stage timeline" in out and "inflight_tunnel" in out
    assert "PROBLEM" not in out
