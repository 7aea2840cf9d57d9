"""Firewall cumulative data: nftables dynamic set elements of the VM.

The firewall's flood meters and blacklists are dynamic sets whose keys name
the protected VM (``source . VM`` in :mod:`vmm_lab.firewall`): a SYN-rate
meter per source and VM, and the (source, VM) pairs blacklisted after a
flood. Left behind, a flooding source that was blocked from the VM on the
old host reaches it again on the new one, and the meters start from zero.

Which sets move is configured (``[state_nft_sets] sets``), each with the
position in its key that holds the protected VM's address: only elements
whose address there is the VM's are exported, and an entry naming another
address there, or a set not configured, is refused as poisoned.

Entry shape (JSON)::

    {"family": "inet", "table": "vmm_fw", "set": "blacklist_v4",
     "key": ["198.19.100.12", "198.19.100.10"],   (one value per key field)
     "timeout": 60,         (the element's lifetime; null: the set has none)
     "expires": 57,         (seconds left, rounded down; null: never)
     "limit": {...}, "counter": {"packets": n, "bytes": n}   (when the element has them),
     "age": seconds since export   (optional, set by a carrier)}

A flood meter's token bucket is not visible through nft: a moved meter
element starts with a full burst; its expiry moves.
"""

from __future__ import annotations

import errno
import json
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any, ClassVar

from oslo_config import cfg

from vmm_kernel.netns import CommandFailed
from vmm_orchestrator.errors import ConfigError
from vmm_orchestrator.statekind import ImportResult, KindContext, PoisonedEntry, Reason
from vmm_state.kinds import _nft, _nftnl
from vmm_state.kinds._common import (
    BaseKind,
    ip_text,
    max_entries_opt,
    remaining,
    require,
)

LOG = logging.getLogger(__name__)

DEFAULT_SETS = [
    "inet:vmm_fw:blacklist_v4:1",
    "inet:vmm_fw:blacklist_v6:1",
    "inet:vmm_fw:synflood_v4:1",
    "inet:vmm_fw:synflood_v6:1",
]


def parse_spec(spec: str) -> tuple[str, str, str, int]:
    """``family:table:set:field`` -> its parts (ValueError if malformed)."""
    parts = spec.split(":")
    if len(parts) != 4 or not parts[3].isdigit():
        raise ValueError(
            f"[state_nft_sets] sets: {spec!r} is not family:table:set:field "
            "(for example inet:vmm_fw:blacklist_v4:1)"
        )
    return parts[0], parts[1], parts[2], int(parts[3])


def _name(value: Any) -> Any:
    """A hashable name of a JSON value (an element key, a limit): the tuple of
    a flat list, else its JSON text."""
    if isinstance(value, list) and all(isinstance(v, (str, int)) for v in value):
        return tuple(value)
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


