"""Options of the libvirt plugin: ``[libvirt]`` (how to watch libvirt and read
domains), its part of ``[agent]`` (the hook socket, timeouts) and of each
``[host:<name>]`` group (the libvirt URI, the hook socket); the rest of those
groups belongs to the core's composition root (:mod:`vmm_orchestrator.agent`).

Per-host groups follow the pattern of cinder's ``enabled_backends``: a small
site or the lab runs several hosts in one process, each with its own libvirt
URI, NVE and hook socket; production runs one.
"""

from __future__ import annotations

import contextlib
import re

from oslo_config import cfg, types

from vmm_orchestrator import agent
from vmm_orchestrator.errors import ConfigError

GROUP = "libvirt"
AGENT_GROUP = "agent"
#: Prefix of the per-host groups: ``[host:compute1]``.
HOST_GROUP_PREFIX = "host:"

ADDRESS_SOURCES = ("directory", "agent", "lease", "arp")

LIBVIRT_OPTS: list[cfg.Opt] = [
    cfg.IntOpt(
        "keepalive_interval",
        default=5,
        min=1,
        help="Seconds between libvirt keepalive probes on an idle connection. With "
        "keepalive_count they bound how long a dead libvirtd (or a network cut to a "
        "remote one) goes unnoticed before the event source reconnects.",
    ),
    cfg.IntOpt(
        "keepalive_count",
        default=3,
        min=1,
        help="Keepalive probes that may go unanswered before the connection counts as dead.",
    ),
    cfg.FloatOpt(
        "reconnect_initial_delay",
        default=0.5,
        min=0.01,
        help="Seconds to wait before the first attempt to reconnect to libvirt; the wait "
        "doubles after each failed attempt up to reconnect_max_delay.",
    ),
    cfg.FloatOpt(
        "reconnect_max_delay",
        default=30.0,
        min=0.01,
        help="Longest wait in seconds between two attempts to reconnect to libvirt.",
    ),
    cfg.BoolOpt(
        "early_switchover",
        default=True,
        help="Run the source's SWITCHOVER stages (in-flight tunnel, final state delta) "
        "when libvirt pauses the VM for the migration's final copy, instead of once the "
        "migration job completed (STOPPED/MIGRATED). libvirt signals an operator's pause "
        "during a migration (virsh suspend, nova's force-complete) the same way "
        "(SUSPENDED/MIGRATED), so at each such pause the agent reads the job's statistics "
        "and switches over only if the migration is in its final phase (what remains fits "
        "in the allowed downtime at QEMU's measured bandwidth, or the job ended); an "
        "operator's pause switches over when its migration does. Measured on the libvirt "
        "lab: the completion arrives 0.37-0.48 s after the VM resumed at the destination, "
        "too late for the in-flight tunnel (a ping every 10 ms then lost 11-12 replies "
        "after the resume); the pause comes 0.06-0.3 s before it. Turn it off only for an "
        "event source that cannot read job statistics.",
    ),
    cfg.IntOpt(
        "final_copy_wait_ms",
        default=15,
        min=1,
        help="How long the agent waits for QEMU to answer the read of a paused "
        "migration's job statistics (see early_switchover). QEMU holds its lock for the "
        "whole final copy (0.2-0.3 s measured), so no answer in this time means the final "
        "copy: SWITCHOVER runs then, instead of after the copy, which used to be after the "
        "destination resumed. An operator's pause is answered at once (measured on the "
        "libvirt lab: the first read after virsh suspend took 0.7-0.9 ms, 11 ms at worst "
        "on a loaded host). Longer: fewer early switchovers at an operator's pause on a "
        "loaded host; shorter: less of the pause is lost at the source.",
    ),
    cfg.ListOpt(
        "address_sources",
        item_type=types.String(choices=ADDRESS_SOURCES),
        default=list(ADDRESS_SOURCES),
        help="Where a NIC's IP addresses are looked up, in order; the first source that "
        "knows any address of the NIC wins. 'directory': the NVA's registered binding "
        "(the only one a multi-tenant site should trust); 'agent': the guest agent "
        "(libvirt VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_AGENT); 'lease': libvirt's DHCP "
        "leases; 'arp': the host's ARP table. The hook relay's decisions use the "
        "directory only (a hook must never call back into libvirt).",
    ),
    cfg.DictOpt(
        "bridge_vnis",
        default={},
        help="Virtual network of the NICs on each bridge, as bridge:vni pairs (for example "
        "br-int:100). Takes precedence over bridge_vni_pattern.",
    ),
    cfg.StrOpt(
        "bridge_vni_pattern",
        default=r"^br-(?P<vni>[0-9]+)$",
        help="Regular expression with a named group 'vni' that reads the VNI out of a "
        "NIC's bridge name. The default matches the Linux NVE's bridges (br-<vni>). "
        "NICs on a bridge that neither this nor bridge_vnis maps are not managed.",
    ),
]

