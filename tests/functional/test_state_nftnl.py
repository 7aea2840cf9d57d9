"""The netlink set-element reader (vmm_state.kinds._nftnl) against libnftables.

Whatever the reader decodes must be exactly what nft's own listing
(:func:`vmm_state.kinds._nft.list_set`) gives, element for element; what it
does not decode it must refuse (Unsupported), so that the nft_sets kind lists
that set through libnftables instead. An empty set is answered from the
kernel's element count, without the dump whose cost is the set's hash buckets.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from vmm_kernel import nft as kernel_nft
from vmm_lab.firewall import HostFirewall
from vmm_lab.linux.topology import remove_namespaces, sh
from vmm_orchestrator.model import Vif
from vmm_orchestrator.options import new_conf
from vmm_orchestrator.statekind import KindContext, Reason
from vmm_state.kinds import _nft, _nftnl
from vmm_state.kinds.nftsets import NftSetsKind

TABLE = """
table inet t {
  set rates { type ipv4_addr . ipv4_addr; size 1000; flags dynamic,timeout; timeout 10s; }
  set pairs6 { type ipv6_addr . ipv6_addr; flags dynamic; }
  set single { type ipv4_addr; flags timeout; }
  set counted { type ipv4_addr . ipv4_addr; flags dynamic,timeout; timeout 10s; counter; }
  set mixed { typeof ip saddr . ip6 daddr; flags timeout; timeout 5s; }
  set big { type ipv4_addr . ipv4_addr; size 65535; flags dynamic,timeout; timeout 10s; }
  set ports { type ipv4_addr . inet_service; }
  set ranges { type ipv4_addr; flags interval; }
  map verdicts { type ipv4_addr : verdict; }
}
"""

# Expiries are mid-second (x.5 s): both listings round them down to the same
# whole second although they are read a few milliseconds apart.
ELEMENTS = """
add element inet t rates { 1.2.3.4 . 5.6.7.8 limit rate over 20/second burst 20 packets \
timeout 10s expires 8500ms }
add element inet t rates { 1.2.3.5 . 5.6.7.8 limit rate 20/minute burst 3 packets \
timeout 12s expires 8500ms }
add element inet t rates { 1.2.3.6 . 5.6.7.8 limit rate over 2048 kbytes/second \
burst 1024 kbytes expires 9500ms }
add element inet t rates { 1.2.3.7 . 5.6.7.8 limit rate over 3000 kbytes/second \
burst 5 bytes expires 500ms }
add element inet t rates { 1.2.3.8 . 5.6.7.8 limit rate 7/week burst 1 packets \
timeout 1h expires 1799500ms }
add element inet t rates { 1.2.3.9 . 5.6.7.8 limit rate 3 mbytes/hour burst 2048 bytes \
expires 9500ms }
add element inet t rates { 1.2.3.9 . 5.6.7.9 expires 9500ms }
add element inet t pairs6 { ::ffff:1.2.3.4 . 2001:db8::1 counter }
add element inet t pairs6 { 2001:db8::2 . ::5.6.7.8 }
add element inet t pairs6 { fe80::1:0:0:1 . ::1 }
add element inet t single { 9.9.9.9 timeout 3500ms }
add element inet t single { 9.9.9.10 }
add element inet t counted { 1.2.3.4 . 5.6.7.8 expires 9500ms }
add element inet t mixed { 1.2.3.4 . ::1 expires 4500ms }
add element inet t mixed { 1.2.3.4 . ::2 timeout 1500ms expires 1500ms }
add element inet t ports { 1.2.3.4 . 22 }
add element inet t ranges { 10.0.0.0/8 }
"""


def nft(ns: str, text: str) -> None:
    sh("ip", "netns", "exec", ns, "nft", "-f", "-", input_=text)


@pytest.fixture
def ns(prefix: str) -> Iterator[str]:
    name = f"{prefix}-n"
    try:
        sh("ip", "netns", "add", name)
        nft(name, TABLE + ELEMENTS)
        yield name
    finally:
        remove_namespaces(prefix)


def by_key(elements: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {json.dumps(e["key"]): e for e in elements}


def read(ns: str, name: str, field: int = 0, mine: Any = None) -> Any:
    got = _nftnl.read_sets(ns, [("inet", "t", name, field)], mine or (lambda _text: True))
    return got[("inet", "t", name)]


@pytest.mark.parametrize("name", ["rates", "pairs6", "single", "counted", "mixed", "big"])
def test_reader_gives_what_nft_lists(ns, name):
    _, listed = _nft.list_set(ns, "inet", "t", name)
    got = read(ns, name)
    assert isinstance(got, list), got
    assert by_key(got) == by_key(listed)
    assert len(got) == len(listed)


def test_reader_decodes_only_the_elements_naming_the_address(ns):
    got = read(ns, "rates", field=1, mine=lambda text: text == "5.6.7.9")
    assert [e["key"] for e in got] == [["1.2.3.9", "5.6.7.9"]]
    got = read(ns, "pairs6", field=0, mine=lambda text: text == "::ffff:1.2.3.4")
    assert [e["key"] for e in got] == [["::ffff:1.2.3.4", "2001:db8::1"]]
    assert read(ns, "rates", field=2) == []  # no such field: nothing, as nft's listing


def test_reader_refuses_what_it_does_not_decode(ns):
    for name in ("ports", "ranges", "verdicts"):
        assert isinstance(read(ns, name), _nftnl.Unsupported), name
    assert isinstance(read(ns, "nosuchset"), LookupError)
    # a connlimit is not decoded: that set is listed with libnftables instead
    nft(ns, "add element inet t pairs6 { 2001:db8::9 . ::1 ct count 2 }\n")
    assert isinstance(read(ns, "pairs6"), _nftnl.Unsupported)
    # the others in the same call are read all the same (a fresh socket after the refusal)
    got = _nftnl.read_sets(
        ns, [("inet", "t", "pairs6", 0), ("inet", "t", "counted", 0)], lambda _text: True
    )
    assert isinstance(got[("inet", "t", "pairs6")], _nftnl.Unsupported)
    assert [e["key"] for e in got[("inet", "t", "counted")]] == [["1.2.3.4", "5.6.7.8"]]


def test_an_element_with_a_limit_and_a_counter_keeps_both(ns):
    """nft's JSON shows only an element's first expression; the reader both."""
    nft(ns, "add element inet t rates { 1.2.3.10 . 5.6.7.8 limit rate 9/second burst 2 "
        "packets counter packets 5 bytes 7 }\n")  # fmt: skip
    (got,) = read(ns, "rates", field=0, mine=lambda text: text == "1.2.3.10")
    assert got["limit"] == {"rate": 9, "burst": 2, "per": "second"}
    assert got["counter"] == {"packets": 5, "bytes": 7}


def test_an_empty_set_is_answered_without_a_dump(ns, monkeypatch):
    asked: list[int] = []
    request = _nftnl.Reader._request

    def counting(self, msg_type, *args):
        asked.append(msg_type)
        return request(self, msg_type, *args)

    monkeypatch.setattr(_nftnl.Reader, "_request", counting)
    assert read(ns, "big") == []
    assert asked == [_nftnl.NFT_MSG_GETSET]  # the element count said: empty
    asked.clear()
    nft(ns, "add element inet t big { 1.2.3.4 . 5.6.7.8 }\n")
    assert [e["key"] for e in read(ns, "big")] == [["1.2.3.4", "5.6.7.8"]]
    assert asked == [_nftnl.NFT_MSG_GETSET, _nftnl.NFT_MSG_GETSETELEM]


def test_a_large_set_is_read_whole(ns):
    """Thousands of elements span many dump messages: none may be lost."""
    lines = [
        f"add element inet t big {{ 10.0.{i // 250}.{i % 250} . 5.6.7.{i % 3} timeout 60s }}"
        for i in range(5000)
    ]
    nft(ns, "\n".join(lines) + "\n")
    got = read(ns, "big", field=1, mine=lambda text: text == "5.6.7.1")
    assert len(got) == sum(1 for i in range(5000) if i % 3 == 1)
    assert all(e["timeout"] == 60 and 0 < e["expires"] <= 60 for e in got)


def test_lookup_gives_the_keys_nft_lists_and_the_count(ns):
    """The destination's point lookups: the elements among the keys, as nft
    lists them, the missing ones left out, and the set's element count."""
    _, listed = _nft.list_set(ns, "inet", "t", "rates")
    keys = [["1.2.3.4", "5.6.7.8"], ["1.2.3.9", "5.6.7.9"], ["9.9.9.9", "5.6.7.8"]]
    layout, count, found = _nftnl.lookup(ns, "inet", "t", "rates", keys)
    assert count == len(listed) == 7
    assert (layout.types, layout.timeout_flag, layout.default_timeout, layout.size) == (
        ["ipv4_addr", "ipv4_addr"], True, 10, 1000,
    )  # fmt: skip
    want = by_key(listed)
    assert by_key(found) == {k: want[k] for k in map(json.dumps, keys[:2])}
    assert _nftnl.lookup(ns, "inet", "t", "big", [])[1] == 0
    with pytest.raises(LookupError):
        _nftnl.lookup(ns, "inet", "t", "nosuchset", keys)
    with pytest.raises(_nftnl.Unsupported):
        _nftnl.lookup(ns, "inet", "t", "rates", [["1.2.3.4", "fd00::1"]])  # not its family
    with pytest.raises(_nftnl.Unsupported):
        _nftnl.lookup(ns, "inet", "t", "ports", [["1.2.3.4", 22]])


