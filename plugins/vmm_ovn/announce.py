"""Announce a migrated VM on an OVN chassis, as if from the VM's own port.

Each round is injected with one OpenFlow packet-out batch whose in_port is
the VM's ofport (:mod:`vmm_ovn.openflow`), so OVN treats the frames as the
VM's: port security checks them, the activation flows see them, the
logical switch floods them over the tunnels to every chassis of the
switch, and localnet ports carry them to physical gateways. A round is:

* a RARP (``announce_activation``): with ``activation-strategy=rarp`` (the
  only one OVN 23.03 has) this is what unblocks the destination's port. It
  comes from the host, before the guest says anything, so the guest's first
  frames are not eaten by the activation drop flows;
* a gratuitous ARP request per IPv4 address (gateways' ARP tables);
* a unicast ARP reply to each configured gateway (gateways that ignore
  gratuitous ARP);
* an unsolicited Neighbor Advertisement (Override) per IPv6 address.

Round 0 waits for the barrier (the port's flows are installed) and leaves
in the caller's thread; later rounds follow ``announce_schedule_ms`` in a
background thread, because ARP is unreliable (Nova repeats QEMU's announce
three times for the same reason).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from vmm_orchestrator import frames  # pure frame builders, shared with the Linux announcer
from vmm_orchestrator.model import Vif
from vmm_ovn.chassis import BarrierResult, OvnChassis

LOG = logging.getLogger(__name__)


def parse_gateways(values: Sequence[str]) -> list[tuple[str, str]]:
    """``["10.0.0.254@02:..", ...]`` -> ``[(ip, mac), ...]``; ValueError naming the bad one."""
    out = []
    for raw in values:
        ip, sep, mac = str(raw).strip().partition("@")
        if not sep:
            raise ValueError(f"[ovn] announce_gateways: expected 'ip@mac', got {raw!r}")
        frames.mac_to_bytes(mac)
        out.append((ip.strip(), mac.strip().lower()))
    return out


class Announcement:
    """One VIF's announcement in progress: counters, the barrier's result, cancel/wait."""

    def __init__(self, vif: Vif, rounds: int) -> None:
        self.vif = vif
        self.rounds_total = rounds
        self.rounds_sent = 0
        self.frames_sent = 0
        self.errors: list[str] = []
        self.first_sent_at: float | None = None
        self.barrier: BarrierResult | None = None
        self.port: str | None = None
        self._stop = threading.Event()
        self._done = threading.Event()

    def cancel(self) -> None:
        self._stop.set()
        self._done.set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def snapshot(self) -> dict[str, Any]:
        return {
            "mac": self.vif.mac,
            "port": self.port,
            "rounds_sent": self.rounds_sent,
            "rounds_total": self.rounds_total,
            "frames_sent": self.frames_sent,
            "errors": list(self.errors),
            "first_sent_at": self.first_sent_at,
            "barrier": self.barrier.to_dict() if self.barrier else None,
        }


class OvnAnnouncer:
    """Announces VIFs of one VN on one chassis (the Announcer contract)."""

    def __init__(
        self,
        chassis: OvnChassis,
        schedule_ms: Sequence[int],
        gateways: Sequence[tuple[str, str]] = (),
        activation: bool = True,
        guest_frames: bool = True,
    ) -> None:
        self.chassis = chassis
        self.schedule_ms = sorted(int(x) for x in schedule_ms) or [0]
        self.gateways = list(gateways)
        self.activation = activation
        self.guest_frames = guest_frames
        self._active: set[Announcement] = set()
        self._lock = threading.Lock()
        self.history: list[Announcement] = []

    def frames_for(self, vif: Vif) -> list[bytes]:
        """One round: RARP (activation) first, then GARPs, unicast replies, NAs."""
        out = [frames.rarp(vif.mac)] if self.activation else []
        if self.guest_frames:
            out += [frames.gratuitous_arp_request(vif.mac, ip) for ip in vif.ipv4]
            for gw_ip, gw_mac in self.gateways:
                out += [
                    frames.unicast_arp_reply(vif.mac, ip, gw_mac, gw_ip)
                    for ip in vif.ipv4
                    if ip != gw_ip
                ]
            out += [frames.unsolicited_na(vif.mac, ip6) for ip6 in vif.ipv6]
        return out or [frames.rarp(vif.mac)]

    def announce(
        self, vif: Vif, on_first_sent: Callable[[float], None] | None = None
    ) -> Announcement:
        """Barrier, round 0 now, the rest on the schedule. Errors are counted, not raised."""
        handle = Announcement(vif, len(self.schedule_ms))
        started = time.monotonic()
        handle.barrier = self.chassis.wait_ready(vif.mac, vif.port)
        if not handle.barrier.ok:
            LOG.warning("announce %s: %s; announcing anyway", vif.mac, handle.barrier.reason)
        with self._lock:
            self.history.append(handle)
            del self.history[:-50]
        self._round(handle, on_first_sent)
        if handle.rounds_total > 1:
            with self._lock:
                self._active.add(handle)
            threading.Thread(
                target=self._rest,
                args=(handle, started),
                name=f"ovn-announce-{vif.mac}",
                daemon=True,
            ).start()
        else:
            handle._done.set()
        return handle

    def _round(
        self, handle: Announcement, on_first_sent: Callable[[float], None] | None = None
    ) -> None:
        vif = handle.vif
        try:
            info = self.chassis.find_port(vif.mac, vif.port)
            if info is None:
                raise LookupError(f"no OVS port for {vif.mac} on {self.chassis.bridge}")
            handle.port = info.name
            batch = self.frames_for(vif)
            self.chassis.inject(info.ofport, batch)
        except Exception as exc:  # never raise into the stage: announcing is best effort
            handle.errors.append(str(exc))
            if len(handle.errors) == 1:
                LOG.warning("announce %s: %s", vif.mac, exc)
            handle.rounds_sent += 1
            return
        handle.rounds_sent += 1
        handle.frames_sent += len(batch)
        if handle.first_sent_at is None:
            handle.first_sent_at = time.monotonic()
            if on_first_sent is not None:
                try:
                    on_first_sent(handle.first_sent_at)
                except Exception:
                    LOG.exception("announce %s: on_first_sent failed", vif.mac)

    def _rest(self, handle: Announcement, started: float) -> None:
        try:
            for offset in self.schedule_ms[1:]:
                left = started + offset / 1000.0 - time.monotonic()
                if left > 0 and handle._stop.wait(left):
                    return
                if handle._stop.is_set():
                    return
                self._round(handle)
        finally:
            handle._done.set()
            with self._lock:
                self._active.discard(handle)

    def close(self) -> None:
        with self._lock:
            active = list(self._active)
        for handle in active:
            handle.cancel()


class OvnAnnouncerPool:
    """The AnnouncerPool contract: one announcer per VN (OVN needs no per-VN state)."""

    def __init__(
        self,
        chassis: OvnChassis,
        schedule_ms: Sequence[int],
        gateways: Sequence[tuple[str, str]] = (),
        activation: bool = True,
    ) -> None:
        self.chassis = chassis
        self.schedule_ms = list(schedule_ms)
        self.gateways = list(gateways)
        self.activation = activation
        self._by_vni: dict[int, OvnAnnouncer] = {}
        self._lock = threading.Lock()

    def for_vni(self, vni: int) -> OvnAnnouncer:
        with self._lock:
            if vni not in self._by_vni:
                self._by_vni[vni] = OvnAnnouncer(
                    self.chassis, self.schedule_ms, self.gateways, self.activation
                )
            return self._by_vni[vni]

    def close(self) -> None:
        with self._lock:
            for announcer in self._by_vni.values():
                announcer.close()
            self._by_vni.clear()
