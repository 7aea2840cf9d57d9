"""Neutron port bindings as the directory: prestage, commit, abort, stale leftovers.

Every test drives the real openstacksdk (keystoneauth discovery, tokens,
resource classes) against ``tests/fakes/openstack_api.py``, the stand-in
kept for what the real services cannot do on demand (Nova's migrations in
flight, a Neutron without binding-extended or unreachable); the same
directory runs against real Keystone and Neutron in tests/openstack/. The
directory connects as Nova's service user (``[neutron]``), as the product
does. What is asserted is the state of the stand-in's port bindings, i.e.
what Neutron would hold afterwards: nothing half-applied.
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from oslo_config import cfg

from vmm_openstack import cloud as os_cloud
from vmm_openstack.neutron import TAG, NeutronDirectory
from vmm_orchestrator.model import Migration, Phase, Role, Vif, Workload
from vmm_orchestrator.nva import errors as nva_errors
from vmm_orchestrator.stage import HostContext, StageContext
from vmm_orchestrator.stages import NvaPrestage, PeerUpdate

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
        conf = cfg.ConfigOpts()
        conf(["--config-file", str(path)], project="vmm-test", default_config_files=[])
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


# --------------------------------------------------------------- the contract


def test_prestage_binds_inactive_on_the_destination_tagged_with_the_migration(
    site: Site, directory: NeutronDirectory
) -> None:
    result = directory.prestage(site.vni, site.mac, "cmp2", MID)

    assert result["state"] == "pending"
    assert result["port_id"] == site.port_id
    assert result["binding"]["status"] == "INACTIVE"
    assert site.cloud.port_bindings(site.port_id) == {"cmp1": "ACTIVE", "cmp2": "INACTIVE"}
    assert site.cloud.bindings[site.port_id]["cmp2"]["profile"][TAG] == MID


def test_a_repeated_prestage_returns_the_same_binding(
    site: Site, directory: NeutronDirectory
) -> None:
    directory.prestage(site.vni, site.mac, "cmp2", MID)
    again = directory.prestage(site.vni, site.mac, "CMP2".lower(), MID)

    assert again["binding"]["migration_id"] == MID
    assert len(site.cloud.calls("POST", r"/bindings$")) == 1


def test_commit_activates_and_acks_wait_for_the_port_to_be_wired(
    site: Site, directory: NeutronDirectory
) -> None:
    directory.prestage(site.vni, site.mac, "cmp2", MID)
    result = directory.commit(site.vni, site.mac, MID)

    assert result["activated"] is True
    assert result["endpoint"]["nve"] == "cmp2"
    # Neutron keeps the source's binding inactive; the directory drops it, as Nova does.
    assert site.cloud.port_bindings(site.port_id) == {"cmp2": "ACTIVE"}
    acks = directory.acks(site.vni, result["revision"], timeout=3)
    assert acks["cmp2"]["acked_revision"] == result["revision"]
    assert acks["cmp2"]["acked_at"] >= result["committed_at"]
    # A repeat is harmless: already active counts as done.
    assert directory.commit(site.vni, site.mac, MID)["activated"] is False


def test_abort_deletes_the_inactive_binding_and_is_harmless_repeated(
    site: Site, directory: NeutronDirectory
) -> None:
    directory.prestage(site.vni, site.mac, "cmp2", MID)
    assert directory.abort(site.vni, site.mac, MID)["deleted"] is True
    assert site.cloud.port_bindings(site.port_id) == {"cmp1": "ACTIVE"}
    assert directory.abort(site.vni, site.mac, MID)["deleted"] is False


def test_commit_and_abort_find_the_prestage_by_its_tag_after_a_restart(
    site: Site, directory: NeutronDirectory
) -> None:
    directory.prestage(site.vni, site.mac, "cmp2", MID)
    restarted = NeutronDirectory(directory.conn, poll_interval=0.01)  # no memory of it
    assert restarted.abort(site.vni, site.mac, MID)["deleted"] is True
    assert site.cloud.port_bindings(site.port_id) == {"cmp1": "ACTIVE"}


def test_abort_never_deletes_an_active_binding(site: Site, directory: NeutronDirectory) -> None:
    directory.prestage(site.vni, site.mac, "cmp2", MID)
    directory.commit(site.vni, site.mac, MID)
    assert directory.abort(site.vni, site.mac, MID)["deleted"] is False
    assert site.cloud.port_bindings(site.port_id)["cmp2"] == "ACTIVE"


# ------------------------------------------------------------ leftovers


def test_a_stale_inactive_binding_on_the_destination_is_cleaned_not_blocking(
    site: Site, directory: NeutronDirectory
) -> None:
    site.cloud.add_binding(site.port_id, "cmp2", {"migrating_to": "cmp2"})  # Nova's, untagged

    result = directory.prestage(site.vni, site.mac, "cmp2", MID)

    assert result["cleaned"] == [{"port_id": site.port_id, "host": "cmp2", "left_by": None}]
    assert site.cloud.bindings[site.port_id]["cmp2"]["profile"][TAG] == MID
    assert any("stale inactive binding" in n and "cmp2" in n for n in directory.notes)


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


def test_clean_stale_removes_every_leftover_when_nothing_is_in_flight(
    site: Site, directory: NeutronDirectory
) -> None:
    site.cloud.add_host("cmp3")
    site.cloud.add_binding(site.port_id, "cmp2")
    site.cloud.add_binding(site.port_id, "cmp3", {TAG: "vmm-old"})

    cleaned = directory.clean_stale(site.vni, site.mac)

    assert sorted((c["host"], c["left_by"]) for c in cleaned) == [
        ("cmp2", None),
        ("cmp3", "vmm-old"),
    ]
    assert site.cloud.port_bindings(site.port_id) == {"cmp1": "ACTIVE"}


# --------------------------------------------------------------- refusals


def test_a_host_neutron_cannot_bind_is_refused_and_nothing_is_left(
    site: Site, directory: NeutronDirectory
) -> None:
    with pytest.raises(nva_errors.Conflict, match=r"cannot bind port .* on cmp9") as err:
        directory.prestage(site.vni, site.mac, "cmp9", MID)
    assert "L2 agent" in str(err.value)
    assert site.cloud.port_bindings(site.port_id) == {"cmp1": "ACTIVE"}


def test_the_host_the_server_runs_on_is_refused(site: Site, directory: NeutronDirectory) -> None:
    with pytest.raises(nva_errors.Conflict, match="the server runs there"):
        directory.prestage(site.vni, site.mac, "cmp1", MID)


def test_an_unknown_endpoint_is_not_found(site: Site, directory: NeutronDirectory) -> None:
    with pytest.raises(nva_errors.NotFound, match="VNI 4242"):
        directory.prestage(4242, site.mac, "cmp2", MID)
    with pytest.raises(nva_errors.NotFound, match="no pending migration"):
        directory.commit(site.vni, site.mac, "vmm-never-prestaged")


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


# ----------------------------------------------- the core's stages run on Neutron


def test_the_core_directory_stages_run_on_neutron(site: Site, directory: NeutronDirectory) -> None:
    conf = cfg.ConfigOpts()
    conf([], project="vmm-test", default_config_files=[])
    workload = Workload("web-1", (Vif(site.mac, site.vni, ("10.0.0.5",), ("fd00::5",)),))
    migration = Migration(MID, workload, "cmp1", "cmp2")
    host = HostContext("cmp2", nva=directory)

    def ctx(phase: Phase) -> StageContext:
        return StageContext(migration, phase, Role.DESTINATION, host, time.monotonic() + 5)

    NvaPrestage(conf).run(ctx(Phase.PREPARE))
    assert site.cloud.port_bindings(site.port_id)["cmp2"] == "INACTIVE"
    resumed = ctx(Phase.RESUMED)
    PeerUpdate(conf).run(resumed)
    # Its own binding activated, the directory drops the source's, as Nova does.
    assert site.cloud.port_bindings(site.port_id) == {"cmp2": "ACTIVE"}
    assert resumed.notes["laggards"] == []
    assert "cmp2" in resumed.notes["convergence_ms"]


def test_from_conf_reads_the_cloud_of_clouds_yaml(
    site: Site, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    for key in [k for k in os.environ if k.startswith("OS_")]:
        monkeypatch.delenv(key)
    path = site.cloud.write_clouds_yaml(str(tmp_path / "clouds.yaml"), cloud="lab")
    monkeypatch.setenv("OS_CLIENT_CONFIG_FILE", path)
    conf_file = tmp_path / "vmm.conf"
    conf_file.write_text(
        "[openstack]\ncloud = lab\nnve_hosts = h2:cmp2\n" + site.cloud.neutron_section()
    )
    conf = cfg.ConfigOpts()
    conf(["--config-file", str(conf_file)], project="vmm-test", default_config_files=[])

    directory = NeutronDirectory.from_conf(conf)
    directory.prestage(site.vni, site.mac, "h2", MID)  # the NVE id h2 is Neutron's cmp2
    assert site.cloud.port_bindings(site.port_id)["cmp2"] == "INACTIVE"
    directory.close()
