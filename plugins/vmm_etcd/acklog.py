"""NVE acks in etcd as a log of batches: one key per batch of acks, not one per NVE.

Why (issue 16): with the server in front of etcd, a move to 1,000 peers
cost etcd about 60 us of CPU per ack when each ack was a put of the NVE's
own key (``acks/<nve>``), batched 127 to a transaction: most of the
directory's cost per peer. etcd's cost is mostly per put (its JSON
gateway, the index, the backend), not per byte: one put holding 1,000
acks (38 kB) cost it 3-7 us per ack on the same machine. So a batch of
acks is one key::

    <prefix>acklog/<writer>/<seq>  {"at": T, "acks": {nve: [revision, epoch]}}
    <prefix>acklog/<writer>/<seq>  {"acks": {nve: [revision, epoch, at]}}  (compacted)
    (either one as "z:" + base64(zlib(JSON)) when longer than 1 kB: :func:`packed`)
    <prefix>nvegen                 rewritten whenever an NVE record is written or deleted

* Readers take, per NVE, the highest of its own key (``acks/<nve>``, which
  only single acks write: older agents, and the log's slow path; absent
  means never acked) and of the log's entries for it, so an ack never goes
  backwards whatever order writers wrote in, and no writer compares
  anything per NVE. Registration no longer creates the NVE's own key: a
  reader waiting for acks reads the ``acks/`` range, and a thousand keys
  of ``0`` there cost etcd about 10 us per NVE on every such read.
* ``epoch`` is the etcd create revision of the NVE's record when the ack
  was written. An entry counts only while the record has that create
  revision: an NVE deleted and registered again does not inherit its
  predecessor's acks (deleting an NVE leaves the log alone).
* A writer knows the NVEs' epochs from one keys-only read and then only
  from what was created since (``min_create_revision``); its batch compares
  ``nvegen``, so a record written meanwhile makes it read those created first.
* Every writer (the server in front of etcd, each agent process writing
  directly) uses keys of its own (a random writer id), so writers never
  contend. Every ``COMPACT_EVERY`` batches a writer folds the whole log
  into new keys of its own (only entries whose epoch is current) and then
  deletes the keys it folded: a reader sees every entry at all times, in
  the old keys or the new ones, and two writers folding at once only
  leave duplicates, which the highest-wins rule ignores.
* Many writers (agents writing to etcd directly: 16 agent processes in the
  benchmark) each fold only every ``COMPACT_EVERY`` of their own batches,
  so the log could hold hundreds of keys; a reader of acks that finds more
  than ``FOLD_KEYS`` folds it (in the background: :meth:`fold_soon`).
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import secrets
import threading
import zlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from vmm_etcd import kv as kvmod
from vmm_etcd.keys import Keys, pad
from vmm_etcd.kv import EtcdKV, KeyValue
from vmm_orchestrator.nva.errors import NvaError

LOG = logging.getLogger(__name__)

#: Batches a writer writes between two foldings of the log.
COMPACT_EVERY = 32
#: Keys in the log above which a reader of acks folds it.
FOLD_KEYS = 64
#: Acks per log key (a key of 2,048 acks is ~80 kB: far below etcd's request limit).
ENTRIES_PER_KEY = 2048

#: An NVE's ack as readers see it: (acked revision, acked at).
Ack = tuple[int, float | None]


def better(a: Ack | None, b: Ack | None) -> Ack | None:
    """The higher ack; of two at the same revision the earlier one (when it was reached)."""
    if a is None:
        return b
    if b is None:
        return a
    if a[0] != b[0]:
        return a if a[0] > b[0] else b
    if a[1] is None or (b[1] is not None and b[1] < a[1]):
        return b
    return a


#: A value longer than this is stored compressed (:func:`packed`).
PACK_ABOVE = 1024
#: What a compressed value starts with (JSON never does).
PACKED = "z:"


def packed(text: str) -> str:
    """``text`` as a log key stores it: compressed (zlib, then base64) when long.

    Why (issue 16): etcd's cost for a write grows with its size (its JSON
    gateway decodes the value, raft and the backend store it), and a batch
    of 1,000 acks is ~25 kB of JSON made of NVE names and similar numbers;
    compressed it is ~7.5 kB, which took ~2 ms of etcd CPU off each move.
    """
    if len(text) <= PACK_ABOVE:
        return text
    return PACKED + base64.b64encode(zlib.compress(text.encode("utf-8"), 1)).decode("ascii")


def unpacked(value: str) -> str:
    """The JSON text of a log key's value, packed or not (ValueError: damaged)."""
    if not value.startswith(PACKED):
        return value
    try:
        return zlib.decompress(base64.b64decode(value[len(PACKED) :])).decode("utf-8")
    except (zlib.error, binascii.Error, UnicodeDecodeError) as err:
        raise ValueError(f"a damaged packed ack log value: {err}") from None


