"""`vmm migrate-with-network` against real Keystone and Neutron, under the default policy.

The command runs in-process (``cli.main``) as an operator runs it: DevStack's
admin credentials in OS_* (admin role, no service role) and, in
vmm-orchestrator.conf, ``[neutron]`` with Nova's service user, written as
DevStack writes nova.conf's. The VM moves with the libvirt driver against a
stand-in libvirt module (no hypervisor here); every Neutron call is real and
its L2 agents are the stand-in mechanism driver (hosts cmp1..cmp3 wire ports,
cmp-stuck never does, other hosts cannot be bound).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from real_cloud import ADMIN, BINDER, DEMO, STUCK_HOST, RealCloud
from standin_libvirt import StandInLibvirt

from vmm_openstack import libvirt_driver
from vmm_openstack.neutron import NeutronDirectory
from vmm_orchestrator import cli
from vmm_orchestrator.errors import TransientError
from vmm_orchestrator.nva import errors as nva_errors

pytestmark = pytest.mark.filterwarnings(
    "ignore::openstack.warnings.RemovedInSDK50Warning",
    "ignore::openstack.warnings.RemovedInSDK60Warning",
)

FAST = """\
[openstack]
poll_interval = 0.05
converge_timeout = 3
abort_timeout = 3
api_timeout = 20
"""


@pytest.fixture
def operator(real_cloud: RealCloud, monkeypatch: pytest.MonkeyPatch) -> None:
    """DevStack's admin in OS_*, as `source openrc admin admin` sets it."""
    for key, value in real_cloud.env(ADMIN).items():
        monkeypatch.setenv(key, value)


def conf_file(tmp_path: Path, real_cloud: RealCloud, service_user: Any = "nova") -> str:
    """vmm-orchestrator.conf: fast timings, and [neutron] unless ``service_user`` is None."""
    text = FAST
    if service_user == "nova":
        text += real_cloud.neutron_section()
    elif service_user is not None:
        text += real_cloud.neutron_section(service_user)
    path = tmp_path / "vmm.conf"
    path.write_text(text)
    return str(path)


def move(
    monkeypatch: pytest.MonkeyPatch,
    conf: str,
    domain: StandInLibvirt,
    source: str,
    destination: str,
) -> int:
    monkeypatch.setattr(libvirt_driver, "load_libvirt", lambda: domain)
    return cli.main(
        [
            "--config-file",
            conf,
            "migrate-with-network",
            domain.name,
            "--libvirt-uri",
            domain.uri_of(source),
            "--libvirt-uri",
            domain.uri_of(destination),
            "--directory",
            "neutron",
        ]
    )


def one_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{stderr}"
    assert lines[0].startswith("vmm: error: "), lines[0]
    return lines[0]


# ------------------------------------------------------------------ moves


def test_a_normal_move(
    real_cloud: RealCloud, scene: Any, operator: None, tmp_path: Path, monkeypatch, capsys
) -> None:
    port = scene.server_port("cmp1")
    vm = StandInLibvirt("vm-move", [port.mac_address], "cmp1")

    status = move(monkeypatch, conf_file(tmp_path, real_cloud), vm, "cmp1", "cmp2")

    out, err = capsys.readouterr()
    assert (status, err) == (0, ""), err
    assert "vm-move runs on cmp2 and its network has converged" in out
    assert "inactive binding on cmp2 (ovs)" in out
    after = scene.admin.network.get_port(port.id)
    assert (after.binding_host_id, after.status) == ("cmp2", "ACTIVE")
    # The source's binding, which Neutron keeps INACTIVE after the activation, is gone.
    assert scene.bindings(port.id) == {"cmp2": "ACTIVE"}
    assert "cleaned" not in out


def test_a_round_trip(
    real_cloud: RealCloud, scene: Any, operator: None, tmp_path: Path, monkeypatch, capsys
) -> None:
    port = scene.server_port("cmp1")
    vm = StandInLibvirt("vm-trip", [port.mac_address], "cmp1")
    conf = conf_file(tmp_path, real_cloud)

    assert move(monkeypatch, conf, vm, "cmp1", "cmp2") == 0
    assert move(monkeypatch, conf, vm, "cmp2", "cmp1") == 0

    out, err = capsys.readouterr()
    assert err == ""
    assert "vm-trip runs on cmp1 and its network has converged" in out
    # Nothing of the first move looks like a leftover to the second.
    assert "stale" not in out
    assert scene.bindings(port.id) == {"cmp1": "ACTIVE"}
    assert scene.status(port.id) == "ACTIVE"


