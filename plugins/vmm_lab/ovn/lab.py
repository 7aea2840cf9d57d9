"""A real OVN lab in network namespaces: one central node, chassis, VMs.

Central (``<p>-c``): the NB and SB ovsdb-servers and ovn-northd. Each
chassis (``<p>-chN``): its own ovsdb-server, ovs-vswitchd (userspace
datapath, ``datapath_type=netdev``, userspace Geneve) and ovn-controller. An
underlay bridge (``<p>-ul``) joins them. A VM is a namespace whose eth0 is a
veth into its chassis' br-int; migration pre-plugs a second veth on the
destination with the same ``iface-id`` (as Nova plugs the destination's tap
before the migration) and moves the guest by flipping links, which is
what a paused and resumed guest looks like to the network.

Must-have fixes measured on this machine (see ../shared/OVN-LAB.md):
TX checksum offload off on every veth end whose frames OVS reads with
AF_PACKET (else UDP/TCP checksum errors); the userspace tunnel neighbour
cache pre-seeded (else the first packet per tunnel is dropped); VMs quiet
on link changes (no MLD/RS a paused guest would never send).

Everything carries a per-run prefix; :func:`ovn_lab` tears down every
daemon (by pid), namespace and folder however its body ends.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import fcntl
import logging
import os
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence

from pyroute2 import IPRoute

from vmm_kernel.netns import entered, socket_in
from vmm_orchestrator.errors import VmmError

LOG = logging.getLogger(__name__)

OVS_SCHEMA = "/usr/share/openvswitch/vswitch.ovsschema"
NB_SCHEMA = "/usr/share/ovn/ovn-nb.ovsschema"
SB_SCHEMA = "/usr/share/ovn/ovn-sb.ovsschema"
REQUIRED_BINARIES = (
    "ovsdb-server",
    "ovsdb-tool",
    "ovs-vswitchd",
    "ovs-vsctl",
    "ovs-ofctl",
    "ovs-appctl",
    "ovn-northd",
    "ovn-controller",
    "ovn-nbctl",
)
UNDERLAY = "192.168.250"
CENTRAL_IP = f"{UNDERLAY}.2"
SWITCH = "sw0"
OVERLAY_V4 = "10.0.0"
OVERLAY_V6 = "fd00::"
VM_MTU = 1400

# Guests keep quiet when their link changes (a paused QEMU guest never sees
# it): no MLD reports or router solicitations that would "announce" the VM.
VM_QUIET_RULES = """
table ip6 vmmovnlab {
  chain out {
    type filter hook output priority 0;
    icmpv6 type { mld-listener-report, mld2-listener-report, nd-router-solicit } drop
  }
}
"""

SIOCETHTOOL = 0x8946
ETHTOOL_STXCSUM = 0x17


class LabError(VmmError):
    """A lab step failed; the message names the command and its error."""


def missing_binaries() -> list[str]:
    """The OVN/OVS programs this lab needs that are not installed."""
    return [b for b in REQUIRED_BINARIES if shutil.which(b) is None]


def new_prefix() -> str:
    """A short per-run prefix (namespace names, folders)."""
    return f"ovn{os.getpid() % 1000:03d}{secrets.token_hex(2)}"


def run(*args: str, env: dict[str, str] | None = None, check: bool = True) -> str:
    proc = subprocess.run(args, capture_output=True, text=True, env=env)
    if check and proc.returncode != 0:
        raise LabError(f"`{' '.join(args)}` failed: {proc.stderr.strip() or proc.returncode}")
    return proc.stdout


def tx_checksum_off(netns: str, ifname: str) -> None:
    """``ethtool -K IF tx off`` through the SIOCETHTOOL ioctl, inside ``netns``.

    OVS' userspace datapath reads veth frames with AF_PACKET and forwards
    CHECKSUM_PARTIAL packets unfixed: every UDP/TCP packet from such a port
    would arrive with a bad checksum.
    """
    value = ctypes.create_string_buffer(struct.pack("II", ETHTOOL_STXCSUM, 0), 8)
    ifreq = struct.pack("16sP", ifname.encode(), ctypes.addressof(value)) + bytes(16)
    with socket_in(netns, socket.AF_INET, socket.SOCK_DGRAM) as sock:
        fcntl.ioctl(sock.fileno(), SIOCETHTOOL, ifreq)


@dataclasses.dataclass
class Chassis:
    """One hypervisor: its namespace, folder, underlay address and sockets."""

    name: str
    netns: str
    dir: str
    ip: str
    mac: str

    @property
    def db(self) -> str:
        return f"unix:{self.dir}/db.sock"

    @property
    def openflow(self) -> str:
        return f"unix:{self.dir}/br-int.mgmt"

    @property
    def vswitchd_ctl(self) -> str:
        return f"{self.dir}/ovs-vswitchd.ctl"

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        for var in (
            "OVS_RUNDIR",
            "OVS_DBDIR",
            "OVS_LOGDIR",
            "OVN_RUNDIR",
            "OVN_DBDIR",
            "OVN_LOGDIR",
        ):
            env[var] = self.dir
        env["OVS_SYSCONFDIR"] = self.dir
        return env

    def vsctl(self, *args: str) -> str:
        return run("ovs-vsctl", f"--db={self.db}", "--timeout=10", *args)

    def appctl(self, *args: str) -> str:
        return run("ovs-appctl", "-t", self.vswitchd_ctl, *args)

    def controller_ctl(self) -> str:
        """ovn-controller 23.03 has no --unixctl: its socket is named by pid."""
        with open(os.path.join(self.dir, "ovn-controller.pid"), encoding="ascii") as f:
            pid = f.read().strip()
        return os.path.join(self.dir, f"ovn-controller.{pid}.ctl")


@dataclasses.dataclass
class Vm:
    """A VM: a namespace with one live NIC (``link``) into its chassis' br-int."""

    name: str
    netns: str
    mac: str
    ipv4: str
    ipv6: str
    chassis: str
    link: str = "eth0"
    port: str = ""
    generation: int = 0
    #: A pre-plugged NIC on a destination: (chassis, VM-side link, host-side port).
    pending: tuple[str, str, str] | None = None
    neighbours: list[tuple[str, str]] = dataclasses.field(default_factory=list)

    @property
    def lsp(self) -> str:
        return self.name


