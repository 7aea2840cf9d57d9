"""Directory stages: pre-stage the move in the NVA, then commit it and wait
for every peer NVE to apply it.

They use only the NVA client, so they live in the core and work with any
directory backend that speaks the same API.
"""

from __future__ import annotations

import logging
import time
from typing import Any, ClassVar

from oslo_config import cfg

from vmm_orchestrator.convergence import await_acks
from vmm_orchestrator.errors import StageFailed, TransientError
from vmm_orchestrator.model import Phase, Role
from vmm_orchestrator.nva import errors as nva_errors
from vmm_orchestrator.stage import Stage, StageContext

LOG = logging.getLogger(__name__)


def _transient(exc: Exception) -> Exception:
    """Directory unreachable: worth a retry. Anything else: the stage failed."""
    if isinstance(exc, nva_errors.Unavailable):
        return TransientError(str(exc))
    return StageFailed(str(exc))


class NvaPrestage(Stage):
    """PREPARE, destination: mark each NIC pending at the destination NVE.

    The directory checks here that the destination serves the VN and that
    no other MAC claims the VM's addresses (duplicate address detection at
    move time); a refusal vetoes the migration before the VM moves.
    Traffic keeps following the current location until the commit.
    """

    name = "nva_prestage"
    phase = Phase.PREPARE
    role = Role.DESTINATION

    def run(self, ctx: StageContext) -> dict[str, Any]:
        done: list[list[Any]] = []
        for vif in ctx.migration.workload.vifs:
            try:
                ctx.host.nva.prestage(vif.vni, vif.mac, ctx.migration.destination, ctx.migration.id)
            except nva_errors.NvaError as exc:
                raise _transient(exc) from exc
            done.append([vif.vni, vif.mac])
        return {"prestaged": done}

    def revert(self, ctx: StageContext, record: dict[str, Any] | None) -> None:
        for vif in ctx.migration.workload.vifs:
            ctx.host.nva.abort(vif.vni, vif.mac, ctx.migration.id)


class PeerUpdate(Stage):
    """RESUMED, destination: commit the move and wait for the peers to apply it.

    The commit bumps the endpoint's sequence number and every NVE serving
    the VN receives it through its watch. The stage waits, bounded by
    ``ack_timeout``, for each NVE to acknowledge the commit's revision and
    notes per-peer convergence times. A peer that did not acknowledge in
    time gets an "expire" for the MAC: it drops its stale entry and asks the
    directory again, instead of trusting a cache that may never refresh.
    """

    name = "peer_update"
    phase = Phase.RESUMED
    role = Role.DESTINATION
    opts: ClassVar[list[cfg.Opt]] = [
        cfg.FloatOpt(
            "ack_timeout",
            default=1.0,
            min=0.0,
            help="Seconds to wait for every NVE of the VN to acknowledge the "
            "move before the laggards are told to expire their entry.",
        ),
    ]

    def run(self, ctx: StageContext) -> dict[str, Any]:
        nva = ctx.host.nva
        convergence: dict[str, float] = {}
        laggards: set[str] = set()
        commits = []
        for vif in ctx.migration.workload.vifs:
            try:
                result = nva.commit(vif.vni, vif.mac, ctx.migration.id)
            except nva_errors.NvaError as exc:
                raise _transient(exc) from exc
            commits.append((vif, int(result["revision"]), float(result["committed_at"])))
        for vif, revision, committed_at in commits:
            wait = min(self.options.ack_timeout, ctx.remaining())
            result = await_acks(nva, vif.vni, vif.mac, revision, committed_at, wait)
            for nve_id, ms in result.acked_ms.items():
                convergence[nve_id] = max(convergence.get(nve_id, 0.0), ms)
            laggards.update(result.laggards)
        ctx.note(
            convergence_ms=convergence,
            laggards=sorted(laggards),
            committed_at=time.time(),
        )
        return {"committed": [[v.vni, v.mac, r] for v, r, _ in commits]}

    def revert(self, ctx: StageContext, record: dict[str, Any] | None) -> None:
        # The VM runs at the destination once RESUMED is reached: the
        # directory now tells the truth, and moving it back would be wrong.
        LOG.info(
            "migration %s: commit stays (the VM runs at the destination)",
            ctx.migration.id,
        )
