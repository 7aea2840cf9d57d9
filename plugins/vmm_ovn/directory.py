"""OVN Northbound as the directory (the NVA role) for OVN without Neutron.

OVN already is the directory of its hosts: a Logical_Switch_Port names a
VM's MAC and addresses, ``options:requested-chassis`` says where it may be
bound, and ovn-northd/ovn-controller push every change to every chassis.
This class gives the core's directory contract on top of it:

======================  ==================================================
directory call          OVN Northbound
======================  ==================================================
prestage(vni, mac,      ``requested-chassis="src,dst"`` (multi-chassis:
nve, migration id)      the destination claims the port as additional
                        chassis, traffic is cloned to both) and
                        ``activation-strategy`` (rarp on OVN 23.03: the
                        destination's port stays blocked until it sends a
                        RARP); duplicate-address check against the NB first;
                        what it replaced is kept in the port's external_ids
commit                  ``requested-chassis=dst``, activation strategy
                        restored; NB_Global.nb_cfg bumped: its value is the
                        commit's revision
abort                   the saved requested-chassis / activation strategy
                        put back; nothing when there is nothing to undo
acks                    per chassis: Chassis_Private.nb_cfg >= the commit's
                        revision, at nb_cfg_timestamp (what
                        ``ovn-nbctl --wait=hv`` waits for, but per chassis,
                        so one stalled chassis is named, not waited for)
expire                  nothing: ovn-controller holds no cache to expire;
                        a chassis that has not applied the move is reported
                        by acks, and OVN pushes the change when it can
register_nve, get_nve   read the SB Chassis (name, Geneve/VXLAN encap IP):
                        chassis register themselves
======================  ==================================================

Keys: VNI -> Logical_Switch by ``[ovn] vni_switches``, else its
``external_ids:vmm:vni``, else the switch whose SB datapath tunnel key is the
VNI (that key is the Geneve VNI on the wire). MAC -> the switch's port whose
``addresses`` start with it. NVE id -> chassis name (``[ovn] chassis_names``).

The prestage's bookkeeping lives in the port's own external_ids
(``vmm:migration-id``, ``vmm:prev-requested-chassis``, ...), so a restarted
orchestrator (or another host's) can commit or abort it: nothing is held
only in memory.

With ``[ovn] neutron_managed`` (ML2/OVN writes the NB) every write is
refused: the directory then is Neutron (``[nva] backend = neutron``) and
this class is used only to read OVN (acks, chassis), never to fight
Neutron's writes.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

from oslo_config import cfg

from vmm_orchestrator.model import normalize_mac
from vmm_orchestrator.nva import errors as nva_errors
from vmm_orchestrator.options import require
from vmm_ovn import options as ovn_opts
from vmm_ovn import ovsdb

LOG = logging.getLogger(__name__)

MIGRATION_ID = "vmm:migration-id"
PENDING = "vmm:pending-chassis"
PREV_RC = "vmm:prev-requested-chassis"
PREV_AS = "vmm:prev-activation-strategy"
LAST_ID = "vmm:last-migration-id"
LAST_CHASSIS = "vmm:last-chassis"
VNI_KEY = "vmm:vni"
_NONE = "-"  # "there was no such option" (external_ids values cannot be absent-but-set)

NB_TABLES = ["NB_Global", "Logical_Switch", "Logical_Switch_Port"]
SB_TABLES = ["SB_Global", "Chassis", "Chassis_Private", "Encap", "Datapath_Binding", "Port_Binding"]


def _split_addresses(entries: Sequence[str]) -> tuple[str | None, list[str], list[str]]:
    """``["MAC IP IP6 ..."]`` -> (mac, ipv4s, ipv6s); 'router'/'unknown'/'dynamic' carry none."""
    for entry in entries:
        parts = entry.split()
        if not parts:
            continue
        try:
            mac = normalize_mac(parts[0])
        except ValueError:
            continue
        v4: list[str] = []
        v6: list[str] = []
        for p in parts[1:]:
            try:
                addr = ipaddress.ip_address(p.split("/")[0])
            except ValueError:
                continue
            (v4 if addr.version == 4 else v6).append(str(addr))
        return mac, v4, v6
    return None, [], []


def _all_ips(lsp: Any) -> set[str]:
    out: set[str] = set()
    for entry in list(lsp.addresses or []) + list(lsp.port_security or []):
        for p in entry.split()[1:]:
            try:
                out.add(str(ipaddress.ip_address(p.split("/")[0])))
            except ValueError:
                continue
    return out


class OvnNbDirectory:
    """The directory contract on the OVN Northbound (and Southbound for chassis/acks)."""

    kind = "ovn"

    def __init__(
        self,
        nb_connection: str,
        sb_connection: str,
        *,
        timeout: float = 10.0,
        activation_strategy: str = "rarp",
        vni_switches: dict[str, str] | None = None,
        chassis_names: dict[str, str] | None = None,
        neutron_managed: bool = False,
        poll_interval: float = 0.002,
        prestage_wait: float = 2.0,
    ) -> None:
        if not nb_connection or not sb_connection:
            raise nva_errors.BadRequest(
                "the OVN directory needs the Northbound and Southbound connections",
                hint="set [ovn] ovn_nb_connection and ovn_sb_connection",
            )
        self.activation_strategy = activation_strategy
        self.vni_switches = {int(k): v for k, v in (vni_switches or {}).items()}
        self.chassis_names = dict(chassis_names or {})
        self.nve_names = {v: k for k, v in self.chassis_names.items()}
        self.neutron_managed = neutron_managed
        self.prestage_wait = prestage_wait
        try:
            self.nb = ovsdb.Db(nb_connection, ovsdb.NB, timeout, NB_TABLES, poll_interval)
            self.sb = ovsdb.Db(sb_connection, ovsdb.SB, timeout, SB_TABLES, poll_interval)
        except ovsdb.TransientError as exc:
            raise nva_errors.Unavailable(str(exc)) from None
        self._lock = threading.Lock()
        #: (vni, revision, committed_at, mac) of recent commits, for acks.
        self._commits: list[tuple[int, int, float, str]] = []

    @classmethod
    def from_conf(cls, conf: cfg.ConfigOpts) -> OvnNbDirectory:
        """The ``vmm_orchestrator.nva_backends`` entry point (``[nva] backend = ovn``)."""
        require(conf, ovn_opts.GROUP, "the OVN directory")
        g = conf[ovn_opts.GROUP]
        return cls(
            g.ovn_nb_connection,
            g.ovn_sb_connection,
            timeout=g.ovsdb_timeout,
            activation_strategy=g.activation_strategy,
            vni_switches=ovn_opts.pairs(g.vni_switches, "vni_switches"),
            chassis_names=ovn_opts.pairs(g.chassis_names, "chassis_names"),
            neutron_managed=g.neutron_managed,
            poll_interval=g.poll_interval,
        )

    def close(self) -> None:
        self.nb.close()
        self.sb.close()

    # -- names -------------------------------------------------------------

    def chassis_for(self, nve: str) -> str:
        return self.chassis_names.get(nve, nve)

    def nve_for(self, chassis: str) -> str:
        return self.nve_names.get(chassis, chassis)

    def _switch(self, vni: int) -> Any:
        """The Logical_Switch of ``vni`` (call with the NB replica locked)."""
        switches = list(self.nb.api.tables["Logical_Switch"].rows.values())
        name = self.vni_switches.get(int(vni))
        for ls in switches:
            if name is not None and ls.name == name:
                return ls
            if name is None and (ls.external_ids or {}).get(VNI_KEY) == str(vni):
                return ls
        if name is None:
            for dp in self.sb.api.tables["Datapath_Binding"].rows.values():
                if int(dp.tunnel_key) == int(vni):
                    uuid = (dp.external_ids or {}).get("logical-switch")
                    for ls in switches:
                        if str(ls.uuid) == uuid:
                            return ls
        raise nva_errors.NotFound(
            f"no OVN logical switch for VNI {vni}",
            hint="map it with [ovn] vni_switches or the switch's external_ids:vmm:vni",
        )

    def _lsp(self, vni: int, mac: str) -> tuple[Any, Any]:
        mac = normalize_mac(mac)
        ls = self._switch(vni)
        for lsp in ls.ports:
            if _split_addresses(lsp.addresses or [])[0] == mac:
                return ls, lsp
        raise nva_errors.NotFound(f"no port with MAC {mac} on logical switch {ls.name} (VNI {vni})")

    def _bound_chassis(self, lsp: Any) -> str | None:
        """Where the port is now: requested-chassis' first entry, else its SB binding."""
        rc = (lsp.options or {}).get("requested-chassis", "")
        if rc:
            return rc.split(",")[0].strip()
        for pb in self.sb.api.tables["Port_Binding"].rows.values():
            if pb.logical_port == lsp.name and pb.chassis:
                return str(pb.chassis[0].name)
        return None

    def _endpoint(self, vni: int, lsp: Any) -> dict[str, Any]:
        mac, v4, v6 = _split_addresses(lsp.addresses or [])
        ext = lsp.external_ids or {}
        where = self._bound_chassis(lsp)
        pending = ext.get(PENDING)
        return {
            "vni": vni,
            "mac": mac,
            "ipv4": v4,
            "ipv6": v6,
            "port": lsp.name,
            "nve": self.nve_for(where) if where else None,
            "vtep": self._vtep(where) if where else None,
            "state": "pending" if pending else "active",
            "pending_nve": self.nve_for(pending) if pending else None,
            "migration_id": ext.get(MIGRATION_ID),
            "last_migration_id": ext.get(LAST_ID),
            "up": bool(lsp.up and lsp.up[0]) if isinstance(lsp.up, list) else bool(lsp.up),
            "options": dict(lsp.options or {}),
        }

    def _vtep(self, chassis: str) -> str | None:
        for ch in self.sb.api.tables["Chassis"].rows.values():
            if ch.name == chassis:
                return str(ch.encaps[0].ip) if ch.encaps else None
        return None

    def _writable(self, what: str) -> None:
        if self.neutron_managed:
            raise nva_errors.Conflict(
                f"not {what}: Neutron writes this OVN Northbound",
                hint="use [nva] backend = neutron; the OVN plugin only reads OVN then",
            )

    # -- NVEs (chassis) ----------------------------------------------------

    def register_nve(self, nve_id: str, vtep: str, vnis: Sequence[int]) -> dict[str, Any]:
        """Chassis register themselves in the SB; this only checks that it did."""
        nve = self.get_nve(nve_id)
        if vtep and nve["vtep"] and nve["vtep"] != vtep:
            LOG.warning("NVE %s: configured VTEP %s, OVN encap IP %s", nve_id, vtep, nve["vtep"])
        return nve

    def list_nves(self, vni: int | None = None) -> list[dict[str, Any]]:
        chassis = self.sb.read(
            lambda: [c.name for c in self.sb.api.tables["Chassis"].rows.values()]
        )
        return [self.get_nve(self.nve_for(name)) for name in sorted(chassis)]

    def get_nve(self, nve_id: str) -> dict[str, Any]:
        name = self.chassis_for(nve_id)

        def read() -> dict[str, Any] | None:
            for ch in self.sb.api.tables["Chassis"].rows.values():
                if ch.name == name:
                    nb_cfg = None
                    for cp in self.sb.api.tables["Chassis_Private"].rows.values():
                        if cp.name == name:
                            nb_cfg = int(cp.nb_cfg)
                    vtep = str(ch.encaps[0].ip) if ch.encaps else None
                    return {
                        "id": nve_id,
                        "chassis": name,
                        "vtep": vtep,
                        "vnis": [],
                        "nb_cfg": nb_cfg,
                    }
            return None

        found = self.sb.read(read)
        if found is None:
            raise nva_errors.NotFound(
                f"no OVN chassis {name} (NVE {nve_id}) in the Southbound",
                hint="is ovn-controller running there with that system-id?",
            )
        return found

    # -- endpoints ---------------------------------------------------------

    def add_endpoint(
        self, vni: int, mac: str, ipv4: Sequence[str], ipv6: Sequence[str], nve: str
    ) -> dict[str, Any]:
        """Create the switch port (named after the MAC) bound to ``nve``; DAD first."""
        self._writable("adding an endpoint")
        mac = normalize_mac(mac)
        ls = self.nb.read(lambda: self._switch(vni))
        self._check_duplicates(vni, mac, [*ipv4, *ipv6], exclude=None)
        name = f"vmm-{mac.replace(':', '')}"
        addresses = " ".join([mac, *ipv4, *ipv6])
        api = self.nb.api
        with api.transaction(check_error=True) as txn:
            txn.add(api.lsp_add(ls.name, name, may_exist=True))
            txn.add(api.lsp_set_addresses(name, [addresses]))
            txn.add(
                api.db_set(
                    "Logical_Switch_Port",
                    name,
                    ("options", {"requested-chassis": self.chassis_for(nve)}),
                )
            )
        return self.get_endpoint(vni, mac)

    def get_endpoint(self, vni: int, mac: str) -> dict[str, Any]:
        return self.nb.read(
            lambda: self.sb.read(lambda: self._endpoint(vni, self._lsp(vni, mac)[1]))
        )

    def find(self, vni: int, ip: str | None = None, mac: str | None = None) -> dict[str, Any]:
        if mac:
            return self.get_endpoint(vni, mac)
        if not ip:
            raise nva_errors.BadRequest("find needs an ip or a mac")
        wanted = str(ipaddress.ip_address(ip))

        def read() -> dict[str, Any]:
            for lsp in self._switch(vni).ports:
                _, v4, v6 = _split_addresses(lsp.addresses or [])
                if wanted in v4 or wanted in v6:
                    return self.sb.read(functools.partial(self._endpoint, vni, lsp))
            raise nva_errors.NotFound(f"no port with address {wanted} in VNI {vni}")

        return self.nb.read(read)

    def _check_duplicates(
        self, vni: int, mac: str, ips: Sequence[str], exclude: str | None
    ) -> None:
        """Duplicate address detection against the NB: no other port of the switch
        may hold the MAC or any of the addresses (in addresses or port_security)."""
        wanted = {str(ipaddress.ip_address(i)) for i in ips}
        # The replica may lag other clients' commits by a few ms: one round trip
        # (an nb_cfg bump, harmless) brings in every commit made before the check.
        self.nb.bump_nb_cfg()

        def read() -> None:
            ls = self._switch(vni)
            for other in ls.ports:
                if other.name == exclude:
                    continue
                other_mac = _split_addresses(other.addresses or [])[0]
                if other_mac == mac:
                    raise nva_errors.Conflict(
                        f"MAC {mac} is also on port {other.name} of {ls.name}",
                        hint="only the registered binding may move",
                    )
                clash = wanted & _all_ips(other)
                if clash:
                    raise nva_errors.Conflict(
                        f"address {', '.join(sorted(clash))} of {mac} is also held by port "
                        f"{other.name} of {ls.name} (duplicate address)",
                        hint="remove the duplicate before moving the VM",
                    )

        self.nb.read(read)

    # -- migration ---------------------------------------------------------

    def prestage(self, vni: int, mac: str, nve: str, migration_id: str) -> dict[str, Any]:
        """Multi-chassis binding src,dst + activation strategy; waits (bounded) until the
        destination chassis applied it. A repeat with the same id returns the same."""
        self._writable("pre-staging a move")
        mac = normalize_mac(mac)
        dst = self.chassis_for(nve)
        _, lsp = self.nb.read(lambda: self._lsp(vni, mac))
        ext = dict(lsp.external_ids or {})
        opts = dict(lsp.options or {})
        if ext.get(MIGRATION_ID) == migration_id:
            return self.get_endpoint(vni, mac) | {"repeat": True}
        if ext.get(MIGRATION_ID):
            raise nva_errors.Conflict(
                f"port {lsp.name} is being moved by migration {ext[MIGRATION_ID]}",
                hint="wait for it to end or abort it",
            )
        _, v4, v6 = _split_addresses(lsp.addresses or [])
        self._check_duplicates(vni, mac, v4 + v6, exclude=lsp.name)
        src = self.sb.read(lambda: self._bound_chassis(lsp))
        if src == dst:
            raise nva_errors.Conflict(f"port {lsp.name} is already bound to {dst}")
        self.get_nve(self.nve_for(dst))  # NotFound for an unknown destination
        requested = f"{src},{dst}" if src else dst
        started = time.time()
        new_opts = {"requested-chassis": requested}
        if self.activation_strategy:
            new_opts["activation-strategy"] = self.activation_strategy
        api = self.nb.api
        with api.transaction(check_error=True) as txn:
            txn.add(api.db_set("Logical_Switch_Port", lsp.name, ("options", new_opts)))
            if not self.activation_strategy and "activation-strategy" in opts:
                txn.add(
                    api.db_remove("Logical_Switch_Port", lsp.name, "options", "activation-strategy")
                )
            txn.add(
                api.db_set(
                    "Logical_Switch_Port",
                    lsp.name,
                    (
                        "external_ids",
                        {
                            MIGRATION_ID: migration_id,
                            PENDING: dst,
                            PREV_RC: opts.get("requested-chassis") or _NONE,
                            PREV_AS: opts.get("activation-strategy") or _NONE,
                        },
                    ),
                )
            )
        revision = self.nb.bump_nb_cfg()
        applied = self.wait_chassis([dst], revision, self.prestage_wait, since=started)
        return self.get_endpoint(vni, mac) | {
            "nb_cfg": revision,
            "destination_applied_ms": applied.get(dst),
        }

    def commit(self, vni: int, mac: str, migration_id: str) -> dict[str, Any]:
        """requested-chassis = destination; the activation strategy as it was before."""
        self._writable("committing a move")
        mac = normalize_mac(mac)
        _, lsp = self.nb.read(lambda: self._lsp(vni, mac))
        ext = dict(lsp.external_ids or {})
        if ext.get(MIGRATION_ID) != migration_id:
            if ext.get(LAST_ID) == migration_id:  # a repeat: already committed
                revision = self.nb.bump_nb_cfg()
                return {
                    "endpoint": self.get_endpoint(vni, mac),
                    "revision": revision,
                    "committed_at": time.time(),
                    "repeat": True,
                }
            raise nva_errors.NotFound(
                f"no pending migration {migration_id} for MAC {mac} in VNI {vni}",
                hint="prestage it first",
            )
        dst = ext[PENDING]
        committed_at = time.time()  # the move starts with the write below
        api = self.nb.api
        with api.transaction(check_error=True) as txn:
            txn.add(
                api.db_set("Logical_Switch_Port", lsp.name, ("options", {"requested-chassis": dst}))
            )
            self._restore_strategy(txn, lsp.name, ext.get(PREV_AS, _NONE))
            txn.add(
                api.db_remove(
                    "Logical_Switch_Port",
                    lsp.name,
                    "external_ids",
                    MIGRATION_ID,
                    PENDING,
                    PREV_RC,
                    PREV_AS,
                )
            )
            txn.add(
                api.db_set(
                    "Logical_Switch_Port",
                    lsp.name,
                    ("external_ids", {LAST_ID: migration_id, LAST_CHASSIS: dst}),
                )
            )
        revision = self.nb.bump_nb_cfg()
        with self._lock:
            self._commits.append((vni, revision, committed_at, mac))
            del self._commits[:-200]
        return {
            "endpoint": self.get_endpoint(vni, mac),
            "revision": revision,
            "committed_at": committed_at,
        }

    def _restore_strategy(self, txn: Any, name: str, previous: str) -> None:
        api = self.nb.api
        if previous and previous != _NONE:
            txn.add(
                api.db_set(
                    "Logical_Switch_Port", name, ("options", {"activation-strategy": previous})
                )
            )
        else:
            txn.add(api.db_remove("Logical_Switch_Port", name, "options", "activation-strategy"))

    def abort(self, vni: int, mac: str, migration_id: str) -> dict[str, Any]:
        """Put back what prestage replaced; nothing to do for another or no migration."""
        self._writable("aborting a move")
        mac = normalize_mac(mac)
        try:
            _, lsp = self.nb.read(lambda: self._lsp(vni, mac))
        except nva_errors.NotFound:
            return {"vni": vni, "mac": mac, "restored": False}
        ext = dict(lsp.external_ids or {})
        if ext.get(MIGRATION_ID) != migration_id:
            return {"vni": vni, "mac": mac, "restored": False}
        api = self.nb.api
        prev_rc = ext.get(PREV_RC, _NONE)
        with api.transaction(check_error=True) as txn:
            if prev_rc != _NONE:
                txn.add(
                    api.db_set(
                        "Logical_Switch_Port", lsp.name, ("options", {"requested-chassis": prev_rc})
                    )
                )
            else:
                txn.add(
                    api.db_remove("Logical_Switch_Port", lsp.name, "options", "requested-chassis")
                )
            self._restore_strategy(txn, lsp.name, ext.get(PREV_AS, _NONE))
            txn.add(
                api.db_remove(
                    "Logical_Switch_Port",
                    lsp.name,
                    "external_ids",
                    MIGRATION_ID,
                    PENDING,
                    PREV_RC,
                    PREV_AS,
                )
            )
        revision = self.nb.bump_nb_cfg()
        return {"vni": vni, "mac": mac, "restored": True, "revision": revision, "port": lsp.name}

    def switch(self, vni: int, mac: str) -> dict[str, Any]:
        """Make the pending destination the port's only chassis now, keeping the
        prestage's bookkeeping (commit and abort still work).

        Used at SWITCHOVER, once the guest is paused at the source: nothing will
        come from the source's port any more, so the destination can take the
        port during the pause (OVN needs 50-100 ms to move the binding) instead
        of after the resume, and no activation is needed. ``switched`` False when
        nothing is pending.
        """
        self._writable("switching a port")
        _, lsp = self.nb.read(lambda: self._lsp(vni, mac))
        ext = dict(lsp.external_ids or {})
        dst = ext.get(PENDING)
        if not dst:
            return {"vni": vni, "mac": mac, "switched": False}
        self.nb.api.db_set(
            "Logical_Switch_Port", lsp.name, ("options", {"requested-chassis": dst})
        ).execute(check_error=True)
        return {
            "vni": vni,
            "mac": mac,
            "switched": True,
            "chassis": dst,
            "revision": self.nb.bump_nb_cfg(),
        }

    def unswitch(self, vni: int, mac: str) -> dict[str, Any]:
        """Undo :meth:`switch` while the move is still pending: both chassis again."""
        self._writable("switching a port back")
        _, lsp = self.nb.read(lambda: self._lsp(vni, mac))
        ext = dict(lsp.external_ids or {})
        dst, src = ext.get(PENDING), ext.get(PREV_RC, _NONE)
        current = (lsp.options or {}).get("requested-chassis", "")
        if not dst or current != dst:
            return {"vni": vni, "mac": mac, "switched_back": False}
        both = f"{src.split(',')[0]},{dst}" if src != _NONE else dst
        self.nb.api.db_set(
            "Logical_Switch_Port", lsp.name, ("options", {"requested-chassis": both})
        ).execute(check_error=True)
        return {"vni": vni, "mac": mac, "switched_back": True, "revision": self.nb.bump_nb_cfg()}

    def move(self, vni: int, mac: str, nve: str, seq: int | None = None) -> dict[str, Any]:
        """An unplanned move (the VM showed up elsewhere): requested-chassis = nve."""
        self._writable("moving an endpoint")
        _, lsp = self.nb.read(lambda: self._lsp(vni, mac))
        self.nb.api.db_set(
            "Logical_Switch_Port",
            lsp.name,
            ("options", {"requested-chassis": self.chassis_for(nve)}),
        ).execute(check_error=True)
        revision = self.nb.bump_nb_cfg()
        return {"endpoint": self.get_endpoint(vni, mac), "revision": revision}

    # -- convergence -------------------------------------------------------

    def chassis_progress(self) -> dict[str, tuple[int, float | None]]:
        """{chassis: (nb_cfg, nb_cfg_timestamp in s)} from Chassis_Private."""

        def read() -> dict[str, tuple[int, float | None]]:
            out = {}
            for cp in self.sb.api.tables["Chassis_Private"].rows.values():
                ts = int(cp.nb_cfg_timestamp or 0)
                out[str(cp.name)] = (int(cp.nb_cfg), ts / 1000.0 if ts else None)
            return out

        return self.sb.read(read)

    def wait_chassis(
        self,
        chassis: Sequence[str] | None,
        revision: int,
        timeout: float,
        since: float | None = None,
    ) -> dict[str, float]:
        """Wait until each chassis (None: all) applied ``revision``; {chassis: ms from
        ``since`` (wall clock, default now)} for those that did, by their own
        nb_cfg_timestamp."""
        started = time.time() if since is None else since

        def done() -> dict[str, tuple[int, float | None]] | None:
            progress = {
                str(cp.name): (int(cp.nb_cfg), int(cp.nb_cfg_timestamp or 0) / 1000.0 or None)
                for cp in self.sb.api.tables["Chassis_Private"].rows.values()
            }
            names = list(chassis) if chassis is not None else list(progress)
            if all(progress.get(n, (0, None))[0] >= revision for n in names):
                return progress
            return None

        self.sb.wait_for(done, timeout)
        out = {}
        for name, (cfg_, ts) in self.chassis_progress().items():
            if (chassis is None or name in chassis) and cfg_ >= revision:
                out[name] = round(max(0.0, ((ts or time.time()) - started) * 1000.0), 2)
        return out

    def bound_to(self, vni: int, mac: str) -> str | None:
        """The port's only requested chassis, None while it is on several (moving)."""
        _, lsp = self.nb.read(lambda: self._lsp(vni, mac))
        rc = (lsp.options or {}).get("requested-chassis", "")
        return rc if rc and "," not in rc else None

    def wait_bound(self, vni: int, mac: str, chassis: str, timeout: float) -> bool:
        """Until the NB binds the port to ``chassis`` alone (Neutron's activation of
        the destination's binding, or this directory's commit)."""
        deadline = time.monotonic() + timeout
        while True:
            if self.bound_to(vni, mac) == chassis:
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(left, 0.01))

    def acks(
        self,
        vni: int,
        min_revision: int,
        nves: Sequence[str] | None = None,
        timeout: float = 0.0,
    ) -> dict[str, dict[str, Any]]:
        """Per chassis, whether it applied ``min_revision`` (an nb_cfg) and when.

        Waits up to ``timeout`` s for every chassis (or those of ``nves``).
        ``acked_at`` is the chassis' own nb_cfg_timestamp: when its flows
        for that Northbound state were acknowledged by OVS.
        """
        names = [self.chassis_for(n) for n in nves] if nves is not None else None
        if timeout > 0:
            self.wait_chassis(names, min_revision, timeout)
        answer: dict[str, dict[str, Any]] = {}
        for name, (nb_cfg, ts) in self.chassis_progress().items():
            if names is not None and name not in names:
                continue
            acked = nb_cfg >= min_revision
            answer[self.nve_for(name)] = {
                "acked_revision": nb_cfg if acked else 0,
                "acked_at": ts if acked else None,
                "nb_cfg": nb_cfg,
            }
        return answer

    def last_commit(self, vni: int, mac: str) -> tuple[int, float] | None:
        """(revision, committed_at) of this directory's newest commit of ``mac``."""
        mac = normalize_mac(mac)
        with self._lock:
            mine = [(rev, at) for v, rev, at, m in self._commits if v == vni and m == mac]
        return mine[-1] if mine else None

    def expire(self, vni: int, mac: str, nves: Sequence[str]) -> dict[str, Any]:
        """Nothing to expire: a lagging ovn-controller gets the change pushed when it can."""
        LOG.info("expire %s in VNI %s at %s: OVN pushes the move itself", mac, vni, ", ".join(nves))
        return {"vni": vni, "mac": mac, "expired": []}

    def health(self) -> dict[str, Any]:
        rows = self.nb.rows("NB_Global")
        return {
            "nb_cfg": int(rows[0].nb_cfg) if rows else None,
            "hv_cfg": int(rows[0].hv_cfg) if rows else None,
            "neutron_managed": self.neutron_managed,
        }
