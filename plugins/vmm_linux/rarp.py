"""RARP responder: diskless guests learn their IPv4 address from the directory.

draft-ietf-nvo3-vmm section 4.2: a guest without configuration (diskless)
sends a RARP request for its own MAC after it (re)starts or moves; the NVE
it is attached to asks the NVA which IPv4 address the MAC holds in that VN
and answers with a RARP reply (RFC 903), so the guest keeps its address.

One responder per host, in the host's namespace: a raw ``AF_PACKET`` socket
for ``ETH_P_RARP`` on every interface. Bound to the VN bridge instead, it
could not tell a request from a local guest from one flooded in over VXLAN
by a guest on another host, and every NVE of the VN would answer. So a
request counts only when it *enters* the host on a port of a VN bridge
``br-<vni>`` of a VN this host serves and that port is not a VXLAN device
(``vx-``/``vi-``): the guest is attached here. The reply goes straight back
out of that port, unicast to the guest, and never crosses the fabric.

Only a request for the sender's own MAC is answered (a guest asking for
another VM's address gets nothing: ``ignored``). A MAC the directory does
not hold in that VN, or holds without an IPv4 address, gets no answer and
is counted (``unknown``). QEMU's self-announce after a live migration is
also a RARP request for the guest's own MAC: it gets an answer too, which is
harmless (it carries the address the guest already has; Linux guests have
no RARP client and drop it). Because of that twin, every answer waits
``[rarp] answer_delay`` (50 ms): at a resume the host's CPU belongs to the
announcements and the directory commit, and with immediate answers the
responder's look-ups (netlink, directory) pushed RESUMED -> first GARP
from about 2 ms to a median of 19 ms (``benchmarks/critical_path.py``).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import re
import socket
import threading
import time
from typing import Any

from oslo_config import cfg

from vmm_kernel import bpf
from vmm_kernel.netns import lean_iproute
from vmm_linux.netns import entered, socket_in
from vmm_orchestrator import frames
from vmm_orchestrator.nva import errors as nva_errors

LOG = logging.getLogger(__name__)

GROUP = "rarp"
RARP_OPTS: list[cfg.Opt] = [
    cfg.BoolOpt(
        "responder",
        default=True,
        help="Answer RARP requests of guests attached to this host with the IPv4 "
        "address the directory binds to their MAC in their VN (diskless guests, "
        "draft-ietf-nvo3-vmm section 4.2). Unknown MACs get no answer.",
    ),
    cfg.FloatOpt(
        "answer_delay",
        default=0.05,
        min=0.0,
        max=1.0,
        help="Seconds a RARP request waits before it is answered. QEMU's self-announce "
        "at a live migration's resume is a RARP request for the guest's own MAC, "
        "indistinguishable from a diskless guest's; answering it at once would take "
        "CPU from the resume's critical path (announcements, directory commit). A "
        "booting guest does not notice 50 ms.",
    ),
]


def register_opts(conf: cfg.ConfigOpts) -> None:
    conf.register_opts(RARP_OPTS, group=GROUP)


def list_opts() -> list[tuple[str, list[cfg.Opt]]]:
    return [(GROUP, RARP_OPTS)]


PACKET_OUTGOING = 4
#: Seconds the responder's thread blocks in recv with nothing due (how soon it sees stop()).
IDLE_WAIT = 0.25
ETH_P_ALL = 0x0003
#: Classic BPF: accept a frame whose EtherType is RARP, drop the rest.
_RARP_FILTER = (
    (0x28, 0, 0, 12),  # ldh [12]
    (0x15, 0, 1, frames.ETH_P_RARP),  # jeq #0x8035, accept, drop
    (0x06, 0, 0, 0x40000),  # ret #262144
    (0x06, 0, 0, 0),  # ret #0
)


def open_rarp_socket(netns: str | None) -> socket.socket:
    """A raw socket in ``netns`` that sees every RARP frame on every interface.

    ``ETH_P_ALL`` with a BPF filter rather than ``ETH_P_RARP``: a frame that
    enters a bridge port is taken by the bridge before protocol-specific
    packet sockets see it on that port, and only ``ETH_P_ALL`` taps see the
    port a request came in by.
    """
    sock = socket_in(netns, socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    try:
        bpf.attach(sock, _RARP_FILTER)
        # Frames queued before the filter was attached may be anything: drain them.
        sock.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            while True:
                sock.recv(65536)
    except BaseException:
        sock.close()
        raise
    return sock


_BRIDGE = re.compile(r"^br-(\d+)$")


class RarpResponder:
    """Answers RARP requests of guests attached to this host's VN bridges.

    ``nva`` needs ``find(vni, mac=...)`` (every NVE directory has it).
    Counters: ``answered``, ``unknown`` (no IPv4 for the MAC in that VN),
    ``ignored`` (not a request for the sender's own MAC, or from a VN not
    served here), ``errors`` (directory unavailable, send failed).
    """

    def __init__(
        self,
        name: str,
        netns: str | None,
        nva: Any,
        vnis: list[int],
        answer_delay: float = 0.05,
    ) -> None:
        self.name = name
        self.answer_delay = answer_delay
        #: Requests received and not yet answered: (due monotonic, frame, address).
        self._due: collections.deque[tuple[float, bytes, tuple[Any, ...]]] = collections.deque()
        self.netns = netns
        self.nva = nva
        self.vnis = set(vnis)
        self.answered = 0
        self.unknown = 0
        self.ignored = 0
        self.errors = 0
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._start_error: BaseException | None = None

    # -- life cycle -----------------------------------------------------------

    def start(self) -> None:
        """Open the socket in the host's namespace and answer from a thread."""
        if self._thread is not None:
            return
        self._sock = open_rarp_socket(self.netns)
        self._sock.settimeout(IDLE_WAIT)
        self._stop.clear()
        self._thread = threading.Thread(target=self._serve, name=f"rarp-{self.name}", daemon=True)
        self._thread.start()
        self._ready.wait(10.0)
        if self._start_error is not None:
            self.stop()
            raise OSError(f"RARP responder of {self.name}: {self._start_error}")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
            self._thread = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def counters(self) -> dict[str, int]:
        return {
            "answered": self.answered,
            "unknown": self.unknown,
            "ignored": self.ignored,
            "errors": self.errors,
        }

    # -- the loop -------------------------------------------------------------

    def _serve(self) -> None:
        try:
            links = _Links(self.netns)
        except Exception as exc:  # pragma: no cover - namespace gone at start
            self._start_error = exc
            self._ready.set()
            return
        self._ready.set()
        try:
            while not self._stop.is_set():
                sock = self._sock
                if sock is None:
                    return
                now = time.monotonic()
                while self._due and self._due[0][0] <= now:
                    _, data, addr = self._due.popleft()
                    self._answer(data, addr, links)
                sock.settimeout(self._due[0][0] - now if self._due else IDLE_WAIT)
                try:
                    data, addr = sock.recvfrom(2048)
                except TimeoutError:
                    continue
                except OSError:
                    if self._stop.is_set():
                        return
                    raise
                if self.answer_delay > 0:
                    self._due.append((time.monotonic() + self.answer_delay, data, addr))
                else:
                    self._answer(data, addr, links)
        finally:
            links.close()

    def _answer(self, data: bytes, addr: tuple[Any, ...], links: Any) -> None:
        try:
            self.handle(data, addr, links)
        except Exception:  # one bad frame must not stop the responder
            self.errors += 1
            LOG.exception("%s: RARP request not handled", self.name)

    def handle(self, data: bytes, addr: tuple[Any, ...], links: Any) -> bytes | None:
        """Answer one frame received as ``addr`` (AF_PACKET address); the reply sent, if any."""
        ifname, pkttype = str(addr[0]), int(addr[2])
        if pkttype == PACKET_OUTGOING:
            return None  # our own replies and frames the bridge sends out of its ports
        mac = frames.rarp_request_for_self(data)
        if mac is None:
            self.ignored += 1
            return None
        port = links.port(ifname)
        if port is None:
            return None  # the bridge itself, a VXLAN port, an interface outside any VN
        vni, bridge_mac = port
        if vni not in self.vnis:
            self.ignored += 1
            return None
        ip = self._lookup(vni, mac)
        if ip is None:
            return None
        reply = frames.rarp_reply(bridge_mac, "0.0.0.0", mac, ip)
        try:
            assert self._sock is not None
            self._sock.sendto(reply, (ifname, frames.ETH_P_RARP))
        except OSError as exc:
            self.errors += 1
            LOG.warning("%s: RARP reply to %s on %s not sent: %s", self.name, mac, ifname, exc)
            return None
        self.answered += 1
        LOG.info("%s: RARP: %s on %s (VNI %s) is %s", self.name, mac, ifname, vni, ip)
        return reply

    def _lookup(self, vni: int, mac: str) -> str | None:
        try:
            endpoint = self.nva.find(vni, mac=mac)
        except nva_errors.NotFound:
            self.unknown += 1
            LOG.info("%s: RARP for %s in VNI %s: not in the directory", self.name, mac, vni)
            return None
        except nva_errors.NvaError as exc:
            self.errors += 1
            LOG.warning("%s: RARP for %s in VNI %s: directory error: %s", self.name, mac, vni, exc)
            return None
        ipv4 = list(endpoint.get("ipv4") or [])
        if not ipv4:
            self.unknown += 1
            LOG.info("%s: RARP for %s in VNI %s: no IPv4 address bound", self.name, mac, vni)
            return None
        return str(ipv4[0])


