"""The demo: a VM live-migrates in the lab while peers and the gateway send
probe streams at it, once per mode, and a side-by-side report is printed.

Modes (each in a fresh lab, same topology, same migration):
  none          no orchestrator and no announcement at all;
  rarp          no orchestrator; QEMU's own self-announcement (5 RARPs);
  orchestrated  QEMU's RARPs plus this project's pipeline.
In every mode the NVEs run the same agent with EVPN-style local learning,
so the baselines converge the way a directory-driven overlay does today:
only once the VM's MAC is seen on its new port.

``lab_site(..., state=True)`` builds the same lab with what state migration
needs (see :mod:`vmm_lab.state_demo` for the demo that uses it): the model
stateful firewall of :mod:`vmm_lab.firewall` on every host, a state
service (StateHost) per host, and the pipeline with the state stages.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from oslo_config import cfg

from vmm_lab import plot_modes
from vmm_lab.cleanup import run_steps
from vmm_lab.linux import options as lab_opts
from vmm_lab.linux import probe
from vmm_lab.linux.hypervisor import LabHypervisor, LabMigration
from vmm_lab.linux.topology import Lab, LabVm, in_ns, new_prefix
from vmm_linux.host import LinuxHost
from vmm_orchestrator import engine, options
from vmm_orchestrator.nva.client import NvaClient
from vmm_orchestrator.nva.server import NvaServer
from vmm_orchestrator.nva.store import NvaStore

if TYPE_CHECKING:  # vmm_state is imported only when a lab runs with state=True
    from vmm_lab.firewall import HostFirewall
    from vmm_state.service import StateHost

LOG = logging.getLogger(__name__)

#: The pipeline of a lab with state migration: the destination's hold first (as
#: in engine.DEFAULT_STAGES: a veto only reverts a local expectation), the delta
#: after the in-flight tunnel (inside the pause), the source's cleanup after the hold.
STATE_STAGES = [
    "nve_prepare",
    "nva_prestage",
    "state_precopy",
    "announce",
    "nve_plug",
    "peer_update",
    "inflight_tunnel",
    "state_delta",
    "hold_timer",
    "state_cleanup",
]
#: The kinds a lab with state migration moves unless [state] kinds says otherwise:
#: those the firewall of vmm_lab.firewall keeps for the lab's proofs.
LAB_STATE_KINDS = ["conntrack", "nft_sets", "dhcp_snooping", "mdb"]


@dataclasses.dataclass
class ModeResult:
    """Everything measured in one mode."""

    mode: str
    streams: list[probe.StreamReport]
    convergence_ms: dict[str, float | None]
    ack_convergence_ms: dict[str, float]
    timeline: list[dict[str, Any]]
    critical_path_ms: float | None
    downtime_ms: float
    gateway_fdb_vtep: str | None
    destination_vtep: str
    gateway_neigh_mac: str | None
    errors: list[str]
    #: This mode's column of the demo's picture (vmm_lab.plot_modes).
    picture: Any = dataclasses.field(default=None, repr=False, compare=False)

    #: What the destination NVE held per NIC (the nve_plug stage's notes).
    holds: dict[str, Any] = dataclasses.field(default_factory=dict)
    #: CLOCK_MONOTONIC seconds of the VM's resume (for the hold's release delay).
    resumed_monotonic: float = 0.0

    @property
    def lost_after_resume(self) -> int:
        return sum(s.lost_after_resume for s in self.streams)

    @property
    def lost_total(self) -> int:
        """Every packet that never arrived: before, during and after the pause."""
        return sum(s.lost for s in self.streams)

    @property
    def duplicates(self) -> int:
        return sum(s.duplicates for s in self.streams)

    @property
    def reordered(self) -> int:
        return sum(s.reordered for s in self.streams)

    @property
    def held_extra_ms_max(self) -> float | None:
        values = [s.held_extra_ms_max for s in self.streams if s.held_extra_ms_max is not None]
        return max(values) if values else None

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(dataclasses.replace(self, picture=None))
        out.pop("picture")
        out["lost_after_resume"] = self.lost_after_resume
        out["lost_total"] = self.lost_total
        out["duplicates"] = self.duplicates
        out["reordered"] = self.reordered
        out["held_extra_ms_max"] = self.held_extra_ms_max
        return out


@dataclasses.dataclass(frozen=True)
class PortProfile:
    """The static security of a VM's port: what any port plug writes, the same on
    every host (a security group and port settings, as Neutron's agent writes
    them). It follows the port in every lab; only dynamic state needs moving.

    ``services``: TCP ports the VM offers (the security group's inbound rules);
    ``snoop``: DHCP-snooping enforcement on the port; ``mcast_flood``: whether
    unregistered multicast is flooded to the port.
    """

    services: tuple[int, ...] = ()
    snoop: bool = False
    mcast_flood: bool = True


@dataclasses.dataclass
class LabSite:
    """A running lab: namespaces, directory, hosts and (maybe) orchestrators.

    With ``lab_site(..., state=True)`` also each host's state service
    (``states``) and firewall (``firewalls``), and each VM's port profile
    (``profiles``; a VM without one gets the default PortProfile).
    """

    lab: Lab
    #: The directory: in-process (NvaServer) or ``vmm nva serve`` (NvaProcess).
    server: Any
    token: str
    hosts: dict[str, LinuxHost]
    dispatchers: dict[str, engine.Dispatcher] | None
    workdir: str
    states: dict[str, StateHost] = dataclasses.field(default_factory=dict)
    firewalls: dict[str, HostFirewall] = dataclasses.field(default_factory=dict)
    profiles: dict[str, PortProfile] = dataclasses.field(default_factory=dict)
    #: The hosts as the composition root assembled them (journals, pipelines).
    assembly: Any = None

    def client(self) -> NvaClient:
        return NvaClient(self.server.url, self.token)

    def set_profile(self, vm_name: str, profile: PortProfile) -> None:
        """Give a VM's port ``profile``, now on its host and wherever it is plugged next."""
        vm = self.lab.vms[vm_name]
        self.profiles[vm_name] = profile
        self.port_event(vm, vm.host, True)

    def state_hypervisor(self) -> LabHypervisor:
        """The hypervisor of the state labs: QEMU's RARPs, a SWITCHOVER the source's
        stages hold the pause for (as libvirt's hook does), libvirt-style ports (the
        tap exists before the resume) and the port profile following the VM."""
        return LabHypervisor(
            self.lab,
            self.dispatchers,
            qemu_rarp=True,
            hold_switchover=True,
            libvirt_ports=True,
            on_port=self.port_event,
        )

    def port_event(self, vm: LabVm, host: str, plugged: bool) -> None:
        """A LabHypervisor ``on_port`` hook: write (or remove) the port's static
        profile on ``host``'s firewall, as the port plug (or unplug) does there."""
        fw = self.firewalls.get(host)
        if fw is None or vm.gateway:
            return
        profile = self.profiles.get(vm.name, PortProfile())
        if plugged:
            fw.protect(vm.vif, services=profile.services)
            fw.plug_port(vm.port, snoop=profile.snoop, mcast_flood=profile.mcast_flood)
        else:
            fw.unprotect(vm.vif)
            fw.unplug_port(vm.port)


def _state_conf(conf: cfg.ConfigOpts) -> None:
    """[state] for a lab: a fresh key and token unless set, services on loopback
    (the orchestrators run in this namespace), the lab's kinds unless set."""
    from vmm_state import options as state_opts

    group = state_opts.GROUP
    options.require(conf, group, "the lab's state settings")
    if not conf[group].key:
        conf.set_override("key", secrets.token_urlsafe(32), group=group)
    if not conf[group].token:
        conf.set_override("token", secrets.token_urlsafe(24), group=group)
    if not conf[group].kinds:
        conf.set_override("kinds", LAB_STATE_KINDS, group=group)
    conf.set_override("bind_host", "127.0.0.1", group=group)
    conf.set_override("bind_port", 0, group=group)


def configure_hosts(
    conf: cfg.ConfigOpts,
    lab: Lab,
    nva_url: str | None,
    nva_token: str | None,
    workdir: str,
    served: list[str],
    stages: list[str] | None = None,
    vni: int | None = None,
) -> dict[str, dict[str, Any]]:
    """Write the lab's hosts into ``conf`` the way an operator's config file does.

    ``[agent] hosts`` = ``served``, a ``[host:<name>]`` group each (vtep,
    vnis, netns, journal in ``workdir``), ``[nva]`` pointing at the lab's
    embedded directory (with ``nva_url``; None: the caller configured
    another backend) and, when given, ``[pipeline] stages``. Returns the
    same as INI sections ({group: {option: value}}), for an agent's file.
    """
    from vmm_orchestrator import agent as root
    from vmm_orchestrator.nva import options as nva_options

    vni = conf.lab.vni if vni is None else vni
    sections: dict[str, dict[str, Any]] = {"agent": {"hosts": ",".join(served)}}
    options.require(conf, root.GROUP, "the lab", "hosts")
    conf.set_override("hosts", served, group=root.GROUP)
    options.register_hosts(conf)  # the [host:<name>] groups follow [agent] hosts
    if nva_url is not None:
        sections["nva"] = {"backend": "embedded", "url": nva_url, "token": nva_token}
        for key, value in sections["nva"].items():
            conf.set_override(key, value, group=nva_options.GROUP)
    if stages is not None:
        conf.set_override("stages", stages, group=engine.GROUP)
        sections["pipeline"] = {"stages": ",".join(stages)}
    else:  # a lab before this one on the same conf may have set them
        conf.clear_override("stages", group=engine.GROUP)
    for name in served:
        h = lab.hosts[name]
        values = {
            "vtep": h.vtep,
            "vnis": [vni],
            "netns": h.netns,
            "journal": os.path.join(workdir, f"journal-{name}.sqlite"),
        }
        for key, value in values.items():
            conf.set_override(key, value, group=root.host_group(name))
        sections[root.host_group(name)] = {
            k: ",".join(map(str, v)) if isinstance(v, list) else v for k, v in values.items()
        }
    return sections


@contextlib.contextmanager
def lab_site(
    conf: cfg.ConfigOpts,
    prefix: str,
    orchestrated: bool,
    state: bool = False,
    move_state: bool = True,
    external: tuple[str, ...] = (),
    nva_process: bool = False,
    firewall: Any = None,
) -> Iterator[LabSite]:
    """Build the demo topology (PLACEMENT); tear everything down however the body ends.

    The hosts come from the product's composition root
    (:func:`vmm_orchestrator.agent.assemble`) on the lab's configuration,
    exactly as ``vmm agent`` builds them. Hosts named in ``external`` are
    left to ``vmm agent`` processes the caller starts (their VMs are not
    created here). ``nva_process`` serves the directory as the operator's
    ``vmm nva serve`` process (vmm_lab.nva_process) instead of in-process.
    ``firewall`` (vmm_lab.firewall.FirewallSettings) tunes the model firewall.

    ``state`` adds what state migration needs: the firewall of
    :mod:`vmm_lab.firewall` on every host (IGMP snooping on the VN bridge,
    with the gateway's host as querier, since a bridge enforces snooping only
    while it knows one; every VM's port profile) and, when ``orchestrated``
    and ``move_state``, the pipeline of STATE_STAGES, which makes the root
    build a state service per host (in ``[state]``: the lab's kinds unless
    set, a fresh key and token unless set, services on 127.0.0.1 with a free
    port). ``move_state`` False keeps the firewalls but runs the pipeline
    without the state stages: the "without state" baseline of the same lab.
    """
    from vmm_orchestrator import agent as root

    options.require(conf, lab_opts.GROUP, "the lab")
    lab = Lab(prefix, conf.lab.vni)
    workdir: str | None = None
    token = secrets.token_urlsafe(24)
    server: Any = None
    assembly: root.Assembly | None = None
    firewalls: dict[str, HostFirewall] = {}
    try:
        workdir = tempfile.mkdtemp(prefix=f"{prefix}-")
        if nva_process:
            from vmm_lab.nva_process import NvaProcess

            server = NvaProcess(workdir, token)
        else:  # the lab's directory follows [nva] (move-flap, log)
            server = NvaServer(NvaStore.from_conf(conf, ":memory:"), token, "127.0.0.1", 0)
        server.start()
        admin = NvaClient(server.url, token)
        vni = conf.lab.vni
        lab.build_underlay()
        for i in range(1, conf.lab.hosts + 1):
            h = lab.add_host(f"h{i}")
            admin.register_nve(h.name, h.vtep, [vni])
        with_state = state and orchestrated and move_state
        if with_state:
            _state_conf(conf)
        served = [name for name in lab.hosts if name not in external]
        configure_hosts(
            conf, lab, server.url, token, workdir, served, STATE_STAGES if with_state else None
        )
        assembly = root.assemble(conf)
        hosts: dict[str, LinuxHost] = {}
        for host in assembly.hosts:
            if not isinstance(host.driver, LinuxHost):
                raise RuntimeError("the namespace lab needs [agent] host_driver = linux")
            hosts[host.name] = host.driver
            host.driver.nve.ensure_vn(vni)
        for name, host_name in lab_opts.PLACEMENT.items():
            if host_name in external:
                continue
            vm = lab.add_vm(name, host_name, gateway=name == lab_opts.GATEWAY)
            admin.add_endpoint(vni, vm.mac, [vm.ipv4], [vm.ipv6], host_name)
            hosts[host_name].nve.plug(vni, vm.mac, vm.port, (vm.ipv4, vm.ipv6))
        gw = lab.vms.get(lab_opts.GATEWAY)
        if gw is not None:
            conf.set_override("gateways", [f"{gw.ipv4}@{gw.mac}"], group="announce")
            for linux in hosts.values():  # the pools were built before the gateway existed
                linux.announcers.gateways = [(gw.ipv4, gw.mac)]
        states = {h.name: h.state for h in assembly.hosts if h.state is not None}
        dispatchers = {h.name: h.dispatcher for h in assembly.hosts}
        site = LabSite(
            lab,
            server,
            token,
            hosts,
            dispatchers if orchestrated else None,
            workdir,
            states,  # type: ignore[arg-type]
            firewalls,
            assembly=assembly,
        )
        assembly.start()
        if state:  # after the agents set the VXLAN flood lists: the querier's first
            _install_firewalls(site, firewall)  # query must reach every host's bridge
        yield site
    finally:
        run_steps(
            [
                ("closing the hosts", assembly.close if assembly is not None else _nothing),
                ("stopping the directory", server.stop if server is not None else _nothing),
                ("removing the namespaces", lab.teardown),
                (
                    "removing the work folder",
                    lambda: workdir and shutil.rmtree(workdir, ignore_errors=True),
                ),
            ]
        )


def _nothing() -> None:
    """A cleanup step with nothing to do."""


def _install_firewalls(site: LabSite, settings: Any = None) -> None:
    """The model firewall on every host (``settings``: its FirewallSettings), IGMP
    snooping on the VN's bridges, and every VM's port profile where it runs."""
    from vmm_lab.firewall import HostFirewall

    lab = site.lab
    gw = lab.vms[lab_opts.GATEWAY]
    for name, h in lab.hosts.items():
        fw = HostFirewall(h.netns, settings)
        fw.install()
        fw.snooping(f"br-{lab.vni}", querier=name == gw.host)
        site.firewalls[name] = fw
    for vm in lab.vms.values():
        site.port_event(vm, vm.host, True)


class ProbeRun:
    """Probe receivers in the VM and senders in the peers, as processes."""

    def __init__(self, site: LabSite, target: LabVm, senders: list[LabVm], port: int) -> None:
        self.site = site
        self.target = target
        self.senders = senders
        self.port = port
        self.procs: list[subprocess.Popen[str]] = []
        self.recv_out: list[str] = []
        self.send_out: dict[str, str] = {}

    def start(self, rate: int, duration: float) -> float:
        lab, work = self.site.lab, self.site.workdir
        py = [sys.executable, "-m", "vmm_lab.linux.probe"]
        for family, addr in (("v4", self.target.ipv4), ("v6", self.target.ipv6)):
            out = os.path.join(work, f"recv-{family}.json")
            proc = lab.popen(
                self.target.netns,
                *py,
                "recv",
                "--bind",
                addr,
                "--port",
                str(self.port),
                "--out",
                out,
                stdout=subprocess.PIPE,
            )
            self.procs.append(proc)
            self.recv_out.append(out)
            assert proc.stdout is not None
            line = proc.stdout.readline()
            if "ready" not in line:
                raise RuntimeError(f"probe receiver for {addr} did not start: {line!r}")
        start_at = time.monotonic() + 0.3
        for peer in self.senders:
            for family, addr in (("v4", self.target.ipv4), ("v6", self.target.ipv6)):
                stream = f"{peer.name}-{family}"
                out = os.path.join(work, f"send-{stream}.json")
                self.send_out[stream] = out
                self.procs.append(
                    lab.popen(
                        peer.netns,
                        *py,
                        "send",
                        "--dst",
                        addr,
                        "--port",
                        str(self.port),
                        "--rate",
                        str(rate),
                        "--duration",
                        f"{duration:.3f}",
                        "--stream",
                        stream,
                        "--out",
                        out,
                        "--start-at",
                        f"{start_at:.6f}",
                    )
                )
        return start_at

    def finish(self, migration: LabMigration) -> list[probe.StreamReport]:
        n_recv = len(self.recv_out)
        for proc in self.procs[n_recv:]:
            proc.wait(timeout=60)
        time.sleep(0.2)
        for proc in self.procs[:n_recv]:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=10)
        received: list[probe.Recv] = []
        for path in self.recv_out:
            received.extend(probe.load_recv_log(path))
        start_ns = int(migration.paused_at * 1e9)
        end_ns = int(migration.resumed_at * 1e9)
        return [
            probe.analyze(probe.load_send_log(path), received, start_ns, end_ns)
            for _, path in sorted(self.send_out.items())
        ]

    def kill(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                with contextlib.suppress(Exception):
                    proc.wait(timeout=5)


def _timeline(reports: list[engine.PhaseReport], resumed_at: float) -> list[dict[str, Any]]:
    rows = []
    for rep in reports:
        for t in rep.timeline:
            rows.append(
                {
                    "phase": rep.phase.value,
                    "host": rep.host,
                    "stage": t.stage,
                    "start_ms": round(t.started_offset_ms, 2),
                    "duration_ms": round(t.duration_ms, 2),
                    "outcome": t.outcome,
                }
            )
    return rows


def _critical_path(reports: list[engine.PhaseReport], resumed_at: float) -> float | None:
    for rep in reports:
        for t in rep.timeline:
            first = t.notes.get("first_frame_monotonic")
            if first is not None:
                return (float(first) - resumed_at) * 1000.0
    return None


def _holds(reports: list[engine.PhaseReport]) -> dict[str, Any]:
    """What the destination NVE held per NIC (the nve_plug stage's notes)."""
    found: dict[str, Any] = {}
    for rep in reports:
        for t in rep.timeline:
            found.update(t.notes.get("holds") or {})
    return found


def _ack_convergence(reports: list[engine.PhaseReport]) -> dict[str, float]:
    for rep in reports:
        for t in rep.timeline:
            if "convergence_ms" in t.notes:
                return {k: round(float(v), 2) for k, v in t.notes["convergence_ms"].items()}
    return {}


def gateway_view(site: LabSite, vm: LabVm) -> tuple[str | None, str | None]:
    """(VTEP the gateway's NVE sends the VM's MAC to, MAC the gateway's ARP holds)."""
    gw = site.lab.vms["gw"]
    vtep = site.hosts[gw.host].nve.vxlan_dst(vm.vni, vm.mac)
    out = in_ns(gw.netns, "ip", "-4", "neigh", "show", vm.ipv4, "dev", "eth0", check=False)
    mac = out.split("lladdr")[1].split()[0] if "lladdr" in out else None
    return vtep, mac


def run_mode(
    conf: cfg.ConfigOpts,
    mode: str,
    prefix: str,
    vm_name: str = "vm1",
    destination: str = lab_opts.DESTINATION,
) -> ModeResult:
    """One migration of ``vm_name`` to ``destination`` under probe traffic, in a fresh lab.

    Every other VM and the gateway that do not run on the destination send
    the probe streams.
    """
    orchestrated = mode == "orchestrated"
    settings = conf.lab
    with lab_site(conf, prefix, orchestrated) as site:
        lab = site.lab
        vm1 = lab.vms[vm_name]
        senders = [
            vm for name, vm in sorted(lab.vms.items()) if name != vm_name and vm.host != destination
        ]
        probes = ProbeRun(site, vm1, senders, settings.probe_port)
        hyper = LabHypervisor(lab, site.dispatchers, qemu_rarp=mode != "none")
        duration = settings.warmup_s + settings.downtime_ms / 1000.0 + 0.3 + settings.observe_s
        try:
            with plot_modes.Recorder() as recorder:
                start_at = probes.start(settings.probe_rate, duration)
                time.sleep(max(0.0, start_at + settings.warmup_s - time.monotonic()))
                record, futures = hyper.migrate(vm1, destination, settings.downtime_ms)
                reports = [f.result(timeout=120) for f in futures]
            streams = probes.finish(record)
            picture = plot_modes.mode_timeline(mode, recorder.docs, record, site.workdir)
        finally:
            probes.kill()
        errors = [f"{r.phase.value} on {r.host}: {r.error}" for r in reports if not r.ok]
        convergence: dict[str, float | None] = {}
        key = (vm1.vni, vm1.mac)
        for name, host in site.hosts.items():
            applied = host.agent.applied_at.get(key)
            if applied and applied[0] == destination:
                convergence[name] = round((applied[1] - record.resumed_at) * 1000.0, 2)
            else:
                convergence[name] = None
        fdb_vtep, neigh_mac = gateway_view(site, vm1)
        return ModeResult(
            mode=mode,
            streams=streams,
            convergence_ms=convergence,
            ack_convergence_ms=_ack_convergence(reports),
            timeline=_timeline(reports, record.resumed_at),
            critical_path_ms=_critical_path(reports, record.resumed_at),
            downtime_ms=round((record.resumed_at - record.paused_at) * 1000.0, 2),
            gateway_fdb_vtep=fdb_vtep,
            destination_vtep=lab.hosts[destination].vtep,
            gateway_neigh_mac=neigh_mac,
            errors=errors,
            picture=picture,
            holds=_holds(reports),
            resumed_monotonic=record.resumed_at,
        )


def _fmt_ms(value: float | None) -> str:
    return "never" if value is None else f"{value:.1f}"


def render(results: list[ModeResult]) -> str:
    """The side-by-side report."""
    lines: list[str] = []
    lines.append("== Probe streams (1 row per stream and mode) ==")
    rows = []
    for res in results:
        for s in res.streams:
            rows.append(
                {
                    "mode": res.mode,
                    "stream": s.stream,
                    "sent": s.sent,
                    "lost_while_paused": s.lost_while_paused,
                    "lost_after_resume": s.lost_after_resume,
                    "lost": s.lost,
                    "duplicates": s.duplicates,
                    "reordered": s.reordered,
                    "held": s.held,
                    "held_extra": "-"
                    if s.held_extra_ms_max is None
                    else f"{s.held_extra_ms_median:.1f} / {s.held_extra_ms_max:.1f}",
                    "black_hole_ms": f"{s.black_hole_ms:.1f}" + ("" if s.converged else " (never)"),
                }
            )
    lines.append(
        probe.format_table(
            rows,
            [
                ("mode", "mode"),
                ("stream", "stream"),
                ("sent", "sent"),
                ("lost_while_paused", "lost while paused"),
                ("lost_after_resume", "lost after resume"),
                ("lost", "lost in total"),
                ("duplicates", "dup"),
                ("reordered", "reord"),
                ("held", "held"),
                ("held_extra", "held +ms med/max"),
                ("black_hole_ms", "black-hole ms"),
            ],
        )
    )
    lines.append("")
    lines.append(
        "== Per-NVE convergence: ms from VM resume until the NVE forwards to the new host =="
    )
    nves = sorted({n for r in results for n in r.convergence_ms})
    conv_rows = [
        {"nve": n, **{r.mode: _fmt_ms(r.convergence_ms.get(n)) for r in results}} for n in nves
    ]
    lines.append(
        probe.format_table(conv_rows, [("nve", "NVE")] + [(r.mode, r.mode) for r in results])
    )
    lines.append("")
    lines.append("== Summary ==")
    summary = []
    for r in results:
        bh = [s.black_hole_ms for s in r.streams]
        summary.append(
            {
                "mode": r.mode,
                "paused_ms": f"{r.downtime_ms:.1f}",
                "lost_after_resume": r.lost_after_resume,
                "lost_total": r.lost_total,
                "dup": r.duplicates,
                "reord": r.reordered,
                "held_extra": _fmt_ms(r.held_extra_ms_max)
                if r.held_extra_ms_max is not None
                else "-",
                "max_black_hole_ms": f"{max(bh):.1f}" if bh else "-",
                "all_converged": "yes" if all(s.converged for s in r.streams) else "NO",
                "gw_fdb": "h2" if r.gateway_fdb_vtep == r.destination_vtep else "stale",
                "resumed_to_first_garp_ms": _fmt_ms(r.critical_path_ms)
                if r.critical_path_ms is not None
                else "-",
            }
        )
    lines.append(
        probe.format_table(
            summary,
            [
                ("mode", "mode"),
                ("paused_ms", "paused ms"),
                ("lost_after_resume", "lost after resume"),
                ("lost_total", "lost in total"),
                ("dup", "dup"),
                ("reord", "reord"),
                ("held_extra", "held +ms max"),
                ("max_black_hole_ms", "max black-hole ms"),
                ("all_converged", "all converged"),
                ("gw_fdb", "gateway NVE -> VM"),
                ("resumed_to_first_garp_ms", "RESUMED->1st GARP ms"),
            ],
        )
    )
    for r in results:
        if r.timeline:
            lines.append("")
            lines.append(f"== Pipeline timeline ({r.mode}; start ms from each phase's event) ==")
            lines.append(
                probe.format_table(
                    r.timeline,
                    [
                        ("phase", "phase"),
                        ("host", "host"),
                        ("stage", "stage"),
                        ("start_ms", "start ms"),
                        ("duration_ms", "duration ms"),
                        ("outcome", "outcome"),
                    ],
                )
            )
            for mac, held in sorted(r.holds.items()):
                lines.append(f"destination hold of {mac}: {held}")
                if held.get("released_monotonic") is not None:
                    after = (held["released_monotonic"] - r.resumed_monotonic) * 1000.0
                    lines.append(f"  released {after:.1f} ms after the VM resumed")
            if r.ack_convergence_ms:
                acks = ", ".join(f"{k} {v:.1f}" for k, v in sorted(r.ack_convergence_ms.items()))
                lines.append(f"directory commit -> NVE acknowledgement ms: {acks}")
        for err in r.errors:
            lines.append(f"ERROR ({r.mode}): {err}")
    return "\n".join(lines)


def run_demo(
    conf: cfg.ConfigOpts,
    json_out: str | None = None,
    vm: str = "vm1",
    picture_out: str | None = None,
) -> int:
    """Run every configured mode; 0 only if the orchestrated run lost nothing after resume."""
    options.require(conf, lab_opts.GROUP, "the lab demo")
    lab_opts.check(conf)
    prefix = new_prefix()
    results = []
    for mode in conf.lab.modes:
        print(f"-- running mode {mode!r} (lab prefix {prefix}{mode[0]}) ...", flush=True)
        results.append(run_mode(conf, mode, f"{prefix}{mode[0]}", vm_name=vm))
    print()
    print(render(results))
    pictures = [r.picture for r in results if r.picture is not None]
    if pictures:
        path = picture_out or os.path.join(tempfile.gettempdir(), f"vmm-demo-{prefix}.svg")
        plot_modes.write_side_by_side(pictures, path)
        print(f"\npicture of the modes side by side: {path}")
    if json_out:
        with open(json_out, "w", encoding="utf-8") as fh:
            json.dump([r.to_dict() for r in results], fh, indent=2, default=str)
    status = 0
    for r in results:
        if r.mode == "orchestrated" and (r.lost_after_resume or r.errors):
            print(
                f"\nFAIL: the orchestrated run lost {r.lost_after_resume} packet(s) after the "
                f"VM resumed",
                file=sys.stderr,
            )
            status = 1
    return status


def median(values: list[float]) -> float:
    return statistics.median(values)
