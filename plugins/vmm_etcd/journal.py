"""The engine's journal on etcd, shared by every orchestrator instance of a host.

:class:`EtcdJournal` has the API of :class:`vmm_orchestrator.journal.Journal`
(the same methods, records, errors and ordering), so a ``Pipeline`` runs on
it unchanged. What the SQLite journal gives one process (a restart finishes
or reverts what was in flight), this one gives a group of instances: the
journal is in etcd, so when one instance dies another reads exactly what it
had done and takes its migrations over (see :mod:`vmm_etcd.ha`).

One key per migration holds its whole record as JSON (a migration has a
handful of stages), so every write is one compare-and-swap on that key: a
write is never half applied and two writers cannot interleave. With
``owner`` set, every write also requires that this instance still owns the
migration's lease: an instance that lost its lease (paused too long,
partitioned away) cannot overwrite what the instance that took over writes
(a fencing token, in the usual lock-service terms).
"""

from __future__ import annotations

import copy
import json
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from vmm_etcd import kv as kvmod
from vmm_etcd.keys import Keys
from vmm_etcd.kv import EtcdKV
from vmm_etcd.txn import dumps
from vmm_orchestrator import journal as jr
from vmm_orchestrator.contracts import JournalStore
from vmm_orchestrator.errors import VmmError
from vmm_orchestrator.journal import MigrationRecord, StageRun
from vmm_orchestrator.model import Migration, Phase, Role

#: Attempts of one write against concurrent writers before giving up.
MAX_ATTEMPTS = 20


class OwnershipLost(VmmError):
    """This instance no longer owns the migration: another one has taken it over."""


class Fence(Protocol):
    """What the journal needs from the lease manager to fence its writes."""

    @property
    def token(self) -> str:
        """What the owner key holds while this instance owns a migration."""
        ...

    def fence(self, migration_id: str) -> dict[str, Any]:
        """An etcd compare that holds only while this instance owns the migration."""
        ...

    def owner_of(self, migration_id: str) -> str | None:
        """The instance owning the migration now (for messages), or None."""
        ...


def _stage_key(phase: Phase | str, stage: str) -> str:
    value = phase.value if isinstance(phase, Phase) else phase
    return f"{value}/{stage}"