def test_a_stale_binding_left_by_an_earlier_failure_is_cleaned(
    real_cloud: RealCloud,
    scene: Any,
    nova: Any,
    operator: None,
    tmp_path: Path,
    monkeypatch,
    capsys,
) -> None:
    port = scene.server_port("cmp1")
    nova.network.create_port_binding(
        port.id, host="cmp2", vnic_type="normal", profile={"vmm_migration_id": "vmm-earlier"}
    )
    assert scene.bindings(port.id) == {"cmp1": "ACTIVE", "cmp2": "INACTIVE"}
    vm = StandInLibvirt("vm-stale", [port.mac_address], "cmp1")

    status = move(monkeypatch, conf_file(tmp_path, real_cloud), vm, "cmp1", "cmp2")

    out, err = capsys.readouterr()
    assert (status, err) == (0, ""), err
    assert (
        f"cleaned a stale inactive binding of port {port.id} on cmp2 (left by migration "
        "vmm-earlier" in out
    )
    assert scene.bindings(port.id) == {"cmp2": "ACTIVE"}


def test_a_failed_migration_is_reverted_and_leaves_nothing(
    real_cloud: RealCloud, scene: Any, operator: None, tmp_path: Path, monkeypatch, capsys
) -> None:
    port = scene.server_port("cmp1")
    vm = StandInLibvirt("vm-fail", [port.mac_address], "cmp1", fail="guest crashed on the way")

    status = move(monkeypatch, conf_file(tmp_path, real_cloud), vm, "cmp1", "cmp2")

    _out, err = capsys.readouterr()
    line = one_error_line(err)
    assert status == cli.EXIT_ERROR
    assert "phase migrate failed: libvirt migration" in line
    assert "guest crashed on the way" in line
    assert f"deleted the inactive binding of port {port.id[:8]} on cmp2" in line
    assert "vm-fail still runs on cmp1" in line
    assert scene.bindings(port.id) == {"cmp1": "ACTIVE"}
    assert scene.status(port.id) == "ACTIVE"


def test_a_destination_whose_agent_never_wires_the_port(
    real_cloud: RealCloud, scene: Any, operator: None, tmp_path: Path, monkeypatch, capsys
) -> None:
    port = scene.server_port("cmp1")
    vm = StandInLibvirt("vm-stuck", [port.mac_address], "cmp1")

    started = time.monotonic()
    status = move(monkeypatch, conf_file(tmp_path, real_cloud), vm, "cmp1", STUCK_HOST)

    _, err = capsys.readouterr()
    line = one_error_line(err)
    assert status == cli.EXIT_ERROR
    assert (
        f"phase converge failed: port {port.id[:8]} not ACTIVE (its L2 agent has not wired "
        f"it) on {STUCK_HOST} within 3 s" in line
    )
    assert f"vm-stuck runs on {STUCK_HOST}; its bindings there are active" in line
    assert f"openstack network agent list --host {STUCK_HOST}" in line
    assert time.monotonic() - started < 20
    # The VM runs there: nothing is moved back; the port waits for its agent.
    assert scene.bindings(port.id) == {STUCK_HOST: "ACTIVE"}
    assert scene.status(port.id) == "DOWN"


def test_a_destination_nothing_can_bind_is_refused_naming_the_host(
    real_cloud: RealCloud, scene: Any, operator: None, tmp_path: Path, monkeypatch, capsys
) -> None:
    port = scene.server_port("cmp1")
    vm = StandInLibvirt("vm-nowhere", [port.mac_address], "cmp1")

    started = time.monotonic()
    status = move(monkeypatch, conf_file(tmp_path, real_cloud), vm, "cmp1", "nowhere")

    _, err = capsys.readouterr()
    line = one_error_line(err)
    assert status == cli.EXIT_ERROR
    assert f"phase prestage failed: Neutron cannot bind port {port.id} on host nowhere" in line
    assert "openstack network agent list --host nowhere" in line
    assert "vm-nowhere still runs on cmp1" in line
    assert time.monotonic() - started < 15  # refused at once, not retried
    assert scene.bindings(port.id) == {"cmp1": "ACTIVE"}


def test_a_port_no_server_owns_is_refused_before_anything_changes(
    real_cloud: RealCloud, scene: Any, operator: None, tmp_path: Path, monkeypatch, capsys
) -> None:
    port = scene.server_port(owner="")
    vm = StandInLibvirt("vm-unowned", [port.mac_address], "cmp1")

    status = move(monkeypatch, conf_file(tmp_path, real_cloud), vm, "cmp1", "cmp2")

    _, err = capsys.readouterr()
    line = one_error_line(err)
    assert status == cli.EXIT_ERROR
    assert (
        f"phase resolve failed: port {port.id} (MAC {port.mac_address}) is not a server's port "
        "(device_owner empty)" in line
    )
    assert scene.admin.network.get_port(port.id).binding_host_id in ("", None)


