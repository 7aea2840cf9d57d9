"""802.1X / MAB authorization: the authorized MAC on a locked port and the
dynamic ACL the authentication installed for the VM.

An 802.1X-controlled port drops every frame until the authenticator
authorizes the supplicant's MAC; the RADIUS answer may carry an ACL that the
switch fills in with the VM's address (the "dynamic ACL" of the bridge
drafts). Neither is in the VM's static port profile, so after a migration
the destination treats the VM as unauthenticated and drops it until it logs
in again.

Here (see :mod:`vmm_lab.firewall`) the port is a kernel locked bridge port
(``bridge link set dev PORT locked on``: frames from a source MAC without an
FDB entry on that port are dropped), the authorization is a static FDB
entry of the VM's MAC on its port, and the dynamic ACL is the elements of
``dacl_v4/v6`` in ``bridge vmm_port`` for the port, guarded by
``dacl_ports``. On import the destination port is locked and guarded if the
source's was, so the VM never arrives less restricted than it left.

Entry shapes (JSON)::

    {"type": "authorized", "vni": 100, "port": "tap-vm1",
     "mac": "52:54:00:00:64:0a", "vid": 10 (optional)}
    {"type": "acl", "port": "tap-vm1", "ip": "198.19.100.10",
     "proto": "tcp", "service": 443, "timeout": 3600, "expires": 3502,
     "age": seconds since export (optional)}
    {"type": "acl_port", "port": "tap-vm1"}     (the port enforces a dynamic ACL)

Only a locked port's static entries are authorizations; on an open port the
same entry is mere forwarding state (the NVE's) and is not exported.
"""

from __future__ import annotations

import errno
import json
from collections.abc import Iterator
from typing import Any, ClassVar

from oslo_config import cfg

from vmm_kernel.netns import CommandFailed, run
from vmm_orchestrator.model import Vif, normalize_mac
from vmm_orchestrator.statekind import ImportResult, KindContext, PoisonedEntry, Reason
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
from vmm_state.kinds.nftsets import ElementKind

PROTOCOLS = ("tcp", "udp", "sctp", "udplite", "dccp")


