"""Announce a migrated VM from the host, without help from the guest.

When a VM resumes on its new host, peers, switches and gateways still hold
the old place of its MAC and addresses. QEMU's own self-announce is RARP
only (five frames at about +0, +50, +200, +450, +800 ms): it moves the MAC
in L2 forwarding tables but updates no ARP or neighbour table. This module
sends, on the VM's behalf, the frames that do:

* per IPv4 address a gratuitous ARP *request* (a gateway's ARP table takes
  it; Linux overrides an existing entry at once and creates one with
  ``arp_accept``);
* per known gateway a *unicast ARP reply* from the VM (for gateways that
  ignore unsolicited broadcast ARP);
* per IPv6 address an unsolicited Neighbor Advertisement with the Override
  flag (replaces a cached link-layer address).

ARP and ND are unreliable (no ack, frames get dropped while a bridge or
tunnel is still being plugged), so every round is repeated on a schedule.
The frames are sent through an AF_PACKET socket on the host's bridge of
the VM's VN, so they flood/forward exactly as if the VM had sent them.
"""

from __future__ import annotations

import dataclasses
import errno
import heapq
import ipaddress
import itertools
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Self

from oslo_config import cfg, types

from vmm_linux.netns import socket_in
from vmm_orchestrator import frames, metrics
from vmm_orchestrator.model import Vif, normalize_mac
from vmm_orchestrator.options import require

LOG = logging.getLogger(__name__)

GROUP = "announce"

MODE_FULL = "full"
MODE_RARP = "rarp"
MODE_NONE = "none"
MODES = (MODE_FULL, MODE_RARP, MODE_NONE)

KIND_GARP = "garp"
KIND_ARP_REPLY = "arp_reply"
KIND_NA = "na"
KIND_RARP = "rarp"
KINDS = (KIND_GARP, KIND_ARP_REPLY, KIND_NA, KIND_RARP)

DEFAULT_SCHEDULE_MS = [0, 50, 200, 450, 800, 1500]

#: Send errors after which the socket is reopened: the bound device went
#: away (a socket bound to a deleted device keeps failing with ENXIO even
#: after a device of the same name comes back).
_REOPEN_ERRNOS = frozenset({errno.ENXIO, errno.ENODEV})

ANNOUNCE_OPTS: list[cfg.Opt] = [
    cfg.StrOpt(
        "mode",
        default=MODE_FULL,
        choices=[
            (
                MODE_FULL,
                (
                    "gratuitous ARP requests, unicast ARP replies to the known gateways "
                    "and unsolicited IPv6 Neighbor Advertisements (Override set)"
                ),
            ),
            (
                MODE_RARP,
                "RARP only, as QEMU's self-announce: the baseline to compare with",
            ),
            (MODE_NONE, "send nothing (rely on the guest or on QEMU)"),
        ],
        help="What the host sends on a migrated VM's behalf once it has resumed. "
        "RARP only moves the MAC in switches' L2 tables; gateways' ARP and "
        "neighbour tables need gratuitous ARP requests, unicast ARP replies and "
        "Neighbor Advertisements with the Override flag, which 'full' sends.",
    ),
    cfg.ListOpt(
        "schedule_ms",
        item_type=types.Integer(min=0),
        default=list(DEFAULT_SCHEDULE_MS),
        help="Offsets in milliseconds after the VM resumed at which a round of "
        "announcements is sent; the first round always leaves at once. ARP and ND "
        "are unacknowledged and the first frames may be lost while the network is "
        "still converging, hence the repeats (QEMU uses 0,50,200,450,800).",
    ),
    cfg.ListOpt(
        "gateways",
        item_type=types.String(),
        default=[],
        help="Known IPv4 gateways of the VN as 'ip@mac' (for example "
        "10.0.0.1@02:00:00:00:00:01). Each gets a unicast ARP reply from every IPv4 "
        "address of the VM in each round, which updates gateways that ignore "
        "gratuitous (broadcast) ARP.",
    ),
]


def register_opts(conf: cfg.ConfigOpts) -> None:
    """Register the ``[announce]`` options on ``conf``; safe to call repeatedly."""
    conf.register_opts(ANNOUNCE_OPTS, group=GROUP)