def entries(value: str) -> list[tuple[str, int, int, float | None]]:
    """(nve, revision, epoch, at) of one log key's value; a malformed value holds none."""
    try:
        doc = json.loads(unpacked(value))
        default_at = doc.get("at")
        items = doc["acks"].items()
    except (ValueError, AttributeError, KeyError, TypeError):
        return []
    out = []
    for nve_id, entry in items:
        try:
            at = entry[2] if len(entry) > 2 else default_at
            out.append((nve_id, int(entry[0]), int(entry[1]), float(at) if at else None))
        except (ValueError, TypeError, IndexError):
            continue
    return out


#: One log entry: (nve, revision, epoch, at).
Entry = tuple[str, int, int, float | None]


def fold(items: Iterable[KeyValue], epochs: Mapping[str, int]) -> dict[str, Ack]:
    """The highest logged ack of each NVE whose entries carry its current epoch."""
    return fold_parsed((entries(item.value) for item in items), epochs)


def fold_parsed(keys: Iterable[Iterable[Entry]], epochs: Mapping[str, int]) -> dict[str, Ack]:
    """:func:`fold` of log keys already parsed."""
    best: dict[str, Ack] = {}
    for parsed in keys:
        for nve_id, revision, epoch, at in parsed:
            if epochs.get(nve_id) == epoch:
                found = best.get(nve_id)
                new = (revision, at)
                best[nve_id] = new if found is None else better(found, new) or new
    return best


def fold_entries(
    items: Iterable[KeyValue], epochs: Mapping[str, int]
) -> dict[str, tuple[int, int, float | None]]:
    """Like :func:`fold`, keeping each entry's epoch (what a compaction writes back)."""
    out: dict[str, tuple[int, int, float | None]] = {}
    for nve_id, (revision, at) in fold(items, epochs).items():
        out[nve_id] = (revision, epochs[nve_id], at)
    return out


def batch_value(at: float, acks: Mapping[str, tuple[int, int]]) -> str:
    """One batch's key value: every ack written at ``at``."""
    body = {n: [r, e] for n, (r, e) in acks.items()}
    return packed(json.dumps({"at": round(at, 6), "acks": body}, separators=(",", ":")))


def snapshot_value(acks: Mapping[str, tuple[int, int, float | None]]) -> str:
    """A compacted key's value: each ack with its own time."""
    body = {n: [r, e, a] for n, (r, e, a) in acks.items()}
    return packed(json.dumps({"acks": body}, separators=(",", ":")))


class LogView:
    """The ack log as one read saw it: how many keys, and each NVE's highest ack."""

    def __init__(self, cache: LogCache, keys: int) -> None:
        self._cache = cache
        #: Keys in the log (a reader folds the log when there are too many).
        self.keys = keys

    def fold(self, epochs: Mapping[str, int]) -> dict[str, Ack]:
        """The highest logged ack of each NVE of ``epochs`` for its epoch there."""
        return self._cache.fold(epochs)


