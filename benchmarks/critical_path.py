"""Critical path of the RESUMED phase, measured over repeated migrations.

Builds one orchestrated lab and live-migrates vm1 back and forth between h1
and h2 (``--runs`` times). For each run it takes, from the engine's
timeline: RESUMED event -> first gratuitous ARP handed to the kernel, the
RESUMED stages' durations, and directory commit -> acknowledgement by each
NVE. Prints median, p90, min and max. ``--traffic`` adds the demo's six
probe streams as background load (the machine has two cores).

Run as root:  .venv/bin/python benchmarks/critical_path.py --runs 20
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

from vmm_lab.linux.demo import lab_site
from vmm_lab.linux.hypervisor import LabHypervisor
from vmm_lab.linux.probe import format_table
from vmm_lab.linux.topology import new_prefix
from vmm_orchestrator import options


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def summarize(name: str, values: list[float]) -> dict[str, object]:
    return {
        "figure": name,
        "n": len(values),
        "median": f"{statistics.median(values):.2f}",
        "p90": f"{percentile(values, 0.9):.2f}",
        "min": f"{min(values):.2f}",
        "max": f"{max(values):.2f}",
    }


def start_traffic(site, rate: int) -> list[subprocess.Popen[str]]:
    """Probe senders at both of vm1's addresses; nothing receives, load only."""
    lab = site.lab
    vm1 = lab.vms["vm1"]
    procs = []
    for peer in ("vm2", "vm3", "gw"):
        for addr in (vm1.ipv4, vm1.ipv6):
            procs.append(
                lab.popen(
                    lab.vms[peer].netns,
                    sys.executable,
                    "-m",
                    "vmm_lab.linux.probe",
                    "send",
                    "--dst",
                    addr,
                    "--port",
                    "5201",
                    "--rate",
                    str(rate),
                    "--duration",
                    "3600",
                    "--stream",
                    f"{peer}-{addr}",
                    "--out",
                    "/dev/null",
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
    return procs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--downtime-ms", type=float, default=50.0)
    parser.add_argument("--traffic", action="store_true", help="add the demo's probe load")
    args = parser.parse_args()
    conf = options.new_conf()  # every plugin's options, as `vmm` registers them
    conf.set_override("hold_time", 0.2, group="stage_hold_timer")
    figures: dict[str, list[float]] = {}
    with lab_site(conf, new_prefix(), orchestrated=True) as site:
        procs = start_traffic(site, 1000) if args.traffic else []
        try:
            vm1 = site.lab.vms["vm1"]
            hyper = LabHypervisor(site.lab, site.dispatchers, qemu_rarp=True)
            for run in range(args.runs):
                target = "h2" if vm1.host == "h1" else "h1"
                record, futures = hyper.migrate(vm1, target, args.downtime_ms)
                reports = [f.result(timeout=60) for f in futures]
                failed = [r.error for r in reports if not r.ok]
                if failed:
                    print(f"run {run}: {failed}", file=sys.stderr)
                    return 1
                for rep in reports:
                    for t in rep.timeline:
                        if rep.phase.value == "RESUMED":
                            figures.setdefault(f"{t.stage} duration ms", []).append(t.duration_ms)
                        first = t.notes.get("first_frame_monotonic")
                        if first is not None:
                            ms = (float(first) - record.resumed_at) * 1000.0
                            figures.setdefault("RESUMED -> first GARP ms", []).append(ms)
                        for nve, ms in t.notes.get("convergence_ms", {}).items():
                            figures.setdefault("commit -> ack ms (all NVEs)", []).append(ms)
                            del nve
                time.sleep(0.05)
        finally:
            for proc in procs:
                proc.kill()
                proc.wait()
    rows = [summarize(name, values) for name, values in figures.items()]
    load = "with probe load (6 x 1000 pps)" if args.traffic else "no probe load"
    print(f"RESUMED critical path over {args.runs} migrations, {load}:")
    print(format_table(rows, [(k, k) for k in ("figure", "n", "median", "p90", "min", "max")]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
