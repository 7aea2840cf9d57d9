"""The libvirt event source and the agent against real libvirt.

* libvirt's test driver in-process (test:///default) for the event plumbing;
* a private libvirtd started for these tests: session mode, run as user
  nobody with HOME/XDG dirs in a temp dir, under ``tini -s`` (so that QEMU
  processes are reaped at once), driving real QEMU (TCG) domains without disk
  or kernel. Nothing of the machine's own libvirt is touched; the daemon,
  its QEMU processes and the directory are removed however a test ends.

What is checked: real lifecycle events normalized in order; the connection
lost when libvirtd dies (close callback) or hangs (keepalive); reconnection
with backoff, callbacks registered again (events flow after it) and
reconciliation (a domain created while disconnected is in the snapshot);
the announcers against a real QEMU (announce-self accepted; the absent guest
agent falls back with libvirt's VIR_ERR_AGENT_UNRESPONSIVE); the agent's
hook path with the real relay script, the real nva_prestage stage and
directory; journal recovery that locates a VM through libvirt.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from oslo_config import cfg

from vmm_orchestrator.options import new_conf

libvirt = pytest.importorskip("libvirt", reason="libvirt-python is not installed")

from vmm_libvirt import events, phases  # noqa: E402
from vmm_libvirt.announcers import LibvirtAnnounce  # noqa: E402
from vmm_libvirt.daemon import HostAgent, HostSpec, LibvirtDomains  # noqa: E402
from vmm_orchestrator import journal as jr  # noqa: E402
from vmm_orchestrator.journal import Journal  # noqa: E402
from vmm_orchestrator.model import Migration, Phase, Role, Vif, Workload  # noqa: E402
from vmm_orchestrator.nva.store import NvaStore  # noqa: E402
from vmm_orchestrator.stage import HostContext, Stage, StageContext  # noqa: E402
from vmm_orchestrator.stages import NvaPrestage, PeerUpdate  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
RELAY = ROOT / "etc/libvirt/hooks/qemu.d/vmm-orchestrator"
NOBODY = 65534
QEMU = "/usr/bin/qemu-system-x86_64"

L = phases.Lifecycle
E = phases.Event


def need(*paths: str) -> None:
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (libvirt-daemon, qemu-system-x86, tini)")


# -- collecting what a source hands its handler --------------------------------------------


class Collector:
    """The handler of a source: keeps every item and lets a test wait for one."""

    def __init__(self) -> None:
        self.items: list[events.Item] = []
        self._cond = threading.Condition()

    def __call__(self, item: events.Item) -> None:
        with self._cond:
            self.items.append(item)
            self._cond.notify_all()

    def wait(self, match: Callable[[events.Item], bool], timeout: float = 10.0) -> events.Item:
        end = time.monotonic() + timeout
        with self._cond:
            while True:
                for item in self.items:
                    if match(item):
                        return item
                left = end - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no matching item within {timeout} s: {self.items}")
                self._cond.wait(left)

    def lifecycle(self, name: str) -> list[phases.Lifecycle]:
        with self._cond:
            return [
                i.signal
                for i in self.items
                if isinstance(i, events.DomainSignal)
                and i.name == name
                and isinstance(i.signal, phases.Lifecycle)
            ]


def signal_of(name: str, want: phases.Signal) -> Callable[[events.Item], bool]:
    return lambda i: isinstance(i, events.DomainSignal) and i.name == name and i.signal == want


# -- a private libvirtd --------------------------------------------------------------------


class PrivateLibvirtd:
    """A session-mode libvirtd owned by nobody, everything under one temp dir."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="vmmlv", dir="/tmp"))
        self.dir.chmod(0o755)
        self.home = self.dir / "home"
        self.run = self.dir / "run"
        self.config = self.home / ".config"
        for path in (self.home, self.run, self.config / "libvirt"):
            path.mkdir(parents=True, exist_ok=True)
        # No virtlogd: QEMU's output goes to a file.
        (self.config / "libvirt" / "qemu.conf").write_text('stdio_handler = "file"\n')
        # Its own host UUID: libvirt refuses to migrate between hosts with the same one.
        (self.config / "libvirt" / "libvirtd.conf").write_text(f'host_uuid = "{uuid.uuid4()}"\n')
        for path in (self.home, self.run):
            for sub in [path, *path.rglob("*")]:
                os.chown(sub, NOBODY, NOBODY)
        self.run.chmod(0o700)
        self.socket = self.run / "libvirt" / "libvirt-sock"
        self.proc: subprocess.Popen[bytes] | None = None

    def uri(self, driver: str = "qemu", path: str = "/session", socket: Path | None = None) -> str:
        return f"{driver}+unix://{path}?socket={socket or self.socket}"

    def start(self, timeout: float = 15.0) -> None:
        env = {
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": str(self.home),
            "XDG_RUNTIME_DIR": str(self.run),
            "XDG_CONFIG_HOME": str(self.config),
            "XDG_CACHE_HOME": str(self.home / ".cache"),
        }
        command = ["tini", "-s", "--", "setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}"]
        log = open(self.dir / "libvirtd.log", "ab")
        self.proc = subprocess.Popen(
            [*command, "--clear-groups", "libvirtd"],
            env=env,
            cwd=self.dir,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
        )
        log.close()
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"libvirtd exited: {self.log_tail()}")
            if self.socket.exists():
                with contextlib.suppress(libvirt.libvirtError):
                    libvirt.open(self.uri()).close()
                    return
            time.sleep(0.05)
        raise RuntimeError(f"libvirtd did not answer within {timeout} s: {self.log_tail()}")

    def libvirtd_pid(self) -> int:
        return int((self.run / "libvirt" / "libvirtd.pid").read_text().strip())

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Kill libvirtd itself (its QEMU processes live on, as after a crash)."""
        os.kill(self.libvirtd_pid(), sig)
        if sig in (signal.SIGKILL, signal.SIGTERM) and self.proc is not None:
            self.proc.wait(10)
            self.proc = None

    def log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return (self.dir / "libvirtd.log").read_text()[-2000:]
        return ""

    def our_processes(self) -> list[int]:
        """PIDs of processes whose command line names our directory (libvirtd, QEMU)."""
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            with contextlib.suppress(OSError):
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
                if str(self.dir).encode() in cmdline:
                    found.append(int(entry))
        return found

    def cleanup(self) -> None:
        with contextlib.suppress(Exception):
            conn = libvirt.open(self.uri())
            for dom in conn.listAllDomains(0):
                with contextlib.suppress(libvirt.libvirtError):
                    if dom.isActive():
                        dom.destroy()
                with contextlib.suppress(libvirt.libvirtError):
                    dom.undefine()
            conn.close()
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        with contextlib.suppress(OSError, ValueError):
            os.kill(self.libvirtd_pid(), signal.SIGKILL)
        for pid in self.our_processes():  # QEMUs of a killed libvirtd
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def libvirtd() -> Iterator[PrivateLibvirtd]:
    need("/usr/sbin/libvirtd", QEMU, "/usr/bin/tini", "/usr/bin/setpriv")
    daemon = PrivateLibvirtd()
    try:
        daemon.start()
        yield daemon
    finally:
        daemon.cleanup()
    assert not daemon.our_processes(), "processes of the private libvirtd left behind"


def domain_xml(name: str, uuid: str) -> str:
    """A tiny TCG guest: no disk, no kernel (SeaBIOS finds nothing to boot and waits)."""
    return f"""
