"""Raw Ethernet frames that announce a VM at its new place after a migration.

After a live migration the guest does not know it moved, so the host sends,
on its behalf, the frames that make peers, switches and gateways relearn
where the VM's MAC and addresses now live:

* a gratuitous ARP *request* (sender IP = target IP = VM IP, target MAC
  all-zero, to broadcast): the form a gateway's ARP table accepts (with
  ``arp_accept`` on Linux); a broadcast ARP *reply* and RARP are not
  taken into the ARP table;
* a *unicast ARP reply* to a known gateway (sender = VM, target = gateway,
  Ethernet destination = gateway MAC): updates that gateway's entry even
  where unsolicited gratuitous ARP is ignored;
* an unsolicited IPv6 Neighbor Advertisement to all-nodes with the Override
  flag set and a Target Link-Layer Address option: replaces a stale
  neighbour cache entry (RFC 4861 section 7.2.6);
* RARP, which is all QEMU sends by itself (the self-announce): it only
  teaches bridges/switches the MAC's port, it updates no L3 table.

Everything here is pure: bytes in, bytes out, no sockets. The parse helpers
exist so tests (and debugging sessions) can check frames field by field.
"""

from __future__ import annotations

import ipaddress
import struct
from typing import Any

ETH_P_IP = 0x0800
ETH_P_ARP = 0x0806
ETH_P_RARP = 0x8035
ETH_P_IPV6 = 0x86DD

ARPOP_REQUEST = 1
ARPOP_REPLY = 2
ARPOP_RREQUEST = 3  # RARP "reverse request", what QEMU's self-announce uses
ARPOP_RREPLY = 4  # RARP "reverse reply": the server's answer (RFC 903)

ARPHRD_ETHER = 1
IPPROTO_ICMPV6 = 58
ICMPV6_NA = 136
ND_OPT_TARGET_LL_ADDR = 2

NA_FLAG_ROUTER = 0x80000000
NA_FLAG_SOLICITED = 0x40000000
NA_FLAG_OVERRIDE = 0x20000000

#: Shortest Ethernet frame without FCS; shorter frames are padded with zeros
#: (the NIC/kernel would do it for a real interface, but not for a veth).
ETH_MIN_LEN = 60
ETH_HLEN = 14

BROADCAST_MAC = "ff:ff:ff:ff:ff:ff"
ZERO_MAC = "00:00:00:00:00:00"
ALL_NODES = "ff02::1"
ALL_NODES_MAC = "33:33:00:00:00:01"

_ARP = struct.Struct("!HHBBH6s4s6s4s")
_IPV6 = struct.Struct("!IHBB16s16s")


def mac_to_bytes(mac: str) -> bytes:
    """``aa:bb:cc:dd:ee:ff`` (or with dashes) -> 6 bytes."""
    parts = mac.strip().replace("-", ":").split(":")
    if len(parts) != 6:
        raise ValueError(f"not a MAC address: {mac!r}")
    try:
        raw = bytes(int(p, 16) for p in parts)
    except ValueError:
        raise ValueError(f"not a MAC address: {mac!r}") from None
    if any(len(p) not in (1, 2) for p in parts):
        raise ValueError(f"not a MAC address: {mac!r}")
    return raw


def mac_to_str(raw: bytes) -> str:
    """6 bytes -> lower-case colon form."""
    return ":".join(f"{b:02x}" for b in raw)


def _ip4(ip: str) -> bytes:
    return ipaddress.IPv4Address(ip).packed


def _ip6(ip: str) -> bytes:
    return ipaddress.IPv6Address(ip).packed


def ethernet(dst: str, src: str, ethertype: int, payload: bytes) -> bytes:
    """An Ethernet II frame, zero-padded to the 60-byte minimum."""
    frame = mac_to_bytes(dst) + mac_to_bytes(src) + struct.pack("!H", ethertype) + payload
    if len(frame) < ETH_MIN_LEN:
        frame += bytes(ETH_MIN_LEN - len(frame))
    return frame


def _arp_body(op: int, sha: str, spa: str, tha: str, tpa: str) -> bytes:
    return _ARP.pack(
        ARPHRD_ETHER,
        ETH_P_IP,
        6,
        4,
        op,
        mac_to_bytes(sha),
        _ip4(spa),
        mac_to_bytes(tha),
        _ip4(tpa),
    )


def gratuitous_arp_request(mac: str, ip: str) -> bytes:
    """Broadcast ARP request with sender IP = target IP = ``ip``.

    The request form (not the reply form) is used because it is what
    gateways take into their ARP tables; the all-zero target MAC follows
    RFC 5227's announcement.
    """
    return ethernet(BROADCAST_MAC, mac, ETH_P_ARP, _arp_body(ARPOP_REQUEST, mac, ip, ZERO_MAC, ip))


