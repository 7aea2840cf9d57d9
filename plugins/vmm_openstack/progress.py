"""The live progress display of `vmm migrate-with-network`.

A live migration takes seconds to minutes and can fail in several places,
so the operator sees, as it happens, which phase runs, how far Nova's
memory copy is and what each phase took. Three renderings of one record:

* a terminal gets a block of lines redrawn in place (one per phase, the
  migration with a progress bar), with notable events printed above it;
* a pipe or file gets plain lines, one per event, never redrawn, so logs
  and CI transcripts read well; both end with a table of the phases;
* ``-f json`` prints nothing until the end, then one JSON document (the
  whole record: phases with timings, events, Nova's progress samples,
  the agents' reports, the outcome), so scripts parse one thing.

The flow (migrate.py) calls ``begin``/``event``/``end`` per phase,
``migration`` per poll and ``finish`` once.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from vmm_openstack.driver import AgentReport, MigrationState
from vmm_orchestrator.cli import format_table

#: The phases of the command, in order; "revert" appears only after a failure.
STEPS = ("resolve", "prestage", "migrate", "commit", "converge")

PENDING, RUNNING, OK, FAILED, SKIPPED, REVERTED = (
    "pending",
    "running",
    "ok",
    "failed",
    "skipped",
    "reverted",
)


def human_bytes(n: float | None) -> str:
    """1.5 GiB, 300.0 MiB, ... for progress figures."""
    if n is None:
        return "?"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def describe_state(state: MigrationState) -> str:
    """One phrase for a poll: 'running 45% (0.9 GiB of 2.0 GiB) -> cmp2'."""
    text = state.status
    if state.percent is not None and (state.memory_processed or state.state != "preparing"):
        text += f" {state.percent:.0f}% ({human_bytes(state.memory_processed)} of "
        text += f"{human_bytes(state.memory_total)})"
    if state.destination:
        text += f" -> {state.destination}"
    return text


@dataclasses.dataclass
class StepRecord:
    """One phase: when it started (seconds from the command's start), how it ended."""

    name: str
    state: str = PENDING
    started: float | None = None
    ended: float | None = None
    detail: str = ""

    @property
    def duration(self) -> float | None:
        if self.started is None or self.ended is None:
            return None
        return self.ended - self.started

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "state": self.state,
            "started_s": _round(self.started),
            "duration_s": _round(self.duration),
            "detail": self.detail,
        }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


