"""The demo's picture: one timeline per mode, side by side, with the probe streams.

For each mode the demo runs (none, rarp, orchestrated) the picture shows,
on one millisecond axis with zero at the VM's resume: the measured pause,
the pipeline's stages as bars (orchestrated only), and packets received per
stream with every lost packet marked, so the baselines' black hole and the
orchestrated run's absence of one are seen at a glance.

:class:`Recorder` collects the engine's reports while a mode runs (an
engine observer, like the agent's history); :func:`mode_timeline` reads the
probe logs from the lab's work directory (before the lab removes it) and
builds the mode's column; :func:`write_side_by_side` draws them.
"""

from __future__ import annotations

import glob
import os
import threading
import time
from collections.abc import Sequence
from typing import Any, Self

from vmm_lab.linux import probe
from vmm_orchestrator import engine, history, plot


class Recorder:
    """While entered, keep every PhaseReport any pipeline of this process produces."""

    def __init__(self) -> None:
        self.docs: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    def _observe(self, _pipeline: Any, report: engine.PhaseReport, origin: float) -> None:
        doc = history.report_document(report, origin)
        with self._lock:
            self.docs.append(doc)

    def __enter__(self) -> Self:
        engine.add_observer(self._observe)
        return self

    def __exit__(self, *exc: object) -> None:
        engine.remove_observer(self._observe)


def probe_logs(workdir: str) -> tuple[list[probe.SendLog], list[probe.Recv]]:
    """The send and receive logs the demo's probes wrote into ``workdir``."""
    sends = [probe.load_send_log(p) for p in sorted(glob.glob(os.path.join(workdir, "send-*")))]
    received = [
        r
        for p in sorted(glob.glob(os.path.join(workdir, "recv-*")))
        for r in probe.load_recv_log(p)
    ]
    return sends, received


def mode_timeline(
    mode: str,
    docs: Sequence[dict[str, Any]],
    migration: Any,
    workdir: str | None = None,
) -> plot.Timeline:
    """One mode's column: ``migration`` is the LabMigration (``paused_at``,
    ``resumed_at`` on time.monotonic()), ``docs`` the Recorder's reports (only
    this migration's are drawn), ``workdir`` where the probe logs are."""
    mine = [d for d in docs if d["migration_id"] == migration.migration.id]
    zero_wall = time.time() - (time.monotonic() - migration.resumed_at)
    streams: list[plot.StreamSeries] = []
    if workdir is not None:
        sends, received = probe_logs(workdir)
        streams = plot.stream_series(sends, received, int(migration.resumed_at * 1e9))
    marks = []
    for doc in mine:
        for t in doc["timeline"]:
            first = (t.get("notes") or {}).get("first_frame_monotonic")
            if first is not None:
                marks.append(((float(first) - migration.resumed_at) * 1000.0, "1st announcement"))
    pause = ((migration.paused_at - migration.resumed_at) * 1000.0, 0.0)
    lost = sum(1 for s in streams for t in s.lost_ms if t > 0)
    return plot.Timeline(
        title=f"{mode}: paused {-pause[0]:.0f} ms, {lost} lost after resume",
        bars=plot.bars_from_reports(mine, zero_wall),
        pause=pause,
        streams=streams,
        marks=marks,
    )


def write_side_by_side(
    timelines: Sequence[plot.Timeline],
    path: str,
    window: tuple[float, float] = (-250.0, 400.0),
    title: str = "a live migration under probe traffic, per mode (zero: the VM resumes)",
) -> str:
    """Draw the modes' columns into ``path`` (.svg or .png); return the path."""
    return plot.render(timelines, path, window=window, title=title)
