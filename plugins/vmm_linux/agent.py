"""The NVE agent: keeps one host's Linux NVE in step with the directory.

It registers the NVE, loads the VNs it serves, then follows the NVA's
watch (a stream the directory pushes changes on, or a long-poll where the
directory cannot stream) and applies each change to the kernel,
acknowledging the revision it has applied so the orchestrator can measure
when every peer has converged. Acks go out without waiting for an answer
(``ack_async``: on the stream, or batched with other NVEs' acks for etcd),
so a move costs the directory no request-response round per peer.
Sequence numbers make it safe against reordering: an older location is
never applied over a newer one (EVPN MAC mobility, RFC 7432 section 15).

With ``local_learning`` on it also does what an EVPN NVE does without any
orchestrator: when the bridge learns a MAC on a local port that the
directory places elsewhere, it reports the move (sequence + 1). That is how
the lab's baselines converge at all, from whatever frame the VM sends first.
But one frame with a forged source MAC must not move another VM's traffic
(issue 13), so a learned MAC is reported only when

* it is the port's configured MAC: the MAC libvirt derived the tap's own
  address from (``fe:`` + the guest MAC's last five octets, which the guest
  cannot change), the MAC of a veth port's peer, or a MAC given to
  :meth:`NveAgent.configure_port`; or
* the directory has a migration of that MAC pending to this NVE (pre-staged
  here, not yet committed) and the port is not some other VM's (a tap or
  veth configured for another MAC): a VM at the destination could otherwise
  take the migrating VM's traffic between the pre-stage and the plug.

Anything else is refused, counted (``refused_moves``), logged, and the
bridge entry is pointed back at the VXLAN port. Spoofed GARP/NA/RARP frames
for a MAC that the directory binds elsewhere thus move nothing.

A guest can also claim another VM's *address* with its own MAC (a GARP or
an unsolicited NA), which moves nothing in the directory but would poison
the neighbour caches of every guest in the VN. With ``address_guard`` on,
the agent keeps an nftables ``bridge vmm_guard`` table in the host's
namespace holding the directory's (IP, MAC) bindings of its VNs, and drops
ARP and NA frames entering from a local port that announce a known address
with a MAC the directory does not bind it to (the table's counters say how
many).

Flood (BUM) lists follow the directory's NVE registrations at any time:
the change log carries an ``nve`` change per VN whenever an NVE joins,
leaves or changes its VTEP. An entry the kernel cannot take (a bad MAC or
VTEP from an older directory) is logged, counted (``rejected_entries``) and
skipped; the agent goes on with the rest.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
import time
from typing import Any

from oslo_config import cfg
from pyroute2.netlink import NETLINK_ROUTE, NLM_F_REQUEST
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl import RTM_GETLINK, RTM_NEWLINK, RTMGRP_NEIGH
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg
from pyroute2.netlink.rtnl.marshal import MarshalRtnl

from vmm_kernel.netns import RecvBuffer
from vmm_kernel.nft import NftError, nft
from vmm_linux.netns import socket_in
from vmm_linux.nve import LinuxNve
from vmm_orchestrator.errors import TransientError, VmmError
from vmm_orchestrator.model import normalize_mac
from vmm_orchestrator.nva import errors as nva_errors
from vmm_orchestrator.nva.store import check_ip, check_ips, check_mac

LOG = logging.getLogger(__name__)

AF_BRIDGE = 7
NUD_PERMANENT = 0x80

GROUP = "nve_agent"
AGENT_OPTS: list[cfg.Opt] = [
    cfg.FloatOpt(
        "watch_timeout",
        default=5.0,
        min=0.1,
        help="Seconds one long-poll of the directory's watch may wait for a change.",
    ),
    cfg.FloatOpt(
        "retry_interval",
        default=0.5,
        min=0.01,
        help="Seconds between attempts to reach the directory after it failed; "
        "after a failure the agent loads its VNs again in full.",
    ),
    cfg.BoolOpt(
        "address_guard",
        default=True,
        help="Drop ARP and neighbour advertisements entering from a local port that "
        "announce an address the directory binds to another MAC (an nftables bridge "
        "table 'vmm_guard' in the host's namespace), so one guest cannot claim another's "
        "address.",
    ),
    cfg.BoolOpt(
        "local_learning",
        default=True,
        help="Report a MAC that the bridge learns on a local port, while the "
        "directory places it elsewhere, as a move (EVPN-style MAC mobility).",
    ),
]


def register_opts(conf: cfg.ConfigOpts) -> None:
    conf.register_opts(AGENT_OPTS, group=GROUP)


GUARD_TABLE = "bridge vmm_guard"


class AddressGuard:
    """The directory's (IP, MAC) bindings as nftables sets, and the rules that use them.

    One table per host namespace with the union of the bindings of every VN
    the agent serves: an address is guarded once any VN binds it, and a
    frame passes if any VN binds its (address, MAC) pair, so overlapping
    tenant ranges stay usable. Frames from the VXLAN ports are the remote
    NVE's business and pass. Updates are incremental set-element changes,
    one nft transaction each, through libnftables in-process (vmm_kernel.nft).
    """

    def __init__(self, netns: str | None) -> None:
        self.netns = netns
        self._bindings: dict[tuple[int, str], tuple[str, ...]] = {}
        self._pairs: dict[tuple[str, str], int] = {}
        self._known: dict[str, int] = {}
        self.failures = 0

    @staticmethod
    def _element(ip: str) -> tuple[str, str]:
        """(set suffix, element text) of an address: IPv6 as the raw 128-bit target."""
        addr = ipaddress.ip_address(ip)
        if addr.version == 4:
            return "4", str(addr)
        return "6", "0x" + addr.packed.hex()

    def _run(self, script: str) -> None:
        """One nft transaction in the host's namespace (vmm_kernel.nft)."""
        try:
            nft(self.netns, script)
        except NftError as exc:
            raise VmmError(f"nft failed: {exc.stderr.strip()}", hint="see the rule above") from None

    def start(self) -> None:
        """Create (or reset to empty) the table; bindings are added as entries apply."""
        t = GUARD_TABLE
        self._bindings.clear()
        self._pairs.clear()
        self._known.clear()
        self._run(
            "\n".join(
                [
                    f"add table {t}",
                    f"delete table {t}",
                    f"add table {t}",
                    f"add set {t} known4 {{ type ipv4_addr; }}",
                    f"add set {t} pair4 {{ type ipv4_addr . ether_addr; }}",
                    f"add set {t} known6 {{ typeof @th,64,128; }}",
                    f"add set {t} pair6 {{ typeof @th,64,128 . ether saddr; }}",
                    f"add chain {t} pre {{ type filter hook prerouting priority -10; "
                    "policy accept; }",
                    f'add rule {t} pre iifname "vx-*" accept',
                    f'add rule {t} pre iifname "vi-*" accept',
                    f"add rule {t} pre arp saddr ip @known4 "
                    "arp saddr ip . arp saddr ether != @pair4 counter drop",
                    f"add rule {t} pre icmpv6 type nd-neighbor-advert @th,64,128 @known6 "
                    "@th,64,128 . ether saddr != @pair6 counter drop",
                    "",
                ]
            )
        )

    def stop(self) -> None:
        """Remove the table (nothing guards a host whose agent is gone)."""
        t = GUARD_TABLE
        self._run(f"add table {t}\ndelete table {t}\n")

    def bind(self, key: tuple[int, str], ips: tuple[str, ...]) -> None:
        """The directory binds ``ips`` to ``key``'s MAC (replacing what it bound before)."""
        ips = tuple(sorted(set(ips)))
        if self._bindings.get(key, ()) == ips:
            return
        self._update(key, ips)

    def unbind(self, key: tuple[int, str]) -> None:
        if key in self._bindings:
            self._update(key, ())

    def _update(self, key: tuple[int, str], ips: tuple[str, ...]) -> None:
        mac = key[1]
        old = self._bindings.get(key, ())
        lines: list[str] = []
        t = GUARD_TABLE
        for ip in set(old) - set(ips):
            version, elem = self._element(ip)
            if self._count(self._pairs, (ip, mac), -1) == 0:
                lines.append(f"delete element {t} pair{version} {{ {elem} . {mac} }}")
            if self._count(self._known, ip, -1) == 0:
                lines.append(f"delete element {t} known{version} {{ {elem} }}")
        for ip in set(ips) - set(old):
            version, elem = self._element(ip)
            if self._count(self._pairs, (ip, mac), 1) == 1:
                lines.append(f"add element {t} pair{version} {{ {elem} . {mac} }}")
            if self._count(self._known, ip, 1) == 1:
                lines.append(f"add element {t} known{version} {{ {elem} }}")
        if ips:
            self._bindings[key] = ips
        else:
            self._bindings.pop(key, None)
        if lines:
            self._run("\n".join(lines) + "\n")

    @staticmethod
    def _count(counts: dict[Any, int], item: Any, delta: int) -> int:
        value = counts.get(item, 0) + delta
        if value > 0:
            counts[item] = value
        else:
            counts.pop(item, None)
        return max(value, 0)


