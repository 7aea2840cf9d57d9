"""A local stand-in for the Keystone v3, Nova and Neutron APIs, for fault injection.

The real services are tested in tests/openstack/ (real Keystone and Neutron
from PyPI, under Neutron's default policy). This stand-in stays for what
they cannot do on demand: a Nova live migration (real Nova runs in
tests/openstack/test_migrate_real_nova.py, with a steerable fake hypervisor)
that ends in a conductor error, never finishes or leaks bindings on rollback, a Neutron
without ``binding-extended``, refused credentials, an unreachable service.
Its Neutron copies every behaviour the real one showed where it differed
from this stand-in's first version (each is a test in
tests/openstack/test_neutron_behaviour.py, run against both):

* policy: creating, activating and deleting a port binding needs the
  ``service`` role (403 otherwise), listing bindings ``admin`` or
  ``service``; ``provider:*`` attributes are hidden from non-admins;
* a host nothing can bind is answered ``500 PortBindingError`` and nothing
  is kept (hosts are bindable once ``add_host``/``add_server`` named them);
* bindings exist only for compute ports (400 for any other port);
* activating a binding keeps the old one INACTIVE with ``vif_type unbound``;
* deleting a binding deletes it even when ACTIVE, and a missing one is 204;
* a user without admin or service sees only its own project's ports: others
  are absent from lists (no error) and 404 when asked for.

Users (``FakeCloud.users``): the operator (admin role only, DevStack's
admin), ``nova`` (service and admin roles, Nova's service user; the
``[neutron]`` section of ``neutron_section()``), ``binder`` (service
role only) and ``demo`` (member of project demo). It speaks only the
subset ``vmm migrate-with-network`` and the Neutron directory use, with the
status codes and error bodies of the real services:

* Keystone v3: version discovery, ``POST /v3/auth/tokens`` (password) with a
  catalog holding compute, network and identity.
* Nova (v2.1, microversions 2.1 to 2.96): servers (by id, listed with a
  ``name`` filter), the ``os-migrateLive`` action (body checked per
  microversion), in-progress server migrations with memory progress (2.23+)
  and their abort (2.24+), and ``/os-migrations``.
* Neutron (v2.0): extensions, networks (with provider attributes), ports
  (filters, ``binding:host_id`` update) and, when the ``binding-extended``
  extension is on, port bindings (create, list, activate, delete).

Every Nova and Neutron call needs a token Keystone issued (else 401).

A live migration runs in a thread as Nova's would: the conductor binds the
ports on the destination (inactive bindings; an existing binding there
fails the migration with Neutron's 409, as in the field), the memory copy
advances a step per tick, then the destination bindings are activated, the
source ones removed, the server moves and the migration completes.
Without the binding extension the port's ``binding:host_id`` is updated at
the end instead. A port turns ACTIVE ``wire_delay`` seconds after it is
bound to a new host (the host's L2 agent wiring it).

Behaviours (``Behaviour``) make the error paths: credentials that are
refused, no binding extension, a migration that ends in error (its
rollback leaks the destination's inactive bindings, as Nova has done),
a migration that never finishes (only an abort ends it), a stale inactive
binding on a host (``FakeCloud.add_binding``).
"""

from __future__ import annotations

import dataclasses
import json
import re
import threading
import time
import uuid
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

SERVICE_PASSWORD = "service-secret"
NOVA_MIN = (2, 1)
NOVA_MAX = (2, 96)
GIB = 1024**3


@dataclasses.dataclass
class Behaviour:
    """What the stand-in cloud does; the defaults are a healthy cloud."""

    #: Keystone refuses every password (wrong credentials, whatever is sent).
    refuse_credentials: bool = False
    #: Neutron offers the ``binding-extended`` extension (multiple bindings per port).
    binding_extension: bool = True
    #: The live migration ends in ``error`` after half of its memory copy.
    migration_error: bool = False
    #: The live migration's memory copy never converges; only an abort ends it.
    never_finish: bool = False
    #: Nova's rollback leaves the destination's inactive bindings behind.
    leak_bindings_on_rollback: bool = True
    #: The destination's L2 agent never wires a port bound there (stays DOWN).
    agent_never_wires: bool = False
    #: Seconds per step of the migration timeline.
    tick: float = 0.03
    #: Memory copy steps before the switch-over.
    copy_steps: int = 4
    #: Seconds from a port's (re)binding to its status ACTIVE.
    wire_delay: float = 0.05


