"""The pieces of issue 12 that need no kernel: the one-struct ctnetlink
codec against the general one, the dump parser's address filter, the delta
entries' checks (a delete naming another VM's session poisons the whole
bundle), the nftables fingerprints and the collector pause."""

from __future__ import annotations

import gc
import socket
import threading
from typing import Any

import pytest
from oslo_config import cfg

from vmm_orchestrator import options
from vmm_orchestrator.model import Migration, Vif, Workload
from vmm_orchestrator.statekind import PoisonedEntry, Reason
from vmm_state.bundle import BundleHeader, SectionSource, read_bundle, write_bundle
from vmm_state.importer import Importer, Ledger, kind_context
from vmm_state.kinds import _common
from vmm_state.kinds import _ctnetlink as ctnl
from vmm_state.kinds._common import freeze_heap, no_gc, thaw_heap
from vmm_state.kinds.conntrack import PARSED, ConntrackKind, deletion, to_entry
from vmm_state.kinds.nftsets import NftSetsKind

VM4, VM6 = "198.19.100.10", "fd00:100::10"
VIF = Vif("52:54:00:00:64:0a", 100, (VM4,), (VM6,), "tap-vm1")
MIGRATION = Migration("mig-1", Workload("vm1", (VIF,)), "src", "dst")


@pytest.fixture
def conf() -> cfg.ConfigOpts:
    return options.new_conf()


def conn(family: int, proto: int, src: str, dst: str, **extra: Any) -> ctnl.Conn:
    orig = ctnl.Tuple(family, proto, src, dst, 40000, 443)
    made = ctnl.Conn(orig, orig.inverse(), timeout=300, status=ctnl.IPS_SEEN_REPLY)
    if proto == ctnl.IPPROTO_TCP:
        made.tcp_state, made.tcp_wscale_orig, made.tcp_wscale_reply = 3, 7, 6
        made.tcp_flags_orig, made.tcp_flags_reply = ctnl.TCP_FLAG_BE_LIBERAL, 2
    for name, value in extra.items():
        setattr(made, name, value)
    return made


def parse(message: bytes, raw: set[bytes] | None = None) -> ctnl.Conn | None:
    return ctnl.parse_conn(message, 16, len(message), raw)


CASES = [
    conn(socket.AF_INET, ctnl.IPPROTO_TCP, "10.0.0.1", VM4),
    conn(socket.AF_INET, ctnl.IPPROTO_UDP, VM4, "10.0.0.1", mark=42, zone=3),
    conn(socket.AF_INET6, ctnl.IPPROTO_TCP, "fd00::1", VM6, mark=7),
    conn(socket.AF_INET6, ctnl.IPPROTO_UDPLITE, VM6, "fd00::1"),
]


@pytest.mark.parametrize("made", CASES, ids=lambda c: f"{c.orig.family}-{c.orig.proto}")
def test_one_struct_messages_decode_to_what_the_general_encoder_says(made: ctnl.Conn) -> None:
    fast = ctnl._fast_new(made, ctnl.NLM_F_REQUEST | ctnl.NLM_F_CREATE)
    assert fast is not None
    general = ctnl._message(
        ctnl.IPCTNL_MSG_CT_NEW,
        ctnl.NLM_F_REQUEST | ctnl.NLM_F_CREATE,
        0,
        made.orig.family,
        ctnl.encode_conn(made, True),
    )
    assert len(fast) == len(general)
    a, b = parse(fast), parse(general)
    assert a is not None and a == b
    assert (a.orig, a.reply, a.mark, a.zone, a.timeout) == (
        made.orig,
        made.reply,
        made.mark,
        made.zone,
        made.timeout,
    )
    assert a.tcp_state == made.tcp_state and a.tcp_flags_orig == made.tcp_flags_orig


def test_the_general_encoder_takes_what_the_fast_one_leaves() -> None:
    orig = ctnl.Tuple(socket.AF_INET, ctnl.IPPROTO_ICMP, VM4, "10.0.0.1", icmp_id=9, icmp_type=8)
    reply = ctnl.Tuple(socket.AF_INET, ctnl.IPPROTO_ICMP, "10.0.0.1", VM4, icmp_id=9)
    echo = ctnl.Conn(orig, reply, timeout=30)
    assert ctnl._fast_new(echo, ctnl.NLM_F_REQUEST) is None
    labelled = conn(socket.AF_INET, ctnl.IPPROTO_TCP, VM4, "10.0.0.1", labels=b"\x01" * 16)
    assert ctnl._fast_new(labelled, ctnl.NLM_F_REQUEST) is None
    message = ctnl.Ctnetlink._request("create", echo, 0)
    back = parse(message)
    assert back is not None and back.orig == orig and back.reply.icmp_id == 9


