"""Multicast membership: the bridge's mdb entries of the VM's port.

With IGMP/MLD snooping a bridge sends a group's traffic only to ports that
reported membership (and routers). A guest reports when it joins and when
a querier asks; after a migration nobody asks for a while (the general
query interval is 125 s) and the guest has no reason to report, so the new
port does not receive its groups until then. The VM's mdb entries move with
it instead.

Entry shape (JSON)::

    {"vni": 100, "port": "tap-vm1", "group": "239.1.2.3",
     "source": "198.19.100.1" (an (S,G) entry; optional), "vid": 10 (optional),
     "state": "temp" | "permanent", "timer": 259.3 (seconds left; temp only),
     "age": seconds since export (optional, set by a carrier)}

What the kernel does (measured on 6.18): an mdb entry added from user space
as ``temp`` gets the bridge's full membership interval (260 s by default)
whatever the source's timer said - netlink has no attribute to set it - the
way a switch restarts the timer on a report. Exported timers are therefore
informational; an entry whose timer has run out is not installed. The port
must be a port of the VN's bridge when the entries are imported.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any, ClassVar

from oslo_config import cfg

from vmm_kernel.netns import CommandFailed, run
from vmm_orchestrator.model import Vif, normalize_mac
from vmm_orchestrator.statekind import ImportResult, KindContext, PoisonedEntry, Reason
from vmm_state.kinds._common import (
    BaseKind,
    max_entries_opt,
    remaining,
    require,
    vif_for_port,
)
from vmm_state.kinds._watch import MdbWatch, Settled, SettlesWhole

LOG = logging.getLogger(__name__)


def _group(value: Any) -> str:
    """A multicast group (IPv4/IPv6, or a multicast MAC), normalised."""
    if not isinstance(value, str):
        raise ValueError(f"not a multicast group: {value!r}")
    try:
        addr = ipaddress.ip_address(value)
    except ValueError:
        mac = normalize_mac(value)
        if not int(mac[:2], 16) & 1:
            raise ValueError(f"{value} is not a multicast MAC address") from None
        return mac
    if not addr.is_multicast:
        raise ValueError(f"{value} is not a multicast address")
    return str(addr)


def _source(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"not a source address: {value!r}")
    addr = ipaddress.ip_address(value)
    if addr.is_multicast or addr.is_unspecified:
        raise ValueError(f"{value} is not a unicast source")
    return str(addr)


def _ident(entry: dict[str, Any]) -> tuple[Any, ...]:
    return (entry["port"], entry["group"], entry.get("source"), entry.get("vid"))


class MdbKind(SettlesWhole, BaseKind):
    """IGMP/MLD snooping membership of the VM's port."""

    name = "mdb"
    default_max_entries = 512
    opts: ClassVar[list[cfg.Opt]] = [
        max_entries_opt(512, "multicast memberships (mdb entries)"),
    ]

    def __init__(self, conf: cfg.ConfigOpts) -> None:
        super().__init__(conf)
        self._lock = threading.Lock()
        #: source: migration -> the namespace's mdb notifications since its tracking began
        self._watches: dict[str, MdbWatch] = {}
        self._settled = Settled()
        self._figures: dict[str, dict[str, Any]] = {}

    # -- change check (source) ---------------------------------------------------

    def track(self, ctx: KindContext) -> None:
        """Listen to the bridge's membership notifications before the pre-copy's
        listing: a delta with none since the transfer the destination holds is
        empty, and costs no listing (:mod:`._watch`)."""
        watch = MdbWatch(ctx.netns)
        with self._lock:
            old = self._watches.pop(ctx.migration_id, None)
            self._watches[ctx.migration_id] = watch
        if old is not None:
            old.close()

    def untrack(self, migration_id: str) -> None:
        with self._lock:
            watch = self._watches.pop(migration_id, None)
            self._figures.pop(migration_id, None)
        self._settled.forget(migration_id)
        if watch is not None:
            watch.close()

    def unavailable(self, ctx: KindContext) -> str | None:
        for vni in sorted({v.vni for v in ctx.vifs}):
            info = self._bridge(ctx, vni)
            if info is None:
                return f"no bridge {ctx.bridge_for(vni)} in {ctx.netns or 'this namespace'}"
            if not info.get("linkinfo", {}).get("info_data", {}).get("mcast_snooping", 1):
                return f"multicast snooping is off on {ctx.bridge_for(vni)}"
        return None

    @staticmethod
    def _bridge(ctx: KindContext, vni: int) -> dict[str, Any] | None:
        try:
            out = run(ctx.netns, "ip", "-j", "-d", "link", "show", "dev", ctx.bridge_for(vni))
        except CommandFailed:
            return None
        found = json.loads(out)
        return found[0] if found else None

    def _entries(self, ctx: KindContext, vni: int) -> list[dict[str, Any]]:
        """Every mdb entry of the VN's bridge, in entry shape (all ports)."""
        try:
            out = run(
                ctx.netns, "bridge", "-j", "-d", "-s", "mdb", "show", "dev", ctx.bridge_for(vni)
            )
        except CommandFailed:
            return []
        found = []
        for block in json.loads(out or "[]"):
            for raw in block.get("mdb", []):
                entry: dict[str, Any] = {
                    "vni": vni,
                    "port": raw["port"],
                    "group": raw["grp"],
                    "state": raw.get("state", "temp"),
                }
                if raw.get("src"):
                    entry["source"] = raw["src"]
                if raw.get("vid"):
                    entry["vid"] = int(raw["vid"])
                if entry["state"] == "temp":
                    entry["timer"] = float(str(raw.get("timer", "0")).strip() or 0)
                found.append(entry)
        return found

    # -- export ------------------------------------------------------------

    def export(self, ctx: KindContext, since: float | None = None) -> Iterator[dict[str, Any]]:
        """Memberships of the VM's ports (a delta is the whole set, or nothing when
        no membership changed in the namespace since what the destination holds)."""
        mid = ctx.migration_id
        with self._lock:
            watch = self._watches.get(mid)
        if watch is not None:
            changed = watch.changed_at()  # drained first: what it read, the listing has
            at = time.monotonic()
            self._settled.seen(mid, at, at)
            base = self._settled.base(mid)
            if since is not None and (changed is None or (base is not None and changed < base)):
                with self._lock:
                    self._figures[mid] = {"mode": "delta", "changed": 0, "listed": False}
                return
        count = 0
        for entry in self._listed(ctx):
            count += 1
            yield entry
        if watch is not None:
            with self._lock:
                mode = "full" if since is None else "whole"
                self._figures[mid] = {"mode": mode, "entries": count}

    def _listed(self, ctx: KindContext) -> Iterator[dict[str, Any]]:
        for vif in ctx.vifs:
            for entry in self._entries(ctx, vif.vni):
                if entry["port"] == vif.port:
                    yield entry

    # -- check -------------------------------------------------------------

    def check(self, ctx: KindContext, entry: dict[str, Any]) -> None:
        require(entry, "vni", "port", "group", "state")
        vif = vif_for_port(ctx, entry["port"])
        if entry["vni"] != vif.vni:
            raise PoisonedEntry(f"port {vif.port} is on VN {vif.vni}, not {entry['vni']}")
        _group(entry["group"])
        if entry.get("source") is not None:
            _source(entry["source"])
        if entry["state"] not in ("temp", "permanent"):
            raise ValueError(f"state must be temp or permanent, got {entry['state']!r}")
        vid = entry.get("vid")
        if vid is not None and (
            isinstance(vid, bool) or not isinstance(vid, int) or not 0 < vid < 4095
        ):
            raise ValueError(f"bad vid {vid!r}")

    # -- import ------------------------------------------------------------

    @staticmethod
    def _line(op: str, bridge: str, entry: dict[str, Any]) -> str:
        line = f"mdb {op} dev {bridge} port {entry['port']} grp {_group(entry['group'])}"
        if entry.get("source"):
            line += f" src {_source(entry['source'])}"
        if entry.get("vid"):
            line += f" vid {int(entry['vid'])}"
        if op == "add":
            line += " permanent" if entry["state"] == "permanent" else " temp"
        return line

    def _on_bridge(self, ctx: KindContext, vif: Vif) -> bool:
        try:
            out = run(ctx.netns, "ip", "-j", "link", "show", "dev", str(vif.port))
        except CommandFailed:
            return False
        links = json.loads(out)
        return bool(links) and links[0].get("master") == ctx.bridge_for(vif.vni)

    def import_(self, ctx: KindContext, entries: list[dict[str, Any]]) -> ImportResult:
        refused = self.too_many(len(entries))
        if refused:
            return refused
        lines: list[str] = []
        added: list[dict[str, Any]] = []
        expired = 0
        by_vni: dict[int, list[dict[str, Any]]] = {}
        for entry in entries:
            by_vni.setdefault(entry["vni"], []).append(entry)
        for vni, items in by_vni.items():
            bridge = ctx.bridge_for(vni)
            info = self._bridge(ctx, vni)
            if info is None:
                return ImportResult.fail(self.name, Reason.UNSUPPORTED, f"no bridge {bridge}")
            for port in sorted({e["port"] for e in items}):
                if not self._on_bridge(ctx, vif_for_port(ctx, port)):
                    return ImportResult.fail(
                        self.name,
                        Reason.UNSUPPORTED,
                        f"port {port} is not a port of {bridge} on this host yet: mdb entries "
                        "can only be imported once the VM's port is plugged",
                    )
            present = {_ident(e) for e in self._entries(ctx, vni)}
            room = int(info.get("linkinfo", {}).get("info_data", {}).get("mcast_hash_max", 4096))
            fresh = []
            for entry in items:
                if entry["state"] == "temp" and remaining(entry.get("timer", 0), entry) <= 0:
                    expired += 1
                    continue
                if _ident(entry) in present:
                    continue  # the host has it already (its own, or reported again)
                fresh.append(entry)
            if len(present) + len(fresh) > room:
                return ImportResult.fail(
                    self.name,
                    Reason.RESOURCE_LIMIT,
                    f"{bridge} holds {len(present)} mdb entries of mcast_hash_max {room}; "
                    f"{len(fresh)} more do not fit",
                )
            lines += [self._line("add", bridge, e) for e in fresh]
            added += fresh
        if lines:
            try:
                run(ctx.netns, "bridge", "-batch", "-", input_="\n".join(lines) + "\n")
            except CommandFailed as exc:
                self._delete(ctx, added)
                return self.refused(exc.errno or errno.EINVAL, f"bridge refused: {exc}")
        record = {
            "added": [
                {k: e[k] for k in ("vni", "port", "group", "source", "vid", "state") if k in e}
                for e in added
            ]
        }
        result = ImportResult.success(self.name, len(added), record)
        if expired:
            result.detail = f"{expired} expired membership(s) left out"
        return result

    def _delete(self, ctx: KindContext, entries: list[dict[str, Any]]) -> None:
        """Delete those of ``entries`` that are present (one may have aged out)."""
        by_vni: dict[int, list[dict[str, Any]]] = {}
        for entry in entries:
            by_vni.setdefault(entry["vni"], []).append(entry)
        for vni, items in by_vni.items():
            present = {_ident(e) for e in self._entries(ctx, vni)}
            lines = [
                self._line("del", ctx.bridge_for(vni), e) for e in items if _ident(e) in present
            ]
            if lines:
                run(
                    ctx.netns,
                    "bridge",
                    "-force",
                    "-batch",
                    "-",
                    input_="\n".join(lines) + "\n",
                    check=False,
                )

    def revert_import(self, ctx: KindContext, record: dict[str, Any]) -> None:
        self._delete(ctx, record.get("added", []))

    def cleanup_source(self, ctx: KindContext) -> None:
        """Forget the departed VM's memberships (they go with the port anyway)."""
        self._delete(ctx, list(self._listed(ctx)))
