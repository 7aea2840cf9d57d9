"""The state bundle: signed, versioned, limited, streamed.

Every refusal must happen before a single entry is handed out, and each
must say precisely what is wrong (unsigned, bad signature, unknown version,
oversized, too many entries, malformed).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import struct
import tracemalloc
from collections.abc import Iterator
from typing import Any

import pytest

from vmm_orchestrator.statekind import Reason
from vmm_state import bundle as b

KEY = b"0123456789abcdef0123456789abcdef"
KEYS = {"k1": KEY}
HEADER = b.BundleHeader("mig-1", "vm1", "h1", "precopy", None, 1000.0)
UNLIMITED = 1 << 40


def entries(n: int, start: int = 0) -> list[dict[str, Any]]:
    return [{"mac": "52:54:00:00:00:01", "ip": "10.0.0.1", "n": i} for i in range(start, start + n)]


def encode(*sections: b.SectionSource, chunk_entries: int = 3, header: Any = HEADER) -> bytes:
    return b"".join(b.write_bundle(header, "k1", KEY, sections, chunk_entries))


def read(
    data: bytes,
    keys: dict[str, bytes] | None = None,
    max_bytes: int = UNLIMITED,
    limit: int = 1 << 30,
    piece: int = 7,
) -> b.VerifiedBundle:
    pieces = [data[i : i + piece] for i in range(0, len(data), piece)]
    return b.read_bundle(pieces, keys or KEYS, max_bytes, lambda _kind: limit)


def frames(data: bytes) -> list[tuple[bytes, bytes]]:
    """(type, payload) of each frame after the preamble."""
    out, pos = [], 10
    while pos < len(data):
        ftype, length = struct.unpack_from(">cI", data, pos)
        out.append((ftype, data[pos + 5 : pos + 5 + length]))
        pos += 5 + length
    return out


def assemble(parts: list[tuple[bytes, bytes]], key: bytes = KEY, sign: bool = True) -> bytes:
    """A bundle from frames, signed over exactly those bytes (to test framing checks)."""
    body = struct.pack(">8sH", b"VMMSTATE", 1) + b"".join(
        struct.pack(">cI", t, len(p)) + p for t, p in parts
    )
    if not sign:
        return body
    mac = hmac.new(key, body, hashlib.sha256).digest()
    return body + struct.pack(">cI", b"M", len(mac)) + mac


def resigned(data: bytes, edit: Any) -> bytes:
    """Re-frame ``data`` after ``edit(frames without the MAC)`` and sign it again."""
    parts = [f for f in frames(data) if f[0] != b"M"]
    return assemble(edit(parts))


# ------------------------------------------------------------- round trip


def test_round_trip_keeps_every_entry_section_and_header_field() -> None:
    data = encode(
        b.SectionSource("conntrack", entries(10)),
        b.SectionSource("mdb", entries(2, 100)),
        b.SectionSource("macsec", unavailable="no macsec module"),
    )
    got = read(data)
    assert got.header == HEADER
    assert got.key_id == "k1"
    assert got.size == len(data)
    assert list(got.sections) == ["conntrack", "mdb", "macsec"]
    assert list(got.sections["conntrack"].entries()) == entries(10)
    assert len(got.sections["conntrack"].chunks) == 4  # 3 + 3 + 3 + 1 with chunk_entries=3
    assert list(got.sections["mdb"].entries()) == entries(2, 100)
    assert got.sections["macsec"].unavailable == "no macsec module"
    assert got.entries == 12


@pytest.mark.parametrize("piece", [1, 5, 64, 1 << 20])
def test_any_split_of_the_stream_reads_the_same(piece: int) -> None:
    data = encode(b.SectionSource("conntrack", entries(7)))
    assert list(read(data, piece=piece).sections["conntrack"].entries()) == entries(7)


def test_an_export_that_breaks_off_closes_its_section_with_an_error_only() -> None:
    def broken() -> Iterator[dict[str, Any]]:
        yield from entries(4)
        raise OSError("conntrack: netlink dump interrupted")

    got = read(encode(b.SectionSource("conntrack", broken()), b.SectionSource("mdb", entries(1))))
    section = got.sections["conntrack"]
    assert section.error is not None and "netlink dump interrupted" in section.error
    assert list(section.entries()) == []  # partial entries are never handed out
    assert list(got.sections["mdb"].entries()) == entries(1)


def test_an_entry_that_is_not_a_dict_is_an_export_error() -> None:
    mixed: list[Any] = [{"a": 1}, ["not", "a", "dict"]]
    got = read(encode(b.SectionSource("conntrack", iter(mixed))))
    assert "not a dict" in (got.sections["conntrack"].error or "")


# ---------------------------------------------------------- signatures


def test_a_single_tampered_byte_anywhere_is_refused() -> None:
    data = encode(b.SectionSource("conntrack", entries(5)))
    position = data.index(b'"n":3') + 4  # the digit 3 of one entry
    for where in (position, 20, len(data) - 1):
        flipped = bytearray(data)
        flipped[where] ^= 0x01
        with pytest.raises(b.BundleError) as caught:
            read(bytes(flipped))
        assert isinstance(caught.value, b.BadSignature | b.MalformedBundle)
    with pytest.raises(b.BadSignature, match="does not verify"):
        read(data.replace(b'"n":3', b'"n":4'))


def test_the_signature_covers_the_key_id_and_the_header() -> None:
    data = encode(b.SectionSource("conntrack", entries(1)))
    other = data.replace(b'"migration":"mig-1"', b'"migration":"mig-2"')
    with pytest.raises(b.BadSignature):
        read(other)


def test_a_bundle_without_signature_is_refused_as_unsigned() -> None:
    data = encode(b.SectionSource("conntrack", entries(2)))
    stripped = data[: -(5 + b.MAC_SIZE)]
    with pytest.raises(b.UnsignedBundle, match="ends without a signature"):
        read(stripped)
    assert b.UnsignedBundle.reason is Reason.POLICY_CONFLICT


def test_a_header_declaring_no_algorithm_is_refused_before_anything_else() -> None:
    head = json.dumps({**HEADER.to_dict("k1"), "alg": "none"}).encode()
    reader = b.BundleReader(KEYS, UNLIMITED, lambda _k: 10)
    with pytest.raises(b.UnsignedBundle, match="unsigned"):
        reader.feed(assemble([(b"H", head)], sign=False))
    with pytest.raises(b.UnsignedBundle):  # the reader stays dead
        reader.feed(b"more")


def test_another_algorithm_is_refused() -> None:
    head = json.dumps({**HEADER.to_dict("k1"), "alg": "hmac-md5"}).encode()
    with pytest.raises(b.UnsignedBundle, match="only hmac-sha256"):
        read(assemble([(b"H", head)]))


def test_an_unknown_key_id_is_refused_with_what_to_do() -> None:
    data = encode(b.SectionSource("conntrack", entries(1)))
    with pytest.raises(b.UnknownKey, match="verify_keys"):
        read(data, keys={"k2": KEY})


def test_the_right_key_id_with_the_wrong_key_is_a_bad_signature() -> None:
    data = encode(b.SectionSource("conntrack", entries(1)))
    with pytest.raises(b.BadSignature, match="key differ"):
        read(data, keys={"k1": b"another key of 32 bytes.........."})


def test_rotation_accepts_an_older_key_listed_for_verification() -> None:
    data = encode(b.SectionSource("conntrack", entries(1)))
    assert read(data, keys={"k2": b"new key", "k1": KEY}).entries == 1


# ------------------------------------------------------------- versions


def test_an_unknown_version_is_refused_as_such() -> None:
    data = encode(b.SectionSource("conntrack", entries(1)))
    newer = b"VMMSTATE" + struct.pack(">H", 2) + data[10:]
    with pytest.raises(b.UnknownVersion, match="version 2 is not supported"):
        read(newer)
    assert b.UnknownVersion.reason is Reason.UNSUPPORTED


def test_something_that_is_not_a_bundle_is_malformed() -> None:
    with pytest.raises(b.MalformedBundle, match="not a state bundle"):
        read(b'{"error": "this is JSON"}')


# --------------------------------------------------------------- limits


def test_an_oversized_bundle_is_refused_while_reading() -> None:
    data = encode(b.SectionSource("conntrack", entries(200)))
    reader = b.BundleReader(KEYS, 1000, lambda _k: 10**6)
    fed = 0
    with pytest.raises(b.OversizedBundle, match=r"larger than 1000 bytes \(\[state\]"):
        for i in range(0, len(data), 100):
            reader.feed(data[i : i + 100])
            fed += 100
    assert fed <= 1000  # refused at the limit, not after reading everything
    assert b.OversizedBundle.reason is Reason.RESOURCE_LIMIT


def test_a_frame_declaring_a_huge_length_is_refused_from_its_header() -> None:
    head = json.dumps(HEADER.to_dict("k1")).encode()
    start = assemble([(b"H", head)], sign=False)
    reader = b.BundleReader(KEYS, 10_000, lambda _k: 10)
    reader.feed(start)
    with pytest.raises(b.OversizedBundle, match="chunk of 4294967295 bytes"):
        reader.feed(struct.pack(">cI", b"C", 0xFFFFFFFF))


def test_a_kind_over_its_entry_limit_is_refused_alone_and_dropped_while_reading() -> None:
    data = encode(
        b.SectionSource("conntrack", entries(50)),
        b.SectionSource("mdb", entries(2)),
        chunk_entries=5,
    )
    limits = {"conntrack": 10, "mdb": 10}
    got = b.read_bundle([data], KEYS, UNLIMITED, limits.__getitem__)
    refused = got.sections["conntrack"]
    assert isinstance(refused.refusal, b.TooManyEntries)
    assert "more than 10 entries" in str(refused.refusal)
    assert refused.refusal.reason is Reason.RESOURCE_LIMIT
    assert refused.chunks == []  # nothing of it kept in memory
    assert refused.count == 50
    assert list(got.sections["mdb"].entries()) == entries(2)


# ------------------------------------------------------------ malformed


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda p: p[:2] + p[1:2] + p[2:], "is not closed"),  # a section opened twice
        (lambda p: [p[0], p[1], (b"C", p[2][1][:-1]), *p[3:]], "does not end with a newline"),
        (lambda p: [p[0], (b"C", p[2][1]), *p[1:]], "chunk outside a section"),
        (lambda p: [*p[:-2], (b"E", b'{"kind":"conntrack","count":99}'), p[-1]], "declares 99"),
        (lambda p: [*p[:-1], (b"Z", b'{"sections":2,"entries":3}')], "finish frame declares"),
        (lambda p: [*p[:2], (b"X", b"?"), *p[2:]], "unknown frame type"),
        (lambda p: [p[0], (b"S", b"[1]"), *p[2:]], "not a JSON object"),
        (lambda p: [p[0], (b"S", b'{"kind":"Bad Kind"}'), *p[2:]], "invalid kind"),
        (lambda p: [*p, (b"S", b'{"kind":"x"}')], "follows the finish frame"),
        (lambda p: [p[0], *p[1:4], *p[1:4], p[-1]], "is not closed|two sections"),
    ],
)
def test_structural_errors_are_malformed_even_when_signed(edit: Any, message: str) -> None:
    data = encode(b.SectionSource("conntrack", entries(3)), chunk_entries=3)
    with pytest.raises(b.MalformedBundle, match=message):
        read(resigned(data, edit))


def test_bytes_after_the_signature_are_refused() -> None:
    data = encode(b.SectionSource("conntrack", entries(1)))
    with pytest.raises(b.MalformedBundle, match="follow the signature"):
        read(data + b"\x00")


@pytest.mark.parametrize("cut", [3, 30, -40])
def test_a_truncated_bundle_is_malformed_and_says_where(cut: int) -> None:
    data = encode(b.SectionSource("conntrack", entries(3)))
    with pytest.raises(b.MalformedBundle, match="truncated"):
        read(data[:cut])
    assert b.MalformedBundle.reason is Reason.TRANSFER_FAILED


def test_a_signed_line_that_is_not_an_object_is_malformed_when_released() -> None:
    def edit(parts: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        return [parts[0], parts[1], (b"C", b'{"a":1}\n[2]\n'), *parts[3:]]

    data = encode(b.SectionSource("conntrack", entries(2)), chunk_entries=2)
    got = read(resigned(data, edit))
    with pytest.raises(b.MalformedBundle, match="one JSON object per line"):
        list(got.sections["conntrack"].entries())


def early_reader(
    refuse: int | None = None, keys: dict[str, bytes] | None = None
) -> tuple[b.BundleReader, list[int]]:
    """A reader that parses and checks each chunk as it arrives; the check
    refuses entry ``n == refuse`` and records every ``n`` it saw."""
    seen: list[int] = []

    def check(entry: dict[str, Any]) -> None:
        seen.append(entry["n"])
        if entry["n"] == refuse:
            raise ValueError("refused")

    def for_kind(kind: str) -> Any:
        return check if kind == "conntrack" else None

    reader = b.BundleReader(keys or KEYS, UNLIMITED, lambda _k: 1 << 30, check_early=for_kind)
    return reader, seen


def test_chunks_checked_early_are_marked_and_read_as_lazily() -> None:
    data = encode(
        b.SectionSource("conntrack", entries(7)),
        b.SectionSource("mdb", entries(2)),
        chunk_entries=3,
    )
    reader, seen = early_reader(refuse=4)
    for i in range(0, len(data), 5):
        reader.feed(data[i : i + 5])
    # checked before the signature was read; a chunk's check stops at its refused entry
    assert seen == [0, 1, 2, 3, 4, 6]
    got = reader.finish()
    batches = list(got.sections["conntrack"].batches())
    # chunk 1 (n 3..5) holds the refused entry: left for the importer to check again
    assert [(len(batch), checked) for batch, checked in batches] == [
        (3, True),
        (3, False),
        (1, True),
    ]
    assert [e["n"] for batch, _ in batches for e in batch] == list(range(7))
    assert [checked for _, checked in got.sections["mdb"].batches()] == [False]  # no check
    # handed out once; a second read parses the verified bytes again, fresh objects
    assert list(got.sections["conntrack"].entries()) == entries(7)
    assert list(read(data).sections["mdb"].entries()) == list(got.sections["mdb"].entries())


def test_a_tampered_bundle_is_refused_although_its_chunks_were_checked_early() -> None:
    data = bytearray(encode(b.SectionSource("conntrack", entries(4))))
    data[data.index(b'"n":1') + 4] = ord("7")
    reader, seen = early_reader()
    reader.feed(bytes(data))
    assert 7 in seen  # parsed and checked before the signature ...
    with pytest.raises(b.BadSignature):
        reader.finish()  # ... but nothing is handed out


def test_a_malformed_chunk_parsed_early_raises_only_when_released() -> None:
    def edit(parts: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        return [parts[0], parts[1], (b"C", b'{"a":1}\n[2]\n'), *parts[3:]]

    data = resigned(encode(b.SectionSource("conntrack", entries(2)), chunk_entries=2), edit)
    reader, seen = early_reader()
    reader.feed(data)
    got = reader.finish()
    assert seen == []
    with pytest.raises(b.MalformedBundle, match="one JSON object per line"):
        list(got.sections["conntrack"].entries())


def test_the_writer_refuses_names_that_are_not_kinds() -> None:
    with pytest.raises(ValueError, match="not valid in a bundle"):
        encode(b.SectionSource("../etc", entries(1)))


# --------------------------------------------------------------- memory


def test_100k_entries_stream_through_writer_and_reader_in_bounded_memory() -> None:
    """Exporter to importer without ever holding parsed entries: the writer holds one
    chunk, the reader the raw bytes (until verified), entries are parsed chunk by chunk."""

    def produce(n: int) -> Iterator[dict[str, Any]]:
        for i in range(n):
            yield {"mac": "52:54:00:00:00:01", "ip": "10.0.0.1", "sport": i, "state": "ESTAB"}

    n = 100_000
    tracemalloc.start()
    try:
        reader = b.BundleReader(KEYS, UNLIMITED, lambda _k: 10**6)
        for piece in b.write_bundle(HEADER, "k1", KEY, [b.SectionSource("conntrack", produce(n))]):
            reader.feed(piece)
        got = reader.finish()
        count = sum(1 for _ in got.sections["conntrack"].entries())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == n
    # 100k parsed dicts take about 45 MB here; the raw bundle is about 7.4 MB.
    assert peak < 1.5 * got.size + 2 * 1024 * 1024, (
        f"peak {peak} bytes for a {got.size}-byte bundle of {n} entries"
    )
