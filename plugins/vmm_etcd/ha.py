"""Several orchestrator instances for one host, each migration handled exactly once.

:class:`HaPipeline` is the engine's ``Pipeline`` on an :class:`EtcdJournal`
shared by the instances, with the per-migration lease of
:mod:`vmm_etcd.locks` added to the engine's own per-migration lock:

* an event is run by the instance that owns its migration; an instance
  that receives an event for a migration another live instance owns waits
  for it to finish (then the engine sees the phase done and ignores the
  event) or to die (then it carries on from the journal: completed stages
  are not run again, the one cut short is re-run with its checkpoint);
* :meth:`HaPipeline.takeover` finds the migrations whose owner died (the
  owner key vanished with its lease) and finishes or reverts them with the
  engine's recovery rules; :meth:`HaPipeline.serve_takeovers` does so as
  soon as etcd reports an owner key deleted.

Exactly once holds for stage completions: a stage completed by one
instance is never run again by another. A stage cut short by a crash is
run again (stages must be idempotent, as for a single instance's restart).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import cast

from oslo_config import cfg

from vmm_etcd.journal import EtcdJournal
from vmm_etcd.locks import Claim, MigrationBusy, MigrationLocks
from vmm_etcd.watch import WatchStream
from vmm_orchestrator import journal as jr
from vmm_orchestrator.engine import Decided, PhaseReport, Pipeline
from vmm_orchestrator.journal import Journal
from vmm_orchestrator.model import Migration, MigrationEvent
from vmm_orchestrator.nva.errors import NvaError
from vmm_orchestrator.stage import HostContext, Stage

LOG = logging.getLogger(__name__)

Locate = Callable[[Migration], str | None]


class HaPipeline(Pipeline):
    """A Pipeline whose migrations are leased in etcd and journalled there."""

    def __init__(
        self,
        conf: cfg.ConfigOpts,
        host: HostContext,
        journal: EtcdJournal,
        locks: MigrationLocks,
        stages: list[Stage] | None = None,
        clock: Callable[[], float] = time.monotonic,
        claim_timeout: float = 60.0,
    ) -> None:
        if journal.owner is None:
            journal.owner = locks  # fence the journal's writes with the leases
        # EtcdJournal has Journal's API without sharing its SQLite base class.
        super().__init__(conf, host, cast(Journal, journal), stages, clock)
        self.etcd_journal = journal
        self.locks = locks
        self.claim_timeout = claim_timeout

    @property
    def instance(self) -> str:
        return self.locks.instance

    # -- events -----------------------------------------------------------------

    def handle(self, event: MigrationEvent, decided: Decided | None = None) -> PhaseReport:
        """Run the event if this instance owns (or can claim) its migration.

        When another live instance keeps it past ``claim_timeout`` the
        report says so (ok=False) and nothing ran here (``decided`` gets
        that error too).
        """
        try:
            return super().handle(event, decided)
        except MigrationBusy as err:
            LOG.info("instance %s: %s", self.instance, err)
            return PhaseReport(
                event.migration.id,
                self.host.name,
                event.phase,
                event.role,
                False,
                error=str(err),
                detail="handled by another instance",
            )

    @contextmanager
    def _migration_lock(self, migration_id: str) -> Iterator[None]:
        """The engine's per-migration lock, plus the migration's lease in etcd."""
        with super()._migration_lock(migration_id):
            if self.locks.claim(migration_id, self.claim_timeout) is Claim.NEW:
                self.etcd_journal.forget(migration_id)  # another instance may have written
            try:
                yield
            finally:
                self._release_if_over(migration_id)

    def _release_if_over(self, migration_id: str) -> None:
        """Keep the lease while the migration runs (between events too); drop it after."""
        try:
            record = self.journal.get(migration_id)
            if record is None or record.status != jr.RUNNING:
                self.locks.release(migration_id)
        except NvaError as exc:  # etcd unreachable: the lease expires on its own
            LOG.warning("instance %s: cannot release %s: %s", self.instance, migration_id, exc)

    # -- takeover ---------------------------------------------------------------

    def recover(self, locate: Locate | None = None) -> list[PhaseReport]:
        """Start-up recovery in a group of instances is a takeover of orphans."""
        return self.takeover(locate)

    def takeover(self, locate: Locate | None = None) -> list[PhaseReport]:
        """Finish or revert every running migration that has no live owner.

        Uses the engine's recovery rules (see ``Pipeline.recover``) for each
        migration claimed here; migrations owned by live instances,
        including this one, are left alone.
        """
        reports = []
        for record in self.journal.unfinished():
            if self.locks.try_claim(record.id) is not Claim.NEW:
                continue
            self.etcd_journal.forget(record.id)
            LOG.warning(
                "instance %s: taking over migration %s (its owner is gone)",
                self.instance,
                record.id,
            )
            with super()._migration_lock(record.id):
                try:
                    current = self.journal.get(record.id)
                    if current is not None and current.status == jr.RUNNING:
                        reports.append(self._recover_one(current, locate))
                finally:
                    self._release_if_over(record.id)
        return reports

    def serve_takeovers(
        self,
        stop: threading.Event,
        locate: Locate | None = None,
        interval: float = 5.0,
        on_report: Callable[[PhaseReport], None] | None = None,
    ) -> None:
        """Take orphans over until ``stop`` is set: at once when an owner key is
        deleted (a lease expired), and every ``interval`` s in any case.
        ``on_report`` gets the report of each migration taken over."""
        prefix = self.locks.keys.owners(self.host.name)
        while not stop.is_set():
            try:
                start = self.locks.kv.read(what="read the revision").revision + 1
                for report in self.takeover(locate):
                    if on_report is not None:
                        on_report(report)
                stream = WatchStream(self.locks.kv, prefix, start_revision=start, prefix=True)
            except NvaError as exc:
                LOG.warning("instance %s: takeover scan failed: %s", self.instance, exc)
                stop.wait(interval)
                continue
            try:
                deadline = time.monotonic() + interval
                while not stop.is_set() and time.monotonic() < deadline:
                    events = stream.get(min(0.5, max(0.0, deadline - time.monotonic())))
                    if events and any(e.kind == "DELETE" for e in events):
                        break
            except NvaError:
                stop.wait(min(interval, 1.0))
            finally:
                stream.close()
