"""The hook relay's fast paths: libvirtd runs it for every qemu hook call (six per
live migration) and waits for each, so a call the agent neither guards nor is
notified of must not start Python, and the calls that do must not import more
than they need. These tests run the relay as libvirtd does (argv, XML on stdin,
almost no environment), with the interpreter it execs replaced by a wrapper
that records each start, and check that its readers (the plain-INI reader, the
JSON helpers) say exactly what configparser and json say.

Timings are printed (``pytest -s``), never asserted: the machine is shared.
"""

from __future__ import annotations

import configparser
import json
import math
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from vmm_libvirt.hook import HookServer

ROOT = Path(__file__).resolve().parents[2]
RELAY = ROOT / "etc/libvirt/hooks/qemu.d/vmm-orchestrator"
SAMPLE = ROOT / "etc/libvirt/hooks/vmm-orchestrator.conf.sample"
PYTHON = "/usr/bin/python3"
XML = "<domain type='qemu'>\n  <name>vm-é</name>\n  <uuid>6c1f5e62-2b0c</uuid>  \t</domain>"
#: What the relay hands to the agent when nothing configures it otherwise.
DEFAULT_GUARDED = {"migrate begin"}
DEFAULT_NOTIFIED = {"stopped end", "release end"}
HOOK_OPS = (
    "prepare",
    "start",
    "started",
    "stopped",
    "release",
    "migrate",
    "restore",
    "reconnect",
    "attach",
)


def relay_namespace() -> dict[str, Any]:
    """The relay's Python half as a module namespace (the file has no .py name)."""
    namespace: dict[str, Any] = {"__name__": "relay"}
    exec(compile(RELAY.read_text(), str(RELAY), "exec"), namespace)
    return namespace