class OvnLab:
    """Build and tear down the lab; see the module docstring."""

    def __init__(self, prefix: str, workdir: str | None = None, encap: str = "geneve") -> None:
        self.prefix = prefix
        self.encap = encap
        self.workdir = workdir or tempfile.mkdtemp(prefix=f"{prefix}-", dir="/tmp")
        self.central_dir = os.path.join(self.workdir, "c")
        self.namespaces: list[str] = []
        self.pidfiles: list[str] = []
        self.chassis: dict[str, Chassis] = {}
        self.vms: dict[str, Vm] = {}
        self.ul = f"{prefix}-ul"
        self.central = f"{prefix}-c"

    # -- sockets ---------------------------------------------------------------

    @property
    def nb(self) -> str:
        return f"unix:{self.central_dir}/nb.sock"

    @property
    def sb(self) -> str:
        return f"unix:{self.central_dir}/sb.sock"

    def nbctl(self, *args: str) -> str:
        return run("ovn-nbctl", f"--db={self.nb}", "--timeout=20", *args)

    def sbctl(self, *args: str) -> str:
        return run("ovn-sbctl", f"--db={self.sb}", "--timeout=20", *args)

    # -- helpers ---------------------------------------------------------------

    def _netns(self, name: str) -> str:
        run("ip", "netns", "add", name)
        self.namespaces.append(name)
        run("ip", "-n", name, "link", "set", "lo", "up")
        return name

    def _daemon(
        self, netns: str | None, pidfile: str, *args: str, env: dict[str, str] | None = None
    ) -> None:
        self.pidfiles.append(pidfile)
        cmd = ["ip", "netns", "exec", netns, *args] if netns else list(args)
        run(*cmd, f"--pidfile={pidfile}", "--detach", env=env)

    def _uplink(
        self, netns: str, ifname: str, host_end: str, ip: str, mac: str, with_ip: bool
    ) -> None:
        run(
            "ip", "link", "add", host_end, "netns", self.ul, "type", "veth",
            "peer", "name", ifname, "netns", netns, "address", mac,
        )  # fmt: skip
        run("ip", "-n", self.ul, "link", "set", host_end, "master", "br-ul", "up")
        run("ip", "-n", netns, "link", "set", ifname, "up")
        if with_ip:
            run("ip", "-n", netns, "addr", "add", f"{ip}/24", "dev", ifname)

    # -- bring-up --------------------------------------------------------------

    def start_central(self) -> None:
        os.makedirs(self.central_dir, exist_ok=True)
        self._netns(self.ul)
        run("ip", "-n", self.ul, "link", "add", "br-ul", "type", "bridge")
        run("ip", "-n", self.ul, "link", "set", "br-ul", "up")
        self._netns(self.central)
        self._uplink(self.central, "eth0", "ul-c", CENTRAL_IP, "02:00:00:00:fa:02", True)
        tx_checksum_off(self.central, "eth0")
        d = self.central_dir
        for db, schema, port in (("nb", NB_SCHEMA, 6641), ("sb", SB_SCHEMA, 6642)):
            run("ovsdb-tool", "create", f"{d}/{db}.db", schema)
            self._daemon(
                self.central, f"{d}/{db}.pid", "ovsdb-server", f"{d}/{db}.db",
                f"--remote=punix:{d}/{db}.sock", f"--remote=ptcp:{port}:{CENTRAL_IP}",
                f"--log-file={d}/{db}.log", f"--unixctl={d}/{db}.ctl",
            )  # fmt: skip
        self.nbctl("--no-wait", "init")
        self._daemon(
            self.central, f"{d}/northd.pid", "ovn-northd",
            f"--ovnnb-db={self.nb}", f"--ovnsb-db={self.sb}",
            f"--log-file={d}/northd.log", f"--unixctl={d}/northd.ctl",
        )  # fmt: skip

    def add_chassis(self, name: str, index: int) -> Chassis:
        d = os.path.join(self.workdir, name)
        os.makedirs(d, exist_ok=True)
        ch = Chassis(
            name,
            f"{self.prefix}-{name}",
            d,
            f"{UNDERLAY}.{10 + index}",
            f"02:00:00:00:fa:{10 + index:02x}",
        )
        self._netns(ch.netns)
        self._uplink(ch.netns, "eth1", f"ul-{name}", ch.ip, ch.mac, False)
        env = ch.env()
        run("ovsdb-tool", "create", f"{d}/conf.db", OVS_SCHEMA)
        self._daemon(
            ch.netns, f"{d}/ovsdb-server.pid", "ovsdb-server", f"{d}/conf.db",
            f"--remote=punix:{d}/db.sock", "--remote=db:Open_vSwitch,Open_vSwitch,manager_options",
            f"--log-file={d}/ovsdb-server.log", f"--unixctl={d}/ovsdb-server.ctl", env=env,
        )  # fmt: skip
        ch.vsctl("--no-wait", "init")
        self._daemon(
            ch.netns, f"{d}/ovs-vswitchd.pid", "ovs-vswitchd", ch.db, "--disable-system",
            f"--log-file={d}/ovs-vswitchd.log", f"--unixctl={ch.vswitchd_ctl}", env=env,
        )  # fmt: skip
        ch.vsctl(
            "add-br", "br-phy", "--", "set", "Bridge", "br-phy", "datapath_type=netdev",
            "fail-mode=standalone", f"other_config:hwaddr={ch.mac}",
            "--", "add-port", "br-phy", "eth1",
        )  # fmt: skip
        run("ip", "-n", ch.netns, "addr", "add", f"{ch.ip}/24", "dev", "br-phy")
        run("ip", "-n", ch.netns, "link", "set", "br-phy", "up")
        tx_checksum_off(ch.netns, "br-phy")
        ch.vsctl(
            "set", "Open_vSwitch", ".", f"external_ids:system-id={name}",
            f"external_ids:hostname={name}", f"external_ids:ovn-remote=tcp:{CENTRAL_IP}:6642",
            f"external_ids:ovn-encap-type={self.encap}", f"external_ids:ovn-encap-ip={ch.ip}",
            "external_ids:ovn-bridge-datapath-type=netdev",
        )  # fmt: skip
        self._daemon(
            ch.netns, f"{d}/ovn-controller.pid", "ovn-controller", ch.db,
            f"--log-file={d}/ovn-controller.log", env=env,
        )  # fmt: skip
        self.chassis[name] = ch
        return ch

    def seed_tunnel_neighbours(self) -> None:
        """Pre-seed OVS' userspace tunnel ARP cache: else the first packet per tunnel is lost."""
        for ch in self.chassis.values():
            for peer in self.chassis.values():
                if peer.name != ch.name:
                    ch.appctl("tnl/arp/set", "br-phy", peer.ip, peer.mac)

    def wait_chassis(self, timeout: float = 30.0) -> None:
        """Until every chassis is in the SB and has created br-int (with its mgmt socket)."""
        deadline = time.monotonic() + timeout
        while True:
            names = set(self.sbctl("--bare", "--columns=name", "list", "Chassis").split())
            sockets = all(os.path.exists(f"{c.dir}/br-int.mgmt") for c in self.chassis.values())
            if names >= set(self.chassis) and sockets:
                return
            if time.monotonic() > deadline:
                raise LabError(f"chassis did not come up in {timeout}s (SB has {sorted(names)})")
            time.sleep(0.05)

    def add_switch(self, vni: int) -> None:
        self.nbctl(
            "ls-add", SWITCH, "--", "set", "Logical_Switch", SWITCH, f"external_ids:vmm\\:vni={vni}"
        )

    def add_vm(self, name: str, index: int, chassis: str) -> Vm:
        """A VM namespace on ``chassis``, its LSP in the NB and its port on br-int."""
        vm = Vm(
            name,
            f"{self.prefix}-{name}",
            f"0a:00:00:00:00:{index:02x}",
            f"{OVERLAY_V4}.{index}",
            f"{OVERLAY_V6}{index}",
            chassis,
        )
        self._netns(vm.netns)
        for key in ("all", "default"):
            run(
                "ip",
                "netns",
                "exec",
                vm.netns,
                "sysctl",
                "-qw",
                f"net.ipv6.conf.{key}.accept_dad=0",
            )
        subprocess.run(
            ["ip", "netns", "exec", vm.netns, "nft", "-f", "-"],
            input=VM_QUIET_RULES,
            text=True,
            capture_output=True,
            check=False,
        )
        self.nbctl(
            "lsp-add", SWITCH, name,
            "--", "lsp-set-addresses", name, f"{vm.mac} {vm.ipv4} {vm.ipv6}",
            "--", "lsp-set-options", name, f"requested-chassis={chassis}",
        )  # fmt: skip
        port = self._nic(vm, chassis, "eth0", f"{name}-p0")
        vm.port = port
        run("ip", "-n", vm.netns, "link", "set", "eth0", "up")
        self.vms[name] = vm
        return vm

    def _nic(self, vm: Vm, chassis: str, link: str, port: str, addresses: bool = True) -> str:
        """A veth VM:``link`` <-> chassis:``port`` with the VM's MAC (and addresses),
        plugged into br-int with the VM's iface-id (as os-vif plugs a tap)."""
        ch = self.chassis[chassis]
        run(
            "ip", "link", "add", link, "netns", vm.netns, "address", vm.mac, "mtu", str(VM_MTU),
            "type", "veth", "peer", "name", port, "netns", ch.netns, "mtu", str(VM_MTU),
        )  # fmt: skip
        tx_checksum_off(vm.netns, link)
        if addresses:
            run("ip", "-n", vm.netns, "addr", "add", f"{vm.ipv4}/24", "dev", link)
            run("ip", "-n", vm.netns, "addr", "add", f"{vm.ipv6}/64", "dev", link, "nodad")
        run("ip", "-n", ch.netns, "link", "set", port, "up")
        self.plug(chassis, port, vm)
        return port

    def plug(self, chassis: str, port: str, vm: Vm) -> None:
        self.chassis[chassis].vsctl(
            "--may-exist", "add-port", "br-int", port, "--", "set", "Interface", port,
            f"external_ids:iface-id={vm.lsp}", f"external_ids:attached-mac={vm.mac}",
            "external_ids:iface-status=active",
        )  # fmt: skip

    # -- migration steps (the lab's hypervisor) ----------------------------------

    def preplug(self, vm: Vm, destination: str) -> str:
        """PREPARE: the destination's NIC exists and is plugged, as a tap QEMU has
        opened: up on both ends (so no carrier change at the resume), but the
        guest does not use it yet: it holds no address until the resume."""
        gen = vm.generation + 1
        link, port = f"eth{gen}", f"{vm.name}-p{gen}"
        self._nic(vm, destination, link, port, addresses=False)
        _link_state(vm.netns, link, "up")
        vm.pending = (destination, link, port)
        return port

    def pause(self, vm: Vm) -> float:
        """The guest stops on the source: its live link goes down (its neighbour
        cache is kept for the resume: Linux flushes a down link's entries)."""
        vm.neighbours = []
        return _link_state(
            vm.netns, vm.link, "down", save_neighbours=vm.neighbours, flush_addresses=True
        )

    def resume(self, vm: Vm) -> float:
        """The guest runs on the destination: its addresses are on the pre-plugged NIC."""
        if vm.pending is None:
            raise LabError(f"{vm.name} has no pre-plugged NIC to resume on")
        # The guest's neighbour cache survives a migration; the lab's is per
        # device, so the new NIC gets the old one's entries (as stale ones).
        return _guest_moves(vm.netns, vm.pending[1], vm, vm.neighbours)

    def finish(self, vm: Vm) -> None:
        """COMPLETED: the source's NIC is unplugged; the pre-plugged one is the VM's now."""
        assert vm.pending is not None
        destination, link, port = vm.pending
        src = self.chassis[vm.chassis]
        # As libvirt does: the source QEMU exits and its tap goes, then the port
        # is removed from br-int. (The other order, del-port on a live veth, made
        # ovs-vswitchd drop a few packets of other ports on the source chassis.)
        run("ip", "-n", vm.netns, "link", "del", vm.link, check=False)
        src.vsctl("--if-exists", "del-port", "br-int", vm.port)
        vm.chassis, vm.link, vm.port = destination, link, port
        vm.generation += 1
        vm.pending = None

    def cancel(self, vm: Vm) -> None:
        """ABORTED: the pre-plugged NIC goes away; the guest resumes on the source."""
        if vm.pending is None:
            return
        destination, link, port = vm.pending
        run("ip", "-n", vm.netns, "link", "del", link, check=False)
        self.chassis[destination].vsctl("--if-exists", "del-port", "br-int", port)
        for addr in (f"{vm.ipv4}/24", f"{vm.ipv6}/64"):
            run("ip", "-n", vm.netns, "addr", "replace", addr, "dev", vm.link, check=False)
        run("ip", "-n", vm.netns, "link", "set", vm.link, "up")
        vm.pending = None

    def popen(self, netns: str, *args: str, **kwargs: object) -> subprocess.Popen[str]:
        return subprocess.Popen(["ip", "netns", "exec", netns, *args], text=True, **kwargs)  # type: ignore[call-overload]

    def ns_run(self, netns: str, *args: str, check: bool = True) -> str:
        return run("ip", "netns", "exec", netns, *args, check=check)

    # -- teardown --------------------------------------------------------------

    def teardown(self) -> None:
        """Kill every daemon by its pidfile, delete every namespace, remove the folder."""
        pids = []
        for pidfile in reversed(self.pidfiles):
            try:
                with open(pidfile, encoding="ascii") as f:
                    pids.append(int(f.read().strip()))
            except (OSError, ValueError):
                continue
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 3.0
        for pid in pids:
            while time.monotonic() < deadline and _alive(pid):
                time.sleep(0.02)
            if _alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        for ns in reversed(self.namespaces):
            for pid in _pids_in_netns(ns):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            run("ip", "netns", "del", ns, check=False)
        self.namespaces.clear()
        shutil.rmtree(self.workdir, ignore_errors=True)


