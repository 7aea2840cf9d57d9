"""The OVN demo: one lab, the same migration in each mode, a side-by-side report.

Modes (each migrates its own VM, placed alike, ch1 -> ch2, under the same
probe streams from a peer on the source chassis and one on a third):

* ``ovn``: OVN alone as Neutron (ML2/OVN) configures it. At PREPARE
  ``requested-chassis="src,dst"`` + ``activation-strategy=rarp`` and the
  destination's port plugged (Nova's pre_live_migration); the guest resumes
  and QEMU sends its RARPs (+0, 50, 200, 450, 800 ms); Neutron activates the
  destination's binding (``requested-chassis=dst``) ``neutron_delay_s``
  later, after Nova's post-migration, and the source's port is unplugged.
* ``ovn-garp-guest``: the same with a guest that announces by GARP only
  (vhost-user/DPDK guests without QEMU's RARP): OVN 23.03 activates on RARP
  only, so the port stays blocked until Neutron's activation.
* ``orchestrated`` (and ``orchestrated-garp-guest``, with the GARP-only
  guest): the same hypervisor steps, QEMU's RARPs included, plus
  this project's pipeline on every chassis through the ``ovn`` host driver
  and the OVN Northbound directory: prestage with a per-chassis barrier,
  the flows-installed barrier at the destination, the announcer injecting
  RARP + GARP + NA from the VM's port, the commit at RESUMED and
  per-chassis convergence.

Figures per mode: per stream (sent, lost while paused, lost after resume,
duplicates, black-hole ms), per-chassis convergence (ms from resume until
each chassis applied the move: Chassis_Private.nb_cfg), RESUMED -> first
injected announcement, barrier waits.

Entry point for ``vmm lab demo --backend ovn``: :func:`run_demo`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

from oslo_config import cfg

from vmm_kernel.netns import socket_in
from vmm_lab.linux import probe
from vmm_lab.ovn import lab as lab_mod
from vmm_orchestrator import engine, frames, options
from vmm_orchestrator.contracts import HostSpec
from vmm_orchestrator.errors import VmmError
from vmm_orchestrator.journal import Journal
from vmm_orchestrator.model import Migration, MigrationEvent, Phase, Role, Vif, Workload
from vmm_orchestrator.options import require
from vmm_ovn import options as ovn_opts
from vmm_ovn.directory import OvnNbDirectory
from vmm_ovn.host import OvnHost

LOG = logging.getLogger(__name__)

MODE_OVN = "ovn"
MODE_GARP_GUEST = "ovn-garp-guest"
MODE_ORCHESTRATED = "orchestrated"
MODE_ORCH_GARP_GUEST = "orchestrated-garp-guest"
#: Ablation: the pipeline without the switch at pause (activation by the
#: announcer's injected RARP at RESUMED only).
MODE_ORCH_NO_SWITCH = "orchestrated-no-switch"
MODES = (MODE_OVN, MODE_GARP_GUEST, MODE_ORCHESTRATED, MODE_ORCH_GARP_GUEST)
ALL_MODES = (*MODES, MODE_ORCH_NO_SWITCH)
ORCHESTRATED_MODES = (MODE_ORCHESTRATED, MODE_ORCH_GARP_GUEST, MODE_ORCH_NO_SWITCH)
GARP_GUEST_MODES = (MODE_GARP_GUEST, MODE_ORCH_GARP_GUEST)

VNI = 1001
SOURCE, DESTINATION = "ch1", "ch2"
#: QEMU's self-announce: RARPs at these offsets (ms) after the guest resumed.
QEMU_RARP_MS = (0, 50, 200, 450, 800)
#: The pipeline on OVN hosts (the core's stages over the OVN services).
STAGES = [
    "nva_prestage",
    "nve_prepare",
    "announce",
    "nve_plug",
    "peer_update",
    "inflight_tunnel",
    "hold_timer",
]


@dataclasses.dataclass
class Settings:
    rate: int = 200
    warmup_s: float = 1.0
    downtime_ms: float = 150.0
    observe_s: float = 2.5
    neutron_delay_s: float = 1.0
    port: int = 9000
    modes: tuple[str, ...] = MODES


@dataclasses.dataclass
class ModeResult:
    mode: str
    vm: str
    streams: list[probe.StreamReport]
    downtime_ms: float
    convergence_ms: dict[str, float | None]
    first_announce_ms: float | None
    plug_to_installed_ms: float
    claim_to_installed_ms: float | None
    barrier: dict[str, Any]
    announce: dict[str, Any] | None
    timeline: list[dict[str, Any]]
    errors: list[str]

    @property
    def lost_after_resume(self) -> int:
        return sum(s.lost_after_resume for s in self.streams)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["lost_after_resume"] = self.lost_after_resume
        return out


# -- the guest's and QEMU's frames ---------------------------------------------


def _send_frames(
    netns: str, link: str, offsets_ms: Sequence[int], build: list[bytes], start: float
) -> None:
    """Send ``build`` from inside the guest at each offset after ``start`` (QEMU / guest)."""
    with socket_in(netns, socket.AF_PACKET, socket.SOCK_RAW, 0) as sock:
        sock.bind((link, 0))
        for offset in offsets_ms:
            left = start + offset / 1000.0 - time.monotonic()
            if left > 0:
                time.sleep(left)
            for frame in build:
                with contextlib.suppress(OSError):
                    sock.send(frame)


# -- probes ----------------------------------------------------------------------


class Probes:
    """Receivers in the VM and a peer, senders in the peers and in the VM (the guest talks)."""

    def __init__(
        self, lab: lab_mod.OvnLab, vm: lab_mod.Vm, peers: list[lab_mod.Vm], port: int
    ) -> None:
        self.lab, self.vm, self.peers, self.port = lab, vm, peers, port
        self.procs: list[subprocess.Popen[str]] = []
        self.receivers: list[subprocess.Popen[str]] = []
        self.recv_out: list[str] = []
        self.send_out: dict[str, str] = {}
        self.work = os.path.join(lab.workdir, f"probe-{vm.name}")
        os.makedirs(self.work, exist_ok=True)

    def _recv(self, netns: str, addr: str, tag: str) -> None:
        out = os.path.join(self.work, f"recv-{tag}.json")
        proc = self.lab.popen(
            netns, sys.executable, "-m", "vmm_lab.linux.probe", "recv",
            "--bind", addr, "--port", str(self.port), "--out", out, stdout=subprocess.PIPE,
        )  # fmt: skip
        self.receivers.append(proc)
        self.recv_out.append(out)
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if "ready" not in line:
            raise lab_mod.LabError(f"probe receiver {addr} did not start: {line!r}")

    def _send(self, netns: str, dst: str, stream: str, rate: int, start_at: float) -> None:
        """A sender that runs until SIGTERM, its first packet at ``start_at``."""
        out = os.path.join(self.work, f"send-{stream}.json")
        self.send_out[stream] = out
        self.procs.append(
            self.lab.popen(
                netns,
                sys.executable,
                "-m",
                "vmm_lab.linux.probe",
                "send",
                "--dst",
                dst,
                "--port",
                str(self.port),
                "--rate",
                str(rate),
                "--stream",
                stream,
                "--out",
                out,
                "--start-at",
                f"{start_at:.6f}",
                stdout=subprocess.PIPE,
            )
        )

    def start(self, rate: int) -> float:
        """Receivers, then senders; returns the common start instant (every sender
        is ready before it, so the streams really begin together)."""
        vm, talk_to = self.vm, self.peers[-1]
        self._recv(vm.netns, vm.ipv4, "v4")
        self._recv(vm.netns, vm.ipv6, "v6")
        self._recv(talk_to.netns, talk_to.ipv4, "out")
        start_at = time.monotonic() + 3.0
        for peer in self.peers:
            self._send(peer.netns, vm.ipv4, f"{peer.name}-v4", rate, start_at)
            self._send(peer.netns, vm.ipv6, f"{peer.name}-v6", rate, start_at)
        self._send(vm.netns, talk_to.ipv4, f"{vm.name}-out-v4", rate, start_at)
        for proc in self.procs:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            if "ready" not in line:
                raise lab_mod.LabError(f"probe sender did not start: {line!r}")
        if time.monotonic() > start_at:
            raise lab_mod.LabError("probe senders took over 3 s to start (machine overloaded?)")
        time.sleep(max(0.0, start_at - time.monotonic()))
        return start_at

    def finish(self, paused_at: float, resumed_at: float) -> list[probe.StreamReport]:
        for proc in self.procs:
            proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            proc.wait(timeout=60)
        time.sleep(0.2)
        for proc in self.receivers:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=10)
        received: list[probe.Recv] = []
        for path in self.recv_out:
            received.extend(probe.load_recv_log(path))
        start_ns, end_ns = int(paused_at * 1e9), int(resumed_at * 1e9)
        return [
            probe.analyze(probe.load_send_log(path), received, start_ns, end_ns)
            for _, path in sorted(self.send_out.items())
        ]

    def kill(self) -> None:
        for proc in self.procs + self.receivers:
            if proc.poll() is None:
                proc.kill()
                with contextlib.suppress(Exception):
                    proc.wait(timeout=5)


# -- the orchestrated site -----------------------------------------------------


class Orchestrators:
    """The ``ovn`` host driver and a pipeline per chassis, the NB directory shared."""

    def __init__(self, conf: cfg.ConfigOpts, lab: lab_mod.OvnLab) -> None:
        require(conf, ovn_opts.GROUP, "the OVN lab's orchestrators")
        self.directory = OvnNbDirectory(lab.nb, lab.sb)
        self.hosts: dict[str, OvnHost] = {}
        self.dispatchers: dict[str, engine.Dispatcher] = {}
        try:
            for name, ch in lab.chassis.items():
                spec = HostSpec(
                    name=name,
                    vtep=ch.ip,
                    vnis=(VNI,),
                    netns=ch.netns,
                    journal=os.path.join(lab.workdir, f"journal-{name}.sqlite"),
                    extra={"ovsdb_connection": ch.db, "openflow_target": ch.openflow},
                )
                host = OvnHost(conf, spec, self.directory)
                self.hosts[name] = host
                host.start()
                stages = engine.load_stages(conf, STAGES)
                conf.set_override("hold_time", 0.2, group="stage_hold_timer")
                pipeline = engine.Pipeline(conf, host.context, Journal(spec.journal), stages=stages)
                self.dispatchers[name] = engine.Dispatcher(pipeline)
        except BaseException:
            self.close()
            raise

    def submit(self, host: str, migration: Migration, phase: Phase, role: Role, at: float) -> Any:
        return self.dispatchers[host].submit(MigrationEvent(migration, phase, role, at))

    def close(self) -> None:
        for d in self.dispatchers.values():
            with contextlib.suppress(Exception):
                d.close()
        for h in self.hosts.values():
            with contextlib.suppress(Exception):
                h.stop()
        with contextlib.suppress(Exception):
            self.directory.close()


# -- one migration ---------------------------------------------------------------


_LOG_TIME = "%Y-%m-%dT%H:%M:%S.%fZ"


def claim_to_installed_ms(lab: lab_mod.OvnLab, chassis: str, lsp: str) -> float | None:
    """From ovn-controller's own log on ``chassis``: ms from its last "Claiming lport"
    of ``lsp`` to the "Setting lport ... ovn-installed" that followed (the
    destination's flows for the port were acknowledged by OVS)."""
    import datetime

    path = os.path.join(lab.chassis[chassis].dir, "ovn-controller.log")
    claimed = installed = None
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                stamp = line.split("|", 1)[0]
                if f"Claiming lport {lsp} " in line:
                    claimed, installed = stamp, None
                elif f"Setting lport {lsp} ovn-installed" in line and claimed and not installed:
                    installed = stamp
    except OSError:
        return None
    if not (claimed and installed):
        return None
    t0 = datetime.datetime.strptime(claimed, _LOG_TIME)
    t1 = datetime.datetime.strptime(installed, _LOG_TIME)
    return round((t1 - t0).total_seconds() * 1000.0, 1)


def _wait_installed(lab: lab_mod.OvnLab, chassis: str, port: str, timeout: float = 10.0) -> float:
    """What Nova waits for before migrating (network-vif-plugged): the port's flows
    are in. Returns ovn-controller's ovn-installed-ts (wall clock, s)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = lab.chassis[chassis].vsctl(
            "--if-exists", "get", "Interface", port, "external_ids:ovn-installed",
            "external_ids:ovn-installed-ts",
        )  # fmt: skip
        values = [v.strip().strip('"') for v in out.split()]
        if len(values) == 2 and values[0] == "true" and values[1].isdigit():
            return int(values[1]) / 1000.0
        time.sleep(0.01)
    raise lab_mod.LabError(f"port {port} on {chassis} not installed after {timeout}s")


def _sb_progress(lab: lab_mod.OvnLab) -> dict[str, tuple[int, float]]:
    out = lab.sbctl(
        "--format=json", "--columns=name,nb_cfg,nb_cfg_timestamp", "list", "Chassis_Private"
    )
    data = json.loads(out)["data"]
    return {row[0]: (int(row[1]), int(row[2]) / 1000.0) for row in data}


def _convergence(
    lab: lab_mod.OvnLab, revision: int, since_wall: float, timeout: float = 5.0
) -> dict[str, float | None]:
    """ms from ``since_wall`` until each chassis applied nb_cfg ``revision``."""
    deadline = time.monotonic() + timeout
    while True:
        progress = _sb_progress(lab)
        if all(cfg_ >= revision for cfg_, _ in progress.values()) or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    return {
        name: round((ts - since_wall) * 1000.0, 1) if cfg_ >= revision else None
        for name, (cfg_, ts) in sorted(progress.items())
    }


def _timeline(reports: list[engine.PhaseReport]) -> list[dict[str, Any]]:
    return [
        {
            "phase": rep.phase.value,
            "host": rep.host,
            "stage": t.stage,
            "start_ms": round(t.started_offset_ms, 2),
            "duration_ms": round(t.duration_ms, 2),
            "outcome": t.outcome,
        }
        for rep in reports
        for t in rep.timeline
    ]


def run_mode(
    conf: cfg.ConfigOpts,
    lab: lab_mod.OvnLab,
    mode: str,
    vm_name: str,
    settings: Settings,
    orch: Orchestrators | None,
) -> ModeResult:
    """Migrate ``vm_name`` ch1 -> ch2 under probe traffic in ``mode``."""
    vm = lab.vms[vm_name]
    peers = [lab.vms[n] for n in sorted(lab.vms) if n in ("vm2", "vm3")]
    vif = Vif(mac=vm.mac, vni=VNI, ipv4=(vm.ipv4,), ipv6=(vm.ipv6,), port=vm.name)
    migration = Migration(
        id=f"{vm.name}-{secrets.token_hex(3)}",
        workload=Workload(vm.name, (vif,)),
        source=SOURCE,
        destination=DESTINATION,
    )
    orchestrated = mode in ORCHESTRATED_MODES
    errors: list[str] = []
    reports: list[engine.PhaseReport] = []
    probes = Probes(lab, vm, peers, settings.port)
    threads: list[threading.Thread] = []
    try:
        start_at = probes.start(settings.rate)
        # PREPARE: the destination's port is plugged (Nova's pre_live_migration),
        # multi-chassis binding with rarp activation (Neutron, or our prestage).
        prepare_at = time.monotonic()
        if not orchestrated:
            lab.nbctl(
                "set", "Logical_Switch_Port", vm.lsp,
                f'options:requested-chassis="{SOURCE},{DESTINATION}"',
                "options:activation-strategy=rarp",
            )  # fmt: skip
        plugged_wall = time.time()
        port = lab.preplug(vm, DESTINATION)
        if orchestrated:
            assert orch is not None
            rep = orch.submit(
                DESTINATION, migration, Phase.PREPARE, Role.DESTINATION, prepare_at
            ).result(60)
            reports.append(rep)
        installed_wall = _wait_installed(lab, DESTINATION, port)
        plug_to_installed_ms = round((installed_wall - plugged_wall) * 1000.0, 1)
        claim_ms = claim_to_installed_ms(lab, DESTINATION, vm.lsp)
        time.sleep(max(0.0, start_at + settings.warmup_s - time.monotonic()))
        # SWITCHOVER: the guest stops at the source.
        paused_at = lab.pause(vm)
        pending = []
        if orchestrated:
            assert orch is not None
            orch.hosts[SOURCE].nve.switch_at_pause = mode != MODE_ORCH_NO_SWITCH
            pending.append(orch.submit(SOURCE, migration, Phase.SWITCHOVER, Role.SOURCE, paused_at))
        time.sleep(max(0.0, paused_at + settings.downtime_ms / 1000.0 - time.monotonic()))
        # RESUMED: the guest runs at the destination; QEMU announces (RARP), or
        # the guest itself (GARP only) in the garp-guest mode.
        resumed_at = lab.resume(vm)
        resumed_wall = time.time() - (time.monotonic() - resumed_at)
        link = vm.pending[1] if vm.pending else vm.link
        if mode in GARP_GUEST_MODES:
            build = [frames.gratuitous_arp_request(vm.mac, vm.ipv4)]
        else:
            build = [frames.rarp(vm.mac)]
        t = threading.Thread(
            target=_send_frames, args=(vm.netns, link, QEMU_RARP_MS, build, resumed_at), daemon=True
        )
        t.start()
        threads.append(t)
        if orchestrated:
            assert orch is not None
            pending.append(
                orch.submit(DESTINATION, migration, Phase.RESUMED, Role.DESTINATION, resumed_at)
            )
        observe_until = resumed_at + settings.observe_s
        # Post-migration: Neutron activates the destination's binding (OVN alone),
        # and the source's port is unplugged; the orchestrator's commit was at RESUMED.
        time.sleep(max(0.0, resumed_at + settings.neutron_delay_s - time.monotonic()))
        if orchestrated:
            assert orch is not None
            completed_at = time.monotonic()
            reports.extend(f.result(60) for f in pending)
            reports.append(
                orch.submit(SOURCE, migration, Phase.COMPLETED, Role.SOURCE, completed_at).result(
                    60
                )
            )
            last = orch.directory.last_commit(VNI, vm.mac)
            revision = last[0] if last else 0
        else:
            lab.nbctl(
                "set", "Logical_Switch_Port", vm.lsp, f"options:requested-chassis={DESTINATION}",
                "--", "remove", "Logical_Switch_Port", vm.lsp, "options", "activation-strategy",
            )  # fmt: skip
            revision = _bump(lab)
        lab.finish(vm)
        time.sleep(max(0.0, observe_until - time.monotonic()))
        streams = probes.finish(paused_at, resumed_at)
    finally:
        probes.kill()
        for t in threads:
            t.join(timeout=5)
    convergence = _convergence(lab, revision, resumed_wall)
    errors += [f"{r.phase.value} on {r.host}: {r.error}" for r in reports if not r.ok]
    first = None
    barrier: dict[str, Any] = {}
    announce = None
    if orchestrated:
        assert orch is not None
        for rep in reports:
            for tm in rep.timeline:
                if tm.notes.get("first_frame_monotonic") is not None:
                    first = round(
                        (float(tm.notes["first_frame_monotonic"]) - resumed_at) * 1000.0, 2
                    )
        dest = orch.hosts[DESTINATION].chassis
        waits = [b for b in dest.barriers if b.mac == vm.mac]
        history = orch.hosts[DESTINATION].announcers.for_vni(VNI).history
        mine = [h for h in history if h.vif.mac == vm.mac]
        announce = mine[-1].snapshot() if mine else None
        barrier = {
            "waits_ms": [b.waited_ms for b in waits],
            "ok": [b.ok for b in waits],
            "prepare_wait_ms": waits[0].waited_ms if waits else None,
        }
    return ModeResult(
        mode=mode,
        vm=vm.name,
        streams=streams,
        downtime_ms=round((resumed_at - paused_at) * 1000.0, 1),
        convergence_ms=convergence,
        first_announce_ms=first,
        plug_to_installed_ms=plug_to_installed_ms,
        claim_to_installed_ms=claim_ms,
        barrier=barrier,
        announce=announce,
        timeline=_timeline(reports),
        errors=errors,
    )


def _bump(lab: lab_mod.OvnLab) -> int:
    """What ``ovn-nbctl --wait=hv`` does first: NB_Global.nb_cfg + 1 (the revision to watch)."""
    cur = int(lab.nbctl("get", "NB_Global", ".", "nb_cfg").strip())
    lab.nbctl("--no-wait", "set", "NB_Global", ".", f"nb_cfg={cur + 1}")
    return cur + 1


# -- report --------------------------------------------------------------------


def render(results: list[ModeResult]) -> str:
    lines = ["== Probe streams (OVN lab, vmX ch1 -> ch2) =="]
    rows = [
        {
            "mode": r.mode,
            "stream": s.stream,
            "sent": s.sent,
            "paused": s.lost_while_paused,
            "after": s.lost_after_resume,
            "dup": s.duplicates,
            "bh": f"{s.black_hole_ms:.1f}" + ("" if s.converged else " (never)"),
        }
        for r in results
        for s in r.streams
    ]
    lines.append(
        probe.format_table(
            rows,
            [
                ("mode", "mode"),
                ("stream", "stream"),
                ("sent", "sent"),
                ("paused", "lost while paused"),
                ("after", "lost after resume"),
                ("dup", "dup"),
                ("bh", "black-hole ms"),
            ],
        )
    )
    lines += [
        "",
        "== Per-chassis convergence: ms from resume until the chassis applied the move (nb_cfg) ==",
    ]
    chassis = sorted({c for r in results for c in r.convergence_ms})
    conv = [
        {
            "chassis": c,
            **{
                r.mode: "never" if r.convergence_ms.get(c) is None else f"{r.convergence_ms[c]:.1f}"
                for r in results
            },
        }
        for c in chassis
    ]
    lines.append(
        probe.format_table(conv, [("chassis", "chassis")] + [(r.mode, r.mode) for r in results])
    )
    lines += ["", "== Summary =="]
    summary = []
    for r in results:
        bh = [s.black_hole_ms for s in r.streams]
        summary.append(
            {
                "mode": r.mode,
                "paused": f"{r.downtime_ms:.1f}",
                "after": r.lost_after_resume,
                "dup": sum(s.duplicates for s in r.streams),
                "bh": f"{max(bh):.1f}" if bh else "-",
                "first": "-" if r.first_announce_ms is None else f"{r.first_announce_ms:.1f}",
                "installed": f"{r.plug_to_installed_ms:.1f}",
                "claim": "-"
                if r.claim_to_installed_ms is None
                else f"{r.claim_to_installed_ms:.1f}",
                "barrier": "-"
                if not r.barrier
                else ", ".join(f"{w:.1f}" for w in r.barrier.get("waits_ms", [])),
            }
        )
    lines.append(
        probe.format_table(
            summary,
            [
                ("mode", "mode"),
                ("paused", "paused ms"),
                ("after", "lost after resume"),
                ("dup", "dup"),
                ("bh", "max black-hole ms"),
                ("first", "RESUMED->1st GARP ms"),
                ("installed", "plug->installed ms"),
                ("claim", "claim->installed ms"),
                ("barrier", "barrier waits ms"),
            ],
        )
    )
    for r in results:
        if r.timeline:
            lines += ["", f"== Pipeline timeline ({r.mode}) =="]
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
        if r.announce:
            a = r.announce
            lines.append(
                f"announcer ({r.mode}): {a['rounds_sent']}/{a['rounds_total']} rounds, "
                f"{a['frames_sent']} frames from port {a['port']}, errors: {a['errors'] or 'none'}"
            )
        for err in r.errors:
            lines.append(f"ERROR ({r.mode}): {err}")
    return "\n".join(lines)


def parse_modes(value: str | Sequence[str] | None) -> tuple[str, ...]:
    """``"ovn,orchestrated"`` (or a list) -> checked modes; VmmError naming the bad one."""
    if value is None:
        return MODES
    items = value.split(",") if isinstance(value, str) else list(value)
    modes = tuple(m.strip() for m in items if m.strip())
    unknown = [m for m in modes if m not in ALL_MODES]
    if unknown or not modes:
        raise VmmError(
            f"unknown OVN demo mode(s): {', '.join(unknown) or '(none given)'}",
            hint=f"choose from {', '.join(ALL_MODES)}",
        )
    return modes


def run_demo(
    conf: cfg.ConfigOpts | None = None,
    json_out: str | None = None,
    modes: str | Sequence[str] | None = None,
    rate: int | None = None,
    downtime_ms: float | None = None,
    settings: Settings | None = None,
) -> int:
    """``vmm lab demo --backend ovn``: every mode on one lab; 0 only if the
    orchestrated run lost nothing after resume and had no stage error.

    ``modes`` (comma-separated or a list; default all of MODES), ``rate``
    (probe packets/s per stream) and ``downtime_ms`` override ``settings``.
    Raises VmmError (LabError) with a hint when OVN/OVS is not installed.
    """
    if conf is None:
        conf = options.new_conf()
    settings = dataclasses.replace(settings or Settings(), modes=parse_modes(modes))
    if rate is not None:
        settings = dataclasses.replace(settings, rate=int(rate))
    if downtime_ms is not None:
        settings = dataclasses.replace(settings, downtime_ms=float(downtime_ms))
    results = run_all(conf, settings)
    print(render(results))
    if json_out:
        with open(json_out, "w", encoding="utf-8") as fh:
            json.dump([r.to_dict() for r in results], fh, indent=2, default=str)
    judged = (MODE_ORCHESTRATED, MODE_ORCH_GARP_GUEST)  # not the ablation
    bad = [r for r in results if r.mode in judged and (r.lost_after_resume or r.errors)]
    for r in bad:
        print(
            f"\nFAIL: {r.mode} lost {r.lost_after_resume} packet(s) after resume",
            file=sys.stderr,
        )
    return 1 if bad else 0


def run_all(conf: cfg.ConfigOpts, settings: Settings) -> list[ModeResult]:
    """One lab: a migrating VM per mode (vm1, vm4, vm5 ...) on ch1, peers vm2 (ch1), vm3 (ch3)."""
    movers = {mode: f"vm{4 + i}" if i else "vm1" for i, mode in enumerate(settings.modes)}
    placement = [("vm1", SOURCE), ("vm2", SOURCE), ("vm3", "ch3")]
    placement += [(name, SOURCE) for name in movers.values() if name != "vm1"]
    results = []
    with lab_mod.ovn_lab(vms=placement, vni=VNI) as lab:
        wanted = set(ORCHESTRATED_MODES) & set(settings.modes)
        orch = Orchestrators(conf, lab) if wanted else None
        try:
            for mode in settings.modes:
                print(
                    f"-- mode {mode!r}: migrating {movers[mode]} {SOURCE} -> {DESTINATION} ...",
                    flush=True,
                )
                results.append(run_mode(conf, lab, mode, movers[mode], settings, orch))
        finally:
            if orch is not None:
                orch.close()
    return results


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    sys.exit(run_demo(json_out=sys.argv[1] if len(sys.argv) > 1 else None))
