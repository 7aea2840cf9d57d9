"""The Neutron directory's contract on real Neutron, as Nova's service user (``[neutron]``).

Prestage, commit, abort, acks, leftovers and refusals, asserted on the
bindings the real Neutron holds afterwards: nothing half-applied. The core's
own directory stages (NvaPrestage, PeerUpdate) run on it too, and the
per-host agents' loader (``NeutronDirectory.from_conf``) reads clouds.yaml
and ``[neutron]`` as an operator writes them.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from real_cloud import ADMIN, RealCloud, Scene

from vmm_openstack.neutron import TAG, NeutronDirectory
from vmm_orchestrator.model import Migration, Phase, Role, Vif, Workload
from vmm_orchestrator.nva import errors as nva_errors
from vmm_orchestrator.options import new_conf
from vmm_orchestrator.stage import HostContext, StageContext
from vmm_orchestrator.stages import NvaPrestage, PeerUpdate

pytestmark = pytest.mark.filterwarnings(
    "ignore::openstack.warnings.RemovedInSDK50Warning",
    "ignore::openstack.warnings.RemovedInSDK60Warning",
)

MID = "vmm-real-0001"


@pytest.fixture
def directory(nova: Any) -> Iterator[NeutronDirectory]:
    yield NeutronDirectory(nova, poll_interval=0.05)


def test_a_repeated_prestage_returns_the_same_binding_tagged_with_the_migration(
    scene: Scene, directory: NeutronDirectory
) -> None:
    port = scene.server_port("cmp1")

    first = directory.prestage(scene.vni, port.mac_address, "cmp2", MID)
    again = directory.prestage(scene.vni, port.mac_address, "cmp2", MID)

    assert first["binding"] == again["binding"]
    assert first["binding"]["migration_id"] == MID
    assert scene.bindings(port.id) == {"cmp1": "ACTIVE", "cmp2": "INACTIVE"}


def test_commit_and_abort_find_the_prestage_by_its_tag_after_a_restart(
    scene: Scene, directory: NeutronDirectory, nova: Any
) -> None:
    port = scene.server_port("cmp1")
    directory.prestage(scene.vni, port.mac_address, "cmp2", MID)

    restarted = NeutronDirectory(nova, poll_interval=0.05)  # no memory of it
    assert restarted.abort(scene.vni, port.mac_address, MID)["deleted"] is True
    assert scene.bindings(port.id) == {"cmp1": "ACTIVE"}


def test_abort_never_deletes_an_active_binding(scene: Scene, directory: NeutronDirectory) -> None:
    """Real Neutron would delete it if asked: the directory checks the status itself."""
    port = scene.server_port("cmp1")
    directory.prestage(scene.vni, port.mac_address, "cmp2", MID)
    directory.commit(scene.vni, port.mac_address, MID)

    assert directory.abort(scene.vni, port.mac_address, MID)["deleted"] is False
    assert directory.commit(scene.vni, port.mac_address, MID)["activated"] is False
    assert scene.bindings(port.id) == {"cmp2": "ACTIVE"}


def test_clean_stale_removes_every_leftover_when_nothing_is_in_flight(
    scene: Scene, directory: NeutronDirectory, nova: Any
) -> None:
    port = scene.server_port("cmp1")
    nova.network.create_port_binding(port.id, host="cmp2", vnic_type="normal")
    nova.network.create_port_binding(
        port.id, host="cmp3", vnic_type="normal", profile={TAG: "vmm-old"}
    )

    cleaned = directory.clean_stale(scene.vni, port.mac_address)

    assert sorted((c["host"], c["left_by"]) for c in cleaned) == [
        ("cmp2", None),
        ("cmp3", "vmm-old"),
    ]
    assert scene.bindings(port.id) == {"cmp1": "ACTIVE"}


def test_the_host_the_server_runs_on_and_an_unknown_endpoint_are_refused(
    scene: Scene, directory: NeutronDirectory
) -> None:
    port = scene.server_port("cmp1")
    with pytest.raises(nva_errors.Conflict, match="the server runs there"):
        directory.prestage(scene.vni, port.mac_address, "cmp1", MID)
    with pytest.raises(nva_errors.NotFound, match="VNI 4242"):
        directory.prestage(4242, port.mac_address, "cmp2", MID)
    with pytest.raises(nva_errors.NotFound, match="no pending migration"):
        directory.commit(scene.vni, port.mac_address, "vmm-never-prestaged")
    assert scene.bindings(port.id) == {"cmp1": "ACTIVE"}


def test_the_core_directory_stages_run_on_real_neutron(
    scene: Scene, directory: NeutronDirectory
) -> None:
    port = scene.server_port("cmp1")
    conf = new_conf()
    workload = Workload("web-1", (Vif(port.mac_address, scene.vni, (), ()),))
    migration = Migration(MID, workload, "cmp1", "cmp2")
    host = HostContext("cmp2", nva=directory)

    def ctx(phase: Phase) -> StageContext:
        return StageContext(migration, phase, Role.DESTINATION, host, time.monotonic() + 10)

    NvaPrestage(conf).run(ctx(Phase.PREPARE))
    assert scene.bindings(port.id) == {"cmp1": "ACTIVE", "cmp2": "INACTIVE"}
    resumed = ctx(Phase.RESUMED)
    PeerUpdate(conf).run(resumed)
    assert scene.bindings(port.id) == {"cmp2": "ACTIVE"}
    assert resumed.notes["laggards"] == []
    assert "cmp2" in resumed.notes["convergence_ms"]


def test_the_agents_loader_reads_clouds_yaml_and_the_service_user(
    real_cloud: RealCloud, scene: Scene, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = scene.server_port("cmp1")
    path = real_cloud.clouds_yaml(tmp_path / "clouds.yaml", lab=ADMIN)
    monkeypatch.setenv("OS_CLIENT_CONFIG_FILE", str(path))
    conf_file = tmp_path / "vmm.conf"
    conf_file.write_text(
        "[openstack]\ncloud = lab\nnve_hosts = h2:cmp2\n" + real_cloud.neutron_section()
    )
    conf = new_conf([str(conf_file)])

    directory = NeutronDirectory.from_conf(conf)
    try:
        assert directory.who == "[neutron] nova"
        directory.prestage(scene.vni, port.mac_address, "h2", MID)  # NVE h2 is Neutron's cmp2
        assert scene.bindings(port.id) == {"cmp1": "ACTIVE", "cmp2": "INACTIVE"}
    finally:
        directory.close()
