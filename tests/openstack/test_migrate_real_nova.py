"""`vmm migrate-with-network` driving real Nova, against real Keystone, Neutron and Placement.

Nova runs for real (tests/openstack/nova_services.py): nova-api (its WSGI
application), nova-conductor, nova-scheduler and two nova-compute (hosts
cmp1 and cmp2), on SQLite, the message bus oslo.messaging's in-memory driver
in that one process. Nova itself creates the servers' ports, binds them,
schedules, checks the destination, creates the destination's inactive
bindings in its conductor, runs the live migration, rolls it back on failure
and cancels it on abort. What does not run here, and its stand-in:

* a hypervisor: Nova's fake virt driver (``FakeLiveMigrateDriver``), whose
  migration length and failure the tests choose through the server's
  metadata (standin_hypervisor.py), since a real QEMU failure cannot be
  produced on demand;
* Glance: Nova only reads an image's metadata to boot a server
  (standin_image.py);
* the L2 agents: the stand-in ML2 mechanism driver of the Neutron tests.

The command runs in-process as an operator runs it: DevStack's admin in
OS_*, Nova's service user in ``[neutron]``.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from real_cloud import ADMIN, RealCloud, Scene, wait_for
from standin_image import IMAGE_ID

from vmm_orchestrator import cli

pytestmark = pytest.mark.filterwarnings(
    "ignore::openstack.warnings.RemovedInSDK50Warning",
    "ignore::openstack.warnings.RemovedInSDK60Warning",
)

FAST = """\
[openstack]
poll_interval = 0.1
converge_timeout = 10
abort_timeout = 20
api_timeout = 30
migration_timeout = 60
"""


@pytest.fixture(scope="session")
def cloud(real_nova: RealCloud) -> Iterator[Any]:
    """DevStack's admin, connected once Nova is in the catalog (the session's ``admin``
    may have been connected before, by the Neutron tests, with a catalog without it)."""
    conn = real_nova.connect(ADMIN)
    yield conn
    conn.close()


@pytest.fixture
def operator(real_nova: RealCloud, monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in real_nova.env(ADMIN).items():
        monkeypatch.setenv(key, value)


@pytest.fixture
def conf(real_nova: RealCloud, tmp_path: Path) -> str:
    path = tmp_path / "vmm.conf"
    path.write_text(FAST + real_nova.neutron_section())
    return str(path)


@pytest.fixture
def boot(real_nova: RealCloud, scene: Scene, cloud: Any) -> Iterator[Callable[..., Any]]:
    """Boot a server on the scene's network on a host; all deleted afterwards (before the scene)."""
    admin = cloud
    made: list[str] = []

    def make(host: str = "cmp1", **metadata: str) -> Any:
        server = admin.compute.create_server(
            name=f"vm-{scene.tag}-{len(made)}",
            flavor_id="1",
            image_id=IMAGE_ID,
            networks=[{"uuid": scene.network.id}],
            availability_zone=f"nova:{host}",
            metadata=metadata,
        )
        made.append(server.id)
        server = admin.compute.wait_for_server(server, status="ACTIVE", wait=60, interval=0.2)
        assert server.compute_host == host
        # Nova reports the server ACTIVE before the host's agent has reported its port up
        # (the stand-in agent does it wire_delay later, as a real one does): wait for that.
        port = port_of(admin, server)
        wait_for("the server's port ACTIVE", lambda: scene.status(port.id) == "ACTIVE")
        return server

    yield make
    for server_id in made:
        admin.compute.delete_server(server_id, ignore_missing=True)
    wait_for(
        "the servers deleted",
        lambda: all(admin.compute.find_server(s, ignore_missing=True) is None for s in made),
        timeout=60,
    )


def port_of(admin: Any, server: Any) -> Any:
    ports = list(admin.network.ports(device_id=server.id))
    assert len(ports) == 1, ports
    return ports[0]


def bindings(admin: Any, port_id: str) -> dict[str, str]:
    return {b.host: b.status for b in admin.network.port_bindings(port_id)}