class ElementKind(BaseKind):
    """Shared logic of the kinds whose state is nftables set elements."""

    def _lookup(self, ctx: KindContext) -> dict[tuple[str, str, str], _nft.SetInfo]:
        """Declarations of this kind's sets on the host (missing sets left out)."""
        found = {}
        for family, table, name in self.set_names():
            try:
                info, _ = _nft.list_set(ctx.netns, family, table, name)
            except (OSError, LookupError):
                continue
            found[(family, table, name)] = info
        return found

    def set_names(self) -> list[tuple[str, str, str]]:
        raise NotImplementedError

    def unavailable(self, ctx: KindContext) -> str | None:
        have = self._lookup(ctx)
        missing = [" ".join(n) for n in self.set_names() if n not in have]
        if missing:
            return f"sets missing in {ctx.netns or 'this namespace'}: {', '.join(missing)}"
        return None

    def install_elements(
        self,
        ctx: KindContext,
        wanted: list[tuple[tuple[str, str, str], list[Any], dict[str, Any]]],
        extra_lines: list[str] | None = None,
        record_extra: dict[str, Any] | None = None,
    ) -> ImportResult:
        """Add ``(set, key, entry)`` elements in one transaction; all or nothing.

        Elements already present are replaced (``add`` updates their expiry)
        and remembered so that revert restores them.
        """
        lines = list(extra_lines or [])
        added: list[list[Any]] = []
        replaced: list[dict[str, Any]] = []
        expired = 0
        by_set: dict[tuple[str, str, str], list[tuple[list[Any], dict[str, Any]]]] = {}
        deleted: list[dict[str, Any]] = []
        for name, key, entry in wanted:
            by_set.setdefault(name, []).append((key, entry))
        for name, items in by_set.items():
            try:
                info, present, count = self._present(ctx, name, [key for key, _ in items])
            except (OSError, LookupError):
                return ImportResult.fail(
                    self.name, Reason.UNSUPPORTED, f"this host has no set {' '.join(name)}"
                )
            now = {json.dumps(e["key"]): e for e in present}
            new = 0
            for key, entry in items:
                if entry.get("op") == "delete":  # gone at the source
                    old = now.pop(json.dumps(key), None)
                    if old is not None:
                        try:
                            lines.append(_nft.delete_line(info, key))
                        except ValueError as exc:
                            return ImportResult.fail(self.name, Reason.UNSUPPORTED, str(exc))
                        deleted.append({"set": list(name), **old})
                    continue
                timeout = entry.get("timeout")
                expires = entry.get("expires")
                if timeout is not None and expires is not None:
                    expires = remaining(expires, entry)
                    if expires <= 0:
                        expired += 1
                        continue
                    timeout = max(int(timeout), expires)
                extra: dict[str, Any] = {k: entry[k] for k in ("limit", "counter") if k in entry}
                try:
                    lines.append(
                        _nft.add_line(info, _nft.element_text(info, key, timeout, expires, extra))
                    )
                except ValueError as exc:
                    return ImportResult.fail(self.name, Reason.UNSUPPORTED, str(exc))
                old = now.get(json.dumps(key))
                if old is None:
                    added.append([*name, key])
                    new += 1
                else:
                    replaced.append({"set": list(name), **old})
            if info.size is not None and count + new > info.size:
                return ImportResult.fail(
                    self.name,
                    Reason.RESOURCE_LIMIT,
                    f"set {' '.join(name)} holds {count} of {info.size}; {new} more do not fit",
                )
        try:
            _nft.transaction(ctx.netns, lines)
        except CommandFailed as exc:
            return self.refused(exc.errno or errno.EINVAL, f"nft refused the import: {exc}")
        record = {
            "added": added,
            "replaced": replaced + deleted,
            "at": time.time(),
            **(record_extra or {}),
        }
        result = ImportResult.success(self.name, len(added) + len(replaced), record)
        notes = []
        if expired:
            notes.append(f"{expired} expired element(s) left out")
        if deleted:
            notes.append(f"{len(deleted)} element(s) deleted")
        result.detail = "; ".join(notes)
        return result

    def _present(
        self, ctx: KindContext, name: tuple[str, str, str], keys: list[list[Any]]
    ) -> tuple[_nft.SetInfo, list[dict[str, Any]], int]:
        """The set's declaration, its elements among ``keys`` (at least) and how
        many elements it holds in all: here its whole libnftables listing."""
        info, present = _nft.list_set(ctx.netns, *name)
        return info, present, len(present)

    def revert_elements(self, ctx: KindContext, record: dict[str, Any]) -> None:
        """Delete what an import added; put back what it replaced (time-adjusted)."""
        infos = self._lookup(ctx)
        doomed: dict[tuple[str, str, str], list[list[Any]]] = {}
        for family, table, name, key in record.get("added", []):
            doomed.setdefault((family, table, name), []).append(key)
        for name, keys in doomed.items():
            if name in infos:
                _nft.delete_present(ctx.netns, infos[name], keys)
        elapsed = max(0.0, time.time() - float(record.get("at", time.time())))
        lines = []
        for old in record.get("replaced", []):
            info = infos.get(tuple(old["set"]))
            if info is None:
                continue
            timeout, expires = old.get("timeout"), old.get("expires")
            if expires is not None:
                expires = int(expires - elapsed)
                if expires <= 0:
                    continue
            extra = {k: old[k] for k in ("limit", "counter") if k in old}
            lines.append(
                _nft.add_line(info, _nft.element_text(info, old["key"], timeout, expires, extra))
            )
        _nft.transaction(ctx.netns, lines)


