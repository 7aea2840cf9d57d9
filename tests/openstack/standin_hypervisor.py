"""The hypervisor of the two nova-compute services: Nova's own fake virt driver, steered.

There is no hypervisor here, so the computes run Nova's fake driver, as
Nova's functional tests do: ``nova.virt.fake.FakeLiveMigrateDriver``, whose
live migration runs until it is finished or aborted. This subclass only
makes a migration's length and outcome something a test can choose, through
the server's metadata (set when the server is created), because a real
hypervisor's failure cannot be produced on demand:

* ``standin:seconds`` (default 1.5): how long the memory copy runs; during
  it the driver reports memory progress on Nova's migration record, as the
  libvirt driver does (``memory_total``/``processed``/``remaining``);
* ``standin:fail`` = ``1``: the copy fails half way, and the driver hands the
  failure to Nova's own recovery (``recover_method``, migration status
  ``error``), as the libvirt driver does when QEMU's migration fails.

An abort (Nova's ``DELETE /servers/{id}/migrations/{id}``) ends the copy and
Nova's recovery marks the migration ``cancelled``, as in the parent class.
Everything else, including the port bindings, is Nova's real code.
"""

from __future__ import annotations

import time
from typing import Any

from nova.virt import fake

MEMORY = 1024 * 1024 * 1024


class StandInHypervisor(fake.FakeLiveMigrateDriver):
    def live_migration(
        self,
        context: Any,
        instance: Any,
        dest: str,
        post_method: Any,
        recover_method: Any,
        block_migration: bool = False,
        migrate_data: Any = None,
    ) -> None:
        meta = dict(instance.metadata or {})
        seconds = float(meta.get("standin:seconds", 1.5))
        fail = meta.get("standin:fail") == "1"
        self._abort_migration = False
        self._migrating = True
        migration = getattr(migrate_data, "migration", None) if migrate_data else None
        start = saved = time.monotonic()
        while self._migrating and time.monotonic() - start < seconds:
            done = min(1.0, (time.monotonic() - start) / seconds)
            if migration is not None and time.monotonic() - saved >= 0.5:
                saved = time.monotonic()
                migration.memory_total = MEMORY
                migration.memory_processed = int(MEMORY * done)
                migration.memory_remaining = MEMORY - int(MEMORY * done)
                migration.save()
            if fail and done >= 0.5:
                recover_method(context, instance, dest, migrate_data)
                return
            time.sleep(0.1)
        if self._abort_migration:
            recover_method(context, instance, dest, migrate_data, migration_status="cancelled")
        else:
            post_method(context, instance, dest, block_migration, migrate_data)
