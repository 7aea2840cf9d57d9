"""The fan-out benchmark's arithmetic (benchmarks/fanout.py): per-peer cost without the
move's fixed part."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]


def _fanout() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fanout_bench", ROOT / "benchmarks/fanout.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row(directory: str, n: int, dir_us: list[float]) -> dict[str, object]:
    return {"directory": directory, "n": n, "dir_us": dir_us}


def test_the_cost_per_added_peer_leaves_the_fixed_part_out() -> None:
    """A move costing 2 ms + 30 us per peer: 230 us/peer at 10 peers, 30 per added peer."""
    fanout = _fanout()
    fixed, per_peer = 2000.0, 30.0
    rows = [_row("embedded", n, [(fixed + per_peer * n) / n] * 3) for n in (1000, 10, 100)] + [
        _row("etcd-served", 10, [500.0]),
        _row("etcd-served", 100, []),
    ]
    out = fanout._marginal(rows)
    assert out[("embedded", 100)] == "30.0" and out[("embedded", 1000)] == "30.0"
    assert ("embedded", 10) not in out  # nothing to compare the smallest N with
    assert ("etcd-served", 100) not in out  # no figures at that N


def test_etcd_requests_are_counted_per_grpc_method_from_its_metrics() -> None:
    fanout = _fanout()
    text = "\n".join(
        [
            "# HELP grpc_server_started_total Total number of RPCs started on the server.",
            'grpc_server_started_total{grpc_method="Txn",grpc_service="etcdserverpb.KV",'
            'grpc_type="unary"} 12',
            'grpc_server_started_total{grpc_method="Range",grpc_service="etcdserverpb.KV",'
            'grpc_type="unary"} 0',
            'grpc_server_started_total{grpc_method="Watch",grpc_service="etcdserverpb.Watch",'
            'grpc_type="bidi_stream"} 3',
            'grpc_server_handled_total{grpc_code="OK",grpc_method="Txn",grpc_service="x",'
            'grpc_type="unary"} 11',
        ]
    )
    assert fanout._started(text) == {"Txn": 12, "Watch": 3}
