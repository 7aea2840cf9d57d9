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

Since SWITCHOVER can come after the destination resumed (a final copy
shorter than its reaction, or ``[libvirt] early_switchover = false``, which
waits for the job's completion), the tap is *followed* from the pause
(``follow``, called by the NVE's ``watch_departure`` when the reader is
known): its frames go on as above from the pause, each as it comes, to the
destination, which holds them until the VM runs there (the NVE's hold,
armed at PREPARE), and SWITCHOVER takes the session over. Every frame read
(a broadcast too, which is not sent on) is also kept (``KEEP_FRAMES`` and
``KEEP_BYTES`` at most) until SWITCHOVER: should the VM resume here instead
(an operator's pause, a failed migration: its RESUMED event, or a reconnection
that finds it running), ``unfollow`` without ``drain`` gives them back,
written into the tap in batches for its reader; what the tap has no room
for is counted (its queue holds ``txqueuelen`` frames). Before this, the kernel's departure watch
(vmm_linux.departure) diverted the frames that came after the VM's first
frame elsewhere, ahead of what the tap had queued since the pause: after
final copies shorter than SWITCHOVER's reaction it reordered 38-65 frames
(3 of 25 migrations on the libvirt lab), and with SWITCHOVER at the job's
completion the old QEMU was gone with its tap's 24-278 frames. A follow that
waited for the VM's first frame elsewhere before sending anything (measured
too) still reordered up to 45 frames a stream there: the peers that learnt
the move from that frame sent straight to the destination, ahead of the
backlog. The follow ends with SWITCHOVER, ``unfollow`` (the NVE's disarm
points), its reader's exit (a pidfd: nobody else will read the queue) or
after ``FOLLOW_MAX_S``. The kernel's diversion stays for ports whose reader
is not known.

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
import functools
import logging
import math
import os
import select
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator

from vmm_kernel import netns as netns_mod
from vmm_kernel import tapqueue

LOG = logging.getLogger(__name__)

#: setsockopt(SOL_PACKET, PACKET_VNET_HDR): frames sent with a virtio-net header in front.
PACKET_VNET_HDR = 15
SOL_PACKET = 263
#: How long SWITCHOVER waits for a lookup started ahead that has not finished.
LOOKUP_WAIT_S = 0.05
#: The interpreter's thread switch interval while a tap is forwarded. The default
#: (5 ms) is how long the forwarding thread may wait for the GIL once a frame is
#: there: longer than the 4 ms between two frames of a 250 pps stream, so a frame
#: read from the tap just before the bridge's entry moved could leave after the next
#: one of its stream, which the kernel sent on at once (measured on the libvirt lab:
#: 1 frame reordered in 3-4 of 6 streams in 2 of 3 migrations).
SWITCH_INTERVAL_S = 0.0002
#: How long a session forwards at most (as the kernel's departure watch keeps its
#: marks: vmm_linux.departure.MOVED_TIMEOUT_S).
FOLLOW_MAX_S = 120
#: Frames and bytes a follow keeps to give back (a 300 ms pause at 10 kpps is
#: 3,000 frames; the destination's hold takes as many by default).
KEEP_FRAMES = 8192
KEEP_BYTES = 16 * 1024 * 1024
#: Frames given back at a time, and the pause between two batches: a tap queues
#: at most its txqueuelen (1,000) for a reader that has just resumed.
GIVE_BACK_BATCH = 64
GIVE_BACK_PAUSE_S = 0.001
#: How long a stopped session still sends what its taps hold.
DRAIN_MAX_S = 0.2
#: How long SWITCHOVER waits for the tap's backlog to be sent before moving the
#: VM's frames past it (a full tap queue, 1,000 frames, takes about 20 ms).
CATCH_UP_S = 0.2


