"""The fan-out benchmark's own outputs (benchmarks/fanout.py), with tiny sizes: the
directory's cost per added peer, the ack writes per move, and --profile's per-thread
profiles of the server."""

from __future__ import annotations

import pstats
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_table_has_the_cost_per_added_peer_and_the_servers_profile(tmp_path: Path) -> None:
    prefix = tmp_path / "prof"
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks/fanout.py"),
            *("--peers", "2,3", "--real", "0", "--runs", "1", "--workers", "2"),
            *("--directories", "embedded,etcd-served", "--profile", str(prefix)),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=150,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    assert "us/added peer" in out and "ack writes" in out and "MISSED" not in out
    for name in ("embedded", "etcd-served"):
        hubs = list(tmp_path.glob(f"prof-{name}-3-hub-*.prof"))
        assert len(hubs) == 1, sorted(p.name for p in tmp_path.iterdir())
        functions = {f[2] for f in pstats.Stats(str(hubs[0])).stats}  # type: ignore[attr-defined]
        assert "_deliver" in functions  # the hub thread's own work, not the process's
        assert list(tmp_path.glob(f"prof-{name}-3-acks-*.prof"))
