"""The directory's state: NVEs, endpoints and the change log, in SQLite.

The NVA (RFC 8014) maps each endpoint (VNI, MAC, IPs) to the NVE that
serves it. NVE agents follow the map through a change log: every change
that an NVE must apply gets a global, ever-growing revision, and an agent
asks for "everything after revision R" (a long-poll), applies it and acks
the revision it reached. The orchestrator waits on those acks to know when
the network has followed a migrating VM.

Like EVPN MAC mobility (RFC 7432 section 15), each endpoint carries a
sequence number that grows by exactly one with every move, so an NVE can
refuse to apply an older location than the one it has.

One SQLite connection serves every thread, guarded by one re-entrant lock;
the same lock backs the Condition that long-polls wait on, so a waiter
never misses a change made between its query and its wait. Every mutating
operation is one transaction: nothing is ever half-applied.

Fan-out at scale (issue 16): py-spy of ``vmm nva serve`` under
``benchmarks/fanout.py`` at 1,000 peers showed the server's threads
queueing on this lock (``Condition.__enter__`` after ``Condition.wait`` in
``changes_since``, and ``_tx`` in ``ack``): every ack was a transaction
that woke *every* long-poll, and each woken poll re-ran its query under
the lock, so one move to N peers cost N acks x N wake-ups. Now a change
wakes only the change waiters, an ack wakes only the ack waiters, acks can
be written many to a transaction (:meth:`NvaStore.ack_many`), and every
committed batch of changes is handed to listeners (the server's stream
hub, :mod:`vmm_orchestrator.nva.stream`) once, so a streaming NVE costs the
directory no query at all per change.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import json
import logging
import math
import re
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

from vmm_orchestrator.errors import ConfigError
from vmm_orchestrator.model import normalize_mac
from vmm_orchestrator.nva import options
from vmm_orchestrator.nva.errors import BadRequest, Conflict, Gone, NotFound, NvaError
from vmm_orchestrator.options import require

LOG = logging.getLogger(__name__)

MAX_VNI = 2**24 - 1

#: Most changes one watch answer carries; a lagging NVE catches up in pages.
CHANGES_PAGE = 1000

# NVE ids travel in URL paths: no slashes, spaces or other surprises.
_NVE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,254}$")
#: One or more NVE ids joined by ','.
_NVE_IDS_RE = re.compile(
    r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,254}(?:,[A-Za-z0-9][A-Za-z0-9._:@-]{0,254})*\Z"
)
# Migration ids come from hypervisors (UUIDs, job names): any printable ASCII word.
_MIGRATION_ID_RE = re.compile(r"^[\x21-\x7e]{1,255}$")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS nves (
    id TEXT PRIMARY KEY,
    vtep TEXT NOT NULL,
    vnis TEXT NOT NULL,
    acked_revision INTEGER NOT NULL DEFAULT 0,
    acked_at REAL
);
CREATE TABLE IF NOT EXISTS endpoints (
    vni INTEGER NOT NULL,
    mac TEXT NOT NULL,
    ipv4 TEXT NOT NULL,
    ipv6 TEXT NOT NULL,
    nve TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('active', 'pending')),
    seq INTEGER NOT NULL DEFAULT 0,
    pending_nve TEXT,
    migration_id TEXT,
    last_migration_id TEXT,
    last_commit_revision INTEGER,
    committed_at REAL,
    revision INTEGER NOT NULL,
    updated_at REAL NOT NULL,
    sticky INTEGER NOT NULL DEFAULT 0,
    frozen_at REAL,
    frozen_reason TEXT,
    moves TEXT NOT NULL DEFAULT '[]',
    last_planned TEXT,
    PRIMARY KEY (vni, mac)
);
CREATE TABLE IF NOT EXISTS changes (
    revision INTEGER PRIMARY KEY,
    vni INTEGER NOT NULL,
    target_nve TEXT,
    kind TEXT NOT NULL,
    payload TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS changes_by_vni ON changes (vni, revision);
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
"""

#: Columns added after the first release, for databases created before them.
_ADDED_COLUMNS = {
    "sticky": "INTEGER NOT NULL DEFAULT 0",
    "frozen_at": "REAL",
    "frozen_reason": "TEXT",
    "moves": "TEXT NOT NULL DEFAULT '[]'",
    "last_planned": "TEXT",
}

#: Default number of changes the log keeps ([nva] change_log_keep).
CHANGE_LOG_KEEP = 100000

_ENDPOINT_SELECT = "SELECT e.*, n.vtep AS vtep FROM endpoints e LEFT JOIN nves n ON n.id = e.nve"

# Who else in the VN holds any of the given addresses (a JSON array).
_HOLDERS_SQL = """
SELECT e.mac AS mac, j.value AS ip FROM endpoints e, json_each(e.ipv4) j
 WHERE e.vni = :vni AND e.mac <> :mac AND j.value IN (SELECT value FROM json_each(:ips))
UNION ALL
SELECT e.mac AS mac, j.value AS ip FROM endpoints e, json_each(e.ipv6) j
 WHERE e.vni = :vni AND e.mac <> :mac AND j.value IN (SELECT value FROM json_each(:ips))
"""

_CHANGES_SQL = """
SELECT * FROM changes
 WHERE revision > ?
   AND vni IN (SELECT value FROM json_each(?))
   AND (target_nve IS NULL OR target_nve = ?)
 ORDER BY revision
 LIMIT ?
"""


# ---------------------------------------------------------------- validation
# Public so the server can validate query strings with the same messages.