AGENT_OPTS: list[cfg.Opt] = [
    cfg.StrOpt(
        "hook_socket",
        default="/run/vmm-orchestrator/hook.sock",
        help="Unix socket the libvirt hook relay talks to, for hosts that set none. "
        "Must match [hook_relay] socket in the relay's configuration file.",
    ),
    cfg.FloatOpt(
        "hook_timeout",
        default=1.5,
        min=0.05,
        help="Seconds the daemon may spend on one hook request, the synchronous PREPARE "
        "of an incoming migration included. Keep it below the relay's deadline so that "
        "the relay gets an answer rather than a timeout. A PREPARE still running at this "
        "point vetoes the migration and is reverted once it ends.",
    ),
    cfg.FloatOpt(
        "stop_timeout",
        default=30.0,
        min=0.0,
        help="Seconds a stopping agent (SIGTERM) keeps handling events so that the "
        "migrations under way on its hosts reach their last phase here; new incoming "
        "migrations are refused meanwhile. Keep the systemd unit's TimeoutStopSec above it.",
    ),
    cfg.FloatOpt(
        "connect_timeout",
        default=10.0,
        min=0.0,
        help="Seconds `vmm agent --once` waits for every host's first libvirt connection.",
    ),
]

HOST_OPTS: list[cfg.Opt] = [
    cfg.StrOpt(
        "uri",
        default="qemu:///system",
        help="libvirt URI of this host (for the lab: "
        "qemu:///system?socket=<host run dir>/libvirt-sock).",
    ),
    cfg.StrOpt(
        "hook_socket",
        help="Unix socket of this host's hook relay; unset: [agent] hook_socket. Hosts in "
        "one daemon need distinct sockets.",
    ),
]


def host_group(name: str) -> str:
    """The config group of host ``name``."""
    return HOST_GROUP_PREFIX + name


def register_opts(conf: cfg.ConfigOpts) -> None:
    """Register [libvirt], this plugin's part of [agent] and of each [host:<name>] group
    (the core's composition root registers the rest: hosts, vtep, vnis, ...)."""
    agent.register_opts(conf)
    for group, opts in ((GROUP, LIBVIRT_OPTS), (AGENT_GROUP, AGENT_OPTS)):
        for opt in opts:
            with contextlib.suppress(cfg.DuplicateOptError):
                conf.register_opt(opt, group=group)
    for name in conf[AGENT_GROUP].hosts:
        register_host_opts(conf, name)


def register_host_opts(conf: cfg.ConfigOpts, name: str) -> None:
    for opt in HOST_OPTS:
        with contextlib.suppress(cfg.DuplicateOptError):
            conf.register_opt(opt, group=host_group(name))


def list_opts() -> list[tuple[str, list[cfg.Opt]]]:
    """For oslo-config-generator: the per-host options appear once, for a host "example"."""
    return [
        (GROUP, LIBVIRT_OPTS),
        (AGENT_GROUP, AGENT_OPTS),
        (host_group("example"), HOST_OPTS),
    ]


def bridge_pattern(conf: cfg.ConfigOpts) -> re.Pattern[str]:
    """[libvirt] bridge_vni_pattern compiled, or ConfigError saying what is wrong with it."""
    text = conf[GROUP].bridge_vni_pattern
    try:
        pattern = re.compile(text)
    except re.error as exc:
        raise ConfigError(
            f"[libvirt] bridge_vni_pattern {text!r} is not a regular expression: {exc}",
            hint="fix it, or remove the line to use the default",
        ) from None
    if "vni" not in pattern.groupindex:
        raise ConfigError(
            f"[libvirt] bridge_vni_pattern {text!r} has no named group 'vni'",
            hint="write the VNI part as (?P<vni>[0-9]+)",
        )
    return pattern


def bridge_vnis(conf: cfg.ConfigOpts) -> dict[str, int]:
    """[libvirt] bridge_vnis with integer VNIs, or ConfigError naming the bad pair."""
    out: dict[str, int] = {}
    for bridge, value in conf[GROUP].bridge_vnis.items():
        try:
            vni = int(value)
        except ValueError:
            vni = 0
        if not 0 < vni < 2**24:
            raise ConfigError(
                f"[libvirt] bridge_vnis: {bridge}:{value} does not give a VNI from 1 to 16777215",
                hint="write bridge:vni pairs, for example br-int:100",
            )
        out[bridge] = vni
    return out
