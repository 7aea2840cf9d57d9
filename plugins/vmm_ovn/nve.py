"""The NVE driver contract on an OVN chassis: what each call means under OVN.

On an OVN hypervisor the virtual switch is programmed by ovn-controller
from the Southbound, not by this agent, so most NVE calls are about
*knowing* that OVN has done its part rather than doing it:

=================  =====================================================
NveDriver call     on OVN
=================  =====================================================
ensure_vn          no-op: the logical switch exists in the NB (Neutron or
                   the OVN directory created it); ovn-controller builds
                   the datapath when a local port needs it
expect (PREPARE)   barrier, if the VM's port already exists here (Nova
                   plugs it before the migration): wait until this
                   chassis installed its flows (ovn-installed / nb_cfg).
                   A port that is not there yet (libvirt creates the tap
                   after PREPARE) is checked again at plug
plug (RESUMED)     barrier, required: the VM's port exists and its flows
                   are installed, else TransientError (the stage retries)
unplug             no-op: the port belongs to its creator (os-vif,
                   libvirt); the directory's abort/commit restores
                   requested-chassis
start_inflight     (SWITCHOVER, source; the guest is paused) with a
                   directory that can (the OVN NB directory): make the
                   destination the port's only chassis now, so OVN moves
                   the binding during the pause (50-100 ms) instead of
                   after the resume, and the destination needs no
                   activation. Otherwise a no-op: multi-chassis binding
                   already clones every frame for the port to both
                   chassis, which is what the Linux in-flight tunnel does
stop_inflight      undo that while the move is still pending (ABORTED);
                   a no-op after the commit (the hold timer's call)
=================  =====================================================

Every call is idempotent, as the contract asks.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from vmm_orchestrator.contracts import NveDriver
from vmm_orchestrator.errors import TransientError
from vmm_ovn.chassis import BarrierResult, OvnChassis

LOG = logging.getLogger(__name__)


class OvnNve(NveDriver):
    """NveDriver over one chassis' :class:`OvnChassis`."""

    def __init__(
        self, chassis: OvnChassis, directory: Any = None, switch_at_pause: bool = True
    ) -> None:
        self.chassis = chassis
        self.directory = directory
        self.switch_at_pause = switch_at_pause
        #: The last barrier per MAC (figures for reports).
        self.last_barrier: dict[str, BarrierResult] = {}

    def ensure_vn(self, vni: int) -> None:
        """Nothing to create: OVN builds the datapath for a switch with a local port."""

    def expect(self, vni: int, mac: str, port: str, addresses: Sequence[str]) -> None:
        result = self.chassis.wait_ready(mac, port, require_port=False)
        self.last_barrier[result.mac] = result
        if not result.ok:
            LOG.warning("PREPARE barrier for %s: %s (checked again at plug)", mac, result.reason)

    def plug(self, vni: int, mac: str, port: str, addresses: Sequence[str]) -> None:
        result = self.chassis.wait_ready(mac, port, require_port=True)
        self.last_barrier[result.mac] = result
        if not result.ok:
            raise TransientError(
                f"OVN has not installed the flows for {mac} on this chassis: {result.reason}",
                hint="is ovn-controller running and connected to the Southbound?",
            )

    def unplug(self, vni: int, mac: str) -> None:
        """The port's owner (os-vif, libvirt) removes it; OVN follows."""

    def _switcher(self, name: str) -> Any:
        if not self.switch_at_pause or self.directory is None:
            return None
        return getattr(self.directory, name, None)

    def start_inflight(self, vni: int, mac: str, vtep: str) -> None:
        switch = self._switcher("switch")
        if switch is not None:
            result = switch(vni, mac)
            LOG.info("SWITCHOVER %s: destination takes the port during the pause: %s", mac, result)

    def stop_inflight(self, vni: int, mac: str) -> None:
        unswitch = self._switcher("unswitch")
        if unswitch is not None:
            unswitch(vni, mac)

    def close(self) -> None:
        self.chassis.close()
