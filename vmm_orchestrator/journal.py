"""A crash-safe journal of migrations and of every stage run, over sqlite3.

The engine writes here before and after each step so that, after the
orchestrator dies (even by kill -9), a restart can tell for every migration
what was done, what was half done and what a stage had checkpointed, and can
then finish or revert it (see ``Pipeline.recover``).

Why sqlite: one file per host, atomic commits, readable with the sqlite3 CLI
while the orchestrator runs (WAL), no server. Every write method commits
before it returns, so nothing the engine was told is written can be lost by
a process kill (kill -9 included): a WAL commit is in the file before the call
returns. By default commits are not fsync'ed (``synchronous=NORMAL``): an fsync
costs milliseconds per write on the migration's critical path, and a power cut
can then lose only the last commits, never corrupt the file. ``fsync=True``
(``synchronous=FULL``) makes every commit survive a power cut too.

One ``Journal`` may be used from several threads: a lock serializes access to
the single connection.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from vmm_orchestrator.contracts import HostSpec, JournalStore
from vmm_orchestrator.errors import ConfigError
from vmm_orchestrator.model import Migration, Phase, Role

#: Values of a migration's ``status``.
RUNNING = "running"
DONE = "done"
FAILED = "failed"
REVERTED = "reverted"
STATUSES = (RUNNING, DONE, FAILED, REVERTED)

#: Values of a stage run's ``state``.
STARTED = "started"
COMPLETED = "completed"
STAGE_FAILED = "failed"
STAGE_REVERTED = "reverted"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS migrations (
    id          TEXT PRIMARY KEY,
    migration   TEXT NOT NULL,          -- Migration.to_dict() as JSON
    role        TEXT NOT NULL,
    status      TEXT NOT NULL,
    last_phase  TEXT,                   -- last phase whose handling started
    created     REAL NOT NULL,          -- wall time
    updated     REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS phases (
    migration_id TEXT NOT NULL REFERENCES migrations(id),
    phase        TEXT NOT NULL,
    state        TEXT NOT NULL,         -- 'started' | 'completed' | 'failed'
    started      REAL NOT NULL,
    ended        REAL,
    PRIMARY KEY (migration_id, phase)
);
CREATE TABLE IF NOT EXISTS stage_runs (
    migration_id  TEXT NOT NULL REFERENCES migrations(id),
    phase         TEXT NOT NULL,
    stage         TEXT NOT NULL,
    seq           INTEGER NOT NULL,     -- start order within the migration
    completed_seq INTEGER,              -- completion order within the migration
    state         TEXT NOT NULL,
    record        TEXT,                 -- JSON returned by Stage.run
    checkpoint    TEXT,                 -- JSON written by StageContext.checkpoint
    attempts      INTEGER NOT NULL DEFAULT 0,
    started       REAL NOT NULL,
    ended         REAL,
    reverted      REAL,
    error         TEXT,
    PRIMARY KEY (migration_id, phase, stage)
);
"""


@dataclasses.dataclass(frozen=True)
class StageRun:
    """What the journal knows of one stage in one phase of one migration.

    A re-run (after a crash) reuses the row: ``seq`` becomes the new start
    order and ``checkpoint`` is kept, which is how a re-run gets ``saved``.
    Times are wall-clock (``time.time()``) so an operator can read them.
    """

    migration_id: str
    phase: Phase
    stage: str
    seq: int
    state: str
    record: dict[str, Any] | None
    checkpoint: dict[str, Any]
    attempts: int
    started: float
    ended: float | None
    error: str | None


@dataclasses.dataclass(frozen=True)
class MigrationRecord:
    """A migration as the journal holds it.

    ``phases`` maps each phase whose handling started to its state
    ('started', 'completed' or 'failed'); ``stages`` lists every stage run in
    start order.
    """

    migration: Migration
    role: Role
    status: str
    last_phase: Phase | None
    phases: dict[Phase, str]
    stages: list[StageRun]

    @property
    def id(self) -> str:
        return self.migration.id


def _dumps(data: Any) -> str | None:
    return None if data is None else json.dumps(data, sort_keys=True)


def _loads(text: str | None) -> Any:
    return None if text is None else json.loads(text)


