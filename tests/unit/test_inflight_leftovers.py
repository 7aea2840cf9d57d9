"""SWITCHOVER's in-flight tunnel moves the bridge's entry only while the tap's
leftovers are being forwarded (after their backlog), never before.

Stand-ins (named so): a recording NVE and a recording ``leftovers`` service;
the real service against a real tap is tests/functional/test_tap_leftovers.py,
and the whole path on real libvirt is test_libvirt_integration.py.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

from oslo_config import cfg

from vmm_linux.leftovers import Forwarded
from vmm_linux.stages import InflightTunnel
from vmm_orchestrator.model import Migration, Phase, Role, Vif, Workload
from vmm_orchestrator.stage import HostContext, StageContext

MAC = "52:54:00:00:00:01"


class RecordingNve:
    """Stand-in NVE: records calls; the VM's port is ``vnet7`` here."""

    def __init__(self, log: list[str]) -> None:
        self.log = log

    def ensure_vn(self, vni: int) -> None:
        pass

    def local_port(self, vni: int, mac: str) -> str | None:
        return "vnet7"

    def start_inflight(self, vni: int, mac: str, vtep: str) -> None:
        self.log.append(f"start_inflight {mac} {vtep}")


class RecordingLeftovers:
    """Stand-in ``leftovers`` service: records when forwarding begins and ends."""

    def __init__(self, log: list[str], found: bool) -> None:
        self.log, self.found = log, found

    @contextlib.contextmanager
    def forwarding(self, mac: str, port: str, device: str) -> Iterator[Forwarded]:
        self.log.append(f"forward {port} -> {device}")
        report = Forwarded(port, found=self.found, forwarded=3 if self.found else 0)
        yield report
        self.log.append("forwarding done")


class Agent:
    def vtep_of(self, nve: str) -> str:
        return "198.18.0.2"


def _run(services: dict[str, Any]) -> StageContext:
    vif = Vif(mac=MAC, vni=42, port="vnet0")
    mig = Migration("m1", Workload("vm", (vif,)), "h1", "h2")
    ctx = StageContext(
        mig, Phase.SWITCHOVER, Role.SOURCE, HostContext("h1", None, services), time.monotonic() + 5
    )
    InflightTunnel(cfg.ConfigOpts()).run(ctx)
    return ctx


def test_the_entry_moves_inside_the_forwarding_of_the_local_port() -> None:
    log: list[str] = []
    ctx = _run(
        {"nve": RecordingNve(log), "agent": Agent(), "leftovers": RecordingLeftovers(log, True)}
    )
    assert log == [
        "forward vnet7 -> vi-42",  # the NVE's port, not the workload's name for it
        f"start_inflight {MAC} 198.18.0.2",
        "forwarding done",
    ]
    assert ctx.notes["leftovers"] == {MAC: {"found": True, "forwarded": 3}}


def test_nothing_found_notes_nothing_and_no_service_still_tunnels() -> None:
    log: list[str] = []
    ctx = _run(
        {"nve": RecordingNve(log), "agent": Agent(), "leftovers": RecordingLeftovers(log, False)}
    )
    assert "leftovers" not in ctx.notes
    log.clear()
    _run({"nve": RecordingNve(log), "agent": Agent()})
    assert log == [f"start_inflight {MAC} 198.18.0.2"]


class ContractOnlyNve(RecordingNve):
    """Stand-in for an NVE with only the contract's methods (OVN's has no local_port)."""

    local_port = None  # type: ignore[assignment]


def test_an_nve_without_local_port_runs_the_stage_with_the_nics_port() -> None:
    log: list[str] = []
    ctx = _run(
        {"nve": ContractOnlyNve(log), "agent": Agent(), "leftovers": RecordingLeftovers(log, True)}
    )
    assert log[0] == "forward vnet0 -> vi-42"  # the workload's name for the port
    assert ctx.notes["leftovers"][MAC]["found"]
    log.clear()
    _run({"nve": ContractOnlyNve(log), "agent": Agent()})  # an OVN host: no leftovers
    assert log == [f"start_inflight {MAC} 198.18.0.2"]
