"""The destination's side of a transfer: check every entry of a verified
bundle, install kind by kind, answer per kind, and remember what was
installed so an aborted migration can be reverted.

A bundle applies once (issue 13): the importer takes a migration's
bundles only in increasing ``seq`` (the source numbers each export from its
clock, in nanoseconds), and none exported before the migration closed here
(``close``: committed, or ended by ``StateHost.forget`` at ABORTED). A
replayed bundle is refused whole before any check or install, so it can
neither reset the lifetimes of installed entries nor re-create sessions
that closed meanwhile. A closed migration's floor is the later of its last
seq and this host's clock at the close, so a bundle exported after it (a
warm mirror's identity, reused by the next planned move of the same VM
between the same hosts) opens it again; hosts' clocks are assumed to agree
(NTP) better than the time between a close and such a reuse. Closed
migrations are remembered (the newest ``CLOSED_KEPT``) in memory; after a
restart the directory's voucher (``vmm_state.service.nva_voucher``)
refuses imports of migrations that are no longer pending to this host.

Order matters for safety. Every entry of every kind is checked with
``kind.check`` before anything is installed: a single poisoned entry (one
that involves addresses other than the migrating VM's) refuses the whole
bundle, since a bundle that lies about one entry cannot be trusted for the
others. Only then does each kind install its entries (all or nothing per
kind) and answer SUCCESS or FAIL with a reason; what to do about a FAIL is
the caller's policy, not ours.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from vmm_orchestrator.model import Migration
from vmm_orchestrator.statekind import ImportResult, KindContext, PoisonedEntry, Reason, StateKind
from vmm_state.bundle import (
    BundleError,
    MalformedBundle,
    PoisonedBundle,
    ReplayedBundle,
    VerifiedBundle,
    WrongBundle,
)
from vmm_state.kinds._common import no_gc

LOG = logging.getLogger(__name__)

#: How much of a refused entry an answer quotes (enough to find it, no more).
QUOTE_CHARS = 200
#: Closed migrations remembered to refuse their replayed bundles (newest kept).
CLOSED_KEPT = 65536


# ----------------------------------------------------------------- answers


@dataclasses.dataclass
class KindAnswer:
    """One kind's SUCCESS or FAIL with a reason, as it travels back to the sender."""

    kind: str
    ok: bool
    reason: Reason | None = None
    detail: str = ""
    entries: int = 0
    installed: int = 0
    ms: float = 0.0

    @classmethod
    def success(cls, kind: str, entries: int, installed: int, ms: float = 0.0) -> KindAnswer:
        return cls(kind, True, None, "", entries, installed, ms)

    @classmethod
    def fail(cls, kind: str, reason: Reason, detail: str, entries: int = 0) -> KindAnswer:
        return cls(kind, False, reason, detail, entries)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "result": "SUCCESS" if self.ok else "FAIL",
            "reason": self.reason.value if self.reason else None,
            "detail": self.detail,
            "entries": self.entries,
            "installed": self.installed,
            "ms": round(self.ms, 3),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> KindAnswer:
        """Decode a peer's answer; a garbled one raises ValueError."""
        result = data.get("result")
        if result not in ("SUCCESS", "FAIL"):
            raise ValueError(f"answer result must be SUCCESS or FAIL, got {result!r}")
        reason = data.get("reason")
        ok = result == "SUCCESS"
        if not ok and reason is None:
            raise ValueError("a FAIL answer must carry a reason")
        return cls(
            kind=str(data["kind"]),
            ok=ok,
            reason=None if reason is None else Reason(reason),
            detail=str(data.get("detail", "")),
            entries=int(data.get("entries", 0)),
            installed=int(data.get("installed", 0)),
            ms=float(data.get("ms", 0.0)),
        )