class _Links:
    """Which VN a port belongs to, read from the host namespace's netlink (one
    handle, used only by the responder thread)."""

    def __init__(self, netns: str | None) -> None:
        from pyroute2 import IPRoute, NetNS

        if netns:
            self._ipr: Any = NetNS(netns)
        else:
            with entered(None):
                self._ipr = IPRoute()
        lean_iproute(self._ipr)  # see vmm_kernel.netns: nothing kept, 64 KiB reads

    def port(self, ifname: str) -> tuple[int, str] | None:
        """(VNI, bridge MAC) of a local guest port ``ifname``; None for anything else."""
        from pyroute2 import NetlinkError

        try:
            found = self._ipr.link("get", ifname=ifname)
        except NetlinkError:
            return None  # gone since the frame arrived
        if not found:
            return None
        link = found[0]
        info = link.get("IFLA_LINKINFO")
        kind = info.get("IFLA_INFO_KIND") if info is not None else None
        master = link.get("IFLA_MASTER")
        if kind == "vxlan" or not master:
            return None
        bridge = self._ipr.link("get", index=master)[0]
        match = _BRIDGE.match(str(bridge.get("IFLA_IFNAME")))
        if match is None:
            return None
        return int(match.group(1)), str(bridge.get("IFLA_ADDRESS"))

    def close(self) -> None:
        self._ipr.close()
