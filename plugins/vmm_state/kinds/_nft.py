"""nftables set elements: read them with their remaining expiry, write them
back in one transaction.

Reading uses nft's JSON listing (expiry in whole seconds, rounded down).
Writing uses nft's text syntax in one run, which the kernel applies as one
transaction: all elements or none. Both go through libnftables in-process
(:mod:`vmm_kernel.nft`, the project's one nft path). Not JSON, because nft
1.0.6's JSON parser silently drops an element's ``limit`` statement (measured)
- and a flood-meter element without its limit matches on the first packet,
which would blacklist an innocent source. Every value written is checked
against its set field's type first (:func:`token`), so nothing but a value
reaches nft's parser.

Facts measured on kernel 6.18 / nft 1.0.6: ``add element`` with ``timeout``
and ``expires`` sets the remaining lifetime (kernel 5.3+); adding an element
that exists updates its expiry in place (so an import replaces, never
duplicates); a failing element aborts the whole transaction.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import json
import re
from collections.abc import Iterable
from typing import Any

from vmm_kernel.nft import nft
from vmm_orchestrator.model import normalize_mac

_ADDRESS_TYPES = {"ipv4_addr": 4, "ipv6_addr": 6}
_STRING_TYPES = {"ifname"}
_NUMBER_TYPES = {"inet_service", "inet_proto", "mark", "integer"}
_PROTOCOLS = {"tcp", "udp", "udplite", "sctp", "dccp", "icmp", "icmpv6", "esp", "ah", "gre"}
_IFNAME = re.compile(r"^[A-Za-z0-9_.:@-]{1,15}$")
_UNIT = re.compile(r"^[a-z]{1,8}$")
_LIMIT_UNITS = {"second", "minute", "hour", "day", "week"}


@dataclasses.dataclass
class SetInfo:
    """A set's declaration as far as moving elements needs it."""

    family: str
    table: str
    name: str
    types: list[str]
    timeout_flag: bool
    default_timeout: int | None
    size: int | None


def _as_list(val: Any) -> list[Any]:
    if isinstance(val, dict) and "concat" in val:
        return list(val["concat"])
    return [val]


def nft_json(netns: str | None, *args: str) -> str:
    """``nft -j ARGS`` output, in-process through libnftables (vmm_kernel.nft)."""
    return nft(netns, " ".join(args), json_output=True)


def list_set(
    netns: str | None, family: str, table: str, name: str
) -> tuple[SetInfo, list[dict[str, Any]]]:
    """The set's declaration and its elements.

    Each element is ``{"key": [values...], "timeout": s|None, "expires": s|None}``
    plus ``limit``/``counter`` when the element carries them.
    """
    for part in (family, table, name):
        if not _IFNAME.match(part):
            raise LookupError(f"not a set name: {part!r}")
    out = nft_json(netns, "list", "set", family, table, name)
    for item in json.loads(out)["nftables"]:
        data = item.get("set")
        if data and data.get("name") == name:
            return _parse_set(family, table, data)
    raise LookupError(f"set {family} {table} {name} not found")


def list_table_sets(
    netns: str | None, family: str, table: str
) -> dict[str, tuple[SetInfo, list[dict[str, Any]]]]:
    """Every set of a table with its elements, in one listing (each listing
    makes nft read the ruleset first: one per table, not one per set)."""
    for part in (family, table):
        if not _IFNAME.match(part):
            raise LookupError(f"not a table name: {part!r}")
    out = nft_json(netns, "list", "table", family, table)
    found = {}
    for item in json.loads(out)["nftables"]:
        data = item.get("set")
        if data and isinstance(data.get("name"), str):
            found[data["name"]] = _parse_set(family, table, data)
    return found


def _parse_set(
    family: str, table: str, data: dict[str, Any]
) -> tuple[SetInfo, list[dict[str, Any]]]:
    name = data["name"]
    types = data["type"] if isinstance(data["type"], list) else [data["type"]]
    flags = data.get("flags", [])
    if isinstance(flags, str):
        flags = [flags]
    info = SetInfo(
        family,
        table,
        name,
        list(types),
        "timeout" in flags or "timeout" in data,
        data.get("timeout"),
        data.get("size"),
    )
    elements = []
    for raw in data.get("elem", []):
        elem = raw["elem"] if isinstance(raw, dict) and "elem" in raw else {"val": raw}
        entry: dict[str, Any] = {
            "key": _as_list(elem["val"]),
            "timeout": elem.get("timeout", info.default_timeout if info.timeout_flag else None),
            "expires": elem.get("expires"),
        }
        if entry["timeout"] is not None and entry["expires"] is None:
            entry["expires"] = 0  # nft leaves out an expiry under one second
        for extra in ("limit", "counter"):
            if extra in elem:
                entry[extra] = elem[extra]
        elements.append(entry)
    return info, elements


def set_exists(netns: str | None, family: str, table: str, name: str) -> bool:
    try:
        list_set(netns, family, table, name)
    except (OSError, LookupError):
        return False
    return True