@dataclasses.dataclass
class ImportReport:
    """The answer to one bundle: per kind, plus the bundle-level refusal if any.

    ``error`` is ``"<code>: <message>"`` and ``reason`` its Reason when the
    whole bundle was refused (bad signature, poisoned entry, over the byte
    limit, a failed transfer, ...); every kind then answers FAIL with that
    reason and nothing was installed.
    ``read_ms`` covers receiving and verifying, ``check_ms`` the entry
    checks, ``import_ms`` the installs.
    """

    migration: str
    label: str
    answers: dict[str, KindAnswer]
    bytes: int = 0
    error: str | None = None
    reason: Reason | None = None
    read_ms: float = 0.0
    check_ms: float = 0.0
    import_ms: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None and all(a.ok for a in self.answers.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "migration": self.migration,
            "label": self.label,
            "ok": self.ok,
            "error": self.error,
            "reason": self.reason.value if self.reason else None,
            "bytes": self.bytes,
            "read_ms": round(self.read_ms, 3),
            "check_ms": round(self.check_ms, 3),
            "import_ms": round(self.import_ms, 3),
            "kinds": [a.to_dict() for a in self.answers.values()],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ImportReport:
        """Decode a peer's report; a garbled one raises ValueError."""
        try:
            answers = [KindAnswer.from_dict(a) for a in data["kinds"]]
            return cls(
                migration=str(data["migration"]),
                label=str(data["label"]),
                answers={a.kind: a for a in answers},
                bytes=int(data.get("bytes", 0)),
                error=None if data.get("error") is None else str(data["error"]),
                reason=None if data.get("reason") is None else Reason(data["reason"]),
                read_ms=float(data.get("read_ms", 0.0)),
                check_ms=float(data.get("check_ms", 0.0)),
                import_ms=float(data.get("import_ms", 0.0)),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"not an import report: {err!r}") from None

    @classmethod
    def refused(
        cls,
        migration: str,
        label: str,
        kinds: Iterable[str],
        err: BundleError,
        size: int = 0,
    ) -> ImportReport:
        """Every kind FAIL with ``err``'s reason: nothing of the bundle is installed."""
        return cls.failed(migration, label, kinds, err.reason, f"{err.code}: {err}", size)

    @classmethod
    def failed(
        cls,
        migration: str,
        label: str,
        kinds: Iterable[str],
        reason: Reason,
        error: str,
        size: int = 0,
    ) -> ImportReport:
        """Every kind FAIL with ``reason``: the bundle did not get (wholly) through."""
        detail = f"bundle refused ({error})"
        return cls(
            migration,
            label,
            {k: KindAnswer.fail(k, reason, detail) for k in dict.fromkeys(kinds)},
            bytes=size,
            error=error,
            reason=reason,
        )

    def answers_for(self, kinds: Iterable[str]) -> dict[str, KindAnswer]:
        """An answer for each of ``kinds``: its own, the bundle's refusal, or no answer."""
        out = {}
        for kind in kinds:
            answer = self.answers.get(kind)
            if answer is None and self.error is not None:
                answer = KindAnswer.fail(
                    kind, self.reason or Reason.TRANSFER_FAILED, f"bundle refused ({self.error})"
                )
            if answer is None:
                answer = KindAnswer.fail(
                    kind,
                    Reason.TRANSFER_FAILED,
                    f"the bundle ({self.label}) carried no section for {kind}",
                )
            out[kind] = answer
        return out


# ------------------------------------------------------------------ ledger


@dataclasses.dataclass(frozen=True)
class LedgerEntry:
    """One successful import of one kind: what revert_import needs."""

    label: str
    kind: str
    record: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "kind": self.kind, "record": self.record}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LedgerEntry:
        return cls(str(data["label"]), str(data["kind"]), dict(data["record"]))


