"""The ``ovn_conntrack`` state kind: a VM's OVN security-group sessions.

Plugs :mod:`vmm_ovn.conntrack` into the state service's kind contract
(``vmm_state.kinds`` entry point), so the state stages carry the entries
from the source chassis to the destination like every other kind:
export = the VM's entries of its port's zone on this chassis
(``dpctl/dump-conntrack``), import = ``ct(commit)`` packet-outs into the
port's zone on this chassis (a different number: zones are per chassis).

Entry shape (JSON)::

    {"lsp": logical port, "proto": "tcp" | "udp" | "icmp",
     "src": ip, "dst": ip, "sport": int, "dport": int,
     "icmp_id": int, "icmp_type": int, "zone": source zone, "mark": int,
     "state": "ESTABLISHED" | ...}

The chassis is the one ``[ovn] ovsdb_connection`` names (one chassis per
agent, as on a real hypervisor).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import subprocess
import threading
from collections.abc import Iterator
from typing import Any, ClassVar

from oslo_config import cfg

from vmm_orchestrator.options import require
from vmm_orchestrator.statekind import ImportResult, KindContext, PoisonedEntry, Reason, StateKind
from vmm_ovn import conntrack
from vmm_ovn import options as ovn_opts
from vmm_ovn.chassis import OvnChassis

LOG = logging.getLogger(__name__)

_FIELDS = {f.name for f in dataclasses.fields(conntrack.CtEntry)}


def _entry(data: dict[str, Any]) -> conntrack.CtEntry:
    try:
        return conntrack.CtEntry(**{k: v for k, v in data.items() if k in _FIELDS})
    except TypeError as exc:
        raise ValueError(f"malformed OVN conntrack entry: {exc}") from None


class OvnConntrackKind(StateKind):
    """Security-group sessions of the VM's OVN logical ports (userspace datapath)."""

    name = "ovn_conntrack"
    opts: ClassVar[list[cfg.Opt]] = [
        cfg.StrOpt(
            "vswitchd_ctl",
            default="",
            help="ovs-vswitchd's control socket. Empty: ovs-vswitchd.<pid>.ctl beside "
            "[ovn] ovsdb_connection's socket.",
        ),
        cfg.FloatOpt(
            "zone_wait",
            default=2.0,
            min=0.0,
            help="Seconds an import waits for ovn-controller to give the port a zone here.",
        ),
    ]

    def __init__(self, conf: cfg.ConfigOpts) -> None:
        super().__init__(conf)
        require(conf, ovn_opts.GROUP, "the OVN conntrack state kind")
        self._chassis: OvnChassis | None = None
        self._lock = threading.Lock()

    # -- this chassis ---------------------------------------------------------

    def chassis(self) -> OvnChassis:
        with self._lock:
            if self._chassis is None:
                g = self.conf[ovn_opts.GROUP]
                self._chassis = OvnChassis(
                    g.ovsdb_connection,
                    bridge=g.integration_bridge,
                    openflow_target=g.openflow_target,
                    timeout=g.ovsdb_timeout,
                )
            return self._chassis

    def _vswitchd(self) -> str:
        own = self.conf[self.group].vswitchd_ctl
        return own or conntrack.vswitchd_target(self.conf[ovn_opts.GROUP].ovsdb_connection)

    def _ports(self, ctx: KindContext) -> list[tuple[str, int, str]]:
        """(logical port, ofport, MAC) of each of the VM's NICs plugged here."""
        out = []
        for vif in ctx.vifs:
            info = self.chassis().find_port(vif.mac, vif.port)
            if info is not None and info.iface_id:
                out.append((info.iface_id, info.ofport, vif.mac))
        return out

    # -- the contract -----------------------------------------------------------

    def unavailable(self, ctx: KindContext) -> str | None:
        try:
            self.chassis()
        except Exception as exc:
            return f"no OVS database for OVN conntrack: {exc}"
        return None

    def export(self, ctx: KindContext, since: float | None = None) -> Iterator[dict[str, Any]]:
        addresses = ctx.addresses
        for lsp, _, _ in self._ports(ctx):
            zone = self.chassis().ct_zone(lsp)
            if zone is None:
                continue
            for entry in conntrack.of_vm(conntrack.dump(self._vswitchd(), zone), addresses):
                yield {"lsp": lsp, **entry.to_dict()}

    def check(self, ctx: KindContext, entry: dict[str, Any]) -> None:
        parsed = _entry(entry)
        try:
            conntrack.check(parsed, ctx.addresses)
        except ValueError as exc:
            if "does not involve" in str(exc):
                raise PoisonedEntry(str(exc)) from None
            raise

    def import_(self, ctx: KindContext, entries: list[dict[str, Any]]) -> ImportResult:
        ports = self._ports(ctx)
        if not ports:
            return ImportResult.fail(self.name, Reason.TRANSFER_FAILED, "the VM's port is not here")
        chassis = self.chassis()
        wait = float(self.conf[self.group].zone_wait)
        installed: list[dict[str, Any]] = []
        try:
            for lsp, ofport, mac in ports:
                mine = [_entry(e) for e in entries if e.get("lsp", lsp) == lsp]
                if not mine:
                    continue
                zone = chassis.db.wait_for(functools.partial(chassis.ct_zone, lsp), wait)
                if zone is None:
                    return ImportResult.fail(
                        self.name, Reason.TRANSFER_FAILED, f"no conntrack zone for {lsp} here"
                    )
                if any(e.proto == "tcp" for e in mine):
                    conntrack.relax_tcp_window(self._vswitchd())
                packets = [conntrack.synthetic_packet(e, mac, "02:00:00:00:00:ff") for e in mine]
                conntrack.commit(chassis.openflow_target, ofport, int(zone), packets)
                installed += [{**e.to_dict(), "zone": int(zone)} for e in mine]
        except Exception as exc:
            return ImportResult.fail(self.name, Reason.TRANSFER_FAILED, str(exc))
        return ImportResult.success(self.name, len(installed), {"installed": installed})

    def _flush(self, entries: list[dict[str, Any]]) -> None:
        for e in entries:
            proto = conntrack.PROTOS[e["proto"]]
            tuple_ = f"ct_nw_src={e['src']},ct_nw_dst={e['dst']},ct_nw_proto={proto}"
            if e["proto"] in ("tcp", "udp"):
                tuple_ += f",ct_tp_src={e['sport']},ct_tp_dst={e['dport']}"
            subprocess.run(
                [
                    "ovs-appctl",
                    "-t",
                    self._vswitchd(),
                    "dpctl/flush-conntrack",
                    f"zone={e['zone']}",
                    tuple_,
                ],
                capture_output=True,
                check=False,
            )

    def revert_import(self, ctx: KindContext, record: dict[str, Any]) -> None:
        self._flush(list(record.get("installed", [])))

    def cleanup_source(self, ctx: KindContext) -> None:
        """The source zone belongs to the VM's port: once the VM left, none of its
        entries is used here any more (peers' traffic goes to the new chassis)."""
        if self._ports(ctx):
            self._flush([dict(e) for e in self.export(ctx)])
