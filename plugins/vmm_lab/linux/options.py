"""Options of the lab and its demo ([lab])."""

from __future__ import annotations

from oslo_config import cfg

GROUP = "lab"
MODES = ("none", "rarp", "orchestrated")

#: Where the demo places each VM: vm1 and vm3 on h1, vm2 and the gateway on
#: h3, vm4 on the destination h2. Any VM not on the destination can migrate.
PLACEMENT: dict[str, str] = {"gw": "h3", "vm1": "h1", "vm2": "h3", "vm3": "h1", "vm4": "h2"}
GATEWAY = "gw"
DESTINATION = "h2"
MIGRATABLE: tuple[str, ...] = tuple(
    sorted(n for n, host in PLACEMENT.items() if n != GATEWAY and host != DESTINATION)
)

LAB_OPTS: list[cfg.Opt] = [
    cfg.IntOpt(
        "hosts",
        default=3,
        min=3,
        max=16,
        help="Hypervisor hosts (NVEs) in the lab: the migrating VM moves "
        "from the first to the second; peers sit on the others.",
    ),
    cfg.IntOpt(
        "vni",
        default=100,
        min=1,
        max=16777215,
        help="VXLAN network identifier of the lab's virtual network.",
    ),
    cfg.FloatOpt(
        "downtime_ms",
        default=100.0,
        min=0.0,
        max=10000.0,
        help="How long the VM's port stays paused during the migration.",
    ),
    cfg.IntOpt(
        "probe_rate",
        default=1000,
        min=10,
        max=5000,
        help="Packets per second of each probe stream.",
    ),
    cfg.PortOpt("probe_port", default=5201, help="UDP port the VM's probe receivers use."),
    cfg.FloatOpt(
        "warmup_s",
        default=1.0,
        min=0.2,
        help="Seconds of probe traffic before the migration starts.",
    ),
    cfg.FloatOpt(
        "observe_s",
        default=2.0,
        min=0.5,
        help="Seconds of probe traffic after the VM resumed.",
    ),
    cfg.ListOpt(
        "modes",
        default=list(MODES),
        help="Runs of the demo, side by side: 'none' (no orchestrator, no "
        "announcement), 'rarp' (no orchestrator; QEMU's own RARP "
        "self-announcement), 'orchestrated' (QEMU's RARP plus this project's "
        "pipeline).",
    ),
]


def register_opts(conf: cfg.ConfigOpts) -> None:
    conf.register_opts(LAB_OPTS, group=GROUP)


def check(conf: cfg.ConfigOpts) -> None:
    """Reject option values oslo.config cannot check by type alone."""
    from vmm_orchestrator.errors import ConfigError

    if not conf[GROUP].modes:
        raise ConfigError("[lab] modes is empty", hint=f"choose from {', '.join(MODES)}")
    bad = [m for m in conf[GROUP].modes if m not in MODES]
    if bad:
        raise ConfigError(
            f"[lab] modes: unknown mode(s) {', '.join(bad)}",
            hint=f"choose from {', '.join(MODES)}",
        )


def list_opts() -> list[tuple[str, list[cfg.Opt]]]:
    """For oslo-config-generator's ``vmm_lab`` namespace (not in the product's sample)."""
    return [(GROUP, LAB_OPTS)]
