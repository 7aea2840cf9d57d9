"""Announce a migrated VM through libvirt: from inside the guest (the guest
agent runs the guest's own ARP/NA tools) and from QEMU (QMP announce-self),
beside the host-side announcer of vmm_linux.

Which announcement updates what (design brief): a gratuitous ARP request
from the guest refreshes gateways' ARP tables; QEMU's announce-self sends
RARP only, which refreshes MAC learning (switches, bridges) but no IP
neighbour table; an unsolicited NA with Override refreshes IPv6 neighbours.
The guest knows its addresses best, but it may have no agent, no tools, or
an agent that is not up yet right after the switchover; QEMU always works
but is RARP only. Hence the ``libvirt_announce`` stage runs the configured
methods in order, and an absent agent (libvirt's agent error codes) falls
back to the next method with a log line that says why.

guest-exec starts the command and returns at once; guest-exec-status is
polled until the command exits (bounded by ``exec_timeout`` and the stage
deadline) so that a failing command is reported, not assumed to work.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import shlex
import time
from collections.abc import Callable
from typing import Any, ClassVar, Protocol

import libvirt
import libvirt_qemu
from oslo_config import cfg, types

from vmm_libvirt import discovery
from vmm_orchestrator.errors import StageFailed
from vmm_orchestrator.model import Phase, Role, Vif, normalize_mac
from vmm_orchestrator.stage import Stage, StageContext

LOG = logging.getLogger(__name__)

METHOD_HOST = "host"
METHOD_AGENT = "guest_agent"
METHOD_QMP = "qmp"
METHODS = (METHOD_HOST, METHOD_AGENT, METHOD_QMP)

#: libvirt errors that mean "no usable guest agent" (or no such API for this
#: driver): the announcement falls back instead of failing.
AGENT_ABSENT_ERRORS: dict[int, str] = {
    libvirt.VIR_ERR_AGENT_UNRESPONSIVE: "VIR_ERR_AGENT_UNRESPONSIVE",
    libvirt.VIR_ERR_AGENT_UNSYNCED: "VIR_ERR_AGENT_UNSYNCED",
    libvirt.VIR_ERR_OPERATION_UNSUPPORTED: "VIR_ERR_OPERATION_UNSUPPORTED",
    libvirt.VIR_ERR_ARGUMENT_UNSUPPORTED: "VIR_ERR_ARGUMENT_UNSUPPORTED",
    libvirt.VIR_ERR_NO_SUPPORT: "VIR_ERR_NO_SUPPORT",
    libvirt.VIR_ERR_OPERATION_TIMEOUT: "VIR_ERR_OPERATION_TIMEOUT",
    libvirt.VIR_ERR_OPERATION_INVALID: "VIR_ERR_OPERATION_INVALID",
}


class Domains(Protocol):
    """What the stage needs from the host: its libvirt domains by name."""

    def lookup(self, name: str) -> Any: ...


@dataclasses.dataclass
class Outcome:
    """How one method went: ``ok``, or why not (``absent``: the method is unavailable)."""

    method: str
    ok: bool
    detail: str
    absent: bool = False
    sent: int = 0


def agent_command(dom: Any, command: str, timeout: int) -> str:
    """libvirt_qemu.qemuAgentCommand with no flags: the guest agent's JSON answer."""
    answer: str = libvirt_qemu.qemuAgentCommand(dom, command, timeout, 0)
    return answer


def monitor_command(dom: Any, command: str, flags: int) -> str:
    """libvirt_qemu.qemuMonitorCommand: QMP's JSON answer."""
    answer: str = libvirt_qemu.qemuMonitorCommand(dom, command, flags)
    return answer


def _absent_reason(exc: libvirt.libvirtError) -> str | None:
    """'VIR_ERR_…: message' when ``exc`` means the agent/API is unavailable, else None."""
    name = AGENT_ABSENT_ERRORS.get(exc.get_error_code())
    return f"{name}: {exc.get_error_message()}" if name else None