class NftSetsKind(ElementKind):
    """Flood meters and blacklists keyed by the protected VM's address."""

    name = "nft_sets"
    default_max_entries = 65536
    opts: ClassVar[list[cfg.Opt]] = [
        max_entries_opt(65536, "set elements (meter and blacklist entries)"),
        cfg.ListOpt(
            "sets",
            default=DEFAULT_SETS,
            help="The dynamic sets that move with a VM, as family:table:set:field, where "
            "field is the position (from 0) in the set's key of the protected VM's "
            "address. Only elements whose address there is the VM's move.",
        ),
    ]

    def __init__(self, conf: cfg.ConfigOpts) -> None:
        super().__init__(conf)
        self._lock = threading.Lock()
        #: migration -> fingerprints of its pre-copy (None: the pre-copy is to come)
        self._prints: dict[str, dict[tuple[Any, ...], tuple[Any, ...]] | None] = {}
        self._figures: dict[str, dict[str, Any]] = {}
        #: migration -> its netlink reader: the source's opened at track, the
        #: destination's at the first import (the pre-copy's): outside the pause
        self._readers: dict[tuple[str, str | None], _nftnl.Reader] = {}
        try:
            self.specs()
        except ValueError as exc:
            raise ConfigError(str(exc), hint="write each set as family:table:set:field") from None

    def specs(self) -> dict[tuple[str, str, str], int]:
        out = {}
        for spec in self.conf[self.group].sets:
            family, table, name, field = parse_spec(spec)
            out[(family, table, name)] = field
        return out

    def set_names(self) -> list[tuple[str, str, str]]:
        return list(self.specs())

    # -- change tracking by fingerprint -------------------------------------------

    def track(self, ctx: KindContext) -> None:
        """Fingerprint the next full export (the pre-copy): the packet path adds
        these elements without any event, and a VM's elements are few enough
        to read again at the switchover and compare. The socket for those
        reads is opened now, outside the pause (:class:`_nftnl.Reader`)."""
        try:
            reader: _nftnl.Reader | None = _nftnl.Reader(ctx.netns)
        except OSError as exc:  # each read opens its own socket (or uses nft)
            LOG.info("nft_sets: no netlink socket for %s: %s", ctx.migration_id, exc)
            reader = None
        with self._lock:
            self._prints[ctx.migration_id] = None
            old = self._readers.pop((ctx.migration_id, ctx.netns), None)
            if reader is not None:
                self._readers[(ctx.migration_id, ctx.netns)] = reader
        if old is not None:
            old.close()

    def untrack(self, migration_id: str) -> None:
        with self._lock:
            self._prints.pop(migration_id, None)
            self._figures.pop(migration_id, None)
        self._close_readers(migration_id)

    def forget(self, migration_id: str) -> None:
        """Destination: the migration is over; close its netlink reader."""
        self._close_readers(migration_id)

    def _close_readers(self, migration_id: str) -> None:
        with self._lock:
            done = [self._readers.pop(k) for k in list(self._readers) if k[0] == migration_id]
        for reader in done:
            reader.close()

    #: A delta's elements of a set are looked up one by one (netlink, one send);
    #: more than this many (a pre-copy) are read with one libnftables listing.
    LOOKUP_MAX = 256

    def _present(
        self, ctx: KindContext, name: tuple[str, str, str], keys: list[list[Any]]
    ) -> tuple[_nft.SetInfo, list[dict[str, Any]], int]:
        """Inside the pause the destination needs, of a set, only the elements
        of the delta and the element count: point lookups over netlink cost
        the same in a set of any size, where nft lists every element (ten keys
        looked up 0.08 ms; listing a set of 1,000 elements 7 ms, of 10,000
        108 ms; load 8). libnftables for what the reader does not decode,
        for a pre-copy's many keys, or a kernel that does not count elements."""
        if len(keys) > self.LOOKUP_MAX:
            return super()._present(ctx, name, keys)
        with self._lock:
            reader = self._readers.get((ctx.migration_id, ctx.netns))
        if reader is None:
            try:
                reader = _nftnl.Reader(ctx.netns)
            except OSError:
                return super()._present(ctx, name, keys)
            with self._lock:
                kept = self._readers.setdefault((ctx.migration_id, ctx.netns), reader)
            if kept is not reader:
                reader.close()
                reader = kept
        try:
            layout, count, found = reader.lookup(*name, keys)
        except (_nftnl.Unsupported, OSError):
            return super()._present(ctx, name, keys)
        if count is None:
            return super()._present(ctx, name, keys)
        family, table, set_name = name
        info = _nft.SetInfo(
            family,
            table,
            set_name,
            list(layout.types),
            layout.timeout_flag,
            layout.default_timeout,
            layout.size,
        )
        return info, found, count

    def delta_figures(self, migration_id: str) -> dict[str, Any]:
        with self._lock:
            return dict(self._figures.get(migration_id, {}))

    @staticmethod
    def _print(entry: dict[str, Any], now: float) -> tuple[Any, ...]:
        """What makes an element different: its lifetime, its deadline (to a
        second and a half: expiry is listed in whole seconds), its limit.
        Counters are not compared (they tick with every packet)."""
        expires = entry.get("expires")
        deadline = None if expires is None else now + float(expires)
        limit = entry.get("limit")
        return (entry.get("timeout"), deadline, None if limit is None else _name(limit))

    @staticmethod
    def _same(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
        if a[0] != b[0] or a[2] != b[2]:
            return False
        if a[1] is None or b[1] is None:
            return a[1] is b[1]
        return bool(abs(a[1] - b[1]) <= 1.5)

    def export(self, ctx: KindContext, since: float | None = None) -> Iterator[dict[str, Any]]:
        """Every element of the configured sets that names the VM; for a delta
        of a tracked migration only the elements added, refreshed or changed
        since the pre-copy and ``{"op": "delete", ...}`` for those gone."""
        with self._lock:
            tracking = ctx.migration_id in self._prints
            before = self._prints.get(ctx.migration_id)
        now = time.monotonic()
        current = list(self._export_all(ctx))
        prints = {
            (e["family"], e["table"], e["set"], _name(e["key"])): self._print(e, now)
            for e in current
        }
        if since is None or before is None:
            if tracking and since is None:
                with self._lock:
                    self._prints[ctx.migration_id] = prints
            with self._lock:
                self._figures[ctx.migration_id] = {
                    "mode": "full" if since is None else "resync",
                    "entries": len(current),
                }
            yield from current
            return
        changed = 0
        for entry in current:
            name = (entry["family"], entry["table"], entry["set"], _name(entry["key"]))
            old = before.get(name)
            if old is None or not self._same(old, prints[name]):
                changed += 1
                yield entry
        gone = [name for name in before if name not in prints]
        for family, table, set_name, key in gone:
            yield {
                "op": "delete",
                "family": family,
                "table": table,
                "set": set_name,
                "key": list(key) if isinstance(key, tuple) else json.loads(key),
            }
        with self._lock:
            self._figures[ctx.migration_id] = {
                "mode": "delta",
                "changed": changed,
                "destroyed": len(gone),
                "listed": len(current),
            }

    def _export_all(self, ctx: KindContext) -> Iterator[dict[str, Any]]:
        addresses = ctx.addresses

        def mine(text: str) -> bool:
            try:
                return ip_text(text) in addresses
            except ValueError:
                return False

        specs = self.specs()
        # Straight from the kernel, only the VM's elements decoded (_nftnl: 0.45 ms for
        # the lab's four sets, whose libnftables listings take 1.3 ms, 4-8 ms in a pause).
        with self._lock:
            reader = self._readers.get((ctx.migration_id, ctx.netns))
        try:
            read = _nftnl.read_sets(ctx.netns, [(*n, f) for n, f in specs.items()], mine, reader)
        except OSError as exc:  # no netlink socket here: every set through libnftables
            LOG.info("nft_sets: reading sets over netlink failed (%s); using nft", exc)
            read = {}
        for (family, table, name), field in specs.items():
            raw = read.get((family, table, name))
            if isinstance(raw, list):
                for elem in raw:
                    yield {"family": family, "table": table, "set": name, **elem}
                continue
            if isinstance(raw, LookupError):
                LOG.warning("nft_sets: set %s %s %s is missing here", family, table, name)
                continue
            # A set the netlink reader does not decode: one libnftables listing of it.
            try:
                found: tuple[_nft.SetInfo, list[dict[str, Any]]] | None = _nft.list_set(
                    ctx.netns, family, table, name
                )
            except (OSError, LookupError):
                found = None
            if found is None:
                LOG.warning("nft_sets: set %s %s %s is missing here", family, table, name)
                continue
            _info, elements = found
            verdicts: dict[str, bool] = {}  # the field holds few distinct addresses
            for elem in elements:
                key = elem["key"]
                if field >= len(key) or not isinstance(key[field], str):
                    continue
                value = key[field]
                if value not in verdicts:
                    verdicts[value] = mine(value)
                if verdicts[value]:
                    yield {"family": family, "table": table, "set": name, **elem}

    def check(self, ctx: KindContext, entry: dict[str, Any]) -> None:
        """The set is one that moves and the VM's address is in its field.

        Each value is checked against the destination set's field type when
        the element is written (:func:`vmm_state.kinds._nft.token`).
        """
        require(entry, "family", "table", "set", "key")
        if entry.get("op", "set") not in ("set", "delete"):
            raise ValueError(f"unknown element op {entry.get('op')!r}")
        name = (entry["family"], entry["table"], entry["set"])
        field = self.specs().get(name)
        if field is None:
            raise PoisonedEntry(f"set {' '.join(map(str, name))} is not one that moves with VMs")
        key = entry["key"]
        if not isinstance(key, list) or field >= len(key):
            raise ValueError(f"key {key!r} has no field {field}")
        for value in key:
            _nft.plain_value(value)
        if ip_text(key[field]) not in ctx.addresses:
            raise PoisonedEntry(f"element {key} does not name this VM at field {field}")
        for what in ("timeout", "expires"):
            value = entry.get(what)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 0
            ):
                raise ValueError(f"{what} must be whole seconds >= 0, got {value!r}")

    def import_(self, ctx: KindContext, entries: list[dict[str, Any]]) -> ImportResult:
        refused = self.too_many(len(entries))
        if refused:
            return refused
        wanted = [((e["family"], e["table"], e["set"]), e["key"], e) for e in entries]
        return self.install_elements(ctx, wanted)

    def revert_import(self, ctx: KindContext, record: dict[str, Any]) -> None:
        self.revert_elements(ctx, record)

    def cleanup_source(self, ctx: KindContext) -> None:
        """Delete the VM's meter and blacklist elements from the source."""
        for (family, table, name), field in self.specs().items():
            try:
                info, elements = _nft.list_set(ctx.netns, family, table, name)
            except (OSError, LookupError):
                continue
            keys = []
            for elem in elements:
                key = elem["key"]
                try:
                    if field < len(key) and ip_text(key[field]) in ctx.addresses:
                        keys.append(key)
                except ValueError:
                    continue
            _nft.delete_present(ctx.netns, info, keys)