<domain type='qemu'>
  <name>{name}</name>
  <uuid>{uuid}</uuid>
  <memory unit='MiB'>32</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <cpu mode='custom'><model>qemu64</model></cpu>
  <devices>
    <emulator>{QEMU}</emulator>
    <interface type='user'><mac address='52:54:00:aa:00:01'/><model type='virtio'/></interface>
    <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>
  </devices>
</domain>"""


UUID1 = "6c1f5e62-2b0c-4e43-9d7a-0a0b0c0d0e01"
UUID2 = "6c1f5e62-2b0c-4e43-9d7a-0a0b0c0d0e02"


@pytest.fixture
def source_factory() -> Iterator[Callable[..., tuple[events.LibvirtEventSource, Collector]]]:
    started: list[events.LibvirtEventSource] = []

    def make(uri: str, **kw: Any) -> tuple[events.LibvirtEventSource, Collector]:
        collector = Collector()
        source = events.LibvirtEventSource(uri, collector, **kw)
        source.start()
        started.append(source)
        return source, collector

    yield make
    for source in started:
        source.stop()


# -- the test driver: event plumbing --------------------------------------------------------


def test_test_driver_events_are_normalized_in_order(source_factory: Any) -> None:
    source, got = source_factory("test:///default")
    snap = got.wait(lambda i: isinstance(i, events.Reconciled))
    assert isinstance(snap, events.Reconciled)
    assert [(d.name, d.observed.active, d.observed.state) for d in snap.domains] == [
        ("test", True, phases.STATE_RUNNING)
    ]
    dom = source.connection().lookupByName("test")
    dom.suspend()
    dom.resume()
    dom.destroy()
    dom.create()
    got.wait(signal_of("test", L(E.STARTED, 0)))
    assert got.lifecycle("test") == [
        L(E.SUSPENDED, 0),
        L(E.RESUMED, 0),
        L(E.STOPPED, 1),
        L(E.STARTED, 0),
    ]
    assert [str(s) for s in got.lifecycle("test")] == [
        "SUSPENDED/PAUSED",
        "RESUMED/UNPAUSED",
        "STOPPED/DESTROYED",
        "STARTED/BOOTED",
    ]
    # One process-wide libvirt loop, whatever the number of sources.
    source_factory("test:///default")[1].wait(lambda i: isinstance(i, events.Reconciled))
    loops = [t for t in threading.enumerate() if t.name == "libvirt-event-loop"]
    assert len(loops) == 1
    # None of these is a migration: the phase rules decide nothing.
    tracker = phases.Tracker()
    assert all(not tracker.apply("u", s).transitions for s in got.lifecycle("test"))


def test_a_failing_handler_does_not_stop_the_source(source_factory: Any) -> None:
    seen: list[events.Item] = []

    def handler(item: events.Item) -> None:
        seen.append(item)
        raise RuntimeError("boom")

    source = events.LibvirtEventSource("test:///default", handler)
    source.start()
    try:
        end = time.monotonic() + 5
        while not any(isinstance(i, events.Reconciled) for i in seen) and time.monotonic() < end:
            time.sleep(0.02)
        source.connection().lookupByName("test").suspend()
        while not any(isinstance(i, events.DomainSignal) for i in seen) and time.monotonic() < end:
            time.sleep(0.02)
        assert [type(i).__name__ for i in seen] == ["Connected", "Reconciled", "DomainSignal"]
    finally:
        source.stop()


# -- a real libvirtd and QEMU ---------------------------------------------------------------


def test_qemu_lifecycle_events(libvirtd: PrivateLibvirtd, source_factory: Any) -> None:
    source, got = source_factory(libvirtd.uri(), keepalive_interval=1, keepalive_count=3)
    got.wait(lambda i: isinstance(i, events.Reconciled))
    conn = source.connection()
    dom = conn.defineXML(domain_xml("life", UUID1))
    dom.create()
    dom.suspend()
    dom.resume()
    dom.destroy()
    dom.undefine()
    got.wait(signal_of("life", L(E.UNDEFINED, 0)))
    # Measured with libvirt 9.0 / QEMU 7.2: QEMU starts with its vCPUs stopped, so
    # libvirt's RESUMED/UNPAUSED comes *before* STARTED/BOOTED; destroy kills QEMU,
    # which reports a host-initiated shutdown before libvirt's STOPPED/DESTROYED.
    assert [str(s) for s in got.lifecycle("life")] == [
        "DEFINED/ADDED",
        "RESUMED/UNPAUSED",
        "STARTED/BOOTED",
        "SUSPENDED/PAUSED",
        "RESUMED/UNPAUSED",
        "SHUTDOWN/HOST",
        "STOPPED/DESTROYED",
        "UNDEFINED/REMOVED",
    ]
    signals = [i for i in got.items if isinstance(i, events.DomainSignal)]
    assert {i.uuid for i in signals} == {UUID1}
    assert all(a.monotonic <= b.monotonic for a, b in itertools.pairwise(signals))


# -- the switchover pause against an operator's pause, on a real migration ---------------
#
# Two private libvirtds (distinct host UUIDs) migrate the tiny guest to each other
# over loopback, peer to peer. Each has its event source feeding a phases.Tracker
# built from the defaults, exactly as a HostAgent does, and every decision is kept.


class Decisions:
    """The handler of one host's source: a Tracker with the defaults, and what it decided."""

    def __init__(self, host: str) -> None:
        conf = new_conf()
        self.host = host
        self.tracker = phases.Tracker(conf.libvirt.early_switchover)
        self.items: list[events.DomainSignal] = []
        #: (monotonic, phase, why) of every transition, in order.
        self.transitions: list[tuple[float, Phase, str]] = []
        self._cond = threading.Condition()

    def __call__(self, item: events.Item) -> None:
        if not isinstance(item, events.DomainSignal):
            return
        decision = self.tracker.apply(item.uuid, item.signal)
        with self._cond:
            self.items.append(item)
            self.transitions += [(item.monotonic, t.phase, t.why) for t in decision.transitions]
            self._cond.notify_all()

    def wait(self, match: Callable[[events.DomainSignal], bool], timeout: float = 20.0) -> float:
        """Monotonic time of the first matching item."""
        with self._cond:
            found: list[float] = []

            def seen() -> bool:
                found[:] = [i.monotonic for i in self.items if match(i)][:1]
                return bool(found)

            assert self._cond.wait_for(seen, timeout), f"{self.host}: not seen in {self.items}"
            return found[0]

    def decided(self) -> list[Phase]:
        with self._cond:
            return [phase for _, phase, _ in self.transitions]

    def progress(self) -> list[phases.JobProgress]:
        with self._cond:
            return [i.signal for i in self.items if isinstance(i.signal, phases.JobProgress)]


