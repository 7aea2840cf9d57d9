"""The nouns every part of the orchestrator shares.

Vocabulary follows NVO3 (RFC 7365/8014): an NVE is the virtual switch/VTEP
on a hypervisor; the NVA is the directory of (VN, MAC, IPs) -> NVE.
Everything here is plain data so it can be journalled as JSON and sent over
HTTP without translation.
"""

from __future__ import annotations

import dataclasses
import enum
import ipaddress
import re
from typing import Any

_MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")


class Phase(str, enum.Enum):
    """Where a migration stands, as the hypervisor's events tell it."""

    PREPARE = "PREPARE"
    SWITCHOVER = "SWITCHOVER"
    RESUMED = "RESUMED"
    COMPLETED = "COMPLETED"
    ABORTED = "ABORTED"


#: The phases that run stages, in the order a successful migration meets them.
ORDERED_PHASES: tuple[Phase, ...] = (
    Phase.PREPARE,
    Phase.SWITCHOVER,
    Phase.RESUMED,
    Phase.COMPLETED,
)


class Role(str, enum.Enum):
    """Which end of the migration this host is."""

    SOURCE = "source"
    DESTINATION = "destination"


def normalize_mac(mac: str) -> str:
    """Return ``mac`` in lower-case colon form or raise ValueError."""
    value = mac.strip().lower().replace("-", ":")
    if not _MAC_RE.match(value):
        raise ValueError(f"not a MAC address: {mac!r} (expected aa:bb:cc:dd:ee:ff)")
    return value


def _checked_ips(values: Any, version: int, what: str) -> tuple[str, ...]:
    if values is None:
        return ()
    if isinstance(values, str) or not isinstance(values, (list, tuple)):
        raise ValueError(f"{what} must be a list of IPv{version} addresses")
    out = []
    for v in values:
        try:
            addr = ipaddress.ip_address(str(v))
        except ValueError:
            raise ValueError(f"{what}: not an IP address: {v!r}") from None
        if addr.version != version:
            raise ValueError(f"{what}: {v!r} is not an IPv{version} address")
        out.append(str(addr))
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class Vif:
    """One virtual NIC of a workload: its MAC, VN and addresses.

    ``port`` is the host-side device (tap or veth end) on whichever host the
    NIC currently sits; it has the same name on both hosts during a
    migration, as libvirt's target device does.
    """

    mac: str
    vni: int
    ipv4: tuple[str, ...] = ()
    ipv6: tuple[str, ...] = ()
    port: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "mac", normalize_mac(self.mac))
        if not isinstance(self.vni, int) or not 0 < self.vni < 2**24:
            raise ValueError(f"VNI must be an integer from 1 to 16777215, got {self.vni!r}")
        object.__setattr__(self, "ipv4", _checked_ips(self.ipv4, 4, "ipv4"))
        object.__setattr__(self, "ipv6", _checked_ips(self.ipv6, 6, "ipv6"))

    def to_dict(self) -> dict[str, Any]:
        return {
            "mac": self.mac,
            "vni": self.vni,
            "ipv4": list(self.ipv4),
            "ipv6": list(self.ipv6),
            "port": self.port,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Vif:
        return cls(
            mac=data["mac"],
            vni=int(data["vni"]),
            ipv4=tuple(data.get("ipv4") or ()),
            ipv6=tuple(data.get("ipv6") or ()),
            port=data.get("port"),
        )


@dataclasses.dataclass(frozen=True)
class Workload:
    """A VM (or lab namespace standing in for one) and its NICs."""

    name: str
    vifs: tuple[Vif, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "vifs": [v.to_dict() for v in self.vifs]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Workload:
        return cls(name=data["name"], vifs=tuple(Vif.from_dict(v) for v in data["vifs"]))


@dataclasses.dataclass(frozen=True)
class Migration:
    """One move of one workload from a source NVE to a destination NVE.

    ``source`` and ``destination`` are NVE identifiers as registered in the
    NVA (in the lab and on libvirt hosts: the host name).
    """

    id: str
    workload: Workload
    source: str
    destination: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "workload": self.workload.to_dict(),
            "source": self.source,
            "destination": self.destination,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Migration:
        return cls(
            id=data["id"],
            workload=Workload.from_dict(data["workload"]),
            source=data["source"],
            destination=data["destination"],
        )


@dataclasses.dataclass(frozen=True)
class MigrationEvent:
    """A normalized hypervisor event: this host met ``phase`` of ``migration``.

    ``monotonic`` is the time.monotonic() at which the event source saw the
    underlying hypervisor signal; the timeline measures from it.
    """

    migration: Migration
    phase: Phase
    role: Role
    monotonic: float
