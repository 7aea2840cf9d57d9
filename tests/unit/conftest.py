"""Fixtures shared by the hook relay's tests."""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from vmm_libvirt.hook import HookServer


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A short temporary folder: unix socket paths are limited to 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="vmmhook", dir="/tmp"))
    yield path
    # A relay a test handed a notification to in the background may still write
    # its log or its bytecode cache here while the folder goes; once it is gone,
    # nothing can make it again.
    for _ in range(100):
        shutil.rmtree(path, ignore_errors=True)
        if not path.exists():
            break
        time.sleep(0.05)


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