def unicast_arp_reply(mac: str, ip: str, dst_mac: str, dst_ip: str) -> bytes:
    """ARP reply from the VM (``mac``/``ip``) sent straight to one gateway.

    A reply addressed to the receiver is accepted as reachability proof by
    the receiver, so it updates a gateway that ignores gratuitous ARP.
    """
    return ethernet(dst_mac, mac, ETH_P_ARP, _arp_body(ARPOP_REPLY, mac, ip, dst_mac, dst_ip))


def rarp(mac: str) -> bytes:
    """QEMU's self-announce frame: RARP reverse request for ``mac``, to broadcast.

    Sender MAC = target MAC = ``mac``, both protocol addresses 0.0.0.0. It
    moves the MAC in L2 forwarding tables only; kept as the baseline mode.
    """
    body = _ARP.pack(
        ARPHRD_ETHER,
        ETH_P_IP,
        6,
        4,
        ARPOP_RREQUEST,
        mac_to_bytes(mac),
        bytes(4),
        mac_to_bytes(mac),
        bytes(4),
    )
    return ethernet(BROADCAST_MAC, mac, ETH_P_RARP, body)


def rarp_reply(server_mac: str, server_ip: str, client_mac: str, client_ip: str) -> bytes:
    """RARP reverse reply (RFC 903) telling ``client_mac`` that its IPv4 address is ``client_ip``.

    Sent unicast to the client: sender = the answering server (an NVE has no
    address in the VN, so ``server_ip`` is usually 0.0.0.0), target = the
    client's MAC and the address it asked for.
    """
    body = _ARP.pack(
        ARPHRD_ETHER,
        ETH_P_IP,
        6,
        4,
        ARPOP_RREPLY,
        mac_to_bytes(server_mac),
        _ip4(server_ip),
        mac_to_bytes(client_mac),
        _ip4(client_ip),
    )
    return ethernet(client_mac, server_mac, ETH_P_RARP, body)


def rarp_request_for_self(frame: bytes) -> str | None:
    """The MAC a RARP request asks its own address for, else None.

    Only a reverse request (op 3) whose target MAC is its sender MAC and its
    Ethernet source counts: a guest asking for its *own* address, as a
    diskless guest (and QEMU's self-announce) does. A request for another
    MAC, a reply, or anything that is not Ethernet/IPv4 RARP gives None.
    """
    try:
        arp = parse_arp(frame)
    except ValueError:
        return None
    if arp["ethertype"] != ETH_P_RARP or arp["op"] != ARPOP_RREQUEST:
        return None
    if not (arp["sha"] == arp["tha"] == arp["src"]):
        return None
    return str(arp["tha"])


def inet_checksum(data: bytes) -> int:
    """RFC 1071 one's-complement sum of 16-bit words, complemented."""
    if len(data) % 2:
        data += b"\x00"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def icmpv6_checksum(src: bytes, dst: bytes, icmp: bytes) -> int:
    """ICMPv6 checksum over the IPv6 pseudo-header (RFC 8200 section 8.1) and message.

    ``icmp`` must carry zero in its checksum field.
    """
    pseudo = src + dst + struct.pack("!I3xB", len(icmp), IPPROTO_ICMPV6)
    return inet_checksum(pseudo + icmp)


def unsolicited_na(mac: str, ip6: str) -> bytes:
    """Unsolicited Neighbor Advertisement for ``ip6`` at ``mac``, to all-nodes.

    Override set so receivers replace a cached link-layer address; Solicited
    clear because the destination is multicast (RFC 4861 section 7.1.2
    drops S=1 to multicast); Router clear (the VM is a host as far as we
    know). Hop limit 255 as every ND message must have. The IPv6 source is
    the VM address itself (the guest's link-local address is unknown to the
    host).
    """
    src = _ip6(ip6)
    dst = _ip6(ALL_NODES)
    option = struct.pack("!BB6s", ND_OPT_TARGET_LL_ADDR, 1, mac_to_bytes(mac))
    icmp = struct.pack("!BBHI16s", ICMPV6_NA, 0, 0, NA_FLAG_OVERRIDE, src) + option
    csum = icmpv6_checksum(src, dst, icmp)
    icmp = icmp[:2] + struct.pack("!H", csum) + icmp[4:]
    ip_header = _IPV6.pack(6 << 28, len(icmp), IPPROTO_ICMPV6, 255, src, dst)
    return ethernet(ALL_NODES_MAC, mac, ETH_P_IPV6, ip_header + icmp)