def check_vni(value: Any) -> int:
    """A VXLAN VNI is 24 bits and 0 is reserved: refuse anything else early."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= MAX_VNI:
        raise BadRequest(f"vni must be an integer from 1 to {MAX_VNI}, got {value!r}")
    return value


def check_mac_syntax(value: Any) -> str:
    """A MAC in canonical form, unicast or not: to name an endpoint that exists.

    Reading, deleting and releasing take any MAC, so an operator can remove
    an entry an older directory accepted before the unicast rule below.
    """
    if not isinstance(value, str):
        raise BadRequest(f"mac must be a string like aa:bb:cc:dd:ee:ff, got {value!r}")
    try:
        return normalize_mac(value)
    except ValueError as err:
        raise BadRequest(str(err)) from None


def check_mac(value: Any) -> str:
    """Normalize a MAC so 'AA-BB-..' and 'aa:bb:..' name the same endpoint.

    Only a unicast MAC can be an endpoint's: the kernel refuses to program a
    multicast, broadcast or all-zero MAC as a bridge entry, so such an entry
    in the directory would only fail on every NVE of the VN (issue 13).
    """
    if not isinstance(value, str):
        raise BadRequest(f"mac must be a string like aa:bb:cc:dd:ee:ff, got {value!r}")
    try:
        mac = normalize_mac(value)
    except ValueError as err:
        raise BadRequest(str(err)) from None
    if mac == "ff:ff:ff:ff:ff:ff":
        raise BadRequest(f"mac {mac} is the broadcast address, not an endpoint's MAC")
    if int(mac[:2], 16) & 1:
        raise BadRequest(
            f"mac {mac} is a multicast address (low bit of the first octet set), "
            "not an endpoint's MAC"
        )
    if mac == "00:00:00:00:00:00":
        raise BadRequest(f"mac {mac} is all zeros, not an endpoint's MAC")
    return mac


def check_ip(value: Any, field: str = "ip") -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """Parse one unicast address, as the kernel would accept it in a neighbour entry.

    Refused: multicast, unspecified, the IPv4 limited broadcast, IPv4-mapped
    IPv6 addresses, and any zone id (``fe80::1%eth0``): a zone names an
    interface of one host, means nothing in a VN, and would let the same
    address slip past the duplicate-address check under another spelling.
    """
    if not isinstance(value, str):
        raise BadRequest(f"{field} must be an IP address string, got {value!r}")
    if "%" in value:
        raise BadRequest(f"{field}: {value!r} has a zone id ('%...'); give the bare address")
    try:
        addr = ipaddress.ip_address(value.strip())
    except ValueError:
        raise BadRequest(f"{field}: {value!r} is not an IP address") from None
    if addr.is_multicast or addr.is_unspecified:
        raise BadRequest(f"{field}: {addr} is not a unicast address")
    if addr.version == 4 and addr == ipaddress.IPv4Address("255.255.255.255"):
        raise BadRequest(f"{field}: {addr} is the broadcast address, not a unicast address")
    if addr.version == 6 and addr.ipv4_mapped is not None:
        raise BadRequest(f"{field}: {addr} is an IPv4-mapped address; give the IPv4 address")
    return addr


def check_endpoint_ip(
    value: Any, field: str = "ip"
) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """An address a VM may hold: unicast (see check_ip) and not loopback."""
    addr = check_ip(value, field)
    if addr.is_loopback:
        raise BadRequest(f"{field}: {addr} is a loopback address, not a VM's")
    return addr


def check_ips(values: Any, version: int, field: str) -> list[str]:
    """Canonical, de-duplicated, sorted addresses, so equal sets compare equal."""
    if values is None:
        return []
    if isinstance(values, str) or not isinstance(values, (list, tuple)):
        raise BadRequest(f"{field} must be a list of IPv{version} addresses, got {values!r}")
    addrs = set()
    for value in values:
        addr = check_endpoint_ip(value, field)
        if addr.version != version:
            raise BadRequest(f"{field}: {addr} is an IPv{addr.version} address, not IPv{version}")
        addrs.add(addr)
    return [str(a) for a in sorted(addrs)]


def check_nve_id(value: Any, field: str = "nve") -> str:
    """NVE ids appear in URL paths, so keep them to a safe alphabet."""
    if not isinstance(value, str) or not _NVE_ID_RE.match(value):
        raise BadRequest(
            f"{field} must be an NVE id (letters, digits, '.', '_', ':', '@', '-'; "
            f"at most 255 characters), got {value!r}"
        )
    return value


def check_nve_ids(values: Any, field: str = "nves") -> list[str]:
    """A list of NVE ids without duplicates, order kept."""
    if isinstance(values, str) or not isinstance(values, (list, tuple)):
        raise BadRequest(f"{field} must be a list of NVE ids, got {values!r}")
    # The orchestrator's wait for a move's acks names every peer: one match over them
    # all (ids hold no ','), and each id alone only to name a bad one.
    if all(isinstance(v, str) for v in values):
        joined = ",".join(values)
        if joined.count(",") == len(values) - 1 and _NVE_IDS_RE.match(joined):
            return list(dict.fromkeys(values))  # a list scan per id cost ~0.5 M compares
    seen: dict[str, None] = {}
    for value in values:
        seen.setdefault(check_nve_id(value, field))
    return list(seen)


def check_migration_id(value: Any) -> str:
    """Migration ids are opaque, but must be a non-empty printable word."""
    if not isinstance(value, str) or not _MIGRATION_ID_RE.match(value):
        raise BadRequest(
            f"migration_id must be 1 to 255 printable ASCII characters without spaces, "
            f"got {value!r}"
        )
    return value


def check_revision(value: Any, field: str = "revision") -> int:
    """Revisions start at 0 (nothing seen yet) and only grow."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise BadRequest(f"{field} must be an integer >= 0, got {value!r}")
    return value


