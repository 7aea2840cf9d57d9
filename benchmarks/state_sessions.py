"""Issue 12's lab proof: N concurrent TCP sessions through the stateful firewall
survive a live migration with state, and the pause costs what it costs without.

One run, two modes side by side, each in a fresh namespace lab whose hosts
come from the composition root (``lab_site``: the agent's assembly in
process) with the model stateful firewall on every host: vm1 (on h1) serves
an echo service that only known sessions may reach; vm2 (on h3) opens
``--sessions`` connections (default 1,000) and keeps sending on all of them
(``--rate`` lines per second in all) while vm1 live-migrates to h2 with
QEMU's pause-before-switchover (the resume waits for SWITCHOVER, whose
state delta then sits inside the pause). Printed per mode: sessions
established and still echoing afterwards, the longest stall of any session,
the pause (paused -> resumed), the wait for SWITCHOVER inside it, and the
state moved (pre-copy and delta entries per kind).

Run as root: ``.venv/bin/python benchmarks/state_sessions.py [--sessions 1000]``.
Exit status 1 if a session broke with state, or the baseline did not break.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from typing import Any

from oslo_config import cfg

from vmm_lab.firewall import FirewallSettings
from vmm_lab.linux.demo import PortProfile, lab_site
from vmm_lab.linux.probe import format_table
from vmm_lab.linux.topology import new_prefix
from vmm_lab.state_demo import transfer_rows
from vmm_orchestrator import options
from vmm_orchestrator.model import Phase

PORT = 7100


def make_conf() -> cfg.ConfigOpts:
    conf = options.new_conf()  # every plugin's options, as `vmm` registers them
    conf.set_override("hold_time", 1.0, group="stage_hold_timer")
    conf.set_override("watch_timeout", 1.0, group="nve_agent")
    return conf


def _ready(proc: subprocess.Popen[str], what: str, timeout: float = 120.0) -> str:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    line = proc.stdout.readline()
    if "ready" not in line or time.monotonic() > deadline:
        raise RuntimeError(f"{what} did not start: {line!r}")
    return line


def run_mode(conf: cfg.ConfigOpts, with_state: bool, sessions: int, rate: float) -> dict[str, Any]:
    row: dict[str, Any] = {"mode": "with state" if with_state else "without state"}
    py = [sys.executable, "-m", "vmm_lab.tcp_sessions"]
    # The SYN-flood meter would blacklist a peer opening N sessions at once: raise it
    # (the blacklist proof is vmm lab state-demo's).
    firewall = FirewallSettings(syn_rate=100_000, syn_burst=100_000)
    with lab_site(
        conf,
        new_prefix(),
        orchestrated=True,
        state=True,
        move_state=with_state,
        firewall=firewall,
    ) as site:
        vm1, peer = site.lab.vms["vm1"], site.lab.vms["vm2"]
        site.set_profile("vm1", PortProfile(services=(PORT,), snoop=False))
        server = site.lab.popen(
            vm1.netns, *py, "serve", "--bind", vm1.ipv4, "--port", str(PORT),
            stdout=subprocess.PIPE,
        )  # fmt: skip
        out = os.path.join(site.workdir, "sessions.json")
        client = None
        try:
            _ready(server, "the echo server")
            client = site.lab.popen(
                peer.netns, *py, "clients", "--dst", vm1.ipv4, "--port", str(PORT),
                "--count", str(sessions), "--rate", str(rate), "--out", out,
                stdout=subprocess.PIPE,
            )  # fmt: skip
            _ready(client, "the clients")
            time.sleep(1.0)  # traffic on every session before the move
            hyper = site.state_hypervisor()
            record, futures = hyper.migrate(vm1, "h2", conf.lab.downtime_ms)
            reports = [f.result(timeout=120) for f in futures]
            time.sleep(3.0)  # traffic after the move
            client.send_signal(signal.SIGTERM)
            client.wait(timeout=120)
            with open(out) as fh:
                row.update(json.load(fh))
            row["pause_ms"] = round(record.downtime_ms, 1)
            wait = record.switchover_wait_ms
            row["switchover_wait_ms"] = None if wait is None else round(wait, 1)
            row["errors"] = [f"{r.phase.value} {r.host}: {r.error}" for r in reports if not r.ok]
            row["moved"] = [
                f"{t['transfer'].split(' ')[0]} {t['kind']} {t['entries']}"
                for t in transfer_rows(reports)
            ]
            row["delta"] = delta_breakdown(reports)
            row["switchover"] = switchover_timeline(reports)
        finally:
            for proc in (client, server):
                if proc is not None and proc.poll() is None:
                    proc.kill()
                    proc.wait(timeout=10)
    return row


def delta_breakdown(reports: list[Any]) -> dict[str, Any] | None:
    """The SWITCHOVER state stage (inside the pause): its wall time, the transfer's,
    and per kind the ms spent exporting at the source and importing at the destination."""
    for report in reports:
        for timing in report.timeline:
            if timing.stage != "state_delta":
                continue
            notes = timing.notes
            return {
                "stage_ms": round(timing.duration_ms, 1),
                "transfer_ms": notes.get("transfer_ms"),
                "transfers": notes.get("transfers"),
                "ahead_ms": round(timing.duration_ms - (notes.get("delta_ms") or 0.0), 1),
                "identity_ms": notes.get("identity_ms"),
                "kinds": {
                    kind: (fig.get("export_ms"), fig.get("import_ms"))
                    for kind, fig in (notes.get("kinds") or {}).items()
                },
            }
    return None


def switchover_timeline(reports: list[Any]) -> str:
    """The SWITCHOVER phase's stages (inside the pause): ``stage@start+duration`` ms,
    the start counted from the pause (the hypervisor's signal)."""
    for report in reports:
        if report.phase is Phase.SWITCHOVER:
            return " ".join(
                f"{t.stage}@{t.started_offset_ms:.1f}+{t.duration_ms:.1f}" for t in report.timeline
            )
    return "-"


def _median(values: list[float | None]) -> float | None:
    known = sorted(v for v in values if v is not None)
    if not known:
        return None
    mid = len(known) // 2
    return known[mid] if len(known) % 2 else (known[mid - 1] + known[mid]) / 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=1000.0, help="lines per second in all")
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="runs of each mode (alternating); the medians of the pauses are compared "
        "(a shared machine's noise is tens of ms)",
    )
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("state_sessions: run as root (it builds network namespaces)", file=sys.stderr)
        return 2
    conf = make_conf()
    rows = [
        run_mode(conf, with_state, args.sessions, args.rate)
        for _ in range(max(1, args.repeat))
        for with_state in (True, False)
    ]
    table = [
        {
            "mode": r["mode"],
            "sessions": r.get("established"),
            "alive": r.get("alive"),
            "stall": r.get("longest_stall_ms"),
            "pause": r.get("pause_ms"),
            "wait": r.get("switchover_wait_ms"),
            "moved": "; ".join(r.get("moved") or []) or "-",
        }
        for r in rows
    ]
    columns = [
        ("mode", "mode"),
        ("sessions", "sessions"),
        ("alive", "alive after"),
        ("stall", "longest stall ms"),
        ("pause", "pause ms"),
        ("wait", "SWITCHOVER wait ms"),
        ("moved", "state moved (entries)"),
    ]
    print(format_table(table, columns))
    stated = [r for r in rows if r["mode"] == "with state"]
    bare = [r for r in rows if r["mode"] != "with state"]
    for r in rows:
        for error in r.get("errors") or []:
            print(f"{r['mode']}: {error}", file=sys.stderr)
    for r in stated:
        print(f"state inside the pause (state_delta): {r.get('delta')}")
    for r in rows:
        print(f"SWITCHOVER stages, {r['mode']} (stage@start+ms): {r.get('switchover')}")
    ok = all(r.get("alive") == args.sessions for r in stated) and all(
        (r.get("alive") or 0) < args.sessions for r in bare
    )
    pause = _median([r.get("pause_ms") for r in stated]) or 0.0
    base = _median([r.get("pause_ms") for r in bare]) or 0.0
    wait = _median([r.get("switchover_wait_ms") for r in stated]) or 0.0
    base_wait = _median([r.get("switchover_wait_ms") for r in bare]) or 0.0
    print(f"\nmedian pause: with state {pause:.1f} ms, without {base:.1f} ms "
          f"({len(stated)} run(s) each)")  # fmt: skip
    print(f"median SWITCHOVER wait: with state {wait:.1f} ms, without {base_wait:.1f} ms")
    print(f"pause with state - pause without: {pause - base:+.1f} ms")
    deltas = [r["delta"] for r in stated if r.get("delta")]
    if deltas:
        stage = _median([d["stage_ms"] for d in deltas]) or 0.0
        exports = {
            kind: _median([d["kinds"].get(kind, (None, None))[0] for d in deltas])
            for kind in deltas[0]["kinds"]
        }
        shown = ", ".join(f"{k} {v:.2f}" for k, v in exports.items() if v is not None)
        print(f"median state_delta stage: {stage:.1f} ms; median export ms per kind: {shown}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
