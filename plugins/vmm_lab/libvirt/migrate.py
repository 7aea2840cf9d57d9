"""Real live migration between lab hosts, and the failures to test against.

``migrate`` asks the source daemon for a peer-to-peer live migration
(``migrateToURI3`` to the destination daemon's qemu+tcp URI, the migration
stream on the destination's underlay address) with LIVE | PEER2PEER |
PERSIST_DEST | UNDEFINE_SOURCE, so the guest ends up defined only where it
runs, as a cloud's compute hosts want it. While it runs, the lifecycle
events of both daemons are recorded with CLOCK_MONOTONIC receive times (the
clock vmm_lab.linux.probe stamps packets with), and libvirt's statistics of
the finished job come from the source's JOB_COMPLETED event: with
UNDEFINE_SOURCE the source domain is gone once the call returns, so its
completed-job statistics can no longer be asked for.

The pause window of a migration, for ``probe.analyze``, is
``[paused_at, resumed_at)``: the arrival here of the source's
SUSPENDED/MIGRATED and of the destination's RESUMED/MIGRATED events. Both
arrive after the fact (measured here: the event window is 20-30 ms shorter
than libvirt's downtime, i.e. SUSPENDED comes that late, and RESUMED comes
1-15 ms after QEMU's first RARP). ``RarpWatch`` times that first RARP on
the destination's tap: QEMU sends it when the incoming stream is complete,
just before libvirt resumes the guest, so the true resume lies between the
two marks. For a strict lost-after-resume count (nothing may be lost once
the destination took over), end the window at the first RARP.

Events need libvirt's default event loop, which exists once per process:
the lab shares the event source's (``vmm_libvirt.events.start_event_loop``),
so an orchestrator watching in the same process sees the same events.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import libvirt

from vmm_kernel import bpf
from vmm_kernel.netns import socket_in
from vmm_lab.libvirt import LibvirtLabError
from vmm_lab.libvirt.hosts import LibvirtHost
from vmm_lab.linux import probe
from vmm_libvirt.events import start_event_loop

FLAGS = (
    libvirt.VIR_MIGRATE_LIVE
    | libvirt.VIR_MIGRATE_PEER2PEER
    | libvirt.VIR_MIGRATE_PERSIST_DEST
    | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE
)
MIGRATION_TIMEOUT_S = 60.0
# Events still due when the API returns (JOB_COMPLETED, a failed destination's
# STOPPED) are dispatched by the event loop shortly after; wait this long at most.
EVENT_WAIT_S = 2.0
ETH_P_RARP = 0x8035
ETH_P_ALL = 0x0003
SO_RCVBUFFORCE = 33


class MigrationFailed(LibvirtLabError):
    """libvirt reported the migration as failed; ``record`` holds what was seen."""

    def __init__(self, message: str, record: MigrationRecord) -> None:
        super().__init__(message)
        self.record = record


# -- event names ------------------------------------------------------------------

_EVENT_NAMES = (
    "DEFINED",
    "UNDEFINED",
    "STARTED",
    "SUSPENDED",
    "RESUMED",
    "STOPPED",
    "SHUTDOWN",
    "PMSUSPENDED",
    "CRASHED",
)
_EVENTS = {getattr(libvirt, f"VIR_DOMAIN_EVENT_{name}"): name for name in _EVENT_NAMES}
_DETAILS = {
    name: {
        getattr(libvirt, attr): attr[len(f"VIR_DOMAIN_EVENT_{name}_") :]
        for attr in dir(libvirt)
        if attr.startswith(f"VIR_DOMAIN_EVENT_{name}_")
    }
    for name in _EVENT_NAMES
}


# -- what a migration looked like ---------------------------------------------


@dataclasses.dataclass(frozen=True)
class Event:
    """One lifecycle event of the watched domain, as received here."""

    at: float  # time.monotonic() (CLOCK_MONOTONIC) when the callback ran
    host: str
    event: str  # STARTED, SUSPENDED, RESUMED, STOPPED, DEFINED, ...
    detail: str  # MIGRATED, FAILED, ...


@dataclasses.dataclass
class MigrationRecord:
    """One migration attempt: timing, libvirt's job statistics and the events."""

    domain: str
    source: str
    destination: str
    started_at: float
    finished_at: float = 0.0
    stats: dict[str, Any] = dataclasses.field(default_factory=dict)
    events: list[Event] = dataclasses.field(default_factory=list)
    error: str | None = None

    @property
    def wall_ms(self) -> float:
        """How long the migrateToURI3 call took."""
        return (self.finished_at - self.started_at) * 1000.0

    @property
    def downtime_ms(self) -> float | None:
        """libvirt's measured downtime (guest paused to resumed), if the job completed."""
        value = self.stats.get("downtime")
        return None if value is None else float(value)

    def event_at(self, host: str, event: str, detail: str | None = None) -> float | None:
        """Receive time of the first ``event``/``detail`` from ``host``'s daemon."""
        for e in self.events:
            if e.host == host and e.event == event and detail in (None, e.detail):
                return e.at
        return None

    @property
    def paused_at(self) -> float | None:
        """The source's SUSPENDED/MIGRATED: start of the pause window."""
        return self.event_at(self.source, "SUSPENDED", "MIGRATED")

    @property
    def resumed_at(self) -> float | None:
        """The destination's RESUMED/MIGRATED: end of the pause window."""
        return self.event_at(self.destination, "RESUMED", "MIGRATED")


