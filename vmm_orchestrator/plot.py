"""A picture of a migration: phases and stages on a millisecond axis around the pause.

Zero is the moment the VM resumed at the destination (the RESUMED signal);
the shaded span before it is the pause (from SWITCHOVER, or from the
measured pause when the caller knows it). Each stage run is a bar on its
host's and phase's lane, coloured by outcome; reverts are hatched. Where
probe data exists (the lab's probe streams), a second panel shows packets
received per stream over time (one line per stream, packets per 10 ms) with
each lost packet as a red tick at its send time, so loss is visible at a
glance. Several timelines (the demo's modes) are drawn side by side on the
same axes.

matplotlib with the Agg backend (no display, no GUI toolkit) writes SVG or
PNG by the file's extension.
"""

from __future__ import annotations

import bisect
import dataclasses
import os
from collections.abc import Iterable, Sequence
from typing import Any

from vmm_orchestrator.errors import VmmError

#: Bin width of the packets-per-bin curves.
BIN_MS = 10.0

_COLOURS = {
    "ok": "#2e7d32",
    "failed": "#c62828",
    "reverted": "#ef6c00",
    "revert failed": "#6a1b9a",
    "running": "#9e9e9e",
}
_PHASE_ORDER = {"PREPARE": 0, "SWITCHOVER": 1, "RESUMED": 2, "COMPLETED": 3, "ABORTED": 4}


@dataclasses.dataclass
class Bar:
    """One stage run (or revert) on its lane ("h2 RESUMED announce")."""

    lane: str
    stage: str
    start_ms: float
    duration_ms: float
    outcome: str
    revert: bool = False


@dataclasses.dataclass
class StreamSeries:
    """One probe stream, in ms from zero: arrival times, send times of the packets
    that arrived, and send times of the lost ones."""

    name: str
    received_ms: list[float]
    lost_ms: list[float]
    delivered_ms: list[float] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Timeline:
    """Everything one picture (or one column of a side-by-side picture) shows."""

    title: str
    bars: list[Bar]
    pause: tuple[float, float] | None = None
    streams: list[StreamSeries] = dataclasses.field(default_factory=list)
    marks: list[tuple[float, str]] = dataclasses.field(default_factory=list)


# ------------------------------------------------------------------ building


def _lanes(timelines: Sequence[Timeline]) -> list[str]:
    """One row per host, phase and stage: by phase, then by when the stage first ran."""
    first: dict[str, float] = {}
    for tl in timelines:
        for b in tl.bars:
            first[b.lane] = min(first.get(b.lane, b.start_ms), b.start_ms)

    def key(lane: str) -> tuple[int, float, str]:
        phase = lane.split(" ")[1] if " " in lane else ""
        return (_PHASE_ORDER.get(phase, 9), first[lane], lane)

    return sorted(first, key=key)


def bars_from_reports(reports: Iterable[dict[str, Any]], zero_wall: float) -> list[Bar]:
    """Bars from recorded reports (see :func:`vmm_orchestrator.history.report_document`)."""
    bars: list[Bar] = []
    seen: set[tuple[str, str, str]] = set()
    for rep in sorted(reports, key=lambda r: r["recorded"]):
        base = (rep["origin_wall"] - zero_wall) * 1000.0
        for t in rep["timeline"]:
            key = (rep["host"], t["phase"], t["stage"])
            revert = key in seen
            seen.add(key)
            bars.append(
                Bar(
                    lane=f"{rep['host']} {t['phase']} {t['stage']}",
                    stage=t["stage"],
                    start_ms=base + float(t["started_offset_ms"]),
                    duration_ms=float(t["duration_ms"]),
                    outcome=t["outcome"],
                    revert=revert,
                )
            )
    return bars


def timeline_from_reports(
    title: str,
    reports: Sequence[dict[str, Any]],
    streams: list[StreamSeries] | None = None,
) -> Timeline:
    """A Timeline from recorded reports of one migration (all its hosts).

    Zero is the RESUMED report's event; without one, the first report's.
    The pause runs from the SWITCHOVER event to zero.
    """
    if not reports:
        raise VmmError(
            "nothing to draw: no stage timeline was recorded for this migration",
            hint="timelines are kept by agents that record history (vmm agent)",
        )
    by_phase = {r["phase"]: r for r in sorted(reports, key=lambda r: r["recorded"], reverse=True)}
    zero = by_phase.get("RESUMED") or min(reports, key=lambda r: r["origin_wall"])
    zero_wall = zero["origin_wall"]
    pause = None
    if "SWITCHOVER" in by_phase and "RESUMED" in by_phase:
        start = (by_phase["SWITCHOVER"]["origin_wall"] - zero_wall) * 1000.0
        pause = (min(start, 0.0), 0.0)
    marks = []
    for rep in reports:
        for t in rep["timeline"]:
            first = (t.get("notes") or {}).get("first_frame_monotonic")
            if first is not None:
                ms = (rep["origin_wall"] - zero_wall) * 1000.0
                ms += (float(first) - rep["origin_monotonic"]) * 1000.0
                marks.append((ms, "1st announcement"))
    return Timeline(title, bars_from_reports(reports, zero_wall), pause, streams or [], marks)


