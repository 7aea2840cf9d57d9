"""The libvirt agent's departure watch: begun at the source's pause, ended when the
VM resumes there (an operator's pause, a failed migration), so a follow of its tap
(vmm_linux.leftovers) stops sending its frames on. A recording NVE stands in for
the Linux NVE, whose side is tests/functional/test_nve_expect.py's subject."""

from __future__ import annotations

import threading
import types
from typing import Any

from vmm_libvirt import events, phases
from vmm_libvirt.daemon import PAUSED_FOR_MIGRATION, RUNS_HERE_AGAIN, HostAgent
from vmm_orchestrator.model import Vif, Workload
from vmm_orchestrator.stage import HostContext

UUID = "6c1f5e62-2b0c-4e43-9d7a-0a0b0c0d0e02"
VIF = Vif(mac="52:54:00:00:64:0b", vni=100, ipv4=(), ipv6=(), port="vnet3")


class RecordingNve:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def watch_departure(self, vni: int, mac: str, port: str) -> None:
        self.calls.append(("watch", vni, mac, port))

    def end_departure(self, vni: int, mac: str) -> None:
        self.calls.append(("end", vni, mac))


def agent(nve: RecordingNve) -> Any:
    stub = types.SimpleNamespace(
        name="h1",
        context=HostContext("h1", None, {"nve": nve}),  # type: ignore[arg-type]
        _lock=threading.Lock(),
        _workloads={UUID: Workload(name="vm1", vifs=(VIF,))},
        _departing={},
    )
    return stub


def test_the_watch_begun_at_the_pause_ends_when_the_vm_resumes_here() -> None:
    nve = RecordingNve()
    stub = agent(nve)
    HostAgent._watch_departure(stub, UUID)
    assert nve.calls == [("watch", 100, VIF.mac, "vnet3")]
    HostAgent._end_departure(stub, UUID)
    assert nve.calls[-1] == ("end", 100, VIF.mac)
    HostAgent._end_departure(stub, UUID)  # a second RESUMED: nothing watched any more
    assert len(nve.calls) == 2


def test_a_resume_without_a_watch_ends_nothing() -> None:
    nve = RecordingNve()
    HostAgent._end_departure(agent(nve), UUID)
    assert nve.calls == []


def test_every_resume_here_but_post_copys_ends_the_watch() -> None:
    resumed = phases.Event.RESUMED
    assert phases.Lifecycle(resumed, 0) in RUNS_HERE_AGAIN  # unpaused
    assert phases.Lifecycle(resumed, phases.RESUMED_MIGRATED) in RUNS_HERE_AGAIN
    assert phases.Lifecycle(resumed, phases.RESUMED_POSTCOPY) not in RUNS_HERE_AGAIN
    assert PAUSED_FOR_MIGRATION not in RUNS_HERE_AGAIN


def test_the_event_dispatch_watches_at_the_pause_and_ends_at_the_resume() -> None:
    """Through ``on_item`` with libvirt's events of a migration whose final copy
    failed on the source (the real phase tracker; the pipeline is not run)."""
    nve = RecordingNve()
    stub = agent(nve)
    stub.tracker = phases.Tracker()
    stub._remember = lambda item: None
    stub._run = lambda *args: None
    stub._cold_start_later = lambda *args: None
    stub._watch_departure = types.MethodType(HostAgent._watch_departure, stub)
    stub._end_departure = types.MethodType(HostAgent._end_departure, stub)

    def event(signal: phases.Signal) -> None:
        HostAgent.on_item(stub, events.DomainSignal("qemu:///system", UUID, "vm1", signal, 0.0))

    event(phases.Iteration(1))  # the source's first pass
    event(PAUSED_FOR_MIGRATION)  # the final copy
    assert nve.calls == [("watch", 100, VIF.mac, "vnet3")]
    event(phases.Lifecycle(phases.Event.RESUMED, phases.RESUMED_MIGRATED))  # it failed
    assert nve.calls[-1] == ("end", 100, VIF.mac)
    assert stub._departing == {}
