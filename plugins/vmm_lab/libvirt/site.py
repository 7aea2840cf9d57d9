"""The real-libvirt lab site: the namespace lab, a libvirtd on h1 and on h2,
a booted TCG guest on h1 and, optionally, the orchestrator watching both.

``libvirt_site`` is a context manager; however its body ends (a failed
assertion, Ctrl-C, a daemon that would not start) every piece is torn down
in reverse order: the HostAgents (hook sockets, event sources, journals),
the libvirtds with every QEMU they started, then the namespace lab with its
NVE agents and directory.

How the pieces are wired, and why:

* The namespace lab comes from ``vmm_lab.linux.demo.lab_site``, whose hosts
  the product's composition root assembled; orchestrated, the libvirt event
  source of ``vmm agent`` (``Daemon.for_assembly``) is put in front of h1's
  and h2's assembled hosts, exactly as ``vmm agent`` does. The operator's
  path with ``vmm agent`` processes is tests/functional/test_agent_e2e.py.
* The guest is registered in the directory at h1 but not plugged into h1's
  NVE. Without an orchestrator the NVE agents' local learning (EVPN-style
  MAC mobility) then moves it from QEMU's RARPs, the "QEMU alone" baseline;
  a plugged MAC is pinned to its port and would never be reported moving.
  With the orchestrator, the destination's ``nve_prepare``/``nve_plug``
  stages plug it wherever it goes.
* Orchestrated: the hook relay (etc/libvirt/hooks/qemu.d/vmm-orchestrator)
  is copied into each host's own /etc/libvirt/hooks before its libvirtd
  starts (libvirtd looks for hooks only at start-up), with a per-host config
  file naming that host's hook socket, so "migrate begin" on the destination
  runs PREPARE synchronously. The pipeline is ``engine.DEFAULT_STAGES`` plus
  ``libvirt_announce`` (the guest's own GARP/NA through its agent, and
  QEMU's announce-self); with the defaults the source's SWITCHOVER (the
  in-flight tunnel) runs at the migration's final pause, told from an
  operator's pause by libvirt's job statistics (see vmm_libvirt.phases).
* This machine has two cores that other test runs load heavily, so the
  synchronous PREPARE gets ``LAB_HOOK_TIMEOUT_S`` (the relay's deadline one
  second more) instead of the production 1.5 s: a PREPARE that finishes late
  would veto the migration, which is a correct outcome in production but a
  flaky one in a lab whose point is to measure the network. For the same
  reason ``libvirt_announce`` gets ``LAB_ANNOUNCE_DEADLINE_S``: its default
  5 s deadline is barely above its own agent budget (agent_wait 1.5 s +
  exec_timeout 3 s, and libvirt's agent timeouts are whole seconds), and on
  a loaded machine it overran it, which fails the destination's RESUMED
  phase and reverts nve_plug/nve_prepare on the host the VM already runs on.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import json
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import libvirt
import libvirt_qemu
from oslo_config import cfg

from vmm_lab.libvirt import LibvirtLabError
from vmm_lab.libvirt import guest as guest_mod
from vmm_lab.libvirt.agents import AgentProcess, free_port, write_config
from vmm_lab.libvirt.domain import GuestSpec, domain_xml
from vmm_lab.libvirt.hosts import LibvirtHost
from vmm_lab.linux import options as lab_options
from vmm_lab.linux.demo import STATE_STAGES, LabSite, _install_firewalls, lab_site
from vmm_lab.linux.topology import in_ns
from vmm_lab.nva_process import endpoint_add
from vmm_libvirt import options as lv_options
from vmm_libvirt.announcers import LibvirtAnnounce
from vmm_libvirt.daemon import Daemon, HostAgent
from vmm_libvirt.events import start_event_loop
from vmm_linux import agent as nve_agent
from vmm_orchestrator import agent as root
from vmm_orchestrator import engine, options
from vmm_orchestrator.nva.client import NvaClient
from vmm_orchestrator.nva.errors import NvaError
from vmm_orchestrator.stage import group_name

#: The two lab hosts that run libvirtd; the guest boots on the first.
LIBVIRT_HOSTS = ("h1", "h2")
#: The relay script libvirtd runs for every qemu hook call (installed per host).
RELAY = os.path.join(
    os.path.dirname(os.path.abspath(__file__)),
    *("..", "..", "..", "etc", "libvirt", "hooks", "qemu.d", "vmm-orchestrator"),
)
#: The orchestrated pipeline: the defaults plus the guest's own announcement.
LAB_STAGES = [*engine.DEFAULT_STAGES, "libvirt_announce"]
#: Synchronous PREPARE budget on this loaded 2-core lab (see the module docstring).
LAB_HOOK_TIMEOUT_S = 4.0
#: libvirt_announce's deadline in the lab (see the module docstring).
LAB_ANNOUNCE_DEADLINE_S = 15.0
BOOT_TIMEOUT_S = 90.0
PING_TIMEOUT_S = 15.0
AGENT_TIMEOUT_S = 30.0
RECONCILE_TIMEOUT_S = 20.0
GUEST_HOST_NUMBER = 50  # 198.19.<vni>.50 / fd00:<vni>::50: clear of the lab's .1 and .10-.13


def new_guest(vni: int = 100) -> GuestSpec:
    """A guest spec with a name unique to this run, so leftovers of runs are told apart."""
    return GuestSpec(
        name=f"lg{secrets.token_hex(3)}",
        mac=f"52:54:00:{vni >> 8 & 0xFF:02x}:{vni & 0xFF:02x}:{GUEST_HOST_NUMBER:02x}",
        bridge=f"br-{vni}",
        ipv4=f"198.19.{vni % 256}.{GUEST_HOST_NUMBER}/24",
        ipv6=f"fd00:{vni}::{GUEST_HOST_NUMBER}/64",
    )


def lab_conf(orchestrated: bool = True) -> cfg.ConfigOpts:
    """A fresh configuration with the lab defaults and short timers.

    The NVE agents' long-poll is shortened (as the functional tests' conf
    does) so that stopping them does not wait out a 5 s watch.
    """
    conf = options.new_conf()
    prepare_conf(conf, orchestrated)
    return conf


def prepare_conf(conf: cfg.ConfigOpts, orchestrated: bool) -> None:
    """Set the lab's orchestrator settings on ``conf`` (its options registered once,
    vmm_orchestrator.options.register_all).

    Only the settings the libvirt lab depends on are overridden (see the
    module docstring); every other option keeps what the caller configured.
    """
    for group in (lab_options.GROUP, nve_agent.GROUP, engine.GROUP, lv_options.GROUP):
        options.require(conf, group, "the libvirt lab")
    conf.set_override("watch_timeout", 1.0, group=nve_agent.GROUP)
    if orchestrated:
        stages = list(conf.pipeline.stages)
        if "libvirt_announce" not in stages:
            stages.append("libvirt_announce")
        conf.set_override("stages", stages, group=engine.GROUP)
        conf.set_override("hook_timeout", LAB_HOOK_TIMEOUT_S, group=lv_options.AGENT_GROUP)
        conf.set_override(
            "deadline", LAB_ANNOUNCE_DEADLINE_S, group=group_name(LibvirtAnnounce.name)
        )


@dataclasses.dataclass
class LibvirtSite:
    """A running real-libvirt lab: what tests, the demo and the benchmark drive."""

    lab_site: LabSite
    hosts: dict[str, LibvirtHost]
    guest: GuestSpec
    image: guest_mod.GuestImage
    vni: int
    workdir: str
    #: Orchestrated: one HostAgent per libvirt host (empty for QEMU alone).
    agents: dict[str, HostAgent] = dataclasses.field(default_factory=dict)
    daemon: Daemon | None = None
    #: With ``agent_processes``: the ``vmm agent`` process of h1 and of h2.
    processes: dict[str, AgentProcess] = dataclasses.field(default_factory=dict)
    #: The host the guest runs on now (the migration helpers keep it current).
    where: str = LIBVIRT_HOSTS[0]
    #: Set-up figures: boot_to_ready_s, boot_to_ping_s, setup_s.
    figures: dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def orchestrated(self) -> bool:
        return self.daemon is not None or bool(self.processes)

    @property
    def ipv4(self) -> str:
        assert self.guest.ipv4
        return self.guest.ipv4.split("/")[0]

    @property
    def ipv6(self) -> str:
        assert self.guest.ipv6
        return self.guest.ipv6.split("/")[0]

    def client(self) -> NvaClient:
        return self.lab_site.client()

    def netns(self, name: str) -> str:
        """Namespace of a lab VM (vm2, gw, ...) or host (h1, ...)."""
        lab = self.lab_site.lab
        return lab.vms[name].netns if name in lab.vms else lab.hosts[name].netns

    def other(self, host: str) -> str:
        """The other libvirt host."""
        return LIBVIRT_HOSTS[1] if host == LIBVIRT_HOSTS[0] else LIBVIRT_HOSTS[0]


# -- readiness -------------------------------------------------------------------


def wait_console(host: LibvirtHost, guest: GuestSpec, timeout: float = BOOT_TIMEOUT_S) -> float:
    """Seconds until the guest printed READY_MARK on its serial console."""
    path = host.path(guest.console_log)
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        with contextlib.suppress(OSError), open(path, errors="replace") as fh:
            if guest_mod.READY_MARK in fh.read():
                return time.monotonic() - start
        time.sleep(0.1)
    with contextlib.suppress(OSError), open(path, errors="replace") as fh:
        tail = fh.read()[-2000:]
        raise LibvirtLabError(f"guest {guest.name} not ready after {timeout:.0f} s:\n{tail}")
    raise LibvirtLabError(f"guest {guest.name} wrote no console output in {timeout:.0f} s")


def ping_once(netns: str, dst: str) -> bool:
    out = in_ns(netns, "ping", "-c", "1", "-W", "1", dst, check=False)
    return " 1 received" in out


def wait_ping(netns: str, dst: str, timeout: float = PING_TIMEOUT_S) -> float:
    """Seconds until ``dst`` answered a ping from ``netns``; LibvirtLabError if never."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if ping_once(netns, dst):
            return time.monotonic() - start
    raise LibvirtLabError(f"{dst} did not answer a ping from {netns} within {timeout:.0f} s")


