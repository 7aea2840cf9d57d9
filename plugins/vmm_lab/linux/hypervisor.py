"""The lab's stand-in for a hypervisor: it moves a VM's port and emits the
phase events a real hypervisor's event source would, in the same order and
with the same roles (see the phase table in DESIGN.md).

It can also do what QEMU does by itself after an incoming migration: send
five RARP frames from the VM's NIC (+0, +50, +200, +450, +800 ms).

Two options, both off by default (the lab then behaves exactly as before),
make it closer to QEMU and libvirt where a state transfer needs it:

``hold_switchover``
    QEMU's migration capability ``pause-before-switchover``: once the guest
    is paused the source waits, before it sends the final device state, for
    the management layer to say ``migrate-continue`` (or to cancel). That is
    the window in which the state delta of SWITCHOVER must land at the
    destination, so the lab waits for the SWITCHOVER phase report before it
    moves and resumes the VM, bounded by ``switchover_timeout``. The wait is
    inside the pause and counted in the downtime (``LabMigration``
    ``switchover_wait_ms``). A failed or late SWITCHOVER cancels the
    migration: the VM resumes at the source and both hosts get ABORTED,
    which is what a management layer must do when the state could not follow
    (resuming at the destination would break exactly what the state stages
    protect).

``libvirt_ports``
    The lab's shortcut is one port (a veth end) that is taken down at the
    pause and moved to the destination at resume. libvirt and QEMU differ in
    two ways that matter for port-bound state (multicast memberships, 802.1X
    FDB entries): the destination's tap exists from when the incoming QEMU
    starts (after PREPARE: libvirt runs the PREPARE hook before it creates
    the tap, see vmm_libvirt.daemon), and a paused guest's tap stays up, so
    the source keeps the port's entries through the pause. With this option
    the destination gets its own port (named like the source's) on its VN
    bridge right after PREPARE succeeded; the pause puts the source port in
    bridge state *listening* (nothing in or out, memberships kept: a
    *disabled* port would lose them); at resume the VM's end of its veth
    moves to the destination and is joined to that port by a tc redirect in
    both directions, the lab's equivalent of QEMU opening the tap. So at
    SWITCHOVER, as with QEMU, both ports exist: the source's, with its
    entries, and the destination's, ready to receive them.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from vmm_kernel.netns import socket_in
from vmm_lab.linux.topology import Lab, LabError, LabVm, in_ns
from vmm_orchestrator import frames
from vmm_orchestrator.errors import VmmError
from vmm_orchestrator.model import Migration, MigrationEvent, Phase, Role

LOG = logging.getLogger(__name__)

QEMU_RARP_SCHEDULE_MS = (0, 50, 200, 450, 800)
#: How long before the resume the lab moves a paused VM's port (see ``_move``).
PORT_MOVE_LEAD_S = 0.05
#: libvirt reports the source's STOPPED about 0.23 s after the destination's RESUMED.
COMPLETED_DELAY_S = 0.23
#: Bridge port states (``bridge link set dev X state N``).
BR_STATE_LISTENING = 1
BR_STATE_FORWARDING = 3
#: tc: the ingress hook of a clsact qdisc, and ETH_P_ALL.
TC_H_CLSACT_INGRESS = 0xFFFFFFF2
ETH_P_ALL = 0x0003

#: ``on_port(vm, host, plugged)``: the VM's port appeared on (True) or left
#: (False) ``host``'s bridge. What a port plug writes (security group, port
#: settings) is the caller's business, as it is Neutron's or os-vif's.
PortHook = Callable[[LabVm, str, bool], None]


class MigrationVetoed(VmmError):
    """The destination refused the migration at PREPARE."""


@dataclasses.dataclass
class LabMigration:
    """What happened during one lab migration.

    ``switchover_wait_ms`` is the time the paused VM waited for the
    SWITCHOVER report (``hold_switchover``; None without it), part of the
    downtime. ``aborted`` says why the migration was cancelled; the VM then
    runs at the source again (``resumed_at`` is when it resumed there).
    """

    migration: Migration
    paused_at: float
    resumed_at: float
    reports: list[Any] = dataclasses.field(default_factory=list)
    rarp_sent: int = 0
    switchover_wait_ms: float | None = None
    aborted: str | None = None

    @property
    def downtime_ms(self) -> float:
        """Pause to resume, hold included."""
        return (self.resumed_at - self.paused_at) * 1000.0


class LabHypervisor:
    """Migrates lab VMs and feeds the orchestrator's dispatchers.

    ``dispatchers`` maps host name -> object with ``submit(event)`` returning
    a Future (the engine's Dispatcher). None means no orchestrator runs.
    ``hold_switchover``, ``switchover_timeout`` and ``libvirt_ports`` are
    described in the module docstring; ``on_port`` is called whenever a VM's
    port appears on or leaves a host.
    """

    def __init__(
        self,
        lab: Lab,
        dispatchers: dict[str, Any] | None,
        qemu_rarp: bool = True,
        *,
        hold_switchover: bool = False,
        switchover_timeout: float = 10.0,
        libvirt_ports: bool = False,
        on_port: PortHook | None = None,
    ) -> None:
        if switchover_timeout <= 0:
            raise ValueError("switchover_timeout must be > 0 seconds")
        self.lab = lab
        self.dispatchers = dispatchers
        self.qemu_rarp = qemu_rarp
        self.hold_switchover = hold_switchover
        self.switchover_timeout = switchover_timeout
        self.libvirt_ports = libvirt_ports
        self.on_port = on_port
        # libvirt_ports: the VM's own veth end, once it no longer is the port itself.
        self._vm_end: dict[str, str] = {}

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
        abort_after: Phase | None = None,
    ) -> tuple[LabMigration, list[concurrent.futures.Future[Any]]]:
        """Live-migrate ``vm``; returns the record and the phase futures.

        ``downtime_ms`` is the final copy: the time from the pause (or, with
        ``hold_switchover``, from the SWITCHOVER report) to the resume.
        ``abort_after`` (PREPARE or SWITCHOVER) cancels the migration right
        after that phase, as an operator or libvirt would: the VM resumes at
        the source and both hosts get ABORTED (the record says so).
        """
        if destination == vm.host:
            raise VmmError(f"{vm.name} already runs on {destination}")
        if destination not in self.lab.hosts:
            raise VmmError(f"unknown destination host {destination!r}")
        if abort_after not in (None, Phase.PREPARE, Phase.SWITCHOVER):
            raise VmmError(f"cancel after PREPARE or SWITCHOVER, not after {abort_after}")
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
        if self.libvirt_ports:
            try:
                self._add_incoming_port(vm, destination)
            except Exception:  # the incoming guest never started: the migration fails
                self._emit_aborted(mig, futures)
                raise
        if abort_after is Phase.PREPARE:
            now = time.monotonic()
            return self._cancel(vm, mig, futures, now, "cancelled after PREPARE", paused=False)
        paused_at = self._pause(vm)
        fut = self._emit(source, mig, Phase.SWITCHOVER, Role.SOURCE, paused_at)
        if fut is not None:
            futures.append(fut)
        released_at, wait_ms = paused_at, None
        if self.hold_switchover and fut is not None:
            why = self._hold(fut)
            released_at = time.monotonic()
            wait_ms = (released_at - paused_at) * 1000.0
            if why is not None:
                record, futures = self._cancel(vm, mig, futures, paused_at, why)
                record.switchover_wait_ms = wait_ms
                return record, futures
        if abort_after is Phase.SWITCHOVER:
            why = "cancelled after SWITCHOVER"
            record, futures = self._cancel(vm, mig, futures, paused_at, why)
            record.switchover_wait_ms = wait_ms
            return record, futures
        resumed_at = self._move(vm, destination, released_at + downtime_ms / 1000.0)
        fut = self._emit(destination, mig, Phase.RESUMED, Role.DESTINATION, resumed_at)
        if fut is not None:
            futures.append(fut)
        record = LabMigration(
            migration=mig,
            paused_at=paused_at,
            resumed_at=resumed_at,
            switchover_wait_ms=wait_ms,
        )
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

    def _hold(self, switchover: concurrent.futures.Future[Any]) -> str | None:
        """pause-before-switchover: wait for the SWITCHOVER report; None to continue,
        else why the migration must be cancelled."""
        try:
            report = switchover.result(timeout=self.switchover_timeout)
        except concurrent.futures.TimeoutError:
            return f"no SWITCHOVER report within {self.switchover_timeout:g}s"
        except Exception as err:  # the engine raised: nothing says the state moved
            return f"SWITCHOVER failed: {err!r}"
        if not report.ok:
            return f"SWITCHOVER failed on {report.host}: {report.error}"
        return None

    def _cancel(
        self,
        vm: LabVm,
        mig: Migration,
        futures: list[concurrent.futures.Future[Any]],
        paused_at: float,
        why: str,
        paused: bool = True,
    ) -> tuple[LabMigration, list[concurrent.futures.Future[Any]]]:
        """migrate-cancel: the incoming guest (and its tap) goes away, both hosts
        get ABORTED, the VM resumes at the source."""
        LOG.warning("migration %s of %s cancelled: %s", mig.id, vm.name, why)
        if self.libvirt_ports:
            self._remove_port(vm, mig.destination)
        now = self._emit_aborted(mig, futures)
        resumed_at = self._resume_in_place(vm) if paused else now
        record = LabMigration(migration=mig, paused_at=paused_at, resumed_at=resumed_at)
        record.aborted = why
        return record, futures

    def _emit_aborted(self, mig: Migration, futures: list[concurrent.futures.Future[Any]]) -> float:
        """ABORTED to both hosts (the destination first); returns the event time."""
        now = time.monotonic()
        for host, role in ((mig.destination, Role.DESTINATION), (mig.source, Role.SOURCE)):
            fut = self._emit(host, mig, Phase.ABORTED, role, now)
            if fut is not None:
                futures.append(fut)
        return now

    # -- ports ------------------------------------------------------------------

    def _pause(self, vm: LabVm) -> float:
        if not self.libvirt_ports:
            return self.lab.pause(vm)
        self._port_state(vm.host, vm.port, BR_STATE_LISTENING)
        return time.monotonic()

    def _resume_in_place(self, vm: LabVm) -> float:
        if not self.libvirt_ports:
            return self.lab.resume_in_place(vm)
        self._port_state(vm.host, vm.port, BR_STATE_FORWARDING)
        return time.monotonic()

    def _port_state(self, host: str, port: str, state: int) -> None:
        """A bridge port's STP state by hand (the lab's bridges run no STP)."""
        netns = self.lab.hosts[host].netns
        in_ns(netns, "bridge", "link", "set", "dev", port, "state", str(state))

    def _move(self, vm: LabVm, destination: str, resume_at: float) -> float:
        source = vm.host
        if not self.libvirt_ports:
            # QEMU's source tap lives through the whole pause (the source QEMU
            # exits after the resume); the lab's port leaves the source only
            # PORT_MOVE_LEAD_S before the resume, time enough to move it and
            # bring it up on an idle machine (a loaded one stretches the
            # pause: the record says by how much). Until then the source's
            # bridge keeps its entry for the port, and with it the backup
            # port that sends frames for a port without carrier on to the
            # destination (the lab's pause takes the port's carrier away).
            early = resume_at - PORT_MOVE_LEAD_S - time.monotonic()
            if early > 0:
                time.sleep(early)
            resumed = self.lab.move(vm, destination, resume_at=resume_at)
            if self.on_port is not None:  # the lab's port appears only now
                self.on_port(vm, destination, True)
        else:
            resumed = self._attach(vm, destination, resume_at)
        if self.on_port is not None:
            self.on_port(vm, source, False)
        return resumed

    @staticmethod
    def _inner_name(port: str) -> str:
        """The destination's half of the port pair that faces the VM."""
        return f"q{port}"[:15]

    @staticmethod
    def _vm_end_name(port: str) -> str:
        """The VM's own veth end once it has left its first host."""
        return f"v{port}"[:15]

    def _add_incoming_port(self, vm: LabVm, destination: str) -> None:
        """The destination's tap, as libvirt creates it for the incoming QEMU.

        A veth pair: ``vm.port`` on the VN bridge, its peer (``q<port>``)
        waiting for the VM's end to be redirected to it at resume. Both ends
        are up, so the bridge port forwards (and accepts multicast
        memberships), and frames reach nothing until the VM resumes. IPv6 is
        off on both so that the host itself sends nothing into the VN.
        """
        netns = self.lab.hosts[destination].netns
        port, inner = vm.port, self._inner_name(vm.port)
        mtu = self._mtu(vm)
        in_ns(netns, "ip", "link", "add", port, "mtu", mtu, "type", "veth", "peer", "name", inner)
        try:
            in_ns(
                netns,
                "sysctl",
                "-qw",
                f"net.ipv6.conf.{port}.disable_ipv6=1",
                f"net.ipv6.conf.{inner}.disable_ipv6=1",
            )
            in_ns(netns, "ip", "link", "set", port, "master", f"br-{vm.vni}")
            in_ns(netns, "ip", "link", "set", inner, "up")
            in_ns(netns, "ip", "link", "set", port, "up")
            ipr = self.lab.netlink(netns)
            ipr.tc("add", "clsact", index=_index(ipr, inner))
            _wait_oper_up(ipr, _index(ipr, port), port)
        except BaseException:
            in_ns(netns, "ip", "link", "del", port, check=False)
            raise
        if self.on_port is not None:
            self.on_port(vm, destination, True)

    def _remove_port(self, vm: LabVm, host: str) -> None:
        """The incoming guest is gone: its tap (both ends) with it."""
        if self.on_port is not None:
            self.on_port(vm, host, False)
        in_ns(self.lab.hosts[host].netns, "ip", "link", "del", vm.port, check=False)

    def _mtu(self, vm: LabVm) -> str:
        ipr = self.lab.netlink(self.lab.hosts[vm.host].netns)
        link = ipr.get_links(_index(ipr, vm.port))[0]
        return str(link.get("IFLA_MTU"))

    def _attach(self, vm: LabVm, destination: str, resume_at: float) -> float:
        """Move the VM's end to ``destination`` and join it to the waiting port.

        The end is moved and brought up first, and the lab waits until the
        kernel reports it operationally up; at ``resume_at`` at the earliest
        the two tc redirects (VM -> port, port -> VM) are added: that is the
        resume. The source's port goes away afterwards, as the source QEMU's
        tap does.
        """
        source = vm.host
        src = self.lab.netlink(self.lab.hosts[source].netns)
        end = self._vm_end.get(vm.name, vm.port)
        moved = self._vm_end_name(vm.port)
        dst_ns = self.lab.hosts[destination].netns
        src.link("set", index=_index(src, end), net_ns_fd=dst_ns, ifname=moved)
        dst = self.lab.netlink(dst_ns)
        idx = _index(dst, moved)
        dst.link("set", index=idx, state="up")
        _wait_oper_up(dst, idx, moved)
        inner = _index(dst, self._inner_name(vm.port))
        dst.tc("add", "clsact", index=idx)
        left = resume_at - time.monotonic()
        if left > 0:
            time.sleep(left)
        for dev, target in ((idx, inner), (inner, idx)):
            redirect = {"kind": "mirred", "direction": "egress", "action": "redirect"}
            dst.tc(
                "add-filter",
                "u32",
                index=dev,
                parent=TC_H_CLSACT_INGRESS,
                protocol=ETH_P_ALL,
                keys=["0x0/0x0+0"],
                target=0,
                action={**redirect, "ifindex": target},
            )
        resumed = time.monotonic()
        vm.host = destination
        self._vm_end[vm.name] = moved
        if end != vm.port:  # the source's port was an incoming pair of an earlier move
            in_ns(self.lab.hosts[source].netns, "ip", "link", "del", vm.port, check=False)
        return resumed

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


def _index(ipr: Any, name: str) -> int:
    found = ipr.link_lookup(ifname=name)
    if not found:
        raise LabError(f"no device {name}")
    return int(found[0])


def _wait_oper_up(ipr: Any, idx: int, name: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        links = ipr.get_links(idx)
        if links and links[0].get("IFLA_OPERSTATE") == "UP":
            return
        time.sleep(0.001)
    raise LabError(f"port {name} did not come up within {timeout}s")
