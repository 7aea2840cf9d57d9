"""The libvirt hook relay script, run for real as a subprocess (as libvirtd runs
it: argv, XML on stdin, almost no environment) against the daemon's
HookServer: XML passed through unchanged, vetoes, fail-open/fail-closed when
nothing answers, and the deadline; its own configuration file (the shipped
sample, refused values and keys), only guarded operations waiting for the
agent, and the trace every fail-open pass leaves on stderr and in syslog.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vmm_libvirt.hook import HookServer
from vmm_orchestrator.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
RELAY = ROOT / "etc/libvirt/hooks/qemu.d/vmm-orchestrator"
SAMPLE = ROOT / "etc/libvirt/hooks/vmm-orchestrator.conf.sample"

# Non-ASCII, odd spacing and no trailing newline: any rewriting would show.
XML = (
    "<domain type='qemu'>\n  <name>vm-é</name>\n"
    "  <uuid>6c1f5e62-2b0c-4e43-9d7a-0a0b0c0d0e01</uuid>  \t</domain>"
)


def relay_config(workdir: Path, **settings: Any) -> Path:
    values = {"socket": str(workdir / "hook.sock"), "deadline": "1.0", "fail_mode": "open"}
    values.update({k: str(v) for k, v in settings.items()})
    path = workdir / "relay.conf"
    path.write_text("[hook_relay]\n" + "".join(f"{k} = {v}\n" for k, v in values.items()))
    return path


def run_relay(
    config: Path,
    op: str = "migrate",
    sub_op: str = "begin",
    stdin: str = XML,
    wrapper: list[str] | None = None,
    lock: Path | None = None,
) -> tuple[subprocess.CompletedProcess[bytes], float]:
    """Run the relay like libvirtd does; (its result, seconds it took). ``lock``: the
    background notifications' lock (default: beside the config, never the host's)."""
    start = time.monotonic()
    lock = lock or config.parent / "hook.lock"
    result = subprocess.run(
        [*(wrapper or []), str(RELAY), "vm-é", op, sub_op, "-"],
        input=stdin.encode("utf-8"),
        capture_output=True,
        env={
            "PATH": "/usr/bin:/bin",
            "VMM_HOOK_CONFIG": str(config),
            "VMM_HOOK_LOCK": str(lock),
            "VMM_HOOK_PYC": str(config.parent / "relay.pyc"),
        },
        timeout=20,
        check=False,
    )
    return result, time.monotonic() - start


def test_relay_is_executable_a_shell_front_and_stdlib_python() -> None:
    assert os.access(RELAY, os.X_OK), f"{RELAY} must be executable (chmod 755)"
    text = RELAY.read_text()
    assert text.startswith("#!/bin/sh\n")
    assert 'exec /usr/bin/python3 -I -S "$0" "$@"' in text
    imports = {line.split()[1] for line in text.splitlines() if line.startswith("import ")}
    # Only modules built into the interpreter at the top: the rest is imported on demand.
    assert imports <= {"_socket", "math", "posix", "sys", "syslog", "time"}
    lines = [line.strip() for line in text.splitlines()]
    # _json's C halves; the bytecode loader's magic number (importlib's, loaded at start-up)
    froms = {line.split()[1] for line in lines if line.startswith("from ")}
    assert froms == {"_json", "_frozen_importlib_external"}


def test_allowed_migrate_passes_the_xml_through_unchanged(workdir: Path, serve: Any) -> None:
    seen = serve(lambda r: {"allow": True, "reason": ""})
    before = time.monotonic()
    result, _ = run_relay(relay_config(workdir))
    assert result.returncode == 0, result.stderr
    assert result.stdout == XML.encode("utf-8")
    # expires: when the relay stops waiting (CLOCK_MONOTONIC, shared across processes).
    expires = seen[0].pop("expires")
    assert before + 1.0 < expires < time.monotonic() + 1.0
    assert seen == [{"guest": "vm-é", "op": "migrate", "sub_op": "begin", "extra": "-", "xml": XML}]


def test_other_operations_print_nothing(workdir: Path, serve: Any) -> None:
    # libvirt reads stdout back only for migrate and restore; elsewhere it would be log noise.
    seen = serve(lambda r: {"allow": True})
    result, _ = run_relay(relay_config(workdir), op="stopped", sub_op="end")
    assert (result.returncode, result.stdout) == (0, b"")
    deadline = time.monotonic() + 5  # delivered in the background
    while not seen and time.monotonic() < deadline:
        time.sleep(0.02)
    assert seen[0]["op"] == "stopped" and seen[0]["xml"] == XML
    assert "expires" not in seen[0]  # nobody waits for the answer of an unguarded call
    result, _ = run_relay(relay_config(workdir), op="started", sub_op="begin")
    assert (result.returncode, result.stdout, result.stderr) == (0, b"", b"")


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


# -- its own configuration file ----------------------------------------------------------


def sample_settings() -> dict[str, str]:
    """The commented-out ``key = value`` lines of the shipped sample."""
    settings = {}
    for line in SAMPLE.read_text().splitlines():
        if line.startswith("#") and " = " in line and not line.startswith("# "):
            key, value = line[1:].split(" = ", 1)
            settings[key.strip()] = value.strip()
    return settings


def load(path: Path) -> dict[str, Any]:
    """The relay's own load_config (the script is stdlib Python without a .py name)."""
    namespace: dict[str, Any] = {"__name__": "relay"}
    exec(compile(RELAY.read_text(), str(RELAY), "exec"), namespace)
    settings: dict[str, Any] = namespace["load_config"](str(path))
    return settings