class EventRecorder:
    """Records lifecycle and job-completed events of one domain on several hosts."""

    def __init__(self, domain: str, hosts: list[LibvirtHost]) -> None:
        start_event_loop()
        self.domain = domain
        self.events: list[Event] = []
        #: host name -> the statistics of its JOB_COMPLETED event.
        self.job_stats: dict[str, dict[str, Any]] = {}
        self._cond = threading.Condition()
        self._conns: list[tuple[libvirt.virConnect, list[int]]] = []
        try:
            for host in hosts:
                conn = libvirt.open(host.uri)
                ids = [
                    conn.domainEventRegisterAny(
                        None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._lifecycle, host.name
                    ),
                    conn.domainEventRegisterAny(
                        None, libvirt.VIR_DOMAIN_EVENT_ID_JOB_COMPLETED, self._completed, host.name
                    ),
                ]
                self._conns.append((conn, ids))
        except BaseException:
            self.close()
            raise

    def _lifecycle(self, conn: Any, dom: Any, event: int, detail: int, host: str) -> None:
        at = time.monotonic()
        if dom.name() != self.domain:
            return
        name = _EVENTS.get(event, str(event))
        with self._cond:
            self.events.append(
                Event(at, host, name, _DETAILS.get(name, {}).get(detail, str(detail)))
            )
            self._cond.notify_all()

    def _completed(self, conn: Any, dom: Any, params: dict[str, Any], host: str) -> None:
        if dom.name() == self.domain:
            with self._cond:
                self.job_stats[host] = dict(params)
                self._cond.notify_all()

    def wait_for(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Wait until ``predicate()`` (called under the recorder's lock) holds."""
        with self._cond:
            return self._cond.wait_for(predicate, timeout)

    def seen(self, host: str, event: str) -> bool:
        return any(e.host == host and e.event == event for e in self.events)

    def snapshot(self) -> list[Event]:
        """The events so far, in the order they arrived."""
        with self._cond:
            return list(self.events)

    def close(self) -> None:
        for conn, ids in self._conns:
            for cb_id in ids:
                with contextlib.suppress(libvirt.libvirtError):
                    conn.domainEventDeregisterAny(cb_id)
            with contextlib.suppress(libvirt.libvirtError):
                conn.close()
        self._conns.clear()


# -- migrating ------------------------------------------------------------------


def migrate(
    domain: str,
    src: LibvirtHost,
    dst: LibvirtHost,
    *,
    bandwidth_mib_s: int | None = None,
    timeout: float = MIGRATION_TIMEOUT_S,
    flags: int = FLAGS,
    virsh: bool = False,
) -> MigrationRecord:
    """Live-migrate ``domain`` from ``src`` to ``dst`` (peer to peer) and return the record.

    Blocks until libvirt finishes. ``bandwidth_mib_s`` caps the migration
    stream (MiB/s), which makes a migration slow enough to abort. A job
    still running after ``timeout`` seconds is aborted. A failed or aborted
    migration raises MigrationFailed, whose ``record`` holds the events.
    ``virsh`` runs the operator's command instead of the API call:
    ``virsh migrate --live --p2p --persistent --undefinesource`` (same flags).
    """
    params: dict[str, Any] = {libvirt.VIR_MIGRATE_PARAM_URI: dst.migration_uri}
    if bandwidth_mib_s is not None:
        params[libvirt.VIR_MIGRATE_PARAM_BANDWIDTH] = bandwidth_mib_s
    recorder = EventRecorder(domain, [src, dst])
    conn = libvirt.open(src.uri)
    try:
        dom = conn.lookupByName(domain)
        watchdog = threading.Timer(timeout, _abort_quietly, args=(dom,))
        watchdog.start()
        record = MigrationRecord(domain, src.name, dst.name, started_at=time.monotonic())
        try:
            if virsh:
                record.error = _virsh_migrate(domain, src, dst, bandwidth_mib_s, timeout)
            else:
                dom.migrateToURI3(dst.peer_uri, params, flags)
        except libvirt.libvirtError as exc:
            record.error = str(exc)
        finally:
            record.finished_at = time.monotonic()
            watchdog.cancel()
        if record.error is None:
            recorder.wait_for(lambda: src.name in recorder.job_stats, EVENT_WAIT_S)
            record.stats = recorder.job_stats.get(src.name, {})
        else:  # the destination's STOPPED/FAILED may still be on its way
            recorder.wait_for(lambda: recorder.seen(dst.name, "STOPPED"), EVENT_WAIT_S)
        record.events = recorder.snapshot()
    finally:
        recorder.close()
        conn.close()
    if record.error is not None:
        raise MigrationFailed(
            f"migration of {domain} from {src.name} to {dst.name} failed: {record.error}", record
        )
    return record


def _virsh_migrate(
    domain: str, src: LibvirtHost, dst: LibvirtHost, bandwidth: int | None, timeout: float
) -> str | None:
    """``virsh migrate --live --p2p`` as an operator types it; the error text or None."""
    cmd = ["virsh", "-c", src.uri, "migrate", "--live", "--p2p", "--persistent"]
    cmd += ["--undefinesource", domain, dst.peer_uri, "--migrateuri", dst.migration_uri]
    if bandwidth is not None:
        cmd += ["--bandwidth", str(bandwidth)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout + 10)
    except subprocess.TimeoutExpired:
        return f"virsh migrate did not return within {timeout + 10:.0f} s"
    if done.returncode != 0:
        return (done.stderr or done.stdout).strip() or f"virsh exited {done.returncode}"
    return None


def _abort_quietly(dom: libvirt.virDomain) -> None:
    with contextlib.suppress(libvirt.libvirtError):
        dom.abortJob()


@contextlib.contextmanager
def _domain(host: LibvirtHost, name: str) -> Iterator[libvirt.virDomain]:
    conn = libvirt.open(host.uri)
    try:
        yield conn.lookupByName(name)
    finally:
        conn.close()


def abort(host: LibvirtHost, domain: str) -> None:
    """``virsh domjobabort``: cancel the domain's running job (on the source host)."""
    with _domain(host, domain) as dom:
        dom.abortJob()


def wait_job_running(
    host: LibvirtHost, domain: str, min_bytes: int = 1, timeout: float = 20.0
) -> dict[str, Any]:
    """Wait until ``domain``'s migration job on ``host`` has sent ``min_bytes``; its stats."""
    deadline = time.monotonic() + timeout
    with _domain(host, domain) as dom:
        while time.monotonic() < deadline:
            with contextlib.suppress(libvirt.libvirtError):
                stats: dict[str, Any] = dom.jobStats()
                if (
                    stats.get("type") == libvirt.VIR_DOMAIN_JOB_UNBOUNDED
                    and stats.get("data_processed", 0) >= min_bytes
                ):
                    return stats
            time.sleep(0.02)
    raise LibvirtLabError(f"no migration job of {domain} on {host.name} within {timeout} s")


def domain_state(host: LibvirtHost, domain: str) -> int | None:
    """``virDomainState`` of ``domain`` on ``host`` (VIR_DOMAIN_RUNNING, ...), None if absent."""
    conn = libvirt.open(host.uri)
    try:
        for dom in conn.listAllDomains():  # a failed lookup would log an error
            if dom.name() == domain:
                state: int = dom.state()[0]
                return state
        return None
    finally:
        conn.close()


def qemu_pid(host: LibvirtHost, domain: str) -> int | None:
    """PID of the QEMU running ``domain`` on ``host`` (from libvirt's pid file)."""
    try:
        with open(host.path(f"/run/libvirt/qemu/{domain}.pid"), encoding="ascii") as fh:
            return int(fh.read().strip())
    except (OSError, ValueError):
        return None


def kill_qemu(host: LibvirtHost, domain: str, timeout: float = 20.0) -> int:
    """SIGKILL ``domain``'s QEMU on ``host`` as soon as it exists (the destination
    of a running migration, for failure tests); returns the PID killed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pid = qemu_pid(host, domain)
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
            return pid
        time.sleep(0.02)
    raise LibvirtLabError(f"no QEMU for {domain} on {host.name} within {timeout} s")


# -- QEMU's self-announcement, as seen on the wire --------------------------------


class _PacketWatch:
    """A packet socket on every interface of ``netns`` (the tap need not exist
    yet), a kernel filter, and a thread that hands each frame that passes, with
    its address and CLOCK_MONOTONIC arrival, to ``_take`` until ``close``."""

    def __init__(self, netns: str, tap: str, program: bpf.Program, rcvbuf: int = 0) -> None:
        self.tap = tap
        self._sock = socket_in(netns, socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        try:
            if rcvbuf:
                self._sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
            bpf.attach(self._sock, program)
            self._sock.settimeout(0.1)
        except BaseException:
            self._sock.close()
            raise
        self._stop = threading.Event()
        name = f"{type(self).__name__}-{tap}"
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                frame, addr = self._sock.recvfrom(2048)
            except TimeoutError:
                continue
            except OSError:
                return
            if addr[0] == self.tap:
                self._take(frame, addr[2], time.clock_gettime_ns(time.CLOCK_MONOTONIC))

    def _take(self, frame: bytes, pkttype: int, at_ns: int) -> None:
        raise NotImplementedError

    def _stop_watching(self) -> None:
        self._stop.set()
        self._thread.join(timeout=1)
        self._sock.close()


class RarpWatch(_PacketWatch):
    """Times of the RARP frames from ``mac`` that come in through ``tap`` in ``netns``.

    QEMU sends five RARPs from the guest's MAC after an incoming migration
    (+0, 50, 200, 450, 800 ms); the first marks, on the wire, when the
    destination took over. A kernel filter passes only RARPs from ``mac``,
    and frames that arrive another way (flooded over VXLAN from a previous
    destination) or leave through other ports are ignored.
    """

    def __init__(self, netns: str, mac: str, tap: str) -> None:
        self.mac = bytes.fromhex(mac.replace(":", ""))
        self.times: list[float] = []
        super().__init__(netns, tap, _rarp_from(self.mac))

    def _take(self, frame: bytes, pkttype: int, at_ns: int) -> None:
        if (
            pkttype != socket.PACKET_OUTGOING
            and frame[12:14] == ETH_P_RARP.to_bytes(2, "big")
            and frame[6:12] == self.mac  # the filter is attached after the socket exists
        ):
            self.times.append(at_ns / 1e9)

    def close(self) -> list[float]:
        """Stop watching; the times seen (time.monotonic())."""
        self._stop_watching()
        return list(self.times)


class TapArrivals(_PacketWatch):
    """When each probe for ``mac`` entered the guest's ``tap`` in ``netns`` (the
    bridge transmitting it to QEMU): ``{(stream, seq): (send_ns, first arrival ns)}``.

    A frame held for a paused guest waits in the destination tap until the
    guest resumes and reads it; what the probes measure after that is the
    guest's own work (a TCG guest answering a backlog of hundreds of echo
    requests). Whether the orchestrator had the held frames there in time is
    seen here, on the way in: CLOCK_MONOTONIC, the probes' clock.
    """

    def __init__(self, netns: str, mac: str, tap: str) -> None:
        self.mac = bytes.fromhex(mac.replace(":", ""))
        self.seen: dict[tuple[str, int], tuple[int, int]] = {}
        super().__init__(netns, tap, _to(self.mac), rcvbuf=8 * 1024 * 1024)

    def _take(self, frame: bytes, pkttype: int, at_ns: int) -> None:
        if pkttype != socket.PACKET_OUTGOING:
            return
        start = frame.find(probe.MAGIC)
        found = probe.decode(frame[start:]) if start >= 0 else None
        if found is not None:
            stream, seq, sent = found
            self.seen.setdefault((stream, seq), (sent, at_ns))

    def close(self) -> dict[tuple[str, int], tuple[int, int]]:
        """Stop watching; what was seen."""
        self._stop_watching()
        return dict(self.seen)


def held_lateness_ms(
    seen: dict[tuple[str, int], tuple[int, int]], paused_ns: int, resumed_ns: int
) -> tuple[int, float | None]:
    """(how many probes sent while the guest was paused entered the tap, and how much
    later than the resume the last of them came in, ms: 0 if all were there before;
    None if none was)."""
    held = [(sent, at) for sent, at in seen.values() if paused_ns <= sent < resumed_ns]
    if not held:
        return 0, None
    return len(held), max(0.0, max(at - resumed_ns for _, at in held) / 1e6)


def _rarp_from(mac: bytes) -> bpf.Program:
    """Classic BPF: accept frames with EtherType RARP and source ``mac``."""
    return bpf.mac_program(mac, bpf.SOURCE, ETH_P_RARP)


def _to(mac: bytes) -> bpf.Program:
    """Classic BPF: accept frames whose destination is ``mac``."""
    return bpf.mac_program(mac, bpf.DESTINATION)
