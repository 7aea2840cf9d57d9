"""STAND-IN for the per-host L2 agents, as an ML2 mechanism driver inside the real Neutron.

This is the one part of the real-OpenStack test tier that is not the real
service: a cloud's hosts run an L2 agent each (Open vSwitch, Linux bridge,
OVN controller) that Neutron binds ports for and that reports each port up
once it has wired it. This machine runs no such agent, so this driver,
loaded into the real Neutron server (ML2 ``mechanism_drivers =
standin_agent``, found through an entry point the tests write), plays them:

* it binds a port (``ovs``, on the port's vxlan or flat segment) for the
  hosts of ``[standin_agent] hosts``; a host it does not know cannot be
  bound, as a host without a live agent cannot (``binding_failed``);
* a thread polls the ports as an agent polls its bridge: a port whose
  active binding is on a known host and which is DOWN is reported up
  ``wire_delay`` seconds later through ML2's own RPC callback
  (``update_device_up``, what the agent's RPC call lands in), which turns
  it ACTIVE;
* the hosts of ``[standin_agent] never_wire`` are bound but never report a
  port up: an agent that is stuck.

Everything else (policy, the binding API, the status machine, the
database) is Neutron's own.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from neutron_lib import constants
from neutron_lib import context as n_context
from neutron_lib.api.definitions import portbindings
from neutron_lib.plugins import directory
from neutron_lib.plugins.ml2 import api
from oslo_config import cfg

LOG = logging.getLogger(__name__)

OPTS = [
    cfg.ListOpt("hosts", default=[], help="Hosts whose (stand-in) agent binds ports."),
    cfg.ListOpt(
        "never_wire", default=[], help="Hosts whose agent binds but never reports a port up."
    ),
    cfg.FloatOpt("wire_delay", default=0.3, help="Seconds from binding to the port up report."),
    cfg.FloatOpt("poll_interval", default=0.1, help="Seconds between two polls of the ports."),
]
cfg.CONF.register_opts(OPTS, group="standin_agent")

BINDABLE_TYPES = (constants.TYPE_VXLAN, constants.TYPE_FLAT)

#: Held by the API server around each request (serve_wsgi.py) and by the agents
#: around each report: SQLite fails concurrent writers instead of queueing them.
SERIAL = threading.RLock()


class StandInAgentDriver(api.MechanismDriver):
    """Binds ports for the configured hosts and reports them up like their agents would."""

    def initialize(self) -> None:
        conf = cfg.CONF.standin_agent
        self.hosts = set(conf.hosts) | set(conf.never_wire)
        self.never_wire = set(conf.never_wire)
        self.wire_delay = conf.wire_delay
        self.poll_interval = conf.poll_interval
        self._seen: dict[tuple[str, str, int], float] = {}
        thread = threading.Thread(target=self._agents, name="standin-agents", daemon=True)
        thread.start()

    @property
    def connectivity(self) -> str:
        return portbindings.CONNECTIVITY_L2

    def bind_port(self, context: Any) -> None:
        host = context.host
        if host not in self.hosts:
            LOG.info(
                "stand-in agent: no agent on host %s, port %s unbound", host, context.current["id"]
            )
            return
        for segment in context.segments_to_bind:
            if segment[api.NETWORK_TYPE] in BINDABLE_TYPES:
                context.set_binding(
                    segment[api.ID],
                    portbindings.VIF_TYPE_OVS,
                    {portbindings.CAP_PORT_FILTER: True},
                )
                return

    # ----------------------------------------------------------- the agents

    def _agents(self) -> None:
        """Poll the ports forever; report up the DOWN ones bound on a wiring host."""
        while True:
            time.sleep(self.poll_interval)
            try:
                with SERIAL:
                    self._poll()
            except Exception:  # an agent survives a failed poll and tries again
                LOG.exception("stand-in agent poll failed")

    def _poll(self) -> None:
        plugin = directory.get_plugin()
        if plugin is None:
            return
        ctx = n_context.get_admin_context()
        ports = plugin.get_ports(ctx, filters={"status": [constants.PORT_STATUS_DOWN]})
        now = time.monotonic()
        seen: dict[tuple[str, str, int], float] = {}
        for port in ports:
            host = port.get(portbindings.HOST_ID)
            vif = port.get(portbindings.VIF_TYPE)
            if host not in self.hosts or host in self.never_wire:
                continue
            if vif in (portbindings.VIF_TYPE_UNBOUND, portbindings.VIF_TYPE_BINDING_FAILED):
                continue
            key = (port["id"], host, int(port.get("revision_number") or 0))
            first = self._seen.get(key, now)
            seen[key] = first
            if now - first >= self.wire_delay:
                self._device_up(ctx, port["id"], host)
        self._seen = seen

    @staticmethod
    def _device_up(ctx: Any, port_id: str, host: str) -> None:
        """What an agent's ``update_device_up`` RPC call does in the server."""
        from neutron.plugins.ml2 import rpc

        rpc.RpcCallbacks(None, None).update_device_up(
            ctx, agent_id=f"standin-{host}", device=port_id, host=host
        )