class LogCache:
    """The ack log as this process last read it, parsed and folded.

    A log key is written once and never changed (a fold writes new keys and
    deletes old ones), so a reader lists the log's keys without values and
    fetches only the keys created since its last read: reading one NVE's
    ack (an agent's stream joining, a registration) no longer costs a read
    of the whole log, which holds up to a few entries per NVE.

    The entries are kept folded, each NVE's highest ack per epoch, and
    brought up to date with each new key only (folded again from every key
    only when keys were deleted, which a fold of the log does once in
    ``COMPACT_EVERY`` batches): a reader's cost is per NVE it asks about,
    not per entry in the log. Why (issue 16): the orchestrator's wait for
    1,000 peers' acks folded every entry of every key (tens of thousands)
    on each move in `vmm nva serve`.

    With ``own`` (this process's :class:`AckLogWriter`), the keys that writer
    wrote are not fetched at all: it hands them over as it writes them
    (:meth:`remember`), and a read fetches only the new keys of other
    writers. Why (issue 16): `vmm nva serve` writes its streams' acks and
    answers the orchestrator's wait for them; reading back the batch it had
    just written (about 40 bytes per ack through etcd's JSON gateway) was a
    good part of etcd's cost per peer.
    """

    def __init__(self, keys: Keys, own: AckLogWriter | None = None) -> None:
        self.keys = keys
        self._lock = threading.Lock()
        #: Every key whose entries this process knows: key -> (etcd create revision, entries).
        self._known: dict[str, tuple[int, list[Entry]]] = {}
        #: {nve: {epoch: highest ack}} over every known key.
        self._best: dict[str, dict[int, Ack]] = {}
        self._seen = 0
        self._own_prefix = own.prefix if own is not None else None
        if own is not None:
            own.listeners.append(self.remember)
            own.deleted.append(self.drop)

    def remember(self, revision: int, written: list[tuple[str, list[Entry]]]) -> None:
        """Keys this process's writer wrote at etcd ``revision``, with their entries."""
        with self._lock:
            for key, parsed in written:
                self._add(key, revision, parsed)

    def drop(self, keys: list[str]) -> None:
        """Keys this process's writer deleted (folded): a process that writes acks and
        never reads them (an agent writing to etcd) keeps no more than a fold's worth."""
        with self._lock:
            gone = [key for key in keys if key in self._known]
            if gone:
                for key in gone:
                    del self._known[key]
                self._refold()

    def _refold(self) -> None:
        known, self._known, self._best = self._known, {}, {}
        for key, (created, kept) in known.items():
            self._add(key, created, kept)

    def _add(self, key: str, created: int, parsed: list[Entry]) -> None:
        if key in self._known:
            return
        self._known[key] = (created, parsed)
        best = self._best
        for nve_id, revision, epoch, at in parsed:
            held = best.get(nve_id)
            if held is None:
                best[nve_id] = {epoch: (revision, at)}
                continue
            found = held.get(epoch)
            new = (revision, at)
            held[epoch] = new if found is None else better(found, new) or new

    def requests(self, full: bool = False) -> tuple[dict[str, Any], ...]:
        """The ranges to read (last in a read, after whatever else): the keys' listing,
        then the keys to fetch."""
        with self._lock:
            seen = 0 if full else self._seen
        listing = kvmod.get_prefix(self.keys.ack_log, keys_only=True)
        if not seen or self._own_prefix is None:
            return (
                listing,
                kvmod.get_prefix(self.keys.ack_log, min_create_revision=seen + 1 if seen else 0),
            )
        since = seen + 1
        own = self._own_prefix
        return (  # every new key but this process's writer's own
            listing,
            kvmod.get_range(self.keys.ack_log, own, min_create_revision=since),
            kvmod.get_range(
                kvmod.prefix_end(own).decode("utf-8"),
                kvmod.prefix_end(self.keys.ack_log),
                min_create_revision=since,
            ),
        )

    def read(self, answer: kvmod.TxnResult, index: int) -> LogView | None:
        """The log as of ``answer`` (its ranges from ``index`` to the end, as
        :meth:`requests` made them), or None when a listed key is not known (a
        concurrent read moved the cache past it, or this process's writer has not
        handed it over yet): then read again with ``full``."""
        fetched: dict[str, KeyValue] = {}
        for at in range(index + 1, len(answer.responses)):
            fetched.update((item.key, item) for item in answer.kvs(at))
        listed = answer.kvs(index)
        parsed = {
            key: entries(item.value) for key, item in fetched.items() if key not in self._known
        }
        with self._lock:
            for item in listed:
                if item.key in self._known:
                    continue
                found = parsed.get(item.key)
                if found is None:
                    return None
                self._add(item.key, item.create_revision, found)
            if answer.revision >= self._seen:
                self._seen = answer.revision
                names = {item.key for item in listed}
                gone = [
                    key
                    for key, (created, _) in self._known.items()
                    if created <= answer.revision and key not in names
                ]
                if gone:  # folded away: fold what is left again
                    for key in gone:
                        del self._known[key]
                    self._refold()
        return LogView(self, len(listed))

    def fold(self, epochs: Mapping[str, int]) -> dict[str, Ack]:
        """:meth:`LogView.fold`."""
        out: dict[str, Ack] = {}
        with self._lock:
            best = self._best
            for nve_id, epoch in epochs.items():
                held = best.get(nve_id)
                if held is not None:
                    found = held.get(epoch)
                    if found is not None:
                        out[nve_id] = found
        return out