class Journal(JournalStore):
    """The journal of one host's engine, in the sqlite file ``path``.

    ``path`` may be ":memory:" (tests, dry runs). The parent directory is
    created when missing. A path that cannot be opened raises ConfigError,
    since it comes from ``[pipeline] journal``. ``fsync`` trades write latency
    for durability across power cuts (see the module docstring).
    """

    def __init__(self, path: str, *, fsync: bool = False) -> None:
        self.path = path
        self._lock = threading.RLock()
        self._conn = self._connect(path, fsync)
        with self._lock:
            self._conn.executescript(_SCHEMA)

    @staticmethod
    def _connect(path: str, fsync: bool) -> sqlite3.Connection:
        try:
            if path != ":memory:":
                parent = os.path.dirname(os.path.abspath(path))
                os.makedirs(parent, exist_ok=True)
            # isolation_level=None: we open transactions ourselves, so that a
            # multi-statement write is one commit and nothing stays pending.
            conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={'FULL' if fsync else 'NORMAL'}")
            conn.execute("PRAGMA foreign_keys=ON")
            conn.execute("PRAGMA busy_timeout=5000")
        except (OSError, sqlite3.Error) as err:
            raise ConfigError(
                f"cannot open the journal {path}: {err}",
                hint="set [pipeline] journal to a writable file path",
            ) from err
        return conn

    def close(self) -> None:
        """Close the connection; the journal object is unusable afterwards."""
        with self._lock:
            self._conn.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Cursor]:
        """One committed transaction, under the lock.

        BEGIN IMMEDIATE takes sqlite's write lock at once, so the read of a
        sequence number and the write using it cannot interleave with another
        process opening the same file (a second engine by mistake, the CLI).
        """
        with self._lock:
            cur = self._conn.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                yield cur
            except BaseException:
                cur.execute("ROLLBACK")
                raise
            cur.execute("COMMIT")

    # -- migrations ---------------------------------------------------------

    def begin_migration(self, migration: Migration, role: Role) -> None:
        """Record ``migration`` as running on this host in ``role``.

        Idempotent: a migration already journalled keeps its status, role and
        history (an event delivered twice must not reset it).
        """
        now = time.time()
        with self._write() as cur:
            cur.execute(
                "INSERT OR IGNORE INTO migrations (id, migration, role, status, last_phase,"
                " created, updated) VALUES (?, ?, ?, ?, NULL, ?, ?)",
                (
                    migration.id,
                    _dumps(migration.to_dict()),
                    role.value,
                    RUNNING,
                    now,
                    now,
                ),
            )

    def set_status(self, migration_id: str, status: str) -> None:
        """Set the migration's status: 'running', 'done', 'failed' or 'reverted'."""
        if status not in STATUSES:
            raise ValueError(f"unknown migration status {status!r}; expected one of {STATUSES}")
        with self._write() as cur:
            cur.execute(
                "UPDATE migrations SET status = ?, updated = ? WHERE id = ?",
                (status, time.time(), migration_id),
            )
            self._check_found(cur, migration_id)

    # -- phases -------------------------------------------------------------

    def phase_started(self, migration_id: str, phase: Phase) -> None:
        """Record that handling of ``phase`` began; it becomes the last phase reached.

        Starting a phase again (resumption after a crash) keeps its first
        start time.
        """
        now = time.time()
        with self._write() as cur:
            cur.execute(
                "UPDATE migrations SET last_phase = ?, updated = ? WHERE id = ?",
                (phase.value, now, migration_id),
            )
            self._check_found(cur, migration_id)
            cur.execute(
                "INSERT INTO phases (migration_id, phase, state, started) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (migration_id, phase) DO UPDATE SET state = excluded.state,"
                " ended = NULL",
                (migration_id, phase.value, STARTED, now),
            )

    def phase_completed(self, migration_id: str, phase: Phase) -> None:
        """Record that every stage of ``phase`` completed (the phase won't run again)."""
        self._end_phase(migration_id, phase, COMPLETED)

    def phase_failed(self, migration_id: str, phase: Phase) -> None:
        """Record that a stage of ``phase`` failed."""
        self._end_phase(migration_id, phase, STAGE_FAILED)

    def _end_phase(self, migration_id: str, phase: Phase, state: str) -> None:
        with self._write() as cur:
            cur.execute(
                "UPDATE phases SET state = ?, ended = ? WHERE migration_id = ? AND phase = ?",
                (state, time.time(), migration_id, phase.value),
            )
            if cur.rowcount == 0:
                raise KeyError(f"phase {phase.value} of migration {migration_id} was not started")

    # -- stage runs ---------------------------------------------------------

    def stage_started(self, migration_id: str, phase: Phase, stage: str) -> int:
        """Record that ``stage`` starts in ``phase``; return its start sequence number.

        A stage started again keeps its checkpoint (the re-run reads it as
        ``saved``) and loses its previous outcome.
        """
        now = time.time()
        with self._write() as cur:
            seq = self._next(cur, "seq", migration_id)
            cur.execute(
                "INSERT INTO stage_runs (migration_id, phase, stage, seq, state, started)"
                " VALUES (?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (migration_id, phase, stage) DO UPDATE SET"
                " seq = excluded.seq, state = excluded.state, started = excluded.started,"
                " completed_seq = NULL, record = NULL, attempts = 0, ended = NULL,"
                " reverted = NULL, error = NULL",
                (migration_id, phase.value, stage, seq, STARTED, now),
            )
        return seq

    def stage_checkpoint(
        self, migration_id: str, phase: Phase, stage: str, data: dict[str, Any]
    ) -> None:
        """Replace the stage's checkpoint data with ``data`` (a JSON-able dict)."""
        text = _dumps(dict(data))
        with self._write() as cur:
            cur.execute(
                "UPDATE stage_runs SET checkpoint = ?"
                " WHERE migration_id = ? AND phase = ? AND stage = ?",
                (text, migration_id, phase.value, stage),
            )
            self._check_stage(cur, migration_id, phase, stage)

    def stage_completed(
        self,
        migration_id: str,
        phase: Phase,
        stage: str,
        record: dict[str, Any] | None,
        attempts: int = 1,
    ) -> None:
        """Record that the stage's run returned ``record`` (kept for its revert)."""
        text = _dumps(record)
        with self._write() as cur:
            order = self._next(cur, "completed_seq", migration_id)
            cur.execute(
                "UPDATE stage_runs SET state = ?, record = ?, attempts = ?, ended = ?,"
                " completed_seq = ?, error = NULL"
                " WHERE migration_id = ? AND phase = ? AND stage = ?",
                (
                    COMPLETED,
                    text,
                    attempts,
                    time.time(),
                    order,
                    migration_id,
                    phase.value,
                    stage,
                ),
            )
            self._check_stage(cur, migration_id, phase, stage)

    def stage_failed(
        self, migration_id: str, phase: Phase, stage: str, error: str, attempts: int = 1
    ) -> None:
        """Record that the stage failed for good, with the error an operator reads."""
        with self._write() as cur:
            cur.execute(
                "UPDATE stage_runs SET state = ?, error = ?, attempts = ?, ended = ?"
                " WHERE migration_id = ? AND phase = ? AND stage = ?",
                (
                    STAGE_FAILED,
                    error,
                    attempts,
                    time.time(),
                    migration_id,
                    phase.value,
                    stage,
                ),
            )
            self._check_stage(cur, migration_id, phase, stage)

    def stage_reverted(
        self, migration_id: str, phase: Phase, stage: str, error: str | None = None
    ) -> None:
        """Record that the stage's revert ran; ``error`` is set when the revert raised.

        A revert that raised still marks the stage 'reverted' (it was tried
        and is not tried again); the error stays for the operator.
        """
        with self._write() as cur:
            cur.execute(
                "UPDATE stage_runs SET state = ?, reverted = ?, error = ?"
                " WHERE migration_id = ? AND phase = ? AND stage = ?",
                (STAGE_REVERTED, time.time(), error, migration_id, phase.value, stage),
            )
            self._check_stage(cur, migration_id, phase, stage)

    # -- reading ------------------------------------------------------------

    def get(self, migration_id: str) -> MigrationRecord | None:
        """The journalled migration, or None when it is unknown here."""
        with self._lock:
            row = self._conn.execute(
                "SELECT migration, role, status, last_phase FROM migrations WHERE id = ?",
                (migration_id,),
            ).fetchone()
            if row is None:
                return None
            phases = self._conn.execute(
                "SELECT phase, state FROM phases WHERE migration_id = ? ORDER BY started",
                (migration_id,),
            ).fetchall()
            stages = self._stage_rows("migration_id = ? ORDER BY seq", (migration_id,))
        return MigrationRecord(
            migration=Migration.from_dict(json.loads(row[0])),
            role=Role(row[1]),
            status=row[2],
            last_phase=Phase(row[3]) if row[3] else None,
            phases={Phase(p): s for p, s in phases},
            stages=stages,
        )

    def stage_run(self, migration_id: str, phase: Phase, stage: str) -> StageRun | None:
        """One stage's run in one phase, or None when it never started."""
        rows = self._stage_rows(
            "migration_id = ? AND phase = ? AND stage = ?",
            (migration_id, phase.value, stage),
        )
        return rows[0] if rows else None

    def completed_stages(self, migration_id: str) -> list[StageRun]:
        """Stages of the migration in state 'completed', in completion order.

        Reverting walks this list backwards (newest first).
        """
        return self._stage_rows(
            "migration_id = ? AND state = ? ORDER BY completed_seq",
            (migration_id, COMPLETED),
        )

    def unfinished(self) -> list[MigrationRecord]:
        """Migrations whose status is 'running', oldest first: what recovery looks at."""
        with self._lock:
            ids = [
                r[0]
                for r in self._conn.execute(
                    "SELECT id FROM migrations WHERE status = ? ORDER BY created, id",
                    (RUNNING,),
                )
            ]
            records = [self.get(i) for i in ids]
        return [r for r in records if r is not None]

    def recent(self, limit: int = 100) -> list[MigrationRecord]:
        """The newest ``limit`` migrations, newest first (history for operators)."""
        with self._lock:
            ids = [
                r[0]
                for r in self._conn.execute(
                    "SELECT id FROM migrations ORDER BY created DESC, id LIMIT ?", (limit,)
                )
            ]
            records = [self.get(i) for i in ids]
        return [r for r in records if r is not None]

    # -- helpers ------------------------------------------------------------

    def _stage_rows(self, where: str, params: tuple[Any, ...]) -> list[StageRun]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT migration_id, phase, stage, seq, state, record, checkpoint, attempts,"
                f" started, ended, error FROM stage_runs WHERE {where}",
                params,
            ).fetchall()
        return [
            StageRun(
                migration_id=r[0],
                phase=Phase(r[1]),
                stage=r[2],
                seq=r[3],
                state=r[4],
                record=_loads(r[5]),
                checkpoint=_loads(r[6]) or {},
                attempts=r[7],
                started=r[8],
                ended=r[9],
                error=r[10],
            )
            for r in rows
        ]

    @staticmethod
    def _next(cur: sqlite3.Cursor, column: str, migration_id: str) -> int:
        cur.execute(
            f"SELECT COALESCE(MAX({column}), 0) + 1 FROM stage_runs WHERE migration_id = ?",
            (migration_id,),
        )
        return int(cur.fetchone()[0])

    @staticmethod
    def _check_found(cur: sqlite3.Cursor, migration_id: str) -> None:
        if cur.rowcount == 0:
            raise KeyError(f"migration {migration_id} is not in the journal")

    @staticmethod
    def _check_stage(cur: sqlite3.Cursor, migration_id: str, phase: Phase, stage: str) -> None:
        if cur.rowcount == 0:
            raise KeyError(
                f"stage {stage} in phase {phase.value} of migration {migration_id} was not started"
            )


def open_sqlite(conf: Any, spec: HostSpec, lock: Any = None) -> Journal:
    """Entry point ``sqlite`` of ``vmm_orchestrator.journals``: the host's own file.

    A migration lock shared by several instances needs a shared journal, so
    SQLite refuses one (ConfigError naming the fix).
    """
    if lock is not None:
        raise ConfigError(
            "[agent] migration_lock needs a journal every instance shares",
            hint="set [agent] journal_backend = etcd",
        )
    return Journal(spec.journal)
