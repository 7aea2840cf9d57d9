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

``--hook-trace`` also times every call of libvirt's qemu hook (the relay,
etc/libvirt/hooks/qemu.d/vmm-orchestrator) on both hosts: a wrapper around
the relay logs each call's operation and duration, and the report says which
calls fall inside the migration call (source or destination), how long each
took and how much of the migration's wall time they hold. The wrapper's own
``date`` calls cost a few ms per hook call, so take the added wall time from
a run without it.

``--paired`` measures the relay's own cost where a shared machine's load
swamps the difference between two labs: in the orchestrated lab, each
migration with the relay is paired with its neighbour made with a no-op hook
in its place (the agents then prepare from libvirt's events alone, nothing
vetoes), in alternating order, and the median of the pairs' differences is
printed.

``--paired-alone`` measures what the whole orchestrator adds, in one lab: two labs
differ by more than the orchestrator (another guest boot, other load), and one
migration's wall time here varies by 0.3-0.6 s on its own: QEMU switches over
once what is left fits in the allowed downtime (300 ms), so its final copy
lasts 10-370 ms depending on where its first pass stood at its first check,
and the destination QEMU's start-up under TCG takes 320-570 ms. In the
orchestrated lab each orchestrated migration is followed by a there-and-back
pair with the orchestrator off (vmm_lab.libvirt.site.orchestrator_off: no hook
process at all, the agents not listening), and each orchestrated migration is
compared with its same-direction neighbours, before and after; the median of
those differences is printed, for the wall time and for the wall time less
libvirt's downtime (which takes the final copy's chance out).

``--libvirt-log`` has both libvirtds log each migration's phases
(vmm_lab.libvirt.phaselog) and prints, per mode (and for the migrations with
the orchestrator off), how long each phase took and how long libvirtd waited
for each hook call: where the wall time goes, phase by phase.

Where the orchestrator's time goes (2026-12-07, this 2-core machine shared with
other benchmarks): only in libvirt's hook calls. With the orchestrator on and off
in one lab (load 3-5, 6 + 6 migrations), prepare took 416 ms against 381 (median)
and the destination's four hook calls 36-57 ms; the live pass, the final copy and
Finish did not differ; confirm differed by the source's two hook calls (10-29 ms).
libvirtd's own monitor call after QEMU's completion came 0-1 ms after it in every
migration checked (23, 11 of them with the agents' job reads queued during the
final copy, which QEMU answers when the copy ends), and no agent call fell in the
destination's Finish: the agents never held a libvirt job up. Hook waits per
migration: 46-76 ms at load 2-5 (``migrate begin`` 20-41 ms, of which the agent's
handler 3-9 ms and the relay's Python start-up 6 ms; each other call 2-17 ms, mostly
libvirtd starting a process), 79-94 ms median at load 10-25 (``migrate begin`` up
to 363 ms; even a relay that exits at once for ``stopped end`` took up to 45 ms
there). The +257 ms of two labs' medians was the labs' chance: the run that
printed +222 ms between the labs printed +58 ms paired in one lab
(``--runs 3 --paired-alone --libvirt-log``, load 4 -> 20). At load 2 (11:10, 3 + 6
migrations each): hook waits 90 [77-94] ms per migration with PREPARE's stages in
engine.DEFAULT_STAGES' order since 75ff7ed (nve_prepare first: the veto's answer
waits for the hold's set-up too; ``migrate begin`` 52 [38-53] ms), 65 [63-85] ms
with nva_prestage first (``migrate begin`` 37 [32-57] ms); wall time less downtime
against the orchestrator off +91 and +48 ms.

Later the same day (final code of that day, TCG guest and the in-process agents
on the 2 cores): ``--runs 12 --paired-alone`` +137.0 ms [-11.4 - +234.0] added wall,
+102.1 less libvirt's downtime; ``--runs 10 --paired-alone --libvirt-log`` prepare
540.5 against 432.5 ms (hook calls 72 of the difference: ``migrate begin`` 55.5),
final copy 74.5 against 53.0, finish 44.0 against 42.0, confirm 228.2 against
211.2. With ``--late-switchover`` (12 migrations) +69.3 ms [-29.1 - +218.6], and
libvirt's downtime 63.0 ms median against 125.5 and 100.5 in the two early runs
(about 70 with the orchestrator off in all three): the work at the pause competes
with the final copy. The late runs reordered 4.5 frames a migration and lost 7 after
the resume in all; the early runs none lost after the resume.

