"""Real Keystone and real Neutron from PyPI, started on 127.0.0.1 for the tests.

The services live in their own virtual environment, ``.venv-openstack``
(``scripts/setup-openstack.sh`` installs it; ``RealCloud.start`` runs that
script, which returns at once when it is done), so that their pinned
dependencies never meet the product's ``.venv``. They run as subprocesses of
that environment's python; the product under test reaches them over HTTP
with openstacksdk, exactly as in a cloud.

How they are set up, as DevStack does where it matters:

* Keystone with Fernet tokens, SQLite, ``keystone-manage bootstrap``
  (admin user and project, the admin/manager/member/reader/service roles,
  the identity endpoints), new RBAC defaults enforced;
* Neutron (``neutron.wsgi.api``, which DevStack serves under uWSGI) with
  ML2 (flat and vxlan), ``transport_url = fake:/`` (no message bus: no
  real agent listens), keystonemiddleware in front, new RBAC defaults
  enforced, the default policy. Its SQLite schema is created the way
  Neutron's own unit tests do (all models, ``create_all``), because
  ``neutron-db-manage`` cannot ALTER constraints on SQLite;
* users as DevStack makes them: ``admin`` (admin role on project admin,
  DevStack's ``devstack-admin`` cloud), ``nova`` (service and admin roles
  on project service, the user of nova.conf's ``[neutron]`` section),
  ``neutron`` (service role, for keystonemiddleware), plus ``binder``
  (service role only) and ``demo`` (member of project demo);
* the per-host L2 agents are the stand-in of ``standin_agent.py``: hosts
  ``cmp1``, ``cmp2``, ``cmp3`` bind and wire ports, ``cmp-stuck`` binds
  but never wires, any other host cannot be bound.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
VENV = ROOT / ".venv-openstack"
PASSWORD = "secret-admin"
SERVICE_PASSWORD = "secret-service"
REGION = "RegionOne"

#: Hosts whose stand-in agent binds and wires ports; binds but never wires.
WIRING_HOSTS = ("cmp1", "cmp2", "cmp3")
STUCK_HOST = "cmp-stuck"
#: The hosts of the two nova-compute services (their stand-in agents wire ports).
NOVA_HOSTS = ("cmp1", "cmp2")
WIRE_DELAY = 0.3


class StartError(RuntimeError):
    """A service did not come up; the message holds the end of its log."""


@dataclasses.dataclass(frozen=True)
class Credentials:
    """One Keystone user as clouds.yaml / an openrc describes it."""

    username: str
    password: str
    project: str

    def auth(self, auth_url: str) -> dict[str, str]:
        return {
            "auth_url": auth_url,
            "username": self.username,
            "password": self.password,
            "project_name": self.project,
            "user_domain_name": "Default",
            "project_domain_name": "Default",
        }


ADMIN = Credentials("admin", PASSWORD, "admin")
NOVA = Credentials("nova", SERVICE_PASSWORD, "service")
BINDER = Credentials("binder", SERVICE_PASSWORD, "service")
DEMO = Credentials("demo", PASSWORD, "demo")


def _log_tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class RealCloud:
    """Keystone + Neutron for one pytest session (``start`` / ``stop``)."""

    def __init__(self, workdir: Path) -> None:
        self.dir = workdir
        self.python = str(VENV / "bin" / "python")
        self.procs: list[tuple[str, subprocess.Popen[bytes], Path]] = []
        self.keystone_url = ""
        self.neutron_url = ""
        self.placement_url = ""
        self.nova_url = ""
        self.timings: dict[str, float] = {}

    # ----------------------------------------------------------- set-up

    def start(self) -> None:
        t0 = time.monotonic()
        subprocess.run(["bash", str(ROOT / "scripts" / "setup-openstack.sh")], check=True)
        self.timings["install"] = time.monotonic() - t0
        t1 = time.monotonic()
        self._keystone()
        self._identities()
        self._neutron()
        self.timings["start"] = time.monotonic() - t1

    def stop(self) -> None:
        for _name, proc, _log in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for _name, proc, _log in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()

    def _run(self, what: str, args: list[str], env: dict[str, str] | None = None) -> None:
        log = self.dir / f"{what}.log"
        with log.open("ab") as out:
            done = subprocess.run(
                args, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=self.dir, check=False
            )
        if done.returncode != 0:
            raise StartError(f"{what} failed ({done.returncode}):\n{_log_tail(log)}")

    def _serve(self, name: str, target: str, env: dict[str, str], *lock: str) -> str:
        """Start ``serve_wsgi.py`` for ``target``; its URL once it listens and answers."""
        import requests

        port_file = self.dir / f"{name}.port"
        log = self.dir / f"{name}.log"
        out = log.open("ab")
        proc = subprocess.Popen(
            [self.python, str(HERE / "serve_wsgi.py"), target, str(port_file), *lock],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=self.dir,
            start_new_session=True,
        )
        out.close()
        self.procs.append((name, proc, log))
        deadline = time.monotonic() + 120
        while not port_file.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise StartError(f"{name} did not start:\n{_log_tail(log)}")
            time.sleep(0.05)
        url = f"http://127.0.0.1:{port_file.read_text().strip()}"
        while True:
            try:
                requests.get(url + "/", timeout=5)
                return url
            except requests.RequestException:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise StartError(f"{name} does not answer:\n{_log_tail(log)}") from None
                time.sleep(0.05)

    def _env(self, **extra: str) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("OS_", "PYTHON", "VIRTUAL_ENV"))
        }
        env.update(extra)
        return env

    def _keystone(self) -> None:
        d = self.dir / "keystone"
        d.mkdir()
        conf = d / "keystone.conf"
        conf.write_text(
            f"""[DEFAULT]
