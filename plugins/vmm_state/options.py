"""Options of the ``[state]`` group: which state kinds move, how bundles are
signed and bounded, and how each host's state service is reached.

Every host reads the same group: a host is the source of some migrations
and the destination of others, so it both serves exports and accepts
imports. The per-reason policy options live in :mod:`vmm_state.policy` and
are registered in the same group.
"""

from __future__ import annotations

from oslo_config import cfg

from vmm_orchestrator.errors import ConfigError
from vmm_orchestrator.options import require

GROUP = "state"

#: Shortest HMAC key accepted: a short shared secret can be brute-forced
#: offline from one captured bundle.
MIN_KEY_LENGTH = 16

STATE_OPTS: list[cfg.Opt] = [
    cfg.ListOpt(
        "kinds",
        default=[],
        help="State kinds that move with a VM, by entry point name in the vmm_state.kinds "
        "namespace (for example conntrack, nft_sets, mdb). Bundles are exported and "
        "imported in this order. A kind a peer sends that is not listed here is answered "
        "FAIL/unsupported. Empty: no state moves and the state stages do nothing.",
    ),
    cfg.StrOpt(
        "key",
        default=None,
        secret=True,
        help="Shared secret (at least 16 characters) with which every host signs the "
        "state bundles it exports (HMAC-SHA256) and verifies those it imports. A bundle "
        "that is unsigned or whose signature does not verify is refused and nothing of "
        "it is installed. Use the same value on every host; keep it out of "
        "world-readable files.",
    ),
    cfg.StrOpt(
        "key_id",
        default="k1",
        regex=r"^[A-Za-z0-9._-]{1,64}$",
        help="Name of [state] key, written into every bundle so that the importer picks "
        "the right key. Change it together with the key when rotating keys.",
    ),
    cfg.DictOpt(
        "verify_keys",
        default={},
        secret=True,
        help="Further key_id:key pairs accepted when verifying bundles (never used to "
        "sign). During a key rotation list the old key here until every host signs "
        "with the new one.",
    ),
    cfg.IntOpt(
        "max_bundle_bytes",
        default=256 * 1024 * 1024,
        min=1024,
        help="Largest state bundle, in bytes, a host accepts. The importer stops reading "
        "a larger bundle at this size and refuses it (FAIL/resource_limit): the bundle is "
        "held in memory until its signature is verified, so this bounds memory use.",
    ),
    cfg.IntOpt(
        "max_entries",
        default=262144,
        min=0,
        help="Most entries of one kind a host accepts for one migration (for example "
        "sessions of one VM). A kind over the limit is answered FAIL/resource_limit and "
        "its entries are dropped while reading, before they take memory.",
    ),
    cfg.DictOpt(
        "max_entries_per_kind",
        default={},
        help="Per-kind overrides of max_entries, as kind:count pairs (for example "
        "conntrack:1000000,mdb:4096).",
    ),
    cfg.IntOpt(
        "chunk_entries",
        default=2048,
        min=1,
        help="Entries per chunk of a bundle. Exports are streamed chunk by chunk, so the "
        "exporting host never holds more than one chunk of a large table in memory.",
    ),
    cfg.FloatOpt(
        "delta_margin",
        default=1.0,
        min=0.0,
        help="Seconds subtracted from the time of the pre-copy export when the source "
        "asks its kinds for the delta at SWITCHOVER. Covers kinds that time-stamp "
        "entries coarsely; an entry sent twice is replaced, never duplicated.",
    ),
    cfg.HostAddressOpt(
        "bind_host",
        default="127.0.0.1",
        help="Address the host's state service listens on: its management address, "
        "reachable from the other hypervisors (never 0.0.0.0 on an untrusted network).",
    ),
    cfg.PortOpt(
        "bind_port",
        default=9798,
        help="TCP port of the host's state service; 0 picks a free port (tests).",
    ),
    cfg.StrOpt(
        "token",
        default=None,
        secret=True,
        help="Shared secret sent in the X-Auth-Token header of every request to a state "
        "service. It stops strangers from pulling a VM's sessions (exports are not "
        "encrypted) and from making a host import; the bundle signature is checked on "
        "top of it.",
    ),
    cfg.DictOpt(
        "peers",
        default={},
        help="Base URL of each host's state service by NVE id, as nve:url pairs (for "
        "example h1:http://10.0.0.1:9798). The destination pulls the pre-copy from the "
        "source's URL, the source pushes the delta to the destination's.",
    ),
    cfg.StrOpt(
        "cert_file",
        default=None,
        help="PEM certificate of this host. With key_file and ca_file set, the state "
        "service speaks HTTPS, requires a client certificate signed by ca_file, and "
        "this host presents the certificate to its peers: peers are then authenticated "
        "by TLS as well as by token and bundle signature. Peer URLs must use https.",
    ),
    cfg.StrOpt(
        "key_file",
        default=None,
        help="PEM private key of cert_file.",
    ),
    cfg.StrOpt(
        "ca_file",
        default=None,
        help="PEM certificate authority that signed every host's certificate; peers "
        "whose certificate it did not sign are refused.",
    ),
    cfg.FloatOpt(
        "connect_timeout",
        default=2.0,
        min=0.001,
        help="Seconds to wait for a peer's state service to accept a connection before "
        "the transfer counts as failed (FAIL/transfer_failed).",
    ),
    cfg.FloatOpt(
        "read_timeout",
        default=30.0,
        min=0.001,
        help="Seconds to wait between two pieces of a transfer (not for the whole "
        "transfer) before it counts as failed; also capped by each stage's deadline.",
    ),
    cfg.FloatOpt(
        "retry_delay",
        default=0.2,
        min=0.0,
        help="Seconds to wait before a retry a policy asks for (retry:N).",
    ),
    cfg.StrOpt(
        "ledger_dir",
        default=None,
        help="Directory where the destination records what each import installed, so "
        "that an ABORTED migration is reverted even after the orchestrator restarted. "
        "Unset: the record is kept in memory only (the pre-copy's own record is still "
        "journalled by the engine).",
    ),
    cfg.DictOpt(
        "peer_token_digests",
        default={},
        help="Per-host credentials: the SHA-256 hex digest of each peer host's own "
        "[state] token, as host:digest pairs (print one with `printf %s TOKEN | "
        "sha256sum`). Each host then sets [state] token to a secret of its own and knows "
        "only its peers' digests, so no host can act as another: a request with a peer's "
        "token is served only when that peer is the other end of the migration it names "
        "(the destination pulls the export; the source pushes, reverts and commits). "
        "Unset: [state] token is one secret every host shares, as before.",
    ),
    cfg.BoolOpt(
        "tls_peer_identity",
        default=False,
        help="With mutual TLS (cert_file, key_file, ca_file): a peer is the host its "
        "client certificate names in its subject CN (its NVE id), and is served only for "
        "migrations whose other end it is, as with peer_token_digests. Issue each host a "
        "certificate with CN=<its NVE id> from the site's CA.",
    ),
    cfg.IntOpt(
        "max_concurrent_imports",
        default=2,
        min=1,
        help="Imports (uploaded bundles) a host serves at once. A bundle is held in "
        "memory until its signature verifies (up to max_bundle_bytes), so this bounds the "
        "memory uploads take to about this many times max_bundle_bytes; further uploads "
        "are answered 503 with Retry-After before their body is read, and the sender's "
        "policy retries them.",
    ),
    cfg.IntOpt(
        "max_connections",
        default=4096,
        min=16,
        help="Connections the state service keeps open at most (peers keep one alive per "
        "host). At the limit a new connection evicts the one waiting longest without an "
        "authenticated request; when every one is busy it gets 503 with Retry-After. "
        "Lowered to fit the process's descriptor limit.",
    ),
    cfg.FloatOpt(
        "request_deadline",
        default=5.0,
        min=0.5,
        help="Seconds a client has to send a whole request head (from connect, or from "
        "the first byte of a later request on a kept-alive connection); a body gets as "
        "long before authentication, 60 s after, each plus 1 s per 64 KiB received. A "
        "client trickling bytes cannot hold a connection past it.",
    ),
]


