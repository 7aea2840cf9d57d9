"""The source NVE follows a departing VM at kernel speed: its first frame from elsewhere.

The source's in-flight tunnel (SWITCHOVER) is a stage: libvirt's pause
event, then the job read that tells the final copy from an operator's pause
(up to ``final_copy_wait_ms``), then the directory and netlink, 20-40 ms in
all on the libvirt lab. A final copy can be shorter than that (a guest that
dirtied little: 47 ms of downtime, the destination's first RARP 27 ms after
the pause), and then peers' frames that still reach the source after the VM
resumed elsewhere go into the old tap, which nobody reads any more: they
are lost after the resume.

So at the pause the source follows the VM's tap where it knows the tap's
reader (a QEMU: vmm_linux.leftovers ``follow``, which keeps what the tap
queued ahead of what comes after), and otherwise arms the kernel itself
(``arm``), in an nftables ``netdev`` table of the NVE's namespace:

* on the VN's VXLAN device (ingress), any frame whose *source* is a
  departing MAC (the VM's RARP, GARP or NA, or any traffic of it) means the
  VM runs on another host now: the MAC goes into the ``moved`` set;
* on the VM's old port (egress), a frame for a MAC in ``moved`` is
  forwarded to the VN's in-flight port, which tunnels it to the new VTEP
  (or, before SWITCHOVER gave it that VTEP, to every VTEP of the VN, where
  only the destination's expectation takes it).

No userspace step is left between the VM's first frame at the destination
and the source's diversion: the RARP crosses the underlay and the next
frame for the VM is diverted. An operator's pause arms it too; it then
stays idle (the VM sends nothing from elsewhere) unless another host sends
frames with the paused VM's MAC, which would divert that VM's frames for as
long as it stays paused and armed, never a running VM's. ``disarm`` (the
hold timer's end, a revert, the MAC expected or plugged here again) removes
the port's chain and the MAC's elements. This kernel (6.18) keeps a netdev
chain whose device went away and binds it to the next device of that name:
a VM that comes back gets a tap of the same name, so a chain a killed agent
left would divert its frames. A driver therefore drops the whole table when
it takes over its first VN (``forget_all``), as it does with stale holds.

Measured with a veth pair standing in for the tap: after one RARP seen at
the ingress hook, the next frame for the MAC left through the in-flight
device and none reached the old port.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable

LOG = logging.getLogger(__name__)

#: The NVE's netdev table (one per namespace, beside its ``bridge vmm_nve``).
TABLE = "netdev vmm_depart"
#: How long a "moved" mark lives if nothing disarms it (an agent killed meanwhile).
MOVED_TIMEOUT_S = 120


def _chain_name(prefix: str, what: str) -> str:
    return f"{prefix}_{re.sub(r'[^A-Za-z0-9_]', '_', what)}"


def arm_script(vni: int, mac: str, port: str, vxlan: str, inflight: str) -> str:
    """One nft transaction: the table and sets, the VN's ingress chain, the port's
    egress chain and the MAC in ``departing``; re-running it changes nothing."""
    vn_chain, port_chain = _chain_name("in", str(vni)), _chain_name("out", port)
    return "\n".join(
        [
            f"add table {TABLE}",
            f"add set {TABLE} departing {{ type ether_addr; }}",
            f"add set {TABLE} moved {{ type ether_addr; flags dynamic,timeout; "
            f"timeout {MOVED_TIMEOUT_S}s; }}",
            f'add chain {TABLE} {vn_chain} {{ type filter hook ingress device "{vxlan}" '
            "priority 0; }",
            f"flush chain {TABLE} {vn_chain}",
            f"add rule {TABLE} {vn_chain} ether saddr @departing add @moved {{ ether saddr }}",
            f'add chain {TABLE} {port_chain} {{ type filter hook egress device "{port}" '
            "priority 0; }",
            f"flush chain {TABLE} {port_chain}",
            f'add rule {TABLE} {port_chain} ether daddr @moved fwd to "{inflight}"',
            f"add element {TABLE} departing {{ {mac} }}",
            "",
        ]
    )


def disarm_scripts(mac: str, port: str) -> list[str]:
    """Separate nft commands (each may find its object gone already)."""
    return [
        f"delete chain {TABLE} {_chain_name('out', port)}",
        f"delete element {TABLE} departing {{ {mac} }}",
        f"delete element {TABLE} moved {{ {mac} }}",
    ]


class Departures:
    """Which MACs this NVE watches for their first frame from elsewhere, and on which port.

    ``apply`` runs one nft script in the NVE's namespace (raising on failure).
    """

    def __init__(self, apply: Callable[[str], None]) -> None:
        self._apply = apply
        self._lock = threading.Lock()
        self._armed: dict[tuple[int, str], str] = {}

    def arm(self, vni: int, mac: str, port: str, vxlan: str, inflight: str) -> None:
        self._apply(arm_script(vni, mac, port, vxlan, inflight))
        with self._lock:
            self._armed[(vni, mac)] = port

    def disarm(self, vni: int, mac: str) -> None:
        with self._lock:
            port = self._armed.pop((vni, mac), None)
        if port is None:
            return
        for script in disarm_scripts(mac, port):
            try:
                self._apply(script)
            except Exception as exc:  # gone already (the port left): nothing to undo
                LOG.debug("departure of %s: %s", mac, exc)

    def armed(self, vni: int, mac: str) -> str | None:
        """The port ``mac`` is watched on, or None."""
        with self._lock:
            return self._armed.get((vni, mac))

    def forget_all(self) -> None:
        """Drop the table (the NVE's last VN went, or it closes)."""
        with self._lock:
            self._armed.clear()
        try:
            self._apply(f"delete table {TABLE}")
        except Exception as exc:  # never armed here
            LOG.debug("no departure table to remove: %s", exc)
