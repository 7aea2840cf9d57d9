"""Neutron port bindings as the directory: the faults only a stand-in can inject.

The directory's contract (prestage, commit, abort, acks, leftovers, refusals,
the core's stages on it) runs against real Keystone and Neutron in
tests/openstack/test_neutron_directory_real.py. What stays here needs
``tests/fakes/openstack_api.py``: Nova's migrations in flight (no Nova runs
in the tier), an unreachable Neutron, a Neutron without binding-extended.
The directory connects as Nova's service user (``[neutron]``), as the
product does; the real openstacksdk talks to the stand-in over HTTP.
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vmm_openstack import cloud as os_cloud
from vmm_openstack.neutron import NeutronDirectory
from vmm_orchestrator import options
from vmm_orchestrator.nva import errors as nva_errors

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fakes"))
from openstack_api import Behaviour, FakeCloud, Site, small_site

pytestmark = pytest.mark.filterwarnings(  # raised inside openstacksdk itself
    "ignore::openstack.warnings.RemovedInSDK50Warning",
    "ignore::openstack.warnings.RemovedInSDK60Warning",
)

MID = "vmm-test-0001"


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No OS_* variable or clouds.yaml of the machine leaks into a test."""
    import os

    for key in list(os.environ):
        if key.startswith("OS_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("OS_CLIENT_CONFIG_FILE", str(tmp_path / "absent-clouds.yaml"))


def make_site(monkeypatch: pytest.MonkeyPatch, **behaviour: Any) -> Iterator[Site]:
    with FakeCloud(Behaviour(**behaviour)) as cloud:
        for key, value in cloud.env().items():
            monkeypatch.setenv(key, value)
        yield small_site(cloud)


@pytest.fixture
def site(monkeypatch: pytest.MonkeyPatch) -> Iterator[Site]:
    yield from make_site(monkeypatch)


def service_conn(cloud: FakeCloud, username: str = "nova") -> Any:
    """The ``[neutron]`` service user's connection, loaded as the product loads it."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "vmm.conf"
        path.write_text(cloud.neutron_section(username))
        conf = options.new_conf([str(path)])
        conn = os_cloud.connect_service_user(conf, api_timeout=5)
    assert conn is not None
    return conn


@pytest.fixture
def directory(site: Site) -> Iterator[NeutronDirectory]:
    conn = service_conn(site.cloud)
    d = NeutronDirectory(conn, poll_interval=0.01)
    yield d
    d.close()


def wait_for(condition: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


# ------------------------------------- Nova's migrations in flight (no Nova runs in the tier)


def test_why_cleaning_matters_nova_fails_on_a_leftover_binding(site: Site) -> None:
    """The record the design cites: with a leftover binding, Nova's own bind fails."""
    site.cloud.add_binding(site.port_id, "cmp2")
    conn = service_conn(site.cloud)
    conn.compute.live_migrate_server(site.server_id, host="cmp2")
    wait_for(lambda: site.cloud.migrations[-1]["status"] in ("error", "completed"))
    assert site.cloud.migrations[-1]["status"] == "error"
    assert "already exists" in site.cloud.migrations[-1]["fault"]
    conn.close()


def test_a_binding_of_a_migration_nova_has_in_flight_is_adopted_not_deleted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for site in make_site(monkeypatch, never_finish=True):
        conn = service_conn(site.cloud)
        conn.compute.live_migrate_server(site.server_id, host="cmp2")
        wait_for(lambda s=site: "cmp2" in s.cloud.port_bindings(s.port_id))
        directory = NeutronDirectory(conn, poll_interval=0.01)

        result = directory.prestage(site.vni, site.mac, "cmp2", MID)

        assert result["adopted"] is True
        assert result["cleaned"] == []
        assert site.cloud.calls("DELETE", r"/bindings/") == []
        with pytest.raises(nva_errors.Conflict, match="migration in flight"):
            directory.prestage(site.vni, site.mac, "cmp3", "vmm-other")
        conn.compute.abort_server_migration(
            site.cloud.migrations[-1]["id"], site.server_id, ignore_missing=False
        )
        conn.close()


# --------------------------------------------------------- an unreachable Neutron


def test_an_unreachable_neutron_is_a_transient_error(site: Site) -> None:
    """Stages retry transient errors: a Neutron that does not answer must be one."""
    import socket

    import openstack

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        dead = sock.getsockname()[1]
    conn = openstack.connect(
        auth_url=site.cloud.auth_url,
        username="nova",
        password=site.cloud.users["nova"][0],
        project_name="service",
        user_domain_name="Default",
        project_domain_name="Default",
        network_endpoint_override=f"http://127.0.0.1:{dead}/v2.0/",
        api_timeout=2,
    )
    with pytest.raises(nva_errors.Unavailable, match="cannot reach"):
        NeutronDirectory(conn).prestage(site.vni, site.mac, "cmp2", MID)
    conn.close()


# ---------------------------------------------------------- no binding-extended


def test_without_binding_extended_the_port_moves_by_a_host_update_saying_so(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for site in make_site(monkeypatch, binding_extension=False):
        directory = NeutronDirectory(service_conn(site.cloud), poll_interval=0.01)

        staged = directory.prestage(site.vni, site.mac, "cmp2", MID)
        assert staged["fallback"] is True
        assert site.cloud.calls("POST", r"/bindings") == []
        assert any("no binding-extended extension" in n for n in directory.notes)

        result = directory.commit(site.vni, site.mac, MID)
        assert result["activated"] is True
        assert site.cloud.ports[site.port_id]["binding:host_id"] == "cmp2"
        assert site.cloud.calls("PUT", rf"/ports/{site.port_id}$")
        assert directory.acks(site.vni, result["revision"], timeout=3)["cmp2"]["acked_at"]
        assert directory.abort(site.vni, site.mac, MID)["deleted"] is False
        directory.close()
