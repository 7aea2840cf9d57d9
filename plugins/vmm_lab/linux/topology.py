"""The lab: an underlay, hypervisor hosts (NVEs), VMs and a gateway, all in
network namespaces that share a per-run prefix.

A VM is a namespace whose eth0 is one end of a veth; the other end is its
"tap" on a host bridge. Live migration is modelled as QEMU does it for the
network: the port is paused for the downtime, then the tap appears on the
destination host, while the VM's own stack (sockets, ARP cache) stays as it
was. The lab only moves ports; everything the network does about it is done
by the NVE agents and, when enabled, the orchestrator.

Everything the lab creates carries the run's prefix, and teardown removes
every namespace with that prefix (and the processes in them), so a failed
run cleans up as well as a good one, and two runs cannot collide.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import logging
import os
import secrets
import signal
import subprocess
import time
from collections.abc import Iterator
from typing import Any

from pyroute2 import NetNS

from vmm_kernel.netns import lean_iproute
from vmm_orchestrator.errors import VmmError
from vmm_orchestrator.model import Vif, Workload

LOG = logging.getLogger(__name__)

UNDERLAY_NET = ipaddress.ip_network("198.18.0.0/24")
OVERLAY_V4 = ipaddress.ip_network("198.19.0.0/16")
OVERLAY_V6_PREFIX = "fd00:"

# A paused-and-resumed QEMU guest never sees its link go down; a veth end
# moved between namespaces does, and Linux then re-sends MLD reports ("we
# might have roamed") and router solicitations. Those frames would teach the
# bridges where the VM is, an announcement no real guest makes, so the lab's
# VMs do not send them.
VM_QUIET_RULES = """
table ip6 vmmlab {
  chain out {
    type filter hook output priority 0;
    icmpv6 type { mld-listener-report, mld2-listener-report, nd-router-solicit } drop
  }
}
"""


def new_prefix() -> str:
    """A namespace prefix unique to this run (pid + random)."""
    return f"vmm{os.getpid() % 10000:04d}{secrets.token_hex(2)}"


class LabError(VmmError):
    """A lab step failed; the message names the command and its error."""


def sh(*args: str, check: bool = True, input_: str | None = None) -> str:
    """Run a command; on failure raise LabError with its stderr."""
    proc = subprocess.run(args, capture_output=True, text=True, input=input_)
    if check and proc.returncode != 0:
        raise LabError(f"`{' '.join(args)}` failed: {proc.stderr.strip() or proc.returncode}")
    return proc.stdout


def in_ns(ns: str, *args: str, check: bool = True, input_: str | None = None) -> str:
    return sh("ip", "netns", "exec", ns, *args, check=check, input_=input_)


@dataclasses.dataclass
class LabHost:
    """A hypervisor: a namespace with an underlay address (its VTEP)."""

    name: str
    netns: str
    vtep: str


@dataclasses.dataclass
class LabVm:
    """A VM (or the gateway): a namespace with eth0 on one VN."""

    name: str
    netns: str
    mac: str
    vni: int
    ipv4: str
    ipv6: str
    port: str
    host: str
    gateway: bool = False

    @property
    def vif(self) -> Vif:
        return Vif(
            mac=self.mac,
            vni=self.vni,
            ipv4=(self.ipv4,),
            ipv6=(self.ipv6,),
            port=self.port,
        )

    @property
    def workload(self) -> Workload:
        return Workload(name=self.name, vifs=(self.vif,))


@dataclasses.dataclass
class MoveTimes:
    """Monotonic times of one lab migration (seconds)."""

    paused_at: float
    resumed_at: float


class Lab:
    """Builds and tears down one lab run."""

    def __init__(self, prefix: str | None = None, vni: int = 100) -> None:
        self.prefix = prefix or new_prefix()
        self.vni = vni
        self.underlay = f"{self.prefix}-ul"
        self.hosts: dict[str, LabHost] = {}
        self.vms: dict[str, LabVm] = {}
        self._ns: dict[str, Any] = {}
        self._next_vm = 10

    # -- building -------------------------------------------------------------

    def build_underlay(self) -> None:
        self._add_ns(self.underlay)
        in_ns(self.underlay, "ip", "link", "add", "ul", "type", "bridge")
        in_ns(self.underlay, "ip", "link", "set", "ul", "up")

    def add_host(self, name: str) -> LabHost:
        ns = f"{self.prefix}-{name}"
        index = len(self.hosts) + 1
        vtep = str(UNDERLAY_NET[index])
        self._add_ns(ns)
        sh(
            "ip",
            "link",
            "add",
            "eth0",
            "netns",
            ns,
            "type",
            "veth",
            "peer",
            "name",
            f"u-{name}",
            "netns",
            self.underlay,
        )
        in_ns(self.underlay, "ip", "link", "set", f"u-{name}", "master", "ul", "up")
        in_ns(ns, "ip", "addr", "add", f"{vtep}/{UNDERLAY_NET.prefixlen}", "dev", "eth0")
        in_ns(ns, "ip", "link", "set", "eth0", "up")
        host = LabHost(name=name, netns=ns, vtep=vtep)
        self.hosts[name] = host
        return host

    def add_vm(self, name: str, host: str, gateway: bool = False) -> LabVm:
        """A VM namespace on ``host``'s bridge for the lab's VN (the bridge must exist)."""
        number = 1 if gateway else self._next_vm
        if not gateway:
            self._next_vm += 1
        ns = f"{self.prefix}-{name}"
        mac = f"52:54:00:{self.vni >> 8 & 0xFF:02x}:{self.vni & 0xFF:02x}:{number:02x}"
        vm = LabVm(
            name=name,
            netns=ns,
            mac=mac,
            vni=self.vni,
            ipv4=f"198.19.{self.vni % 256}.{number}",
            ipv6=f"{OVERLAY_V6_PREFIX}{self.vni}::{number}",
            port=f"tap-{name}"[:15],
            host=host,
            gateway=gateway,
        )
        hns = self.hosts[host].netns
        self._add_ns(ns)
        sysctls = [
            "net.ipv6.conf.all.accept_ra=0",
            "net.ipv6.conf.default.accept_ra=0",
            "net.ipv6.conf.default.router_solicitations=0",
            "net.ipv6.conf.default.addr_gen_mode=1",
        ]
        if gateway:
            sysctls += ["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"]
        in_ns(ns, "sysctl", "-qw", *sysctls)
        sh(
            "ip",
            "link",
            "add",
            vm.port,
            "netns",
            hns,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            ns,
        )
        in_ns(ns, "ip", "link", "set", "lo", "up")
        in_ns(ns, "ip", "link", "set", "eth0", "address", mac, "mtu", "1450", "up")
        in_ns(ns, "ip", "addr", "add", f"{vm.ipv4}/24", "dev", "eth0")
        in_ns(ns, "ip", "addr", "add", f"{vm.ipv6}/64", "dev", "eth0", "nodad")
        in_ns(ns, "nft", "-f", "-", input_=VM_QUIET_RULES)
        in_ns(
            hns,
            "ip",
            "link",
            "set",
            vm.port,
            "master",
            f"br-{self.vni}",
            "mtu",
            "1450",
            "up",
        )
        self.vms[name] = vm
        return vm

    # -- migration primitives -------------------------------------------------

    def netlink(self, ns: str) -> Any:
        """A cached pyroute2 handle for ``ns`` (fast enough for the pause window)."""
        if ns not in self._ns:  # see vmm_kernel.netns: nothing kept, 64 KiB reads
            self._ns[ns] = lean_iproute(NetNS(ns))
        return self._ns[ns]

    def pause(self, vm: LabVm) -> float:
        """Stop the VM's port: nothing in or out, as while QEMU is paused."""
        ipr = self.netlink(self.hosts[vm.host].netns)
        ipr.link("set", index=self._index(ipr, vm.port), state="down")
        return time.monotonic()

    def move(self, vm: LabVm, destination: str, resume_at: float | None = None) -> float:
        """Put the paused VM's port on ``destination`` and resume it there.

        The port is moved and brought up first, and the lab waits until the
        kernel reports it operationally up (carrier and queue are set up
        asynchronously); only then, at ``resume_at`` at the earliest, does
        it join the bridge, which the kernel does at once. That is how a
        real migration looks to the network: the destination's tap is ready
        before the VM resumes. Returns the monotonic resume time.
        """
        src = self.netlink(self.hosts[vm.host].netns)
        dst_ns = self.hosts[destination].netns
        src.link("set", index=self._index(src, vm.port), net_ns_fd=dst_ns)
        dst = self.netlink(dst_ns)
        idx = self._index(dst, vm.port)
        dst.link("set", index=idx, state="up")
        self._wait_oper_up(dst, idx, vm.port)
        if resume_at is not None:
            left = resume_at - time.monotonic()
            if left > 0:
                time.sleep(left)
        dst.link("set", index=idx, master=self._index(dst, f"br-{vm.vni}"))
        resumed = time.monotonic()
        vm.host = destination
        return resumed

    @staticmethod
    def _wait_oper_up(ipr: Any, idx: int, name: str, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            links = ipr.get_links(idx)
            if links and links[0].get("IFLA_OPERSTATE") == "UP":
                return
            time.sleep(0.001)
        raise LabError(f"port {name} did not come up within {timeout}s")

    def resume_in_place(self, vm: LabVm) -> float:
        """Undo a pause without moving (an aborted migration)."""
        ipr = self.netlink(self.hosts[vm.host].netns)
        ipr.link("set", index=self._index(ipr, vm.port), state="up")
        return time.monotonic()

    @staticmethod
    def _index(ipr: Any, name: str) -> int:
        found = ipr.link_lookup(ifname=name)
        if not found:
            raise LabError(f"no device {name}")
        return int(found[0])

    # -- processes -------------------------------------------------------------

    def popen(self, ns: str, *args: str, **kwargs: Any) -> subprocess.Popen[str]:
        """Start a process inside ``ns`` (killed by teardown at the latest)."""
        return subprocess.Popen(["ip", "netns", "exec", ns, *args], text=True, **kwargs)

    # -- teardown -------------------------------------------------------------

    def _add_ns(self, ns: str) -> None:
        sh("ip", "netns", "add", ns)

    def namespaces(self) -> list[str]:
        return lab_namespaces(self.prefix)

    def teardown(self) -> None:
        """Remove every namespace of this run and kill what runs in them."""
        for handle in self._ns.values():
            with contextlib.suppress(Exception):
                handle.close()
        self._ns.clear()
        remove_namespaces(self.prefix)


def lab_namespaces(prefix: str) -> list[str]:
    try:
        names = os.listdir("/run/netns")
    except FileNotFoundError:
        return []
    return sorted(n for n in names if n.startswith(f"{prefix}-"))


def remove_namespaces(prefix: str) -> list[str]:
    """Kill the processes in, and delete, every namespace named ``prefix``-*."""
    removed = []
    for ns in lab_namespaces(prefix):
        pids = sh("ip", "netns", "pids", ns, check=False).split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
        sh("ip", "netns", "del", ns, check=False)
        removed.append(ns)
    return removed


@contextlib.contextmanager
def lab_run(prefix: str | None = None, vni: int = 100) -> Iterator[Lab]:
    """A Lab that is torn down however the body ends."""
    lab = Lab(prefix, vni)
    try:
        yield lab
    finally:
        lab.teardown()
