"""Shared fixtures of the functional tests: they need root and build real
network namespaces, always removed afterwards (lab_site tears down however
the test ends)."""

from __future__ import annotations

import os
import secrets
import subprocess
from collections.abc import Iterator

import pytest
from oslo_config import cfg

from vmm_lab.linux.topology import lab_namespaces, new_prefix
from vmm_orchestrator import options


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="functional tests need root to create network namespaces")
    for item in items:
        if "tests/functional" in str(item.fspath):
            item.add_marker(skip)


@pytest.fixture
def prefix() -> str:
    """A per-test namespace prefix; the test fails if anything is left with it."""
    value = new_prefix()
    yield value
    left = lab_namespaces(value)
    assert not left, f"namespaces left behind: {left}"


@pytest.fixture
def netns() -> Iterator[str]:
    """One empty network namespace of the test's own, deleted afterwards."""
    name = f"vmmt{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)


@pytest.fixture
def lab_conf() -> cfg.ConfigOpts:
    """Defaults, with short timers so the tests stay quick."""
    conf = options.new_conf()  # every plugin's options, as `vmm` registers them
    conf.set_override("probe_rate", 500, group="lab")
    conf.set_override("warmup_s", 0.5, group="lab")
    conf.set_override("observe_s", 1.0, group="lab")
    conf.set_override("watch_timeout", 1.0, group="nve_agent")
    conf.set_override("hold_time", 1.0, group="stage_hold_timer")
    return conf
