"""MACsec (802.1AE) secure associations between the VM and its port.

When a VM and its access port run MACsec, the port decrypts the VM's frames
with the receive SA's key and encrypts frames to the VM with the transmit
SA's. A destination without those SAs drops everything the VM sends until
MKA negotiates anew. The host side here is a Linux ``macsec`` device on the
VM's port; its SAs move with the VM.

Two rules make moving an SA safe:
  * a key is never used twice with the same packet number (GCM would leak
    the key stream): the destination's transmit SA starts at the exported
    next PN plus ``[state_macsec] pn_margin``, which covers the frames the
    source may still encrypt between export and the VM's pause; if that does
    not fit the PN space the import fails (the SA needs a rekey);
  * the receive SA starts at the exported lowest acceptable PN, so frames
    the source already accepted cannot be replayed at the destination.

The kernel never reveals an SA's key, so keys come from the key store the
MKA agent writes when it installs an SA (:class:`KeyStore`, one root-only
JSON file per namespace, keyed by the 128-bit key identifier). An exported
entry therefore carries secret keys: the bundle must travel over an
encrypted channel ([state] cert_file/key_file/ca_file), not only a signed one.

Entry shape (JSON), one per MACsec device on a VM port::

    {"port": "tap-vm1", "device": "ms-vm1", "bridge": "br-100" | null,
     "sci": "525400006401fffe",            (the host side's TX SCI, hex)
     "cipher": "GCM-AES-128", "icv_len": 16, "encoding_sa": 0,
     "encrypt": true, "send_sci": true, "end_station": false, "scb": false,
     "protect": true, "replay": false, "window": 0, "validate": "strict",
     "tx_sa": [{"an": 0, "next_pn": 1234, "active": true,
                "key_id": 32 hex digits, "key": 32|64 hex digits}],
     "rx_sc": [{"sci": "525400006410" + "0001", "active": true,
                "sa": [{"an": 0, "next_pn": 99, "active": true, "key_id": ..., "key": ...}]}]}

A receive channel belongs to the VM only if its SCI's address part is the
VM's MAC: the VM is the only station that transmits on its port.

This kernel may lack MACsec (CONFIG_MACSEC): :func:`macsec_unsupported`
finds out at run time by trying to create a device, and the kind answers
FAIL/unsupported with the kernel's words.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import threading
from collections.abc import Iterator
from typing import Any, ClassVar

from oslo_config import cfg

from vmm_kernel.netns import CommandFailed, run
from vmm_orchestrator.model import normalize_mac
from vmm_orchestrator.statekind import ImportResult, KindContext, PoisonedEntry, Reason
from vmm_state.kinds._common import (
    BaseKind,
    max_entries_opt,
    require,
    vif_for_port,
)

#: Highest packet number of the 32-bit PN ciphers. The XPN suites (64-bit
#: PNs) also need each SA's SSCI and salt, which the key store does not keep
#: yet: entries with them are refused as malformed.
PN_MAX_32 = 2**32 - 1
CIPHERS = {"GCM-AES-128", "GCM-AES-256"}
VALIDATE = ("disabled", "check", "strict")
_HEX = re.compile(r"^[0-9a-f]+$")

_probe_lock = threading.Lock()
_probed: dict[str | None, str | None] = {}


def macsec_unsupported(netns: str | None) -> str | None:
    """None if ``netns``'s kernel can create MACsec devices, else why not.

    Asks the MACsec generic netlink family first (no side effects); if it
    does not answer, creates a veth pair and a macsec device on it (and
    removes them) to report the kernel's own words. The answer is cached per
    namespace. (Not a dummy device: kernels without
    CONFIG_DUMMY exist, this one among them.)
    """
    with _probe_lock:
        if netns in _probed:
            return _probed[netns]
        try:  # no side effects: the generic netlink family answers when MACsec is there
            run(netns, "ip", "macsec", "show")
        except CommandFailed:
            pass
        else:
            _probed[netns] = None
            return None
        base = f"vmmpb{secrets.token_hex(3)}"
        answer: str | None = None
        try:
            run(netns, "ip", "link", "add", base, "type", "veth", "peer", "name", f"{base}p")
        except CommandFailed as exc:
            answer = f"cannot create a veth pair to probe MACsec on: {exc}"
        else:
            try:
                run(netns, "ip", "link", "add", "link", base, f"{base}m", "type", "macsec")
            except CommandFailed as exc:
                answer = f"this kernel cannot create MACsec devices: {exc.stderr.strip()}"
            finally:
                run(netns, "ip", "link", "del", f"{base}m", check=False)
                run(netns, "ip", "link", "del", base, check=False)
        _probed[netns] = answer
        return answer


class KeyStore:
    """The SAKs of this host's MACsec SAs, by key identifier (hex).

    The MKA agent (or the import) writes a key when it installs an SA; the
    export reads it back because the kernel never returns keys.
    """

    def __init__(self, directory: str, netns: str | None) -> None:
        self.path = os.path.join(directory, f"{netns or 'host'}.json")
        self._lock = threading.Lock()

    def _load(self) -> dict[str, str]:
        try:
            with open(self.path, encoding="utf-8") as fh:
                data = json.load(fh)
        except FileNotFoundError:
            return {}
        return {str(k): str(v) for k, v in data.items()}

    def _save(self, keys: dict[str, str]) -> None:
        os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
        tmp = f"{self.path}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(keys, fh)
        os.replace(tmp, self.path)

    def get(self, key_id: str) -> str | None:
        with self._lock:
            return self._load().get(key_id.lower())

    def put(self, key_id: str, key: str) -> None:
        with self._lock:
            keys = self._load()
            keys[key_id.lower()] = key.lower()
            self._save(keys)

    def drop(self, key_ids: list[str]) -> None:
        with self._lock:
            keys = self._load()
            for key_id in key_ids:
                keys.pop(key_id.lower(), None)
            self._save(keys)


# -- reading the kernel ---------------------------------------------------------

_SA_LINE = re.compile(
    r"^\s*(?P<an>\d+): PN (?P<pn>\d+), state (?P<state>on|off),"
    r"(?: SSCI (?P<ssci>\d+),)? key (?P<key>[0-9a-f]+)"
)
_TXSC = re.compile(r"^\s*TXSC: (?P<sci>[0-9a-f]+) on SA (?P<an>\d+)")
_RXSC = re.compile(r"^\s*RXSC: (?P<sci>[0-9a-f]+), state (?P<state>on|off)")
_HEAD = re.compile(r"^\d+: (?P<dev>[^:]+): (?P<rest>.*)$")


def parse_macsec_text(text: str) -> list[dict[str, Any]]:
    """Parse ``ip macsec show`` text (iproute2's format) into the JSON shape
    ``ip -j macsec show`` has: ifname, sci, sa_list, rx_sc[sci, active, sa_list]."""
    devices: list[dict[str, Any]] = []
    dev: dict[str, Any] | None = None
    sa_list: list[dict[str, Any]] | None = None
    for line in text.splitlines():
        head = _HEAD.match(line)
        if head:
            dev = {"ifname": head["dev"], "sa_list": [], "rx_sc": []}
            words = head["rest"].split()
            for name, value in zip(words[::2], words[1::2], strict=False):
                if value in ("on", "off"):
                    dev[name] = value == "on"
                elif name == "validate":
                    dev["validate"] = value
                elif name == "window" and value.isdigit():
                    dev["window"] = int(value)
            devices.append(dev)
            continue
        if dev is None:
            continue
        if "cipher suite:" in line:
            found = re.search(r"cipher suite: ([^,]+), using ICV length (\d+)", line)
            if found:
                dev["cipher_suite"], dev["icv_length"] = found[1], int(found[2])
            continue
        tx = _TXSC.match(line)
        if tx:
            dev["sci"], dev["encoding_sa"] = tx["sci"], int(tx["an"])
            sa_list = dev["sa_list"]
            continue
        rx = _RXSC.match(line)
        if rx:
            rx_sas: list[dict[str, Any]] = []
            dev["rx_sc"].append(
                {"sci": rx["sci"], "active": rx["state"] == "on", "sa_list": rx_sas}
            )
            sa_list = rx_sas
            continue
        sa = _SA_LINE.match(line)
        if sa and sa_list is not None:
            item: dict[str, Any] = {
                "an": int(sa["an"]),
                "pn": int(sa["pn"]),
                "active": sa["state"] == "on",
                "key": sa["key"],
            }
            if sa["ssci"]:
                item["ssci"] = int(sa["ssci"])
            sa_list.append(item)
    return devices


def _sci(value: Any) -> str:
    """An SCI as 16 lower-case hex digits (ValueError otherwise)."""
    if isinstance(value, int):
        value = f"{value:016x}"
    if not isinstance(value, str):
        raise ValueError(f"not an SCI: {value!r}")
    text = value.lower().removeprefix("0x").zfill(16)
    if len(text) != 16 or not _HEX.match(text):
        raise ValueError(f"not an SCI: {value!r}")
    return text


def _sci_mac(sci: str) -> str:
    return ":".join(sci[i : i + 2] for i in range(0, 12, 2))


def _hex(value: Any, lengths: tuple[int, ...], what: str) -> str:
    if not isinstance(value, str) or not _HEX.match(value.lower()) or len(value) not in lengths:
        raise ValueError(f"{what} must be {' or '.join(map(str, lengths))} hex digits")
    return value.lower()


class MacsecKind(BaseKind):
    """The secure associations of MACsec devices on the VM's ports."""

    name = "macsec"
    default_max_entries = 16
    opts: ClassVar[list[cfg.Opt]] = [
        max_entries_opt(16, "MACsec devices (secure channels with their SAs)"),
        cfg.IntOpt(
            "pn_margin",
            default=1 << 20,
            min=1,
            help="Packet numbers skipped on each transmit SA at the destination beyond "
            "the exported next PN. Covers the frames the source may still encrypt "
            "between the export and the VM's pause: a key must never be used twice "
            "with one packet number.",
        ),
        cfg.StrOpt(
            "key_dir",
            default="/run/vmm-state/macsec",
            help="Directory of the SAK key store (one root-only file per network "
            "namespace): the kernel never returns an SA's key.",
        ),
    ]

    def keys(self, ctx: KindContext) -> KeyStore:
        return KeyStore(self.conf[self.group].key_dir, ctx.netns)

    def unavailable(self, ctx: KindContext) -> str | None:
        return macsec_unsupported(ctx.netns)

    # -- export ------------------------------------------------------------

    @staticmethod
    def _links(ctx: KindContext) -> list[dict[str, Any]]:
        try:
            out = run(ctx.netns, "ip", "-j", "-d", "link", "show", "type", "macsec")
        except CommandFailed:
            return []
        return list(json.loads(out or "[]"))

    @staticmethod
    def _show(ctx: KindContext, device: str) -> dict[str, Any]:
        try:
            found = json.loads(run(ctx.netns, "ip", "-j", "macsec", "show", device) or "[]")
        except (ValueError, CommandFailed):
            found = parse_macsec_text(run(ctx.netns, "ip", "macsec", "show", device))
        if not found:
            raise LookupError(f"ip macsec show {device}: nothing")
        return dict(found[0])

    def _sa(self, store: KeyStore, raw: dict[str, Any]) -> dict[str, Any]:
        key_id = str(raw["key"]).lower()
        key = store.get(key_id)
        if key is None:
            raise LookupError(f"no key for key id {key_id} in the key store")
        return {
            "an": int(raw["an"]),
            "next_pn": int(raw["pn"]),
            "active": bool(raw.get("active", True)),
            "key_id": key_id,
            "key": key,
        }

    def export(self, ctx: KindContext, since: float | None = None) -> Iterator[dict[str, Any]]:
        """Every MACsec device on a VM port, with its SAs' next PNs and keys."""
        ports = {v.port for v in ctx.vifs if v.port}
        store = self.keys(ctx)
        for link in self._links(ctx):
            if link.get("link") not in ports:
                continue
            data = link.get("linkinfo", {}).get("info_data", {})
            show = self._show(ctx, link["ifname"])
            yield {
                "port": link["link"],
                "device": link["ifname"],
                "bridge": link.get("master"),
                "sci": _sci(data.get("sci") or show.get("sci")),
                "cipher": data.get("cipher_suite") or show.get("cipher_suite", "GCM-AES-128"),
                "icv_len": int(data.get("icv_len") or show.get("icv_length", 16)),
                "encoding_sa": int(data.get("encoding_sa", show.get("encoding_sa", 0))),
                "encrypt": bool(data.get("encrypt", show.get("encrypt", True))),
                "send_sci": bool(data.get("inc_sci", show.get("send_sci", True))),
                "end_station": bool(data.get("es", show.get("end_station", False))),
                "scb": bool(data.get("scb", show.get("scb", False))),
                "protect": bool(data.get("protect", show.get("protect", True))),
                "replay": bool(data.get("replay_protect", show.get("replay", False))),
                "window": int(data.get("window", show.get("window", 0)) or 0),
                "validate": data.get("validation") or show.get("validate", "strict"),
                "tx_sa": [self._sa(store, sa) for sa in show.get("sa_list", [])],
                "rx_sc": [
                    {
                        "sci": _sci(sc["sci"]),
                        "active": bool(sc.get("active", True)),
                        "sa": [self._sa(store, sa) for sa in sc.get("sa_list", [])],
                    }
                    for sc in show.get("rx_sc", [])
                ],
            }

    # -- check -------------------------------------------------------------

    def check(self, ctx: KindContext, entry: dict[str, Any]) -> None:
        require(entry, "port", "device", "sci", "cipher", "tx_sa", "rx_sc")
        vif = vif_for_port(ctx, entry["port"])
        if not isinstance(entry["device"], str) or not re.match(
            r"^[A-Za-z0-9_.-]{1,15}$", entry["device"]
        ):
            raise ValueError(f"bad device name {entry['device']!r}")
        _sci(entry["sci"])
        if entry["cipher"] not in CIPHERS:
            raise ValueError(f"unknown cipher {entry['cipher']!r}")
        if entry.get("validate", "strict") not in VALIDATE:
            raise ValueError(f"bad validate {entry.get('validate')!r}")
        top = PN_MAX_32
        key_len = (64,) if entry["cipher"].endswith("256") else (32,)
        for sa in entry["tx_sa"]:
            self._check_sa(sa, top, key_len)
        for sc in entry["rx_sc"]:
            sci = _sci(sc.get("sci"))
            if normalize_mac(_sci_mac(sci)) != vif.mac:
                raise PoisonedEntry(
                    f"receive channel {sci} is not the VM's: its address part is not {vif.mac}"
                )
            for sa in sc.get("sa", []):
                self._check_sa(sa, top, key_len)

    @staticmethod
    def _check_sa(sa: Any, top: int, key_len: tuple[int, ...]) -> None:
        require(sa, "an", "next_pn", "key_id", "key")
        if sa["an"] not in (0, 1, 2, 3):
            raise ValueError(f"association number must be 0..3, got {sa['an']!r}")
        pn = sa["next_pn"]
        if isinstance(pn, bool) or not isinstance(pn, int) or not 1 <= pn <= top:
            raise ValueError(f"next_pn must be 1..{top}, got {pn!r}")
        _hex(sa["key_id"], (32,), "key_id")
        _hex(sa["key"], key_len, "key")

    # -- import ------------------------------------------------------------

    def _commands(self, entry: dict[str, Any]) -> list[list[str]]:
        """The iproute2 commands that recreate ``entry`` (device first)."""
        onoff = {True: "on", False: "off"}
        top = PN_MAX_32
        dev = entry["device"]
        link = ["ip", "link", "add", "link", entry["port"], dev, "type", "macsec"]
        link += ["sci", _sci(entry["sci"]), "cipher", entry["cipher"].lower()]
        link += ["icvlen", str(int(entry.get("icv_len", 16)))]
        link += ["encrypt", onoff[bool(entry.get("encrypt", True))]]
        if entry.get("end_station"):
            link += ["end_station", "on"]
        elif entry.get("scb"):
            link += ["scb", "on"]
        else:
            link += ["send_sci", onoff[bool(entry.get("send_sci", True))]]
        link += ["protect", onoff[bool(entry.get("protect", True))]]
        if entry.get("replay"):
            link += ["replay", "on", "window", str(int(entry.get("window", 0)))]
        link += ["validate", entry.get("validate", "strict")]
        link += ["encodingsa", str(int(entry.get("encoding_sa", 0)))]
        cmds = [link]
        margin = int(self.conf[self.group].pn_margin)
        for sa in entry["tx_sa"]:
            pn = int(sa["next_pn"]) + margin
            if pn > top:
                raise _PnExhausted(
                    f"transmit SA {sa['an']} of {dev}: next PN {sa['next_pn']} + margin "
                    f"{margin} exceeds {top}; the SA must be rekeyed before it can move"
                )
            cmds.append(
                ["ip", "macsec", "add", dev, "tx", "sa", str(sa["an"]), "pn", str(pn),
                 onoff[bool(sa.get("active", True))], "key", sa["key_id"], sa["key"]]
            )  # fmt: skip
        for sc in entry["rx_sc"]:
            sci = _sci(sc["sci"])
            cmds.append(
                ["ip", "macsec", "add", dev, "rx", "sci", sci, onoff[bool(sc.get("active", True))]]
            )
            for sa in sc.get("sa", []):
                cmds.append(
                    ["ip", "macsec", "add", dev, "rx", "sci", sci, "sa", str(sa["an"]),
                     "pn", str(int(sa["next_pn"])), onoff[bool(sa.get("active", True))],
                     "key", sa["key_id"], sa["key"]]
                )  # fmt: skip
        if entry.get("bridge"):
            cmds.append(["ip", "link", "set", dev, "master", str(entry["bridge"])])
        cmds.append(["ip", "link", "set", dev, "up"])
        return cmds

    def import_(self, ctx: KindContext, entries: list[dict[str, Any]]) -> ImportResult:
        refused = self.too_many(len(entries))
        if refused:
            return refused
        why = self.unavailable(ctx)
        if why:
            return ImportResult.fail(self.name, Reason.UNSUPPORTED, why)
        existing = {link.get("link"): link["ifname"] for link in self._links(ctx)}
        store = self.keys(ctx)
        created: list[str] = []
        key_ids: list[str] = []
        try:
            for entry in entries:
                if entry["port"] in existing:
                    raise _Conflict(
                        f"port {entry['port']} already has MACsec device {existing[entry['port']]}"
                    )
                commands = self._commands(entry)
                run(ctx.netns, *commands[0])
                created.append(entry["device"])
                for argv in commands[1:]:
                    run(ctx.netns, *argv)
                for sa in [*entry["tx_sa"], *(s for sc in entry["rx_sc"] for s in sc["sa"])]:
                    store.put(sa["key_id"], sa["key"])
                    key_ids.append(sa["key_id"])
        except (CommandFailed, _PnExhausted, _Conflict) as exc:
            self._remove(ctx, created, key_ids)
            if isinstance(exc, _Conflict):
                return ImportResult.fail(self.name, Reason.POLICY_CONFLICT, str(exc))
            if isinstance(exc, _PnExhausted):
                return ImportResult.fail(self.name, Reason.UNSUPPORTED, str(exc))
            return self.refused(exc.errno or errno.EINVAL, f"MACsec import refused: {exc}")
        return ImportResult.success(
            self.name, len(created), {"devices": created, "key_ids": sorted(set(key_ids))}
        )

    def _remove(self, ctx: KindContext, devices: list[str], key_ids: list[str]) -> None:
        for dev in devices:
            run(ctx.netns, "ip", "link", "del", dev, check=False)
        if key_ids:
            with contextlib.suppress(OSError):
                self.keys(ctx).drop(key_ids)

    def revert_import(self, ctx: KindContext, record: dict[str, Any]) -> None:
        """Delete the devices the import created (their SAs go with them)."""
        self._remove(ctx, list(record.get("devices", [])), list(record.get("key_ids", [])))

    def cleanup_source(self, ctx: KindContext) -> None:
        """Delete the departed VM's MACsec devices and forget their keys."""
        ports = {v.port for v in ctx.vifs if v.port}
        devices, key_ids = [], []
        for link in self._links(ctx):
            if link.get("link") in ports:
                devices.append(link["ifname"])
                with contextlib.suppress(LookupError, CommandFailed, ValueError):
                    show = self._show(ctx, link["ifname"])
                    key_ids += [str(sa["key"]) for sa in show.get("sa_list", [])]
                    for sc in show.get("rx_sc", []):
                        key_ids += [str(sa["key"]) for sa in sc.get("sa_list", [])]
        self._remove(ctx, devices, key_ids)


class _PnExhausted(Exception):
    """The transmit SA's PN space cannot take the safety margin."""


class _Conflict(Exception):
    """The destination port already has its own MACsec device."""


def establish(
    netns: str | None,
    port: str,
    device: str,
    peer_mac: str,
    key_dir: str,
    tx_pn: int = 1,
    rx_pn: int = 1,
) -> dict[str, str]:
    """What an MKA agent does once it agreed SAKs with the VM: a MACsec
    device on ``port`` with one transmit SA and one receive channel/SA for
    the VM (SCI = its MAC, port 1), keys recorded in the key store.

    Returns the key ids and keys (tests compare them after a move).
    """
    tx_id, tx_key = secrets.token_hex(16), secrets.token_hex(16)
    rx_id, rx_key = secrets.token_hex(16), secrets.token_hex(16)
    rx_sci = normalize_mac(peer_mac).replace(":", "") + "0001"
    run(netns, "ip", "link", "add", "link", port, device, "type", "macsec", "encrypt", "on")
    run(netns, "ip", "macsec", "add", device, "tx", "sa", "0", "pn", str(tx_pn), "on",
        "key", tx_id, tx_key)  # fmt: skip
    run(netns, "ip", "macsec", "add", device, "rx", "sci", rx_sci, "on")
    run(netns, "ip", "macsec", "add", device, "rx", "sci", rx_sci, "sa", "0", "pn", str(rx_pn),
        "on", "key", rx_id, rx_key)  # fmt: skip
    store = KeyStore(key_dir, netns)
    store.put(tx_id, tx_key)
    store.put(rx_id, rx_key)
    return {"tx_id": tx_id, "tx_key": tx_key, "rx_id": rx_id, "rx_key": rx_key, "rx_sci": rx_sci}