debug = false
[database]
connection = sqlite:///{d}/keystone.db
[token]
provider = fernet
[fernet_tokens]
key_repository = {d}/fernet-keys
[fernet_receipts]
key_repository = {d}/fernet-keys
[credential]
key_repository = {d}/credential-keys
[oslo_policy]
enforce_new_defaults = true
"""
        )
        manage = [str(VENV / "bin" / "keystone-manage"), "--config-file", str(conf)]
        env = self._env()
        t = time.monotonic()
        self._run("keystone-db-sync", [*manage, "db_sync"], env)
        self.timings["keystone db_sync"] = time.monotonic() - t
        for step in ("fernet_setup", "credential_setup"):
            self._run(
                f"keystone-{step}",
                [*manage, step, "--keystone-user", "root", "--keystone-group", "root"],
                env,
            )
        self.keystone_url = self._serve(
            "keystone",
            "keystone.wsgi.api:application",
            self._env(OS_KEYSTONE_CONFIG_FILES=str(conf)),
        )
        url = self.auth_url
        self._run(
            "keystone-bootstrap",
            [
                *manage,
                "bootstrap",
                "--bootstrap-password",
                PASSWORD,
                "--bootstrap-region-id",
                REGION,
                "--bootstrap-admin-url",
                url,
                "--bootstrap-public-url",
                url,
                "--bootstrap-internal-url",
                url,
            ],
            env,
        )

    @property
    def auth_url(self) -> str:
        return f"{self.keystone_url}/v3"

    def connect(self, who: Credentials = ADMIN) -> Any:
        """An openstacksdk Connection as ``who`` (the product's own library)."""
        import openstack

        return openstack.connect(
            auth=who.auth(self.auth_url),
            region_name=REGION,
            identity_api_version="3",
            load_yaml_config=False,
            load_envvars=False,
        )

    def _identities(self) -> None:
        conn = self.connect(ADMIN)
        try:
            for project in ("service", "demo"):
                conn.identity.create_project(name=project, domain_id="default")
            users = {
                "nova": (SERVICE_PASSWORD, "service", ("service", "admin")),
                "neutron": (SERVICE_PASSWORD, "service", ("service",)),
                "placement": (SERVICE_PASSWORD, "service", ("service",)),
                "binder": (SERVICE_PASSWORD, "service", ("service",)),
                "demo": (PASSWORD, "demo", ("member",)),
            }
            for name, (password, project, roles) in users.items():
                conn.identity.create_user(name=name, password=password, domain_id="default")
                for role in roles:
                    conn.grant_role(role, user=name, project=project, domain="default")
        finally:
            conn.close()

    def _neutron(self) -> None:
        d = self.dir / "neutron"
        d.mkdir()
        (d / "lock").mkdir()
        db = d / "neutron.db"
        conf = d / "neutron.conf"
        paste = VENV / "etc" / "neutron" / "api-paste.ini"
        conf.write_text(
            f"""[DEFAULT]
debug = false
host = neutron-api
core_plugin = ml2
service_plugins =
auth_strategy = keystone
transport_url = fake:/
state_path = {d}
api_paste_config = {paste}
notify_nova_on_port_status_changes = false
notify_nova_on_port_data_changes = false
[database]
connection = sqlite:///{db}
[keystone_authtoken]
www_authenticate_uri = {self.auth_url}
auth_url = {self.auth_url}
auth_type = password
username = neutron
password = {SERVICE_PASSWORD}
user_domain_name = Default
project_name = service
project_domain_name = Default
[oslo_policy]
enforce_new_defaults = true
[oslo_concurrency]
lock_path = {d}/lock
[ml2]
type_drivers = flat,vxlan
tenant_network_types = vxlan
mechanism_drivers = standin_agent
extension_drivers = port_security
[ml2_type_vxlan]
vni_ranges = 1001:1999
[ml2_type_flat]
flat_networks = physnet1
[standin_agent]
hosts = {",".join(WIRING_HOSTS)}
never_wire = {STUCK_HOST}
wire_delay = {WIRE_DELAY}
"""
        )
        # The stand-in agent's entry point, without installing a package: a
        # distribution's metadata on PYTHONPATH is what importlib.metadata reads.
        site = d / "site"
        dist = site / "vmm_standin_agent-1.0.dist-info"
        dist.mkdir(parents=True)
        (dist / "METADATA").write_text(
            "Metadata-Version: 2.1\nName: vmm-standin-agent\nVersion: 1.0\n"
        )
        (dist / "entry_points.txt").write_text(
            "[neutron.ml2.mechanism_drivers]\nstandin_agent = standin_agent:StandInAgentDriver\n"
        )
        env = self._env(
            OS_NEUTRON_CONFIG_FILES=str(conf),
            OS_NEUTRON_CONFIG_DIR="/",
            PYTHONPATH=f"{site}{os.pathsep}{HERE}",
        )
        t = time.monotonic()
        self._run(
            "neutron-schema",
            [
                self.python,
                "-c",
                "import sys, sqlalchemy\n"
                "from neutron.db.migration.models import head  # noqa: every model\n"
                "from neutron_lib.db import model_base\n"
                "engine = sqlalchemy.create_engine(sys.argv[1])\n"
                "model_base.BASEV2.metadata.create_all(engine)\n",
                f"sqlite:///{db}",
            ],
            env,
        )
        self.timings["neutron schema"] = time.monotonic() - t
        self.neutron_url = self._serve(
            "neutron", "neutron.wsgi.api:application", env, "standin_agent:SERIAL"
        )
        conn = self.connect(ADMIN)
        try:
            service = conn.identity.create_service(name="neutron", type="network")
            for interface in ("public", "internal", "admin"):
                conn.identity.create_endpoint(
                    service_id=service.id,
                    interface=interface,
                    url=self.neutron_url,
                    region_id=REGION,
                )
        finally:
            conn.close()

    def _endpoints(self, name: str, kind: str, url: str) -> None:
        conn = self.connect(ADMIN)
        try:
            service = conn.identity.create_service(name=name, type=kind)
            for interface in ("public", "internal", "admin"):
                conn.identity.create_endpoint(
                    service_id=service.id, interface=interface, url=url, region_id=REGION
                )
        finally:
            conn.close()

    def _authtoken(self, user: str) -> str:
        return f"""[keystone_authtoken]
www_authenticate_uri = {self.auth_url}
auth_url = {self.auth_url}
auth_type = password
username = {user}
password = {SERVICE_PASSWORD}
user_domain_name = Default
project_name = service
project_domain_name = Default
"""

    def _client_section(self, section: str) -> str:
        """A [placement] / [neutron] / [glance] section of nova.conf: Nova's service user."""
        return f"""[{section}]
auth_type = password
auth_url = {self.auth_url}
username = nova
password = {SERVICE_PASSWORD}
user_domain_name = Default
project_name = service
project_domain_name = Default
region_name = {REGION}
valid_interfaces = public
"""

    # ------------------------------------------------------------- Nova

    def start_nova(self) -> None:
        """Placement, the image stand-in and Nova (api, conductor, scheduler, computes)."""
        t0 = time.monotonic()
        self._placement()
        self.timings["placement"] = time.monotonic() - t0
        t1 = time.monotonic()
        image_url = self._serve(
            "image", "standin_image:application", self._env(PYTHONPATH=str(HERE))
        )
        self._endpoints("glance", "image", image_url)
        self._nova()
        self.timings["nova"] = time.monotonic() - t1

    def _placement(self) -> None:
        d = self.dir / "placement"
        d.mkdir()
        (d / "placement.conf").write_text(
            f"""[DEFAULT]
debug = false
[placement_database]
connection = sqlite:///{d}/placement.db
[api]
auth_strategy = keystone
[oslo_policy]
enforce_new_defaults = true
{self._authtoken("placement")}"""
        )
        env = self._env(OS_PLACEMENT_CONFIG_DIR=str(d))
        self._run(
            "placement-db-sync",
            [str(VENV / "bin" / "placement-manage"), "--config-dir", str(d), "db", "sync"],
            env,
        )
        self.placement_url = self._serve("placement", "placement.wsgi.api:application", env)
        self._endpoints("placement", "placement", self.placement_url)

    def _nova(self) -> None:
        d = self.dir / "nova"
        d.mkdir()
        (d / "lock").mkdir()
        (d / "instances").mkdir()
        shutil.copy(VENV / "etc" / "nova" / "api-paste.ini", d / "api-paste.ini")
        cell1 = f"sqlite:///{d}/nova.db?timeout=60"
        conf = d / "nova.conf"
        conf.write_text(
            f"""[DEFAULT]
debug = false
host = nova-api
my_ip = 127.0.0.1
transport_url = fake:/
state_path = {d}
instances_path = {d}/instances
compute_driver = standin_hypervisor.StandInHypervisor
vif_plugging_is_fatal = false
vif_plugging_timeout = 0
report_interval = 10
[api]
auth_strategy = keystone
[wsgi]
api_paste_config = {d}/api-paste.ini
[api_database]
connection = sqlite:///{d}/nova_api.db?timeout=60
[database]
connection = {cell1}
[oslo_concurrency]
lock_path = {d}/lock
[oslo_messaging_notifications]
driver = noop
[oslo_policy]
enforce_new_defaults = true
[compute]
live_migration_wait_for_vif_plug = false
[scheduler]
discover_hosts_in_cells_interval = -1
[conductor]
workers = 1
[os_vif_ovs]
ovsdb_connection =
{self._authtoken("nova")}
{self._client_section("placement")}
{self._client_section("neutron")}
{self._client_section("glance")}"""
        )
        manage = [str(VENV / "bin" / "nova-manage"), "--config-file", str(conf)]
        env = self._env(
            OS_NOVA_CONFIG_DIR=str(d),
            OS_NOVA_CONFIG_FILES="api-paste.ini;nova.conf",
            PYTHONPATH=str(HERE),
        )
        t = time.monotonic()
        for step, args in (
            ("api-db-sync", ["api_db", "sync"]),
            (
                "map-cell0",
                [
                    "cell_v2",
                    "map_cell0",
                    "--database_connection",
                    f"sqlite:///{d}/nova_cell0.db?timeout=60",
                ],
            ),
            (
                "create-cell1",
                [
                    "cell_v2",
                    "create_cell",
                    "--name",
                    "cell1",
                    "--database_connection",
                    cell1,
                    "--transport-url",
                    "fake:/",
                ],
            ),
            ("db-sync", ["db", "sync"]),
        ):
            self._run(f"nova-manage-{step}", [*manage, *args], env)
        self.timings["nova-manage"] = time.monotonic() - t
        self.nova_url = self._serve_nova(env)
        self._endpoints("nova", "compute", f"{self.nova_url}/v2.1")
        conn = self.connect(ADMIN)
        try:
            conn.compute.create_flavor(name="m1.tiny", ram=512, vcpus=1, disk=1, id="1")
        finally:
            conn.close()

    def _serve_nova(self, env: dict[str, str]) -> str:
        """Start nova_services.py; Nova's API URL once every service is up."""
        port_file = self.dir / "nova.port"
        log = self.dir / "nova.log"
        out = log.open("ab")
        proc = subprocess.Popen(
            [self.python, str(HERE / "nova_services.py"), str(port_file), *NOVA_HOSTS],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=self.dir,
            start_new_session=True,
        )
        out.close()
        self.procs.append(("nova", proc, log))
        deadline = time.monotonic() + 180
        while not port_file.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise StartError(f"nova did not start:\n{_log_tail(log, 60)}")
            time.sleep(0.1)
        return f"http://127.0.0.1:{port_file.read_text().strip()}"

    # ---------------------------------------------------------- for tests

    def clouds_yaml(self, path: Path, **entries: Credentials) -> Path:
        """A clouds.yaml with one entry per keyword (JSON is valid YAML)."""
        clouds = {
            name: {
                "auth": who.auth(self.auth_url),
                "region_name": REGION,
                "identity_api_version": 3,
            }
            for name, who in entries.items()
        }
        path.write_text(json.dumps({"clouds": clouds}, indent=2))
        return path

    def env(self, who: Credentials = ADMIN) -> dict[str, str]:
        """The OS_* variables of an openrc for ``who``."""
        return {
            "OS_AUTH_URL": self.auth_url,
            "OS_USERNAME": who.username,
            "OS_PASSWORD": who.password,
            "OS_PROJECT_NAME": who.project,
            "OS_USER_DOMAIN_NAME": "Default",
            "OS_PROJECT_DOMAIN_NAME": "Default",
            "OS_REGION_NAME": REGION,
            "OS_IDENTITY_API_VERSION": "3",
        }

    def neutron_section(self, who: Credentials = NOVA) -> str:
        """vmm-orchestrator.conf's ``[neutron]``, as nova.conf's is written by DevStack."""
        return (
            "[neutron]\n"
            "auth_type = password\n"
            f"auth_url = {self.auth_url}\n"
            f"username = {who.username}\n"
            f"password = {who.password}\n"
            "user_domain_name = Default\n"
            f"project_name = {who.project}\n"
            "project_domain_name = Default\n"
            f"region_name = {REGION}\n"
        )


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


@contextlib.contextmanager
def running_cloud() -> Iterator[RealCloud]:
    """A started RealCloud in a fresh directory; everything stopped and removed after.

    With ``VMM_OPENSTACK_KEEP=1`` the directory (configurations, databases, the
    services' logs) is kept for a look after a failure, and its path printed.
    """
    workdir = Path(tempfile.mkdtemp(prefix=f"vmm-os-{uuid.uuid4().hex[:6]}-"))
    cloud = RealCloud(workdir)
    try:
        cloud.start()
        yield cloud
    finally:
        cloud.stop()
        if os.environ.get("VMM_OPENSTACK_KEEP") == "1":
            print(f"real OpenStack kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
