"""`vmm lab cleanup` against real network namespaces (needs root and iproute2).

Each test uses its own prefix shaped like the lab's (topology.new_prefix),
so parallel runs never touch each other's namespaces; whatever a test
leaves is deleted in the fixture's finalizer.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.functional

VMM = str(Path(sys.executable).parent / "vmm")


def netns() -> set[str]:
    try:
        return set(os.listdir("/run/netns"))
    except FileNotFoundError:
        return set()


def ip(*args: str) -> None:
    res = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20)
    assert res.returncode == 0, f"ip {' '.join(args)}: {res.stderr}"


def vmm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([VMM, *args], capture_output=True, text=True, timeout=60)


def one_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("vmm: error: "), lines[0]
    return lines[0]


@pytest.fixture
def namespaces() -> Iterator[list[str]]:
    """Names the test creates (append before ``ip netns add``); all deleted afterwards."""
    made: list[str] = []
    yield made
    for name in made:
        if name in netns():
            subprocess.run(["ip", "netns", "pids", name], capture_output=True, check=False)
            subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)


def add(namespaces: list[str], name: str) -> str:
    namespaces.append(name)
    ip("netns", "add", name)
    return name


def lab_prefix() -> str:
    return f"vmm{os.getpid() % 10000:04d}{secrets.token_hex(2)}"


def test_cleanup_removes_a_run_and_its_modes(namespaces: list[str]) -> None:
    prefix = lab_prefix()
    gone = [
        add(namespaces, f"{prefix}-x"),
        add(namespaces, f"{prefix}-y"),
        add(namespaces, f"{prefix}o-h1"),  # the orchestrated mode's lab of the same run
    ]
    kept = add(namespaces, f"{prefix}x-keep")  # another prefix that merely starts alike
    sleeper = subprocess.Popen(["ip", "netns", "exec", gone[0], "sleep", "300"])
    try:
        res = vmm("lab", "cleanup", prefix)
        assert res.returncode == 0, res.stderr
        assert res.stderr == ""
        assert f"removed {len(gone)} namespace(s)" in res.stdout
        left = netns()
        assert not left & set(gone)
        assert kept in left
        # A process left in a lab namespace is killed, not orphaned.
        assert sleeper.wait(timeout=10) != 0
    finally:
        if sleeper.poll() is None:
            sleeper.kill()
            sleeper.wait()


def test_cleanup_of_one_mode_leaves_the_others(namespaces: list[str]) -> None:
    prefix = lab_prefix()
    none_mode = add(namespaces, f"{prefix}n-h1")
    rarp_mode = add(namespaces, f"{prefix}r-h1")
    res = vmm("lab", "cleanup", f"{prefix}n")
    assert res.returncode == 0, res.stderr
    assert "removed 1 namespace(s)" in res.stdout
    left = netns()
    assert none_mode not in left
    assert rarp_mode in left


def test_cleanup_with_nothing_to_remove(namespaces: list[str]) -> None:
    res = vmm("lab", "cleanup", lab_prefix())
    assert res.returncode == 0, res.stderr
    assert "no namespace of lab prefix" in res.stdout


@pytest.mark.parametrize(
    "make_prefix",
    [
        lambda p: f"t{p[3:]}",  # not starting with vmm
        lambda p: "vmm",  # would match every vmm-* namespace
        lambda p: p[:7],  # too short
        lambda p: p[:7] + "zzzz",  # not hex
        lambda p: p + "x",  # not a mode letter
        lambda p: f"{p}-x",  # a namespace name, not a prefix
        lambda p: "../" + p,
    ],
    ids=["other-name", "bare-vmm", "short", "not-hex", "bad-mode-letter", "with-dash", "path"],
)
def test_cleanup_refuses_what_is_not_a_lab_prefix(
    namespaces: list[str], make_prefix: Callable[[str], str]
) -> None:
    base = lab_prefix()
    prefix = make_prefix(base)
    # Ours only: other runs' namespaces come and go in /run/netns meanwhile.
    victims = [add(namespaces, f"{base}-x")]
    if "/" not in prefix:
        victims.append(add(namespaces, f"{prefix}-x"))
    res = vmm("lab", "cleanup", prefix)
    line = one_error_line(res.stderr)
    assert res.returncode == 2
    assert f"{prefix!r} is not a lab prefix" in line
    assert res.stdout == ""
    left = netns()
    assert [v for v in victims if v not in left] == []