def lifecycle(event: phases.Event, detail: int) -> Callable[[events.DomainSignal], bool]:
    return lambda i: i.signal == L(event, detail)


def progress_after(moment: float) -> Callable[[events.DomainSignal], bool]:
    return lambda i: isinstance(i.signal, phases.JobProgress) and i.monotonic > moment


@pytest.fixture
def pair() -> Iterator[tuple[PrivateLibvirtd, PrivateLibvirtd]]:
    need("/usr/sbin/libvirtd", QEMU, "/usr/bin/tini", "/usr/bin/setpriv")
    daemons = [PrivateLibvirtd(), PrivateLibvirtd()]
    try:
        for daemon in daemons:
            daemon.start()
        yield daemons[0], daemons[1]
    finally:
        for daemon in daemons:
            daemon.cleanup()
    for daemon in daemons:
        assert not daemon.our_processes(), "processes of a private libvirtd left behind"


MIGRATE_FLAGS = libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_PEER2PEER


def migrate_async(
    src: PrivateLibvirtd, dst: PrivateLibvirtd, bandwidth_mib_s: int | None = None
) -> tuple[threading.Thread, list[BaseException]]:
    """Start a peer-to-peer live migration of domain UUID1 from ``src`` to ``dst`` over
    loopback, on a connection of its own (as virsh migrate would): the test's own calls
    (suspend, abort) must not queue behind it."""
    params: dict[str, Any] = {libvirt.VIR_MIGRATE_PARAM_URI: "tcp://127.0.0.1"}
    if bandwidth_mib_s is not None:
        params[libvirt.VIR_MIGRATE_PARAM_BANDWIDTH] = bandwidth_mib_s
    errors: list[BaseException] = []
    conn = libvirt.open(src.uri())

    def run() -> None:
        try:
            conn.lookupByUUIDString(UUID1).migrateToURI3(dst.uri(), params, MIGRATE_FLAGS)
        except libvirt.libvirtError as exc:
            errors.append(exc)
        finally:
            conn.close()

    thread = threading.Thread(target=run, name="migrate", daemon=True)
    thread.start()
    return thread, errors


