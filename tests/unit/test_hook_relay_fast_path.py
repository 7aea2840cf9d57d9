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
import importlib.util
import json
import marshal
import math
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from vmm_libvirt.marks import IncomingMarks

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
    """A copy of the relay whose interpreter is a wrapper that logs when each Python
    starts and ends ("start <op> <sub-op>", "end <op> <sub-op>"), optionally sleeping
    ``delay`` seconds first for one call (a slow start on a loaded host)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.log = workdir / "python.log"
        self.lock = workdir / "hook.lock"
        self.wrapper = workdir / "python3"
        self.slow(None, 0.0)
        self.path = workdir / "vmm-orchestrator"
        text = RELAY.read_text()
        assert f"{PYTHON} -I -S" in text
        self.path.write_text(text.replace(f"{PYTHON} -I -S", f"{self.wrapper} -I -S"))
        self.path.chmod(0o755)

    def slow(self, calls: set[str] | None, delay: float) -> None:
        """Make Python start ``delay`` seconds late for ``calls`` ("<op> <sub-op>")."""
        pattern = " | ".join(f'"{c}"' for c in sorted(calls or {"none"}))
        self.wrapper.write_text(
            "#!/bin/sh\n"  # argv: -I -S [-c <loader>] <relay> <guest> <op> <sub-op> <extra>
            'if [ "$3" = -c ]; then op="$7 $8"; else op="$5 $6"; fi\n'
            f'echo "start $op" >> {self.log}\n'
            f'case "$op" in {pattern}) sleep {delay} ;; esac\n'
            f'{PYTHON} "$@"\n'
            "status=$?\n"
            f'echo "end $op" >> {self.log}\n'
            "exit $status\n"
        )
        self.wrapper.chmod(0o755)

    def pythons(self, what: str = "start") -> list[str]:
        """The calls whose Python started (or ended), in order."""
        if not self.log.exists():
            return []
        lines = self.log.read_text().splitlines()
        return [line.split(" ", 1)[1] for line in lines if line.startswith(what + " ")]

    def run(
        self, config: Path, op: str, sub_op: str, stdin: str = XML, lock: Path | None = None
    ) -> tuple[subprocess.CompletedProcess[bytes], float, bool]:
        """(result, seconds, whether a Python ran to its end before it returned) of one
        call, run as libvirtd runs it."""
        call = f"{op} {sub_op}"
        ended = self.pythons("end").count(call)
        env = {
            "PATH": "/usr/bin:/bin",
            "VMM_HOOK_CONFIG": str(config),
            "VMM_HOOK_LOCK": str(lock or self.lock),
            "VMM_HOOK_PYC": str(self.workdir / "relay.pyc"),
        }
        start = time.monotonic()
        result = subprocess.run(
            [str(self.path), "vm-é", op, sub_op, "-"],
            input=stdin.encode("utf-8"),
            capture_output=True,
            env=env,
            timeout=20,
            check=False,
        )
        took = time.monotonic() - start
        return result, took, self.pythons("end").count(call) > ended


@pytest.fixture
def relay(workdir: Path) -> Relay:
    return Relay(workdir)


@pytest.fixture
def agent(serve: Callable[..., list[dict[str, Any]]]) -> Callable[..., list[dict[str, Any]]]:
    """The agent's hook socket (tests/unit/conftest.py ``serve``)."""
    return serve


def write_config(workdir: Path, name: str = "relay.conf", **settings: str) -> Path:
    values = {"socket": str(workdir / "hook.sock"), "deadline": "2", **settings}
    path = workdir / name
    path.write_text("[hook_relay]\n" + "".join(f"{k} = {v}\n" for k, v in values.items()))
    return path


def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.02)
    return condition()


