"""STAND-IN for the compute part: a libvirt module whose hosts are names in URIs.

The real-OpenStack tier runs Keystone and Neutron but no hypervisor, so
`vmm migrate-with-network` moves the VM with its libvirt driver
(``--libvirt-uri SOURCE --libvirt-uri DESTINATION``) against this module in
place of libvirt-python: one running domain per test with the MACs of its
Neutron ports, a live migration that copies its memory in three polls (or
fails, when told to), and ``qemu://HOST/system`` URIs whose host names are
the ones Neutron binds to. The Neutron side stays real.
"""

from __future__ import annotations

import threading
import time
from typing import Any


class StandInLibvirt:
    """libvirt-python's surface the driver uses, for one domain ``name`` on ``source``."""

    VIR_MIGRATE_LIVE = 1
    VIR_MIGRATE_PEER2PEER = 2
    VIR_MIGRATE_PERSIST_DEST = 8
    VIR_MIGRATE_UNDEFINE_SOURCE = 16
    VIR_MIGRATE_NON_SHARED_DISK = 64

    class libvirtError(Exception):
        def get_error_message(self) -> str:
            return str(self)

    def __init__(self, name: str, macs: list[str], source: str, fail: str | None = None) -> None:
        self.name = name
        self.macs = macs
        self.uri = f"qemu://{source}/system"
        self.fail = fail
        self.uuid = "5f0c1d2e-0000-4000-8000-000000000001"
        self.lock = threading.Lock()

    @staticmethod
    def uri_of(host: str) -> str:
        return f"qemu://{host}/system"

    def open(self, uri: str) -> Any:
        return _Conn(self, uri)


class _Domain:
    def __init__(self, lv: StandInLibvirt, uri: str) -> None:
        self.lv = lv
        self.uri = uri
        self.polls = 0

    def name(self) -> str:
        return self.lv.name

    def UUIDString(self) -> str:
        return self.lv.uuid

    def isActive(self) -> bool:
        return self.lv.uri == self.uri

    def XMLDesc(self, _flags: int) -> str:
        nics = "".join(
            f"<interface type='bridge'><mac address='{mac}'/></interface>" for mac in self.lv.macs
        )
        return f"<domain><devices>{nics}</devices></domain>"

    def jobStats(self) -> dict[str, int]:
        self.polls += 1
        return {"memory_total": 3 << 30, "memory_processed": min(3, self.polls) << 30}

    def migrateToURI3(self, uri: str, _params: dict[str, Any], _flags: int) -> None:
        while self.polls < 3:
            time.sleep(0.01)
        if self.lv.fail:
            raise self.lv.libvirtError(self.lv.fail)
        with self.lv.lock:
            self.lv.uri = uri

    def abortJob(self) -> None:
        raise self.lv.libvirtError("no job")


class _Conn:
    def __init__(self, lv: StandInLibvirt, uri: str) -> None:
        self.lv = lv
        self.uri = uri

    def getHostname(self) -> str:
        return self.uri.split("/")[2]

    def lookupByName(self, name: str) -> _Domain:
        if name != self.lv.name or self.lv.uri != self.uri:
            raise self.lv.libvirtError(f"Domain not found: no domain with name '{name}'")
        return _Domain(self.lv, self.uri)

    def lookupByUUIDString(self, uuid: str) -> _Domain:
        if uuid != self.lv.uuid or self.lv.uri != self.uri:
            raise self.lv.libvirtError("Domain not found")
        return _Domain(self.lv, self.uri)

    def close(self) -> None:
        pass
