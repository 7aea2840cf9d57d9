"""Firewall sessions: the conntrack entries of the VM's connections.

The session table of the host's stateful firewall is its namespace's
conntrack table (see :mod:`vmm_lab.firewall`). Without the VM's entries a
destination firewall that drops new inbound traffic drops the first
mid-stream packet of every existing connection, and the connections die.

Entry shape (JSON)::

    {"family": "ipv4" | "ipv6",
     "proto": "tcp" | "udp" | "udplite" | "icmp" | "icmpv6",
     "orig":  {"src": ip, "dst": ip, "sport": int, "dport": int}
              (ICMP: {"src", "dst", "id", "type", "code"}),
     "reply": same shape (the kernel's reply tuple),
     "timeout": seconds left,
     "status": ["SEEN_REPLY", "ASSURED"] (those set),
     "tcp": {"state": "ESTABLISHED", "wscale_orig": int, "wscale_reply": int,
             "flags_orig": int, "flags_reply": int}      (TCP only),
     "mark": int, "zone": int, "labels": hex, "helper": name   (when set),
     "age": seconds since export                        (optional, set by a carrier)}

An entry belongs to the VM if the VM started the connection (the original
tuple's source is the VM's) or answers it (the reply tuple's source is the
VM's). Entries whose tuples are not mirror images are NAT bindings: exported,
but not installed (``[state_conntrack] nat_sessions``), because the NAT
mapping they depend on is the source host's.

What the kernel does (measured on 6.18, see the tests):
  * the timeout given at creation is the entry's remaining lifetime;
    it is exported and installed in whole seconds, rounded down, so a move
    never extends it; an entry with less than a second left is not installed;
  * an injected TCP entry has no window data; without ``be_liberal`` the
    kernel may judge the first packets after the move out of window
    (conntrackd's lesson), so imported TCP entries carry the be-liberal flag
    in both directions (``[state_conntrack] be_liberal``) - only those
    entries, not the host-wide sysctl;
  * an existing entry with the same original tuple is replaced (updated in
    place: timeout, status, TCP state and flags, mark), and revert puts the
    old values back.

Change tracking (the source, from the pre-copy on): ``track`` subscribes to
the VM's conntrack events before the pre-copy's dump (:mod:`._cttrack`);
the switchover's export then carries only the sessions created or changed
since (with current timeouts) and ``{"op": "delete", ...}`` for those
destroyed, and the destination applies them in one batched pass. A lost
event makes that export a resync (``{"op": "resync"}`` then every session),
counted in the figures. With ``nf_conntrack_events`` = 2 the kernel gives
a session its event extension only if someone listened when it was created,
so ``prepare`` switches the namespace to 1 when the state service starts and
the sessions older than that are re-read at the switchover rather than
trusted to report changes.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import ipaddress
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any, ClassVar

from oslo_config import cfg

from vmm_kernel.netns import entered
from vmm_orchestrator.statekind import ImportResult, KindContext, PoisonedEntry, Reason
from vmm_state.bundle import Line
from vmm_state.kinds import _ctnetlink as ctnl
from vmm_state.kinds._common import BaseKind, max_entries_opt, no_gc, reason_for, remaining
from vmm_state.kinds._cttrack import Tracker, key_of

LOG = logging.getLogger(__name__)

FAMILIES: dict[str, int] = {"ipv4": socket.AF_INET, "ipv6": socket.AF_INET6}
FAMILY_NAMES: dict[int, str] = {v: k for k, v in FAMILIES.items()}
PROTOCOLS = {v: k for k, v in ctnl.PROTOCOL_NAMES.items()}
#: Protocols the kernel tracks for a VM that this kind leaves out on purpose:
#: IGMP (membership reports; the membership itself moves with the mdb kind).
EXPECTED_UNSUPPORTED = frozenset({socket.IPPROTO_IGMP})


def _canonical(addresses: set[str]) -> set[str]:
    return set(_canonical_cached(frozenset(addresses)))


@functools.lru_cache(maxsize=64)
def _canonical_cached(addresses: frozenset[str]) -> frozenset[str]:
    return frozenset(str(ipaddress.ip_address(a)) for a in addresses)


def owned(orig: ctnl.Tuple, reply: ctnl.Tuple, addresses: set[str] | frozenset[str]) -> bool:
    """The VM started (orig.src) or answers (reply.src) this connection."""
    return orig.src in addresses or reply.src in addresses


def other_ends(orig: ctnl.Tuple, reply: ctnl.Tuple, addresses: set[str]) -> set[str]:
    """The addresses of a session's other end(s): those of its tuples that are not
    the VM's (with NAT, the peer's own and the translated one)."""
    return {orig.src, orig.dst, reply.src, reply.dst} - addresses


_STATUS_LISTS = {
    bits: tuple(name for bit, name in ctnl.STATUS_NAMES.items() if bits & bit)
    for bits in range(ctnl.SETTABLE_STATUS + 1)
}


def to_entry(conn: ctnl.Conn) -> dict[str, Any]:
    """The JSON form of a kernel entry."""
    entry: dict[str, Any] = {
        "family": FAMILY_NAMES[conn.orig.family],
        "proto": ctnl.PROTOCOL_NAMES[conn.orig.proto],
        "orig": conn.orig.to_dict(),
        "reply": conn.reply.to_dict(),
        "timeout": max(0, conn.timeout),
        "status": list(_STATUS_LISTS[conn.status & ctnl.SETTABLE_STATUS]),
    }
    if conn.orig.proto == ctnl.IPPROTO_TCP and conn.tcp_state is not None:
        entry["tcp"] = {
            "state": ctnl.TCP_STATES[conn.tcp_state]
            if conn.tcp_state < len(ctnl.TCP_STATES)
            else str(conn.tcp_state),
            "wscale_orig": conn.tcp_wscale_orig or 0,
            "wscale_reply": conn.tcp_wscale_reply or 0,
            "flags_orig": conn.tcp_flags_orig or 0,
            "flags_reply": conn.tcp_flags_reply or 0,
        }
    if conn.mark:
        entry["mark"] = conn.mark
    if conn.zone:
        entry["zone"] = conn.zone
    if conn.labels and any(conn.labels):
        entry["labels"] = conn.labels.hex()
    if conn.helper:
        entry["helper"] = conn.helper
    return entry


def fast_entry(f: tuple[Any, ...], osrc: str, odst: str, rsrc: str, rdst: str) -> dict[str, Any]:
    """The JSON form of a plain TCP entry from ``_ctnetlink.unpack_tcp``'s
    fields ``f`` and its addresses as text."""
    state = f[14]
    entry: dict[str, Any] = {
        "family": FAMILY_NAMES[f[0]],
        "proto": "tcp",
        "orig": {"src": osrc, "dst": odst, "sport": f[3], "dport": f[4]},
        "reply": {"src": rsrc, "dst": rdst, "sport": f[8], "dport": f[9]},
        "timeout": f[10],
        "status": list(_STATUS_LISTS[f[11] & ctnl.SETTABLE_STATUS]),
        "tcp": {
            "state": ctnl.TCP_STATES[state] if state < len(ctnl.TCP_STATES) else str(state),
            "wscale_orig": f[15],
            "wscale_reply": f[16],
            "flags_orig": f[17],
            "flags_reply": f[18],
        },
    }
    if f[12]:
        entry["mark"] = f[12]
    return entry


_LINE = (
    '{"family":"%s","proto":"tcp","orig":{"src":"%s","dst":"%s","sport":%d,"dport":%d},'
    '"reply":{"src":"%s","dst":"%s","sport":%d,"dport":%d},"timeout":%d,"status":%s,'
    '"tcp":{"state":%s,"wscale_orig":%d,"wscale_reply":%d,"flags_orig":%d,"flags_reply":%d}'
)
_STATUS_JSON = {
    bits: json.dumps(list(names), separators=(",", ":")) for bits, names in _STATUS_LISTS.items()
}
_STATE_JSON = [json.dumps(name) for name in ctnl.TCP_STATES]


def fast_line(f: tuple[Any, ...], osrc: str, odst: str, rsrc: str, rdst: str) -> Line:
    """``fast_entry`` already encoded, byte for byte what the bundle writer
    makes of it: one format call instead of a dict tree and its encoding
    (a third of the pre-copy's export time at 100,000 sessions). Every text
    in it is an address from inet_ntop or a fixed name: nothing to escape."""
    state = f[14]
    text = _LINE % (
        FAMILY_NAMES[f[0]],
        osrc,
        odst,
        f[3],
        f[4],
        rsrc,
        rdst,
        f[8],
        f[9],
        f[10],
        _STATUS_JSON[f[11] & ctnl.SETTABLE_STATUS],
        _STATE_JSON[state] if state < len(_STATE_JSON) else json.dumps(str(state)),
        f[15],
        f[16],
        f[17],
        f[18],
    )
    if f[12]:
        text += f',"mark":{f[12]:d}}}\n'
    else:
        text += "}\n"
    return Line(text.encode("ascii"))


def _int(value: Any, top: int, what: str) -> int:
    if value.__class__ is not int or not 0 <= value <= top:
        raise ValueError(f"{what} must be an integer from 0 to {top}, got {value!r}")
    return int(value)


_STATUS_BITS = {v: k for k, v in ctnl.STATUS_NAMES.items()}
#: status lists as exported (and their permutations) -> bits, for the common case
_STATUS_OF = {
    (): 0,
    ("SEEN_REPLY",): ctnl.IPS_SEEN_REPLY,
    ("ASSURED",): ctnl.IPS_ASSURED,
    ("SEEN_REPLY", "ASSURED"): ctnl.IPS_SEEN_REPLY | ctnl.IPS_ASSURED,
    ("ASSURED", "SEEN_REPLY"): ctnl.IPS_SEEN_REPLY | ctnl.IPS_ASSURED,
}
_TCP_STATE_INDEX = {name: i for i, name in enumerate(ctnl.TCP_STATES)}
_OPS = frozenset({"set", "delete"})
#: Where ``check`` leaves the parsed entry for ``import_`` (a key no JSON
#: entry can hold as a Conn: check always overwrites it, import only trusts a Conn).
PARSED = "\0conn"


def _tuple(family: int, proto: int, data: Any) -> ctnl.Tuple:
    if data.__class__ is not dict:
        raise ValueError("a conntrack tuple must be an object")
    try:
        src = ctnl.canonical_ip(family, data["src"])
        dst = ctnl.canonical_ip(family, data["dst"])
        if proto in ctnl.PORT_PROTOCOLS:
            sport, dport = data["sport"], data["dport"]
            if sport.__class__ is not int or dport.__class__ is not int:
                raise ValueError(f"ports must be integers, got {sport!r}, {dport!r}")
            if not (0 <= sport <= 0xFFFF and 0 <= dport <= 0xFFFF):
                raise ValueError(f"ports out of range: {sport}, {dport}")
            return ctnl.Tuple(family, proto, src, dst, sport, dport)
    except KeyError as exc:
        raise ValueError(f"tuple lacks {exc}") from None
    return ctnl.Tuple.from_dict(family, proto, data)


def from_entry(entry: dict[str, Any]) -> ctnl.Conn:
    """Parse and validate an entry (ValueError if malformed)."""
    if entry.__class__ is not dict:
        raise ValueError(f"an entry must be an object, got {type(entry).__name__}")
    try:
        family = FAMILIES[entry["family"]]
        proto = PROTOCOLS[entry["proto"]]
        o, r = entry["orig"], entry["reply"]
        orig = _tuple(family, proto, o)
        if (
            r.__class__ is dict
            and proto in ctnl.PORT_PROTOCOLS
            and r.get("src") == o["dst"]
            and r.get("dst") == o["src"]
        ):  # the mirror image (no NAT): its addresses are already checked
            sport, dport = r["sport"], r["dport"]
            if sport.__class__ is not int or dport.__class__ is not int:
                raise ValueError(f"ports must be integers, got {sport!r}, {dport!r}")
            if not (0 <= sport <= 0xFFFF and 0 <= dport <= 0xFFFF):
                raise ValueError(f"ports out of range: {sport}, {dport}")
            reply = ctnl.Tuple(family, proto, orig.dst, orig.src, sport, dport)
        else:
            reply = _tuple(family, proto, r)
        timeout = entry["timeout"]
    except KeyError as exc:
        raise ValueError(f"entry lacks or has an unknown {exc}: {str(entry)[:200]}") from None
    except TypeError:
        raise ValueError(f"malformed entry {str(entry)[:200]}") from None
    if proto == ctnl.IPPROTO_ICMP and family != socket.AF_INET:
        raise ValueError("icmp needs ipv4")
    if proto == ctnl.IPPROTO_ICMPV6 and family != socket.AF_INET6:
        raise ValueError("icmpv6 needs ipv6")
    if timeout.__class__ not in (int, float) or timeout < 0:
        raise ValueError(f"timeout must be seconds >= 0, got {timeout!r}")
    names = entry.get("status", ())
    try:
        status = _STATUS_OF.get(tuple(names)) if names.__class__ is list else None
    except TypeError:  # an unhashable item: the loop below names it
        status = None
    if status is None:
        status = 0
        for name in names:
            bit = _STATUS_BITS.get(name) if isinstance(name, str) else None
            if bit is None:
                raise ValueError(f"status {name!r} cannot be set (only {sorted(_STATUS_BITS)})")
            status |= bit
    conn = ctnl.Conn(orig, reply, int(timeout), status)
    if "mark" in entry:
        conn.mark = _int(entry["mark"], 0xFFFFFFFF, "mark")
    if "zone" in entry:
        conn.zone = _int(entry["zone"], 0xFFFF, "zone")
    labels = entry.get("labels")
    if labels:
        if not isinstance(labels, str) or len(labels) > 32:
            raise ValueError("labels must be at most 16 bytes in hex")
        try:
            conn.labels = bytes.fromhex(labels)
        except ValueError:
            raise ValueError(f"labels are not hex: {labels!r}") from None
    helper = entry.get("helper")
    if helper:
        if not isinstance(helper, str) or len(helper) > 15 or not helper.isascii():
            raise ValueError(f"bad helper name {helper!r}")
        conn.helper = helper
    tcp = entry.get("tcp")
    if proto == ctnl.IPPROTO_TCP:
        state = _TCP_STATE_INDEX.get(tcp.get("state")) if tcp.__class__ is dict else None
        if state is None:
            raise ValueError(f"a TCP entry needs tcp.state in {ctnl.TCP_STATES}")
        conn.tcp_state = state
        wso, wsr = tcp.get("wscale_orig", 0), tcp.get("wscale_reply", 0)
        fo, fr = tcp.get("flags_orig", 0), tcp.get("flags_reply", 0)
        if (
            wso.__class__ is not int
            or wsr.__class__ is not int
            or fo.__class__ is not int
            or fr.__class__ is not int
            or not (0 <= wso <= 14 and 0 <= wsr <= 14 and 0 <= fo <= 0xFF and 0 <= fr <= 0xFF)
        ):
            _int(wso, 14, "wscale")
            _int(wsr, 14, "wscale")
            _int(fo, 0xFF, "tcp flags")
            _int(fr, 0xFF, "tcp flags")
        conn.tcp_wscale_orig, conn.tcp_wscale_reply = wso, wsr
        conn.tcp_flags_orig, conn.tcp_flags_reply = fo, fr
    elif tcp is not None:
        raise ValueError("only TCP entries carry tcp state")
    return conn


def deletion(conn: ctnl.Conn) -> dict[str, Any]:
    """The delta entry that says a session is gone: its tuples and zone."""
    entry: dict[str, Any] = {
        "op": "delete",
        "family": FAMILY_NAMES[conn.orig.family],
        "proto": ctnl.PROTOCOL_NAMES[conn.orig.proto],
        "orig": conn.orig.to_dict(),
        "reply": conn.reply.to_dict(),
    }
    if conn.zone:
        entry["zone"] = conn.zone
    return entry


def from_deletion(entry: dict[str, Any]) -> ctnl.Conn:
    """Parse a deletion (ValueError if malformed): tuples and zone are all it needs."""
    if entry.__class__ is not dict:
        raise ValueError(f"an entry must be an object, got {type(entry).__name__}")
    try:
        family = FAMILIES[entry["family"]]
        proto = PROTOCOLS[entry["proto"]]
        conn = ctnl.Conn(
            _tuple(family, proto, entry["orig"]), _tuple(family, proto, entry["reply"])
        )
    except KeyError as exc:
        raise ValueError(f"deletion lacks or has an unknown {exc}: {str(entry)[:200]}") from None
    except TypeError:
        raise ValueError(f"malformed deletion {str(entry)[:200]}") from None
    if "zone" in entry:
        conn.zone = _int(entry["zone"], 0xFFFF, "zone")
    return conn


def parsed(entry: dict[str, Any]) -> ctnl.Conn:
    """The entry's Conn: the one ``check`` parsed, else parsed now."""
    conn = entry.get(PARSED)
    if conn.__class__ is ctnl.Conn:
        return conn  # type: ignore[no-any-return]
    if entry.get("op") == "delete":
        return from_deletion(entry)
    return from_entry(entry)


def _key(t: ctnl.Tuple, zone: int) -> list[Any]:
    """A compact, JSON-able name of an entry: enough to find and delete it."""
    if t.proto in ctnl.ICMP_PROTOCOLS:
        return [int(t.family), t.proto, t.src, t.dst, t.icmp_id, t.icmp_type, t.icmp_code, zone]
    return [int(t.family), t.proto, t.src, t.dst, t.sport, t.dport, 0, zone]


def _from_key(key: list[Any]) -> ctnl.Conn:
    family, proto, src, dst, a, b, c, zone = key
    if proto in ctnl.ICMP_PROTOCOLS:
        t = ctnl.Tuple(family, proto, src, dst, icmp_id=a, icmp_type=b, icmp_code=c)
    else:
        t = ctnl.Tuple(family, proto, src, dst, sport=a, dport=b)
    return ctnl.Conn(t, t.inverse(), zone=zone)


def _conn_of(key: tuple[Any, ...]) -> ctnl.Conn:
    """A Conn that names the entry ``key_of`` describes (enough to delete it)."""
    family, proto, src, dst, sport, dport, icmp_id, icmp_type, icmp_code, zone = key
    t = ctnl.Tuple(family, proto, src, dst, sport, dport, icmp_id, icmp_type, icmp_code)
    return ctnl.Conn(t, t.inverse(), zone=zone)


EVENTS_SYSCTL = "/proc/sys/net/netfilter/nf_conntrack_events"


def _events_sysctl(netns: str | None, value: int | None = None) -> int:
    """Read (or set) ``net.netfilter.nf_conntrack_events`` of ``netns``."""
    with entered(netns):
        if value is not None:
            with open(EVENTS_SYSCTL, "w") as fh:
                fh.write(f"{value}\n")
        with open(EVENTS_SYSCTL) as fh:
            return int(fh.read().strip() or 0)


class ConntrackKind(BaseKind):
    """Sessions of the host's stateful firewall (the namespace's conntrack table)."""

    name = "conntrack"
    settles = True
    default_max_entries = 262144
    opts: ClassVar[list[cfg.Opt]] = [
        max_entries_opt(262144, "conntrack entries (sessions)"),
        cfg.BoolOpt(
            "be_liberal",
            default=True,
            help="Mark imported TCP sessions be-liberal (IP_CT_TCP_FLAG_BE_LIBERAL in both "
            "directions): an injected entry lacks the window data the kernel learnt from "
            "the packets it saw, and without the flag it may judge the first packets after "
            "the move invalid. Only the imported entries are relaxed, not the host.",
        ),
        cfg.StrOpt(
            "nat_sessions",
            default="skip",
            choices=[
                ("skip", "install the VM's other sessions and leave NAT bindings out"),
                ("fail", "answer FAIL/unsupported if any session is NATed"),
            ],
            help="What to do with sessions whose reply tuple is rewritten (NAT): their "
            "mapping belongs to the source host's NAT configuration.",
        ),
        cfg.IntOpt(
            "refresh_below",
            default=300,
            min=0,
            help="Source: a session whose remaining timeout was under this many seconds "
            "at the pre-copy (or at its last event) is read again at the switchover and "
            "sent with its current timeout: packets refresh timeouts without raising "
            "events, and a short one could otherwise run out at the destination.",
        ),
        cfg.BoolOpt(
            "enable_events",
            default=True,
            help="Source: set net.netfilter.nf_conntrack_events to 1 in the host's "
            "namespace when the state service starts, so that every new session reports "
            "its changes (with the default 2 a session created while nobody listened "
            "never does). Sessions older than that are re-read at the switchover.",
        ),
        cfg.IntOpt(
            "track_seconds",
            default=3600,
            min=1,
            help="Source: longest a migration's conntrack events are followed; a "
            "migration that neither completes nor aborts by then gets a full resync "
            "at its switchover.",
        ),
    ]

    def __init__(self, conf: cfg.ConfigOpts) -> None:
        super().__init__(conf)
        self._lock = threading.Lock()
        #: source: migration -> its change tracker
        self._trackers: dict[str, Tracker] = {}
        #: source: migration -> figures of its newest export
        self._figures: dict[str, dict[str, Any]] = {}
        #: destination: migration -> names (key_of) of the entries its imports installed
        self._ours: dict[str, set[Any]] = {}
        self._checking: tuple[KindContext, frozenset[str]] | None = None
        #: namespace -> ids of the sessions that existed when events were switched on
        self._legacy: dict[str | None, frozenset[int]] = {}

    def unavailable(self, ctx: KindContext) -> str | None:
        try:
            with ctnl.ctnetlink(ctx.netns) as nl:
                nl.counts()
        except OSError as exc:
            return f"conntrack is not available in {ctx.netns or 'this namespace'}: {exc}"
        return None

    # -- tracking (source) ---------------------------------------------------

    def prepare(self, netns: str | None) -> None:
        """Make the kernel keep change events for every session from now on.

        With ``net.netfilter.nf_conntrack_events`` = 2 (the default, "auto")
        a session gets the kernel's event extension only if someone listened
        when it was created, and a session without it never reports an update
        or its end. So the namespace is switched to 1, and the sessions that
        exist at that moment (which may lack the extension) are remembered by
        id: a tracker re-reads those of a migrating VM at the switchover
        instead of trusting events for them. Setting the sysctl at boot
        (sysctl.d) makes that list empty.
        """
        if not self.conf[self.group].enable_events:
            return
        with self._lock:
            if netns in self._legacy:
                return
        was = _events_sysctl(netns)
        legacy: frozenset[int] = frozenset()
        if was != 1:
            _events_sysctl(netns, 1)
            time.sleep(0.05)  # sessions in flight at the switch get confirmed
            with ctnl.ctnetlink(netns) as nl:
                legacy = frozenset(c.id for c in nl.iter_dump())
            LOG.info(
                "conntrack: net.netfilter.nf_conntrack_events was %s in %s, now 1; %d "
                "older session(s) will be re-read rather than trusted to report changes",
                was,
                netns or "this namespace",
                len(legacy),
            )
        with self._lock:
            self._legacy[netns] = legacy

    def track(self, ctx: KindContext) -> None:
        """Subscribe to the VM's conntrack events (before the pre-copy's dump)."""
        group = self.conf[self.group]
        if group.enable_events and _events_sysctl(ctx.netns) != 1:
            with self._lock:
                self._legacy.pop(ctx.netns, None)
            self.prepare(ctx.netns)
        tracker = Tracker(
            ctx.netns, _canonical(ctx.addresses), group.refresh_below, group.track_seconds
        )
        with self._lock:
            tracker.legacy = self._legacy.get(ctx.netns, frozenset())
        with self._lock:
            old = self._trackers.pop(ctx.migration_id, None)
            self._trackers[ctx.migration_id] = tracker
        if old is not None:
            old.stop()

    def untrack(self, migration_id: str) -> None:
        with self._lock:
            tracker = self._trackers.pop(migration_id, None)
            self._figures.pop(migration_id, None)
        if tracker is not None:
            tracker.stop()

    def delta_figures(self, migration_id: str) -> dict[str, Any]:
        with self._lock:
            return dict(self._figures.get(migration_id, {}))

    def settle(self, migration_id: str, upto: float | None) -> int:
        """The destination holds an export of the migration that began at ``upto``
        (time.monotonic() here): the tracker forgets the changes it already has,
        so the next delta carries only what changed since (``Tracker.settle``).
        ``upto`` None: the destination lost changes settled before (it reverted
        a transfer): the next delta is a resync."""
        with self._lock:
            tracker = self._trackers.get(migration_id)
        if tracker is None:
            return 0
        if upto is None:
            tracker.unsettle()
            return 0
        return tracker.settle(upto)

    # -- export ------------------------------------------------------------

    def _dump_owned(self, netns: str | None, addresses: set[str]) -> list[ctnl.Conn]:
        with ctnl.ctnetlink(netns) as nl:
            return nl.dump(lambda o, r: owned(o, r, addresses), addresses=addresses)

    def export(self, ctx: KindContext, since: float | None = None) -> Iterator[dict[str, Any]]:
        return self._export(ctx, since, encoded=False)  # type: ignore[return-value]

    def export_encoded(
        self, ctx: KindContext, since: float | None = None
    ) -> Iterator[dict[str, Any] | Line]:
        """``export`` for the bundle writer: the plain TCP sessions of a full
        export come already encoded (:func:`fast_line`), the others as dicts."""
        return self._export(ctx, since, encoded=True)

    def _export(
        self, ctx: KindContext, since: float | None, encoded: bool
    ) -> Iterator[dict[str, Any] | Line]:
        """Every session of the VM with its remaining timeout; or, for a delta
        (``since``) of a tracked migration, only the sessions created, changed
        or destroyed since the pre-copy (see :mod:`._cttrack`).

        Without tracking, or when an event was lost, a delta is a resync: a
        first entry ``{"op": "resync"}`` and then every session.
        """
        with self._lock:
            tracker = self._trackers.get(ctx.migration_id)
        if since is not None and tracker is not None:
            delta = tracker.delta()
            if delta is not None:
                changed, destroyed, figures = delta
                self._note(
                    ctx.migration_id,
                    mode="delta",
                    changed=len(changed),
                    destroyed=len(destroyed),
                    **figures,
                )
                for conn in changed:
                    if conn.orig.proto in ctnl.SUPPORTED_PROTOCOLS:
                        yield to_entry(conn)
                for conn in destroyed:
                    if conn.orig.proto in ctnl.SUPPORTED_PROTOCOLS:
                        yield deletion(conn)
                return
            LOG.warning(
                "conntrack: %d event loss(es) while tracking %s, or its destination lost "
                "changes settled before; sending a full resync",
                tracker.lost,
                ctx.migration_id,
            )
        lost = tracker.lost if tracker is not None else 0
        if since is not None:
            yield {"op": "resync"}
        # Streamed as the dump is read, not collected first: the bundle's bytes
        # reach the destination (which parses them as they come) while this
        # host still dumps; the tracker is told once the dump is complete.
        noted: list[ctnl.Conn] = []
        count = 0
        with no_gc():
            for entry in self._iter_all(ctx.netns, _canonical(ctx.addresses), noted, encoded):
                count += 1
                yield entry
        if since is None:
            if tracker is not None:
                tracker.note_export(noted)
            self._note(ctx.migration_id, mode="full", entries=count)
        else:
            self._note(ctx.migration_id, mode="resync", entries=count, lost_events=lost)

    #: Dumped TCP entries decode straight into their JSON form (False: through Conn).
    FAST_EXPORT = True

    def _export_all(
        self, netns: str | None, addresses: set[str]
    ) -> tuple[list[dict[str, Any]], list[ctnl.Conn]]:
        """The VM's entries in JSON form, and (as Conn) those a tracker must
        look at (see ``_iter_all``)."""
        noted: list[ctnl.Conn] = []
        entries = list(self._iter_all(netns, addresses, noted))
        return entries, noted  # type: ignore[return-value]

    def _iter_all(
        self,
        netns: str | None,
        addresses: set[str],
        noted: list[ctnl.Conn],
        encoded: bool = False,
    ) -> Iterator[dict[str, Any] | Line]:
        """The VM's entries in JSON form as the dump is read; appends to
        ``noted`` (as Conn) those a tracker must look at: short timeouts,
        sessions older than the event switch (see ``Tracker.note_export``);
        every session when decoded the general way.

        The usual TCP entry goes from the kernel's bytes to its JSON form with
        one struct call and no intermediate objects (``_ctnetlink.unpack_tcp``):
        the pre-copy's export is a hundred thousand of them.
        """
        raw = {
            socket.inet_pton(socket.AF_INET6 if ":" in a else socket.AF_INET, a) for a in addresses
        }
        refresh = self.conf[self.group].refresh_below
        with self._lock:
            legacy = self._legacy.get(netns, frozenset())
        keep = lambda o, r: owned(o, r, addresses)  # noqa: E731
        ntop = socket.inet_ntop
        make = fast_line if encoded else fast_entry
        with ctnl.ctnetlink(netns) as nl:
            for data, start, end in nl.iter_raw():
                fast = ctnl.unpack_tcp(data, start, end) if self.FAST_EXPORT else None
                if (
                    fast is not None
                    and fast[0][5] == ctnl.IPPROTO_TCP
                    and ctnl.plain_rest(data, fast[1], end)
                ):
                    f = fast[0]
                    if f[1] not in raw and f[6] not in raw:  # neither started nor answers
                        continue
                    fam = f[0]
                    osrc, odst = ntop(fam, f[1]), ntop(fam, f[2])
                    rsrc = odst if f[6] == f[2] else ntop(fam, f[6])
                    rdst = osrc if f[7] == f[1] else ntop(fam, f[7])
                    entry = make(f, osrc, odst, rsrc, rdst)
                    if f[10] < refresh or (legacy and f[13] in legacy):
                        conn = ctnl.parse_conn(data, start, end)
                        if conn is not None:
                            noted.append(conn)
                    yield entry
                    continue
                conn = ctnl.parse_conn(data, start, end, raw, keep)
                if conn is None:
                    continue
                noted.append(conn)
                if conn.orig.proto not in ctnl.SUPPORTED_PROTOCOLS:
                    expected = conn.orig.proto in EXPECTED_UNSUPPORTED
                    LOG.log(
                        logging.DEBUG if expected else logging.WARNING,
                        "conntrack: %s session not exported (protocol)",
                        conn.orig,
                    )
                    continue
                yield to_entry(conn)

    def _note(self, migration_id: str, **figures: Any) -> None:
        with self._lock:
            self._figures[migration_id] = figures

    # -- check -------------------------------------------------------------

    #: ``check`` reads nothing but the entry and the VM's addresses: the
    #: destination may run it while the bundle still arrives (see
    #: ``Importer.early_check``).
    CHECK_EARLY = True

    def check(self, ctx: KindContext, entry: dict[str, Any]) -> None:
        op = entry.get("op", "set") if entry.__class__ is dict else "set"
        if op == "resync":
            extra = set(entry) - {"op", "age"}
            if extra:
                raise ValueError(f"a resync marker carries nothing else, got {sorted(extra)}")
            return
        if op not in _OPS:
            raise ValueError(f"unknown conntrack entry op {op!r}")
        conn = from_deletion(entry) if op == "delete" else from_entry(entry)
        memo = self._checking
        if memo is None or memo[0] is not ctx:  # the same context for a whole bundle
            memo = self._checking = (ctx, _canonical_cached(frozenset(ctx.addresses)))
        if not owned(conn.orig, conn.reply, memo[1]):
            raise PoisonedEntry(
                f"session {conn.orig.src} -> {conn.orig.dst} (reply from {conn.reply.src}) "
                "is not one the VM starts or answers"
            )
        entry[PARSED] = conn

    # -- import ------------------------------------------------------------

    def import_(self, ctx: KindContext, entries: list[dict[str, Any]]) -> ImportResult:
        with no_gc():
            return self._import(ctx, entries)

    def _import(self, ctx: KindContext, entries: list[dict[str, Any]]) -> ImportResult:
        refused = self.too_many(len(entries))
        if refused:
            return refused
        resync = bool(entries) and entries[0].get("op") == "resync"
        if resync:
            entries = entries[1:]
        wanted: list[ctnl.Conn] = []
        doomed: list[ctnl.Conn] = []
        nat = expired = 0
        liberal = self.conf[self.group].be_liberal
        try:
            for entry in entries:
                conn = parsed(entry)
                entry.pop(PARSED, None)
                if entry.get("op", "set") == "delete":
                    doomed.append(conn)
                    continue
                if conn.nat:
                    nat += 1
                    continue
                conn.timeout = remaining(entry["timeout"], entry)
                if conn.timeout <= 0:
                    expired += 1
                    continue
                if liberal and conn.orig.proto == ctnl.IPPROTO_TCP:
                    conn.tcp_flags_orig = (conn.tcp_flags_orig or 0) | ctnl.TCP_FLAG_BE_LIBERAL
                    conn.tcp_flags_reply = (conn.tcp_flags_reply or 0) | ctnl.TCP_FLAG_BE_LIBERAL
                wanted.append(conn)
        except ValueError as exc:
            return ImportResult.fail(self.name, Reason.UNSUPPORTED, f"malformed entry: {exc}")
        if nat and self.conf[self.group].nat_sessions == "fail":
            return ImportResult.fail(
                self.name, Reason.UNSUPPORTED, f"{nat} NATed session(s) cannot be installed"
            )
        with self._lock:  # read only until the install is done (imports run one at a time)
            ours = self._ours.get(ctx.migration_id) or set()
        keys = [key_of(c) for c in wanted]
        if resync:  # whatever we installed before and the source no longer has
            doomed += [_conn_of(k) for k in ours.difference(keys)]
        try:
            with ctnl.ctnetlink(ctx.netns) as nl:
                used, top = nl.counts()
                fresh = len(keys) - len(ours.intersection(keys)) if ours else len(keys)
                if used + fresh > top:
                    return ImportResult.fail(
                        self.name,
                        Reason.RESOURCE_LIMIT,
                        f"the conntrack table holds {used} of {top}; {fresh} more do not fit",
                    )
                result = self._install(nl, wanted, keys, doomed, ours, nat, expired)
        except OSError as exc:
            code = exc.errno or errno.EIO
            return ImportResult.fail(self.name, reason_for(code), f"conntrack: {exc}")
        if result.ok:
            with self._lock:
                mine = self._ours.setdefault(ctx.migration_id, set())
                mine.update(keys)
                mine.difference_update(key_of(c) for c in doomed)
        return result

    def _install(
        self,
        nl: ctnl.Ctnetlink,
        wanted: list[ctnl.Conn],
        keys: list[Any],
        doomed: list[ctnl.Conn],
        ours: set[Any],
        nat: int,
        expired: int,
    ) -> ImportResult:
        """Replace semantics in one batched pass: sessions an earlier import of
        this migration installed are replaced; others are created, and only
        those the kernel already has (EEXIST) are read back, remembered for
        revert, and replaced. Deletions of sessions not ours are read first
        for the same reason."""
        before: dict[Any, ctnl.Conn] = {}
        strangers = [c for c in doomed if key_of(c) not in ours]
        if strangers:
            for conn in nl.get_many(strangers):
                if conn is not None:
                    before[key_of(conn)] = conn
        if ours:
            ops = [
                ("replace" if k in ours else "create", c) for k, c in zip(keys, wanted, strict=True)
            ]
        else:
            ops = [("create", c) for c in wanted]
        created: list[ctnl.Conn] = []
        try:
            codes = nl.apply(ops)
            raced = [i for i, code in enumerate(codes) if code == errno.EEXIST]
            if raced:  # the host already had these: keep their old values for revert
                for conn in nl.get_many([wanted[i] for i in raced]):
                    if conn is not None:
                        before[key_of(conn)] = conn
                retry = nl.apply([("replace", wanted[i]) for i in raced])
                for i, code in zip(raced, retry, strict=True):
                    ops[i] = ("replace", wanted[i])
                    codes[i] = code
            created = [
                c for (op, c), code in zip(ops, codes, strict=True) if not code and op == "create"
            ]
            failed = [i for i, code in enumerate(codes) if code]
            gone = nl.apply([("delete", c) for c in doomed]) if doomed and not failed else []
        except OSError:
            # The socket failed midway (not a refusal): we cannot tell which
            # requests the kernel applied, so undo every one it may have.
            fresh = [
                c for k, c in zip(keys, wanted, strict=True) if k not in ours and k not in before
            ]
            with contextlib.suppress(OSError):
                self._undo(nl, fresh, list(before.values()))
            raise
        replaced = (
            [
                before[k]
                for k, (op, _c), code in zip(keys, ops, codes, strict=True)
                if op == "replace" and not code and k in before
            ]
            if before
            else []
        )
        if failed:
            self._undo(nl, created, replaced)
            first = failed[0]
            code = codes[first]
            return ImportResult.fail(
                self.name,
                reason_for(code),
                f"the kernel refused {len(failed)} of {len(wanted)} session(s); first: "
                f"{to_entry(wanted[first])['orig']} ({os.strerror(code)}); nothing was kept",
            )
        bad = [code for code in gone if code not in (0, errno.ENOENT)]
        if bad:
            self._undo(nl, created, replaced)
            return ImportResult.fail(
                self.name,
                reason_for(bad[0]),
                f"the kernel refused to delete {len(bad)} session(s) ({os.strerror(bad[0])})",
            )
        labelled = [c for c in wanted if c.labels and any(c.labels)]
        lost = self._labels_lost(nl, labelled)
        if lost:
            self._undo(nl, created, replaced)
            return ImportResult.fail(
                self.name,
                Reason.UNSUPPORTED,
                f"{lost} session(s) carry conntrack labels this host does not keep (no "
                "ct label rule here, so the kernel has no label storage); nothing was kept",
            )
        detail = []
        if nat:
            detail.append(f"{nat} NATed session(s) left out")
        if expired:
            detail.append(f"{expired} expired session(s) left out")
        removed = [before[key_of(c)] for c in doomed if key_of(c) in before]
        record = {
            "created": [_key(c.orig, c.zone) for c in created],
            "replaced": [to_entry(c) for c in replaced + removed],
            "at": time.time(),
        }
        installed = sum(1 for code in codes if not code)
        result = ImportResult.success(self.name, installed, record)
        if doomed:
            detail.append(f"{sum(1 for c in gone if c == 0)} session(s) deleted")
        result.detail = "; ".join(detail)
        return result

    #: How many labelled sessions are read back to see whether labels stuck
    #: (label storage is per namespace: one tells, a few make sure).
    LABEL_PROBES = 16

    def _labels_lost(self, nl: ctnl.Ctnetlink, labelled: list[ctnl.Conn]) -> int:
        """How many of (a sample of) ``labelled`` the kernel stored without their labels.

        Measured on 6.18: a namespace where no rule uses ``ct label`` has no
        label storage, and the kernel then accepts CTA_LABELS and drops them
        silently. Labels are policy (rules match on them), so a session that
        lost them is a refusal, not a success.
        """
        if not labelled:
            return 0
        sample = labelled[: self.LABEL_PROBES]
        have = nl.get_many(sample)
        lost = sum(
            1
            for want, got in zip(sample, have, strict=True)
            if got is None or got.labels.rstrip(b"\0") != want.labels.rstrip(b"\0")
        )
        return len(labelled) if lost else 0

    @staticmethod
    def _undo(nl: ctnl.Ctnetlink, created: list[ctnl.Conn], replaced: list[ctnl.Conn]) -> None:
        nl.delete(created)
        if replaced:
            nl.apply([("replace", c) for c in replaced])

    # -- revert and cleanup ---------------------------------------------------

    def revert_import(self, ctx: KindContext, record: dict[str, Any]) -> None:
        """Delete the sessions the import created; put back those it replaced or
        deleted that were not an earlier import's of this migration (that import's
        own revert removes those)."""
        created = [_from_key(k) for k in record.get("created", [])]
        elapsed = max(0.0, time.time() - float(record.get("at", time.time())))
        replaced = []
        for entry in record.get("replaced", []):
            conn = from_entry(entry)
            conn.timeout = remaining(conn.timeout, {"age": elapsed})
            if conn.timeout > 0:  # an old session that would have expired by now stays gone
                replaced.append(conn)
        with self._lock:
            self._ours.pop(ctx.migration_id, None)
        with ctnl.ctnetlink(ctx.netns) as nl:
            self._undo(nl, created, replaced)

    def forget(self, migration_id: str) -> None:
        with self._lock:
            self._ours.pop(migration_id, None)

    def cleanup_source(self, ctx: KindContext) -> None:
        """Delete the VM's sessions from the source's table, except those with an
        endpoint still on this host (``ctx.keep_addresses``).

        Such a peer's packets to and from the VM's new host still cross this
        host's firewall, which would drop the next one as new mid-stream
        without the session; it ends or expires here on its own. When the
        host could not tell which endpoints remain (None), nothing is deleted.
        """
        if ctx.keep_addresses is None:
            LOG.info(
                "conntrack: the endpoints left on this host are unknown; every session of "
                "the departed VM is kept (each ends or expires on its own)"
            )
            return
        mine = _canonical(ctx.addresses)
        keep = _canonical(set(ctx.keep_addresses)) - mine
        with ctnl.ctnetlink(ctx.netns) as nl:
            conns = nl.dump(lambda o, r: owned(o, r, mine), addresses=mine)
            doomed = [c for c in conns if not other_ends(c.orig, c.reply, mine) & keep]
            deleted = nl.delete(doomed)
        LOG.info(
            "conntrack: removed %d session(s) of the departed VM; kept %d with endpoints "
            "still on this host",
            deleted,
            len(conns) - len(doomed),
        )