@dataclasses.dataclass
class Forwarded:
    """What one SWITCHOVER took out of a tap (noted in the stage's timeline)."""

    port: str
    #: Followed from the pause (``follow``), not only taken at SWITCHOVER.
    followed: bool = False
    #: Frames sent before SWITCHOVER came.
    early: int = 0
    #: Frames given back to the tap (the VM resumed here), and those the tap
    #: dropped meanwhile (its queue full: an upper bound, new frames count too).
    given_back: int = 0
    give_back_dropped: int = 0
    #: Frames read while copies were kept but past KEEP_FRAMES/KEEP_BYTES.
    not_kept: int = 0
    found: bool = False
    forwarded: int = 0
    skipped: int = 0
    failed: int = 0
    error: str = ""

    def note(self) -> dict[str, object]:
        out: dict[str, object] = {"found": self.found, "forwarded": self.forwarded}
        if self.followed:
            out["followed"] = True
            out["early"] = self.early
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
        #: Ports followed from their VM's pause (``follow``) until SWITCHOVER takes them.
        self._following: dict[str, _Session] = {}
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

    def _open(self, mac: str, port: str, device: str, report: Forwarded) -> _Session | None:
        """A session on ``port``'s borrowed taps that sends to ``device``, not yet
        started; None (``report`` says why) when there is nothing to borrow."""
        try:
            taps = self._borrow(port)
        except OSError as exc:
            report.error = str(exc)
            taps = []
        if not taps:
            return None
        report.found = True
        try:
            sock = self._sender(device)
        except OSError as exc:
            report.error = f"{device}: {exc}"
            for tap in taps:
                tap.close()
            return None
        return _Session(taps, sock, _mac_bytes(mac), report)

    def _sender(self, device: str) -> socket.socket:
        """A packet socket that sends frames with their virtio-net header out of
        ``device`` (protocol 0: it receives nothing of the device's)."""
        sock = netns_mod.socket_in(self.netns, socket.AF_PACKET, socket.SOCK_RAW, 0)
        try:
            sock.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
            sock.bind((device, 0))
        except BaseException:
            sock.close()
            raise
        return sock

    def _begin(
        self, mac: str, port: str, device: str, report: Forwarded, follow: bool
    ) -> _Session | None:
        """Open, start and register a session on ``port`` (None: ``report`` says
        why not). A follow keeps copies and ends with its readers' exit."""
        session = self._open(mac, port, device, report)
        if session is None:
            return None
        session.keep = follow
        try:
            for tap in session.taps if follow else ():
                if tap.pid:  # appended one by one: close() closes those opened
                    session.exits.append(os.pidfd_open(tap.pid))
            name = f"{'follow' if follow else 'leftovers'}-{port}"
            session.start(name, functools.partial(self._ended, port, session))
        except (OSError, RuntimeError) as exc:  # no pidfd, no thread to be had
            report.error = str(exc)
            session.close()
            return None
        with self._lock:
            replaced = self._following.get(port)
            self._following[port] = session
        if replaced is not None:  # one whose thread ended
            replaced.finish()
        return session

    def follow(self, mac: str, port: str, device: str) -> bool:
        """At the pause: send what ``port``'s tap holds and receives for ``mac`` on to
        ``device`` (the in-flight port, to the destination's hold), in the order it
        came, keeping a copy of each, until ``forwarding`` (SWITCHOVER) takes the
        session over or ``unfollow`` ends it (without ``drain``: the copies go back
        into the tap). False if ``port``'s reader is not known (the caller then
        watches another way)."""
        with self._lock:
            current = self._following.get(port)
        if current is not None and current.alive():
            return True  # the pause seen again, or SWITCHOVER forwarding it now
        report = Forwarded(port, followed=True)
        if self._begin(mac, port, device, report, follow=True) is None:
            LOG.debug("%s not followed: %s", port, report.error or "no reader known")
            return False
        return True

    def _ended(self, port: str, session: _Session) -> None:
        """A session's thread ended (on its own, or finished): forget it."""
        with self._lock:
            if self._following.get(port) is session:
                del self._following[port]

    def following(self, port: str) -> bool:
        """Whether ``port`` is followed (or forwarded) now."""
        with self._lock:
            session = self._following.get(port)
        return session is not None and session.alive()

    def unfollow(self, port: str, drain: bool = True, mac: str | None = None) -> None:
        """Stop following ``port`` (its in-flight tunnel ends, or the VM comes back
        here), if it follows ``mac`` (any MAC if None): what the tap still holds
        goes on first; without ``drain`` (the VM resumed here) nothing more goes
        and every frame the follow read is given back to the tap."""
        wanted = _mac_bytes(mac) if mac else None
        with self._lock:
            session = self._following.get(port)
            if session is None or (wanted is not None and session.mac != wanted):
                return  # another VM's tap of the same name now
            del self._following[port]
        session.finish(drain)
        if not drain:
            self._give_back(port, session)

    def _give_back(self, port: str, session: _Session) -> None:
        """Write the frames a follow read back into ``port``'s tap, oldest first
        (its reader gets them as if the bridge had just sent them), a batch at a
        time; what the tap dropped meanwhile is counted, not hidden."""
        kept, session.kept = session.kept, []
        report = session.report
        if report.not_kept:
            LOG.warning(
                "%s: %d frames were not kept and cannot be given back", port, report.not_kept
            )
        if not kept:
            return
        before = self._tx_dropped(port)
        try:
            sock = self._sender(port)
        except OSError as exc:
            LOG.warning("%s: %d frames not given back: %s", port, len(kept), exc)
            return
        sent = 0
        with sock:
            try:
                for data in kept:
                    sock.send(data)
                    sent += 1
                    if sent % GIVE_BACK_BATCH == 0:
                        time.sleep(GIVE_BACK_PAUSE_S)
            except OSError as exc:
                LOG.warning("%s: %d frames not given back: %s", port, len(kept) - sent, exc)
        after = self._tx_dropped(port)
        dropped = min(sent, after - before) if before is not None and after is not None else 0
        report.given_back, report.give_back_dropped = sent - dropped, dropped
        log = LOG.warning if dropped else LOG.info
        log(
            "%s: the VM resumed here; %d frames given back, %d dropped (the tap's queue full)",
            port,
            sent - dropped,
            dropped,
        )

    def _tx_dropped(self, port: str) -> int | None:
        """``port``'s transmit drops (frames its queue had no room for), or None."""
        try:
            with netns_mod.entered(self.netns), open("/proc/thread-self/net/dev") as fh:
                text = fh.read()
        except OSError:
            return None
        for line in text.splitlines()[2:]:
            name, _, rest = line.partition(":")
            if name.strip() == port:
                return int(rest.split()[11])
        return None

    @contextlib.contextmanager
    def forwarding(self, mac: str, port: str, device: str) -> Iterator[Forwarded]:
        """While the body moves ``mac``'s frames to ``device`` (the in-flight port),
        forward what ``port``'s tap queued for ``mac`` there first, then what is left.
        A ``follow`` of the port carries on (it has sent what came since the pause);
        the session stays registered meanwhile, so a pause seen again starts no
        second reader of the tap."""
        with self._lock:
            session = self._following.get(port)
        if session is not None and (session.mac != _mac_bytes(mac) or not session.alive()):
            self.unfollow(port)
            session = None
        if session is None:
            report = Forwarded(port)
            session = self._begin(mac, port, device, report, follow=False)
            if session is None:
                yield report
                return
        try:
            session.keep = False  # the VM leaves: nothing will be given back
            session.kept, session.kept_bytes = [], 0
            session.report.early = session.report.forwarded
            # The backlog goes first: only then may the body move new frames past it
            # (caught_up is set again only after a pass over the taps that began after go).
            session.caught_up.clear()
            session.generation += 1
            session.go()
            session.caught_up.wait(CATCH_UP_S)
            yield session.report
        finally:
            session.finish()

    def close(self) -> None:
        with self._lock:
            following = list(self._following.values())
            self._following.clear()
        for session in following:
            session.finish()
        self._pool.shutdown(wait=False, cancel_futures=True)


