"""A plain libvirt live migration as the driver of `vmm migrate-with-network`.

For clouds without Nova: ``--libvirt-uri SOURCE --libvirt-uri DESTINATION``.
The migration is peer-to-peer (``VIR_MIGRATE_PEER2PEER``): the source's
libvirtd connects to the destination URI itself, so this command needs
only its connection to the source, and ``migrateToURI3`` blocks until the
migration has ended. It runs in a worker thread while the caller polls
``jobStats`` for the memory copied. The domain is made persistent at the
destination and undefined at the source, as Nova does.

libvirt-python is imported only when this driver is used (``vmm --help``
and the Nova path work without it). Calls here never run inside a libvirt
hook: the hook relay must not call back into libvirtd, this command may.
"""

from __future__ import annotations

import logging
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from typing import Any

from vmm_openstack.directory import Directory, Nic
from vmm_openstack.driver import CANCELLED, DONE, FAILED, RUNNING, MigrationState, Target
from vmm_orchestrator.errors import ConfigError, VmmError
from vmm_orchestrator.model import normalize_mac
from vmm_orchestrator.nva import errors as nva_errors

LOG = logging.getLogger(__name__)


def load_libvirt() -> Any:
    """The libvirt module, or a ConfigError saying how to get it."""
    try:
        import libvirt
    except ImportError:
        raise ConfigError(
            "--libvirt-uri needs libvirt-python, which is not installed",
            hint="pip install libvirt-python (it builds against libvirt's development files)",
        ) from None
    # libvirt's default handler prints every error to stderr as well; the errors
    # reach the operator through the exceptions here, once, in one line.
    libvirt.registerErrorHandler(_ignore_error, None)
    return libvirt


def _ignore_error(_ctx: Any, _err: Any) -> None:
    """Swallow libvirt's own stderr report; libvirtError carries the message."""


def domain_macs(xml: str) -> list[str]:
    """The MACs of a domain's network interfaces, in XML order."""
    root = ET.fromstring(xml)
    macs = []
    for iface in root.findall("./devices/interface"):
        mac = iface.find("mac")
        if mac is not None and mac.get("address"):
            macs.append(normalize_mac(mac.get("address", "")))
    return macs


