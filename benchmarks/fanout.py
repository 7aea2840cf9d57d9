"""Fan-out: how long until every peer NVE has applied a move, embedded vs etcd directory.

For each directory and each number N of peer NVEs:

* embedded: ``NvaServer`` over SQLite in a process of its own, agents
  following it on one stream each (``/v1/stream``);
* etcd (the baseline): a real etcd, agents watching their VN's key prefix
  in it directly (one etcd watch per agent);
* etcd-served: the same etcd with ``vmm nva serve`` in front of it (a
  process of its own holding one etcd watch on the change log,
  :mod:`vmm_etcd.feed`), agents following that server on one stream each as
  for the embedded directory; the orchestrator talks to that server too
  (its commit and its wait for the acks), as the stages do in that
  deployment.

For each, N real ``NveAgent``s follow one VN. A VM's endpoint is
pre-staged and committed back and forth between two other NVEs (``--runs``
times), and the benchmark measures, from just before the commit:

* applied: until the last peer NVE has programmed the new location (its
  NVE's set_remote returned);
* acked: until the directory holds the last peer's acknowledgement (the
  figure the orchestrator's peer_update stage waits for);
* directory us/peer: the CPU time of the directory's processes (the
  embedded server; etcd; or the server in front of etcd plus etcd, with
  etcd's part in its own column) over the same span, divided by N;
* agents us/peer: the CPU time of the agent processes over that span
  (receiving, applying and acking the change), divided by N. Both share this
  machine's cores, so the applied time includes waiting for each other.

The agents run in ``--workers`` processes (in a real site each runs on its
own host; a thousand agent threads in one CPython process mostly measure
the GIL). The first ``--real`` peers are real hosts built the way ``vmm
agent`` builds them: each worker writes a config file for its real peers
(``[agent] hosts``, a ``[host:<name>]`` group each with the namespace's
VTEP, ``[nva]``/``[nva_etcd]`` naming the directory under test) and gets the
hosts from the composition root (:func:`vmm_orchestrator.agent.assemble`):
the Linux data plane (a bridge and a VXLAN device in their own network
namespace, programmed through netlink) and its NVE agent, with only the
NVE wrapped to time-stamp when the kernel was programmed. The other peers
stand for the many remote agents the directory fans out to and stay
simulated on purpose: the same ``NveAgent`` applying to a no-op NVE (they
are what the directory is measured against, and a thousand real hosts do
not fit on one machine); the output says how many of each. The lab's
underlay is one /24, so at most 250 real NVEs.

What the measurements led to (issue 16): py-spy of the embedded server at
1,000 peers showed its threads queueing on the store's lock (each ack woke
every long-poll; acks were one transaction each); a stream per NVE, acks on
that stream written in batches, and the agents' flood list programmed once
per batch of changes took the median from 4,504 to about 200 ms at 1,000
peers on this 2-core machine (see the report of the run for the table).
With etcd, agents watching etcd directly cost etcd a watcher and an event
encoding per agent (about 420-610 ms at 1,000 peers); the server in front
of etcd (etcd-served: one etcd watch, the same streams as the embedded
directory) brought that to about 230 ms, against 150-200 ms embedded in the
same runs. What was left of the directory's cost per peer with etcd was
etcd's: a put per ack (55-60 us of etcd CPU each through its JSON gateway,
measured alone, even 127 to a transaction) and, in the orchestrator's wait
for the acks, a read of every NVE record and ack key (about 10 us per key).
Acks are now a log of batches, one key per batch (vmm_etcd.acklog: 3-7 us
of etcd CPU per ack), and the wait reads only the records written since its
previous read: etcd's part at 1,000 peers went from about 81 to 21 us per
peer, the whole directory (server + etcd) from 128 to about 45.

etcd-served, later (72.6 us/peer at 1,000 peers, 34.2 of it etcd's; "etcd
reqs" and etcd's own byte counters per move): etcd's cost was in what its
reads returned, not in how many there were (about 5 per move). Agents ack
their first sync one by one, so every NVE had its own ack key, and the wait
for acks got all of them back on each move (~180 kB through the gateway);
the records' min_mod_revision filter still made etcd read every record; and
the wait watched etcd for the batches its own server had just written. The
wait now compares generation keys (``nvegen``, ``ackgen``) instead of reading
those ranges, takes the acks its own process wrote from memory (LocalAcks,
LogCache.remember; durable once etcd answered the write), the ack writer
gathers a move's acks for 5 ms (one write per move, not 2-3) and stores them
compressed (7.5 instead of 25 kB per 1,000). The orchestrator here talks to
the server over HTTP, as ``[nva] backend = etcd-served`` gives the stages
(before, it went to etcd directly: the server's side of its commit and its
wait was not counted, etcd's was). etcd's part at 1,000 peers: 34 -> 11-19
us per peer, 4 requests per move; see the report of the run for the table.

Fixed costs: a move costs the directory something whatever N (the commit,
the orchestrator's read of the acks, and with etcd about 1 ms of etcd CPU
per request through its gateway, 4 requests), so at 10 peers the cost
per peer is that divided by 10; "us/added peer" is the cost of one more peer
(the slope between two N). Both sides' TCP costs land where the sender is:
on loopback the kernel's receive path runs in the sender's system call (a
send of a change line costs the server about 6.5 us of system time, a recv
about 1.3), so the directory also pays for some of its agents' receiving,
and they for its.

``--profile PREFIX`` profiles the server's threads with cProfile on each
thread's CPU time (one pstats file per thread).

Run as root:  .venv/bin/python benchmarks/fanout.py --peers 10,100,1000 --real 50 --runs 3
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import itertools
import json
import logging
import math
import os
import resource
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import requests

from vmm_etcd.client import EtcdNvaClient
from vmm_etcd.cluster import LocalEtcdCluster
from vmm_etcd.kv import EtcdKV
from vmm_etcd.store import EtcdNvaStore
from vmm_lab.libvirt.agents import write_config
from vmm_lab.linux.probe import format_table
from vmm_lab.linux.topology import Lab
from vmm_linux.agent import NveAgent
from vmm_orchestrator import agent as root
from vmm_orchestrator import options
from vmm_orchestrator.errors import VmmError
from vmm_orchestrator.nva.client import NvaClient
from vmm_orchestrator.nva.server import NvaServer
from vmm_orchestrator.nva.store import NvaStore

VNI = 4242
MAC = "52:54:00:42:42:01"
WAKE_MAC = "52:54:00:42:42:ff"  # added at the end so that every agent's long-poll returns
MOVERS = {"src": "198.51.100.1", "dst": "198.51.100.2"}
MAX_REAL = 250
WATCH_TIMEOUT = 25.0  # below the embedded server's 30 s cap: idle agents re-poll rarely
WAIT_S = 120.0
#: Directories whose agents follow a `vmm nva serve` on one stream each.
SERVED = ("embedded", "etcd-served")
DIRECTORIES = ["embedded", "etcd", "etcd-served"]


# ---------------------------------------------------------------- NVE side


class Tracker:
    """Collects, per armed move, when each peer NVE programmed the new location."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._vtep: str | None = None
        self._waiting: set[str] = set()
        self.times: dict[str, float] = {}
        self._done = threading.Event()

    def arm(self, vtep: str, peers: set[str]) -> None:
        with self._lock:
            self._vtep, self._waiting, self.times = vtep, set(peers), {}
            self._done.clear()
            if not peers:
                self._done.set()

    def applied(self, nve: str, mac: str, vtep: str) -> None:
        now = time.monotonic()
        with self._lock:
            if mac == MAC and vtep == self._vtep and nve in self._waiting:
                self._waiting.discard(nve)
                self.times[nve] = now
                if not self._waiting:
                    self._done.set()

    def wait(self, timeout: float) -> bool:
        return self._done.wait(timeout)

    @property
    def missing(self) -> int:
        with self._lock:
            return len(self._waiting)


