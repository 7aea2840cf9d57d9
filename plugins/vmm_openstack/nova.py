"""Nova as the driver of `vmm migrate-with-network`: start a live migration and follow it.

Everything goes through openstacksdk, which negotiates the compute
microversion: the live-migrate action is sent as 2.30 (host checked by the
scheduler, ``block_migration`` may be "auto") or older on older clouds;
progress comes from the server-migrations API (2.23+: memory copied and
remaining), the final status from ``/os-migrations`` (the in-progress list
forgets a migration once it has ended), and the reason of a failure from
the server's instance actions (their event details, 2.84+).

Nova's migration statuses map onto the driver states: queued, accepted,
preparing -> preparing; running -> running; post-migrating -> switched
(the VM already runs at the destination, Nova is tidying up); completed
-> done; error, failed -> failed; cancelled -> cancelled.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from vmm_openstack import cloud
from vmm_openstack.driver import (
    CANCELLED,
    DONE,
    FAILED,
    PREPARING,
    RUNNING,
    SWITCHED,
    MigrationState,
    Target,
)
from vmm_orchestrator.errors import VmmError
from vmm_orchestrator.nva import errors as nva_errors

if TYPE_CHECKING:
    from openstack.connection import Connection

    from vmm_openstack.neutron import NeutronDirectory

LOG = logging.getLogger(__name__)

STATES = {
    "queued": PREPARING,
    "accepted": PREPARING,
    "pre-migrating": PREPARING,
    "preparing": PREPARING,
    "running": RUNNING,
    "post-migrating": SWITCHED,
    "completed": DONE,
    "done": DONE,
    "finished": DONE,
    "error": FAILED,
    "failed": FAILED,
    "cancelled": CANCELLED,
    "cancelling": RUNNING,
}

#: Server statuses from which Nova live-migrates.
MOVABLE = ("ACTIVE", "PAUSED")


class NovaDriver:
    """Live-migrates one server with Nova; ports and bindings through ``directory``."""

    kind = "nova"

    def __init__(
        self,
        conn: Connection,
        directory: NeutronDirectory,
        *,
        find_timeout: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.conn = conn
        self.directory = directory
        self.label = getattr(conn, "vmm_label", "the cloud")
        self.where = f"{self._endpoint()} (cloud {self.label})"
        self.find_timeout = find_timeout
        self._clock = clock
        self._sleep = sleep
        self.server_id: str | None = None
        self.server_name: str | None = None
        self.migration_id: str | None = None
        self._last: MigrationState | None = None

    def _endpoint(self) -> str:
        try:
            return str(self.conn.compute.get_endpoint())
        except Exception as exc:
            raise cloud.describe(exc, f"cloud {self.label}: finding Nova in the catalog") from None

    @property
    def _sid(self) -> str:
        """The resolved server's id (resolve() runs first)."""
        if self.server_id is None:
            raise VmmError("internal: the server is not resolved yet")
        return self.server_id

    @property
    def _mid(self) -> str:
        """Nova's id of the migration (start() runs first)."""
        if self.migration_id is None:
            raise VmmError("internal: no migration was started")
        return self.migration_id

    def _sdk(self, what: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except Exception as exc:
            raise cloud.describe(exc, what) from exc

    # ------------------------------------------------------------- resolve

    def resolve(self, server: str, host: str | None) -> Target:
        """The server, its host and its ports; refuses what Nova would refuse, earlier.

        Nothing is changed here, so every refusal leaves the cloud as it was.
        """
        from openstack import exceptions as sdk_exc

        try:
            found = self.conn.compute.find_server(server, ignore_missing=False)
        except sdk_exc.NotFoundException:
            raise VmmError(
                f"no server {server} in cloud {self.label}",
                hint="check the name or ID: `openstack server list --all-projects`",
            ) from None
        except sdk_exc.DuplicateResource:
            raise VmmError(
                f"several servers are named {server} in cloud {self.label}",
                hint="give the server's ID instead",
            ) from None
        except Exception as exc:
            raise cloud.describe(exc, f"finding server {server} in Nova at {self.where}") from None
        details = self._sdk(
            f"reading server {found.id}", lambda: self.conn.compute.get_server(found)
        )
        self.server_id, self.server_name = details.id, details.name or details.id
        source = details.compute_host
        if not source:
            raise VmmError(
                f"Nova does not show the host of server {self.server_name}",
                hint="the credentials need the admin role (OS-EXT-SRV-ATTR:host)",
            )
        if details.task_state:
            raise VmmError(
                f"server {self.server_name} is busy ({details.status}, task {details.task_state})",
                hint="wait for the task to end, or abort its migration: "
                "`openstack server migration list --server ...`",
            )
        if details.status not in MOVABLE:
            raise VmmError(
                f"server {self.server_name} is {details.status}: Nova live-migrates only "
                f"{' or '.join(MOVABLE)} servers",
                hint="start it first, or use a cold migration",
            )
        if host is not None and host == source:
            raise VmmError(
                f"server {self.server_name} already runs on {host}", hint="pick another --host"
            )
        in_flight = self._in_progress()
        if in_flight:
            raise VmmError(
                f"server {self.server_name} has a migration in flight "
                f"({in_flight[0].id}, {in_flight[0].status})",
                hint="wait for it to end or abort it",
            )
        ports = self._sdk(
            f"listing the ports of server {self.server_name}",
            lambda: list(self.conn.network.ports(device_id=details.id)),
        )
        try:
            nics = self.directory.nics_of(ports)
        except nva_errors.NvaError as exc:
            raise VmmError(exc.message, hint=exc.hint) from None
        return Target(details.id, self.server_name, source, host, nics, details.status)

    def _in_progress(self) -> list[Any]:
        try:
            return [
                m
                for m in self.conn.compute.server_migrations(self._sid)
                if STATES.get(str(m.status)) in (PREPARING, RUNNING, SWITCHED)
            ]
        except Exception as exc:
            if cloud.http_status(exc) == 404:
                return []  # Nova older than 2.23: no in-progress list
            raise cloud.describe(exc, f"listing the migrations of {self.server_name}") from None

    # -------------------------------------------------------------- migrate

    def _live_migrations(self) -> list[Any]:
        return self._sdk(
            f"listing the migrations of {self.server_name}",
            lambda: list(
                self.conn.compute.migrations(
                    server_id=self.server_id, migration_type="live-migration"
                )
            ),
        )

    def start(self, target: Target, block_migration: bool) -> str:
        """Ask Nova to live-migrate; wait (bounded) until its migration record shows up."""
        before = {str(m.id) for m in self._live_migrations()}
        self._sdk(
            f"starting the live migration of {target.name} (Nova at {self.where})",
            lambda: self.conn.compute.live_migrate_server(
                target.id,
                host=target.destination,
                block_migration=True if block_migration else None,
            ),
        )
        deadline = self._clock() + self.find_timeout
        while True:
            new = [m for m in self._live_migrations() if str(m.id) not in before]
            if new:
                newest = max(new, key=lambda m: int(m.id) if str(m.id).isdigit() else 0)
                self.migration_id = str(newest.id)
                return self.migration_id
            if self._clock() >= deadline:
                raise VmmError(
                    f"Nova accepted the live migration of {target.name} but shows no migration "
                    f"record after {self.find_timeout:g} s",
                    hint="check `openstack server migration list`; nothing was moved yet",
                )
            self._sleep(0.05)

    def poll(self) -> MigrationState:
        """The migration's status, with memory progress while Nova reports it."""
        mid = self.migration_id
        try:
            live = [m for m in self.conn.compute.server_migrations(self._sid) if str(m.id) == mid]
        except Exception as exc:
            if cloud.http_status(exc) != 404:
                raise cloud.describe(exc, f"polling Nova's migration {mid}") from None
            live = []
        if live:
            m = live[0]
            state = MigrationState(
                id=mid,
                status=str(m.status),
                state=STATES.get(str(m.status), RUNNING),
                destination=m.dest_compute,
                memory_total=m.memory_total_bytes,
                memory_processed=m.memory_processed_bytes,
                memory_remaining=m.memory_remaining_bytes,
                disk_total=m.disk_total_bytes,
                disk_processed=m.disk_processed_bytes,
            )
        else:
            record = next((m for m in self._live_migrations() if str(m.id) == mid), None)
            if record is None:
                raise VmmError(f"Nova's migration {mid} of {self.server_name} disappeared")
            state = MigrationState(
                id=mid,
                status=str(record.status),
                state=STATES.get(str(record.status), RUNNING),
                destination=record.dest_compute,
            )
            if self._last is not None and state.state not in (FAILED, CANCELLED):
                # Keep the last figures Nova gave: a finished copy shows as 100 %.
                state.memory_total = self._last.memory_total
                state.memory_processed = (
                    self._last.memory_total
                    if state.state == DONE
                    else (self._last.memory_processed)
                )
        self._last = state
        return state

    def abort(self) -> str | None:
        """Nova's abort of the in-progress live migration (2.24+)."""
        try:
            self.conn.compute.abort_server_migration(self._mid, self._sid, ignore_missing=False)
        except Exception as exc:
            return cloud.describe(exc, f"aborting Nova's migration {self.migration_id}").message
        return None

    def location(self) -> str | None:
        server = self._sdk(
            f"reading server {self.server_name}", lambda: self.conn.compute.get_server(self._sid)
        )
        host: str | None = server.compute_host
        return host

    def reason(self) -> str | None:
        """The error detail of the server's newest live-migration action, when Nova gives one."""
        try:
            actions = [
                a
                for a in self.conn.compute.server_actions(self._sid)
                if a.action == "live-migration"
            ]
            if not actions:
                return None
            newest = max(actions, key=lambda a: str(a.start_time or ""))
            action = self.conn.compute.get_server_action(newest.request_id, self._sid)
        except Exception as exc:
            LOG.info("cannot read the instance actions of %s: %s", self.server_name, exc)
            return None
        for event in action.events or []:
            fields = event if isinstance(event, dict) else event.to_dict()
            if str(fields.get("result")).lower() != "error":
                continue
            traceback = str(fields.get("traceback") or "").strip().splitlines()
            text = fields.get("details") or (traceback[-1] if traceback else "")
            return str(text).strip() or None
        return None

    def close(self) -> None:
        self.conn.close()