def test_the_sample_documents_every_key_with_the_defaults(workdir: Path) -> None:
    text = SAMPLE.read_text()
    assert "[hook_relay]" in text
    shown = sample_settings()
    namespace: dict[str, Any] = {"__name__": "relay"}
    exec(compile(RELAY.read_text(), str(RELAY), "exec"), namespace)
    assert shown == namespace["DEFAULTS"]
    # Uncommented, the sample is a valid configuration that means the defaults.
    active = workdir / "sample.conf"
    active.write_text(
        "\n".join(
            line[1:] if line[:1] == "#" and line[1:2].isalpha() else line
            for line in text.splitlines()
        )
    )
    assert load(active) == load(workdir / "absent.conf")
    assert load(active)["guarded"] == {"migrate begin"}


BAD_CONFIGS = [
    ({"deadline": "nan"}, "deadline = nan is out of range"),
    ({"deadline": "inf"}, "deadline = inf is out of range"),
    ({"deadline": "-1"}, "deadline = -1 is out of range: give seconds from 0.05 to 10"),
    ({"deadline": "0"}, "deadline = 0 is out of range"),
    ({"deadline": "3600"}, "deadline = 3600 is out of range: give seconds from 0.05 to 10"),
    ({"deadline": "2s"}, "deadline = '2s' is not a number of seconds"),
    ({"notify_deadline": "5"}, "notify_deadline = 5 is out of range"),
    ({"fail_mode": "opne"}, "fail_mode = 'opne' is not one of open, closed"),
    ({"fail_mode": ""}, "fail_mode = '' is not one of open, closed"),
    ({"failmode": "closed"}, "unknown key(s) failmode in [hook_relay]"),
    ({"guarded": "migrate"}, "guarded entry 'migrate' is not '<operation> <sub-operation>'"),
]


@pytest.mark.parametrize(("settings", "message"), BAD_CONFIGS)
def test_a_bad_configuration_refuses_guarded_calls_at_once_and_lets_others_go_on(
    workdir: Path, serve: Any, settings: dict[str, str], message: str
) -> None:
    seen = serve(lambda r: {"allow": True})
    config = relay_config(workdir, **settings)
    result, took = run_relay(config)
    stderr = result.stderr.decode()
    assert result.returncode == 1 and result.stdout == b"", stderr
    assert "Traceback" not in stderr
    assert f"vm-é migrate begin: refused: configuration {config}: {message}" in stderr
    assert took < 1.5, took
    # Delivered before exiting (no lock for the background): the trace is on stderr too.
    result, took = run_relay(config, op="stopped", sub_op="end", lock=workdir / "no/lock")
    stderr = result.stderr.decode()
    assert result.returncode == 0, stderr
    assert f"going on without the agent: configuration {config}: {message}" in stderr
    assert took < 1.5, took
    # A call the relay neither guards nor notifies never reads the file: it goes on.
    result, _ = run_relay(config, op="start", sub_op="begin")
    assert (result.returncode, result.stdout, result.stderr) == (0, b"", b"")
    assert seen == []  # a configuration it cannot use: the relay asks nobody