class ApiError(Exception):
    """An HTTP error answer with the body the real service would send."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        super().__init__(status, body)
        self.status = status
        self.body = body


def nova_error(status: int, message: str) -> ApiError:
    key = {
        400: "badRequest",
        401: "unauthorized",
        403: "forbidden",
        404: "itemNotFound",
        406: "notAcceptable",
        409: "conflictingRequest",
    }[status]
    return ApiError(status, {key: {"code": status, "message": message}})


def neutron_error(status: int, kind: str, message: str) -> ApiError:
    return ApiError(status, {"NeutronError": {"type": kind, "message": message, "detail": ""}})


def _now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000000", time.gmtime())


class FakeCloud:
    """One HTTP server playing Keystone, Nova and Neutron for one test.

    Use it as a context manager; ``auth_url`` is Keystone's, ``env()``
    gives the OS_* variables and ``write_clouds_yaml`` a clouds.yaml entry,
    exactly as an operator configures the openstack CLI.
    """

    def __init__(
        self,
        behaviour: Behaviour | None = None,
        username: str = "admin",
        password: str = "secret",
        project: str = "admin",
    ) -> None:
        self.behaviour = behaviour or Behaviour()
        self.username = username
        self.password = password
        self.project = project
        #: name -> (password, project, roles), as DevStack creates them.
        self.users: dict[str, tuple[str, str, tuple[str, ...]]] = {
            username: (password, project, ("admin",)),
            "nova": (SERVICE_PASSWORD, "service", ("service", "admin")),
            "binder": (SERVICE_PASSWORD, "service", ("service",)),
            "demo": (password, "demo", ("member", "reader")),
        }
        self.lock = threading.RLock()
        #: token -> the roles of its user
        self.tokens: dict[str, frozenset[str]] = {}
        #: token -> the project id it is scoped to
        self.token_projects: dict[str, str] = {}
        self.requests: list[tuple[str, str]] = []
        #: (method, path, microversion) of every versioned Nova request
        self.nova_requests: list[tuple[str, str, tuple[int, int]]] = []
        self.hosts: list[str] = []
        self.networks: dict[str, dict[str, Any]] = {}
        self.servers: dict[str, dict[str, Any]] = {}
        self.ports: dict[str, dict[str, Any]] = {}
        #: port id -> host -> binding
        self.bindings: dict[str, dict[str, dict[str, Any]]] = {}
        self.migrations: list[dict[str, Any]] = []
        self.actions: list[dict[str, Any]] = []
        self._aborts: dict[int, threading.Event] = {}
        self._threads: list[threading.Thread] = []
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._httpd.daemon_threads = True
        self._serve = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    # ------------------------------------------------------------ lifecycle

    def __enter__(self) -> FakeCloud:
        self._serve.start()
        return self

    def __exit__(self, *exc: object) -> None:
        for event in self._aborts.values():
            event.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        for thread in self._threads:
            thread.join(timeout=5)

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    @property
    def auth_url(self) -> str:
        return f"{self.url}/identity"

    def env(self, password: str | None = None) -> dict[str, str]:
        """OS_* variables as an openrc file sets them."""
        return {
            "OS_AUTH_URL": self.auth_url,
            "OS_USERNAME": self.username,
            "OS_PASSWORD": self.password if password is None else password,
            "OS_PROJECT_NAME": self.project,
            "OS_USER_DOMAIN_NAME": "Default",
            "OS_PROJECT_DOMAIN_NAME": "Default",
            "OS_REGION_NAME": "RegionOne",
            "OS_IDENTITY_API_VERSION": "3",
        }

    def write_clouds_yaml(self, path: str, cloud: str = "fake", password: str | None = None) -> str:
        """A clouds.yaml with one cloud entry (JSON is valid YAML); returns ``path``."""
        entry = {
            "auth": {
                "auth_url": self.auth_url,
                "username": self.username,
                "password": self.password if password is None else password,
                "project_name": self.project,
                "user_domain_name": "Default",
                "project_domain_name": "Default",
            },
            "region_name": "RegionOne",
            "identity_api_version": 3,
        }
        with open(path, "w", encoding="utf-8") as fh:
            json.dump({"clouds": {cloud: entry}}, fh, indent=2)
        return path

    def neutron_section(self, username: str = "nova") -> str:
        """vmm-orchestrator.conf's ``[neutron]`` for a service user, as nova.conf has it."""
        password, project, _roles = self.users[username]
        return (
            "[neutron]\n"
            "auth_type = password\n"
            f"auth_url = {self.auth_url}\n"
            f"username = {username}\n"
            f"password = {password}\n"
            f"project_name = {project}\n"
            "user_domain_name = Default\n"
            "project_domain_name = Default\n"
            "region_name = RegionOne\n"
        )

    # ------------------------------------------------------------- fixtures

    def add_network(self, name: str, segmentation_id: int, network_type: str = "vxlan") -> str:
        net_id = str(uuid.uuid4())
        self.networks[net_id] = {
            "id": net_id,
            "name": name,
            "status": "ACTIVE",
            "admin_state_up": True,
            "shared": False,
            "subnets": [],
            "tenant_id": "p-admin",
            "project_id": "p-admin",
            "provider:network_type": network_type,
            "provider:segmentation_id": segmentation_id,
            "provider:physical_network": None,
            "mtu": 1450,
            "revision_number": 1,
        }
        return net_id

    def add_server(
        self,
        name: str,
        host: str,
        nics: list[tuple[str, str, list[str]]],
    ) -> tuple[str, list[str]]:
        """A server on ``host`` with ports ``(network id, mac, ips)``; (server id, port ids)."""
        for h in (host,):
            if h not in self.hosts:
                self.hosts.append(h)
        server_id = str(uuid.uuid4())
        self.servers[server_id] = {
            "id": server_id,
            "name": name,
            "status": "ACTIVE",
            "OS-EXT-STS:task_state": None,
            "OS-EXT-STS:vm_state": "active",
            "OS-EXT-STS:power_state": 1,
            "OS-EXT-SRV-ATTR:host": host,
            "OS-EXT-SRV-ATTR:hypervisor_hostname": host,
            "tenant_id": "p-admin",
            "user_id": "u-admin",
            "created": _now_iso(),
            "updated": _now_iso(),
            "links": [],
            "addresses": {},
            "metadata": {},
        }
        port_ids = []
        for net_id, mac, ips in nics:
            port_id = str(uuid.uuid4())
            self.ports[port_id] = {
                "id": port_id,
                "name": "",
                "network_id": net_id,
                "mac_address": mac,
                "fixed_ips": [{"subnet_id": f"sub-{net_id[:8]}", "ip_address": ip} for ip in ips],
                "device_id": server_id,
                "device_owner": "compute:nova",
                "status": "ACTIVE",
                "admin_state_up": True,
                "tenant_id": "p-admin",
                "project_id": "p-admin",
                "binding:host_id": host,
                "binding:vif_type": "ovs",
                "binding:vnic_type": "normal",
                "binding:profile": {},
                "binding:vif_details": {"port_filter": True},
                "revision_number": 3,
            }
            self.bindings[port_id] = {host: self._binding(port_id, host, "ACTIVE", {})}
            port_ids.append(port_id)
        return server_id, port_ids

    def add_port(self, network_id: str, mac: str, device_owner: str = "") -> str:
        """A port no server owns (a DHCP or router port, a spare port): unbound."""
        port_id = str(uuid.uuid4())
        self.ports[port_id] = {
            "id": port_id,
            "name": "",
            "network_id": network_id,
            "mac_address": mac,
            "fixed_ips": [],
            "device_id": "",
            "device_owner": device_owner,
            "status": "DOWN",
            "admin_state_up": True,
            "tenant_id": "p-admin",
            "project_id": "p-admin",
            "binding:host_id": "",
            "binding:vif_type": "unbound",
            "binding:vnic_type": "normal",
            "binding:profile": {},
            "binding:vif_details": {},
            "revision_number": 1,
        }
        self.bindings[port_id] = {}
        return port_id

    def add_host(self, name: str) -> None:
        if name not in self.hosts:
            self.hosts.append(name)

    def add_binding(
        self, port_id: str, host: str, profile: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """An inactive binding, e.g. the stale one a failed migration left behind."""
        binding = self._binding(port_id, host, "INACTIVE", profile or {})
        self.bindings[port_id][host] = binding
        return binding

    def port_bindings(self, port_id: str) -> dict[str, str]:
        """host -> status of a port's bindings, for assertions."""
        with self.lock:
            return {h: b["status"] for h, b in self.bindings.get(port_id, {}).items()}

    def calls(self, method: str, pattern: str) -> list[str]:
        """Paths of the requests with ``method`` whose path matches ``pattern``."""
        with self.lock:
            return [p for m, p in self.requests if m == method and re.search(pattern, p)]

    @staticmethod
    def _binding(port_id: str, host: str, status: str, profile: dict[str, Any]) -> dict[str, Any]:
        return {
            "host": host,
            "vif_type": "ovs",
            "vif_details": {"port_filter": True},
            "vnic_type": "normal",
            "profile": dict(profile),
            "status": status,
        }

    # -------------------------------------------------------------- Keystone

    def _catalog(self) -> list[dict[str, Any]]:
        def entry(kind: str, name: str, url: str) -> dict[str, Any]:
            return {
                "id": f"svc-{name}",
                "type": kind,
                "name": name,
                "endpoints": [
                    {
                        "id": f"ep-{name}-{interface}",
                        "interface": interface,
                        "region": "RegionOne",
                        "region_id": "RegionOne",
                        "url": url,
                    }
                    for interface in ("public", "internal", "admin")
                ],
            }

        return [
            entry("identity", "keystone", f"{self.url}/identity"),
            entry("compute", "nova", f"{self.url}/compute/v2.1"),
            entry("network", "neutron", f"{self.url}/networking"),
        ]

    def _keystone_version(self) -> dict[str, Any]:
        return {
            "id": "v3.14",
            "status": "stable",
            "updated": "2020-04-07T00:00:00Z",
            "links": [{"rel": "self", "href": f"{self.url}/identity/v3/"}],
            "media-types": [
                {"base": "application/json", "type": "application/vnd.openstack.identity-v3+json"}
            ],
        }

    def keystone(self, method: str, path: str, body: Any) -> tuple[int, Any, dict[str, str]]:
        if method == "GET" and path in ("", "/"):
            return 300, {"versions": {"values": [self._keystone_version()]}}, {}
        if method == "GET" and path in ("/v3", "/v3/"):
            return 200, {"version": self._keystone_version()}, {}
        if method == "POST" and path == "/v3/auth/tokens":
            return self._issue_token(body)
        raise ApiError(404, {"error": {"code": 404, "message": "Not Found", "title": "Not Found"}})

    def _issue_token(self, body: Any) -> tuple[int, Any, dict[str, str]]:
        refused = ApiError(
            401,
            {
                "error": {
                    "code": 401,
                    "message": "The request you have made requires authentication.",
                    "title": "Unauthorized",
                }
            },
        )
        try:
            user = body["auth"]["identity"]["password"]["user"]
            name, password = user["name"], user["password"]
        except (KeyError, TypeError):
            raise refused from None
        user_entry = self.users.get(name)
        if self.behaviour.refuse_credentials or user_entry is None or user_entry[0] != password:
            raise refused
        _password, project, roles = user_entry
        token = uuid.uuid4().hex
        with self.lock:
            self.tokens[token] = frozenset(roles)
            self.token_projects[token] = f"p-{project}"
        domain = {"id": "default", "name": "Default"}
        answer = {
            "token": {
                "methods": ["password"],
                "issued_at": _now_iso() + "Z",
                "expires_at": "2099-01-01T00:00:00.000000Z",
                "user": {"id": f"u-{name}", "name": name, "domain": domain},
                "project": {"id": f"p-{project}", "name": project, "domain": domain},
                "roles": [{"id": f"r-{role}", "name": role} for role in roles],
                "catalog": self._catalog(),
            }
        }
        return 201, answer, {"X-Subject-Token": token}

    # ------------------------------------------------------------------ Nova

    def _nova_version(self) -> dict[str, Any]:
        return {
            "id": "v2.1",
            "status": "CURRENT",
            "version": f"{NOVA_MAX[0]}.{NOVA_MAX[1]}",
            "min_version": f"{NOVA_MIN[0]}.{NOVA_MIN[1]}",
            "updated": "2013-07-23T11:33:21Z",
            "links": [{"rel": "self", "href": f"{self.url}/compute/v2.1/"}],
        }

    @staticmethod
    def microversion(headers: Any) -> tuple[int, int]:
        """The compute microversion a request asks for (2.1 without a header)."""
        raw = headers.get("OpenStack-API-Version") or ""
        found = re.search(r"compute\s+(\d+)\.(\d+|latest)", raw, re.I)
        if not found:
            legacy = headers.get("X-OpenStack-Nova-API-Version")
            if not legacy:
                return NOVA_MIN
            found = re.match(r"\s*(\d+)\.(\d+|latest)", legacy)
            if not found:
                raise nova_error(400, f"Invalid microversion {legacy!r}")
        if found.group(2) == "latest":
            return NOVA_MAX
        version = (int(found.group(1)), int(found.group(2)))
        if not NOVA_MIN <= version <= NOVA_MAX:
            raise nova_error(
                406,
                f"Version {version[0]}.{version[1]} is not supported by the API. "
                f"Minimum is {NOVA_MIN[0]}.{NOVA_MIN[1]} and maximum is "
                f"{NOVA_MAX[0]}.{NOVA_MAX[1]}.",
            )
        return version

    def nova(
        self, method: str, path: str, query: dict[str, list[str]], body: Any, headers: Any
    ) -> tuple[int, Any, dict[str, str]]:
        if method == "GET" and path in ("", "/"):
            return 300, {"versions": [self._nova_version()]}, {}
        if method == "GET" and path in ("/v2.1", "/v2.1/"):
            return 200, {"version": self._nova_version()}, {}
        mv = self.microversion(headers)
        with self.lock:
            self.nova_requests.append((method, path, mv))
        version_header = {"OpenStack-API-Version": f"compute {mv[0]}.{mv[1]}"}
        path = path.removeprefix("/v2.1")
        parts = [p for p in path.split("/") if p]
        with self.lock:
            status, answer = self._nova_route(method, parts, query, body, mv)
        return status, answer, version_header

    def _server(self, server_id: str) -> dict[str, Any]:
        server = self.servers.get(server_id)
        if server is None:
            raise nova_error(404, f"Instance {server_id} could not be found.")
        return server

    def _nova_route(
        self,
        method: str,
        parts: list[str],
        query: dict[str, list[str]],
        body: Any,
        mv: tuple[int, int],
    ) -> tuple[int, Any]:
        if (
            parts[:1] == ["servers"]
            and method == "GET"
            and len(parts) <= 2
            and (len(parts) == 1 or parts[1] == "detail")
        ):
            pattern = (query.get("name") or [""])[0]
            found = [
                dict(s)
                for s in self.servers.values()
                if not pattern or re.search(pattern, s["name"])
            ]
            return 200, {"servers": found}
        if parts[:1] == ["servers"] and len(parts) >= 2:
            server = self._server(parts[1])
            if len(parts) == 2 and method == "GET":
                return 200, {"server": dict(server)}
            if parts[2:] == ["action"] and method == "POST":
                return self._server_action(server, body, mv)
            if parts[2:3] == ["migrations"]:
                return self._server_migrations(method, server, parts[3:], mv)
            if parts[2:3] == ["os-instance-actions"] and method == "GET":
                return self._instance_actions(server, parts[3:], mv)
        if parts == ["os-migrations"] and method == "GET":
            wanted = query.get("instance_uuid", [None])[0]
            kind = query.get("migration_type", [None])[0]
            found = [
                self._migration_view(m, mv, listing=True)
                for m in self.migrations
                if (wanted is None or m["instance_uuid"] == wanted)
                and (kind is None or m["migration_type"] == kind)
            ]
            return 200, {"migrations": found}
        raise nova_error(404, "The resource could not be found.")

    def _server_action(
        self, server: dict[str, Any], body: Any, mv: tuple[int, int]
    ) -> tuple[int, Any]:
        if not isinstance(body, dict) or "os-migrateLive" not in body:
            raise nova_error(400, "Unsupported action in the stand-in")
        args = body["os-migrateLive"]
        if not isinstance(args, dict):
            raise nova_error(400, "Invalid input for field/attribute os-migrateLive.")
        allowed = {"host", "block_migration"}
        if mv < (2, 25):
            allowed |= {"disk_over_commit"}
        if (2, 30) <= mv < (2, 68):
            allowed |= {"force"}
        extra = sorted(set(args) - allowed)
        if extra:
            raise nova_error(
                400,
                "Invalid input for field/attribute os-migrateLive. Value: "
                f"{json.dumps(args)}. Additional properties are not allowed "
                f"({', '.join(repr(e) for e in extra)} were unexpected)",
            )
        block = args.get("block_migration")
        choices: tuple[Any, ...] = (True, False, "auto") if mv >= (2, 25) else (True, False)
        if block not in choices or "host" not in args:
            raise nova_error(400, f"Invalid input for field/attribute os-migrateLive: {args}")
        if server["OS-EXT-STS:task_state"] is not None:
            raise nova_error(
                409,
                f"Cannot 'os-migrateLive' instance {server['id']} while it is in task_state "
                f"{server['OS-EXT-STS:task_state']}",
            )
        source = server["OS-EXT-SRV-ATTR:host"]
        dest = args.get("host") or next((h for h in self.hosts if h != source), None)
        if dest is None or dest not in self.hosts:
            raise nova_error(400, f"Compute host {dest} could not be found.")
        if dest == source:
            raise nova_error(
                400, f"The supplied hypervisor type of is invalid. (host {dest} is the source)"
            )
        migration = {
            "id": len(self.migrations) + 1,
            "uuid": str(uuid.uuid4()),
            "instance_uuid": server["id"],
            "server_uuid": server["id"],
            "source_compute": source,
            "source_node": source,
            "dest_compute": dest,
            "dest_node": dest,
            "dest_host": "127.0.0.2",
            "status": "queued",
            "migration_type": "live-migration",
            "memory_total_bytes": 2 * GIB,
            "memory_processed_bytes": 0,
            "memory_remaining_bytes": 2 * GIB,
            "disk_total_bytes": 0,
            "disk_processed_bytes": 0,
            "disk_remaining_bytes": 0,
            "created_at": _now_iso(),
            "updated_at": _now_iso(),
            "fault": None,
        }
        self.migrations.append(migration)
        self.actions.append(
            {
                "action": "live-migration",
                "instance_uuid": server["id"],
                "request_id": f"req-{uuid.uuid4()}",
                "user_id": "u-admin",
                "project_id": "p-admin",
                "start_time": _now_iso(),
                "updated_at": _now_iso(),
                "message": None,
                "migration_id": migration["id"],
                "events": [],
            }
        )
        server["OS-EXT-STS:task_state"] = "migrating"
        server["status"] = "MIGRATING"
        abort = threading.Event()
        self._aborts[migration["id"]] = abort
        thread = threading.Thread(
            target=self._run_migration, args=(server, migration, abort), daemon=True
        )
        self._threads.append(thread)
        thread.start()
        return 202, None

    def _migration_view(
        self, migration: dict[str, Any], mv: tuple[int, int], listing: bool = False
    ) -> dict[str, Any]:
        view = {k: v for k, v in migration.items() if k != "fault"}
        if listing:
            for key in [k for k in view if k.endswith("_bytes") or k == "server_uuid"]:
                del view[key]
            view["new_instance_type_id"] = 1
            view["old_instance_type_id"] = 1
        else:
            del view["instance_uuid"]
            del view["migration_type"]
        if mv < (2, 59):
            del view["uuid"]
        return view

    def _server_migrations(
        self, method: str, server: dict[str, Any], rest: list[str], mv: tuple[int, int]
    ) -> tuple[int, Any]:
        if mv < (2, 23):
            raise nova_error(404, "The resource could not be found.")
        in_progress = [
            m
            for m in self.migrations
            if m["instance_uuid"] == server["id"]
            and m["status"] in ("queued", "preparing", "running")
        ]
        if not rest and method == "GET":
            return 200, {"migrations": [self._migration_view(m, mv) for m in in_progress]}
        if len(rest) != 1:
            raise nova_error(404, "The resource could not be found.")
        found = next((m for m in in_progress if str(m["id"]) == rest[0]), None)
        if found is None:
            raise nova_error(
                404,
                f"In-progress live migration {rest[0]} is not found for server {server['id']}.",
            )
        if method == "GET":
            return 200, {"migration": self._migration_view(found, mv)}
        if method == "DELETE":
            if mv < (2, 24):
                raise nova_error(404, "The resource could not be found.")
            if found["status"] != "running" and mv < (2, 65):
                raise nova_error(
                    400,
                    f"Migration {found['id']} state of instance {server['id']} is "
                    f"{found['status']}. Cannot abort live migration",
                )
            self._aborts[found["id"]].set()
            return 202, None
        raise nova_error(404, "The resource could not be found.")

    # -- the live migration, as Nova's conductor and computes run it

    def _server_ports(self, server_id: str) -> list[dict[str, Any]]:
        return [p for p in self.ports.values() if p["device_id"] == server_id]

    def _set(self, migration: dict[str, Any], **fields: Any) -> None:
        with self.lock:
            migration.update(fields, updated_at=_now_iso())

    def _run_migration(
        self, server: dict[str, Any], migration: dict[str, Any], abort: threading.Event
    ) -> None:
        b = self.behaviour
        dest = migration["dest_compute"]
        if abort.wait(b.tick):
            return self._rollback(server, migration, "cancelled", created=[])
        self._set(migration, status="preparing")
        created: list[str] = []
        if b.binding_extension:
            with self.lock:
                for port in self._server_ports(server["id"]):
                    if dest in self.bindings[port["id"]]:
                        # Nova's bind_ports_to_host: any failure fails the migration.
                        migration["fault"] = (
                            f"Binding failed for port {port['id']}, please check neutron logs "
                            f"for more information. (Neutron: Binding for port {port['id']} on "
                            f"host {dest} already exists.)"
                        )
                        for port_id in created:
                            del self.bindings[port_id][dest]
                        return self._rollback(server, migration, "error", created=[])
                    self.bindings[port["id"]][dest] = self._binding(
                        port["id"], dest, "INACTIVE", port["binding:profile"]
                    )
                    created.append(port["id"])
        if abort.wait(b.tick):
            return self._rollback(server, migration, "cancelled", created)
        self._set(migration, status="running")
        step = 0
        total = migration["memory_total_bytes"]
        while True:
            step += 1
            if b.never_finish:
                done = min(total - GIB // 8, total * step // (b.copy_steps + 1))
            else:
                done = min(total, total * step // b.copy_steps)
            self._set(migration, memory_processed_bytes=done, memory_remaining_bytes=total - done)
            if b.migration_error and done * 2 >= total:
                migration["fault"] = "Live migration failed: guest memory copy was interrupted"
                # Real Nova ends a failure in the hypervisor 'failed' ('error' is for
                # failures in its conductor, as the binding conflict above).
                return self._rollback(server, migration, "failed", created)
            if abort.wait(b.tick):
                return self._rollback(server, migration, "cancelled", created)
            if done >= total:
                break
        self._switch_over(server, migration)

    def _switch_over(self, server: dict[str, Any], migration: dict[str, Any]) -> None:
        source, dest = migration["source_compute"], migration["dest_compute"]
        with self.lock:
            # Real Nova (tests/openstack/test_migrate_real_nova.py): a live migration stays
            # ``running`` while the source compute activates the destination's bindings
            # (``post-migrating`` belongs to cold migration and resize), then ``completed``.
            migration.update(updated_at=_now_iso())
            server["OS-EXT-SRV-ATTR:host"] = dest
            server["OS-EXT-SRV-ATTR:hypervisor_hostname"] = dest
            for port in self._server_ports(server["id"]):
                if self.behaviour.binding_extension:
                    bindings = self.bindings[port["id"]]
                    if bindings.get(dest, {}).get("status") == "INACTIVE":
                        self._activate(port, dest)
                    bindings.pop(source, None)
                else:
                    self._rebind(port, dest)
        time.sleep(self.behaviour.tick)
        with self.lock:
            server["OS-EXT-STS:task_state"] = None
            server["status"] = "ACTIVE"
            migration.update(status="completed", updated_at=_now_iso())
            self._event(migration, "Success")

    def _rollback(
        self,
        server: dict[str, Any],
        migration: dict[str, Any],
        status: str,
        created: list[str],
    ) -> None:
        with self.lock:
            if not self.behaviour.leak_bindings_on_rollback:
                for port_id in created:
                    self.bindings[port_id].pop(migration["dest_compute"], None)
            server["OS-EXT-STS:task_state"] = None
            server["status"] = "ACTIVE"
            migration.update(status=status, updated_at=_now_iso())
            if status == "cancelled":
                migration["fault"] = "Live migration was aborted on request"
            self._event(migration, "Error")

    def _event(self, migration: dict[str, Any], result: str) -> None:
        action = next(a for a in self.actions if a["migration_id"] == migration["id"])
        fault = migration.get("fault") or ""
        action["message"] = "Error" if result == "Error" else None
        action["events"].append(
            {
                "event": "conductor_live_migrate_instance",
                "start_time": action["start_time"],
                "finish_time": _now_iso(),
                "result": result,
                "traceback": (
                    f"Traceback (most recent call last):\n  ...\n{fault}" if fault else None
                ),
                "host": migration["source_compute"],
                "hostId": "h-" + migration["source_compute"],
                "details": fault or None,
            }
        )

    def _instance_actions(
        self, server: dict[str, Any], rest: list[str], mv: tuple[int, int]
    ) -> tuple[int, Any]:
        mine = [a for a in self.actions if a["instance_uuid"] == server["id"]]

        def view(action: dict[str, Any], events: bool) -> dict[str, Any]:
            out = {k: v for k, v in action.items() if k not in ("migration_id", "events")}
            if events:
                out["events"] = [
                    {k: v for k, v in e.items() if k != "details" or mv >= (2, 84)}
                    for e in action["events"]
                ]
            return out

        if not rest:
            return 200, {"instanceActions": [view(a, False) for a in mine]}
        found = next((a for a in mine if a["request_id"] == rest[0]), None)
        if found is None:
            raise nova_error(404, f"Action for request_id {rest[0]} on instance could not be found")
        return 200, {"instanceAction": view(found, True)}

    # --------------------------------------------------------------- Neutron

    def _neutron_versions(self) -> dict[str, Any]:
        return {
            "versions": [
                {
                    "id": "v2.0",
                    "status": "CURRENT",
                    "links": [{"href": f"{self.url}/networking/v2.0/", "rel": "self"}],
                }
            ]
        }

    def _extensions(self) -> list[dict[str, Any]]:
        aliases = ["binding", "provider", "extra_dhcp_opt", "standard-attr-revisions"]
        if self.behaviour.binding_extension:
            aliases.append("binding-extended")
        return [
            {
                "alias": alias,
                "name": alias,
                "description": f"the {alias} extension",
                "updated": "2017-07-17T10:00:00-00:00",
                "links": [],
            }
            for alias in aliases
        ]

    def neutron(
        self, method: str, path: str, query: dict[str, list[str]], body: Any, headers: Any
    ) -> tuple[int, Any, dict[str, str]]:
        if method == "GET" and path in ("", "/"):
            return 200, self._neutron_versions(), {}
        path = path.removeprefix("/v2.0")
        parts = [p for p in path.split("/") if p]
        with self.lock:
            token = headers.get("X-Auth-Token") or ""
            self._roles = self.tokens.get(token, frozenset())
            self._project = self.token_projects.get(token, "")
            status, answer = self._neutron_route(method, parts, query, body)
        return status, answer, {}

    def _allow(self, rule: str, *roles: str) -> None:
        """Neutron's default policy: one of ``roles`` or 403, as the real one answers."""
        if not self._roles & set(roles):
            raise neutron_error(403, "HTTPForbidden", f"rule:{rule} is disallowed by policy")

    def _sees(self, item: dict[str, Any]) -> bool:
        """Admins and services see everything; others only their own project's."""
        return bool(self._roles & {"admin", "service"}) or item["project_id"] == self._project

    def _network_view(self, net: dict[str, Any]) -> dict[str, Any]:
        """A network as the caller sees it: provider attributes for admins only."""
        if "admin" in self._roles:
            return dict(net)
        return {k: v for k, v in net.items() if not k.startswith("provider:")}

    def _port(self, port_id: str) -> dict[str, Any]:
        port = self.ports.get(port_id)
        if port is None:
            raise neutron_error(404, "PortNotFound", f"Port {port_id} could not be found.")
        return port

    @staticmethod
    def _filtered(items: list[dict[str, Any]], query: dict[str, list[str]]) -> list[dict[str, Any]]:
        """Neutron's list filters: ``key=value`` (repeatable) on the item's fields."""
        wanted = {k: v for k, v in query.items() if k != "fields"}
        return [
            dict(item)
            for item in items
            if all(k not in item or str(item[k]) in values for k, values in wanted.items())
        ]

    def _neutron_route(
        self, method: str, parts: list[str], query: dict[str, list[str]], body: Any
    ) -> tuple[int, Any]:
        not_found = neutron_error(404, "HTTPNotFound", "The resource could not be found.")
        if parts == ["extensions"] and method == "GET":
            return 200, {"extensions": self._extensions()}
        if parts[:1] == ["extensions"] and len(parts) == 2 and method == "GET":
            found = [e for e in self._extensions() if e["alias"] == parts[1]]
            if not found:
                raise neutron_error(404, "ExtensionNotFound", f"Extension {parts[1]} not found.")
            return 200, {"extension": found[0]}
        if parts == ["networks"] and method == "GET":
            found = self._filtered(list(self.networks.values()), query)
            return 200, {"networks": [self._network_view(n) for n in found]}
        if parts[:1] == ["networks"] and len(parts) == 2 and method == "GET":
            net = self.networks.get(parts[1])
            if net is None:
                raise neutron_error(404, "NetworkNotFound", f"Network {parts[1]} not found.")
            return 200, {"network": self._network_view(net)}
        if parts == ["ports"] and method == "GET":
            visible = [p for p in self.ports.values() if self._sees(p)]
            return 200, {"ports": self._filtered(visible, query)}
        if parts[:1] == ["ports"] and len(parts) >= 2:
            port = self._port(parts[1])
            if not self._sees(port):
                raise neutron_error(404, "PortNotFound", f"Port {parts[1]} could not be found.")
            if len(parts) == 2 and method == "GET":
                return 200, {"port": dict(port)}
            if len(parts) == 2 and method == "PUT":
                return self._update_port(port, body)
            if parts[2:3] == ["bindings"]:
                if not self.behaviour.binding_extension:
                    raise not_found
                if not str(port["device_owner"]).startswith("compute:"):
                    raise neutron_error(
                        400,
                        "BadRequest",
                        f"Bad port request: Invalid port {port['id']}. Operation only valid "
                        "on compute and shared filesystem ports.",
                    )
                return self._bindings_route(method, port, parts[3:], query, body)
        raise not_found

    def _update_port(self, port: dict[str, Any], body: Any) -> tuple[int, Any]:
        changes = body.get("port") if isinstance(body, dict) else None
        if not isinstance(changes, dict):
            raise neutron_error(400, "HTTPBadRequest", "Resource body required")
        for key, value in changes.items():
            if key == "binding:host_id":
                self._allow("update_port:binding:host_id", "admin", "service")
                if value != port["binding:host_id"]:
                    self._rebind(port, value)
            elif key == "binding:profile":
                port["binding:profile"] = dict(value or {})
                port["revision_number"] += 1
            else:
                raise neutron_error(
                    400, "HTTPBadRequest", f"Attribute {key!r} is not allowed in the stand-in"
                )
        return 200, {"port": dict(port)}

    def _rebind(self, port: dict[str, Any], host: str) -> None:
        """Bind ``port`` to ``host`` (the only way without binding-extended)."""
        port["binding:host_id"] = host
        port["status"] = "DOWN"
        port["revision_number"] += 1
        self.bindings[port["id"]] = {host: self._binding(port["id"], host, "ACTIVE", {})}
        self._wire_later(port, host)

    def _wire_later(self, port: dict[str, Any], host: str) -> None:
        if self.behaviour.agent_never_wires:
            return

        def wire() -> None:
            with self.lock:
                if port["binding:host_id"] == host:
                    port["status"] = "ACTIVE"

        timer = threading.Timer(self.behaviour.wire_delay, wire)
        timer.daemon = True
        timer.start()

    def _activate(self, port: dict[str, Any], host: str) -> dict[str, Any]:
        bindings = self.bindings[port["id"]]
        for other in bindings.values():
            if other["status"] == "ACTIVE":
                # Neutron keeps the old binding, inactive and unbound.
                other.update(status="INACTIVE", vif_type="unbound", vif_details={})
        bindings[host]["status"] = "ACTIVE"
        port["binding:host_id"] = host
        port["binding:profile"] = dict(bindings[host]["profile"])
        port["status"] = "DOWN"
        port["revision_number"] += 1
        self._wire_later(port, host)
        return bindings[host]

    def _bindings_route(
        self,
        method: str,
        port: dict[str, Any],
        rest: list[str],
        query: dict[str, list[str]],
        body: Any,
    ) -> tuple[int, Any]:
        bindings = self.bindings[port["id"]]
        if not rest and method == "GET":
            self._allow("get_port_binding", "admin", "service")
            return 200, {"bindings": self._filtered(list(bindings.values()), query)}
        if not rest and method == "POST":
            self._allow("create_port_binding", "service")
            binding = body.get("binding") if isinstance(body, dict) else None
            if not isinstance(binding, dict) or not binding.get("host"):
                raise neutron_error(400, "HTTPBadRequest", "A binding needs a host")
            host = binding["host"]
            if host in bindings:
                raise neutron_error(
                    409,
                    "PortBindingAlreadyExists",
                    f"Binding for port {port['id']} on host {host} already exists.",
                )
            if host not in self.hosts:
                # No mechanism driver binds it: Neutron keeps nothing and answers 500.
                raise neutron_error(
                    500,
                    "PortBindingError",
                    f"Binding for port {port['id']} on host {host} could not be created or "
                    "updated.",
                )
            created = self._binding(port["id"], host, "INACTIVE", binding.get("profile") or {})
            bindings[host] = created
            port["revision_number"] += 1
            return 201, {"binding": dict(created)}
        if not rest:
            raise neutron_error(404, "HTTPNotFound", "The resource could not be found.")
        host = rest[0]
        if method == "DELETE" and len(rest) == 1:
            self._allow("delete_port_binding", "service")
            # Neutron deletes whatever is there, even the ACTIVE binding; a missing one is 204.
            gone = bindings.pop(host, None)
            if gone is not None:
                if gone["status"] == "ACTIVE":
                    port["binding:host_id"] = ""
                    port["binding:vif_type"] = "unbound"
                port["revision_number"] += 1
            return 204, None
        if rest[1:] == ["activate"]:
            self._allow("activate", "service")
        if host not in bindings:
            raise neutron_error(
                404,
                "PortBindingNotFound",
                f"Binding for port {port['id']} on host {host} could not be found.",
            )
        if rest[1:] == ["activate"] and method == "PUT":
            if bindings[host]["status"] == "ACTIVE":
                raise neutron_error(
                    409,
                    "PortBindingAlreadyActive",
                    f"Binding for port {port['id']} on host {host} is already active.",
                )
            return 200, dict(self._activate(port, host))
        if len(rest) == 1 and method == "GET":
            return 200, {"binding": dict(bindings[host])}
        raise neutron_error(404, "HTTPNotFound", "The resource could not be found.")

    # ------------------------------------------------------------------ HTTP

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        cloud = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # Headers and body go out in two writes: without this, Nagle's algorithm
            # and the client's delayed ACK cost 40 ms per request.
            disable_nagle_algorithm = True

            def log_message(self, format: str, *args: Any) -> None:
                """Quiet: the tests read ``cloud.requests`` instead."""

            def _handle(self) -> None:
                parts = urlsplit(self.path)
                query = parse_qs(parts.query)
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                with cloud.lock:
                    cloud.requests.append((self.command, parts.path))
                try:
                    try:
                        body = json.loads(raw) if raw else None
                    except ValueError:
                        raise ApiError(400, {"error": {"message": "Malformed JSON"}}) from None
                    status, answer, headers = cloud.dispatch(
                        self.command, parts.path, query, body, self.headers
                    )
                except ApiError as err:
                    status, answer, headers = err.status, err.body, {}
                self._answer(status, answer, headers)

            def _answer(self, status: int, answer: Any, headers: dict[str, str]) -> None:
                data = b"" if answer is None else json.dumps(answer).encode()
                self.send_response(status, HTTPStatus(status).phrase)
                if data:
                    self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for key, value in headers.items():
                    self.send_header(key, value)
                self.end_headers()
                if data:
                    self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_DELETE = _handle

        return Handler

    def dispatch(
        self, method: str, path: str, query: dict[str, list[str]], body: Any, headers: Any
    ) -> tuple[int, Any, dict[str, str]]:
        routes: list[tuple[str, Callable[[str], tuple[int, Any, dict[str, str]]]]] = [
            ("/identity", lambda rest: self.keystone(method, rest, body)),
            ("/compute", lambda rest: self.nova(method, rest, query, body, headers)),
            ("/networking", lambda rest: self.neutron(method, rest, query, body, headers)),
        ]
        for prefix, handler in routes:
            if path == prefix or path.startswith(prefix + "/"):
                rest = path[len(prefix) :]
                if prefix != "/identity" and not (rest in ("", "/") or rest in ("/v2.1", "/v2.1/")):
                    self._check_token(headers, prefix)
                return handler(rest)
        raise ApiError(404, {"error": {"message": f"no service at {path}"}})

    _roles: frozenset[str] = frozenset()
    _project: str = ""

    def _check_token(self, headers: Any, prefix: str) -> None:
        token = headers.get("X-Auth-Token")
        with self.lock:
            known = token in self.tokens
        if known:
            return
        if prefix == "/compute":
            raise nova_error(401, "The request you have made requires authentication.")
        raise neutron_error(401, "HTTPUnauthorized", "Authentication required")


@dataclasses.dataclass
class Site:
    """The tests' usual cloud: server ``web-1`` on ``cmp1`` with one port on ``private``
    (VNI 1001), and ``cmp2`` free to receive it."""

    cloud: FakeCloud
    network_id: str
    server_id: str
    port_id: str
    mac: str = "fa:16:3e:4c:2a:01"
    vni: int = 1001
    source: str = "cmp1"
    destination: str = "cmp2"


def small_site(cloud: FakeCloud, mac: str = "fa:16:3e:4c:2a:01") -> Site:
    """Populate ``cloud`` with the usual scenario (see ``Site``)."""
    net = cloud.add_network("private", 1001)
    cloud.add_host("cmp2")
    server_id, ports = cloud.add_server("web-1", "cmp1", [(net, mac, ["10.0.0.5", "fd00::5"])])
    return Site(cloud, net, server_id, ports[0], mac=mac)
