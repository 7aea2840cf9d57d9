"""`vmm agent`: run the per-host daemon.

It watches each configured host's libvirt, runs the pipeline on the
migration phases, and answers the libvirt hook relay. It checks every option
it uses before it starts anything. SIGTERM (systemd's stop) and SIGINT stop
it cleanly: hook sockets removed, libvirt connections closed, queued phases
finished.

``--once`` connects, recovers the journals, reconciles what libvirt shows
with the directory, waits for the resulting phases, and exits: a one-shot
catch-up (after maintenance, or in tests).
"""

from __future__ import annotations

import argparse
import signal
import threading
from types import FrameType

from oslo_config import cfg

from vmm_libvirt import daemon, options
from vmm_orchestrator import engine
from vmm_orchestrator.cli import check_options
from vmm_orchestrator.commands import Command
from vmm_orchestrator.errors import VmmError
from vmm_orchestrator.nva import options as nva_options
from vmm_orchestrator.stage import group_name, stage_opts


def check_agent_options(conf: cfg.ConfigOpts) -> list[daemon.HostSpec]:
    """Read every option the agent uses now, so a bad value fails before anything starts."""
    options.register_opts(conf)
    groups = [(options.GROUP, options.LIBVIRT_OPTS), (options.AGENT_GROUP, options.AGENT_OPTS)]
    groups += [(options.host_group(n), options.HOST_OPTS) for n in conf.agent.hosts]
    check_options(conf, groups + engine.list_opts() + nva_options.list_opts())
    options.bridge_pattern(conf)
    options.bridge_vnis(conf)
    stages = engine.load_stages(conf, list(conf.pipeline.stages))
    check_options(conf, [(group_name(s.name), stage_opts(type(s))) for s in stages])
    return daemon.host_specs(conf)


class AgentCommand(Command):
    name = "agent"
    help = "run the per-host daemon: libvirt events and hook calls -> migration pipeline"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--once",
            action="store_true",
            help="connect, recover, reconcile, wait for the resulting phases, then exit",
        )

    def run(self, conf: cfg.ConfigOpts, args: argparse.Namespace) -> int:
        specs = check_agent_options(conf)
        agent = daemon.Daemon.from_conf(conf)
        stop = threading.Event()

        def on_signal(_signum: int, _frame: FrameType | None) -> None:
            stop.set()

        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            agent.start()
            names = ", ".join(f"{s.name} ({s.uri})" for s in specs)
            print(f"vmm agent: serving {names}", flush=True)
            if args.once:
                waiting = agent.wait_reconciled(conf.agent.connect_timeout)
                if waiting:
                    raise VmmError(
                        f"no libvirt connection for {', '.join(waiting)} within "
                        f"{conf.agent.connect_timeout:g} s",
                        hint="is libvirtd running? check [host:<name>] uri",
                    )
                # Every phase is bounded by its stages' deadlines: no timeout of our own.
                agent.wait_idle(float("inf"))
            else:
                while not stop.wait(3600):
                    pass
        finally:
            agent.stop()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return 0