class Relay:
    """A copy of the relay whose interpreter is a wrapper recording each Python start."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.marker = workdir / "python-started"
        wrapper = workdir / "python3"
        wrapper.write_text(f'#!/bin/sh\necho "$3 $4" >> {self.marker}\nexec {PYTHON} "$@"\n')
        wrapper.chmod(0o755)
        self.path = workdir / "vmm-orchestrator"
        text = RELAY.read_text()
        assert f"exec {PYTHON} -I -S" in text
        self.path.write_text(text.replace(f"exec {PYTHON} ", f"exec {wrapper} "))
        self.path.chmod(0o755)

    def run(
        self, config: Path, op: str, sub_op: str, stdin: str = XML
    ) -> tuple[subprocess.CompletedProcess[bytes], float, bool]:
        """(result, seconds, whether Python started) of one call, run as libvirtd runs it."""
        self.marker.unlink(missing_ok=True)
        start = time.monotonic()
        result = subprocess.run(
            [str(self.path), "vm-é", op, sub_op, "-"],
            input=stdin.encode("utf-8"),
            capture_output=True,
            env={"PATH": "/usr/bin:/bin", "VMM_HOOK_CONFIG": str(config)},
            timeout=20,
            check=False,
        )
        took = time.monotonic() - start
        return result, took, self.marker.exists()


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="vmmfast", dir="/tmp"))  # short: unix socket path
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def relay(workdir: Path) -> Relay:
    return Relay(workdir)


@pytest.fixture
def agent(workdir: Path) -> Iterator[Callable[..., list[dict[str, Any]]]]:
    """Serve the hook socket with a handler; returns the requests it received."""
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


def write_config(workdir: Path, **settings: str) -> Path:
    values = {"socket": str(workdir / "hook.sock"), "deadline": "2", **settings}
    path = workdir / "relay.conf"
    path.write_text("[hook_relay]\n" + "".join(f"{k} = {v}\n" for k, v in values.items()))
    return path


def wait_for(seen: list[dict[str, Any]], count: int) -> None:
    deadline = time.monotonic() + 5
    while len(seen) < count and time.monotonic() < deadline:
        time.sleep(0.02)


# -- which calls start Python ----------------------------------------------------------


@pytest.mark.parametrize("config", ["absent", "sample", "lab"])
def test_only_guarded_and_notified_calls_start_python(
    workdir: Path, relay: Relay, agent: Any, config: str
) -> None:
    """No file, the shipped sample installed as is (all comments), or a lab host's file:
    every call outside the defaults exits at once without Python or the agent."""
    seen = agent(lambda r: {"allow": True, "reason": ""})
    if config == "absent":
        path = workdir / "absent.conf"
        if (Path("/run/vmm-orchestrator/hook.sock")).exists():
            pytest.skip("an agent listens on the default socket: the defaults would reach it")
    elif config == "sample":  # as shipped, the agent's socket set at the end
        path = workdir / "relay.conf"
        path.write_text(SAMPLE.read_text() + f"\nsocket = {workdir / 'hook.sock'}\n")
    else:
        path = write_config(workdir)
    relayed = []
    for op in HOOK_OPS:
        for sub_op in ("begin", "end"):
            call = f"{op} {sub_op}"
            result, _, python = relay.run(path, op, sub_op)
            assert result.returncode == 0, (call, result.stderr)
            # migrate and restore: libvirt reads stdout back as the XML; an unchanged copy.
            assert result.stdout == (XML.encode() if op in ("migrate", "restore") else b"")
            if python:
                relayed.append(call)
            else:
                assert result.stderr == b"", (call, result.stderr)
    assert set(relayed) == DEFAULT_GUARDED | DEFAULT_NOTIFIED
    if config != "absent":
        wait_for(seen, len(relayed))
        assert {f"{r['op']} {r['sub_op']}" for r in seen} == set(relayed)


def test_the_shell_front_and_python_agree_on_the_defaults() -> None:
    defaults = relay_namespace()["DEFAULTS"]
    calls = relay_namespace()["_calls"]
    assert calls("guarded", defaults["guarded"]) == DEFAULT_GUARDED
    assert calls("notified", defaults["notified"]) == DEFAULT_NOTIFIED
    front = RELAY.read_text().split("# fmt: on", 1)[0]
    case = next(line for line in front.splitlines() if line.startswith('"migrate begin"'))
    named = {part.strip().strip('"') for part in case.split(")", 1)[0].split("|")}
    assert named == DEFAULT_GUARDED | DEFAULT_NOTIFIED


def test_a_configuration_naming_an_operation_sends_it_to_python(
    workdir: Path, relay: Relay, agent: Any
) -> None:
    seen = agent(lambda r: {"allow": False, "reason": "vetoed by the test"})
    config = write_config(workdir, guarded="migrate begin, started begin")
    result, _, python = relay.run(config, "started", "begin")
    assert python and result.returncode == 1
    assert b"vmm-orchestrator: vetoed by the test" in result.stderr  # the veto still vetoes
    result, _, python = relay.run(config, "start", "begin")
    assert python  # "start" is in "started": the front cannot tell, Python reads the file
    assert result.returncode == 0 and result.stderr == b""
    # Named only in a comment (even indented): the front skips it.
    config.write_text(
        f"[hook_relay]\nsocket = {workdir / 'hook.sock'}\n# guarded = reconnect begin\n"
        "   ; notified = attach begin\n"
    )
    for op in ("reconnect", "attach"):
        result, _, python = relay.run(config, op, "begin")
        assert (python, result.returncode) == (False, 0), op
    assert [(r["op"], r["sub_op"]) for r in seen] == [("started", "begin")]


def test_an_unreadable_configuration_goes_to_python(workdir: Path, relay: Relay) -> None:
    """A path the front cannot read line by line (here a directory): Python says why, and
    a guarded call is refused as before."""
    config = workdir / "conf.d"
    config.mkdir()
    result, _, python = relay.run(config, "prepare", "begin")
    assert python and result.returncode == 0
    assert b"going on without the agent" in result.stderr
    result, _, python = relay.run(config, "migrate", "begin")
    assert python and result.returncode == 1
    assert b"refused: configuration" in result.stderr


def test_the_xml_copied_back_without_python_is_byte_identical(workdir: Path, relay: Relay) -> None:
    odd = XML + "\n\n  \\ \x01 'quoted' \"double\" $HOME `cmd` \n"
    result, _, python = relay.run(workdir / "absent.conf", "restore", "begin", stdin=odd)
    assert (python, result.returncode) == (False, 0)
    assert result.stdout == odd.encode("utf-8")


def test_time_per_call_is_printed(workdir: Path, relay: Relay, agent: Any) -> None:
    """Median wall time of one call of each kind (printed, not asserted)."""
    agent(lambda r: {"allow": True, "reason": ""})
    config = write_config(workdir)
    figures = {}
    for label, op, sub_op, python in (
        ("unguarded, not notified (shell front)", "prepare", "begin", False),
        ("notified (python -I -S, no answer awaited)", "stopped", "end", True),
        ("guarded, allowed at once (python -I -S)", "migrate", "begin", True),
    ):
        times = []
        for _ in range(9):
            result, took, started = relay.run(config, op, sub_op)
            assert result.returncode == 0 and started == python, (label, result.stderr)
            times.append(took * 1000.0)
        figures[label] = statistics.median(times)
    print()
    for label, ms in figures.items():
        print(f"relay call, {label}: median {ms:.1f} ms over 9 calls")


# -- what the Python half imports --------------------------------------------------------

HEAVY = {"re", "json", "configparser", "socket", "enum", "collections", "selectors"}

DRIVER = """
import io, sys
namespace = {"__name__": "relay"}
exec(compile(open(sys.argv[1]).read(), sys.argv[1], "exec"), namespace)
sys.stdin, stdout, sys.stdout = io.StringIO(sys.argv[3]), sys.stdout, io.StringIO()
code = namespace["main"](["relay", "vm", *sys.argv[2].split(), "-"])
sys.stdout = stdout
print(code, " ".join(sorted(sys.modules)))
"""


@pytest.mark.parametrize("call", ["migrate begin", "stopped end"])
def test_the_hot_path_imports_no_heavy_module(workdir: Path, agent: Any, call: str) -> None:
    seen = agent(lambda r: {"allow": True, "reason": "fine"})
    config = write_config(workdir)
    done = subprocess.run(
        [PYTHON, "-I", "-S", "-c", DRIVER, str(RELAY), call, XML],
        capture_output=True,
        text=True,
        env={"VMM_HOOK_CONFIG": str(config)},
        timeout=20,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    code, modules = done.stdout.split(" ", 1)
    assert code == "0"
    assert not HEAVY & set(modules.split()), sorted(HEAVY & set(modules.split()))
    wait_for(seen, 1)
    assert [f"{r['op']} {r['sub_op']}" for r in seen] == [call]
    assert seen[0]["xml"] == XML


# -- the readers agree with the standard library -----------------------------------------

PLAIN = [
    "[hook_relay]\nsocket = /run/a.sock\ndeadline=3\n",
    "[hook_relay]\nSocket : /run/a.sock\nguarded = migrate begin, restore begin\n",
    "# comment\n; other\n\n[hook_relay]\n  # indented comment\nfail_mode = Open \nx = a = b\n",
    "[hook_relay]\ny = a: b\nz: a = b\nempty =\n\n\n[other]\nsocket = /x\n",
    "[hook_relay]\r\nsocket = /run/a.sock\r\n",
    "[DEFAULT]\nsocket = /x\n[hook_relay]\ndeadline = 1\n",
]
NOT_PLAIN = [
    "[hook_relay]\nguarded = migrate begin,\n  restore begin\n",  # continuation
    "[hook_relay]\nsocket = a\nsocket = b\n",  # duplicate key
    "[hook_relay]\nSOCKET = a\nsocket = b\n",  # duplicate after lower-casing
    "[hook_relay]\n[hook_relay]\n",  # duplicate section
    "socket = /x\n[hook_relay]\n",  # no section header yet
    "[hook_relay] = b\n",
    "[hook_relay]\nsocket\n",  # no delimiter
    "[hook_relay]\n= x\n",  # no key
    "[hook_relay]\nsocket = /run/é.sock\n",  # non-ASCII
    "[hook_relay]\nsocket =\t/x\n",  # a tab
    "  [hook_relay]\nsocket = /x\n",  # indented header
    "[ hook_relay]x\n",
]


def standard(text: str) -> dict[str, dict[str, str]] | str:
    parser = configparser.ConfigParser(interpolation=None, default_section="\0")
    try:
        parser.read_string(text)
    except configparser.Error as exc:
        return type(exc).__name__
    return {name: dict(parser[name]) for name in parser.sections()}


@pytest.mark.parametrize("text", PLAIN)
def test_the_plain_reader_reads_plain_files_as_configparser_does(text: str) -> None:
    assert relay_namespace()["_plain_sections"](text) == standard(text)


@pytest.mark.parametrize("text", NOT_PLAIN)
def test_the_plain_reader_hands_everything_else_to_configparser(workdir: Path, text: str) -> None:
    namespace = relay_namespace()
    assert namespace["_plain_sections"](text) is None
    path = workdir / "relay.conf"
    path.write_text(text, encoding="utf-8")
    expected = standard(text)
    if isinstance(expected, str):
        with pytest.raises(namespace["ConfigError"], match="cannot parse it"):
            namespace["_read_sections"](str(path))
    else:
        assert namespace["_read_sections"](str(path)) == expected


def test_the_sample_is_plain() -> None:
    """An operator's copy of the sample is read without configparser (and re)."""
    text = SAMPLE.read_text()
    active = "\n".join(
        line[1:] if line[:1] == "#" and line[1:2].isalpha() else line for line in text.splitlines()
    )
    read = relay_namespace()["_plain_sections"]
    assert read(text) == standard(text)
    assert read(active) == standard(active)
    assert set(read(active)["hook_relay"]) == set(relay_namespace()["DEFAULTS"])