class AgentAnnouncer:
    """Gratuitous ARP / unsolicited NA sent by the guest itself, through guest-exec.

    ``arp_command`` and ``na_command`` are templates with ``{ip}``,
    ``{iface}`` and ``{count}``; the guest interface comes from the agent's
    view of the guest's NICs (by MAC), else ``default_iface``.
    """

    def __init__(
        self,
        arp_command: str,
        na_command: str,
        count: int,
        default_iface: str,
        exec_timeout: float,
        agent: Callable[[Any, str, int], str] = agent_command,
        poll_interval: float = 0.05,
        agent_wait: float = 0.0,
    ) -> None:
        self.arp_command = arp_command
        self.na_command = na_command
        self.count = count
        self.default_iface = default_iface
        self.exec_timeout = exec_timeout
        self._agent = agent
        self.poll_interval = poll_interval
        self.agent_wait = agent_wait

    def wait_for_agent(self, dom: Any, deadline: float) -> float:
        """Seconds until the agent answered guest-ping; re-raises once ``agent_wait`` is over.

        Right after an incoming migration libvirt has not reconnected to the
        guest agent's channel yet (VIR_ERR_AGENT_UNRESPONSIVE "not connected"),
        although the agent runs in the guest.
        """
        start = time.monotonic()
        until = min(deadline, start + self.agent_wait)
        while True:
            try:
                self._call(dom, "guest-ping", {}, 1)
                return time.monotonic() - start
            except libvirt.libvirtError as exc:
                transient = exc.get_error_code() in (
                    libvirt.VIR_ERR_AGENT_UNRESPONSIVE,
                    libvirt.VIR_ERR_AGENT_UNSYNCED,
                )
                if not transient or time.monotonic() + self.poll_interval > until:
                    raise
            time.sleep(self.poll_interval)

    def _call(self, dom: Any, command: str, arguments: dict[str, Any], timeout: float) -> Any:
        text = json.dumps({"execute": command, "arguments": arguments})
        answer = json.loads(self._agent(dom, text, max(1, int(timeout + 0.999))))
        return answer.get("return")

    def guest_ifaces(self, dom: Any) -> dict[str, str]:
        """MAC -> guest interface name, as the agent reports them."""
        found: dict[str, str] = {}
        for name, info in (dom.interfaceAddresses(discovery.SRC_AGENT) or {}).items():
            try:
                found[normalize_mac(info.get("hwaddr") or "")] = name
            except ValueError:
                continue
        return found

    def run(self, dom: Any, argv: list[str], deadline: float) -> tuple[bool, str]:
        """Run ``argv`` in the guest; (exit code 0?, what happened)."""
        started = self._call(
            dom,
            "guest-exec",
            {"path": argv[0], "arg": argv[1:], "capture-output": True},
            deadline - time.monotonic(),
        )
        pid = started["pid"]
        while True:
            status = self._call(dom, "guest-exec-status", {"pid": pid}, deadline - time.monotonic())
            if status.get("exited"):
                code = status.get("exitcode", status.get("signal"))
                err = base64.b64decode(status.get("err-data", "") or "").decode(errors="replace")
                return code == 0, f"exit {code}" + (f": {err.strip()[:200]}" if err.strip() else "")
            if time.monotonic() + self.poll_interval > deadline:
                return False, f"still running after {self.exec_timeout:g} s"
            time.sleep(self.poll_interval)

    def announce(self, dom: Any, vifs: tuple[Vif, ...], remaining: float) -> Outcome:
        deadline = time.monotonic() + min(self.agent_wait + self.exec_timeout, remaining)
        try:
            waited = self.wait_for_agent(dom, deadline)
        except libvirt.libvirtError as exc:
            absent = _absent_reason(exc) or str(exc)
            why = f"guest agent not usable after {self.agent_wait:g} s ({absent})"
            return Outcome(METHOD_AGENT, False, why, True)
        try:
            ifaces = self.guest_ifaces(dom)
        except libvirt.libvirtError as exc:
            LOG.info("guest interfaces unknown (%s); using %s", exc, self.default_iface)
            ifaces = {}
        sent, problems = 0, []
        for vif in vifs:
            iface = ifaces.get(vif.mac, self.default_iface)
            jobs = [(self.arp_command, ip) for ip in vif.ipv4]
            jobs += [(self.na_command, ip) for ip in vif.ipv6 if self.na_command]
            for template, ip in jobs:
                argv = shlex.split(template.format(ip=ip, iface=iface, count=self.count))
                try:
                    ok, what = self.run(dom, argv, deadline)
                except libvirt.libvirtError as exc:
                    gone = _absent_reason(exc)
                    if gone and sent == 0:
                        return Outcome(
                            METHOD_AGENT, False, f"guest agent not usable ({gone})", True
                        )
                    ok, what = False, str(exc)
                if ok:
                    sent += 1
                else:
                    problems.append(f"{argv[0]} for {ip} on {iface}: {what}")
        if not sent:
            detail = "; ".join(problems) or "the VM has no address to announce"
            return Outcome(METHOD_AGENT, False, detail)
        detail = f"{sent} command(s) ran, agent answered after {waited * 1000:.0f} ms"
        if problems:
            detail += f"; failed: {'; '.join(problems)}"
        return Outcome(METHOD_AGENT, True, detail, sent=sent)