class Ledger:
    """What each migration's imports installed, oldest first, per migration.

    With a ``directory`` every entry is written to a file of its own
    (``<migration digest>-<sequence>.json``, written atomically and synced),
    so an orchestrator restarted after an import still reverts it on
    ABORTED. One file per entry, not per migration: the delta's entry is
    written inside the VM's pause, and must not rewrite the pre-copy's
    (a 100,000-session record is megabytes). Without a directory the
    ledger lives in memory.
    """

    def __init__(self, directory: str | None = None) -> None:
        self.directory = directory
        self._lock = threading.Lock()
        self._entries: dict[str, list[tuple[int, LedgerEntry]]] = {}
        self._seq = 0
        if directory:
            os.makedirs(directory, exist_ok=True)
            self._load()

    def _digest(self, migration_id: str) -> str:
        return hashlib.sha256(migration_id.encode("utf-8")).hexdigest()[:32]

    def _path(self, migration_id: str, seq: int) -> str:
        assert self.directory
        return os.path.join(self.directory, f"{self._digest(migration_id)}-{seq:012d}.json")

    def _load(self) -> None:
        assert self.directory
        for name in sorted(os.listdir(self.directory)):
            if not name.endswith(".json"):
                continue
            path = os.path.join(self.directory, name)
            try:
                with open(path, encoding="utf-8") as fh:
                    data = json.load(fh)
                migration = str(data["migration"])
                if "entries" in data:  # the former one-file-per-migration form
                    for entry in data["entries"]:
                        self._seq += 1
                        self._write(migration, self._seq, LedgerEntry.from_dict(entry))
                        self._entries.setdefault(migration, []).append(
                            (self._seq, LedgerEntry.from_dict(entry))
                        )
                    os.unlink(path)
                    continue
                seq = int(data["seq"])
                self._seq = max(self._seq, seq)
                self._entries.setdefault(migration, []).append(
                    (seq, LedgerEntry.from_dict(data["entry"]))
                )
            except (OSError, ValueError, KeyError, TypeError) as err:
                LOG.error(
                    "state ledger file %s is unreadable (%s); its imports cannot be "
                    "reverted automatically",
                    path,
                    err,
                )
        for entries in self._entries.values():
            entries.sort(key=lambda item: item[0])

    def _write(self, migration_id: str, seq: int, entry: LedgerEntry) -> None:
        if not self.directory:
            return
        data = {"migration": migration_id, "seq": seq, "entry": entry.to_dict()}
        fd, tmp = tempfile.mkstemp(dir=self.directory, suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(data, fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self._path(migration_id, seq))
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    def _remove(self, migration_id: str, seq: int) -> None:
        if not self.directory:
            return
        try:
            os.unlink(self._path(migration_id, seq))
        except FileNotFoundError:
            pass

    def add(self, migration_id: str, entry: LedgerEntry) -> None:
        with self._lock:
            self._seq += 1
            self._write(migration_id, self._seq, entry)
            self._entries.setdefault(migration_id, []).append((self._seq, entry))

    def entries(self, migration_id: str) -> list[LedgerEntry]:
        with self._lock:
            return [e for _, e in self._entries.get(migration_id, [])]

    def take(self, migration_id: str, label: str | None = None) -> list[LedgerEntry]:
        """Remove and return the entries (of ``label``, or all), newest first."""
        with self._lock:
            kept: list[tuple[int, LedgerEntry]] = []
            taken: list[tuple[int, LedgerEntry]] = []
            for item in self._entries.get(migration_id, []):
                (taken if label is None or item[1].label == label else kept).append(item)
            if kept:
                self._entries[migration_id] = kept
            else:
                self._entries.pop(migration_id, None)
            for seq, _entry in taken:
                self._remove(migration_id, seq)
            return [e for _, e in reversed(taken)]

    def put_back(self, migration_id: str, entries: list[LedgerEntry]) -> None:
        """Return entries (newest first, as taken) whose revert failed, for a later try."""
        with self._lock:
            current = self._entries.setdefault(migration_id, [])
            # numbered below what is there, so that a reload keeps them first (oldest first)
            first = (current[0][0] if current else self._seq + 1) - len(entries)
            back = [(first + i, e) for i, e in enumerate(reversed(entries))]
            for seq, entry in back:
                self._write(migration_id, seq, entry)
            self._entries[migration_id] = back + current


# ---------------------------------------------------------------- importer


def kind_context(netns: str | None, migration: Migration) -> KindContext:
    """The kinds' view of ``migration``'s VM on a host: its own NICs only."""
    return KindContext(netns=netns, vifs=migration.workload.vifs, migration_id=migration.id)


def _add_age(entries: list[dict[str, Any]], seconds: float) -> None:
    """Add the time in transit to each entry's ``age`` (seconds since export)."""
    plain = round(seconds, 3)
    for entry in entries:
        before = entry.get("age")
        if not before:
            entry["age"] = plain
            continue
        try:
            earlier = float(before)
        except (TypeError, ValueError):
            earlier = 0.0
        entry["age"] = round(max(0.0, earlier) + seconds, 3)


def _quote(entry: Any) -> str:
    text = json.dumps(entry, sort_keys=True, default=str)
    return text if len(text) <= QUOTE_CHARS else text[: QUOTE_CHARS - 3] + "..."


class Importer:
    """Installs verified bundles with a host's kinds and records what it did."""

    def __init__(
        self, host: str, netns: str | None, kinds: Mapping[str, StateKind], ledger: Ledger
    ) -> None:
        self.host = host
        self.netns = netns
        self.kinds = dict(kinds)
        self.ledger = ledger
        # One import or revert at a time: two bundles of one migration racing
        # would make "newest first" meaningless.
        self._lock = threading.Lock()
        # migration -> label -> kind -> source-clock time of the export imported.
        self._synced: dict[str, dict[str, dict[str, float]]] = {}
        # Replay guard: the highest seq taken per migration, the labels of the
        # unnumbered bundles taken, and the migrations closed here
        # (id -> (floor: no seq at or below it is taken, wall time of the close)).
        self._last_seq: dict[str, int] = {}
        self._unnumbered: dict[str, set[str]] = {}
        self._closed: OrderedDict[str, tuple[int, float]] = OrderedDict()

    def close(self, migration_id: str) -> None:
        """The migration is over here: no bundle of it is taken any more."""
        with self._lock:
            self._close(migration_id)

    def _close(self, migration_id: str) -> None:
        floor = max(self._last_seq.pop(migration_id, 0), time.time_ns())
        self._unnumbered.pop(migration_id, None)
        self._closed[migration_id] = (floor, time.time())
        self._closed.move_to_end(migration_id)
        while len(self._closed) > CLOSED_KEPT:
            self._closed.popitem(last=False)

    def is_closed(self, migration_id: str) -> bool:
        """Whether the migration closed here (and no newer export opened it again)."""
        with self._lock:
            return migration_id in self._closed

    def _claim(self, migration: Migration, bundle: VerifiedBundle) -> None:
        """Take the bundle's seq for its migration, or ReplayedBundle. Under the lock."""
        h = bundle.header
        closed = self._closed.get(migration.id)
        if closed is not None:
            floor, at = closed
            if h.seq <= floor:
                raise ReplayedBundle(
                    f"migration {migration.id} closed on host {self.host} "
                    f"{max(0.0, time.time() - at):.0f} s ago (committed or aborted); its "
                    f"{h.label} bundle (seq {h.seq}) was exported before that: a replay, "
                    "refused, nothing installed"
                )
            del self._closed[migration.id]  # exported since: a new move under this id
            LOG.info("host %s: migration %s opens again (a newer export)", self.host, migration.id)
        if h.seq == 0:
            seen = self._unnumbered.setdefault(migration.id, set())
            if h.label in seen:
                raise ReplayedBundle(
                    f"an unnumbered {h.label} bundle of migration {migration.id} was taken "
                    "already; refusing a replay (upgrade the source to number its bundles)"
                )
            seen.add(h.label)
            return
        last = self._last_seq.get(migration.id, 0)
        if h.seq <= last:
            raise ReplayedBundle(
                f"{h.label} bundle seq {h.seq} of migration {migration.id} is not newer than "
                f"seq {last}, taken already on host {self.host}: a replayed (or overtaken) "
                "bundle is refused, nothing installed"
            )
        self._last_seq[migration.id] = h.seq

    def synced(self, migration_id: str) -> dict[str, float]:
        """Per kind, the source-clock time of the newest export imported for the migration.

        The source exports its delta from there; a kind absent here has not
        been imported (or was reverted) and must be sent whole.
        """
        with self._lock:
            out: dict[str, float] = {}
            for kinds in self._synced.get(migration_id, {}).values():
                for kind, at in kinds.items():
                    out[kind] = max(at, out.get(kind, at))
            return out

    def forget(self, migration_id: str) -> int:
        """The migration is over: its imports stay for good. Drop what undoes them.

        Returns how many ledger entries were dropped.
        """
        with self._lock:
            self._synced.pop(migration_id, None)
            self._close(migration_id)
            dropped = len(self.ledger.take(migration_id))
        for kind in self.kinds.values():
            try:
                kind.forget(migration_id)
            except Exception as err:
                LOG.error(
                    "host %s: %s could not forget %s: %r", self.host, kind.name, migration_id, err
                )
        return dropped

    def import_bundle(
        self,
        migration: Migration,
        bundle: VerifiedBundle,
        label: str | None = None,
        received_at: float | None = None,
    ) -> ImportReport:
        """Check everything, then install kind by kind; answer per kind.

        ``label`` is the label the caller expects (a bundle of another label
        is refused as misdirected). ``received_at`` (time.monotonic()) is
        when the bundle began to arrive: as the carrier, the importer adds
        the seconds since then to each entry's ``age`` just before its kind
        installs it, so remaining lifetimes shrink by the time in transit
        (conntrackd's rule: remaining = stored - age) and are never extended.
        """
        header = bundle.header
        report = ImportReport(migration.id, header.label, {}, bytes=bundle.size)
        try:
            self._check_binding(migration, bundle, label)
        except WrongBundle as err:
            return ImportReport.refused(
                migration.id, header.label, bundle.sections, err, bundle.size
            )
        ctx = kind_context(self.netns, migration)
        with self._lock, no_gc():
            try:
                self._claim(migration, bundle)
            except ReplayedBundle as err:
                LOG.warning("host %s: %s", self.host, err)
                return ImportReport.refused(
                    migration.id, header.label, bundle.sections, err, bundle.size
                )
            started = time.perf_counter()
            candidates = self._screen(ctx, bundle, report)
            parsed: dict[str, list[dict[str, Any]]] = {}
            poisoned = self._check_entries(ctx, bundle, candidates, report, parsed)
            report.check_ms = (time.perf_counter() - started) * 1000.0
            if poisoned is not None:
                LOG.error(
                    "host %s: migration %s: %s bundle refused: %s",
                    self.host,
                    migration.id,
                    header.label,
                    poisoned,
                )
                return ImportReport.refused(
                    migration.id, header.label, bundle.sections, poisoned, bundle.size
                )
            started = time.perf_counter()
            for kind in candidates:
                if kind in report.answers:  # refused by the checks
                    continue
                entries = parsed.pop(kind, None)
                report.answers[kind] = self._install(
                    ctx, migration, bundle, kind, received_at, entries
                )
            report.import_ms = (time.perf_counter() - started) * 1000.0
        # Keep the bundle's order in the answer.
        report.answers = {k: report.answers[k] for k in bundle.sections}
        return report

    def early_check(
        self, migration: Migration
    ) -> Callable[[str], Callable[[dict[str, Any]], None] | None]:
        """For a reader of ``migration``'s bundle: per kind, its entry check to run
        while the bundle arrives (kinds whose check is pure, ``CHECK_EARLY``), or
        None. A chunk that passes is not checked again by ``import_bundle``; one
        that fails is, so the answer (poison refuses the whole bundle, a malformed
        entry its kind) is the same as without early checks. Nothing is installed
        before the bundle is verified and every chunk passed."""
        ctx = kind_context(self.netns, migration)

        def for_kind(name: str) -> Callable[[dict[str, Any]], None] | None:
            kind = self.kinds.get(name)
            if kind is None or not getattr(kind, "CHECK_EARLY", False):
                return None
            check = kind.check
            return lambda entry: check(ctx, entry)

        return for_kind

    @staticmethod
    def _check_binding(migration: Migration, bundle: VerifiedBundle, label: str | None) -> None:
        """The signed header must name this migration, its VM and its source (no replays)."""
        h = bundle.header
        expected = (migration.id, migration.workload.name, migration.source)
        if (h.migration, h.workload, h.source) != expected:
            raise WrongBundle(
                f"bundle is for migration {h.migration} of {h.workload} from {h.source}, "
                f"not migration {migration.id} of {migration.workload.name} from "
                f"{migration.source}; refusing a replayed or misdirected bundle"
            )
        if label is not None and h.label != label:
            raise WrongBundle(f"bundle is a {h.label} bundle where a {label} bundle was expected")

    def _screen(self, ctx: KindContext, bundle: VerifiedBundle, report: ImportReport) -> list[str]:
        """Answer the sections that cannot be imported; return the importable kinds."""
        candidates = []
        for name, section in bundle.sections.items():
            kind = self.kinds.get(name)
            n = section.count
            if kind is None:
                enabled = ", ".join(self.kinds) or "none"
                report.answers[name] = KindAnswer.fail(
                    name,
                    Reason.UNSUPPORTED,
                    f"kind {name} is not enabled on host {self.host} (enabled: {enabled}; "
                    "see [state] kinds)",
                    n,
                )
            elif section.unavailable is not None:
                report.answers[name] = KindAnswer.fail(
                    name,
                    Reason.UNSUPPORTED,
                    f"the source cannot export {name}: {section.unavailable}",
                    n,
                )
            elif section.error is not None:
                report.answers[name] = KindAnswer.fail(
                    name, Reason.TRANSFER_FAILED, f"at the source: {section.error}", n
                )
            elif section.refusal is not None:
                report.answers[name] = KindAnswer.fail(
                    name, section.refusal.reason, str(section.refusal), n
                )
            else:
                # a kind this migration already imported here was available moments
                # ago: the delta inside the pause does not ask again
                done = any(name in k for k in self._synced.get(ctx.migration_id, {}).values())
                why = None if done else self._unavailable(kind, ctx)
                if why is not None:
                    report.answers[name] = KindAnswer.fail(
                        name,
                        Reason.UNSUPPORTED,
                        f"host {self.host} cannot hold {name}: {why}",
                        n,
                    )
                else:
                    candidates.append(name)
        return candidates

    @staticmethod
    def _unavailable(kind: StateKind, ctx: KindContext) -> str | None:
        try:
            return kind.unavailable(ctx)
        except Exception as err:
            return f"its availability check failed: {err!r}"

    def _check_entries(
        self,
        ctx: KindContext,
        bundle: VerifiedBundle,
        candidates: list[str],
        report: ImportReport,
        parsed: dict[str, list[dict[str, Any]]],
    ) -> BundleError | None:
        """Run kind.check on every entry; a poisoned one refuses the whole bundle.

        The entries checked are kept in ``parsed`` (per kind) and installed as
        they are: parsed once, and a kind may keep what its check worked out.

        A malformed entry (ValueError) refuses only its kind
        (FAIL/unsupported): the signer is trusted, its exporter is not
        hostile, just unable to produce what this host understands.
        """
        for name in candidates:
            kind = self.kinds[name]
            index, entry = -1, None
            kept: list[dict[str, Any]] = []
            try:
                check = kind.check
                for batch, checked in bundle.sections[name].batches():
                    if checked:  # passed the same check while arriving (see early_check)
                        kept += batch
                        index += len(batch)
                        continue
                    for entry in batch:
                        index += 1
                        check(ctx, entry)
                        kept.append(entry)
                parsed[name] = kept
            except PoisonedEntry as err:
                return PoisonedBundle(
                    f"entry {index} of kind {name} does not belong to VM "
                    f"{bundle.header.workload} ({err}): {_quote(entry)}; nothing of the "
                    "bundle was installed"
                )
            except MalformedBundle as err:
                report.answers[name] = KindAnswer.fail(
                    name, Reason.UNSUPPORTED, str(err), bundle.sections[name].count
                )
            except Exception as err:  # ValueError by contract; anything else is a kind bug
                report.answers[name] = KindAnswer.fail(
                    name,
                    Reason.UNSUPPORTED,
                    f"entry {index} of kind {name} is invalid here: {err!r}",
                    bundle.sections[name].count,
                )
        return None

    def _install(
        self,
        ctx: KindContext,
        migration: Migration,
        bundle: VerifiedBundle,
        name: str,
        received_at: float | None,
        entries: list[dict[str, Any]] | None = None,
    ) -> KindAnswer:
        kind = self.kinds[name]
        section = bundle.sections[name]
        started = time.perf_counter()
        if entries is None:
            entries = list(section.entries())
        label = bundle.header.label
        if not entries and any(name in k for k in self._synced.get(migration.id, {}).values()):
            # A delta with nothing in it (inside the pause, usually): this host holds
            # the kind's earlier import, and nothing changed since. No work, no undo
            # record; the kind counts as synced with this export.
            by_label = self._synced.setdefault(migration.id, {}).setdefault(label, {})
            by_label[name] = bundle.header.exported_at
            answer = KindAnswer.success(name, 0, 0, (time.perf_counter() - started) * 1000.0)
            return answer
        if received_at is not None:
            _add_age(entries, time.monotonic() - received_at)
        try:
            result = kind.import_(ctx, entries)
        except Exception as err:
            LOG.exception("host %s: import of %s raised", self.host, name)
            return KindAnswer.fail(
                name,
                Reason.UNSUPPORTED,
                f"import of {name} raised {err!r} (a kind must answer FAIL instead; "
                "check the host's kernel tables for a partial install)",
                section.count,
            )
        finally:
            del entries
        ms = (time.perf_counter() - started) * 1000.0
        problem = self._result_problem(name, result)
        if problem is not None:
            return KindAnswer.fail(name, Reason.UNSUPPORTED, problem, section.count)
        if not result.ok:
            answer = KindAnswer.fail(
                name, result.reason or Reason.UNSUPPORTED, result.detail, section.count
            )
            answer.ms = ms
            return answer
        self.ledger.add(migration.id, LedgerEntry(label, name, result.record))
        by_label = self._synced.setdefault(migration.id, {}).setdefault(label, {})
        by_label[name] = bundle.header.exported_at
        return KindAnswer.success(name, section.count, result.installed, ms)

    @staticmethod
    def _result_problem(name: str, result: Any) -> str | None:
        if not isinstance(result, ImportResult):
            return f"import of {name} answered {type(result).__name__}, not an ImportResult"
        if result.ok:
            try:
                json.dumps(result.record)
            except (TypeError, ValueError) as err:
                return f"import of {name} returned a record that is not JSON-able: {err}"
        elif result.reason is None:
            return f"import of {name} answered FAIL without a reason: {result.detail}"
        return None

    def revert(
        self,
        migration: Migration,
        label: str | None = None,
        fallback: list[LedgerEntry] | None = None,
    ) -> tuple[int, list[str]]:
        """Undo the imports of ``migration`` (of ``label``, or all), newest first.

        ``fallback`` is used when the ledger has none (an orchestrator that
        restarted without a ledger directory; the entries come from the
        engine's journal). Entries whose revert fails stay in the ledger.
        Returns (entries reverted, errors).
        """
        ctx = kind_context(self.netns, migration)
        with self._lock:
            synced = self._synced.get(migration.id, {})
            if label is None:
                synced.clear()
            else:
                synced.pop(label, None)
            if not synced:
                self._synced.pop(migration.id, None)
            entries = self.ledger.take(migration.id, label)
            if not entries and fallback:
                entries = [e for e in fallback if label is None or e.label == label]
            failed: list[LedgerEntry] = []
            errors: list[str] = []
            for entry in entries:
                kind = self.kinds.get(entry.kind)
                try:
                    if kind is None:
                        raise LookupError(f"kind {entry.kind} is no longer enabled here")
                    kind.revert_import(ctx, entry.record)
                except Exception as err:
                    failed.append(entry)
                    errors.append(f"revert of {entry.label} {entry.kind}: {err!r}")
            if failed:
                self.ledger.put_back(migration.id, failed)
            return len(entries) - len(failed), errors
