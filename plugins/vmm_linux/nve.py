"""The Linux NVE: a bridge and a VXLAN device (no learning) per virtual network.

The directory (NVA) is the only source of remote locations, so the VXLAN
device never learns; remote MACs are programmed as bridge entries on the
VXLAN port (flagged extern_learn, as FRR does for EVPN, so that a MAC that
shows up on a local port roams there and the agent hears of it) plus a VXLAN
"self" entry that names the remote VTEP. Broadcast and unknown frames go to
every VTEP of the VN by head-end replication (all-zero entries).

The in-flight tunnel needs a second VXLAN port per VN ("vi-<vni>"): frames
that peers with stale entries keep sending to the old host arrive on the
VXLAN port, and a bridge never forwards a frame out of the port it came in
on. Pointing the departed MAC at the second port makes the old host re-tunnel
those frames to the new VTEP until the hold timer removes the entry. That
port listens on another UDP port, floods nothing and learns nothing.

The driver keeps, per (VNI, MAC), what it was told (remote VTEP, local port,
in-flight VTEP) and derives the kernel entries from it, so the agent and the
migration stages can each change their part without undoing the other's.
Precedence: in-flight > local port > remote VTEP.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import errno
import functools
import ipaddress
import logging
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from oslo_config import cfg
from pyroute2 import NetlinkError, NetNS

from vmm_orchestrator.errors import ConfigError

LOG = logging.getLogger(__name__)

NTF_SELF = 0x02
NTF_MASTER = 0x04
NTF_EXT_LEARNED = 0x10
NUD_NOARP = 0x40
NUD_PERMANENT = 0x80
ZERO_MAC = "00:00:00:00:00:00"

GROUP = "linux_nve"
NVE_OPTS: list[cfg.Opt] = [
    cfg.PortOpt(
        "vxlan_port",
        default=4789,
        help="UDP port of the VXLAN data plane (the IANA port is 4789).",
    ),
    cfg.PortOpt(
        "inflight_port",
        default=4790,
        help="UDP port the in-flight VXLAN device listens on. It only sends "
        "(to the new VTEP's vxlan_port) and must differ from vxlan_port, because "
        "the kernel allows one VXLAN device per VNI and port.",
    ),
    cfg.BoolOpt(
        "neigh_suppress",
        default=False,
        help="Answer ARP/ND for known addresses on the bridge instead of flooding "
        "them over VXLAN. Off by default: the kernel then also keeps gratuitous "
        "ARPs off the VXLAN port, so announcements would not reach peers.",
    ),
    cfg.IntOpt(
        "mtu",
        default=1450,
        min=576,
        help="MTU of the VN bridges and VXLAN devices (underlay MTU minus 50).",
    ),
]


def register_opts(conf: cfg.ConfigOpts) -> None:
    """Register [linux_nve] options (idempotent)."""
    conf.register_opts(NVE_OPTS, group=GROUP)


T = TypeVar("T")


def _on_netlink_thread(method: Callable[..., T]) -> Callable[..., T]:
    """Run ``method`` on the driver's own netlink thread.

    A pyroute2 handle is not made for several threads, and pyroute2 0.9
    spends 10-15 ms setting itself up in each new thread that uses one; the
    engine runs every stage in a fresh thread. One long-lived thread per
    driver does all netlink work, and callers wait for its answer.
    """

    @functools.wraps(method)
    def call(self: LinuxNve, *args: Any, **kwargs: Any) -> T:
        if threading.get_ident() == self._worker_ident:
            return method(self, *args, **kwargs)
        return self._worker.submit(method, self, *args, **kwargs).result()

    return call


def bridge_name(vni: int) -> str:
    return f"br-{vni}"


def vxlan_name(vni: int) -> str:
    return f"vx-{vni}"


def inflight_name(vni: int) -> str:
    return f"vi-{vni}"


@dataclasses.dataclass
class _Entry:
    """What the NVE was told about one MAC of one VN."""

    remote_vtep: str | None = None
    local_port: str | None = None
    inflight_vtep: str | None = None
    ips: tuple[str, ...] = ()


class LinuxNve:
    """One host's NVE, driven through netlink inside the host's namespace.

    All methods are thread-safe (one netlink socket behind a lock) and
    idempotent, because both the directory agent and the migration stages
    call them, and a stage may run again after a crash.
    """

    def __init__(
        self,
        netns: str | None,
        local_vtep: str,
        vxlan_port: int = 4789,
        inflight_port: int = 4790,
        neigh_suppress: bool = False,
        mtu: int = 1450,
    ) -> None:
        if vxlan_port == inflight_port:
            raise ConfigError(
                f"[{GROUP}] inflight_port ({inflight_port}) equals vxlan_port",
                hint="the kernel allows one VXLAN device per VNI and port: pick another port",
            )
        self.netns = netns
        self.local_vtep = str(ipaddress.ip_address(local_vtep))
        self.vxlan_port = vxlan_port
        self.inflight_port = inflight_port
        self.neigh_suppress = neigh_suppress
        self.mtu = mtu
        self._worker = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"nve-netlink-{netns or 'host'}"
        )
        self._worker_ident = self._worker.submit(threading.get_ident).result()
        self._ipr: Any = self._worker.submit(
            lambda: NetNS(netns) if netns else _local_iproute()
        ).result()
        self._lock = threading.RLock()
        self._entries: dict[tuple[int, str], _Entry] = {}
        self._flood: dict[int, set[str]] = {}
        self._ifindex: dict[str, int] = {}
        self._ready: set[int] = set()

    @classmethod
    def from_conf(cls, conf: cfg.ConfigOpts, netns: str | None, local_vtep: str) -> LinuxNve:
        register_opts(conf)
        opts = conf[GROUP]
        return cls(
            netns,
            local_vtep,
            vxlan_port=opts.vxlan_port,
            inflight_port=opts.inflight_port,
            neigh_suppress=opts.neigh_suppress,
            mtu=opts.mtu,
        )

    # -- devices -----------------------------------------------------------

    @_on_netlink_thread
    def ensure_vn(self, vni: int) -> None:
        """Create (if missing) and bring up the bridge and VXLAN ports of ``vni``.

        Done once per VN and driver: the stages call it on the critical path.
        """
        with self._lock:
            if vni in self._ready:
                return
            br = self._ensure_link(bridge_name(vni), kind="bridge", br_stp_state=0)
            vx = self._ensure_link(
                vxlan_name(vni),
                kind="vxlan",
                vxlan_id=vni,
                vxlan_local=self.local_vtep,
                vxlan_port=self.vxlan_port,
                vxlan_learning=0,
            )
            vi = self._ensure_link(
                inflight_name(vni),
                kind="vxlan",
                vxlan_id=vni,
                vxlan_local=self.local_vtep,
                vxlan_port=self.inflight_port,
                vxlan_learning=0,
            )
            for idx in (vx, vi):
                self._ipr.link("set", index=idx, master=br, mtu=self.mtu)
                self._ipr.link("set", index=idx, state="up")
            self._ipr.link("set", index=br, mtu=self.mtu, state="up")
            self._ipr.brport("set", index=vx, learning=0, neigh_suppress=int(self.neigh_suppress))
            self._ipr.brport(
                "set",
                index=vi,
                learning=0,
                unicast_flood=0,
                mcast_flood=0,
                bcast_flood=0,
            )
            self._flood.setdefault(vni, set())
            self._ready.add(vni)

    @_on_netlink_thread
    def remove_vn(self, vni: int) -> None:
        """Delete the VN's devices (their FDB entries go with them)."""
        with self._lock:
            for name in (inflight_name(vni), vxlan_name(vni), bridge_name(vni)):
                idx = self._lookup(name)
                if idx is not None:
                    self._ipr.link("del", index=idx)
                self._ifindex.pop(name, None)
            self._flood.pop(vni, None)
            self._ready.discard(vni)
            for key in [k for k in self._entries if k[0] == vni]:
                del self._entries[key]

    @_on_netlink_thread
    def set_flood_list(self, vni: int, vteps: list[str]) -> None:
        """Head-end replication: send BUM frames of ``vni`` to exactly ``vteps``."""
        wanted = {str(ipaddress.ip_address(v)) for v in vteps} - {self.local_vtep}
        with self._lock:
            vx = self._index(vxlan_name(vni))
            have = self._flood.setdefault(vni, set())
            for vtep in sorted(wanted - have):
                self._fdb("append", ifindex=vx, lladdr=ZERO_MAC, dst=vtep, flags=NTF_SELF)
            for vtep in sorted(have - wanted):
                self._fdb_del(ifindex=vx, lladdr=ZERO_MAC, dst=vtep, flags=NTF_SELF)
            self._flood[vni] = wanted

    # -- what the agent and the stages say ------------------------------------

    def set_remote(self, vni: int, mac: str, vtep: str, ips: tuple[str, ...] = ()) -> None:
        """The directory places ``mac`` behind ``vtep`` (another host)."""
        self._update(vni, mac, remote_vtep=str(ipaddress.ip_address(vtep)), **self._ips(ips))

    def clear_remote(self, vni: int, mac: str) -> None:
        """The directory no longer places ``mac`` on another host."""
        self._update(vni, mac, remote_vtep=None)

    def plug(self, vni: int, mac: str, port: str, ips: tuple[str, ...] = ()) -> None:
        """``mac`` sits (or is about to sit) behind local ``port``.

        If the port exists the bridge forwards ``mac`` to it; if not yet (an
        incoming migration whose port is not up), the bridge stops sending
        ``mac`` over VXLAN and floods it to the local ports, so the port gets
        its frames from the moment it comes up. The remote location stays
        recorded, and comes back into force on unplug (an aborted migration).
        """
        self._update(vni, mac, local_port=port, **self._ips(ips))

    def unplug(self, vni: int, mac: str) -> None:
        self._update(vni, mac, local_port=None)

    def start_inflight(self, vni: int, mac: str, vtep: str) -> None:
        """Re-tunnel every frame for ``mac`` that reaches this host to ``vtep``."""
        self._update(vni, mac, inflight_vtep=str(ipaddress.ip_address(vtep)))

    def stop_inflight(self, vni: int, mac: str) -> None:
        self._update(vni, mac, inflight_vtep=None)

    def inflight(self, vni: int, mac: str) -> str | None:
        with self._lock:
            entry = self._entries.get((vni, mac))
            return entry.inflight_vtep if entry else None

    @_on_netlink_thread
    def vn_ifindexes(self, vni: int) -> tuple[int, int, int]:
        """(bridge, VXLAN, in-flight VXLAN) interface indexes of ``vni``."""
        with self._lock:
            return (
                self._index(bridge_name(vni)),
                self._index(vxlan_name(vni)),
                self._index(inflight_name(vni)),
            )

    def local_port(self, vni: int, mac: str) -> str | None:
        """The local port ``mac`` was plugged to, if any."""
        with self._lock:
            entry = self._entries.get((vni, mac))
            return entry.local_port if entry else None

    def forget(self, vni: int, mac: str) -> None:
        """Drop every entry for ``mac`` (a directory "expire": look it up again)."""
        self._update(vni, mac, remote_vtep=None, local_port=None, inflight_vtep=None)

    # -- reading the kernel (tests, reports) ---------------------------------

    @_on_netlink_thread
    def master_port(self, vni: int, mac: str) -> str | None:
        """The bridge port the kernel forwards ``mac`` to, or None."""
        with self._lock:
            br = self._index(bridge_name(vni))
            names = {idx: name for name, idx in self._ifindex.items()}
            for msg in self._ipr.fdb("dump"):
                if msg.get("NDA_LLADDR") == mac and msg.get("NDA_MASTER") == br:
                    idx = msg["ifindex"]
                    return names.get(idx) or self._name_of(idx)
        return None

    @_on_netlink_thread
    def vxlan_dst(self, vni: int, mac: str, inflight: bool = False) -> str | None:
        """The VTEP the VXLAN (or in-flight) device sends ``mac`` to, or None."""
        with self._lock:
            dev = self._index(inflight_name(vni) if inflight else vxlan_name(vni))
            for msg in self._ipr.fdb("dump"):
                if msg["ifindex"] == dev and msg.get("NDA_LLADDR") == mac and msg.get("NDA_DST"):
                    return str(msg.get("NDA_DST"))
        return None

    def close(self) -> None:
        with self._lock:
            self._worker.submit(self._ipr.close).result()
            self._worker.shutdown(wait=True)

    # -- internals ----------------------------------------------------------

    @staticmethod
    def _ips(ips: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
        """Addresses to record: none given means keep what we know."""
        return {"ips": tuple(ips)} if ips else {}

    @_on_netlink_thread
    def _update(self, vni: int, mac: str, **changes: Any) -> None:
        with self._lock:
            entry = self._entries.setdefault((vni, mac), _Entry())
            before = dataclasses.replace(entry)
            for key, value in changes.items():
                setattr(entry, key, value)
            self._apply(vni, mac, before, entry)
            if not (entry.remote_vtep or entry.local_port or entry.inflight_vtep):
                self._entries.pop((vni, mac), None)

    def _apply(self, vni: int, mac: str, before: _Entry, now: _Entry) -> None:
        """Make the kernel entries for one MAC match ``now``.

        VXLAN and neighbour entries change only when what we were told
        changed (each netlink call costs about half a millisecond, and this
        runs on the critical path). The bridge entry is always written: the
        kernel may have roamed it to a port by learning.
        """
        br = self._index(bridge_name(vni))
        # Make before break: new VXLAN entries first, then the bridge's
        # decision, and only then remove what it no longer uses, so that no
        # frame meets a port without a destination.
        if now.inflight_vtep and now.inflight_vtep != before.inflight_vtep:
            self._fdb(
                "replace",
                ifindex=self._index(inflight_name(vni)),
                lladdr=mac,
                dst=now.inflight_vtep,
                port=self.vxlan_port,
                flags=NTF_SELF,
                state=NUD_PERMANENT,
            )
        if now.remote_vtep and now.remote_vtep != before.remote_vtep:
            self._fdb(
                "replace",
                ifindex=self._index(vxlan_name(vni)),
                lladdr=mac,
                dst=now.remote_vtep,
                flags=NTF_SELF,
                state=NUD_PERMANENT,
            )
        # The bridge's forwarding decision.
        if now.inflight_vtep:
            self._fdb(
                "replace",
                ifindex=self._index(inflight_name(vni)),
                lladdr=mac,
                master=br,
                flags=NTF_MASTER,
                state=NUD_NOARP,
            )
        elif now.local_port:
            port = self._lookup(now.local_port)
            if port is None:  # not up yet: flood locally rather than tunnel away
                self._fdb_del_master(br, mac)
            else:
                self._fdb(
                    "replace",
                    ifindex=port,
                    lladdr=mac,
                    master=br,
                    flags=NTF_MASTER,
                    state=NUD_NOARP,
                )
        elif now.remote_vtep:
            self._fdb(
                "replace",
                ifindex=self._index(vxlan_name(vni)),
                lladdr=mac,
                master=br,
                flags=NTF_MASTER | NTF_EXT_LEARNED,
                state=NUD_NOARP,
            )
        else:
            self._fdb_del_master(br, mac)
        if before.inflight_vtep and not now.inflight_vtep:
            self._fdb_del(ifindex=self._index(inflight_name(vni)), lladdr=mac, flags=NTF_SELF)
        if before.remote_vtep and not now.remote_vtep:
            self._fdb_del(ifindex=self._index(vxlan_name(vni)), lladdr=mac, flags=NTF_SELF)
        old_ips = before.ips if self._placed(before) else ()
        new_ips = now.ips if self._placed(now) else ()
        if set(old_ips) != set(new_ips):
            self._apply_neigh(br, mac, old_ips, new_ips)

    @staticmethod
    def _placed(entry: _Entry) -> bool:
        return bool(entry.remote_vtep or entry.local_port or entry.inflight_vtep)

    def _apply_neigh(self, br: int, mac: str, old: tuple[str, ...], new: tuple[str, ...]) -> None:
        """Neighbour entries on the bridge (the table ARP/ND suppression answers from)."""
        for ip in new:
            self._ignore(errno.EEXIST)(
                self._ipr.neigh,
                "replace",
                ifindex=br,
                dst=ip,
                lladdr=mac,
                state=NUD_NOARP,
            )
        for ip in set(old) - set(new):
            self._ignore(errno.ENOENT, errno.ESRCH)(self._ipr.neigh, "del", ifindex=br, dst=ip)

    def _fdb(self, cmd: str, **kwargs: Any) -> None:
        self._ipr.fdb(cmd, **kwargs)

    def _fdb_del(self, **kwargs: Any) -> None:
        self._ignore(errno.ENOENT, errno.ESRCH, errno.EINVAL)(self._ipr.fdb, "del", **kwargs)

    def _fdb_del_master(self, br: int, mac: str) -> None:
        """Remove the bridge entry for ``mac`` if it points to our VXLAN ports.

        An entry the bridge learned on a local port is the kernel's own
        knowledge and stays.
        """
        vni = next((v for v in self._ready if self._ifindex.get(bridge_name(v)) == br), None)
        ours = (
            {self._ifindex.get(vxlan_name(vni)), self._ifindex.get(inflight_name(vni))}
            if vni is not None
            else set()
        )
        for msg in self._ipr.fdb("dump"):
            if (
                msg.get("NDA_LLADDR") == mac
                and msg.get("NDA_MASTER") == br
                and msg.get("ifindex") in ours
            ):
                self._fdb_del(ifindex=msg["ifindex"], lladdr=mac, master=br, flags=NTF_MASTER)

    @staticmethod
    def _ignore(*codes: int) -> Any:
        def call(fn: Any, *args: Any, **kwargs: Any) -> None:
            try:
                fn(*args, **kwargs)
            except NetlinkError as exc:
                if exc.code not in codes:
                    raise

        return call

    def _ensure_link(self, name: str, **spec: Any) -> int:
        idx = self._lookup(name)
        if idx is None:
            self._ipr.link("add", ifname=name, **spec)
            idx = self._lookup(name)
        if idx is None:
            raise RuntimeError(f"could not create {name} in namespace {self.netns}")
        return idx

    def _lookup(self, name: str) -> int | None:
        found = self._ipr.link_lookup(ifname=name)
        if found:
            self._ifindex[name] = found[0]
            return int(found[0])
        return None

    def _index(self, name: str, refresh: bool = False) -> int:
        if not refresh and name in self._ifindex:
            return self._ifindex[name]
        idx = self._lookup(name)
        if idx is None:
            raise LookupError(f"no device {name} in namespace {self.netns or '(host)'}")
        return idx

    def _name_of(self, idx: int) -> str | None:
        links = self._ipr.get_links(idx)
        return links[0].get("IFLA_IFNAME") if links else None


def _local_iproute() -> Any:
    from pyroute2 import IPRoute

    return IPRoute()
