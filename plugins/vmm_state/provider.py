"""Entry point ``state`` of ``vmm_orchestrator.state_services``.

The composition root calls it for each host whose pipeline has a state
stage: the host's state service as ``[state]`` describes it, vouched for by
the host's directory client, with ``peers`` (NVE id -> URL) shared by every
host of the agent and filled in as their services bind.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from oslo_config import cfg

from vmm_orchestrator.contracts import HostSpec
from vmm_orchestrator.options import require
from vmm_state import options
from vmm_state.service import StateHost


def open_state_service(
    conf: cfg.ConfigOpts, spec: HostSpec, directory: Any, peers: dict[str, str]
) -> StateHost:
    require(conf, options.GROUP, "the state service")
    configured: Mapping[str, str] = dict(conf[options.GROUP].peers or {})
    for name, url in configured.items():
        peers.setdefault(name, url)
    return StateHost.from_conf(conf, spec.name, spec.netns, nva=directory, peers=peers)