def test_the_dump_parser_filters_on_raw_addresses_before_decoding() -> None:
    message = ctnl.Ctnetlink._request("create", CASES[0], 0)
    assert parse(message, {socket.inet_pton(socket.AF_INET, "10.9.9.9")}) is None
    assert parse(message, {socket.inet_pton(socket.AF_INET, VM4)}) is not None
    # the reply tuple alone names the VM: still the VM's
    assert parse(message, {socket.inet_pton(socket.AF_INET, "10.0.0.1")}) is not None


def test_delta_entries_are_checked_like_any_other(conf: cfg.ConfigOpts) -> None:
    kind = ConntrackKind(conf)
    ctx = kind_context(None, MIGRATION)
    mine = deletion(CASES[0])
    kind.check(ctx, mine)
    assert isinstance(mine[PARSED], ctnl.Conn)  # parsed once, for import_
    other = deletion(conn(socket.AF_INET, 6, "10.0.0.1", "198.19.100.11"))
    with pytest.raises(PoisonedEntry):
        kind.check(ctx, other)
    kind.check(ctx, {"op": "resync", "age": 0.5})
    with pytest.raises(ValueError):
        kind.check(ctx, {"op": "resync", "orig": {}})
    with pytest.raises(ValueError):
        kind.check(ctx, {"op": "explode", **to_entry(CASES[0])})


def test_a_delta_that_deletes_another_vms_session_is_refused_whole(conf: cfg.ConfigOpts) -> None:
    """Poison refused whole, also when it hides in a delete."""
    key = b"k" * 32
    entries = [
        to_entry(CASES[0]),
        deletion(conn(socket.AF_INET, 6, "10.0.0.1", "198.19.100.11")),
    ]
    header = BundleHeader("mig-1", "vm1", "src", "delta", since=1.0, exported_at=2.0)
    pieces = write_bundle(header, "k", key, [SectionSource("conntrack", entries)])
    bundle = read_bundle(pieces, {"k": key}, 1 << 20, lambda _k: 1000)
    installed: list[Any] = []

    class Spy(ConntrackKind):
        def unavailable(self, ctx: Any) -> None:
            return None

        def import_(self, ctx: Any, entries: list[dict[str, Any]]) -> Any:
            installed.append(entries)
            raise AssertionError("nothing of a poisoned bundle is installed")

    importer = Importer("dst", None, {"conntrack": Spy(conf)}, Ledger())
    report = importer.import_bundle(MIGRATION, bundle, "delta")
    assert not report.ok and report.reason is Reason.POLICY_CONFLICT
    assert "poisoned" in (report.error or "") and installed == []


def test_nft_fingerprints_see_refreshes_not_the_clock(conf: cfg.ConfigOpts) -> None:
    kind = NftSetsKind(conf)
    elem = {"timeout": 600, "expires": 590, "limit": None}
    first = kind._print(elem, 1000.0)
    later = kind._print({**elem, "expires": 580}, 1010.4)  # ten seconds on, not refreshed
    refreshed = kind._print({**elem, "expires": 599}, 1010.4)
    longer = kind._print({**elem, "timeout": 900}, 1000.0)
    assert kind._same(first, later)
    assert not kind._same(first, refreshed)
    assert not kind._same(first, longer)


def test_the_collector_pause_nests_and_restores() -> None:
    assert gc.isenabled()
    with no_gc():
        with no_gc():
            assert not gc.isenabled()
        assert not gc.isenabled()
    assert gc.isenabled()
    before = gc.get_freeze_count()
    keep = [[i] for i in range(1000)]
    freeze_heap("m-a")
    freeze_heap("m-b")
    assert gc.get_freeze_count() >= before + len(keep)
    thaw_heap("m-a")
    assert gc.get_freeze_count() > 0  # m-b still running
    thaw_heap("m-b")
    if not _common._frozen_for:  # nobody else in this process holds it
        assert gc.get_freeze_count() == 0
    thaw_heap("m-b")  # idempotent


