"""Which guests have an incoming migration under way on this host, as files the
hook relay's shell front tests before it starts anything.

libvirtd waits for every hook call, and a migration makes two the agent never
needs on the source: "stopped end" and "release end" once the VM has left.
The relay hands each to a Python it starts in the background, which still
cost libvirt 10-17 ms per call (a ``flock`` process and the fork; measured
with the lab's libvirtd debug logs and a relay loop, see
``benchmarks/libvirt_migration.py --libvirt-log``). Only a destination whose
incoming QEMU never came up needs them (they end its PREPARE, see
``phases._hook``). So the agent marks a guest when it allows its incoming
migration (the ``migrate begin`` hook, before the answer) and unmarks it when
the migration ends here (RESUMED, ABORTED, or a veto): the relay's shell
front lets every other "stopped end"/"release end" go on at once, as it does
for the calls it never forwards (about 1 ms).

The marks live beside the hook socket (``<hook_socket>.incoming/<guest>``),
which the relay's configuration already names, so the lab's libvirtds, each
with its own ``/run/libvirt``, need nothing more. The directory exists only
while the agent runs: without it the relay forwards as before. A mark left
behind (an agent killed) costs one forwarded call, never a missed one; a
missing mark (a migration prepared from libvirt's events, not the hook)
leaves the abort to the events and the reconciliation, as without the hook.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading

LOG = logging.getLogger(__name__)

SUFFIX = ".incoming"


def marks_dir(hook_socket: str) -> str:
    """The directory of the marks for the agent listening on ``hook_socket``."""
    return hook_socket + SUFFIX


class IncomingMarks:
    """The marks of one hook socket: ``mark``/``unmark`` by guest name, keyed by
    migration so that the end of a migration finds the name it marked."""

    def __init__(self, hook_socket: str) -> None:
        self.path = marks_dir(hook_socket)
        self._lock = threading.Lock()
        self._by_migration: dict[str, str] = {}
        self._open = False

    def open(self) -> None:
        """Create the directory empty: a previous process's marks are stale (its
        migrations are recovered from the journal and followed by events)."""
        shutil.rmtree(self.path, ignore_errors=True)
        try:
            os.mkdir(self.path, 0o755)
        except OSError as exc:  # the relay forwards every call, as without marks
            LOG.warning("cannot create %s: %s; the hook relay forwards every call", self.path, exc)
            return
        self._open = True

    def mark(self, migration_id: str, guest: str) -> None:
        """``guest`` comes in by ``migration_id``: the relay forwards its end calls."""
        if not self._open or "/" in guest or guest in ("", ".", ".."):
            return
        with self._lock:
            self._by_migration[migration_id] = guest
        try:
            with open(os.path.join(self.path, guest), "w"):
                pass
        except OSError as exc:
            LOG.warning("cannot mark %s as incoming in %s: %s", guest, self.path, exc)

    def unmark(self, migration_id: str) -> None:
        """The migration ended here (or never started): forget its mark."""
        with self._lock:
            guest = self._by_migration.pop(migration_id, None)
            if guest is None or guest in self._by_migration.values():
                return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(self.path, guest))

    def marked(self) -> list[str]:
        """The guests marked now (sorted)."""
        try:
            return sorted(os.listdir(self.path))
        except OSError:
            return []

    def close(self) -> None:
        """Remove the directory: the relay forwards every call again."""
        self._open = False
        shutil.rmtree(self.path, ignore_errors=True)
