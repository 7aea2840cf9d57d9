"""The per-host firewall whose dynamic state the state kinds move.

Each hypervisor protects the VMs whose ports it holds the way a Linux-bridge
security-group agent does, because this kernel has no bridge-family
conntrack: ``net.bridge.bridge-nf-call-iptables``/``-ip6tables`` make bridged
IP packets traverse the ``inet`` hooks of the host's namespace, where an
``inet`` table tracks connections (the host namespace's conntrack table is
the session table). Per-port layer-2 checks (DHCP-snooping anti-spoofing,
802.1X dynamic ACLs) live in a ``bridge`` table keyed by port name, because
bridge-family rules do see the ingress port.

What each part models, and which of it is static configuration (written when
a port is plugged, identical on every host) or dynamic state (born on this
host after the VM attached, moved by a state kind):

``inet vmm_fw``: a stateful distributed firewall.
  * ``protected_v4/v6`` (static): addresses of the VMs plugged here.
  * ``services_v4/v6`` (static): (VM address, TCP port) a VM offers; the
    security group's inbound rules.
  * chain ``forward``: a blacklisted (source, VM) pair is dropped first;
    then established/related traffic passes (the session table: moved by
    the ``conntrack`` kind); packets conntrack judges invalid are dropped,
    and so is a TCP packet that would start a session without being a bare
    SYN, in either direction (as pf or an ASA do; Linux's loose pickup
    would otherwise adopt a mid-stream packet as a new session). Traffic to
    a protected VM that is not part of a session is judged by
    ``to_vm_v4/v6``: only a bare SYN to a service (and ICMP echo, neighbour
    discovery) may start one; anything else new inbound is dropped.
  * ``synflood_v4/v6`` (dynamic): a SYN-rate meter per (source, VM); a source
    over ``syn_rate`` lands in ``blacklist_v4/v6`` (dynamic) for
    ``blacklist_timeout``. Both are the "cumulative data" of
    draft-gu-opsawg-policies-migration: moved by the ``nft_sets`` kind.

``bridge vmm_port``: an access switch's port security.
  * ``snooped_ports`` (static; re-asserted by the ``dhcp_snooping`` kind):
    ports under DHCP-snooping enforcement.
  * ``bindings_v4/v6`` (dynamic): the DHCP-snooping binding table, (port,
    MAC, IP) with the lease as element timeout: what a snooper learns from a
    DHCPACK. Chain ``anti_spoof`` passes from a snooped port only ARP and IP
    whose (port, source MAC, source IP) is bound (plus DHCP discovery and
    DAD), i.e. IP source guard + dynamic ARP inspection.
  * ``dacl_ports`` (static; re-asserted by the ``dot1x`` kind): 802.1X ports
    that enforce a dynamic ACL.
  * ``dacl_v4/v6`` (dynamic): the downloadable ACL a RADIUS server returned
    for the authenticated VM, filled in with the VM's address: (port, VM
    address, protocol, service port) it may use, with the session timeout.
  * 802.1X port authorization itself is the kernel's locked bridge port
    (``bridge link set dev PORT locked on``): frames from a source MAC
    without an FDB entry on that port are dropped; the authenticator's
    success installs a static FDB entry (moved by the ``dot1x`` kind).

Multicast snooping is the bridge's own (mdb, moved by the ``mdb`` kind); the
static part is ``mcast_flood off`` on VM ports, as on a switch that does not
flood unregistered multicast to hosts, so only a registered membership
delivers a group's traffic.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import subprocess
from collections.abc import Iterable
from typing import Any

from vmm_orchestrator.errors import VmmError
from vmm_orchestrator.model import Vif
from vmm_state.kinds import _nft

FW_TABLE = "vmm_fw"
PORT_TABLE = "vmm_port"


class FirewallError(VmmError):
    """A firewall command failed; the message names it and the kernel's answer."""


def run(netns: str | None, *args: str, input_: str | None = None, check: bool = True) -> str:
    """Run a command inside ``netns`` (None: here) and return its stdout."""
    argv = ["ip", "netns", "exec", netns, *args] if netns else list(args)
    proc = subprocess.run(argv, capture_output=True, text=True, input=input_)
    if check and proc.returncode != 0:
        raise FirewallError(
            f"`{' '.join(args)}` failed in {netns or 'this namespace'}: "
            f"{proc.stderr.strip() or proc.returncode}"
        )
    return proc.stdout


