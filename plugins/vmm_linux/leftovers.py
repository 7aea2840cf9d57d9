"""Frames left behind in a departing VM's tap go on to its destination.

From the final copy's pause to SWITCHOVER's in-flight tunnel (20-40 ms on
the libvirt lab, longer on a loaded host) the source's bridge still sends
the VM's frames to its old tap, where the paused QEMU never reads them
again: they were the whole loss of an orchestrated migration on real libvirt
(issue 16). The tap's queue is a buffer like any other, so SWITCHOVER takes
it with it (:mod:`vmm_kernel.tapqueue`):

* ahead of the pause (when the libvirt agent learns a domain, and again at
  its migration's first iteration) ``locate`` finds, in the background, the
  process and descriptor that read the port's tap: a scan of /proc that is
  too slow for the pause;
* at SWITCHOVER, ``forwarding`` borrows that descriptor and, in a thread,
  sends what the tap queued for the VM's MAC out of the VN's in-flight port
  (which tunnels it to the new VTEP; before the tunnel has it, to the VN's
  VTEPs, where only the destination expects the MAC), oldest first. Only
  once the backlog is out does the in-flight tunnel move the bridge's entry
  (measured on the libvirt lab: moving it while the thread still sent the
  backlog reordered 5-9 frames per stream); frames that still reach the tap
  until then are forwarded within microseconds of their arrival, and what
  is left is read at the end. So what the tunnel carries next comes after
  everything the tap held.

Only unicast frames for the VM's MAC go on: a broadcast queued there was
flooded to every host, the destination included, when it was sent. Frames
keep their virtio-net header (a packet socket with ``PACKET_VNET_HDR``),
so a GSO or checksum-offloaded frame is finished by the kernel on the way.

What this cannot reach: frames QEMU itself took from the tap as it stopped.
On the libvirt lab 1-2 frames a migration, sent 0.4-3.3 ms before libvirt's
pause event, were captured entering the source tap and never left it for
the destination, ours or anyone's. QEMU 7.2's userspace tap reader
(``tap_send``, TCG here: no vhost-net) reads a frame whenever the descriptor
is readable, and while the VM stops the virtio device refuses it, so it
waits in QEMU's own net queue, which migration does not carry. With
vhost-net the kernel's worker stops with the device; that cannot be
measured on this machine.

A port nobody located (the Linux lab's veth ports, an OVN port) costs
nothing. If the migration fails after SWITCHOVER, what was forwarded is
not given back: the destination drops it with its QEMU. Measured figures:
see ``benchmarks/libvirt_migration.py`` ("lost in total").
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import logging
import os
import select
import socket
import sys
import threading
import time
from collections.abc import Iterator

from vmm_kernel import netns as netns_mod
from vmm_kernel import tapqueue

LOG = logging.getLogger(__name__)

#: setsockopt(SOL_PACKET, PACKET_VNET_HDR): frames sent with a virtio-net header in front.
PACKET_VNET_HDR = 15
SOL_PACKET = 263
ETH_P_ALL = 0x0003
#: How long SWITCHOVER waits for a lookup started ahead that has not finished.
LOOKUP_WAIT_S = 0.05
#: The interpreter's thread switch interval while a tap is forwarded. The default
#: (5 ms) is how long the forwarding thread may wait for the GIL once a frame is
#: there: longer than the 4 ms between two frames of a 250 pps stream, so a frame
#: read from the tap just before the bridge's entry moved could leave after the next
#: one of its stream, which the kernel sent on at once (measured on the libvirt lab:
#: 1 frame reordered in 3-4 of 6 streams in 2 of 3 migrations).
SWITCH_INTERVAL_S = 0.0002
#: How long SWITCHOVER waits for the tap's backlog to be sent before moving the
#: VM's frames past it (a full tap queue, 1,000 frames, takes about 20 ms).
CATCH_UP_S = 0.2


@dataclasses.dataclass
class Forwarded:
    """What one SWITCHOVER took out of a tap (noted in the stage's timeline)."""

    port: str
    found: bool = False
    forwarded: int = 0
    skipped: int = 0
    failed: int = 0
    error: str = ""

    def note(self) -> dict[str, object]:
        out: dict[str, object] = {"found": self.found, "forwarded": self.forwarded}
        if self.skipped:
            out["skipped"] = self.skipped
        if self.failed:
            out["failed"] = self.failed
        if self.error:
            out["error"] = self.error
        return out


class _QuickSwitches:
    """Lower the GIL's switch interval while any tap is forwarded (nested, threads)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users = 0
        self._saved = sys.getswitchinterval()

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        with self._lock:
            if self._users == 0:
                self._saved = sys.getswitchinterval()
                sys.setswitchinterval(min(self._saved, SWITCH_INTERVAL_S))
            self._users += 1
        try:
            yield
        finally:
            with self._lock:
                self._users -= 1
                if self._users == 0:
                    sys.setswitchinterval(self._saved)


_QUICK = _QuickSwitches()


class Leftovers:
    """A host's taps' readers, found ahead, and their queues forwarded at SWITCHOVER.

    ``netns`` is the NVE's namespace (None: this process's), where the taps
    and the in-flight port live.
    """

    def __init__(self, netns: str | None) -> None:
        self.netns = netns
        self._lock = threading.Lock()
        self._readers: dict[str, concurrent.futures.Future[list[tuple[int, int]]]] = {}
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="tap-readers")

    def _netns_inode(self) -> int:
        if self.netns:
            return tapqueue.netns_inode(os.path.join(netns_mod.NETNS_RUN_DIR, self.netns))
        return tapqueue.netns_inode(f"/proc/{os.getpid()}/ns/net")

    def locate(self, port: str) -> None:
        """Find ``port``'s reader in the background (a domain learned, a migration
        starting). Idempotent while a lookup runs, and while the reader found last
        still holds the tap: the scan of every process's descriptors costs ~12 ms
        of CPU, which a migration's first pass (QEMU, on the same cores) would
        share, where checking the one found costs two reads in /proc."""
        with self._lock:
            current = self._readers.get(port)
            if current is not None and not current.done():
                return
        if current is not None and not current.cancelled() and current.exception() is None:
            found = current.result()
            if found and all(tapqueue.still_reads(pid, fd, port) for pid, fd in found):
                return
        with self._lock:
            if self._readers.get(port) is not current:
                return  # another thread looked meanwhile
            try:
                self._readers[port] = self._pool.submit(tapqueue.find_readers, port)
            except RuntimeError:  # closed
                return

    def forget(self, port: str) -> None:
        with self._lock:
            self._readers.pop(port, None)

    def _borrow(self, port: str) -> list[tapqueue.BorrowedTap]:
        with self._lock:
            lookup = self._readers.get(port)
        if lookup is None:
            return []
        try:
            candidates = lookup.result(timeout=LOOKUP_WAIT_S)
        except concurrent.futures.TimeoutError:
            LOG.info("the reader of %s is still being looked for: its queue stays", port)
            return []
        live = [(pid, fd) for pid, fd in candidates if tapqueue.still_reads(pid, fd, port)]
        if not live and candidates:  # the domain restarted since: look again at once
            live = tapqueue.find_readers(port)
            with self._lock:
                done: concurrent.futures.Future[list[tuple[int, int]]] = concurrent.futures.Future()
                done.set_result(live)
                self._readers[port] = done
        taps: list[tapqueue.BorrowedTap] = []
        ino = self._netns_inode()
        for pid, fd in live:
            try:
                taps.append(tapqueue.BorrowedTap.borrow(pid, fd, port, ino))
            except OSError as exc:
                LOG.debug("tap reader %d/%d of %s: %s", pid, fd, port, exc)
        return taps

    @contextlib.contextmanager
    def forwarding(self, mac: str, port: str, device: str) -> Iterator[Forwarded]:
        """While the body moves ``mac``'s frames to ``device`` (the in-flight port),
        forward what ``port``'s tap queued for ``mac`` there first, then what is left."""
        report = Forwarded(port)
        try:
            taps = self._borrow(port)
        except OSError as exc:
            report.error = str(exc)
            taps = []
        if not taps:
            yield report
            return
        report.found = True
        try:
            sock = netns_mod.socket_in(
                self.netns, socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL)
            )
        except OSError as exc:
            report.error = f"no packet socket: {exc}"
            for tap in taps:
                tap.close()
            yield report
            return
        stack = contextlib.ExitStack()
        stop = os.eventfd(0, os.EFD_CLOEXEC)
        caught_up = threading.Event()
        worker = threading.Thread(
            target=_forward,
            args=(taps, sock, device, bytes.fromhex(mac.replace(":", "")), stop, caught_up, report),
            name=f"leftovers-{port}",
            daemon=True,
        )
        try:
            sock.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
            sock.bind((device, 0))
            stack.enter_context(_QUICK.held())
            worker.start()
            # The backlog goes first: only then may the body move new frames past it.
            caught_up.wait(CATCH_UP_S)
            yield report
        finally:
            os.eventfd_write(stop, 1)
            if worker.is_alive():
                worker.join()
            os.close(stop)
            stack.close()
            sock.close()
            for tap in taps:
                tap.close()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _forward(
    taps: list[tapqueue.BorrowedTap],
    sock: socket.socket,
    device: str,
    mac: bytes,
    stop: int,
    caught_up: threading.Event,
    report: Forwarded,
) -> None:
    """Send each queued frame for ``mac`` out of ``device`` as soon as it is read,
    until the eventfd ``stop`` is written and the taps are empty."""
    poller = select.poll()
    for tap in taps:
        poller.register(tap.fd, select.POLLIN)
    poller.register(stop, select.POLLIN)
    started = time.monotonic()
    finishing = False
    while True:
        moved = 0
        for tap in taps:
            for header, frame in tap.read_queued():
                moved += 1
                if frame[:6] != mac:
                    report.skipped += 1
                    continue
                try:
                    sock.send(header + frame)
                    report.forwarded += 1
                except OSError as exc:
                    report.failed += 1
                    report.error = f"{device}: {exc}"
        if finishing and not moved:
            break
        if not moved:
            caught_up.set()
            ready = poller.poll()
            finishing = finishing or any(fd == stop for fd, _ in ready)
    LOG.debug(
        "tap %s: %d frames forwarded in %.1f ms",
        report.port,
        report.forwarded,
        (time.monotonic() - started) * 1000.0,
    )
