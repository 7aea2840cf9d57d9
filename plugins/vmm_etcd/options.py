"""Options of the ``[nva_etcd]`` group: where the etcd directory is and how to use it.

Read by every host when ``[nva] backend = etcd``: NVE agents and
orchestrators talk to etcd directly, and ``vmm nva serve`` (if still run,
for HTTP clients) serves the same etcd data. With ``[nva] backend =
etcd-served`` only the hosts running ``vmm nva serve`` (and the HA parts:
journals and leases) read them; agents and stages reach the directory
through ``[nva] url``.
"""

from __future__ import annotations

from oslo_config import cfg

GROUP = "nva_etcd"

ETCD_OPTS: list[cfg.Opt] = [
    cfg.ListOpt(
        "endpoints",
        default=["http://127.0.0.1:2379"],
        help="Client URLs of the etcd members (scheme://host:port). Requests go to the "
        "member that last answered and fail over to the others when it cannot serve "
        "them, so list every member.",
    ),
    cfg.StrOpt(
        "prefix",
        default="/vmm/",
        help="Key prefix under which the directory, the journals and the migration "
        "leases live. Sites (or tests) sharing one etcd cluster use different prefixes.",
    ),
    cfg.StrOpt(
        "api_path",
        default="/v3/",
        help="Path of etcd's gRPC gateway: /v3/ for etcd 3.4 and later, /v3beta/ for 3.3.",
    ),
    cfg.FloatOpt(
        "request_timeout",
        default=2.0,
        min=0.001,
        help="Seconds a request to etcd may take: one member gets this long to answer "
        "before the next is tried, and while no member can serve it (a leader election "
        "after a member died) the members are tried again for this long. Then the "
        "directory counts as unavailable (a transient error that stages retry).",
    ),
    cfg.IntOpt(
        "max_txn_ops",
        default=128,
        min=4,
        help="Most operations one etcd transaction may hold: etcd's --max-txn-ops (128 by "
        "default). A directory change too big for it (moving a VTEP with many endpoints "
        "behind it) is refused with a clear error instead of being split.",
    ),
    cfg.IntOpt(
        "lease_ttl",
        default=10,
        min=2,
        help="Seconds an orchestrator instance's lease outlives its last renewal. When an "
        "instance dies, other instances take its migrations over this long afterwards; "
        "an instance cut off from etcd longer than this loses its migrations.",
    ),
    cfg.FloatOpt(
        "claim_timeout",
        default=60.0,
        min=0.0,
        help="Seconds an instance waits for a migration owned by another live instance to "
        "be finished before it reports the event as handled elsewhere.",
    ),
    cfg.StrOpt(
        "ca_cert",
        default=None,
        help="CA certificate file to verify etcd's TLS certificate (https endpoints).",
    ),
    cfg.StrOpt(
        "cert_file",
        default=None,
        help="Client certificate file for etcd's TLS client authentication.",
    ),
    cfg.StrOpt(
        "key_file",
        default=None,
        secret=True,
        help="Private key file of cert_file.",
    ),
]


def register_opts(conf: cfg.ConfigOpts) -> None:
    """Register the ``[nva_etcd]`` options on ``conf``; safe to call more than once."""
    for opt in ETCD_OPTS:
        try:
            conf.register_opt(opt, group=GROUP)
        except cfg.DuplicateOptError:
            pass


def list_opts() -> list[tuple[str, list[cfg.Opt]]]:
    """The options of this plugin, in the shape oslo-config-generator expects."""
    return [(GROUP, list(ETCD_OPTS))]
