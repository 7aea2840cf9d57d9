"""Firewall sessions: the conntrack entries of the VM's connections.

The session table of the host's stateful firewall is its namespace's
conntrack table (see :mod:`vmm_state.firewall`). Without the VM's entries a
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
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import os
import socket
import time
from collections.abc import Iterator
from typing import Any, ClassVar

from oslo_config import cfg

from vmm_state.kind import ImportResult, KindContext, PoisonedEntry, Reason
from vmm_state.kinds import _ctnetlink as ctnl
from vmm_state.kinds._common import BaseKind, max_entries_opt, reason_for, remaining, require

LOG = logging.getLogger(__name__)

FAMILIES: dict[str, int] = {"ipv4": socket.AF_INET, "ipv6": socket.AF_INET6}
FAMILY_NAMES: dict[int, str] = {v: k for k, v in FAMILIES.items()}
PROTOCOLS = {v: k for k, v in ctnl.PROTOCOL_NAMES.items()}
#: Protocols the kernel tracks for a VM that this kind leaves out on purpose:
#: IGMP (membership reports; the membership itself moves with the mdb kind).
EXPECTED_UNSUPPORTED = frozenset({socket.IPPROTO_IGMP})


def _canonical(addresses: set[str]) -> set[str]:
    return {str(ipaddress.ip_address(a)) for a in addresses}


def owned(orig: ctnl.Tuple, reply: ctnl.Tuple, addresses: set[str]) -> bool:
    """The VM started (orig.src) or answers (reply.src) this connection."""
    return orig.src in addresses or reply.src in addresses


def other_ends(orig: ctnl.Tuple, reply: ctnl.Tuple, addresses: set[str]) -> set[str]:
    """The addresses of a session's other end(s): those of its tuples that are not
    the VM's (with NAT, the peer's own and the translated one)."""
    return {orig.src, orig.dst, reply.src, reply.dst} - addresses


def to_entry(conn: ctnl.Conn) -> dict[str, Any]:
    """The JSON form of a kernel entry."""
    entry: dict[str, Any] = {
        "family": FAMILY_NAMES[conn.orig.family],
        "proto": ctnl.PROTOCOL_NAMES[conn.orig.proto],
        "orig": conn.orig.to_dict(),
        "reply": conn.reply.to_dict(),
        "timeout": max(0, conn.timeout),
        "status": [name for bit, name in ctnl.STATUS_NAMES.items() if conn.status & bit],
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


def _int(value: Any, top: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= top:
        raise ValueError(f"{what} must be an integer from 0 to {top}, got {value!r}")
    return value


def from_entry(entry: dict[str, Any]) -> ctnl.Conn:
    """Parse and validate an entry (ValueError if malformed)."""
    require(entry, "family", "proto", "orig", "reply", "timeout")
    family = FAMILIES.get(entry["family"])
    if family is None:
        raise ValueError(f"unknown family {entry['family']!r}")
    proto = PROTOCOLS.get(entry["proto"])
    if proto is None:
        raise ValueError(f"unsupported protocol {entry['proto']!r}")
    if proto == ctnl.IPPROTO_ICMP and family != socket.AF_INET:
        raise ValueError("icmp needs ipv4")
    if proto == ctnl.IPPROTO_ICMPV6 and family != socket.AF_INET6:
        raise ValueError("icmpv6 needs ipv6")
    try:
        orig = ctnl.Tuple.from_dict(family, proto, entry["orig"])
        reply = ctnl.Tuple.from_dict(family, proto, entry["reply"])
    except KeyError as exc:
        raise ValueError(f"tuple lacks {exc}") from None
    timeout = entry["timeout"]
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout < 0:
        raise ValueError(f"timeout must be seconds >= 0, got {timeout!r}")
    status = 0
    names = {v: k for k, v in ctnl.STATUS_NAMES.items()}
    for name in entry.get("status", []):
        if name not in names:
            raise ValueError(f"status {name!r} cannot be set (only {sorted(names)})")
        status |= names[name]
    conn = ctnl.Conn(orig, reply, timeout=int(timeout), status=status)
    conn.mark = _int(entry.get("mark", 0), 0xFFFFFFFF, "mark")
    conn.zone = _int(entry.get("zone", 0), 0xFFFF, "zone")
    labels = entry.get("labels", "")
    if not isinstance(labels, str) or len(labels) > 32:
        raise ValueError("labels must be at most 16 bytes in hex")
    try:
        conn.labels = bytes.fromhex(labels)
    except ValueError:
        raise ValueError(f"labels are not hex: {labels!r}") from None
    helper = entry.get("helper", "")
    if not isinstance(helper, str) or len(helper) > 15 or not helper.isascii():
        raise ValueError(f"bad helper name {helper!r}")
    conn.helper = helper
    tcp = entry.get("tcp")
    if proto == ctnl.IPPROTO_TCP:
        if not isinstance(tcp, dict) or tcp.get("state") not in ctnl.TCP_STATES:
            raise ValueError(f"a TCP entry needs tcp.state in {ctnl.TCP_STATES}")
        conn.tcp_state = ctnl.TCP_STATES.index(tcp["state"])
        conn.tcp_wscale_orig = _int(tcp.get("wscale_orig", 0), 14, "wscale")
        conn.tcp_wscale_reply = _int(tcp.get("wscale_reply", 0), 14, "wscale")
        conn.tcp_flags_orig = _int(tcp.get("flags_orig", 0), 0xFF, "tcp flags")
        conn.tcp_flags_reply = _int(tcp.get("flags_reply", 0), 0xFF, "tcp flags")
    elif tcp is not None:
        raise ValueError("only TCP entries carry tcp state")
    return conn


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


class ConntrackKind(BaseKind):
    """Sessions of the host's stateful firewall (the namespace's conntrack table)."""

    name = "conntrack"
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
    ]

    def unavailable(self, ctx: KindContext) -> str | None:
        try:
            with ctnl.ctnetlink(ctx.netns) as nl:
                nl.counts()
        except OSError as exc:
            return f"conntrack is not available in {ctx.netns or 'this namespace'}: {exc}"
        return None

    # -- export ------------------------------------------------------------

    def _dump_owned(self, netns: str | None, addresses: set[str]) -> list[ctnl.Conn]:
        with ctnl.ctnetlink(netns) as nl:
            return nl.dump(lambda o, r: owned(o, r, addresses), addresses=addresses)

    def export(self, ctx: KindContext, since: float | None = None) -> Iterator[dict[str, Any]]:
        """Every session of the VM, with its remaining timeout.

        conntrack keeps no change time unless timestamps are on, so a delta
        (``since``) is the whole set; import replaces, never duplicates.
        """
        for conn in self._dump_owned(ctx.netns, _canonical(ctx.addresses)):
            if conn.orig.proto not in ctnl.SUPPORTED_PROTOCOLS:
                expected = conn.orig.proto in EXPECTED_UNSUPPORTED
                LOG.log(
                    logging.DEBUG if expected else logging.WARNING,
                    "conntrack: %s session not exported (protocol)",
                    conn.orig,
                )
                continue
            yield to_entry(conn)

    # -- check -------------------------------------------------------------

    def check(self, ctx: KindContext, entry: dict[str, Any]) -> None:
        conn = from_entry(entry)
        if not owned(conn.orig, conn.reply, _canonical(ctx.addresses)):
            raise PoisonedEntry(
                f"session {conn.orig.src} -> {conn.orig.dst} (reply from {conn.reply.src}) "
                "is not one the VM starts or answers"
            )

    # -- import ------------------------------------------------------------

    def import_(self, ctx: KindContext, entries: list[dict[str, Any]]) -> ImportResult:
        refused = self.too_many(len(entries))
        if refused:
            return refused
        try:
            conns = [from_entry(e) for e in entries]
        except ValueError as exc:
            return ImportResult.fail(self.name, Reason.UNSUPPORTED, f"malformed entry: {exc}")
        wanted: list[ctnl.Conn] = []
        nat = expired = 0
        for entry, conn in zip(entries, conns, strict=True):
            if conn.nat:
                nat += 1
                continue
            conn.timeout = remaining(conn.timeout, entry)
            if conn.timeout <= 0:
                expired += 1
                continue
            if self.conf[self.group].be_liberal and conn.orig.proto == ctnl.IPPROTO_TCP:
                conn.tcp_flags_orig = (conn.tcp_flags_orig or 0) | ctnl.TCP_FLAG_BE_LIBERAL
                conn.tcp_flags_reply = (conn.tcp_flags_reply or 0) | ctnl.TCP_FLAG_BE_LIBERAL
            wanted.append(conn)
        if nat and self.conf[self.group].nat_sessions == "fail":
            return ImportResult.fail(
                self.name, Reason.UNSUPPORTED, f"{nat} NATed session(s) cannot be installed"
            )
        try:
            with ctnl.ctnetlink(ctx.netns) as nl:
                used, top = nl.counts()
                if used + len(wanted) > top:
                    return ImportResult.fail(
                        self.name,
                        Reason.RESOURCE_LIMIT,
                        f"the conntrack table holds {used} of {top}; {len(wanted)} more do not fit",
                    )
                return self._install(nl, wanted, nat, expired, _canonical(ctx.addresses))
        except OSError as exc:
            code = exc.errno or errno.EIO
            return ImportResult.fail(self.name, reason_for(code), f"conntrack: {exc}")

    def _install(
        self,
        nl: ctnl.Ctnetlink,
        wanted: list[ctnl.Conn],
        nat: int,
        expired: int,
        addresses: set[str],
    ) -> ImportResult:
        keys = {(c.orig.key(), c.zone) for c in wanted}
        origs = {k[0] for k in keys}
        before = {
            (c.orig.key(), c.zone): c
            for c in nl.dump(lambda o, r: o.key() in origs, addresses=addresses)
            if (c.orig.key(), c.zone) in keys
        }
        ops = [("update" if (c.orig.key(), c.zone) in before else "create", c) for c in wanted]
        try:
            codes = nl.apply(ops)
            # A session the traffic created between our dump and our create: replace it.
            raced = [i for i, code in enumerate(codes) if code == errno.EEXIST]
            if raced:
                race = {wanted[i].orig.key() for i in raced}
                for c in nl.dump(lambda o, r: o.key() in race, addresses=addresses):
                    before[(c.orig.key(), c.zone)] = c
                retry = nl.apply([("update", wanted[i]) for i in raced])
                for i, code in zip(raced, retry, strict=True):
                    ops[i] = ("update", wanted[i])
                    codes[i] = code
        except OSError:
            # The socket failed midway (not a refusal): we cannot tell which
            # requests the kernel applied, so undo every one it may have.
            fresh = [c for c in wanted if (c.orig.key(), c.zone) not in before]
            with contextlib.suppress(OSError):
                self._undo(nl, fresh, list(before.values()))
            raise
        failed = [i for i, code in enumerate(codes) if code]
        created = [
            c for (op, c), code in zip(ops, codes, strict=True) if op == "create" and not code
        ]
        replaced = [
            before[(c.orig.key(), c.zone)]
            for (op, c), code in zip(ops, codes, strict=True)
            if op == "update" and not code
        ]
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
        labelled = [c for c in wanted if c.labels and any(c.labels)]
        lost = self._labels_lost(nl, labelled, addresses)
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
        record = {
            "created": [_key(c.orig, c.zone) for c in created],
            "replaced": [to_entry(c) for c in replaced],
            "at": time.time(),
        }
        result = ImportResult.success(self.name, len(created) + len(replaced), record)
        result.detail = "; ".join(detail)
        return result

    @staticmethod
    def _labels_lost(nl: ctnl.Ctnetlink, labelled: list[ctnl.Conn], addresses: set[str]) -> int:
        """How many of ``labelled`` the kernel stored without their labels.

        Measured on 6.18: a namespace where no rule uses ``ct label`` has no
        label storage, and the kernel then accepts CTA_LABELS and drops them
        silently. Labels are policy (rules match on them), so a session that
        lost them is a refusal, not a success.
        """
        if not labelled:
            return 0
        want = {(c.orig.key(), c.zone): c.labels for c in labelled}
        origs = {k[0] for k in want}
        have = {
            (c.orig.key(), c.zone): c.labels
            for c in nl.dump(lambda o, r: o.key() in origs, addresses=addresses)
            if (c.orig.key(), c.zone) in want
        }
        return sum(
            1
            for k, labels in want.items()
            if have.get(k, b"").rstrip(b"\0") != labels.rstrip(b"\0")
        )

    @staticmethod
    def _undo(nl: ctnl.Ctnetlink, created: list[ctnl.Conn], replaced: list[ctnl.Conn]) -> None:
        nl.delete(created)
        if replaced:
            codes = nl.apply([("update", c) for c in replaced])
            gone = [c for c, code in zip(replaced, codes, strict=True) if code == errno.ENOENT]
            if gone:
                nl.apply([("create", c) for c in gone])

    # -- revert and cleanup ---------------------------------------------------

    def revert_import(self, ctx: KindContext, record: dict[str, Any]) -> None:
        """Delete the sessions the import created; put back those it replaced."""
        created = [_from_key(k) for k in record.get("created", [])]
        elapsed = max(0.0, time.time() - float(record.get("at", time.time())))
        replaced = []
        for entry in record.get("replaced", []):
            conn = from_entry(entry)
            conn.timeout = remaining(conn.timeout, {"age": elapsed})
            if conn.timeout > 0:  # an old session that would have expired by now stays gone
                replaced.append(conn)
        with ctnl.ctnetlink(ctx.netns) as nl:
            self._undo(nl, created, replaced)

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