def epochs_of(keys: Keys, records: Iterable[KeyValue]) -> dict[str, int]:
    """{nve id: create revision} of NVE record keys (read with or without values)."""
    return {r.key[len(keys.nves) :]: r.create_revision for r in records}


class AckLogWriter:
    """One process's writer of ack batches (see the module doc). Thread-safe."""

    def __init__(self, kv: EtcdKV, keys: Keys, max_ops: int) -> None:
        self.kv = kv
        self.keys = keys
        self.max_puts = max(1, max_ops - 2)
        self.max_deletes = max(1, max_ops)
        self.writer = secrets.token_hex(6)
        #: Every key this writer writes is under this prefix.
        self.prefix = f"{keys.ack_log}{self.writer}/"
        #: ``listener(etcd revision, [(key, entries)])`` after each write, under :attr:`lock`.
        self.listeners: list[Callable[[int, list[tuple[str, list[Entry]]]], None]] = []
        #: ``listener(keys)`` after a fold deleted those keys.
        self.deleted: list[Callable[[list[str]], None]] = []
        self.lock = threading.Lock()
        self._folding = threading.Lock()
        self._seq = 0
        self._written = 0
        #: {nve: create revision} as far as known, and the etcd revision that is as of.
        self.epochs: dict[str, int] = {}
        self._known = 0
        self._gen_mod: int | None = None
        #: Batches written (for tests and the benchmark).
        self.batches = 0
        self.compactions = 0

    # ------------------------------------------------------------- epochs

    def refresh(self) -> None:
        """Learn the NVE records created since the last look (all of them the first time)."""
        since = self._known + 1 if self._gen_mod is not None else 0
        answer = self.kv.read(
            kvmod.get(self.keys.nve_generation),
            kvmod.get_prefix(self.keys.nves, keys_only=True, min_create_revision=since),
            what="read the NVEs' epochs",
        )
        found = answer.one(0)
        if self._gen_mod is None:
            self.epochs = {}
        self.epochs.update(epochs_of(self.keys, answer.kvs(1)))
        self._gen_mod = found.mod_revision if found is not None else 0
        self._known = answer.revision

    # ------------------------------------------------------------- writing

    def _key(self) -> str:
        self._seq += 1
        return f"{self.prefix}{pad(self._seq)}"

    def _written_at(self, revision: int, written: list[tuple[str, list[Entry]]]) -> None:
        for listener in self.listeners:
            listener(revision, written)

    def write(self, acks: Mapping[str, int], now: float) -> tuple[bool, int]:
        """Log ``acks`` (every NVE in :attr:`epochs`) if the directory has reached their
        highest revision and no NVE record was created since the epochs were read.

        Returns (written, the directory's revision when refused: 0 if written).
        One transaction per ``max_puts`` keys; a refused one leaves the
        earlier ones written, which is harmless (they are true acks).
        """
        assert self._gen_mod is not None
        items = sorted(acks.items())
        per_txn = ENTRIES_PER_KEY * self.max_puts
        for start in range(0, len(items), per_txn):
            part = items[start : start + per_txn]
            highest = max(r for _, r in part)
            compare = [kvmod.cmp_mod(self.keys.nve_generation, self._gen_mod)]
            if highest > 0:
                compare.append(kvmod.cmp_value(self.keys.revision, "GREATER", pad(highest - 1)))
            written: list[tuple[str, list[Entry]]] = []
            for i in range(0, len(part), ENTRIES_PER_KEY):
                logged = {n: (r, self.epochs[n]) for n, r in part[i : i + ENTRIES_PER_KEY]}
                at = round(now, 6)
                written.append((self._key(), [(n, r, e, at) for n, (r, e) in logged.items()]))
            puts = [
                kvmod.put(key, batch_value(now, {n: (r, e) for n, r, e, _ in parsed}))
                for key, parsed in written
            ]
            answer = self.kv.txn(
                compare,
                puts,
                [kvmod.get(self.keys.revision)],
                what=f"log {len(part)} NVE acks",
            )
            if not answer.succeeded:
                counter = answer.one(0)
                return False, int(counter.value) if counter is not None else 0
            self.batches += 1
            self._written += 1
            self._written_at(answer.revision, written)
        return True, 0

    def due(self) -> bool:
        return self._written >= COMPACT_EVERY

    def fold_soon(self) -> None:
        """Fold the log in a thread of its own, unless a fold is already running."""
        if not self._folding.acquire(blocking=False):
            return

        def run() -> None:
            try:
                with self.lock:
                    self.compact()
            except NvaError as err:  # the next reader tries again
                LOG.info("folding the ack log failed: %s", err)
            finally:
                self._folding.release()

        threading.Thread(target=run, name="etcd-ack-fold", daemon=True).start()

    def compact(self) -> None:
        """Fold the whole log into fresh keys of this writer, then delete what was folded."""
        self._written = 0
        answer = self.kv.read(
            kvmod.get_prefix(self.keys.ack_log),
            kvmod.get_prefix(self.keys.nves, keys_only=True),
            what="read the ack log",
        )
        old = answer.kvs(0)
        if len(old) <= 1:
            return
        merged = sorted(fold_entries(old, epochs_of(self.keys, answer.kvs(1))).items())
        written = [
            (self._key(), [(n, r, e, a) for n, (r, e, a) in merged[i : i + ENTRIES_PER_KEY]])
            for i in range(0, len(merged), ENTRIES_PER_KEY)
        ]
        for i in range(0, len(written), self.max_puts):
            part = written[i : i + self.max_puts]
            puts = [
                kvmod.put(key, snapshot_value({n: (r, e, a) for n, r, e, a in parsed}))
                for key, parsed in part
            ]
            done = self.kv.txn([], puts, what="write the folded ack log")
            self._written_at(done.revision, part)
        deletes = [kvmod.delete(item.key) for item in old]
        for i in range(0, len(deletes), self.max_deletes):
            self.kv.txn([], deletes[i : i + self.max_deletes], what="delete the folded ack log")
        self.compactions += 1
        for listener in self.deleted:
            listener([item.key for item in old])