def migrate(conf: str, server: Any, host: str, *extra: str) -> int:
    return cli.main(
        ["--config-file", conf, "migrate-with-network", server.id, "--host", host, *extra]
    )


def migrations(admin: Any, server: Any) -> list[Any]:
    return list(admin.compute.migrations(instance_uuid=server.id))


def test_nova_runs_for_real(real_nova: RealCloud, cloud: Any) -> None:
    """The tier's Nova: its services report up, both computes are in Placement."""
    admin = cloud
    services = {(s.binary, s.host): s.state for s in admin.compute.services()}
    assert services[("nova-compute", "cmp1")] == "up"
    assert services[("nova-compute", "cmp2")] == "up"
    assert services[("nova-conductor", "nova-api")] == "up"
    assert services[("nova-scheduler", "nova-api")] == "up"
    assert sorted(h.name for h in admin.compute.hypervisors()) == ["cmp1", "cmp2"]
    assert uuid.UUID(IMAGE_ID)


def test_a_normal_move_through_nova(
    real_nova: RealCloud, scene: Scene, cloud: Any, boot: Any, operator: None, conf: str, capsys
) -> None:
    server = boot("cmp1")
    port = port_of(cloud, server)
    assert (port.binding_host_id, port.status) == ("cmp1", "ACTIVE")

    status = migrate(conf, server, "cmp2")

    out, err = capsys.readouterr()
    assert (status, err) == (0, ""), out + err
    assert "runs on cmp2 and its network has converged" in out
    moved = cloud.compute.get_server(server.id)
    assert (moved.compute_host, moved.status) == ("cmp2", "ACTIVE")
    after = cloud.network.get_port(port.id)
    assert (after.binding_host_id, after.status) == ("cmp2", "ACTIVE")
    wait_for(
        "only the destination's binding",
        lambda: bindings(cloud, port.id) == {"cmp2": "ACTIVE"},
    )
    done = migrations(cloud, server)
    assert [m.status for m in done] == ["completed"]
    # Followed through Nova's migration status API: the memory copy's progress.
    assert "running" in out and "MiB of 1.0 GiB" in out
    assert "completed 100% (1.0 GiB of 1.0 GiB) -> cmp2" in out


def test_nova_conductor_binds_and_nova_activates(
    real_nova: RealCloud, scene: Scene, cloud: Any, boot: Any, operator: None, conf: str, capsys
) -> None:
    """Divergence from the stand-in Nova: a live migration never shows ``post-migrating``
    (that status is cold migration's and resize's); it goes from ``running`` to
    ``completed``, and Nova's source compute activates the destination's binding itself
    (``_post_live_migration`` -> ``migrate_instance_start``) before it says ``completed``.
    The command's prestage hands the destination to Nova's conductor (which creates the
    inactive binding), and its commit finds the binding Nova made already active."""
    server = boot("cmp1", **{"standin:seconds": "3"})
    port = port_of(cloud, server)
    seen: dict[str, set[str]] = {"bindings": set(), "statuses": set()}

    import threading

    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            for host, status in bindings(cloud, port.id).items():
                seen["bindings"].add(f"{host}:{status}")
            for m in migrations(cloud, server):
                seen["statuses"].add(str(m.status))
            stop.wait(0.1)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        status = migrate(conf, server, "cmp2")
    finally:
        stop.set()
        watcher.join()
    out, err = capsys.readouterr()
    assert (status, err) == (0, ""), out + err
    assert "handed over to Nova: its conductor binds the ports on cmp2 itself" in out
    # Nova's conductor made the destination's inactive binding during the migration.
    assert "cmp2:INACTIVE" in seen["bindings"], seen
    assert "post-migrating" not in seen["statuses"], seen
    assert "binding on cmp2 already active, Nova activated it" in out
    assert bindings(cloud, port.id) == {"cmp2": "ACTIVE"}