class _Session:
    """One port's borrowed taps, the socket their frames leave by and the thread
    that sends them, from its start (a follow at the pause, or SWITCHOVER)."""

    def __init__(
        self, taps: list[tapqueue.BorrowedTap], sock: socket.socket, mac: bytes, report: Forwarded
    ) -> None:
        self.taps = taps
        self.sock = sock
        self.mac = mac
        self.report = report
        #: A follow keeps every frame it read, to give it back (``Leftovers.unfollow``).
        self.keep = False
        self.kept: list[bytes] = []
        self.kept_bytes = 0
        #: pidfds of the taps' readers: one that exits ends the session (once the
        #: queue, which nobody else will read, went on).
        self.exits: list[int] = []
        self.caught_up = threading.Event()
        #: Counts ``go``s: ``caught_up`` is set only after an empty pass over the taps
        #: that began after the last one.
        self.generation = 0
        #: Whether a stop still sends what the taps hold (``finish``).
        self.drain = True
        #: Set once the thread sent its last frame (it closes the descriptors after).
        self.done = threading.Event()
        self._thread: threading.Thread | None = None
        self._closing = threading.Lock()
        self._closed = False
        self._on_end: Callable[[], None] | None = None
        self.stop = self.go_fd = -1
        try:
            self.stop = os.eventfd(0, os.EFD_CLOEXEC)
            self.go_fd = os.eventfd(0, os.EFD_CLOEXEC)
        except OSError:
            self.close()
            raise

    def keep_copy(self, data: bytes) -> None:
        if len(self.kept) < KEEP_FRAMES and self.kept_bytes + len(data) <= KEEP_BYTES:
            self.kept.append(data)
            self.kept_bytes += len(data)
        else:
            self.report.not_kept += 1

    def start(self, name: str, on_end: Callable[[], None]) -> None:
        """Start the thread (raises RuntimeError if none can be had; then the
        caller closes the session)."""
        self._on_end = on_end
        thread = threading.Thread(target=self._run, name=name, daemon=True)
        thread.start()
        self._thread = thread

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _signal(self, fd: int) -> None:
        with self._closing:  # never a write to a number the thread closed and reused
            if not self._closed:
                os.eventfd_write(fd, 1)

    def go(self) -> None:
        """Wake the thread for a pass over the taps (``generation`` was raised)."""
        self._signal(self.go_fd)

    def finish(self, drain: bool = True) -> None:
        """Send what is left (if forwarding started and ``drain``) and end the thread, which then
        closes everything: closing a packet socket waits for an RCU grace period
        (``synchronize_net``), 10-30 ms measured at SWITCHOVER on the libvirt lab,
        which nothing here needs to wait for."""
        self.drain = self.drain and drain
        self._signal(self.stop)
        if self._thread is not None:
            self.done.wait()
        else:
            self.close()

    def close(self) -> None:
        with self._closing:
            if self._closed:
                return
            self._closed = True
        for tap in self.taps:
            tap.close()
        self.sock.close()
        for fd in (self.stop, self.go_fd, *self.exits):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)

    def _run(self) -> None:
        try:
            with _QUICK.held():
                _forward(self, [self.stop, *self.exits], time.monotonic() + FOLLOW_MAX_S)
        except Exception:  # a thread's failure must not keep the taps (and their QEMU's tap) open
            LOG.exception("forwarding %s failed", self.report.port)
        finally:
            self.caught_up.set()
            self.done.set()
            try:
                if self._on_end is not None:
                    self._on_end()
            finally:
                self.close()


