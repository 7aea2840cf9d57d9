"""Each state kind against the real kernel: export from one host namespace,
refuse a poisoned entry, import into another, read the kernel's tables back
(remaining lifetimes never negative, never extended), revert exactly the
import, clean the source, and refuse (all or nothing) what is over the limit
or what the kernel rejects.

Two "hosts" (namespaces ``<prefix>-a`` and ``<prefix>-b``), each with the VN
bridge br-100, the migrating VM's port tap-vm1 and another VM's port tap-vm2
(veths whose other ends stay in the host, up), and the model firewall of
:mod:`vmm_lab.firewall`.
"""

from __future__ import annotations

import dataclasses
import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest
from oslo_config import cfg

from vmm_lab.firewall import PORT_TABLE, HostFirewall
from vmm_lab.linux.topology import remove_namespaces, sh
from vmm_orchestrator.model import Vif
from vmm_orchestrator.options import new_conf
from vmm_orchestrator.statekind import KindContext, PoisonedEntry, Reason
from vmm_state.kinds import _ctnetlink as ctnl
from vmm_state.kinds import _nft
from vmm_state.kinds.conntrack import ConntrackKind
from vmm_state.kinds.dhcp_snooping import DhcpSnoopingKind
from vmm_state.kinds.dot1x import Dot1xKind
from vmm_state.kinds.macsec import MacsecKind, macsec_unsupported, parse_macsec_text
from vmm_state.kinds.mdb import MdbKind
from vmm_state.kinds.nftsets import NftSetsKind

VNI = 100
VM = Vif(
    mac="52:54:00:00:64:0a",
    vni=VNI,
    ipv4=("198.19.100.10",),
    ipv6=("fd00:100::10",),
    port="tap-vm1",
)
OTHER = Vif(
    mac="52:54:00:00:64:0b",
    vni=VNI,
    ipv4=("198.19.100.11",),
    ipv6=("fd00:100::11",),
    port="tap-vm2",
)
PEER4, PEER6 = "198.19.100.1", "fd00:100::1"
ATTACKER = "203.0.113.7"


def ns_run(ns: str, *args: str, input_: str | None = None) -> str:
    return sh("ip", "netns", "exec", ns, *args, input_=input_)


class Hosts:
    """Two host namespaces with the VN bridge, two VM ports and the firewall."""

    def __init__(self, prefix: str) -> None:
        self.a, self.b = f"{prefix}-a", f"{prefix}-b"
        for ns in (self.a, self.b):
            sh("ip", "netns", "add", ns)
            ns_run(ns, "ip", "link", "add", "br-100", "type", "bridge")
            ns_run(ns, "ip", "link", "set", "br-100", "up")
            for vif, peer in ((VM, "vm1-side"), (OTHER, "vm2-side")):
                port = str(vif.port)
                ns_run(ns, "ip", "link", "add", port, "type", "veth", "peer", "name", peer)
                # no link-local address: its MLD reports would add mdb entries of their own
                ns_run(ns, "ip", "link", "set", peer, "addrgenmode", "none")
                ns_run(ns, "ip", "link", "set", port, "master", "br-100", "up")
                ns_run(ns, "ip", "link", "set", peer, "up")
            HostFirewall(ns).install()
        self.fw_a, self.fw_b = HostFirewall(self.a), HostFirewall(self.b)
        self.src = KindContext(self.a, (VM,), "mig-test")
        self.dst = KindContext(self.b, (VM,), "mig-test")
        self.other_src = KindContext(self.a, (OTHER,), "mig-other")


@pytest.fixture
def hosts(prefix: str) -> Iterator[Hosts]:
    try:
        yield Hosts(prefix)
    finally:
        remove_namespaces(prefix)


@pytest.fixture
def conf() -> cfg.ConfigOpts:
    value = new_conf()
    return value


def roundtrip(kind: Any, hosts: Hosts) -> tuple[list[dict[str, Any]], Any]:
    """Export at a, check every entry for b, import at b (JSON on the way, as a bundle)."""
    entries = json.loads(json.dumps(list(kind.export(hosts.src))))
    for entry in entries:
        kind.check(hosts.dst, entry)
    result = kind.import_(hosts.dst, entries)
    assert result.ok, result
    json.dumps(result.record)  # journalled: must be JSON
    return entries, result


# -- conntrack ----------------------------------------------------------------------


def tcp(src: str, dst: str, sport: int, dport: int, timeout: int, state: int = 3) -> ctnl.Conn:
    family = socket.AF_INET6 if ":" in src else socket.AF_INET
    orig = ctnl.Tuple(family, ctnl.IPPROTO_TCP, src, dst, sport, dport)
    return ctnl.Conn(
        orig,
        orig.inverse(),
        timeout=timeout,
        status=ctnl.IPS_SEEN_REPLY | ctnl.IPS_ASSURED,
        tcp_state=state,
        tcp_wscale_orig=7,
        tcp_wscale_reply=7,
        tcp_flags_orig=ctnl.TCP_FLAG_SACK_PERM | ctnl.TCP_FLAG_WINDOW_SCALE,
        tcp_flags_reply=ctnl.TCP_FLAG_SACK_PERM | ctnl.TCP_FLAG_WINDOW_SCALE,
    )