def _eth_header(frame: bytes) -> dict[str, Any]:
    if len(frame) < ETH_HLEN:
        raise ValueError(f"frame too short for Ethernet: {len(frame)} bytes")
    (ethertype,) = struct.unpack_from("!H", frame, 12)
    return {
        "dst": mac_to_str(frame[0:6]),
        "src": mac_to_str(frame[6:12]),
        "ethertype": ethertype,
    }


def parse_arp(frame: bytes) -> dict[str, Any]:
    """Decode an ARP or RARP frame (Ethernet/IPv4 only) into a dict.

    Keys: dst, src, ethertype, htype, ptype, hlen, plen, op, sha, spa, tha,
    tpa, length. Raises ValueError on anything else.
    """
    out = _eth_header(frame)
    if out["ethertype"] not in (ETH_P_ARP, ETH_P_RARP):
        raise ValueError(f"not ARP/RARP: ethertype 0x{out['ethertype']:04x}")
    if len(frame) < ETH_HLEN + _ARP.size:
        raise ValueError(f"ARP frame too short: {len(frame)} bytes")
    htype, ptype, hlen, plen, op, sha, spa, tha, tpa = _ARP.unpack_from(frame, ETH_HLEN)
    if (htype, ptype, hlen, plen) != (ARPHRD_ETHER, ETH_P_IP, 6, 4):
        raise ValueError(f"not Ethernet/IPv4 ARP: htype={htype} ptype=0x{ptype:04x}")
    out.update(
        htype=htype,
        ptype=ptype,
        hlen=hlen,
        plen=plen,
        op=op,
        sha=mac_to_str(sha),
        spa=str(ipaddress.IPv4Address(spa)),
        tha=mac_to_str(tha),
        tpa=str(ipaddress.IPv4Address(tpa)),
        length=len(frame),
    )
    return out


def parse_na(frame: bytes) -> dict[str, Any]:
    """Decode an IPv6 Neighbor Advertisement frame, verifying its checksum.

    Keys: dst, src, ethertype, version, payload_length, next_header,
    hop_limit, src_ip, dst_ip, type, code, checksum, router, solicited,
    override, target, tlla (None without the option), length. Raises
    ValueError if the frame is not an NA or the ICMPv6 checksum is wrong.
    """
    out = _eth_header(frame)
    if out["ethertype"] != ETH_P_IPV6:
        raise ValueError(f"not IPv6: ethertype 0x{out['ethertype']:04x}")
    if len(frame) < ETH_HLEN + _IPV6.size + 24:
        raise ValueError(f"frame too short for an NA: {len(frame)} bytes")
    vtf, plen, nxt, hlim, src, dst = _IPV6.unpack_from(frame, ETH_HLEN)
    if vtf >> 28 != 6:
        raise ValueError(f"IP version {vtf >> 28}, expected 6")
    if nxt != IPPROTO_ICMPV6:
        raise ValueError(f"next header {nxt}, expected ICMPv6 (58)")
    start = ETH_HLEN + _IPV6.size
    icmp = frame[start : start + plen]
    if len(icmp) != plen or plen < 24:
        raise ValueError(f"ICMPv6 payload truncated: {len(icmp)} of {plen} bytes")
    typ, code, csum, flags, target = struct.unpack_from("!BBHI16s", icmp)
    if typ != ICMPV6_NA:
        raise ValueError(f"ICMPv6 type {typ}, expected 136 (NA)")
    expected = icmpv6_checksum(src, dst, icmp[:2] + b"\x00\x00" + icmp[4:])
    if csum != expected:
        raise ValueError(f"bad ICMPv6 checksum 0x{csum:04x}, expected 0x{expected:04x}")
    tlla = None
    pos = 24
    while pos + 2 <= len(icmp):
        otype, olen = icmp[pos], icmp[pos + 1]
        if olen == 0:
            raise ValueError("ND option with length 0")
        if otype == ND_OPT_TARGET_LL_ADDR and olen * 8 >= 8:
            tlla = mac_to_str(icmp[pos + 2 : pos + 8])
        pos += olen * 8
    out.update(
        version=6,
        payload_length=plen,
        next_header=nxt,
        hop_limit=hlim,
        src_ip=str(ipaddress.IPv6Address(src)),
        dst_ip=str(ipaddress.IPv6Address(dst)),
        type=typ,
        code=code,
        checksum=csum,
        router=bool(flags & NA_FLAG_ROUTER),
        solicited=bool(flags & NA_FLAG_SOLICITED),
        override=bool(flags & NA_FLAG_OVERRIDE),
        target=str(ipaddress.IPv6Address(target)),
        tlla=tlla,
        length=len(frame),
    )
    return out
