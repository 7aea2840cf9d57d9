"""Real libvirt live migrations, QEMU alone vs orchestrated, side by side.

For each mode one real-libvirt lab (vmm_lab.libvirt.site: two libvirtds in
lab host namespaces, a TCG guest booted on h1) and ``--runs`` live
migrations of the guest back and forth between h1 and h2, each under the
demo's six echo probe streams (vm2 and the gateway on h3, vm3 on h1; IPv4
and IPv6; ``--rate`` requests per second each):

  rarp          QEMU alone: its RARP self-announcement and the NVE agents'
                local learning, no orchestrator;
  orchestrated  the HostAgents' pipelines on the real libvirt events.

Per migration: packets lost after resume (all six streams; the strict window
ends at the first RARP on the destination's tap, see vmm_lab.libvirt.demo),
the longest black hole after resume, the slowest NVE's convergence (first
RARP -> the NVE programmed the new host) and libvirt's own downtime. The
summary gives median [min - max] per mode.

Run as root:  .venv/bin/python benchmarks/libvirt_migration.py --runs 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from vmm_lab.libvirt import demo
from vmm_lab.libvirt.site import lab_conf, libvirt_site
from vmm_lab.linux.probe import format_table
from vmm_lab.linux.topology import new_prefix

LABELS = {"rarp": "QEMU alone (RARP)", "orchestrated": "orchestrated"}

#: (row label, value of one migration) for the side-by-side summary.
FIGURES: list[tuple[str, Callable[[demo.MigrationResult], float | None]]] = [
    ("lost after resume (6 streams)", lambda r: r.lost_after_resume),
    ("  same, window to RESUMED event", lambda r: r.lost_after_resumed_event),
    ("max black-hole ms", lambda r: r.max_black_hole_ms),
    ("max NVE convergence ms", lambda r: r.max_convergence_ms),
    ("libvirt downtime ms", lambda r: r.libvirt_downtime_ms),
    ("SUSPENDED -> 1st RARP ms", lambda r: (r.took_over_at - r.suspended_at) * 1000.0),
    ("lost while paused (6 streams)", lambda r: sum(s.lost_while_paused for s in r.streams)),
    ("lost in total (6 streams)", lambda r: sum(s.lost for s in r.streams)),
    ("duplicates", lambda r: sum(s.duplicates for s in r.streams)),
    ("reordered", lambda r: sum(s.reordered for s in r.streams)),
    ("held (delivered, sent while paused)", lambda r: sum(s.held for s in r.streams)),
    (
        "held +ms max (over the path's own)",
        lambda r: max((s.held_extra_ms_max or 0.0 for s in r.streams), default=None),
    ),
    ("migration wall ms", lambda r: r.wall_ms),
    ("destination tap drops", lambda r: r.tap_dropped),
]


def run_mode(mode: str, runs: int, rate: int) -> list[demo.MigrationResult]:
    """``runs`` migrations h1 <-> h2 of one real guest in a fresh lab."""
    results = []
    conf = lab_conf(orchestrated=mode == "orchestrated")
    with libvirt_site(conf, new_prefix(), orchestrated=mode == "orchestrated") as ls:
        print(f"-- {LABELS[mode]}: lab up ({ls.figures})", flush=True)
        for i in range(runs):
            res = demo.measured_migration(ls, rate=rate, mode=mode)
            results.append(res)
            print(
                f"   {i + 1}/{runs} {res.source}->{res.destination}: lost after resume "
                f"{res.lost_after_resume}, black hole {res.max_black_hole_ms:.1f} ms, "
                f"libvirt downtime {res.libvirt_downtime_ms} ms"
                + (f", errors {res.errors}" if res.errors else ""),
                flush=True,
            )
    return results


def _cell(values: Sequence[float | None]) -> str:
    known = [float(v) for v in values if v is not None]
    if not known:
        return "-"
    never = len(values) - len(known)
    text = f"{statistics.median(known):.1f} [{min(known):.1f} - {max(known):.1f}]"
    return text + (f" ({never} never)" if never else "")


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def render(by_mode: dict[str, list[demo.MigrationResult]]) -> str:
    """Per-migration rows, then the side-by-side summary."""
    rows = []
    for mode, results in by_mode.items():
        for i, r in enumerate(results, 1):
            rows.append(
                {
                    "mode": LABELS[mode],
                    "run": i,
                    "move": f"{r.source}->{r.destination}",
                    "lost": r.lost_after_resume,
                    "lost_resumed": r.lost_after_resumed_event,
                    "bh": round(r.max_black_hole_ms, 1),
                    "conv": None
                    if r.max_convergence_ms is None
                    else round(r.max_convergence_ms, 1),
                    "downtime": r.libvirt_downtime_ms,
                    "window": round((r.took_over_at - r.suspended_at) * 1000.0, 1),
                    "dups": sum(s.duplicates for s in r.streams),
                    "tap": r.tap_dropped,
                    "errors": len(r.errors),
                }
            )
    lines = [
        "== Every migration ==",
        format_table(
            rows,
            [
                ("mode", "mode"),
                ("run", "run"),
                ("move", "move"),
                ("lost", "lost after resume"),
                ("lost_resumed", "(to RESUMED)"),
                ("bh", "max black-hole ms"),
                ("conv", "max convergence ms"),
                ("downtime", "libvirt downtime ms"),
                ("window", "SUSPENDED->1st RARP ms"),
                ("dups", "dup"),
                ("tap", "dst tap drops"),
                ("errors", "errors"),
            ],
        ),
        "",
        "== Side by side: median [min - max] over the migrations of each mode ==",
    ]
    modes = list(by_mode)
    summary = [
        {"figure": label, **{m: _cell([get(r) for r in by_mode[m]]) for m in modes}}
        for label, get in FIGURES
    ]
    summary.append(
        {
            "figure": "total lost after resume",
            **{m: str(sum(r.lost_after_resume for r in by_mode[m])) for m in modes},
        }
    )
    lines.append(format_table(summary, [("figure", "figure")] + [(m, LABELS[m]) for m in modes]))
    lines += _wall_time(by_mode)
    for mode, results in by_mode.items():
        for i, r in enumerate(results, 1):
            for err in r.errors:
                lines.append(f"ERROR ({LABELS[mode]} run {i}): {err}")
    return "\n".join(lines)


def _wall_time(by_mode: dict[str, list[demo.MigrationResult]]) -> list[str]:
    """The wall time the orchestrator adds (median against median) and where its
    PREPARE (synchronous, behind libvirt's hook) spends it, stage by stage."""
    walls = {m: statistics.median(r.wall_ms for r in rs) for m, rs in by_mode.items() if rs}
    if "rarp" not in walls or "orchestrated" not in walls:
        return []
    lines = [
        "",
        f"== Added migration wall time: {walls['orchestrated'] - walls['rarp']:+.1f} ms "
        f"(median orchestrated {walls['orchestrated']:.1f} - median QEMU alone "
        f"{walls['rarp']:.1f}) ==",
    ]
    per_stage: dict[tuple[str, str], list[float]] = {}
    for r in by_mode["orchestrated"]:
        for row in r.timeline:
            if row["phase"] in ("PREPARE", "SWITCHOVER"):
                key = (row["phase"], row["stage"])
                end = float(row["start_ms"]) + float(row["duration_ms"])
                per_stage.setdefault(key, []).append(end)
    rows = [
        {"phase": phase, "stage": stage, "end": _cell(ends)}
        for (phase, stage), ends in sorted(per_stage.items())
    ]
    if rows:
        lines.append(
            format_table(
                rows,
                [
                    ("phase", "phase"),
                    ("stage", "stage"),
                    ("end", "ends ms after the phase's event: median [min - max]"),
                ],
            )
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="migrations per mode (default 5)")
    parser.add_argument(
        "--rate", type=int, default=demo.DEFAULT_RATE, help="echo requests/s per stream"
    )
    parser.add_argument("--modes", default=",".join(demo.MODES), help="rarp,orchestrated")
    parser.add_argument("--json", metavar="FILE", help="also write every result as JSON")
    args = parser.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in demo.MODES]
    if bad or args.runs < 1:
        parser.error(f"modes must be among {', '.join(demo.MODES)} and --runs >= 1")
    demo.check_prerequisites()
    started = time.monotonic()
    by_mode = {mode: run_mode(mode, args.runs, args.rate) for mode in modes}
    print()
    print(render(by_mode))
    print(
        f"\n{args.runs} migration(s) per mode at {args.rate} pps per stream, "
        f"{time.monotonic() - started:.0f} s"
    )
    if args.json:
        doc: dict[str, Any] = {m: [r.to_dict() for r in rs] for m, rs in by_mode.items()}
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(doc, fh, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