def test_a_file_without_the_section_or_unparsable_is_refused(workdir: Path) -> None:
    config = workdir / "relay.conf"
    config.write_text("[agent]\nhook_socket = /run/x.sock\n")
    result, _ = run_relay(config)
    assert result.returncode == 1
    assert "it has no [hook_relay] section" in result.stderr.decode()
    config.write_text("[hook_relay]\ndeadline = 1\ndeadline = 2\n")
    result, _ = run_relay(config)
    assert result.returncode == 1
    assert "cannot parse it: While reading from" in result.stderr.decode()


def test_the_largest_deadline_and_any_case_fail_mode_are_accepted(workdir: Path) -> None:
    settings = load(relay_config(workdir, deadline="10", fail_mode=" Closed "))
    assert (settings["deadline"], settings["fail_mode"]) == (10.0, "closed")


def test_check_validates_the_file_and_pings_the_agent(workdir: Path, serve: Any) -> None:
    env = {"PATH": "/usr/bin:/bin", "VMM_HOOK_CONFIG": str(relay_config(workdir))}
    run = [str(RELAY), "--check"]
    result = subprocess.run(run, capture_output=True, env=env, timeout=20, check=False)
    assert result.returncode == 1 and b"cannot reach" in result.stderr
    serve(lambda r: {"allow": True, "reason": "host h1"})
    result = subprocess.run(run, capture_output=True, env=env, timeout=20, check=False)
    assert result.returncode == 0, result.stderr
    assert b"host h1" in result.stdout
    env["VMM_HOOK_CONFIG"] = str(relay_config(workdir, fail_mode="shut"))
    result = subprocess.run(run, capture_output=True, env=env, timeout=20, check=False)
    assert result.returncode == 1 and b"fail_mode = 'shut'" in result.stderr


# -- only guarded operations wait --------------------------------------------------------


def test_a_hung_agent_delays_only_guarded_operations(workdir: Path, serve: Any) -> None:
    release = threading.Event()

    def hung(_request: dict[str, Any]) -> dict[str, Any]:
        release.wait(10)
        return {"allow": True}

    seen = serve(hung)
    config = relay_config(workdir, deadline=2.0)
    try:
        for op, sub_op in (("prepare", "begin"), ("start", "begin"), ("release", "end")):
            result, took = run_relay(config, op=op, sub_op=sub_op)
            assert result.returncode == 0, result.stderr
            assert took < 1.0, (op, took)  # Python start-up, the send; never the 2 s deadline
        result, took = run_relay(config)  # migrate begin: guarded
        assert took >= 2.0, took
        assert b"no answer within 2 s; going on (fail-open)" in result.stderr
    finally:
        release.set()
    # The agent was told of the notified call all the same (it learns of aborts from it).
    deadline = time.monotonic() + 5
    while len(seen) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [(r["op"], r["sub_op"]) for r in seen] == [("release", "end"), ("migrate", "begin")]


def test_guarded_operations_are_configurable(workdir: Path, serve: Any) -> None:
    seen = serve(lambda r: {"allow": False, "reason": "no"})
    config = relay_config(workdir, guarded="migrate begin, restore begin")
    result, _ = run_relay(config, op="restore", sub_op="begin")
    assert result.returncode == 1 and b"vmm-orchestrator: no" in result.stderr
    result, _ = run_relay(config, op="start", sub_op="begin")  # not guarded: never refused
    assert result.returncode == 0
    assert [r["op"] for r in seen] == ["restore"]  # nor notified: the agent is not told
    config = relay_config(workdir, guarded="migrate begin", notified="start begin")
    result, _ = run_relay(config, op="start", sub_op="begin")
    assert result.returncode == 0
    result, _ = run_relay(config, op="stopped", sub_op="end")  # no longer notified
    assert result.returncode == 0
    assert [r["op"] for r in seen] == ["restore", "start"]
    assert "expires" not in seen[-1]


# -- traces: stderr and syslog -----------------------------------------------------------