def wait_guest_agent(host: LibvirtHost, guest: str, timeout: float = AGENT_TIMEOUT_S) -> None:
    """Wait until qemu-ga answers guest-ping (libvirt_announce uses the agent)."""
    conn = libvirt.open(host.uri)
    try:
        dom = conn.lookupByName(guest)
        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            try:
                reply = libvirt_qemu.qemuAgentCommand(dom, '{"execute":"guest-ping"}', 2, 0)
                if json.loads(reply) == {"return": {}}:
                    return
                last = f"unexpected answer {reply!r}"
            except libvirt.libvirtError as exc:  # not connected yet: the agent starts last
                last = str(exc)
            time.sleep(0.2)
    finally:
        conn.close()
    raise LibvirtLabError(f"the guest agent of {guest} did not answer in {timeout:.0f} s: {last}")


# -- the site --------------------------------------------------------------------


def _install_relay(host: LibvirtHost, socket_path: str, deadline: float) -> None:
    """The hook relay and its config in the host's own /etc/libvirt (before libvirtd starts)."""
    hookdir = host.path("/etc/libvirt/hooks/qemu.d")
    os.makedirs(hookdir, exist_ok=True)
    shutil.copy(RELAY, hookdir)
    with open(host.path("/etc/libvirt/hooks/vmm-orchestrator.conf"), "w") as fh:
        fh.write(f"[hook_relay]\nsocket = {socket_path}\ndeadline = {deadline:g}\n")