def register_opts(conf: cfg.ConfigOpts) -> None:
    """Register ``[state]`` (and the policy options); safe to call more than once.

    For tools and tests that make a bare configuration: ``vmm``, the labs and
    the benchmarks register every plugin's options at load
    (``vmm_orchestrator.options.register_all``); the code that reads them
    only checks they are there (``require``)."""
    from vmm_state import policy  # the policy module owns its own options

    conf.register_opts([*STATE_OPTS, *policy.POLICY_OPTS], group=GROUP)


def list_opts() -> list[tuple[str, list[cfg.Opt]]]:
    """The ``[state]`` options, for oslo-config-generator (each kind's own
    ``[state_<name>]`` group is listed by ``vmm_state.kinds:list_opts``)."""
    from vmm_state import policy

    return [(GROUP, [*STATE_OPTS, *policy.POLICY_OPTS])]


def signing_keys(conf: cfg.ConfigOpts) -> tuple[str, bytes, dict[str, bytes]]:
    """(key id, signing key, every key accepted for verification by key id).

    Raises ConfigError when no key is set or it is too short: moving state
    unsigned is exactly what the design forbids.
    """
    require(conf, GROUP, "the state service's signing keys")
    group = conf[GROUP]
    if not group.key:
        raise ConfigError(
            "[state] key is not set: state bundles cannot be signed or verified",
            hint="set [state] key to the same secret of at least "
            f"{MIN_KEY_LENGTH} characters on every host",
        )
    if len(group.key) < MIN_KEY_LENGTH:
        raise ConfigError(
            f"[state] key is {len(group.key)} characters long; at least "
            f"{MIN_KEY_LENGTH} are needed",
            hint="use a random secret, e.g. `openssl rand -base64 32`",
        )
    keys = {kid: str(value).encode("utf-8") for kid, value in (group.verify_keys or {}).items()}
    keys[group.key_id] = group.key.encode("utf-8")
    return group.key_id, group.key.encode("utf-8"), keys


def entry_limits(conf: cfg.ConfigOpts) -> tuple[int, dict[str, int]]:
    """(default per-kind entry limit, overrides by kind), validated."""
    require(conf, GROUP, "the state service's entry limits")
    group = conf[GROUP]
    overrides: dict[str, int] = {}
    for kind, value in (group.max_entries_per_kind or {}).items():
        try:
            count = int(value)
        except ValueError:
            count = -1
        if count < 0:
            raise ConfigError(
                f"[state] max_entries_per_kind: {kind}:{value} is not a count >= 0",
                hint="write kind:count pairs, e.g. conntrack:1000000",
            )
        overrides[kind] = count
    return int(group.max_entries), overrides


def peer_digests(conf: cfg.ConfigOpts) -> dict[str, str]:
    """``[state] peer_token_digests``, each a SHA-256 hex digest (lower case)."""
    require(conf, GROUP, "the state service's peer credentials")
    out: dict[str, str] = {}
    for host, digest in (conf[GROUP].peer_token_digests or {}).items():
        text = str(digest).strip().lower()
        if len(text) != 64 or any(c not in "0123456789abcdef" for c in text):
            raise ConfigError(
                f"[state] peer_token_digests: the digest of {host} is not a SHA-256 hex digest",
                hint="write host:<64 hex digits>, from `printf %s TOKEN | sha256sum`",
            )
        out[host] = text
    return out
