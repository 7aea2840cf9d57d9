"""The real-OpenStack tier: real Keystone and Neutron, started once per pytest session.

``real_cloud`` installs the services if needed (scripts/setup-openstack.sh,
quick once done), starts them on 127.0.0.1 and stops them at the end of the
session, also when tests fail. Each test makes its own network and ports
(``server_port``) and removes them afterwards, so tests do not see each
other's state.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_cloud import ADMIN, NOVA, RealCloud, Scene, running_cloud


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "openstack: runs against real Keystone and Neutron (tests/openstack)"
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).resolve().parent
    for item in items:
        if here in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.openstack)


@pytest.fixture(scope="session")
def real_cloud() -> Iterator[RealCloud]:
    t0 = time.monotonic()
    with running_cloud() as cloud:
        cloud.timings["fixture"] = time.monotonic() - t0
        sys.stderr.write(
            "\nreal OpenStack up: "
            + ", ".join(f"{k} {v:.1f} s" for k, v in cloud.timings.items())
            + "\n"
        )
        yield cloud


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No OS_* variable or clouds.yaml of the machine leaks into a test."""
    for key in list(os.environ):
        if key.startswith("OS_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("OS_CLIENT_CONFIG_FILE", str(tmp_path / "absent-clouds.yaml"))


@pytest.fixture(scope="session")
def real_nova(real_cloud: RealCloud) -> RealCloud:
    """The same cloud with real Nova and Placement started in it (once per session, on demand:
    the Keystone + Neutron tests do not pay for it)."""
    if not real_cloud.nova_url:
        t0 = time.monotonic()
        real_cloud.start_nova()
        real_cloud.timings["nova fixture"] = time.monotonic() - t0
        sys.stderr.write(
            f"\nreal Nova up: {real_cloud.timings['nova fixture']:.1f} s "
            f"(placement {real_cloud.timings['placement']:.1f} s, nova-manage "
            f"{real_cloud.timings['nova-manage']:.1f} s)\n"
        )
    return real_cloud


@pytest.fixture(scope="session")
def admin(real_cloud: RealCloud) -> Iterator[Any]:
    """DevStack's admin (admin role, no service role): sets the scene."""
    conn = real_cloud.connect(ADMIN)
    yield conn
    conn.close()


@pytest.fixture(scope="session")
def nova(real_cloud: RealCloud) -> Iterator[Any]:
    """Nova's service user (service and admin roles): what the product's [neutron] is."""
    conn = real_cloud.connect(NOVA)
    yield conn
    conn.close()


@pytest.fixture
def scene(admin: Any) -> Iterator[Scene]:
    made = Scene(admin)
    try:
        yield made
    finally:
        made.remove()
