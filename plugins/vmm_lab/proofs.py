"""The four proofs that a VM's dynamic state followed it, as reusable steps.

Each proof builds state at the VM's host that only that host's firewall or
bridge knows, then, after the VM moved, looks at what the network does to
the VM's traffic. With the state moved, the proof *holds*; without, it
*breaks* in a predictable way, which is what shows that the proof measures
the state and not something else:

``tcp``
    a TCP connection from a peer to the VM through the stateful firewall
    (established allowed, anything new inbound but a SYN to a service
    dropped) carries data after the move; without the session table the
    destination's firewall drops the peer's first mid-stream segment.
``blacklist``
    a source the source host's firewall blacklisted for SYN-flooding the VM
    stays blocked from it; without the blacklist it gets through. The
    source is on the destination host: before the move its traffic to the
    VM crossed only the source host's firewall (which blocked it), after
    the move only the destination's (a source on the VM's old host would
    still be blocked there, by entries no move touches).
``multicast``
    a group the VM joined before the move keeps reaching it, with no new
    IGMP report (the VM's reports are dropped inside the VM once it has
    joined); without the membership the destination's bridge, which floods
    no unregistered multicast to VM ports, sends it nothing.
``dhcp_snooping``
    the DHCP-snooping filter passes the VM's own (leased) address and drops
    a spoofed one; without the binding it drops both.

Steps: :func:`arrange` builds the state and measures the baseline (every
proof must hold at the VM's host before the move, or the run proves
nothing: :meth:`ProofLab.problems`); after the move the ``observe_*``
functions measure; :func:`judge` gives the verdict for the mode. The lab
must come from ``lab_site(..., state=True)`` (firewalls and port profiles).

Used by the state demo (:mod:`vmm_lab.state_demo`) and the functional tests.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import json
import re
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

from vmm_kernel.netns import socket_in
from vmm_lab.firewall import FW_TABLE
from vmm_lab.linux.demo import LabSite, PortProfile
from vmm_lab.linux.topology import LabVm, in_ns

#: The TCP service the VM offers (its security group opens it).
SERVICE = 5001
GROUP, GROUP_PORT = "239.1.2.3", 5555
#: Where the gateway receives what the VM sends (the DHCP-snooping proof).
SINK_PORT = 6000
#: The DHCP lease of the VM's binding, and how much of it is left at the move.
LEASE = 3600
LEASE_LEFT = LEASE - 600
#: Packets each probe sends.
PINGS = 3
MCAST_COUNT = 20
DATAGRAMS = 5
#: How long a probe waits for something that must *not* arrive (the negative
#: cases cannot end on a condition; positive ones end as soon as it holds).
QUIET_S = 1.0

PROOFS = ("tcp", "blacklist", "multicast", "dhcp_snooping")
TITLES = {
    "tcp": "TCP session through the stateful firewall",
    "blacklist": "blacklisted SYN flooder stays blocked",
    "multicast": "multicast reaches the VM with no new IGMP report",
    "dhcp_snooping": "DHCP snooping: own IP passes, spoofed IP dropped",
}

#: Counts, inside the VM, the echo requests that reach it from the attacker and the gateway.
PING_COUNTERS = """
table ip vmmlab_probe {{
  chain in {{
    type filter hook input priority 0;
    ip saddr {attacker} icmp type echo-request counter
    ip saddr {gw} icmp type echo-request counter
  }}
}}
"""

#: From now on the VM sends no IGMP at all: its membership must come from the move.
NO_IGMP = """
table ip vmmlab_igmp {
  chain out { type filter hook output priority 0; ip protocol igmp counter drop; }
}
"""


# -- probes -------------------------------------------------------------------


def ping(src_ns: str, dst: str, count: int = PINGS) -> int:
    """Echo replies ``src_ns`` got from ``dst`` out of ``count``."""
    out = in_ns(src_ns, "ping", "-c", str(count), "-i", "0.1", "-W", "1", dst, check=False)
    found = re.search(r"(\d+) received", out)
    return int(found.group(1)) if found else 0


class EchoServer:
    """A TCP echo service in the VM that serves its first client until it leaves,
    and keeps what it received: the TCP proof looks at the peer-to-VM direction
    on its own, so that no other filter on the VM's replies can decide it."""

    def __init__(self, ns: str, address: str, port: int = SERVICE) -> None:
        self.sock = socket_in(ns, socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((address, port))
        self.sock.listen(64)
        self.received = bytearray()
        self.changed = threading.Condition()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        with contextlib.suppress(OSError):
            conn, _ = self.sock.accept()
            while data := conn.recv(4096):
                with self.changed:
                    self.received += data
                    self.changed.notify_all()
                conn.sendall(data)

    def got(self, payload: bytes, timeout: float) -> bool:
        """True once ``payload`` has reached the service (within ``timeout``)."""
        with self.changed:
            return self.changed.wait_for(lambda: payload in self.received, timeout)

    def close(self) -> None:
        self.sock.close()


def echo(client: socket.socket, payload: bytes, timeout: float = 3.0) -> bool:
    """True if the echo service answered ``payload`` within ``timeout``."""
    client.settimeout(timeout)
    try:
        client.sendall(payload)
        got = b""
        while len(got) < len(payload):
            chunk = client.recv(4096)
            if not chunk:
                return False
            got += chunk
        return got == payload
    except OSError:
        return False


def syn_flood(ns: str, target: str, count: int = 80) -> None:
    """``count`` connection attempts as fast as a socket loop goes (SYNs)."""
    socks = []
    for _ in range(count):
        s = socket_in(ns, socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        with contextlib.suppress(BlockingIOError, OSError):
            s.connect((target, SERVICE))
        socks.append(s)
    time.sleep(0.2)  # let the SYNs leave before the sockets close (a close sends RST)
    for s in socks:
        s.close()


Datagrams = list[tuple[bytes, str]]


def receive(
    sock: socket.socket, timeout: float, enough: Callable[[Datagrams], bool] | None = None
) -> Datagrams:
    """Datagrams ``sock`` receives (with their source addresses) until
    ``enough(received)`` is true or ``timeout`` seconds passed."""
    got: Datagrams = []
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        if enough is not None and enough(got):
            break
        sock.settimeout(left)
        try:
            data, (addr, _port) = sock.recvfrom(2048)
        except (TimeoutError, OSError):
            break
        got.append((data, addr))
    return got


def send_multicast(ns: str, source: str, count: int, tag: bytes) -> None:
    s = socket_in(ns, socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(source))
        s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
        for i in range(count):
            s.sendto(tag + b"%d" % i, (GROUP, GROUP_PORT))
            time.sleep(0.01)
    finally:
        s.close()


def send_from(ns: str, source: str, dest: str, count: int, tag: bytes) -> None:
    s = socket_in(ns, socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.bind((source, 0))
        for i in range(count):
            s.sendto(tag + b"%d" % i, (dest, SINK_PORT))
            time.sleep(0.01)
    finally:
        s.close()


def echo_requests(ns: str) -> tuple[int, int]:
    """(from the attacker, from the gateway): echo requests that reached the VM so far."""
    out = json.loads(in_ns(ns, "nft", "-j", "list", "chain", "ip", "vmmlab_probe", "in"))
    counts = [
        int(expr["counter"]["packets"])
        for item in out["nftables"]
        if "rule" in item
        for expr in item["rule"]["expr"]
        if "counter" in expr
    ]
    return counts[0], counts[1]


def spoofed_address(vm: LabVm) -> str:
    """An address of the VM's subnet that is not the VM's (.99)."""
    net = ipaddress.ip_network(f"{vm.ipv4}/24", strict=False)
    return str(net.network_address + 99)


# -- the lab of the proofs ----------------------------------------------------


@dataclasses.dataclass
class ProofLab:
    """The proofs' state and probes in one lab: the VM, its peer (TCP client),
    the attacker, the gateway (multicast source and sink), and what was
    measured at the VM's host before the move (``before``)."""

    site: LabSite
    vm: str
    peer: str
    attacker: str
    gateway: str
    server: EchoServer
    client: socket.socket
    mcast: socket.socket
    sink: socket.socket
    before: dict[str, Any] = dataclasses.field(default_factory=dict)
    _seq: int = 0

    def lab_vm(self, name: str) -> LabVm:
        return self.site.lab.vms[name]

    @property
    def spoofed(self) -> str:
        return spoofed_address(self.lab_vm(self.vm))

    def tag(self, what: str) -> bytes:
        """A payload no earlier probe used (the TCP proof looks for it at the VM)."""
        self._seq += 1
        return f"{what} #{self._seq}".encode()

    def problems(self) -> list[str]:
        """Why the baseline is not what the proofs need (empty: it is).

        Before the move every proof must hold at the VM's host; otherwise a
        "holds" after the move would prove nothing.
        """
        b, vm, attacker = self.before, self.lab_vm(self.vm), self.lab_vm(self.attacker)
        out = []
        if not b.get("echo"):
            out.append("the TCP echo did not work before the move")
        if [attacker.ipv4, vm.ipv4] not in b.get("blacklisted", []):
            out.append(f"{self.attacker} was not blacklisted for {self.vm}: {b.get('blacklisted')}")
        if b.get("echo_requests") != (0, PINGS):
            out.append(f"echo requests (attacker, gateway) before: {b.get('echo_requests')}")
        if b.get("mcast", 0) < 8:
            out.append(f"only {b.get('mcast')} of 10 group packets reached the VM before")
        sources = {addr for _data, addr in b.get("sink", [])}
        if sources != {vm.ipv4}:
            out.append(f"the snooping filter passed {sources} before, not just {vm.ipv4}")
        return out

    def close(self) -> None:
        for sock in (self.client, self.mcast, self.sink):
            sock.close()
        self.server.close()


def arrange(
    site: LabSite,
    vm: str = "vm1",
    peer: str = "vm2",
    attacker: str = "vm4",
    gateway: str = "gw",
) -> ProofLab:
    """Build every proof's state at ``vm``'s host and measure the baseline.

    The VM's port gets its profile (its TCP service, DHCP snooping, no
    unregistered multicast) through the site, so it follows the port; the
    snooper "saw" the VM's DHCPACK ten minutes ago; the VM holds an extra
    (spoofed) address to send from; the peer opens a TCP connection; the
    attacker SYN-floods the VM until blacklisted; the VM joins a group and
    then stops sending IGMP.
    """
    lab = site.lab
    the_vm, the_peer, the_attacker, gw = (lab.vms[n] for n in (vm, peer, attacker, gateway))
    fw = site.firewalls[the_vm.host]
    site.set_profile(vm, PortProfile(services=(SERVICE,), snoop=True, mcast_flood=False))
    for address in (the_vm.ipv4, the_vm.ipv6):
        fw.snoop_binding(the_vm.port, the_vm.mac, address, LEASE, remaining=LEASE_LEFT)
    in_ns(gw.netns, "ip", "route", "replace", "224.0.0.0/4", "dev", "eth0")
    in_ns(the_vm.netns, "ip", "addr", "add", f"{spoofed_address(the_vm)}/32", "dev", "eth0")
    server = EchoServer(the_vm.netns, the_vm.ipv4)
    opened: list[socket.socket] = []
    try:
        counters = PING_COUNTERS.format(attacker=the_attacker.ipv4, gw=gw.ipv4)
        in_ns(the_vm.netns, "nft", "-f", "-", input_=counters)
        client = socket_in(the_peer.netns, socket.AF_INET, socket.SOCK_STREAM)
        opened.append(client)
        client.settimeout(3)
        client.connect((the_vm.ipv4, SERVICE))
        mcast = socket_in(the_vm.netns, socket.AF_INET, socket.SOCK_DGRAM)
        opened.append(mcast)
        mcast.bind((GROUP, GROUP_PORT))
        membership = struct.pack("4s4s", socket.inet_aton(GROUP), socket.inet_aton(the_vm.ipv4))
        mcast.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, membership)
        sink = socket_in(gw.netns, socket.AF_INET, socket.SOCK_DGRAM)
        opened.append(sink)
        sink.bind(("0.0.0.0", SINK_PORT))
    except BaseException:
        for sock in opened:
            sock.close()
        server.close()
        raise
    proofs = ProofLab(site, vm, peer, attacker, gateway, server, client, mcast, sink)
    try:
        _baseline(proofs)
    except BaseException:
        proofs.close()
        raise
    return proofs


def _baseline(p: ProofLab) -> None:
    vm, attacker, gw = p.lab_vm(p.vm), p.lab_vm(p.attacker), p.lab_vm(p.gateway)
    fw = p.site.firewalls[vm.host]
    b = p.before
    b["echo"] = echo(p.client, p.tag("hello before the move"))
    syn_flood(attacker.netns, vm.ipv4)
    b["blacklisted"] = [e["key"] for e in fw.elements("inet", FW_TABLE, "blacklist_v4")]
    b["attacker_ping"] = ping(attacker.netns, vm.ipv4)
    b["gw_ping"] = ping(gw.netns, vm.ipv4)
    b["echo_requests"] = echo_requests(vm.netns)
    # the VM's IGMP reports must be out before they are cut: wait for the membership
    _wait_for(lambda: _joined(p), 2.0)
    in_ns(vm.netns, "nft", "-f", "-", input_=NO_IGMP)
    send_multicast(gw.netns, gw.ipv4, 10, b"pre")
    b["mcast"] = len(receive(p.mcast, QUIET_S, lambda got: len(got) >= 10))
    send_from(vm.netns, p.spoofed, gw.ipv4, DATAGRAMS, b"spoof")
    send_from(vm.netns, vm.ipv4, gw.ipv4, DATAGRAMS, b"own")
    b["sink"] = receive(p.sink, QUIET_S, lambda got: _count(got, vm.ipv4) >= DATAGRAMS)


def _joined(p: ProofLab) -> bool:
    """The VM's port holds the group's membership at its host's bridge."""
    vm = p.lab_vm(p.vm)
    ns = p.site.lab.hosts[vm.host].netns
    out = in_ns(ns, "bridge", "-j", "mdb", "show", "dev", f"br-{vm.vni}", check=False)
    for block in json.loads(out or "[]"):
        for entry in block.get("mdb", []):
            if entry.get("port") == vm.port and entry.get("grp") == GROUP:
                return True
    return False


def _wait_for(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return bool(condition())


def _count(got: Datagrams, source: str) -> int:
    return sum(1 for _data, addr in got if addr == source)


# -- after the move: observations and verdicts --------------------------------


@dataclasses.dataclass
class Observation:
    """What one proof measured after the move (``data``) and its summary text."""

    proof: str
    data: dict[str, Any]
    text: str


def observe_tcp(p: ProofLab) -> Observation:
    """The peer sends on its connection: did the VM get it, did the echo come back?"""
    payload = p.tag("hello after the move")
    echoed = echo(p.client, payload, timeout=QUIET_S + 1.0)
    reached = p.server.got(payload, 0.0 if echoed else 0.2)
    if echoed:
        text = "the peer's data reached the VM and was echoed"
    elif reached:
        text = "the peer's data reached the VM; the echo did not come back"
    else:
        text = "the peer's segment was dropped (never reached the VM)"
    return Observation("tcp", {"echoed": echoed, "reached": reached}, text)


def observe_blacklist(p: ProofLab) -> Observation:
    """The attacker and the gateway ping the VM: whose requests reach it?"""
    vm = p.lab_vm(p.vm)
    attacker0, gw0 = echo_requests(vm.netns)
    ping(p.lab_vm(p.attacker).netns, vm.ipv4)
    ping(p.lab_vm(p.gateway).netns, vm.ipv4)
    attacker1, gw1 = echo_requests(vm.netns)
    data = {"attacker": attacker1 - attacker0, "gateway": gw1 - gw0, "sent": PINGS}
    text = f"{data['attacker']}/{PINGS} of the flooder's pings reached the VM"
    text += f" ({data['gateway']}/{PINGS} of the gateway's)"
    return Observation("blacklist", data, text)


def observe_multicast(p: ProofLab) -> Observation:
    """The gateway sends to the group: how much reaches the VM?"""
    gw = p.lab_vm(p.gateway)
    send_multicast(gw.netns, gw.ipv4, MCAST_COUNT, b"post")
    got = len(receive(p.mcast, QUIET_S, lambda got: len(got) >= MCAST_COUNT))
    data = {"received": got, "sent": MCAST_COUNT}
    return Observation("multicast", data, f"{got}/{MCAST_COUNT} group packets reached the VM")


def observe_dhcp_snooping(p: ProofLab) -> Observation:
    """The VM sends from its own and from a spoofed address: what gets out?

    Spoofed first: the datagrams share a path, so once all own ones arrived,
    any spoofed one that got through has arrived too.
    """
    vm, gw = p.lab_vm(p.vm), p.lab_vm(p.gateway)
    send_from(vm.netns, p.spoofed, gw.ipv4, DATAGRAMS, b"spoof")
    send_from(vm.netns, vm.ipv4, gw.ipv4, DATAGRAMS, b"own")
    got = receive(p.sink, QUIET_S, lambda got: _count(got, vm.ipv4) >= DATAGRAMS)
    data = {"own": _count(got, vm.ipv4), "spoofed": _count(got, p.spoofed), "sent": DATAGRAMS}
    text = f"own IP {data['own']}/{DATAGRAMS} passed, spoofed IP {data['spoofed']}/{DATAGRAMS}"
    return Observation("dhcp_snooping", data, text)


OBSERVERS = {
    "tcp": observe_tcp,
    "blacklist": observe_blacklist,
    "multicast": observe_multicast,
    "dhcp_snooping": observe_dhcp_snooping,
}


def observe(p: ProofLab) -> dict[str, Observation]:
    """Every proof's observation, in PROOFS order."""
    return {name: OBSERVERS[name](p) for name in PROOFS}


@dataclasses.dataclass
class Verdict:
    """Whether an observation is what the mode predicts.

    With state the proof must *hold*; without state it must *break* (else it
    would not show that the state made the difference).
    """

    proof: str
    with_state: bool
    ok: bool
    observed: str
    expected: str

    @property
    def title(self) -> str:
        return TITLES[self.proof]


def expectation(proof: str, with_state: bool) -> str:
    """What the mode predicts for ``proof``, in words."""
    return {
        ("tcp", True): "the connection carries data",
        ("tcp", False): "the destination drops the peer's mid-stream segment",
        ("blacklist", True): "no flooder ping reaches the VM, the gateway's do",
        ("blacklist", False): "the flooder's pings reach the VM",
        ("multicast", True): f"at least 90% of {MCAST_COUNT} group packets reach the VM",
        ("multicast", False): "no group packet reaches the VM",
        ("dhcp_snooping", True): "every own datagram passes, no spoofed one",
        ("dhcp_snooping", False): "nothing passes (no binding at the destination)",
    }[(proof, with_state)]


def holds(obs: Observation, with_state: bool) -> bool:
    """The observation against the mode's prediction."""
    d = obs.data
    if obs.proof == "tcp":
        return bool(d["echoed"]) if with_state else not d["reached"]
    if obs.proof == "blacklist":
        reachable = d["gateway"] == d["sent"]  # the VM itself is reachable at all
        return reachable and (d["attacker"] == 0 if with_state else d["attacker"] == d["sent"])
    if obs.proof == "multicast":
        return d["received"] >= 0.9 * d["sent"] if with_state else d["received"] == 0
    if obs.proof == "dhcp_snooping":
        if with_state:
            return d["own"] == d["sent"] and d["spoofed"] == 0
        return d["own"] == 0 and d["spoofed"] == 0
    raise ValueError(f"unknown proof {obs.proof!r}")


def judge(observations: dict[str, Observation], with_state: bool) -> list[Verdict]:
    """A verdict per observation, in PROOFS order."""
    return [
        Verdict(name, with_state, holds(obs, with_state), obs.text, expectation(name, with_state))
        for name, obs in sorted(observations.items(), key=lambda kv: PROOFS.index(kv[0]))
    ]