``--agent-processes`` serves h1 and h2 with ``vmm agent`` processes started
from config files (the operator's path) instead of agents in this process,
beside the capture threads. The figures barely moved (2026-12-07, quiet
machine, 3 migrations each, ``--modes orchestrated --hook-trace``): hook time
per migration 69.8 [48.8-72.2] ms with processes against 67.9 [59.2-90.9] in
process; ``migrate begin`` 55.7 against 55.2 ms per call. The relay's start
(19-25 ms before the agent reads the call) and the agent's directory round
trips (its answer 15-25 ms after) are what it costs, not the GIL shared with
the benchmark. With processes, vm3 (on h1) does not exist: 4 streams.
Since the relay imports no ``os`` and skips the interpreter's teardown (its
Python 17.0 -> 11.3 ms per guarded call on a quiet machine), 3 runs of 3
migrations with processes gave hook times per migration (run medians) of
65.8, 50.0 and 56.7 ms, and ``migrate begin`` 50.2, 35.1 and 42.0 ms per
call; the agent's answer came 18-28 ms after it read the call (its log).

Run as root:  .venv/bin/python benchmarks/libvirt_migration.py --runs 5
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from vmm_lab.libvirt import demo, phaselog
from vmm_lab.libvirt import hosts as hosts_mod
from vmm_lab.libvirt import site as site_mod
from vmm_lab.libvirt.site import lab_conf, libvirt_site
from vmm_lab.linux.probe import format_table
from vmm_lab.linux.topology import new_prefix
from vmm_libvirt import options as lv_options

LABELS = {"rarp": "QEMU alone (RARP)", "orchestrated": "orchestrated"}


def _held_max(r: demo.MigrationResult) -> float | None:
    """The largest latency a held frame got on top of its path's own, any stream."""
    return max((s.held_extra_ms_max or 0.0 for s in r.streams), default=None)


def _held_over(r: demo.MigrationResult, pause_ms: float | None) -> float | None:
    """How much longer than the pause the worst held frame waited; issue 16's goal
    is <= +5 ms. Two measures of the pause, which differ by tens of ms here:
    libvirt's downtime (QEMU's own figure) and the source's SUSPENDED event to
    the destination's RESUMED event (libvirt's events, each some ms after the
    fact). What is left over includes the guest working through the held frames
    after its resume (a reply is what the probe sees; TCG here) besides any time
    the orchestrator added."""
    held = _held_max(r)
    if held is None or pause_ms is None or not any(s.held for s in r.streams):
        return None
    return held - pause_ms


#: (row label, value of one migration) for the side-by-side summary.
FIGURES: list[tuple[str, Callable[[demo.MigrationResult], float | None]]] = [
    ("lost after resume (all streams)", lambda r: r.lost_after_resume),
    ("  same, window to RESUMED event", lambda r: r.lost_after_resumed_event),
    ("max black-hole ms", lambda r: r.max_black_hole_ms),
    ("max NVE convergence ms", lambda r: r.max_convergence_ms),
    ("libvirt downtime ms", lambda r: r.libvirt_downtime_ms),
    ("SUSPENDED -> 1st RARP ms", lambda r: (r.took_over_at - r.suspended_at) * 1000.0),
    ("lost while paused (all streams)", lambda r: sum(s.lost_while_paused for s in r.streams)),
    ("lost in total (all streams)", lambda r: sum(s.lost for s in r.streams)),
    ("duplicates", lambda r: sum(s.duplicates for s in r.streams)),
    ("reordered", lambda r: sum(s.reordered for s in r.streams)),
    ("held (delivered, sent while paused)", lambda r: sum(s.held for s in r.streams)),
    ("held +ms max (over the path's own)", lambda r: _held_max(r)),
    ("  less libvirt downtime", lambda r: _held_over(r, r.libvirt_downtime_ms)),
    (
        "  less SUSPENDED -> RESUMED (goal <= +5)",
        lambda r: _held_over(r, (r.resumed_at - r.suspended_at) * 1000.0),
    ),
    ("held, in the destination tap", lambda r: r.held_in_tap),
    ("  last one in after the 1st RARP, ms", lambda r: r.held_in_tap_late_ms),
    ("migration wall ms", lambda r: r.wall_ms),
    ("destination tap drops", lambda r: r.tap_dropped),
]


