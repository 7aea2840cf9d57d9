"""The old NVE refreshes its ARP cache after a VM left (draft-ietf-nvo3-vmm 4.2).

What "the old NVE's ARP cache" is here: this NVE is a bridge with VXLAN
ports whose forwarding entries (MAC -> port or VTEP) and neighbour entries
on ``br-<vni>`` (the ARP/ND suppression table, ``NUD_NOARP``) come from the
directory alone; the NVE agent rewrites those as soon as the move is
committed, so they never point at the old place. What the directory does not
own is the *kernel's dynamic* neighbour cache of the host's namespace: the
entries that an IP stack living on the host learned by ARP/ND itself (a
gateway or router whose leg is a port of the VN bridge, a metadata or DHCP
service, the host's own address on a VN). Those were confirmed by the VM
while it was attached here and stay REACHABLE for up to ~30 s more, then
STALE (still used), with nothing that re-checks them against where the VM
is now.

So at COMPLETED on the source, ``arp_refresh`` re-validates every dynamic
neighbour entry (IPv4 and IPv6) of the host's namespace that names the
departed VM: its MAC as link-layer address, or one of its addresses. Each
is set to ``NUD_PROBE``, so the kernel at once sends its unicast probes to
the cached MAC; they follow the (already updated) forwarding entries to the
VM's new place, and the VM's answer confirms the entry there. An entry
nobody answers for fails and is resolved again by broadcast on its next use
(a cold move that changed the MAC, an address given to another VM). A kernel
that refuses ``NUD_PROBE`` from user space (older than Linux 5.x) gets the
entry deleted instead: the same outcome, one broadcast later.

Permanent and NOARP entries (the operator's, the directory's) are left
alone; so are entries of other VMs (the draft's "ARP scan to all attached
VMs" would re-probe every VM on the host for one departure; only the
departed VM's entries can point at an old location).
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket
from collections.abc import Iterable
from typing import Any

from vmm_kernel.netns import lean_iproute
from vmm_linux.netns import entered
from vmm_orchestrator.model import Phase, Role
from vmm_orchestrator.stage import Stage, StageContext

LOG = logging.getLogger(__name__)

NUD_INCOMPLETE = 0x01
NUD_REACHABLE = 0x02
NUD_STALE = 0x04
NUD_DELAY = 0x08
NUD_PROBE = 0x10
NUD_FAILED = 0x20
NUD_NOARP = 0x40
NUD_PERMANENT = 0x80
NTF_PROXY = 0x08

#: States the kernel learned by itself and keeps using: worth re-validating.
DYNAMIC = NUD_REACHABLE | NUD_STALE | NUD_DELAY | NUD_PROBE


def _iproute(netns: str | None) -> Any:
    from pyroute2 import IPRoute, NetNS

    if netns:
        return lean_iproute(NetNS(netns))  # see vmm_kernel.netns: 64 KiB reads
    with entered(None):
        return lean_iproute(IPRoute())


def stale_candidates(
    entries: Iterable[dict[str, Any]], macs: Iterable[str], ips: Iterable[str]
) -> list[dict[str, Any]]:
    """The dynamic entries (``ifindex``, ``dst``, ``lladdr``, ``state``) that
    name a departed MAC or address. Pure: the rule, testable without a kernel."""
    wanted_macs = {m.lower() for m in macs}
    wanted_ips = {ipaddress.ip_address(i) for i in ips}
    found = []
    for e in entries:
        if not e.get("state", 0) & DYNAMIC or e.get("flags", 0) & NTF_PROXY:
            continue
        dst = e.get("dst")
        lladdr = (e.get("lladdr") or "").lower()
        if lladdr in wanted_macs or (dst and ipaddress.ip_address(dst) in wanted_ips):
            found.append(e)
    return found


def revalidate(netns: str | None, macs: Iterable[str], ips: Iterable[str]) -> dict[str, list[str]]:
    """Re-validate the namespace's dynamic neighbour entries for a departed VM.

    Returns {"probed": ["<ip> dev <ifindex>", ...], "deleted": [...]}.
    """
    from pyroute2 import NetlinkError

    ipr = _iproute(netns)
    try:
        entries = []
        for family in (socket.AF_INET, socket.AF_INET6):
            for msg in ipr.get_neighbours(family=family):
                entries.append(
                    {
                        "family": family,
                        "ifindex": msg["ifindex"],
                        "state": msg["state"],
                        "flags": msg["flags"],
                        "dst": msg.get("NDA_DST"),
                        "lladdr": msg.get("NDA_LLADDR"),
                    }
                )
        out: dict[str, list[str]] = {"probed": [], "deleted": []}
        for e in stale_candidates(entries, macs, ips):
            label = f"{e['dst']} dev {e['ifindex']}"
            try:
                ipr.neigh(
                    "change",
                    family=e["family"],
                    ifindex=e["ifindex"],
                    dst=e["dst"],
                    state=NUD_PROBE,
                )
                out["probed"].append(label)
                continue
            except NetlinkError as exc:
                if exc.code in (errno.ENOENT, errno.ESRCH):
                    continue  # gone meanwhile
                LOG.info("neighbour %s: NUD_PROBE refused (%s); deleting it", label, exc)
            try:
                ipr.neigh("del", family=e["family"], ifindex=e["ifindex"], dst=e["dst"])
                out["deleted"].append(label)
            except NetlinkError as exc:
                if exc.code not in (errno.ENOENT, errno.ESRCH):
                    raise
        return out
    finally:
        ipr.close()


class ArpRefresh(Stage):
    """COMPLETED, source: re-validate the host's dynamic neighbour entries of the
    departed VM (see the module docstring). Best effort: a failure here never
    fails the migration, the entries then age out as before."""

    name = "arp_refresh"
    phase = Phase.COMPLETED
    role = Role.SOURCE
    default_attempts = 1
    best_effort = True

    def run(self, ctx: StageContext) -> dict[str, Any]:
        nve = ctx.host.service("nve")
        vifs = ctx.migration.workload.vifs
        macs = [v.mac for v in vifs]
        ips = [ip for v in vifs for ip in (*v.ipv4, *v.ipv6)]
        result = revalidate(getattr(nve, "netns", None), macs, ips)
        ctx.note(probed=len(result["probed"]), deleted=len(result["deleted"]))
        if result["probed"] or result["deleted"]:
            LOG.info(
                "migration %s: old host re-validates %s, deleted %s",
                ctx.migration.id,
                ", ".join(result["probed"]) or "nothing",
                ", ".join(result["deleted"]) or "nothing",
            )
        return result