def token(value: Any, kind: str) -> str:
    """One key component as nft text, checked against the set's field type.

    ValueError unless ``value`` is a plain value of that type. The check is
    strict on purpose: nft would resolve a host name it finds where an
    address belongs, and accepts expressions where a value belongs.
    """
    if isinstance(value, bool):
        raise ValueError(f"not a set value: {value!r}")
    if isinstance(value, dict) and "prefix" in value and kind in _ADDRESS_TYPES:
        length = value["prefix"].get("len")
        if isinstance(length, bool) or not isinstance(length, int) or length < 0:
            raise ValueError(f"bad prefix {value!r}")
        return f"{token(value['prefix']['addr'], kind)}/{length}"
    if kind in _ADDRESS_TYPES:
        if not isinstance(value, str):
            raise ValueError(f"not an address: {value!r}")
        addr = ipaddress.ip_address(value)
        if addr.version != _ADDRESS_TYPES[kind]:
            raise ValueError(f"{value} is not of type {kind}")
        return str(addr)
    if kind == "ether_addr":
        return normalize_mac(str(value))
    if kind in _STRING_TYPES:
        if not isinstance(value, str) or not _IFNAME.match(value):
            raise ValueError(f"not an interface name: {value!r}")
        return f'"{value}"'
    if kind in _NUMBER_TYPES:
        if isinstance(value, int) and 0 <= value < 2**32:
            return str(value)
        if kind == "inet_proto" and value in _PROTOCOLS:
            return str(value)
        raise ValueError(f"not a {kind}: {value!r}")
    raise ValueError(f"set field type {kind} is not supported for moving elements")


def plain_value(value: Any) -> None:
    """ValueError unless ``value`` could be a set value of some supported type
    (the type itself is checked against the set when the element is written)."""
    if isinstance(value, bool):
        raise ValueError(f"not a set value: {value!r}")
    if isinstance(value, int):
        return
    if isinstance(value, dict) and "prefix" in value:
        plain_value(value["prefix"].get("addr"))
        return
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            ipaddress.ip_address(value)
            return
        if _IFNAME.match(value):
            return
    raise ValueError(f"not a set value: {value!r}")


def key_text(info: SetInfo, key: list[Any]) -> str:
    if len(key) != len(info.types):
        raise ValueError(f"key {key} does not fit set {info.name} of type {info.types}")
    return " . ".join(token(v, t) for v, t in zip(key, info.types, strict=True))


def _limit_text(limit: Any) -> str:
    if not isinstance(limit, dict):
        raise ValueError(f"bad limit {limit!r}")
    rate, per = limit.get("rate"), limit.get("per", "second")
    burst = limit.get("burst", 0)
    if not isinstance(rate, int) or per not in _LIMIT_UNITS or not isinstance(burst, int):
        raise ValueError(f"bad limit {limit!r}")
    unit = limit.get("rate_unit")
    text = "limit rate " + ("over " if limit.get("inv") else "")
    if unit and unit != "packets":
        if not isinstance(unit, str) or not _UNIT.match(unit):
            raise ValueError(f"bad limit {limit!r}")
        text += f"{rate} {unit}/{per}"
        burst_unit = limit.get("burst_unit", "bytes")
        if burst and isinstance(burst_unit, str) and _UNIT.match(burst_unit):
            text += f" burst {burst} {burst_unit}"
        return text
    text += f"{rate}/{per}"
    if burst:
        text += f" burst {burst} packets"
    return text


def element_text(
    info: SetInfo, key: list[Any], timeout: int | None, expires: int | None, extra: dict[str, Any]
) -> str:
    """``{ key [limit ...] [counter ...] [timeout Ns expires Ms] }`` for one element."""
    parts = [key_text(info, key)]
    if "limit" in extra:
        parts.append(_limit_text(extra["limit"]))
    if "counter" in extra:
        counter = extra["counter"]
        packets, octets = counter.get("packets", 0), counter.get("bytes", 0)
        if not isinstance(packets, int) or not isinstance(octets, int):
            raise ValueError(f"bad counter {counter!r}")
        parts.append(f"counter packets {packets} bytes {octets}")
    if info.timeout_flag and timeout is not None:
        parts.append(f"timeout {int(timeout)}s")
        if expires is not None:
            parts.append(f"expires {int(expires)}s")
    return "{ " + " ".join(parts) + " }"


def add_line(info: SetInfo, element: str) -> str:
    return f"add element {info.family} {info.table} {info.name} {element}"


def delete_line(info: SetInfo, key: list[Any]) -> str:
    return f"delete element {info.family} {info.table} {info.name} {{ {key_text(info, key)} }}"


def transaction(netns: str | None, lines: Iterable[str]) -> None:
    """Apply ``lines`` as one nft transaction (CommandFailed: nothing applied),
    in-process through libnftables (vmm_kernel.nft)."""
    text = "\n".join(lines)
    if text:
        nft(netns, text + "\n")


def delete_present(netns: str | None, info: SetInfo, keys: list[list[Any]]) -> int:
    """Delete those of ``keys`` still in the set (an element may expire meanwhile).

    nft 1.0.6 has no ``destroy``: deleting an absent element fails the whole
    transaction, so the set is read first and the delete retried once if an
    element expired in between.
    """
    wanted = {json.dumps(k) for k in keys}
    for _attempt in range(3):
        _, elements = list_set(netns, info.family, info.table, info.name)
        present = [e["key"] for e in elements if json.dumps(e["key"]) in wanted]
        try:
            transaction(netns, [delete_line(info, k) for k in present])
            return len(present)
        except OSError:
            continue
    raise OSError(f"could not delete elements from {info.family} {info.table} {info.name}")