@contextlib.contextmanager
def libvirt_site(
    conf: cfg.ConfigOpts,
    prefix: str,
    orchestrated: bool,
    guest: GuestSpec | None = None,
    agent_processes: bool = False,
    state: bool = False,
    ha_etcd: dict[str, Any] | None = None,
) -> Iterator[LibvirtSite]:
    """Build the lab, two libvirtds, the booted guest and (``orchestrated``) the agents.

    Yields once the guest answers pings over IPv4 and IPv6 from a peer on
    another host and its guest agent answers, and (orchestrated) once every
    HostAgent reconciled its first connection.

    ``agent_processes``: h1 and h2 are served by ``vmm agent`` processes
    started from config files (``site.processes``), as an operator runs
    them, instead of in this process; ``state`` adds the state stages and
    the model stateful firewall on every host; ``ha_etcd`` ({"endpoints",
    "prefix"}) runs an HA pair of agents instead (see start_agent_processes).
    """
    if not os.path.isfile(RELAY):
        raise LibvirtLabError(f"the hook relay {RELAY} is missing")
    prepare_conf(conf, orchestrated)
    start_event_loop()  # before the first libvirt connection of this process
    started = time.monotonic()
    vni = int(conf.lab.vni)
    spec = guest or new_guest(vni)
    image = guest_mod.build_guest()
    hosts: dict[str, LibvirtHost] = {}
    daemon: Daemon | None = None
    external = LIBVIRT_HOSTS if orchestrated and agent_processes else ()
    processes: dict[str, AgentProcess] = {}
    with lab_site(
        conf, prefix, orchestrated=False, external=external, nva_process=bool(external)
    ) as site:
        workdir = tempfile.mkdtemp(prefix=f"{prefix}-lv-")
        try:
            for name in LIBVIRT_HOSTS:
                lab_host = site.lab.hosts[name]
                hosts[name] = LibvirtHost(name, lab_host.netns, lab_host.vtep, workdir)
                if orchestrated:
                    os.makedirs(hosts[name].path("/etc/libvirt"), exist_ok=True)
                    _install_relay(hosts[name], _hook_socket(workdir, name), LAB_HOOK_TIMEOUT_S + 1)
            with concurrent.futures.ThreadPoolExecutor(max_workers=len(hosts)) as pool:
                list(pool.map(LibvirtHost.start, hosts.values()))
            if external:  # their NVEs (and bridges) must exist before the guest is defined
                processes = start_agent_processes(conf, site, hosts, workdir, state, ha_etcd)
            if state:
                _install_firewalls(site)
            first = LIBVIRT_HOSTS[0]
            if processes:  # as the README's step 5 has an operator register it
                config = next(iter(processes.values())).config
                endpoint_add(config, vni, spec.mac, [_bare(spec.ipv4)], [_bare(spec.ipv6)], first)
            else:
                site.client().add_endpoint(
                    vni, spec.mac, [_bare(spec.ipv4)], [_bare(spec.ipv6)], first
                )
            conn = libvirt.open(hosts[first].uri)
            try:
                boot = time.monotonic()
                conn.defineXML(domain_xml(spec, image)).create()
            finally:
                conn.close()
            agents: dict[str, HostAgent] = {}
            if orchestrated and not external:  # while the guest boots
                for name in LIBVIRT_HOSTS:  # their [host:<name>] groups follow [agent] hosts
                    group = lv_options.host_group(name)
                    conf.set_override("uri", hosts[name].uri, group=group)
                    conf.set_override("hook_socket", _hook_socket(workdir, name), group=group)
                served = root.Assembly([site.assembly[name] for name in LIBVIRT_HOSTS])
                daemon = Daemon.for_assembly(conf, served)
                agents = {a.name: a for a in daemon.agents}
                daemon.start()
                waiting = daemon.wait_reconciled(RECONCILE_TIMEOUT_S)
                if waiting:
                    raise LibvirtLabError(f"HostAgents of {', '.join(waiting)} never reconciled")
            figures = {"boot_to_ready_s": round(wait_console(hosts[first], spec), 2)}
            peer = site.lab.vms["vm2"].netns  # on h3: over VXLAN
            for addr in (_bare(spec.ipv4), _bare(spec.ipv6)):
                wait_ping(peer, addr)
            figures["boot_to_ping_s"] = round(time.monotonic() - boot, 2)
            wait_guest_agent(hosts[first], spec.name)
            figures["boot_to_agent_s"] = round(time.monotonic() - boot, 2)
            figures["setup_s"] = round(time.monotonic() - started, 2)
            yield LibvirtSite(
                lab_site=site,
                hosts=hosts,
                guest=spec,
                image=image,
                vni=vni,
                workdir=workdir,
                agents=agents,
                daemon=daemon,
                figures=figures,
                processes=processes,
            )
        finally:
            if daemon is not None:
                daemon.stop()  # the journals close with the lab site's assembly
            for process in processes.values():
                process.stop()
            for host in hosts.values():
                with contextlib.suppress(Exception):
                    host.stop()
            shutil.rmtree(workdir, ignore_errors=True)