class QmpAnnouncer:
    """QEMU's announce-self (RARP from each NIC), on demand, through QMP."""

    def __init__(
        self,
        initial: int,
        max_ms: int,
        rounds: int,
        step: int,
        monitor: Callable[[Any, str, int], str] = monitor_command,
    ) -> None:
        self.params = {"initial": initial, "max": max_ms, "rounds": rounds, "step": step}
        self._monitor = monitor

    def announce(self, dom: Any, vifs: tuple[Vif, ...], remaining: float) -> Outcome:
        text = json.dumps({"execute": "announce-self", "arguments": self.params})
        try:
            answer = json.loads(self._monitor(dom, text, 0))
        except libvirt.libvirtError as exc:
            absent = _absent_reason(exc)
            return Outcome(METHOD_QMP, False, f"QMP not usable ({absent or exc})", bool(absent))
        if "error" in answer:
            return Outcome(METHOD_QMP, False, f"announce-self refused: {answer['error']}")
        return Outcome(METHOD_QMP, True, f"announce-self {self.params}", sent=len(vifs))


class HostAnnouncer:
    """The host-side announcer of vmm_linux (the host's "announcers" service)."""

    def announce(self, ctx: StageContext, vifs: tuple[Vif, ...]) -> Outcome:
        pool = ctx.host.service("announcers")
        for vif in vifs:
            pool.for_vni(vif.vni).announce(vif)
        return Outcome(METHOD_HOST, True, f"{len(vifs)} NIC(s) announced", sent=len(vifs))