def test_a_dump_across_a_rehash_is_read_again(ns):
    """Deleting elements shrinks a set's hash table a moment later; a dump
    resumed across that skips as many elements as it repeats (nft's listing
    too: measured 1,301 of 10,000). The reader sees the repeats and reads the
    set again: no element of the final set may be missing, none doubled."""

    def peer(i: int) -> str:
        return f"10.{i // 65536}.{i // 256 % 256}.{i % 256}"

    reader = _nftnl.Reader(ns)
    try:
        for round_ in range(4):
            name = f"shrinking{round_}"
            expected = {peer(i) for i in range(10000)}
            kernel_nft.nft(ns, f"add set inet t {name} {{ type ipv4_addr . ipv4_addr; "
                               "size 65535; flags dynamic,timeout; }\n"
                               + "\n".join(f"add element inet t {name} {{ {p} . 5.6.7.8 "
                                           "timeout 3600s }" for p in sorted(expected))
                               + "\n")  # fmt: skip
            gone = sorted(expected)[:40]
            kernel_nft.nft(ns, "\n".join(f"delete element inet t {name} {{ {p} . 5.6.7.8 }}"
                                         for p in gone) + "\n")  # fmt: skip
            expected -= set(gone)
            got = reader.read([("inet", "t", name, 1)], lambda _text: True)
            keys = [e["key"][0] for e in got[("inet", "t", name)]]
            assert len(keys) == len(set(keys)) and set(keys) == expected, round_
    finally:
        reader.close()