#: Where each libvirt host keeps the relay (inside its own /etc/libvirt).
HOOK_PATH = "/etc/libvirt/hooks/qemu.d/vmm-orchestrator"


@contextlib.contextmanager
def orchestrator_off(ls: LibvirtSite, timeout: float = RECONCILE_TIMEOUT_S) -> Iterator[None]:
    """The same lab with libvirt alone: what the orchestrator adds to a migration,
    measured against QEMU alone under the same load, guest and daemons.

    libvirtd lists its hooks directory at every hook call (libvirt 9.0), so with
    the relay taken out of each host's qemu.d no hook process runs at all, as in
    the QEMU-alone lab; each HostAgent's hook server and event source are
    stopped (no job reads, no phases, no stages). On exit the relay is put back
    and the agents listen again, each reconciled with libvirt before this returns.

    The network follows the guest only as it does for QEMU alone, by the NVEs'
    local learning from QEMU's RARPs, and only to a host where the guest's MAC
    is not pinned to a port: migrate there and back while off. On exit the
    directory is put back where the guest runs (``ls.where``) if the learning
    left it elsewhere, and every NVE has applied that before the agents listen.
    """
    if not ls.agents:
        raise LibvirtLabError("orchestrator_off needs an orchestrated lab with in-process agents")
    for name, host in ls.hosts.items():
        with contextlib.suppress(FileNotFoundError):
            os.unlink(host.path(HOOK_PATH))
        agent = ls.agents[name]
        agent.hook.stop()
        agent.source.stop()
    try:
        yield
    finally:
        _place_back(ls, timeout)
        for name, host in ls.hosts.items():
            shutil.copy(RELAY, host.path(HOOK_PATH))
            agent = ls.agents[name]
            agent.reconciled.clear()
            agent.hook.start()
            agent.source.start()
        waiting = [a.name for a in ls.agents.values() if not a.reconciled.wait(timeout)]
        if waiting:
            raise LibvirtLabError(f"HostAgents of {', '.join(waiting)} never reconciled again")