class Progress:
    """The record of one run; subclasses render it. ``clock`` is time.monotonic's kind."""

    def __init__(
        self, stream: TextIO | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.stream = stream or sys.stdout
        self._clock = clock
        self._t0 = clock()
        self.started_at = time.time()
        self.steps: dict[str, StepRecord] = {name: StepRecord(name) for name in STEPS}
        self.events: list[dict[str, Any]] = []
        self.samples: list[dict[str, Any]] = []
        self.agents: list[dict[str, Any]] = []
        self.header: dict[str, Any] = {}
        self.target: dict[str, Any] | None = None
        self.outcome: dict[str, Any] = {}
        self.last_state: MigrationState | None = None

    def now(self) -> float:
        """Seconds since the command started."""
        return self._clock() - self._t0

    # ----------------------------------------------------------- recording

    def title(self, **header: Any) -> None:
        """What runs: server, driver, where, migration id."""
        self.header.update(header)
        self._title()

    def begin(self, step: str, detail: str = "") -> None:
        record = self.steps.setdefault(step, StepRecord(step))
        record.state, record.started, record.detail = RUNNING, self.now(), detail
        self._changed(step)

    def event(self, step: str, text: str) -> None:
        entry = {"t": round(self.now(), 3), "step": step, "text": text}
        self.events.append(entry)
        self._event(entry)

    def end(self, step: str, state: str = OK, detail: str = "") -> None:
        record = self.steps.setdefault(step, StepRecord(step))
        if record.started is None:
            record.started = self.now()
        record.state, record.ended = state, self.now()
        if detail:
            record.detail = detail
        self._ended(record)

    def migration(self, state: MigrationState) -> None:
        """One poll of the driver; samples are kept when something changed."""
        previous = self.last_state
        self.last_state = state
        if previous is None or (
            previous.status,
            previous.memory_processed,
            previous.destination,
        ) != (state.status, state.memory_processed, state.destination):
            self.samples.append({"t": round(self.now(), 3), **state.to_dict()})
            self._sample(previous, state)
        else:
            self._changed("migrate")

    def agent(self, report: AgentReport) -> None:
        self.agents.append({"t": round(self.now(), 3), **report.to_dict()})
        stages = ", ".join(f"{s} {ms:.0f} ms {o}" for s, ms, o in report.timeline)
        verdict = "ok" if report.ok else f"failed: {report.error}"
        self.event(
            "agent", f"{report.host} {report.phase}: {verdict}" + (f" ({stages})" if stages else "")
        )

    def finish(
        self,
        ok: bool,
        summary: str,
        error: str | None = None,
        reverted: Sequence[str] = (),
        left: Sequence[str] = (),
    ) -> None:
        """Close the record and print what this rendering prints at the end."""
        for record in self.steps.values():
            if record.state == RUNNING:
                record.state, record.ended = FAILED, self.now()
        self.outcome = {
            "ok": ok,
            "summary": summary,
            "error": error,
            "reverted": list(reverted),
            "left_as_is": list(left),
            "duration_s": round(self.now(), 3),
        }
        self._finish()

    def to_dict(self) -> dict[str, Any]:
        """The whole record, as ``-f json`` prints it."""
        return {
            **self.header,
            "started_at": self.started_at,
            "target": self.target,
            **self.outcome,
            "steps": [r.to_dict() for r in self.steps.values() if r.state != PENDING]
            + [r.to_dict() for r in self.steps.values() if r.state == PENDING],
            "events": self.events,
            "migration_progress": self.samples,
            "agent_reports": self.agents,
        }

    # ----------------------------------------------------- rendering hooks

    def _title(self) -> None: ...

    def _changed(self, step: str) -> None: ...

    def _event(self, entry: dict[str, Any]) -> None: ...

    def _ended(self, record: StepRecord) -> None: ...

    def _sample(self, previous: MigrationState | None, state: MigrationState) -> None: ...

    def _finish(self) -> None: ...

    # ------------------------------------------------------------- helpers

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()

    def table(self) -> str:
        """The phases as a table: what ran, when, how long, with what result."""
        rows = []
        for record in self.steps.values():
            if record.state == PENDING:
                continue
            took = record.duration
            rows.append(
                [
                    record.name,
                    f"{record.started:.2f}s" if record.started is not None else "",
                    f"{took:.2f}s" if took is not None else "",
                    record.state,
                    record.detail,
                ]
            )
        return format_table(["PHASE", "START", "TOOK", "RESULT", "DETAIL"], rows)

    def title_text(self) -> str:
        h = self.header
        return (
            f"vmm migrate-with-network {h.get('server')} (migration {h.get('migration_id')})\n"
            f"  driver: {h.get('driver')} at {h.get('where')}\n"
            f"  ports:  {h.get('directory')}\n"
        )

    def closing_lines(self) -> list[str]:
        lines = ["", self.table(), "", self.outcome["summary"]]
        if self.outcome.get("reverted"):
            lines.append("reverted: " + "; ".join(self.outcome["reverted"]))
        if self.outcome.get("left_as_is"):
            lines.append("left as is: " + "; ".join(self.outcome["left_as_is"]))
        return lines


class JsonProgress(Progress):
    """Silent until the end, then one JSON document on the stream."""

    def _finish(self) -> None:
        self._write(json.dumps(self.to_dict(), indent=2) + "\n")


class LineProgress(Progress):
    """Plain lines for pipes and files: one per event, never redrawn.

    Migration progress is printed when the status or destination changes
    and when the copy passes another quarter, so a long migration does not
    flood a log.
    """

    def _line(self, step: str, text: str) -> None:
        self._write(f"{self.now():7.2f}s  {step:<9} {text}\n")

    def _title(self) -> None:
        self._write(self.title_text())

    def _event(self, entry: dict[str, Any]) -> None:
        self._line(entry["step"], entry["text"])

    def _ended(self, record: StepRecord) -> None:
        took = f" in {record.duration:.2f}s" if record.duration is not None else ""
        detail = f": {record.detail}" if record.detail else ""
        self._line(record.name, f"{record.state}{took}{detail}")

    def _sample(self, previous: MigrationState | None, state: MigrationState) -> None:
        quarter = (state.percent or 0) // 25
        changed = previous is None or (previous.status, previous.destination) != (
            state.status,
            state.destination,
        )
        if changed or quarter > ((previous.percent or 0) // 25 if previous else -1):
            self._line("migrate", describe_state(state))

    def _finish(self) -> None:
        self._write("\n".join(self.closing_lines()) + "\n")


class TtyProgress(Progress):
    """A block redrawn in place on a terminal: one line per phase, events above it."""

    MARKS = {PENDING: " ", RUNNING: ">", OK: "+", FAILED: "x", SKIPPED: "-", REVERTED: "~"}
    BAR = 24
    MIN_REDRAW = 0.1

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._drawn = 0
        self._last_draw = -1.0

    def _title(self) -> None:
        self._write(self.title_text())

    def _block(self) -> list[str]:
        lines = []
        for record in self.steps.values():
            mark = self.MARKS.get(record.state, "?")
            if record.state == RUNNING and record.started is not None:
                took = f"{self.now() - record.started:6.2f}s"
            elif record.duration is not None:
                took = f"{record.duration:6.2f}s"
            else:
                took = " " * 7
            detail = record.detail
            if record.name == "migrate" and record.state == RUNNING and self.last_state:
                detail = self._bar(self.last_state)
            lines.append(f" {mark} {record.name:<9} {took}  {detail}".rstrip())
        return lines

    def _bar(self, state: MigrationState) -> str:
        pct = state.percent
        if pct is None:
            return describe_state(state)
        filled = int(self.BAR * pct / 100)
        bar = "#" * filled + "-" * (self.BAR - filled)
        to = f" -> {state.destination}" if state.destination else ""
        return (
            f"[{bar}] {pct:3.0f}% {human_bytes(state.memory_processed)}/"
            f"{human_bytes(state.memory_total)} {state.status}{to}"
        )

    def _draw(self, force: bool = False, above: Sequence[str] = ()) -> None:
        now = self.now()
        if not force and not above and now - self._last_draw < self.MIN_REDRAW:
            return
        self._last_draw = now
        out = []
        if self._drawn:
            out.append(f"\x1b[{self._drawn}F\x1b[J")
        out.extend(line + "\n" for line in above)
        block = self._block()
        out.extend(line + "\n" for line in block)
        self._drawn = len(block)
        self._write("".join(out))

    def _changed(self, step: str) -> None:
        self._draw()

    def _event(self, entry: dict[str, Any]) -> None:
        self._draw(above=[f"{entry['t']:7.2f}s  {entry['step']:<9} {entry['text']}"])

    def _ended(self, record: StepRecord) -> None:
        self._draw(force=True)

    def _sample(self, previous: MigrationState | None, state: MigrationState) -> None:
        self._draw()

    def _finish(self) -> None:
        self._draw(force=True)
        lines = self.closing_lines()[3:]  # the block above already is the table
        self._write("\n" + "\n".join(lines) + "\n")


def make_progress(fmt: str, stream: TextIO | None = None) -> Progress:
    """JSON for ``-f json``, a redrawn block on a terminal, plain lines elsewhere."""
    stream = stream or sys.stdout
    if fmt == "json":
        return JsonProgress(stream)
    isatty = getattr(stream, "isatty", None)
    if isatty is not None and isatty():
        return TtyProgress(stream)
    return LineProgress(stream)