def test_admin_credentials_without_the_service_role_name_the_role_and_the_fix(
    real_cloud: RealCloud, scene: Any, operator: None, tmp_path: Path, monkeypatch, capsys
) -> None:
    """DevStack's admin alone (no [neutron]): the README's old advice, refused by policy."""
    port = scene.server_port("cmp1")
    vm = StandInLibvirt("vm-admin", [port.mac_address], "cmp1")

    status = move(monkeypatch, conf_file(tmp_path, real_cloud, None), vm, "cmp1", "cmp2")

    _, err = capsys.readouterr()
    line = one_error_line(err)
    assert status == cli.EXIT_ERROR
    assert (
        f"phase prestage failed: Neutron refused binding port {port.id} on cmp2 (inactive) "
        "for cloud envvars (HTTP 403): under Neutron's default policy it needs the service "
        "role" in line
    )
    assert "set [neutron] in vmm-orchestrator.conf to Nova's service user" in line
    assert "openstack role add" in line
    assert scene.bindings(port.id) == {"cmp1": "ACTIVE"}


def test_a_service_user_without_the_admin_role_names_the_role_and_the_fix(
    real_cloud: RealCloud, scene: Any, operator: None, tmp_path: Path, monkeypatch, capsys
) -> None:
    """[neutron] with a user that has only ``service``: Neutron hides the VNI from it."""
    port = scene.server_port("cmp1")
    vm = StandInLibvirt("vm-binder", [port.mac_address], "cmp1")

    status = move(monkeypatch, conf_file(tmp_path, real_cloud, BINDER), vm, "cmp1", "cmp2")

    _, err = capsys.readouterr()
    line = one_error_line(err)
    assert status == cli.EXIT_ERROR
    assert (
        f"phase resolve failed: Neutron hides the provider attributes of network "
        f"net-{scene.tag} from [neutron] binder: reading provider:segmentation_id (the VNI) "
        "needs the admin role" in line
    )
    assert scene.bindings(port.id) == {"cmp1": "ACTIVE"}


def test_a_user_who_cannot_see_the_port_is_told_so(
    real_cloud: RealCloud, scene: Any, operator: None, tmp_path: Path, monkeypatch, capsys
) -> None:
    """A member of another project: Neutron lists no port for the MAC, without an error."""
    port = scene.server_port("cmp1")
    vm = StandInLibvirt("vm-demo", [port.mac_address], "cmp1")

    status = move(monkeypatch, conf_file(tmp_path, real_cloud, DEMO), vm, "cmp1", "cmp2")

    _, err = capsys.readouterr()
    line = one_error_line(err)
    assert status == cli.EXIT_ERROR
    assert f"phase resolve failed: the directory (neutron at {real_cloud.neutron_url}" in line
    assert f"knows no endpoint with MAC {port.mac_address} of domain vm-demo" in line
    assert "is it a Neutron port that [neutron] demo may see?" in line
    assert scene.bindings(port.id) == {"cmp1": "ACTIVE"}


# -------------------------------------------------------------- directory


def test_the_directory_refusal_for_an_unbindable_host_is_no_transient_error(
    scene: Any, nova: Any
) -> None:
    """The core's stages retry TransientError: a host nothing binds must not be one."""
    port = scene.server_port("cmp1")
    directory = NeutronDirectory(nova)
    calls = []
    create = nova.network.create_port_binding

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(args)
        return create(*args, **kwargs)

    nova.network.create_port_binding = counted
    try:
        with pytest.raises(nva_errors.Conflict) as refused:
            directory.prestage(scene.vni, port.mac_address, "nowhere", "vmm-t1")
    finally:
        del nova.network.create_port_binding
    assert not isinstance(refused.value, TransientError)
    assert "on host nowhere" in refused.value.message
    assert len(calls) == 1
    assert scene.bindings(port.id) == {"cmp1": "ACTIVE"}


def test_the_directory_prestage_commit_acks_and_abort_on_real_neutron(
    scene: Any, nova: Any
) -> None:
    port = scene.server_port("cmp1")
    other = scene.server_port("cmp1")
    directory = NeutronDirectory(nova, poll_interval=0.05)

    staged = directory.prestage(scene.vni, port.mac_address, "cmp2", "vmm-t2")
    again = directory.prestage(scene.vni, port.mac_address, "cmp2", "vmm-t2")
    assert (
        staged["binding"]
        == again["binding"]
        == {
            "host": "cmp2",
            "status": "INACTIVE",
            "vif_type": "ovs",
            "migration_id": "vmm-t2",
        }
    )
    committed = directory.commit(scene.vni, port.mac_address, "vmm-t2")
    assert committed["activated"] is True
    acks = directory.acks(scene.vni, committed["revision"], timeout=5)
    assert acks["cmp2"]["acked_revision"] == committed["revision"]
    assert scene.bindings(port.id) == {"cmp2": "ACTIVE"}

    directory.prestage(scene.vni, other.mac_address, "cmp3", "vmm-t3")
    assert directory.abort(scene.vni, other.mac_address, "vmm-t3")["deleted"] is True
    assert directory.abort(scene.vni, other.mac_address, "vmm-t3")["deleted"] is False
    assert scene.bindings(other.id) == {"cmp1": "ACTIVE"}