#: The tracing wrapper installed in place of the relay (``--hook-trace``). It runs the
#: real relay with the same arguments, stdin and stdout, and appends one line per call:
#: hostname, begin and end (ns, CLOCK_REALTIME), exit status, operation, sub-operation.
TRACE_WRAPPER = """#!/bin/sh
read -r host < /proc/sys/kernel/hostname
begin=$(date +%s%N)
{relay} "$@"
status=$?
end=$(date +%s%N)
echo "$host $begin $end $status $2 $3" >> {trace}
exit $status
"""


@dataclasses.dataclass
class HookCall:
    """One traced call of the relay."""

    host: str  # lab host name (h1, h2)
    begin_ns: int
    end_ns: int
    status: int
    call: str  # "<operation> <sub-operation>"

    @property
    def ms(self) -> float:
        return (self.end_ns - self.begin_ns) / 1e6


@dataclasses.dataclass
class HookTracer:
    """Where the hook calls of each migration fell and how long they took."""

    trace: str
    hostnames: dict[str, str] = dataclasses.field(default_factory=dict)
    #: (mode, source, destination, begin ns, end ns) of each migration call (CLOCK_REALTIME).
    windows: list[tuple[str, str, str, int, int]] = dataclasses.field(default_factory=list)
    mode: str = ""

    def calls(self) -> list[HookCall]:
        calls = []
        with contextlib.suppress(FileNotFoundError), open(self.trace, encoding="utf-8") as fh:
            for line in fh:
                words = line.split()
                if len(words) != 6:
                    continue
                host = self.hostnames.get(words[0], words[0])
                calls.append(
                    HookCall(host, int(words[1]), int(words[2]), int(words[3]), " ".join(words[4:]))
                )
        return calls

    def report(self) -> list[str]:
        """Per role and call: how many per migration, how long; the hook time per migration."""
        calls = self.calls()
        per_call: dict[tuple[str, str], list[float]] = {}
        totals: list[float] = []
        outside: dict[str, int] = {}
        inside_ids: set[int] = set()
        migrations = [w for w in self.windows if w[0] == "orchestrated"]
        for _mode, src, dst, begin, end in migrations:
            total = 0.0
            for c in calls:
                if begin <= c.begin_ns <= end and c.host in (src, dst):
                    role = "source" if c.host == src else "destination"
                    per_call.setdefault((role, c.call), []).append(c.ms)
                    total += (min(c.end_ns, end) - c.begin_ns) / 1e6
                    inside_ids.add(id(c))
            totals.append(total)
        for c in calls:
            if id(c) not in inside_ids:
                outside[c.call] = outside.get(c.call, 0) + 1
        if not migrations:
            return []
        n = len(migrations)
        rows = [
            {
                "role": role,
                "call": call,
                "per": f"{len(ms) / n:g}",
                "ms": _cell(ms),
                "sum": f"{sum(ms) / n:.1f}",
            }
            for (role, call), ms in sorted(per_call.items())
        ]
        lines = [
            "",
            f"== Hook calls inside the migration call ({n} orchestrated migrations; "
            "libvirtd waits for each) ==",
            format_table(
                rows,
                [
                    ("role", "host"),
                    ("call", "hook call"),
                    ("per", "per migration"),
                    ("ms", "relay ms: median [min - max]"),
                    ("sum", "ms per migration"),
                ],
            ),
            f"hook time inside the migration call, per migration: {_cell(totals)} ms",
        ]
        if outside:
            text = ", ".join(f"{call} x{k}" for call, k in sorted(outside.items()))
            lines.append(f"outside any migration call (boot, set-up, teardown): {text}")
        return lines


@contextlib.contextmanager
def hook_tracing() -> Iterator[HookTracer]:
    """Install the tracing wrapper in place of the relay and record each migration's window."""
    workdir = tempfile.mkdtemp(prefix="vmmhooktrace")
    tracer = HookTracer(os.path.join(workdir, "trace"))
    wrapper = os.path.join(workdir, "vmm-orchestrator")
    with open(wrapper, "w", encoding="utf-8") as fh:
        fh.write(TRACE_WRAPPER.format(relay=os.path.abspath(site_mod.RELAY), trace=tracer.trace))
    os.chmod(wrapper, 0o755)
    real_relay, real_migrate = site_mod.RELAY, demo.migrate

    def migrate(domain: str, src: Any, dst: Any, **kwargs: Any) -> Any:
        offset = time.time_ns() - time.monotonic_ns()
        record = None
        try:
            record = real_migrate(domain, src, dst, **kwargs)
        except Exception as exc:
            record = getattr(exc, "record", None)
            raise
        finally:
            if record is not None:
                tracer.windows.append(
                    (
                        tracer.mode,
                        src.name,
                        dst.name,
                        int(record.started_at * 1e9) + offset,
                        int(record.finished_at * 1e9) + offset,
                    )
                )
        return record

    site_mod.RELAY, demo.migrate = wrapper, migrate
    try:
        yield tracer
    finally:
        site_mod.RELAY, demo.migrate = real_relay, real_migrate
        shutil.rmtree(workdir, ignore_errors=True)


