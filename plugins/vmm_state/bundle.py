"""The state bundle: a signed, versioned, streamable container of one VM's
state, one section per kind.

Wire format (all integers big-endian)::

    preamble   b"VMMSTATE" + u16 version
    frames     type (1 byte) + u32 length + payload
      H  header   JSON: alg, key_id, migration, workload, source, label,
                  seq, since, exported_at
      S  section  JSON: kind, and "unavailable" when the source cannot
                  export that kind
      C  chunk    entries of the open section, one compact JSON object per
                  line, each line ended by "\\n" (so a reader counts entries
                  without parsing them)
      E  end      JSON: kind, count, and "error" when the export broke off
      Z  finish   JSON: sections, entries (totals, cross-checked)
      M  mac      32 bytes: HMAC-SHA256 with key ``key_id`` over every byte
                  before this frame

The MAC covers the exact bytes, header included, so the key id, the
migration the bundle belongs to and every entry are authenticated. Nothing
comes after M.

``seq`` makes each bundle of a migration unique and ordered: the source
numbers every export it writes with a number above any it wrote before
(from its clock, so a restarted source goes on counting upwards), and the
destination installs a bundle of a migration only if its seq is above every
seq it took for that migration, and never once the migration is closed
there (committed, aborted): a captured bundle applies once (issue 13).

The writer is a generator: entries are pulled from each kind's export
iterator and written chunk by chunk, so an exporting host holds one chunk
of a large table at a time. The reader is incremental: ``feed`` bytes as
they arrive; it enforces the byte limit and the per-kind entry limits while
reading, keeps the raw chunks and hands out entries only after ``finish``
has verified the MAC. Entries are parsed lazily, chunk by chunk, from the
verified bytes; or, with ``parse_early`` (the state service's readers), as
each chunk arrives, so the parse overlaps the transfer (still nothing is
handed out before the MAC verifies).
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import re
import struct
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, ClassVar

from vmm_orchestrator.statekind import Reason

MAGIC = b"VMMSTATE"
VERSION = 1
ALG = "hmac-sha256"
MAC_SIZE = hashlib.sha256().digest_size

_PREAMBLE = struct.Struct(">8sH")
_FRAME = struct.Struct(">cI")

HEADER, SECTION, CHUNK, END, FINISH, MAC = (b"H", b"S", b"C", b"E", b"Z", b"M")
_FRAME_NAMES = {
    HEADER: "header",
    SECTION: "section",
    CHUNK: "chunk",
    END: "section end",
    FINISH: "finish",
    MAC: "signature",
}

#: Kind names as entry points spell them; anything else in a bundle is malformed.
KIND_RE = re.compile(r"^[a-z][a-z0-9_]{0,63}$")

#: A chunk is flushed at this many bytes even before ``chunk_entries`` entries.
CHUNK_BYTES = 256 * 1024


# ------------------------------------------------------------------ errors


class BundleError(Exception):
    """A bundle that must not be imported. ``reason`` is the answer it earns.

    ``code`` names the failure on the wire (the import answer's ``error``).
    Nothing of a bundle that raised a BundleError is ever installed.
    """

    code: ClassVar[str] = "bundle_error"
    reason: ClassVar[Reason] = Reason.TRANSFER_FAILED


class UnsignedBundle(BundleError):
    """The bundle carries no signature (or one of an algorithm we do not accept)."""

    code = "unsigned"
    reason = Reason.POLICY_CONFLICT


class BadSignature(BundleError):
    """The signature does not verify: the bundle was altered or signed with another key."""

    code = "bad_signature"
    reason = Reason.POLICY_CONFLICT


class UnknownKey(BadSignature):
    """The bundle names a key id this host has no key for."""

    code = "unknown_key"


class UnknownVersion(BundleError):
    """The bundle is of a format version this host cannot read."""

    code = "unknown_version"
    reason = Reason.UNSUPPORTED


class OversizedBundle(BundleError):
    """The bundle is larger than ``[state] max_bundle_bytes``."""

    code = "oversized"
    reason = Reason.RESOURCE_LIMIT


class TooManyEntries(BundleError):
    """A kind has more entries than its limit (``[state] max_entries``...)."""

    code = "too_many_entries"
    reason = Reason.RESOURCE_LIMIT


class MalformedBundle(BundleError):
    """The bytes are not a well-formed bundle (truncated, bad framing, bad JSON)."""

    code = "malformed"
    reason = Reason.TRANSFER_FAILED


class WrongBundle(BundleError):
    """A valid bundle, but for another migration or from another host (a replay)."""

    code = "wrong_bundle"
    reason = Reason.POLICY_CONFLICT


class ReplayedBundle(WrongBundle):
    """A valid bundle of this migration that was applied (or superseded) already,
    or that arrives after the migration closed here: a replay, refused whole."""

    code = "replayed"


class PoisonedBundle(BundleError):
    """A signed bundle holding an entry of another VM (``kind.check`` refused it).

    Raised by the importer, not the reader: the whole bundle is refused,
    since a bundle that lies about one entry cannot be trusted for any.
    """

    code = "poisoned"
    reason = Reason.POLICY_CONFLICT


# ------------------------------------------------------------------ header


@dataclasses.dataclass(frozen=True)
class BundleHeader:
    """What a bundle is about; signed with the entries.

    ``label`` tells the bundles of one migration apart ("precopy",
    "delta"); the destination records and reverts imports by label.
    ``since`` is the source-clock time the delta starts from (None: full
    export); ``exported_at`` the source-clock time the export began.
    ``seq`` orders the bundles of one migration (0: a source from before
    sequence numbers; such a bundle applies once per label).
    """

    migration: str
    workload: str
    source: str
    label: str
    since: float | None = None
    exported_at: float = 0.0
    seq: int = 0

    def to_dict(self, key_id: str) -> dict[str, Any]:
        return {
            "alg": ALG,
            "key_id": key_id,
            "migration": self.migration,
            "workload": self.workload,
            "source": self.source,
            "label": self.label,
            "seq": self.seq,
            "since": self.since,
            "exported_at": self.exported_at,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BundleHeader:
        try:
            since = data.get("since")
            return cls(
                migration=_text(data["migration"], "migration"),
                workload=_text(data["workload"], "workload"),
                source=_text(data["source"], "source"),
                label=_text(data["label"], "label"),
                since=None if since is None else float(since),
                exported_at=float(data.get("exported_at", 0.0)),
                seq=_seq(data.get("seq", 0)),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise MalformedBundle(f"bundle header is invalid: {err!r}") from None


def _seq(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**63:
        raise ValueError(f"seq must be an integer >= 0, got {value!r}")
    return value


def _text(value: Any, name: str) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} must be a non-empty string")
    return value


# ------------------------------------------------------------------ writer


@dataclasses.dataclass
class SectionSource:
    """One kind for the writer: its entries, or why the source cannot export it."""

    kind: str
    entries: Iterable[dict[str, Any]] = ()
    unavailable: str | None = None


class Line(bytes):
    """An entry its kind already encoded: one compact JSON object and its
    ``\\n``, exactly what the writer would make of the dict (a kind builds it
    from fixed fields of the kernel's answer with a format string, cheaper
    than a dict and its encoding; see ``ConntrackKind.export_encoded``)."""

    __slots__ = ()


def _frame(kind: bytes, payload: bytes) -> bytes:
    return _FRAME.pack(kind, len(payload)) + payload


#: One encoder for every entry: json.dumps with options builds a new one per call.
_ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=False)


def _json(data: Any) -> bytes:
    return _ENCODER.encode(data).encode("utf-8")


def write_bundle(
    header: BundleHeader,
    key_id: str,
    key: bytes,
    sections: Iterable[SectionSource],
    chunk_entries: int = 2048,
    on_section: Callable[[str, int, float], None] | None = None,
) -> Iterator[bytes]:
    """Yield the signed bundle piece by piece (one frame or chunk at a time).

    A kind whose export iterator raises (or yields something that is not a
    JSON-able dict) gets its section closed with an ``error``: the bundle
    stays valid and the importer answers FAIL/transfer_failed for that kind
    only. ``on_section(kind, count, seconds)`` is told each section's size
    and export time (for notes and the benchmark).
    """
    if not KIND_RE.match(header.label):
        raise ValueError(f"bundle label {header.label!r} must be a short lower-case word")
    mac = hmac.new(key, digestmod=hashlib.sha256)

    def out(piece: bytes) -> bytes:
        mac.update(piece)
        return piece

    yield out(_PREAMBLE.pack(MAGIC, VERSION))
    yield out(_frame(HEADER, _json(header.to_dict(key_id))))
    n_sections = total = 0
    for source in sections:
        if not KIND_RE.match(source.kind):
            raise ValueError(f"kind name {source.kind!r} is not valid in a bundle")
        n_sections += 1
        opening: dict[str, Any] = {"kind": source.kind}
        if source.unavailable is not None:
            opening["unavailable"] = source.unavailable
        yield out(_frame(SECTION, _json(opening)))
        started = time.perf_counter()
        count, error = 0, None
        if source.unavailable is None:
            lines: list[bytes] = []
            size = 0
            try:
                for entry in source.entries:
                    if entry.__class__ is Line:
                        line = entry
                        if line.count(b"\n") != 1 or not line.endswith(b"}\n"):
                            raise ValueError(f"encoded entry {line[:80]!r} is not one JSON line")
                    elif not isinstance(entry, dict):
                        raise TypeError(f"entry is a {type(entry).__name__}, not a dict")
                    else:
                        line = _json(entry) + b"\n"
                    lines.append(line)
                    size += len(line)
                    count += 1
                    if len(lines) >= chunk_entries or size >= CHUNK_BYTES:
                        yield out(_frame(CHUNK, b"".join(lines)))
                        lines, size = [], 0
            except Exception as err:
                error = f"export of {source.kind} failed after {count} entries: {err!r}"
                count -= len(lines)
                lines = []
            if lines:
                yield out(_frame(CHUNK, b"".join(lines)))
        closing: dict[str, Any] = {"kind": source.kind, "count": count}
        if error is not None:
            closing["error"] = error
        total += count
        yield out(_frame(END, _json(closing)))
        if on_section is not None:
            on_section(source.kind, count, time.perf_counter() - started)
    yield out(_frame(FINISH, _json({"sections": n_sections, "entries": total})))
    yield _frame(MAC, mac.digest())


# ------------------------------------------------------------------ reader


@dataclasses.dataclass
class Section:
    """One kind's part of a verified bundle.

    Exactly one of these holds when the section is not importable:
    ``unavailable`` (the source cannot export the kind), ``error`` (the
    export broke off at the source), ``refusal`` (over this host's entry
    limit; its chunks were dropped while reading).
    """

    kind: str
    count: int = 0
    chunks: list[bytes] = dataclasses.field(default_factory=list)
    unavailable: str | None = None
    error: str | None = None
    refusal: BundleError | None = None
    #: Chunks parsed while the bundle was still arriving (``parse_early``), by
    #: chunk number: the entries, or the MalformedBundle their parse raised.
    early: dict[int, list[dict[str, Any]] | MalformedBundle] = dataclasses.field(
        default_factory=dict
    )
    #: Chunks (by number) whose every entry the reader's ``check_early`` accepted
    #: while the bundle arrived: the importer does not check them again.
    checked: set[int] = dataclasses.field(default_factory=set)

    def batches(self) -> Iterator[tuple[list[dict[str, Any]], bool]]:
        """The entries chunk by chunk, each with whether it was checked early."""
        for number, chunk in enumerate(self.chunks):
            done = self.early.pop(number, None)
            if isinstance(done, MalformedBundle):
                raise done
            if done is None:
                yield _parse_chunk(self.kind, number, chunk), False
            else:
                yield done, number in self.checked

    def entries(self) -> Iterator[dict[str, Any]]:
        """The entries, parsed chunk by chunk from verified bytes.

        Raises MalformedBundle for a line that is not a JSON object: the
        signer wrote something no exporter of this format writes. A chunk
        parsed early is handed out once (a second call parses it again, so
        each call yields fresh objects, as before).
        """
        for batch, _checked in self.batches():
            yield from batch

    def parse_early(
        self, number: int, check: Callable[[dict[str, Any]], None] | None = None
    ) -> None:
        """Parse chunk ``number`` now (before the signature is checked), and
        run ``check`` on its entries: both overlap the transfer, nothing of
        them is used before ``finish`` verifies the bundle, a parse failure is
        kept for ``entries`` to raise, and a chunk ``check`` refuses is left
        unmarked for the importer to check again (and answer as it does)."""
        try:
            parsed = _parse_chunk(self.kind, number, self.chunks[number])
        except MalformedBundle as err:
            self.early[number] = err
            return
        self.early[number] = parsed
        if check is None:
            return
        try:
            for entry in parsed:
                check(entry)
        except Exception:  # the importer checks this chunk again, and answers
            return
        self.checked.add(number)


def _parse_chunk(kind: str, number: int, chunk: bytes) -> list[dict[str, Any]]:
    lines = chunk.count(b"\n")
    try:
        parsed = json.loads(
            b"[" + chunk[:-1].replace(b"\n", b",") + b"]",
            parse_constant=_reject_constant,
        )
    except (UnicodeDecodeError, ValueError) as err:
        raise MalformedBundle(f"chunk {number} of kind {kind} is not JSON lines: {err}") from None
    if len(parsed) != lines or not all(isinstance(e, dict) for e in parsed):
        raise MalformedBundle(
            f"chunk {number} of kind {kind} does not hold one JSON object per line"
        )
    return parsed


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


@dataclasses.dataclass
class VerifiedBundle:
    """A bundle whose signature verified: only now may entries be used."""

    header: BundleHeader
    key_id: str
    sections: dict[str, Section]
    size: int

    @property
    def entries(self) -> int:
        return sum(s.count for s in self.sections.values())


class BundleReader:
    """Incremental reader: ``feed`` bytes as they arrive, then ``finish``.

    ``keys`` maps key id -> HMAC key. ``max_bytes`` bounds the whole
    bundle; ``max_entries(kind)`` bounds each kind (a kind over its limit
    gets a TooManyEntries refusal in its Section and its chunks are dropped,
    so the other kinds still get their answers). Every other problem raises
    a BundleError at once, and the reader is then dead. With ``parse_early``
    each chunk's JSON is parsed as it arrives, overlapping the transfer (a
    hundred thousand conntrack entries take about 0.4 s to parse), and with
    ``check_early(kind)`` (a per-entry check, or None) checked too; the
    entries are still handed out only after ``finish`` verified the MAC,
    and the importer still refuses the whole bundle for a poisoned entry
    before it installs anything (it checks again every chunk not passed).
    """

    def __init__(
        self,
        keys: Mapping[str, bytes],
        max_bytes: int,
        max_entries: Callable[[str], int],
        parse_early: bool = False,
        check_early: Callable[[str], Callable[[dict[str, Any]], None] | None] | None = None,
    ) -> None:
        if not keys:
            raise ValueError("a bundle reader needs at least one verification key")
        self._keys = dict(keys)
        self._max_bytes = max_bytes
        self._max_entries = max_entries
        self._parse_early = parse_early or check_early is not None
        self._check_early = check_early
        self._checks: dict[str, Callable[[dict[str, Any]], None] | None] = {}
        self._buf = bytearray()
        self._size = 0
        self._mac: Any = None
        self._key_id = ""
        self._header: BundleHeader | None = None
        self._sections: dict[str, Section] = {}
        self._open: Section | None = None
        self._counted = 0  # lines seen in the open section (also when refused)
        self._finish: dict[str, Any] | None = None
        self._signature: bytes | None = None
        self._state = "preamble"
        self._failed: BundleError | None = None

    @property
    def size(self) -> int:
        """Bytes read so far."""
        return self._size

    def feed(self, data: bytes) -> None:
        """Take the next bytes of the bundle; raise BundleError as soon as one is due."""
        if self._failed is not None:
            raise self._failed
        if not data:
            return
        try:
            self._size += len(data)
            if self._size > self._max_bytes:
                raise OversizedBundle(
                    f"bundle is larger than {self._max_bytes} bytes ([state] max_bundle_bytes); "
                    "it was refused before it was all read",
                )
            if self._state == "done":
                raise MalformedBundle("bytes follow the signature; a bundle ends with it")
            self._buf += data
            self._parse()
        except BundleError as err:
            self._failed = err
            self._buf = bytearray()
            self._sections = {}
            raise

    def finish(self) -> VerifiedBundle:
        """Verify the signature and release the bundle, or raise BundleError."""
        if self._failed is not None:
            raise self._failed
        try:
            return self._verify()
        except BundleError as err:
            self._failed = err
            self._sections = {}
            raise

    # -- parsing --------------------------------------------------------------

    def _parse(self) -> None:
        while True:
            if self._state == "preamble":
                if len(self._buf) < _PREAMBLE.size:
                    return
                magic, version = _PREAMBLE.unpack_from(self._buf)
                if magic != MAGIC:
                    raise MalformedBundle(
                        "not a state bundle: it does not start with VMMSTATE "
                        "(is the peer URL pointing at a state service?)"
                    )
                if version != VERSION:
                    raise UnknownVersion(
                        f"bundle format version {version} is not supported here (this host "
                        f"reads version {VERSION}); upgrade the older host"
                    )
                del self._buf[: _PREAMBLE.size]
                self._state = "header"
                continue
            if self._state == "done":
                if self._buf:
                    raise MalformedBundle("bytes follow the signature; a bundle ends with it")
                return
            if len(self._buf) < _FRAME.size:
                return
            ftype, length = _FRAME.unpack_from(self._buf)
            if length > self._max_bytes:
                raise OversizedBundle(
                    f"a {_FRAME_NAMES.get(ftype, 'frame')} of {length} bytes is larger than "
                    f"the {self._max_bytes} bytes allowed ([state] max_bundle_bytes)"
                )
            if len(self._buf) < _FRAME.size + length:
                return
            raw = bytes(self._buf[: _FRAME.size + length])
            del self._buf[: _FRAME.size + length]
            self._frame(ftype, raw)

    def _frame(self, ftype: bytes, raw: bytes) -> None:
        """Handle one whole frame (``raw``: type, length and payload)."""
        payload = raw[_FRAME.size :]
        if self._state == "header":
            if ftype != HEADER:
                raise MalformedBundle(f"bundle starts with a {self._name(ftype)}, not a header")
            self._start_mac(payload)
            self._mac.update(raw)
            self._state = "body"
            return
        if ftype == MAC:
            if self._finish is None:
                raise MalformedBundle("signature before the finish frame")
            if len(payload) != MAC_SIZE:
                raise BadSignature(
                    f"signature is {len(payload)} bytes long, an HMAC-SHA256 is {MAC_SIZE}"
                )
            self._signature = payload
            self._state = "done"
            return
        if self._finish is not None:
            raise MalformedBundle(f"a {self._name(ftype)} follows the finish frame")
        if ftype == SECTION:
            self._open_section(_obj(payload, "section"))
        elif ftype == CHUNK:
            self._chunk(payload)
        elif ftype == END:
            self._close_section(_obj(payload, "section end"))
        elif ftype == FINISH:
            self._finish_frame(_obj(payload, "finish"))
        else:
            raise MalformedBundle(f"unknown frame type {ftype!r}")
        self._mac.update(raw)

    @staticmethod
    def _name(ftype: bytes) -> str:
        return _FRAME_NAMES.get(ftype, f"frame of type {ftype!r}")

    def _start_mac(self, payload: bytes) -> None:
        head = _obj(payload, "header")
        alg = head.get("alg")
        if alg in (None, "", "none"):
            raise UnsignedBundle(
                "bundle is unsigned; state is only imported from signed bundles "
                "(set [state] key on the exporting host)"
            )
        if alg != ALG:
            raise UnsignedBundle(f"bundle is signed with {alg!r}; only {ALG} is accepted")
        key_id = head.get("key_id")
        if not isinstance(key_id, str) or key_id not in self._keys:
            known = ", ".join(sorted(self._keys))
            raise UnknownKey(
                f"bundle is signed with key id {key_id!r}, which this host does not know "
                f"(it knows {known}); align [state] key_id/key, or list the key in "
                "[state] verify_keys during a rotation"
            )
        self._key_id = key_id
        self._header = BundleHeader.from_dict(head)
        self._mac = hmac.new(self._keys[key_id], digestmod=hashlib.sha256)
        # The preamble was consumed before the key was known; hash it now.
        self._mac.update(_PREAMBLE.pack(MAGIC, VERSION))

    def _open_section(self, data: dict[str, Any]) -> None:
        if self._open is not None:
            raise MalformedBundle(f"section of kind {self._open.kind} is not closed")
        kind = data.get("kind")
        if not isinstance(kind, str) or not KIND_RE.match(kind):
            raise MalformedBundle(f"section names an invalid kind {kind!r}")
        if kind in self._sections:
            raise MalformedBundle(f"kind {kind} has two sections")
        unavailable = data.get("unavailable")
        section = Section(kind, unavailable=None if unavailable is None else str(unavailable))
        self._sections[kind] = section
        self._open = section
        self._counted = 0

    def _chunk(self, payload: bytes) -> None:
        section = self._open
        if section is None:
            raise MalformedBundle("chunk outside a section")
        if section.unavailable is not None:
            raise MalformedBundle(f"chunk in section {section.kind}, marked unavailable")
        if not payload.endswith(b"\n"):
            raise MalformedBundle(f"chunk of kind {section.kind} does not end with a newline")
        lines = payload.count(b"\n")
        self._counted += lines
        if section.refusal is not None:
            return
        limit = self._max_entries(section.kind)
        if self._counted > limit:
            section.refusal = TooManyEntries(
                f"kind {section.kind} has more than {limit} entries, this host's limit "
                f"([state] max_entries / max_entries_per_kind)"
            )
            section.chunks = []
            section.early = {}
            section.checked = set()
            return
        section.chunks.append(payload)
        if self._parse_early:
            check = None
            if self._check_early is not None:
                if section.kind not in self._checks:
                    self._checks[section.kind] = self._check_early(section.kind)
                check = self._checks[section.kind]
            section.parse_early(len(section.chunks) - 1, check)

    def _close_section(self, data: dict[str, Any]) -> None:
        section = self._open
        if section is None or data.get("kind") != section.kind:
            raise MalformedBundle(f"section end for {data.get('kind')!r} without its start")
        count = data.get("count")
        if not isinstance(count, int) or count != self._counted:
            raise MalformedBundle(
                f"section {section.kind} declares {count!r} entries but holds {self._counted}"
            )
        section.count = count
        error = data.get("error")
        if error is not None:
            section.error = str(error)
            section.chunks = []
            section.early = {}
            section.checked = set()
        self._open = None

    def _finish_frame(self, data: dict[str, Any]) -> None:
        if self._open is not None:
            raise MalformedBundle(f"bundle finishes inside the section of {self._open.kind}")
        sections, entries = data.get("sections"), data.get("entries")
        counted = sum(s.count for s in self._sections.values())
        if sections != len(self._sections) or entries != counted:
            raise MalformedBundle(
                f"finish frame declares {sections!r} sections/{entries!r} entries, "
                f"the bundle holds {len(self._sections)}/{counted}"
            )
        self._finish = data

    def _verify(self) -> VerifiedBundle:
        if self._state == "done":
            assert self._signature is not None and self._header is not None
            if not hmac.compare_digest(self._mac.digest(), self._signature):
                raise BadSignature(
                    f"bundle signature does not verify with key {self._key_id!r}: the bundle "
                    "was altered, or the hosts' [state] key differ; nothing was imported"
                )
            return VerifiedBundle(self._header, self._key_id, self._sections, self._size)
        if self._finish is not None and not self._buf:
            raise UnsignedBundle(
                "bundle ends without a signature; state is only imported from signed bundles"
            )
        where = {"preamble": "before its header", "header": "in its header"}.get(
            self._state, "before its end"
        )
        raise MalformedBundle(f"bundle is truncated {where}, after {self._size} bytes")


def _obj(payload: bytes, what: str) -> dict[str, Any]:
    try:
        data = json.loads(payload.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError) as err:
        raise MalformedBundle(f"{what} frame is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise MalformedBundle(f"{what} frame is not a JSON object")
    return data


def read_bundle(
    pieces: Iterable[bytes],
    keys: Mapping[str, bytes],
    max_bytes: int,
    max_entries: Callable[[str], int],
) -> VerifiedBundle:
    """Read a whole bundle from ``pieces`` (any chunking) and verify it."""
    reader = BundleReader(keys, max_bytes, max_entries)
    for piece in pieces:
        reader.feed(piece)
    return reader.finish()