def wait_for(seen: list[dict[str, Any]], count: int) -> None:
    wait_until(lambda: len(seen) >= count)


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
    relay.slow(DEFAULT_NOTIFIED, 1.0)  # a Python libvirtd waited for would show
    waited = []
    for op in HOOK_OPS:
        for sub_op in ("begin", "end"):
            call = f"{op} {sub_op}"
            result, _, python = relay.run(path, op, sub_op)
            assert result.returncode == 0, (call, result.stderr)
            # migrate and restore: libvirt reads stdout back as the XML; an unchanged copy.
            assert result.stdout == (XML.encode() if op in ("migrate", "restore") else b"")
            if python:
                waited.append(call)
            else:
                assert result.stderr == b"", (call, result.stderr)
    assert waited == ["migrate begin"]  # only the guarded call makes libvirtd wait for Python
    # The notified calls started a Python all the same, in the background; no other did.
    relayed = DEFAULT_GUARDED | DEFAULT_NOTIFIED
    assert wait_until(lambda: set(relay.pythons("end")) == relayed), relay.pythons("end")
    assert sorted(relay.pythons("start")) == sorted(relayed)
    if config != "absent":
        wait_for(seen, 3)
        assert {f"{r['op']} {r['sub_op']}" for r in seen} == DEFAULT_GUARDED | DEFAULT_NOTIFIED


def test_the_shell_front_and_python_agree_on_the_defaults() -> None:
    defaults = relay_namespace()["DEFAULTS"]
    calls = relay_namespace()["_calls"]
    assert calls("guarded", defaults["guarded"]) == DEFAULT_GUARDED
    assert calls("notified", defaults["notified"]) == DEFAULT_NOTIFIED
    front = RELAY.read_text().split("# fmt: on", 1)[0]
    cases = [line.split(")", 1)[0] for line in front.splitlines() if line.startswith('"')]
    named = [{part.strip().strip('"') for part in case.split("|")} for case in cases]
    assert named == [DEFAULT_GUARDED, DEFAULT_NOTIFIED]
    assert f"sock={defaults['socket']}\n" in front  # where both look for the marks


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


@pytest.mark.parametrize(
    "spelling", ["socket = {}", "socket={}  ", "  socket\t=\t{}", "socket: {}\r"]
)
def test_end_calls_of_a_guest_not_coming_in_go_on_without_python(
    workdir: Path, relay: Relay, agent: Any, spelling: str
) -> None:
    """While the agent keeps its marks (<socket>.incoming/), "stopped end" and
    "release end" of a guest it did not let migrate in (a source after every
    migration) go on at once; a marked guest's still reach the agent."""
    seen = agent(lambda r: {"allow": True, "reason": ""})
    config = workdir / "relay.conf"
    config.write_text("[hook_relay]\n" + spelling.format(workdir / "hook.sock") + "\n")
    marks = IncomingMarks(str(workdir / "hook.sock"))
    marks.open()
    try:
        for sub in (("stopped", "end"), ("release", "end")):
            result, _, _ = relay.run(config, *sub)
            assert (result.returncode, result.stdout, result.stderr) == (0, b"", b"")
        assert relay.pythons("start") == []  # not even in the background
        marks.mark("m-1", "vm-é")
        for sub in (("stopped", "end"), ("release", "end")):
            result, _, _ = relay.run(config, *sub)
            assert result.returncode == 0
        wait_for(seen, 2)  # each from a Python in the background: either may come first
        assert sorted((r["op"], r["sub_op"], r["guest"]) for r in seen) == [
            ("release", "end", "vm-é"),
            ("stopped", "end", "vm-é"),
        ]
        marks.unmark("m-1")  # it resumed here
        relay.run(config, "release", "end")
        assert len(relay.pythons("start")) == 2
    finally:
        marks.close()
    # No directory (the agent stopped, or an older one): forwarded as before.
    relay.run(config, "release", "end")
    wait_for(seen, 3)
    assert sorted(r["op"] for r in seen) == ["release", "release", "stopped"]


def cache_header(relay: Path) -> bytes:
    """What the relay's bytecode cache starts with: the magic number of the Python
    that wrote it (the system's, which the test's virtual environment runs too),
    then the relay file's mtime and ctime (ns), size and inode."""
    stat = relay.stat()
    return importlib.util.MAGIC_NUMBER + b"".join(
        n.to_bytes(8, "little")
        for n in (stat.st_mtime_ns, stat.st_ctime_ns, stat.st_size, stat.st_ino)
    )