class NoopNve:
    """An NVE that programs nothing: the agent's work minus the kernel's."""

    def __init__(self, name: str, vtep: str, tracker: Tracker) -> None:
        self.name = name
        self.local_vtep = vtep
        self.tracker = tracker

    def ensure_vn(self, vni: int) -> None:
        pass

    def set_flood_list(self, vni: int, vteps: list[str]) -> None:
        pass

    def set_remote(self, vni: int, mac: str, vtep: str, ips: tuple[str, ...] = ()) -> None:
        self.tracker.applied(self.name, mac, vtep)

    def clear_remote(self, vni: int, mac: str) -> None:
        pass

    def forget(self, vni: int, mac: str) -> None:
        pass

    def inflight(self, vni: int, mac: str) -> str | None:
        return None

    def close(self) -> None:
        pass


class TrackedNve:
    """A root-built host's real NVE that reports to the tracker once the kernel is
    programmed."""

    def __init__(self, name: str, nve: Any, tracker: Tracker) -> None:
        self.name = name
        self.nve = nve
        self.tracker = tracker
        self.local_vtep = nve.local_vtep
        self.netns = nve.netns

    def set_remote(self, vni: int, mac: str, vtep: str, ips: tuple[str, ...] = ()) -> None:
        self.nve.set_remote(vni, mac, vtep, ips)
        self.tracker.applied(self.name, mac, vtep)

    def set_flood_list(self, vni: int, vteps: list[str]) -> None:
        pass  # N peers' VTEPs in every real NVE's flood list would only slow set-up

    def __getattr__(self, name: str) -> Any:
        return getattr(self.nve, name)


def _say(message: dict[str, Any]) -> None:
    print(json.dumps(message), flush=True)