def _place_back(ls: LibvirtSite, timeout: float) -> None:
    """The directory (and every NVE) places the guest at ``ls.where`` again."""
    client = ls.client()
    try:
        if client.get_endpoint(ls.vni, ls.guest.mac).get("nve") != ls.where:
            try:
                client.move(ls.vni, ls.guest.mac, ls.where)
            except NvaError:  # frozen as flapping by the learned moves: unfreeze first
                client.release(ls.vni, ls.guest.mac)
                client.move(ls.vni, ls.guest.mac, ls.where)
    finally:
        client.close()
    key = (ls.vni, ls.guest.mac)
    deadline = time.monotonic() + timeout
    while any(h.agent.placement.get(key) != ls.where for h in ls.lab_site.hosts.values()):
        if time.monotonic() > deadline:
            raise LibvirtLabError(f"the NVEs did not all place the guest at {ls.where} again")
        time.sleep(0.05)


def _hook_socket(workdir: str, host: str) -> str:
    return os.path.join(workdir, f"hook-{host}.sock")


def _bare(address: str | None) -> str:
    if not address:
        raise LibvirtLabError("the lab guest needs an IPv4 and an IPv6 address")
    return address.split("/")[0]


#: State kinds the libvirt lab moves (the guest has no 802.1X, DHCP or multicast profile).
LAB_LIBVIRT_STATE_KINDS = ["conntrack", "nft_sets"]


#: HA pair (``ha_etcd``): [nva_etcd] lease_ttl, so a killed instance's
#: migrations are taken over within seconds.
HA_LEASE_TTL_S = 3


def agent_sections(
    conf: cfg.ConfigOpts,
    site: LabSite,
    served: list[LibvirtHost],
    workdir: str,
    state: dict[str, Any] | None,
    instance: str = "",
    ha_etcd: dict[str, Any] | None = None,
) -> dict[str, dict[str, Any]]:
    """One agent's config file, as the README's "On libvirt hosts" has an operator write it.

    ``instance`` tells apart the hook sockets (and journals) of several agents
    serving the same hosts; ``ha_etcd`` ({"endpoints", "prefix"}) puts their
    journal and per-migration leases on etcd.
    """
    stages = [*(STATE_STAGES if state else engine.DEFAULT_STAGES), "libvirt_announce"]
    gw = site.lab.vms[lab_options.GATEWAY]
    sections: dict[str, dict[str, Any]] = {
        "agent": {"hosts": [h.name for h in served], "hook_timeout": LAB_HOOK_TIMEOUT_S},
        "nva": {"backend": "embedded", "url": site.server.url, "token": site.token},
        "pipeline": {"stages": stages},
        "announce": {"gateways": [f"{gw.ipv4}@{gw.mac}"]},
        "nve_agent": {"watch_timeout": conf.nve_agent.watch_timeout},
        "stage_libvirt_announce": {"deadline": LAB_ANNOUNCE_DEADLINE_S},
        "stage_hold_timer": {"hold_time": conf.stage_hold_timer.hold_time},
        # what a benchmark varies (``--late-switchover``) reaches the processes too
        lv_options.GROUP: {"early_switchover": conf[lv_options.GROUP].early_switchover},
    }
    for host in served:
        lab_host = site.lab.hosts[host.name]
        sections[root.host_group(host.name)] = {
            "vtep": lab_host.vtep,
            "vnis": [int(conf.lab.vni)],
            "netns": lab_host.netns,
            "uri": host.uri,
            "hook_socket": _hook_socket(workdir, host.name + instance),
            "journal": os.path.join(workdir, f"journal-{host.name}{instance}.sqlite"),
        }
    if ha_etcd:
        sections["agent"].update({"journal_backend": "etcd", "migration_lock": "etcd"})
        sections["nva_etcd"] = {
            "endpoints": ha_etcd["endpoints"],
            "prefix": ha_etcd["prefix"],
            "lease_ttl": HA_LEASE_TTL_S,
        }
        if instance:  # one NVE agent per kernel reports what it learns; the other follows
            sections["nve_agent"]["local_learning"] = "false"
    if state:
        (name,) = [h.name for h in served]
        sections["state"] = {
            "kinds": LAB_LIBVIRT_STATE_KINDS,
            "key": state["key"],
            "token": state["token"],
            "bind_host": "127.0.0.1",
            "bind_port": state["ports"][name],
            "peers": [f"{n}:http://127.0.0.1:{p}" for n, p in state["ports"].items()],
            "ledger_dir": os.path.join(workdir, f"ledger-{name}"),
        }
    return sections


