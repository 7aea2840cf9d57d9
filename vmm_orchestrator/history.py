"""Migration history: what each migration did on each host, read from the journals.

The journal (sqlite or etcd) already holds each migration's VM, hosts,
phases with their times, and every stage's outcome, attempts, error and
revert. What it does not hold are the figures stages note (per-peer
convergence, the first announcement, state entries per kind): they live in
the PhaseReport's timeline. :func:`record` is an engine observer that keeps
each report's timeline beside the journal (a ``report_timelines`` table in
the same sqlite file, or ``<prefix>history/<host>/...`` keys in etcd), with
the phase's origin on both clocks so a picture can line the stages up with
probe captures.

Reading never disturbs a running agent: the sqlite file is opened read-only
(WAL lets a reader see every committed write while the agent writes), etcd
is read with plain range requests.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from oslo_config import cfg

from vmm_orchestrator import journal as jr
from vmm_orchestrator.errors import ConfigError, VmmError

if TYPE_CHECKING:
    from vmm_orchestrator.engine import PhaseReport, Pipeline

LOG = logging.getLogger(__name__)

_TIMELINES_SCHEMA = """
CREATE TABLE IF NOT EXISTS report_timelines (
    migration_id     TEXT NOT NULL,
    host             TEXT NOT NULL,
    phase            TEXT NOT NULL,
    role             TEXT NOT NULL,
    ok               INTEGER NOT NULL,
    error            TEXT,
    detail           TEXT,
    reverted         TEXT NOT NULL,   -- JSON list, newest first
    origin_wall      REAL NOT NULL,   -- the phase's event, time.time()
    origin_monotonic REAL NOT NULL,   -- the same instant, time.monotonic()
    timeline         TEXT NOT NULL,   -- JSON list of StageTiming (notes included)
    recorded         REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS report_timelines_mid ON report_timelines (migration_id);
"""


# ----------------------------------------------------------------- recording


def report_document(report: PhaseReport, origin: float) -> dict[str, Any]:
    """A PhaseReport as JSON, with its origin on the wall and monotonic clocks."""
    now_wall, now_mono = time.time(), time.monotonic()
    return {
        "migration_id": report.migration_id,
        "host": report.host,
        "phase": report.phase.value,
        "role": report.role.value,
        "ok": report.ok,
        "error": report.error,
        "detail": report.detail,
        "reverted": list(report.reverted),
        "origin_wall": now_wall - (now_mono - origin),
        "origin_monotonic": origin,
        "timeline": [
            {
                "stage": t.stage,
                "phase": t.phase.value,
                "started_offset_ms": t.started_offset_ms,
                "duration_ms": t.duration_ms,
                "attempts": t.attempts,
                "outcome": t.outcome,
                "notes": t.notes,
            }
            for t in report.timeline
        ],
        "recorded": now_wall,
    }


class _SqliteTimelines:
    """Writers of ``report_timelines``, one connection per journal file."""

    def __init__(self) -> None:
        self._conns: dict[str, sqlite3.Connection] = {}
        self._lock = threading.Lock()

    def write(self, path: str, doc: dict[str, Any]) -> None:
        with self._lock:
            conn = self._conns.get(path)
            if conn is None:
                conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
                conn.execute("PRAGMA busy_timeout=5000")
                # As the journal's own default: no fsync per commit on the migration's
                # path; a power cut may lose the last timelines, never corrupt the file.
                conn.execute("PRAGMA synchronous=NORMAL")
                conn.executescript(_TIMELINES_SCHEMA)
                self._conns[path] = conn
            conn.execute(
                "INSERT INTO report_timelines (migration_id, host, phase, role, ok, error,"
                " detail, reverted, origin_wall, origin_monotonic, timeline, recorded)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    doc["migration_id"],
                    doc["host"],
                    doc["phase"],
                    doc["role"],
                    int(doc["ok"]),
                    doc["error"],
                    doc["detail"],
                    json.dumps(doc["reverted"]),
                    doc["origin_wall"],
                    doc["origin_monotonic"],
                    json.dumps(doc["timeline"], default=str),
                    doc["recorded"],
                ),
            )


_SQLITE = _SqliteTimelines()


def _etcd_history_prefix(journal: Any, host: str) -> str:
    return f"{journal.keys.prefix}history/{host}/"


def record(pipeline: Pipeline, report: PhaseReport, origin: float) -> None:
    """Engine observer: keep the report's timeline (with its figures) beside the journal."""
    if (report.detail or "").startswith("ignored") and not report.timeline:
        return
    doc = report_document(report, origin)
    journal = pipeline.journal
    if isinstance(journal, jr.Journal):
        if journal.path != ":memory:":
            _SQLITE.write(journal.path, doc)
    elif hasattr(journal, "kv") and hasattr(journal, "keys"):
        from vmm_etcd import kv as kvmod  # only when the etcd journal is in use

        key = (
            f"{_etcd_history_prefix(journal, report.host)}{report.migration_id}/"
            f"{time.time_ns():020d}-{report.phase.value}"
        )
        journal.kv.txn(
            success=[kvmod.put(key, json.dumps(doc, default=str))],
            what="record a migration's timeline",
        )


def start_recording() -> None:
    """What a composition root calls once: keep every pipeline's timelines."""
    from vmm_orchestrator import engine

    engine.add_observer(record)


# ------------------------------------------------------------------- views


@dataclasses.dataclass
class PhaseView:
    phase: str
    state: str
    started: float | None  # wall time
    ended: float | None

    @property
    def duration_ms(self) -> float | None:
        if self.started is None or self.ended is None:
            return None
        return (self.ended - self.started) * 1000.0


@dataclasses.dataclass
class StageView:
    """One stage of one phase: the journal's state and the figures the stage noted."""

    phase: str
    stage: str
    outcome: str  # ok | failed | reverted | revert failed | running
    started: float | None
    ended: float | None
    attempts: int
    error: str | None
    offset_ms: float | None = None  # from the phase's event
    duration_ms: float | None = None
    figures: dict[str, Any] = dataclasses.field(default_factory=dict)
    revert_ms: float | None = None


@dataclasses.dataclass
class MigrationView:
    """One migration as one host's journal holds it."""

    id: str
    host: str
    role: str
    status: str
    vm: str
    source: str
    destination: str
    created: float | None
    updated: float | None
    phases: list[PhaseView]
    stages: list[StageView]
    reports: list[dict[str, Any]]
    failure: str | None = None
    reverted: list[str] = dataclasses.field(default_factory=list)

    @property
    def duration_ms(self) -> float | None:
        ends = [p.ended for p in self.phases if p.ended is not None]
        if self.created is None or not ends:
            return None
        return (max(ends) - self.created) * 1000.0

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["duration_ms"] = self.duration_ms
        for phase in out["phases"]:
            start, end = phase["started"], phase["ended"]
            phase["duration_ms"] = None if start is None or end is None else (end - start) * 1e3
        return out


_OUTCOME = {
    jr.COMPLETED: "ok",
    jr.STAGE_FAILED: "failed",
    jr.STAGE_REVERTED: "reverted",
    jr.STARTED: "running",
}


def _view(
    host: str,
    row: dict[str, Any],
    phases: list[PhaseView],
    runs: list[dict[str, Any]],
    reports: list[dict[str, Any]],
) -> MigrationView:
    """Join the journal's rows with the recorded timelines."""
    migration = row["migration"]
    # In report order, a stage's first entry is its run; a later one is its revert.
    by_key: dict[tuple[str, str], dict[str, Any]] = {}
    revert_ms: dict[tuple[str, str], float] = {}
    for rep in sorted(reports, key=lambda r: r["recorded"]):
        for t in rep["timeline"]:
            key = (t["phase"], t["stage"])
            if key in by_key:
                revert_ms[key] = t["duration_ms"]
                continue
            by_key[key] = t = dict(t, notes=dict(t.get("notes") or {}))
            first = t["notes"].get("first_frame_monotonic")
            if first is not None:  # a monotonic instant means nothing to a reader
                t["notes"]["first_frame_ms"] = (float(first) - rep["origin_monotonic"]) * 1e3
    stages = []
    for run in sorted(runs, key=lambda r: r["seq"]):
        key = (run["phase"], run["stage"])
        outcome = _OUTCOME.get(run["state"], run["state"])
        if outcome == "reverted" and run["error"]:
            outcome = "revert failed"
        timing = by_key.get(key, {})
        stages.append(
            StageView(
                phase=run["phase"],
                stage=run["stage"],
                outcome=outcome,
                started=run["started"],
                ended=run["ended"],
                attempts=run["attempts"],
                error=run["error"],
                offset_ms=timing.get("started_offset_ms"),
                duration_ms=timing.get(
                    "duration_ms",
                    None
                    if run["ended"] is None or run["started"] is None
                    else (run["ended"] - run["started"]) * 1000.0,
                ),
                figures=dict(timing.get("notes") or {}),
                revert_ms=revert_ms.get(key),
            )
        )
    failure = next((r["error"] for r in reports if not r["ok"] and r["error"]), None)
    if failure is None:
        failed = next((s for s in stages if s.outcome == "failed"), None)
        if failed is not None:
            failure = f"stage {failed.stage} failed in {failed.phase}: {failed.error}"
    reverted = [
        s.stage
        for s in sorted(
            (s for s in stages if s.outcome in ("reverted", "revert failed")),
            key=lambda s: runs_reverted(runs, s) or 0.0,  # revert order: newest stage first
        )
    ]
    return MigrationView(
        id=migration["id"],
        host=host,
        role=row["role"],
        status=row["status"],
        vm=migration["workload"]["name"],
        source=migration["source"],
        destination=migration["destination"],
        created=row.get("created"),
        updated=row.get("updated"),
        phases=phases,
        stages=stages,
        reports=sorted(reports, key=lambda r: r["recorded"]),
        failure=failure,
        reverted=reverted,
    )


def runs_reverted(runs: list[dict[str, Any]], stage: StageView) -> float | None:
    """When the journal says ``stage`` was reverted (wall time)."""
    for run in runs:
        if run["phase"] == stage.phase and run["stage"] == stage.stage:
            value = run.get("reverted")
            return None if value is None else float(value)
    return None


# ------------------------------------------------------------------ readers


class SqliteReader:
    """A host's sqlite journal, opened read-only (safe while the agent writes)."""

    def __init__(self, host: str, path: str) -> None:
        self.host = host
        self.path = path

    @contextlib.contextmanager
    def _conn(self) -> Iterator[sqlite3.Connection]:
        try:
            conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True)
        except sqlite3.Error as err:
            raise VmmError(f"cannot read the journal {self.path}: {err}") from err
        try:
            conn.execute("PRAGMA busy_timeout=5000")
            yield conn
        finally:
            conn.close()

    def list(self, limit: int) -> list[MigrationView]:
        with self._conn() as conn:
            ids = [
                r[0]
                for r in conn.execute(
                    "SELECT id FROM migrations ORDER BY created DESC, id LIMIT ?", (limit,)
                )
            ]
            return [v for v in (self._one(conn, i) for i in ids) if v is not None]

    def get(self, migration_id: str) -> MigrationView | None:
        with self._conn() as conn:
            return self._one(conn, migration_id)

    def _one(self, conn: sqlite3.Connection, mid: str) -> MigrationView | None:
        row = conn.execute(
            "SELECT migration, role, status, created, updated FROM migrations WHERE id = ?",
            (mid,),
        ).fetchone()
        if row is None:
            return None
        phases = [
            PhaseView(p, s, started, ended)
            for p, s, started, ended in conn.execute(
                "SELECT phase, state, started, ended FROM phases WHERE migration_id = ?"
                " ORDER BY started",
                (mid,),
            )
        ]
        cols = ("phase", "stage", "seq", "state", "attempts", "started", "ended", "reverted")
        runs = [
            dict(zip((*cols, "error"), r, strict=True))
            for r in conn.execute(
                f"SELECT {', '.join(cols)}, error FROM stage_runs WHERE migration_id = ?",
                (mid,),
            )
        ]
        reports = []
        with contextlib.suppress(sqlite3.OperationalError):  # no timelines recorded yet
            for r in conn.execute(
                "SELECT host, phase, role, ok, error, detail, reverted, origin_wall,"
                " origin_monotonic, timeline, recorded FROM report_timelines"
                " WHERE migration_id = ? ORDER BY recorded",
                (mid,),
            ):
                reports.append(
                    {
                        "migration_id": mid,
                        "host": r[0],
                        "phase": r[1],
                        "role": r[2],
                        "ok": bool(r[3]),
                        "error": r[4],
                        "detail": r[5],
                        "reverted": json.loads(r[6]),
                        "origin_wall": r[7],
                        "origin_monotonic": r[8],
                        "timeline": json.loads(r[9]),
                        "recorded": r[10],
                    }
                )
        base = {
            "migration": json.loads(row[0]),
            "role": row[1],
            "status": row[2],
            "created": row[3],
            "updated": row[4],
        }
        return _view(self.host, base, phases, runs, reports)

    def close(self) -> None:
        pass


