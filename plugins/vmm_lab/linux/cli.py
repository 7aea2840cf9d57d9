"""`vmm lab ...`: the namespace lab (demo, clean-up of leftovers).

Both commands check every argument and every option they use before they
create (or delete) anything, so bad input ends in one ``vmm: error:`` line
and leaves the host as it was.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil

from oslo_config import cfg

from vmm_lab.linux import options as lab_opts
from vmm_lab.linux.topology import remove_namespaces
from vmm_orchestrator.cli import check_options, override_option
from vmm_orchestrator.commands import Command
from vmm_orchestrator.errors import ConfigError, VmmError
from vmm_orchestrator.options import require

PLACEMENT = lab_opts.PLACEMENT
GATEWAY = lab_opts.GATEWAY
DESTINATION = lab_opts.DESTINATION
MIGRATABLE = lab_opts.MIGRATABLE

#: A run prefix as topology.new_prefix() makes it ("vmm" + 4 digits + 4 hex), maybe
#: followed by the letter of the demo mode it ran ("vmm1234abcdn" for mode none).
MODE_LETTERS = "".join(sorted({m[0] for m in lab_opts.MODES}))
PREFIX_RE = re.compile(rf"^vmm[0-9]{{4}}[0-9a-f]{{4}}[{MODE_LETTERS}]?$")
RUN_PREFIX_LEN = 11


def check_vm(name: str) -> None:
    """Refuse a --vm the demo cannot migrate, listing those it knows."""
    known = ", ".join(MIGRATABLE)
    if name == GATEWAY:
        raise VmmError(
            f"--vm {name}: {name} is the lab's gateway, not a VM that migrates",
            hint=f"the lab VMs that can migrate to {DESTINATION} are {known}",
        )
    if PLACEMENT.get(name) == DESTINATION:
        raise VmmError(
            f"--vm {name}: {name} already runs on the destination {DESTINATION}",
            hint=f"the lab VMs that can migrate to {DESTINATION} are {known}",
        )
    if name not in PLACEMENT:
        raise VmmError(
            f"--vm {name}: no such lab VM",
            hint=f"the lab VMs that can migrate to {DESTINATION} are {known}",
        )


def parse_modes(text: str) -> list[str]:
    """``--modes`` as a list; empty or unknown names are refused."""
    modes = [m.strip() for m in text.split(",")]
    if any(not m for m in modes):
        raise VmmError(
            f"--modes {text!r}: empty mode name",
            hint=f"give a comma-separated list of {', '.join(lab_opts.MODES)}",
        )
    bad = [m for m in modes if m not in lab_opts.MODES]
    if bad:
        raise VmmError(
            f"--modes: unknown mode(s) {', '.join(bad)}",
            hint=f"choose from {', '.join(lab_opts.MODES)}",
        )
    return modes


def check_demo_options(conf: cfg.ConfigOpts) -> None:
    """Read every option the demo uses, and check what types alone cannot.

    The demo reads [lab], [announce], [linux_nve] and [nve_agent] in every
    mode, and [pipeline] plus each pipeline stage's group in the orchestrated
    mode; a bad value must fail here, not after the first lab is built.
    """
    from vmm_linux import nve
    from vmm_linux import opts as linux_opts
    from vmm_orchestrator import engine
    from vmm_orchestrator.stage import group_name, stage_opts

    check_options(conf, [*linux_opts.list_opts(), *lab_opts.list_opts()])
    lab_opts.check(conf)
    if not conf.lab.modes:
        raise ConfigError(
            "[lab] modes is empty: the demo would run nothing",
            hint=f"list at least one of {', '.join(lab_opts.MODES)}",
        )
    ports = conf[nve.GROUP]
    if ports.vxlan_port == ports.inflight_port:
        raise ConfigError(
            f"[linux_nve] inflight_port and vxlan_port are both {ports.vxlan_port}",
            hint="give inflight_port another port: the kernel allows one VXLAN device per port",
        )
    if "orchestrated" in conf.lab.modes:
        check_options(conf, engine.list_opts())
        stages = engine.load_stages(conf, list(conf.pipeline.stages))
        check_options(conf, [(group_name(s.name), stage_opts(type(s))) for s in stages])


def check_json_out(path: str | None) -> None:
    """--json must be writable where it points, so the results are not lost at the end."""
    if path is None:
        return
    target = os.path.abspath(path)
    directory = os.path.dirname(target)
    if not os.path.isdir(directory):
        raise VmmError(
            f"--json {path}: directory {directory} does not exist",
            hint="create it or write the JSON elsewhere",
        )
    if os.path.isdir(target):
        raise VmmError(f"--json {path} is a directory", hint="give a file name")
    writable = (
        os.access(target, os.W_OK)
        if os.path.exists(target)
        else os.access(directory, os.W_OK | os.X_OK)
    )
    if not writable:
        raise VmmError(f"--json {path} is not writable", hint="check the permissions")


def need_root_and_ip() -> None:
    if os.geteuid() != 0:
        raise VmmError(
            "the lab needs root (it creates and deletes network namespaces)",
            hint="run it as root, e.g. with sudo",
        )
    if shutil.which("ip") is None:
        raise VmmError("the lab needs iproute2 (`ip` is not on PATH)", hint="install iproute2")


class LabCommand(Command):
    name = "lab"
    help = "the network-namespace lab: run the demo, remove leftovers"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        sub = parser.add_subparsers(
            dest="lab_command", metavar="{demo,state-demo,cleanup}", required=True
        )
        demo = sub.add_parser(
            "demo",
            help="migrate a VM under probe traffic in every mode and print the side-by-side report",
        )
        demo.add_argument("--modes", help="comma-separated: none,rarp,orchestrated")
        demo.add_argument("--downtime-ms", type=float, help="override [lab] downtime_ms")
        demo.add_argument("--rate", type=int, help="override [lab] probe_rate")
        demo.add_argument("--json", metavar="FILE", help="also write the results as JSON")
        demo.add_argument(
            "--picture",
            metavar="FILE",
            help="write the modes' timelines side by side (.svg or .png; default: a file "
            "in the temporary directory, whose path is printed)",
        )
        demo.add_argument(
            "--backend",
            choices=["linux", "ovn"],
            default="linux",
            help="the lab's data plane: linux (bridge + VXLAN NVEs, default) or ovn (a real "
            "OVN lab: OVS userspace datapath; modes ovn,ovn-garp-guest,orchestrated,"
            "orchestrated-garp-guest,orchestrated-no-switch)",
        )
        demo.add_argument(
            "--libvirt",
            action="store_true",
            help="migrate a real libvirt guest (a libvirtd on h1 and h2, a tiny TCG guest) "
            "instead of a namespace VM; modes rarp,orchestrated",
        )
        demo.add_argument(
            "--vm",
            metavar="NAME",
            default="vm1",
            help=f"the lab VM that migrates from its host to {DESTINATION} "
            f"(one of {', '.join(MIGRATABLE)}; default vm1)",
        )
        state = sub.add_parser(
            "state-demo",
            help="migrate a VM through a stateful firewall with and without state migration "
            "and print the four proofs side by side",
        )
        state.add_argument("--downtime-ms", type=float, help="override [lab] downtime_ms")
        state.add_argument(
            "--backend",
            choices=["linux", "ovn"],
            default="linux",
            help="linux: the four proofs on the model firewall; ovn: a TCP session through "
            "OVN's stateful ACLs with and without the ovn_conntrack state kind",
        )
        state.add_argument(
            "--vm",
            metavar="NAME",
            default="vm1",
            help=f"the lab VM that migrates from its host to {DESTINATION} "
            f"(one of {', '.join(MIGRATABLE)}; default vm1)",
        )
        clean = sub.add_parser("cleanup", help="remove namespaces left by a lab run")
        clean.add_argument(
            "prefix",
            help="the lab prefix the demo printed (vmmNNNNxxxx, or vmmNNNNxxxx + the mode's "
            "letter); the run prefix also removes every mode's namespaces",
        )

    def run(self, conf: cfg.ConfigOpts, args: argparse.Namespace) -> int:
        require(conf, lab_opts.GROUP, "vmm lab")
        if args.lab_command == "cleanup":
            return self.cleanup(args.prefix)
        if args.lab_command == "state-demo":
            return self.state_demo(conf, args)
        return self.demo(conf, args)

    def cleanup(self, prefix: str) -> int:
        if not PREFIX_RE.match(prefix):
            raise VmmError(
                f"{prefix!r} is not a lab prefix",
                hint="give the prefix the demo printed, e.g. vmm1234abcd or vmm1234abcdn",
            )
        need_root_and_ip()
        prefixes = [prefix]
        if len(prefix) == RUN_PREFIX_LEN:
            prefixes += [prefix + letter for letter in MODE_LETTERS]
        removed = [ns for p in prefixes for ns in remove_namespaces(p)]
        if removed:
            print(f"removed {len(removed)} namespace(s): {', '.join(sorted(removed))}")
        else:
            print(f"no namespace of lab prefix {prefix} found")
        return 0

    def demo(self, conf: cfg.ConfigOpts, args: argparse.Namespace) -> int:
        if getattr(args, "backend", "linux") == "ovn":
            if args.libvirt:
                raise VmmError("--backend ovn and --libvirt do not go together", hint="pick one")
            check_json_out(args.json)
            need_root_and_ip()
            from vmm_lab.ovn.demo import run_demo as run_ovn_demo

            return run_ovn_demo(
                conf,
                json_out=args.json,
                modes=args.modes,
                rate=args.rate,
                downtime_ms=args.downtime_ms,
            )
        if args.libvirt:
            return self.libvirt_demo(conf, args)
        check_vm(args.vm)
        group, opts = lab_opts.GROUP, lab_opts.LAB_OPTS
        if args.modes is not None:
            override_option(conf, group, opts, "modes", parse_modes(args.modes), "--modes")
        if args.downtime_ms is not None:
            override_option(conf, group, opts, "downtime_ms", args.downtime_ms, "--downtime-ms")
        if args.rate is not None:
            override_option(conf, group, opts, "probe_rate", args.rate, "--rate")
        check_demo_options(conf)
        check_json_out(args.json)
        picture = getattr(args, "picture", None)
        if picture and not picture.lower().endswith((".svg", ".png")):
            raise VmmError(f"--picture {picture}: name a .svg or .png file")
        need_root_and_ip()
        from vmm_lab.linux.demo import run_demo

        return run_demo(conf, json_out=args.json, vm=args.vm, picture_out=picture)

    def libvirt_demo(self, conf: cfg.ConfigOpts, args: argparse.Namespace) -> int:
        """`vmm lab demo --libvirt`: one real libvirt live migration per mode."""
        if args.vm != "vm1":
            raise VmmError(
                "--vm does not apply to --libvirt",
                hint="the libvirt demo migrates its own guest from h1 to h2",
            )
        if args.downtime_ms is not None:
            raise VmmError(
                "--downtime-ms does not apply to --libvirt",
                hint="libvirt decides the real downtime; the report shows it",
            )
        modes = parse_modes(args.modes) if args.modes is not None else None
        if modes and "none" in modes:
            raise VmmError(
                "--modes none does not apply to --libvirt (QEMU always sends its RARPs)",
                hint="choose from rarp, orchestrated",
            )
        check_demo_options(conf)
        check_json_out(args.json)
        need_root_and_ip()
        from vmm_lab.libvirt.demo import run_libvirt_demo

        return run_libvirt_demo(conf, json_out=args.json, modes=modes, rate=args.rate)

    def state_demo(self, conf: cfg.ConfigOpts, args: argparse.Namespace) -> int:
        """`vmm lab state-demo`: the state proofs with and without state migration."""
        from vmm_linux import opts as linux_opts

        if getattr(args, "backend", "linux") == "ovn":
            need_root_and_ip()
            from vmm_lab.ovn.state_demo import run_state_demo as run_ovn_state_demo

            return run_ovn_state_demo(conf)

        check_vm(args.vm)
        if args.downtime_ms is not None:
            override_option(
                conf,
                lab_opts.GROUP,
                lab_opts.LAB_OPTS,
                "downtime_ms",
                args.downtime_ms,
                "--downtime-ms",
            )
        check_options(conf, [*linux_opts.list_opts(), *lab_opts.list_opts()])
        need_root_and_ip()
        from vmm_lab.state_demo import run_state_demo

        return run_state_demo(conf, vm=args.vm)
