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
while the agent runs and can mark: without it the relay forwards as before
(a mark that cannot be written removes it). A migration prepared from
libvirt's events instead of the hook (a restarted agent's reconciliation,
an answer the relay no longer waited for) is marked there. A mark left
behind (an agent killed) costs one forwarded call, never a missed one. The
relay's shell front skips only when it read ``socket`` from the file
exactly as the relay's Python does (see the relay).
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
        migrations are recovered from the journal and followed by events, which
        mark them again)."""
        self._remove()
        try:
            os.mkdir(self.path, 0o755)
        except OSError as exc:
            self._give_up(f"cannot create it: {exc}")
            return
        self._open = True

    def mark(self, migration_id: str, guest: str) -> None:
        """``guest`` comes in by ``migration_id``: the relay forwards its end calls.

        A name the relay finds without a file ("", ".", "..": the directory
        itself) needs none. A mark that cannot be written removes the whole
        directory: the relay then forwards every call, as without marks,
        rather than drop this guest's.
        """
        if "/" in guest or guest in ("", ".", ".."):
            return
        with self._lock:
            if not self._open:
                return
            self._by_migration[migration_id] = guest
            try:
                with open(os.path.join(self.path, guest), "w"):
                    pass
            except OSError as exc:
                self._give_up(f"cannot mark {guest}: {exc}")

    def unmark(self, migration_id: str) -> None:
        """The migration ended here (or never started): forget its mark, unless
        another migration of the same guest is under way (under the lock: a new
        attempt's mark is never removed by the end of the last one)."""
        with self._lock:
            guest = self._by_migration.pop(migration_id, None)
            if guest is None or guest in self._by_migration.values() or not self._open:
                return
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self.path, guest))

    def _give_up(self, why: str) -> None:
        """Stop marking and make sure the relay forwards every call (no directory)."""
        self._open = False
        self._remove()
        if os.path.lexists(self.path):
            LOG.error(
                "%s: %s, and it cannot be removed: the hook relay lets the end calls of "
                "every guest go on without the agent (failed incoming migrations are then "
                "seen only by libvirt's events); remove it",
                self.path,
                why,
            )
        else:
            LOG.warning("%s: %s; the hook relay forwards every call", self.path, why)

    def _remove(self) -> None:
        if os.path.islink(self.path):
            with contextlib.suppress(OSError):
                os.unlink(self.path)
        shutil.rmtree(self.path, ignore_errors=True)

    def marked(self) -> list[str]:
        """The guests marked now (sorted)."""
        try:
            return sorted(os.listdir(self.path))
        except OSError:
            return []

    def close(self) -> None:
        """Remove the directory: the relay forwards every call again."""
        with self._lock:
            self._open = False
            self._remove()