@pytest.mark.parametrize(
    "text",
    [
        "[hook_relay]\nSocket = {sock}\n",  # the Python half lowercases keys
        "[hook_relay]\nsocket = {sock}\n[other]\nsocket = {other}\n",
        "[DEFAULT]\nsocket = {sock}\n[hook_relay]\n",
        "[hook_relay]\nsocketx = {sock}\n",
        "socket = {sock}\n",  # no section: the Python half refuses the file
    ],
)
def test_end_calls_are_forwarded_when_the_front_is_unsure_of_the_socket(
    workdir: Path, relay: Relay, text: str
) -> None:
    """The front skips an end call only when it read ``socket`` exactly as the Python
    half does; any other spelling or section makes it forward, whatever marks exist."""
    other = workdir / "other.sock"
    for path in (workdir / "hook.sock", other):
        IncomingMarks(str(path)).open()  # both directories exist, neither marks the guest
    config = workdir / "relay.conf"
    config.write_text(text.format(sock=workdir / "hook.sock", other=other))
    result, _, _ = relay.run(config, "release", "end")
    assert result.returncode == 0
    assert wait_until(lambda: relay.pythons("start") == ["release end"]), relay.pythons("start")


def test_python_runs_the_relay_from_its_bytecode_cache_while_it_matches(
    workdir: Path, relay: Relay, agent: Any
) -> None:
    """Compiling the relay costs 3 ms of every Python start: the cache keeps its bytecode."""
    seen = agent(lambda r: {"allow": True, "reason": ""})
    config = write_config(workdir)
    pyc = workdir / "relay.pyc"
    result, _, _ = relay.run(config, "migrate", "begin")
    assert result.returncode == 0, result.stderr
    assert pyc.read_bytes().startswith(cache_header(relay.path))
    # A cache that matches is run as it is (here: other code, under the same header).
    other = compile("import sys; sys.stdout.write('from the cache'); sys.exit(0)", "x", "exec")
    pyc.write_bytes(cache_header(relay.path) + marshal.dumps(other))
    result, _, _ = relay.run(config, "migrate", "begin")
    assert (result.returncode, result.stdout) == (0, b"from the cache")
    # Compiled again and rewritten, never a failed call: a changed relay (another
    # size and mtime), a cache with the right header that holds no bytecode, or
    # other data than code, or that another user may write.
    relay.path.write_text(relay.path.read_text() + "# changed\n")
    spoiled = [
        cache_header(relay.path) + b"not bytecode",
        cache_header(relay.path) + marshal.dumps(42),
        cache_header(relay.path) + marshal.dumps(other),
    ]
    for bad in [*spoiled, None]:
        result, _, _ = relay.run(config, "migrate", "begin")
        assert (result.returncode, result.stdout, result.stderr) == (0, XML.encode(), b"")
        assert pyc.read_bytes().startswith(cache_header(relay.path))
        if bad is not None:
            pyc.write_bytes(bad)
            pyc.chmod(0o666 if bad is spoiled[-1] else 0o644)
    assert len(seen) == 5  # each run of the relay's own code asked the agent
    left = sorted(p.name for p in workdir.iterdir() if p.name.startswith("relay.pyc"))
    assert left == ["relay.pyc"]  # no temporary file


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


# -- notifications in the background --------------------------------------------------


def test_check_says_how_notifications_are_delivered(workdir: Path, agent: Any) -> None:
    agent(lambda r: {"allow": True, "reason": "host h1"})
    config = write_config(workdir)
    for lock, expected in (
        (workdir / "hook.lock", b"notifications: delivered in the background"),
        (workdir / "missing/hook.lock", b"notifications: delivered before libvirt goes on"),
    ):
        env = {"PATH": "/usr/bin:/bin", "VMM_HOOK_CONFIG": str(config), "VMM_HOOK_LOCK": str(lock)}
        done = subprocess.run(
            [str(RELAY), "--check"], capture_output=True, env=env, timeout=20, check=False
        )
        assert done.returncode == 0, done.stderr
        assert expected in done.stdout, done.stdout