@dataclasses.dataclass(frozen=True)
class FirewallSettings:
    """The knobs of the model firewall (the same on every host)."""

    #: SYNs per second one source may send to one VM before it is blacklisted.
    syn_rate: int = 20
    syn_burst: int = 20
    #: Seconds a quiet meter element lives.
    synflood_timeout: int = 10
    #: Seconds a flooding source stays blacklisted for that VM.
    blacklist_timeout: int = 60


def ruleset(settings: FirewallSettings) -> str:
    """The nftables ruleset of one host (both tables)."""
    s = settings
    syn = "tcp flags & (fin|syn|rst|ack) == syn"
    meter = "{ip} saddr . {ip} daddr limit rate over {rate}/second burst {burst} packets".format
    return f"""
table inet {FW_TABLE} {{
  set protected_v4 {{ type ipv4_addr; }}
  set protected_v6 {{ type ipv6_addr; }}
  set services_v4 {{ type ipv4_addr . inet_service; }}
  set services_v6 {{ type ipv6_addr . inet_service; }}
  set synflood_v4 {{ type ipv4_addr . ipv4_addr; size 65535; flags dynamic,timeout;
    timeout {s.synflood_timeout}s; }}
  set synflood_v6 {{ type ipv6_addr . ipv6_addr; size 65535; flags dynamic,timeout;
    timeout {s.synflood_timeout}s; }}
  set blacklist_v4 {{ type ipv4_addr . ipv4_addr; size 65535; flags dynamic,timeout;
    timeout {s.blacklist_timeout}s; }}
  set blacklist_v6 {{ type ipv6_addr . ipv6_addr; size 65535; flags dynamic,timeout;
    timeout {s.blacklist_timeout}s; }}
  chain forward {{
    type filter hook forward priority filter; policy accept;
    ip saddr . ip daddr @blacklist_v4 counter drop
    ip6 saddr . ip6 daddr @blacklist_v6 counter drop
    ct state established,related accept
    ct state invalid counter drop
    ct state new meta l4proto tcp {syn.replace("==", "!=")} counter drop
    ip daddr @protected_v4 jump to_vm_v4
    ip6 daddr @protected_v6 jump to_vm_v6
  }}
  chain to_vm_v4 {{
    {syn} add @synflood_v4 {{ {meter(ip="ip", rate=s.syn_rate, burst=s.syn_burst)} }} \\
      add @blacklist_v4 {{ ip saddr . ip daddr }} counter drop
    {syn} ip daddr . tcp dport @services_v4 accept
    icmp type echo-request accept
    counter drop
  }}
  chain to_vm_v6 {{
    icmpv6 type {{ nd-neighbor-solicit, nd-neighbor-advert }} accept
    {syn} add @synflood_v6 {{ {meter(ip="ip6", rate=s.syn_rate, burst=s.syn_burst)} }} \\
      add @blacklist_v6 {{ ip6 saddr . ip6 daddr }} counter drop
    {syn} ip6 daddr . tcp dport @services_v6 accept
    icmpv6 type echo-request accept
    counter drop
  }}
}}
table bridge {PORT_TABLE} {{
  set snooped_ports {{ type ifname; }}
  set bindings_v4 {{ type ifname . ether_addr . ipv4_addr; flags timeout; }}
  set bindings_v6 {{ type ifname . ether_addr . ipv6_addr; flags timeout; }}
  set dacl_ports {{ type ifname; }}
  set dacl_v4 {{ type ifname . ipv4_addr . inet_proto . inet_service; flags timeout; }}
  set dacl_v6 {{ type ifname . ipv6_addr . inet_proto . inet_service; flags timeout; }}
  chain prerouting {{
    type filter hook prerouting priority -200; policy accept;
    iifname @snooped_ports jump anti_spoof
    iifname @dacl_ports jump dynamic_acl
  }}
  chain anti_spoof {{
    ether type arp iifname . ether saddr . arp saddr ip @bindings_v4 return
    ether type arp arp saddr ip 0.0.0.0 return
    ether type ip iifname . ether saddr . ip saddr @bindings_v4 return
    ether type ip ip saddr 0.0.0.0 udp sport 68 udp dport 67 return
    ether type ip6 iifname . ether saddr . ip6 saddr @bindings_v6 return
    ether type ip6 ip6 saddr :: return
    ether type ip6 ip6 saddr fe80::/10 udp dport 547 return
    ether type {{ arp, ip, ip6 }} counter drop
  }}
  chain dynamic_acl {{
    ether type arp return
    ip protocol icmp return
    ip6 nexthdr icmpv6 return
    iifname . ip saddr . ip protocol . th dport @dacl_v4 return
    iifname . ip saddr . ip protocol . th sport @dacl_v4 return
    iifname . ip6 saddr . meta l4proto . th dport @dacl_v6 return
    iifname . ip6 saddr . meta l4proto . th sport @dacl_v6 return
    ether type {{ ip, ip6 }} counter drop
  }}
}}
"""


