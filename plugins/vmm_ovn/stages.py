"""OVN-specific stages (the core's NVE stages run unchanged over the OVN services).

``ovn_convergence`` (RESUMED, destination) gives the per-chassis convergence
figure when Neutron (ML2/OVN) is the directory: Neutron's port-binding API
says when the destination's port is ACTIVE, not when every chassis has
applied the move. The stage waits until the Northbound binds the port to
this chassis alone (Neutron's activation), bumps ``NB_Global.nb_cfg`` once
(exactly what ``ovn-nbctl --wait=hv sync`` does; no row Neutron owns is
written) and reports, per chassis, when its ``Chassis_Private.nb_cfg``
reached that value: its flows for the move are installed. With the OVN
directory the core's ``peer_update`` already reports the same figure.
"""

from __future__ import annotations

import time
from typing import Any, ClassVar

from oslo_config import cfg

from vmm_orchestrator.errors import StageFailed
from vmm_orchestrator.model import Phase, Role
from vmm_orchestrator.stage import Stage, StageContext


class OvnConvergence(Stage):
    """RESUMED, destination: when each OVN chassis applied the move (nb_cfg per chassis)."""

    name = "ovn_convergence"
    phase = Phase.RESUMED
    role = Role.DESTINATION
    requires: ClassVar[tuple[str, ...]] = ("ovn_reader",)
    best_effort = True
    default_attempts = 1
    default_deadline = 10.0
    opts: ClassVar[list[cfg.Opt]] = [
        cfg.FloatOpt(
            "activation_wait",
            default=5.0,
            min=0.0,
            help="Seconds to wait for the Northbound to bind the port to this chassis "
            "alone (Neutron activates the destination's binding after Nova's "
            "post-migration step).",
        ),
        cfg.FloatOpt(
            "timeout",
            default=2.0,
            min=0.0,
            help="Seconds to wait for every chassis to apply the move; those that did "
            "not are reported as laggards.",
        ),
    ]

    def run(self, ctx: StageContext) -> dict[str, Any]:
        reader = ctx.host.service("ovn_reader")
        started = time.time()
        chassis = reader.chassis_for(ctx.host.name)
        for vif in ctx.migration.workload.vifs:
            wait = min(self.options.activation_wait, ctx.remaining())
            if not reader.wait_bound(vif.vni, vif.mac, chassis, wait):
                raise StageFailed(
                    f"the Northbound did not bind {vif.mac} to {chassis} within {wait:.1f}s",
                    hint="has Neutron activated the destination's port binding?",
                )
        bound_ms = (time.time() - started) * 1000.0
        revision = reader.nb.bump_nb_cfg()
        applied = reader.wait_chassis(
            None, revision, min(self.options.timeout, ctx.remaining()), since=started
        )
        everyone = set(reader.chassis_progress())
        ctx.note(
            ovn_convergence_ms=applied,
            ovn_laggards=sorted(everyone - set(applied)),
            ovn_bound_ms=round(bound_ms, 2),
            nb_cfg=revision,
        )
        return {"nb_cfg": revision, "chassis": sorted(applied)}
