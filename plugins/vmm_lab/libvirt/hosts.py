"""One real libvirtd per lab host namespace.

Several hypervisors on one machine need more than a network namespace each:
libvirtd keeps its configuration, sockets, domain state and logs at fixed
paths. Each LibvirtHost therefore runs its daemon in a private mount (and
UTS) namespace inside the lab host's network namespace, with per-host
directories bind-mounted over /etc/libvirt, /run/libvirt, /var/lib/libvirt,
/var/cache/libvirt and /var/log/libvirt, its own /etc/hosts and hostname,
and a distinct host UUID (libvirt refuses to migrate between hosts with the
same one). The mounts exist only in that namespace, so they vanish with the
daemon and its QEMU processes and never touch the machine's own libvirt.

The daemon runs under ``tini -s`` (a child subreaper): QEMU processes are
daemonized and this machine's PID 1 reaps orphans about a second late,
which delays the source's STOPPED event and stretches every migration.

Lab only: the daemon listens for TCP on the host's underlay address with
``auth_tcp = "none"`` (anyone on the underlay may manage it) and the UNIX
socket has no authentication either.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from types import TracebackType

import libvirt

from vmm_lab.libvirt import LibvirtLabError

#: Directories each daemon gets its own copy of (mount point -> subdirectory).
BIND_DIRS = {
    "/etc/libvirt": "etc",
    "/run/libvirt": "run",
    "/var/lib/libvirt": "lib",
    "/var/cache/libvirt": "cache",
    "/var/log/libvirt": "log",
}
TCP_PORT = 16509
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 5.0
LOG_TAIL_LINES = 20
#: libvirtd's log_filters for daemons started from now on (None: errors only). With
#: filters, the log keeps everything they pass at debug level (e.g.
#: vmm_lab.libvirt.phaselog.LOG_FILTERS, to time a migration's phases).
LOG_FILTERS: str | None = None

# Runs inside the host's network namespace, already in private mount and
# UTS namespaces: $1 is the host's directory, $2 its hostname.
_LAUNCH = """set -e
mount --bind "$1/etc" /etc/libvirt
mount --bind "$1/run" /run/libvirt
mount --bind "$1/lib" /var/lib/libvirt
mount --bind "$1/cache" /var/cache/libvirt
mount --bind "$1/log" /var/log/libvirt
mount --bind "$1/hosts" /etc/hosts
hostname "$2"
exec tini -s -- libvirtd --listen -f /etc/libvirt/libvirtd.conf -p "$1/libvirtd.pid"
"""


class LibvirtHost:
    """A libvirtd serving one lab host; use as a context manager or call stop().

    ``address`` is the host's underlay address: the daemon listens there for
    peer daemons (``peer_uri``) and QEMU receives migrations there
    (``migration_uri``). Clients in the root namespace use ``uri``.
    """

    def __init__(self, name: str, netns: str, address: str, workdir: str) -> None:
        self.name = name
        self.netns = netns
        self.address = address
        self.dir = os.path.join(workdir, name)
        self.host_uuid = str(uuid.uuid4())
        self.hostname = netns
        self._proc: subprocess.Popen[bytes] | None = None
        self._mnt_ns: str | None = None

    # -- addresses --------------------------------------------------------------

    @property
    def socket_path(self) -> str:
        """The daemon's read-write UNIX socket, as seen from the root namespace."""
        return os.path.join(self.dir, "run", "libvirt-sock")

    @property
    def uri(self) -> str:
        """Connection URI for clients in the root namespace."""
        return f"qemu:///system?socket={self.socket_path}"

    @property
    def peer_uri(self) -> str:
        """URI another host's daemon uses to reach this one (peer-to-peer migration)."""
        return f"qemu+tcp://{self.address}/system"

    @property
    def migration_uri(self) -> str:
        """Where this host's QEMU listens for an incoming migration stream."""
        return f"tcp://{self.address}"

    def path(self, inside: str) -> str:
        """The root-namespace path of ``inside``, a path as the daemon and QEMU see it."""
        for mount_point, sub in BIND_DIRS.items():
            if inside == mount_point or inside.startswith(mount_point + "/"):
                return os.path.join(self.dir, sub, inside[len(mount_point) :].lstrip("/"))
        return inside

    @property
    def pid(self) -> int | None:
        """PID of the daemon's tini (the process the host started), None if not running."""
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    # -- life cycle -------------------------------------------------------------

    def start(self, timeout: float = START_TIMEOUT_S) -> None:
        """Write the configuration and start the daemon; return once it can run domains."""
        if self._proc is not None:
            raise LibvirtLabError(f"libvirtd of {self.name} is already started")
        for sub in BIND_DIRS.values():
            os.makedirs(os.path.join(self.dir, sub), exist_ok=True)
        # Where domain XML puts console files; the daemon creates only its own log.
        os.makedirs(self.path("/var/log/libvirt/qemu"), exist_ok=True)
        for mount_point in BIND_DIRS:
            # /run/libvirt may not exist on a machine that never ran libvirtd; an
            # empty directory is left behind (removing it could pull the mount
            # point from under another run's daemon).
            os.makedirs(mount_point, exist_ok=True)
        self._write_config()
        with open(os.path.join(self.dir, "daemon.log"), "wb") as out:
            self._proc = subprocess.Popen(
                [
                    *("ip", "netns", "exec", self.netns),
                    *("unshare", "--mount", "--uts", "--propagation", "private"),
                    *("sh", "-c", _LAUNCH, "launch", self.dir, self.hostname),
                ],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise

    def _write_config(self) -> None:
        etc = os.path.join(self.dir, "etc")
        with open(os.path.join(etc, "libvirtd.conf"), "w", encoding="utf-8") as fh:
            fh.write(
                "# vmm lab: unauthenticated TCP on the lab underlay; never on a real network.\n"
                f'listen_tls = 0\nlisten_tcp = 1\nlisten_addr = "{self.address}"\n'
                f'tcp_port = "{TCP_PORT}"\n'
                'auth_tcp = "none"\nauth_unix_rw = "none"\nauth_unix_ro = "none"\n'
                f'host_uuid = "{self.host_uuid}"\n'
                + (
                    f'log_filters = "{LOG_FILTERS}"\n'
                    'log_outputs = "1:file:/var/log/libvirt/libvirtd.log"\n'
                    if LOG_FILTERS
                    else 'log_outputs = "3:file:/var/log/libvirt/libvirtd.log"\n'
                )
            )
        with open(os.path.join(etc, "qemu.conf"), "w", encoding="utf-8") as fh:
            fh.write(
                'security_driver = "none"\nuser = "root"\ngroup = "root"\n'
                "dynamic_ownership = 0\nremember_owner = 0\n"
                "namespaces = []\ncgroup_controllers = []\n"
                'stdio_handler = "file"\n'
                f'migration_host = "{self.address}"\nmigration_address = "{self.address}"\n'
            )
        with open(os.path.join(self.dir, "hosts"), "w", encoding="utf-8") as fh:
            fh.write(f"127.0.0.1 localhost\n{self.address} {self.hostname}\n")

    def _wait_ready(self, timeout: float) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + timeout
        while not self._answers():
            if self._proc.poll() is not None:
                raise self._failed(f"exited with {self._proc.returncode} while starting")
            if time.monotonic() > deadline:
                raise self._failed(f"did not answer on {self.socket_path} within {timeout:.0f} s")
            time.sleep(0.05)
        self._mnt_ns = _mnt_ns(self._proc.pid)
        try:
            conn = libvirt.open(self.uri)
            try:
                # Probing QEMU's capabilities takes 1.5 s here on first use; do it
                # now rather than inside the first domain start or migration.
                conn.getCapabilities()
            finally:
                conn.close()
        except libvirt.libvirtError as exc:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout=1.0)  # a dying daemon: let it finish its log
            raise self._failed(f"answered, then failed: {exc}") from exc

    def _failed(self, what: str) -> LibvirtLabError:
        return LibvirtLabError(f"libvirtd of {self.name} {what}:\n{self.log_tail()}")

    def _answers(self) -> bool:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(self.socket_path)
            except OSError:
                return False
        return True

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """The last lines of the daemon's output and of its log file (for error messages)."""
        parts = []
        for label, path in (
            ("output", os.path.join(self.dir, "daemon.log")),
            ("libvirtd.log", self.path("/var/log/libvirt/libvirtd.log")),
        ):
            with contextlib.suppress(OSError), open(path, errors="replace") as fh:
                tail = fh.read().splitlines()[-lines:]
                if tail:
                    parts.append(f"--- {label} ({path}):\n" + "\n".join(tail))
        return "\n".join(parts) or "(the daemon wrote nothing)"

    def stop(self) -> None:
        """Stop the daemon and every QEMU it started, and remove the host's files.

        Domains are not shut down through libvirt (a test may have left the
        daemon wedged): every process in the daemon's private mount namespace
        is killed, which takes its bind mounts with it.
        """
        proc, self._proc = self._proc, None
        if proc is not None:
            mnt_ns = self._mnt_ns or _mnt_ns(proc.pid)
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)  # tini passes it on to libvirtd
                try:
                    proc.wait(timeout=STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=STOP_TIMEOUT_S)
            if mnt_ns is not None and mnt_ns != _mnt_ns(os.getpid()):
                _kill_mount_namespace(mnt_ns)
        self._mnt_ns = None
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> LibvirtHost:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _mnt_ns(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/mnt")
    except OSError:
        return None


def _kill_mount_namespace(mnt_ns: str, timeout: float = STOP_TIMEOUT_S) -> None:
    """SIGKILL every process in mount namespace ``mnt_ns`` and wait until none is left.

    QEMU is daemonized (its parent is tini, or PID 1 once tini is gone), so
    it is found by the namespace it inherited, not by ancestry.
    """
    deadline = time.monotonic() + timeout
    while True:
        pids = [pid for pid in _all_pids() if _mnt_ns(pid) == mnt_ns]
        if not pids:
            return
        if time.monotonic() > deadline:
            raise LibvirtLabError(f"processes {pids} survived SIGKILL for {timeout} s")
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)


def _all_pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]