@pytest.fixture
def syslog_socket(workdir: Path) -> Iterator[tuple[list[str], socket.socket]]:
    """A datagram socket standing in for /dev/log, and a wrapper that runs the relay in a
    private mount namespace where /dev is a directory holding only that socket."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare(1) to give the relay a private /dev/log")
    dev = workdir / "dev"
    dev.mkdir()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(dev / "log"))
    sock.settimeout(0.5)
    wrapper = [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        'mount --bind "$0" /dev && exec "$@"',
        str(dev),
    ]
    try:
        yield wrapper, sock
    finally:
        sock.close()


def received(sock: socket.socket) -> list[str]:
    lines = []
    with contextlib.suppress(TimeoutError):
        while True:
            lines.append(sock.recv(65536).decode("utf-8", "replace"))
    return lines


def test_every_fail_open_pass_is_traced_in_syslog_and_on_stderr(
    workdir: Path, syslog_socket: tuple[list[str], socket.socket]
) -> None:
    wrapper, sock = syslog_socket
    result, _ = run_relay(relay_config(workdir, fail_mode="open"), wrapper=wrapper)
    assert result.returncode == 0, result.stderr
    assert result.stdout == XML.encode()
    stderr = result.stderr.decode()
    assert "vm-é migrate begin: cannot reach" in stderr and "going on (fail-open)" in stderr
    logged = received(sock)
    assert len(logged) == 1, logged
    # <28>: facility daemon (3 << 3) + warning (4); the identifier journalctl -t selects.
    assert logged[0].startswith("<28>"), logged
    assert "vmm-orchestrator-hook[" in logged[0]
    assert "vm-é migrate begin: cannot reach" in logged[0]
    assert logged[0].rstrip("\x00\n").endswith("going on (fail-open)")


def test_refusals_and_configuration_errors_are_traced_in_syslog_too(
    workdir: Path, serve: Any, syslog_socket: tuple[list[str], socket.socket]
) -> None:
    wrapper, sock = syslog_socket
    result, _ = run_relay(relay_config(workdir, fail_mode="ajar"), wrapper=wrapper)
    assert result.returncode == 1
    logged = received(sock)
    assert len(logged) == 1 and logged[0].startswith("<27>"), logged  # daemon.err
    assert "fail_mode = 'ajar' is not one of open, closed" in logged[0]
    serve(lambda r: {"allow": False, "reason": "10.0.0.5 is held"})
    result, _ = run_relay(relay_config(workdir), wrapper=wrapper)
    assert result.returncode == 1
    assert result.stderr.decode() == "vmm-orchestrator: 10.0.0.5 is held\n"
    logged = received(sock)
    assert len(logged) == 1 and "refused by the agent: 10.0.0.5 is held" in logged[0], logged


# -- a hung agent, a stopping agent ------------------------------------------------------


def test_a_request_read_after_the_relay_gave_up_is_not_handled(workdir: Path) -> None:
    """The agent hung (it accepts nothing) while libvirt asked; the relay gave up and went
    on alone; once the agent reads the request, it must not run PREPARE for it."""
    hung = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    hung.bind(str(workdir / "hook.sock"))
    hung.listen(8)  # the kernel queues the relay's connection; nobody reads it
    try:
        result, _ = run_relay(relay_config(workdir, deadline=0.3, fail_mode="open"))
        assert result.returncode == 0 and b"no answer within 0.3 s" in result.stderr
        conn, _ = hung.accept()  # the agent resumes
        with conn:
            conn.settimeout(2)
            data = HookServer._read(conn)
    finally:
        hung.close()
    handled: list[dict[str, Any]] = []

    def handle(request: dict[str, Any]) -> dict[str, Any]:
        handled.append(request)
        return {"allow": True}

    server = HookServer(str(workdir / "unused.sock"), handle)
    answer = server.answer(data)
    assert handled == []
    assert answer["allow"] is False and answer["error"] is True
    assert "relay stopped waiting" in answer["reason"]
    # The same request read in time is handled as usual.
    fresh = json.loads(data)
    fresh["expires"] = time.monotonic() + 5
    assert server.answer(json.dumps(fresh).encode())["allow"] is True
    assert len(handled) == 1


def test_an_allow_the_relay_no_longer_waited_for_is_abandoned(workdir: Path) -> None:
    abandoned: list[tuple[dict[str, Any], dict[str, Any]]] = []
    done = threading.Event()

    def slow(_request: dict[str, Any]) -> dict[str, Any]:
        time.sleep(0.6)  # longer than the relay waits
        return {"allow": True, "reason": "migration m1 prepared"}

    def on_abandoned(request: dict[str, Any], answer: dict[str, Any]) -> None:
        abandoned.append((request, answer))
        done.set()

    server = HookServer(str(workdir / "hook.sock"), slow, on_abandoned=on_abandoned)
    server.start()
    try:
        result, _ = run_relay(relay_config(workdir, deadline=0.3, fail_mode="closed"))
        assert result.returncode == 1 and b"refusing (fail-closed)" in result.stderr
        assert done.wait(5), "on_abandoned was never called"
    finally:
        server.stop()
    request, answer = abandoned[0]
    assert (request["op"], request["sub_op"], request["guest"]) == ("migrate", "begin", "vm-é")
    assert answer["reason"] == "migration m1 prepared"


def test_a_refusal_an_answer_in_time_or_a_notification_is_never_abandoned(
    workdir: Path,
) -> None:
    abandoned: list[Any] = []
    answers: Iterator[dict[str, Any]] = iter(
        [{"allow": True}, {"allow": False, "reason": "no"}, {"allow": True}]
    )

    def handle(request: dict[str, Any]) -> dict[str, Any]:
        if request["op"] == "release":
            time.sleep(0.3)  # the relay is long gone when the answer is sent
        return next(answers)

    server = HookServer(
        str(workdir / "hook.sock"), handle, on_abandoned=lambda r, a: abandoned.append(r)
    )
    server.start()
    try:
        assert run_relay(relay_config(workdir))[0].returncode == 0
        assert run_relay(relay_config(workdir))[0].returncode == 1
        # An unguarded call: the relay hands it over and closes without reading the answer.
        assert run_relay(relay_config(workdir), op="release", sub_op="end")[0].returncode == 0
    finally:
        server.stop()  # waits for the release call's handler
    assert abandoned == []


def test_stopping_waits_for_a_request_under_way(workdir: Path) -> None:
    started = threading.Event()

    def prepare(_request: dict[str, Any]) -> dict[str, Any]:
        started.set()
        time.sleep(0.5)
        return {"allow": True, "reason": "prepared"}

    server = HookServer(str(workdir / "hook.sock"), prepare, timeout=5.0)
    server.start()
    outcome: list[subprocess.CompletedProcess[bytes]] = []
    relay = threading.Thread(
        target=lambda: outcome.append(run_relay(relay_config(workdir, deadline=3))[0])
    )
    relay.start()
    assert started.wait(5)
    assert server.in_flight == 1
    server.stop()  # SIGTERM in the middle of a PREPARE: it finishes and is answered
    assert server.in_flight == 0
    relay.join(10)
    assert outcome[0].returncode == 0, outcome[0].stderr
    assert outcome[0].stderr == b""  # the agent's answer, no fail-open pass
    assert not (workdir / "hook.sock").exists()


def test_the_server_refuses_a_malformed_expires(workdir: Path) -> None:
    server = HookServer(str(workdir / "unused.sock"), lambda r: {"allow": True})
    request = {"guest": "g", "op": "migrate", "sub_op": "begin", "expires": "soon"}
    answer = server.answer(json.dumps(request).encode())
    assert answer["error"] and "'expires' must be a number" in answer["reason"]


@pytest.mark.parametrize(
    ("op", "sub_op", "status"), [("stopped", "end", 0), ("migrate", "begin", 1)]
)
def test_a_failing_relay_never_stops_a_vm(
    workdir: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    op: str,
    sub_op: str,
    status: int,
) -> None:
    """A bug in the relay itself: an unguarded call still goes on (libvirt would stop the
    VM on a failing "started" hook, or fail its shutdown); a guarded one is refused, with
    the reason."""
    namespace: dict[str, Any] = {"__name__": "relay"}
    exec(compile(RELAY.read_text(), str(RELAY), "exec"), namespace)

    def broken(*_args: Any, **_kwargs: Any) -> Any:
        raise KeyError("boom")

    namespace["notify"] = broken
    namespace["ask"] = broken
    monkeypatch.setenv("VMM_HOOK_CONFIG", str(relay_config(workdir)))
    monkeypatch.setattr("sys.stdin", io.StringIO(XML))
    assert namespace["run"](["relay", "vm-é", op, sub_op, "-"]) == status
    verdict = "refusing" if status else "going on"
    err = capsys.readouterr().err
    assert f"vm-é {op} {sub_op}: the relay failed (KeyError: 'boom'); {verdict}" in err