#: ``--paired``: what the hooks directory holds instead of the relay for every other
#: migration: a hook that does nothing (libvirt keeps its XML), so the agents prepare
#: from libvirt's events alone and nothing vetoes.
NO_OP_HOOK = "#!/bin/sh\nexit 0\n"


def _swap_hook(ls: Any, text: str) -> None:
    """Replace the hook in each libvirt host's qemu.d (atomically: libvirtd may run it)."""
    for host in ls.hosts.values():
        path = host.path("/etc/libvirt/hooks/qemu.d/vmm-orchestrator")
        with open(path + ".new", "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(path + ".new", 0o755)
        os.replace(path + ".new", path)


def run_mode(
    mode: str,
    runs: int,
    rate: int,
    tracer: HookTracer | None = None,
    paired: list[demo.MigrationResult] | None = None,
    other_hook: str = NO_OP_HOOK,
    alone: list[list[AloneRun]] | None = None,
    phases: dict[str, list[dict[str, float]]] | None = None,
    processes: bool = False,
    log: str | None = None,
    late_switchover: bool = False,
) -> list[demo.MigrationResult]:
    """``runs`` migrations h1 <-> h2 of one real guest in a fresh lab; with ``paired``
    (orchestrated), each one also followed or preceded (alternately) by a migration with
    ``other_hook`` (the text of a hook: by default a no-op) instead of the relay, appended
    to ``paired``; with ``alone`` (orchestrated), each one followed by a there-and-back
    pair with the orchestrator off, appended to ``alone`` (one list per pair); with
    ``phases``, each migration's phases from the libvirtds' logs, by label; with
    ``processes`` (orchestrated), h1 and h2 are served by ``vmm agent`` processes
    whose logs are appended to ``log``; ``late_switchover``: ``[libvirt]
    early_switchover = false`` (in the agents' config files too)."""
    results = []
    orchestrated = mode == "orchestrated"
    conf = lab_conf(orchestrated=orchestrated)
    if late_switchover:
        conf.set_override("early_switchover", False, group=lv_options.GROUP)
    with (
        libvirt_site(
            conf,
            new_prefix(),
            orchestrated=orchestrated,
            agent_processes=processes and orchestrated,
        ) as ls,
        contextlib.ExitStack() as logs,
    ):
        if log and ls.processes:
            logs.callback(_append_logs, log, ls)
        print(f"-- {LABELS[mode]}: lab up ({ls.figures})", flush=True)
        if tracer is not None:
            tracer.hostnames.update({h.hostname: name for name, h in ls.hosts.items()})
        with open(site_mod.RELAY, encoding="utf-8") as fh:
            relay = fh.read()
        for i in range(runs):
            variants = [(results, relay, "")]
            if paired is not None and mode == "orchestrated":
                label = " (no-op hook)" if other_hook == NO_OP_HOOK else " (other hook)"
                variants.append((paired, other_hook, label))
                variants = variants[:: 1 if i % 2 == 0 else -1]
            for into, hook, label in variants:
                if paired is not None and mode == "orchestrated":
                    _swap_hook(ls, hook)
                res = demo.measured_migration(ls, rate=rate, mode=mode)
                into.append(res)
                print(
                    f"   {i + 1}/{runs}{label} {res.source}->{res.destination}: lost after "
                    f"resume {res.lost_after_resume}, black hole {res.max_black_hole_ms:.1f} "
                    f"ms, libvirt downtime {res.libvirt_downtime_ms} ms, wall {res.wall_ms} ms"
                    + (f", errors {res.errors}" if res.errors else ""),
                    flush=True,
                )
            if alone is not None and mode == "orchestrated":
                alone.append(alone_pair(ls, rate, tracer))
        if phases is not None:
            _add_phases(
                ls, phases, LABELS[mode], [(r.source, r.started_at, r.wall_ms) for r in results]
            )
            if alone is not None and mode == "orchestrated":
                flat = [(a.source, a.started_at, a.wall_ms) for pair in alone for a in pair]
                _add_phases(ls, phases, ALONE_LABEL, flat)
            if paired is not None and mode == "orchestrated":
                other = [(r.source, r.started_at, r.wall_ms) for r in paired]
                _add_phases(ls, phases, "other hook", other)
    return results


ALONE_LABEL = "orchestrator off"


def _append_logs(path: str, ls: Any) -> None:
    """Append each ``vmm agent`` process's log so far to ``path``."""
    with open(path, "a", encoding="utf-8") as out:
        for name, process in ls.processes.items():
            out.write(f"--- vmm agent {name} ({process.log_path}) ---\n")
            with contextlib.suppress(OSError), open(process.log_path, errors="replace") as fh:
                shutil.copyfileobj(fh, out)


def _add_phases(
    ls: Any,
    phases: dict[str, list[dict[str, float]]],
    label: str,
    runs: list[tuple[str, float, float]],
) -> None:
    """The phases of ``runs`` ((source, monotonic start, wall ms)) from each libvirt
    host's libvirtd log (read before the lab goes), added to ``phases[label]``."""
    logs = {}
    for name, host in ls.hosts.items():
        with open(host.path("/var/log/libvirt/libvirtd.log"), errors="replace") as fh:
            logs[name] = phaselog.parse(fh.read())
    offset = time.time() - time.monotonic()
    found = phaselog.migration_phases(logs, [(src, at + offset, wall) for src, at, wall in runs])
    rows = phases.setdefault(label, [])
    for p, (_, _, wall) in zip(found, runs, strict=True):
        if p is not None:
            rows.append(_phase_row(p, wall))


def _phase_row(p: phaselog.Phases, wall_ms: float) -> dict[str, float]:
    row: dict[str, float | None] = {
        "prepare (dst hooks, QEMU start)": p.prepare_ms,
        "live (first pass)": p.live_ms,
        "final copy (paused)": p.final_copy_ms,
        "finish (dst resumes)": p.finish_ms,
        "confirm (src QEMU killed, src hooks)": p.confirm_ms(wall_ms),
        "hooks, all calls": round(p.hook_ms, 1),
    }
    for h in p.hooks:
        key = f"  hook {h.call}"
        row[key] = round((row.get(key) or 0.0) + h.ms, 1)
    return {k: v for k, v in row.items() if v is not None}


def phase_report(phases: dict[str, list[dict[str, float]]]) -> list[str]:
    """Median [min - max] of each phase per label, as libvirtd logged them (a hook
    call that did not run in a migration counts as 0 ms)."""
    labels = [label for label, rows in phases.items() if rows]
    if not labels:
        return []
    keys: list[str] = []
    for label in labels:
        for row in phases[label]:
            keys += [k for k in row if k not in keys]
    table = []
    for key in keys:
        cells = {}
        for label in labels:
            missing = 0.0 if key.startswith("  hook") else None
            cells[label] = _cell([r.get(key, missing) for r in phases[label]])
        table.append({"phase": key, **cells})
    counts = ", ".join(f"{label} {len(phases[label])}" for label in labels)
    return [
        "",
        f"== Where the wall time goes, from the libvirtds' logs (ms per migration; "
        f"migrations: {counts}) ==",
        format_table(table, [("phase", "phase")] + [(label, label) for label in labels]),
    ]


@dataclasses.dataclass
class AloneRun:
    """One migration of the orchestrated lab's guest with the orchestrator off."""

    source: str
    destination: str
    wall_ms: float
    downtime_ms: float | None
    started_at: float = 0.0  # time.monotonic() when the migration call began


def alone_pair(ls: Any, rate: int, tracer: HookTracer | None = None) -> list[AloneRun]:
    """Migrate the guest there and back with the orchestrator off, under the same echo
    streams as a measured migration (their losses are not counted: the network does
    not follow the guest while the orchestrator is off)."""
    runs: list[AloneRun] = []
    mode = tracer.mode if tracer is not None else ""
    if tracer is not None:
        tracer.mode = "alone"
    try:
        with site_mod.orchestrator_off(ls):
            for _ in range(2):
                src, dst = ls.where, ls.other(ls.where)
                echo = demo.EchoRun(
                    ls, demo.PROBERS, rate, f"alone-{src}-{dst}-{time.monotonic_ns()}"
                )
                try:
                    began = echo.start()
                    time.sleep(max(0.0, began + demo.WARMUP_S - time.monotonic()))
                    record = demo.migrate(ls.guest.name, ls.hosts[src], ls.hosts[dst])
                    ls.where = dst
                    time.sleep(demo.OBSERVE_S)
                    echo.finish()
                finally:
                    echo.kill()
                wall = round(record.wall_ms, 1)
                runs.append(AloneRun(src, dst, wall, record.downtime_ms, record.started_at))
                print(
                    f"      orchestrator off {src}->{dst}: libvirt downtime "
                    f"{record.downtime_ms} ms, wall {record.wall_ms:.1f} ms",
                    flush=True,
                )
    finally:
        if tracer is not None:
            tracer.mode = mode
    return runs


def alone_report(with_it: list[demo.MigrationResult], alone: list[list[AloneRun]]) -> list[str]:
    """The orchestrator's added wall time, paired in one lab: each orchestrated migration
    against the same-direction migration with the orchestrator off just before it (the
    first of the preceding pair) and just after it (the second of the following pair)."""
    walls: list[float] = []
    net: list[float] = []  # less libvirt's downtime: the final copy's length is chance
    for k, res in enumerate(with_it):
        near = []
        if 0 < k <= len(alone):
            near.append(alone[k - 1][0])
        if k < len(alone) and len(alone[k]) > 1:
            near.append(alone[k][1])
        near = [a for a in near if (a.source, a.destination) == (res.source, res.destination)]
        if not near:
            continue
        walls.append(res.wall_ms - statistics.mean(a.wall_ms for a in near))
        if res.libvirt_downtime_ms is not None and all(a.downtime_ms is not None for a in near):
            mine = res.wall_ms - res.libvirt_downtime_ms
            theirs = statistics.mean(a.wall_ms - (a.downtime_ms or 0.0) for a in near)
            net.append(mine - theirs)
    if not walls:
        return []
    flat = [a for pair in alone for a in pair]
    lines = [
        "",
        f"== Orchestrator's added wall time, paired in one lab (orchestrator off: no hooks, "
        f"agents not listening): median {statistics.median(walls):+.1f} ms "
        f"[{min(walls):+.1f} - {max(walls):+.1f}] over {len(walls)} orchestrated migrations ==",
        f"   orchestrated {_cell([r.wall_ms for r in with_it])} ms, orchestrator off "
        f"{_cell([a.wall_ms for a in flat])} ms ({len(flat)} migrations)",
    ]
    if net:
        lines.append(
            f"   less libvirt's downtime (the final copy's chance): median "
            f"{statistics.median(net):+.1f} ms [{min(net):+.1f} - {max(net):+.1f}]"
        )
    return lines


def paired_report(
    with_relay: list[demo.MigrationResult],
    no_op: list[demo.MigrationResult],
    other: str = "a no-op hook",
) -> list[str]:
    """The relay's cost measured in one lab: each migration with the relay against the
    neighbouring one with the other hook (same load, same guest)."""
    diffs = [a.wall_ms - b.wall_ms for a, b in zip(with_relay, no_op, strict=False)]
    if not diffs:
        return []
    return [
        "",
        f"== Hook relay's wall time against {other}, paired in one lab: median "
        f"{statistics.median(diffs):+.1f} ms [{min(diffs):+.1f} - {max(diffs):+.1f}] over "
        f"{len(diffs)} pairs (with the relay "
        f"{_cell([r.wall_ms for r in with_relay])} ms, with {other} "
        f"{_cell([r.wall_ms for r in no_op])} ms) ==",
    ]


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
    if "orchestrated" not in walls:
        return []
    lines = [""]
    if "rarp" in walls:
        lines.append(
            f"== Added migration wall time: {walls['orchestrated'] - walls['rarp']:+.1f} ms "
            f"(median orchestrated {walls['orchestrated']:.1f} - median QEMU alone "
            f"{walls['rarp']:.1f}) =="
        )
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
    parser.add_argument(
        "--relay",
        metavar="FILE",
        help="install this hook relay instead of the shipped one (e.g. an older version "
        "from git show, to compare them in the same conditions)",
    )
    parser.add_argument(
        "--paired",
        action="store_true",
        help="orchestrated: also migrate with a no-op hook in place of the relay, alternately, "
        "and print the relay's added wall time paired in one lab",
    )
    parser.add_argument(
        "--paired-with",
        metavar="FILE",
        help="with --paired: this hook instead of the no-op one (e.g. an older relay)",
    )
    parser.add_argument(
        "--paired-alone",
        action="store_true",
        help="orchestrated: after each migration, migrate there and back with the "
        "orchestrator off (no hooks, agents not listening) and print the orchestrator's "
        "added wall time paired in one lab",
    )
    parser.add_argument(
        "--libvirt-log",
        action="store_true",
        help="have the libvirtds log each migration's phases and print where the wall "
        "time goes, phase by phase, and how long libvirtd waited for each hook call",
    )
    parser.add_argument(
        "--hook-trace",
        action="store_true",
        help="time every call of libvirt's qemu hook (the relay) on both hosts",
    )
    parser.add_argument(
        "--log",
        metavar="FILE",
        help="write the agents' log (INFO: each phase's stages and timings) "
        "to FILE, to see afterwards what a migration with losses did",
    )
    parser.add_argument(
        "--agent-processes",
        action="store_true",
        help="serve h1 and h2 with `vmm agent` processes started from config files, as "
        "an operator runs them, instead of agents in this process (beside its capture "
        "threads); the stage table is then not printed (the reports stay in the processes)",
    )
    parser.add_argument(
        "--late-switchover",
        action="store_true",
        help="orchestrated: [libvirt] early_switchover = false, SWITCHOVER when the "
        "migration job completes rather than at the pause (the old tap is followed "
        "from the pause either way)",
    )
    args = parser.parse_args(argv)
    if args.log:
        handler = logging.FileHandler(args.log)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logging.getLogger().addHandler(handler)
        logging.getLogger().setLevel(logging.INFO)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in demo.MODES]
    if bad or args.runs < 1:
        parser.error(f"modes must be among {', '.join(demo.MODES)} and --runs >= 1")
    if args.paired_with and not args.paired:
        parser.error("--paired-with goes with --paired")
    if args.paired and args.paired_alone:
        parser.error("--paired and --paired-alone measure separately: give one of them")
    if args.paired and args.hook_trace:
        parser.error("--paired and --hook-trace measure separately: give one of them")
    if args.agent_processes and (args.paired or args.paired_alone):
        parser.error("--paired and --paired-alone swap the hook of agents in this process")
    demo.check_prerequisites()
    if args.relay:
        site_mod.RELAY = os.path.abspath(args.relay)
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        tracer = stack.enter_context(hook_tracing()) if args.hook_trace else None
        by_mode = {}
        no_op: list[demo.MigrationResult] | None = [] if args.paired else None
        alone: list[list[AloneRun]] | None = [] if args.paired_alone else None
        phases: dict[str, list[dict[str, float]]] | None = {} if args.libvirt_log else None
        if args.libvirt_log:
            hosts_mod.LOG_FILTERS = phaselog.LOG_FILTERS
        other, other_hook = "a no-op hook", NO_OP_HOOK
        if args.paired_with:
            other = args.paired_with
            with open(args.paired_with, encoding="utf-8") as fh:
                other_hook = fh.read()
        for mode in modes:
            if tracer is not None:
                tracer.mode = mode
            by_mode[mode] = run_mode(
                mode,
                args.runs,
                args.rate,
                tracer,
                no_op,
                other_hook,
                alone,
                phases,
                processes=args.agent_processes,
                log=args.log,
                late_switchover=args.late_switchover,
            )
        print()
        print(render(by_mode))
        if no_op is not None:
            print("\n".join(paired_report(by_mode.get("orchestrated", []), no_op, other)))
        if alone is not None:
            print("\n".join(alone_report(by_mode.get("orchestrated", []), alone)))
        if phases is not None:
            print("\n".join(phase_report(phases)))
        if tracer is not None:
            print("\n".join(tracer.report()))
    streams = max((len(r.streams) for rs in by_mode.values() for r in rs), default=0)
    print(
        f"\n{args.runs} migration(s) per mode, {streams} streams at {args.rate} pps each, "
        f"SWITCHOVER {'at completion' if args.late_switchover else 'at the pause'}"
        f"{', vmm agent processes' if args.agent_processes else ''}, "
        f"{time.monotonic() - started:.0f} s"
    )
    if args.json:
        doc: dict[str, Any] = {m: [r.to_dict() for r in rs] for m, rs in by_mode.items()}
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(doc, fh, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
