"""Host evacuation: N VMs (20 by default) live-migrate off one host at the same time.

The lab (real namespaces, Linux bridge + VXLAN NVEs, the real NVE agents,
the orchestrator's full pipeline) is built with its own topology:

    h1  the host being evacuated: vm01 .. vmNN
    h2  destination of the odd VMs     h3  destination of the even VMs
    h4  a peer VM ("peer") and the gateway ("gw")

Every VM receives two probe streams (peer -> its IPv4 address, gw -> its
IPv6 address) while all N migrations run concurrently, each with its own
pause. Per directory (embedded; etcd with the HA pipeline: etcd journal
and per-migration leases, the NVE agents watching etcd directly; or
etcd-served: the same etcd and HA pipeline with ``vmm nva serve`` in front
of etcd, the agents and stages reaching the directory through it, one
stream per NVE fed by one etcd watch) it prints per-VM loss and a summary, and checks
that nothing was missed: every phase event handled successfully, every
journal entry done, the directory and every NVE agent holding each VM at its
destination with the directory's sequence number, no agent watch error.
The exit status is 0 only when all converged with no loss after resume.

Loss after resume comes from VMs that resumed before their source host had
armed the in-flight tunnel (the table says which): the lab's hypervisor, like
libvirt by default, resumes the destination after the downtime whether or not
the source handled SWITCHOVER. ``--switchover-gate S`` holds each resume until
the source did (at most S s), as QEMU's pause-before-switchover capability
allows, trading a longer pause for no loss after resume.

Loss while paused comes from VMs whose destination armed their hold after
the pause ("hold armed, ms after pause" > 0; the summary says how many):
PREPARE's report does not wait for the best-effort ``nve_prepare``, which
runs after ``nva_prestage`` (a directory round trip), so on a loaded
machine the source pauses first, and what reaches the destination before
the hold is lost.

Run as root:  .venv/bin/python benchmarks/evacuation.py --vms 20 --directory all
              [--switchover-gate 2]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import json
import logging
import os
import secrets
import selectors
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

from oslo_config import cfg

from vmm_etcd import options as etcd_options
from vmm_etcd.client import EtcdNvaClient
from vmm_etcd.cluster import LocalEtcdCluster
from vmm_etcd.kv import EtcdKV
from vmm_etcd.store import EtcdNvaStore
from vmm_kernel.netns import socket_in
from vmm_lab.linux import probe
from vmm_lab.linux.demo import configure_hosts
from vmm_lab.linux.hypervisor import LabHypervisor, LabMigration
from vmm_lab.linux.topology import Lab, LabVm, new_prefix
from vmm_linux import announce as announce_mod
from vmm_linux import nve as nve_opts
from vmm_linux.agent import GROUP as AGENT_GROUP
from vmm_linux.host import LinuxHost
from vmm_orchestrator import agent as root
from vmm_orchestrator import engine, options
from vmm_orchestrator import journal as jr
from vmm_orchestrator.nva import options as nva_options
from vmm_orchestrator.nva.client import NvaClient
from vmm_orchestrator.nva.server import NvaServer
from vmm_orchestrator.nva.store import NvaStore

LOG = logging.getLogger(__name__)

VNI = 100
SOURCE = "h1"
DESTINATIONS = ("h2", "h3")
PEERS_HOST = "h4"
PROBE_PORT = 5201
#: embedded; etcd (agents watch etcd directly); etcd-served (`vmm nva serve` in front of etcd).
DIRECTORIES = ["embedded", "etcd", "etcd-served"]


@dataclasses.dataclass
class Site:
    """A running evacuation lab."""

    directory: str
    lab: Lab
    hosts: dict[str, LinuxHost]
    dispatchers: dict[str, engine.Dispatcher]
    journals: dict[str, Any]
    admin: Any
    workdir: str


def make_conf(
    hold_s: float, workers: int | None = None, frames_hold_ms: int = 1000
) -> cfg.ConfigOpts:
    """The agents' configuration; ``workers`` None keeps the product's [pipeline]
    workers (8 per lane: more VMs than that leave at once here)."""
    conf = options.new_conf()  # every plugin's options, as `vmm` registers them
    if workers is not None:
        conf.set_override("workers", workers, group="pipeline")
    conf.set_override("watch_timeout", 1.0, group=AGENT_GROUP)
    conf.set_override("hold_time", hold_s, group="stage_hold_timer")
    # The NVEs' frame hold: with --switchover-gate the pauses of 20 VMs leaving
    # at once reach seconds (the source handles SWITCHOVER after SWITCHOVER),
    # longer than the 1 s a default hold keeps a frame.
    conf.set_override("hold_ms", frames_hold_ms, group=nve_opts.GROUP)
    return conf


@contextlib.contextmanager
def evacuation_site(
    conf: cfg.ConfigOpts,
    directory: str,
    vms: int,
    etcd: LocalEtcdCluster | None,
) -> Iterator[Site]:
    """Build the topology and the orchestrators; tear everything down however it ends."""
    lab = Lab(new_prefix(), VNI)
    workdir = tempfile.mkdtemp(prefix=f"{lab.prefix}-")
    hosts: dict[str, LinuxHost] = {}
    dispatchers: dict[str, engine.Dispatcher] = {}
    journals: dict[str, Any] = {}
    closers: list[Any] = []
    server: NvaServer | None = None
    store: Any = None
    try:
        if directory == "embedded":
            token = secrets.token_urlsafe(16)
            server = NvaServer(NvaStore(":memory:"), token, "127.0.0.1", 0)
            server.start()
            url = server.url

            def client() -> Any:
                return NvaClient(url, token)
        else:
            assert etcd is not None
            key_prefix = f"/evacuation-{secrets.token_hex(4)}/"
            endpoints = etcd.endpoints

            def client() -> Any:
                return EtcdNvaClient(EtcdKV(endpoints), key_prefix)

            if directory == "etcd-served":  # `vmm nva serve` in front of etcd
                token = secrets.token_urlsafe(16)
                store = EtcdNvaStore(EtcdKV(endpoints), key_prefix)
                server = NvaServer(store, token, "127.0.0.1", 0)
                server.start()
                url = server.url

        admin = client()
        closers.append(admin)
        lab.build_underlay()
        names = [SOURCE, *DESTINATIONS, PEERS_HOST]
        for name in names:
            h = lab.add_host(name)
            admin.register_nve(h.name, h.vtep, [VNI])
        if directory == "embedded":
            configure_hosts(conf, lab, url, token, workdir, names, vni=VNI)
        else:
            conf.set_override("endpoints", endpoints, group=etcd_options.GROUP)
            conf.set_override("prefix", key_prefix, group=etcd_options.GROUP)
            conf.set_override("lease_ttl", 5, group=etcd_options.GROUP)
            if directory == "etcd-served":  # the directory through the server
                configure_hosts(conf, lab, url, token, workdir, names, vni=VNI)
            else:  # every agent and stage on etcd directly
                conf.set_override("backend", "etcd", group=nva_options.GROUP)
                configure_hosts(conf, lab, None, None, workdir, names, vni=VNI)
            conf.set_override("journal_backend", "etcd", group=root.GROUP)
            conf.set_override("migration_lock", "etcd", group=root.GROUP)
        assembly = root.assemble(conf)
        closers.append(assembly)
        for host in assembly.hosts:
            assert isinstance(host.driver, LinuxHost)
            hosts[host.name] = host.driver
            host.driver.nve.ensure_vn(VNI)
            dispatchers[host.name] = host.dispatcher
            journals[host.name] = host.journal
        placement = [("gw", PEERS_HOST, True), ("peer", PEERS_HOST, False)]
        placement += [(f"vm{i + 1:02d}", SOURCE, False) for i in range(vms)]
        for name, where, is_gw in placement:
            vm = lab.add_vm(name, where, gateway=is_gw)
            admin.add_endpoint(VNI, vm.mac, [vm.ipv4], [vm.ipv6], where)
            hosts[where].nve.plug(VNI, vm.mac, vm.port, (vm.ipv4, vm.ipv6))
        gw = lab.vms["gw"]
        conf.set_override("gateways", [f"{gw.ipv4}@{gw.mac}"], group="announce")
        for host in hosts.values():
            # The pool builds its announcers on first use: give it the gateway now.
            host.announcers.gateways = announce_mod.parse_gateways(conf.announce.gateways)
        assembly.start()
        yield Site(directory, lab, hosts, dispatchers, journals, admin, workdir)
    finally:
        for closer in reversed(closers):  # the assembly: dispatchers, hosts, journals
            with contextlib.suppress(Exception):
                closer.close()
        if server is not None:
            with contextlib.suppress(Exception):
                server.stop()
        if store is not None:
            with contextlib.suppress(Exception):
                store.close()
        lab.teardown()
        shutil.rmtree(workdir, ignore_errors=True)


class Probes:
    """Probe streams to every VM (peer -> IPv4, gw -> IPv6), run by one hub process.

    Sixty probe processes (a receiver per VM, a sender per stream) would be most
    of the load on a two-core machine; the hub opens every socket inside its
    namespace (vmm_linux.netns.socket_in) and serves them all from one loop,
    writing the same logs as ``vmm_lab.linux.probe``.
    """

    def __init__(self, site: Site, targets: list[LabVm]) -> None:
        self.site = site
        self.targets = targets
        self.hub: subprocess.Popen[str] | None = None
        self.spec: dict[str, Any] = {}

    def start(self, rate: int) -> float:
        """Start the hub (its streams run until finish()); returns when they start."""
        work, vms = self.site.workdir, self.site.lab.vms
        start_at = time.monotonic() + 1.0
        self.spec = {
            "rate": rate,
            "port": PROBE_PORT,
            "start_at": start_at,
            "receivers": [
                {"name": vm.name, "netns": vm.netns, "out": os.path.join(work, f"recv-{vm.name}")}
                for vm in self.targets
            ],
            "streams": [
                {
                    "stream": f"{sender.name}-{vm.name}-{family}",
                    "vm": vm.name,
                    "netns": sender.netns,
                    "dst": getattr(vm, f"ip{family}"),
                    "out": os.path.join(work, f"send-{sender.name}-{vm.name}-{family}"),
                }
                for vm in self.targets
                for family, sender in (("v4", vms["peer"]), ("v6", vms["gw"]))
            ],
        }
        path = os.path.join(work, "probes.json")
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(self.spec, fh)
        self.hub = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--probe-hub", path],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.hub.stdout is not None
        line = self.hub.stdout.readline()
        if "ready" not in line:
            raise RuntimeError(f"the probe hub did not start: {line!r}")
        return start_at

    def finish(self, windows: dict[str, LabMigration]) -> dict[str, list[probe.StreamReport]]:
        """Stop the hub; the streams of each VM, analyzed against its pause window."""
        assert self.hub is not None
        self.hub.send_signal(signal.SIGTERM)
        self.hub.wait(timeout=60)
        out: dict[str, list[probe.StreamReport]] = {}
        for receiver in self.spec["receivers"]:
            name = receiver["name"]
            received = probe.load_recv_log(receiver["out"])
            window = windows[name]
            start, end = int(window.paused_at * 1e9), int(window.resumed_at * 1e9)
            out[name] = [
                probe.analyze(probe.load_send_log(stream["out"]), received, start, end)
                for stream in self.spec["streams"]
                if stream["vm"] == name
            ]
        return out

    def kill(self) -> None:
        if self.hub is not None and self.hub.poll() is None:
            self.hub.kill()
            self.hub.wait(timeout=5)


def probe_hub(spec_path: str) -> int:
    """The hub: send every stream on schedule and receive for every VM until SIGTERM,
    or until the benchmark that started it is gone (killed, or crashed: a hub left
    behind kept the benchmark's stderr open, and whoever waited for it hung)."""
    with open(spec_path, encoding="utf-8") as fh:
        spec = json.load(fh)
    parent = os.getppid()
    stop = {"now": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
    selector = selectors.DefaultSelector()
    logs: dict[str, probe.RecvLog] = {}
    for receiver in spec["receivers"]:
        sock = socket_in(receiver["netns"], socket.AF_INET6, socket.SOCK_DGRAM)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # IPv4 too
        sock.setsockopt(socket.SOL_SOCKET, probe.SO_RCVBUFFORCE, probe.RCVBUF_BYTES)
        sock.bind(("::", spec["port"]))
        sock.setblocking(False)
        logs[receiver["name"]] = probe.RecvLog(bind="::", port=spec["port"], records=[])
        selector.register(sock, selectors.EVENT_READ, receiver["name"])
    period = 1e9 / spec["rate"]
    senders = []
    for stream in spec["streams"]:
        family = socket.AF_INET6 if ":" in stream["dst"] else socket.AF_INET
        sock = socket_in(stream["netns"], family, socket.SOCK_DGRAM)
        log = probe.SendLog(stream["stream"], [], dst=stream["dst"], port=spec["port"])
        log.rate = spec["rate"]
        senders.append((sock, (stream["dst"], spec["port"]), log, stream["out"]))
    print("ready", flush=True)
    # Streams are spread over one period so that sends do not come in bursts.
    anchor = int(spec["start_at"] * 1e9)
    due = [anchor + int(i * period / len(senders)) for i in range(len(senders))]
    orphan_check = 0
    while not stop["now"]:
        now = probe.now_ns()
        if now >= orphan_check:
            if os.getppid() != parent:
                break
            orphan_check = now + 100_000_000
        for i, (sock, addr, log, _) in enumerate(senders):
            if due[i] <= now:
                seq = log.sent
                t = probe.now_ns()
                try:
                    sock.sendto(probe.encode(log.stream, seq, t), addr)
                except OSError as exc:
                    log.errors.append((seq, exc.errno or 0))
                log.send_ns.append(t)
                due[i] += int(period)
                if due[i] < now:  # stalled: do not burst to catch up
                    due[i] = now + int(period)
                    log.reanchored += 1
        wait = max(0.0, (min(due) - probe.now_ns()) / 1e9)
        for key, _ in selector.select(timeout=wait):
            ready = key.fileobj
            assert isinstance(ready, socket.socket)
            while True:
                try:
                    data = ready.recv(2048)
                except BlockingIOError:
                    break
                t = probe.now_ns()
                decoded = probe.decode(data)
                if decoded is not None:
                    logs[key.data].records.append(probe.Recv(decoded[0], decoded[1], decoded[2], t))
    for receiver in spec["receivers"]:
        probe.write_recv_log(logs[receiver["name"]], receiver["out"])
    for _, _, log, out in senders:
        probe.write_send_log(log, out)
    return 0


@dataclasses.dataclass
class Result:
    directory: str
    vms: list[dict[str, Any]]
    window_s: float
    reports: int
    failed_reports: list[str]
    problems: list[str]
    timeline: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    @property
    def lost_after_resume(self) -> int:
        return sum(v["lost_after_resume"] for v in self.vms)

    @property
    def lost_total(self) -> int:
        """Everything that never arrived: before, during and after the pauses."""
        return sum(v["lost"] for v in self.vms)


class SwitchoverGate:
    """Hands events to a host's dispatcher; for SWITCHOVER, returns only once it was handled.

    This is QEMU's ``pause-before-switchover`` capability (libvirt holds the
    migration in the pre-switchover state until told to continue): the
    destination resumes only after the source armed its in-flight tunnel, at
    the cost of a longer pause when the source is slow. Off by default: the
    lab's hypervisor, like libvirt without that capability, does not wait.
    """

    def __init__(self, dispatcher: engine.Dispatcher, limit_s: float) -> None:
        self.dispatcher = dispatcher
        self.limit_s = limit_s

    def submit(self, event: Any) -> Any:
        future = self.dispatcher.submit(event)
        if event.phase.value == "SWITCHOVER":
            with contextlib.suppress(concurrent.futures.TimeoutError):
                future.result(timeout=self.limit_s)
        return future


def evacuate(
    site: Site,
    downtime_ms: float,
    rate: int,
    warmup_s: float,
    observe_s: float,
    gate_s: float = 0.0,
) -> Result:
    """Migrate every VM off h1 at once under probe traffic; measure and check."""
    lab = site.lab
    targets = sorted((vm for vm in lab.vms.values() if vm.host == SOURCE), key=lambda v: v.name)
    destination = {vm.name: DESTINATIONS[i % 2] for i, vm in enumerate(targets)}
    probes = Probes(site, targets)
    dispatchers: dict[str, Any] = dict(site.dispatchers)
    if gate_s > 0:
        dispatchers[SOURCE] = SwitchoverGate(site.dispatchers[SOURCE], gate_s)
    hyper = LabHypervisor(lab, dispatchers, qemu_rarp=True)
    try:
        start_at = probes.start(rate)
        time.sleep(max(0.0, start_at + warmup_s - time.monotonic()))
        with concurrent.futures.ThreadPoolExecutor(len(targets)) as pool:
            jobs = {
                vm.name: pool.submit(
                    hyper.migrate, vm, destination[vm.name], downtime_ms, f"evac-{vm.name}"
                )
                for vm in targets
            }
            migrated = {name: job.result(timeout=120) for name, job in jobs.items()}
        reports = [f.result(timeout=120) for _, futures in migrated.values() for f in futures]
        last_resume = max(rec.resumed_at for rec, _ in migrated.values())
        time.sleep(max(0.0, last_resume + observe_s - time.monotonic()))
        streams = probes.finish({name: rec for name, (rec, _) in migrated.items()})
    finally:
        probes.kill()
    records = {name: rec for name, (rec, _) in migrated.items()}
    first = min(r.paused_at for r in records.values())
    last = max(r.resumed_at for r in records.values())
    problems = check(site, targets, destination)
    ends = _stage_ends(reports)
    rows = []
    for vm in targets:
        rec = records[vm.name]
        s = streams[vm.name]
        mid = f"evac-{vm.name}"
        rows.append(
            {
                "vm": vm.name,
                "to": destination[vm.name],
                "paused_ms": round((rec.resumed_at - rec.paused_at) * 1000, 1),
                "tunnel_ms": ends.get((mid, "inflight_tunnel")),
                "tunnel_first": _before(
                    ends.get((mid, "inflight_tunnel")), (rec.resumed_at - rec.paused_at) * 1000
                ),
                "commit_ms": ends.get((mid, "peer_update")),
                "sent": sum(x.sent for x in s),
                "lost_while_paused": sum(x.lost_while_paused for x in s),
                "lost_after_resume": sum(x.lost_after_resume for x in s),
                "black_hole_ms": max(x.black_hole_ms for x in s),
                "converged": all(x.converged for x in s),
                "duplicates": sum(x.duplicates for x in s),
                "lost": sum(x.lost for x in s),
                "reordered": sum(x.reordered for x in s),
                "held": sum(x.held for x in s),
                "hold_armed_ms": _hold_armed_ms(site, destination[vm.name], vm, rec.paused_at),
                "held_extra_ms_max": max(
                    (x.held_extra_ms_max for x in s if x.held_extra_ms_max is not None),
                    default=None,
                ),
            }
        )
    failed = [
        f"{r.phase.value} of {r.migration_id} on {r.host}: {r.error}" for r in reports if not r.ok
    ]
    result = Result(site.directory, rows, last - first, len(reports), failed, problems)
    result.timeline = stage_timeline(reports)
    return result


def stage_timeline(reports: list[engine.PhaseReport]) -> list[dict[str, Any]]:
    """Per (phase, host role, stage): median and max of when it started (ms after the
    phase's event) and of how long it took, over every migration; in timeline order."""
    runs: dict[tuple[str, str, str], list[tuple[float, float]]] = {}
    for r in reports:
        for t in r.timeline:
            key = (r.phase.value, r.role.value, t.stage)
            runs.setdefault(key, []).append((t.started_offset_ms, t.duration_ms))
    rows: list[dict[str, Any]] = []
    for (phase, role, stage), values in runs.items():
        starts, durations = [v[0] for v in values], [v[1] for v in values]
        rows.append(
            {
                "phase": phase,
                "role": role,
                "stage": stage,
                "runs": len(values),
                "start": f"{statistics.median(starts):.1f} ({max(starts):.1f})",
                "took": f"{statistics.median(durations):.1f} ({max(durations):.1f})",
                "_order": (phase, role, statistics.median(starts)),
            }
        )
    rows.sort(key=lambda row: row["_order"])
    return rows


def _before(tunnel_ms: float | None, paused_ms: float) -> bool:
    """Whether the source's in-flight tunnel was up before the VM resumed."""
    return tunnel_ms is not None and tunnel_ms <= paused_ms


def _late(armed_ms: float | None) -> bool:
    return armed_ms is not None and armed_ms > 0


def _hold_armed_ms(site: Site, host: str, vm: LabVm, paused_at: float) -> float | None:
    """When the destination armed the VM's hold, in ms after its pause (negative:
    before). PREPARE's report does not wait for nve_prepare (best effort), so
    under load the pause can come first, and what reaches the destination
    before the hold is lost while paused."""
    report = getattr(site.hosts[host].nve, "hold_report", lambda *_: None)(VNI, vm.mac)
    armed = (report or {}).get("armed_monotonic")
    return None if armed is None else round((armed - paused_at) * 1000.0, 1)


def _stage_ends(reports: list[engine.PhaseReport]) -> dict[tuple[str, str], float]:
    """(migration, stage) -> ms from its phase's event to the stage's end."""
    return {
        (r.migration_id, t.stage): round(t.started_offset_ms + t.duration_ms, 1)
        for r in reports
        for t in r.timeline
    }


def check(site: Site, targets: list[LabVm], destination: dict[str, str]) -> list[str]:
    """Everything that must hold after the evacuation; the list of what does not."""
    problems = []
    for vm in targets:
        mid = f"evac-{vm.name}"
        dest = destination[vm.name]
        for where in (SOURCE, dest):
            record = site.journals[where].get(mid)
            if record is None or record.status != jr.DONE:
                status = record.status if record else "missing"
                problems.append(f"{mid}: journal of {where} says {status}")
        endpoint = site.admin.get_endpoint(VNI, vm.mac)
        if endpoint["nve"] != dest or endpoint["state"] != "active":
            problems.append(
                f"{vm.name}: directory has it at {endpoint['nve']} ({endpoint['state']})"
            )
        deadline = time.monotonic() + 5
        for name, host in site.hosts.items():
            key = (VNI, vm.mac)
            while time.monotonic() < deadline and (
                host.agent.placement.get(key) != dest
                or host.agent.applied.get(key) != endpoint["seq"]
            ):
                time.sleep(0.05)
            held, seq = host.agent.placement.get(key), host.agent.applied.get(key)
            if held != dest or seq != endpoint["seq"]:
                problems.append(
                    f"{vm.name}: NVE {name} holds it at {held} seq {seq}, the directory at "
                    f"{dest} seq {endpoint['seq']}"
                )
    for name, host in site.hosts.items():
        if host.agent.errors:
            problems.append(f"NVE agent {name} lost its directory watch {host.agent.errors} times")
    return problems


def render(
    results: list[Result], vms: int, downtime_ms: float, rate: int, timeline: bool = False
) -> str:
    lines = []
    for r in results:
        lines.append(
            f"== {r.directory} directory: {vms} VMs leaving {SOURCE} at once "
            f"(paused {downtime_ms:g} ms each; 2 streams x {rate} pps per VM) =="
        )
        lines.append(
            probe.format_table(
                r.vms,
                [
                    ("vm", "VM"),
                    ("to", "to"),
                    ("paused_ms", "paused ms"),
                    ("tunnel_ms", "pause->tunnel ms"),
                    ("tunnel_first", "tunnel before resume"),
                    ("commit_ms", "resume->commit+acks ms"),
                    ("sent", "sent"),
                    ("lost_while_paused", "lost while paused"),
                    ("lost_after_resume", "lost after resume"),
                    ("lost", "lost in total"),
                    ("duplicates", "dup"),
                    ("reordered", "reord"),
                    ("held", "held"),
                    ("hold_armed_ms", "hold armed, ms after pause"),
                    ("held_extra_ms_max", "held +ms max"),
                    ("black_hole_ms", "black-hole ms"),
                    ("converged", "converged"),
                ],
            )
        )
        lines.append("")
    summary = [
        {
            "directory": r.directory,
            "vms": len(r.vms),
            "window_s": f"{r.window_s:.2f}",
            "events": f"{r.reports - len(r.failed_reports)}/{r.reports} ok",
            "converged": "all" if all(v["converged"] for v in r.vms) else "NOT ALL",
            "lost_while_paused": sum(v["lost_while_paused"] for v in r.vms),
            "lost_after_resume": r.lost_after_resume,
            "lost_total": r.lost_total,
            "dup": sum(v["duplicates"] for v in r.vms),
            "reord": sum(v["reordered"] for v in r.vms),
            "max_black_hole_ms": f"{max(v['black_hole_ms'] for v in r.vms):.1f}",
            "late_tunnel_loss": (
                f"{sum(v['lost_after_resume'] for v in r.vms if not v['tunnel_first'])}"
                f" / {sum(not v['tunnel_first'] for v in r.vms)} VMs"
            ),
            "late_hold_loss": (
                f"{sum(v['lost_while_paused'] for v in r.vms if _late(v['hold_armed_ms']))}"
                f" / {sum(_late(v['hold_armed_ms']) for v in r.vms)} VMs"
            ),
            "checks": "all pass" if not r.problems else f"{len(r.problems)} FAILED",
        }
        for r in results
    ]
    lines.append(
        "== Summary (window = first pause to last resume; 'tunnel late': the source's "
        "in-flight tunnel came up after the VM had resumed; 'hold late': the destination "
        "armed the VM's hold after its pause) =="
    )
    lines.append(
        probe.format_table(
            summary,
            [
                ("directory", "directory"),
                ("vms", "VMs"),
                ("window_s", "window s"),
                ("events", "phase events"),
                ("converged", "converged"),
                ("lost_while_paused", "lost while paused"),
                ("lost_after_resume", "lost after resume"),
                ("lost_total", "lost in total"),
                ("dup", "dup"),
                ("reord", "reord"),
                ("max_black_hole_ms", "max black-hole ms"),
                ("late_tunnel_loss", "lost after resume / VMs, tunnel late"),
                ("late_hold_loss", "lost while paused / VMs, hold late"),
                ("checks", "journal/directory/NVE checks"),
            ],
        )
    )
    for r in results:
        if timeline and r.timeline:
            lines.append(
                f"\n== {r.directory}: stage timeline, ms after each phase's event: "
                "median (max) over the migrations =="
            )
            lines.append(
                probe.format_table(
                    r.timeline,
                    [
                        ("phase", "phase"),
                        ("role", "role"),
                        ("stage", "stage"),
                        ("runs", "runs"),
                        ("start", "started at"),
                        ("took", "took"),
                    ],
                )
            )
    for r in results:
        for text in r.failed_reports + r.problems:
            lines.append(f"PROBLEM ({r.directory}): {text}")
    return "\n".join(lines)


def _load() -> str:
    return " / ".join(f"{x:.1f}" for x in os.getloadavg())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vms", type=int, default=20)
    parser.add_argument(
        "--directory",
        choices=[*DIRECTORIES, "both", "all"],
        default="all",
        help="both: embedded and etcd (agents on etcd directly); all: the three",
    )
    parser.add_argument("--etcd-members", type=int, default=1)
    parser.add_argument("--downtime-ms", type=float, default=100.0)
    parser.add_argument("--rate", type=int, default=200, help="pps of each probe stream")
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--observe", type=float, default=2.0)
    parser.add_argument("--hold", type=float, default=3.0, help="[stage_hold_timer] hold_time")
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="[pipeline] workers (default: the product's own, as an operator runs it)",
    )
    parser.add_argument(
        "--frames-hold-ms",
        type=int,
        default=1000,
        help="[linux_nve] hold_ms: longest a destination NVE holds a frame for a VM",
    )
    parser.add_argument(
        "--switchover-gate",
        type=float,
        default=0.0,
        metavar="S",
        help="resume a VM only once the source handled SWITCHOVER, waiting at most S "
        "seconds (QEMU's pause-before-switchover); 0: do not wait, as libvirt by default",
    )
    parser.add_argument(
        "--timeline",
        action="store_true",
        help="also print each stage's start and duration per phase (where the time goes)",
    )
    parser.add_argument("--probe-hub", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.probe_hub:
        return probe_hub(args.probe_hub)
    if os.geteuid() != 0:
        print("the evacuation benchmark builds network namespaces: run it as root")
        return 2
    logging.basicConfig(level=logging.ERROR)
    directories = {"both": ["embedded", "etcd"], "all": DIRECTORIES}.get(
        args.directory, [args.directory]
    )
    started_load = _load()
    results = []
    etcd = LocalEtcdCluster(args.etcd_members) if directories != ["embedded"] else None
    with etcd if etcd is not None else contextlib.nullcontext():
        for directory in directories:
            print(f"-- {directory}: building the lab with {args.vms} VMs ...", flush=True)
            conf = make_conf(args.hold, args.workers, frames_hold_ms=args.frames_hold_ms)
            with evacuation_site(conf, directory, args.vms, etcd) as site:
                print(f"-- {directory}: evacuating {SOURCE} ...", flush=True)
                results.append(
                    evacuate(
                        site,
                        args.downtime_ms,
                        args.rate,
                        args.warmup,
                        args.observe,
                        args.switchover_gate,
                    )
                )
    print()
    print(render(results, args.vms, args.downtime_ms, args.rate, args.timeline))
    print(
        f"\nMachine: {len(os.sched_getaffinity(0))} CPUs; load average {started_load} before, "
        f"{_load()} after (1/5/15 min). The lab, both orchestrators' hosts, the agents, the "
        "probe hub and etcd all share it."
    )
    bad = [r for r in results if r.lost_after_resume or r.failed_reports or r.problems]
    bad += [r for r in results if not all(v["converged"] for v in r.vms)]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