def _link_state(
    netns: str,
    link: str,
    state: str,
    neighbours: Sequence[tuple[str, str]] = (),
    save_neighbours: list[tuple[str, str]] | None = None,
    flush_addresses: bool = False,
) -> float:
    """Set a VM link up/down in-process over netlink and return the monotonic
    instant it changed (the lab's pause and resume instants must be the link's,
    not a process start's). ``neighbours`` are added (stale) after an up;
    ``save_neighbours`` receives the link's entries before a down (Linux
    flushes a down link's neighbours); ``flush_addresses`` removes the link's
    addresses right after (Linux keeps answering for an IPv4 address of a down
    link, which a paused guest would not)."""
    with entered(netns):
        ipr = IPRoute()
    try:
        idx = ipr.link_lookup(ifname=link)[0]
        if save_neighbours is not None:
            for msg in ipr.get_neighbours(ifindex=idx):
                ip, mac = msg.get_attr("NDA_DST"), msg.get_attr("NDA_LLADDR")
                if ip and mac:
                    save_neighbours.append((ip, mac))
        ipr.link("set", index=idx, state=state)
        changed = time.monotonic()
        if flush_addresses:
            ipr.flush_addr(index=idx)
        for ip, mac in neighbours:
            with contextlib.suppress(Exception):
                ipr.neigh("replace", dst=ip, lladdr=mac, ifindex=idx, state=0x04)  # NUD_STALE
        return changed
    finally:
        ipr.close()


