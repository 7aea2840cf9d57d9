"""Soak: N live migrations back and forth through the assembled hosts, and what leaks.

The namespace lab's hosts come from the product's composition root
(``lab_site`` -> ``vmm_orchestrator.agent.assemble``): directory client,
Linux NVE + NVE agent, journal, pipeline and dispatcher, exactly what
``vmm agent`` runs; LabHypervisor drives the phases. vm1 moves h1 <-> h2
``--migrations`` times (default 1,000), with a ping from the gateway after
each move. Before and after (after a warm-up of ``--warmup`` migrations, so
that caches and thread pools are counted as steady state) it prints:

* this process's open descriptors, threads and RSS;
* the lab's network namespaces;
* FDB entries per host (bridge + VXLAN), nftables objects per host
  (tables, chains, rules, set elements), conntrack entries per host;
* the journal's migrations (they stay: history), and the directory's change
  log length.

Every count must return to its value before the run (RSS within 10%); the
exit status is 1 if one does not. Beside them, not judged: glibc's heap in
use and free-but-kept, and SQLite's memory (page caches fill up to 2 MB per
journal connection), which tell a leak from allocator churn or a cache
filling. ``--trace FRAMES`` adds what grew at the Python level between the
two counts (tracemalloc by traceback, live objects by type); it makes the
run about three times slower.

Run as root: ``.venv/bin/python benchmarks/soak.py --migrations 1000``.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import gc
import json
import os
import resource
import sys
import threading
import time
import tracemalloc
from collections import Counter
from typing import Any

from oslo_config import cfg

from vmm_lab.linux.demo import lab_site
from vmm_lab.linux.hypervisor import LabHypervisor, MigrationVetoed
from vmm_lab.linux.topology import in_ns, lab_namespaces, new_prefix
from vmm_orchestrator import options
from vmm_orchestrator.nva import options as nva_options

HOSTS = ("h1", "h2", "h3")


def make_conf(hold_s: float) -> cfg.ConfigOpts:
    conf = options.new_conf()  # every plugin's options, as `vmm` registers them
    conf.set_override("hold_time", hold_s, group="stage_hold_timer")
    conf.set_override("watch_timeout", 1.0, group="nve_agent")
    # The directory keeps a window of its change log (by default 100,000
    # changes); a soak of 1,000 migrations must see the window in force.
    conf.set_override("change_log_keep", 500, group=nva_options.GROUP)
    return conf


def rss_kib() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


class _Mallinfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def native_memory() -> dict[str, int]:
    """Where RSS goes (shown, not judged): anonymous and file-backed RSS (the
    latter is library code paged in, not memory in use), glibc's heap in use
    and free-but-kept over all arenas (mallinfo2), SQLite's own allocations
    (its page caches among them). A heap that grows "free" while "used"
    stays is the allocator keeping churn, not a leak."""
    figures: dict[str, int] = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(("RssAnon:", "RssFile:")):
                figures[f"rss_{line[3:7].lower()}_kib"] = int(line.split()[1])
    try:
        libc = ctypes.CDLL(None)
        libc.mallinfo2.restype = _Mallinfo2
        info = libc.mallinfo2()
        figures["heap_used_kib"] = (info.uordblks + info.hblkhd) // 1024
        figures["heap_free_kib"] = info.fordblks // 1024
    except (OSError, AttributeError):  # not glibc, or older than 2.33
        pass
    name = ctypes.util.find_library("sqlite3")
    if name:
        sqlite = ctypes.CDLL(name)
        sqlite.sqlite3_memory_used.restype = ctypes.c_int64
        figures["sqlite_kib"] = sqlite.sqlite3_memory_used() // 1024
    return figures


def nft_objects(netns: str) -> int:
    out = in_ns(netns, "nft", "-j", "list", "ruleset", check=False)
    count = 0
    for item in json.loads(out or '{"nftables": []}').get("nftables", []):
        for kind in ("table", "chain", "rule"):
            count += kind in item
        if "set" in item:
            count += 1 + len(item["set"].get("elem", []) or [])
    return count


def snapshot(site: Any, prefix: str) -> dict[str, int]:
    gc.collect()
    figures = {
        "descriptors": len(os.listdir("/proc/self/fd")),
        "threads": threading.active_count(),
        "rss_kib": rss_kib(),
        "namespaces": len(lab_namespaces(prefix)),
    }
    for name in HOSTS:
        ns = site.lab.hosts[name].netns
        fdb = json.loads(in_ns(ns, "bridge", "-j", "fdb", "show", check=False) or "[]")
        figures[f"fdb_{name}"] = len(fdb)
        figures[f"nft_{name}"] = nft_objects(ns)
        ct = in_ns(ns, "conntrack", "-C", check=False).strip()
        figures[f"conntrack_{name}"] = int(ct) if ct.isdigit() else -1
    return figures


def object_census() -> Counter[str]:
    """Live objects per type, as the collector sees them (what a per-migration leak grows)."""
    gc.collect()
    return Counter(type(obj).__qualname__ for obj in gc.get_objects())


def print_growth(
    first: tracemalloc.Snapshot | None,
    census: Counter[str],
    migrations: int,
    top: int,
) -> None:
    """Print what grew between the two counts: allocations by traceback, then live objects."""
    if first is not None:
        second = tracemalloc.take_snapshot().filter_traces(
            (tracemalloc.Filter(False, tracemalloc.__file__),)
        )
        stats = second.compare_to(first, "traceback")
        grown = sum(s.size_diff for s in stats)
        print(f"\ntracemalloc: {grown / 1024:+.0f} KiB over {migrations} migrations")
        for stat in stats[:top]:
            print(f"{stat.size_diff / 1024:+10.1f} KiB {stat.count_diff:+8d} blocks")
            for line in stat.traceback.format(limit=tracemalloc.get_traceback_limit()):
                print(f"    {line}")
    after = object_census()
    diffs = sorted(((after[k] - census.get(k, 0), k) for k in after), reverse=True)
    print("\nlive objects grown (type: count)")
    for diff, kind in diffs[:top]:
        if diff > 0:
            print(f"  {kind}: {diff:+d} ({after[kind]})")


def returned(key: str, before: int, after: int) -> bool:
    """Whether figure ``key`` returned to its value before the run: RSS within
    10%; descriptors and threads at most as many (a timer thread may have ended
    meanwhile); every other count exactly."""
    if key == "rss_kib":
        return abs(after - before) <= 0.10 * before
    if key in ("descriptors", "threads"):
        return after <= before
    return after == before


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--migrations", type=int, default=1000)
    parser.add_argument(
        "--warmup",
        type=int,
        default=500,
        help="migrations before the first count: caches (SQLite pages, the directory's "
        "change-log window, allocator pools) fill up within about 400",
    )
    parser.add_argument("--downtime-ms", type=float, default=20.0)
    parser.add_argument("--hold", type=float, default=0.05, help="[stage_hold_timer] hold_time")
    parser.add_argument(
        "--trace",
        type=int,
        default=0,
        metavar="FRAMES",
        help="trace allocations (tracemalloc, FRAMES frames deep) from the start, and print "
        "what grew between the counts by traceback, and the live objects grown per type",
    )
    parser.add_argument("--top", type=int, default=25, help="lines of --trace output")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("soak: run as root (it builds network namespaces)", file=sys.stderr)
        return 2
    if args.trace:
        tracemalloc.start(args.trace)
    conf = make_conf(args.hold)
    prefix = new_prefix()
    failures = 0
    with lab_site(conf, prefix, orchestrated=True) as site:
        vm1, gw = site.lab.vms["vm1"], site.lab.vms["gw"]
        hyper = LabHypervisor(site.lab, site.dispatchers, qemu_rarp=False)

        def move(i: int) -> None:
            nonlocal failures
            dst = "h2" if vm1.host == "h1" else "h1"
            try:
                _, futures = hyper.migrate(vm1, dst, args.downtime_ms)
            except MigrationVetoed as exc:  # the VM stayed: counted, the soak goes on
                failures += 1
                print(f"migration {i}: {exc}")
                return
            reports = [f.result(timeout=60) for f in futures]
            if not all(r.ok for r in reports):
                failures += 1
                print(f"migration {i}: {[r.error for r in reports if not r.ok]}")

        for i in range(args.warmup):
            move(i)
        before = snapshot(site, prefix)
        native_before = native_memory()
        first = tracemalloc.take_snapshot() if args.trace else None
        census = object_census() if args.trace else Counter()
        started = time.monotonic()
        for i in range(args.migrations):
            move(i)
            if (i + 1) % 100 == 0:
                took = time.monotonic() - started
                native = ", ".join(f"{k} {v}" for k, v in native_memory().items())
                print(
                    f"{i + 1} migrations, {took:.0f} s, RSS {rss_kib()} KiB; {native}", flush=True
                )
        if vm1.host != "h1":
            move(-1)  # end where it started, so the tables compare
        time.sleep(1.5)  # the last hold timer and the agents' acknowledgements
        after = snapshot(site, prefix)
        native_after = native_memory()
        if args.trace:
            print_growth(first, census, args.migrations, args.top)
            first = None
        pings = in_ns(gw.netns, "ping", "-c", "3", "-i", "0.2", vm1.ipv4, check=False)
        reachable = " 0% packet loss" in pings
    left = lab_namespaces(prefix)
    took = time.monotonic() - started
    print(
        f"\n{args.migrations} migrations in {took:.0f} s ({failures} failed); vm1 reachable:"
        f" {reachable}; namespaces left after teardown: {len(left)}\n"
    )
    print(f"{'figure':<14} {'before':>10} {'after':>10}  ok")
    bad = failures > 0 or not reachable or bool(left)
    for key, value in before.items():
        now = after[key]
        ok = returned(key, value, now)
        bad |= not ok
        print(f"{key:<14} {value:>10} {now:>10}  {'yes' if ok else 'NO'}")
    for key, value in native_before.items():  # where RSS went: shown, not judged
        print(f"{key:<14} {value:>10} {native_after.get(key, -1):>10}  -")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