def real_peers_config(spec: dict[str, Any], peers: list[Any], workdir: str) -> str:
    """The config file of a worker's real peers, as an operator writes one for ``vmm
    agent`` (one agent serving several hosts); returns its path."""
    if spec["directory"] in SERVED:
        # etcd-served: the agents' client talks HTTP to `vmm nva serve` (backend etcd
        # on the server's host), exactly as the embedded directory's agents do.
        directory: dict[str, dict[str, Any]] = {
            "nva": {"backend": "embedded", "url": spec["url"], "token": spec["token"]}
        }
    else:
        directory = {
            "nva": {"backend": "etcd"},
            "nva_etcd": {
                "endpoints": spec["endpoints"],
                "prefix": spec["prefix"],
                "request_timeout": 10.0,
            },
        }
    directory["nva"]["request_timeout"] = 10.0
    sections: dict[str, dict[str, Any]] = {
        "agent": {"hosts": [name for name, _, _ in peers], "host_driver": "linux"},
        **directory,
        "nve_agent": {
            "watch_timeout": WATCH_TIMEOUT,
            "retry_interval": 0.2,
            "local_learning": False,
        },
        "rarp": {"responder": False},  # the agents alone, as for the simulated peers
    }
    for name, vtep, netns in peers:
        sections[root.host_group(name)] = {
            "vtep": vtep,
            "vnis": [VNI],
            "netns": netns,
            "journal": os.path.join(workdir, f"journal-{name}.sqlite"),
        }
    path = os.path.join(workdir, "agent.conf")
    write_config(path, sections)
    return path


def worker_main() -> int:
    """A process hosting some of the peer agents, driven over stdin/stdout (JSON lines).

    The real peers come from the composition root (one config file, ``assemble``);
    the simulated ones are ``NveAgent``s on a no-op NVE sharing one directory client.
    """
    logging.basicConfig(
        level=os.environ.get("FANOUT_LOG", "ERROR")
    )  # stopping agents log lost watches
    threading.stack_size(512 * 1024)
    spec = json.loads(sys.stdin.readline())
    if spec["directory"] in SERVED:
        client: Any = NvaClient(spec["url"], spec["token"], timeout=10.0)
    else:
        client = EtcdNvaClient(EtcdKV(spec["endpoints"], timeout=10.0), spec["prefix"])
    tracker = Tracker()
    workdir = tempfile.mkdtemp(prefix="vmm-fanout-")
    real = [p for p in spec["peers"] if p[2]]
    assembly = (
        root.assemble(options.new_conf([real_peers_config(spec, real, workdir)]))
        if real
        else root.Assembly([])
    )
    agents: list[NveAgent] = []
    starts: list[Callable[[], None]] = []
    stops: list[Callable[[], None]] = []
    streams: list[tuple[Any, int]] = []  # (directory client, streams it must open)
    for host in assembly.hosts:
        agent = host.driver.services["agent"]
        agent.nve = TrackedNve(host.name, agent.nve, tracker)
        agents.append(agent)
        starts.append(host.start)
        stops.append(host.close)
        streams.append((host.directory, 1))
    simulated = [p for p in spec["peers"] if not p[2]]
    for name, vtep, _ in simulated:
        noop: Any = NoopNve(name, vtep, tracker)
        sim = NveAgent(
            name,
            noop,
            client,
            [VNI],
            watch_timeout=WATCH_TIMEOUT,
            retry_interval=0.2,
            local_learning=False,
        )
        agents.append(sim)
        starts.append(sim.start)
        stops.append(sim.stop)
    if simulated:
        streams.append((client, len(simulated)))
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        list(pool.map(_start, starts))
    # Each agent's watch thread opens its stream after start(): ready means streaming.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if all(not getattr(c, "streaming", False) or c.open_streams >= n for c, n in streams):
            break
        time.sleep(0.05)
    _say({"ready": time.monotonic() - started})
    ids = {a.id for a in agents}
    for line in sys.stdin:
        command = json.loads(line)
        if command["op"] == "arm":
            tracker.arm(command["vtep"], ids)
            _say({"armed": True, "cpu": time.process_time()})
        elif command["op"] == "sync":  # every agent has applied up to this revision
            deadline = time.monotonic() + WAIT_S
            while time.monotonic() < deadline:
                if all(a.revision >= command["revision"] for a in agents):
                    break
                time.sleep(0.05)
            _say({"synced": min(a.revision for a in agents)})
        elif command["op"] == "cpu":
            _say({"cpu": time.process_time()})
        elif command["op"] == "wait":
            tracker.wait(command["timeout"])
            times = list(tracker.times.values())
            _say({"last": max(times, default=None), "missing": tracker.missing})
        else:
            break
    # Stop every agent at once (a root-built host closes every part of it); the main
    # process then makes a change in the VN so that every long-poll returns and each
    # agent sees its stop flag.
    stoppers = [threading.Thread(target=stop, daemon=True) for stop in stops]
    for thread in stoppers:
        thread.start()
    time.sleep(0.1)
    _say({"stopping": True})
    for thread in stoppers:
        thread.join(timeout=WATCH_TIMEOUT + 5)
    client.close()
    shutil.rmtree(workdir, ignore_errors=True)
    _say({"stopped": True})
    return 0