def _mac_bytes(mac: str) -> bytes:
    return bytes.fromhex(mac.replace(":", ""))


def _forward(session: _Session, ends: list[int], deadline: float) -> None:
    """Send each queued frame for the session's MAC as soon as it is read (and keep
    every frame read, in order, while the session keeps them), until one of
    ``ends`` (the stop eventfd, the readers' pidfds) is readable or ``deadline``
    passed; then, if the session drains, until a pass sends nothing or
    ``DRAIN_MAX_S`` passed. ``caught_up`` is set after a pass that sent nothing
    and began after the last ``go`` (``generation``)."""
    taps, sock, mac, report = session.taps, session.sock, session.mac, session.report
    poller = select.poll()
    for tap in taps:
        poller.register(tap.fd, select.POLLIN)
    for fd in (*ends, session.go_fd):
        poller.register(fd, select.POLLIN)
    started = time.monotonic()
    draining_until: float | None = None
    while True:
        generation = session.generation
        sent = 0
        for tap in taps:
            for header, frame in tap.read_queued():
                data = header + frame
                if session.keep:
                    session.keep_copy(data)
                if frame[:6] != mac:
                    report.skipped += 1
                    continue
                try:
                    sock.send(data)
                    report.forwarded += 1
                    sent += 1
                except OSError as exc:
                    report.failed += 1
                    report.error = str(exc)
        now = time.monotonic()
        if draining_until is not None and (not sent or now >= draining_until):
            break
        timeout = 0  # frames came: only look whether to stop
        if not sent:
            if generation == session.generation:
                session.caught_up.set()
            timeout = max(0, math.ceil((deadline - now) * 1000))
        ready = {fd for fd, _ in poller.poll(timeout)}
        if session.go_fd in ready:
            os.eventfd_read(session.go_fd)  # level-triggered: take it
        if draining_until is None and (ready & set(ends) or now >= deadline):
            if not session.drain:
                break  # the VM reads its tap again: not one frame more
            draining_until = now + DRAIN_MAX_S
    LOG.debug(
        "tap %s: %d frames forwarded in %.1f ms",
        report.port,
        report.forwarded,
        (time.monotonic() - started) * 1000.0,
    )