def start_agent_processes(
    conf: cfg.ConfigOpts,
    site: LabSite,
    hosts: dict[str, LibvirtHost],
    workdir: str,
    state: bool,
    ha_etcd: dict[str, Any] | None = None,
) -> dict[str, AgentProcess]:
    """Write the agents' config files and start one ``vmm agent`` process each.

    One agent per host (named after it); with ``ha_etcd`` instead two
    agents, "a" and "b", each serving both hosts and sharing the journal
    and leases on etcd. The hook relays talk to "a"; "b" learns of
    migrations from libvirt's events alone.
    """
    secrets_ = (
        {
            "key": secrets.token_urlsafe(32),
            "token": secrets.token_urlsafe(24),
            "ports": {name: free_port() for name in hosts},
        }
        if state
        else None
    )
    layout: list[tuple[str, list[LibvirtHost], str]]
    if ha_etcd:
        layout = [("a", list(hosts.values()), ""), ("b", list(hosts.values()), "-b")]
    else:
        layout = [(name, [host], "") for name, host in hosts.items()]
    processes: dict[str, AgentProcess] = {}
    try:
        for name, served, instance in layout:
            path = os.path.join(workdir, f"{name}.conf")
            sections = agent_sections(conf, site, served, workdir, secrets_, instance, ha_etcd)
            write_config(path, sections)
            processes[name] = AgentProcess(
                name,
                path,
                os.path.join(workdir, f"journal-{name}.sqlite"),
                os.path.join(workdir, f"agent-{name}.log"),
            )
            processes[name].start()
    except BaseException:
        for process in processes.values():
            process.kill()
        raise
    return processes


def platform_problem() -> str | None:
    """Why this machine cannot run the real-libvirt lab (a missing package, no
    guest kernel), or None: what a test that needs the lab skips with."""
    from vmm_lab.libvirt import demo as lv_demo
    from vmm_orchestrator.errors import VmmError

    try:
        lv_demo.check_prerequisites()
        guest_mod.default_kernel_version()
    except (VmmError, LibvirtLabError) as exc:
        return f"{exc}" + (f" ({exc.hint})" if getattr(exc, "hint", None) else "")
    return None


def agent_conf(hold_time_s: float) -> cfg.ConfigOpts:
    """The libvirt lab's configuration with ``[stage_hold_timer] hold_time``."""
    conf = lab_conf(orchestrated=True)
    conf.set_override("hold_time", hold_time_s, group="stage_hold_timer")
    return conf


@contextlib.contextmanager
def agent_site(prefix: str, hold_time_s: float, **kwargs: Any) -> Iterator[LibvirtSite]:
    """The libvirt lab served by ``vmm agent`` processes (see libvirt_site); each
    agent's log tail is printed when the body ends, for the failure's story."""
    conf = agent_conf(hold_time_s)
    with libvirt_site(conf, prefix, orchestrated=True, agent_processes=True, **kwargs) as site:
        try:
            yield site
        finally:
            for name, process in site.processes.items():
                print(f"\n--- agent {name} log (tail) ---\n{process.log_tail(3000)}")
