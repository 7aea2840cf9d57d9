"""The NVE agent: keeps one host's Linux NVE in step with the directory.

It registers the NVE, loads the VNs it serves, then long-polls the NVA's
watch and applies each change to the kernel, acknowledging the revision it
has applied so the orchestrator can measure when every peer has converged.
Sequence numbers make it safe against reordering: an older location is
never applied over a newer one (EVPN MAC mobility, RFC 7432 section 15).

With ``local_learning`` on it also does what an EVPN NVE does without any
orchestrator: when the bridge learns a MAC on a local port that the
directory places elsewhere, it reports the move (sequence + 1). That is how
the lab's baselines converge at all, from whatever frame the VM sends first.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from typing import Any

from oslo_config import cfg
from pyroute2.netlink import NETLINK_ROUTE
from pyroute2.netlink.rtnl import RTMGRP_NEIGH
from pyroute2.netlink.rtnl.marshal import MarshalRtnl

from vmm_linux.netns import socket_in
from vmm_linux.nve import LinuxNve
from vmm_orchestrator.errors import TransientError, VmmError
from vmm_orchestrator.nva import errors as nva_errors

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
        "local_learning",
        default=True,
        help="Report a MAC that the bridge learns on a local port, while the "
        "directory places it elsewhere, as a move (EVPN-style MAC mobility).",
    ),
]


def register_opts(conf: cfg.ConfigOpts) -> None:
    conf.register_opts(AGENT_OPTS, group=GROUP)


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
                self.nve.set_flood_list(vni, [n["vtep"] for n in nves if n["id"] != self.id])
                revision, endpoints = self.nva.snapshot(vni=vni)
                revisions.append(revision)
                for endpoint in endpoints:
                    self.apply_endpoint(endpoint)
            if revisions:
                self.revision = (
                    min(revisions) if self.revision == 0 else max(self.revision, min(revisions))
                )
        self.nva.ack(self.id, self.revision)
        self._synced.set()

    def apply_endpoint(self, endpoint: dict[str, Any]) -> bool:
        """Apply one directory entry unless we already hold a newer one."""
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
                self.nve.set_remote(key[0], key[1], self._vtep_of(where), ips)
            if self.placement.get(key) != where:
                self.applied_at[key] = (where, time.monotonic())
            self.applied[key] = seq
            self.placement[key] = where
            return True

    def apply_change(self, change: dict[str, Any]) -> None:
        kind = change.get("kind")
        if kind == "endpoint":
            self.apply_endpoint(change["endpoint"])
        elif kind == "expire":
            self._expire(int(change["vni"]), change["mac"])
        elif kind == "endpoint_deleted":
            key = (int(change["vni"]), change["mac"])
            with self._lock:
                self.nve.forget(*key)
                self.applied.pop(key, None)
                self.placement.pop(key, None)

    def _expire(self, vni: int, mac: str) -> None:
        """Drop our entry for ``mac`` and ask the directory again (cache miss)."""
        with self._lock:
            if self.nve.inflight(vni, mac) is None:
                self.nve.clear_remote(vni, mac)
            self.applied.pop((vni, mac), None)
        try:
            self.apply_endpoint(self.nva.get_endpoint(vni, mac))
        except VmmError as exc:
            LOG.warning(
                "%s: look-up of %s in VN %d after expiry failed: %s",
                self.id,
                mac,
                vni,
                exc,
            )

    def _vtep_of(self, nve_id: str) -> str:
        if nve_id not in self._vteps:
            self._vteps[nve_id] = self.nva.get_nve(nve_id)["vtep"]
        return self._vteps[nve_id]

    def _watch_loop(self) -> None:
        while not self._stop.is_set():
            try:
                revision, changes = self.nva.watch(self.id, self.revision, self.watch_timeout)
                with self._lock:
                    for change in changes:
                        self.apply_change(change)
                    self.revision = max(self.revision, revision)
                if changes:
                    self.nva.ack(self.id, self.revision)
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
            while not self._stop.is_set():
                try:
                    data = sock.recv(1 << 20)
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
        if self.nve.local_port(vni, mac) is not None:
            return
        key = (vni, mac)
        with self._lock:
            where = self.placement.get(key)
            seq = self.applied.get(key)
        if where is None or where == self.id or seq is None:
            return
        LOG.info(
            "%s: %s learned on a local port while placed at %s: reporting move",
            self.id,
            mac,
            where,
        )
        try:
            self.apply_endpoint(self.nva.move(vni, mac, self.id, seq + 1))
        except VmmError as exc:
            LOG.info("%s: move of %s not taken (%s)", self.id, mac, exc)

    def wait_synced(self, timeout: float) -> bool:
        return self._synced.wait(timeout)