def _start(start: Callable[[], None]) -> None:
    """Start a host or an agent, retrying as a restarted agent would when the directory
    is busy.

    (The embedded server listens with socketserver's default backlog of 5, so many
    agents connecting at once get connection resets.)
    """
    for attempt in range(20):
        try:
            start()
            return
        except (VmmError, OSError):
            time.sleep(0.05 * (attempt + 1))
    start()


class Worker:
    """The main process's handle on one worker process."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.send(spec)

    def send(self, message: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(message) + "\n")
        self.proc.stdin.flush()

    def receive(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"fan-out worker {self.proc.pid} exited ({self.proc.poll()})")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def finish(self) -> None:
        """Wait for the worker to exit (after stop_workers); kill it if it does not."""
        with contextlib.suppress(Exception):
            self.receive()  # stopped
        with contextlib.suppress(Exception):
            self.proc.wait(timeout=10)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def stop_workers(pool: list[Worker], admin: Any) -> None:
    """Stop every worker's agents, waking their long-polls with one change in the VN."""
    for worker in pool:
        with contextlib.suppress(Exception):
            worker.send({"op": "stop"})
    for worker in pool:
        with contextlib.suppress(Exception):
            worker.receive()  # stopping
    with contextlib.suppress(Exception):
        admin.add_endpoint(VNI, WAKE_MAC, [], [], "src")
    for worker in pool:
        worker.finish()


# ----------------------------------------------------------- directory side


class Directory(Protocol):
    name: str

    def admin(self) -> Any: ...

    def cpu(self) -> float: ...

    def spec(self) -> dict[str, Any]: ...

    def close(self) -> None: ...


class EmbeddedDirectory:
    """``vmm nva serve`` over SQLite in memory, in a process of its own (as deployed), so
    that its CPU time is its alone."""

    name = "embedded"

    def __init__(self, serve_args: list[str] | None = None) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--serve", *(serve_args or [])],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        started = json.loads(self.proc.stdout.readline())
        self.url, self.token = started["url"], started["token"]
        self._admin = NvaClient(self.url, self.token, timeout=10.0)

    def admin(self) -> NvaClient:
        return self._admin

    def spec(self) -> dict[str, Any]:
        return {"directory": self.name, "url": self.url, "token": self.token}

    def _stats(self) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("cpu\n")
        self.proc.stdin.flush()
        answer: dict[str, Any] = json.loads(self.proc.stdout.readline())
        return answer

    def cpu(self) -> float:
        """CPU seconds the directory's process has used (every thread, ns resolution)."""
        return float(self._stats()["cpu"])

    def ack_writes(self) -> int:
        """Batches of acks the server has written to its store (one transaction each)."""
        return int(self._stats()["ack_batches"])

    def close(self) -> None:
        self._admin.close()
        with contextlib.suppress(Exception):
            assert self.proc.stdin is not None
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def serve_main(
    endpoints: str | None = None, prefix: str | None = None, profile: str | None = None
) -> int:
    """A directory server's process: serve until stdin closes; answer "cpu" lines.

    Over SQLite in memory, or (``endpoints``) over etcd under ``prefix``: then
    the server follows etcd with one watch and streams to the agents.
    ``profile``: see ``--profile``.
    """
    logging.basicConfig(level=logging.ERROR)
    if profile:
        _profile_threads(profile)
    threading.stack_size(512 * 1024)  # a thread per connection
    token = secrets.token_urlsafe(16)
    store: Any = NvaStore(":memory:")
    if endpoints:
        store.close()
        store = EtcdNvaStore(EtcdKV(endpoints.split(","), timeout=10.0), prefix or "/vmm/")
    server = NvaServer(store, token, "127.0.0.1", 0)
    server.start()
    _say({"url": server.url, "token": token})
    for line in sys.stdin:
        if line.strip() == "cpu":
            hub = server.stream_hub
            batches = hub.acks.batches if hub is not None else 0
            _say({"cpu": time.process_time(), "ack_batches": batches})
    server.stop()
    server.store.close()
    return 0


def _profile_threads(prefix: str) -> None:
    """Run the server's thread bodies under cProfile timed by each thread's own CPU time
    (a profile of wall time would charge a thread for waiting on the GIL and on its peers).

    py-spy was tried first: it counts a thread blocked in a system call as idle,
    and the hub spends most of its CPU in send/recv, so it saw almost nothing.
    """
    import cProfile
    import socketserver

    from vmm_orchestrator.nva import stream

    def profiled(body: Callable[..., Any], name: str) -> Callable[..., Any]:
        def run(*args: Any) -> Any:
            profiler = cProfile.Profile(time.thread_time)
            profiler.enable()
            try:
                return body(*args)
            finally:
                profiler.disable()
                profiler.dump_stats(f"{prefix}-{name}-{threading.get_ident()}.prof")

        return run

    # Benchmark only: wraps the classes' thread bodies in this process.
    stream.StreamHub._loop = profiled(stream.StreamHub._loop, "hub")  # type: ignore[method-assign]
    stream.AckWriter._run = profiled(stream.AckWriter._run, "acks")  # type: ignore[method-assign]
    mixin = socketserver.ThreadingMixIn
    mixin.process_request_thread = profiled(  # type: ignore[method-assign]
        mixin.process_request_thread, "http"
    )


