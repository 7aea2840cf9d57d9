"""`vmm lab ...`: the namespace lab (demo, clean-up of leftovers)."""

from __future__ import annotations

import argparse
import os

from oslo_config import cfg

from vmm_linux.lab import options as lab_opts
from vmm_linux.lab.topology import remove_namespaces
from vmm_orchestrator.commands import Command
from vmm_orchestrator.errors import ConfigError, VmmError


class LabCommand(Command):
    name = "lab"
    help = "the network-namespace lab: run the demo, remove leftovers"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        sub = parser.add_subparsers(dest="lab_command", required=True)
        demo = sub.add_parser(
            "demo",
            help="migrate a VM under probe traffic in every mode and print the side-by-side report",
        )
        demo.add_argument("--modes", help="comma-separated: none,rarp,orchestrated")
        demo.add_argument("--downtime-ms", type=float, help="override [lab] downtime_ms")
        demo.add_argument("--rate", type=int, help="override [lab] probe_rate")
        demo.add_argument("--json", metavar="FILE", help="also write the results as JSON")
        clean = sub.add_parser("cleanup", help="remove namespaces left by a lab run")
        clean.add_argument("prefix", help="the run prefix printed by the lab (vmmNNNNxxxx)")

    def run(self, conf: cfg.ConfigOpts, args: argparse.Namespace) -> int:
        if os.geteuid() != 0:
            raise VmmError("the lab needs root (network namespaces)", hint="run it as root")
        lab_opts.register_opts(conf)
        if args.lab_command == "cleanup":
            if not args.prefix.startswith("vmm") or len(args.prefix) < 7:
                raise VmmError(f"{args.prefix!r} is not a lab prefix", hint="e.g. vmm1234abcd")
            removed = remove_namespaces(args.prefix)
            print(f"removed {len(removed)} namespace(s)")
            return 0
        from vmm_linux.lab.demo import run_demo

        try:
            if args.modes:
                conf.set_override("modes", args.modes.split(","), group=lab_opts.GROUP)
            if args.downtime_ms is not None:
                conf.set_override("downtime_ms", args.downtime_ms, group=lab_opts.GROUP)
            if args.rate is not None:
                conf.set_override("probe_rate", args.rate, group=lab_opts.GROUP)
        except ValueError as exc:
            raise ConfigError(f"bad option value: {exc}") from None
        return run_demo(conf, json_out=args.json)
