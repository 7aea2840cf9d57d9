"""Options of the OpenStack plugin, in ``[openstack]``.

The cloud itself is configured the way the openstack CLI is (clouds.yaml,
``OS_*`` variables, ``--os-cloud``); these options only say which cloud
entry to use when no flag or variable names one, and how long to wait for
what. They are read both by ``vmm migrate-with-network`` and by the Neutron
directory backend that per-host agents load.
"""

from __future__ import annotations

from oslo_config import cfg

GROUP = "openstack"

OPENSTACK_OPTS: list[cfg.Opt] = [
    cfg.StrOpt(
        "cloud",
        default=None,
        help="Entry of clouds.yaml to use when neither --os-cloud nor OS_CLOUD names one. "
        "Unset: the OS_* variables (an openrc file) describe the cloud.",
    ),
    cfg.StrOpt(
        "region_name",
        default=None,
        help="Region to use when neither --os-region-name nor OS_REGION_NAME names one.",
    ),
    cfg.FloatOpt(
        "api_timeout",
        default=30.0,
        min=0.1,
        help="Seconds to wait for one answer of Keystone, Nova or Neutron before the "
        "service counts as unreachable.",
    ),
    cfg.FloatOpt(
        "migration_timeout",
        default=900.0,
        min=0.1,
        help="Longest time in seconds a live migration may take. Past it the migration is "
        "aborted (Nova's abort, libvirt's abortJob) and the network reverted, rather than "
        "waiting forever on a migration whose memory copy never converges.",
    ),
    cfg.FloatOpt(
        "abort_timeout",
        default=60.0,
        min=0.1,
        help="Seconds to wait, after asking for an abort, for the migration to end before "
        "giving up. Until it has ended the destination's binding is left alone, because "
        "a migration that still completes needs it.",
    ),
    cfg.FloatOpt(
        "converge_timeout",
        default=30.0,
        min=0.0,
        help="Seconds to wait, after the commit, for every port to be ACTIVE at the "
        "destination (its L2 agent has wired it: the destination's flows exist).",
    ),
    cfg.FloatOpt(
        "poll_interval",
        default=1.0,
        min=0.01,
        help="Seconds between two polls of the migration's progress and of the ports.",
    ),
    cfg.DictOpt(
        "nve_hosts",
        default={},
        help="NVE id -> host name as Neutron and Nova know it (host:compute-host,...), "
        "where the two differ. NVE ids not listed are the host's name.",
    ),
]


def register_opts(conf: cfg.ConfigOpts) -> None:
    """Register ``[openstack]`` on ``conf``; calling it again is harmless."""
    for opt in OPENSTACK_OPTS:
        try:
            conf.register_opt(opt, group=GROUP)
        except cfg.DuplicateOptError:
            pass


def list_opts() -> list[tuple[str, list[cfg.Opt]]]:
    """The plugin's options, for oslo-config-generator (entry point ``vmm_openstack``)."""
    return [(GROUP, list(OPENSTACK_OPTS))]