class Dot1xKind(ElementKind):
    """Locked-port authorization and the per-VM dynamic ACL."""

    name = "dot1x"
    default_max_entries = 1024
    opts: ClassVar[list[cfg.Opt]] = [
        max_entries_opt(1024, "802.1X entries (authorized MACs and dynamic ACL lines)"),
        cfg.StrOpt(
            "table",
            default="bridge:vmm_port",
            help="family:table of the nftables table holding the dynamic-ACL sets.",
        ),
        cfg.ListOpt(
            "acl_sets",
            default=["dacl_v4", "dacl_v6"],
            help="Dynamic-ACL sets, keyed ifname . ipv4_addr (or ipv6_addr) . inet_proto "
            ". inet_service, with the session timeout as element timeout.",
        ),
        cfg.StrOpt(
            "ports_set",
            default="dacl_ports",
            help="Set of the port names that enforce a dynamic ACL (type ifname).",
        ),
    ]

    @property
    def table(self) -> tuple[str, str]:
        family, _, table = self.conf[self.group].table.partition(":")
        return family, table

    def set_names(self) -> list[tuple[str, str, str]]:
        family, table = self.table
        names = [*self.conf[self.group].acl_sets, self.conf[self.group].ports_set]
        return [(family, table, n) for n in names]

    def _acl_set(self, ip: str) -> tuple[str, str, str]:
        family, table = self.table
        sets = self.conf[self.group].acl_sets
        version = 6 if ":" in ip else 4
        return family, table, next((s for s in sets if s.endswith(f"v{version}")), sets[0])

    # -- the bridge port -----------------------------------------------------

    @staticmethod
    def _port(ctx: KindContext, port: str) -> dict[str, Any] | None:
        try:
            out = run(ctx.netns, "bridge", "-j", "-d", "link", "show", "dev", port)
        except CommandFailed:
            return None
        found = json.loads(out or "[]")
        return found[0] if found else None

    @staticmethod
    def _authorized(ctx: KindContext, vif: Vif) -> list[dict[str, Any]]:
        """Static, unlocked FDB entries of the VM's MAC on its port."""
        out = run(
            ctx.netns,
            "bridge",
            "-j",
            "fdb",
            "show",
            "br",
            ctx.bridge_for(vif.vni),
            "brport",
            str(vif.port),
        )
        return [
            e
            for e in json.loads(out or "[]")
            if e.get("mac") == vif.mac
            and e.get("state") == "static"
            and "locked" not in e.get("flags", [])
            and "self" not in e.get("flags", [])
        ]

    # -- export ------------------------------------------------------------

    def export(self, ctx: KindContext, since: float | None = None) -> Iterator[dict[str, Any]]:
        for vif in ctx.vifs:
            port = self._port(ctx, str(vif.port)) if vif.port else None
            if not port or not port.get("locked"):
                continue
            for fdb in self._authorized(ctx, vif):
                entry: dict[str, Any] = {
                    "type": "authorized",
                    "vni": vif.vni,
                    "port": vif.port,
                    "mac": vif.mac,
                }
                if fdb.get("vlan"):
                    entry["vid"] = int(fdb["vlan"])
                yield entry
        ports = {v.port for v in ctx.vifs}
        family, table = self.table
        _, guarded = _nft.list_set(ctx.netns, family, table, self.conf[self.group].ports_set)
        for elem in guarded:
            if elem["key"][0] in ports:
                yield {"type": "acl_port", "port": elem["key"][0]}
        for name in self.conf[self.group].acl_sets:
            _, elements = _nft.list_set(ctx.netns, family, table, name)
            for elem in elements:
                port, ip, proto, service = elem["key"]
                if not self._mine(ctx, port, ip):
                    continue
                yield {
                    "type": "acl",
                    "port": port,
                    "ip": ip,
                    "proto": proto,
                    "service": service,
                    "timeout": elem["timeout"],
                    "expires": elem["expires"],
                }

    @staticmethod
    def _mine(ctx: KindContext, port: Any, ip: Any) -> bool:
        try:
            address = ip_text(ip)
        except ValueError:
            return False
        return any(v.port == port and address in (*v.ipv4, *v.ipv6) for v in ctx.vifs)

    # -- check -------------------------------------------------------------

    def check(self, ctx: KindContext, entry: dict[str, Any]) -> None:
        require(entry, "type", "port")
        vif = vif_for_port(ctx, entry["port"])
        kind = entry["type"]
        if kind == "acl_port":
            return
        if kind == "authorized":
            require(entry, "vni", "mac")
            if entry["vni"] != vif.vni:
                raise PoisonedEntry(f"port {vif.port} is on VN {vif.vni}, not {entry['vni']}")
            own_mac(ctx, entry["mac"], vif)
            vid = entry.get("vid")
            if vid is not None and (
                isinstance(vid, bool) or not isinstance(vid, int) or not 0 < vid < 4095
            ):
                raise ValueError(f"bad vid {vid!r}")
            return
        if kind != "acl":
            raise ValueError(f"unknown entry type {kind!r}")
        require(entry, "ip", "proto", "service")
        own_ip(ctx, entry["ip"], vif)
        if entry["proto"] not in PROTOCOLS:
            raise ValueError(f"proto must be one of {PROTOCOLS}, got {entry['proto']!r}")
        service = entry["service"]
        if isinstance(service, bool) or not isinstance(service, int) or not 0 <= service < 65536:
            raise ValueError(f"bad service port {service!r}")
        for what in ("timeout", "expires"):
            if entry.get(what) is not None:
                seconds(entry[what], what)

    # -- import ------------------------------------------------------------

    def import_(self, ctx: KindContext, entries: list[dict[str, Any]]) -> ImportResult:
        refused = self.too_many(len(entries))
        if refused:
            return refused
        family, table = self.table
        try:
            ports_info, guarded = _nft.list_set(
                ctx.netns, family, table, self.conf[self.group].ports_set
            )
        except (OSError, LookupError) as exc:
            return ImportResult.fail(self.name, Reason.UNSUPPORTED, f"no dynamic-ACL sets: {exc}")
        have = {e["key"][0] for e in guarded}
        guard = sorted({e["port"] for e in entries if e["type"] == "acl_port"} - have)
        lines = [
            _nft.add_line(ports_info, _nft.element_text(ports_info, [p], None, None, {}))
            for p in guard
        ]
        wanted = []
        for e in entries:
            if e["type"] == "acl":
                ip = ip_text(e["ip"])
                key = [e["port"], ip, e["proto"], e["service"]]
                element = {
                    "timeout": e.get("timeout"),
                    "expires": e.get("expires"),
                    "age": e.get("age"),
                }
                wanted.append((self._acl_set(ip), key, element))
        # Layer 2 first: lock the ports and authorize the MACs, remembering what we did.
        l2: dict[str, Any] = {"locked": [], "fdb": []}
        try:
            self._authorize(ctx, [e for e in entries if e["type"] == "authorized"], l2)
        except CommandFailed as exc:
            self._unauthorize(ctx, l2)
            return self.refused(exc.errno or errno.EINVAL, f"could not authorize: {exc}")
        except _NotPlugged as exc:
            self._unauthorize(ctx, l2)
            return ImportResult.fail(self.name, Reason.UNSUPPORTED, str(exc))
        result = self.install_elements(ctx, wanted, lines, {"ports_added": guard, **l2})
        if not result.ok:
            self._unauthorize(ctx, l2)
        else:
            result.installed += len(l2["fdb"])
        return result

    def _authorize(
        self, ctx: KindContext, entries: list[dict[str, Any]], done: dict[str, Any]
    ) -> None:
        for e in entries:
            vif = vif_for_port(ctx, e["port"])
            port = self._port(ctx, str(vif.port))
            if not port or port.get("master") != ctx.bridge_for(vif.vni):
                raise _NotPlugged(
                    f"port {vif.port} is not a port of {ctx.bridge_for(vif.vni)} on this host "
                    "yet: authorizations can only be imported once the VM's port is plugged"
                )
            if not port.get("locked"):
                run(ctx.netns, "bridge", "link", "set", "dev", str(vif.port), "locked", "on")
                done["locked"].append(vif.port)
            if self._authorized(ctx, vif):
                continue  # already authorized here (or the NVE pinned it to the port)
            argv = ["bridge", "fdb", "replace", normalize_mac(e["mac"]), "dev", str(vif.port)]
            argv += ["master", "static"]
            if e.get("vid"):
                argv += ["vlan", str(int(e["vid"]))]
            run(ctx.netns, *argv)
            done["fdb"].append(
                {"vni": vif.vni, "port": vif.port, "mac": vif.mac, "vid": e.get("vid")}
            )

    @staticmethod
    def _unauthorize(ctx: KindContext, done: dict[str, Any]) -> None:
        for fdb in done.get("fdb", []):
            argv = ["bridge", "fdb", "del", fdb["mac"], "dev", fdb["port"], "master"]
            if fdb.get("vid"):
                argv += ["vlan", str(int(fdb["vid"]))]
            run(ctx.netns, *argv, check=False)
        for port in done.get("locked", []):
            run(ctx.netns, "bridge", "link", "set", "dev", port, "locked", "off", check=False)

    def revert_import(self, ctx: KindContext, record: dict[str, Any]) -> None:
        self.revert_elements(ctx, record)
        ports = record.get("ports_added", [])
        if ports:
            family, table = self.table
            info, _ = _nft.list_set(ctx.netns, family, table, self.conf[self.group].ports_set)
            _nft.delete_present(ctx.netns, info, [[p] for p in ports])
        self._unauthorize(ctx, record)

    def cleanup_source(self, ctx: KindContext) -> None:
        """Remove the departed VM's ACL lines and any authorization left on its port."""
        family, table = self.table
        for name in self.conf[self.group].acl_sets:
            info, elements = _nft.list_set(ctx.netns, family, table, name)
            keys = [e["key"] for e in elements if self._mine(ctx, e["key"][0], e["key"][1])]
            _nft.delete_present(ctx.netns, info, keys)
        info, _ = _nft.list_set(ctx.netns, family, table, self.conf[self.group].ports_set)
        _nft.delete_present(ctx.netns, info, [[v.port] for v in ctx.vifs if v.port])
        for vif in ctx.vifs:
            port = self._port(ctx, str(vif.port)) if vif.port else None
            if port and port.get("locked"):
                for fdb in self._authorized(ctx, vif):
                    argv = ["bridge", "fdb", "del", vif.mac, "dev", str(vif.port), "master"]
                    if fdb.get("vlan"):
                        argv += ["vlan", str(fdb["vlan"])]
                    run(ctx.netns, *argv, check=False)


class _NotPlugged(Exception):
    """The VM's port is not on its bridge here yet."""