VM = Vif(mac="52:54:00:00:64:0a", vni=100, ipv4=("198.19.100.10",), ipv6=("fd00:100::10",),
         port="tap-vm1")  # fmt: skip


def test_the_kind_reads_over_netlink_and_falls_back_to_nft(prefix, monkeypatch):
    """The nft_sets kind's export: the lab firewall's sets over netlink, a set
    the reader refuses through libnftables, and the same entries either way."""
    ns = f"{prefix}-k"
    try:
        sh("ip", "netns", "add", ns)
        HostFirewall(ns).install()
        nft(ns, TABLE)
        fw = "inet vmm_fw"
        nft(ns, f"""
add element {fw} blacklist_v4 {{ 203.0.113.7 . 198.19.100.10 timeout 60s expires 40500ms }}
add element {fw} blacklist_v4 {{ 203.0.113.7 . 198.19.100.11 timeout 60s expires 40500ms }}
add element {fw} synflood_v6 {{ 2001:db8::7 . fd00:100::10 limit rate over 20/second \
burst 20 packets timeout 10s expires 8500ms }}
add element inet t ports {{ 198.19.100.10 . 22 }}
""")  # fmt: skip
        conf = new_conf()
        conf.set_override(
            "sets",
            ["inet:vmm_fw:blacklist_v4:1", "inet:vmm_fw:synflood_v6:1", "inet:t:ports:0"],
            group="state_nft_sets",
        )
        kind = NftSetsKind(conf)
        ctx = KindContext(ns, (VM,), "mig-nftnl")
        fast = list(kind.export(ctx))  # untracked: a socket of its own
        assert sorted((e["set"], e["key"][0]) for e in fast) == [
            ("blacklist_v4", "203.0.113.7"),
            ("ports", "198.19.100.10"),
            ("synflood_v6", "2001:db8::7"),
        ]
        kind.track(ctx)  # the migration's socket, opened ahead, serves its reads
        reader = kind._readers[(ctx.migration_id, ns)]
        assert by_key(list(kind.export(ctx))) == by_key(fast)
        assert by_key(list(kind.export(ctx, since=0.0))) == {}  # nothing changed since
        kind.untrack(ctx.migration_id)
        assert not kind._readers and reader._sock is None

        def broken(*_args: Any) -> Any:
            raise OSError("no netlink here")

        monkeypatch.setattr(_nftnl, "read_sets", broken)
        slow = list(kind.export(ctx))
        assert by_key(slow) == by_key(fast)
    finally:
        remove_namespaces(prefix)