def udp(src: str, dst: str, sport: int, dport: int, timeout: int) -> ctnl.Conn:
    orig = ctnl.Tuple(socket.AF_INET, ctnl.IPPROTO_UDP, src, dst, sport, dport)
    return ctnl.Conn(orig, orig.inverse(), timeout=timeout, status=ctnl.IPS_SEEN_REPLY)


def icmp_echo(src: str, dst: str, ident: int, timeout: int) -> ctnl.Conn:
    orig = ctnl.Tuple(socket.AF_INET, ctnl.IPPROTO_ICMP, src, dst, icmp_id=ident, icmp_type=8)
    reply = ctnl.Tuple(socket.AF_INET, ctnl.IPPROTO_ICMP, dst, src, icmp_id=ident, icmp_type=0)
    return ctnl.Conn(orig, reply, timeout=timeout)


def sessions(ns: str, addresses: set[str]) -> dict[tuple[Any, ...], ctnl.Conn]:
    with ctnl.ctnetlink(ns) as nl:
        return {
            c.orig.key(): c for c in nl.dump(lambda o, r: o.src in addresses or r.src in addresses)
        }


def create(ns: str, conns: list[ctnl.Conn]) -> None:
    with ctnl.ctnetlink(ns) as nl:
        assert nl.apply([("create", c) for c in conns]) == [0] * len(conns)


VM_ADDRS = {"198.19.100.10", "fd00:100::10"}
OTHER_ADDRS = {"198.19.100.11", "fd00:100::11"}


def test_conntrack_moves_sessions_with_remaining_timeouts(conf, hosts):
    kind = ConntrackKind(conf)
    mine = [
        tcp("198.19.100.10", PEER4, 40000, 443, 3000),  # the VM started it
        tcp(PEER4, "198.19.100.10", 51000, 22, 4000),  # the VM answers it
        tcp("fd00:100::10", PEER6, 40001, 80, 500),
        udp("198.19.100.10", PEER4, 5353, 53, 25),
        icmp_echo(PEER4, "198.19.100.10", 77, 20),
    ]
    theirs = [tcp("198.19.100.11", PEER4, 40000, 443, 3000)]
    create(hosts.a, mine + theirs)
    # the destination already tracks one of the sessions (half-open): it is replaced
    create(hosts.b, [tcp(PEER4, "198.19.100.10", 51000, 22, 50, state=2)])

    entries, result = roundtrip(kind, hosts)
    assert len(entries) == 5 and result.installed == 5
    assert {e["orig"]["src"] for e in entries} == {"198.19.100.10", PEER4, "fd00:100::10"}
    exported = {(e["orig"]["src"], e["orig"].get("sport", e["orig"].get("id"))): e for e in entries}

    at_b = sessions(hosts.b, VM_ADDRS)
    assert len(at_b) == 5
    for conn in at_b.values():
        entry = exported[(conn.orig.src, conn.orig.sport or conn.orig.icmp_id)]
        # the kernel keeps counting down: never longer than exported, never negative
        assert 0 <= conn.timeout <= entry["timeout"], (conn, entry)
        assert entry["timeout"] - conn.timeout <= 5  # seconds between export and now
        if conn.orig.proto == ctnl.IPPROTO_TCP:
            assert ctnl.TCP_STATES[conn.tcp_state or 0] == "ESTABLISHED"
            assert conn.tcp_flags_orig and conn.tcp_flags_orig & ctnl.TCP_FLAG_BE_LIBERAL
            assert conn.tcp_flags_reply and conn.tcp_flags_reply & ctnl.TCP_FLAG_BE_LIBERAL
            assert conn.status & ctnl.IPS_ASSURED

    # revert: the created ones go, the replaced one comes back as it was
    kind.revert_import(hosts.dst, result.record)
    left = sessions(hosts.b, VM_ADDRS)
    assert list(left) == [tcp(PEER4, "198.19.100.10", 51000, 22, 0).orig.key()]
    old = next(iter(left.values()))
    assert ctnl.TCP_STATES[old.tcp_state or 0] == "SYN_RECV" and 0 < old.timeout <= 50

    # cleanup at the source removes the VM's sessions only
    kind.cleanup_source(hosts.src)
    assert sessions(hosts.a, VM_ADDRS) == {}
    assert len(sessions(hosts.a, OTHER_ADDRS)) == 1


def test_conntrack_cleanup_keeps_the_sessions_of_endpoints_left_at_the_source(conf, hosts):
    """A peer still at the source (``keep_addresses``) keeps its sessions with the departed
    VM there: its packets still cross the source's firewall. Unknown peers (None): every
    session stays; none (the default): every session of the VM goes."""
    kind = ConntrackKind(conf)
    neighbour4, neighbour6 = OTHER.ipv4[0], OTHER.ipv6[0]
    kept = [
        tcp(neighbour4, "198.19.100.10", 41000, 8080, 3000),  # the neighbour started it
        tcp("fd00:100::10", neighbour6, 42000, 22, 3000),  # the VM started it
        icmp_echo(neighbour4, "198.19.100.10", 5, 20),
    ]
    gone = [
        tcp(PEER4, "198.19.100.10", 51000, 22, 3000),
        udp("198.19.100.10", PEER4, 5353, 53, 25),
    ]
    theirs = [tcp(neighbour4, PEER4, 43000, 443, 3000)]  # not the VM's: never touched
    create(hosts.a, kept + gone + theirs)
    everyone = VM_ADDRS | OTHER_ADDRS | {PEER4}
    every_key = {c.orig.key() for c in kept + gone + theirs}

    kind.cleanup_source(dataclasses.replace(hosts.src, keep_addresses=None))
    assert set(sessions(hosts.a, everyone)) == every_key

    # the directory's addresses in any spelling; the VM's own address there changes nothing
    keep = frozenset({neighbour4, "FD00:100:0::11", "198.19.100.10"})
    kind.cleanup_source(dataclasses.replace(hosts.src, keep_addresses=keep))
    assert set(sessions(hosts.a, everyone)) == {c.orig.key() for c in kept + theirs}

    kind.cleanup_source(hosts.src)
    assert set(sessions(hosts.a, everyone)) == {c.orig.key() for c in theirs}