class EtcdDirectory:
    """A real etcd; each run under its own key prefix."""

    name = "etcd"

    def __init__(self, cluster: LocalEtcdCluster) -> None:
        self.endpoints = cluster.endpoints
        self.pids = [m.process.pid for m in cluster.members if m.process is not None]
        self.prefix = f"/fanout-{secrets.token_hex(4)}/"
        self._admin = EtcdNvaClient(EtcdKV(self.endpoints, timeout=10.0), self.prefix)

    def admin(self) -> EtcdNvaClient:
        return self._admin

    def spec(self) -> dict[str, Any]:
        return {"directory": self.name, "endpoints": self.endpoints, "prefix": self.prefix}

    def cpu(self) -> float:
        """CPU seconds etcd's threads have used (schedstat: ns resolution)."""
        return sum(_task_cpu(pid) for pid in self.pids)

    def etcd_requests(self) -> dict[str, int]:
        """Requests etcd has started, per gRPC method (its /metrics, every member)."""
        total: dict[str, int] = {}
        for endpoint in self.endpoints:
            text = requests.get(f"{endpoint}/metrics", timeout=10).text
            for method, count in _started(text).items():
                total[method] = total.get(method, 0) + count
        return total

    def close(self) -> None:
        self._admin.close()


class EtcdServedDirectory(EmbeddedDirectory):
    """``vmm nva serve`` over the real etcd (a process of its own), each run under its own
    key prefix; the orchestrator (``admin``) talks to that server over HTTP, as
    ``[nva] backend = etcd-served`` gives the stages (``EtcdServedBackend.from_conf``:
    the HTTP client of ``[nva] url``), so its commit and its wait for the acks are the
    server's work and etcd's, both counted. With ``orchestrator="etcd"`` it writes to
    etcd directly instead (how this benchmark measured before: only etcd's side of the
    commit and of the wait is counted then)."""

    name = "etcd-served"

    def __init__(
        self,
        cluster: LocalEtcdCluster,
        serve_args: list[str] | None = None,
        orchestrator: str = "server",
    ) -> None:
        self.etcd = EtcdDirectory(cluster)
        endpoints = ",".join(cluster.endpoints)
        super().__init__(
            ["--serve-etcd", endpoints, "--prefix", self.etcd.prefix, *(serve_args or [])]
        )
        if orchestrator == "etcd":
            self._admin.close()
            self._admin = self.etcd.admin()  # type: ignore[assignment]

    def spec(self) -> dict[str, Any]:
        return {"directory": self.name, "url": self.url, "token": self.token}

    def cpu(self) -> float:
        """CPU seconds of the server in front of etcd and of etcd."""
        return super().cpu() + self.etcd.cpu()

    def etcd_cpu(self) -> float:
        return self.etcd.cpu()

    def etcd_requests(self) -> dict[str, int]:
        return self.etcd.etcd_requests()

    def close(self) -> None:
        super().close()
        self.etcd.close()  # its etcd client (the directory's keys stay for the run)


def _started(metrics: str) -> dict[str, int]:
    """{gRPC method: requests started} from etcd's Prometheus text (unary calls and the
    streams opened; what the JSON gateway turns each HTTP request into)."""
    out: dict[str, int] = {}
    for line in metrics.splitlines():
        if not line.startswith("grpc_server_started_total{"):
            continue
        labels, _, value = line.rpartition(" ")
        method = labels.split('grpc_method="', 1)[1].split('"', 1)[0]
        count = int(float(value))
        if count:
            out[method] = out.get(method, 0) + count
    return out


def _task_cpu(pid: int) -> float:
    """On-CPU seconds of every live thread of ``pid`` (/proc/PID/task/*/schedstat)."""
    total = 0
    base = f"/proc/{pid}/task"
    for task in os.listdir(base):
        with contextlib.suppress(OSError), open(f"{base}/{task}/schedstat") as f:
            total += int(f.read().split()[0])
    return total / 1e9


class RealHosts:
    """Namespaces with an underlay address, one per real NVE (the workers drive them)."""

    def __init__(self, count: int) -> None:
        self.lab = Lab(vni=VNI)
        self.hosts: list[tuple[str, str]] = []
        if count:
            self.lab.build_underlay()
            for i in range(count):
                host = self.lab.add_host(f"p{i}")
                self.hosts.append((host.netns, host.vtep))

    def close(self) -> None:
        self.lab.teardown()


