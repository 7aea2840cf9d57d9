"""Where a real migration's wall time goes, from the libvirtds' own debug logs.

A migration's wall time on the libvirt lab varies by 0.3-0.6 s between
migrations of the same guest: QEMU switches over once what is left fits in
the allowed downtime, so its final copy lasts 10-370 ms depending on where
its first pass stood, and the destination QEMU's start under TCG takes
320-570 ms. A difference of a few tens of milliseconds between two ways of
migrating is only visible phase by phase, and libvirtd logs every phase with
a millisecond timestamp when asked (``LOG_FILTERS`` below, set through
``vmm_lab.libvirt.hosts.LOG_FILTERS`` before the daemons start):

* prepare: the source's Prepare3 call to the destination daemon: the
  destination's ``migrate begin``, ``prepare begin``, ``start begin`` and
  ``started begin`` hooks, and the start of the incoming QEMU;
* live: from then until QEMU paused the guest (the first pass, and more
  when the guest dirties memory faster than the link);
* final copy: pause -> QEMU's "completed" (what is left, and the device state);
* finish: the source's Finish3 call (the destination resumes the guest);
* confirm: from then until the API call returned (the source kills its QEMU,
  which libvirt waits for in steps of 200 ms, and runs the ``stopped end`` and
  ``release end`` hooks);
* hooks: the time libvirtd spent waiting for each hook call, on either host
  (from "Calling hook" to that thread's next line).

The log lines are libvirt 9.0's; on another version a phase the lines do not
show is None.
"""

from __future__ import annotations

import dataclasses
import datetime
import re
from collections.abc import Iterable, Sequence

#: libvirtd log_filters that show every phase above, and little else.
LOG_FILTERS = "1:qemu.qemu_migration 1:qemu.qemu_process 1:qemu.qemu_domain 1:util.hook 3:*"

_LINE = re.compile(
    r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3})\+0000: (\d+): \w+ : (\w+):\d+ : (.*)$"
)


@dataclasses.dataclass(frozen=True)
class Line:
    at: float  # seconds since the epoch (libvirtd logs UTC, to the millisecond)
    thread: int
    function: str
    message: str


def parse(text: str) -> list[Line]:
    """The timestamped lines of a libvirtd log (continuation lines are dropped)."""
    lines = []
    for raw in text.splitlines():
        m = _LINE.match(raw)
        if m:
            stamp = datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S.%f")
            at = stamp.replace(tzinfo=datetime.UTC).timestamp()
            lines.append(Line(at, int(m.group(2)), m.group(3), m.group(4)))
    return lines


@dataclasses.dataclass
class HookCall:
    host: str
    call: str  # "<operation> <sub-operation>"
    at: float
    ms: float


@dataclasses.dataclass
class Phases:
    """One migration as the source's libvirtd saw it (ms; None: not in the log)."""

    started_at: float  # epoch seconds of the source's qemuMigrationSrcPerform
    prepare_ms: float | None = None
    live_ms: float | None = None
    final_copy_ms: float | None = None
    finish_ms: float | None = None
    #: Finish3's end, ms after the start: the API's wall time less this is the confirm.
    finished_ms: float | None = None
    hooks: list[HookCall] = dataclasses.field(default_factory=list)

    @property
    def hook_ms(self) -> float:
        return sum(h.ms for h in self.hooks)

    def confirm_ms(self, wall_ms: float) -> float | None:
        return None if self.finished_ms is None else wall_ms - self.finished_ms


def hook_calls(host: str, lines: Sequence[Line]) -> list[HookCall]:
    """Every hook call in ``lines`` and how long libvirtd waited for it."""
    calls = []
    for i, line in enumerate(lines):
        if line.function != "virRunScript" or " op=" not in line.message:
            continue
        words = dict(w.split("=", 1) for w in line.message.split() if "=" in w)
        after = next((n for n in lines[i + 1 :] if n.thread == line.thread), None)
        if after is not None:
            call = f"{words.get('op', '?')} {words.get('subop', '?')}"
            calls.append(HookCall(host, call, line.at, (after.at - line.at) * 1000.0))
    return calls


def migration_phases(
    logs: dict[str, Sequence[Line]],
    migrations: Iterable[tuple[str, float, float]],
    slack_s: float = 0.2,
) -> list[Phases | None]:
    """The phases of each migration (source host, epoch seconds the API call began,
    its wall ms, as the caller's clock saw them); None for one the log does not
    show. ``logs``: every host's parsed log (hooks are taken from all)."""
    hooks = [c for host, lines in logs.items() for c in hook_calls(host, lines)]
    found: list[Phases | None] = []
    for source, start, wall_ms in migrations:
        src = logs.get(source, [])
        index = next(
            (
                i
                for i, line in enumerate(src)
                if line.function == "qemuMigrationSrcPerform" and abs(line.at - start) <= slack_s
            ),
            None,
        )
        if index is None:
            found.append(None)
            continue
        until = src[index].at + wall_ms / 1000.0 + slack_s
        seg = [line for line in src[index:] if line.at <= until]
        found.append(_phases(seg, [h for h in hooks if h.at <= until]))
    return found


def _phases(seg: Sequence[Line], hooks: list[HookCall]) -> Phases:
    first = seg[0]
    thread = first.thread
    out = Phases(started_at=first.at)
    remotes: list[tuple[float, float]] = []
    entered: float | None = None
    stop = completed = None
    for line in seg:
        if line.thread == thread and line.function == "qemuDomainObjEnterRemote":
            entered = line.at
        elif line.thread == thread and line.function == "qemuDomainObjExitRemote":
            if entered is not None:
                remotes.append((entered, line.at))
            entered = None
        elif line.function == "qemuProcessHandleStop" and stop is None:
            stop = line.at
        elif (
            line.function == "qemuProcessHandleMigrationStatus"
            and line.message.endswith("changed state to completed")
            and completed is None
        ):
            completed = line.at
    ms = lambda a, b: round((b - a) * 1000.0, 1)  # noqa: E731
    before = [r for r in remotes if stop is None or r[1] <= stop]
    if before:  # Prepare3: the longest remote call before the pause
        prepared = max(before, key=lambda r: r[1] - r[0])
        out.prepare_ms = ms(*prepared)
        if stop is not None:
            out.live_ms = ms(prepared[1], stop)
    if stop is not None and completed is not None:
        out.final_copy_ms = ms(stop, completed)
        after = [r for r in remotes if r[0] >= completed]
        if after:  # Finish3: the first remote call after the completion
            out.finish_ms = ms(*after[0])
            out.finished_ms = ms(first.at, after[0][1])
    last = seg[-1].at
    out.hooks = [h for h in hooks if first.at <= h.at <= last]
    return out