def test_the_import_checks_room_with_the_kernels_count(prefix, monkeypatch):
    """A set of size 3 holding 2 elements takes one more of the VM's, not two:
    the destination's import counts them without listing the set."""
    ns = f"{prefix}-k"
    try:
        sh("ip", "netns", "add", ns)
        nft(ns, """
table inet t {
  set tiny { type ipv4_addr . ipv4_addr; size 3; flags dynamic,timeout; timeout 60s; }
}
add element inet t tiny { 10.0.0.1 . 198.19.100.11, 10.0.0.2 . 198.19.100.11 }
""")  # fmt: skip
        conf = new_conf()
        conf.set_override("sets", ["inet:t:tiny:1"], group="state_nft_sets")
        kind = NftSetsKind(conf)
        ctx = KindContext(ns, (VM,), "mig-room")
        entry = {"family": "inet", "table": "t", "set": "tiny", "timeout": 60, "expires": 50}
        two = [{**entry, "key": [f"10.0.1.{i}", "198.19.100.10"]} for i in (1, 2)]
        listings: list[Any] = []
        list_set = _nft.list_set

        def listing(*args: Any) -> Any:
            listings.append(args)
            return list_set(*args)

        monkeypatch.setattr(_nft, "list_set", listing)
        result = kind.import_(ctx, two)
        assert not result.ok and result.reason is Reason.RESOURCE_LIMIT, result
        assert "holds 2 of 3" in result.detail
        result = kind.import_(ctx, two[:1])
        assert result.ok, result
        assert listings == []  # point lookups and the kernel's count, no listing
        assert (ctx.migration_id, ns) in kind._readers  # kept for the migration's delta
        _, listed = _nft.list_set(ns, "inet", "t", "tiny")
        assert len(listed) == 3
        kind.revert_import(ctx, result.record)
        assert len(_nft.list_set(ns, "inet", "t", "tiny")[1]) == 2
        kind.forget(ctx.migration_id)
        assert not kind._readers
    finally:
        remove_namespaces(prefix)
