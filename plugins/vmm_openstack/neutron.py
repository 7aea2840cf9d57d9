"""Neutron port bindings as the directory (the NVA role) of a migrating VM.

Neutron already is the directory of an OpenStack cloud: each port says on
which host it is bound, and its ML2 drivers (L2 population, OVN) tell every
other host where a MAC lives. With the ``binding-extended`` extension a
port can hold one ACTIVE binding and INACTIVE ones on other hosts, which
is exactly the NVA's prestage/commit/abort:

======================  ==================================================
directory call          Neutron
======================  ==================================================
prestage(vni, mac,      create an INACTIVE binding of the port on the
nve, migration id)      destination host, its profile tagged
                        ``{"vmm_migration_id": <id>}``; refuse (and remove
                        it) when Neutron cannot bind there
commit                  activate that binding (Neutron makes the source's
                        binding inactive in the same step)
abort                   delete the destination's inactive binding
acks                    wait until the port is ACTIVE at the destination:
                        its L2 agent has wired it, the flows exist
expire                  nothing: Neutron's own L2 population updates peers
======================  ==================================================

How the keys map:

* (vni, mac) -> the port with that MAC on the network whose
  ``provider:segmentation_id`` is the VNI. Neutron keeps MACs unique per
  network, so the pair names one port, as it names one NVA endpoint.
* NVE id -> the host name Neutron binds to: the same name, unless
  ``[openstack] nve_hosts`` maps it.
* migration id -> the ``vmm_migration_id`` key of the binding's profile,
  so a binding is recognised as this migration's (a retried prestage
  returns it) or as a leftover of another.

Stale bindings. After a failed live migration Nova has been known to leave
the destination's inactive binding behind; the next migration to that host
then fails, because Nova's conductor gets "binding already exists" (409)
when it binds the port there. Prestage therefore asks Nova whether the
port's server has a migration in flight: if none has, every inactive
binding is a leftover and is deleted (and said so, in ``notes``); if one
has, to the same host, the binding is that migration's and is adopted
rather than deleted; to another host, prestage refuses.

Nova-driven migrations. Nova's conductor creates the destination's
binding itself and fails on an existing one, so ``vmm migrate-with-network``
prestages (which cleans leftovers and proves Neutron can bind the port
there) and then ``release``\\ s the binding to Nova; ``commit`` and
``abort`` then act on whatever binding is on the destination (Nova's),
``commit`` activating it as soon as the VM runs there and ``abort``
deleting what Nova's rollback left.

Without ``binding-extended`` (old or third-party plugins) there is no
inactive binding: prestage only checks the port, commit moves it with a
plain ``binding:host_id`` update, abort has nothing to undo. The directory
says so once, in ``notes`` and the log.

Rights. Under Neutron's default policy (the new RBAC defaults DevStack
enforces) creating, activating and deleting a binding needs the ``service``
role, listing bindings ``admin`` or ``service``, and reading a network's
``provider:segmentation_id`` (the VNI) ``admin``; Neutron hides that
attribute from others instead of refusing. The directory is therefore given
the connection of a service user like Nova's (``[neutron]``, see
options.py) when one is configured; a refusal names the role it lacks and
how to get it, in one line.

What the real Neutron does that shapes the code here: a host no mechanism
driver can bind is answered ``500 PortBindingError`` (not a binding with
``vif_type binding_failed``), which is a refusal naming the host, never a
transient error to retry; bindings exist only for compute ports (others get
``400``), so a port that no server owns is refused before anything is
changed; activating a binding keeps the source's binding, INACTIVE and
unbound, which the directory deletes after a commit of its own binding, as
Nova does after a live migration (left there, it would look like a leftover
to the next move back); and Neutron deletes even an ACTIVE binding when
asked, so ``abort`` checks the status itself.

Errors are the NVA's (NotFound, Conflict, Unauthorized, Unavailable), so
the core's directory stages treat Neutron like the embedded NVA: an
unreachable Neutron is retried, a refusal fails the stage.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

from vmm_openstack import cloud
from vmm_openstack.directory import Nic
from vmm_orchestrator.model import normalize_mac
from vmm_orchestrator.nva import errors as nva_errors
from vmm_orchestrator.options import require

if TYPE_CHECKING:
    from openstack.connection import Connection
    from oslo_config import cfg

LOG = logging.getLogger(__name__)

T = TypeVar("T")

#: The profile key that names the migration an inactive binding belongs to.
TAG = "vmm_migration_id"
#: The Neutron extension that allows several bindings per port.
BINDING_EXTENDED = "binding-extended"
#: A binding Neutron could not complete (no live agent there, no segment reachable).
FAILED_VIF_TYPES = ("binding_failed", "unbound")
#: Neutron's error type for a host no mechanism driver binds (answered with HTTP 500).
BINDING_ERROR = "PortBindingError"
#: The device_owner prefix of a server's ports: the only ports Neutron binds per host.
COMPUTE_OWNER = "compute:"
#: The roles Neutron's default policy asks for (neutron/conf/policies/port_bindings.py).
SERVICE_ROLE = "service"
ADMIN_OR_SERVICE = "admin or service"
ADMIN_ROLE = "admin"


@dataclasses.dataclass(frozen=True)
class InFlight:
    """A migration Nova has in progress for a server (from its server-migrations API)."""

    id: str
    dest: str | None
    status: str


#: Nova's in-progress migrations of a server (by device id); None: cannot tell (no Nova).
FlightCheck = Callable[[str], "list[InFlight] | None"]


@dataclasses.dataclass
class _Pending:
    port_id: str
    host: str
    source: str | None
    network_id: str
    created: bool = False
    adopted: bool = False
    released: bool = False


@dataclasses.dataclass
class _Committed:
    vni: int
    mac: str
    port_id: str
    host: str
    revision: int
    committed_at: float


class NeutronDirectory:
    """The directory contract on Neutron ports and port bindings.

    ``notes`` collects what an operator should know (leftovers cleaned, the
    fallback without binding-extended); each is also logged at
    ``note_level`` (a command that shows the notes itself passes INFO).
    ``in_flight`` tells whether Nova has a migration of a server in flight
    (default: ask Nova when the catalog has a compute service, else assume
    none). ``nve_hosts`` maps NVE ids to Neutron host names. One instance
    may be used from several threads.
    """

    kind = "neutron"

    def __init__(
        self,
        conn: Connection,
        *,
        nve_hosts: Mapping[str, str] | None = None,
        in_flight: FlightCheck | None = None,
        poll_interval: float = 0.5,
        note_level: int = logging.WARNING,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.conn = conn
        self.where = self._endpoint()
        #: Whose credentials Neutron sees, for messages ("cloud NAME", "[neutron] USER").
        label = getattr(conn, "vmm_label", None)
        self.who = (
            "these credentials"
            if not label
            else str(label)
            if str(label).startswith("[")
            else f"cloud {label}"
        )
        self.nve_hosts = dict(nve_hosts or {})
        self._nves = {host: nve for nve, host in self.nve_hosts.items()}
        self._in_flight = in_flight
        self.poll_interval = poll_interval
        self._note_level = note_level
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.RLock()
        self._extended: bool | None = None
        self._networks: dict[str, dict[str, Any]] = {}
        self._pending: dict[tuple[int, str, str], _Pending] = {}
        self._commits: list[_Committed] = []
        #: Operator-visible notices (fallback, cleaned leftovers), oldest first.
        self.notes: list[str] = []

    @classmethod
    def from_conf(cls, conf: cfg.ConfigOpts) -> NeutronDirectory:
        """The backend per-host agents load (entry point ``neutron`` in
        ``vmm_orchestrator.nva_backends``): the cloud of ``[openstack]``."""
        from vmm_openstack import options

        require(conf, options.GROUP, "the Neutron directory")
        group = conf[options.GROUP]
        conn = cloud.connect_service_user(conf, group.api_timeout) or cloud.connect(
            group.cloud, group.region_name, group.api_timeout
        )
        return cls(conn, nve_hosts=group.nve_hosts, poll_interval=group.poll_interval)

    def close(self) -> None:
        self.conn.close()

    # ------------------------------------------------------------ plumbing

    def _endpoint(self) -> str:
        try:
            return str(self.conn.network.get_endpoint())
        except Exception:
            return "Neutron"

    def _note(self, text: str) -> None:
        with self._lock:
            if text not in self.notes:
                self.notes.append(text)
        LOG.log(self._note_level, "%s", text)

    def _call(self, what: str, fn: Callable[[], T], role: str | None = None) -> T:
        """Run one SDK call; its failure becomes the NVA error of the same meaning.

        ``role``: what Neutron's default policy asks for this call; a 403 then
        says so, and how to get it.
        """
        try:
            return fn()
        except Exception as exc:
            status = cloud.http_status(exc)
            if status == 403 and role is not None:
                raise nva_errors.Unauthorized(
                    f"Neutron refused {what} for {self.who} (HTTP 403): under Neutron's "
                    f"default policy it needs the {role} role",
                    hint=cloud.SERVICE_USER_HINT,
                ) from exc
            err = cloud.describe(exc, what)
            kind: type[nva_errors.NvaError]
            if isinstance(err, cloud.CloudUnavailable):
                kind = nva_errors.Unavailable
            elif status == 404:
                kind = nva_errors.NotFound
            elif status == 409:
                kind = nva_errors.Conflict
            elif status in (401, 403):
                kind = nva_errors.Unauthorized
            elif status == 400:
                kind = nva_errors.BadRequest
            else:
                kind = nva_errors.NvaError
            raise kind(err.message, hint=err.hint) from exc

    def host_for(self, nve: str) -> str:
        """The Neutron host name of an NVE."""
        return self.nve_hosts.get(nve, nve)

    def nve_for(self, host: str) -> str:
        """The NVE id of a Neutron host."""
        return self._nves.get(host, host)

    @property
    def binding_extended(self) -> bool:
        """Whether Neutron offers ``binding-extended`` (asked once)."""
        with self._lock:
            if self._extended is None:
                aliases = self._call(
                    f"listing the extensions of Neutron at {self.where}",
                    lambda: {e.alias for e in self.conn.network.extensions()},
                )
                self._extended = BINDING_EXTENDED in aliases
                if not self._extended:
                    self._note(
                        f"Neutron at {self.where} has no {BINDING_EXTENDED} extension: "
                        "nothing is pre-staged; each port moves with a plain host update "
                        "(binding:host_id) at commit"
                    )
            return self._extended

    def _network(self, network_id: str) -> dict[str, Any]:
        with self._lock:
            cached = self._networks.get(network_id)
        if cached is None:
            net = self._call(
                f"reading network {network_id}",
                lambda: self.conn.network.get_network(network_id),
            )
            if net.provider_network_type is None and net.provider_segmentation_id is None:
                # Neutron hides the provider attributes from non-admins rather than refusing.
                raise nva_errors.Unauthorized(
                    f"Neutron hides the provider attributes of network {net.name or net.id} "
                    f"from {self.who}: reading provider:segmentation_id (the VNI) needs the "
                    f"{ADMIN_ROLE} role",
                    hint=cloud.SERVICE_USER_HINT,
                )
            cached = {
                "id": net.id,
                "name": net.name or net.id,
                "vni": net.provider_segmentation_id,
                "type": net.provider_network_type,
            }
            with self._lock:
                self._networks[network_id] = cached
        return cached

    @staticmethod
    def _owned_by_a_server(port: Any) -> None:
        """Refuse a port no server owns: Neutron binds only compute ports per host (400)."""
        owner = port.device_owner or ""
        if not owner.startswith(COMPUTE_OWNER):
            raise nva_errors.BadRequest(
                f"port {port.id} (MAC {normalize_mac(port.mac_address)}) is not a server's "
                f"port (device_owner {owner or 'empty'}): Neutron binds only compute ports "
                "to a host",
                hint="only a server's ports move with it; check the MAC in the domain XML",
            )

    def _nic(self, port: Any) -> Nic | None:
        self._owned_by_a_server(port)
        net = self._network(port.network_id)
        if net["vni"] is None:
            return None
        v4: list[str] = []
        v6: list[str] = []
        for fixed in port.fixed_ips or []:
            ip = str(fixed.get("ip_address", ""))
            (v6 if ":" in ip else v4).append(ip)
        return Nic(
            mac=normalize_mac(port.mac_address),
            vni=int(net["vni"]),
            ipv4=tuple(v4),
            ipv6=tuple(v6),
            port_id=port.id,
            network=net["name"],
        )

    def nics_of(self, ports: Sequence[Any]) -> list[Nic]:
        """The NICs of Neutron ports; a port on a network without a VNI is refused."""
        nics = []
        for port in ports:
            nic = self._nic(port)
            if nic is None:
                net = self._network(port.network_id)
                raise nva_errors.BadRequest(
                    f"port {port.id} is on network {net['name']}, which has no segmentation "
                    f"ID ({net['type']}): it has no VNI to follow",
                    hint="only networks with a segmentation ID (vxlan, geneve, vlan) follow a VM",
                )
            nics.append(nic)
        return nics

    def lookup(self, mac: str) -> list[Nic]:
        """The ports with this MAC (one per network that has a VNI)."""
        mac = normalize_mac(mac)
        ports = self._call(
            f"looking up MAC {mac} in Neutron at {self.where}",
            lambda: list(self.conn.network.ports(mac_address=mac)),
        )
        return [nic for nic in (self._nic(p) for p in ports) if nic is not None]

    def _port(self, vni: int, mac: str) -> Any:
        """The port of (vni, mac)."""
        mac = normalize_mac(mac)
        ports = self._call(
            f"looking up MAC {mac} in Neutron at {self.where}",
            lambda: list(self.conn.network.ports(mac_address=mac)),
        )
        found = [p for p in ports if self._network(p.network_id)["vni"] == vni]
        if not found:
            raise nva_errors.NotFound(f"no Neutron port with MAC {mac} on a network with VNI {vni}")
        self._owned_by_a_server(found[0])
        return found[0]

    def _get_port(self, port_id: str) -> Any:
        return self._call(f"reading port {port_id}", lambda: self.conn.network.get_port(port_id))

    def _bindings(self, port_id: str) -> list[Any]:
        return self._call(
            f"listing the bindings of port {port_id}",
            lambda: list(self.conn.network.port_bindings(port_id)),
            role=ADMIN_OR_SERVICE,
        )

    def _delete_binding(self, port_id: str, host: str) -> None:
        self._call(
            f"deleting the binding of port {port_id} on {host}",
            lambda: self.conn.network.delete_port_binding(port_id, host, ignore_missing=True),
            role=SERVICE_ROLE,
        )

    def _create_binding(self, port: Any, host: str, migration_id: str) -> Any:
        """An INACTIVE binding of ``port`` on ``host``; a host nothing binds is refused.

        Neutron answers a host that no mechanism driver can bind (no live
        agent there, no segment it reaches) with ``500 PortBindingError``
        and keeps nothing: that is a refusal naming the host, not a fault
        to retry.
        """
        what = f"binding port {port.id} on {host} (inactive)"
        try:
            return self.conn.network.create_port_binding(
                port.id,
                host=host,
                vnic_type=port.binding_vnic_type or "normal",
                profile={**dict(port.binding_profile or {}), TAG: migration_id},
            )
        except Exception as exc:
            if cloud.neutron_error_type(exc) == BINDING_ERROR:
                net = self._network(port.network_id)
                raise nva_errors.Conflict(
                    f"Neutron cannot bind port {port.id} on host {host}: no mechanism driver "
                    f"binds it there ({BINDING_ERROR})",
                    hint=f"is an L2 agent alive on {host}, and does it reach network "
                    f"{net['name']}? `openstack network agent list --host {host}`",
                ) from exc
            failure: BaseException = exc
        return self._call(what, lambda: _reraise(failure), role=SERVICE_ROLE)

    def _flights(self, device_id: str) -> list[InFlight] | None:
        """Nova's in-progress migrations of the port's server; None when unknowable."""
        if not device_id:
            return []
        if self._in_flight is not None:
            return self._in_flight(device_id)
        if not cloud.has_service(self.conn, "compute"):
            return None
        return nova_in_flight(self.conn, device_id)

    # ------------------------------------------------------------ directory

    def clean_stale(self, vni: int, mac: str) -> list[dict[str, Any]]:
        """Delete the port's inactive bindings when no migration of its server is in flight.

        Returns what was deleted: ``[{"port_id", "host", "left_by"}]``
        (``left_by``: the migration id of the tag, or None). With a
        migration in flight nothing is touched: the bindings may be its own.
        """
        if not self.binding_extended:
            return []
        port = self._port(vni, mac)
        flights = self._flights(port.device_id)
        if flights:
            return []
        return self._clean(port, [b for b in self._bindings(port.id) if b.status != "ACTIVE"])

    def _clean(self, port: Any, stale: Sequence[Any]) -> list[dict[str, Any]]:
        cleaned = []
        for binding in stale:
            left_by = (binding.profile or {}).get(TAG)
            self._delete_binding(port.id, binding.host)
            origin = f"migration {left_by}" if left_by else "an earlier migration"
            self._note(
                f"cleaned a stale inactive binding of port {port.id} on {binding.host} "
                f"(left by {origin}; it would have blocked this move)"
            )
            cleaned.append({"port_id": port.id, "host": binding.host, "left_by": left_by})
        return cleaned

    def prestage(self, vni: int, mac: str, nve: str, migration_id: str) -> dict[str, Any]:
        """Bind the port, inactive, on the destination; clean leftovers that would block it.

        A repeat with the same migration id returns the same binding. Raises
        Conflict when the server already runs there, has another migration
        in flight, or Neutron cannot bind the port on that host (the failed
        binding is removed first: nothing is left half-applied).
        """
        mac = normalize_mac(mac)
        host = self.host_for(nve)
        port = self._port(vni, mac)
        key = (vni, mac, migration_id)
        base = {
            "vni": vni,
            "mac": mac,
            "port_id": port.id,
            "nve": self.nve_for(port.binding_host_id or ""),
            "pending_nve": nve,
            "migration_id": migration_id,
            "state": "pending",
            "cleaned": [],
            "adopted": False,
            "fallback": False,
        }
        if not self.binding_extended:
            if port.binding_host_id == host:
                raise nva_errors.Conflict(
                    f"port {port.id} is already bound to {host}: the server runs there"
                )
            with self._lock:
                self._pending[key] = _Pending(port.id, host, port.binding_host_id, port.network_id)
            return base | {"fallback": True, "binding": None}
        bindings = self._bindings(port.id)
        mine = [b for b in bindings if (b.profile or {}).get(TAG) == migration_id]
        for binding in mine:
            if binding.host == host:
                with self._lock:
                    self._pending.setdefault(
                        key, _Pending(port.id, host, port.binding_host_id, port.network_id)
                    )
                state = "active" if binding.status == "ACTIVE" else "pending"
                return base | {"state": state, "binding": _binding_dict(binding)}
        active = next((b for b in bindings if b.status == "ACTIVE"), None)
        if active is not None and active.host == host:
            raise nva_errors.Conflict(
                f"port {port.id} is already bound (active) to {host}: the server runs there"
            )
        inactive = [b for b in bindings if b.status != "ACTIVE"]
        flights = self._flights(port.device_id) or []
        on_host = next((b for b in inactive if b.host == host), None)
        if flights:
            to_host = [f for f in flights if f.dest == host]
            if not to_host:
                where = ", ".join(f"{f.id} to {f.dest or 'a host not chosen yet'}" for f in flights)
                raise nva_errors.Conflict(
                    f"server {port.device_id} of port {port.id} has a migration in flight "
                    f"({where}); not preparing {host}",
                    hint="wait for it to end or abort it",
                )
            if on_host is not None:
                with self._lock:
                    self._pending[key] = _Pending(
                        port.id, host, port.binding_host_id, port.network_id, adopted=True
                    )
                self._note(
                    f"adopted the inactive binding of port {port.id} on {host} that Nova's "
                    f"migration {to_host[0].id} created"
                )
                return base | {"adopted": True, "binding": _binding_dict(on_host)}
            # Nova's conductor has yet to bind the port there; a binding made now
            # would make its bind fail. Follow Nova's instead.
            self.expect(vni, mac, nve, migration_id)
            return base | {"adopted": True, "binding": None}
        cleaned = [] if flights else self._clean(port, inactive)
        binding = self._create_binding(port, host, migration_id)
        if binding.vif_type in FAILED_VIF_TYPES:
            self._delete_binding(port.id, host)
            net = self._network(port.network_id)
            raise nva_errors.Conflict(
                f"Neutron cannot bind port {port.id} on {host} (vif_type {binding.vif_type})",
                hint=f"is an L2 agent alive on {host}, and does it reach network "
                f"{net['name']}? the failed binding was removed",
            )
        with self._lock:
            self._pending[key] = _Pending(
                port.id, host, port.binding_host_id, port.network_id, created=True
            )
        return base | {"cleaned": cleaned, "binding": _binding_dict(binding)}

    def release(self, vni: int, mac: str, migration_id: str) -> dict[str, Any]:
        """Hand the prestaged destination to Nova: delete our inactive binding, keep the record.

        Nova's conductor binds the ports on the destination itself and fails
        on an existing binding, so a prestage made before a Nova migration
        must be released before Nova starts; commit and abort then act on
        the binding Nova creates.
        """
        pending = self._pending_for(vni, mac, migration_id)
        if pending.created and self.binding_extended:
            self._delete_binding(pending.port_id, pending.host)
        pending.created, pending.released = False, True
        return {"port_id": pending.port_id, "host": pending.host, "released": True}

    def expect(self, vni: int, mac: str, nve: str, migration_id: str) -> dict[str, Any]:
        """Record that Nova prepares ``nve`` for this migration (no API call but the lookup)."""
        mac = normalize_mac(mac)
        key = (vni, mac, migration_id)
        with self._lock:
            if key in self._pending:
                self._pending[key].host = self.host_for(nve)
                return {"port_id": self._pending[key].port_id, "host": self.host_for(nve)}
        port = self._port(vni, mac)
        with self._lock:
            self._pending[key] = _Pending(
                port.id, self.host_for(nve), port.binding_host_id, port.network_id, released=True
            )
        return {"port_id": port.id, "host": self.host_for(nve)}

    def _pending_for(self, vni: int, mac: str, migration_id: str) -> _Pending:
        """The prestage of this migration: remembered, or found by the tag of its binding."""
        mac = normalize_mac(mac)
        key = (vni, mac, migration_id)
        with self._lock:
            found = self._pending.get(key)
        if found is not None:
            return found
        if self.binding_extended:
            port = self._port(vni, mac)
            for binding in self._bindings(port.id):
                if (binding.profile or {}).get(TAG) == migration_id:
                    pending = _Pending(
                        port.id, binding.host, port.binding_host_id, port.network_id, created=True
                    )
                    with self._lock:
                        self._pending[key] = pending
                    return pending
        raise nva_errors.NotFound(
            f"no pending migration {migration_id} for MAC {mac} in VNI {vni}",
            hint="prestage it first",
        )

    def commit(self, vni: int, mac: str, migration_id: str) -> dict[str, Any]:
        """Activate the destination's binding (a plain host update without binding-extended).

        Already active there (Nova activated it, or a repeat) counts as done.
        Returns ``{"endpoint", "revision", "committed_at", "activated"}``;
        the revision is the port's ``revision_number`` after the move.
        """
        mac = normalize_mac(mac)
        pending = self._pending_for(vni, mac, migration_id)
        host = pending.host
        activated = False
        if self.binding_extended:
            bindings = {b.host: b for b in self._bindings(pending.port_id)}
            binding = bindings.get(host)
            if binding is None:
                raise nva_errors.NotFound(
                    f"port {pending.port_id} has no binding on {host} to activate",
                    hint="the migration's binding is gone: was the migration reverted?",
                )
            if binding.status != "ACTIVE":
                try:
                    self._call(
                        f"activating the binding of port {pending.port_id} on {host}",
                        lambda: self.conn.network.activate_port_binding(pending.port_id, host),
                        role=SERVICE_ROLE,
                    )
                    activated = True
                except nva_errors.Conflict:
                    activated = False  # activated meanwhile (by Nova): the same outcome
            if pending.created:
                self._drop_source(pending, bindings)
        else:
            port = self._get_port(pending.port_id)
            if port.binding_host_id != host:
                self._call(
                    f"moving port {pending.port_id} to {host} (binding:host_id)",
                    lambda: self.conn.network.update_port(pending.port_id, binding_host_id=host),
                    role=ADMIN_OR_SERVICE,
                )
                activated = True
        port = self._get_port(pending.port_id)
        committed_at = time.time()
        revision = int(port.revision_number or 0)
        with self._lock:
            self._commits = [
                c for c in self._commits if not (c.vni == vni and c.port_id == pending.port_id)
            ]
            self._commits.append(
                _Committed(vni, mac, pending.port_id, host, revision, committed_at)
            )
        endpoint = {
            "vni": vni,
            "mac": mac,
            "port_id": pending.port_id,
            "nve": self.nve_for(host),
            "state": "active",
            "status": port.status,
            "last_migration_id": migration_id,
        }
        return {
            "endpoint": endpoint,
            "revision": revision,
            "committed_at": committed_at,
            "activated": activated,
        }

    def _drop_source(self, pending: _Pending, before: Mapping[str, Any]) -> None:
        """Delete the source's binding, left INACTIVE by the activation, as Nova does
        after a live migration; a failure is only noted (the move itself is done)."""
        source = pending.source
        if not source or source == pending.host or source not in before:
            return
        try:
            for binding in self._bindings(pending.port_id):
                if binding.host == source and binding.status != "ACTIVE":
                    self._delete_binding(pending.port_id, source)
        except nva_errors.NvaError as exc:
            self._note(
                f"the old binding of port {pending.port_id} on {source} stays: {exc.message}"
            )

    def abort(self, vni: int, mac: str, migration_id: str) -> dict[str, Any]:
        """Delete the destination's inactive binding; never an active one. Repeats are harmless.

        Returns ``{"port_id", "host", "deleted"}``; ``deleted`` is False when
        there was nothing to delete (already gone, or no binding-extended).
        """
        mac = normalize_mac(mac)
        try:
            pending = self._pending_for(vni, mac, migration_id)
        except nva_errors.NotFound:
            return {"vni": vni, "mac": mac, "deleted": False}
        deleted = False
        if self.binding_extended:
            for binding in self._bindings(pending.port_id):
                if binding.host == pending.host and binding.status != "ACTIVE":
                    self._delete_binding(pending.port_id, pending.host)
                    deleted = True
        with self._lock:
            self._pending.pop((vni, mac, migration_id), None)
        return {
            "vni": vni,
            "mac": mac,
            "port_id": pending.port_id,
            "host": pending.host,
            "deleted": deleted,
        }

    def wired(self, port_id: str, host: str) -> bool:
        """Whether the port is bound to ``host`` and ACTIVE (its L2 agent wired it)."""
        port = self._get_port(port_id)
        return bool(port.binding_host_id == host and port.status == "ACTIVE")

    def acks(
        self,
        vni: int,
        min_revision: int,
        nves: Sequence[str] | None = None,
        timeout: float = 0.0,
    ) -> dict[str, dict[str, Any]]:
        """Wait up to ``timeout`` s for the committed ports of ``vni`` to be wired.

        Neutron has no per-peer acknowledgement; what it does report is the
        port's status, which turns ACTIVE when the destination's L2 agent has
        set up the port. That is the NVE that matters first: an announcement
        made before it is lost. Answers ``{nve: {"acked_revision",
        "acked_at"}}`` for the destination NVEs, like the NVA's acks.
        """
        with self._lock:
            commits = [c for c in self._commits if c.vni == vni and c.revision >= min_revision]
        if nves is not None:
            commits = [c for c in commits if self.nve_for(c.host) in nves]
        deadline = self._clock() + timeout
        done: dict[str, float] = {}
        while True:
            for c in commits:
                if c.port_id not in done and self.wired(c.port_id, c.host):
                    done[c.port_id] = time.time()
            remaining = deadline - self._clock()
            if len(done) == len(commits) or remaining <= 0:
                break
            self._sleep(min(self.poll_interval, remaining))
        answer: dict[str, dict[str, Any]] = {}
        for c in commits:
            nve = self.nve_for(c.host)
            acked = c.port_id in done
            previous = answer.get(nve)
            if previous is not None and not previous["acked_at"]:
                continue  # one unwired port keeps the NVE unacknowledged
            answer[nve] = {
                "acked_revision": c.revision if acked else 0,
                "acked_at": done.get(c.port_id),
                "port_id": c.port_id,
            }
        return answer

    def expire(self, vni: int, mac: str, nves: Sequence[str]) -> dict[str, Any]:
        """Nothing to do: Neutron's L2 population (or OVN) pushes the new location to peers."""
        LOG.info(
            "expire %s in VNI %s at %s: left to Neutron's own L2 population",
            mac,
            vni,
            ", ".join(nves),
        )
        return {"vni": vni, "mac": mac, "expired": []}

    def health(self) -> dict[str, Any]:
        """``{"binding_extended": bool}`` when Neutron answers."""
        return {"binding_extended": self.binding_extended}


def _reraise(exc: BaseException) -> NoReturn:
    raise exc


def _binding_dict(binding: Any) -> dict[str, Any]:
    return {
        "host": binding.host,
        "status": binding.status,
        "vif_type": binding.vif_type,
        "migration_id": (binding.profile or {}).get(TAG),
    }


def nova_in_flight(conn: Connection, server_id: str) -> list[InFlight] | None:
    """Nova's in-progress migrations of a server; None when Nova cannot say.

    Needs the server-migrations API (microversion 2.23+); an unknown
    server (a port of something else than a Nova server) has none.
    """
    try:
        migrations = list(conn.compute.server_migrations(server_id))
    except Exception as exc:
        if cloud.http_status(exc) == 404:
            return []
        LOG.warning("cannot ask Nova about migrations of %s: %s", server_id, exc)
        return None
    return [
        InFlight(str(m.id), m.dest_compute, str(m.status))
        for m in migrations
        if m.status not in ("completed", "error", "failed", "cancelled", "done")
    ]