def _noop_vtep(i: int) -> str:
    return f"10.{(i >> 16) & 0xFF}.{(i >> 8) & 0xFF}.{i & 0xFF}"


def run_size(
    directory: Directory, n: int, real: RealHosts, runs: int, workers: int
) -> dict[str, Any]:
    """``runs`` moves with N peers; the figures of this (directory, N)."""
    admin = directory.admin()
    for name, vtep in MOVERS.items():
        admin.register_nve(name, vtep, [VNI])
    admin.add_endpoint(VNI, MAC, ["198.19.42.1"], [], "src")
    peers: list[tuple[str, str, str | None]] = []
    for i in range(n):
        if i < len(real.hosts):
            peers.append((f"peer{i:04d}", real.hosts[i][1], real.hosts[i][0]))
        else:
            peers.append((f"peer{i:04d}", _noop_vtep(i + 256), None))
    count = max(1, min(workers, n))
    started = time.monotonic()
    pool = [Worker({**directory.spec(), "peers": peers[w::count]}) for w in range(count)]
    applied_ms: list[float] = []
    acked_ms: list[float] = []
    dir_us: list[float] = []
    etcd_us: list[float] = []
    agents_us: list[float] = []
    etcd_cpu = getattr(directory, "etcd_cpu", None)
    ack_writes = getattr(directory, "ack_writes", None)
    writes: list[float] = []
    etcd_requests = getattr(directory, "etcd_requests", None)
    etcd_reqs: list[float] = []
    etcd_methods: dict[str, int] = {}
    missed = 0
    try:
        for worker in pool:
            worker.receive()  # ready
        # Ready means caught up too: the agents have applied every registration.
        revision = int(admin.health()["revision"])
        for worker in pool:
            worker.send({"op": "sync", "revision": revision})
        for worker in pool:
            worker.receive()
        setup_s = time.monotonic() - started
        here = "src"
        for run in range(runs):
            target = "dst" if here == "src" else "src"
            mid = f"fanout-{n}-{run}"
            admin.prestage(VNI, MAC, target, mid)
            agents_before = 0.0
            for worker in pool:
                worker.send({"op": "arm", "vtep": MOVERS[target]})
                agents_before += worker.receive()["cpu"]
            writes_before = ack_writes() if ack_writes is not None else 0
            reqs_before = etcd_requests() if etcd_requests is not None else {}
            dir_before = directory.cpu()
            etcd_before = etcd_cpu() if etcd_cpu is not None else 0.0
            t0, t0_wall = time.monotonic(), time.time()
            result = admin.commit(VNI, MAC, mid)
            for worker in pool:
                worker.send({"op": "wait", "timeout": WAIT_S})
            answers = [worker.receive() for worker in pool]
            missed += sum(a["missing"] for a in answers)
            last = max((a["last"] for a in answers if a["last"] is not None), default=t0)
            applied_ms.append((last - t0) * 1000)
            acked_ms.append(_acked_ms(admin, result, [p[0] for p in peers], t0_wall))
            # Commit -> every ack held: the directory's CPU, and the agents' (apply + ack).
            dir_us.append((directory.cpu() - dir_before) * 1e6 / n)
            if etcd_cpu is not None:
                etcd_us.append((etcd_cpu() - etcd_before) * 1e6 / n)
            if ack_writes is not None:
                writes.append(ack_writes() - writes_before)
            if etcd_requests is not None:  # read after the CPU: the scrape is not counted
                reqs = etcd_requests()
                for method, started in reqs.items():
                    moved = started - reqs_before.get(method, 0)
                    if moved:
                        etcd_methods[method] = etcd_methods.get(method, 0) + moved
                etcd_reqs.append(sum(reqs.values()) - sum(reqs_before.values()))
            agents_after = 0.0
            for worker in pool:
                worker.send({"op": "cpu"})
                agents_after += worker.receive()["cpu"]
            agents_us.append((agents_after - agents_before) * 1e6 / n)
            here = target
            time.sleep(0.2)
    finally:
        stop_workers(pool, admin)
        directory.close()
    real_count = min(n, len(real.hosts))
    return {
        "directory": directory.name,
        "n": n,
        "real": real_count,
        "noop": n - real_count,
        "workers": count,
        "setup_s": setup_s,
        "applied": applied_ms,
        "acked": acked_ms,
        "dir_us": dir_us,
        "etcd_us": etcd_us,
        "ack_writes": writes,
        "etcd_requests": etcd_reqs,
        "etcd_methods": {m: c / runs for m, c in sorted(etcd_methods.items())},
        "agents_us": agents_us,
        "missed": missed,
    }


def _acked_ms(admin: Any, commit: dict[str, Any], peers: list[str], t0_wall: float) -> float:
    """Just before the commit -> the directory holding the last peer's ack (its timestamps)."""
    revision = int(commit["revision"])
    deadline = time.monotonic() + WAIT_S
    while True:
        state = admin.acks(VNI, revision, nves=peers, timeout=20.0)
        if all(a["acked_revision"] >= revision for a in state.values()):
            break
        if time.monotonic() > deadline:
            return math.nan
    return (max(float(a["acked_at"]) for a in state.values()) - t0_wall) * 1000


