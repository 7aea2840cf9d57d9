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

An incoming migration first only *expects* the MAC on its local port
(``expect``, at PREPARE), and *pins* it there once the VM runs here (``plug``,
at RESUMED). While expected, the bridge has no entry for the MAC, so it floods
the MAC's unicast, and a per-VN nftables ``bridge`` filter (table
``vmm_nve``, static rules per VN that look the MAC up in two named sets)
keeps the VM where it still runs the only receiver:

* frames from local ports (this host's other VMs) leave only over the VXLAN
  port, whose own entry sends them to the VM's current VTEP. Not to the new
  port: its queue would fill with copies the guest also gets at the source,
  and it would then drop fresh frames after the resume while the guest works
  through the backlog;
* frames that arrive over VXLAN (the source's in-flight tunnel, peers that
  already moved) go only to the expected port, not to the other local ports.

The first frame the VM sends from its port (QEMU's RARP after the resume)
deletes the expectation in the kernel itself (a ``prerouting`` rule), so that
the bridge, which has just learned the MAC on that port, may deliver local
frames to it before the RESUMED stage pins it. Expecting and pinning are one
set-element change each, through ``nft -f -`` in the host's namespace.

Holding, not dropping (lossless switchover). From PREPARE until the VM's
port is there, what arrives over VXLAN for an expected MAC is held at the
destination and released, in order and before newer frames, into the port
when it appears. Two cases, chosen by what exists at ``expect``:

* the port is there already, or comes before the pause (libvirt creates the
  tap when the incoming QEMU starts, long before it pauses the source): the
  tap is the hold. A tap whose reader (QEMU, the guest paused) does not read
  keeps up to txqueuelen frames in order and counts the rest in tx_dropped
  (measured: 3000 frames sent to an unread tap were all read back in order
  with txqueuelen 4096; with the default 1000, 8 of 1000 were dropped), so
  the driver only deepens the port's queue to the hold's bound;
* the port does not exist yet (the namespace lab moves the VM's port at the
  resume): a per-VM hold, a veth pair whose sending end has a stalled token
  bucket (tbf refilling a byte a second over a pfifo bounded in frames),
  fed by an nftables ``fwd`` on the VXLAN port's ingress (table ``netdev
  vmm_hold``: per VN one chain and a map MAC -> hold device, so arming is
  one map element; ``fwd`` transmits through the device's qdisc). When the
  port joins the bridge (a link notification, or a poll every 20 ms, or
  ``plug`` at the latest) the receiving end gets a redirect into the port,
  the bucket opens (10 Gbit/s) and a poke frame makes it dequeue now: the
  queue drains into the port first, later frames queue behind it; once it
  is empty the MAC's map element goes and the bridge takes over. Receive packet steering
  pins the receiving end to one CPU, because two CPUs draining the same
  queue reordered it (36 of 82 held frames per stream in the lab before).
  Chosen over the alternatives measured or checked here: this kernel has no
  ``plug`` qdisc (the one made for this), no netem, no NFQUEUE-free way to
  park frames in the kernel; a userspace holder reading a packet socket would
  copy every frame through Python on the critical path. A hold is bounded in
  frames (hold_frames, and hold_bytes / (mtu + 18)), overflow is counted by
  the fifo, and a hold not released hold_ms after its first frame is dropped
  and counted as expired.

  The set-up is in-process and cheap under concurrency (an evacuation arms
  20 holds at once on 2 cores): raw rtnetlink for the devices, qdiscs and
  the watcher's reads (vmm_linux.rawlink), libnftables for the map, one
  netlink-worker job per ``expect``/``plug``, device deletion outside the
  worker. It was a ``sh`` script per hold through ``ip netns exec`` (a dozen
  ``ip``/``tc``/``sysctl``/``ethtool`` processes) and ~3 per arm, and the
  watcher read each waiting hold through pyroute2 every 20 ms. Measured with
  ``benchmarks/hold_setup.py`` on this 2-core machine shared with other
  benchmarks, each pair run back to back (the old code from commit 3ea6a82):

  =====================  ===========  =======  ======================  ==========
  (medians)              spare build  one arm  20 ``expect`` at once   watcher,
                                               (median / all done)     20 waiting
  =====================  ===========  =======  ======================  ==========
  before, load 4-5       58.4 ms      14.3 ms  834 / 1176 ms           98 % CPU
  before, load 9-14      28.8 ms      28.8 ms  1921 / 2473 ms          32 % CPU
  after, load 14         1.4 ms       2.2 ms   41 / 84 ms              2.6 % CPU
  before, load 19-21     23.0 ms      15.5 ms  654 / 874 ms            93 % CPU
  after, load 21-23      1.3 ms       2.0 ms   102 / 177 ms            2.5 % CPU
  =====================  ===========  =======  ======================  ==========

  (The watcher's share falls when the machine is busier: it gets less CPU.)
  A release, from the port joining the bridge to the first of 600 held
  frames reaching it (the same benchmark): 17.6 ms before, 2.1 ms after,
  median of 10 at load 15-20; all 600 in order in every run.

The source side of the same goal: a pinned local port gets the in-flight
port as its bridge *backup port*, and the in-flight port replicates to the
VN's VTEPs like the VXLAN port, so a frame for a port that lost its carrier
(the lab's pause) goes on to the destination, which holds it, with no
userspace step. (A port that goes away is not diverted: its MAC's frames
would be replicated to every VTEP until the directory moved it, and a
baseline without an orchestrator would never lose.) QEMU's tap keeps its carrier while the guest is
paused, so under libvirt frames reach the source tap until the in-flight
tunnel: SWITCHOVER takes what the tap queued meanwhile on to the destination
(vmm_linux.leftovers).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import dataclasses
import errno
import functools
import hashlib
import ipaddress
import json
import logging
import os
import secrets
import socket
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from oslo_config import cfg
from pyroute2 import NetlinkError, NetNS

from vmm_kernel import nft as kernel_nft
from vmm_kernel.netns import RecvBuffer, lean_iproute
from vmm_linux import rawlink
from vmm_linux.departure import Departures
from vmm_linux.leftovers import Leftovers
from vmm_linux.netns import entered, socket_in
from vmm_linux.rawlink import RTM_NEWLINK, RawLink
from vmm_orchestrator.contracts import NveDriver
from vmm_orchestrator.errors import ConfigError, VmmError
from vmm_orchestrator.options import require

LOG = logging.getLogger(__name__)

NTF_SELF = 0x02
NTF_MASTER = 0x04
NTF_EXT_LEARNED = 0x10
NUD_NOARP = 0x40
NUD_PERMANENT = 0x80
ZERO_MAC = "00:00:00:00:00:00"
#: The nftables bridge table the NVE owns in its namespace (one per host).
NFT_TABLE = "bridge vmm_nve"
NFT_TIMEOUT_S = 10.0
NETLINK_ROUTE = 0
SO_RCVBUFFORCE = 33
RTMGRP_LINK = 0x1
#: How often the hold watcher looks at queues it has heard nothing about.
HOLD_POLL_S = 0.02
#: Longest a released hold's queue may take to drain before the hold goes anyway.
HOLD_DRAIN_S = 0.5
#: Poke frames: a locally administered address no VM has, an experimental EtherType.
POKE_MAC = bytes.fromhex("020000000000")
POKE_ETHERTYPE = b"\x88\xb5"
#: The nftables netdev table of the holds (one per namespace, beside vmm_depart's):
#: per VN a chain on the VXLAN port's ingress and a map MAC -> hold device.
HOLD_TABLE = "netdev vmm_hold"
#: After vmm_depart's chains on the same device (priority 0): they watch source
#: MACs, and ``fwd`` ends a frame's walk through the hooks.
HOLD_PRIORITY = 10
#: The stalled bucket: a byte a second (the smallest frame passes after a minute).
STALL_RATE = 1
#: The hold's fifo: handle 10: under the tbf's class 1:1.
HOLD_FIFO, HOLD_FIFO_PARENT = 0x100000, 0x10001
#: The opened bucket: 10 Gbit/s (bytes a second), a MiB of burst.
OPEN_RATE, OPEN_BURST = 10**10 // 8, 1 << 20
MS_NOSUID, MS_NODEV, MS_NOEXEC, MNT_DETACH = 2, 4, 8, 2
_libc = ctypes.CDLL(None, use_errno=True)

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
    cfg.BoolOpt(
        "hold",
        default=True,
        help="Hold the frames that reach this NVE over VXLAN for an incoming VM whose "
        "port does not exist yet (from PREPARE until the VM's port joins the bridge) "
        "in a bounded per-VM kernel queue, and release them in order, before new "
        "frames, when it does. A port that already exists (libvirt's tap) queues "
        "them itself.",
    ),
    cfg.IntOpt(
        "hold_frames",
        default=4096,
        min=1,
        help="Most frames held per incoming VM (a 300 ms pause at 10 kpps is 3000). "
        "Frames beyond it are dropped and counted.",
    ),
    cfg.IntOpt(
        "hold_bytes",
        default=8 * 1024 * 1024,
        min=2048,
        help="Most bytes held per incoming VM. The kernel queue counts frames, so "
        "the frame limit becomes min(hold_frames, hold_bytes / (mtu + 18)).",
    ),
    cfg.IntOpt(
        "hold_ms",
        default=1000,
        min=10,
        help="Longest a frame may stay held: a hold not released this long after its "
        "first frame arrived is dropped (counted as expired).",
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


def hold_tag_of(conf: cfg.ConfigOpts, netns: str | None) -> str:
    """The hold devices' tag of the agent a configuration describes: the same
    after a restart, another for the second agent of an HA pair (its own file)."""
    files = "|".join(getattr(conf, "config_file", None) or [])
    return hashlib.sha1(f"{files}|{netns or ''}".encode()).hexdigest()[:4]


def bridge_name(vni: int) -> str:
    return f"br-{vni}"


def vxlan_name(vni: int) -> str:
    return f"vx-{vni}"


def inflight_name(vni: int) -> str:
    return f"vi-{vni}"


def expected_set(vni: int) -> str:
    """nftables set of the MACs of ``vni`` expected on a local port."""
    return f"exp_{vni}"


def pair_set(vni: int) -> str:
    """nftables set of the (MAC . port) pairs of ``vni``'s expectations."""
    return f"pair_{vni}"


class NftError(VmmError):
    """nft refused a change of the NVE's bridge filter."""


@dataclasses.dataclass(frozen=True)
class HoldLimits:
    """Bounds of one VM's hold ([linux_nve] hold_frames, hold_bytes, hold_ms)."""

    frames: int
    bytes: int
    ms: int

    def queue_frames(self, mtu: int) -> int:
        """The kernel fifo's limit in frames: both bounds hold, whatever the frame size."""
        return max(1, min(self.frames, self.bytes // (mtu + 18)))


@dataclasses.dataclass
class _Hold:
    """One incoming VM's hold: a veth pair whose sending end is stalled.

    ``stall`` (root qdisc: a token bucket that refills a byte a second,
    over a fifo bounded in frames) receives, by the VN's nftables hold map on
    the VXLAN port's ingress, every frame that arrives for ``mac``; ``recv`` gets them
    once the bucket is opened, and redirects them into the VM's port.
    """

    vni: int
    mac: str
    port: str
    stall: str
    recv: str
    stall_idx: int = 0
    recv_idx: int = 0
    poker: socket.socket | None = None
    armed_at: float = 0.0
    first_frame_at: float | None = None
    released_at: float | None = None
    held: int = 0
    dropped: int = 0
    expired: int = 0
    outcome: str = "holding"
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False)
    retiring: bool = False
    #: When a released hold's queue was first seen empty.
    empty_at: float | None = None
    #: Size of the frame that spends a full bucket (the largest the port takes).
    poke_size: int = 1464

    def report(self) -> dict[str, Any]:
        return {
            "held": self.held,
            "dropped": self.dropped,
            "expired": self.expired,
            "outcome": self.outcome
            if self.released_at is None or self.outcome != "holding"
            else "released",
            "released_after_arm_ms": None
            if self.released_at is None
            else round((self.released_at - self.armed_at) * 1000.0, 2),
            #: CLOCK_MONOTONIC seconds of the release (comparable with the resume).
            "released_monotonic": self.released_at,
            #: ... and of the arming (a hold armed after the pause misses what came before).
            "armed_monotonic": self.armed_at or None,
        }


def _poker(netns: str | None, dev: str) -> socket.socket:
    sock = socket_in(netns, socket.AF_PACKET, socket.SOCK_RAW, 0)
    sock.bind((dev, 0))
    sock.setblocking(False)
    return sock


def _sysfs_net(netns: str | None) -> int:
    """A directory descriptor of ``/sys/class/net`` as seen from ``netns``.

    sysfs shows the devices of the namespace its mount was made in, and ours
    is the host's: this thread enters ``netns``, mounts a sysfs of its own on
    a temporary directory, opens it and detaches the mount at once. The
    descriptor keeps it readable (new devices included) until closed, and no
    mount stays behind in any table.
    """
    if not netns:
        return os.open("/sys/class/net", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    where = tempfile.mkdtemp(prefix="vmm-nve-sysfs-")
    try:
        with entered(netns):
            flags = ctypes.c_ulong(MS_NOSUID | MS_NODEV | MS_NOEXEC)
            if _libc.mount(b"sysfs", where.encode(), b"sysfs", flags, None) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"mount sysfs: {os.strerror(err)}")
        try:
            return os.open(
                os.path.join(where, "class", "net"), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
            )
        finally:
            _libc.umount2(where.encode(), MNT_DETACH)
    finally:
        os.rmdir(where)


def _link_events(data: bytes) -> list[tuple[str, bool]]:
    """(name, has a master) of the devices RTM_NEWLINK notifications in ``data``
    show (a port that appeared, or joined a bridge), parsed without pyroute2."""
    names = []
    offset = 0
    while offset + 16 <= len(data):
        length, kind = struct.unpack_from("=IH", data, offset)
        if length < 16:
            break
        if kind == RTM_NEWLINK:
            found = rawlink.attrs(data[offset + 32 : offset + length])
            name = found.get(rawlink.IFLA_IFNAME)
            if name is not None:
                text = bytes(name).rstrip(b"\0").decode(errors="replace")
                names.append((text, rawlink.IFLA_MASTER in found))
        offset += (length + 3) & ~3
    return names


def _poke_frame(size: int) -> bytes:
    """A frame for nobody: it only makes the stalled queue dequeue (or spends tokens)."""
    head = POKE_MAC + POKE_MAC + POKE_ETHERTYPE
    return head + bytes(max(0, size - len(head)))


@dataclasses.dataclass
class _Entry:
    """What the NVE was told about one MAC of one VN."""

    remote_vtep: str | None = None
    local_port: str | None = None
    inflight_vtep: str | None = None
    ips: tuple[str, ...] = ()
    #: local_port is only expected (an incoming VM that does not run here yet).
    expected: bool = False


class LinuxNve(NveDriver):
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
        hold: bool = True,
        hold_frames: int = 4096,
        hold_bytes: int = 8 * 1024 * 1024,
        hold_ms: int = 1000,
        hold_tag: str | None = None,
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
        self.hold_enabled = hold
        self.hold_limits = HoldLimits(hold_frames, hold_bytes, hold_ms)
        #: MACs of VMs paused here for a migration's final copy (see vmm_linux.departure).
        self._departures = Departures(self._nft)
        #: The host's tap leftovers (vmm_linux.host sets them): a paused VM's tap is
        #: followed there instead of the kernel's diversion when its reader is known.
        self.leftovers: Leftovers | None = None
        #: (vni, mac) -> the port ``leftovers`` follow for it.
        self._followed: dict[tuple[int, str], str] = {}
        self._holds: dict[tuple[int, str], _Hold] = {}
        #: A hold's devices, built ahead for the next incoming VM of each VN.
        self._spares: dict[int, _Hold] = {}
        self._builders: list[threading.Thread] = []
        self._spare_building: set[int] = set()
        self._hold_reports: dict[tuple[int, str], dict[str, Any]] = {}
        self._watcher: threading.Thread | None = None
        self._closing = threading.Event()
        self._hold_seq = 0
        #: Tells this driver's hold devices from another driver's in the same
        #: namespace (two agents of an HA pair serve one kernel), and is the
        #: same for a restarted agent, which removes what a killed one left.
        self._hold_tag = hold_tag or secrets.token_hex(2)
        self._worker = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"nve-netlink-{netns or 'host'}"
        )
        self._worker_ident = self._worker.submit(threading.get_ident).result()
        self._ipr: Any = self._worker.submit(
            lambda: lean_iproute(NetNS(netns) if netns else _local_iproute())
        ).result()
        self._lock = threading.RLock()
        self._entries: dict[tuple[int, str], _Entry] = {}
        #: Changes the kernel refused part-way, per MAC, until one is applied whole:
        #: the kernel may hold any mix of the record and these (see _update).
        self._refused: dict[tuple[int, str], list[_Entry]] = {}
        self._flood: dict[int, set[str]] = {}
        self._ifindex: dict[str, int] = {}
        self._ready: set[int] = set()
        #: libnftables in-process (vmm_kernel.nft) until it proves unusable here.
        self._libnft = True
        #: The worker's raw rtnetlink requests (vmm_linux.rawlink), made when first needed.
        self._rtnl: RawLink | None = None
        #: /sys/class/net of the namespace (a descriptor; -1: not reachable here).
        self._sysfs: int | None = None

    @classmethod
    def from_conf(cls, conf: cfg.ConfigOpts, netns: str | None, local_vtep: str) -> LinuxNve:
        require(conf, GROUP, "the Linux NVE driver")
        opts = conf[GROUP]
        return cls(
            netns,
            local_vtep,
            vxlan_port=opts.vxlan_port,
            inflight_port=opts.inflight_port,
            neigh_suppress=opts.neigh_suppress,
            mtu=opts.mtu,
            hold=opts.hold,
            hold_frames=opts.hold_frames,
            hold_bytes=opts.hold_bytes,
            hold_ms=opts.hold_ms,
            hold_tag=hold_tag_of(conf, netns),
        )

    # -- devices -----------------------------------------------------------

    def ensure_vn(self, vni: int) -> None:
        """Create (if missing) and bring up the bridge and VXLAN ports of ``vni``.

        Done once per VN and driver: the stages call it on the critical path,
        so a VN that is ready returns at once, without queueing behind the
        netlink worker's jobs (in an evacuation 26 ms median, 1 s at worst,
        only to learn that nothing was to be done). ``_ready`` gets a VN once
        all of it is set up.
        """
        if vni in self._ready:
            return
        self._ensure_vn(vni)

    @_on_netlink_thread
    def _ensure_vn(self, vni: int) -> None:
        with self._lock:
            if vni in self._ready:
                return
            first = not self._ready
            if first:
                # What a killed predecessor armed: its netdev chains outlive the
                # old tap and bind to the next device of that name (a VM that
                # comes back), which would divert its frames away.
                self._departures.forget_all()
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
            self._nft(self._vn_filter(vni))
            for (v, mac), entry in self._entries.items():
                if v == vni and entry.expected and entry.local_port:
                    self._nft(self._expectation(vni, mac, entry.local_port, add=True))
            self._flood.setdefault(vni, set())
            self._forget_stale_holds(vni, first)
            self._ready.add(vni)
            self._ensure_watcher()
            if self.hold_enabled:
                self._spare_later(vni)

    @_on_netlink_thread
    def remove_vn(self, vni: int) -> None:
        """Delete the VN's devices (their FDB entries go with them) and its
        filter; the nftables table goes with the driver's last VN."""
        with self._lock:
            self._ready.discard(vni)
            spare = self._spares.pop(vni, None)
            if spare is not None:
                self._discard(spare)
            last = not self._ready
            self._nft(self._vn_filter_removal(vni, last))
            if self.hold_enabled:
                self._nft(self._hold_filter_removal(vni, last))
            for name in (inflight_name(vni), vxlan_name(vni), bridge_name(vni)):
                idx = self._lookup(name)
                if idx is not None:
                    self._ipr.link("del", index=idx)
                self._ifindex.pop(name, None)
            self._flood.pop(vni, None)
            self._ready.discard(vni)
            for key in [k for k in self._entries if k[0] == vni]:
                del self._entries[key]
            for key in [k for k in self._refused if k[0] == vni]:
                del self._refused[key]  # its devices, and what they held, are gone

    @_on_netlink_thread
    def set_flood_list(self, vni: int, vteps: list[str]) -> None:
        """Head-end replication: send BUM frames of ``vni`` to exactly ``vteps``."""
        wanted = {str(ipaddress.ip_address(v)) for v in vteps} - {self.local_vtep}
        with self._lock:
            vx = self._index(vxlan_name(vni))
            vi = self._index(inflight_name(vni))
            have = self._flood.setdefault(vni, set())
            for vtep in sorted(wanted - have):
                self._fdb("append", ifindex=vx, lladdr=ZERO_MAC, dst=vtep, flags=NTF_SELF)
                # The in-flight port replicates too: a local port that loses its
                # carrier (a VM paused by unplugging it) has it as backup port, and
                # a frame for a MAC it has no entry for yet must reach the
                # destination, which holds it (see ``expect``).
                self._fdb(
                    "append",
                    ifindex=vi,
                    lladdr=ZERO_MAC,
                    dst=vtep,
                    port=self.vxlan_port,
                    flags=NTF_SELF,
                )
            for vtep in sorted(have - wanted):
                self._fdb_del(ifindex=vx, lladdr=ZERO_MAC, dst=vtep, flags=NTF_SELF)
                self._fdb_del(ifindex=vi, lladdr=ZERO_MAC, dst=vtep, flags=NTF_SELF)
            self._flood[vni] = wanted

    # -- what the agent and the stages say ------------------------------------

    def set_remote(self, vni: int, mac: str, vtep: str, ips: tuple[str, ...] = ()) -> None:
        """The directory places ``mac`` behind ``vtep`` (another host)."""
        self._update(vni, mac, remote_vtep=str(ipaddress.ip_address(vtep)), **self._ips(ips))

    def clear_remote(self, vni: int, mac: str) -> None:
        """The directory no longer places ``mac`` on another host."""
        self._update(vni, mac, remote_vtep=None)

    def expect(self, vni: int, mac: str, port: str, ips: tuple[str, ...] = ()) -> None:
        """``mac`` is about to run behind local ``port`` (an incoming migration).

        Until it is pinned (``plug``) or the VM sends its first frame from
        ``port``, frames from the other local ports still go over VXLAN to the
        VM's current host, and frames arriving over VXLAN go to ``port`` only,
        whether or not it exists yet (see the module docstring). The remote
        location stays recorded and comes back into force on ``unplug`` (an
        aborted migration).
        """
        self._end_departure(vni, mac)  # it comes (back) here: nothing to divert
        self._on_worker(self._expect_on_worker, vni, mac, port, ips)
        if self.hold_enabled:
            self._ensure_watcher()
            self._spare_later(vni)

    def _expect_on_worker(self, vni: int, mac: str, port: str, ips: tuple[str, ...]) -> None:
        """``expect``'s kernel work in one job of the netlink worker (see ``_arm_on_worker``).

        The hold first: PREPARE's report does not wait for this stage (it is
        best effort), so under load the pause can come before it ends, and
        from the hold on every frame for ``mac`` that arrives over VXLAN is
        kept, whatever the bridge's entries say (the expectation only adds
        the local ports' side).
        """
        if self.hold_enabled:
            self._arm_on_worker(vni, mac, port)
        self._update(vni, mac, local_port=port, expected=True, **self._ips(ips))

    def plug(self, vni: int, mac: str, port: str, ips: tuple[str, ...] = ()) -> None:
        """``mac`` runs behind local ``port``: pin it there.

        Ends an expectation first, then points the bridge entry at the port
        (the other order would drop the local frames in between; this one at
        worst duplicates a few). If the port does not exist, the bridge floods
        ``mac`` to the local ports until it does.
        """
        self._on_worker(self._plug_on_worker, vni, mac, port, ips)

    def _plug_on_worker(self, vni: int, mac: str, port: str, ips: tuple[str, ...]) -> None:
        """``plug`` in one job of the netlink worker (see ``_arm_on_worker``)."""
        with self._lock:
            hold = self._holds.get((vni, mac))
            entry = self._entries.get((vni, mac))
            # What another process left for the MAC went when this driver expected it
            # (_arm_on_worker, at PREPARE) or pinned it before (a spoofed frame re-pins
            # the entry many times; _keep_pinned): RESUMED's plug pays nothing for it.
            handled = bool(entry and (entry.expected or entry.local_port == port))
        if hold is not None:
            self._release_on_worker(hold)
        elif not handled:
            self._forget_foreign(vni, mac, port)
        self._end_departure(vni, mac)
        self._update(vni, mac, local_port=port, expected=False, **self._ips(ips))

    def unplug(self, vni: int, mac: str) -> None:
        """Neither expected nor pinned here any more (also reverts ``expect``)."""
        self._end_departure(vni, mac)
        with self._lock:
            entry = self._entries.get((vni, mac))
            held = (vni, mac) in self._holds
            pinned = bool(entry and entry.local_port and not entry.expected)
        if held:
            self._drop_hold(vni, mac, "unplugged")
        elif not pinned:  # an aborted incoming migration: maybe armed by another process
            self._forget_foreign(vni, mac, None)
        self._update(vni, mac, local_port=None, expected=False)

    def _forget_foreign(self, vni: int, mac: str, port: str | None) -> None:
        """End what another process armed for ``mac`` and never ended: the HA peer
        (or this agent's predecessor) that ran the migration's PREPARE, then was
        killed before the resume. Its hold map element would forward ``mac``'s
        frames from the VXLAN port into its stalled queue for good, and its
        expectation would keep filtering, while this driver, which takes the
        migration over, has no hold of its own to release. Run when this driver
        neither expected ``mac`` (then ``_arm_on_worker`` removed such an element
        if its port already existed, and its own hold replaced it otherwise) nor
        pinned it to the port already: libnftables makes each a tenth of a
        millisecond. It cannot tell a dead
        peer from a live one: HA peers take a migration over only from a peer
        whose lease expired.
        """
        self._forget_foreign_hold(vni, mac)
        t, exp = NFT_TABLE, expected_set(vni)
        script = f"add element {t} {exp} {{ {mac} }}\ndelete element {t} {exp} {{ {mac} }}\n"
        if port is not None:
            script = self._expectation(vni, mac, port, add=False)
        with contextlib.suppress(NftError):  # the VN's sets are not there (yet)
            self._nft(script)

    def _forget_foreign_hold(self, vni: int, mac: str) -> None:
        """Remove ``mac``'s element from the VN's hold map, whoever armed it."""
        with contextlib.suppress(NftError):  # nothing armed (the usual case), or no map
            self._nft(self._hold_element(vni, mac, None, add=False))

    def expected(self, vni: int, mac: str) -> bool:
        """Whether the driver expects ``mac`` on a local port (not pinned yet).

        The kernel may have ended the expectation already (the VM's first
        frame); ``expectations`` reads what the kernel holds.
        """
        with self._lock:
            entry = self._entries.get((vni, mac))
            return bool(entry and entry.expected and entry.local_port)

    def start_inflight(self, vni: int, mac: str, vtep: str) -> None:
        """Re-tunnel every frame for ``mac`` that reaches this host to ``vtep``."""
        self._update(vni, mac, inflight_vtep=str(ipaddress.ip_address(vtep)))

    def watch_departure(self, vni: int, mac: str, port: str) -> None:
        """The VM behind ``port`` paused for its final copy: send its frames on to
        where it goes. Called at the pause, before any stage runs.

        Where the host's ``leftovers`` know ``port``'s reader (a QEMU's tap), they
        follow it from now on: what the tap receives goes on to the in-flight
        port in order, to the destination's hold, and goes back into the tap if
        the VM resumes here (``end_departure``; vmm_linux.leftovers). Otherwise the
        kernel diverts what the bridge sends to ``port`` from the VM's first frame
        from elsewhere on (vmm_linux.departure), and what the tap queued waits for
        SWITCHOVER: measured on the libvirt lab, a final copy shorter than
        SWITCHOVER's reaction then reordered 38-65 frames.
        """
        self.ensure_vn(vni)
        leftovers = self.leftovers
        if leftovers is not None and leftovers.follow(mac, port, inflight_name(vni)):
            self._departures.disarm(vni, mac)  # one an earlier pause armed, reader unknown then
            with self._lock:
                self._followed[(vni, mac)] = port
            return
        self._departures.arm(vni, mac, port, vxlan_name(vni), inflight_name(vni))

    def departure_watched(self, vni: int, mac: str) -> str | None:
        """The port ``mac``'s departure is watched on, or None."""
        with self._lock:
            followed = self._followed.get((vni, mac))
        if followed and self.leftovers is not None and self.leftovers.following(followed):
            return followed
        return self._departures.armed(vni, mac)

    def end_departure(self, vni: int, mac: str) -> None:
        """The VM resumed here: nothing more of its tap goes on, and what a follow
        sent on goes back into the tap (the VM reads it there)."""
        self._end_departure(vni, mac, drain=False)

    def _end_departure(self, vni: int, mac: str, drain: bool = True) -> None:
        """``mac`` comes (back) here, or its in-flight tunnel ends: nothing to divert."""
        self._departures.disarm(vni, mac)
        with self._lock:
            port = self._followed.pop((vni, mac), None)
        if port is not None and self.leftovers is not None:
            self.leftovers.unfollow(port, drain=drain, mac=mac)

    def stop_inflight(self, vni: int, mac: str) -> None:
        self._end_departure(vni, mac)
        with self._lock:
            entry = self._entries.get((vni, mac))
            known = bool(entry and entry.inflight_vtep)
        if known:
            self._update(vni, mac, inflight_vtep=None)
        else:  # one a previous process of this agent left behind (it was killed)
            self._forget_inflight(vni, mac)

    @_on_netlink_thread
    def _forget_inflight(self, vni: int, mac: str) -> None:
        """Remove the kernel's in-flight entry for ``mac`` whoever made it."""
        self.ensure_vn(vni)
        self._fdb_del(ifindex=self._index(inflight_name(vni)), lladdr=mac, flags=NTF_SELF)

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
        self._update(
            vni, mac, remote_vtep=None, local_port=None, inflight_vtep=None, expected=False
        )

    # -- the hold: frames for an incoming VM whose port does not exist yet ----

    def _arm_on_worker(self, vni: int, mac: str, port: str) -> None:
        """Queue, from now on, what arrives over VXLAN for ``mac`` (see ``_Hold``).

        Nothing to do if ``port`` exists already: a tap queues frames itself
        while the incoming guest is paused (libvirt creates it before the
        pause), and the expectation filter already sends them there. The
        devices come from a spare set built in the background when there is
        one (an evacuation arms many holds of a VN at once: the others build
        theirs now, a few milliseconds each); arming refills and spends the
        bucket again and adds ``mac`` to the VN's hold map. All of it (and
        ``expect``'s entries) is one job of the netlink worker: in an
        evacuation each job queues behind the other migrations' (``expect``'s
        four trips took 0.8 s median there).
        """
        key = (vni, mac)
        existing = self._raw().link(port)
        if existing is not None:
            self._deepen(self._raw(), existing[0], existing[2])
            self._forget_foreign_hold(vni, mac)  # no hold of ours will replace it
            return
        with self._lock:
            if key in self._holds:
                return
            spare = self._spares.pop(vni, None)
        hold = spare if spare is not None else self._make_hold(vni)
        hold.mac, hold.port = mac, port
        self._open_hold(hold, spare is not None)
        hold.armed_at = time.monotonic()
        with self._lock:
            self._holds[key] = hold

    def _open_hold(self, hold: _Hold, refill: bool) -> None:
        """Send ``hold.mac``'s frames from the VXLAN port into the stalled queue."""
        if refill:
            # A spare's bucket refilled while it waited: a change refills it to
            # the burst (and sets the child fifo's limit, in frames), a poke spends it.
            limit = self.hold_limits.queue_frames(self.mtu)
            self._tbf(hold.stall_idx, STALL_RATE, self.mtu + 18, limit, create=False)
            self._spend(hold)
        try:
            self._nft(self._hold_element(hold.vni, hold.mac, hold.stall, add=True))
        except NftError:  # one a killed predecessor left for the MAC: replace it
            with contextlib.suppress(NftError):
                self._nft(self._hold_element(hold.vni, hold.mac, None, add=False))
            self._nft(self._hold_element(hold.vni, hold.mac, hold.stall, add=True))

    def _spare_later(self, vni: int) -> None:
        """Build the next spare hold of ``vni`` in the background, unless one is
        there or on its way (20 holds armed at once built 19 spares to discard)."""

        def build() -> None:
            try:
                if self._closing.is_set():
                    return
                hold = self._build_hold(vni)
            except (NftError, NetlinkError, OSError, LookupError, RuntimeError) as exc:
                LOG.info("no spare hold for VNI %d: %s", vni, exc)
                return
            finally:
                with self._lock:
                    self._spare_building.discard(vni)
            with self._lock:
                keep = vni in self._ready and vni not in self._spares
                keep = keep and not self._closing.is_set()
                if keep:
                    self._spares[vni] = hold
            if not keep:
                self._discard(hold)

        thread = threading.Thread(target=build, name=f"nve-spare-{vni}", daemon=True)
        with self._lock:
            if vni in self._spares or vni in self._spare_building:
                return
            self._spare_building.add(vni)
            self._builders = [t for t in self._builders if t.is_alive()] + [thread]
        thread.start()

    def _build_hold(self, vni: int) -> _Hold:
        """The devices of one hold, stalled, waiting for a MAC (on the netlink worker)."""
        return self._on_worker(self._make_hold, vni)

    def _make_hold(self, vni: int) -> _Hold:
        """Build a hold's veth pair in-process: raw rtnetlink and one sysfs write.

        It was a ``sh`` script of a dozen ``ip``/``tc``/``sysctl``/``ethtool``
        commands through ``ip netns exec``: under an evacuation (20 VMs at
        once, two cores) PREPARE spent more than a second on it (figures in
        the module docstring, ``benchmarks/hold_setup.py``).

        * the veth pair: one RTM_NEWLINK; no IPv6 link-local address on
          either end (IFLA_INET6_ADDR_GEN_MODE none, where ``sysctl
          disable_ipv6`` was), so no frame of their own enters the queue;
        * the stall: tbf at a byte a second (with TCA_TBF_BURST, see
          ``rawlink.tbf_request``) over a pfifo bounded in frames;
        * receive packet steering to CPU 0 on the receiving end, written
          through a sysfs of the namespace (``_sysfs_net``);
        * no ``ethtool -K gro off`` any more: a veth's GRO is off unless
          asked for (5.13 on; before, veth had no GRO path without XDP), and
          the lab's image had no ethtool, so the command never ran anyway.
        """
        with self._lock:
            self._hold_seq += 1
            seq = self._hold_seq
        name = f"vmh{self._hold_tag}{seq % 100000}"  # at most 13 characters
        hold = _Hold(vni, "", "", f"{name}s", f"{name}r")
        hold.poke_size = self.mtu + 14
        limit = self.hold_limits.queue_frames(self.mtu)
        raw = self._raw()
        stale = raw.link(hold.stall)
        if stale is not None:
            raw.delete_link(stale[0])
        raw.add_veth(hold.stall, hold.recv, self.mtu)
        try:
            # not remembered: a hold's devices are named once (a cache of them grows)
            stall, recv = (self._raw_index(raw, name) for name in (hold.stall, hold.recv))
            hold.stall_idx, hold.recv_idx = stall, recv
            for idx in (stall, recv):
                raw.no_ipv6_link_local(idx)
            # a token bucket that refills a byte a second: a stall
            burst = self.mtu + 18
            raw.tbf(stall, STALL_RATE, burst, limit * burst, create=True)
            raw.add_pfifo(stall, HOLD_FIFO_PARENT, HOLD_FIFO, limit)
            raw.up(recv)
            # one CPU takes what leaves the queue: two would reorder it
            self._pin_rps(hold.recv)
            raw.up(stall)
            raw.add_clsact(recv)
            hold.poker = _poker(self.netns, hold.stall)
        except BaseException:
            with contextlib.suppress(NetlinkError, OSError):
                raw.delete_link(hold.stall_idx)
            raise
        self._spend(hold)
        return hold

    def _raw(self) -> RawLink:
        """The worker's raw rtnetlink requests (call on the worker)."""
        if self._rtnl is None:
            self._rtnl = RawLink(self.netns, NFT_TIMEOUT_S)
        return self._rtnl

    def _tbf(self, index: int, rate: int, burst: int, limit: int, create: bool) -> None:
        """Add or change the root tbf of ``index`` (vmm_linux.rawlink); on the worker."""
        self._raw().tbf(index, rate, burst, limit, create)

    def _pin_rps(self, dev: str) -> None:
        """Steer what ``dev`` receives to CPU 0 (rps_cpus of each receive queue)."""
        if self._sysfs is None:
            try:
                self._sysfs = _sysfs_net(self.netns)
            except OSError as exc:
                LOG.warning(
                    "no sysfs of namespace %s (%s): hold queues may drain on two CPUs and reorder",
                    self.netns,
                    exc,
                )
                self._sysfs = -1
        if self._sysfs < 0:
            return
        queues = os.open(f"{dev}/queues", os.O_RDONLY | os.O_DIRECTORY, dir_fd=self._sysfs)
        try:
            for queue in os.listdir(queues):
                if queue.startswith("rx-"):
                    fd = os.open(f"{queue}/rps_cpus", os.O_WRONLY, dir_fd=queues)
                    try:
                        os.write(fd, b"1")
                    finally:
                        os.close(fd)
        finally:
            os.close(queues)

    def _raw_index(self, raw: RawLink, name: str) -> int:
        found = raw.link(name)
        if found is None:
            raise LookupError(f"no device {name} in namespace {self.netns or '(host)'}")
        return found[0]

    @staticmethod
    def _spend(hold: _Hold) -> None:
        """Spend a full bucket on a frame nobody receives (the receiving end has
        no redirect yet): 4 bytes are left, and at a byte a second the smallest
        frame (60) could pass only after a minute."""
        if hold.poker is not None:
            with contextlib.suppress(OSError):
                hold.poker.send(_poke_frame(hold.poke_size))

    def _discard(self, hold: _Hold) -> None:
        """Remove an unused spare's devices (in the caller's thread, see ``_close_hold``)."""
        if hold.poker is not None:
            hold.poker.close()
        try:
            self._delete_devices(hold)
        except (NetlinkError, OSError) as exc:
            LOG.debug("spare hold %s not removed: %s", hold.stall, exc)

    def _delete_devices(self, hold: _Hold) -> None:
        """Delete the hold's veth pair through a raw rtnetlink socket of the caller.

        Not on the netlink worker: deleting a device waits for RCU grace
        periods (synchronize_net), tens of milliseconds each on a loaded
        machine, and 20 of them in a row (the holds of an evacuation retiring)
        kept the worker, and every RESUMED ``plug`` queued behind it, for
        seconds (nve_plug 2.7-3.3 s median).
        """
        if not hold.stall_idx:
            return
        raw = RawLink(self.netns, NFT_TIMEOUT_S)
        try:
            raw.delete_link(hold.stall_idx)
        finally:
            raw.close()

    def release_hold(self, vni: int, mac: str) -> dict[str, Any] | None:
        """Release ``mac``'s held frames into its port, in order, before new frames.

        Called when the port joins the bridge (the watcher) and by ``plug``
        (RESUMED) at the latest; idempotent. Returns the hold's report (None:
        nothing was held for ``mac``).
        """
        with self._lock:
            hold = self._holds.get((vni, mac))
        if hold is not None:
            self._on_worker(self._release_on_worker, hold)
        with self._lock:
            hold = self._holds.get((vni, mac))
            report = self._hold_reports.get((vni, mac))
        return hold.report() if hold is not None else report

    def _release_on_worker(self, hold: _Hold) -> bool:
        return self._release(self._raw(), hold)

    def _release(self, raw: RawLink, hold: _Hold) -> bool:
        """Open ``hold`` into its port through ``raw`` (the worker's or the
        watcher's): raw rtnetlink only, a few tens of microseconds a request
        (through pyroute2, the qdisc dump alone took milliseconds)."""
        with hold.lock:
            if hold.released_at is not None or hold.outcome != "holding":
                return True
            found = raw.link(hold.port)
            if found is None:
                return False
            port = found[0]
            stats = self._qdisc_stats(hold.stall_idx, raw)
            hold.held, hold.dropped = stats.get("qlen", 0), stats.get("drops", 0)
            # Deepened before anything of the hold flows into it (the watcher
            # does it when the port appears, before it joins the bridge): a new
            # txqueuelen deactivates the device for a moment (dev_deactivate,
            # frames sent meanwhile are dropped), which reordered 3 of 10 drains
            # of 600 frames when it came after the release.
            self._deepen(raw, port, found[2])
            # The receiving end delivers into the port, then the stall opens:
            # what waited leaves first, what arrives now queues behind it.
            raw.redirect_all(hold.recv_idx, port)
            # a tbf change also sets its child fifo's limit: in frames here
            limit = self.hold_limits.queue_frames(self.mtu)
            raw.tbf(hold.stall_idx, OPEN_RATE, OPEN_BURST, limit, create=False)
            if hold.poker is not None:  # a dequeue now, not at the old rate's next tick
                with contextlib.suppress(OSError):  # ENOBUFS: a full queue dequeues anyway
                    hold.poker.send(_poke_frame(64))
            hold.released_at = time.monotonic()
        return True

    def _deepen(self, raw: RawLink, port: int, txqlen: int) -> None:
        """Let the port's own queue hold as much as a hold does.

        A tap (libvirt creates it after PREPARE, long before the pause) queues
        what the bridge sends it while QEMU does not read it, the guest being
        paused: up to txqueuelen frames (1000 by default), in order, and drops
        (counting tx_dropped) beyond. Measured here: 3000 frames sent to a tap
        nobody read were all read back in order with txqueuelen 4096; with
        1000, 8 of 1000 were dropped. So the port's queue becomes the hold.
        """
        want = self.hold_limits.queue_frames(self.mtu)
        try:
            if txqlen < want:
                raw.set_txqlen(port, want)
        except (NetlinkError, OSError) as exc:
            LOG.debug("could not deepen the queue of ifindex %d: %s", port, exc)

    def _drop_hold(self, vni: int, mac: str, why: str, raw: RawLink | None = None) -> None:
        with self._lock:
            hold = self._holds.get((vni, mac))
        if hold is not None:
            if hold.released_at is None:
                try:
                    if raw is not None:
                        stats = self._qdisc_stats(hold.stall_idx, raw)
                    else:
                        stats = self._on_worker(
                            lambda: self._qdisc_stats(hold.stall_idx, self._raw())
                        )
                    hold.expired = stats.get("qlen", 0)
                    hold.dropped = stats.get("drops", 0)
                except Exception:  # counted as nothing
                    pass
            self._retire(hold, why)

    def _retire(self, hold: _Hold, why: str) -> None:
        """Remove the hold's filter and devices; keep its report."""
        key = (hold.vni, hold.mac)
        with hold.lock, self._lock:
            if self._holds.get(key) is not hold:
                return
            del self._holds[key]
            hold.outcome = why
            self._hold_reports[key] = hold.report()
        if hold.poker is not None:
            hold.poker.close()
        try:
            self._close_hold(hold)
        except (NetlinkError, OSError) as exc:
            LOG.debug("hold %s not removed: %s", hold.stall, exc)
        LOG.info("hold of %s in VNI %d: %s", hold.mac, hold.vni, hold.report())

    def hold_report(self, vni: int, mac: str) -> dict[str, Any] | None:
        """What the hold of ``mac`` did (held, dropped, expired, outcome), None if none."""
        with self._lock:
            hold = self._holds.get((vni, mac))
            return hold.report() if hold is not None else self._hold_reports.get((vni, mac))

    def holding(self, vni: int, mac: str) -> bool:
        """Whether frames for ``mac`` are being held (armed and not released)."""
        with self._lock:
            hold = self._holds.get((vni, mac))
            return bool(hold and hold.released_at is None)

    def _on_worker(self, fn: Callable[..., T], *args: Any) -> T:
        if threading.get_ident() == self._worker_ident:
            return fn(*args)
        return self._worker.submit(fn, *args).result()

    @staticmethod
    def _qdisc_stats(index: int, raw: RawLink) -> dict[str, int]:
        """qlen and drops of the hold's fifo on ``index`` (empty: it is gone)."""
        found = raw.queue(index, HOLD_FIFO_PARENT, HOLD_FIFO)
        return {"qlen": found[0], "drops": found[1]} if found is not None else {}

    def _ensure_watcher(self) -> None:
        if self._watcher is None:
            self._watcher = threading.Thread(
                target=self._watch, name=f"nve-hold-watch-{self.netns or 'host'}", daemon=True
            )
            self._watcher.start()

    def _watch(self) -> None:
        """Release a hold the moment its port joins the bridge; expire old holds.

        Link notifications of the NVE's namespace, read on a socket of their
        own: the port's RTM_NEWLINK with the bridge as master is the VM's
        resume in the lab (under libvirt the tap exists before, and nothing
        is held).
        """
        sock = socket_in(self.netns, socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE)
        # A handle of its own: a release must not queue behind the worker's jobs.
        raw = RawLink(self.netns, NFT_TIMEOUT_S)
        with contextlib.suppress(OSError):  # many ports at once (an evacuation): no ENOBUFS
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 4 * 1024 * 1024)
        sock.bind((0, RTMGRP_LINK))
        sock.settimeout(HOLD_POLL_S)
        polled = 0.0
        try:
            buffer = RecvBuffer(65536)
            while not self._closing.is_set():
                try:
                    data = buffer.recv(sock)
                except TimeoutError:
                    data = b""
                except OSError:  # ENOBUFS: missed events; the poll below still runs
                    data = b""
                for name, joined in _link_events(data):
                    with self._lock:
                        holds = [h for h in self._holds.values() if h.port == name]
                    for hold in holds:
                        try:
                            if joined:
                                LOG.debug("port %s joined the bridge: releasing %s", name, hold.mac)
                                self._release(raw, hold)
                            elif hold.released_at is None:
                                # not on the bridge yet: nothing flows into it, deepen it now
                                found = raw.link(name)
                                if found is not None:
                                    self._deepen(raw, found[0], found[2])
                        except (NetlinkError, OSError) as exc:
                            LOG.warning("releasing the hold of %s failed: %r", hold.mac, exc)
                if time.monotonic() - polled >= HOLD_POLL_S:
                    polled = time.monotonic()
                    self._poll_holds(raw)
        finally:
            sock.close()
            raw.close()

    def _poll_holds(self, raw: RawLink) -> None:
        """Release a hold whose port is on the bridge (a missed notification);
        drop one whose oldest frame waited longer than hold_ms; once a released
        hold's queue is empty, let new frames take the bridge and remove it.

        Only this thread's own netlink handle: the worker may be busy for a
        while (an evacuation arms many holds at once), and a release must not
        wait for it. The reads are raw requests (vmm_linux.rawlink): through
        pyroute2 they took a whole CPU with 20 holds waiting.
        """
        now = time.monotonic()
        with self._lock:
            holds = list(self._holds.values())
        for hold in holds:
            if hold.released_at is None or hold.retiring:
                continue
            try:
                qlen = self._qdisc_stats(hold.stall_idx, raw).get("qlen")
            except (NetlinkError, OSError) as exc:
                LOG.debug("hold of %s: queue not readable: %s", hold.mac, exc)
                qlen = None
            if qlen:
                hold.empty_at = None
            elif qlen == 0 and hold.empty_at is None:
                # Empty now, but what left the queue last may still be on its
                # way (the receiving end's backlog, the redirect): a frame that
                # took the bridge meanwhile would overtake it. One more poll.
                hold.empty_at = now
                continue
            if qlen is None or qlen == 0 or now - hold.released_at > HOLD_DRAIN_S:
                hold.retiring = True
                threading.Thread(
                    target=self._retire,
                    args=(hold, "released"),
                    name=f"nve-hold-{hold.mac}",
                    daemon=True,
                ).start()
        for hold in holds:
            if hold.released_at is not None:
                continue
            try:
                found = raw.link(hold.port)
                if found is not None and found[1]:
                    self._release(raw, hold)
                    continue
            except (NetlinkError, OSError) as exc:
                LOG.debug("hold of %s: port %s not readable: %s", hold.mac, hold.port, exc)
            if hold.first_frame_at is None:
                try:
                    qlen = self._qdisc_stats(hold.stall_idx, raw).get("qlen")
                except (NetlinkError, OSError):  # retired meanwhile
                    continue
                if qlen:
                    hold.first_frame_at = now
            elif (now - hold.first_frame_at) * 1000.0 > self.hold_limits.ms:
                self._drop_hold(hold.vni, hold.mac, "expired", raw)

    def _forget_stale_holds(self, vni: int, first: bool) -> None:
        """What a killed predecessor of this agent left: the VN's hold map, whose
        elements would swallow a MAC's frames for good, and (``first``: when the
        driver takes its first VN) the hold devices of its tag. Done when this
        driver takes the VN over (an HA peer's elements go too: its holds then
        let frames through unheld). The VXLAN port's tc filters of agents from
        before the hold moved to nftables go as well."""
        if not self.hold_enabled:
            return
        self._nft(self._hold_filter(vni))
        self._ignore(errno.EINVAL, errno.ENOENT)(
            self._ipr.tc, "del", "clsact", index=self._index(vxlan_name(vni))
        )
        if first:
            prefix = f"vmh{self._hold_tag}"
            for link in self._ipr.get_links():
                name = link.get_attr("IFLA_IFNAME") or ""
                if name.startswith(prefix) and name.endswith("s"):
                    self._ignore(errno.ENODEV, errno.ENOENT)(
                        self._ipr.link, "del", index=link["index"]
                    )

    def _close_hold(self, hold: _Hold) -> None:
        """Take ``hold.mac`` out of the VN's hold map, then remove the devices;
        in the caller's thread (libnftables and ``_delete_devices``)."""
        with contextlib.suppress(NftError):  # the VN went, or a restart reset the map
            self._nft(self._hold_element(hold.vni, hold.mac, None, add=False))
        self._delete_devices(hold)

    @staticmethod
    def _hold_filter(vni: int) -> str:
        """Create (or reset, empty) ``vni``'s hold map and its chain on the VXLAN
        port's ingress: a frame whose destination is in the map is forwarded
        (``fwd``: dev_queue_xmit, so through the stall's qdisc) to its hold."""
        t, held, chain = HOLD_TABLE, f"held_{vni}", f"in_{vni}"
        return "\n".join(
            [
                f"add table {t}",
                f"add map {t} {held} {{ type ether_addr : iface_index; }}",
                f"flush map {t} {held}",
                f'add chain {t} {chain} {{ type filter hook ingress device "{vxlan_name(vni)}" '
                f"priority {HOLD_PRIORITY}; }}",
                f"flush chain {t} {chain}",
                f"add rule {t} {chain} fwd to ether daddr map @{held}",
                "",
            ]
        )

    @staticmethod
    def _hold_filter_removal(vni: int, last: bool) -> str:
        """Remove ``vni``'s hold chain and map (the table if ``last``), present or not."""
        t = HOLD_TABLE
        if last:
            return f"add table {t}\ndelete table {t}\n"
        held, chain = f"held_{vni}", f"in_{vni}"
        return "\n".join(
            [
                f"add table {t}",
                f"add chain {t} {chain}",
                f"delete chain {t} {chain}",
                f"add map {t} {held} {{ type ether_addr : iface_index; }}",
                f"delete map {t} {held}",
                "",
            ]
        )

    @staticmethod
    def _hold_element(vni: int, mac: str, stall: str | None, add: bool) -> str:
        """Add ``mac`` -> ``stall`` to ``vni``'s hold map, or delete ``mac``'s element."""
        if add:
            return f'add element {HOLD_TABLE} held_{vni} {{ {mac} : "{stall}" }}\n'
        return f"delete element {HOLD_TABLE} held_{vni} {{ {mac} }}\n"

    def _set_backup_port(self, port: int, backup: int) -> None:
        """Frames for a local port whose carrier is gone go to ``backup`` (the
        in-flight port) instead of being dropped (IFLA_BRPORT_BACKUP_PORT)."""
        try:
            self._ipr.brport("set", index=port, backup_port=backup)
        except NetlinkError as exc:  # a kernel before 4.15: frames are dropped as before
            LOG.debug("no backup port for ifindex %d: %s", port, exc)

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

    @_on_netlink_thread
    def expectations(self, vni: int) -> set[tuple[str, str]]:
        """The (MAC, port) expectations of ``vni`` in the kernel's filter."""
        out = self._nft_run(["-j", "list", "set", *NFT_TABLE.split(), pair_set(vni)])
        found: set[tuple[str, str]] = set()
        for item in json.loads(out).get("nftables", []):
            for elem in item.get("set", {}).get("elem", []):
                mac, port = elem["concat"] if isinstance(elem, dict) else elem
                found.add((str(mac), str(port)))
        return found

    def close(self) -> None:
        self._closing.set()
        self._departures.forget_all()
        with self._lock:
            holds = list(self._holds.values())
        for hold in holds:
            self._retire(hold, "closed")
        with self._lock:
            builders = list(self._builders)
        for thread in builders:  # a spare finished after this would stay behind
            thread.join(timeout=NFT_TIMEOUT_S)
        with self._lock:
            spares = list(self._spares.values())
            self._spares.clear()
        for spare in spares:
            self._discard(spare)
        if self._watcher is not None:
            self._watcher.join(timeout=2 * HOLD_POLL_S + 1)
        with self._lock:
            self._worker.submit(self._close_handles).result()
            self._worker.shutdown(wait=True)

    def _close_handles(self) -> None:
        self._ipr.close()
        if self._rtnl is not None:
            self._rtnl.close()
        if self._sysfs is not None and self._sysfs >= 0:
            os.close(self._sysfs)
        self._sysfs = None

    # -- internals ----------------------------------------------------------

    @staticmethod
    def _ips(ips: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
        """Addresses to record: none given means keep what we know."""
        return {"ips": tuple(ips)} if ips else {}

    @_on_netlink_thread
    def _update(self, vni: int, mac: str, **changes: Any) -> None:
        """Record ``changes`` for one MAC and make the kernel match.

        The kernel may refuse a write part-way (a port that went away, a full
        table): the record then keeps what the kernel was last told in full, and
        the refused change is remembered. Until a change goes through whole, each
        one writes everything it wants and then undoes what the record or any
        refused change has that it does not (every write here is a replace or an
        idempotent delete): whatever mix the kernel holds, it ends as told.
        """
        key = (vni, mac)
        with self._lock:
            entry = self._entries.setdefault(key, _Entry())
            before = dataclasses.replace(entry)
            for name, value in changes.items():
                setattr(entry, name, value)
            refused = self._refused.get(key, [])
            try:
                for known in [_Entry(), before, *refused] if refused else [before]:
                    self._apply(vni, mac, known, entry)
            except BaseException:
                self._refused[key] = [*refused, dataclasses.replace(entry)]
                for field in dataclasses.fields(entry):
                    setattr(entry, field.name, getattr(before, field.name))
                if not self._placed(entry):
                    self._entries.pop(key, None)
                raise
            self._refused.pop(key, None)
            if not self._placed(entry):
                self._entries.pop(key, None)

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
        # The expectation filter: in place before the bridge starts flooding
        # the MAC; when pinning, gone before the bridge sends it to the port
        # (see plug); when reverting, gone after the bridge entry is back.
        exp_before = before.local_port if before.expected else None
        exp_now = now.local_port if now.expected else None
        deferred = None
        if exp_before and exp_before != exp_now:
            if now.local_port:
                self._nft(self._expectation(vni, mac, exp_before, add=False))
            else:
                deferred = exp_before
        if exp_now and exp_now != exp_before:
            self._nft(self._expectation(vni, mac, exp_now, add=True))
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
            port = None if now.expected else self._lookup(now.local_port)
            if port is not None and not self._pin_to_port(br, mac, port):
                port = None
            if port is None:
                # Expected, or pinned to a port that is not up yet (or went away
                # just now): flood (the filter, if expected, picks who gets the copies).
                self._fdb_del_master(br, mac)
            elif now.local_port != before.local_port or before.expected:
                self._set_backup_port(port, self._index(inflight_name(vni)))
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
        if deferred:
            self._nft(self._expectation(vni, mac, deferred, add=False))
        if before.inflight_vtep and not now.inflight_vtep:
            self._fdb_del(ifindex=self._index(inflight_name(vni)), lladdr=mac, flags=NTF_SELF)
        if before.remote_vtep and not now.remote_vtep:
            self._fdb_del(ifindex=self._index(vxlan_name(vni)), lladdr=mac, flags=NTF_SELF)
        old_ips = before.ips if self._placed(before) else ()
        new_ips = now.ips if self._placed(now) else ()
        if set(old_ips) != set(new_ips):
            self._apply_neigh(br, mac, old_ips, new_ips)

    # -- the expectation filter (nftables) -------------------------------------

    @staticmethod
    def _vn_filter(vni: int) -> str:
        """Create (or reset) ``vni``'s sets and rules; see the module docstring.

        The sets start empty: a driver that starts expects nothing, and an
        expectation a previous process left behind must not keep filtering.
        ``flags dynamic`` lets the prerouting rule delete elements.
        """
        t, exp, pair = NFT_TABLE, expected_set(vni), pair_set(vni)
        vx, vi = vxlan_name(vni), inflight_name(vni)
        tunnels = f'{{ "{vx}", "{vi}" }}'
        fwd, pre = f"fwd_{vni}", f"pre_{vni}"
        return "\n".join(
            [
                f"add table {t}",
                f"add set {t} {exp} {{ type ether_addr; flags dynamic; }}",
                f"add set {t} {pair} {{ type ether_addr . ifname; flags dynamic; }}",
                f"flush set {t} {exp}",
                f"flush set {t} {pair}",
                f"add chain {t} {fwd} {{ type filter hook forward priority 0; policy accept; }}",
                f"flush chain {t} {fwd}",
                # from a local port: only the copy to the VXLAN port
                f'add rule {t} {fwd} ether daddr @{exp} iifname != {tunnels} oifname != "{vx}" '
                "counter drop",
                # over VXLAN: only the copy to the expected port
                f"add rule {t} {fwd} ether daddr @{exp} iifname {tunnels} "
                f"ether daddr . oifname != @{pair} counter drop",
                f"add chain {t} {pre} {{ type filter hook prerouting priority 0; policy accept; }}",
                f"flush chain {t} {pre}",
                # the VM's first frame from its port: it runs here, expect no more
                f"add rule {t} {pre} ether saddr . iifname @{pair} counter "
                f"delete @{exp} {{ ether saddr }} delete @{pair} {{ ether saddr . iifname }}",
                "",
            ]
        )

    @staticmethod
    def _vn_filter_removal(vni: int, last: bool) -> str:
        """Remove ``vni``'s chains and sets (the table if ``last``), present or not.

        nft 1.0.6 has no "destroy": adding first makes the deletion idempotent.
        """
        t = NFT_TABLE
        if last:
            return f"add table {t}\ndelete table {t}\n"
        lines = [f"add table {t}"]
        for chain in (f"fwd_{vni}", f"pre_{vni}"):
            lines += [f"add chain {t} {chain}", f"delete chain {t} {chain}"]
        lines += [
            f"add set {t} {expected_set(vni)} {{ type ether_addr; flags dynamic; }}",
            f"delete set {t} {expected_set(vni)}",
            f"add set {t} {pair_set(vni)} {{ type ether_addr . ifname; flags dynamic; }}",
            f"delete set {t} {pair_set(vni)}",
        ]
        return "\n".join(lines) + "\n"

    @staticmethod
    def _expectation(vni: int, mac: str, port: str, add: bool) -> str:
        """Add or remove one expectation (idempotent: the kernel may have removed it)."""
        t = NFT_TABLE
        elems = [(expected_set(vni), mac), (pair_set(vni), f'{mac} . "{port}"')]
        lines = []
        for name, elem in elems:
            lines.append(f"add element {t} {name} {{ {elem} }}")
            if not add:
                lines.append(f"delete element {t} {name} {{ {elem} }}")
        return "\n".join(lines) + "\n"

    def _nft_run(self, args: list[str], script: str | None = None) -> str:
        cmd = ["nft", *args]
        if self.netns:
            cmd = ["ip", "netns", "exec", self.netns, *cmd]
        try:
            res = subprocess.run(
                cmd, input=script, capture_output=True, text=True, timeout=NFT_TIMEOUT_S
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise NftError(f"could not run {' '.join(cmd)}: {exc}") from exc
        if res.returncode != 0:
            raise NftError(
                f"nft failed in namespace {self.netns or '(host)'}: {res.stderr.strip()}"
                + (f"\n{script}" if script else "")
            )
        return res.stdout

    def _nft(self, script: str) -> None:
        """Apply ``script`` atomically (one nft transaction).

        In-process through libnftables when the library is there (about a
        tenth of a millisecond, where a ``nft -f -`` subprocess costs 6-20 ms
        on the RESUMED path), else the nft command.
        """
        if self._libnft:
            try:
                kernel_nft.nft(self.netns, script)
                return
            except kernel_nft.NftError as exc:
                where = self.netns or "(host)"
                raise NftError(f"nft failed in namespace {where}: {exc}\n{script}") from None
            except kernel_nft.NftUnavailable as exc:
                LOG.info("libnftables unusable (%s): the nft command instead", exc)
                self._libnft = False
        self._nft_run(["-f", "-"], script)

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

    def _pin_to_port(self, br: int, mac: str, port: int) -> bool:
        """Point the bridge entry for ``mac`` at ``port``; False if the port went away
        between its lookup and this write (ENODEV: a VM's tap is removed as its QEMU
        ends, met on the libvirt lab with a late SWITCHOVER)."""
        try:
            self._fdb(
                "replace", ifindex=port, lladdr=mac, master=br, flags=NTF_MASTER, state=NUD_NOARP
            )
        except NetlinkError as exc:
            if exc.code != errno.ENODEV:
                raise
            LOG.info("port ifindex %d of %s went away while pinning it; flooding", port, mac)
            return False
        return True

    def _fdb_del(self, **kwargs: Any) -> None:
        self._ignore(errno.ENOENT, errno.ESRCH, errno.EINVAL)(self._ipr.fdb, "del", **kwargs)

    def _fdb_del_master(self, br: int, mac: str) -> None:
        """Remove the bridge entry for ``mac`` if it points to our VXLAN ports.

        An entry the bridge learned on a local port is the kernel's own
        knowledge and stays: the bridge deletes an entry only through the
        port it is on (ENOENT otherwise), so one delete per VXLAN port does
        it. (It was a dump of the whole FDB, parsed by pyroute2: 64 ms
        median per expect or plug in an evacuation, on the netlink worker
        every other stage waits for.)
        """
        vni = next((v for v in self._ready if self._ifindex.get(bridge_name(v)) == br), None)
        if vni is None:
            return
        for name in (vxlan_name(vni), inflight_name(vni)):
            port = self._ifindex.get(name)
            if port is not None:
                self._fdb_del(ifindex=port, lladdr=mac, master=br, flags=NTF_MASTER)

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
        self._ifindex[name] = idx
        return idx

    def _lookup(self, name: str) -> int | None:
        """The ifindex of ``name`` now (None: no such device). Not cached: guest
        ports and hold devices come and go with migrations."""
        found = self._ipr.link_lookup(ifname=name)
        return int(found[0]) if found else None

    def _index(self, name: str, remember: bool = True) -> int:
        """The ifindex of one of the NVE's own devices, cached while ``remember``
        (the per-VN bridge, VXLAN and in-flight ports; dropped with the VN)."""
        if remember and name in self._ifindex:
            return self._ifindex[name]
        idx = self._lookup(name)
        if idx is None:
            raise LookupError(f"no device {name} in namespace {self.netns or '(host)'}")
        if remember:
            self._ifindex[name] = idx
        return idx

    def _name_of(self, idx: int) -> str | None:
        links = self._ipr.get_links(idx)
        return links[0].get("IFLA_IFNAME") if links else None


def _local_iproute() -> Any:
    from pyroute2 import IPRoute

    return IPRoute()
