"""The directory as an operator runs it: ``vmm --config-file nva.conf nva serve``.

The labs serve the embedded directory in-process by default (fast, and a
test can reach its store); the operator's end-to-end tests run it as this
process instead, from a config file written the way the README's "On
libvirt hosts" step 2 says, and register endpoints with the
``vmm nva endpoint add`` command of step 5.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

from vmm_lab.libvirt.agents import free_port, vmm_command, write_config
from vmm_orchestrator.nva.client import NvaClient
from vmm_orchestrator.nva.errors import NvaError

START_TIMEOUT_S = 20.0


class NvaProcess:
    """``vmm nva serve`` on 127.0.0.1 with its own config file and database."""

    def __init__(self, workdir: str, token: str) -> None:
        self.token = token
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config = os.path.join(workdir, "nva.conf")
        self.log_path = os.path.join(workdir, "nva.log")
        write_config(
            self.config,
            {
                "nva": {
                    "token": token,
                    "bind_host": "127.0.0.1",
                    "bind_port": self.port,
                    "database": os.path.join(workdir, "nva.sqlite"),
                }
            },
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [*vmm_command(), "--config-file", self.config, "nva", "serve"],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        client = NvaClient(self.url, self.token)
        deadline = time.monotonic() + START_TIMEOUT_S
        try:
            while True:
                try:
                    client.health()
                    return
                except NvaError:
                    if self.proc.poll() is not None or time.monotonic() > deadline:
                        self.stop()
                        with open(self.log_path, errors="replace") as fh:
                            log = fh.read()
                        raise RuntimeError(f"vmm nva serve did not start:\n{log}") from None
                    time.sleep(0.1)
        finally:
            client.close()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


def endpoint_add(
    config: str, vni: int, mac: str, ipv4: list[str], ipv6: list[str], nve: str
) -> str:
    """``vmm --config-file CONFIG nva endpoint add ...`` (README step 5); its output."""
    cmd = [*vmm_command(), "--config-file", config, "nva", "endpoint", "add"]
    cmd += ["--vni", str(vni), "--mac", mac, "--nve", nve]
    for address in ipv4:
        cmd += ["--ipv4", address]
    for address in ipv6:
        cmd += ["--ipv6", address]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {done.stderr.strip()}")
    return done.stdout
