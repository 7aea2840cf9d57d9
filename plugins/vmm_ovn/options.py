"""The ``[ovn]`` options of the OVN plugin (registered by the plugin itself)."""

from __future__ import annotations

from oslo_config import cfg, types

GROUP = "ovn"

BARRIER_INSTALLED = "ovn-installed"
BARRIER_NB_CFG = "nb_cfg"
BARRIER_BOTH = "both"
BARRIER_NONE = "none"

OVN_OPTS: list[cfg.Opt] = [
    cfg.StrOpt(
        "ovsdb_connection",
        default="unix:/var/run/openvswitch/db.sock",
        help="This chassis' local Open vSwitch database (where the VM's port, its "
        "ofport and ovn-controller's ovn-installed flag are).",
    ),
    cfg.StrOpt(
        "integration_bridge",
        default="br-int",
        help="The OVN integration bridge the VMs' ports are on.",
    ),
    cfg.StrOpt(
        "openflow_target",
        default="",
        help="Where announcements are sent as OpenFlow packet-outs (an ovs-ofctl "
        "target). Empty: unix:<folder of ovsdb_connection>/<integration_bridge>.mgmt, "
        "the bridge's management socket.",
    ),
    cfg.StrOpt(
        "ovn_nb_connection",
        default="",
        help="OVN Northbound database (tcp:IP:6641, ssl:..., unix:...). Needed by the "
        "OVN directory (OVN without Neutron) and for nb_cfg barriers.",
    ),
    cfg.StrOpt(
        "ovn_sb_connection",
        default="",
        help="OVN Southbound database: chassis, their encapsulation IPs and per-chassis "
        "nb_cfg (convergence). Empty: the chassis' own external_ids:ovn-remote.",
    ),
    cfg.FloatOpt(
        "ovsdb_timeout",
        default=10.0,
        min=0.1,
        help="Seconds an OVSDB transaction or connection may take.",
    ),
    cfg.StrOpt(
        "barrier",
        default=BARRIER_INSTALLED,
        choices=[
            (BARRIER_INSTALLED, "the VM's OVS Interface has external_ids:ovn-installed=true"),
            (
                BARRIER_NB_CFG,
                "this chassis' ovn-nb-cfg (br-int external_ids) reached the SB's nb_cfg",
            ),
            (BARRIER_BOTH, "both of the above"),
            (BARRIER_NONE, "no wait (the baseline: announce whatever the flows)"),
        ],
        help="What the destination waits for before the VM is announced and reported "
        "ready: the flows for its port are installed. ovn-controller can take seconds "
        "between claiming a port and writing its OpenFlow rules on a loaded host; an "
        "announcement injected before that is dropped.",
    ),
    cfg.FloatOpt(
        "barrier_timeout",
        default=5.0,
        min=0.0,
        help="Seconds the barrier waits before the stage fails (plug) or the "
        "announcement goes out anyway (announce, logged).",
    ),
    cfg.FloatOpt(
        "poll_interval",
        default=0.002,
        min=0.0005,
        help="Seconds between looks at the (locally cached) OVSDB rows while waiting.",
    ),
    cfg.StrOpt(
        "activation_strategy",
        default="rarp",
        help="The OVN activation strategy the directory sets on a multi-chassis port "
        "while it moves. OVN 23.03 (Debian 12) knows only 'rarp'; 'garp' and 'na' exist "
        "from OVN 25.09. Empty: none (traffic cloned to both chassis, both unblocked).",
    ),
    cfg.BoolOpt(
        "switch_at_pause",
        default=True,
        help="At SWITCHOVER (the guest paused at the source) make the destination the "
        "port's only chassis through the directory, so OVN moves the binding during "
        "the pause rather than after the resume (the NVE's in-flight step on OVN). "
        "Needs a directory that writes the Northbound (the OVN directory).",
    ),
    cfg.BoolOpt(
        "announce_activation",
        default=True,
        help="Start every announcement round with a RARP from the VM's port: with "
        "activation-strategy=rarp that is what unblocks the destination's port, from "
        "the host, before the guest sends anything.",
    ),
    cfg.ListOpt(
        "announce_schedule_ms",
        item_type=types.Integer(min=0),
        default=[0, 50, 200, 450, 800, 1500],
        help="Offsets in ms after RESUMED at which a round of announcements is "
        "injected; the first leaves at once (after the barrier).",
    ),
    cfg.ListOpt(
        "announce_gateways",
        item_type=types.String(),
        default=[],
        help="IPv4 gateways as 'ip@mac': each gets a unicast ARP reply from every IPv4 "
        "address of the VM in every round.",
    ),
    cfg.ListOpt(
        "vni_switches",
        item_type=types.String(),
        default=[],
        help="VNI to logical switch as 'vni:switch-name'. A switch not listed is found "
        "by its external_ids:vmm:vni, then by its SB datapath tunnel key.",
    ),
    cfg.ListOpt(
        "chassis_names",
        item_type=types.String(),
        default=[],
        help="NVE id to OVN chassis name as 'nve:chassis' where they differ (the "
        "chassis name is the OVS external_ids:system-id).",
    ),
    cfg.BoolOpt(
        "neutron_managed",
        default=False,
        help="Neutron (ML2/OVN) writes the Northbound: the OVN directory then refuses "
        "to write (prestage/commit/abort) and only reads OVN for barriers and "
        "convergence, so it never fights Neutron's writes.",
    ),
]


def register_opts(conf: cfg.ConfigOpts) -> None:
    """Register ``[ovn]`` on ``conf``; repeated calls are harmless."""
    conf.register_opts(OVN_OPTS, group=GROUP)


def list_opts() -> list[tuple[str, list[cfg.Opt]]]:
    """For oslo-config-generator and vmm_orchestrator.options.register_all (entry point
    ``oslo.config.opts``): [ovn] and the OVN conntrack state kind's group."""
    from vmm_ovn.state import OvnConntrackKind  # it imports this module

    return [(GROUP, OVN_OPTS), (f"state_{OvnConntrackKind.name}", list(OvnConntrackKind.opts))]


def pairs(values: list[str], what: str) -> dict[str, str]:
    """``["a:b", ...]`` -> ``{"a": "b"}``; ValueError naming the bad entry."""
    out = {}
    for raw in values:
        key, sep, value = str(raw).partition(":")
        if not sep or not key.strip() or not value.strip():
            raise ValueError(f"[ovn] {what}: expected 'key:value', got {raw!r}")
        out[key.strip()] = value.strip()
    return out