def _guest_moves(netns: str, link: str, vm: Vm, neighbours: Sequence[tuple[str, str]]) -> float:
    """The guest's addresses (and neighbour cache) onto ``link`` over netlink; the
    monotonic instant the addresses were there (the guest runs on the new NIC)."""
    with entered(netns):
        ipr = IPRoute()
    try:
        idx = ipr.link_lookup(ifname=link)[0]
        ipr.addr("add", index=idx, address=vm.ipv4, prefixlen=24)
        ipr.addr("add", index=idx, address=vm.ipv6, prefixlen=64)
        changed = time.monotonic()
        for ip, mac in neighbours:
            with contextlib.suppress(Exception):
                ipr.neigh("replace", dst=ip, lladdr=mac, ifindex=idx, state=0x04)  # NUD_STALE
        return changed
    finally:
        ipr.close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie child of ours counts as gone
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _pids_in_netns(ns: str) -> list[int]:
    out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout
    return [int(p) for p in out.split() if p.isdigit()]


@contextlib.contextmanager
def ovn_lab(
    prefix: str | None = None,
    chassis: int = 3,
    vms: Sequence[tuple[str, str]] = (("vm1", "ch1"), ("vm2", "ch1"), ("vm3", "ch3")),
    vni: int = 1001,
    encap: str = "geneve",
) -> Iterator[OvnLab]:
    """A running lab (central, ``chassis`` chassis, ``vms`` as (name, chassis));
    everything is torn down however the body ends."""
    missing = missing_binaries()
    if missing:
        raise LabError(
            f"OVN/OVS programs missing: {', '.join(missing)}",
            hint="apt-get install ovn-central ovn-host openvswitch-switch",
        )
    lab = OvnLab(prefix or new_prefix(), encap=encap)
    try:
        started = time.monotonic()
        lab.start_central()
        for i in range(1, chassis + 1):
            lab.add_chassis(f"ch{i}", i)
        lab.seed_tunnel_neighbours()
        lab.wait_chassis()
        lab.add_switch(vni)
        for i, (name, where) in enumerate(vms, start=1):
            lab.add_vm(name, i, where)
        lab.nbctl("--wait=hv", "sync")
        wait_ports_up(lab)
        LOG.info("OVN lab %s up in %.2fs", lab.prefix, time.monotonic() - started)
        yield lab
    finally:
        lab.teardown()


def wait_ports_up(lab: OvnLab, timeout: float = 30.0) -> None:
    """Until every VM's LSP is up (its chassis claimed it and installed its flows)."""
    deadline = time.monotonic() + timeout
    while True:
        up = lab.nbctl("--bare", "--columns=name,up", "list", "Logical_Switch_Port").split()
        states = dict(zip(up[0::2], up[1::2], strict=False))
        if all(states.get(name) == "true" for name in lab.vms):
            return
        if time.monotonic() > deadline:
            raise LabError(f"VM ports not up after {timeout}s: {states}")
        time.sleep(0.05)