class LibvirtDriver:
    """Live-migrates one libvirt domain from ``source_uri`` to ``dest_uri``.

    ``libvirt_module`` returns the libvirt module (default: ``load_libvirt``,
    looked up when needed so a stand-in can replace it).
    """

    kind = "libvirt"

    def __init__(
        self,
        source_uri: str,
        dest_uri: str,
        directory: Directory,
        *,
        libvirt_module: Callable[[], Any] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.source_uri = source_uri
        self.dest_uri = dest_uri
        self.directory = directory
        self.where = f"{source_uri} -> {dest_uri}"
        self._load = libvirt_module
        self._clock = clock
        self.libvirt: Any = None
        self._src: Any = None
        self._dst: Any = None
        self._dom: Any = None
        self._uuid: str | None = None
        self._thread: threading.Thread | None = None
        self._error: str | None = None
        self._finished = threading.Event()
        self._aborted = False
        self._last: MigrationState | None = None
        self.migration_id: str | None = None
        self._names: dict[str, str] = {}

    def _open(self, uri: str, role: str) -> Any:
        try:
            return self.libvirt.open(uri)
        except self.libvirt.libvirtError as exc:
            raise VmmError(
                f"cannot connect to the {role} libvirt at {uri}: {exc.get_error_message()}",
                hint="check --libvirt-uri and that libvirtd runs there",
            ) from None

    def resolve(self, server: str, host: str | None) -> Target:
        """The running domain, its host names and NICs; nothing is changed here."""
        self.libvirt = (self._load or load_libvirt)()
        self._src = self._open(self.source_uri, "source")
        self._dst = self._open(self.dest_uri, "destination")
        dom = None
        for lookup in (self._src.lookupByName, self._src.lookupByUUIDString):
            try:
                dom = lookup(server)
                break
            except self.libvirt.libvirtError:
                continue
        if dom is None:
            raise VmmError(
                f"no domain {server} at {self.source_uri}",
                hint="check the name or UUID: `virsh -c SOURCE list --all`",
            )
        self._dom = dom
        name, self._uuid = dom.name(), dom.UUIDString()
        if not dom.isActive():
            raise VmmError(
                f"domain {name} is not running at {self.source_uri}: only a running domain "
                "live-migrates",
                hint="start it first",
            )
        try:
            there = self._dst.lookupByUUIDString(self._uuid)
        except self.libvirt.libvirtError:
            there = None
        if there is not None and there.isActive():
            raise VmmError(f"domain {name} already runs at {self.dest_uri}")
        source = self._src.getHostname()
        destination = host or self._dst.getHostname()
        self._names = {"source": source, "destination": destination}
        if destination == source:
            raise VmmError(
                f"source and destination are the same host {source}",
                hint="give the destination's URI as the second --libvirt-uri",
            )
        nics: list[Nic] = []
        for mac in domain_macs(dom.XMLDesc(0)):
            try:
                found = self.directory.lookup(mac)
            except nva_errors.NvaError as exc:
                raise VmmError(exc.message, hint=exc.hint) from None
            if not found:
                hint = "register the NIC there first; its network would not follow"
                if self.directory.kind == "neutron":
                    # Neutron shows a user only its own project's ports (no error).
                    who = getattr(self.directory, "who", "these credentials")
                    hint = (
                        f"is it a Neutron port that {who} may see? "
                        f"`openstack port list --mac-address {mac}` as admin"
                    )
                raise VmmError(
                    f"the directory ({self.directory.kind} at {self.directory.where}) knows no "
                    f"endpoint with MAC {mac} of domain {name}",
                    hint=hint,
                )
            nics.extend(found)
        return Target(self._uuid, name, source, destination, nics, "running")

    def start(self, target: Target, block_migration: bool) -> str:
        """Run ``migrateToURI3`` in a worker thread; it returns when the migration ends."""
        lv = self.libvirt
        flags = (
            lv.VIR_MIGRATE_LIVE
            | lv.VIR_MIGRATE_PEER2PEER
            | lv.VIR_MIGRATE_PERSIST_DEST
            | lv.VIR_MIGRATE_UNDEFINE_SOURCE
        )
        if block_migration:
            flags |= lv.VIR_MIGRATE_NON_SHARED_DISK
        dom = self._dom

        def migrate() -> None:
            try:
                dom.migrateToURI3(self.dest_uri, {}, flags)
            except lv.libvirtError as exc:
                self._error = exc.get_error_message() or str(exc)
            except Exception as exc:  # a bug in a binding must still end the wait
                self._error = f"{type(exc).__name__}: {exc}"
            finally:
                self._finished.set()

        self._thread = threading.Thread(target=migrate, name="vmm-libvirt-migrate", daemon=True)
        self._thread.start()
        self.migration_id = f"libvirt:{self._uuid}"
        return self.migration_id

    def poll(self) -> MigrationState:
        """Ended (done, failed, cancelled) or running with ``jobStats``' memory figures."""
        mid = self.migration_id
        if self._finished.is_set():
            if self._error is None:
                state = MigrationState(mid, "completed", DONE)
                if self._last is not None and self._last.memory_total:
                    state.memory_total = state.memory_processed = self._last.memory_total
            elif self._aborted:
                state = MigrationState(mid, "cancelled", CANCELLED, detail=self._error)
            else:
                state = MigrationState(mid, "failed", FAILED, detail=self._error)
            self._last = state
            return state
        try:
            stats = self._dom.jobStats()
        except self.libvirt.libvirtError:
            stats = {}
        state = MigrationState(
            mid,
            "running",
            RUNNING,
            memory_total=stats.get("memory_total"),
            memory_processed=stats.get("memory_processed"),
            memory_remaining=stats.get("memory_remaining"),
            disk_total=stats.get("disk_total"),
            disk_processed=stats.get("disk_processed"),
        )
        self._last = state
        return state

    def abort(self) -> str | None:
        """``abortJob`` on the source; the worker thread then ends with an error."""
        try:
            self._dom.abortJob()
        except self.libvirt.libvirtError as exc:
            return f"libvirt refused to abort the job: {exc.get_error_message()}"
        self._aborted = True
        return None

    def location(self) -> str | None:
        """Where the domain runs now (checked at the destination first), by NVE name."""
        for conn, role in ((self._dst, "destination"), (self._src, "source")):
            try:
                if conn.lookupByUUIDString(self._uuid).isActive():
                    return self._names.get(role)
            except self.libvirt.libvirtError:
                continue
        return None

    def reason(self) -> str | None:
        return self._error

    def close(self) -> None:
        for conn in (self._src, self._dst):
            if conn is not None:
                try:
                    conn.close()
                except Exception:
                    LOG.debug("closing a libvirt connection failed", exc_info=True)
