"""Every option of the Linux plugins, for oslo-config-generator."""

from __future__ import annotations

from oslo_config import cfg

from vmm_linux import agent, announce, nve, rarp


def list_opts() -> list[tuple[str, list[cfg.Opt]]]:
    return [
        (nve.GROUP, nve.NVE_OPTS),
        (agent.GROUP, agent.AGENT_OPTS),
        (announce.GROUP, announce.ANNOUNCE_OPTS),
        (rarp.GROUP, rarp.RARP_OPTS),
    ]
