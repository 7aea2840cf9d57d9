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
    #: port anyway. So it is no veto. It comes first in the default pipeline and runs
    #: beside the directory's pre-stage: the hold exists before the source can pause
    #: (under an etcd evacuation the directory's round trip let the pause come first),
    #: and libvirt's hook, which waits for the veto, does not wait for it (8-14 ms).
    best_effort = True
    alongside = True
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
    alongside = False


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
        # (local_port is the Linux NVE's, not the contract's: other NVEs run this stage too)
        local_port = getattr(nve, "local_port", None) if leftovers is not None else None
        for vif in ctx.migration.workload.vifs:
            nve.ensure_vn(vif.vni)
            port = (local_port(vif.vni, vif.mac) if local_port else None) or vif.port
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
    """COMPLETED, source: keep the in-flight tunnel until every peer applied the move.

    At least ``hold_time``; then, with ``hold_until_acked`` and a directory
    that acknowledges (embedded, etcd), until every NVE of the VN acknowledged
    the destination's commit, at most ``hold_max`` in all. Peers send to this
    host until they apply the move, and under load that took longer than any
    fixed time: in an evacuation of 20 VMs with the etcd directory on this
    2-core machine, peers acknowledged about 5 s after the resume, and the
    frames they sent meanwhile met a source that had removed its tunnel at
    3 s. The expiry times are checkpointed, so an orchestrator restarted in
    the middle waits only for what is left and then removes the tunnel.
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
            "to its new VTEP, at least. The stage's deadline must be longer.",
        ),
        cfg.BoolOpt(
            "hold_until_acked",
            default=True,
            help="After hold_time, keep the tunnel until every NVE of the VN "
            "acknowledged the move in the directory (directories that track "
            "acknowledgements: embedded, etcd), up to hold_max in all.",
        ),
        cfg.FloatOpt(
            "hold_max",
            default=30.0,
            min=0.0,
            help="Seconds the tunnel is kept at most while waiting for "
            "acknowledgements (hold_until_acked); never less than hold_time. The "
            "stage's deadline must be longer.",
        ),
    ]

    def run(self, ctx: StageContext) -> dict[str, Any]:
        expires_at = ctx.saved.get("expires_at")
        if expires_at is None:
            now = time.time()
            expires_at = now + self.options.hold_time
            latest = now + max(self.options.hold_time, self.options.hold_max)
            ctx.checkpoint({"expires_at": expires_at, "latest": latest})
        else:  # a restart: what is left (a checkpoint of an older version has no "latest")
            latest = float(ctx.saved.get("latest", expires_at))
        longest = latest if self.options.hold_until_acked else float(expires_at)
        if longest - time.time() > ctx.remaining():
            raise StageFailed(
                f"hold_time/hold_max ({self.options.hold_time}s/{self.options.hold_max}s) "
                "reach past the stage deadline",
                hint="raise [stage_hold_timer] deadline above hold_time and hold_max",
            )
        left = float(expires_at) - time.time()
        if left > 0:
            time.sleep(left)
        unacked: list[str] = []
        if self.options.hold_until_acked:
            unacked = _await_peers(ctx, latest)
        nve = ctx.host.service("nve")
        for vif in ctx.migration.workload.vifs:
            nve.unplug(vif.vni, vif.mac)
            nve.stop_inflight(vif.vni, vif.mac)
        started = float(expires_at) - self.options.hold_time
        ctx.note(hold_s=round(time.time() - started, 3), unacked=unacked)
        return {"expired_at": time.time()}


#: How often the source asks whether the destination committed the move yet.
COMMIT_POLL_S = 0.1


def _await_peers(ctx: StageContext, latest: float) -> list[str]:
    """Wait, until wall time ``latest``, for every NVE of each NIC's VN to acknowledge
    the destination's commit of this migration; the NVEs that did not.

    A directory without ``get_endpoint``/``acks`` (Neutron's), or whose endpoints carry
    no revision (OVN's), is not waited for.
    """
    nva = ctx.host.nva
    if not (callable(getattr(nva, "get_endpoint", None)) and callable(getattr(nva, "acks", None))):
        return []
    missing: list[str] = []
    for vif in ctx.migration.workload.vifs:
        revision = None
        while revision is None and time.time() < latest:
            try:
                entry = nva.get_endpoint(vif.vni, vif.mac)
            except Exception as exc:  # the directory is away: the minimum hold was kept
                LOG.info("hold of %s: cannot read the directory (%s)", vif.mac, exc)
                return []
            if entry.get("last_migration_id") == ctx.migration.id:
                if entry.get("revision") is None:
                    return []  # a directory that says no revision (OVN's): nothing to wait on
                revision = int(entry["revision"])
            elif entry.get("migration_id") != ctx.migration.id:
                return []  # moved on since (another migration, a revert): nothing to wait for
            else:
                time.sleep(COMMIT_POLL_S)
        if revision is None:
            missing.append(f"{vif.mac}: not committed")
            continue
        try:
            acks = nva.acks(vif.vni, revision, timeout=max(0.0, latest - time.time()))
        except Exception as exc:
            LOG.info("hold of %s: cannot read acknowledgements (%s)", vif.mac, exc)
            return []
        missing += [
            n for n, ack in sorted(acks.items()) if int(ack.get("acked_revision") or 0) < revision
        ]
    if missing:
        LOG.warning(
            "migration %s: in-flight tunnel removed at hold_max, unacknowledged: %s",
            ctx.migration.id,
            ", ".join(missing),
        )
    return missing