#: Seconds between two log lines about refused moves of the same MAC.
REFUSAL_LOG_INTERVAL = 10.0
#: Seconds a refusal stands for the same MAC on the same port without asking
#: the directory again: a guest spoofing at frame rate costs at most a few
#: look-ups per second, and a migration pre-staged meanwhile waits this long.
REFUSAL_HOLD_DOWN = 0.25


class PortInspector:
    """What a local bridge port says about the MAC it is configured for.

    Read over netlink in the host's namespace, one request per question
    (questions come only when a MAC placed elsewhere shows up on a port).
    """

    def __init__(self, netns: str | None) -> None:
        self.netns = netns

    def link(self, ifindex: int, nsid: int | None = None) -> dict[str, Any] | None:
        """IFLA attributes of one link (in the namespace ``nsid`` names, when given)."""
        msg = ifinfmsg()
        msg["family"] = 0
        msg["index"] = ifindex
        if nsid is not None:
            msg["attrs"] = [("IFLA_IF_NETNSID", nsid)]
        msg["header"]["type"] = RTM_GETLINK
        msg["header"]["flags"] = NLM_F_REQUEST
        msg["header"]["sequence_number"] = 1
        msg.encode()
        sock = socket_in(self.netns, socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE)
        try:
            sock.settimeout(1.0)
            sock.bind((0, 0))
            sock.send(msg.data)
            data = sock.recv(1 << 16)
        finally:
            sock.close()
        for answer in MarshalRtnl().parse(data):
            if answer.get("header", {}).get("type") == RTM_NEWLINK:
                info = answer.get("IFLA_LINKINFO")
                return {
                    "name": answer.get("IFLA_IFNAME"),
                    "address": answer.get("IFLA_ADDRESS"),
                    "link": answer.get("IFLA_LINK"),
                    "netnsid": answer.get("IFLA_LINK_NETNSID"),
                    "kind": info.get("IFLA_INFO_KIND") if info else None,
                }
        return None

    def configured(self, port: dict[str, Any], mac: str) -> tuple[str | None, str | None]:
        """What ``port`` (from :meth:`link`) says about ``mac``: (why it is the port's
        configured MAC, which other MAC the port is configured for); (None, None) when
        the port names no MAC.

        A libvirt tap (``fe:`` + its guest MAC's last five octets) or a veth whose
        peer has a MAC is some VM's port: a frame there with another MAC is forged,
        whatever migration is pending.
        """
        own = (port["address"] or "").lower()
        # (a veth's random MAC starts with fe: once in 64: it is no libvirt tap)
        if own.startswith("fe:") and not mac.startswith("fe:") and port["kind"] != "veth":
            if own[2:] == mac[2:]:
                return f"the MAC libvirt configured tap {port['name']} for", None
            return None, f"tap {port['name']} (guest MAC *{own[2:]})"
        if port["kind"] == "veth" and port["link"]:
            peer = self.link(port["link"], port["netnsid"])
            address = None if peer is None else (peer["address"] or "").lower()
            if address == mac:
                return f"the MAC of veth {port['name']}'s peer", None
            if address:
                return None, f"veth {port['name']} (peer MAC {address})"
        return None, None


