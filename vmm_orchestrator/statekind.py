"""The contract of one kind of state (a stevedore plugin in the
``vmm_state.kinds`` namespace).

A kind knows how to read the entries of its kind that belong to one VM
from a host's kernel, how to check that an entry received from elsewhere
really belongs to that VM, how to install entries, undo an install, and
remove the source's copies once the VM has left. It knows nothing about
bundles, signatures or transfer: the framework does that.
"""

from __future__ import annotations

import abc
import dataclasses
import enum
from collections.abc import Iterator
from typing import Any, ClassVar

from oslo_config import cfg

from vmm_orchestrator.model import Vif


class Reason(str, enum.Enum):
    """Why an import failed; each reason has a configured policy."""

    RESOURCE_LIMIT = "resource_limit"
    TRANSFER_FAILED = "transfer_failed"
    UNSUPPORTED = "unsupported"
    POLICY_CONFLICT = "policy_conflict"


class PoisonedEntry(ValueError):
    """An entry that does not involve the migrating VM's own MAC/addresses."""


@dataclasses.dataclass(frozen=True)
class KindContext:
    """One host's view of the migrating VM for a state kind.

    ``netns`` is the host's network namespace (None: the current one).
    ``vifs`` are the VM's NICs: MAC, VNI, addresses and host-side port (the
    same port name on both hosts).

    ``keep_addresses`` matters only to ``cleanup_source``: the addresses of
    the other endpoints that remain on (or are moving to) this host. The
    VM's traffic with them still crosses this host's firewall after the VM
    has left, so a kind keeps the entries it needs for them (a session with
    one of them). Empty: no other endpoint is here, remove everything of
    the VM. None: this host could not tell (the directory did not answer);
    a kind then keeps every entry that may still be in use rather than
    break a live connection.
    """

    netns: str | None
    vifs: tuple[Vif, ...]
    migration_id: str
    keep_addresses: frozenset[str] | None = frozenset()

    def bridge_for(self, vni: int) -> str:
        return f"br-{vni}"

    @property
    def macs(self) -> set[str]:
        return {v.mac for v in self.vifs}

    @property
    def addresses(self) -> set[str]:
        return {a for v in self.vifs for a in (*v.ipv4, *v.ipv6)}


@dataclasses.dataclass
class ImportResult:
    """A kind's answer to an import: SUCCESS, or FAIL with a reason.

    ``record`` is what ``revert_import`` needs to undo exactly this import
    (JSON-able: it is journalled).
    """

    kind: str
    ok: bool
    reason: Reason | None = None
    detail: str = ""
    installed: int = 0
    record: dict[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def success(cls, kind: str, installed: int, record: dict[str, Any]) -> ImportResult:
        return cls(kind, True, None, "", installed, record)

    @classmethod
    def fail(cls, kind: str, reason: Reason, detail: str) -> ImportResult:
        return cls(kind, False, reason, detail)


class StateKind(abc.ABC):
    """One kind of dynamic state that moves with a VM."""

    name: ClassVar[str]
    #: Options of this kind, registered in [state_<name>].
    opts: ClassVar[list[cfg.Opt]] = []

    def __init__(self, conf: cfg.ConfigOpts) -> None:
        self.conf = conf
        self.group = f"state_{self.name}"

    @classmethod
    def register_opts(cls, conf: cfg.ConfigOpts) -> None:
        """Register [state_<name>]; the strict loader calls it when it loads the kind
        (register_all has done so already for every installed kind)."""
        conf.register_opts(list(cls.opts), group=f"state_{cls.name}")

    def unavailable(self, ctx: KindContext) -> str | None:
        """None if this host can hold this kind, else why not (e.g. a missing
        kernel module); the framework answers FAIL/unsupported for it."""
        return None

    @abc.abstractmethod
    def export(self, ctx: KindContext, since: float | None = None) -> Iterator[dict[str, Any]]:
        """Yield this host's entries that belong to the VM (JSON-able dicts).

        ``since`` (a time.time() of an earlier export) asks for a delta:
        entries new or changed since then; a kind that cannot tell returns
        everything, and import must then replace rather than duplicate. A
        tracking kind's delta may carry entries ``{"op": "delete", ...}``
        (the entry is gone at the source; the rest of the entry names it and
        is checked like any other) and a first entry ``{"op": "resync"}``
        (what follows is the whole set: delete what the destination
        imported for this migration and the set no longer holds).
        Remaining lifetimes are exported as remaining seconds, never as
        absolute times (the hosts' clocks need not agree).
        """

    @abc.abstractmethod
    def check(self, ctx: KindContext, entry: dict[str, Any]) -> None:
        """Raise PoisonedEntry unless ``entry`` involves only the VM's own
        MAC/addresses (or its port); ValueError if it is malformed."""

    @abc.abstractmethod
    def import_(self, ctx: KindContext, entries: list[dict[str, Any]]) -> ImportResult:
        """Install checked ``entries``; all or nothing. Never raises for a
        refusal: answer FAIL with a reason."""

    @abc.abstractmethod
    def revert_import(self, ctx: KindContext, record: dict[str, Any]) -> None:
        """Undo an import (an aborted migration), using its result's record."""

    # -- change tracking (optional; the defaults track nothing) -----------------

    def prepare(self, netns: str | None) -> None:
        """The host's state service starts: get the namespace ready to track
        changes later (e.g. make the kernel keep change events for every new
        entry). Must not fail the service: log instead."""
        return None

    def track(self, ctx: KindContext) -> None:
        """Source: start recording changes of the VM's entries, before the full
        export that is the pre-copy, so that a later ``export(ctx, since)``
        can answer with only what changed since (see ``export``). A kind that
        cannot track answers later deltas with everything (replace semantics).
        """
        return None

    def untrack(self, migration_id: str) -> None:
        """Source: stop recording changes for a migration (COMPLETED, ABORTED). Idempotent."""
        return None

    def forget(self, migration_id: str) -> None:
        """Destination: the migration is over; drop what the kind remembers of its imports."""
        return None

    #: True when the kind implements :meth:`settle` (its tracking can forget
    #: what the destination already holds).
    settles: ClassVar[bool] = False

    def settle(self, migration_id: str, upto: float | None) -> int:
        """Source: forget the tracked changes the destination already holds.

        ``upto`` is a time.monotonic() mark taken at the source before the
        export the destination holds; None means the destination lost what
        was settled (it reverted an import), so the next delta must be a
        resync. Returns how many tracked changes were dropped.
        """
        return 0

    def delta_figures(self, migration_id: str) -> dict[str, Any]:
        """Figures of the newest export for the migration: ``mode`` ("full", "delta"
        or "resync": events were lost and everything was sent again), counts."""
        return {}

    @abc.abstractmethod
    def cleanup_source(self, ctx: KindContext) -> None:
        """Remove the VM's entries from the source host once it has left
        (except those still in use for ``ctx.keep_addresses``, see KindContext)."""
