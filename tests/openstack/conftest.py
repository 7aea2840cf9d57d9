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
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_cloud import ADMIN, NOVA, WIRING_HOSTS, RealCloud, running_cloud


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


def wait_for(what: str, check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


class Scene:
    """A test's own network, and the ports it creates on it (all removed afterwards)."""

    def __init__(self, admin: Any) -> None:
        self.admin = admin
        self.tag = uuid.uuid4().hex[:8]
        self.network = admin.network.create_network(
            name=f"net-{self.tag}", provider_network_type="vxlan"
        )
        self.vni = int(self.network.provider_segmentation_id)
        admin.network.create_subnet(
            network_id=self.network.id, cidr="10.0.0.0/24", ip_version=4, name=f"sub-{self.tag}"
        )
        self.ports: list[str] = []

    def server_port(self, host: str = WIRING_HOSTS[0], *, owner: str = "compute:nova") -> Any:
        """A port of a (Nova-less) server on ``host``, wired there (ACTIVE) like Nova leaves it."""
        port = self.admin.network.create_port(
            network_id=self.network.id,
            device_id=str(uuid.uuid4()) if owner else "",
            device_owner=owner,
            binding_host_id=host if owner else None,
            name=f"port-{self.tag}-{len(self.ports)}",
        )
        self.ports.append(port.id)
        if owner:
            wait_for(f"port {port.id} ACTIVE on {host}", lambda: self.status(port.id) == "ACTIVE")
        return self.admin.network.get_port(port.id)

    def status(self, port_id: str) -> str:
        return str(self.admin.network.get_port(port_id).status)

    def bindings(self, port_id: str) -> dict[str, str]:
        """host -> status of the port's bindings (read as admin)."""
        return {b.host: b.status for b in self.admin.network.port_bindings(port_id)}

    def remove(self) -> None:
        for port_id in self.ports:
            self.admin.network.delete_port(port_id, ignore_missing=True)
        self.admin.network.delete_network(self.network.id, ignore_missing=True)


@pytest.fixture
def scene(admin: Any) -> Iterator[Scene]:
    made = Scene(admin)
    try:
        yield made
    finally:
        made.remove()
