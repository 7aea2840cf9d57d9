"""Move a VM's conntrack entries between OVN chassis (userspace datapath).

OVN's stateful ACLs (security groups) keep conntrack per logical port in
a zone that each chassis picks for itself (``br-int external_ids:
ct-zone-<lport>``): the same port had zone 1 on one chassis and 4 on
another. After a migration the destination's zone is empty, so a peer's
packets of a session the VM had are ``ct.new`` there and an ``allow-related``
security group drops them until the VM itself sends something; a TCP
stream then stalls for over a second (measured in ../shared/OVN-LAB.md).

With the userspace datapath the entries live in ovs-vswitchd (not in the
kernel's conntrack, so ctnetlink cannot be used). They can be read with
``ovs-appctl dpctl/dump-conntrack zone=N``; there is no insert command, but
an OpenFlow packet-out of a synthetic packet of the session's original
direction with the action ``ct(commit,zone=Z)`` creates the entry, which
real packets then match as established. A pure ACK can open a TCP entry
(OVS allows picking up established sessions, not SYN+ACK); the session's
real sequence numbers are unknown to the synthetic packet, so the
destination's TCP sequence check is relaxed (``dpctl/ct-disable-tcp-seq-chk``,
conntrackd's "be liberal" advice for injected entries).

Only entries that involve the VM's own addresses are moved (a source's
dump is filtered, and :func:`check` refuses anything else).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import struct
import subprocess
from collections.abc import Iterable, Sequence

from vmm_orchestrator.errors import TransientError
from vmm_ovn import openflow

_ENTRY = re.compile(
    r"^(?P<proto>\w+),orig=\((?P<orig>[^)]*)\),reply=\((?P<reply>[^)]*)\)(?P<rest>.*)$"
)
_KV = re.compile(r"(\w+)=([^,()]+)")
PROTOS = {"tcp": 6, "udp": 17, "icmp": 1}
TCP_ACK = 0x10


@dataclasses.dataclass(frozen=True)
class CtEntry:
    """One conntrack entry in its original direction."""

    proto: str
    src: str
    dst: str
    sport: int = 0
    dport: int = 0
    icmp_id: int = 0
    icmp_type: int = 8
    zone: int = 0
    mark: int = 0
    state: str = ""

    def to_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


def parse_dump(text: str) -> list[CtEntry]:
    """Entries of ``dpctl/dump-conntrack`` output (IPv4 TCP/UDP/ICMP; others are skipped)."""
    out = []
    for line in text.splitlines():
        m = _ENTRY.match(line.strip())
        if not m or m["proto"] not in PROTOS:
            continue
        orig = dict(_KV.findall(m["orig"]))
        rest = dict(_KV.findall(m["rest"]))
        try:
            if ipaddress.ip_address(orig["src"]).version != 4:
                continue
        except (KeyError, ValueError):
            continue
        state = ""
        if "state" in m["rest"]:
            found = re.search(r"state=([A-Z_]+)", m["rest"])
            state = found.group(1) if found else ""
        out.append(
            CtEntry(
                proto=m["proto"],
                src=orig["src"],
                dst=orig["dst"],
                sport=int(orig.get("sport", 0)),
                dport=int(orig.get("dport", 0)),
                icmp_id=int(orig.get("id", 0)),
                icmp_type=int(orig.get("type", 8)),
                zone=int(rest.get("zone", 0)),
                mark=int(rest.get("mark", "0"), 0),
                state=state,
            )
        )
    return out


def appctl(target: str, *args: str) -> str:
    """``ovs-appctl -t target ...``; target is a control socket path or a daemon name."""
    proc = subprocess.run(["ovs-appctl", "-t", target, *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise TransientError(f"ovs-appctl -t {target} {' '.join(args)}: {proc.stderr.strip()}")
    return proc.stdout


def dump(vswitchd: str, zone: int) -> list[CtEntry]:
    """The userspace datapath's entries in ``zone`` (``vswitchd``: its control socket)."""
    return parse_dump(appctl(vswitchd, "dpctl/dump-conntrack", f"zone={zone}"))


def of_vm(entries: Iterable[CtEntry], addresses: Iterable[str]) -> list[CtEntry]:
    """The entries whose original source or destination is one of the VM's addresses."""
    mine = set(addresses)
    return [e for e in entries if e.src in mine or e.dst in mine]


def check(entry: CtEntry, addresses: Iterable[str]) -> None:
    """Refuse an entry that does not involve the VM (a poisoned transfer)."""
    if entry.src not in set(addresses) and entry.dst not in set(addresses):
        raise ValueError(f"conntrack entry {entry.src}->{entry.dst} does not involve the VM")
    if entry.proto not in PROTOS:
        raise ValueError(f"conntrack entry of protocol {entry.proto} is not supported")


