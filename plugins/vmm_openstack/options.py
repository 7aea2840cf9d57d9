"""Options of the OpenStack plugin, in ``[openstack]`` and ``[neutron]``.

The cloud itself is configured the way the openstack CLI is (clouds.yaml,
``OS_*`` variables, ``--os-cloud``); ``[openstack]`` only says which cloud
entry to use when no flag or variable names one, and how long to wait for
what. They are read both by ``vmm migrate-with-network`` and by the Neutron
directory backend that per-host agents load.

``[neutron]`` is the service user for port bindings, written exactly like
nova.conf's ``[neutron]`` section (keystoneauth's options: ``auth_type``,
``auth_url``, ``username``, ``password``, ``project_name`` ...). Under
Neutron's default policy (the new RBAC defaults DevStack enforces) creating,
activating and deleting a port binding needs the ``service`` role and
reading a network's ``provider:segmentation_id`` the ``admin`` role: the
rights Nova's own service user has (DevStack gives user ``nova`` both, in
project ``service``). An operator's admin credentials lack ``service``, so
with ``[neutron]`` set every Neutron call of the directory goes through this
user while the operator's credentials still find the server in Nova. Unset,
the operator's credentials must hold both roles themselves.
"""

from __future__ import annotations

from oslo_config import cfg

GROUP = "openstack"
#: The service user's group, named and shaped like nova.conf's.
NEUTRON_GROUP = "neutron"

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


#: keystoneauth's adapter options that ``[neutron]`` honours, as nova.conf's does.
ADAPTER_OPTS = ("region_name", "valid_interfaces", "interface", "endpoint_override")


def neutron_opts() -> list[cfg.Opt]:
    """``[neutron]``: keystoneauth's auth, password-plugin, session and adapter options.

    The same options (and help) as nova.conf's ``[neutron]``, so that its
    lines can be copied; ``auth_type`` unset means the section is not used.
    """
    from keystoneauth1 import loading as ks_loading

    adapter = [
        o
        for o in ks_loading.get_adapter_conf_options(include_deprecated=True)
        if o.dest in ADAPTER_OPTS
    ]
    return [
        *ks_loading.get_auth_common_conf_options(),
        *ks_loading.get_auth_plugin_conf_options("password"),
        *ks_loading.get_session_conf_options(),
        *adapter,
    ]


def register_opts(conf: cfg.ConfigOpts) -> None:
    """Register ``[openstack]`` and ``[neutron]`` on ``conf``; calling it again is harmless."""
    for group, opts in list_opts():
        for opt in opts:
            try:
                conf.register_opt(opt, group=group)
            except cfg.DuplicateOptError:
                pass


def list_opts() -> list[tuple[str, list[cfg.Opt]]]:
    """The plugin's options, for oslo-config-generator (entry point ``vmm_openstack``)."""
    return [(GROUP, list(OPENSTACK_OPTS)), (NEUTRON_GROUP, neutron_opts())]
