"""OVSDB access through ovsdbapp (as OpenStack's Neutron and os-vif do).

One :class:`Db` per database: an ovsdbapp API over an IDL that keeps a local
replica of the rows and wakes waiters whenever an update arrives, so a
barrier wakes within microseconds of ovn-controller's write instead of on a
polling tick (a polling tick remains as a safety net).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from ovsdbapp.backend.ovs_idl import command, connection, idlutils
from ovsdbapp.schema.open_vswitch import impl_idl as ovs_impl
from ovsdbapp.schema.ovn_northbound import impl_idl as nb_impl
from ovsdbapp.schema.ovn_southbound import impl_idl as sb_impl

from vmm_orchestrator.errors import TransientError

T = TypeVar("T")

OVS = "Open_vSwitch"
NB = "OVN_Northbound"
SB = "OVN_Southbound"

_APIS: dict[str, Any] = {
    OVS: ovs_impl.OvsdbIdl,
    NB: nb_impl.OvnNbApiIdlImpl,
    SB: sb_impl.OvnSbApiIdlImpl,
}


class _NotifyingIdl(connection.OvsdbIdl):
    """An IDL that sets every registered waiter's event on each row change."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.waiters: set[threading.Event] = set()
        self.waiters_lock = threading.Lock()

    def notify(self, event: Any, row: Any, updates: Any = None) -> None:
        with self.waiters_lock:
            for ev in self.waiters:
                ev.set()


class Db:
    """One OVSDB database: ``api`` (ovsdbapp), cached reads and change-driven waits."""

    def __init__(
        self,
        target: str,
        schema: str,
        timeout: float = 10.0,
        tables: list[str] | None = None,
        poll_interval: float = 0.002,
    ) -> None:
        self.target = target
        self.schema = schema
        self.poll_interval = poll_interval
        try:
            helper = idlutils.get_schema_helper(target, schema)
        except Exception as exc:
            raise TransientError(
                f"cannot reach the {schema} database at {target}: {exc}",
                hint="is the ovsdb-server running, and is the connection option right?",
            ) from None
        if tables:
            for table in tables:
                helper.register_table(table)
        else:
            helper.register_all()
        self.idl = _NotifyingIdl(target, helper)
        self.conn = connection.Connection(self.idl, timeout)
        # ovsdbapp keeps ONE connection per API class (a class attribute, the
        # singleton Neutron relies on): a second database of the same schema
        # (another chassis in the lab, NB next to an NB) would silently read
        # the first one's rows. A subclass per Db gives each its own.
        base = _APIS[schema]
        own = type(f"{base.__name__}_{id(self):x}", (base,), {"_ovsdb_connection": None})
        self.api = own(self.conn)

    # -- reads -------------------------------------------------------------

    def rows(self, table: str) -> list[Any]:
        """The cached rows of ``table`` (a consistent snapshot)."""
        with self.conn.lock:
            return list(self.api.tables[table].rows.values())

    def read(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` with the replica locked (no update applied meanwhile)."""
        with self.conn.lock:
            return fn()

    @contextmanager
    def _waiter(self) -> Iterator[threading.Event]:
        ev = threading.Event()
        with self.idl.waiters_lock:
            self.idl.waiters.add(ev)
        try:
            yield ev
        finally:
            with self.idl.waiters_lock:
                self.idl.waiters.discard(ev)

    def wait_for(self, predicate: Callable[[], T | None], timeout: float) -> T | None:
        """Until ``predicate()`` (run with the replica locked) is not None/False;
        its value, or None after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        with self._waiter() as ev:
            while True:
                ev.clear()
                value = self.read(predicate)
                if value:
                    return value
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                ev.wait(min(left, max(self.poll_interval, 0.05)))

    # -- writes ------------------------------------------------------------

    def bump_nb_cfg(self) -> int:
        """NB only: increment NB_Global.nb_cfg (what ``ovn-nbctl --wait`` does); the new value."""
        return int(_BumpNbCfg(self.api).execute(check_error=True))

    def close(self) -> None:
        self.conn.stop(timeout=5)


class _BumpNbCfg(command.BaseCommand):
    """NB_Global.nb_cfg += 1, verified (a concurrent bump makes ovsdbapp retry)."""

    def run_idl(self, txn: Any) -> None:
        rows = list(self.api.tables["NB_Global"].rows.values())
        if not rows:
            raise TransientError("the Northbound has no NB_Global row yet", hint="ovn-nbctl init")
        row = rows[0]
        row.verify("nb_cfg")
        new = int(row.nb_cfg) + 1
        row.nb_cfg = new
        self.result = new


def ext(row: Any, key: str) -> str | None:
    """``row.external_ids[key]`` or None."""
    return (getattr(row, "external_ids", None) or {}).get(key)


def wall_ms() -> float:
    return time.time() * 1000.0
