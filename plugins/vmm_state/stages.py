"""Pipeline stages that move a VM's dynamic state with it, in phases.

* PREPARE, destination, ``state_precopy``: pull the full export from the
  source and import it here, while the VM still runs at the source. A FAIL
  whose rule says abort (by default resource_limit and policy_conflict)
  fails the stage, which vetoes the migration before the VM moves.
* SWITCHOVER, source, ``state_delta``: while the VM is paused, export what
  changed since the destination's last import and push it there; the
  destination imports it before answering, so the state is in place before
  the VM resumes. This stage is the part of the transfer inside the pause.
  The source has tracked the VM's changes since it exported the pre-copy
  (conntrack events, nftables fingerprints: ``StateKind.track``), so the
  delta holds only the entries created, changed or destroyed since; after a
  lost event it is a full resync, noted per kind (``delta``, ``resyncs``).
  Tracking ends when the migration does (``StateHost.forget``: COMPLETED,
  ABORTED) or after ``[state_conntrack] track_seconds``. Inside the pause it
  costs one round trip: the destination told the source what it holds right
  after its pre-copy (the source settled then: ``StateHost.held``), the kinds
  whose delta needs no answer start exporting at once (``prefetch``), a
  kind with no change since lists nothing (``kinds._watch``), and one bundle
  carries every kind's delta; an empty one costs the destination no work.
* COMPLETED, source, ``state_cleanup``: remove the VM's entries here
  (keeping the sessions of the endpoints that stay here: their traffic with
  the VM still crosses this host's firewall) and tell the destination its
  imports are final.
* ABORTED: ``state_precopy`` reverts every import of the migration at the
  destination (pre-copy and delta), ``state_delta`` asks the destination to
  revert the delta (harmless when already done).

Warm mobility (:mod:`vmm_state.warm`): for a planned move whose mirror the
destination already holds, ``state_precopy`` adopts the mirror and pulls
only what changed since it, and the move's state stays under the mirror's
identity (``state_id`` in the stages' records): ``state_delta`` asks the
destination which identity holds the imports, revert and commit follow it.

Each stage notes per-kind counts and timings in the timeline (``ctx.note``).
The host's StateHost is found under ``ctx.host.service("state")``.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any

from oslo_config import cfg

from vmm_orchestrator.errors import StageFailed
from vmm_orchestrator.model import Migration, Phase, Role, normalize_mac
from vmm_orchestrator.stage import Stage, StageContext
from vmm_orchestrator.statekind import KindContext
from vmm_state import policy, warm
from vmm_state.importer import KindAnswer, LedgerEntry
from vmm_state.policy import Policy, Verdict
from vmm_state.service import StateHost, Transfer
from vmm_state.wire import ServiceError

LOG = logging.getLogger(__name__)

PRECOPY = "precopy"
DELTA = "delta"


def state_host(ctx: StageContext) -> StateHost:
    host: StateHost = ctx.host.service("state")
    return host


def figures(transfers: list[Transfer], verdict: Verdict) -> dict[str, Any]:
    """The notes of a transfer: per kind and in total, over every attempt."""
    kinds: dict[str, Any] = {}
    for name, answer in verdict.answers.items():
        exported = [t.exported[name] for t in transfers if name in t.exported]
        kinds[name] = {
            "result": "SUCCESS" if answer.ok else "FAIL",
            "reason": answer.reason.value if answer.reason else None,
            "detail": answer.detail,
            "entries": answer.entries,
            "installed": answer.installed,
            "attempts": verdict.attempts.get(name, 0),
            "import_ms": round(answer.ms, 3),
            "export_ms": round(sum(e.ms for e in exported), 3) if exported else None,
        }
        tracked = [e.figures for e in exported if e.figures]
        if tracked:  # e.g. {"mode": "delta" | "resync" | "full", counts}
            kinds[name]["delta"] = tracked[-1]
            kinds[name]["resyncs"] = sum(1 for f in tracked if f.get("mode") == "resync")
    return {
        "kinds": kinds,
        "bytes": sum(t.report.bytes for t in transfers),
        "transfers": len(transfers),
        "transfer_ms": round(sum(t.ms for t in transfers), 3),
        "check_ms": round(sum(t.report.check_ms for t in transfers), 3),
        "at_risk": list(verdict.at_risk),
    }


class _StateStage(Stage):
    """Shared by the state stages: the policy, read once when the pipeline loads."""

    default_attempts = 1  # retries are the policy's business (per kind and reason)
    requires = ("state",)

    def __init__(self, conf: cfg.ConfigOpts) -> None:
        super().__init__(conf)
        self.policy = Policy.from_conf(conf)

    def transfer(
        self,
        ctx: StageContext,
        host: StateHost,
        kinds: list[str],
        move: Callable[[list[str]], Transfer],
    ) -> tuple[list[Transfer], Verdict]:
        """Run ``move(kinds) -> Transfer`` under the policy for ``kinds``."""
        transfers: list[Transfer] = []

        def attempt(names: list[str]) -> dict[str, KindAnswer]:
            done = move(names)
            transfers.append(done)
            return done.report.answers_for(names)

        verdict = policy.run(self.policy, attempt, kinds, host.settings.retry_delay, ctx.remaining)
        for kind in verdict.at_risk:
            answer = verdict.answers[kind]
            LOG.warning(
                "host %s: migration %s continues without %s state (at risk): %s",
                host.name,
                ctx.migration.id,
                kind,
                answer.detail,
            )
        return transfers, verdict


class StatePrecopy(_StateStage):
    """PREPARE, destination: pull the full export from the source and import it.

    Runs before the VM moves, so a destination that cannot take the state
    (FAIL/resource_limit) or refuses it (FAIL/policy_conflict) vetoes the
    migration at no cost. On abort the stage first undoes the kinds it
    already installed: no half-applied state is left behind.
    """

    name = "state_precopy"
    phase = Phase.PREPARE
    role = Role.DESTINATION
    default_deadline = 60.0

    def run(self, ctx: StageContext) -> dict[str, Any]:
        host = state_host(ctx)
        migration = ctx.migration
        if not host.kinds:
            ctx.note(kinds={}, skipped="no state kinds are enabled ([state] kinds)")
            return {"label": PRECOPY, "imports": [], "at_risk": []}
        host.expect(migration)
        kinds = host.source_kinds(migration, ctx.deadline)
        adoption = warm.adopt(host, migration)
        target = migration if adoption is None else adoption.mirror
        if adoption is None:
            move: Callable[[list[str]], Transfer] = lambda names: host.pull(  # noqa: E731
                migration, PRECOPY, names, ctx.deadline
            )
        else:
            move = lambda names: warm.precopy_transfer(host, adoption, names, ctx.deadline)  # noqa: E731
        transfers, verdict = self.transfer(ctx, host, kinds, move)
        if adoption is not None:
            whole = not warm.intact(host, adoption)
            if whole:  # the relay reverted the mirror under us: start from nothing
                LOG.warning(
                    "host %s: the warm mirror of %s went away during its adoption; "
                    "pulling the whole state",
                    host.name,
                    migration.id,
                )
                host.revert_imports(target, None)
                more, verdict = self.transfer(
                    ctx,
                    host,
                    kinds,
                    lambda names: warm.pull_since(host, target, names, None, ctx.deadline),
                )
                transfers += more
            ctx.note(
                warm={
                    "mirror": target.id,
                    "mirrored": sorted(adoption.synced),
                    "mirror_age_s": round(adoption.age, 3),
                    "mirror_imports": len(adoption.base),
                    "refetched_whole": whole,
                }
            )
        ctx.note(**figures(transfers, verdict))
        if verdict.abort:
            _, errors = host.revert_imports(target, PRECOPY)
            text = f"state pre-copy from {migration.source} vetoes the migration: "
            text += verdict.failure_text()
            if errors:
                text += "; undoing the kinds already installed failed: " + "; ".join(errors)
            raise StageFailed(
                text, hint="see [state] on_<reason> for what each reason does; fix the cause"
            )
        imports = [
            e.to_dict() for e in host.importer.ledger.entries(target.id) if e.label == PRECOPY
        ]
        if host.settings.ledger_dir:
            imports = []  # the ledger on disk has them; keep large records out of the journal
        try:
            # Refused once the engine gave up on this stage (deadline): then nobody
            # would revert what we installed, so we do it ourselves.
            ctx.checkpoint({"label": PRECOPY, "imported": True, "state_id": target.id})
        except StageFailed:
            host.revert_imports(target, PRECOPY)
            raise
        held = host.importer.synced(target.id)
        if held:  # the source settles now and needs not ask inside the pause
            try:
                host.peer(migration.source).tell_held(target, held, ctx.deadline)
            except Exception as err:  # it asks at the switchover instead
                LOG.info("host %s: telling %s what it holds failed: %s", host.name,
                         migration.source, err)  # fmt: skip
        return {
            "label": PRECOPY,
            "imports": imports,
            "at_risk": verdict.at_risk,
            "state_id": target.id,
        }

    def revert(self, ctx: StageContext, record: dict[str, Any] | None) -> None:
        """Undo every import of the migration here (pre-copy and delta), newest first,
        also those under the warm mirror it adopted (the plan then goes on, its
        mirror rebuilt from nothing: the VM stays at the source)."""
        host = state_host(ctx)
        migration = ctx.migration
        used = str((record or {}).get("state_id", migration.id))
        fallback = [LedgerEntry.from_dict(e) for e in (record or {}).get("imports", [])]
        mirror = warm.abandon(host, migration)
        if mirror is None and used != migration.id:
            mirror = dataclasses.replace(migration, id=used)
        reverted, errors = host.revert_imports(
            migration, None, fallback if used == migration.id else None
        )
        host.forget(migration.id)
        if mirror is not None:
            more, more_errors = host.revert_imports(
                mirror, None, fallback if used == mirror.id else None
            )
            reverted += more
            errors += more_errors
        ctx.note(reverted=reverted)
        if errors:
            raise StageFailed(
                "reverting imported state failed: " + "; ".join(errors),
                hint="the entries stay recorded; an ABORTED event reverts them again",
            )


class StateDelta(_StateStage):
    """SWITCHOVER, source: push what changed since the pre-copy, inside the pause.

    Each kind is exported from the time of the export the destination last
    imported (it says so; a kind it never imported is sent whole) minus
    ``[state] delta_margin``. The destination imports before it answers,
    i.e. before the VM resumes there. On abort the destination is asked to
    revert this delta at once.
    """

    name = "state_delta"
    phase = Phase.SWITCHOVER
    role = Role.SOURCE
    default_deadline = 10.0

    def run(self, ctx: StageContext) -> dict[str, Any]:
        host = state_host(ctx)
        migration = ctx.migration
        if not host.kinds:
            ctx.note(kinds={}, skipped="no state kinds are enabled ([state] kinds)")
            return {"label": DELTA, "destination": migration.destination}
        host.expect(migration)
        started = time.monotonic()
        # The deltas that need no answer from the destination start now, side by
        # side, while it is asked what it holds (one round trip hides them).
        host.prefetch(migration, list(host.kinds))
        try:
            return self._run(ctx, host, migration, started)
        finally:
            host.drop_prefetch(migration.id)

    def _run(
        self, ctx: StageContext, host: StateHost, migration: Migration, started: float
    ) -> dict[str, Any]:
        # The identity under which the destination imported this move's pre-copy:
        # the migration's own, or the warm mirror it adopted (vmm_state.warm).
        asking = time.monotonic()
        try:
            target, synced = warm.delta_identity(host, migration, ctx.deadline)
        except ServiceError:  # asked again (and answered FAIL) by the transfer below
            target, synced = migration, None
        ctx.note(identity_ms=round((time.monotonic() - asking) * 1000.0, 3))
        warm.note_moved_as(migration.id, None if target is migration else target)
        asked = [synced]

        def move(names: list[str]) -> Transfer:
            known = asked.pop() if asked else None
            if known is None:
                return host.push(target, DELTA, names, ctx.deadline)
            return warm.push_since(host, target, DELTA, names, ctx.deadline, known)

        transfers, verdict = self.transfer(ctx, host, list(host.kinds), move)
        ctx.note(delta_ms=round((time.monotonic() - started) * 1000.0, 3))
        if target is not migration:
            ctx.note(warm={"mirror": target.id})
        ctx.note(**figures(transfers, verdict))
        if verdict.abort:
            text = f"state delta to {migration.destination} failed: {verdict.failure_text()}"
            try:
                host.peer(migration.destination).revert(target, DELTA, ctx.deadline)
            except Exception as err:
                text += f"; asking {migration.destination} to revert the delta failed: {err}"
            raise StageFailed(text, hint="see [state] on_<reason> for what each reason does")
        try:
            # refused past the deadline
            ctx.checkpoint({"label": DELTA, "pushed": True, "state_id": target.id})
        except StageFailed:
            try:
                host.peer(migration.destination).revert(target, DELTA, time.monotonic() + 5.0)
            except Exception as err:
                LOG.error("host %s: undoing the late delta of %s failed: %s", host.name, ctx, err)
            raise
        return {"label": DELTA, "destination": migration.destination, "state_id": target.id}

    def revert(self, ctx: StageContext, record: dict[str, Any] | None) -> None:
        """Ask the destination to undo the delta it imported (a no-op if it already did)."""
        host = state_host(ctx)
        target = warm.moved_as(ctx.migration.id) or ctx.migration
        used = (record or {}).get("state_id")
        if used and used != target.id:
            target = dataclasses.replace(ctx.migration, id=str(used))
        answer = host.peer(ctx.migration.destination).revert(target, DELTA, ctx.deadline)
        warm.note_moved_as(ctx.migration.id, None)
        warm.resumed_plan(host, ctx.migration)
        host.forget(ctx.migration.id)
        ctx.note(reverted=answer.get("reverted", 0))
        if answer.get("errors"):
            raise StageFailed(
                f"{ctx.migration.destination} could not revert the delta: "
                + "; ".join(map(str, answer["errors"]))
            )


def endpoints_here(nva: Any, host: str, migration: Migration) -> frozenset[str]:
    """The addresses of the other endpoints the directory places at ``host`` (or
    is moving there), in the VNIs of the migration's VM: the peers whose traffic
    with the VM still crosses this host's firewall once the VM has left."""
    if nva is None:
        raise LookupError(f"host {host} has no directory client")
    vifs = migration.workload.vifs
    own = {v.mac for v in vifs}
    found: set[str] = set()
    for vni in sorted({v.vni for v in vifs}):
        for ep in nva.list_endpoints(vni=vni):
            if host not in (ep.get("nve"), ep.get("pending_nve")):
                continue
            if normalize_mac(str(ep.get("mac", ""))) in own:
                continue
            found.update(str(a) for a in (*(ep.get("ipv4") or ()), *(ep.get("ipv6") or ())))
    return frozenset(found)