def wait_sent(dom: Any, min_bytes: int, timeout: float = 20.0) -> None:
    """Until the outgoing migration job of ``dom`` has sent ``min_bytes``."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with contextlib.suppress(libvirt.libvirtError):
            stats = dom.jobStats()
            if stats.get("type") == libvirt.VIR_DOMAIN_JOB_UNBOUNDED:
                if stats.get("data_processed", 0) >= min_bytes:
                    return
        time.sleep(0.01)
    raise AssertionError(f"no migration job sending {min_bytes} bytes within {timeout} s")


def test_defaults_switch_over_at_the_real_pause_and_not_at_an_operators_pause(
    pair: tuple[PrivateLibvirtd, PrivateLibvirtd],
) -> None:
    a, b = pair
    seen = {"a": Decisions("a"), "b": Decisions("b")}
    assert seen["a"].tracker.early_switchover  # the default
    sources = {}
    for name, daemon in (("a", a), ("b", b)):
        # The operator's pauses below must be judged by QEMU's figures, not by how fast a
        # loaded test machine answers: a generous wait (the "busy" answer of a real
        # final copy is the libvirt integration test's).
        source = events.LibvirtEventSource(daemon.uri(), seen[name], name=name, final_copy_wait=1.0)
        source.start()
        sources[name] = source
    try:
        for source in sources.values():
            end = time.monotonic() + 10
            while not source.connected and time.monotonic() < end:
                time.sleep(0.05)
        conn_a = libvirt.open(a.uri())
        conn_b = libvirt.open(b.uri())
        conn_a.createXML(domain_xml("mig", UUID1))
        seen["a"].wait(lifecycle(E.STARTED, 0))

        # 1. A plain live migration a -> b: SWITCHOVER at the pause, before the job completed.
        thread, errors = migrate_async(a, b)
        thread.join(60)
        assert not errors, errors
        stopped = seen["a"].wait(lifecycle(E.STOPPED, phases.STOPPED_MIGRATED))
        seen["a"].wait(lambda i: isinstance(i.signal, phases.JobCompleted))
        src = seen["a"]
        assert src.decided() == [Phase.SWITCHOVER, Phase.COMPLETED], src.transitions
        at, _, why = src.transitions[0]
        assert "the switchover (early)" in why, why  # from the job's statistics ...
        assert at < stopped  # ... at the pause, not at the completion
        progress = src.progress()
        assert progress and progress[-1].final, progress
        print(f"\nreal pause: {progress}; switchover {1000 * (stopped - at):.0f} ms before STOPPED")
        assert seen["b"].decided() == [Phase.PREPARE, Phase.RESUMED]

        # 2. b -> a at 1 MiB/s, paused by the operator: no SWITCHOVER at that pause; it comes
        # once, when the migration really switches over (a later job read or its completion).
        dom_b = conn_b.lookupByName("mig")
        dom_b.migrateSetMaxDowntime(20, 0)  # QEMU's test: what is left must fit in 20 ms
        thread, errors = migrate_async(b, a, bandwidth_mib_s=1)
        wait_sent(dom_b, 64 * 1024)
        paused_at = time.monotonic()
        dom_b.suspend()
        seen["b"].wait(progress_after(paused_at))
        first = seen["b"].progress()[0]
        assert first.active and not first.final, first
        print(f"operator's pause: {first}")
        time.sleep(0.3)
        assert seen["b"].decided() == [Phase.PREPARE, Phase.RESUMED]  # nothing new on b
        sped_up = at = time.monotonic()
        dom_b.migrateSetMaxSpeed(10000, 0)
        thread.join(60)
        assert not errors, errors
        seen["b"].wait(lambda i: isinstance(i.signal, phases.JobCompleted) and i.monotonic > at)
        late = seen["b"].transitions[2:]
        assert [p for _, p, _ in late] == [Phase.SWITCHOVER, Phase.COMPLETED], late
        assert late[0][0] > sped_up, late
        seen["a"].wait(lifecycle(E.RESUMED, phases.RESUMED_MIGRATED))  # it runs on a

        # 3. a -> b at 1 MiB/s, paused by the operator, then aborted: libvirt resumes the VM
        # on a (RESUMED/MIGRATED); nothing had run for that migration, nothing to undo.
        before = seen["a"].decided()
        dom_a = conn_a.lookupByName("mig")
        dom_a.migrateSetMaxDowntime(20, 0)
        thread, errors = migrate_async(a, b, bandwidth_mib_s=1)
        wait_sent(dom_a, 64 * 1024)
        paused_at = time.monotonic()
        dom_a.suspend()
        seen["a"].wait(progress_after(paused_at))
        assert not seen["a"].progress()[-1].final, seen["a"].progress()
        dom_a.abortJob()
        thread.join(60)
        assert errors, "the aborted migration did not fail"
        resumed = seen["a"].wait(
            lambda i: i.signal == L(E.RESUMED, phases.RESUMED_MIGRATED) and i.monotonic > paused_at
        )
        assert resumed > paused_at
        assert seen["a"].decided() == before, seen["a"].transitions
        assert seen["a"].tracker.get(UUID1) == phases.Track()
        assert dom_a.state()[0] == libvirt.VIR_DOMAIN_RUNNING
        conn_a.close()
        conn_b.close()
    finally:
        for source in sources.values():
            source.stop()


def test_which_items_the_job_statistics_follow() -> None:
    """After the pause of an outgoing migration, and after its iterations while it stays
    paused (also when a reconciliation found it paused); never otherwise."""
    source = events.LibvirtEventSource("test:///default", lambda item: None)

    def item(signal: phases.Signal, uuid: str = UUID1) -> events.DomainSignal:
        return events.DomainSignal("test:///default", uuid, "vm", signal, time.monotonic())

    wants = source._wants_progress
    assert not wants(item(phases.Iteration(1)))
    assert wants(item(L(E.SUSPENDED, phases.SUSPENDED_MIGRATED)))
    assert wants(item(phases.Iteration(2)))
    assert not wants(item(phases.Iteration(2), UUID2))
    assert not wants(item(L(E.DEFINED, 0)))
    assert wants(item(phases.Iteration(3)))  # DEFINED changes nothing
    assert not wants(item(L(E.RESUMED, phases.RESUMED_MIGRATED)))
    assert not wants(item(phases.Iteration(4)))
    assert not wants(item(L(E.SUSPENDED, 0)))  # a pause outside a migration
    observed = phases.Observed(
        True, phases.STATE_PAUSED, phases.PAUSED_MIGRATION, phases.JOB_MIGRATION_OUT
    )
    reconciled = events.Reconciled(
        "test:///default",
        (events.DomainInfo(UUID2, "vm2", observed, None),),
        time.monotonic(),
        1,
    )
    assert not wants(reconciled)
    assert wants(item(phases.Iteration(7), UUID2))
    assert not wants(events.Disconnected("test:///default", "end of file", time.monotonic()))
    assert not wants(item(phases.Iteration(8), UUID2))


def test_a_job_read_that_qemu_does_not_answer_in_time_says_busy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The dispatcher waits final_copy_wait for the job's statistics, then says "busy"
    (the final copy's signature) and leaves the read to finish on its own. The slow
    read here is a stand-in (a sleeping function in place of QEMU holding its lock):
    the real one is the libvirt integration test's in-flight tunnel before the RARP."""
    source = events.LibvirtEventSource("test:///default", lambda item: None, final_copy_wait=0.02)
    source._conn = object()
    answer = phases.JobProgress(True, remaining=1, bps=1, max_downtime_ms=300)
    finished = threading.Event()

    def slow(_conn: Any, _uuid: str) -> phases.JobProgress:
        time.sleep(0.3)
        finished.set()
        return answer

    monkeypatch.setattr(events, "read_job_progress", slow)
    started = time.monotonic()
    busy = source._job_progress(UUID1)
    waited = time.monotonic() - started
    assert busy == phases.JobProgress(True, busy_ms=20) and busy.final, busy
    assert waited < 0.25 and not finished.is_set(), waited  # it did not wait for QEMU
    assert finished.wait(2)  # the read itself went on and ended

    monkeypatch.setattr(events, "read_job_progress", lambda _c, _u: answer)
    assert source._job_progress(UUID1) == answer  # answered in time: QEMU's figures

    def broken(_conn: Any, _uuid: str) -> phases.JobProgress:
        raise libvirt.libvirtError("no job")

    monkeypatch.setattr(events, "read_job_progress", broken)
    assert source._job_progress(UUID1) is None  # a libvirt error: nothing to decide on