class LibvirtAnnounce(Stage):
    """RESUMED, destination: announce the VM through its guest agent and QEMU.

    Runs ``methods`` in order. With ``strategy`` 'first' it stops at the
    first method that worked (a fallback chain); with 'all' it runs every
    method (repeats help: ARP is unreliable, and the guest's own announcement
    updates gateways that ignore the host's). A method that is unavailable
    is logged with the reason and the next one runs. The VM already runs
    here, so by default a failure to announce does not revert the migration.
    """

    name = "libvirt_announce"
    best_effort = True
    phase = Phase.RESUMED
    role = Role.DESTINATION
    default_deadline = 10.0
    default_attempts = 1
    opts: ClassVar[list[cfg.Opt]] = [
        cfg.ListOpt(
            "methods",
            item_type=types.String(choices=METHODS),
            default=[METHOD_AGENT, METHOD_QMP],
            help="Announcement methods in the order they run: 'guest_agent' (the guest's "
            "own arping/NA tool through guest-exec), 'qmp' (QEMU announce-self: RARP only) "
            "and 'host' (vmm_linux's host-side announcer; leave it out when the 'announce' "
            "stage runs too).",
        ),
        cfg.StrOpt(
            "strategy",
            default="all",
            choices=[
                ("all", "run every method; a failed or absent one is logged"),
                ("first", "stop at the first method that worked (fallback chain)"),
            ],
            help="Whether every method runs, or only as many as it takes for one to work.",
        ),
        cfg.BoolOpt(
            "fail_if_none",
            default=False,
            help="Fail the stage (which reverts this migration's stages on this host) "
            "when no method worked. Off by default: the VM already runs here, and the "
            "peer_update stage still moves the directory.",
        ),
        cfg.StrOpt(
            "arp_command",
            default="arping -U -c {count} -I {iface} {ip}",
            help="Guest command that sends gratuitous ARP for one IPv4 address; {ip}, "
            "{iface} and {count} are filled in. The default is busybox/iputils arping.",
        ),
        cfg.StrOpt(
            "na_command",
            default="ndsend {ip} {iface}",
            help="Guest command that sends an unsolicited Neighbor Advertisement for one "
            "IPv6 address (ndisc6's ndsend by default; busybox has none). Empty: IPv6 is "
            "left to the other methods.",
        ),
        cfg.IntOpt(
            "count",
            default=2,
            min=1,
            help="How many announcements the guest command sends per address ({count}); "
            "arping waits a second between two, inside exec_timeout.",
        ),
        cfg.StrOpt(
            "default_iface",
            default="eth0",
            help="Guest interface used when the agent does not report the NIC's name.",
        ),
        cfg.FloatOpt(
            "agent_wait",
            default=1.5,
            min=0.0,
            help="Seconds to wait for the guest agent to answer before falling back. "
            "Right after an incoming migration libvirt reports the agent as not "
            "connected until it has reopened the agent's channel.",
        ),
        cfg.FloatOpt(
            "exec_timeout",
            default=3.0,
            min=0.1,
            help="Seconds to wait for the guest commands to exit (guest-exec-status).",
        ),
        cfg.IntOpt(
            "qmp_initial",
            default=50,
            min=1,
            help="announce-self: milliseconds before the first round.",
        ),
        cfg.IntOpt(
            "qmp_max",
            default=550,
            min=1,
            help="announce-self: longest pause in milliseconds between rounds.",
        ),
        cfg.IntOpt("qmp_rounds", default=5, min=1, help="announce-self: number of rounds."),
        cfg.IntOpt(
            "qmp_step",
            default=100,
            min=1,
            help="announce-self: milliseconds added to the pause after each round.",
        ),
    ]

    def run(self, ctx: StageContext) -> dict[str, Any]:
        opts = self.options
        vifs = ctx.migration.workload.vifs
        name = ctx.migration.workload.name
        dom: Any = None
        if METHOD_AGENT in opts.methods or METHOD_QMP in opts.methods:
            dom = ctx.host.service("libvirt").lookup(name)
        outcomes: list[Outcome] = []
        for method in opts.methods:
            outcome = self._one(method, ctx, dom, vifs)
            outcomes.append(outcome)
            following = opts.methods[len(outcomes) :]
            if not outcome.ok:
                then = f"falling back to {following[0]}" if following else "no method left"
                LOG.warning(
                    "migration %s: %s announcement of %s did not work (%s); %s",
                    ctx.migration.id,
                    method,
                    name,
                    outcome.detail,
                    then,
                )
            elif opts.strategy == "first":
                break
        ctx.note(announce={o.method: ("ok" if o.ok else o.detail) for o in outcomes})
        if opts.fail_if_none and not any(o.ok for o in outcomes):
            raise StageFailed(
                f"no announcement method worked for {name}: "
                + "; ".join(f"{o.method}: {o.detail}" for o in outcomes)
            )
        return {"methods": [dataclasses.asdict(o) for o in outcomes]}

    def _one(self, method: str, ctx: StageContext, dom: Any, vifs: tuple[Vif, ...]) -> Outcome:
        opts = self.options
        if method == METHOD_HOST:
            return HostAnnouncer().announce(ctx, vifs)
        if method == METHOD_AGENT:
            agent = AgentAnnouncer(
                opts.arp_command,
                opts.na_command,
                opts.count,
                opts.default_iface,
                opts.exec_timeout,
                agent_wait=opts.agent_wait,
            )
            return agent.announce(dom, vifs, ctx.remaining())
        qmp = QmpAnnouncer(opts.qmp_initial, opts.qmp_max, opts.qmp_rounds, opts.qmp_step)
        return qmp.announce(dom, vifs, ctx.remaining())