def zero_monotonic(reports: Sequence[dict[str, Any]]) -> float:
    """The monotonic time of a timeline's zero (to place probe captures on it)."""
    resumed = [r for r in reports if r["phase"] == "RESUMED"]
    chosen = resumed[-1] if resumed else min(reports, key=lambda r: r["origin_wall"])
    return float(chosen["origin_monotonic"])


def stream_series(
    sends: Iterable[Any], received: Iterable[Any], zero_ns: int
) -> list[StreamSeries]:
    """Per-stream series from probe logs: ``sends`` have ``stream``, ``first_seq``
    and ``send_ns`` (one time per seq from first_seq); ``received`` items have
    ``stream``, ``seq`` and ``recv_ns``. Times are CLOCK_MONOTONIC ns."""
    arrivals: dict[str, dict[int, int]] = {}
    for r in received:
        seqs = arrivals.setdefault(r.stream, {})
        if r.seq not in seqs or r.recv_ns < seqs[r.seq]:
            seqs[r.seq] = r.recv_ns
    out = []
    for s in sorted(sends, key=lambda s: s.stream):
        got = arrivals.get(s.stream, {})
        lost = [
            (ns - zero_ns) / 1e6 for i, ns in enumerate(s.send_ns) if (s.first_seq + i) not in got
        ]
        lo, hi = s.first_seq, s.first_seq + len(s.send_ns)
        recv = sorted((ns - zero_ns) / 1e6 for seq, ns in got.items() if lo <= seq < hi)
        delivered = [
            (ns - zero_ns) / 1e6 for i, ns in enumerate(s.send_ns) if (s.first_seq + i) in got
        ]
        out.append(StreamSeries(s.stream, recv, lost, sorted(delivered)))
    return out


# ------------------------------------------------------------------ drawing


def _counts(times: list[float], lo: float, hi: float) -> tuple[list[float], list[int]]:
    """Packets per BIN_MS bin between lo and hi (bin centres, counts)."""
    edges = []
    x = lo
    while x < hi:
        edges.append(x)
        x += BIN_MS
    centres, counts = [], []
    for left in edges:
        a = bisect.bisect_left(times, left)
        b = bisect.bisect_left(times, left + BIN_MS)
        centres.append(left + BIN_MS / 2)
        counts.append(b - a)
    return centres, counts


def _window(
    timelines: Sequence[Timeline], window: tuple[float, float] | None
) -> tuple[float, float]:
    if window is not None:
        return window
    # Long tails (a hold timer of seconds) would squeeze the pause to a line.
    starts = [b.start_ms for t in timelines for b in t.bars]
    ends = [b.start_ms + b.duration_ms for t in timelines for b in t.bars if b.duration_ms < 400]
    pauses = [p for t in timelines if t.pause for p in t.pause]
    lo = min(starts + pauses + [0.0]) - 20.0
    hi = max(ends + pauses + [100.0]) + 20.0
    return lo, hi


def _draw_streams(
    sx: Any,
    tl: Timeline,
    names: list[str],
    step: float,
    lo: float,
    hi: float,
    first_column: bool,
) -> None:
    """One row per stream: packets delivered per bin, by send time (so a dip is
    exactly when the path was broken, whatever the receiver's scheduling did), and
    a red tick at the send time of every lost packet."""
    if tl.pause is not None:
        sx.axvspan(*tl.pause, color="#b0bec5", alpha=0.5, lw=0)
    palette = ["#1565c0", "#00838f", "#2e7d32", "#6a1b9a", "#ad1457", "#4e342e", "#37474f"]
    for st in tl.streams:
        i = names.index(st.name)
        base = i * step
        centres, counts = _counts(st.delivered_ms, lo, hi)
        colour = palette[i % len(palette)]
        sx.plot(centres, [base + c for c in counts], lw=1, color=colour, drawstyle="steps-mid")
        sx.axhline(base, color=colour, lw=0.3, alpha=0.5)
        lost = [t for t in st.lost_ms if lo <= t <= hi]
        if lost:
            sx.plot(lost, [base] * len(lost), "|", color="#c62828", ms=7, mew=0.8)
    total_lost = sum(1 for st in tl.streams for t in st.lost_ms if t >= 0)
    sx.axvline(0.0, color="black", lw=0.8)
    sx.set_yticks([i * step for i in range(len(names))], names if first_column else [])
    sx.tick_params(axis="y", labelsize=8)
    sx.set_ylim(-0.3 * step, len(names) * step)
    if first_column:
        sx.set_ylabel(f"packets delivered / {BIN_MS:.0f} ms (by send time)", fontsize=8)
    sx.set_xlabel("ms from the VM's resume at the destination", fontsize=8)
    sx.set_title(
        f"lost after resume: {total_lost} (red ticks: every lost packet, at its send time)",
        fontsize=8,
        color="#c62828",
    )
    sx.grid(axis="x", alpha=0.3)


