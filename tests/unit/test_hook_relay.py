"""The libvirt hook relay script, run for real as a subprocess (as libvirtd runs
it: argv, XML on stdin, almost no environment) against the daemon's
HookServer: XML passed through unchanged, vetoes, fail-open/fail-closed when
nothing answers, and the deadline.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from vmm_libvirt.hook import HookServer
from vmm_orchestrator.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
RELAY = ROOT / "etc/libvirt/hooks/qemu.d/vmm-orchestrator"

# Non-ASCII, odd spacing and no trailing newline: any rewriting would show.
XML = (
    "<domain type='qemu'>\n  <name>vm-é</name>\n"
    "  <uuid>6c1f5e62-2b0c-4e43-9d7a-0a0b0c0d0e01</uuid>  \t</domain>"
)


@pytest.fixture
def workdir() -> Iterator[Path]:
    # Short: unix socket paths are limited to 107 bytes.
    path = Path(tempfile.mkdtemp(prefix="vmmhook", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def relay_config(workdir: Path, **settings: Any) -> Path:
    values = {"socket": str(workdir / "hook.sock"), "deadline": "1.0", "fail_mode": "open"}
    values.update({k: str(v) for k, v in settings.items()})
    path = workdir / "relay.conf"
    path.write_text("[hook_relay]\n" + "".join(f"{k} = {v}\n" for k, v in values.items()))
    return path


def run_relay(
    config: Path, op: str = "migrate", sub_op: str = "begin", stdin: str = XML
) -> tuple[subprocess.CompletedProcess[bytes], float]:
    """Run the relay like libvirtd does; (its result, seconds it took)."""
    start = time.monotonic()
    result = subprocess.run(
        [str(RELAY), "vm-é", op, sub_op, "-"],
        input=stdin.encode("utf-8"),
        capture_output=True,
        env={"PATH": "/usr/bin:/bin", "VMM_HOOK_CONFIG": str(config)},
        timeout=20,
        check=False,
    )
    return result, time.monotonic() - start


@pytest.fixture
def serve(workdir: Path) -> Iterator[Callable[..., list[dict[str, Any]]]]:
    """Start a HookServer on workdir/hook.sock with a handler; returns what it received."""
    servers: list[HookServer] = []

    def start(handler: Callable[[dict[str, Any]], dict[str, Any]]) -> list[dict[str, Any]]:
        seen: list[dict[str, Any]] = []

        def record(request: dict[str, Any]) -> dict[str, Any]:
            seen.append(request)
            return handler(request)

        server = HookServer(str(workdir / "hook.sock"), record, timeout=10.0)
        server.start()
        servers.append(server)
        return seen

    yield start
    for server in servers:
        server.stop()


def test_relay_is_executable_and_stdlib_only() -> None:
    assert os.access(RELAY, os.X_OK), f"{RELAY} must be executable (chmod 755)"
    text = RELAY.read_text()
    assert text.startswith("#!/usr/bin/python3\n")
    imports = {line.split()[1] for line in text.splitlines() if line.startswith("import ")}
    assert imports <= {"configparser", "json", "os", "socket", "sys", "time"}
    assert "libvirt" not in imports


def test_allowed_migrate_passes_the_xml_through_unchanged(workdir: Path, serve: Any) -> None:
    seen = serve(lambda r: {"allow": True, "reason": ""})
    result, _ = run_relay(relay_config(workdir))
    assert result.returncode == 0, result.stderr
    assert result.stdout == XML.encode("utf-8")
    assert seen == [{"guest": "vm-é", "op": "migrate", "sub_op": "begin", "extra": "-", "xml": XML}]


def test_other_operations_print_nothing(workdir: Path, serve: Any) -> None:
    # libvirt reads stdout back only for migrate and restore; elsewhere it would be log noise.
    seen = serve(lambda r: {"allow": True})
    result, _ = run_relay(relay_config(workdir), op="started", sub_op="begin")
    assert (result.returncode, result.stdout) == (0, b"")
    assert seen[0]["op"] == "started" and seen[0]["xml"] == XML


def test_a_veto_exits_1_with_the_reason_on_stderr(workdir: Path, serve: Any) -> None:
    reason = "stage nva_prestage failed in PREPARE: 10.0.0.5 is held by 52:54:00:00:00:09"
    serve(lambda r: {"allow": False, "reason": reason})
    result, _ = run_relay(relay_config(workdir))
    assert result.returncode == 1
    assert result.stdout == b""
    assert result.stderr.decode() == f"vmm-orchestrator: {reason}\n"


@pytest.mark.parametrize(
    ("fail_mode", "op", "sub_op", "allowed"),
    [
        ("open", "migrate", "begin", True),
        ("closed", "migrate", "begin", False),
        ("closed", "start", "begin", True),  # only guarded operations fail closed
    ],
)
def test_nothing_listening(
    workdir: Path, fail_mode: str, op: str, sub_op: str, allowed: bool
) -> None:
    result, took = run_relay(relay_config(workdir, fail_mode=fail_mode), op=op, sub_op=sub_op)
    assert took < 5
    stderr = result.stderr.decode()
    if allowed:
        assert result.returncode == 0
        assert result.stdout == (XML.encode() if op == "migrate" else b"")
        if op == "migrate":
            assert "cannot reach" in stderr and "going on (fail-open)" in stderr
    else:
        assert result.returncode == 1
        assert result.stdout == b""
        assert "cannot reach" in stderr and "refusing (fail-closed)" in stderr


def test_a_stale_socket_file_counts_as_nothing_listening(workdir: Path) -> None:
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(workdir / "hook.sock"))
    stale.close()  # the file stays, nobody listens: ECONNREFUSED
    result, _ = run_relay(relay_config(workdir, fail_mode="closed"))
    assert result.returncode == 1
    assert "Connection refused" in result.stderr.decode()


@pytest.mark.parametrize("fail_mode", ["open", "closed"])
def test_the_deadline_is_respected(workdir: Path, serve: Any, fail_mode: str) -> None:
    release = threading.Event()

    def slow(_request: dict[str, Any]) -> dict[str, Any]:
        release.wait(10)
        return {"allow": False, "reason": "too late to matter"}

    serve(slow)
    try:
        result, took = run_relay(relay_config(workdir, deadline=0.5, fail_mode=fail_mode))
    finally:
        release.set()
    # Python start-up (~0.05 s) + the 0.5 s deadline; far below the handler's 10 s.
    assert 0.5 <= took < 2.0, took
    stderr = result.stderr.decode()
    assert "no answer within 0.5 s" in stderr
    assert result.returncode == (0 if fail_mode == "open" else 1)


def test_an_undecided_daemon_falls_under_the_fail_mode(workdir: Path, serve: Any) -> None:
    def broken(_request: dict[str, Any]) -> dict[str, Any]:
        raise RuntimeError("journal is read-only")

    serve(broken)
    result, _ = run_relay(relay_config(workdir, fail_mode="open"))
    assert result.returncode == 0
    assert result.stdout == XML.encode()
    assert "could not decide: the daemon failed: journal is read-only" in result.stderr.decode()
    result, _ = run_relay(relay_config(workdir, fail_mode="closed"))
    assert result.returncode == 1


def test_missing_config_uses_the_defaults(workdir: Path) -> None:
    # Default socket /run/vmm-orchestrator/hook.sock: nobody listens there in this test run
    # (or, if a real agent does, it answers; either way the relay must not crash).
    result, _ = run_relay(workdir / "absent.conf", op="start", sub_op="begin")
    assert result.returncode == 0
    assert b"Traceback" not in result.stderr


# -- the server side -------------------------------------------------------------------


def ask(path: Path, payload: bytes) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(str(path))
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := sock.recv(4096):
            data += chunk
    answer: dict[str, Any] = json.loads(data)
    return answer


def test_server_answers_bad_requests_as_undecided(workdir: Path, serve: Any) -> None:
    seen = serve(lambda r: {"allow": True})
    path = workdir / "hook.sock"
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert ask(path, b"not json\n") == {
        "allow": False,
        "reason": "bad request: not JSON: Expecting value: line 1 column 1 (char 0)",
        "error": True,
    }
    answer = ask(path, json.dumps({"guest": "g", "op": "", "sub_op": "begin"}).encode())
    assert answer["error"] and "'op' must be a non-empty string" in answer["reason"]
    assert ask(path, b'{"op": "ping"}\n')["allow"] is True
    assert seen == [{"op": "ping"}]


def test_server_replaces_a_stale_socket_but_not_a_live_one(workdir: Path, serve: Any) -> None:
    path = workdir / "hook.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()
    serve(lambda r: {"allow": True})
    assert ask(path, b'{"op": "ping"}\n')["allow"] is True
    other = HookServer(str(path), lambda r: {"allow": True})
    with pytest.raises(ConfigError, match="already serves hook socket"):
        other.start()
    (workdir / "file").write_text("")
    with pytest.raises(ConfigError, match="not a socket"):
        HookServer(str(workdir / "file"), lambda r: {"allow": True}).start()
