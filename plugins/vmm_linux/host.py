"""A Linux hypervisor host's data plane: its NVE, the agent that keeps the
NVE in step with the directory and its announcers, offered to the stages as
services. Entry point ``linux`` of ``vmm_orchestrator.host_drivers``: the
composition root (:mod:`vmm_orchestrator.agent`) builds it through
:meth:`LinuxHost.from_spec` and adds the other services (state) itself.
"""

from __future__ import annotations

import threading
from typing import Any

from oslo_config import cfg

from vmm_linux import agent as agent_mod
from vmm_linux import announce as announce_mod
from vmm_linux import leftovers as leftovers_mod
from vmm_linux import rarp as rarp_mod
from vmm_linux.nve import LinuxNve, bridge_name
from vmm_orchestrator.contracts import HostDriver, HostSpec
from vmm_orchestrator.options import require


class AnnouncerPool:
    """One announcer per VN bridge of a host, made on first use."""

    def __init__(
        self,
        netns: str | None,
        mode: str,
        schedule_ms: list[int],
        gateways: list[tuple[str, str]],
    ) -> None:
        self.netns = netns
        self.mode = mode
        self.schedule_ms = list(schedule_ms)
        self.gateways = list(gateways)
        self._by_vni: dict[int, Any] = {}
        self._lock = threading.Lock()

    def for_vni(self, vni: int) -> Any:
        with self._lock:
            if vni not in self._by_vni:
                self._by_vni[vni] = announce_mod.Announcer(
                    self.netns,
                    bridge_name(vni),
                    self.mode,
                    self.schedule_ms,
                    self.gateways,
                )
            return self._by_vni[vni]

    def close(self) -> None:
        with self._lock:
            for announcer in self._by_vni.values():
                announcer.close()
            self._by_vni.clear()


class LinuxHost(HostDriver):
    """NVE + NVE agent + announcers of one host, wired from the configuration."""

    def __init__(
        self,
        conf: cfg.ConfigOpts,
        name: str,
        netns: str | None,
        vtep: str,
        vnis: list[int],
        nva: Any,
    ) -> None:
        for group in (agent_mod.GROUP, announce_mod.GROUP, rarp_mod.GROUP):
            require(conf, group, "the Linux host driver")
        self.name = name
        self.nve = LinuxNve.from_conf(conf, netns, vtep)
        opts = conf[agent_mod.GROUP]
        self.agent = agent_mod.NveAgent(
            name,
            self.nve,
            nva,
            vnis,
            watch_timeout=opts.watch_timeout,
            retry_interval=opts.retry_interval,
            local_learning=opts.local_learning,
            address_guard=opts.address_guard,
        )
        ann = conf[announce_mod.GROUP]
        self.announcers = AnnouncerPool(
            netns,
            ann.mode,
            [int(x) for x in ann.schedule_ms],
            announce_mod.parse_gateways(ann.gateways),
        )
        #: The frames a departing VM's paused tap holds go with it at SWITCHOVER.
        self.leftovers = leftovers_mod.Leftovers(netns)
        self.nve.leftovers = self.leftovers  # a paused VM's tap is followed there
        self.services: dict[str, Any] = {
            "nve": self.nve,
            "announcers": self.announcers,
            "agent": self.agent,
            "leftovers": self.leftovers,
        }
        #: Answers diskless guests' RARP requests from the directory ([rarp] responder;
        #: only with a directory that can look an endpoint up by MAC).
        self.rarp: rarp_mod.RarpResponder | None = None
        if conf[rarp_mod.GROUP].responder and callable(getattr(nva, "find", None)):
            self.rarp = rarp_mod.RarpResponder(
                name, netns, nva, vnis, answer_delay=conf[rarp_mod.GROUP].answer_delay
            )
            self.services["rarp"] = self.rarp

    @classmethod
    def from_spec(cls, conf: cfg.ConfigOpts, spec: HostSpec, directory: Any) -> LinuxHost:
        """The ``vmm_orchestrator.host_drivers`` factory: a host from its [host:<name>]."""
        return cls(conf, spec.name, spec.netns, spec.vtep, list(spec.vnis), directory)

    def start(self) -> None:
        self.agent.start()
        if self.rarp is not None:
            self.rarp.start()

    def stop(self) -> None:
        if self.rarp is not None:
            self.rarp.stop()
        self.agent.stop()
        self.announcers.close()
        self.leftovers.close()
        self.nve.close()