REQUESTS = [
    {"guest": "vm1", "op": "migrate", "sub_op": "begin", "extra": "-", "xml": XML},
    {"guest": "vm-é\U0001f600", "op": "stopped", "sub_op": "end", "xml": 'a"b\\c\n\t\x01\x7f'},
    {"guest": "bad-\udce9-bytes", "op": "migrate", "sub_op": "begin", "expires": 81234.56789},
    {"op": "ping", "expires": 1e-05, "n": 3},
]


@pytest.mark.parametrize("request_", REQUESTS)
def test_requests_are_encoded_as_json_dumps_does(request_: dict[str, Any]) -> None:
    text = relay_namespace()["dumps"](request_)
    assert text == json.dumps(request_)
    assert json.loads(text) == request_


def test_answers_are_decoded_as_json_loads_does() -> None:
    loads = relay_namespace()["loads"]
    good = [
        '{"allow": true, "reason": ""}\n',
        ' {"allow": false, "reason": "no \\u00e9 \\ud83d\\ude00", "error": true} ',
        '{"allow": true, "host": "h1", "under_way": {"u": {"done": [1, 2.5, null]}}}',
        "[1, -2e3]",
        '"x"',
    ]
    for text in good:
        assert loads(text) == json.loads(text), text
    assert math.isnan(loads("NaN")) and math.isnan(json.loads("NaN"))
    for text in ["", "\n", "{", '{"allow": true} x', "{'allow': true}", '{"a": tru}', "[1,]"]:
        with pytest.raises(ValueError):
            json.loads(text)
        with pytest.raises(ValueError):
            loads(text)