# ------------------------------------------------------------------ report


def _fmt(values: list[float]) -> str:
    good = [v for v in values if not math.isnan(v)]
    if not good:
        return "-"
    return f"{statistics.median(good):.1f} ({max(good):.1f})"


def _growth(results: list[dict[str, Any]], key: str) -> dict[tuple[str, int], str]:
    """Exponent k of time ~ N^k between one N and the next, per directory."""
    out: dict[tuple[str, int], str] = {}
    for name, prev, cur in _steps(results):
        a, b = statistics.median(prev[key]), statistics.median(cur[key])
        if a > 0 and b > 0 and cur["n"] > prev["n"]:
            k = math.log(b / a) / math.log(cur["n"] / prev["n"])
            out[(name, cur["n"])] = f"{k:.2f}"
    return out


def _steps(
    results: list[dict[str, Any]],
) -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(directory, result at one N, result at the next N), per directory, by N."""
    by_dir: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        by_dir.setdefault(r["directory"], []).append(r)
    for name, rows in by_dir.items():
        rows.sort(key=lambda r: r["n"])
        for prev, cur in itertools.pairwise(rows):
            yield name, prev, cur


def _marginal(results: list[dict[str, Any]]) -> dict[tuple[str, int], str]:
    """Directory CPU per added peer, from the previous N: (C(N) - C(N')) / (N - N'),
    C = the median CPU of one move (what a peer more costs, without the move's fixed
    part: the commit, the orchestrator's read of the acks, a few etcd round trips)."""
    out: dict[tuple[str, int], str] = {}
    for name, prev, cur in _steps(results):
        if cur["n"] > prev["n"] and prev["dir_us"] and cur["dir_us"]:
            a = statistics.median(prev["dir_us"]) * prev["n"]
            b = statistics.median(cur["dir_us"]) * cur["n"]
            out[(name, cur["n"])] = f"{(b - a) / (cur['n'] - prev['n']):.1f}"
    return out


def render(results: list[dict[str, Any]], runs: int) -> str:
    """The table: one row per N, embedded and etcd side by side."""
    directories = sorted({r["directory"] for r in results}, key=DIRECTORIES.index)
    cell = {(r["directory"], r["n"]): r for r in results}
    growth = _growth(results, "applied")
    marginal = _marginal(results)
    rows = []
    for n in sorted({r["n"] for r in results}):
        first = next(r for r in results if r["n"] == n)
        row: dict[str, Any] = {
            "n": n,
            "real": first["real"],
            "noop": first["noop"],
            "workers": first["workers"],
        }
        for d in directories:
            r = cell.get((d, n))
            row[f"{d}_applied"] = _fmt(r["applied"]) if r else "-"
            row[f"{d}_acked"] = _fmt(r["acked"]) if r else "-"
            row[f"{d}_dir"] = _fmt(r["dir_us"]) if r else "-"
            row[f"{d}_etcd"] = _fmt(r["etcd_us"]) if r else "-"
            row[f"{d}_added"] = marginal.get((d, n), "")
            row[f"{d}_writes"] = _fmt(r.get("ack_writes", [])) if r else "-"
            row[f"{d}_reqs"] = _fmt(r.get("etcd_requests", [])) if r else "-"
            row[f"{d}_agents"] = _fmt(r["agents_us"]) if r else "-"
            row[f"{d}_k"] = growth.get((d, n), "")
            if r and r["missed"]:
                row[f"{d}_applied"] += f" MISSED {r['missed']}"
        rows.append(row)
    columns: list[tuple[str, str]] = [
        ("n", "N peers"),
        ("real", "real netns NVEs"),
        ("noop", "no-op NVEs"),
        ("workers", "agent procs"),
    ]
    for d in directories:
        columns += [
            (f"{d}_applied", f"{d} applied ms"),
            (f"{d}_k", "k"),
            (f"{d}_acked", f"{d} acked ms"),
            (f"{d}_dir", "directory us/peer"),
            (f"{d}_added", "us/added peer"),
        ]
        if d == "etcd-served":
            columns.append((f"{d}_etcd", "of which etcd"))
        if d != "embedded":
            columns.append((f"{d}_reqs", "etcd reqs"))
        if d in SERVED:
            columns.append((f"{d}_writes", "ack writes"))
        columns += [
            (f"{d}_agents", "agents us/peer"),
        ]
    setups = ", ".join(f"{r['directory']} N={r['n']}: {r['setup_s']:.1f}" for r in results)
    methods = [
        f"{r['directory']} N={r['n']}: "
        + ", ".join(f"{m} {c:.1f}" for m, c in r["etcd_methods"].items())
        for r in results
        if r.get("etcd_methods")
    ]
    return "\n".join(
        [
            f"Fan-out of one move to N peer NVEs: median (max) over {runs} moves, ms from just "
            "before the commit.",
            "applied = last peer NVE programmed the new location; acked = the directory holds "
            "the last peer's ack; k = growth exponent (time ~ N^k) from the previous N.",
            "directory us/peer = CPU of the directory's processes (embedded: `vmm nva serve`; "
            "etcd: the etcd server; etcd-served: `vmm nva serve` in front of etcd + etcd) "
            "from the commit until it held every ack, / N; agents "
            "us/peer = CPU of the agent processes over the same span (apply + ack), / N. "
            "Both share this machine's CPUs, so the applied time includes waiting for them.",
            "us/added peer = the directory's CPU per move from the previous N to this one, "
            "per added peer (the per-peer cost without the move's fixed part); ack writes = "
            "batches of acks the server wrote to its store per move; etcd reqs = requests "
            "etcd started per move (its gRPC counters: every gateway request, watches opened).",
            format_table(rows, columns),
            "",
            f"Set-up (all agents registered and synced), s: {setups}",
            *(["etcd requests per move, by method (mean): " + "; ".join(methods)] * bool(methods)),
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--peers", default="10,100,1000", help="comma-separated N values")
    parser.add_argument("--real", type=int, default=200, help="real namespace NVEs (max 250)")
    parser.add_argument("--runs", type=int, default=5, help="moves per (directory, N)")
    parser.add_argument("--workers", type=int, default=16, help="agent processes")
    parser.add_argument(
        "--directories",
        default=",".join(DIRECTORIES),
        help="embedded, etcd (agents watch etcd directly: the baseline), etcd-served "
        "(agents stream from `vmm nva serve` in front of etcd)",
    )
    parser.add_argument(
        "--profile",
        help="path prefix: profile the directory server's threads (the streams' hub, "
        "the ack writer, HTTP requests) with cProfile on each thread's CPU time, set-up "
        "included; one pstats file per thread, PREFIX-<directory>-<N>-<thread>.prof",
    )
    parser.add_argument(
        "--orchestrator",
        choices=["server", "etcd"],
        default="server",
        help="etcd-served: the orchestrator's commit and wait for the acks go to the "
        "server over HTTP, as the stages of that deployment do (server), or to etcd "
        "directly, as this benchmark measured before (etcd: their server side uncounted)",
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--serve-etcd", help=argparse.SUPPRESS)
    parser.add_argument("--prefix", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker_main()
    if args.serve:
        return serve_main(args.serve_etcd, args.prefix, args.profile)
    logging.basicConfig(level=logging.ERROR)
    sizes = [int(x) for x in args.peers.split(",") if x]
    wanted = [d for d in args.directories.split(",") if d]
    if args.real > MAX_REAL:
        print(f"--real {args.real}: the lab's underlay holds {MAX_REAL}; using that")
    real_count = max(0, min(args.real, MAX_REAL, max(sizes)))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))

    started_load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"building {real_count} real namespace NVEs ...", flush=True)
    real = RealHosts(real_count)
    results = []
    try:
        unknown = sorted(set(wanted) - set(DIRECTORIES))
        if unknown:
            parser.error(f"unknown directories {unknown}; choose from {DIRECTORIES}")
        etcd = LocalEtcdCluster(1) if {"etcd", "etcd-served"} & set(wanted) else None
        with etcd if etcd is not None else contextlib.nullcontext():
            for n in sizes:
                for name in wanted:
                    print(f"-- {name}, N={n} ...", flush=True)
                    directory: Directory
                    serve = ["--profile", f"{args.profile}-{name}-{n}"] if args.profile else []
                    if name == "embedded":
                        directory = EmbeddedDirectory(serve)
                    elif name == "etcd-served":
                        assert etcd is not None
                        directory = EtcdServedDirectory(etcd, serve, args.orchestrator)
                    else:
                        assert etcd is not None
                        directory = EtcdDirectory(etcd)
                    results.append(run_size(directory, n, real, args.runs, args.workers))
    finally:
        real.close()
    print()
    print(render(results, args.runs))
    if "etcd-served" in wanted:
        path = {"server": "the server, over HTTP", "etcd": "etcd directly"}[args.orchestrator]
        print(f"\netcd-served: the orchestrator's commit and wait for the acks went to {path}.")
    print(
        f"\nReal NVEs: the first {real_count} peers (at most) are hosts from the composition "
        "root (a config file -> assemble: LinuxNve in their own network namespace, FDB "
        "programmed through netlink, and their NveAgent); the other peers stand for remote "
        "agents: the same NveAgent applying to a no-op NVE. Everything shares this machine "
        f"({len(os.sched_getaffinity(0))} CPUs): the directory, etcd and the agent processes. "
        "Load average (1/5/15 min): "
        f"{started_load} before, {' / '.join(f'{x:.1f}' for x in os.getloadavg())} after."
    )
    return 1 if any(r["missed"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
