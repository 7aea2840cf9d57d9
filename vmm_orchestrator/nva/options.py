"""Options of the ``[nva]`` group: how to reach the directory and how to serve it.

The client options (``url``, ``token``, ``request_timeout``) are read on
every host; the server options only by the host that runs ``vmm nva serve``.
They share one group so a single config file fits both.
"""

from __future__ import annotations

from oslo_config import cfg

GROUP = "nva"

NVA_OPTS: list[cfg.Opt] = [
    cfg.StrOpt(
        "backend",
        default="embedded",
        help="Where the directory lives. 'embedded': SQLite in the `vmm nva serve` process "
        "([nva] database); agents and stages reach it over HTTP ([nva] url). 'etcd': an etcd "
        "cluster ([nva_etcd]); agents and stages talk to etcd directly and NVE agents watch "
        "their VNs' keys; `vmm nva serve` can still serve it over HTTP. 'etcd-served': the "
        "directory on etcd ([nva_etcd]) with `vmm nva serve` in front of it; agents and stages "
        "reach it over HTTP ([nva] url), one stream per NVE, and each server follows etcd with "
        "one watch. Other names are looked "
        "up in the vmm_orchestrator.nva_backends entry points (e.g. 'neutron').",
    ),
    cfg.URIOpt(
        "url",
        default="http://127.0.0.1:9797",
        schemes=["http", "https"],
        help="Base URL at which NVE agents and the orchestrator reach the directory "
        "(the host and port `vmm nva serve` listens on, or a proxy in front of it).",
    ),
    cfg.StrOpt(
        "token",
        default=None,
        secret=True,
        required=True,
        help="Shared secret sent in the X-Auth-Token header of every request. The "
        "server refuses requests without it; clients and server must use the same "
        "value. Keep it out of world-readable files.",
    ),
    cfg.FloatOpt(
        "request_timeout",
        default=2.0,
        min=0.001,
        help="Seconds a client waits for an answer to one request before it counts "
        "the directory as unavailable (a transient error that stages retry). A "
        "long-poll watch waits this long on top of its own timeout.",
    ),
    cfg.HostAddressOpt(
        "bind_host",
        default="127.0.0.1",
        help="Address `vmm nva serve` listens on. Use a management-network address "
        "(not 0.0.0.0 on an untrusted network) so NVE agents on other hosts can reach it.",
    ),
    cfg.PortOpt(
        "bind_port",
        default=9797,
        help="TCP port `vmm nva serve` listens on; 0 picks a free port (useful in tests).",
    ),
    cfg.StrOpt(
        "database",
        default="/var/lib/vmm-orchestrator/nva.sqlite",
        help="Path of the SQLite file holding NVEs, endpoints and the change log, so "
        "sequence numbers survive a restart. ':memory:' keeps everything in memory "
        "(lost on restart: for tests only). The directory must exist and be writable.",
    ),
    cfg.IntOpt(
        "max_body_bytes",
        default=1024 * 1024,
        min=1,
        help="Largest request body the server accepts, in bytes; larger requests are "
        "refused with 413 before being parsed, so a client cannot exhaust memory.",
    ),
    cfg.FloatOpt(
        "watch_max_timeout",
        default=30.0,
        min=0.0,
        help="Longest time in seconds the server holds a long-poll watch or acks request "
        "open waiting for changes; larger timeouts asked by clients are cut to this.",
    ),
    cfg.IntOpt(
        "mac_move_limit",
        default=5,
        min=1,
        help="Move-flap protection (EVPN duplicate detection, RFC 7432 section 15): a MAC "
        "that moved more than this many times within mac_move_window seconds, the last "
        "time by local learning, is frozen where it is; further moves are refused until "
        "`vmm nva endpoint release`. Moves of planned migrations (pre-stage + commit) are "
        "counted but never freeze a MAC by themselves, so a load balancer or an "
        "evacuation moving VMs back and forth does not trip it. FRR's default is 5.",
    ),
    cfg.FloatOpt(
        "mac_move_window",
        default=180.0,
        min=1.0,
        help="Seconds over which mac_move_limit counts a MAC's moves (FRR: 180).",
    ),
    cfg.FloatOpt(
        "migration_grace",
        default=30.0,
        min=0.0,
        help="Seconds after a planned migration's commit during which learned moves "
        "between its source and destination (QEMU's announcements, frames still in "
        "flight) are that migration's echo and are not counted: a planned migration "
        "counts as one move however many announcements it causes.",
    ),
    cfg.IntOpt(
        "change_log_keep",
        default=100000,
        min=100,
        help="Changes the directory keeps in its change log; older ones are pruned. "
        "An NVE agent that falls further behind is told its changes are gone (HTTP "
        "410) and loads its VNs again in full.",
    ),
    cfg.IntOpt(
        "max_json_depth",
        default=32,
        min=2,
        help="Deepest nesting of arrays and objects a request body may have; deeper "
        "bodies are refused with 400 before anything else reads them.",
    ),
]


#: Server only: who may act as which NVE (issue 13). Kept apart from NVA_OPTS,
#: whose names clients and the CLI's overrides rely on.
CREDENTIAL_OPTS: list[cfg.Opt] = [
    cfg.DictOpt(
        "nve_tokens",
        default={},
        secret=True,
        help="Server only: per-NVE tokens, as nve-id:token pairs. A request carrying one of "
        "them may act only as that NVE (register its own VTEP and VNs, watch and ack as "
        "itself, report moves to itself, pre-stage/commit/abort only endpoints at or moving "
        "to it; see vmm_orchestrator.nva.server for the whole scope table); [nva] token stays "
        "the admin token that may do everything. Several NVE ids may share one token (an "
        "agent serving several hosts). On each host set [nva] token to that host's own token.",
    ),
    cfg.StrOpt(
        "nve_tokens_file",
        default=None,
        help="Server only: a file of per-NVE tokens, one '<nve-id> <token>' pair a line "
        "('#' starts a comment), read at start and again when it changes (checked at most "
        "once a second), so hosts can be added or tokens rotated without a restart. Keep it "
        "readable by the server only. Merged with [nva] nve_tokens.",
    ),
    cfg.IntOpt(
        "max_connections",
        default=4096,
        min=16,
        help="Server only: connections the directory keeps open at most (an NVE agent "
        "holds one stream). At the limit a new connection evicts the one waiting longest "
        "without an authenticated request; when every one is busy it gets 503 with "
        "Retry-After. Lowered to fit the process's descriptor limit.",
    ),
    cfg.FloatOpt(
        "request_deadline",
        default=5.0,
        min=0.5,
        help="Server only: seconds a client has to send a whole request head (from "
        "connect, or from the first byte of a later request on a kept-alive connection); "
        "a body gets as long before authentication, 60 s after, each plus 1 s per 64 KiB "
        "received. A client trickling bytes cannot hold a connection past it.",
    ),
]


def register_opts(conf: cfg.ConfigOpts) -> None:
    """Register the ``[nva]`` options on ``conf``; safe to call more than once."""
    conf.register_opts(NVA_OPTS, group=GROUP)
    conf.register_opts(CREDENTIAL_OPTS, group=GROUP)


def list_opts() -> list[tuple[str, list[cfg.Opt]]]:
    """The options of this module, in the shape oslo-config-generator expects."""
    return [(GROUP, list(NVA_OPTS) + list(CREDENTIAL_OPTS))]
