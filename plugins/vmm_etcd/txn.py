"""Optimistic transactions: read, decide, then write only if nothing read has changed.

Each directory operation reads the keys it needs, decides in Python (the
same checks as the embedded store, with the same messages), and sends one
etcd transaction that compares the mod revision of every key it read and
applies every write, or nothing. When a compare fails another writer got
there first: the operation is run again on fresh state. That is how two
orchestrators, or an orchestrator and an NVE agent reporting a move, can
never both move the same endpoint from the same sequence number.

The directory revision (the change counter) is a key like any other: every
operation that records a change reads it and writes it back incremented,
so those operations are totally ordered and the change log has no gaps and
no duplicates, even across processes.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable
from typing import Any, TypeVar

from vmm_etcd import kv as kvmod
from vmm_etcd.keys import Keys, pad
from vmm_etcd.kv import EtcdKV, KeyValue
from vmm_orchestrator.nva.errors import NvaError, Unavailable

LOG = logging.getLogger(__name__)

T = TypeVar("T")

#: Attempts before an operation that keeps losing races gives up.
MAX_ATTEMPTS = 50


def dumps(data: Any) -> str:
    return json.dumps(data, separators=(",", ":"))


class Tx:
    """One attempt: the keys read (with their mod revisions) and the writes to make."""

    def __init__(self, kv: EtcdKV, keys: Keys, attempt: int = 1) -> None:
        self.kv = kv
        self.keys = keys
        #: 1 for the first attempt; a decision may trust remembered facts only then.
        self.attempt = attempt
        self._read: dict[str, KeyValue | None] = {}
        self._assumed: dict[str, int] = {}
        self._writes: dict[str, dict[str, Any]] = {}
        self._base_revision: int | None = None
        self._next_revision: int | None = None

    # ------------------------------------------------------------------ reads

    def get(self, *keys: str) -> list[KeyValue | None]:
        """The keys' current values (None: absent), read together in one round trip."""
        missing = [k for k in dict.fromkeys(keys) if k not in self._read]
        if missing:
            answer = self.kv.read(*(kvmod.get(k) for k in missing), what="read the directory")
            for index, key in enumerate(missing):
                self._read[key] = answer.one(index)
        return [self._read[k] for k in keys]

    def get_json(self, key: str) -> Any:
        found = self.get(key)[0]
        return None if found is None else json.loads(found.value)

    def scan(self, prefix: str) -> list[KeyValue]:
        """Every key under ``prefix``; not compared unless passed to :meth:`expect`."""
        return self.kv.read(kvmod.get_prefix(prefix), what="read the directory").kvs(0)

    def expect(self, item: KeyValue) -> None:
        """Make the write depend on ``item`` (read by :meth:`scan`) being unchanged."""
        self._read.setdefault(item.key, item)

    def assume(self, key: str, mod_revision: int) -> None:
        """Make the write depend on ``key`` still being at ``mod_revision``, without reading it.

        For facts remembered from an earlier operation: if the key changed
        since, the transaction fails and the next attempt reads it.
        """
        if key not in self._read:
            self._assumed[key] = mod_revision

    def revision(self) -> int:
        """The directory revision as read in this attempt (compared at commit)."""
        if self._base_revision is None:
            found = self.get(self.keys.revision)[0]
            self._base_revision = int(found.value) if found is not None else 0
        return self._base_revision

    def next_revision(self) -> int:
        """Take the next directory revision; written back only if the attempt commits."""
        if self._next_revision is None:
            self._next_revision = self.revision()
        self._next_revision += 1
        return self._next_revision

    @property
    def new_revision(self) -> int | None:
        """The directory revision this attempt ends at, if it records changes."""
        return self._next_revision

    # ----------------------------------------------------------------- writes

    def put(self, key: str, value: str) -> None:
        self._writes[key] = kvmod.put(key, value)

    def put_json(self, key: str, data: Any) -> None:
        self.put(key, dumps(data))

    def delete(self, key: str) -> None:
        self._writes[key] = kvmod.delete(key)

    @property
    def writes(self) -> bool:
        return bool(self._writes)

    def request(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """(compares, writes) of the transaction that commits this attempt."""
        writes = dict(self._writes)
        if self._next_revision is not None and self._next_revision != self._base_revision:
            writes[self.keys.revision] = kvmod.put(self.keys.revision, pad(self._next_revision))
        compares = [
            kvmod.cmp_mod(key, found.mod_revision if found is not None else 0)
            for key, found in self._read.items()
        ]
        compares += [
            kvmod.cmp_mod(key, mod) for key, mod in self._assumed.items() if key not in self._read
        ]
        return compares, list(writes.values())


def run(
    kv: EtcdKV,
    keys: Keys,
    what: str,
    decide: Callable[[Tx], T],
    *,
    max_ops: int,
    on_commit: Callable[[Tx], None] | None = None,
) -> T:
    """Run ``decide`` until its writes commit unchanged; return what it returned.

    ``decide`` raises the directory's errors (NotFound, Conflict, ...) to
    refuse; it then writes nothing. An attempt that writes nothing returns
    at once.
    """
    for attempt in range(1, MAX_ATTEMPTS + 1):
        tx = Tx(kv, keys, attempt)
        result = decide(tx)
        if not tx.writes:
            return result
        compares, writes = tx.request()
        biggest = max(len(compares), len(writes))
        if biggest > max_ops:
            raise NvaError(
                f"cannot {what} in one etcd transaction: it needs {biggest} operations, "
                f"more than [nva_etcd] max_txn_ops ({max_ops})",
                hint="start etcd with a larger --max-txn-ops and raise [nva_etcd] max_txn_ops "
                "to match",
            )
        if kv.txn(compares, writes, what=what).succeeded:
            if on_commit is not None:
                on_commit(tx)
            return result
        LOG.debug("etcd: %s lost a race (attempt %d); retrying", what, attempt)
        time.sleep(random.uniform(0, min(0.05, 0.001 * 2**attempt)))
    raise Unavailable(
        f"could not {what}: the directory kept changing under it for {MAX_ATTEMPTS} attempts",
        hint="too many writers on the same keys; retry later",
    )
