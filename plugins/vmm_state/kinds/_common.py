"""What the kinds share: the per-kind entry limit, running tools inside a
host's namespace, mapping a kernel refusal to a failure reason, and the
rules about remaining lifetimes.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import ipaddress
import re
import threading
from collections.abc import Iterator
from typing import Any, ClassVar

from oslo_config import cfg

from vmm_orchestrator.model import Vif, normalize_mac
from vmm_orchestrator.statekind import ImportResult, KindContext, PoisonedEntry, Reason, StateKind


def max_entries_opt(default: int, what: str) -> cfg.Opt:
    """The ``max_entries`` option every kind has in its own group."""
    return cfg.IntOpt(
        "max_entries",
        default=default,
        min=0,
        help=f"Most {what} this host installs for one migrating VM. An import with more "
        "is answered FAIL/resource_limit and nothing of it is installed, so that one VM "
        "cannot fill a table other VMs on this host need.",
    )


def reason_for(code: int) -> Reason:
    """The failure reason a kernel refusal means for the migration's policy.

    Out of room is a resource limit (stop moving VMs here); a clash with
    what the host already has or forbids is a policy conflict; anything
    else (missing table, unknown attribute, a feature this kernel lacks)
    means this host cannot hold the state: unsupported.
    """
    if code in (errno.ENOMEM, errno.ENOSPC, errno.ENFILE, errno.E2BIG, errno.ENOBUFS):
        return Reason.RESOURCE_LIMIT
    if code in (errno.EEXIST, errno.EPERM, errno.EACCES, errno.EBUSY):
        return Reason.POLICY_CONFLICT
    return Reason.UNSUPPORTED


def remaining(value: Any, entry: dict[str, Any]) -> int:
    """Whole seconds left of a lifetime exported as ``value`` seconds.

    ``entry["age"]`` (seconds, optional) is how long the entry travelled
    since it was exported, if whoever carried it knows: conntrackd's rule,
    remaining = stored - age. Never negative; rounded down, so a lifetime is
    never extended by the move.
    """
    left = float(value) - float(entry.get("age", 0) or 0)
    return max(0, int(left))


class BaseKind(StateKind):
    """A kind with a per-kind entry limit in ``[state_<name>] max_entries``."""

    #: Default of max_entries, and what an entry is, for the option's help.
    default_max_entries: ClassVar[int] = 4096

    @property
    def max_entries(self) -> int:
        return int(self.conf[self.group].max_entries)

    def too_many(self, count: int) -> ImportResult | None:
        """FAIL/resource_limit if ``count`` entries exceed this host's limit."""
        if count > self.max_entries:
            return ImportResult.fail(
                self.name,
                Reason.RESOURCE_LIMIT,
                f"{count} entries exceed [{self.group}] max_entries = {self.max_entries}",
            )
        return None

    def refused(self, code: int, detail: str) -> ImportResult:
        return ImportResult.fail(self.name, reason_for(code), detail)


# -- checks shared by the kinds ------------------------------------------------

_IFNAME = re.compile(r"^[A-Za-z0-9_.:@-]{1,15}$")


def vif_for_port(ctx: KindContext, port: Any) -> Vif:
    """The VM's NIC on ``port``, or PoisonedEntry (another VM's port)."""
    if not isinstance(port, str) or not _IFNAME.match(port):
        raise ValueError(f"not an interface name: {port!r}")
    for vif in ctx.vifs:
        if vif.port == port:
            return vif
    raise PoisonedEntry(f"port {port} is not a port of this VM")


def own_mac(ctx: KindContext, mac: Any, vif: Vif | None = None) -> str:
    """``mac`` normalised, or PoisonedEntry unless it is the VM's (or ``vif``'s)."""
    if not isinstance(mac, str):
        raise ValueError(f"not a MAC address: {mac!r}")
    value = normalize_mac(mac)
    allowed = {vif.mac} if vif is not None else ctx.macs
    if value not in allowed:
        raise PoisonedEntry(f"MAC {value} is not this VM's")
    return value


def own_ip(ctx: KindContext, ip: Any, vif: Vif | None = None) -> str:
    """``ip`` normalised, or PoisonedEntry unless it is the VM's (or ``vif``'s)."""
    value = ip_text(ip)
    allowed = set(vif.ipv4 + vif.ipv6) if vif is not None else ctx.addresses
    if value not in allowed:
        raise PoisonedEntry(f"address {value} is not this VM's")
    return value


def ip_text(ip: Any) -> str:
    if not isinstance(ip, str):
        raise ValueError(f"not an IP address: {ip!r}")
    try:
        return str(ipaddress.ip_address(ip))
    except ValueError:
        raise ValueError(f"not an IP address: {ip!r}") from None


def seconds(value: Any, what: str) -> int | float:
    """A non-negative lifetime in seconds (ValueError otherwise)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ValueError(f"{what} must be a number of seconds >= 0, got {value!r}")
    return value


def require(entry: Any, *keys: str) -> dict[str, Any]:
    if not isinstance(entry, dict):
        raise ValueError(f"an entry must be an object, got {type(entry).__name__}")
    missing = [k for k in keys if k not in entry]
    if missing:
        raise ValueError(f"entry lacks {', '.join(missing)}: {entry}")
    return entry


# -- bulk work without the cyclic garbage collector ---------------------------------

_gc_lock = threading.Lock()
_gc_holders = 0
_gc_was_enabled = False


@contextlib.contextmanager
def no_gc() -> Iterator[None]:
    """Run the body with Python's cyclic garbage collector paused.

    Moving 100,000 entries allocates millions of small objects that all stay
    alive; every 700 allocations the collector would walk them again, which
    measured as half of an import's time. Nothing here makes reference
    cycles, so the pause loses nothing; nested and concurrent users share it.
    """
    global _gc_holders, _gc_was_enabled
    with _gc_lock:
        if _gc_holders == 0:
            _gc_was_enabled = gc.isenabled()
            gc.disable()
        _gc_holders += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_holders -= 1
            if _gc_holders == 0 and _gc_was_enabled:
                gc.enable()


_frozen_for: set[str] = set()


def freeze_heap(migration_id: str) -> None:
    """Keep the collector off what the pre-copy left alive until the migration ends.

    After a pre-copy of 100,000 entries the heap holds millions of live
    objects (ledger records, tracked names); the collector's next full pass
    over them takes 100-200 ms, and it would come at the next burst of
    allocations - the delta, inside the VM's pause (measured: 237 ms pause
    instead of 48). ``gc.freeze`` moves every live object out of the
    collector's sight (reference counting still frees them); ``thaw_heap``
    at the end of the migration gives them back.
    """
    with _gc_lock:
        _frozen_for.add(migration_id)
        gc.freeze()


def thaw_heap(migration_id: str) -> None:
    """The migration is over: let the collector see its objects again."""
    with _gc_lock:
        if migration_id not in _frozen_for:
            return
        _frozen_for.discard(migration_id)
        if not _frozen_for:
            gc.unfreeze()