def test_entry_parsing_checks_the_reply_also_when_it_mirrors_the_original() -> None:
    from vmm_state.kinds.conntrack import from_entry

    plain = to_entry(CASES[0])
    parsed_plain = from_entry(plain)
    assert parsed_plain.reply == CASES[0].reply and not parsed_plain.nat
    natted = to_entry(CASES[0])
    natted["reply"] = {**natted["reply"], "src": "10.0.0.99"}
    assert from_entry(natted).nat
    for bad in ("443", -1, 70000, True):
        broken = to_entry(CASES[0])
        broken["reply"] = {**broken["reply"], "sport": bad}
        with pytest.raises(ValueError):
            from_entry(broken)


def test_status_and_tcp_fields_are_still_checked_on_the_quick_path() -> None:
    from vmm_state.kinds.conntrack import from_entry

    entry = to_entry(CASES[0])
    entry["status"] = ["ASSURED", "SEEN_REPLY"]
    assert from_entry(entry).status == ctnl.IPS_ASSURED | ctnl.IPS_SEEN_REPLY
    for status in (["CONFIRMED"], "ASSURED", ["ASSURED", 3], [["ASSURED"]]):
        with pytest.raises(ValueError):
            from_entry({**entry, "status": status})
    for field, value in (("wscale_orig", 15), ("flags_reply", 256), ("flags_orig", "8")):
        with pytest.raises(ValueError):
            from_entry({**entry, "tcp": {**entry["tcp"], field: value}})


def test_the_ledger_writes_one_file_per_import_and_keeps_the_order(tmp_path: Any) -> None:
    """The delta's ledger entry is written inside the pause: it must not rewrite
    the pre-copy's. Order (newest first on revert) survives a restart and a put-back."""
    from vmm_state.importer import LedgerEntry

    ledger = Ledger(str(tmp_path))
    big = LedgerEntry("precopy", "conntrack", {"created": [[2, 6, "a", "b", 1, 2, 0, 0]] * 1000})
    ledger.add("m", big)
    precopy_file = next(tmp_path.iterdir())
    stamp = precopy_file.stat().st_mtime_ns
    ledger.add("m", LedgerEntry("delta", "conntrack", {"created": []}))
    assert len(list(tmp_path.iterdir())) == 2
    assert precopy_file.stat().st_mtime_ns == stamp  # untouched by the delta's write
    again = Ledger(str(tmp_path))
    assert [e.label for e in again.entries("m")] == ["precopy", "delta"]
    taken = again.take("m")
    assert [e.label for e in taken] == ["delta", "precopy"] and not list(tmp_path.iterdir())
    again.add("m", LedgerEntry("later", "conntrack", {}))
    again.put_back("m", taken)
    reloaded = Ledger(str(tmp_path))
    assert [e.label for e in reloaded.entries("m")] == ["precopy", "delta", "later"]


def test_a_ledger_file_of_the_former_form_is_read_and_converted(tmp_path: Any) -> None:
    import json

    old = {
        "migration": "m",
        "entries": [
            {"label": "precopy", "kind": "conntrack", "record": {"created": []}},
            {"label": "delta", "kind": "conntrack", "record": {"created": []}},
        ],
    }
    (tmp_path / ("0" * 32 + ".json")).write_text(json.dumps(old))
    ledger = Ledger(str(tmp_path))
    assert [e.label for e in ledger.entries("m")] == ["precopy", "delta"]
    assert len(list(tmp_path.iterdir())) == 2 and not (tmp_path / ("0" * 32 + ".json")).exists()


