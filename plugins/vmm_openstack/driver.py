"""What `vmm migrate-with-network` needs from whatever moves the VM (Nova or libvirt).

A ``Driver`` resolves the server to its host and NICs, starts the live
migration, reports its progress when polled, and can abort it. The
command's flow (migrate.py) is written once against this contract; Nova
(nova.py) and a plain libvirt pair of hosts (libvirt_driver.py) implement it.

``PhaseFeed`` is where the per-host agents' pipeline reports come from
(announce, peer update, ... with their timings). The agents are the
libvirt plugin's (``vmm agent``); it wires a feed in by registering a
class in the ``vmm_orchestrator.phase_feeds`` entry point namespace.
Without one, the command shows its own phases and Nova's progress.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Protocol

from vmm_openstack.directory import Nic

#: Driver states, in the order a successful migration meets them.
PREPARING = "preparing"
RUNNING = "running"
#: The VM runs at the destination; the driver is still finishing (Nova: post-migrating).
SWITCHED = "switched"
DONE = "done"
FAILED = "failed"
CANCELLED = "cancelled"
ENDED = (DONE, FAILED, CANCELLED)


@dataclasses.dataclass
class Target:
    """The server to move: where it runs, where it goes, and its NICs."""

    id: str
    name: str
    source: str
    destination: str | None
    nics: list[Nic]
    status: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "source": self.source,
            "destination": self.destination,
            "status": self.status,
            "nics": [n.to_dict() for n in self.nics],
        }


@dataclasses.dataclass
class MigrationState:
    """One poll of the migration: the driver's own status word and what it means."""

    id: str | None
    status: str
    state: str
    destination: str | None = None
    memory_total: int | None = None
    memory_processed: int | None = None
    memory_remaining: int | None = None
    disk_total: int | None = None
    disk_processed: int | None = None
    detail: str | None = None

    @property
    def percent(self) -> float | None:
        """Memory copied so far, in percent (None when the driver does not say)."""
        if not self.memory_total or self.memory_processed is None:
            return None
        return min(100.0, 100.0 * self.memory_processed / self.memory_total)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"percent": self.percent}


class Driver(Protocol):
    """Moves the VM. Every method raises VmmError with a message an operator can act on."""

    #: "nova" or "libvirt".
    kind: str
    #: Where the driver talks to, for messages (Nova's endpoint, the libvirt URIs).
    where: str
    #: The directory the driver's NICs live in.
    directory: Any

    def resolve(self, server: str, host: str | None) -> Target:
        """Find the server, its host and NICs; refuse a server that cannot move now."""

    def start(self, target: Target, block_migration: bool) -> str:
        """Start the live migration; return its id as the driver knows it."""

    def poll(self) -> MigrationState:
        """The migration's state now."""

    def abort(self) -> str | None:
        """Ask the driver to abort the migration; None if accepted, else why not."""

    def location(self) -> str | None:
        """The host the server runs on now (None when unknown)."""

    def reason(self) -> str | None:
        """Why the migration failed, in the driver's words, when it says."""

    def close(self) -> None:
        """Release connections."""


@dataclasses.dataclass(frozen=True)
class AgentReport:
    """What one host's pipeline did for one phase (from the agent's PhaseReport)."""

    host: str
    phase: str
    ok: bool
    timeline: tuple[tuple[str, float, str], ...] = ()  # (stage, duration ms, outcome)
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "host": self.host,
            "phase": self.phase,
            "ok": self.ok,
            "error": self.error,
            "timeline": [{"stage": s, "ms": ms, "outcome": o} for s, ms, o in self.timeline],
        }


class PhaseFeed(Protocol):
    """The agents' reports about one server's migration (keyed by the server's UUID,
    which is the libvirt domain's UUID under Nova)."""

    def reports(self, server_id: str, hosts: Sequence[str]) -> list[AgentReport]:
        """Every report so far; the command shows the ones it has not shown yet."""
