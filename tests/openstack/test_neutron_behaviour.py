"""What the real Neutron does where the first stand-in differed: one test per behaviour.

Each runs twice: against real Keystone and Neutron (``real``), which is the
truth, and against tests/fakes/openstack_api.py (``fake``), which must copy
it, because the unit tests inject their faults (Nova's failures, a Neutron
without binding-extended ...) through it. A behaviour the stand-in got
wrong made the product pass there and fail in a cloud; the product's answer
to each is in tests/openstack/test_migrate_real_neutron.py.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openstack
import pytest
from openstack import exceptions as sdk_exc
from real_cloud import ADMIN, BINDER, DEMO, NOVA, RealCloud, Scene

from vmm_openstack import cloud as os_cloud

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fakes"))
from openstack_api import FakeCloud

pytestmark = pytest.mark.filterwarnings(
    "ignore::openstack.warnings.RemovedInSDK50Warning",
    "ignore::openstack.warnings.RemovedInSDK60Warning",
)


class Backend:
    """One Neutron to ask: connections as three users, and a server's port to ask about."""

    name: str
    admin: Any  # DevStack's admin: admin role, no service role
    nova: Any  # Nova's service user: service and admin roles
    binder: Any  # service role only
    demo: Any  # member of another project
    network_id: str

    def server_port(self) -> str:
        """A port of a server, bound and wired on cmp1."""
        raise NotImplementedError

    def bare_port(self) -> str:
        """A port no server owns (device_owner empty)."""
        raise NotImplementedError

    def bindings(self, port_id: str) -> dict[str, tuple[str, str]]:
        return {b.host: (b.status, b.vif_type) for b in self.nova.network.port_bindings(port_id)}


class RealBackend(Backend):
    name = "real"

    def __init__(self, cloud: RealCloud, scene: Scene) -> None:
        self.scene = scene
        self.admin = cloud.connect(ADMIN)
        self.nova = cloud.connect(NOVA)
        self.binder = cloud.connect(BINDER)
        self.demo = cloud.connect(DEMO)
        self.network_id = scene.network.id

    def server_port(self) -> str:
        return str(self.scene.server_port("cmp1").id)

    def bare_port(self) -> str:
        return str(self.scene.server_port(owner="").id)

    def close(self) -> None:
        for conn in (self.admin, self.nova, self.binder, self.demo):
            conn.close()


class FakeBackend(Backend):
    name = "fake"

    def __init__(self, cloud: FakeCloud) -> None:
        self.cloud = cloud
        self.network_id = cloud.add_network("private", 1001)
        for host in ("cmp2", "cmp3", "cmp-stuck"):
            cloud.add_host(host)
        self.admin = self._connect(cloud.username, cloud.password, cloud.project)
        self.nova = self._connect("nova", *cloud.users["nova"][:2])
        self.binder = self._connect("binder", *cloud.users["binder"][:2])
        self.demo = self._connect("demo", *cloud.users["demo"][:2])
        self._macs = 0

    def _connect(self, user: str, password: str, project: str) -> Any:
        return openstack.connect(
            auth={
                "auth_url": self.cloud.auth_url,
                "username": user,
                "password": password,
                "project_name": project,
                "user_domain_name": "Default",
                "project_domain_name": "Default",
            },
            region_name="RegionOne",
            load_yaml_config=False,
            load_envvars=False,
        )

    def _mac(self) -> str:
        self._macs += 1
        return f"fa:16:3e:00:00:{self._macs:02x}"

    def server_port(self) -> str:
        _, ports = self.cloud.add_server("s", "cmp1", [(self.network_id, self._mac(), [])])
        return ports[0]

    def bare_port(self) -> str:
        return self.cloud.add_port(self.network_id, self._mac())

    def close(self) -> None:
        for conn in (self.admin, self.nova, self.binder, self.demo):
            conn.close()


@pytest.fixture(params=["real", "fake"])
def neutron(request: pytest.FixtureRequest) -> Iterator[Backend]:
    if request.param == "real":
        scene = Scene(request.getfixturevalue("admin"))
        backend: Any = RealBackend(request.getfixturevalue("real_cloud"), scene)
        try:
            yield backend
        finally:
            backend.close()
            scene.remove()
    else:
        with FakeCloud() as fake:
            backend = FakeBackend(fake)
            try:
                yield backend
            finally:
                backend.close()


