"""Data-plane stages on a Linux NVE: plug at the destination, announce from
the host, keep an in-flight tunnel at the source until the hold timer ends.
"""

from __future__ import annotations

import logging
import time
from typing import Any, ClassVar

from oslo_config import cfg

from vmm_linux.nve import inflight_name
from vmm_orchestrator.errors import StageFailed
from vmm_orchestrator.model import Phase, Role
from vmm_orchestrator.stage import Stage, StageContext

LOG = logging.getLogger(__name__)


class NvePrepare(Stage):
    """PREPARE, destination: expect the VM's MAC on its local port.

    Until now the destination NVE forwarded the VM's MAC over VXLAN to the
    source. From PREPARE on it expects the MAC on the local port (see
    ``LinuxNve.expect``): frames that arrive over VXLAN (the source's
    in-flight tunnel from the pause on, peers that already moved) go to that
    port, as soon as it exists (under libvirt the tap appears after PREPARE),
    while this host's other VMs still reach the VM over VXLAN where it runs.
    Sending their frames to the port too would queue stale copies in the
    tap, which the guest then works through after the resume while the tap
    drops fresh frames. Nothing waits on RESUMED. Reverting restores
    forwarding to the VM's current host. What arrives before the port exists
    is held and released into it in order (``LinuxNve``, "Holding, not
    dropping"); ``nve_plug`` notes what the hold did (``holds``).
    """

    name = "nve_prepare"
    phase = Phase.PREPARE
    role = Role.DESTINATION
    default_attempts = 1
    #: Its failure costs the hold, not the migration: RESUMED's ``nve_plug`` pins the
    #: port anyway. So it is no veto, and libvirt's hook need not wait for it.
    best_effort = True
    #: Pin (the VM runs here) rather than only expect.
    pin = False

    def run(self, ctx: StageContext) -> dict[str, Any]:
        nve = ctx.host.service("nve")
        holds: dict[str, Any] = {}
        for vif in ctx.migration.workload.vifs:
            if not vif.port:
                raise StageFailed(f"NIC {vif.mac} of {ctx.migration.workload.name} names no port")
            nve.ensure_vn(vif.vni)
            place = nve.plug if self.pin else nve.expect
            place(vif.vni, vif.mac, vif.port, vif.ipv4 + vif.ipv6)
            report = getattr(nve, "hold_report", None)
            if self.pin and report is not None and (held := report(vif.vni, vif.mac)):
                holds[vif.mac] = held
        if holds:
            ctx.note(holds=holds)
        key = "plugged" if self.pin else "expecting"
        return {key: [[v.vni, v.mac, v.port] for v in ctx.migration.workload.vifs]}

    def revert(self, ctx: StageContext, record: dict[str, Any] | None) -> None:
        nve = ctx.host.service("nve")
        for vif in ctx.migration.workload.vifs:
            nve.unplug(vif.vni, vif.mac)


class NvePlug(NvePrepare):
    """RESUMED, destination: pin the VM's MAC to its port, now that it runs here.

    Ends the expectation (if the VM's first frame has not already ended it
    in the kernel), then points the bridge entry at the port: local frames
    reach the VM directly and nothing is flooded for its MAC any more.
    """

    name = "nve_plug"
    phase = Phase.RESUMED
    role = Role.DESTINATION
    pin = True
    best_effort = False  # the VM runs here: without its port pinned the move fails


class Announce(Stage):
    """RESUMED, destination: announce the VM from the host, no guest help.

    Gratuitous ARP requests, unicast ARP replies to known gateways and
    unsolicited NAs with the Override flag, repeated on a schedule in the
    background (ARP is unreliable). Only the first round is on the critical
    path; the stage notes when its first frame left.
    """

    name = "announce"
    phase = Phase.RESUMED
    role = Role.DESTINATION
    default_attempts = 1
    best_effort = True

    def run(self, ctx: StageContext) -> dict[str, Any]:
        pool = ctx.host.service("announcers")
        first: list[float] = []
        rounds = 0
        for vif in ctx.migration.workload.vifs:
            announcer = pool.for_vni(vif.vni)
            announcer.announce(vif, on_first_sent=first.append if not first else None)
            rounds += 1
        if first:
            ctx.note(first_frame_monotonic=first[0])
        return {"announced": rounds}