class NveAgent:
    """Directory -> kernel for one NVE, in two background threads."""

    def __init__(
        self,
        nve_id: str,
        nve: LinuxNve,
        nva: Any,
        vnis: list[int],
        watch_timeout: float = 5.0,
        retry_interval: float = 0.5,
        local_learning: bool = True,
        address_guard: bool = True,
    ) -> None:
        self.id = nve_id
        self.nve = nve
        self.nva = nva
        self.vnis = sorted(set(vnis))
        self.watch_timeout = watch_timeout
        self.retry_interval = retry_interval
        self.local_learning = local_learning
        self.revision = 0
        self.applied: dict[tuple[int, str], int] = {}
        self.placement: dict[tuple[int, str], str] = {}
        #: (vni, mac) -> (where, monotonic time the kernel was programmed).
        self.applied_at: dict[tuple[int, str], tuple[str, float]] = {}
        self.errors = 0
        #: Directory entries the kernel could not take (logged, skipped).
        self.rejected_entries = 0
        #: Locally learned MACs not reported as moves (no migration, not the port's MAC).
        self.refused_moves = 0
        #: Locally learned MACs reported as moves.
        self.reported_moves = 0
        #: VNI -> {peer NVE id: VTEP}: the VN's flood list.
        self.members: dict[int, dict[str, str]] = {}
        #: Port name -> MACs configured on it (by configure_port).
        self.port_macs: dict[str, set[str]] = {}
        netns = getattr(nve, "netns", None)
        self.ports = PortInspector(netns)
        #: The ARP/NA guard of this host's local ports (None: off, or not a Linux NVE).
        self.guard = AddressGuard(netns) if address_guard and isinstance(nve, LinuxNve) else None
        self._refusal_logged: dict[tuple[int, str], float] = {}
        self._refused_at: dict[tuple[int, str, int], float] = {}
        self._vteps: dict[str, str] = {}
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lock = threading.RLock()
        self._synced = threading.Event()
        self._listening = threading.Event()

    # -- life cycle -----------------------------------------------------------

    def start(self) -> None:
        """Register, load every VN and start following the directory."""
        self._stop.clear()
        for vni in self.vnis:
            self.nve.ensure_vn(vni)
        if self.guard is not None:
            self._guard_call(self.guard.start)
        self.nva.register_nve(self.id, self.nve.local_vtep, self.vnis)
        self.resync()
        self._spawn(self._watch_loop, f"nve-agent-{self.id}")
        if self.local_learning:
            self._listening.clear()
            self._spawn(self._learn_loop, f"nve-learn-{self.id}")
            if not self._listening.wait(5.0):
                LOG.warning("%s: local learning did not start listening within 5 s", self.id)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=self.watch_timeout + 2)
        self._threads.clear()
        close_stream = getattr(self.nva, "close_stream", None)
        if close_stream is not None:  # an agent that stopped follows nothing
            close_stream(self.id)
        if self.guard is not None:
            self._guard_call(self.guard.stop)

    def _guard_call(self, method: Any, *args: Any) -> None:
        """A change to the address guard; a failure is counted and logged, never fatal."""
        assert self.guard is not None
        try:
            method(*args)
        except Exception as exc:
            self.guard.failures += 1
            if self.guard.failures <= 3 or self.guard.failures % 100 == 0:
                LOG.warning(
                    "%s: address guard update failed (%d so far): %s",
                    self.id,
                    self.guard.failures,
                    exc,
                )

    def _spawn(self, target: Any, name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    # -- directory -> kernel --------------------------------------------------

    def resync(self) -> None:
        """Load the whole state of our VNs (at start and after losing the watch).

        Each VN's endpoints come with the revision they were read at (one
        snapshot), and the watch continues from the oldest of those, so a
        change made meanwhile is delivered again rather than lost.
        """
        revisions = []
        with self._lock:
            for vni in self.vnis:
                nves = self.nva.list_nves(vni=vni)
                self._vteps.update({n["id"]: n["vtep"] for n in nves})
                self.members[vni] = {n["id"]: n["vtep"] for n in nves if n["id"] != self.id}
                self._apply_flood_list(vni)
                revision, endpoints = self.nva.snapshot(vni=vni)
                revisions.append(revision)
                present = set()
                for endpoint in endpoints:
                    present.add((vni, str(endpoint.get("mac"))))
                    self._apply_safely(endpoint)
                for key in [k for k in self.placement if k[0] == vni and k not in present]:
                    self._forget(key)  # deleted while we were not watching
            if revisions:
                self.revision = (
                    min(revisions) if self.revision == 0 else max(self.revision, min(revisions))
                )
        self.nva.ack(self.id, self.revision)
        self._synced.set()

    def _apply_flood_list(self, vni: int) -> None:
        vteps = sorted(set(self.members.get(vni, {}).values()))
        try:
            self.nve.set_flood_list(vni, vteps)
        except Exception as exc:  # a bad VTEP must not stop the rest
            self.rejected_entries += 1
            LOG.error("%s: cannot set the flood list of VN %d to %s: %s", self.id, vni, vteps, exc)

    def _apply_membership(
        self, vni: int, nve: dict[str, Any], member: bool, flood: bool = True
    ) -> bool:
        """An NVE joined, left or moved its VTEP in ``vni``: follow it in the flood list.

        ``flood`` False leaves programming the flood list to the caller (once
        per VN for a whole batch of changes: when a thousand NVEs register,
        each peer gets a thousand such changes, and a flood list rebuilt and
        logged per change cost every agent O(N) per change, measured as
        ~50 ms of CPU per agent at 1,000 peers in benchmarks/fanout.py).
        Returns whether the VN's members changed.
        """
        nve_id = str(nve["id"])
        if nve_id == self.id or vni not in self.vnis:
            return False
        members = self.members.setdefault(vni, {})
        if member:
            members[nve_id] = str(nve["vtep"])
            self._vteps[nve_id] = str(nve["vtep"])
        else:
            members.pop(nve_id, None)
        LOG.info(
            "%s: NVE %s %s VN %d (%d peers flooded to)",
            self.id,
            nve_id,
            "is in" if member else "left",
            vni,
            len(members),
        )
        if flood:
            self._apply_flood_list(vni)
        return True

    def _apply_safely(self, endpoint: dict[str, Any]) -> bool:
        """apply_endpoint, once more if the kernel refused a write (a device changed
        meanwhile; the NVE then still records the entry as it was, so the repeat writes
        all of it again); an entry we still cannot apply is logged, counted and skipped."""
        try:
            try:
                return self.apply_endpoint(endpoint)
            except (NetlinkError, NftError) as exc:
                LOG.info("%s: applying %s again after %s", self.id, endpoint.get("mac"), exc)
                return self.apply_endpoint(endpoint)
        except Exception as exc:
            self.rejected_entries += 1
            LOG.error(
                "%s: cannot apply directory entry %s in VN %s (%s); skipped",
                self.id,
                endpoint.get("mac"),
                endpoint.get("vni"),
                exc,
            )
            return False

    @staticmethod
    def check_entry(endpoint: dict[str, Any]) -> None:
        """Refuse (BadRequest) an entry the kernel would refuse, before touching it."""
        check_mac(endpoint.get("mac"))
        check_ips(endpoint.get("ipv4") or [], 4, "ipv4")
        check_ips(endpoint.get("ipv6") or [], 6, "ipv6")

    def apply_endpoint(self, endpoint: dict[str, Any]) -> bool:
        """Apply one directory entry unless we already hold a newer one."""
        self.check_entry(endpoint)
        key = (int(endpoint["vni"]), endpoint["mac"])
        seq = int(endpoint["seq"])
        with self._lock:
            if seq < self.applied.get(key, -1):
                LOG.info("%s: ignoring stale %s seq %d", self.id, key, seq)
                return False
            where = endpoint["nve"]
            ips = tuple(endpoint.get("ipv4") or ()) + tuple(endpoint.get("ipv6") or ())
            if where == self.id:
                self.nve.clear_remote(*key)
            else:
                vtep = str(check_ip(self._vtep_of(where), "vtep"))
                self.nve.set_remote(key[0], key[1], vtep, ips)
            if self.guard is not None:
                self._guard_call(self.guard.bind, key, ips)
            if self.placement.get(key) != where:
                self.applied_at[key] = (where, time.monotonic())
            self.applied[key] = seq
            self.placement[key] = where
            return True

    def apply_changes(self, changes: list[dict[str, Any]]) -> None:
        """Apply a batch of changes in order; each VN's flood list is programmed once."""
        flood: set[int] = set()
        for change in changes:
            self.apply_change(change, flood)
        for vni in sorted(flood):
            self._apply_flood_list(vni)

    def apply_change(self, change: dict[str, Any], flood: set[int] | None = None) -> None:
        """Apply one change of the log; one that cannot be applied is logged and skipped.

        With ``flood`` given, the VNs whose flood list must be programmed are
        added to it instead (see :meth:`apply_changes`).
        """
        kind = change.get("kind")
        try:
            if kind == "endpoint":
                self._apply_safely(change["endpoint"])
            elif kind == "nve":
                vni = int(change["vni"])
                changed = self._apply_membership(
                    vni, change["nve"], bool(change["member"]), flood is None
                )
                if changed and flood is not None:
                    flood.add(vni)
            elif kind == "expire":
                self._expire(int(change["vni"]), change["mac"])
            elif kind == "endpoint_deleted":
                self._forget((int(change["vni"]), change["mac"]))
        except Exception as exc:
            self.rejected_entries += 1
            LOG.error(
                "%s: cannot apply change %s (%s): %s; skipped",
                self.id,
                change.get("revision"),
                kind,
                exc,
            )

    def _forget(self, key: tuple[int, str]) -> None:
        with self._lock:
            self.applied.pop(key, None)
            self.placement.pop(key, None)
            if self.guard is not None:
                self._guard_call(self.guard.unbind, key)
            self.nve.forget(*key)

    def _expire(self, vni: int, mac: str) -> None:
        """Drop our entry for ``mac`` and ask the directory again (cache miss)."""
        with self._lock:
            if self.nve.inflight(vni, mac) is None:
                self.nve.clear_remote(vni, mac)
            self.applied.pop((vni, mac), None)
        try:
            self._apply_safely(self.nva.get_endpoint(vni, mac))
        except VmmError as exc:
            LOG.warning(
                "%s: look-up of %s in VN %d after expiry failed: %s",
                self.id,
                mac,
                vni,
                exc,
            )

    def vtep_of(self, nve_id: str) -> str:
        """The VTEP of NVE ``nve_id`` as this agent knows it from the directory (its
        VNs' members, kept current by the directory's changes): no round trip for a
        peer of a VN it serves."""
        return self._vtep_of(nve_id)

    def _vtep_of(self, nve_id: str) -> str:
        if nve_id not in self._vteps:
            self._vteps[nve_id] = self.nva.get_nve(nve_id)["vtep"]
        return self._vteps[nve_id]

    def _watch_loop(self) -> None:
        while not self._stop.is_set():
            try:
                revision, changes = self.nva.watch(self.id, self.revision, self.watch_timeout)
                with self._lock:
                    self.apply_changes(changes)
                    self.revision = max(self.revision, revision)
                if changes:
                    self._ack(self.revision)
            except nva_errors.Conflict as exc:
                # Our revision is ahead of the directory's: it was reset.
                LOG.warning("%s: directory was reset (%s); loading it again", self.id, exc)
                self.revision = 0
                self.applied.clear()
                self._retry_resync()
            except (TransientError, VmmError, OSError) as exc:
                self.errors += 1
                LOG.warning("%s: directory watch failed (%s); resyncing", self.id, exc)
                if self._stop.wait(self.retry_interval):
                    return
                self._retry_resync()

    def _ack(self, revision: int) -> None:
        """Ack without waiting where the directory client can (on the NVE's stream, or
        batched with other acks), else with one request."""
        ack_async = getattr(self.nva, "ack_async", None)
        if ack_async is not None:
            ack_async(self.id, revision)
        else:
            self.nva.ack(self.id, revision)

    def _retry_resync(self) -> None:
        try:
            self.resync()
        except (VmmError, OSError) as again:
            LOG.warning("%s: resync failed: %s", self.id, again)

    # -- kernel -> directory (local learning) ---------------------------------

    def _learn_loop(self) -> None:
        """Listen to the bridge's neighbour (FDB) events in the host namespace.

        A plain netlink socket, parsed with pyroute2's marshal: with a
        library-buffered socket, select() can miss a message that was
        already read into the library's buffer, and a single roam event is
        exactly what must not be missed.
        """
        sock = socket_in(self.nve.netns, socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE)
        marshal = MarshalRtnl()
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            sock.bind((0, RTMGRP_NEIGH))
            sock.settimeout(0.2)
            ours = self._own_ports()
            self._listening.set()
            buffer = RecvBuffer(1 << 20)
            while not self._stop.is_set():
                try:
                    data = buffer.recv(sock)
                except TimeoutError:
                    continue
                for msg in marshal.parse(data):
                    try:
                        self._on_neigh(msg, ours)
                    except (VmmError, OSError, KeyError, ValueError) as exc:
                        LOG.warning("%s: could not handle a bridge event: %s", self.id, exc)
        except Exception:  # a dead learner must say why
            LOG.exception("%s: local learning stopped", self.id)
        finally:
            sock.close()

    def _own_ports(self) -> dict[int, int]:
        """bridge ifindex -> VNI; also notes the VXLAN ports we must not learn from.

        Looked up through the NVE's own netlink handle: the monitoring
        socket must carry nothing but events.
        """
        bridges: dict[int, int] = {}
        self._skip: set[int] = set()
        for vni in self.vnis:
            bridge, vxlan, inflight = self.nve.vn_ifindexes(vni)
            bridges[bridge] = vni
            self._skip.update((vxlan, inflight))
        return bridges

    def _on_neigh(self, msg: Any, bridges: dict[int, int]) -> None:
        """A bridge entry appeared or changed: is it a MAC that moved here?

        A learned entry, or one of ours that roamed to a local port (the
        kernel keeps the entry's static state when it roams), both mean the
        MAC was seen on a local port. MACs the orchestrator plugged here
        itself are not news.
        """
        if msg.get("event") != "RTM_NEWNEIGH" or msg.get("family") != AF_BRIDGE:
            return
        ifindex = msg.get("ifindex")
        if (msg.get("state") or 0) & NUD_PERMANENT or ifindex in self._skip:
            return
        vni = bridges.get(msg.get("NDA_MASTER"))
        mac = msg.get("NDA_LLADDR")
        if vni is None or not mac or ifindex is None or ifindex in bridges:
            return
        pinned = self.nve.local_port(vni, mac)
        if pinned is not None:
            if not self.nve.expected(vni, mac):  # while expected, the NVE's filter decides
                self._keep_pinned(vni, mac, ifindex, pinned)
            return
        key = (vni, mac)
        with self._lock:
            where = self.placement.get(key)
            seq = self.applied.get(key)
        if where is None or where == self.id or seq is None:
            return
        held = self._refused_at.get((vni, mac, ifindex))
        if held is not None and time.monotonic() - held < REFUSAL_HOLD_DOWN:
            self._refuse(vni, mac, ifindex, where)
            return
        why = self._may_report(vni, mac, ifindex)
        if why is None:
            self._refused_at[(vni, mac, ifindex)] = time.monotonic()
            self._refuse(vni, mac, ifindex, where)
            return
        self._refused_at.pop((vni, mac, ifindex), None)
        LOG.info(
            "%s: %s learned on a local port while placed at %s (%s): reporting move",
            self.id,
            mac,
            where,
            why,
        )
        self.reported_moves += 1
        try:
            self._apply_safely(self.nva.move(vni, mac, self.id, seq + 1))
        except VmmError as exc:
            LOG.info("%s: move of %s not taken (%s)", self.id, mac, exc)

    def _keep_pinned(self, vni: int, mac: str, ifindex: int, pinned: str) -> None:
        """A MAC pinned to a local port was learned on another one: a forged frame.

        The kernel lets even a static bridge entry roam to the port a frame
        came from; point it back at the port it is pinned to.
        """
        port = self.ports.link(ifindex)
        name = None if port is None else port["name"]
        if name is None or name == pinned:
            return
        self.refused_moves += 1
        key = (vni, mac)
        now = time.monotonic()
        if now - self._refusal_logged.get(key, -REFUSAL_LOG_INTERVAL) >= REFUSAL_LOG_INTERVAL:
            self._refusal_logged[key] = now
            LOG.warning(
                "%s: %s in VN %d is pinned to local port %s but was seen on port %s "
                "(spoofed frame?); pinned again; %d refused so far",
                self.id,
                mac,
                vni,
                pinned,
                name,
                self.refused_moves,
            )
        self.nve.plug(vni, mac, pinned)

    def configure_port(self, port: str, mac: str) -> None:
        """Declare ``mac`` the configured MAC of local ``port`` (learning may move it here)."""
        self.port_macs.setdefault(port, set()).add(normalize_mac(mac))

    def unconfigure_port(self, port: str, mac: str | None = None) -> None:
        """Forget ``port``'s configured MAC (all of them when ``mac`` is None)."""
        if mac is None:
            self.port_macs.pop(port, None)
        else:
            self.port_macs.get(port, set()).discard(normalize_mac(mac))

    def _may_report(self, vni: int, mac: str, ifindex: int) -> str | None:
        """Why a MAC learned on port ``ifindex`` may be reported as a move here, or None.

        Only a migration in progress to this NVE, or the port's own
        configured MAC, lets learning move a binding (issue 13, no hijack).
        """
        mine: str | None = None
        other: str | None = None
        try:
            port = self.ports.link(ifindex)
            if port is not None:
                if mac in self.port_macs.get(str(port["name"]), ()):
                    return f"configured on port {port['name']}"
                mine, other = self.ports.configured(port, mac)
        except OSError as exc:
            LOG.warning("%s: cannot inspect port %d: %s", self.id, ifindex, exc)
            other = "a port that cannot be read"  # fail closed below
        if mine is not None:
            return mine
        try:
            endpoint = self.nva.get_endpoint(vni, mac)
        except VmmError as exc:
            LOG.warning("%s: cannot ask the directory about %s: %s", self.id, mac, exc)
            return None  # fail closed: nothing moves on an unverified frame
        if endpoint.get("state") != "pending" or endpoint.get("pending_nve") != self.id:
            return None
        if other is not None:  # another VM's port: a forged frame, even mid-migration
            return None
        return f"migration {endpoint.get('migration_id')} is pending to this NVE"

    def _refuse(self, vni: int, mac: str, ifindex: int, where: str) -> None:
        """Count and log a refused move; point the bridge back at where the MAC is."""
        self.refused_moves += 1
        key = (vni, mac)
        now = time.monotonic()
        if now - self._refusal_logged.get(key, -REFUSAL_LOG_INTERVAL) >= REFUSAL_LOG_INTERVAL:
            self._refusal_logged[key] = now
            LOG.warning(
                "%s: refused to move %s in VN %d here: seen on local port %d, but the "
                "directory binds it to %s, no migration of it is pending to this NVE and "
                "it is not the port's configured MAC (spoofed frame?); %d refused so far",
                self.id,
                mac,
                vni,
                ifindex,
                where,
                self.refused_moves,
            )
        try:
            with self._lock:
                if self.placement.get(key) == where and self.nve.local_port(vni, mac) is None:
                    self.nve.set_remote(vni, mac, self._vtep_of(where))
        except Exception as exc:
            LOG.warning("%s: cannot point %s back at %s: %s", self.id, mac, where, exc)

    def stats(self) -> dict[str, int]:
        """The agent's counters, for an operator's status and for tests."""
        return {
            "revision": self.revision,
            "watch_errors": self.errors,
            "rejected_entries": self.rejected_entries,
            "refused_moves": self.refused_moves,
            "reported_moves": self.reported_moves,
            "guard_failures": self.guard.failures if self.guard is not None else 0,
        }

    def wait_synced(self, timeout: float) -> bool:
        return self._synced.wait(timeout)
