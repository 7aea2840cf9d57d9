"""Per-migration leases: exactly one orchestrator instance handles each migration.

Each instance holds one etcd lease (:class:`InstanceLease`), renewed in the
background. Handling a migration starts by creating its owner key,
``<prefix>owners/<host>/<migration>``, attached to that lease
(:class:`MigrationLocks`). The key stays for the whole migration, not just
one event, so another instance never steps in between two events of a live
owner; it is deleted when the migration is over. When an instance dies its
lease runs out after ``lease_ttl`` seconds, etcd deletes its owner keys, and
any other instance may claim those migrations and finish or revert them.

The owner key's value, instance name plus lease id, doubles as a fencing
token: the etcd journal writes only while the key still holds it.
"""

from __future__ import annotations

import enum
import logging
import os
import secrets
import socket
import threading
import time

from vmm_etcd import kv as kvmod
from vmm_etcd.keys import Keys
from vmm_etcd.kv import EtcdKV
from vmm_etcd.watch import WatchStream
from vmm_orchestrator.contracts import MigrationLock
from vmm_orchestrator.errors import VmmError
from vmm_orchestrator.nva.errors import NvaError

LOG = logging.getLogger(__name__)


class MigrationBusy(VmmError):
    """Another live instance owns the migration and did not finish it in time."""


class Claim(enum.Enum):
    """What claiming a migration found."""

    NEW = "new"  # nobody owned it; now this instance does
    OURS = "ours"  # this instance already owned it
    BUSY = "busy"  # another live instance owns it


def instance_name() -> str:
    """A name unique to this process: host, pid and a random part (restarts differ)."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


class InstanceLease:
    """This instance's etcd lease, renewed every ttl/3 s by a daemon thread.

    If renewals fail for longer than the TTL the lease is gone, and so is
    every migration this instance owned; ``lost`` counts how often that
    happened, and a fresh lease is taken for new migrations.
    """

    def __init__(self, kv: EtcdKV, ttl: int, instance: str | None = None) -> None:
        self.kv = kv
        self.instance = instance or instance_name()
        self.requested_ttl = ttl
        self.id, self.ttl = kv.grant(ttl)
        self.lost = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._keep_alive, name=f"etcd-lease-{self.instance}", daemon=True
        )
        self._thread.start()

    @property
    def token(self) -> str:
        """The owner keys' value while this lease lives."""
        return f"{self.instance}#{self.id:x}"

    def _keep_alive(self) -> None:
        while not self._stop.wait(max(0.1, self.ttl / 3.0)):
            try:
                left = self.kv.keepalive(self.id)
            except NvaError as exc:
                LOG.warning("instance %s: cannot renew its etcd lease: %s", self.instance, exc)
                continue
            if left <= 0:
                self.lost += 1
                LOG.error(
                    "instance %s: its etcd lease %x expired; the migrations it owned may be "
                    "taken over by other instances",
                    self.instance,
                    self.id,
                )
                try:
                    self.id, self.ttl = self.kv.grant(self.requested_ttl)
                except NvaError as exc:
                    LOG.warning("instance %s: cannot take a new lease: %s", self.instance, exc)

    def close(self, revoke: bool = True) -> None:
        """Stop renewing; with ``revoke`` hand every owned migration over at once."""
        self._stop.set()
        self._thread.join(timeout=5)
        if revoke:
            try:
                self.kv.revoke(self.id)
            except NvaError as exc:
                LOG.warning("instance %s: cannot revoke its lease: %s", self.instance, exc)


class MigrationLocks(MigrationLock):
    """Owner keys of one host's migrations, held on this instance's lease."""

    def __init__(self, kv: EtcdKV, host: str, lease: InstanceLease, prefix: str = "/vmm/") -> None:
        self.kv = kv
        self.host = host
        self.lease = lease
        self.keys = Keys(prefix)

    @property
    def instance(self) -> str:
        return self.lease.instance

    @property
    def token(self) -> str:
        return self.lease.token

    def close(self) -> None:
        """Give up this instance's lease (its unfinished migrations go to another
        instance at once) and close the connection."""
        self.lease.close(revoke=True)
        self.kv.close()

    def _key(self, migration_id: str) -> str:
        return self.keys.owner(self.host, migration_id)

    def fence(self, migration_id: str) -> dict[str, object]:
        """An etcd compare that holds only while this instance owns the migration."""
        return kvmod.cmp_value(self._key(migration_id), "EQUAL", self.token)

    def owner_of(self, migration_id: str) -> str | None:
        """The token of the instance owning the migration now, or None."""
        found = self.kv.read(kvmod.get(self._key(migration_id)), what="read an owner").one(0)
        return None if found is None else found.value

    def try_claim(self, migration_id: str) -> Claim:
        """Own the migration if nobody does; never waits."""
        return self._try(migration_id)[0]

    def _try(self, migration_id: str) -> tuple[Claim, int]:
        key = self._key(migration_id)
        answer = self.kv.txn(
            [kvmod.cmp_mod(key, 0)],
            [kvmod.put(key, self.token, lease=self.lease.id)],
            [kvmod.get(key)],
            what=f"claim migration {migration_id}",
        )
        if answer.succeeded:
            LOG.info("instance %s owns migration %s", self.instance, migration_id)
            return Claim.NEW, answer.revision
        holder = answer.one(0)
        if holder is not None and holder.value == self.token:
            return Claim.OURS, answer.revision
        return Claim.BUSY, answer.revision

    def claim(self, migration_id: str, timeout: float) -> Claim:
        """Own the migration, waiting up to ``timeout`` s for a live owner to let go.

        The owner lets go when the migration is over or when it dies (its
        lease expires). Raises MigrationBusy when it is still held.
        """
        deadline = time.monotonic() + timeout
        while True:
            claim, revision = self._try(migration_id)
            if claim is not Claim.BUSY:
                return claim
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise MigrationBusy(
                    f"migration {migration_id} on host {self.host} is handled by "
                    f"{self.owner_of(migration_id) or 'another instance'}; not running it here",
                    hint="that instance finishes it, or it is taken over once its lease expires",
                )
            stream = WatchStream(self.kv, self._key(migration_id), start_revision=revision + 1)
            try:
                stream.get(remaining)  # any change of the key: try again
            except NvaError:
                time.sleep(min(0.1, max(0.0, remaining)))
            finally:
                stream.close()

    def release(self, migration_id: str) -> None:
        """Give the migration up (only if this instance still owns it)."""
        key = self._key(migration_id)
        answer = self.kv.txn(
            [kvmod.cmp_value(key, "EQUAL", self.token)],
            [kvmod.delete(key)],
            what=f"release migration {migration_id}",
        )
        if answer.succeeded:
            LOG.info("instance %s released migration %s", self.instance, migration_id)

    def owned(self) -> list[str]:
        """Migrations of this host that this instance owns now."""
        prefix = self.keys.owners(self.host)
        items = self.kv.read(kvmod.get_prefix(prefix), what="list owners").kvs(0)
        return [i.key[len(prefix) :] for i in items if i.value == self.token]