def test_a_guarded_call_waits_for_notifications_still_under_way(
    workdir: Path, relay: Relay, agent: Any
) -> None:
    """A failed incoming migration's "stopped end" (its Python 0.5 s slow to start here) is
    handled by the agent before the next migration's "migrate begin", which waits for it
    (up to half its 4 s deadline)."""
    seen = agent(lambda r: {"allow": True, "reason": ""})
    config = write_config(workdir, deadline="4")
    relay.slow({"stopped end"}, 0.5)
    result, _, python = relay.run(config, "stopped", "end")
    assert (result.returncode, python) == (0, False)  # libvirtd did not wait for it
    result, took, _ = relay.run(config, "migrate", "begin")
    assert result.returncode == 0, result.stderr
    assert result.stdout == XML.encode()
    assert [(r["op"], r["sub_op"]) for r in seen] == [("stopped", "end"), ("migrate", "begin")]
    print(f"\nmigrate begin waited for the slow notification: {took * 1000:.0f} ms")


def test_the_wait_for_notifications_is_bounded(workdir: Path, relay: Relay, agent: Any) -> None:
    """At most half the deadline: a stuck notification never turns into a veto."""
    seen = agent(lambda r: {"allow": True, "reason": ""})
    config = write_config(workdir, deadline="1.0", fail_mode="closed")
    relay.slow({"release end"}, 4.0)
    result, _, _ = relay.run(config, "release", "end")
    assert result.returncode == 0
    result, _, _ = relay.run(config, "migrate", "begin")
    assert result.returncode == 0, result.stderr  # asked, and allowed, within the deadline
    assert b"notifications still under way after 0.5" in result.stderr
    assert [(r["op"], r["sub_op"]) for r in seen] == [("migrate", "begin")]
    assert wait_until(lambda: len(seen) == 2, 10)
    assert (seen[1]["op"], seen[1]["sub_op"]) == ("release", "end")


def test_a_large_xml_reaches_the_agent_from_the_background(
    workdir: Path, relay: Relay, agent: Any
) -> None:
    """Larger than a pipe's buffer: libvirtd's write waits for the background Python to
    read it (no deadlock), and the agent gets all of it."""
    seen = agent(lambda r: {"allow": True, "reason": ""})
    big = XML + "<!--" + "x" * 300_000 + "-->"
    result, _, _ = relay.run(write_config(workdir), "stopped", "end", stdin=big)
    assert result.returncode == 0
    assert wait_until(lambda: len(seen) == 1)
    assert seen[0]["xml"] == big


def test_without_the_lock_notifications_are_delivered_before_exiting(
    workdir: Path, relay: Relay, agent: Any
) -> None:
    seen = agent(lambda r: {"allow": True, "reason": ""})
    result, _, python = relay.run(
        write_config(workdir), "stopped", "end", lock=workdir / "missing/dir/hook.lock"
    )
    assert (result.returncode, python) == (0, True)  # sent before it exited
    assert wait_until(lambda: len(seen) == 1)  # the agent's thread may take a moment
    assert [(r["op"], r["sub_op"]) for r in seen] == [("stopped", "end")]


def test_time_per_call_is_printed(workdir: Path, relay: Relay, agent: Any) -> None:
    """Median wall time of one call of each kind (printed, not asserted)."""
    agent(lambda r: {"allow": True, "reason": ""})
    config = write_config(workdir)
    cfg = {"prepare": config, "stopped": config, "migrate": config}
    cfg["attach"] = write_config(workdir, notified="attach begin", name="attach.conf")
    figures = {}
    for label, op, sub_op in (
        ("unguarded, not notified (shell front)", "prepare", "begin"),
        ("notified (shell front, Python in the background)", "stopped", "end"),
        ("notified, no lock (python -I -S)", "attach", "begin"),
        ("guarded, allowed at once (python -I -S)", "migrate", "begin"),
    ):
        lock = workdir / "no/lock" if op == "attach" else None
        times = []
        for _ in range(9):
            result, took, _ = relay.run(cfg[op], op, sub_op, lock=lock)
            assert result.returncode == 0, (label, result.stderr)
            times.append(took * 1000.0)
            # Nothing left running in the background to load the next call.
            starts = relay.pythons("start")
            assert wait_until(lambda starts=starts: len(relay.pythons("end")) >= len(starts))
        figures[label] = statistics.median(times)
    print()
    for label, ms in figures.items():
        print(f"relay call, {label}: median {ms:.1f} ms over 9 calls")


# -- what the Python half imports --------------------------------------------------------

#: os too: its import (and _collections_abc) was 2 ms of a 15 ms call.
HEAVY = {"re", "json", "configparser", "socket", "enum", "collections", "selectors", "os"}

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