def cleanup_source(host: StateHost, ctx: KindContext) -> dict[str, str | None]:
    """StateHost.cleanup_source with this kind context: per kind None or the error."""
    out: dict[str, str | None] = {}
    for name, kind in host.kinds.items():
        try:
            kind.cleanup_source(ctx)
            out[name] = None
        except Exception as err:
            LOG.error("host %s: cleanup of %s for %s failed: %r", host.name, name, ctx, err)
            out[name] = repr(err)
    return out


class StateCleanup(Stage):
    """COMPLETED, source: remove the VM's state here; make the destination's final.

    Never fails the phase: a failure at COMPLETED would make the engine
    revert this host's stages of the migration (the delta at the
    destination included) while the VM already runs there. Failures are
    logged and noted instead; stale source entries only expire late.

    What the VM still needs here is kept: the kinds are told the addresses
    of the other endpoints the directory places at this host
    (``KindContext.keep_addresses``), whose traffic with the VM still
    crosses this host's firewall (conntrack keeps their sessions). If the
    directory cannot be asked, they are told None and keep everything that
    may be in use. In the lab's pipeline this stage runs after
    ``hold_timer``, so the in-flight tunnel (traffic of peers elsewhere
    still arriving here) is gone by then.
    """

    name = "state_cleanup"
    phase = Phase.COMPLETED
    role = Role.SOURCE
    requires = ("state",)
    default_deadline = 30.0
    default_attempts = 1

    def run(self, ctx: StageContext) -> dict[str, Any]:
        host = state_host(ctx)
        migration = ctx.migration
        keep: frozenset[str] | None = frozenset()
        if host.kinds:
            try:
                keep = endpoints_here(ctx.host.nva, host.name, migration)
            except Exception as err:  # never delete what may be in use (see docstring)
                LOG.warning(
                    "host %s: cannot ask the directory which endpoints stay here (%s); "
                    "every entry of migration %s that may still be in use is kept here",
                    host.name,
                    err,
                    migration.id,
                )
                keep = None
        kind_ctx = dataclasses.replace(host.context(migration), keep_addresses=keep)
        results = cleanup_source(host, kind_ctx)
        failed = {k: v for k, v in results.items() if v is not None}
        committed: Any = None
        if host.kinds:
            try:
                committed = host.peer(migration.destination).commit(migration, ctx.deadline)
            except Exception as err:  # noted and logged, never fatal here (see docstring)
                LOG.warning(
                    "host %s: telling %s that migration %s is final failed: %s",
                    host.name,
                    migration.destination,
                    migration.id,
                    err,
                )
                committed = {"error": str(err)}
            mirror = warm.moved_as(migration.id)
            if mirror is not None:  # the move's state went as its adopted warm mirror
                try:
                    answer = host.peer(migration.destination).commit(mirror, ctx.deadline)
                    ctx.note(mirror_commit=answer)
                except Exception as err:  # as above: noted and logged, never fatal
                    LOG.warning(
                        "host %s: committing the warm mirror of %s at %s failed: %s",
                        host.name,
                        migration.id,
                        migration.destination,
                        err,
                    )
                    ctx.note(mirror_commit={"error": str(err)})
                host.forget(mirror.id)
                warm.note_moved_as(migration.id, None)
            warm.completed(host, migration)
        host.forget(migration.id)
        ctx.note(cleaned=sorted(k for k, v in results.items() if v is None))
        # addresses of the endpoints whose entries stay here (None: unknown, all kept)
        ctx.note(endpoints_here=None if keep is None else len(keep))
        if failed:
            ctx.note(cleanup_failed=failed)
        ctx.note(destination_commit=committed)
        return {"cleaned": sorted(set(results) - set(failed)), "failed": failed}