def list_opts() -> list[tuple[str, list[cfg.Opt]]]:
    """For oslo-config-generator."""
    return [(GROUP, ANNOUNCE_OPTS)]


def parse_gateways(values: Iterable[str]) -> list[tuple[str, str]]:
    """``["10.0.0.1@02:..:01", ...]`` -> ``[("10.0.0.1", "02:..:01"), ...]``.

    Only IPv4 gateways: the unicast reply is an ARP message. Raises
    ValueError naming the bad entry.
    """
    out = []
    for raw in values:
        ip, sep, mac = str(raw).strip().partition("@")
        if not sep:
            raise ValueError(f"gateway {raw!r}: expected 'ip@mac'")
        out.append(_checked_gateway(ip.strip(), mac.strip(), what=f"gateway {raw!r}"))
    return out


def _checked_gateway(ip: str, mac: str, what: str) -> tuple[str, str]:
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        raise ValueError(f"{what}: not an IP address: {ip!r}") from None
    if addr.version != 4:
        raise ValueError(f"{what}: only IPv4 gateways get unicast ARP replies")
    return str(addr), normalize_mac(mac)


def _checked_schedule(schedule_ms: Sequence[int]) -> list[int]:
    out = []
    for v in schedule_ms:
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"schedule_ms: offsets are non-negative integers, got {v!r}")
        out.append(v)
    return sorted(out)


