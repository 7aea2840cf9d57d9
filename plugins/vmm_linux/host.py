"""A Linux hypervisor host as the orchestrator sees it: its NVE, the agent
that keeps the NVE in step with the directory, its announcers and, when
state migration is on, its state service, offered to the stages through a
HostContext.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from oslo_config import cfg

from vmm_linux import agent as agent_mod
from vmm_linux import announce as announce_mod
from vmm_linux.nve import LinuxNve, bridge_name
from vmm_orchestrator.stage import HostContext

if TYPE_CHECKING:  # vmm_state is optional: a host without state migration never imports it
    from vmm_state.service import StateHost


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


class LinuxHost:
    """NVE + agent + announcers (+ state service) of one host, wired from the configuration.

    ``state`` is the host's state service (:class:`vmm_state.service.StateHost`),
    built by the caller because it needs the peers' URLs and the directory
    client; None (the default) leaves state migration off and the host exactly
    as it was without it. When given, the state stages find it under
    ``ctx.host.service("state")``.
    """

    def __init__(
        self,
        conf: cfg.ConfigOpts,
        name: str,
        netns: str | None,
        vtep: str,
        vnis: list[int],
        nva: Any,
        state: StateHost | None = None,
    ) -> None:
        agent_mod.register_opts(conf)
        announce_mod.register_opts(conf)
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
        )
        ann = conf[announce_mod.GROUP]
        self.announcers = AnnouncerPool(
            netns,
            ann.mode,
            [int(x) for x in ann.schedule_ms],
            announce_mod.parse_gateways(ann.gateways),
        )
        self.state = state
        services: dict[str, Any] = {
            "nve": self.nve,
            "announcers": self.announcers,
            "agent": self.agent,
        }
        if state is not None:
            services["state"] = state
        self.context = HostContext(name=name, nva=nva, services=services)

    def start(self) -> None:
        """Serve state first: a peer may pull a pre-copy from us as soon as our
        agent makes the host take part in migrations."""
        if self.state is not None:
            self.state.start()
        self.agent.start()

    def stop(self) -> None:
        """Stop the state service last, so that a peer still finishing a
        transfer with us is answered until our NVE is gone."""
        self.agent.stop()
        self.announcers.close()
        self.nve.close()
        if self.state is not None:
            self.state.stop()
