"""Byte-level checks of the announcement frames.

Offsets are written out by hand (not through the module's structs) so the
tests check the wire layout, not the module against itself.
"""

from __future__ import annotations

import ipaddress
import struct

import pytest

from vmm_orchestrator import frames

VM_MAC = "52:54:00:12:34:56"
VM_MAC_B = bytes.fromhex("525400123456")
VM_IP = "10.77.0.10"
VM_IP_B = bytes([10, 77, 0, 10])
GW_MAC = "02:00:00:00:00:01"
GW_MAC_B = bytes.fromhex("020000000001")
GW_IP = "10.77.0.1"
GW_IP_B = bytes([10, 77, 0, 1])
VM_IP6 = "fd77::10"
VM_IP6_B = ipaddress.IPv6Address(VM_IP6).packed
ALL_NODES_B = ipaddress.IPv6Address("ff02::1").packed
BCAST = b"\xff" * 6
ZERO6 = bytes(6)


def reference_checksum(data: bytes) -> int:
    """Independent RFC 1071 sum: byte pairs, end-around carry at every step."""
    if len(data) % 2:
        data += b"\0"
    total = 0
    for i in range(0, len(data), 2):
        total += (data[i] << 8) | data[i + 1]
        total = (total & 0xFFFF) + (total >> 16)
    return (~total) & 0xFFFF


def check_arp_header(f: bytes, op: int) -> None:
    assert f[14:16] == b"\x00\x01"  # htype Ethernet
    assert f[16:18] == b"\x08\x00"  # ptype IPv4
    assert f[18] == 6 and f[19] == 4
    assert f[20:22] == op.to_bytes(2, "big")


def test_gratuitous_arp_request_layout() -> None:
    f = frames.gratuitous_arp_request(VM_MAC, VM_IP)
    assert len(f) == 60
    assert f[0:6] == BCAST
    assert f[6:12] == VM_MAC_B
    assert f[12:14] == b"\x08\x06"
    check_arp_header(f, 1)
    assert f[22:28] == VM_MAC_B  # sender MAC
    assert f[28:32] == VM_IP_B  # sender IP
    assert f[32:38] == ZERO6  # target MAC all zero
    assert f[38:42] == VM_IP_B  # target IP = sender IP
    assert f[42:] == bytes(18)  # padding


def test_unicast_arp_reply_layout() -> None:
    f = frames.unicast_arp_reply(VM_MAC, VM_IP, GW_MAC, GW_IP)
    assert len(f) == 60
    assert f[0:6] == GW_MAC_B
    assert f[6:12] == VM_MAC_B
    assert f[12:14] == b"\x08\x06"
    check_arp_header(f, 2)
    assert f[22:28] == VM_MAC_B
    assert f[28:32] == VM_IP_B
    assert f[32:38] == GW_MAC_B
    assert f[38:42] == GW_IP_B
    assert f[42:] == bytes(18)


def test_rarp_layout_matches_qemu_self_announce() -> None:
    f = frames.rarp(VM_MAC)
    assert len(f) == 60
    assert f[0:6] == BCAST
    assert f[6:12] == VM_MAC_B
    assert f[12:14] == b"\x80\x35"
    check_arp_header(f, 3)
    assert f[22:28] == VM_MAC_B
    assert f[28:32] == bytes(4)
    assert f[32:38] == VM_MAC_B
    assert f[38:42] == bytes(4)
    assert f[42:] == bytes(18)


def test_unsolicited_na_layout() -> None:
    f = frames.unsolicited_na(VM_MAC, VM_IP6)
    assert len(f) == 14 + 40 + 32
    assert f[0:6] == bytes.fromhex("333300000001")
    assert f[6:12] == VM_MAC_B
    assert f[12:14] == b"\x86\xdd"
    ip = f[14:54]
    assert ip[0] >> 4 == 6
    assert ip[0:4] == b"\x60\x00\x00\x00"  # traffic class and flow label zero
    assert int.from_bytes(ip[4:6], "big") == 32  # payload length
    assert ip[6] == 58  # ICMPv6
    assert ip[7] == 255  # hop limit, required by RFC 4861
    assert ip[8:24] == VM_IP6_B
    assert ip[24:40] == ALL_NODES_B
    icmp = f[54:]
    assert icmp[0] == 136 and icmp[1] == 0
    flags = icmp[4]
    assert flags & 0x80 == 0  # Router clear
    assert flags & 0x40 == 0  # Solicited clear (multicast destination)
    assert flags & 0x20 == 0x20  # Override set
    assert icmp[5:8] == bytes(3)  # reserved
    assert icmp[8:24] == VM_IP6_B  # target
    assert icmp[24] == 2 and icmp[25] == 1  # Target Link-Layer Address, 8 bytes
    assert icmp[26:32] == VM_MAC_B


def test_na_checksum_independent() -> None:
    f = frames.unsolicited_na(VM_MAC, VM_IP6)
    src, dst, icmp = f[22:38], f[38:54], f[54:]
    pseudo = src + dst + len(icmp).to_bytes(4, "big") + b"\0\0\0" + bytes([58])
    stored = int.from_bytes(icmp[2:4], "big")
    zeroed = icmp[:2] + b"\0\0" + icmp[4:]
    assert stored == reference_checksum(pseudo + zeroed)
    # and the receiver's check: summing with the checksum in place gives 0
    assert reference_checksum(pseudo + icmp) == 0