class EtcdReader:
    """A host's etcd journal: its records and recorded timelines, by range reads."""

    def __init__(self, host: str, journal: Any) -> None:
        self.host = host
        self.journal = journal

    def _records(self) -> list[dict[str, Any]]:
        from vmm_etcd import kv as kvmod

        items = self.journal.kv.read(
            kvmod.get_prefix(self.journal.keys.journal(self.host)), what="read the journal"
        ).kvs(0)
        return [json.loads(i.value) for i in items]

    def _reports(self, mid: str) -> list[dict[str, Any]]:
        from vmm_etcd import kv as kvmod

        prefix = f"{_etcd_history_prefix(self.journal, self.host)}{mid}/"
        items = self.journal.kv.read(kvmod.get_prefix(prefix), what="read the history").kvs(0)
        return [json.loads(i.value) for i in items]

    def _view(self, rec: dict[str, Any]) -> MigrationView:
        phases = [
            PhaseView(p, e["state"], e.get("started"), e.get("ended"))
            for p, e in sorted(rec["phases"].items(), key=lambda item: item[1]["started"])
        ]
        runs = [dict(r) for r in rec["stages"].values()]
        return _view(self.host, rec, phases, runs, self._reports(rec["id"]))

    def list(self, limit: int) -> list[MigrationView]:
        records = sorted(self._records(), key=lambda r: (-r["created"], r["id"]))[:limit]
        return [self._view(r) for r in records]

    def get(self, migration_id: str) -> MigrationView | None:
        found = [r for r in self._records() if r["id"] == migration_id]
        return self._view(found[0]) if found else None

    def close(self) -> None:
        self.journal.close()