def check_timeout(value: Any, field: str = "timeout") -> float:
    """A wait in seconds: finite and not negative."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadRequest(f"{field} must be a number of seconds, got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise BadRequest(f"{field} must be a finite number of seconds >= 0, got {value!r}")
    return float(value)


def check_vnis(values: Any) -> list[int]:
    """The VNIs an NVE serves, de-duplicated and sorted."""
    if isinstance(values, str) or not isinstance(values, (list, tuple)):
        raise BadRequest(f"vnis must be a list of VNIs, got {values!r}")
    return sorted({check_vni(v) for v in values})


# --------------------------------------------------------------------- rows


def _nve_dict(row: sqlite3.Row) -> dict[str, Any]:
    return {
        "id": row["id"],
        "vtep": row["vtep"],
        "vnis": json.loads(row["vnis"]),
        "acked_revision": row["acked_revision"],
        "acked_at": row["acked_at"],
    }


def _endpoint_dict(row: sqlite3.Row) -> dict[str, Any]:
    return {
        "vni": row["vni"],
        "mac": row["mac"],
        "ipv4": json.loads(row["ipv4"]),
        "ipv6": json.loads(row["ipv6"]),
        "nve": row["nve"],
        "vtep": row["vtep"],
        "state": row["state"],
        "seq": row["seq"],
        "pending_nve": row["pending_nve"],
        "migration_id": row["migration_id"],
        "last_migration_id": row["last_migration_id"],
        "revision": row["revision"],
        "updated_at": row["updated_at"],
        "sticky": bool(row["sticky"]),
        "frozen": row["frozen_at"] is not None,
        "frozen_at": row["frozen_at"],
        "frozen_reason": row["frozen_reason"],
        "moves": json.loads(row["moves"]),
    }


def _change_dict(row: sqlite3.Row) -> dict[str, Any]:
    change: dict[str, Any] = {
        "revision": row["revision"],
        "kind": row["kind"],
        "vni": row["vni"],
        "created_at": row["created_at"],
    }
    change.update(json.loads(row["payload"]))
    return change


def _serves(nve: sqlite3.Row, vni: int) -> bool:
    return vni in json.loads(nve["vnis"])


# -- MAC mobility rules ---------------------------------------------------------
#
# What a pre-stage, commit, abort or move means for an endpoint as it stands.
# Shared by every store (``row`` is anything indexable by column name), so
# that the embedded and the etcd directory cannot drift apart.


def prestage_is_done(row: Any, vni: int, mac: str, nve: str, migration_id: str) -> bool:
    """True if this pre-stage already happened (a retry); Conflict if another blocks it."""
    if row["state"] == "pending":
        if row["migration_id"] != migration_id:
            raise Conflict(
                f"endpoint {mac} in VNI {vni} is already pending for migration "
                f"{row['migration_id']} to {row['pending_nve']}",
                hint="commit or abort that migration first",
            )
        if row["pending_nve"] != nve:
            raise Conflict(
                f"migration {migration_id} already prestaged {mac} in VNI {vni} "
                f"to {row['pending_nve']}, not {nve}"
            )
        return True
    # already committed: a retried prestage
    return bool(row["last_migration_id"] == migration_id and row["nve"] == nve)


def commit_is_done(row: Any, vni: int, mac: str, migration_id: str) -> bool:
    """False: commit the pending move now; True: it was committed already (a retry).

    Conflict if another migration is pending, NotFound if nothing is.
    """
    if row["state"] == "pending" and row["migration_id"] == migration_id:
        return False
    if row["last_migration_id"] == migration_id:
        return True
    if row["state"] == "pending":
        raise Conflict(
            f"endpoint {mac} in VNI {vni} is pending for migration "
            f"{row['migration_id']}, not {migration_id}"
        )
    raise NotFound(
        f"no pending migration {migration_id} for endpoint {mac} in VNI {vni}",
        hint="prestage it first",
    )


def abort_is_done(row: Any, vni: int, mac: str, migration_id: str) -> bool:
    """True if nothing is pending (nothing to abort); Conflict if another migration is."""
    if row["state"] != "pending":
        return True
    if row["migration_id"] != migration_id:
        raise Conflict(
            f"endpoint {mac} in VNI {vni} is pending for migration "
            f"{row['migration_id']}, not {migration_id}; not aborting it"
        )
    return False


def move_is_done(row: Any, vni: int, mac: str, nve: str, seq: int | None) -> bool:
    """True if the endpoint is at ``nve`` already; Conflict for a stale sequence number."""
    if row["nve"] == nve:
        return True
    if seq is not None and seq <= row["seq"]:
        raise Conflict(
            f"stale sequence {seq} for {mac} in VNI {vni}: the directory has seq "
            f"{row['seq']} at {row['nve']}"
        )
    return False


def check_movable(row: Any, vni: int, mac: str, what: str) -> None:
    """Conflict if the endpoint may not move at all: sticky, or frozen as flapping."""
    if row["sticky"]:
        raise Conflict(
            f"endpoint {mac} in VNI {vni} is sticky (static) and never moves; {what} refused",
            hint="delete it and add it again without --sticky to let it move",
        )
    if row["frozen_at"] is not None:
        raise Conflict(
            f"endpoint {mac} in VNI {vni} is frozen at {row['nve']} as a flapping MAC "
            f"({row['frozen_reason']}); {what} refused",
            hint=f"find the duplicate MAC, then `vmm nva endpoint release --vni {vni} --mac {mac}`",
        )


@dataclasses.dataclass(frozen=True)
class MobilityPolicy:
    """When a MAC that keeps moving is frozen (EVPN duplicate detection, RFC 7432 s15).

    Every location change of a (VN, MAC) is recorded; the directory freezes
    the MAC when, within ``move_window`` seconds, more than ``move_limit``
    moves were recorded *and* the one that would exceed the limit is an
    unplanned (learned) move. Planned moves (the commit of a pre-staged
    migration, or a learned move onto the NVE a migration is pending for)
    are counted but never trip it themselves: they were asked for by an
    orchestrator naming a migration, one at a time, so a load balancer
    moving a VM back and forth or a host evacuation cannot freeze anything.
    A learned move between a planned migration's two NVEs within
    ``migration_grace`` seconds of its commit is that migration's echo
    (QEMU's RARPs, stale frames at the source) and is not counted at all:
    a planned migration counts once, however many announcements it causes.
    The defaults are FRR's (5 moves in 180 s).
    """

    move_limit: int = 5
    move_window: float = 180.0
    migration_grace: float = 30.0

    @classmethod
    def from_conf(cls, conf: Any) -> MobilityPolicy:
        group = conf["nva"]
        return cls(group.mac_move_limit, group.mac_move_window, group.migration_grace)


@dataclasses.dataclass
class MoveDecision:
    """What a location change does to an endpoint's mobility record."""

    fields: dict[str, Any]
    freeze: bool = False
    reason: str | None = None


def decide_move(
    row: Any,
    to_nve: str,
    now: float,
    policy: MobilityPolicy,
    migration_id: str | None = None,
) -> MoveDecision:
    """Record a move of ``row`` to ``to_nve``; freeze instead when it flaps.

    ``migration_id`` is given for a commit. Returns the columns to write
    (``moves``, ``last_planned``, and on a freeze ``frozen_at`` and
    ``frozen_reason``). On a freeze the caller writes those columns, keeps
    the endpoint where it is, and refuses the move once that is stored.
    """
    from_nve = row["nve"]
    history = [m for m in _json_list(row["moves"]) if now - m["at"] <= policy.move_window]
    if migration_id is None and row["state"] == "pending" and row["pending_nve"] == to_nve:
        migration_id = row["migration_id"]  # the migration's own first frame at the target
    planned = migration_id is not None
    last = _json_obj(row["last_planned"])
    if (
        not planned
        and last is not None
        and now - last["at"] <= policy.migration_grace
        and {from_nve, to_nve} == {last["from"], last["to"]}
    ):
        return MoveDecision({"moves": history})  # the echo of a planned migration
    move = {"at": now, "from": from_nve, "to": to_nve, "planned": planned}
    if planned:
        move["migration_id"] = migration_id
    history.append(move)
    fields: dict[str, Any] = {"moves": history[-(policy.move_limit + 1) :]}
    if planned:
        fields["last_planned"] = {"at": now, "from": from_nve, "to": to_nve}
        return MoveDecision(fields)
    if len(history) > policy.move_limit:
        reason = (
            f"{len(history)} moves in {policy.move_window:g} s, over the limit of "
            f"{policy.move_limit}; last {from_nve} -> {to_nve} refused"
        )
        fields.update(frozen_at=now, frozen_reason=reason)
        fields["moves"] = history[-(policy.move_limit + 1) :]
        return MoveDecision(fields, freeze=True, reason=reason)
    return MoveDecision(fields)


def same_endpoint(
    existing: dict[str, Any], v4: list[str], v6: list[str], nve: str, sticky: bool
) -> bool:
    """Whether an add repeats the endpoint as it is (harmless) rather than contradicting it."""
    return (existing["ipv4"], existing["ipv6"], existing["nve"], bool(existing["sticky"])) == (
        v4,
        v6,
        nve,
        sticky,
    )


def nve_busy(nve_id: str, busy: list[tuple[int, str]]) -> Conflict:
    where = ", ".join(f"{mac} in VNI {vni}" for vni, mac in busy[:3])
    return Conflict(
        f"NVE '{nve_id}' still serves endpoints ({where}{', ...' if len(busy) > 2 else ''})",
        hint="move or delete its endpoints first",
    )


def gone(since: int, pruned: int) -> Gone:
    return Gone(
        f"the changes after revision {since} are no longer in the change log "
        f"(pruned up to {pruned})",
        hint="resynchronize from a full endpoint list, then watch from its revision",
    )


def frozen_error(vni: int, mac: str, nve: str, reason: str) -> Conflict:
    return Conflict(
        f"endpoint {mac} in VNI {vni} is now frozen at {nve} as a flapping MAC ({reason})",
        hint=f"find the duplicate MAC, then `vmm nva endpoint release --vni {vni} --mac {mac}`",
    )


def _columns(fields: dict[str, Any]) -> dict[str, Any]:
    """Mobility fields as SQLite columns (JSON text for the lists)."""
    out = dict(fields)
    for name in ("moves", "last_planned"):
        if name in out and out[name] is not None:
            out[name] = json.dumps(out[name])
    return out


def _json_list(value: Any) -> list[dict[str, Any]]:
    if value is None:
        return []
    if isinstance(value, str):
        value = json.loads(value)
    return list(value)


def _json_obj(value: Any) -> dict[str, Any] | None:
    if isinstance(value, str):
        value = json.loads(value)
    return value


def membership_changes(
    old: dict[str, Any] | None, new: dict[str, Any] | None
) -> list[tuple[int, dict[str, Any]]]:
    """The VNs whose flood list an NVE (re-)registration or removal changes.

    (vni, payload) per VN: ``member`` says whether the NVE now floods in
    that VN, ``nve`` is its record. Re-registering the same VTEP and VNs
    changes nothing, so an agent restarting records nothing.
    """
    old_vnis = set(old["vnis"]) if old else set()
    new_vnis = set(new["vnis"]) if new else set()
    same_vtep = old is not None and new is not None and old["vtep"] == new["vtep"]
    out: list[tuple[int, dict[str, Any]]] = []
    record = new or old
    assert record is not None
    nve = {"id": record["id"], "vtep": record["vtep"], "vnis": sorted(new_vnis)}
    for vni in sorted(old_vnis | new_vnis):
        if vni in new_vnis and (vni not in old_vnis or not same_vtep):
            out.append((vni, {"nve": nve, "member": True}))
        elif vni not in new_vnis:
            out.append((vni, {"nve": nve, "member": False}))
    return out


class StoreFront:
    """The directory store contract: public signatures and argument checks.

    Backends (this module's NvaStore, the etcd plugin's store) implement the
    ``_do_*`` hooks, which get arguments already checked and normalized.
    """

    #: When a flapping MAC is frozen; backends may take another in their constructor.
    mobility: MobilityPolicy = MobilityPolicy()

    # ----------------------------------------------------------------- NVEs

    def register_nve(self, nve_id: str, vtep: str, vnis: Sequence[int]) -> dict[str, Any]:
        """Add or update an NVE; a new VTEP is announced for every endpoint behind it."""
        nve_id = check_nve_id(nve_id, "id")
        vtep_ip = str(check_ip(vtep, "vtep"))
        return self._do_register_nve(nve_id, vtep_ip, check_vnis(vnis))

    def get_nve(self, nve_id: str) -> dict[str, Any]:
        """One NVE, with the revision it last acked."""
        return self._do_get_nve(check_nve_id(nve_id, "id"))

    def delete_nve(self, nve_id: str) -> dict[str, Any]:
        """Remove an NVE that serves no endpoint; its peers drop it from their flood lists."""
        return self._do_delete_nve(check_nve_id(nve_id, "id"))

    def list_nves(self, vni: int | None = None) -> list[dict[str, Any]]:
        """All NVEs, or only those serving ``vni``."""
        if vni is not None:
            vni = check_vni(vni)
        return self._do_list_nves(vni)

    # ----------------------------------------------------------- endpoints

    def add_endpoint(
        self,
        vni: int,
        mac: str,
        ipv4: Sequence[str] | None,
        ipv6: Sequence[str] | None,
        nve: str,
        sticky: bool = False,
    ) -> dict[str, Any]:
        """Add an endpoint at ``nve`` (active, seq 0); repeating the same add is harmless.

        A ``sticky`` (static) endpoint never moves: moves and pre-stages are refused.
        """
        return self.create_endpoint(vni, mac, ipv4, ipv6, nve, sticky)[0]

    def create_endpoint(
        self,
        vni: int,
        mac: str,
        ipv4: Sequence[str] | None,
        ipv6: Sequence[str] | None,
        nve: str,
        sticky: bool = False,
    ) -> tuple[dict[str, Any], bool]:
        """Like add_endpoint, and also says whether the endpoint is new (for 201 vs 200)."""
        vni, mac = check_vni(vni), check_mac(mac)
        v4, v6 = check_ips(ipv4, 4, "ipv4"), check_ips(ipv6, 6, "ipv6")
        if not isinstance(sticky, bool):
            raise BadRequest(f"sticky must be true or false, got {sticky!r}")
        return self._do_create_endpoint(vni, mac, v4, v6, check_nve_id(nve), sticky)

    def get_endpoint(self, vni: int, mac: str) -> dict[str, Any]:
        """One endpoint by its key (VNI, MAC)."""
        return self._do_get_endpoint(check_vni(vni), check_mac_syntax(mac))

    def find(self, vni: int, ip: str | None = None, mac: str | None = None) -> dict[str, Any]:
        """Look an endpoint up by IP (ARP/ND cache miss) or by MAC (RARP); both must match."""
        vni = check_vni(vni)
        if ip is None and mac is None:
            raise BadRequest("find needs an ip or a mac to look up")
        wanted_mac = None if mac is None else check_mac(mac)
        addr = None if ip is None else check_endpoint_ip(ip)
        return self._do_find(vni, addr, wanted_mac)

    def delete_endpoint(self, vni: int, mac: str) -> dict[str, Any]:
        """Remove an endpoint and tell the NVEs; returns it with the delete's revision."""
        return self._do_delete_endpoint(check_vni(vni), check_mac_syntax(mac))

    # ---------------------------------------------------------- migration

    def prestage(self, vni: int, mac: str, nve: str, migration_id: str) -> dict[str, Any]:
        """Note that ``nve`` will receive the endpoint; traffic keeps going to the old NVE."""
        vni, mac = check_vni(vni), check_mac(mac)
        nve, migration_id = check_nve_id(nve), check_migration_id(migration_id)
        return self._do_prestage(vni, mac, nve, migration_id)

    def commit(self, vni: int, mac: str, migration_id: str) -> dict[str, Any]:
        """Point the endpoint at its pending NVE with seq + 1; a repeat returns the same result."""
        vni, mac = check_vni(vni), check_mac(mac)
        return self._do_commit(vni, mac, check_migration_id(migration_id))

    def abort(self, vni: int, mac: str, migration_id: str) -> dict[str, Any]:
        """Forget a prestage; nve and seq stay as they are, and a repeat is harmless."""
        vni, mac = check_vni(vni), check_mac(mac)
        return self._do_abort(vni, mac, check_migration_id(migration_id))

    def move(self, vni: int, mac: str, nve: str, seq: int | None = None) -> dict[str, Any]:
        """An NVE learned the MAC locally (EVPN style): move it unless ``seq`` is stale."""
        vni, mac, nve = check_vni(vni), check_mac(mac), check_nve_id(nve)
        if seq is not None:
            seq = check_revision(seq, "seq")
        return self._do_move(vni, mac, nve, seq)

    def release(self, vni: int, mac: str) -> dict[str, Any]:
        """Unfreeze a MAC frozen as flapping and forget its move history (operator action)."""
        return self._do_release(check_vni(vni), check_mac_syntax(mac))

    def expire(self, vni: int, mac: str, nves: Sequence[str]) -> dict[str, Any]:
        """Tell ``nves`` to drop their cached entry for ``mac`` and look it up again."""
        vni, mac = check_vni(vni), check_mac(mac)
        targets = check_nve_ids(nves)
        if not targets:
            raise BadRequest("nves must name at least one NVE to expire the entry on")
        return self._do_expire(vni, mac, targets)

    # ------------------------------------------------------ watch and acks

    def changes_since(
        self, nve_id: str, revision: int, timeout: float = 0.0
    ) -> tuple[int, list[dict[str, Any]]]:
        """Changes for ``nve_id`` after ``revision``, waiting up to ``timeout`` s for one.

        The returned revision is the one to pass next time and to ack: the
        directory's current revision, or, when the answer is a truncated page,
        the revision of its last change.
        """
        nve_id = check_nve_id(nve_id)
        revision = check_revision(revision, "since")
        deadline = time.monotonic() + check_timeout(timeout)
        return self._do_changes_since(nve_id, revision, deadline)

    def ack(self, nve_id: str, revision: int) -> dict[str, Any]:
        """Record that ``nve_id`` applied everything up to ``revision`` (never backwards)."""
        nve_id = check_nve_id(nve_id)
        return self._do_ack(nve_id, check_revision(revision))

    def ack_many(self, acks: dict[str, int]) -> dict[str, Any]:
        """Record many NVEs' acks at once (an ack batch): {"acked": {id: nve}, "errors": {id: msg}}.

        Each ack is checked as :meth:`ack` checks it; one NVE's bad ack does
        not refuse the others'. Backends write the batch together where they
        can (one SQLite transaction, one etcd transaction).
        """
        if not isinstance(acks, dict):
            raise BadRequest(f"acks must map NVE ids to revisions, got {acks!r}")
        checked = {check_nve_id(n): check_revision(r) for n, r in acks.items()}
        return self._do_ack_many(checked)

    def acks(
        self,
        vni: int,
        min_revision: int,
        nves: Sequence[str] | None = None,
        timeout: float = 0.0,
    ) -> dict[str, dict[str, Any]]:
        """Ack state of ``nves`` (default: all serving ``vni``), waiting for ``min_revision``.

        Returns when every one of them acked ``min_revision`` or the timeout
        passed; the caller compares the revisions to tell which.
        """
        vni = check_vni(vni)
        min_revision = check_revision(min_revision, "min_revision")
        wanted = None if nves is None else check_nve_ids(nves)
        deadline = time.monotonic() + check_timeout(timeout)
        return self._do_acks(vni, min_revision, wanted, deadline)

    # ------------------------------------------------------- backend hooks

    def _do_register_nve(self, nve_id: str, vtep_ip: str, vnis: list[int]) -> dict[str, Any]:
        raise NotImplementedError

    def _do_get_nve(self, nve_id: str) -> dict[str, Any]:
        raise NotImplementedError

    def _do_delete_nve(self, nve_id: str) -> dict[str, Any]:
        raise NotImplementedError

    def _do_release(self, vni: int, mac: str) -> dict[str, Any]:
        raise NotImplementedError

    def _do_list_nves(self, vni: int | None) -> list[dict[str, Any]]:
        raise NotImplementedError

    def _do_create_endpoint(
        self, vni: int, mac: str, v4: list[str], v6: list[str], nve: str, sticky: bool
    ) -> tuple[dict[str, Any], bool]:
        raise NotImplementedError

    def _do_get_endpoint(self, vni: int, mac: str) -> dict[str, Any]:
        raise NotImplementedError

    def _do_find(
        self,
        vni: int,
        addr: ipaddress.IPv4Address | ipaddress.IPv6Address | None,
        wanted_mac: str | None,
    ) -> dict[str, Any]:
        raise NotImplementedError

    def _do_delete_endpoint(self, vni: int, mac: str) -> dict[str, Any]:
        raise NotImplementedError

    def _do_prestage(self, vni: int, mac: str, nve: str, migration_id: str) -> dict[str, Any]:
        raise NotImplementedError

    def _do_commit(self, vni: int, mac: str, migration_id: str) -> dict[str, Any]:
        raise NotImplementedError

    def _do_abort(self, vni: int, mac: str, migration_id: str) -> dict[str, Any]:
        raise NotImplementedError

    def _do_move(self, vni: int, mac: str, nve: str, seq: int | None) -> dict[str, Any]:
        raise NotImplementedError

    def _do_expire(self, vni: int, mac: str, targets: list[str]) -> dict[str, Any]:
        raise NotImplementedError

    def _do_changes_since(
        self, nve_id: str, revision: int, deadline: float
    ) -> tuple[int, list[dict[str, Any]]]:
        raise NotImplementedError

    def _do_ack(self, nve_id: str, revision: int) -> dict[str, Any]:
        raise NotImplementedError

    def _do_ack_many(self, acks: dict[str, int]) -> dict[str, Any]:
        """One ack after the other; a backend that can write them together overrides this."""
        acked: dict[str, Any] = {}
        errors: dict[str, str] = {}
        for nve_id, revision in acks.items():
            try:
                acked[nve_id] = self._do_ack(nve_id, revision)
            except NvaError as err:
                errors[nve_id] = err.message
        return {"acked": acked, "errors": errors}

    def _do_acks(
        self, vni: int, min_revision: int, wanted: list[str] | None, deadline: float
    ) -> dict[str, dict[str, Any]]:
        raise NotImplementedError


class NvaStore(StoreFront):
    """Thread-safe directory of NVEs and endpoints with a watchable change log."""

    def __init__(
        self,
        path: str,
        mobility: MobilityPolicy | None = None,
        keep_changes: int = CHANGE_LOG_KEEP,
    ) -> None:
        self.path = path
        if mobility is not None:
            self.mobility = mobility
        self.keep_changes = max(1, keep_changes)
        self._lock = threading.RLock()
        #: Long-polls for changes wait here; only a commit that recorded changes wakes them.
        self._cond = threading.Condition(self._lock)
        #: Waits for acks wait here; only acks wake them.
        self._acks_cond = threading.Condition(self._lock)
        #: Changes recorded by the open transaction, handed to listeners on commit.
        self._pending: list[dict[str, Any]] = []
        self._listeners: list[Any] = []
        self._closed = False
        try:
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA busy_timeout=5000")
            self._db.executescript(_SCHEMA)
            have = {r["name"] for r in self._db.execute("PRAGMA table_info(endpoints)")}
            for name, decl in _ADDED_COLUMNS.items():
                if name not in have:
                    self._db.execute(f"ALTER TABLE endpoints ADD COLUMN {name} {decl}")
            row = self._db.execute("SELECT COALESCE(MAX(revision), 0) FROM changes").fetchone()
            floor = self._db.execute("SELECT value FROM meta WHERE key = 'pruned'").fetchone()
        except sqlite3.Error as err:
            raise ConfigError(
                f"cannot open the NVA database {path!r}: {err}",
                hint="check [nva] database: its directory must exist and be writable",
            ) from err
        #: Every change up to this revision was pruned from the log.
        self._pruned: int = floor[0] if floor is not None else 0
        self._revision: int = max(row[0], self._pruned)

    @classmethod
    def from_conf(cls, conf: Any, path: str | None = None) -> NvaStore:
        """The store ``[nva]`` describes (database, move-flap policy, change log window)."""
        require(conf, options.GROUP, "the directory's store")
        group = conf[options.GROUP]
        return cls(
            group.database if path is None else path,
            mobility=MobilityPolicy.from_conf(conf),
            keep_changes=group.change_log_keep,
        )

    # ------------------------------------------------------------ plumbing

    @property
    def revision(self) -> int:
        """The revision of the newest change (0 when there is none)."""
        with self._lock:
            return self._revision

    def close(self) -> None:
        """Close the database and wake every waiter so it returns at once."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
            self._acks_cond.notify_all()
            self._db.close()

    def _check_open(self) -> None:
        if self._closed:
            raise NvaError("the NVA store is closed")

    @contextlib.contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._check_open()
            yield self._db

    def add_listener(self, listener: Any) -> None:
        """Call ``listener(revision, changes)`` after each commit that recorded changes.

        It runs under the store's lock, in commit order, so it must only
        hand the batch on (the stream hub queues it); ``changes`` are the
        dicts NVEs read, oldest first.
        """
        with self._lock:
            self._listeners.append(listener)

    def remove_listener(self, listener: Any) -> None:
        with self._lock:
            if listener in self._listeners:
                self._listeners.remove(listener)

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; wakes change waiters on a change, restores the revision
        on failure."""
        with self._cond:
            self._check_open()
            start = self._revision
            self._pending = []
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                self._revision = start
                self._pending = []
                raise
            self._db.execute("COMMIT")
            if self._revision != start:
                self._cond.notify_all()
                changes, self._pending = self._pending, []
                for listener in list(self._listeners):
                    try:
                        listener(self._revision, changes)
                    except Exception:  # a listener's bug must not undo a commit
                        LOG.exception("NVA change listener %r failed", listener)
                self._prune()

    def _prune(self) -> None:
        """Keep the newest ``keep_changes`` changes; done in batches of a tenth of that.

        A watcher asking for changes from before the pruned revision gets
        Gone and re-syncs from a full endpoint list.
        """
        floor = self._revision - self.keep_changes
        if floor - self._pruned < max(1, self.keep_changes // 10):
            return
        self._db.execute("BEGIN IMMEDIATE")
        try:
            self._db.execute("DELETE FROM changes WHERE revision <= ?", (floor,))
            self._db.execute(
                "INSERT INTO meta (key, value) VALUES ('pruned', ?)"
                " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (floor,),
            )
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")
        self._pruned = floor

    @property
    def pruned_revision(self) -> int:
        """Changes up to this revision are no longer in the log (0: nothing pruned)."""
        with self._lock:
            return self._pruned

    def _next_revision(self) -> int:
        """Take the next revision; only valid inside _tx, which undoes it on rollback."""
        self._revision += 1
        return self._revision

    def _record(
        self,
        db: sqlite3.Connection,
        revision: int,
        vni: int,
        kind: str,
        payload: dict[str, Any],
        target_nve: str | None = None,
    ) -> None:
        created_at = time.time()
        text = json.dumps(payload)
        db.execute(
            "INSERT INTO changes (revision, vni, target_nve, kind, payload, created_at)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (revision, vni, target_nve, kind, text, created_at),
        )
        if self._listeners:
            change = {"revision": revision, "kind": kind, "vni": vni, "created_at": created_at}
            change.update(json.loads(text))  # the form a reader of the log gets
            self._pending.append(change)

    def _nve_row(self, db: sqlite3.Connection, nve_id: str) -> sqlite3.Row:
        row = db.execute("SELECT * FROM nves WHERE id = ?", (nve_id,)).fetchone()
        if row is None:
            raise NotFound(f"no NVE '{nve_id}' is registered", hint="register it first")
        return row

    def _serving_nve(self, db: sqlite3.Connection, nve_id: str, vni: int) -> sqlite3.Row:
        row = self._nve_row(db, nve_id)
        if not _serves(row, vni):
            raise Conflict(
                f"NVE '{nve_id}' does not serve VNI {vni} (it serves {json.loads(row['vnis'])})",
                hint="register the NVE with that VNI first",
            )
        return row

    def _endpoint_row(self, db: sqlite3.Connection, vni: int, mac: str) -> sqlite3.Row:
        row = db.execute(f"{_ENDPOINT_SELECT} WHERE e.vni = ? AND e.mac = ?", (vni, mac)).fetchone()
        if row is None:
            raise NotFound(f"no endpoint {mac} in VNI {vni}")
        return row

    def _endpoint(self, db: sqlite3.Connection, vni: int, mac: str) -> dict[str, Any]:
        return _endpoint_dict(self._endpoint_row(db, vni, mac))

    def _update_endpoint(
        self, db: sqlite3.Connection, vni: int, mac: str, **columns: Any
    ) -> dict[str, Any]:
        """Set ``columns`` (names from this module only, never from a request)."""
        columns["updated_at"] = time.time()
        assignments = ", ".join(f"{name} = ?" for name in columns)
        db.execute(
            f"UPDATE endpoints SET {assignments} WHERE vni = ? AND mac = ?",
            (*columns.values(), vni, mac),
        )
        return self._endpoint(db, vni, mac)

    def _check_addresses(
        self, db: sqlite3.Connection, vni: int, mac: str, addresses: Sequence[str]
    ) -> None:
        """Duplicate-address detection: an IP belongs to one MAC per VN."""
        if not addresses:
            return
        params = {"vni": vni, "mac": mac, "ips": json.dumps(list(addresses))}
        holders = db.execute(_HOLDERS_SQL, params).fetchall()
        if holders:
            taken = ", ".join(f"{r['ip']} (held by {r['mac']})" for r in holders)
            raise Conflict(
                f"duplicate address in VNI {vni} for {mac}: {taken}",
                hint="delete or readdress the other endpoint first",
            )

    # ---------------------------------------------------------------- NVEs

    def _do_register_nve(self, nve_id: str, vtep_ip: str, vni_list: list[int]) -> dict[str, Any]:
        with self._tx() as db:
            old = db.execute("SELECT * FROM nves WHERE id = ?", (nve_id,)).fetchone()
            db.execute(
                "INSERT INTO nves (id, vtep, vnis) VALUES (?, ?, ?)"
                " ON CONFLICT (id) DO UPDATE SET vtep = excluded.vtep, vnis = excluded.vnis",
                (nve_id, vtep_ip, json.dumps(vni_list)),
            )
            before = None if old is None else _nve_dict(old)
            for vni, payload in membership_changes(
                before, {"id": nve_id, "vtep": vtep_ip, "vnis": vni_list}
            ):
                self._record(db, self._next_revision(), vni, "nve", payload)
            if old is not None and old["vtep"] != vtep_ip:
                self._announce_vtep_change(db, nve_id)
            return _nve_dict(self._nve_row(db, nve_id))

    def _do_delete_nve(self, nve_id: str) -> dict[str, Any]:
        with self._tx() as db:
            nve = _nve_dict(self._nve_row(db, nve_id))
            busy = db.execute(
                "SELECT vni, mac FROM endpoints WHERE nve = ? OR pending_nve = ?"
                " ORDER BY vni, mac LIMIT 3",
                (nve_id, nve_id),
            ).fetchall()
            if busy:
                raise nve_busy(nve_id, [(r["vni"], r["mac"]) for r in busy])
            db.execute("DELETE FROM nves WHERE id = ?", (nve_id,))
            for vni, payload in membership_changes(nve, None):
                self._record(db, self._next_revision(), vni, "nve", payload)
            return nve

    def _announce_vtep_change(self, db: sqlite3.Connection, nve_id: str) -> None:
        """Peers tunnel to the VTEP, so each endpoint behind a moved VTEP is a change."""
        rows = db.execute(
            "SELECT vni, mac FROM endpoints WHERE nve = ? ORDER BY vni, mac", (nve_id,)
        ).fetchall()
        for row in rows:
            revision = self._next_revision()
            endpoint = self._update_endpoint(db, row["vni"], row["mac"], revision=revision)
            self._record(db, revision, row["vni"], "endpoint", {"endpoint": endpoint})

    def _do_get_nve(self, nve_id: str) -> dict[str, Any]:
        with self._read() as db:
            return _nve_dict(self._nve_row(db, nve_id))

    def _do_list_nves(self, vni: int | None) -> list[dict[str, Any]]:
        with self._read() as db:
            rows = db.execute("SELECT * FROM nves ORDER BY id").fetchall()
        return [_nve_dict(r) for r in rows if vni is None or _serves(r, vni)]

    # ----------------------------------------------------------- endpoints

    def _do_create_endpoint(
        self, vni: int, mac: str, v4: list[str], v6: list[str], nve: str, sticky: bool
    ) -> tuple[dict[str, Any], bool]:
        with self._tx() as db:
            self._serving_nve(db, nve, vni)
            try:
                existing = self._endpoint(db, vni, mac)
            except NotFound:
                pass
            else:
                if same_endpoint(existing, v4, v6, nve, sticky):
                    return existing, False
                raise Conflict(
                    f"endpoint {mac} in VNI {vni} already exists with other addresses or NVE "
                    f"(ipv4={existing['ipv4']}, ipv6={existing['ipv6']}, nve={existing['nve']})",
                    hint="delete it first, or use move to change its NVE",
                )
            self._check_addresses(db, vni, mac, v4 + v6)
            revision = self._next_revision()
            db.execute(
                "INSERT INTO endpoints (vni, mac, ipv4, ipv6, nve, state, seq, revision,"
                " updated_at, sticky) VALUES (?, ?, ?, ?, ?, 'active', 0, ?, ?, ?)",
                (vni, mac, json.dumps(v4), json.dumps(v6), nve, revision, time.time(), sticky),
            )
            endpoint = self._endpoint(db, vni, mac)
            self._record(db, revision, vni, "endpoint", {"endpoint": endpoint})
            return endpoint, True

    def _do_get_endpoint(self, vni: int, mac: str) -> dict[str, Any]:
        with self._read() as db:
            return self._endpoint(db, vni, mac)

    def _do_find(
        self,
        vni: int,
        addr: ipaddress.IPv4Address | ipaddress.IPv6Address | None,
        wanted_mac: str | None,
    ) -> dict[str, Any]:
        with self._read() as db:
            if addr is None:
                assert wanted_mac is not None
                return self._endpoint(db, vni, wanted_mac)
            column = "ipv4" if addr.version == 4 else "ipv6"
            row = db.execute(
                f"{_ENDPOINT_SELECT} WHERE e.vni = ? AND EXISTS"
                f" (SELECT 1 FROM json_each(e.{column}) j WHERE j.value = ?)",
                (vni, str(addr)),
            ).fetchone()
            if row is None or (wanted_mac is not None and row["mac"] != wanted_mac):
                wanted = f"IP {addr}" + (f" and MAC {wanted_mac}" if wanted_mac else "")
                raise NotFound(f"no endpoint in VNI {vni} with {wanted}")
            return _endpoint_dict(row)

    def list_endpoints(self, vni: int | None = None) -> list[dict[str, Any]]:
        """All endpoints, or those of one VN, ordered by (vni, mac)."""
        with self._read() as db:
            if vni is None:
                rows = db.execute(f"{_ENDPOINT_SELECT} ORDER BY e.vni, e.mac").fetchall()
            else:
                rows = db.execute(
                    f"{_ENDPOINT_SELECT} WHERE e.vni = ? ORDER BY e.mac",
                    (check_vni(vni),),
                ).fetchall()
        return [_endpoint_dict(r) for r in rows]

    def _do_delete_endpoint(self, vni: int, mac: str) -> dict[str, Any]:
        with self._tx() as db:
            endpoint = self._endpoint(db, vni, mac)
            db.execute("DELETE FROM endpoints WHERE vni = ? AND mac = ?", (vni, mac))
            endpoint["revision"] = self._next_revision()
            payload = {"mac": mac, "seq": endpoint["seq"], "endpoint": endpoint}
            self._record(db, endpoint["revision"], vni, "endpoint_deleted", payload)
            return endpoint

    # ---------------------------------------------------------- migration

    def _do_prestage(self, vni: int, mac: str, nve: str, migration_id: str) -> dict[str, Any]:
        with self._tx() as db:
            row = self._endpoint_row(db, vni, mac)
            self._serving_nve(db, nve, vni)
            if prestage_is_done(row, vni, mac, nve, migration_id):
                return _endpoint_dict(row)
            check_movable(row, vni, mac, "pre-stage")
            addresses = json.loads(row["ipv4"]) + json.loads(row["ipv6"])
            self._check_addresses(db, vni, mac, addresses)
            return self._update_endpoint(
                db,
                vni,
                mac,
                state="pending",
                pending_nve=nve,
                migration_id=migration_id,
            )

    def _do_commit(self, vni: int, mac: str, migration_id: str) -> dict[str, Any]:
        with self._tx() as db:
            row = self._endpoint_row(db, vni, mac)
            if not commit_is_done(row, vni, mac, migration_id):
                return self._commit_pending(db, row)
            return {
                "endpoint": _endpoint_dict(row),
                "revision": row["last_commit_revision"],
                "committed_at": row["committed_at"],
            }

    def _commit_pending(self, db: sqlite3.Connection, row: sqlite3.Row) -> dict[str, Any]:
        vni, mac = row["vni"], row["mac"]
        revision = self._next_revision()
        committed_at = time.time()
        mobility: dict[str, Any] = {}
        if row["pending_nve"] != row["nve"]:  # not already moved there by its first frame
            decision = decide_move(
                row, row["pending_nve"], committed_at, self.mobility, row["migration_id"]
            )
            mobility = _columns(decision.fields)
        endpoint = self._update_endpoint(
            db,
            vni,
            mac,
            **mobility,
            nve=row["pending_nve"],
            seq=row["seq"] + 1,
            state="active",
            pending_nve=None,
            migration_id=None,
            last_migration_id=row["migration_id"],
            last_commit_revision=revision,
            committed_at=committed_at,
            revision=revision,
        )
        self._record(db, revision, vni, "endpoint", {"endpoint": endpoint})
        return {
            "endpoint": endpoint,
            "revision": revision,
            "committed_at": committed_at,
        }

    def _do_abort(self, vni: int, mac: str, migration_id: str) -> dict[str, Any]:
        with self._tx() as db:
            row = self._endpoint_row(db, vni, mac)
            if abort_is_done(row, vni, mac, migration_id):
                return _endpoint_dict(row)
            return self._update_endpoint(
                db, vni, mac, state="active", pending_nve=None, migration_id=None
            )

    def _do_move(self, vni: int, mac: str, nve: str, seq: int | None) -> dict[str, Any]:
        with self._tx() as db:
            row = self._endpoint_row(db, vni, mac)
            self._serving_nve(db, nve, vni)
            if move_is_done(row, vni, mac, nve, seq):
                return _endpoint_dict(row)
            check_movable(row, vni, mac, f"move to {nve}")
            decision = decide_move(row, nve, time.time(), self.mobility)
            if decision.freeze:
                self._update_endpoint(db, vni, mac, **_columns(decision.fields))
            else:
                revision = self._next_revision()
                endpoint = self._update_endpoint(
                    db,
                    vni,
                    mac,
                    **_columns(decision.fields),
                    nve=nve,
                    seq=row["seq"] + 1,
                    revision=revision,
                )
                self._record(db, revision, vni, "endpoint", {"endpoint": endpoint})
                return endpoint
        assert decision.reason is not None
        raise frozen_error(vni, mac, row["nve"], decision.reason)

    def _do_release(self, vni: int, mac: str) -> dict[str, Any]:
        with self._tx() as db:
            self._endpoint_row(db, vni, mac)
            return self._update_endpoint(
                db, vni, mac, frozen_at=None, frozen_reason=None, moves="[]", last_planned=None
            )

    def _do_expire(self, vni: int, mac: str, targets: list[str]) -> dict[str, Any]:
        with self._tx() as db:
            self._endpoint_row(db, vni, mac)
            for nve in targets:
                self._serving_nve(db, nve, vni)
            revision = 0
            for nve in targets:
                revision = self._next_revision()
                payload = {"mac": mac, "target_nve": nve}
                self._record(db, revision, vni, "expire", payload, target_nve=nve)
            return {"vni": vni, "mac": mac, "nves": targets, "revision": revision}

    # ------------------------------------------------------ watch and acks

    def _do_changes_since(
        self, nve_id: str, revision: int, deadline: float
    ) -> tuple[int, list[dict[str, Any]]]:
        with self._cond:
            self._check_open()
            while True:
                if self._closed:  # closed while we waited: let the watcher go
                    return self._revision, []
                current, changes = self._changes_page(nve_id, revision)
                remaining = deadline - time.monotonic()
                if changes or remaining <= 0:
                    return current, changes
                self._cond.wait(remaining)

    def _changes_page(self, nve_id: str, since: int) -> tuple[int, list[dict[str, Any]]]:
        nve = self._nve_row(self._db, nve_id)
        if since > self._revision:
            raise Conflict(
                f"since={since} is ahead of the directory's revision {self._revision}",
                hint="the directory was reset: resynchronize from a full endpoint list",
            )
        if since < self._pruned:
            raise gone(since, self._pruned)
        rows = self._db.execute(_CHANGES_SQL, (since, nve["vnis"], nve_id, CHANGES_PAGE))
        changes = [_change_dict(r) for r in rows.fetchall()]
        if len(changes) == CHANGES_PAGE:
            return changes[-1]["revision"], changes
        return self._revision, changes

    def _do_ack(self, nve_id: str, revision: int) -> dict[str, Any]:
        with self._tx() as db:
            row = self._nve_row(db, nve_id)
            self._check_ack(nve_id, revision)
            if revision > row["acked_revision"]:
                db.execute(
                    "UPDATE nves SET acked_revision = ?, acked_at = ? WHERE id = ?",
                    (revision, time.time(), nve_id),
                )
                self._acks_cond.notify_all()
            return _nve_dict(self._nve_row(db, nve_id))

    def _check_ack(self, nve_id: str, revision: int) -> None:
        if revision > self._revision:
            raise Conflict(
                f"NVE '{nve_id}' acked revision {revision}, but the directory is at "
                f"{self._revision}",
                hint="the directory was reset: resynchronize from a full endpoint list",
            )

    def _do_ack_many(self, acks: dict[str, int]) -> dict[str, Any]:
        errors = self.record_acks(acks)
        with self._read() as db:
            acked = {
                n: _nve_dict(r) for n in acks if n not in errors for r in [self._nve_row(db, n)]
            }
        return {"acked": acked, "errors": errors}

    def record_acks(self, acks: dict[str, int]) -> dict[str, str]:
        """Write a batch of checked acks in one transaction; {nve: why refused}.

        What the stream hub calls for every select round of acks: one query
        for the batch's current acks, one ``executemany``, one wake-up of the
        ack waiters, and no per-NVE dict (py-spy had building those as the
        hub's largest cost after reading the sockets).
        """
        errors: dict[str, str] = {}
        if not acks:
            return errors
        with self._tx() as db:
            now = time.time()
            current: dict[str, int] = {}
            ids = list(acks)
            for start in range(0, len(ids), 500):
                chunk = ids[start : start + 500]
                marks = ",".join("?" * len(chunk))
                current.update(
                    db.execute(
                        f"SELECT id, acked_revision FROM nves WHERE id IN ({marks})", chunk
                    ).fetchall()
                )
            updates = []
            for nve_id, revision in acks.items():
                if nve_id not in current:
                    errors[nve_id] = f"no NVE '{nve_id}' is registered"
                elif revision > self._revision:
                    errors[nve_id] = (
                        f"NVE '{nve_id}' acked revision {revision}, but the directory is at "
                        f"{self._revision}"
                    )
                elif revision > current[nve_id]:
                    updates.append((revision, now, nve_id))
            if updates:
                db.executemany(
                    "UPDATE nves SET acked_revision = ?, acked_at = ? WHERE id = ?", updates
                )
                self._acks_cond.notify_all()
        return errors

    def _do_acks(
        self, vni: int, min_revision: int, wanted: list[str] | None, deadline: float
    ) -> dict[str, dict[str, Any]]:
        with self._cond:
            if min_revision > self._revision:
                raise Conflict(
                    f"min_revision {min_revision} is ahead of the directory's revision "
                    f"{self._revision}"
                )
            while True:
                if self._closed:
                    raise NvaError("the NVA store is closed")
                state = self._ack_state(vni, wanted)
                done = all(a["acked_revision"] >= min_revision for a in state.values())
                remaining = deadline - time.monotonic()
                if done or remaining <= 0:
                    return state
                self._acks_cond.wait(remaining)

    def _ack_state(self, vni: int, wanted: list[str] | None) -> dict[str, dict[str, Any]]:
        """One query per look, however many NVEs: a waiter looks again after every ack
        batch, and a query per NVE made that quadratic in the VN's size."""
        if wanted is None:
            rows = self._db.execute(
                "SELECT id, acked_revision, acked_at FROM nves WHERE EXISTS"
                " (SELECT 1 FROM json_each(nves.vnis) j WHERE j.value = ?) ORDER BY id",
                (vni,),
            ).fetchall()
            found = {r["id"]: r for r in rows}
            order = list(found)
        else:
            found = {}
            for start in range(0, len(wanted), 500):
                chunk = wanted[start : start + 500]
                marks = ",".join("?" * len(chunk))
                for r in self._db.execute(
                    f"SELECT id, acked_revision, acked_at FROM nves WHERE id IN ({marks})", chunk
                ):
                    found[r["id"]] = r
            for nve_id in wanted:
                if nve_id not in found:
                    self._nve_row(self._db, nve_id)  # NotFound, as before
            order = wanted
        return {
            n: {"acked_revision": found[n]["acked_revision"], "acked_at": found[n]["acked_at"]}
            for n in order
        }
