"""The flow of `vmm migrate-with-network`: resolve, prestage, migrate, commit, converge.

Written once against the Driver (Nova or libvirt) and Directory (Neutron or
the embedded NVA) contracts. The rule it keeps: the command ends with
exit 0 only when the VM runs at the destination and its network has
converged; any failure names the phase that failed and what was reverted,
and nothing is left half-applied that can be undone:

* before the migration starts, a failure removes every prestage;
* a migration that ends in error or is cancelled has its destination
  bindings deleted (Nova's rollback has been known to leave them, and they
  block the next migration);
* a migration that does not end within ``migration_timeout`` is aborted;
  the network is reverted only once the driver confirms the VM stayed at
  the source (a migration that completes anyway is followed to its end);
* once the VM runs at the destination nothing is moved back: a failed
  commit or convergence says so and leaves the VM where it runs.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from vmm_openstack.directory import Directory, Nic
from vmm_openstack.driver import (
    CANCELLED,
    DONE,
    FAILED,
    SWITCHED,
    Driver,
    MigrationState,
    PhaseFeed,
    Target,
)
from vmm_openstack.progress import OK, SKIPPED, Progress, describe_state
from vmm_orchestrator.errors import VmmError

LOG = logging.getLogger(__name__)

DRIVER_NAMES = {"nova": "Nova", "libvirt": "libvirt"}


class MigrationFailed(VmmError):
    """A phase failed; the message says which, why, and what was reverted."""


@dataclasses.dataclass(frozen=True)
class Settings:
    """How the flow waits (seconds) and what it asks the driver for."""

    wait: bool = True
    block_migration: bool = False
    migration_timeout: float = 900.0
    abort_timeout: float = 60.0
    converge_timeout: float = 30.0
    poll_interval: float = 1.0


def new_migration_id() -> str:
    """This command's id of the move; tags the directory's prestage."""
    return f"vmm-{uuid.uuid4().hex[:12]}"


class Flow:
    """One run of the command for one server."""

    def __init__(
        self,
        driver: Driver,
        directory: Directory,
        progress: Progress,
        settings: Settings,
        *,
        feed: PhaseFeed | None = None,
        migration_id: str | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.driver = driver
        self.directory = directory
        self.progress = progress
        self.settings = settings
        self.feed = feed
        self.migration_id = migration_id or new_migration_id()
        self._clock = clock
        self._sleep = sleep
        self._notes_shown = 0
        self._agents_shown = 0
        self.target: Target | None = None
        self.driver_name = DRIVER_NAMES.get(driver.kind, driver.kind)
        self.driver_migration: str | None = None

    # ------------------------------------------------------------- helpers

    def _notes(self, step: str) -> None:
        """Show the directory's new notices (leftovers cleaned, fallback)."""
        notes: list[str] = getattr(self.directory, "notes", [])
        for note in notes[self._notes_shown :]:
            self.progress.event(step, note)
        self._notes_shown = len(notes)

    def _agents(self) -> None:
        if self.feed is None or self.target is None:
            return
        hosts = [h for h in (self.target.source, self.target.destination) if h]
        try:
            reports = self.feed.reports(self.target.id, hosts)
        except Exception as exc:  # the feed is a nicety: never fail the move for it
            LOG.info("agent phase feed failed: %s", exc)
            return
        for report in reports[self._agents_shown :]:
            self.progress.agent(report)
        self._agents_shown = len(reports)

    def _fail(
        self,
        step: str,
        why: str,
        revert: Sequence[Nic] = (),
        left: Sequence[str] = (),
        hint: str | None = None,
        at_source: bool = False,
    ) -> NoReturn:
        """End the run: close the phase, revert ``revert``, print the outcome, raise.

        ``at_source``: the VM stayed where it was (said at the end of the line).
        """
        self.progress.end(step, "failed", why)
        reverted, failed = self._revert(revert)
        left = [*failed, *left]
        target = self.target
        where = f"; {target.name} still runs on {target.source}" if at_source and target else ""
        parts = [f"phase {step} failed: {why}"]
        if step != "resolve":
            parts.append("reverted: " + ("; ".join(reverted) if reverted else "nothing"))
        if left:
            parts.append("left as is: " + "; ".join(left))
        message = "; ".join(parts) + where
        self.progress.finish(False, f"FAILED in phase {step}: {why}", message, reverted, left)
        raise MigrationFailed(message, hint=hint)

    def _revert(self, nics: Sequence[Nic]) -> tuple[list[str], list[str]]:
        """Abort the prestage of ``nics`` (newest first); (what was reverted, what failed)."""
        reverted: list[str] = []
        failed: list[str] = []
        if not nics:
            return reverted, failed
        dest = self.target.destination if self.target else None
        self.progress.begin("revert")
        for nic in reversed(nics):
            try:
                result = self.directory.abort(nic.vni, nic.mac, self.migration_id)
            except VmmError as exc:
                text = f"could not undo the prestage of {nic.label} on {dest}: {exc.message}"
                failed.append(text)
                self.progress.event("revert", text)
                continue
            host = result.get("host") or dest
            if self.directory.kind == "neutron":
                text = (
                    f"deleted the inactive binding of {nic.label} on {host}"
                    if result.get("deleted")
                    else f"no binding of {nic.label} left on {host}"
                )
            else:
                text = f"aborted the prestage of {nic.label} at {host}"
            reverted.append(text)
            self.progress.event("revert", text)
        self.progress.end("revert", "failed" if failed else OK, f"{len(reverted)} of {len(nics)}")
        return reverted, failed

    # ----------------------------------------------------------------- run

    def run(self, server: str, host: str | None) -> dict[str, Any]:
        """Move ``server`` (to ``host``, or where the driver picks); the record as a dict.

        Raises MigrationFailed (a VmmError) on any failure, after printing
        the record.
        """
        self.progress.title(
            server=server,
            driver=self.driver_name,
            where=self.driver.where,
            directory=f"{self.directory.kind} at {self.directory.where}",
            migration_id=self.migration_id,
        )
        target = self._resolve(server, host)
        staged = self._prestage(target)
        self._start(target, staged)
        if not self.settings.wait:
            return self._not_followed(target)
        try:
            self._follow(target, staged)
        except KeyboardInterrupt:
            self._interrupted(target, staged)
            raise
        committed = self._commit(target)
        self._converge(target, committed)
        total = self.progress.now()
        self.progress.finish(
            True,
            f"{target.name} runs on {target.destination} and its network has converged "
            f"({total:.2f} s)",
        )
        return self.progress.to_dict()

    def _resolve(self, server: str, host: str | None) -> Target:
        self.progress.begin("resolve")
        try:
            target = self.driver.resolve(server, host)
        except VmmError as exc:
            self._fail("resolve", exc.message, hint=exc.hint)
        self.target = target
        self.progress.target = target.to_dict()
        for nic in target.nics:
            ips = ", ".join((*nic.ipv4, *nic.ipv6)) or "no IP"
            name = f"port {nic.port_id}" if nic.port_id else "NIC"
            self.progress.event(
                "resolve", f"{name} {nic.mac} on {nic.network} (VNI {nic.vni}), {ips}"
            )
        count = f"{len(target.nics)} NIC" + ("" if len(target.nics) == 1 else "s")
        dest = f" -> {target.destination}" if target.destination else ""
        self.progress.end(
            "resolve", OK, f"{target.name} {target.status} on {target.source}{dest}, {count}"
        )
        return target

    def _prestage(self, target: Target) -> list[Nic]:
        self.progress.begin("prestage")
        staged: list[Nic] = []
        mid = self.migration_id
        try:
            if target.destination is None:
                for nic in target.nics:
                    self.directory.clean_stale(nic.vni, nic.mac)
                    self._notes("prestage")
                self.progress.end(
                    "prestage",
                    OK,
                    f"no --host: {self.driver_name} picks the destination; leftovers checked",
                )
                return staged
            for nic in target.nics:
                result = self.directory.prestage(nic.vni, nic.mac, target.destination, mid)
                staged.append(nic)
                self._notes("prestage")
                self.progress.event("prestage", self._describe_prestage(nic, result))
            if self.driver.kind == "nova" and staged:
                for nic in staged:
                    self.directory.release(nic.vni, nic.mac, mid)
                if getattr(self.directory, "binding_extended", False):
                    self.progress.event(
                        "prestage",
                        f"handed over to Nova: its conductor binds the ports on "
                        f"{target.destination} itself",
                    )
        except VmmError as exc:
            self._fail("prestage", exc.message, staged, hint=exc.hint, at_source=True)
        self._notes("prestage")
        self.progress.end(
            "prestage", OK, f"{len(staged)} of {len(target.nics)} ready on {target.destination}"
        )
        return staged

    def _describe_prestage(self, nic: Nic, result: dict[str, Any]) -> str:
        dest = result.get("pending_nve") or (self.target.destination if self.target else "?")
        if self.directory.kind != "neutron":
            return f"{nic.label}: pending at {dest} in the directory"
        if result.get("fallback"):
            return f"{nic.label}: checked; moves to {dest} by a host update at commit"
        binding = result.get("binding") or {}
        if result.get("adopted"):
            return f"{nic.label}: follows the binding Nova prepares on {dest}"
        return f"{nic.label}: inactive binding on {dest} ({binding.get('vif_type', '?')})"

    def _start(self, target: Target, staged: list[Nic]) -> None:
        to = target.destination or f"a host {self.driver_name} picks"
        self.progress.begin("migrate", f"to {to}")
        try:
            self.driver_migration = self.driver.start(target, self.settings.block_migration)
        except VmmError as exc:
            self._fail(
                "migrate",
                f"{self.driver_name} did not start the migration: {exc.message}",
                staged,
                hint=exc.hint,
                at_source=True,
            )
        self.progress.event(
            "migrate", f"{self.driver_name} migration {self.driver_migration} started"
        )

    def _not_followed(self, target: Target) -> dict[str, Any]:
        self.progress.end("migrate", OK, "started; not followed (--no-wait)")
        for step in ("commit", "converge"):
            self.progress.end(step, SKIPPED, "--no-wait")
        self.progress.finish(
            True,
            f"{self.driver_name} migration {self.driver_migration} of {target.name} started; "
            f"not followed (--no-wait): Nova binds and activates the ports itself; follow it "
            f"with `openstack server migration list --server {target.id}`",
        )
        return self.progress.to_dict()

    def _follow(self, target: Target, staged: list[Nic]) -> MigrationState:
        """Poll until the VM runs at the destination; handle failure and the timeout."""
        deadline = self._clock() + self.settings.migration_timeout
        while True:
            state = self.driver.poll()
            self.progress.migration(state)
            self._agents()
            self._learn_destination(target, state)
            if state.state in (SWITCHED, DONE):
                self.progress.end("migrate", OK, f"{describe_state(state)}")
                return state
            if state.state in (FAILED, CANCELLED):
                self._failed_migration(target, staged, state)
            if self._clock() >= deadline:
                state = self._timed_out(target, staged, state)
                self.progress.end("migrate", OK, f"{describe_state(state)} (after an abort)")
                return state
            self._sleep(self.settings.poll_interval)

    def _learn_destination(self, target: Target, state: MigrationState) -> None:
        """Without --host the scheduler picks; commit and abort need to know where."""
        if target.destination is None and state.destination:
            target.destination = state.destination
            self.progress.target = target.to_dict()
            self.progress.event("migrate", f"{self.driver_name} picked {state.destination}")
            for nic in target.nics:
                self.directory.expect(nic.vni, nic.mac, state.destination, self.migration_id)

    def _all(self, target: Target) -> list[Nic]:
        """Every NIC that may have a binding at the destination (Nova binds them all)."""
        return list(target.nics)

    def _failed_migration(
        self, target: Target, staged: list[Nic], state: MigrationState
    ) -> NoReturn:
        reason = self.driver.reason() or state.detail
        why = f"{self.driver_name} migration {state.id} ended in {state.status}"
        if reason:
            why += f" ({reason})"
        nics = self._all(target) if target.destination else staged
        hint = None
        if self.driver.kind == "nova":
            hint = f"Nova's account: `openstack server event list {target.id}`"
        self._fail("migrate", why, nics, hint=hint, at_source=True)

    def _timed_out(self, target: Target, staged: list[Nic], last: MigrationState) -> MigrationState:
        """Abort a migration past its time; revert only once it has really ended."""
        limit = self.settings.migration_timeout
        where = describe_state(last)
        refused = self.driver.abort()
        dest = target.destination or "the destination"
        left = [
            f"{self.driver_name} migration {last.id} still runs; the port bindings on {dest} "
            "stay for it"
        ]
        if refused is not None:
            self._fail(
                "migrate",
                f"{self.driver_name} migration {last.id} did not finish within {limit:g} s "
                f"({where}) and could not be aborted: {refused}",
                left=left,
                hint="abort it by hand, then run this command again: leftovers are cleaned",
            )
        self.progress.event(
            "migrate", f"no end after {limit:g} s ({where}): asked {self.driver_name} to abort"
        )
        deadline = self._clock() + self.settings.abort_timeout
        while self._clock() < deadline:
            self._sleep(self.settings.poll_interval)
            state = self.driver.poll()
            self.progress.migration(state)
            if state.state in (SWITCHED, DONE):
                self.progress.event("migrate", "the migration completed while being aborted")
                return state
            if state.state in (FAILED, CANCELLED):
                nics = self._all(target) if target.destination else staged
                self._fail(
                    "migrate",
                    f"{self.driver_name} migration {last.id} did not finish within {limit:g} s "
                    f"({where}); it was aborted ({state.status})",
                    nics,
                    hint="raise [openstack] migration_timeout or --timeout for a busy guest",
                    at_source=True,
                )
        self._fail(
            "migrate",
            f"{self.driver_name} migration {last.id} did not finish within {limit:g} s "
            f"({where}) and had not ended {self.settings.abort_timeout:g} s after the abort",
            left=left,
            hint="check it by hand; run this command again once it has ended",
        )

    def _interrupted(self, target: Target, staged: list[Nic]) -> None:
        """Ctrl-C while following: libvirt's migration dies with us, so undo; Nova's goes on."""
        if self.driver.kind == "libvirt":
            self.driver.abort()
            reverted, failed = self._revert(staged)
            self.progress.finish(False, "interrupted: migration aborted", None, reverted, failed)
        else:
            self.progress.finish(
                False,
                f"interrupted: Nova migration {self.driver_migration} goes on without this "
                "command; Nova binds and activates the ports itself",
            )

    def _commit(self, target: Target) -> list[tuple[Nic, int, float]]:
        dest = target.destination
        self.progress.begin("commit")
        committed: list[tuple[Nic, int, float]] = []
        runs_there = [f"{target.name} runs on {dest}: the VM is not moved back"]
        for nic in target.nics:
            try:
                result = self.directory.commit(nic.vni, nic.mac, self.migration_id)
            except VmmError as exc:
                self._fail("commit", f"{nic.label}: {exc.message}", left=runs_there, hint=exc.hint)
            revision = int(result.get("revision") or 0)
            committed.append((nic, revision, float(result.get("committed_at") or time.time())))
            if self.directory.kind == "neutron":
                how = (
                    "activated"
                    if result.get("activated")
                    else f"already active, {self.driver_name} activated it"
                )
                self.progress.event(
                    "commit", f"{nic.label}: binding on {dest} {how} (revision {revision})"
                )
            else:
                self.progress.event("commit", f"{nic.label}: moved to {dest} (revision {revision})")
        self.progress.end("commit", OK, f"{len(committed)} NIC(s) at {dest}")
        return committed

    def _converge(self, target: Target, committed: list[tuple[Nic, int, float]]) -> None:
        """Wait for the destination to apply the move, and for the driver to finish."""
        dest = target.destination or "?"
        # Neutron answers by NVE id, which [openstack] nve_hosts may map from the host.
        nve_for = getattr(self.directory, "nve_for", None)
        dest_nve = nve_for(dest) if nve_for is not None else dest
        self.progress.begin("converge")
        deadline = self._clock() + self.settings.converge_timeout
        late: list[str] = []
        for nic, revision, committed_at in committed:
            remaining = max(0.0, deadline - self._clock())
            try:
                acks = self.directory.acks(nic.vni, revision, timeout=remaining)
            except VmmError as exc:
                self._fail(
                    "converge",
                    f"{nic.label}: {exc.message}",
                    left=[f"{target.name} runs on {dest}"],
                )
            mine = acks.get(dest_nve)
            if mine is None or int(mine.get("acked_revision") or 0) < revision:
                late.append(nic.label)
                continue
            peers = sorted(
                nve
                for nve, ack in acks.items()
                if nve != dest_nve and int(ack.get("acked_revision") or 0) < revision
            )
            if peers:
                self.directory.expire(nic.vni, nic.mac, peers)
                self.progress.event(
                    "converge", f"{nic.label}: {', '.join(peers)} lagged; told to look it up again"
                )
            acked_at = mine.get("acked_at")
            after = f" {float(acked_at) - committed_at:.2f}s after the commit" if acked_at else ""
            what = "ACTIVE" if self.directory.kind == "neutron" else "applied"
            self.progress.event("converge", f"{nic.label}: {what} on {dest}{after}")
        if late:
            what = (
                "not ACTIVE (its L2 agent has not wired it)"
                if self.directory.kind == "neutron"
                else "not applied by the destination NVE"
            )
            self._fail(
                "converge",
                f"{', '.join(late)} {what} on {dest} within {self.settings.converge_timeout:g} s",
                left=[f"{target.name} runs on {dest}; its bindings there are active"],
                hint=f"check the network agent on {dest}: `openstack network agent list "
                f"--host {dest}`",
            )
        state = self.progress.last_state
        while state is not None and state.state == SWITCHED and self._clock() < deadline:
            self._sleep(self.settings.poll_interval)
            state = self.driver.poll()
            self.progress.migration(state)
        if state is not None and state.state in (FAILED, CANCELLED):
            self._fail(
                "converge",
                f"{self.driver_name} migration {state.id} ended in {state.status} after the "
                f"VM had switched over to {dest}",
                left=[f"the bindings on {dest} stay active; check where {target.name} runs"],
            )
        where = self.driver.location()
        finishing = state is not None and state.state == SWITCHED
        if where != target.destination and not finishing:
            self._fail(
                "converge",
                f"{self.driver_name} reports {target.name} on {where or 'no host'}, not on {dest}",
                left=[f"the bindings on {dest} stay active"],
            )
        still = (
            f"; {self.driver_name} is still finishing ({state.status})"
            if finishing and state is not None
            else ""
        )
        self.progress.end("converge", OK, f"{len(committed)} NIC(s) ready on {dest}{still}")