def _fam(address: str) -> str:
    return "v4" if ipaddress.ip_address(address).version == 4 else "v6"


class HostFirewall:
    """The model firewall of one host namespace (None: the current one)."""

    def __init__(self, netns: str | None, settings: FirewallSettings | None = None) -> None:
        self.netns = netns
        self.settings = settings or FirewallSettings()

    def nft(self, *args: str, input_: str | None = None, check: bool = True) -> str:
        return run(self.netns, "nft", *args, input_=input_, check=check)

    # -- whole firewall -------------------------------------------------------

    def installed(self) -> bool:
        out = self.nft("-j", "list", "tables")
        names = {
            (t["table"]["family"], t["table"]["name"])
            for t in json.loads(out)["nftables"]
            if "table" in t
        }
        return ("inet", FW_TABLE) in names and ("bridge", PORT_TABLE) in names

    def install(self) -> None:
        """Route bridged IP through the inet hooks and load both tables.

        Idempotent: a host that already has the tables keeps them (and their
        dynamic state); nothing is flushed.
        """
        run(
            self.netns,
            "sysctl",
            "-qw",
            "net.bridge.bridge-nf-call-iptables=1",
            "net.bridge.bridge-nf-call-ip6tables=1",
        )
        if not self.installed():
            self.nft("-f", "-", input_=ruleset(self.settings))

    def remove(self) -> None:
        for family, table in (("inet", FW_TABLE), ("bridge", PORT_TABLE)):
            self.nft("delete", "table", family, table, check=False)

    # -- static: what a port plug writes -------------------------------------

    def protect(self, vif: Vif, services: Iterable[int] = ()) -> None:
        """The VM's port is plugged here: guard its addresses, open its services."""
        ports = list(services)
        for addr in (*vif.ipv4, *vif.ipv6):
            fam = _fam(addr)
            self.nft("add", "element", "inet", FW_TABLE, f"protected_{fam}", f"{{ {addr} }}")
            for port in ports:
                self.nft(
                    "add", "element", "inet", FW_TABLE, f"services_{fam}", f"{{ {addr} . {port} }}"
                )

    def unprotect(self, vif: Vif) -> None:
        """The port left: forget the VM's addresses and services (static only)."""
        for addr in (*vif.ipv4, *vif.ipv6):
            fam = _fam(addr)
            self._delete_matching("inet", FW_TABLE, f"protected_{fam}", lambda k, a=addr: k == [a])
            self._delete_matching("inet", FW_TABLE, f"services_{fam}", lambda k, a=addr: k[0] == a)

    def snooping(self, bridge: str, querier: bool, response_interval: float = 1.0) -> None:
        """IGMP/MLD snooping on a VN bridge, as an access switch runs it.

        A Linux bridge enforces snooping only while it knows a querier on
        the segment (its own, or another it heard); without one it floods
        every group to every port (``br_multicast_querier_exists``), so one
        host per VN is the querier. ``response_interval`` (seconds) is the
        queries' maximum response time, which is also how long a bridge
        floods after it first hears another querier.
        """
        run(
            self.netns,
            "ip",
            "link",
            "set",
            "dev",
            bridge,
            "type",
            "bridge",
            "mcast_snooping",
            "1",
            "mcast_querier",
            "1" if querier else "0",
            "mcast_query_response_interval",
            str(max(1, round(response_interval * 100))),
        )

    def plug_port(
        self,
        port: str,
        *,
        snoop: bool = True,
        dot1x: bool = False,
        mcast_flood: bool = False,
    ) -> None:
        """The static profile of a VM port (the port must be on its bridge).

        ``snoop``: DHCP-snooping enforcement; ``dot1x``: a locked port that
        enforces the dynamic ACL; ``mcast_flood`` off: no unregistered
        multicast to the VM.
        """
        run(
            self.netns,
            "bridge",
            "link",
            "set",
            "dev",
            port,
            "mcast_flood",
            "on" if mcast_flood else "off",
        )
        if snoop:
            self.nft("add", "element", "bridge", PORT_TABLE, "snooped_ports", f'{{ "{port}" }}')
        if dot1x:
            run(self.netns, "bridge", "link", "set", "dev", port, "locked", "on", "learning", "off")
            self.nft("add", "element", "bridge", PORT_TABLE, "dacl_ports", f'{{ "{port}" }}')

    def unplug_port(self, port: str) -> None:
        for name in ("snooped_ports", "dacl_ports"):
            self._delete_matching("bridge", PORT_TABLE, name, lambda k, p=port: k == [p])

    # -- dynamic: what the control protocols would install -------------------

    def snoop_binding(
        self, port: str, mac: str, ip: str, lease: int, remaining: int | None = None
    ) -> None:
        """What a DHCP snooper does on a DHCPACK for ``ip`` to ``mac`` on ``port``."""
        fam = _fam(ip)
        expiry = f" expires {remaining}s" if remaining is not None else ""
        self.nft(
            "add",
            "element",
            "bridge",
            PORT_TABLE,
            f"bindings_{fam}",
            f'{{ "{port}" . {mac} . {ip} timeout {lease}s{expiry} }}',
        )

    def authorize(
        self,
        vif: Vif,
        acl: Iterable[tuple[str, int]] = (),
        session_timeout: int = 3600,
    ) -> None:
        """What an 802.1X authenticator does on EAP-Success for the VM.

        The MAC gets a static FDB entry on the (locked) port; the RADIUS
        dynamic ACL (``(protocol, port)`` pairs) is filled in with the VM's
        addresses, for the session timeout.
        """
        assert vif.port
        run(
            self.netns,
            "bridge",
            "fdb",
            "replace",
            vif.mac,
            "dev",
            vif.port,
            "master",
            "static",
        )
        for proto, service in acl:
            for addr in (*vif.ipv4, *vif.ipv6):
                self.nft(
                    "add",
                    "element",
                    "bridge",
                    PORT_TABLE,
                    f"dacl_{_fam(addr)}",
                    f'{{ "{vif.port}" . {addr} . {proto} . {service} timeout {session_timeout}s }}',
                )

    # -- reading ------------------------------------------------------------------

    def elements(self, family: str, table: str, name: str) -> list[dict[str, Any]]:
        """The set's elements: ``{"key": [values], "timeout": s, "expires": s, ...}``."""
        return _nft.list_set(self.netns, family, table, name)[1]

    def counter(self, family: str, table: str, chain: str, index: int = -1) -> int:
        """Packets counted by the ``index``-th counter of ``chain`` (-1: the last)."""
        out = self.nft("-j", "list", "chain", family, table, chain)
        counts = []
        for item in json.loads(out)["nftables"]:
            rule = item.get("rule")
            if not rule:
                continue
            for expr in rule["expr"]:
                if isinstance(expr, dict) and "counter" in expr:
                    counts.append(int(expr["counter"]["packets"]))
        return counts[index] if counts else 0

    def _delete_matching(self, family: str, table: str, name: str, match: Any) -> None:
        info, found = _nft.list_set(self.netns, family, table, name)
        _nft.delete_present(self.netns, info, [e["key"] for e in found if match(e["key"])])
