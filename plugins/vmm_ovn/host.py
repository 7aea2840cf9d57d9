"""An OVN chassis as a host of the orchestrator (the ``ovn`` host driver).

``factory(conf, spec, directory)`` is the ``vmm_orchestrator.host_drivers``
entry point: it reads ``[ovn]`` and builds the chassis view, the NVE
driver and the announcers. A spec's ``extra`` may override the
per-chassis connections (``ovsdb_connection``, ``openflow_target``,
``ovn_sb_connection``), which lets one process serve several chassis (the
lab does).
"""

from __future__ import annotations

from typing import Any

from oslo_config import cfg

from vmm_orchestrator.contracts import HostDriver, HostSpec
from vmm_orchestrator.options import require
from vmm_orchestrator.stage import HostContext
from vmm_ovn import options as ovn_opts
from vmm_ovn.announce import OvnAnnouncerPool, parse_gateways
from vmm_ovn.chassis import OvnChassis
from vmm_ovn.nve import OvnNve


class OvnHost(HostDriver):
    """Chassis view + NVE driver + announcers of one OVN hypervisor."""

    def __init__(self, conf: cfg.ConfigOpts, spec: HostSpec, directory: Any) -> None:
        require(conf, ovn_opts.GROUP, "the OVN host driver")
        g = conf[ovn_opts.GROUP]
        extra = spec.extra or {}
        self.name = spec.name
        self._own_reader: object | None = None
        self.chassis = OvnChassis(
            extra.get("ovsdb_connection") or g.ovsdb_connection,
            bridge=g.integration_bridge,
            openflow_target=extra.get("openflow_target") or g.openflow_target,
            barrier=g.barrier,
            barrier_timeout=g.barrier_timeout,
            poll_interval=g.poll_interval,
            timeout=g.ovsdb_timeout,
            sb_connection=extra.get("ovn_sb_connection") or g.ovn_sb_connection,
        )
        self.nve = OvnNve(self.chassis, directory, switch_at_pause=g.switch_at_pause)
        self.announcers = OvnAnnouncerPool(
            self.chassis,
            [int(x) for x in g.announce_schedule_ms],
            parse_gateways(g.announce_gateways),
            activation=g.announce_activation,
        )
        self.services: dict[str, Any] = {
            "nve": self.nve,
            "announcers": self.announcers,
            "ovn": self.chassis,
        }
        reader = directory if hasattr(directory, "chassis_progress") else None
        if reader is None and g.ovn_nb_connection and g.ovn_sb_connection:
            from vmm_ovn.directory import OvnNbDirectory

            # Read-only: with Neutron in charge the plugin never writes the NB rows.
            reader = OvnNbDirectory(
                g.ovn_nb_connection,
                g.ovn_sb_connection,
                timeout=g.ovsdb_timeout,
                chassis_names=ovn_opts.pairs(g.chassis_names, "chassis_names"),
                vni_switches=ovn_opts.pairs(g.vni_switches, "vni_switches"),
                neutron_managed=True,
            )
            self._own_reader = reader
        if reader is not None:
            self.services["ovn_reader"] = reader
        self.context = HostContext(name=spec.name, nva=directory, services=self.services)

    def start(self) -> None:
        """The chassis registered itself in the SB; nothing to follow (OVN pushes)."""

    def stop(self) -> None:
        self.announcers.close()
        self.nve.close()
        close = getattr(self._own_reader, "close", None)
        if close is not None:
            close()


def factory(conf: cfg.ConfigOpts, spec: HostSpec, directory: Any) -> OvnHost:
    """Entry point ``ovn`` in ``vmm_orchestrator.host_drivers``."""
    return OvnHost(conf, spec, directory)