def forbidden(call: Any) -> str:
    with pytest.raises(sdk_exc.ForbiddenException) as refused:
        call()
    assert refused.value.status_code == 403
    return str(refused.value.details)


def test_creating_activating_and_deleting_a_binding_need_the_service_role(
    neutron: Backend,
) -> None:
    port = neutron.server_port()
    admin = neutron.admin.network

    assert "create_port_binding" in forbidden(
        lambda: admin.create_port_binding(port, host="cmp2", vnic_type="normal")
    )
    neutron.nova.network.create_port_binding(port, host="cmp2", vnic_type="normal")
    assert "activate" in forbidden(lambda: admin.activate_port_binding(port, "cmp2"))
    assert "delete_port_binding" in forbidden(lambda: admin.delete_port_binding(port, "cmp2"))
    # Listing them is allowed to admin as to service.
    assert {b.host for b in admin.port_bindings(port)} == {"cmp1", "cmp2"}
    assert {b.host for b in neutron.binder.network.port_bindings(port)} == {"cmp1", "cmp2"}


def test_provider_attributes_are_hidden_from_a_user_without_the_admin_role(
    neutron: Backend,
) -> None:
    hidden = neutron.binder.network.get_network(neutron.network_id)
    shown = neutron.nova.network.get_network(neutron.network_id)

    assert (hidden.provider_network_type, hidden.provider_segmentation_id) == (None, None)
    assert shown.provider_network_type == "vxlan"
    assert isinstance(shown.provider_segmentation_id, int)


def test_a_host_nothing_can_bind_is_answered_500_port_binding_error_keeping_nothing(
    neutron: Backend,
) -> None:
    port = neutron.server_port()

    with pytest.raises(sdk_exc.HttpException) as failed:
        neutron.nova.network.create_port_binding(port, host="nowhere", vnic_type="normal")

    assert failed.value.status_code == 500
    assert os_cloud.neutron_error_type(failed.value) == "PortBindingError"
    assert "on host nowhere could not be created or updated" in str(failed.value.details)
    assert neutron.bindings(port) == {"cmp1": ("ACTIVE", "ovs")}


def test_bindings_exist_only_for_a_servers_ports(neutron: Backend) -> None:
    port = neutron.bare_port()

    for call in (
        lambda: list(neutron.nova.network.port_bindings(port)),
        lambda: neutron.nova.network.create_port_binding(port, host="cmp2", vnic_type="normal"),
    ):
        with pytest.raises(sdk_exc.BadRequestException) as refused:
            call()
        assert "Operation only valid on compute and shared filesystem ports" in str(
            refused.value.details
        )


def test_activating_keeps_the_old_binding_inactive_and_unbound(neutron: Backend) -> None:
    port = neutron.server_port()
    nova = neutron.nova.network
    nova.create_port_binding(port, host="cmp2", vnic_type="normal")

    nova.activate_port_binding(port, "cmp2")

    assert neutron.bindings(port) == {
        "cmp1": ("INACTIVE", "unbound"),
        "cmp2": ("ACTIVE", "ovs"),
    }
    # DOWN until the destination's agent has wired it.
    assert nova.get_port(port).status == "DOWN"
    deadline = time.monotonic() + 10
    while nova.get_port(port).status != "ACTIVE":
        assert time.monotonic() < deadline, "the port never turned ACTIVE"
        time.sleep(0.05)


def test_neutron_deletes_even_an_active_binding_and_a_missing_one_is_no_error(
    neutron: Backend,
) -> None:
    port = neutron.server_port()
    nova = neutron.nova.network

    nova.delete_port_binding(port, "cmp3")  # none there: 204, not 404
    nova.delete_port_binding(port, "cmp1")  # the ACTIVE one: gone

    assert neutron.bindings(port) == {}


def test_a_member_of_another_project_sees_no_port_and_gets_no_error(neutron: Backend) -> None:
    port = neutron.server_port()
    mac = neutron.nova.network.get_port(port).mac_address

    assert list(neutron.demo.network.ports(mac_address=mac)) == []
    with pytest.raises(sdk_exc.NotFoundException):
        neutron.demo.network.get_port(port)
    assert [p.id for p in neutron.binder.network.ports(mac_address=mac)] == [port]