def render(
    timelines: Sequence[Timeline],
    path: str,
    window: tuple[float, float] | None = None,
    title: str | None = None,
) -> str:
    """Draw ``timelines`` side by side into ``path`` (.svg or .png); return the path.

    ``window`` (ms) bounds the x axis; by default it spans every bar except
    long tails (a hold timer of seconds would squeeze the pause to a line;
    such bars run off the right edge, their length in their label).
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib.patches import Patch

    ext = os.path.splitext(path)[1].lower()
    if ext not in (".svg", ".png"):
        raise VmmError(f"cannot write {path}: the picture is .svg or .png", hint="name it *.svg")
    lo, hi = _window(timelines, window)
    with_streams = any(t.streams for t in timelines)
    lanes = _lanes(timelines)
    rows = 2 if with_streams else 1
    n_streams = len({st.name for tl in timelines for st in tl.streams})
    heights = [max(2.0, 0.45 * len(lanes) + 1.0)]
    heights += [max(2.0, 0.5 * n_streams + 1.0)] if with_streams else []
    fig, axes = plt.subplots(
        rows,
        len(timelines),
        figsize=(6.0 * len(timelines), sum(heights) + 0.8),
        squeeze=False,
        sharex=True,
        gridspec_kw={"height_ratios": heights},
    )
    names = sorted({st.name for tl in timelines for st in tl.streams})
    streams = [st for tl in timelines for st in tl.streams]
    peak = max((max(_counts(st.delivered_ms, lo, hi)[1], default=0) for st in streams), default=0)
    step = peak * 1.3 + 2.0
    for col, tl in enumerate(timelines):
        ax = axes[0][col]
        if tl.pause is not None:
            ax.axvspan(*tl.pause, color="#b0bec5", alpha=0.5, lw=0)
        for b in tl.bars:
            y = lanes.index(b.lane)
            colour = _COLOURS.get(b.outcome, "#9e9e9e")
            ax.barh(
                y,
                max(b.duration_ms, 0.3),
                left=b.start_ms,
                height=0.6,
                color=colour,
                alpha=0.6 if b.revert else 0.9,
                hatch="//" if b.revert else None,
                edgecolor="black",
                linewidth=0.4,
            )
            if b.revert:
                continue
            end = b.start_ms + b.duration_ms
            text = f"{b.duration_ms:.1f} ms"
            x, align = min(end, hi) + (hi - lo) * 0.005, "left"
            if b.start_ms >= hi:
                text = f"at +{b.start_ms:.0f} ms, lasts {b.duration_ms:.0f} ms \u2192"
            elif end < lo:
                text = f"\u2190 at {b.start_ms:.0f} ms, lasts {b.duration_ms:.1f} ms"
                x = lo + (hi - lo) * 0.005
            if end >= hi:
                text += "" if b.start_ms >= hi else " \u2192"
                x, align = hi - (hi - lo) * 0.005, "right"
            ax.text(
                x,
                y,
                text,
                va="center",
                ha=align,
                fontsize=7,
                clip_on=True,
            )
        for ms, text in tl.marks:
            ax.axvline(ms, color="#1565c0", lw=1, ls="--")
            ax.text(
                ms,
                -0.8,
                f" {text} +{ms:.1f} ms ",
                color="#1565c0",
                fontsize=7,
                va="center",
                ha="left" if ms < (lo + hi) / 2 else "right",
            )
        ax.axvline(0.0, color="black", lw=0.8)
        ax.set_yticks(range(len(lanes)), lanes if col == 0 else [], fontsize=8)
        ax.set_ylim(len(lanes) - 0.4, -1.3)
        ax.set_xlim(lo, hi)
        ax.set_title(tl.title, fontsize=10)
        ax.grid(axis="x", alpha=0.3)
        if with_streams:
            _draw_streams(axes[1][col], tl, names, step, lo, hi, col == 0)
        else:
            ax.set_xlabel("ms from the VM's resume at the destination", fontsize=8)
        if not tl.bars:
            ax.text(
                (lo + hi) / 2,
                (len(lanes) - 1) / 2,
                "no orchestrator: no stage ran",
                ha="center",
                va="center",
                fontsize=9,
                color="#616161",
            )
    legend = [Patch(color=c, label=k) for k, c in _COLOURS.items() if k != "running"]
    legend.append(Patch(color="#b0bec5", label="pause"))
    fig.legend(handles=legend, loc="lower center", ncol=len(legend), fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, format=ext[1:], dpi=110)
    plt.close(fig)
    return path