def test_abort_through_nova(
    real_nova: RealCloud,
    scene: Scene,
    cloud: Any,
    boot: Any,
    operator: None,
    tmp_path: Path,
    capsys,
) -> None:
    """A migration past ``migration_timeout`` is aborted with Nova's abort API; Nova cancels
    it and rolls back (its conductor's binding on the destination deleted); the server stays."""
    server = boot("cmp1", **{"standin:seconds": "120"})
    port = port_of(cloud, server)
    conf = tmp_path / "abort.conf"
    conf.write_text(
        FAST.replace("migration_timeout = 60", "migration_timeout = 4")
        + real_nova.neutron_section()
    )

    status = migrate(str(conf), server, "cmp2")

    out, err = capsys.readouterr()
    assert status == 2, out + err
    line = err.strip().splitlines()[-1]
    assert "phase migrate failed" in line and "did not finish within 4 s" in line, line
    assert "it was aborted (cancelled)" in line, line
    assert "asked Nova to abort" in out
    assert [m.status for m in migrations(cloud, server)] == ["cancelled"]
    wait_for(
        "the server ACTIVE on cmp1",
        lambda: (
            (lambda s: (s.status, s.compute_host, s.task_state))(
                cloud.compute.get_server(server.id)
            )
            == ("ACTIVE", "cmp1", None)
        ),
        timeout=30,
    )
    wait_for("only the source's binding", lambda: bindings(cloud, port.id) == {"cmp1": "ACTIVE"})
    # Nova's rollback clears ``migrating_to`` from the port's binding profile, which
    # Neutron answers with a rebind: the port is DOWN until the source's agent has
    # wired it again (seen under load), then ACTIVE. The stand-in Nova never does this.
    wait_for("the port ACTIVE on cmp1 again", lambda: scene.status(port.id) == "ACTIVE")


def test_a_failed_migration_through_nova(
    real_nova: RealCloud, scene: Scene, cloud: Any, boot: Any, operator: None, conf: str, capsys
) -> None:
    """The hypervisor fails the copy half way (the stand-in driver calls Nova's recovery,
    as the libvirt driver does when QEMU's migration fails).

    Divergence from the stand-in Nova: real Nova's rollback leaves the migration
    ``failed``, not ``error`` (``error`` is the conductor's, for a migration that never
    reached the hypervisor), and Nova's own rollback deletes the binding its conductor
    made on the destination, so the command finds nothing left to delete. Nova records
    no error detail in the instance action for a hypervisor-reported failure (the
    ``recover_method`` path raises nothing), so the command's line carries no reason
    from Nova. Nothing is left: the server and its port on cmp1, no binding on cmp2."""
    server = boot("cmp1", **{"standin:fail": "1", "standin:seconds": "2"})
    port = port_of(cloud, server)

    status = migrate(conf, server, "cmp2")

    out, err = capsys.readouterr()
    assert status == 2, out + err
    line = err.strip().splitlines()[-1]
    assert "phase migrate failed: Nova migration" in line and "ended in failed;" in line, line
    assert f"reverted: no binding of port {port.id[:8]} left on cmp2" in line, line
    assert "still runs on cmp1" in line, line
    assert [m.status for m in migrations(cloud, server)] == ["failed"]
    wait_for(
        "the server ACTIVE on cmp1",
        lambda: (
            (lambda s: (s.status, s.compute_host, s.task_state))(
                cloud.compute.get_server(server.id)
            )
            == ("ACTIVE", "cmp1", None)
        ),
        timeout=30,
    )
    wait_for("only the source's binding", lambda: bindings(cloud, port.id) == {"cmp1": "ACTIVE"})
    assert cloud.network.get_port(port.id).binding_host_id == "cmp1"
    # As after a cancelled migration (above): Nova's rollback makes Neutron rebind the
    # port, DOWN until the source's agent wired it again (CI saw DOWN right after).
    wait_for("the port ACTIVE on cmp1 again", lambda: scene.status(port.id) == "ACTIVE")