class AnnounceHandle:
    """One VIF's announcement in progress: counters, cancel() and wait().

    ``sent`` counts frames handed to the kernel per kind (garp, arp_reply,
    na, rarp); ``errors`` counts failed sends (also in ``last_error``);
    ``rounds_sent`` counts rounds done out of ``rounds_total``;
    ``first_sent_at`` is the time.monotonic() right after the first frame
    left, None until then.
    """

    def __init__(
        self,
        owner: Announcer | None,
        vif: Vif,
        round_frames: list[tuple[str, bytes]],
        rounds_total: int,
        on_first_sent: Callable[[float], None] | None,
    ) -> None:
        self.vif = vif
        self.rounds_total = rounds_total
        self.rounds_sent = 0
        self.sent: dict[str, int] = {k: 0 for k in KINDS}
        self.errors = 0
        self.last_error: OSError | None = None
        self.first_sent_at: float | None = None
        self.started_at = time.monotonic()
        self._owner = owner
        self._frames = round_frames
        self._on_first_sent = on_first_sent
        self._lock = threading.Lock()
        self._finished = threading.Event()
        self._cancelled = False
        if rounds_total == 0:
            self._finished.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    @property
    def done(self) -> bool:
        """True once every round was sent or the handle was cancelled."""
        return self._finished.is_set()

    def cancel(self) -> None:
        """Drop the rounds not sent yet (a round being sent is finished)."""
        with self._lock:
            if self._finished.is_set():
                return
            self._cancelled = True
        if self._owner is not None:
            self._owner._forget(self)
        self._finished.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until done; False if ``timeout`` seconds passed first."""
        return self._finished.wait(timeout)

    def snapshot(self) -> dict[str, Any]:
        """The counters as a JSON-able dict (for timeline notes)."""
        with self._lock:
            return {
                "mac": self.vif.mac,
                "sent": dict(self.sent),
                "errors": self.errors,
                "rounds_sent": self.rounds_sent,
                "rounds_total": self.rounds_total,
                "first_sent_at": self.first_sent_at,
                "cancelled": self._cancelled,
            }

    def _record_sent(self, kind: str) -> Callable[[float], None] | None:
        """Count one frame; return the first-sent callback if it is due now."""
        metrics.count_announcement(kind)
        with self._lock:
            self.sent[kind] += 1
            if self.first_sent_at is not None:
                return None
            self.first_sent_at = time.monotonic()
            callback, self._on_first_sent = self._on_first_sent, None
            return callback

    def _record_error(self, exc: OSError) -> int:
        with self._lock:
            self.errors += 1
            self.last_error = exc
            return self.errors

    def _round_done(self) -> None:
        with self._lock:
            self.rounds_sent += 1
            last = self.rounds_sent >= self.rounds_total
        if last:
            if self.errors:
                LOG.info(
                    "announce %s: done with %d send error(s), sent %s",
                    self.vif.mac,
                    self.errors,
                    self.sent,
                )
            self._finished.set()

    def __repr__(self) -> str:
        return (
            f"AnnounceHandle(mac={self.vif.mac}, rounds={self.rounds_sent}/{self.rounds_total}, "
            f"sent={self.sent}, errors={self.errors})"
        )


@dataclasses.dataclass(order=True)
class _Due:
    at: float
    seq: int
    handle: AnnounceHandle = dataclasses.field(compare=False)


class Announcer:
    """Sends announcement frames for VIFs on one bridge in one namespace.

    One AF_PACKET socket (opened on first use, reopened if the device was
    replaced) and one background scheduler thread (started on first need)
    serve every announce() of this announcer, however many VIFs and rounds
    are pending.
    """

    def __init__(
        self,
        netns: str | None,
        device: str,
        mode: str,
        schedule_ms: Sequence[int],
        gateways: Sequence[tuple[str, str]] = (),
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"announce mode must be one of {', '.join(MODES)}, got {mode!r}")
        schedule = _checked_schedule(schedule_ms)
        if mode != MODE_NONE and not schedule:
            raise ValueError(f"announce mode {mode!r} needs at least one schedule_ms offset")
        self.netns = netns
        self.device = device
        self.mode = mode
        self.schedule_ms = schedule
        self.gateways = [_checked_gateway(ip, mac, what="gateway") for ip, mac in gateways]
        self._sock: socket.socket | None = None
        self._sock_lock = threading.Lock()
        self._cond = threading.Condition()
        self._heap: list[_Due] = []
        self._seq = itertools.count()
        self._active: set[AnnounceHandle] = set()
        self._thread: threading.Thread | None = None
        self._closed = False

    @classmethod
    def from_conf(cls, conf: cfg.ConfigOpts, netns: str | None, device: str) -> Announcer:
        """An announcer configured from the ``[announce]`` group of ``conf``."""
        require(conf, GROUP, "the announcer")
        group = conf[GROUP]
        return cls(
            netns,
            device,
            group.mode,
            list(group.schedule_ms),
            parse_gateways(group.gateways),
        )

    # -- frames -----------------------------------------------------------

    def frames_for(self, vif: Vif) -> list[tuple[str, bytes]]:
        """The (kind, frame) list of one round for ``vif`` in this mode.

        GARP requests come first, so that the first frame on the wire is
        the one that fixes the gateways' ARP tables. In full mode a VIF
        without any address gets an RARP, so that at least L2 tables learn.
        """
        if self.mode == MODE_NONE:
            return []
        if self.mode == MODE_RARP:
            return [(KIND_RARP, frames.rarp(vif.mac))]
        out = [(KIND_GARP, frames.gratuitous_arp_request(vif.mac, ip)) for ip in vif.ipv4]
        for gw_ip, gw_mac in self.gateways:
            for ip in vif.ipv4:
                if ip != gw_ip:
                    out.append(
                        (
                            KIND_ARP_REPLY,
                            frames.unicast_arp_reply(vif.mac, ip, gw_mac, gw_ip),
                        )
                    )
        out.extend((KIND_NA, frames.unsolicited_na(vif.mac, ip6)) for ip6 in vif.ipv6)
        if not out:
            out.append((KIND_RARP, frames.rarp(vif.mac)))
        return out

    # -- socket -----------------------------------------------------------

    def open(self) -> None:
        """Open the socket now, raising OSError if the netns or device is missing.

        Optional (sending opens it on demand); lets a caller fail early.
        """
        with self._sock_lock:
            self._ensure_socket()

    def _ensure_socket(self) -> socket.socket:
        if self._closed:
            raise OSError(errno.EBADF, "announcer is closed")
        if self._sock is None:
            sock = socket_in(self.netns, socket.AF_PACKET, socket.SOCK_RAW, 0)
            try:
                sock.bind((self.device, 0))
            except OSError:
                sock.close()
                raise
            self._sock = sock
        return self._sock

    def _send(self, frame: bytes) -> None:
        with self._sock_lock:
            sock = self._ensure_socket()
            try:
                n = sock.send(frame)
            except OSError as exc:
                if exc.errno not in _REOPEN_ERRNOS:
                    raise
                # The device was deleted (and maybe recreated, e.g. the VN's
                # bridge replugged): bind afresh by name and try once more.
                sock.close()
                self._sock = None
                n = self._ensure_socket().send(frame)
        if n != len(frame):
            raise OSError(errno.EMSGSIZE, f"short send: {n} of {len(frame)} bytes")

    def _send_round(self, handle: AnnounceHandle) -> None:
        for kind, frame in handle._frames:
            try:
                self._send(frame)
            except OSError as exc:
                count = handle._record_error(exc)
                LOG.log(
                    logging.WARNING if count == 1 else logging.DEBUG,
                    "announce %s: sending %s on %s (netns %s) failed: %s",
                    handle.vif.mac,
                    kind,
                    self.device,
                    self.netns,
                    exc,
                )
                continue
            callback = handle._record_sent(kind)
            if callback is not None:
                assert handle.first_sent_at is not None
                try:
                    callback(handle.first_sent_at)
                except Exception:
                    LOG.exception("announce %s: on_first_sent callback failed", handle.vif.mac)
        handle._round_done()

    # -- public sending ---------------------------------------------------

    def send_once(self, vif: Vif) -> AnnounceHandle:
        """Send one round for ``vif`` synchronously, nothing scheduled (tests, tools)."""
        handle = AnnounceHandle(None, vif, self.frames_for(vif), 1, None)
        self._send_round(handle)
        return handle

    def announce(
        self, vif: Vif, on_first_sent: Callable[[float], None] | None = None
    ) -> AnnounceHandle:
        """Announce ``vif`` at this host: round 0 now, the rest on the schedule.

        Round 0 is sent in the calling thread so the first frame leaves with
        no scheduling delay; ``on_first_sent(t)`` is called with the
        time.monotonic() right after the first frame was handed to the
        kernel (from the calling thread, or from the scheduler thread if
        every frame of round 0 failed). Later rounds go at ``schedule_ms``
        offsets from this call. Send errors are counted on the handle and
        logged, never raised.
        """
        if self._closed:
            raise RuntimeError("announcer is closed")
        round_frames = self.frames_for(vif)
        rounds = len(self.schedule_ms) if round_frames else 0
        handle = AnnounceHandle(self, vif, round_frames, rounds, on_first_sent)
        if rounds == 0:
            return handle
        start = handle.started_at
        self._send_round(handle)
        if rounds == 1:
            return handle
        with self._cond:
            scheduled = not self._closed and not handle.done
            if scheduled:
                self._active.add(handle)
                for offset in self.schedule_ms[1:]:
                    due = _Due(start + offset / 1000.0, next(self._seq), handle)
                    heapq.heappush(self._heap, due)
                self._start_thread()
                self._cond.notify()
        if not scheduled:
            handle.cancel()
        return handle

    # -- scheduler --------------------------------------------------------

    def _start_thread(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run, name=f"announce-{self.device}", daemon=True
            )
            self._thread.start()

    def _run(self) -> None:
        while True:
            with self._cond:
                while True:
                    if self._closed:
                        return
                    now = time.monotonic()
                    if self._heap and self._heap[0].at <= now:
                        due = heapq.heappop(self._heap)
                        break
                    self._cond.wait(self._heap[0].at - now if self._heap else None)
            handle = due.handle
            if handle.done:
                continue
            try:
                self._send_round(handle)
            except Exception:  # never let the shared thread die
                LOG.exception("announce %s: round failed", handle.vif.mac)
            if handle.done:
                with self._cond:
                    self._active.discard(handle)

    def _forget(self, handle: AnnounceHandle) -> None:
        with self._cond:
            self._active.discard(handle)
            kept = [d for d in self._heap if d.handle is not handle]
            if len(kept) != len(self._heap):
                heapq.heapify(kept)
                self._heap = kept

    def pending(self) -> int:
        """Rounds waiting in the scheduler (all VIFs)."""
        with self._cond:
            return len(self._heap)

    def close(self) -> None:
        """Cancel every pending round, stop the scheduler and close the socket."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            handles = list(self._active)
            self._active.clear()
            self._heap.clear()
            self._cond.notify_all()
        for handle in handles:
            handle.cancel()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5.0)
        with self._sock_lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