def test_conntrack_check_refuses_other_vms_sessions(conf, hosts):
    kind = ConntrackKind(conf)
    create(hosts.a, [tcp("198.19.100.11", PEER4, 40000, 443, 3000)])
    (theirs,) = list(kind.export(hosts.other_src))
    with pytest.raises(PoisonedEntry):
        kind.check(hosts.dst, theirs)
    forged = json.loads(json.dumps(theirs))
    forged["reply"]["dst"] = "198.19.100.10"  # named in a position that proves nothing
    with pytest.raises(PoisonedEntry):
        kind.check(hosts.dst, forged)
    with pytest.raises(ValueError):
        kind.check(hosts.dst, {**theirs, "proto": "gre"})
    # a NATed session of the VM (reply tuple rewritten) is exported but not installed
    snat = json.loads(json.dumps(theirs))
    snat["orig"]["src"] = "198.19.100.10"
    snat["reply"]["dst"] = "203.0.113.1"
    kind.check(hosts.dst, snat)
    result = kind.import_(hosts.dst, [snat])
    assert result.ok and result.installed == 0 and "NAT" in result.detail
    with pytest.raises(ValueError):
        kind.check(hosts.dst, {**theirs, "tcp": {"state": "WHATEVER"}})


def test_conntrack_age_and_expiry(conf, hosts):
    kind = ConntrackKind(conf)
    create(
        hosts.a,
        [tcp("198.19.100.10", PEER4, 40000, 443, 100), udp("198.19.100.10", PEER4, 1, 2, 5)],
    )
    entries = list(kind.export(hosts.src))
    for e in entries:
        e["age"] = 30.5  # time in transit, as the framework adds it
    result = kind.import_(hosts.dst, entries)
    assert result.ok and result.installed == 1, result  # the UDP one expired on the way
    assert "1 expired" in result.detail
    (conn,) = sessions(hosts.b, VM_ADDRS).values()
    assert 0 <= conn.timeout <= 100 - 30


def test_conntrack_limit_and_kernel_refusal_leave_nothing(conf, hosts):
    kind = ConntrackKind(conf)
    create(hosts.a, [tcp("198.19.100.10", PEER4, 40000 + i, 443, 300) for i in range(5)])
    create(hosts.b, [tcp("198.19.100.10", PEER4, 40000, 443, 60, state=2)])
    entries = list(kind.export(hosts.src))
    before = sessions(hosts.b, VM_ADDRS)

    conf.set_override("max_entries", 4, group="state_conntrack")
    result = kind.import_(hosts.dst, entries)
    assert not result.ok and result.reason is Reason.RESOURCE_LIMIT, result
    assert sessions(hosts.b, VM_ADDRS).keys() == before.keys()
    conf.clear_override("max_entries", group="state_conntrack")

    bad = json.loads(json.dumps(entries[-1]))
    bad["orig"]["sport"] = bad["reply"]["dport"] = 49999
    bad["helper"] = "nosuchhelper"  # well-formed, but no such helper in this kernel
    result = kind.import_(hosts.dst, [*entries, bad])
    assert not result.ok and result.reason is Reason.UNSUPPORTED, result
    after = sessions(hosts.b, VM_ADDRS)
    assert after.keys() == before.keys()  # created ones deleted, the replaced one restored
    (old,) = after.values()
    assert ctnl.TCP_STATES[old.tcp_state or 0] == "SYN_RECV"


LABEL_RULE = """
table inet vmmlab_labels {
  chain c { type filter hook input priority 0; ct label 3 accept; }
}
"""


def test_conntrack_keeps_marks_and_labels_or_refuses(conf, hosts):
    """``conntrack -o save`` loses marks and labels; the kind keeps both, and
    refuses rather than silently dropping labels a destination cannot store."""
    kind = ConntrackKind(conf)
    ns_run(hosts.a, "nft", "-f", "-", input_=LABEL_RULE)
    conn = tcp("198.19.100.10", PEER4, 40000, 443, 300)
    conn.mark, conn.labels = 0x2A, bytes([8] + [0] * 15)
    create(hosts.a, [conn, udp("198.19.100.10", PEER4, 5353, 53, 30)])
    entries = list(kind.export(hosts.src))
    tagged = next(e for e in entries if e["proto"] == "tcp")
    assert tagged["mark"] == 0x2A and tagged["labels"] == "08" + "00" * 15
    result = kind.import_(hosts.dst, entries)
    assert not result.ok and result.reason is Reason.UNSUPPORTED, result
    assert sessions(hosts.b, VM_ADDRS) == {}
    ns_run(hosts.b, "nft", "-f", "-", input_=LABEL_RULE)  # now b stores labels
    assert kind.import_(hosts.dst, entries).ok
    got = sessions(hosts.b, VM_ADDRS)[conn.orig.key()]
    assert got.mark == 0x2A and got.labels.rstrip(b"\0") == bytes([8])