class InflightTunnel(Stage):
    """SWITCHOVER, source: send frames for the departing MAC to the new VTEP.

    Peers keep sending to this host until they apply the move; without this
    those frames are dropped here (there is no ARP "leave"). What the VM's
    old tap queued since the pause goes first, in order (the host's
    ``leftovers`` service, :mod:`vmm_linux.leftovers`). Reverted on
    ABORTED: the VM stays here, so its local port takes over again.
    """

    name = "inflight_tunnel"
    phase = Phase.SWITCHOVER
    role = Role.SOURCE

    def run(self, ctx: StageContext) -> dict[str, Any]:
        nve = ctx.host.service("nve")
        # The host's NVE agent knows its VNs' VTEPs: no directory round trip in the pause.
        agent = ctx.host.services.get("agent")
        if agent is not None:
            vtep = agent.vtep_of(ctx.migration.destination)
        else:
            vtep = ctx.host.nva.get_nve(ctx.migration.destination)["vtep"]
        leftovers = ctx.host.services.get("leftovers")
        taken: dict[str, Any] = {}
        for vif in ctx.migration.workload.vifs:
            nve.ensure_vn(vif.vni)
            port = nve.local_port(vif.vni, vif.mac) or vif.port
            if leftovers is None or not port:
                nve.start_inflight(vif.vni, vif.mac, vtep)
                continue
            forwarding = leftovers.forwarding(vif.mac, port, inflight_name(vif.vni))
            with forwarding as report:
                nve.start_inflight(vif.vni, vif.mac, vtep)
            if report.found:
                taken[vif.mac] = report.note()
        if taken:
            ctx.note(leftovers=taken)
        return {
            "vtep": vtep,
            "macs": [[v.vni, v.mac] for v in ctx.migration.workload.vifs],
        }

    def revert(self, ctx: StageContext, record: dict[str, Any] | None) -> None:
        nve = ctx.host.service("nve")
        for vif in ctx.migration.workload.vifs:
            nve.stop_inflight(vif.vni, vif.mac)


class HoldTimer(Stage):
    """COMPLETED, source: keep the in-flight tunnel for ``hold_time``, then remove it.

    The expiry is checkpointed, so an orchestrator restarted in the middle
    waits only for what is left and then removes the tunnel.
    """

    name = "hold_timer"
    phase = Phase.COMPLETED
    role = Role.SOURCE
    default_deadline = 60.0
    default_attempts = 1
    opts: ClassVar[list[cfg.Opt]] = [
        cfg.FloatOpt(
            "hold_time",
            default=3.0,
            min=0.0,
            help="Seconds the old NVE keeps tunnelling frames for a departed VM "
            "to its new VTEP. Must cover the slowest peer's update; the stage's "
            "deadline must be longer.",
        ),
    ]

    def run(self, ctx: StageContext) -> dict[str, Any]:
        expires_at = ctx.saved.get("expires_at")
        if expires_at is None:
            expires_at = time.time() + self.options.hold_time
            ctx.checkpoint({"expires_at": expires_at})
        left = float(expires_at) - time.time()
        if left > ctx.remaining():
            raise StageFailed(
                f"hold_time ({self.options.hold_time}s) is longer than the stage deadline",
                hint="raise [stage_hold_timer] deadline above hold_time",
            )
        if left > 0:
            time.sleep(left)
        nve = ctx.host.service("nve")
        for vif in ctx.migration.workload.vifs:
            nve.unplug(vif.vni, vif.mac)
            nve.stop_inflight(vif.vni, vif.mac)
        ctx.note(hold_s=self.options.hold_time)
        return {"expired_at": time.time()}
