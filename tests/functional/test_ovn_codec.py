"""The OVN plugin's pure parts: OpenFlow packet-out encoding, conntrack dump
parsing, synthetic ct packets, NB address parsing. No lab needed (they sit
with the OVN tests because the plugin's tests are kept together)."""

from __future__ import annotations

import ipaddress
import struct

import pytest

from vmm_ovn import conntrack, openflow
from vmm_ovn import options as ovn_opts
from vmm_ovn.directory import _all_ips, _split_addresses

DUMP = """\
tcp,orig=(src=10.0.0.1,dst=10.0.0.3,sport=40526,dport=5001),reply=(src=10.0.0.3,dst=10.0.0.1,sport=5001,dport=40526),zone=2,mark=0x1,protoinfo=(state=ESTABLISHED)
udp,orig=(src=10.0.0.3,dst=10.0.0.1,sport=6666,dport=5555),reply=(src=10.0.0.1,dst=10.0.0.3,sport=5555,dport=6666),zone=2
icmp,orig=(src=10.0.0.1,dst=10.0.0.3,id=7,type=8,code=0),reply=(src=10.0.0.3,dst=10.0.0.1,id=7,type=0,code=0),zone=2
icmpv6,orig=(src=fd00::1,dst=fd00::3,id=1,type=128,code=0),reply=(src=fd00::3,dst=fd00::1,id=1,type=129,code=0),zone=2
tcp,orig=(src=10.0.0.8,dst=10.0.0.9,sport=1,dport=2),reply=(src=10.0.0.9,dst=10.0.0.8,sport=2,dport=1),zone=2,protoinfo=(state=SYN_SENT)
"""


def _fold(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def test_packet_out_message_is_openflow10_with_resubmit_table0() -> None:
    frame = bytes(range(60))
    msg = openflow.packet_out_message(7, 3, frame)
    version, typ, length, xid = struct.unpack_from("!BBHI", msg)
    assert (version, typ, length, xid) == (1, 13, len(msg), 7)
    buffer_id, in_port, actions_len = struct.unpack_from("!IHH", msg, 8)
    assert (buffer_id, in_port, actions_len) == (0xFFFFFFFF, 3, 16)
    atype, alen, vendor, subtype, port, table = struct.unpack_from("!HHIHHB", msg, 16)
    assert (atype, alen, vendor, subtype, port, table) == (0xFFFF, 16, 0x2320, 14, 0xFFF8, 0)
    assert msg[32:] == frame


def test_ct_commit_action_encoding() -> None:
    action = openflow.ct_commit(7)
    assert len(action) == 24
    atype, alen, vendor, subtype, flags, zone_src, zone, recirc = struct.unpack_from(
        "!HHIHHIHB", action
    )
    assert (atype, alen, vendor, subtype) == (0xFFFF, 24, 0x2320, 35)
    assert (flags, zone_src, zone, recirc) == (1, 0, 7, 0xFF)
    msg = openflow.packet_out_message(1, 3, b"f" * 60, actions=action)
    assert struct.unpack_from("!H", msg, 14)[0] == 24 and msg[16:40] == action


def test_packet_out_refuses_reserved_ports() -> None:
    with pytest.raises(openflow.OpenFlowError):
        openflow.packet_out("unix:/nonexistent", 0xFFFE, [b"x" * 60])
    with pytest.raises(openflow.OpenFlowError, match="cannot connect"):
        openflow.packet_out("unix:/nonexistent/br-int.mgmt", 3, [b"x" * 60])


def test_default_openflow_target_sits_beside_the_ovsdb_socket() -> None:
    assert openflow.default_target("unix:/run/x/db.sock", "br-int") == "unix:/run/x/br-int.mgmt"
    assert openflow.default_target("tcp:1.2.3.4:6640", "br-int").endswith("/br-int.mgmt")


def test_parse_dump_keeps_ipv4_sessions_with_their_zone_and_state() -> None:
    entries = conntrack.parse_dump(DUMP)
    assert [e.proto for e in entries] == ["tcp", "udp", "icmp", "tcp"]  # icmpv6 skipped
    tcp = entries[0]
    assert (tcp.src, tcp.dst, tcp.sport, tcp.dport) == ("10.0.0.1", "10.0.0.3", 40526, 5001)
    assert (tcp.zone, tcp.mark, tcp.state) == (2, 1, "ESTABLISHED")
    assert entries[2].icmp_id == 7
    mine = conntrack.of_vm(entries, ["10.0.0.1"])
    assert len(mine) == 3  # the VM's sessions, whichever side opened them
    with pytest.raises(ValueError, match="does not involve"):
        conntrack.check(entries[3], ["10.0.0.1"])


@pytest.mark.parametrize("index", [0, 1, 2])
def test_synthetic_packets_carry_valid_checksums(index: int) -> None:
    entry = conntrack.parse_dump(DUMP)[index]
    frame = conntrack.synthetic_packet(entry, "0a:00:00:00:00:01", "02:00:00:00:00:ff")
    assert frame[12:14] == b"\x08\x00"
    ip = frame[14:34]
    assert _fold(ip) == 0xFFFF  # header checksum verifies
    assert ipaddress.IPv4Address(ip[12:16]) == ipaddress.IPv4Address(entry.src)
    l4 = frame[34:]
    if entry.proto == "icmp":
        assert _fold(l4) == 0xFFFF
    else:
        pseudo = ip[12:20] + struct.pack("!BBH", 0, conntrack.PROTOS[entry.proto], len(l4))
        assert _fold(pseudo + l4) == 0xFFFF
        assert struct.unpack_from("!HH", l4) == (entry.sport, entry.dport)
    if entry.proto == "tcp":
        assert l4[13] == conntrack.TCP_ACK  # an ACK may open an entry, a SYN+ACK may not


def test_nb_addresses_parse() -> None:
    assert _split_addresses(["router", "0A:00:00:00:00:01 10.0.0.1 fd00::1"]) == (
        "0a:00:00:00:00:01",
        ["10.0.0.1"],
        ["fd00::1"],
    )
    assert _split_addresses(["unknown"]) == (None, [], [])

    class Lsp:
        addresses = ["0a:00:00:00:00:01 10.0.0.1"]
        port_security = ["0a:00:00:00:00:01 10.0.0.5/32"]

    assert _all_ips(Lsp) == {"10.0.0.1", "10.0.0.5"}


def test_option_pairs() -> None:
    assert ovn_opts.pairs(["1001:sw0", " h1 : ch1 "], "x") == {"1001": "sw0", "h1": "ch1"}
    with pytest.raises(ValueError, match="vni_switches"):
        ovn_opts.pairs(["1001"], "vni_switches")
