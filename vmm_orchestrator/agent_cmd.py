"""`vmm agent`: the per-host agent an operator runs (systemd, DevStack).

A thin starter in the manner of nova's ``nova/cmd``: check every option,
build the hosts through the composition root (:mod:`vmm_orchestrator.agent`),
put the configured event source (``[agent] event_source``, libvirt by
default) in front of them, serve until SIGTERM or SIGINT, then stop the
event source first (no new phases), let queued phases finish, and release
every part.

``--once`` connects, recovers the journals, reconciles what the hypervisor
shows with the directory, waits for the resulting phases, and exits: a
one-shot catch-up (after maintenance, or in tests).
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from types import FrameType
from typing import Any

from oslo_config import cfg

from vmm_orchestrator import agent, engine, history, metrics, options
from vmm_orchestrator.cli import check_options
from vmm_orchestrator.commands import Command
from vmm_orchestrator.errors import VmmError
from vmm_orchestrator.nva import options as nva_options
from vmm_orchestrator.stage import group_name, stage_opts

LOG = logging.getLogger(__name__)

EVENT_SOURCES = "vmm_orchestrator.event_sources"


def load_event_source(conf: cfg.ConfigOpts) -> Any:
    """The class named by ``[agent] event_source``: ``check_options(conf)`` and
    ``for_assembly(conf, assembly)`` giving an object with start, stop,
    drain, wait_reconciled, wait_idle, locate and on_report."""
    options.require(conf, agent.GROUP, "vmm agent", "event_source")
    return agent.load_plugin(EVENT_SOURCES, conf.agent.event_source, "[agent] event_source")


def check_agent_options(conf: cfg.ConfigOpts) -> list[Any]:
    """Read every option the agent uses now, so a bad value fails before anything starts."""
    # The event source first: it checks its own options of [agent] and [host:<name>].
    specs: list[Any] = load_event_source(conf).check_options(conf)
    groups = [(agent.GROUP, agent.AGENT_OPTS)]
    groups += [(agent.host_group(n), agent.HOST_OPTS) for n in conf.agent.hosts]
    check_options(conf, groups + engine.list_opts() + nva_options.list_opts() + metrics.list_opts())
    stages = engine.load_stages(conf, list(conf.pipeline.stages))
    check_options(conf, [(group_name(s.name), stage_opts(type(s))) for s in stages])
    return specs


class AgentCommand(Command):
    name = "agent"
    help = "run the per-host agent: hypervisor events and hook calls -> migration pipeline"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--once",
            action="store_true",
            help="connect, recover, reconcile, wait for the resulting phases, then exit",
        )

    def run(self, conf: cfg.ConfigOpts, args: argparse.Namespace) -> int:
        check_agent_options(conf)
        source_cls = load_event_source(conf)
        stop = threading.Event()

        def on_signal(_signum: int, _frame: FrameType | None) -> None:
            stop.set()

        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        assembly = agent.assemble(conf)
        source = None
        exporter = None
        try:
            history.start_recording()
            exporter = metrics.start_from_conf(conf)
            assembly.start()
            source = source_cls.for_assembly(conf, assembly)
            source.start()
            agent.run_background(assembly, stop, source.locate, source.on_report)
            names = ", ".join(h.name for h in assembly.hosts)
            print(f"vmm agent: serving {names}", flush=True)
            LOG.info("serving %s", names)
            if args.once:
                waiting = source.wait_reconciled(conf.agent.connect_timeout)
                if waiting:
                    raise VmmError(
                        f"no hypervisor connection for {', '.join(waiting)} within "
                        f"{conf.agent.connect_timeout:g} s",
                        hint="is libvirtd running? check [host:<name>] uri",
                    )
                # Every phase is bounded by its stages' deadlines: no timeout of our own.
                source.wait_idle(float("inf"))
            else:
                while not stop.wait(3600):
                    pass
                timeout = float(getattr(conf.agent, "stop_timeout", 0.0))
                LOG.info("stopping: migrations under way get up to %g s to finish", timeout)
                left = source.drain(timeout)
                if left:
                    LOG.warning(
                        "stopping with migrations still under way (the next start "
                        "recovers them): %s",
                        ", ".join(left),
                    )
        finally:
            stop.set()
            if source is not None:
                source.stop()
            assembly.close()
            if exporter is not None:
                exporter.stop()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return 0