def test_conntrack_scale(conf, hosts):
    """Thousands of sessions in one go (the report has the 100k figures)."""
    kind = ConntrackKind(conf)
    count = 10000
    create(
        hosts.a,
        [
            tcp("198.19.100.10", f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", 40000, 443, 900)
            for i in range(count)
        ],
    )
    started = time.monotonic()
    entries = list(kind.export(hosts.src))
    exported = time.monotonic()
    result = kind.import_(hosts.dst, entries)
    imported = time.monotonic()
    assert result.ok and result.installed == count
    assert len(sessions(hosts.b, VM_ADDRS)) == count
    # generous bounds (a shared 2-core machine); the report has quiet-machine figures
    assert exported - started < 20 and imported - exported < 30


# -- nft sets -------------------------------------------------------------------------


def elements(ns: str, family: str, table: str, name: str) -> dict[str, dict[str, Any]]:
    _, found = _nft.list_set(ns, family, table, name)
    return {json.dumps(e["key"]): e for e in found}


METER = "limit rate over 20/second burst 20 packets"


def test_nft_sets_move_meters_and_blacklists(conf, hosts):
    kind = NftSetsKind(conf)
    fw = "inet vmm_fw"
    ns_run(
        hosts.a,
        "nft",
        "-f",
        "-",
        input_=f"""
add element {fw} blacklist_v4 {{ {ATTACKER} . 198.19.100.10 timeout 60s expires 40s }}
add element {fw} blacklist_v4 {{ {ATTACKER} . 198.19.100.11 timeout 60s expires 40s }}
add element {fw} blacklist_v6 {{ 2001:db8::7 . fd00:100::10 timeout 60s expires 30s }}
add element {fw} synflood_v4 {{ {ATTACKER} . 198.19.100.10 {METER} timeout 10s expires 8s }}
""",
    )
    # the destination blacklisted the attacker already, with less time left: replaced
    ns_run(hosts.b, "nft", "add", "element", "inet", "vmm_fw", "blacklist_v4",
           f"{{ {ATTACKER} . 198.19.100.10 timeout 60s expires 5s }}")  # fmt: skip

    entries, result = roundtrip(kind, hosts)
    assert len(entries) == 3 and result.installed == 3
    exported = {(e["set"], json.dumps(e["key"])): e for e in entries}
    for name in ("blacklist_v4", "blacklist_v6", "synflood_v4"):
        for key, elem in elements(hosts.b, "inet", "vmm_fw", name).items():
            sent = exported[(name, key)]
            assert 0 <= elem["expires"] <= sent["expires"], (name, elem)
            assert sent["expires"] - elem["expires"] <= 5
    meter = elements(hosts.b, "inet", "vmm_fw", "synflood_v4")
    (elem,) = meter.values()
    assert elem["limit"] == {"rate": 20, "burst": 20, "per": "second", "inv": True}
    assert len(elements(hosts.b, "inet", "vmm_fw", "blacklist_v4")) == 1  # replaced, not doubled

    kind.revert_import(hosts.dst, result.record)
    assert elements(hosts.b, "inet", "vmm_fw", "synflood_v4") == {}
    assert elements(hosts.b, "inet", "vmm_fw", "blacklist_v6") == {}
    (back,) = elements(hosts.b, "inet", "vmm_fw", "blacklist_v4").values()
    assert back["expires"] <= 5  # the old element, with its old remaining time

    kind.cleanup_source(hosts.src)
    left = elements(hosts.a, "inet", "vmm_fw", "blacklist_v4")
    assert [e["key"][1] for e in left.values()] == ["198.19.100.11"]
    assert elements(hosts.a, "inet", "vmm_fw", "synflood_v4") == {}


def test_nft_sets_check_refusal_and_limits(conf, hosts):
    kind = NftSetsKind(conf)
    ns_run(hosts.a, "nft", "add", "element", "inet", "vmm_fw", "blacklist_v4",
           f"{{ {ATTACKER} . 198.19.100.10 timeout 60s expires 40s, "
           f"{ATTACKER} . 198.19.100.11 timeout 60s }}")  # fmt: skip
    (mine,) = list(kind.export(hosts.src))
    kind.check(hosts.dst, mine)
    with pytest.raises(PoisonedEntry):
        kind.check(hosts.dst, {**mine, "key": [ATTACKER, "198.19.100.11"]})
    with pytest.raises(PoisonedEntry):
        kind.check(hosts.dst, {**mine, "set": "protected_v4"})  # not a set that moves
    with pytest.raises(ValueError):
        kind.check(hosts.dst, {**mine, "key": ["1.2.3.4; flush ruleset", "198.19.100.10"]})

    conf.set_override("max_entries", 0, group="state_nft_sets")
    result = kind.import_(hosts.dst, [mine])
    assert not result.ok and result.reason is Reason.RESOURCE_LIMIT
    conf.clear_override("max_entries", group="state_nft_sets")

    # a value of the wrong type for the set (nft would resolve a host name) is refused
    # before nft runs
    result = kind.import_(hosts.dst, [{**mine, "key": ["example.com", "198.19.100.10"]}])
    assert not result.ok and result.reason is Reason.UNSUPPORTED, result
    # well-formed and the VM's, but the kernel rejects the meter's rate of 0 (EINVAL):
    # the transaction aborts and none of the three elements stays
    v6 = {**mine, "set": "blacklist_v6", "key": ["2001:db8::7", "fd00:100::10"]}
    meter = {**mine, "set": "synflood_v4", "timeout": 10, "expires": 5}
    meter["limit"] = {"rate": 0, "burst": 5, "per": "second", "inv": True}
    result = kind.import_(hosts.dst, [v6, mine, meter])
    assert not result.ok and result.reason is Reason.UNSUPPORTED, result
    assert "Invalid argument" in result.detail
    for name in ("blacklist_v4", "blacklist_v6", "synflood_v4"):
        assert elements(hosts.b, "inet", "vmm_fw", name) == {}


# -- mdb ---------------------------------------------------------------------------------


def mdb(ns: str) -> list[dict[str, Any]]:
    """The VM ports' memberships (the bridge's own, as a host, left out)."""
    out = json.loads(ns_run(ns, "bridge", "-j", "-d", "-s", "mdb", "show", "dev", "br-100"))
    return [e for block in out for e in block.get("mdb", []) if e["port"] != "br-100"]


def test_mdb_moves_memberships_of_the_port(conf, hosts):
    kind = MdbKind(conf)
    for port, grp, state in (
        ("tap-vm1", "239.1.1.1", "temp"),
        ("tap-vm1", "239.2.2.2", "permanent"),
        ("tap-vm1", "ff0e::1:3", "temp"),
        ("tap-vm2", "239.1.1.1", "temp"),
    ):
        ns_run(hosts.a, "bridge", "mdb", "add", "dev", "br-100", "port", port, "grp", grp, state)
    time.sleep(1.1)  # let the source's timers run a little

    entries, result = roundtrip(kind, hosts)
    assert sorted(e["group"] for e in entries) == ["239.1.1.1", "239.2.2.2", "ff0e::1:3"]
    assert all(e["port"] == "tap-vm1" for e in entries)
    at_b = {e["grp"]: e for e in mdb(hosts.b)}
    assert set(at_b) == {"239.1.1.1", "239.2.2.2", "ff0e::1:3"}
    assert at_b["239.2.2.2"]["state"] == "permanent"
    for e in entries:
        if e["state"] == "temp":
            assert 0 < e["timer"] < 260
            # measured: the kernel arms the bridge's full membership interval on an
            # added entry (no netlink attribute sets it), like a fresh report would
            assert 0 < float(at_b[e["group"]]["timer"]) <= 260.0

    kind.revert_import(hosts.dst, result.record)
    assert mdb(hosts.b) == []
    kind.cleanup_source(hosts.src)
    assert [(e["port"], e["grp"]) for e in mdb(hosts.a)] == [("tap-vm2", "239.1.1.1")]


def test_mdb_check_limits_and_refusal(conf, hosts):
    kind = MdbKind(conf)
    entry = {"vni": VNI, "port": "tap-vm1", "group": "239.1.1.1", "state": "temp", "timer": 200.0}
    kind.check(hosts.dst, entry)
    with pytest.raises(PoisonedEntry):
        kind.check(hosts.dst, {**entry, "port": "tap-vm2"})
    with pytest.raises(PoisonedEntry):
        kind.check(hosts.dst, {**entry, "vni": 200})
    with pytest.raises(ValueError):
        kind.check(hosts.dst, {**entry, "group": "198.19.100.10"})

    conf.set_override("max_entries", 1, group="state_mdb")
    result = kind.import_(hosts.dst, [entry, {**entry, "group": "239.1.1.2"}])
    assert not result.ok and result.reason is Reason.RESOURCE_LIMIT
    conf.clear_override("max_entries", group="state_mdb")

    # the kernel refuses a link-local group (224.0.0.x) after two good ones: none stays
    local = {**entry, "group": "224.0.0.5"}
    result = kind.import_(hosts.dst, [entry, {**entry, "group": "239.1.1.2"}, local])
    assert not result.ok and result.reason is Reason.UNSUPPORTED, result
    assert mdb(hosts.b) == []

    # the port is not plugged at the destination yet
    ns_run(hosts.b, "ip", "link", "set", "tap-vm1", "nomaster")
    result = kind.import_(hosts.dst, [entry])
    assert not result.ok and result.reason is Reason.UNSUPPORTED and "not a port" in result.detail


def without_set(ns: str, name: str) -> None:
    """Give the host a port table that lacks set ``name`` (an older firewall)."""
    sets = ["snooped_ports", "bindings_v4", "bindings_v6", "dacl_ports", "dacl_v4", "dacl_v6"]
    info = {s: _nft.list_set(ns, "bridge", PORT_TABLE, s)[0] for s in sets}
    types = {s: " . ".join(i.types) for s, i in info.items()}
    lines = [f"delete table bridge {PORT_TABLE}", f"add table bridge {PORT_TABLE}"]
    for s in sets:
        if s != name:
            flags = "flags timeout; " if info[s].timeout_flag else ""
            lines.append(f"add set bridge {PORT_TABLE} {s} {{ type {types[s]}; {flags}}}")
    ns_run(ns, "nft", "-f", "-", input_="\n".join(lines) + "\n")


# -- 802.1X ------------------------------------------------------------------------------


def fdb(ns: str, port: str) -> list[dict[str, Any]]:
    out = ns_run(ns, "bridge", "-j", "fdb", "show", "br", "br-100", "brport", port)
    return [e for e in json.loads(out) if e.get("state") == "static"]


def port_locked(ns: str, port: str) -> bool:
    return bool(
        json.loads(ns_run(ns, "bridge", "-j", "-d", "link", "show", "dev", port))[0]["locked"]
    )


def test_dot1x_moves_authorization_and_dynamic_acl(conf, hosts):
    kind = Dot1xKind(conf)
    for vif in (VM, OTHER):
        hosts.fw_a.plug_port(str(vif.port), snoop=False, dot1x=True)
        hosts.fw_a.authorize(vif, acl=[("tcp", 443), ("udp", 53)], session_timeout=600)
    assert port_locked(hosts.a, "tap-vm1") and not port_locked(hosts.b, "tap-vm1")

    entries, result = roundtrip(kind, hosts)
    types = sorted(e["type"] for e in entries)
    assert types == ["acl"] * 4 + ["acl_port", "authorized"]
    assert port_locked(hosts.b, "tap-vm1")
    assert [e["mac"] for e in fdb(hosts.b, "tap-vm1")] == [VM.mac]
    exported = {
        json.dumps([e["port"], e["ip"], e["proto"], e["service"]]): e
        for e in entries
        if e["type"] == "acl"
    }
    got = {
        **elements(hosts.b, "bridge", PORT_TABLE, "dacl_v4"),
        **elements(hosts.b, "bridge", PORT_TABLE, "dacl_v6"),
    }
    assert got.keys() == exported.keys()
    for key, elem in got.items():
        assert 0 <= elem["expires"] <= exported[key]["expires"] <= 600
    assert list(elements(hosts.b, "bridge", PORT_TABLE, "dacl_ports")) == ['["tap-vm1"]']

    kind.revert_import(hosts.dst, result.record)
    assert not port_locked(hosts.b, "tap-vm1")
    assert fdb(hosts.b, "tap-vm1") == []
    assert elements(hosts.b, "bridge", PORT_TABLE, "dacl_v4") == {}
    assert elements(hosts.b, "bridge", PORT_TABLE, "dacl_ports") == {}

    kind.cleanup_source(hosts.src)
    assert fdb(hosts.a, "tap-vm1") == []
    assert [e["mac"] for e in fdb(hosts.a, "tap-vm2")] == [OTHER.mac]
    left = elements(hosts.a, "bridge", PORT_TABLE, "dacl_v4")
    assert {json.loads(k)[0] for k in left} == {"tap-vm2"}


def test_dot1x_check_and_all_or_nothing(conf, hosts):
    kind = Dot1xKind(conf)
    hosts.fw_a.plug_port("tap-vm1", snoop=False, dot1x=True)
    hosts.fw_a.authorize(VM, acl=[("tcp", 443)])
    entries = list(kind.export(hosts.src))
    auth = next(e for e in entries if e["type"] == "authorized")
    acl = next(e for e in entries if e["type"] == "acl")
    with pytest.raises(PoisonedEntry):
        kind.check(hosts.dst, {**auth, "mac": OTHER.mac})
    with pytest.raises(PoisonedEntry):
        kind.check(hosts.dst, {**acl, "ip": "198.19.100.11"})
    with pytest.raises(PoisonedEntry):
        kind.check(hosts.dst, {**acl, "port": "tap-vm2"})
    # the destination lacks the IPv6 ACL set: nothing, not even the lock, stays
    without_set(hosts.b, "dacl_v6")
    result = kind.import_(hosts.dst, entries)
    assert not result.ok and result.reason is Reason.UNSUPPORTED, result
    assert not port_locked(hosts.b, "tap-vm1")
    assert fdb(hosts.b, "tap-vm1") == []
    assert elements(hosts.b, "bridge", PORT_TABLE, "dacl_v4") == {}


# -- DHCP snooping -----------------------------------------------------------------------


def test_dhcp_snooping_moves_bindings_and_the_guard(conf, hosts):
    kind = DhcpSnoopingKind(conf)
    for vif in (VM, OTHER):
        hosts.fw_a.plug_port(str(vif.port), snoop=True)
        hosts.fw_a.snoop_binding(str(vif.port), vif.mac, vif.ipv4[0], 3600, remaining=1000)
        hosts.fw_a.snoop_binding(str(vif.port), vif.mac, vif.ipv6[0], 3600, remaining=900)

    entries, result = roundtrip(kind, hosts)
    assert sorted(e["type"] for e in entries) == ["binding", "binding", "port"]
    assert list(elements(hosts.b, "bridge", PORT_TABLE, "snooped_ports")) == ['["tap-vm1"]']
    for name, ip, left in (("bindings_v4", VM.ipv4[0], 1000), ("bindings_v6", VM.ipv6[0], 900)):
        (elem,) = elements(hosts.b, "bridge", PORT_TABLE, name).values()
        assert elem["key"] == ["tap-vm1", VM.mac, ip]
        assert elem["timeout"] == 3600 and 0 <= elem["expires"] <= left

    kind.revert_import(hosts.dst, result.record)
    assert elements(hosts.b, "bridge", PORT_TABLE, "bindings_v4") == {}
    assert elements(hosts.b, "bridge", PORT_TABLE, "snooped_ports") == {}

    kind.cleanup_source(hosts.src)
    keys = [json.loads(k) for k in elements(hosts.a, "bridge", PORT_TABLE, "bindings_v4")]
    assert keys == [["tap-vm2", OTHER.mac, OTHER.ipv4[0]]]
    assert list(elements(hosts.a, "bridge", PORT_TABLE, "snooped_ports")) == ['["tap-vm2"]']


def test_dhcp_snooping_check_and_all_or_nothing(conf, hosts):
    kind = DhcpSnoopingKind(conf)
    hosts.fw_a.plug_port("tap-vm1", snoop=True)
    hosts.fw_a.snoop_binding("tap-vm1", VM.mac, VM.ipv4[0], 3600)
    hosts.fw_a.snoop_binding("tap-vm1", VM.mac, VM.ipv6[0], 3600)
    entries = list(kind.export(hosts.src))
    binding = next(e for e in entries if e["type"] == "binding")
    for forged in (
        {**binding, "ip": OTHER.ipv4[0]},  # another VM's address on our port
        {**binding, "mac": OTHER.mac},
        {**binding, "port": "tap-vm2"},
    ):
        with pytest.raises(PoisonedEntry):
            kind.check(hosts.dst, forged)
    conf.set_override("max_entries", 2, group="state_dhcp_snooping")
    result = kind.import_(hosts.dst, entries)
    assert not result.ok and result.reason is Reason.RESOURCE_LIMIT
    conf.clear_override("max_entries", group="state_dhcp_snooping")
    without_set(hosts.b, "bindings_v6")
    result = kind.import_(hosts.dst, entries)
    assert not result.ok and result.reason is Reason.UNSUPPORTED, result
    assert elements(hosts.b, "bridge", PORT_TABLE, "bindings_v4") == {}
    assert elements(hosts.b, "bridge", PORT_TABLE, "snooped_ports") == {}


# -- MACsec ------------------------------------------------------------------------------

SAMPLE_SHOW = """\
7: ms-vm1: protect on validate strict sc off sa off encrypt on send_sci on end_station off \
scb off replay off
    cipher suite: GCM-AES-128, using ICV length 16
    TXSC: 0a1b2c3d4e5f0001 on SA 0
        0: PN 1234, state on, key 0102030405060708090a0b0c0d0e0f10
    RXSC: 52540000640a0001, state on
        0: PN 99, state on, key 1112131415161718191a1b1c1d1e1f20
"""


def macsec_entry() -> dict[str, Any]:
    sa = {"an": 0, "next_pn": 1234, "active": True, "key_id": "ab" * 16, "key": "cd" * 16}
    return {
        "port": "tap-vm1",
        "device": "ms-vm1",
        "bridge": None,
        "sci": "0a1b2c3d4e5f0001",
        "cipher": "GCM-AES-128",
        "icv_len": 16,
        "tx_sa": [sa],
        "rx_sc": [{"sci": "52540000640a0001", "active": True, "sa": [{**sa, "next_pn": 99}]}],
    }


def test_macsec_parser_check_and_pn_rule_need_no_kernel(conf):
    (dev,) = parse_macsec_text(SAMPLE_SHOW)
    assert dev["ifname"] == "ms-vm1" and dev["encrypt"] is True and dev["validate"] == "strict"
    assert dev["sci"] == "0a1b2c3d4e5f0001" and dev["cipher_suite"] == "GCM-AES-128"
    assert dev["sa_list"] == [
        {"an": 0, "pn": 1234, "active": True, "key": "0102030405060708090a0b0c0d0e0f10"}
    ]
    assert dev["rx_sc"][0]["sci"] == "52540000640a0001"
    assert dev["rx_sc"][0]["sa_list"][0]["pn"] == 99
    kind = MacsecKind(conf)
    ctx = KindContext(None, (VM,), "mig-test")
    entry = macsec_entry()
    kind.check(ctx, entry)
    other = json.loads(json.dumps(entry))
    other["rx_sc"][0]["sci"] = "52540000640b0001"  # another VM's secure channel
    with pytest.raises(PoisonedEntry):
        kind.check(ctx, other)
    with pytest.raises(PoisonedEntry):
        kind.check(ctx, {**entry, "port": "tap-vm2"})
    with pytest.raises(ValueError):
        kind.check(ctx, {**entry, "tx_sa": [{**entry["tx_sa"][0], "next_pn": 0}]})
    # a packet number the source may have sent is never used again with the same key
    conf.set_override("pn_margin", 1000, group="state_macsec")
    commands = kind._commands(entry)
    tx = next(c for c in commands if c[4:6] == ["tx", "sa"])
    assert int(tx[tx.index("pn") + 1]) == 1234 + 1000
    rx = next(c for c in commands if "rx" in c and "sa" in c)
    assert int(rx[rx.index("pn") + 1]) == 99  # replays of what the source accepted: refused
    near_end = {**entry, "tx_sa": [{**entry["tx_sa"][0], "next_pn": 2**32 - 10}]}
    with pytest.raises(Exception, match="rekeyed"):
        kind._commands(near_end)


def test_macsec_moves_sas_on_a_kernel_with_macsec(conf, hosts, tmp_path):
    why = macsec_unsupported(hosts.a)
    if why:
        result = MacsecKind(conf).import_(hosts.dst, [macsec_entry()])
        assert not result.ok and result.reason is Reason.UNSUPPORTED, result
        print(f"MACsec: {why}")
        pytest.skip(f"MACsec tests skipped: {why}")
    from vmm_state.kinds.macsec import establish

    conf.set_override("key_dir", str(tmp_path), group="state_macsec")
    conf.set_override("pn_margin", 1000, group="state_macsec")
    kind = MacsecKind(conf)
    keys = establish(hosts.a, "tap-vm1", "ms-vm1", VM.mac, str(tmp_path), tx_pn=500, rx_pn=40)
    establish(hosts.a, "tap-vm2", "ms-vm2", OTHER.mac, str(tmp_path))
    entries, result = roundtrip(kind, hosts)
    (entry,) = entries
    assert entry["tx_sa"][0]["key"] == keys["tx_key"]
    show = json.loads(ns_run(hosts.b, "ip", "-j", "macsec", "show", "ms-vm1"))[0]
    assert show["sa_list"][0]["pn"] >= 500 + 1000
    assert show["rx_sc"][0]["sa_list"][0]["pn"] == entry["rx_sc"][0]["sa"][0]["next_pn"]
    other = json.loads(json.dumps(entry))
    other["rx_sc"][0]["sci"] = OTHER.mac.replace(":", "") + "0001"
    with pytest.raises(PoisonedEntry):
        kind.check(hosts.dst, other)
    kind.revert_import(hosts.dst, result.record)
    assert "ms-vm1" not in ns_run(hosts.b, "ip", "link", "show")
    kind.cleanup_source(hosts.src)
    assert "ms-vm1" not in ns_run(hosts.a, "ip", "link", "show")
    assert "ms-vm2" in ns_run(hosts.a, "ip", "link", "show")


# -- cheap change checks: a delta with nothing in it lists nothing ------------------------


def test_mdb_delta_is_empty_without_a_membership_notification(conf, hosts):
    """The source listens to the bridge's mdb notifications from the pre-copy on: a
    delta with none since the export the destination holds sends (and lists)
    nothing; a change makes it the whole set again until that is settled."""
    kind = MdbKind(conf)
    ns_run(hosts.a, "bridge", "mdb", "add", "dev", "br-100", "port", "tap-vm1", "grp", "239.1.1.1")
    kind.track(hosts.src)
    upto = time.monotonic()
    assert [e["group"] for e in kind.export(hosts.src)] == ["239.1.1.1"]  # the pre-copy
    kind.settle(hosts.src.migration_id, upto)
    assert list(kind.export(hosts.src, since=1.0)) == []
    assert kind.delta_figures(hosts.src.migration_id)["listed"] is False
    ns_run(hosts.a, "bridge", "mdb", "add", "dev", "br-100", "port", "tap-vm1", "grp", "239.3.3.3")
    time.sleep(0.05)
    upto = time.monotonic()
    groups = sorted(e["group"] for e in kind.export(hosts.src, since=1.0))
    assert groups == ["239.1.1.1", "239.3.3.3"]  # changed: the whole set, as before
    assert list(kind.export(hosts.src, since=1.0)) != []  # not settled yet: again
    kind.settle(hosts.src.migration_id, upto)
    assert list(kind.export(hosts.src, since=1.0)) == []
    kind.settle(hosts.src.migration_id, None)  # the destination lost what was settled
    assert len(list(kind.export(hosts.src, since=1.0))) == 2
    kind.untrack(hosts.src.migration_id)
    assert len(list(kind.export(hosts.src, since=1.0))) == 2  # untracked: always listed


def test_dhcp_snooping_delta_is_empty_while_the_ruleset_generation_stands(conf, hosts):
    """Bindings are written by the snooper in nftables transactions, each raising the
    namespace's ruleset generation: while it is the one of the export the
    destination holds, the delta is empty and lists nothing."""
    kind = DhcpSnoopingKind(conf)
    hosts.fw_a.plug_port("tap-vm1", snoop=True)
    hosts.fw_a.snoop_binding("tap-vm1", VM.mac, VM.ipv4[0], 3600)
    kind.track(hosts.src)
    upto = time.monotonic()
    assert len(list(kind.export(hosts.src))) == 2  # the port's guard and the binding
    assert len(list(kind.export(hosts.src, since=1.0))) == 2  # nothing settled yet
    kind.settle(hosts.src.migration_id, upto)
    assert list(kind.export(hosts.src, since=1.0)) == []
    assert kind.delta_figures(hosts.src.migration_id)["listed"] is False
    hosts.fw_a.snoop_binding("tap-vm1", VM.mac, VM.ipv6[0], 3600)  # a transaction
    entries = list(kind.export(hosts.src, since=1.0))
    assert sorted(e["type"] for e in entries) == ["binding", "binding", "port"]
    kind.settle(hosts.src.migration_id, None)
    assert len(list(kind.export(hosts.src, since=1.0))) == 3
