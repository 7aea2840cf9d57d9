"""One OVN chassis as the orchestrator sees it: its local OVS database.

Finds a VM's OVS port (by the tap's name, by ``external_ids:attached-mac``
as os-vif and libvirt write it, or by ``iface-id``), and holds the
**barrier**: the VM is not announced or reported ready at the destination
before ovn-controller has installed the flows for its port. Two signals,
both written by ovn-controller once OVS acknowledged the flows:

* ``Interface.external_ids:ovn-installed=true`` (+ ``ovn-installed-ts``, ms):
  this chassis installed the flows of *this port* (per port, local, cheap);
* ``Bridge(br-int).external_ids:ovn-nb-cfg`` >= the SB's ``nb_cfg``: this
  chassis has applied every Northbound change up to the last ``nb_cfg`` bump
  (the sequence ``ovn-nbctl --wait=hv`` and Neutron's 2026 barrier use; the
  OVN directory bumps it at prestage and commit).

With ``activation-strategy=rarp`` ovn-installed is set while the port is
still blocked (the installed flows include the drop flows): the barrier
says "flows there", the announcer's RARP then unblocks the port.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from typing import Any

from vmm_orchestrator.model import normalize_mac
from vmm_ovn import openflow, ovsdb
from vmm_ovn import options as ovn_opts

LOG = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PortInfo:
    """A VM's port on this chassis' integration bridge."""

    name: str
    ofport: int
    iface_id: str | None
    mac: str | None
    installed: bool
    installed_ts_ms: float | None


@dataclasses.dataclass
class BarrierResult:
    """One barrier wait: how long, on what, and whether it held."""

    mac: str
    ok: bool
    waited_ms: float
    port: str | None = None
    iface_id: str | None = None
    installed_ts_ms: float | None = None
    nb_cfg: int | None = None
    reason: str = ""
    started_wall_ms: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _port_info(iface: Any) -> PortInfo | None:
    ofport = iface.ofport[0] if isinstance(iface.ofport, list) and iface.ofport else iface.ofport
    if not isinstance(ofport, int) or ofport <= 0:
        return None
    ext = iface.external_ids or {}
    ts = ext.get("ovn-installed-ts")
    return PortInfo(
        name=iface.name,
        ofport=ofport,
        iface_id=ext.get("iface-id"),
        mac=(ext.get("attached-mac") or "").lower() or None,
        installed=ext.get("ovn-installed") == "true",
        installed_ts_ms=float(ts) if ts and ts.isdigit() else None,
    )


class OvnChassis:
    """The local OVS database of one chassis, and packet-out on its br-int."""

    def __init__(
        self,
        ovsdb_connection: str,
        bridge: str = "br-int",
        openflow_target: str = "",
        barrier: str = ovn_opts.BARRIER_INSTALLED,
        barrier_timeout: float = 5.0,
        poll_interval: float = 0.002,
        timeout: float = 10.0,
        sb_connection: str = "",
    ) -> None:
        self.bridge = bridge
        self.barrier = barrier
        self.barrier_timeout = barrier_timeout
        self.openflow_target = openflow_target or openflow.default_target(ovsdb_connection, bridge)
        self.db = ovsdb.Db(
            ovsdb_connection,
            ovsdb.OVS,
            timeout=timeout,
            tables=["Open_vSwitch", "Bridge", "Port", "Interface"],
            poll_interval=poll_interval,
        )
        self._sb_connection = sb_connection
        self._sb: ovsdb.Db | None = None
        self._timeout = timeout
        self._poll = poll_interval
        self._lock = threading.Lock()
        self._native = True
        #: Every barrier wait, newest last (figures for reports and tests).
        self.barriers: list[BarrierResult] = []

    # -- identity ----------------------------------------------------------

    def _ovs_ext(self, key: str) -> str | None:
        rows = self.db.rows("Open_vSwitch")
        return ovsdb.ext(rows[0], key) if rows else None

    @property
    def name(self) -> str | None:
        """The chassis name (OVS external_ids:system-id)."""
        return self._ovs_ext("system-id")

    def _sb_db(self) -> ovsdb.Db:
        with self._lock:
            if self._sb is None:
                target = self._sb_connection or self._ovs_ext("ovn-remote") or ""
                if not target:
                    raise ovsdb.TransientError(
                        "no Southbound connection for the nb_cfg barrier",
                        hint="set [ovn] ovn_sb_connection or the chassis' external_ids:ovn-remote",
                    )
                self._sb = ovsdb.Db(
                    target,
                    ovsdb.SB,
                    timeout=self._timeout,
                    tables=["SB_Global"],
                    poll_interval=self._poll,
                )
            return self._sb

    # -- ports -------------------------------------------------------------

    def find_port(
        self, mac: str, port_name: str | None = None, iface_id: str | None = None
    ) -> PortInfo | None:
        """The VM's port: by name, then attached-mac, then iface-id (ofport assigned)."""
        return self.db.read(lambda: self._find(normalize_mac(mac), port_name, iface_id))

    def _find(self, mac: str, port_name: str | None, iface_id: str | None) -> PortInfo | None:
        by_mac = by_id = None
        for iface in self.db.api.tables["Interface"].rows.values():
            info = _port_info(iface)
            if info is None or not info.iface_id:
                continue
            if port_name and info.name == port_name:
                return info
            if info.mac == mac and (by_mac is None or info.ofport > by_mac.ofport):
                by_mac = info
            if iface_id and info.iface_id == iface_id:
                by_id = info
        return by_mac or by_id

    def local_nb_cfg(self) -> int:
        """ovn-controller's applied nb_cfg on this chassis (br-int external_ids:ovn-nb-cfg)."""

        def read() -> int:
            for br in self.db.api.tables["Bridge"].rows.values():
                if br.name == self.bridge:
                    value = (br.external_ids or {}).get("ovn-nb-cfg", "0")
                    return int(value) if value.isdigit() else 0
            return 0

        return self.db.read(read)

    def ct_zone(self, lsp: str) -> int | None:
        """The conntrack zone ovn-controller gave logical port ``lsp`` on this chassis
        (``br-int external_ids:ct-zone-<lsp>``; chosen per chassis). Call with or
        without the replica locked."""
        for br in self.db.api.tables["Bridge"].rows.values():
            if br.name == self.bridge:
                value = (br.external_ids or {}).get(f"ct-zone-{lsp}", "")
                return int(value) if value.isdigit() else None
        return None

    # -- the barrier -------------------------------------------------------

    def wait_ready(
        self,
        mac: str,
        port_name: str | None = None,
        timeout: float | None = None,
        require_port: bool = True,
    ) -> BarrierResult:
        """Wait until this chassis has installed the flows for the VM's port.

        Never raises on a timeout: the result says ``ok=False`` and why; the
        caller decides (plug fails and is retried, announce goes on and logs).
        ``require_port`` False: a port that does not exist yet counts as
        ready (PREPARE under libvirt, where the tap appears later).
        """
        mac = normalize_mac(mac)
        limit = self.barrier_timeout if timeout is None else timeout
        started = time.monotonic()
        result = BarrierResult(mac=mac, ok=False, waited_ms=0.0, started_wall_ms=ovsdb.wall_ms())
        if self.barrier == ovn_opts.BARRIER_NONE:
            info = self.find_port(mac, port_name)
            result.ok = info is not None or not require_port
            result.port = info.name if info else None
            result.reason = "barrier disabled"
            return self._record(result, started)
        target_cfg = None
        if self.barrier in (ovn_opts.BARRIER_NB_CFG, ovn_opts.BARRIER_BOTH):
            sb = self._sb_db()
            rows = sb.rows("SB_Global")
            target_cfg = int(rows[0].nb_cfg) if rows else 0
            result.nb_cfg = target_cfg
        need_installed = self.barrier in (ovn_opts.BARRIER_INSTALLED, ovn_opts.BARRIER_BOTH)

        def ready() -> PortInfo | bool | None:
            info = self._find(mac, port_name, None)
            if info is None:
                return None if require_port else True
            if need_installed and not info.installed:
                return None
            if target_cfg is not None:
                for br in self.db.api.tables["Bridge"].rows.values():
                    if br.name == self.bridge:
                        have = (br.external_ids or {}).get("ovn-nb-cfg", "0")
                        if not have.isdigit() or int(have) < target_cfg:
                            return None
            return info

        value = self.db.wait_for(ready, limit)
        if isinstance(value, PortInfo):
            result.ok = True
            result.port, result.iface_id = value.name, value.iface_id
            result.installed_ts_ms = value.installed_ts_ms
        elif value is True:
            result.ok, result.reason = True, "no port yet"
        else:
            info = self.find_port(mac, port_name)
            result.port = info.name if info else None
            result.reason = (
                f"no port for {mac} on {self.bridge} after {limit:.1f}s"
                if info is None
                else f"flows for {info.name} not installed after {limit:.1f}s "
                f"(ovn-installed={info.installed}, nb_cfg target {target_cfg})"
            )
        return self._record(result, started)

    def _record(self, result: BarrierResult, started: float) -> BarrierResult:
        result.waited_ms = round((time.monotonic() - started) * 1000.0, 3)
        with self._lock:
            self.barriers.append(result)
            del self.barriers[:-100]
        return result

    # -- injection ---------------------------------------------------------

    def inject(self, ofport: int, frames: list[bytes]) -> None:
        """Packet-out ``frames`` from ``ofport`` through OVN's pipeline (as the VM's)."""
        if self._native:
            try:
                openflow.packet_out(self.openflow_target, ofport, frames)
                return
            except openflow.OpenFlowError as exc:
                if "error type" not in str(exc):
                    raise
                LOG.warning("native packet-out refused (%s); using ovs-ofctl from now on", exc)
                self._native = False
        openflow.packet_out_cli(self.openflow_target, ofport, frames)

    def close(self) -> None:
        self.db.close()
        if self._sb is not None:
            self._sb.close()
