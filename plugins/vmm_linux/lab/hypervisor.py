"""The lab's stand-in for a hypervisor: it moves a VM's port and emits the
phase events a real hypervisor's event source would, in the same order and
with the same roles (see the phase table in DESIGN.md).

It can also do what QEMU does by itself after an incoming migration: send
five RARP frames from the VM's NIC (+0, +50, +200, +450, +800 ms).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import socket
import threading
import time
import uuid
from typing import Any

from vmm_linux import frames
from vmm_linux.lab.topology import Lab, LabVm
from vmm_linux.netns import socket_in
from vmm_orchestrator.errors import VmmError
from vmm_orchestrator.model import Migration, MigrationEvent, Phase, Role

LOG = logging.getLogger(__name__)

QEMU_RARP_SCHEDULE_MS = (0, 50, 200, 450, 800)
#: libvirt reports the source's STOPPED about 0.23 s after the destination's RESUMED.
COMPLETED_DELAY_S = 0.23


class MigrationVetoed(VmmError):
    """The destination refused the migration at PREPARE."""


@dataclasses.dataclass
class LabMigration:
    """What happened during one lab migration."""

    migration: Migration
    paused_at: float
    resumed_at: float
    reports: list[Any] = dataclasses.field(default_factory=list)
    rarp_sent: int = 0


class LabHypervisor:
    """Migrates lab VMs and feeds the orchestrator's dispatchers.

    ``dispatchers`` maps host name -> object with ``submit(event)`` returning
    a Future (the engine's Dispatcher). None means no orchestrator runs.
    """

    def __init__(
        self, lab: Lab, dispatchers: dict[str, Any] | None, qemu_rarp: bool = True
    ) -> None:
        self.lab = lab
        self.dispatchers = dispatchers
        self.qemu_rarp = qemu_rarp

    def _emit(self, host: str, mig: Migration, phase: Phase, role: Role, at: float) -> Any:
        if self.dispatchers is None:
            return None
        return self.dispatchers[host].submit(MigrationEvent(mig, phase, role, at))

    def migrate(
        self,
        vm: LabVm,
        destination: str,
        downtime_ms: float,
        migration_id: str | None = None,
    ) -> tuple[LabMigration, list[concurrent.futures.Future[Any]]]:
        """Live-migrate ``vm``; returns the record and the phase futures."""
        if destination == vm.host:
            raise VmmError(f"{vm.name} already runs on {destination}")
        if destination not in self.lab.hosts:
            raise VmmError(f"unknown destination host {destination!r}")
        source = vm.host
        mig = Migration(
            id=migration_id or f"mig-{uuid.uuid4().hex[:12]}",
            workload=vm.workload,
            source=source,
            destination=destination,
        )
        futures: list[concurrent.futures.Future[Any]] = []
        prepare = self._emit(destination, mig, Phase.PREPARE, Role.DESTINATION, time.monotonic())
        if prepare is not None:
            report = prepare.result()
            futures.append(prepare)
            if not report.ok:
                raise MigrationVetoed(f"destination {destination} refused: {report.error}")
        paused_at = self.lab.pause(vm)
        fut = self._emit(source, mig, Phase.SWITCHOVER, Role.SOURCE, paused_at)
        if fut is not None:
            futures.append(fut)
        resumed_at = self.lab.move(vm, destination, resume_at=paused_at + downtime_ms / 1000.0)
        fut = self._emit(destination, mig, Phase.RESUMED, Role.DESTINATION, resumed_at)
        if fut is not None:
            futures.append(fut)
        record = LabMigration(migration=mig, paused_at=paused_at, resumed_at=resumed_at)
        rarp = None
        if self.qemu_rarp:
            rarp = threading.Thread(target=self._qemu_rarp, args=(vm, resumed_at, record))
            rarp.start()
        time.sleep(COMPLETED_DELAY_S)
        fut = self._emit(source, mig, Phase.COMPLETED, Role.SOURCE, time.monotonic())
        if fut is not None:
            futures.append(fut)
        if rarp is not None:
            rarp.join()
        return record, futures

    def _qemu_rarp(self, vm: LabVm, resumed_at: float, record: LabMigration) -> None:
        """QEMU's self-announcement: RARP from the NIC's MAC, five times."""
        sock = socket_in(vm.netns, socket.AF_PACKET, socket.SOCK_RAW, 0)
        try:
            sock.bind(("eth0", 0))
            frame = frames.rarp(vm.mac)
            for offset in QEMU_RARP_SCHEDULE_MS:
                delay = resumed_at + offset / 1000.0 - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                sock.send(frame)
                record.rarp_sent += 1
        except OSError as exc:
            LOG.warning("RARP from %s failed: %s", vm.name, exc)
        finally:
            sock.close()