def _csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def synthetic_packet(entry: CtEntry, src_mac: str, dst_mac: str) -> bytes:
    """An Ethernet/IPv4 packet of ``entry``'s original direction with valid checksums
    (OVS' conntrack verifies them): TCP ACK, UDP, or ICMP echo request."""
    src, dst = ipaddress.IPv4Address(entry.src).packed, ipaddress.IPv4Address(entry.dst).packed
    proto = PROTOS[entry.proto]
    if entry.proto == "tcp":
        l4 = struct.pack("!HHIIBBHHH", entry.sport, entry.dport, 1, 1, 5 << 4, TCP_ACK, 65535, 0, 0)
    elif entry.proto == "udp":
        l4 = struct.pack("!HHHH", entry.sport, entry.dport, 8, 0)
    else:
        l4 = struct.pack("!BBHHH", entry.icmp_type, 0, 0, entry.icmp_id, 0)
    if entry.proto == "icmp":
        l4 = l4[:2] + struct.pack("!H", _csum(l4)) + l4[4:]
    else:
        pseudo = src + dst + struct.pack("!BBH", 0, proto, len(l4))
        c = _csum(pseudo + l4) or 0xFFFF
        at = 16 if entry.proto == "tcp" else 6
        l4 = l4[:at] + struct.pack("!H", c) + l4[at + 2 :]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), 0, 0x4000, 64, proto, 0, src, dst)
    ip = ip[:10] + struct.pack("!H", _csum(ip)) + ip[12:]
    macs = bytes.fromhex(dst_mac.replace(":", "")) + bytes.fromhex(src_mac.replace(":", ""))
    return macs + b"\x08\x00" + ip + l4


def commit(
    openflow_target: str,
    in_port: int,
    zone: int,
    packets: Sequence[bytes],
    timeout: float = 5.0,
) -> None:
    """Create entries in ``zone`` with one packet-out of every packet through
    ``ct(commit,zone=Z)`` (nothing is forwarded: the action list ends there).
    OpenFlow straight to the bridge's socket (about a millisecond: this runs
    while the guest is paused); ``ovs-ofctl`` if the switch refuses that."""
    if not packets:
        return
    try:
        openflow.packet_out(openflow_target, in_port, packets, actions=openflow.ct_commit(zone))
        return
    except openflow.OpenFlowError as exc:
        if "error type" not in str(exc):
            raise TransientError(f"ct(commit) packet-out on {openflow_target}: {exc}") from None
    args = ["ovs-ofctl", f"--timeout={int(timeout)}", "packet-out", openflow_target, str(in_port)]
    args += [f"ct(commit,zone={zone})", *(p.hex() for p in packets)]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout + 1)
    if proc.returncode != 0:
        raise TransientError(f"ct(commit) packet-out on {openflow_target}: {proc.stderr.strip()}")


_relaxed: set[str] = set()


def relax_tcp_window(vswitchd: str) -> None:
    """Injected TCP entries cannot know the session's sequence numbers: be liberal.

    A datapath-wide setting of the destination's ovs-vswitchd (there is no
    per-entry flag as the kernel has); set once per process and target."""
    if vswitchd in _relaxed:
        return
    appctl(vswitchd, "dpctl/ct-disable-tcp-seq-chk")
    _relaxed.add(vswitchd)


def vswitchd_target(ovsdb_connection: str) -> str:
    """The ovs-vswitchd control socket next to the OVSDB socket (its pidfile names it)."""
    folder = (
        os.path.dirname(ovsdb_connection[len("unix:") :])
        if ovsdb_connection.startswith("unix:")
        else "/var/run/openvswitch"
    )
    try:
        with open(os.path.join(folder, "ovs-vswitchd.pid"), encoding="ascii") as f:
            return os.path.join(folder, f"ovs-vswitchd.{f.read().strip()}.ctl")
    except OSError:
        return "ovs-vswitchd"


def move(
    source_vswitchd: str,
    source_zone: int,
    dest_vswitchd: str,
    dest_openflow: str,
    dest_ofport: int,
    dest_zone: int,
    addresses: Sequence[str],
    vm_mac: str,
) -> list[CtEntry]:
    """Copy the VM's entries of the source's zone into the destination's zone; the moved."""
    entries = of_vm(dump(source_vswitchd, source_zone), addresses)
    for e in entries:
        check(e, addresses)
    if any(e.proto == "tcp" for e in entries):
        relax_tcp_window(dest_vswitchd)
    packets = [synthetic_packet(e, vm_mac, "02:00:00:00:00:ff") for e in entries]
    commit(dest_openflow, dest_ofport, dest_zone, packets)
    return entries