Reader = SqliteReader | EtcdReader


def open_readers(conf: cfg.ConfigOpts) -> list[Reader]:
    """A reader per configured host, through the journal entry points ``vmm agent`` uses.

    The backend is loaded from ``vmm_orchestrator.journals`` like the agent
    loads it (a misspelt backend fails the same way). A sqlite journal is
    then read through its own read-only connection instead of the factory's
    read-write one, so an operator who may only read the agent's file can
    list its history, and a journal that does not exist yet is skipped (the
    host has not migrated anything) rather than created.
    """
    from vmm_orchestrator import agent, contracts

    specs = agent.host_specs(conf)
    backend = conf.agent.journal_backend
    factory = agent.load_plugin(contracts.JOURNALS, backend, "[agent] journal_backend")
    readers: list[Reader] = []
    for spec in specs:
        if backend == "sqlite":
            if not os.path.exists(spec.journal):
                LOG.info("host %s: no journal at %s yet", spec.name, spec.journal)
                continue
            readers.append(SqliteReader(spec.name, spec.journal))
            continue
        journal = factory(conf, spec, None)
        if not (hasattr(journal, "kv") and hasattr(journal, "keys")):
            journal.close()
            raise ConfigError(
                f"[agent] journal_backend {backend!r} cannot be listed by `vmm migration`",
                hint="the history reads the sqlite and etcd journals",
            )
        readers.append(EtcdReader(spec.name, journal))
    return readers


def list_migrations(readers: list[Reader], limit: int = 50) -> list[MigrationView]:
    """Every host's newest ``limit`` migrations, newest first."""
    views = [v for r in readers for v in r.list(limit)]
    views.sort(key=lambda v: (-(v.created or 0.0), v.id, v.host))
    return views[:limit] if len({v.host for v in views}) <= 1 else views


def find_migration(readers: list[Reader], migration_id: str) -> list[MigrationView]:
    """The migration as each host's journal holds it (source and destination)."""
    found = [v for r in readers if (v := r.get(migration_id)) is not None]
    if not found:
        hosts = ", ".join(r.host for r in readers) or "no host with a journal"
        raise VmmError(
            f"no migration {migration_id} in the journals of {hosts}",
            hint="`vmm migration list` shows the known ones",
        )
    return sorted(found, key=lambda v: (v.role != "source", v.host))