# ------------------------------------------------- pre-encoded export lines


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6])
@pytest.mark.parametrize("mark", [0, 7, 0xFFFFFFFF])
@pytest.mark.parametrize("status", [0, ctnl.IPS_SEEN_REPLY | ctnl.IPS_ASSURED, 0xFFFF])
@pytest.mark.parametrize("state", [0, 3, len(ctnl.TCP_STATES) - 1, len(ctnl.TCP_STATES) + 2])
def test_an_encoded_export_line_is_what_the_writer_makes_of_the_entry(
    family: int, mark: int, status: int, state: int
) -> None:
    """The conntrack kind's pre-encoded line (one format call) is byte for
    byte the bundle writer's encoding of the same entry as a dict, and reads
    back as that dict."""
    from vmm_state.bundle import Line
    from vmm_state.kinds.conntrack import fast_entry, fast_line

    peer, vm = ("198.18.0.1", VM4) if family == socket.AF_INET else ("2001:db8::1", VM6)
    raw = socket.inet_pton(family, peer)
    f = (family, raw, raw, 40000, 443, 6, raw, raw, 443, 40000, 3599, status, mark, 1, state)
    f += (7, 0, 0x23, 0xFF)
    entry = fast_entry(f, peer, vm, vm, peer)
    line = fast_line(f, peer, vm, vm, peer)
    assert line.__class__ is Line
    header = BundleHeader("mig-1", "vm1", "src", "precopy")
    as_dict = b"".join(write_bundle(header, "k", b"k" * 32, [SectionSource("conntrack", [entry])]))
    as_line = b"".join(write_bundle(header, "k", b"k" * 32, [SectionSource("conntrack", [line])]))
    assert as_line == as_dict  # same bytes, same signature
    got = read_bundle([as_line], {"k": b"k" * 32}, 1 << 20, lambda _k: 10)
    assert list(got.sections["conntrack"].entries()) == [entry]


def test_an_encoded_line_that_is_not_one_json_line_breaks_off_its_section() -> None:
    from vmm_state.bundle import Line

    header = BundleHeader("mig-1", "vm1", "src", "precopy")
    bad = [Line(b'{"a":1}\n{"b":2}\n')]
    data = b"".join(write_bundle(header, "k", b"k" * 32, [SectionSource("conntrack", bad)]))
    got = read_bundle([data], {"k": b"k" * 32}, 1 << 20, lambda _k: 10)
    section = got.sections["conntrack"]
    assert section.count == 0 and "is not one JSON line" in (section.error or "")


def test_canonical_addresses_are_remembered_per_family_and_only_when_valid() -> None:
    for _ in range(2):  # the second round answers from the cache
        assert ctnl.canonical_ip(socket.AF_INET6, "FD00:0100::0010") == "fd00:100::10"
        assert ctnl.canonical_ip(socket.AF_INET, "198.19.100.10") == "198.19.100.10"
        with pytest.raises(ValueError, match="not an IPv4 address"):
            ctnl.canonical_ip(socket.AF_INET, "FD00:0100::0010")  # known, but as IPv6
        with pytest.raises(ValueError, match="not an IPv6 address"):
            ctnl.canonical_ip(socket.AF_INET6, "198.19.100.10")
        with pytest.raises(ValueError, match="not an IPv4 address"):
            ctnl.canonical_ip(socket.AF_INET, "198.19.100.300")
        with pytest.raises(ValueError, match="not an IP address"):
            ctnl.canonical_ip(socket.AF_INET, 42)
    assert "198.19.100.300" not in ctnl._CANONICAL[socket.AF_INET]


class _Batches(ctnl.Ctnetlink):
    """A Ctnetlink without a socket: records the batches it is asked to send."""

    BATCH = 3

    def __init__(self, fail_at: int | None = None) -> None:  # no socket
        self.sent: list[list[bytes]] = []
        self.fail_at = fail_at

    @staticmethod
    def _request(op: str, conn: Any, seq: int) -> bytes:
        return f"{op}:{conn}".encode()

    def send_batched(self, wire: list[bytes]) -> list[int]:
        if len(self.sent) == self.fail_at:
            raise OSError(105, "No buffer space available")
        self.sent.append(list(wire))
        return [int(w.split(b":")[1]) % 7 for w in wire]


def test_many_requests_are_encoded_while_the_previous_batch_is_sent_in_order() -> None:
    nl = _Batches()
    requests = [("create", i) for i in range(20)]
    assert nl.apply(requests) == [i % 7 for i in range(20)]  # one code per request, in order
    assert [len(b) for b in nl.sent] == [3, 3, 3, 3, 3, 3, 2]
    assert [w for b in nl.sent for w in b] == [f"create:{i}".encode() for i in range(20)]
    assert nl.apply(requests[:6]) == [i % 7 for i in range(6)]  # few: in line, one batch each


def test_a_send_that_fails_midway_stops_the_batches_and_raises_in_the_caller() -> None:
    nl = _Batches(fail_at=2)
    with pytest.raises(OSError, match="No buffer space"):
        nl.apply([("create", i) for i in range(30)])
    assert len(nl.sent) == 2  # nothing sent after the failure
    assert not [t for t in threading.enumerate() if t.name == "ctnetlink-send"]