@pytest.mark.parametrize(
    "mac,ip6",
    [
        ("00:00:00:00:00:01", "2001:db8::1"),
        ("fe:ff:ff:ff:ff:ff", "fd00:ffff:ffff:ffff:ffff:ffff:ffff:fffe"),
        ("52:54:00:ab:cd:ef", "fe80::5054:ff:feab:cdef"),
    ],
)
def test_na_checksum_various(mac: str, ip6: str) -> None:
    f = frames.unsolicited_na(mac, ip6)
    pseudo = f[22:38] + f[38:54] + struct.pack("!I3xB", len(f) - 54, 58)
    assert reference_checksum(pseudo + f[54:]) == 0
    parsed = frames.parse_na(f)
    assert parsed["target"] == str(ipaddress.IPv6Address(ip6))
    assert parsed["tlla"] == mac


def test_parse_arp_roundtrip() -> None:
    p = frames.parse_arp(frames.unicast_arp_reply(VM_MAC, VM_IP, GW_MAC, GW_IP))
    assert p["ethertype"] == 0x0806
    assert (p["dst"], p["src"], p["op"]) == (GW_MAC, VM_MAC, 2)
    assert (p["sha"], p["spa"], p["tha"], p["tpa"]) == (VM_MAC, VM_IP, GW_MAC, GW_IP)
    assert p["length"] == 60
    r = frames.parse_arp(frames.rarp(VM_MAC))
    assert r["ethertype"] == 0x8035 and r["op"] == 3
    assert r["spa"] == r["tpa"] == "0.0.0.0"


def test_parse_na_roundtrip() -> None:
    p = frames.parse_na(frames.unsolicited_na(VM_MAC, VM_IP6))
    assert p["dst"] == "33:33:00:00:00:01"
    assert p["src"] == VM_MAC
    assert p["hop_limit"] == 255
    assert p["src_ip"] == VM_IP6 and p["dst_ip"] == "ff02::1"
    assert (p["router"], p["solicited"], p["override"]) == (False, False, True)
    assert p["target"] == VM_IP6 and p["tlla"] == VM_MAC


def test_parse_na_rejects_bad_checksum() -> None:
    f = bytearray(frames.unsolicited_na(VM_MAC, VM_IP6))
    f[60] ^= 0x01  # a byte of the target address
    with pytest.raises(ValueError, match="checksum"):
        frames.parse_na(bytes(f))


def test_parse_rejects_wrong_kind() -> None:
    with pytest.raises(ValueError):
        frames.parse_arp(frames.unsolicited_na(VM_MAC, VM_IP6))
    with pytest.raises(ValueError):
        frames.parse_na(frames.gratuitous_arp_request(VM_MAC, VM_IP))
    with pytest.raises(ValueError):
        frames.parse_arp(b"\x00" * 10)


def test_mac_forms() -> None:
    assert frames.mac_to_bytes("52-54-00-12-34-56") == VM_MAC_B
    assert frames.mac_to_bytes("52:54:00:12:34:56".upper()) == VM_MAC_B
    for bad in ("52:54:00:12:34", "52:54:00:12:34:5g", "525:4:00:12:34:56"):
        with pytest.raises(ValueError):
            frames.mac_to_bytes(bad)


def test_bad_ip_rejected() -> None:
    with pytest.raises(ValueError):
        frames.gratuitous_arp_request(VM_MAC, "fd77::1")
    with pytest.raises(ValueError):
        frames.unsolicited_na(VM_MAC, "10.0.0.1")


def test_rarp_reply_layout() -> None:
    """RFC 903 reverse reply: op 4, unicast to the client, target = client MAC and its IP."""
    frame = frames.rarp_reply("02:00:00:00:00:01", "0.0.0.0", "52:54:00:00:64:0a", "198.19.100.10")
    assert len(frame) == 60
    arp = frames.parse_arp(frame)
    assert arp["ethertype"] == frames.ETH_P_RARP == 0x8035
    assert (arp["dst"], arp["src"]) == ("52:54:00:00:64:0a", "02:00:00:00:00:01")
    assert arp["op"] == frames.ARPOP_RREPLY == 4
    assert (arp["sha"], arp["spa"]) == ("02:00:00:00:00:01", "0.0.0.0")
    assert (arp["tha"], arp["tpa"]) == ("52:54:00:00:64:0a", "198.19.100.10")


def test_rarp_request_for_self_accepts_own_mac_requests() -> None:
    """A diskless guest's request and QEMU's self-announce are the same frame: both count."""
    assert frames.rarp_request_for_self(frames.rarp("52:54:00:00:64:0a")) == "52:54:00:00:64:0a"


def test_rarp_request_for_self_rejects_others() -> None:
    mac, other = "52:54:00:00:64:0a", "52:54:00:00:64:0b"
    # asking for another MAC's address
    body = bytearray(frames.rarp(mac))
    body[14 + 18 : 14 + 24] = frames.mac_to_bytes(other)
    assert frames.rarp_request_for_self(bytes(body)) is None
    # Ethernet source differs from the sender MAC
    body = bytearray(frames.rarp(mac))
    body[6:12] = frames.mac_to_bytes(other)
    assert frames.rarp_request_for_self(bytes(body)) is None
    # a reply, an ARP request, garbage
    reply = frames.rarp_reply(other, "0.0.0.0", mac, "10.0.0.1")
    assert frames.rarp_request_for_self(reply) is None
    assert frames.rarp_request_for_self(frames.gratuitous_arp_request(mac, "10.0.0.1")) is None
    assert frames.rarp_request_for_self(b"\x00" * 20) is None
