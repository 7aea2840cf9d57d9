"""`vmm migration list|show|plot`: the history of migrations, from the hosts' journals.

Run with the configuration the agent runs with (``vmm --config-file
/etc/vmm-orchestrator/vmm-orchestrator.conf migration list``): it reads
each host's journal of ``[agent] hosts`` (sqlite or etcd, as
``[agent] journal_backend`` says), read-only, while the agent keeps running.
"""

from __future__ import annotations

import argparse
import datetime
import json
from typing import Any

from oslo_config import cfg

from vmm_orchestrator import history
from vmm_orchestrator.cli import format_table
from vmm_orchestrator.commands import Command
from vmm_orchestrator.errors import VmmError


def _when(wall: float | None) -> str:
    if wall is None:
        return "-"
    return datetime.datetime.fromtimestamp(wall, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _figures(figures: dict[str, Any]) -> str:
    """A stage's notes on one line: numbers rounded, long lists cut."""

    def short(value: Any) -> Any:
        if isinstance(value, float):
            return round(value, 2)
        if isinstance(value, dict):
            return {k: short(v) for k, v in value.items()}
        if isinstance(value, list) and len(value) > 6:
            return [*map(short, value[:6]), f"... {len(value) - 6} more"]
        if isinstance(value, list):
            return [short(v) for v in value]
        return value

    shown = {k: short(v) for k, v in figures.items() if k != "first_frame_monotonic"}
    return json.dumps(shown, separators=(",", ":")) if shown else "-"


def render_show(views: list[history.MigrationView]) -> str:
    """The text of `vmm migration show`."""
    first = views[0]
    lines = [
        f"migration {first.id}: VM {first.vm} from {first.source} to {first.destination}",
    ]
    for v in views:
        lines.append(
            f"  host {v.host} ({v.role}): {v.status}, journalled {_when(v.created)}, "
            f"{_ms(v.duration_ms)} ms until its last phase ended"
        )
    lines.append("")
    phase_rows = []
    for v in views:
        origin = min((p.started for p in v.phases if p.started is not None), default=None)
        for p in v.phases:
            offset = None if origin is None or p.started is None else (p.started - origin) * 1e3
            phase_rows.append(
                [v.host, p.phase, p.state, _when(p.started), _ms(offset), _ms(p.duration_ms)]
            )
    lines.append(
        format_table(["host", "phase", "state", "started (UTC)", "+ms", "duration ms"], phase_rows)
    )
    lines.append("")
    stage_rows = []
    for v in views:
        for s in v.stages:
            stage_rows.append(
                [
                    v.host,
                    s.phase,
                    s.stage,
                    s.outcome,
                    _ms(s.offset_ms),
                    _ms(s.duration_ms),
                    s.attempts,
                    _figures(s.figures),
                ]
            )
    lines.append(
        format_table(
            ["host", "phase", "stage", "outcome", "start ms", "duration ms", "tries", "figures"],
            stage_rows,
        )
    )
    for v in views:
        if v.failure:
            lines.append(f"failure on {v.host}: {v.failure}")
        if v.reverted:
            lines.append(f"reverted on {v.host} (newest first): {', '.join(v.reverted)}")
        for s in v.stages:
            if s.error and s.outcome == "revert failed":
                lines.append(f"revert of {s.stage} on {v.host} failed: {s.error}")
    return "\n".join(lines)


class MigrationCommand(Command):
    name = "migration"
    help = "list past and running migrations, show one, or draw its timeline"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        sub = parser.add_subparsers(
            dest="migration_command", metavar="{list,show,plot}", required=True
        )
        listing = sub.add_parser("list", help="the newest migrations of every configured host")
        listing.add_argument("--limit", type=int, default=50, help="at most this many per host")
        listing.add_argument("-f", "--format", choices=("table", "json"), default="table")
        show = sub.add_parser(
            "show", help="one migration: phases, every stage's outcome and figures, reverts"
        )
        show.add_argument("id", help="the migration id (see `vmm migration list`)")
        show.add_argument("-f", "--format", choices=("table", "json"), default="table")
        plot = sub.add_parser(
            "plot", help="write a picture (SVG or PNG) of the migration's timeline"
        )
        plot.add_argument("id", help="the migration id")
        plot.add_argument(
            "-o", "--output", help="the picture's file, .svg or .png (default: <id>.svg)"
        )
        plot.add_argument(
            "--probe-dir",
            help="a directory of the lab probe's send-*.json and recv-*.json logs taken "
            "on this machine during the migration: adds packets per stream",
        )
        plot.add_argument(
            "--window-ms",
            nargs=2,
            type=float,
            metavar=("FROM", "TO"),
            help="x axis in ms from the resume (default: every stage but long tails)",
        )

    def run(self, conf: cfg.ConfigOpts, args: argparse.Namespace) -> int:
        if getattr(args, "limit", 1) < 1:
            raise VmmError(f"--limit {args.limit}: give a number >= 1")
        readers = history.open_readers(conf)
        try:
            if args.migration_command == "list":
                return self._list(readers, args)
            views = history.find_migration(readers, args.id)
            if args.migration_command == "show":
                if args.format == "json":
                    print(json.dumps({"migration": [v.to_dict() for v in views]}, default=str))
                else:
                    print(render_show(views))
                return 0
            return self._plot(views, args)
        finally:
            for reader in readers:
                reader.close()

    @staticmethod
    def _list(readers: list[history.Reader], args: argparse.Namespace) -> int:
        views = history.list_migrations(readers, args.limit)
        if args.format == "json":
            print(
                json.dumps(
                    {
                        "migrations": [
                            {
                                "id": v.id,
                                "vm": v.vm,
                                "source": v.source,
                                "destination": v.destination,
                                "host": v.host,
                                "role": v.role,
                                "status": v.status,
                                "last_phase": v.phases[-1].phase if v.phases else None,
                                "created": v.created,
                                "duration_ms": v.duration_ms,
                                "failure": v.failure,
                            }
                            for v in views
                        ]
                    }
                )
            )
            return 0
        if not views:
            print("no migration in the journals")
            return 0
        rows = [
            [
                v.id,
                v.vm,
                f"{v.source} -> {v.destination}",
                f"{v.host} ({v.role})",
                v.status,
                v.phases[-1].phase if v.phases else "-",
                _when(v.created),
                _ms(v.duration_ms),
            ]
            for v in views
        ]
        header = ["ID", "VM", "move", "host", "status", "last phase", "started (UTC)", "ms"]
        print(format_table(header, rows))
        return 0

    @staticmethod
    def _plot(views: list[history.MigrationView], args: argparse.Namespace) -> int:
        from vmm_orchestrator import plot

        reports = [r for v in views for r in v.reports]
        streams = None
        if args.probe_dir and reports:
            streams = _probe_streams(args.probe_dir, plot.zero_monotonic(reports))
        first = views[0]
        title = f"migration {first.id}: {first.vm} {first.source} -> {first.destination}"
        timeline = plot.timeline_from_reports(title, reports, streams)
        path = args.output or f"{first.id}.svg"
        window = tuple(args.window_ms) if args.window_ms else None
        plot.render([timeline], path, window=window)
        print(f"wrote {path}")
        return 0


def _probe_streams(directory: str, zero_monotonic: float) -> list[Any]:
    """Packets per stream from the lab probe's logs (the one probe format there is)."""
    import glob
    import os

    from vmm_orchestrator import plot

    try:
        from vmm_lab.linux import probe
    except ImportError as err:
        raise VmmError(
            "--probe-dir needs the lab plugin (vmm_lab), which is not installed"
        ) from err
    sends = [probe.load_send_log(p) for p in sorted(glob.glob(os.path.join(directory, "send-*")))]
    received = [
        r
        for p in sorted(glob.glob(os.path.join(directory, "recv-*")))
        for r in probe.load_recv_log(p)
    ]
    if not sends:
        raise VmmError(f"--probe-dir {directory}: no send-*.json probe log there")
    return plot.stream_series(sends, received, int(zero_monotonic * 1e9))
