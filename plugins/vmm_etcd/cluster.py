"""Real etcd members on loopback, for tests, benchmarks and trying things out.

:class:`LocalEtcdCluster` starts one or more ``etcd`` processes (Debian's
etcd-server) on 127.0.0.1 with free ports and throw-away data directories
(on /dev/shm when it exists: etcd fsyncs every commit, and a tmpfs makes
that cheap), waits until the cluster has a leader, and can stop and restart
single members to test failover. ``close()`` kills every member it started
and removes the data directories, and members die with the process that
started them even if it is killed (PR_SET_PDEATHSIG, through setpriv), so nothing outlives a
crashed test run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from typing import Self

import requests

from vmm_orchestrator.errors import VmmError

ETCD_BINARY = "/usr/bin/etcd"
#: util-linux's setpriv sets PR_SET_PDEATHSIG before exec'ing etcd, without
#: running Python code between fork and exec (unsafe in a threaded parent).
SETPRIV = "/usr/bin/setpriv"


class EtcdNotAvailable(VmmError):
    """etcd is not installed or a member did not come up."""


def free_port() -> int:
    """A TCP port nobody listens on right now on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclasses.dataclass
class Member:
    """One etcd member: its name, ports, data directory and process (when running)."""

    name: str
    client_port: int
    peer_port: int
    data_dir: str
    log_path: str
    process: subprocess.Popen[bytes] | None = None

    @property
    def client_url(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None


class LocalEtcdCluster:
    """``size`` etcd members on 127.0.0.1; use as a context manager."""

    def __init__(
        self,
        size: int = 1,
        *,
        binary: str = ETCD_BINARY,
        heartbeat_ms: int = 50,
        election_ms: int = 500,
        max_txn_ops: int = 1024,
    ) -> None:
        if not os.access(binary, os.X_OK):
            raise EtcdNotAvailable(
                f"no etcd binary at {binary}",
                hint="install Debian's etcd-server package (apt-get install etcd-server)",
            )
        self.binary = binary
        self.heartbeat_ms = heartbeat_ms
        self.election_ms = election_ms
        self.max_txn_ops = max_txn_ops
        base = "/dev/shm" if os.path.isdir("/dev/shm") else None
        self.workdir = tempfile.mkdtemp(prefix="vmm-etcd-", dir=base)
        self.token = f"vmm-{secrets.token_hex(4)}"
        self.members = [
            Member(
                name=f"m{i}",
                client_port=free_port(),
                peer_port=free_port(),
                data_dir=os.path.join(self.workdir, f"m{i}"),
                log_path=os.path.join(self.workdir, f"m{i}.log"),
            )
            for i in range(size)
        ]

    @property
    def endpoints(self) -> list[str]:
        """Client URLs of every member (running or not)."""
        return [m.client_url for m in self.members]

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- life cycle --------------------------------------------------------------

    def start(self, timeout: float = 20.0) -> None:
        """Start every member and wait until the cluster answers writes."""
        for member in self.members:
            self._spawn(member, "new")
        self.wait_healthy(timeout)

    def _spawn(self, member: Member, state: str) -> None:
        cluster = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        args = [
            self.binary,
            "--name",
            member.name,
            "--data-dir",
            member.data_dir,
            "--listen-client-urls",
            member.client_url,
            "--advertise-client-urls",
            member.client_url,
            "--listen-peer-urls",
            member.peer_url,
            "--initial-advertise-peer-urls",
            member.peer_url,
            "--initial-cluster",
            cluster,
            "--initial-cluster-state",
            state,
            "--initial-cluster-token",
            self.token,
            "--heartbeat-interval",
            str(self.heartbeat_ms),
            "--election-timeout",
            str(self.election_ms),
            "--max-txn-ops",
            str(self.max_txn_ops),
            "--logger",
            "zap",
            "--log-level",
            "warn",
        ]
        if os.access(SETPRIV, os.X_OK):
            # Killed with its parent (the thread that started it: start members from
            # the main thread) so a crashed test run leaves no etcd behind.
            args = [SETPRIV, "--pdeathsig", "KILL", *args]
        log = open(member.log_path, "ab")
        try:
            member.process = subprocess.Popen(
                args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        finally:
            log.close()

    def wait_healthy(self, timeout: float = 20.0) -> None:
        """Wait until every running member reports health (a leader and quorum)."""
        deadline = time.monotonic() + timeout
        pending = [m for m in self.members if m.process is not None]
        while pending:
            member = pending[0]
            if member.process is not None and member.process.poll() is not None:
                raise EtcdNotAvailable(
                    f"etcd member {member.name} exited with {member.process.returncode}: "
                    f"{self.log_tail(member)}"
                )
            if self._healthy(member):
                pending.pop(0)
                continue
            if time.monotonic() > deadline:
                raise EtcdNotAvailable(
                    f"etcd member {member.name} at {member.client_url} not healthy after "
                    f"{timeout:g} s: {self.log_tail(member)}"
                )
            time.sleep(0.05)

    @staticmethod
    def _healthy(member: Member) -> bool:
        try:
            answer = requests.get(f"{member.client_url}/health", timeout=1.0)
            return bool(answer.ok and answer.json().get("health") == "true")
        except (requests.RequestException, ValueError):
            return False

    def leader(self) -> Member:
        """The member that leads now (asked to the running members)."""
        ids: dict[str, Member] = {}
        leader_id = None
        for member in self.members:
            if not member.running:
                continue
            try:
                status = requests.post(
                    f"{member.client_url}/v3/maintenance/status", json={}, timeout=1.0
                ).json()
            except (requests.RequestException, ValueError):
                continue
            ids[str(status["header"]["member_id"])] = member
            leader_id = str(status.get("leader", leader_id))
        if leader_id is None or leader_id not in ids:
            raise EtcdNotAvailable("no running etcd member knows a leader")
        return ids[leader_id]

    def stop(self, member: Member) -> None:
        """Kill one member (as a crash would); its data stays for restart()."""
        process = member.process
        if process is not None and process.poll() is None:
            process.kill()
            process.wait(timeout=10)
        member.process = None

    def restart(self, member: Member, timeout: float = 20.0) -> None:
        """Start a stopped member again on its data directory."""
        self._spawn(member, "existing")
        self.wait_healthy(timeout)

    def log_tail(self, member: Member, lines: int = 5) -> str:
        with contextlib.suppress(OSError):
            with open(member.log_path, encoding="utf-8", errors="replace") as fh:
                return " | ".join(fh.read().strip().splitlines()[-lines:])
        return "(no log)"

    def close(self) -> None:
        """Kill every member and delete the data directories. Idempotent."""
        for member in self.members:
            with contextlib.suppress(Exception):
                self.stop(member)
        shutil.rmtree(self.workdir, ignore_errors=True)


@contextlib.contextmanager
def local_etcd(size: int = 1) -> Iterator[LocalEtcdCluster]:
    """A running LocalEtcdCluster, always killed and removed when the body ends."""
    with LocalEtcdCluster(size) as cluster:
        yield cluster