def test_reconnect_with_backoff_reregisters_and_reconciles(
    libvirtd: PrivateLibvirtd, source_factory: Any
) -> None:
    """libvirtd dies; a domain appears while the source cannot connect; it is reconciled."""
    link = libvirtd.dir / "sock-link"  # the source's way in: removing it keeps it out
    link.symlink_to(libvirtd.socket)
    direct = libvirt.open(libvirtd.uri())
    direct.createXML(domain_xml("early", UUID1))
    direct.close()
    source, got = source_factory(
        libvirtd.uri(socket=link),
        keepalive_interval=1,
        keepalive_count=2,
        initial_delay=0.1,
        max_delay=0.4,
    )
    first = got.wait(lambda i: isinstance(i, events.Reconciled))
    assert isinstance(first, events.Reconciled)
    assert [d.name for d in first.domains] == ["early"]

    killed = time.monotonic()
    libvirtd.kill(signal.SIGKILL)
    lost = got.wait(lambda i: isinstance(i, events.Disconnected), timeout=10)
    assert isinstance(lost, events.Disconnected)
    detected = lost.monotonic - killed
    assert detected < 3.0, f"a dead libvirtd went unnoticed for {detected:.2f} s"
    link.unlink()
    libvirtd.start()
    direct = libvirt.open(libvirtd.uri())
    direct.createXML(domain_xml("late", UUID2))  # nobody is watching
    direct.close()
    attempts_before = source.attempts
    time.sleep(1.0)  # the source keeps trying, backing off
    tried = source.attempts - attempts_before
    assert 2 <= tried <= 6, f"{tried} attempts in 1 s with 0.1 s doubling to 0.4 s"
    link.symlink_to(libvirtd.socket)

    again = got.wait(lambda i: isinstance(i, events.Reconciled) and i.generation == 2)
    assert isinstance(again, events.Reconciled)
    seen = {d.name: d.observed for d in again.domains}
    assert set(seen) == {"early", "late"}  # QEMU of "early" outlived libvirtd
    assert seen["late"].active and seen["late"].state == phases.STATE_RUNNING
    # Callbacks are registered again: events of the new connection arrive.
    source.connection().lookupByName("late").suspend()
    got.wait(signal_of("late", L(E.SUSPENDED, 0)))
    logging.getLogger(__name__).info(
        "dead libvirtd noticed after %.3f s; %d reconnect attempts while it was away",
        detected,
        tried,
    )


def test_keepalive_notices_a_hung_libvirtd(libvirtd: PrivateLibvirtd, source_factory: Any) -> None:
    source, got = source_factory(
        libvirtd.uri(), keepalive_interval=1, keepalive_count=1, initial_delay=0.1, max_delay=0.2
    )
    got.wait(lambda i: isinstance(i, events.Reconciled))
    pid = libvirtd.libvirtd_pid()
    stopped = time.monotonic()
    os.kill(pid, signal.SIGSTOP)  # alive but silent: only keepalive can tell
    try:
        lost = got.wait(lambda i: isinstance(i, events.Disconnected), timeout=20)
    finally:
        os.kill(pid, signal.SIGCONT)
    assert isinstance(lost, events.Disconnected)
    assert lost.reason == "keepalive timeout"
    # interval 1 s x (count 1 + 1) = 2 s nominal; the bound only says keepalive, not
    # a TCP timeout (minutes), noticed it, with room for a loaded CI machine.
    assert lost.monotonic - stopped < 10.0
    got.wait(lambda i: isinstance(i, events.Reconciled) and i.generation == 2, timeout=20)
    assert source.connected


# -- announcers against a real QEMU ----------------------------------------------------------


def stage_conf(**overrides: Any) -> cfg.ConfigOpts:
    conf = new_conf()
    LibvirtAnnounce(conf)  # registers [stage_libvirt_announce]
    for key, value in overrides.items():
        conf.set_override(key, value, group="stage_libvirt_announce")
    return conf


def announce_ctx(source: events.LibvirtEventSource, name: str) -> StageContext:
    vif = Vif("52:54:00:aa:00:01", 100, ("10.0.0.5",), (), None)
    migration = Migration("m-1", Workload(name, (vif,)), "a", "b")
    host = HostContext("b", nva=None, services={"libvirt": LibvirtDomains(source)})
    return StageContext(migration, Phase.RESUMED, Role.DESTINATION, host, time.monotonic() + 5)


