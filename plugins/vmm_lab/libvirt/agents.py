"""`vmm agent` processes for the libvirt lab's hosts, as an operator runs them.

Each host gets a config file written the way the README's "On libvirt
hosts" section tells an operator to write one, and one ``vmm
--config-file HOST.conf agent`` process, the command line of the systemd
unit (etc/systemd/vmm-orchestrator-agent.service). The lab then migrates
with plain ``virsh migrate``; the agents see it only through libvirt's
events and the hook relay. Tests kill (-9) and restart these processes to
prove recovery, and read each host's journal (SQLite, readable while the
agent runs) to see what ran.
"""

from __future__ import annotations

import configparser
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from typing import Any

from vmm_lab.libvirt import LibvirtLabError
from vmm_orchestrator.journal import Journal, MigrationRecord

#: Seconds an agent may take to print "vmm agent: serving".
START_TIMEOUT_S = 30.0


def vmm_command() -> list[str]:
    """The installed ``vmm`` console script of this environment (as systemd runs it)."""
    script = os.path.join(os.path.dirname(sys.executable), "vmm")
    if os.path.exists(script):
        return [script]
    return [sys.executable, "-m", "vmm_orchestrator.cli"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def write_config(path: str, sections: Mapping[str, Mapping[str, Any]]) -> None:
    """An INI file for oslo.config from {group: {option: value}} (lists comma-joined)."""
    parser = configparser.ConfigParser(interpolation=None)
    for group, values in sections.items():
        parser[group] = {
            key: ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
            for key, value in values.items()
            if value is not None
        }
    with open(path, "w") as fh:
        parser.write(fh)


class AgentProcess:
    """One host's ``vmm agent`` process: start, SIGTERM, kill -9, restart."""

    def __init__(self, name: str, config: str, journal: str, log: str) -> None:
        self.name = name
        self.config = config
        self.journal_path = journal
        self.log_path = log
        self.proc: subprocess.Popen[str] | None = None
        self._ready = threading.Event()

    def start(self, timeout: float = START_TIMEOUT_S) -> None:
        if self.running:
            raise LibvirtLabError(f"the agent of {self.name} already runs")
        log = open(self.log_path, "a")
        log.write(f"--- start {time.strftime('%H:%M:%S')}\n")
        log.flush()
        self._ready.clear()
        self.proc = subprocess.Popen(
            [*vmm_command(), "-v", "--config-file", self.config, "agent"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        threading.Thread(target=self._pump, args=(self.proc, log), daemon=True).start()
        if not self._ready.wait(timeout):
            tail = self.log_tail()
            self.kill()
            raise LibvirtLabError(f"the agent of {self.name} did not start:\n{tail}")

    def _pump(self, proc: subprocess.Popen[str], log: Any) -> None:
        assert proc.stdout is not None
        with log:
            for line in proc.stdout:
                log.write(line)
                log.flush()
                if line.startswith("vmm agent: serving"):
                    self._ready.set()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """kill -9: no clean-up at all, as a crash."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM (systemd's stop) and wait; kill -9 if it does not exit in time."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    def log_tail(self, chars: int = 3000) -> str:
        with contextlib.suppress(OSError), open(self.log_path, errors="replace") as fh:
            return fh.read()[-chars:]
        return ""

    def migrations(self) -> list[MigrationRecord]:
        """Every migration this host's journal holds (read while the agent runs)."""
        if not os.path.exists(self.journal_path):
            return []
        journal = Journal(self.journal_path)
        try:
            return journal.recent(1000)
        finally:
            journal.close()
