"""DHCP-snooping bindings (IP, MAC, port, lease) and the anti-spoof filter
they drive.

A snooping switch learns from the DHCPACKs it forwards which address was
leased to which MAC on which port, and from then on passes from that port
only ARP and IP whose source matches a binding (IP source guard, dynamic
ARP inspection). The lease is not renewed at a migration, so without the
binding the destination drops everything the VM sends until its next
renewal: minutes to hours.

Here the binding table is the ``bindings_v4/v6`` sets of the host's
``bridge vmm_port`` table, keyed ``port . MAC . IP`` with the lease as the
element's timeout, and ``snooped_ports`` says which ports the filter guards
(see :mod:`vmm_lab.firewall`). Both move: the bindings, and the fact that
the VM's port is guarded, so a destination whose port profile forgot
snooping still enforces it rather than letting the VM spoof.

Entry shapes (JSON)::

    {"type": "binding", "port": "tap-vm1", "mac": "52:54:00:00:64:0a",
     "ip": "198.19.100.10", "lease": 3600, "expires": 1187, "age": s (optional)}
    {"type": "port", "port": "tap-vm1"}      (the port is guarded on the source)

A binding belongs to the VM only if port, MAC and IP are all the VM's own
(the same NIC's).
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator
from typing import Any, ClassVar

from oslo_config import cfg

from vmm_orchestrator.model import normalize_mac
from vmm_orchestrator.statekind import ImportResult, KindContext, Reason
from vmm_state.kinds import _nft
from vmm_state.kinds._common import (
    ip_text,
    max_entries_opt,
    own_ip,
    own_mac,
    require,
    seconds,
    vif_for_port,
)
from vmm_state.kinds._watch import GenerationReader, Settled, SettlesWhole
from vmm_state.kinds.nftsets import ElementKind


class DhcpSnoopingKind(SettlesWhole, ElementKind):
    """The VM's DHCP-snooping bindings and its port's enforcement."""

    name = "dhcp_snooping"
    default_max_entries = 64
    opts: ClassVar[list[cfg.Opt]] = [
        max_entries_opt(64, "DHCP-snooping bindings"),
        cfg.StrOpt(
            "table",
            default="bridge:vmm_port",
            help="family:table of the nftables table that holds the binding sets and "
            "the set of guarded ports.",
        ),
        cfg.ListOpt(
            "binding_sets",
            default=["bindings_v4", "bindings_v6"],
            help="Sets of bindings, each keyed ifname . ether_addr . ipv4_addr (or "
            "ipv6_addr), with the lease as element timeout.",
        ),
        cfg.StrOpt(
            "ports_set",
            default="snooped_ports",
            help="Set of the port names the anti-spoof filter guards (type ifname).",
        ),
    ]

    def __init__(self, conf: cfg.ConfigOpts) -> None:
        super().__init__(conf)
        self._lock = threading.Lock()
        #: source: migrations tracked, what their destination holds (by ruleset generation)
        self._tracked: dict[str, GenerationReader] = {}
        self._settled = Settled()
        self._figures: dict[str, dict[str, Any]] = {}

    @property
    def table(self) -> tuple[str, str]:
        family, _, table = self.conf[self.group].table.partition(":")
        return family, table

    # -- change check (source) ---------------------------------------------------
    #
    # The bindings are written by the snooper (a control plane): each change is an
    # nftables transaction and raises the ruleset generation. A delta while the
    # generation is the one of the export the destination holds is empty, and
    # costs one netlink round trip instead of the listings (:mod:`._watch`).

    def track(self, ctx: KindContext) -> None:
        reader = GenerationReader(ctx.netns)
        with contextlib.suppress(OSError):  # opened now, outside the pause (else at the read)
            reader.read()
        with self._lock:
            old = self._tracked.pop(ctx.migration_id, None)
            self._tracked[ctx.migration_id] = reader
        if old is not None:
            old.close()

    def untrack(self, migration_id: str) -> None:
        with self._lock:
            reader = self._tracked.pop(migration_id, None)
            self._figures.pop(migration_id, None)
        if reader is not None:
            reader.close()
        self._settled.forget(migration_id)

    def set_names(self) -> list[tuple[str, str, str]]:
        family, table = self.table
        names = [*self.conf[self.group].binding_sets, self.conf[self.group].ports_set]
        return [(family, table, n) for n in names]

    def _ports_set(self) -> tuple[str, str, str]:
        return (*self.table, self.conf[self.group].ports_set)

    # -- export ------------------------------------------------------------

    def export(self, ctx: KindContext, since: float | None = None) -> Iterator[dict[str, Any]]:
        """The VM's bindings (port, MAC and IP its own) and its port's guard; for a
        delta, nothing if no nftables transaction ran here since what the
        destination holds."""
        mid = ctx.migration_id
        with self._lock:
            reader = self._tracked.get(mid)
        if reader is not None:
            at = time.monotonic()
            try:
                generation: int | None = reader.read()
            except OSError:
                generation = None
            if generation is not None:
                self._settled.seen(mid, at, generation)
                if since is not None and self._settled.base(mid) == generation:
                    with self._lock:
                        self._figures[mid] = {"mode": "delta", "changed": 0, "listed": False}
                    return
            with self._lock:
                self._figures[mid] = {"mode": "full" if since is None else "whole"}
        yield from self._listed(ctx)

    def _listed(self, ctx: KindContext) -> Iterator[dict[str, Any]]:
        ports = {v.port for v in ctx.vifs if v.port}
        _, guarded = _nft.list_set(ctx.netns, *self._ports_set())
        for elem in guarded:
            if elem["key"][0] in ports:
                yield {"type": "port", "port": elem["key"][0]}
        for family, table, name in self.set_names()[:-1]:
            _, elements = _nft.list_set(ctx.netns, family, table, name)
            for elem in elements:
                port, mac, ip = elem["key"]
                if not self._mine(ctx, port, mac, ip):
                    continue
                yield {
                    "type": "binding",
                    "port": port,
                    "mac": mac,
                    "ip": ip,
                    "lease": elem["timeout"],
                    "expires": elem["expires"],
                }

    @staticmethod
    def _mine(ctx: KindContext, port: Any, mac: Any, ip: Any) -> bool:
        for vif in ctx.vifs:
            try:
                if (
                    vif.port == port
                    and vif.mac == normalize_mac(str(mac))
                    and ip_text(ip) in (*vif.ipv4, *vif.ipv6)
                ):
                    return True
            except ValueError:
                return False
        return False

    # -- check -------------------------------------------------------------

    def check(self, ctx: KindContext, entry: dict[str, Any]) -> None:
        require(entry, "type", "port")
        vif = vif_for_port(ctx, entry["port"])
        if entry["type"] == "port":
            return
        if entry["type"] != "binding":
            raise ValueError(f"unknown entry type {entry['type']!r}")
        require(entry, "mac", "ip")
        own_mac(ctx, entry["mac"], vif)
        own_ip(ctx, entry["ip"], vif)
        for what in ("lease", "expires"):
            if entry.get(what) is not None:
                seconds(entry[what], what)

    # -- import ------------------------------------------------------------

    def _binding_set(self, ip: str) -> tuple[str, str, str]:
        family, table = self.table
        sets = self.conf[self.group].binding_sets
        version = 4 if ":" not in ip else 6
        for name in sets:
            if name.endswith(f"v{version}"):
                return family, table, name
        return family, table, sets[0 if version == 4 else -1]

    def import_(self, ctx: KindContext, entries: list[dict[str, Any]]) -> ImportResult:
        refused = self.too_many(len(entries))
        if refused:
            return refused
        wanted = []
        ports = []
        for e in entries:
            if e["type"] == "port":
                ports.append(e["port"])
                continue
            ip = ip_text(e["ip"])
            key = [e["port"], normalize_mac(e["mac"]), ip]
            element = {"timeout": e.get("lease"), "expires": e.get("expires"), "age": e.get("age")}
            wanted.append((self._binding_set(ip), key, element))
        try:
            info, guarded = _nft.list_set(ctx.netns, *self._ports_set())
        except (OSError, LookupError) as exc:
            return ImportResult.fail(self.name, Reason.UNSUPPORTED, f"no guarded-ports set: {exc}")
        have = {json.dumps(e["key"]) for e in guarded}
        new_ports = sorted({p for p in ports if json.dumps([p]) not in have})
        lines = [
            _nft.add_line(info, _nft.element_text(info, [p], None, None, {})) for p in new_ports
        ]
        return self.install_elements(ctx, wanted, lines, {"ports_added": new_ports})

    def revert_import(self, ctx: KindContext, record: dict[str, Any]) -> None:
        self.revert_elements(ctx, record)
        ports = record.get("ports_added", [])
        if ports:
            info, _ = _nft.list_set(ctx.netns, *self._ports_set())
            _nft.delete_present(ctx.netns, info, [[p] for p in ports])

    def cleanup_source(self, ctx: KindContext) -> None:
        """Remove the VM's bindings, and the guard of its (departed) port."""
        for family, table, name in self.set_names()[:-1]:
            info, elements = _nft.list_set(ctx.netns, family, table, name)
            keys = [e["key"] for e in elements if self._mine(ctx, *e["key"])]
            _nft.delete_present(ctx.netns, info, keys)
        info, _ = _nft.list_set(ctx.netns, *self._ports_set())
        _nft.delete_present(ctx.netns, info, [[v.port] for v in ctx.vifs if v.port])