def test_absent_guest_agent_falls_back_to_qmp_announce_self(
    libvirtd: PrivateLibvirtd, source_factory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    source, got = source_factory(libvirtd.uri())
    got.wait(lambda i: isinstance(i, events.Reconciled))
    source.connection().createXML(domain_xml("ann", UUID1))
    caplog.set_level(logging.WARNING, logger="vmm_libvirt.announcers")

    stage = LibvirtAnnounce(stage_conf(strategy="first", agent_wait=0.3))
    ctx = announce_ctx(source, "ann")
    began = time.monotonic()
    record = stage.run(ctx)
    took = time.monotonic() - began

    agent, qmp = record["methods"]
    assert (agent["method"], agent["ok"], agent["absent"]) == ("guest_agent", False, True)
    assert agent["detail"].startswith(
        "guest agent not usable after 0.3 s (VIR_ERR_AGENT_UNRESPONSIVE"
    )
    assert "not connected" in agent["detail"]
    assert 0.2 <= took < 1.5  # waited (up to 0.3 s) for the agent, then fell back
    assert (qmp["method"], qmp["ok"]) == ("qmp", True)
    assert "falling back to qmp" in caplog.text
    assert "VIR_ERR_AGENT_UNRESPONSIVE" in caplog.text
    assert ctx.notes["announce"] == {"guest_agent": agent["detail"], "qmp": "ok"}


def test_no_working_method_fails_only_with_fail_if_none(
    libvirtd: PrivateLibvirtd, source_factory: Any
) -> None:
    from vmm_orchestrator.errors import StageFailed

    source, got = source_factory(libvirtd.uri())
    got.wait(lambda i: isinstance(i, events.Reconciled))
    source.connection().defineXML(domain_xml("off", UUID2))  # defined, not running
    record = LibvirtAnnounce(stage_conf(methods=["qmp"])).run(announce_ctx(source, "off"))
    (qmp,) = record["methods"]
    assert not qmp["ok"] and "VIR_ERR_OPERATION_INVALID" in qmp["detail"]
    stage = LibvirtAnnounce(stage_conf(methods=["qmp", "guest_agent"], fail_if_none=True))
    with pytest.raises(StageFailed, match="no announcement method worked for off: qmp: QMP"):
        stage.run(announce_ctx(source, "off"))


# -- the agent: hook path, recovery -----------------------------------------------------------

MAC = "52:54:00:aa:00:01"


def agent_conf(tmp: Path) -> cfg.ConfigOpts:
    conf = new_conf()
    conf.set_override("hook_timeout", 1.5, group="agent")
    conf.set_override("reconnect_initial_delay", 0.1, group="libvirt")
    conf.set_override("bridge_vnis", {"virbr-lab": "100"}, group="libvirt")
    return conf


def bridged_xml(name: str, uuid: str) -> str:
    """What a hook sees: the incoming domain's XML, with a NIC on a managed bridge."""
    user_nic = f"<interface type='user'><mac address='{MAC}'/><model type='virtio'/></interface>"
    return domain_xml(name, uuid).replace(
        user_nic,
        f"<interface type='bridge'><mac address='{MAC}'/><source bridge='virbr-lab'/>"
        "<target dev='tap-vm'/></interface>",
    )


@pytest.fixture
def agent_site(libvirtd: PrivateLibvirtd) -> Iterator[dict[str, Any]]:
    """Hosts as HostAgents on the private libvirtd, sharing one in-process directory.

    NVEs a and b serve VNI 100, c only VNI 200; the VM's NIC (MAC, VNI 100) is at a.
    ``make(name, stages)`` builds a host (default stages: the real nva_prestage), each
    with its own journal and hook socket.
    """
    tmp = Path(tempfile.mkdtemp(prefix="vmmag", dir="/tmp"))
    store = NvaStore(":memory:")
    for name, vtep, vni in (
        ("a", "192.0.2.1", 100),
        ("b", "192.0.2.2", 100),
        ("c", "192.0.2.3", 200),
    ):
        store.register_nve(name, vtep, [vni])
    store.add_endpoint(100, MAC, ["10.0.0.5"], [], "a")
    conf = agent_conf(tmp)
    journals: dict[str, Journal] = {}
    agents: list[HostAgent] = []

    def make(name: str = "b", stages: list[Any] | None = None) -> HostAgent:
        spec = HostSpec(
            name, libvirtd.uri(), "192.0.2.9", (100,), None, str(tmp / f"{name}.sock"), ""
        )
        journals[name] = Journal(str(tmp / f"journal-{name}.sqlite"))
        context = HostContext(name, nva=store)
        chosen = [NvaPrestage(conf)] if stages is None else stages
        agent = HostAgent(conf, spec, context, journals[name], stages=chosen)
        agents.append(agent)
        return agent

    try:
        yield {
            "make": make,
            "store": store,
            "journals": journals,
            "tmp": tmp,
            "relay_conf": tmp / "relay.conf",
            "libvirtd": libvirtd,
        }
    finally:
        for agent in agents:
            agent.stop()
        for journal in journals.values():
            journal.close()
        store.close()
        shutil.rmtree(tmp, ignore_errors=True)


def local_api(path: str, request: dict[str, Any]) -> dict[str, Any]:
    """One request to the agent's local API (the hook socket)."""
    import json
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(path)
        sock.sendall(json.dumps(request).encode() + b"\n")
        sock.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    answer: dict[str, Any] = json.loads(data)
    return answer


def relay(site: dict[str, Any], socket: str, xml: str, op: str, sub_op: str) -> Any:
    site["relay_conf"].write_text(f"[hook_relay]\nsocket = {socket}\ndeadline = 2\n")
    return subprocess.run(
        [str(RELAY), "vm", op, sub_op, "-"],
        input=xml.encode(),
        capture_output=True,
        env={
            "PATH": "/usr/bin:/bin",
            "VMM_HOOK_CONFIG": str(site["relay_conf"]),
            # no lock directory: notifications are delivered before the relay exits
            "VMM_HOOK_LOCK": str(site["tmp"] / "no-lock" / "hook.lock"),
            "VMM_HOOK_PYC": str(site["tmp"] / "relay.pyc"),
        },
        timeout=20,
        check=False,
    )


def test_hook_runs_prepare_and_allows_then_release_aborts(agent_site: dict[str, Any]) -> None:
    agent = agent_site["make"]("b")
    agent.start()
    agent.reconciled.wait(10)
    xml = bridged_xml("vm", UUID1)

    began = time.monotonic()
    result = relay(agent_site, agent.spec.hook_socket, xml, "migrate", "begin")
    took = time.monotonic() - began
    assert result.returncode == 0, result.stderr
    assert result.stdout == xml.encode()  # passed through unchanged
    endpoint = agent_site["store"].get_endpoint(100, MAC)
    assert (endpoint["state"], endpoint["pending_nve"], endpoint["nve"]) == ("pending", "b", "a")
    migration_id = endpoint["migration_id"]
    assert migration_id.startswith(f"{UUID1}-")
    record = agent_site["journals"]["b"].get(migration_id)
    assert record is not None and record.role is Role.DESTINATION
    assert record.phases[Phase.PREPARE] == jr.COMPLETED
    logging.getLogger(__name__).info("hook migrate begin -> PREPARE -> allow: %.3f s", took)
    assert agent.wait_idle(5)
    status = local_api(agent.spec.hook_socket, {"op": "status"})
    assert status["host"] == "b" and status["connected"] is True
    assert status["under_way"] == {
        UUID1: {"role": "destination", "done": ["PREPARE"], "paused": False}
    }
    assert f"migration {migration_id} PREPARE as destination: ok" in status["reports"][-1]
    # marked before the answer: the relay forwards this guest's end calls (see marks)
    assert agent.marks.marked() == ["vm"]

    # The incoming QEMU never came up: libvirt's release hook ends the attempt.
    # The relay only delivers it (no lock directory here: it does not wait for the
    # answer), so the agent may not have read it yet when the relay exits.
    result = relay(agent_site, agent.spec.hook_socket, xml, "release", "end")
    assert result.returncode == 0
    deadline = time.monotonic() + 10
    while not any(r.phase is Phase.ABORTED for r in agent.reports):
        assert time.monotonic() < deadline, "release end did not abort within 10 s"
        time.sleep(0.02)
    assert agent.wait_idle(10)
    endpoint = agent_site["store"].get_endpoint(100, MAC)
    assert (endpoint["state"], endpoint["pending_nve"]) == ("active", None)
    record = agent_site["journals"]["b"].get(migration_id)
    assert record is not None and record.status == jr.REVERTED
    assert agent.marks.marked() == []


def test_hook_vetoes_when_the_destination_cannot_take_the_network(
    agent_site: dict[str, Any],
) -> None:
    agent = agent_site["make"]("c")  # NVE c does not serve VNI 100
    agent.start()
    result = relay(agent_site, agent.spec.hook_socket, bridged_xml("vm", UUID1), "migrate", "begin")
    assert result.returncode == 1
    assert result.stdout == b""
    stderr = result.stderr.decode()
    assert stderr.startswith("vmm-orchestrator: vm: stage nva_prestage failed in PREPARE")
    assert "NVE 'c' does not serve VNI 100" in stderr
    endpoint = agent_site["store"].get_endpoint(100, MAC)
    assert (endpoint["state"], endpoint["nve"]) == ("active", "a")
    # The veto forgot the attempt: a retry prepares again (and is vetoed again).
    assert (
        relay(
            agent_site, agent.spec.hook_socket, bridged_xml("vm", UUID1), "migrate", "begin"
        ).returncode
        == 1
    )


def test_a_prepare_slower_than_the_hook_vetoes_and_is_reverted(
    agent_site: dict[str, Any],
) -> None:
    release = threading.Event()

    class Slow(Stage):
        name = "slow_prepare"
        phase = Phase.PREPARE
        role = Role.DESTINATION

        def run(self, ctx: StageContext) -> None:
            release.wait(ctx.remaining())

    conf = agent_conf(agent_site["tmp"])
    Slow.register_opts(conf)  # the test's own stage is no entry point
    agent = agent_site["make"]("b", stages=[NvaPrestage(conf), Slow(conf)])
    agent.hook_timeout = 0.3
    agent.start()
    try:
        xml = bridged_xml("vm", UUID1)
        result = relay(agent_site, agent.spec.hook_socket, xml, "migrate", "begin")
    finally:
        release.set()
    assert result.returncode == 1
    assert "did not finish within 0.3 s" in result.stderr.decode()
    assert agent.wait_idle(10)
    endpoint = agent_site["store"].get_endpoint(100, MAC)
    assert (endpoint["state"], endpoint["nve"]) == ("active", "a")  # prestage undone
    assert [(r.phase, r.ok) for r in agent.reports] == [
        (Phase.PREPARE, True),  # it did finish, too late
        (Phase.ABORTED, True),
    ]
    (migration_id,) = {r.migration_id for r in agent.reports}
    record = agent.journal.get(migration_id)
    assert record is not None and record.status == jr.REVERTED


def test_guest_exec_protocol_with_a_scripted_agent() -> None:
    """The private QEMU runs no guest agent; this plays qemu-ga's side of guest-exec."""
    import base64
    import json

    from vmm_libvirt.announcers import AgentAnnouncer

    calls: list[dict[str, Any]] = []

    def agent(_dom: Any, text: str, timeout: int) -> str:
        request = json.loads(text)
        calls.append(request)
        assert timeout >= 1
        if request["execute"] == "guest-ping":
            return json.dumps({"return": {}})
        if request["execute"] == "guest-exec":
            pid = 40 + sum(1 for c in calls if c["execute"] == "guest-exec")
            return json.dumps({"return": {"pid": pid}})
        polls = sum(1 for c in calls if c["execute"] == "guest-exec-status")
        if polls == 1:
            return json.dumps({"return": {"exited": False}})
        if request["arguments"]["pid"] == 41:  # the IPv4 arping
            return json.dumps({"return": {"exited": True, "exitcode": 0}})
        err = base64.b64encode(b"ndsend: not found").decode()
        return json.dumps({"return": {"exited": True, "exitcode": 127, "err-data": err}})

    class Dom:
        def interfaceAddresses(self, source: int) -> dict[str, Any]:
            return {"ens3": {"hwaddr": MAC.upper(), "addrs": []}}

    announcer = AgentAnnouncer(
        "arping -U -c {count} -I {iface} {ip}", "ndsend {ip} {iface}", 2, "eth0", 2.0, agent, 0.01
    )
    vif = Vif(MAC, 100, ("10.0.0.5",), ("fd00::5",), "tap-vm")
    outcome = announcer.announce(Dom(), (vif,), remaining=5.0)
    assert outcome.ok and outcome.sent == 1
    assert "ndsend for fd00::5 on ens3: exit 127: ndsend: not found" in outcome.detail
    execs = [c["arguments"] for c in calls if c["execute"] == "guest-exec"]
    assert execs == [
        {
            "path": "arping",
            "arg": ["-U", "-c", "2", "-I", "ens3", "10.0.0.5"],
            "capture-output": True,
        },
        {"path": "ndsend", "arg": ["fd00::5", "ens3"], "capture-output": True},
    ]


def test_recovery_locates_the_vm_through_libvirt(agent_site: dict[str, Any]) -> None:
    libvirtd = agent_site["libvirtd"]
    conn = libvirt.open(libvirtd.uri())
    conn.createXML(domain_xml("here", UUID1))
    conn.close()
    agent = agent_site["make"]("b", stages=[])
    # What a crash mid-PREPARE left in b's journal, for a VM that runs here and one that not.
    journal = agent.journal
    vif = Vif(MAC, 100, ("10.0.0.5",), (), "tap-vm")
    runs_here = Migration("m-here", Workload("here", (vif,)), "a", "b")
    gone = Migration("m-gone", Workload("gone", (vif,)), "a", "b")
    for migration in (runs_here, gone):
        journal.begin_migration(migration, Role.DESTINATION)
        journal.phase_started(migration.id, Phase.PREPARE)

    agent.start()
    assert agent.reconciled.wait(10)
    details = {r.migration_id: r.detail for r in agent.reports}
    assert details["m-here"] == "recovered: finished (workload runs at b)"
    # libvirt knows no "gone" here; the directory (the agent's next witness) still
    # places its MAC at the source a: the move never happened, so it is reverted.
    assert details["m-gone"] == "recovered: reverted (workload runs at a)"
    gone_record = journal.get("m-gone")
    assert gone_record is not None and gone_record.status == jr.REVERTED


def recording_stage(
    phase: Phase, role: Role, log: list[tuple[str, str, str, str]], conf: cfg.ConfigOpts
) -> Stage:
    """A stage that records (host, phase, migration id, the other end) when it runs
    (its options registered on ``conf``: it is no entry point)."""

    def run(self: Stage, ctx: StageContext) -> None:
        other = ctx.migration.source if role is Role.DESTINATION else ctx.migration.destination
        log.append((ctx.host.name, phase.value, ctx.migration.id, other))

    name = f"record_{phase.value.lower()}_{role.value}"
    attrs = {"name": name, "phase": phase, "role": role, "run": run}
    cls: type[Stage] = type(name, (Stage,), attrs)
    cls.register_opts(conf)
    return cls(conf)


def test_both_ends_agree_on_the_migration_through_the_directory(
    agent_site: dict[str, Any],
) -> None:
    """libvirt's migration events (synthetic: session libvirt cannot migrate) on two hosts
    drive PREPARE/RESUMED at b and SWITCHOVER/COMPLETED at a, with the real directory
    stages in between; both ends name the same migration and each other."""
    conf = agent_conf(agent_site["tmp"])
    peer_update = PeerUpdate(conf)
    conf.set_override("ack_timeout", 0.1, group="stage_peer_update")
    log: list[tuple[str, str, str, str]] = []
    record = {
        (p, r): recording_stage(p, r, log, conf)
        for p, r in (
            (Phase.PREPARE, Role.DESTINATION),
            (Phase.RESUMED, Role.DESTINATION),
            (Phase.SWITCHOVER, Role.SOURCE),
            (Phase.COMPLETED, Role.SOURCE),
        )
    }
    dst_stages = [NvaPrestage(conf), record[(Phase.PREPARE, Role.DESTINATION)]]
    dst_stages += [peer_update, record[(Phase.RESUMED, Role.DESTINATION)]]
    b = agent_site["make"]("b", stages=dst_stages)
    a = agent_site["make"](
        "a",
        stages=[record[(Phase.SWITCHOVER, Role.SOURCE)], record[(Phase.COMPLETED, Role.SOURCE)]],
    )
    for agent in (a, b):
        agent.start()
        assert agent.reconciled.wait(10)
    # Defined after both connected: each reads the VM's NICs from libvirt at its first event.
    conn = libvirt.open(agent_site["libvirtd"].uri())
    conn.defineXML(bridged_xml("vm", UUID1))
    conn.close()

    def deliver(agent: HostAgent, *signals: phases.Signal) -> None:
        for sig in signals:
            agent.on_item(events.DomainSignal("uri", UUID1, "vm", sig, time.monotonic()))
        assert agent.wait_idle(10)

    # The order measured on the lab for a precopy migration a -> b.
    deliver(b, L(E.STARTED, phases.STARTED_MIGRATED))
    deliver(a, phases.Iteration(1), L(E.SUSPENDED, phases.SUSPENDED_MIGRATED), phases.Iteration(2))
    assert [entry[:2] for entry in log] == [("b", "PREPARE")]  # a's pause is only a candidate
    deliver(b, L(E.DEFINED, 0), L(E.RESUMED, phases.RESUMED_MIGRATED))
    deliver(a, L(E.STOPPED, phases.STOPPED_MIGRATED), phases.JobCompleted(phases.JOB_MIGRATION_OUT))

    mid = log[0][2]
    assert log == [
        ("b", "PREPARE", mid, "a"),
        ("b", "RESUMED", mid, "a"),
        ("a", "SWITCHOVER", mid, "b"),
        ("a", "COMPLETED", mid, "b"),
    ]
    endpoint = agent_site["store"].get_endpoint(100, MAC)
    assert (endpoint["nve"], endpoint["seq"], endpoint["last_migration_id"]) == ("b", 1, mid)
    for host in ("a", "b"):
        record = agent_site["journals"][host].get(mid)
        assert record is not None and record.status == jr.DONE, host


def test_vmm_agent_refuses_an_empty_host_list(tmp_path: Path) -> None:
    config = tmp_path / "vmm.conf"
    config.write_text("[agent]\n")
    result = subprocess.run(
        [sys.executable, "-m", "vmm_orchestrator.cli", "--config-file", str(config), "agent"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("vmm: error: [agent] hosts is empty")
