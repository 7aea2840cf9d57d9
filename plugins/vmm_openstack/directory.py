"""The directory contract the OpenStack plugin relies on, and the embedded NVA behind it.

The core's stages (``NvaPrestage``, ``PeerUpdate``) talk to ``ctx.host.nva``
by duck typing: ``prestage``, ``commit``, ``abort``, ``acks`` and
``expire`` keyed by (VNI, MAC) and a migration id, as ``NvaClient`` offers
them. ``Directory`` writes that contract down, plus the few calls
``vmm migrate-with-network`` needs beyond it:

* ``lookup(mac)``: which VN(s) and addresses a NIC has (the libvirt path
  knows only the MACs in the domain XML);
* ``release``, ``expect`` and ``clean_stale``: for Nova-driven
  migrations, where Nova's conductor creates the destination's port
  binding itself (see ``neutron.NeutronDirectory``).

``NeutronDirectory`` (neutron.py) implements it on Neutron port bindings;
``NvaDirectory`` here wraps the embedded NVA's client, for libvirt sites
without OpenStack.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

from vmm_orchestrator.nva.client import NvaClient
from vmm_orchestrator.nva.errors import NotFound


@dataclasses.dataclass(frozen=True)
class Nic:
    """One NIC of the migrating VM as the directory knows it.

    ``port_id`` is Neutron's port id (None with the embedded NVA);
    ``network`` is a name for messages (Neutron's network name, or the VN).
    """

    mac: str
    vni: int
    ipv4: tuple[str, ...] = ()
    ipv6: tuple[str, ...] = ()
    port_id: str | None = None
    network: str = ""

    @property
    def label(self) -> str:
        """How messages name this NIC: the port id's first block, else the MAC."""
        return f"port {self.port_id[:8]}" if self.port_id else f"NIC {self.mac}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"ipv4": list(self.ipv4), "ipv6": list(self.ipv6)}


@runtime_checkable
class Directory(Protocol):
    """The NVA role: where each (VNI, MAC) lives, and its move in three steps."""

    #: Short name for messages ("neutron", "nva").
    kind: str
    #: Where the directory is, for messages.
    where: str

    def lookup(self, mac: str) -> list[Nic]:
        """The NICs (one per VN) with this MAC; empty when the directory has none."""

    def prestage(self, vni: int, mac: str, nve: str, migration_id: str) -> dict[str, Any]:
        """Prepare ``nve`` to receive the endpoint; traffic does not move yet."""

    def commit(self, vni: int, mac: str, migration_id: str) -> dict[str, Any]:
        """Move the endpoint to its prestaged NVE: ``{"endpoint", "revision", "committed_at"}``."""

    def abort(self, vni: int, mac: str, migration_id: str) -> dict[str, Any]:
        """Undo the prestage; the endpoint stays where it is. Repeating it is harmless."""

    def acks(
        self,
        vni: int,
        min_revision: int,
        nves: Sequence[str] | None = None,
        timeout: float = 0.0,
    ) -> dict[str, dict[str, Any]]:
        """Wait up to ``timeout`` s until the NVEs applied ``min_revision``; their state."""

    def expire(self, vni: int, mac: str, nves: Sequence[str]) -> dict[str, Any]:
        """Ask ``nves`` to drop a cached location of ``mac``."""

    def release(self, vni: int, mac: str, migration_id: str) -> dict[str, Any]:
        """Hand a prestaged destination over to another party that will set it up itself."""

    def expect(self, vni: int, mac: str, nve: str, migration_id: str) -> dict[str, Any]:
        """Note that another party prepares ``nve`` for this migration; commit/abort follow."""

    def clean_stale(self, vni: int, mac: str) -> list[dict[str, Any]]:
        """Remove leftovers of earlier migrations that would block the next one."""

    def close(self) -> None:
        """Release connections."""


class NvaDirectory:
    """The embedded NVA (``vmm nva serve``) as a ``Directory``.

    Prestage, commit, abort, acks and expire are the NVA's own; the NVA
    keeps no leftovers a later migration trips on (a pending endpoint is
    aborted by its migration id), so ``clean_stale`` has nothing to do,
    and nobody else prepares an NVE, so ``release``/``expect`` are no-ops.
    """

    kind = "nva"

    def __init__(self, client: NvaClient) -> None:
        self.client = client
        self.where = client.url
        self.notes: list[str] = []

    def lookup(self, mac: str) -> list[Nic]:
        from vmm_orchestrator.model import normalize_mac

        mac = normalize_mac(mac)
        return [
            Nic(
                mac=e["mac"],
                vni=int(e["vni"]),
                ipv4=tuple(e.get("ipv4") or ()),
                ipv6=tuple(e.get("ipv6") or ()),
                network=f"VN {e['vni']}",
            )
            for e in self.client.list_endpoints()
            if e["mac"] == mac
        ]

    def prestage(self, vni: int, mac: str, nve: str, migration_id: str) -> dict[str, Any]:
        return self.client.prestage(vni, mac, nve, migration_id)

    def commit(self, vni: int, mac: str, migration_id: str) -> dict[str, Any]:
        return self.client.commit(vni, mac, migration_id)

    def abort(self, vni: int, mac: str, migration_id: str) -> dict[str, Any]:
        try:
            return self.client.abort(vni, mac, migration_id)
        except NotFound:
            return {}

    def acks(
        self,
        vni: int,
        min_revision: int,
        nves: Sequence[str] | None = None,
        timeout: float = 0.0,
    ) -> dict[str, dict[str, Any]]:
        return self.client.acks(vni, min_revision, nves=nves, timeout=timeout)

    def expire(self, vni: int, mac: str, nves: Sequence[str]) -> dict[str, Any]:
        return self.client.expire(vni, mac, nves)

    def release(self, vni: int, mac: str, migration_id: str) -> dict[str, Any]:
        return {}

    def expect(self, vni: int, mac: str, nve: str, migration_id: str) -> dict[str, Any]:
        return {}

    def clean_stale(self, vni: int, mac: str) -> list[dict[str, Any]]:
        return []

    def close(self) -> None:
        self.client.close()
