"""Build Migration objects from the directory, the one place both ends meet.

libvirt tells each end only its own side of a migration, so the ends learn
the rest from the NVA:

* the **destination** chooses the migration id at PREPARE
  (``<domain uuid>-<time_ns>``), and the nva_prestage stage writes it into
  the directory as the endpoint's pending migration; the source NVE is the
  endpoint's current ``nve``;
* the **source** learns the destination and the id at SWITCHOVER from the
  endpoint's ``pending_nve`` and ``migration_id`` or, when the destination
  already committed (its RESUMED comes before the source's STOPPED), from the
  endpoint's new ``nve`` and ``last_migration_id``.

A host's NVE id is its name in the directory. All NICs of one VM move
together; the first NIC the directory knows decides, and a NIC that
disagrees is logged.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from vmm_orchestrator.errors import VmmError
from vmm_orchestrator.model import Migration, Workload
from vmm_orchestrator.nva import errors as nva_errors

LOG = logging.getLogger(__name__)


class ResolveError(VmmError):
    """The directory does not describe the move this host is asked about."""


class NothingToMove(ResolveError):
    """No network to move: no managed NIC, or the directory already places the VM here."""


def new_migration_id(uuid: str, clock: Callable[[], int] = time.time_ns) -> str:
    """The id a destination gives a migration it prepares."""
    return f"{uuid}-{clock()}"


class Resolver:
    """Migration objects for one host (``host`` = its NVE id) from directory ``nva``."""

    def __init__(self, nva: Any, host: str, clock: Callable[[], int] = time.time_ns) -> None:
        self.nva = nva
        self.host = host
        self._clock = clock

    def _endpoints(self, workload: Workload) -> list[dict[str, Any]]:
        """The directory's endpoint of each NIC it knows; ResolveError if it knows none."""
        if not workload.vifs:
            raise NothingToMove(
                f"VM {workload.name} has no managed NIC",
                hint="map its bridges to VNIs with [libvirt] bridge_vnis or bridge_vni_pattern",
            )
        found = []
        for vif in workload.vifs:
            try:
                found.append(self.nva.get_endpoint(vif.vni, vif.mac))
            except nva_errors.NotFound:
                LOG.warning(
                    "VM %s: the directory has no endpoint %s in VNI %s",
                    workload.name,
                    vif.mac,
                    vif.vni,
                )
        if not found:
            macs = ", ".join(f"{v.mac} (VNI {v.vni})" for v in workload.vifs)
            raise ResolveError(
                f"the directory knows none of the NICs of VM {workload.name}: {macs}",
                hint="register the VM's endpoints in the NVA before migrating it",
            )
        return found

    def _agree(self, workload: Workload, endpoints: list[dict[str, Any]], key: str) -> None:
        values = {str(e.get(key)) for e in endpoints}
        if len(values) > 1:
            LOG.warning(
                "VM %s: its NICs disagree in the directory on %s (%s); using the first NIC's",
                workload.name,
                key,
                ", ".join(sorted(values)),
            )

    def for_destination(
        self,
        uuid: str,
        workload: Workload,
        reusable: Callable[[str], bool] = lambda _mid: True,
    ) -> Migration:
        """The incoming migration of ``workload`` (domain ``uuid``) to this host.

        A move already pending to this host keeps its id (the hook's PREPARE
        and the STARTED/MIGRATED event then name the same migration) unless
        ``reusable`` says that id is spent (journalled as finished here).
        Raises NothingToMove when the directory already places the VM here.
        """
        endpoints = self._endpoints(workload)
        first = endpoints[0]
        self._agree(workload, endpoints, "nve")
        pending = first.get("state") == "pending" and first.get("pending_nve") == self.host
        mid = first.get("migration_id") if pending else None
        if mid and reusable(str(mid)):
            return Migration(str(mid), workload, str(first["nve"]), self.host)
        if first.get("nve") == self.host and not pending:
            raise NothingToMove(
                f"the directory already places VM {workload.name} at {self.host}",
                hint="nothing to move in the network",
            )
        return Migration(
            new_migration_id(uuid, self._clock), workload, str(first["nve"]), self.host
        )

    def pending_for_destination(self, workload: Workload) -> Migration | None:
        """The move pending to this host, if the directory holds one (for ABORTED)."""
        try:
            endpoints = self._endpoints(workload)
        except ResolveError:
            return None
        first = endpoints[0]
        if first.get("state") == "pending" and first.get("pending_nve") == self.host:
            return Migration(str(first["migration_id"]), workload, str(first["nve"]), self.host)
        return None

    def for_source(self, workload: Workload) -> Migration:
        """The outgoing migration of ``workload`` from this host.

        Raises ResolveError when the directory shows no move away from here
        (the destination runs no orchestrator, or nothing moved).
        """
        endpoints = self._endpoints(workload)
        first = endpoints[0]
        if first.get("state") == "pending" and first.get("pending_nve") not in (None, self.host):
            self._agree(workload, endpoints, "pending_nve")
            return Migration(
                str(first["migration_id"]), workload, self.host, str(first["pending_nve"])
            )
        if first.get("nve") != self.host and first.get("last_migration_id"):
            self._agree(workload, endpoints, "nve")
            return Migration(
                str(first["last_migration_id"]), workload, self.host, str(first["nve"])
            )
        raise ResolveError(
            f"the directory shows no move of VM {workload.name} away from {self.host} "
            f"(endpoint {first.get('mac')} at {first.get('nve')}, state {first.get('state')})",
            hint="does the destination run vmm agent with the nva_prestage stage?",
        )