class EtcdJournal(JournalStore):
    """The journal of host ``host``'s engine, in etcd under ``prefix``."""

    def __init__(
        self,
        kv: EtcdKV,
        host: str,
        prefix: str = "/vmm/",
        *,
        owner: Fence | None = None,
        owns_kv: bool = False,
    ) -> None:
        self.kv = kv
        self.host = host
        self.keys = Keys(prefix)
        self.owner = owner
        self.path = f"etcd {kv.describe()} {self.keys.journal(host)}"
        self._owns_kv = owns_kv
        # Guards the two dicts only; never held across a round trip to etcd.
        self._lock = threading.Lock()
        # migration id -> (record, mod revision) as this instance last wrote or read it
        self._cache: dict[str, tuple[dict[str, Any], int]] = {}
        # One writer at a time per migration; migrations write in parallel (one lock
        # around every write would queue all of a host's migrations behind each other's
        # round trips).
        self._writers: dict[str, threading.Lock] = {}

    def close(self) -> None:
        """Forget cached records (and close the connection if this journal opened it)."""
        with self._lock:
            self._cache.clear()
            self._writers.clear()
        if self._owns_kv:
            self.kv.close()

    # -- storage ---------------------------------------------------------------

    def _key(self, migration_id: str) -> str:
        return self.keys.journal_entry(self.host, migration_id)

    def _load(self, migration_id: str) -> tuple[dict[str, Any] | None, int]:
        found = self.kv.read(kvmod.get(self._key(migration_id)), what="read the journal").one(0)
        if found is None:
            return None, 0
        return json.loads(found.value), found.mod_revision

    def _write(
        self,
        migration_id: str,
        change: Callable[[dict[str, Any] | None], dict[str, Any] | None],
        *,
        fenced: bool = True,
    ) -> Any:
        """Apply ``change`` to the record and store it; ``change`` returns None to write nothing.

        The first attempt uses the cached record: the owner is normally
        the only writer, so a write is one round trip.
        """
        key = self._key(migration_id)
        with self._lock:
            writer = self._writers.setdefault(migration_id, threading.Lock())
        with writer:
            with self._lock:
                cached = self._cache.get(migration_id)
            record: dict[str, Any] | None
            if cached is not None:
                record, mod = copy.deepcopy(cached[0]), cached[1]
            else:
                record, mod = self._load(migration_id)
            for _ in range(MAX_ATTEMPTS):
                updated = change(copy.deepcopy(record) if record is not None else None)
                if updated is None:
                    return None
                compare = [kvmod.cmp_mod(key, mod)]
                if fenced and self.owner is not None:
                    compare.append(self.owner.fence(migration_id))
                value = dumps(updated)
                answer = self.kv.txn(
                    compare, [kvmod.put(key, value)], what=f"write the journal of {migration_id}"
                )
                if answer.succeeded:
                    with self._lock:
                        self._cache[migration_id] = (updated, answer.revision)
                    return updated
                record, mod = self._load(migration_id)
                if fenced and self.owner is not None:
                    holder = self.owner.owner_of(migration_id)
                    if holder != self.owner.token:
                        self.forget(migration_id)
                        raise OwnershipLost(
                            f"migration {migration_id} on host {self.host} is now handled by "
                            f"{holder or 'nobody'}; this instance must not write its journal",
                            hint="this instance lost its etcd lease (paused or cut off for "
                            "longer than [nva_etcd] lease_ttl)",
                        )
            raise jr_error(f"the journal entry of {migration_id} kept changing; giving up")

    @staticmethod
    def _require(record: dict[str, Any] | None, migration_id: str) -> dict[str, Any]:
        if record is None:
            raise KeyError(f"migration {migration_id} is not in the journal")
        return record

    @staticmethod
    def _require_stage(
        record: dict[str, Any] | None, migration_id: str, phase: Phase, stage: str
    ) -> dict[str, Any]:
        run = None if record is None else record["stages"].get(_stage_key(phase, stage))
        if run is None:
            raise KeyError(
                f"stage {stage} in phase {phase.value} of migration {migration_id} was not started"
            )
        result: dict[str, Any] = run
        return result

    # -- migrations ---------------------------------------------------------

    def begin_migration(self, migration: Migration, role: Role) -> None:
        """Record ``migration`` as running on this host in ``role`` (idempotent)."""
        now = time.time()

        def change(record: dict[str, Any] | None) -> dict[str, Any] | None:
            if record is not None:
                return None  # an event delivered twice must not reset it
            return {
                "id": migration.id,
                "migration": migration.to_dict(),
                "role": role.value,
                "status": jr.RUNNING,
                "last_phase": None,
                "created": now,
                "updated": now,
                "phases": {},
                "stages": {},
            }

        self._write(migration.id, change)

    def set_status(self, migration_id: str, status: str) -> None:
        """Set the migration's status: 'running', 'done', 'failed' or 'reverted'."""
        if status not in jr.STATUSES:
            raise ValueError(f"unknown migration status {status!r}; expected one of {jr.STATUSES}")

        def change(record: dict[str, Any] | None) -> dict[str, Any]:
            record = self._require(record, migration_id)
            record["status"] = status
            record["updated"] = time.time()
            return record

        self._write(migration_id, change)

    # -- phases -------------------------------------------------------------

    def phase_started(self, migration_id: str, phase: Phase) -> None:
        """Record that handling of ``phase`` began (keeping its first start time)."""
        now = time.time()

        def change(record: dict[str, Any] | None) -> dict[str, Any]:
            record = self._require(record, migration_id)
            record["last_phase"] = phase.value
            record["updated"] = now
            old = record["phases"].get(phase.value)
            started = old["started"] if old else now
            record["phases"][phase.value] = {"state": jr.STARTED, "started": started, "ended": None}
            return record

        self._write(migration_id, change)

    def phase_completed(self, migration_id: str, phase: Phase) -> None:
        """Record that every stage of ``phase`` completed."""
        self._end_phase(migration_id, phase, jr.COMPLETED)

    def phase_failed(self, migration_id: str, phase: Phase) -> None:
        """Record that a stage of ``phase`` failed."""
        self._end_phase(migration_id, phase, jr.STAGE_FAILED)

    def _end_phase(self, migration_id: str, phase: Phase, state: str) -> None:
        def change(record: dict[str, Any] | None) -> dict[str, Any]:
            entry = None if record is None else record["phases"].get(phase.value)
            if record is None or entry is None:
                raise KeyError(f"phase {phase.value} of migration {migration_id} was not started")
            entry.update(state=state, ended=time.time())
            return record

        self._write(migration_id, change)

    # -- stage runs ---------------------------------------------------------

    def stage_started(self, migration_id: str, phase: Phase, stage: str) -> int:
        """Record that ``stage`` starts in ``phase``; return its start sequence number."""
        now = time.time()
        seq = 0

        def change(record: dict[str, Any] | None) -> dict[str, Any]:
            nonlocal seq
            record = self._require(record, migration_id)
            runs = record["stages"]
            seq = max((r["seq"] for r in runs.values()), default=0) + 1
            old = runs.get(_stage_key(phase, stage))
            runs[_stage_key(phase, stage)] = {
                "phase": phase.value,
                "stage": stage,
                "seq": seq,
                "completed_seq": None,
                "state": jr.STARTED,
                "record": None,
                "checkpoint": old["checkpoint"] if old else None,
                "attempts": 0,
                "started": now,
                "ended": None,
                "reverted": None,
                "error": None,
            }
            return record

        self._write(migration_id, change)
        return seq

    def _update_stage(self, migration_id: str, phase: Phase, stage: str, **fields: Any) -> None:
        def change(record: dict[str, Any] | None) -> dict[str, Any]:
            run = self._require_stage(record, migration_id, phase, stage)
            assert record is not None
            if fields.pop("_complete", False):
                fields["completed_seq"] = (
                    max((r["completed_seq"] or 0 for r in record["stages"].values()), default=0) + 1
                )
            run.update(fields)
            return record

        self._write(migration_id, change)

    def stage_checkpoint(
        self, migration_id: str, phase: Phase, stage: str, data: dict[str, Any]
    ) -> None:
        """Replace the stage's checkpoint data with ``data`` (a JSON-able dict)."""
        self._update_stage(migration_id, phase, stage, checkpoint=json.loads(dumps(dict(data))))

    def stage_completed(
        self,
        migration_id: str,
        phase: Phase,
        stage: str,
        record: dict[str, Any] | None,
        attempts: int = 1,
    ) -> None:
        """Record that the stage's run returned ``record`` (kept for its revert)."""
        self._update_stage(
            migration_id,
            phase,
            stage,
            _complete=True,
            state=jr.COMPLETED,
            record=None if record is None else json.loads(dumps(record)),
            attempts=attempts,
            ended=time.time(),
            error=None,
        )

    def stage_failed(
        self, migration_id: str, phase: Phase, stage: str, error: str, attempts: int = 1
    ) -> None:
        """Record that the stage failed for good, with the error an operator reads."""
        self._update_stage(
            migration_id,
            phase,
            stage,
            state=jr.STAGE_FAILED,
            error=error,
            attempts=attempts,
            ended=time.time(),
        )

    def stage_reverted(
        self, migration_id: str, phase: Phase, stage: str, error: str | None = None
    ) -> None:
        """Record that the stage's revert ran; ``error`` is set when the revert raised."""
        self._update_stage(
            migration_id, phase, stage, state=jr.STAGE_REVERTED, reverted=time.time(), error=error
        )

    # -- reading ------------------------------------------------------------

    def forget(self, migration_id: str) -> None:
        """Drop the cached record: the next read goes to etcd (after a change of owner)."""
        with self._lock:
            self._cache.pop(migration_id, None)

    def _current(self, migration_id: str) -> dict[str, Any] | None:
        """The record to read from.

        With fenced writes (``owner`` set) the owner is the only writer, so
        what it last wrote is current: reads come from the cache and the
        critical path saves a round trip per read. (If ownership was lost,
        the next write is refused, so a stale read cannot be acted upon.)
        Otherwise every read goes to etcd.
        """
        with self._lock:
            cached = self._cache.get(migration_id)
            if self.owner is not None and cached is not None:
                return copy.deepcopy(cached[0])
        record, mod = self._load(migration_id)
        if record is not None:
            with self._lock:
                known = self._cache.get(migration_id)
                if known is None or known[1] < mod:
                    self._cache[migration_id] = (record, mod)
        return record

    def get(self, migration_id: str) -> MigrationRecord | None:
        """The journalled migration, or None when it is unknown here."""
        record = self._current(migration_id)
        return None if record is None else _migration_record(record)

    def stage_run(self, migration_id: str, phase: Phase, stage: str) -> StageRun | None:
        """One stage's run in one phase, or None when it never started."""
        record = self._current(migration_id)
        run = None if record is None else record["stages"].get(_stage_key(phase, stage))
        return None if run is None else _stage_run(migration_id, run)

    def completed_stages(self, migration_id: str) -> list[StageRun]:
        """Stages of the migration in state 'completed', in completion order."""
        record = self._current(migration_id)
        if record is None:
            return []
        runs = [r for r in record["stages"].values() if r["state"] == jr.COMPLETED]
        runs.sort(key=lambda r: r["completed_seq"] or 0)
        return [_stage_run(migration_id, r) for r in runs]

    def unfinished(self) -> list[MigrationRecord]:
        """Migrations whose status is 'running', oldest first: what recovery looks at."""
        items = self.kv.read(
            kvmod.get_prefix(self.keys.journal(self.host)), what="read the journal"
        ).kvs(0)
        records = [json.loads(i.value) for i in items]
        running = [r for r in records if r["status"] == jr.RUNNING]
        running.sort(key=lambda r: (r["created"], r["id"]))
        return [_migration_record(r) for r in running]


def jr_error(message: str) -> VmmError:
    return VmmError(message, hint="another writer is changing the same journal entry")


def _stage_run(migration_id: str, run: dict[str, Any]) -> StageRun:
    return StageRun(
        migration_id=migration_id,
        phase=Phase(run["phase"]),
        stage=run["stage"],
        seq=run["seq"],
        state=run["state"],
        record=run["record"],
        checkpoint=run["checkpoint"] or {},
        attempts=run["attempts"],
        started=run["started"],
        ended=run["ended"],
        error=run["error"],
    )


def _migration_record(record: dict[str, Any]) -> MigrationRecord:
    phases = sorted(record["phases"].items(), key=lambda item: item[1]["started"])
    runs = sorted(record["stages"].values(), key=lambda r: r["seq"])
    return MigrationRecord(
        migration=Migration.from_dict(record["migration"]),
        role=Role(record["role"]),
        status=record["status"],
        last_phase=Phase(record["last_phase"]) if record["last_phase"] else None,
        phases={Phase(p): entry["state"] for p, entry in phases},
        stages=[_stage_run(record["id"], r) for r in runs],
    )
