"""Smoke runs of the benchmarks' etcd-served mode (`vmm nva serve` in front of etcd), tiny
sizes: the machinery works and the built-in checks pass; figures come from full runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=150,
    )
    print(result.stdout[-3000:], result.stderr[-3000:])
    return result


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
