"""The Linux NVE keeps nothing per migration: incoming migrations (expect, the
port joins the bridge, plug), then the VM leaving (unplug, port gone), over
and over, leave its device cache and its netlink handles as they were.

Before: every hold's two devices (named once per hold) and every guest port
stayed in the NVE's ifindex cache, and each netlink lookup left the kernel's
ACK in the handle's unread queue (vmm_kernel.netns.drop_unclaimed); the
soak's RSS grew about 40 KB per migration (benchmarks/soak.py).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest

from vmm_linux.nve import LinuxNve

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (namespaces, tc)")

MAC = "52:54:00:00:64:0b"
VNI = 100


def _sh(ns: str, script: str) -> None:
    subprocess.run(["ip", "netns", "exec", ns, "sh", "-ec", script], check=True)


@contextlib.contextmanager
def _host() -> Iterator[tuple[str, LinuxNve]]:
    ns = f"vmmgrow{os.getpid() % 10000}{secrets.token_hex(2)}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    nve = None
    try:
        _sh(ns, "ip link set lo up; ip addr add 127.0.0.2/8 dev lo")
        nve = LinuxNve(ns, "127.0.0.2")
        nve.ensure_vn(VNI)
        yield ns, nve
    finally:
        if nve is not None:
            nve.close()
        subprocess.run(["ip", "netns", "del", ns], check=False)


def _unread(nve: LinuxNve) -> int:
    """Messages waiting in the worker's netlink handle that no request reads
    (pyroute2 keeps its queues per thread: asked on the worker)."""
    ipr: Any = nve._ipr
    return int(nve._on_worker(lambda: ipr.asyncore.msg_queue.root.qsize()))


def _migrate_in_and_out(ns: str, nve: LinuxNve, port: str) -> None:
    nve.expect(VNI, MAC, port)
    _sh(
        ns,
        f"ip link add {port} type veth peer name {port}p; ip link set {port} up;"
        f" ip link set {port} master br-{VNI}",
    )
    nve.plug(VNI, MAC, port)
    nve.unplug(VNI, MAC)
    _sh(ns, f"ip link del {port}")


def test_migrations_leave_no_cached_device_and_no_unread_message() -> None:
    with _host() as (ns, nve):
        _migrate_in_and_out(ns, nve, "tap-g0")  # the first one builds what stays
        cached, unread = set(nve._ifindex), _unread(nve)
        for i in range(1, 6):  # a new port name each time, as libvirt's vnetN
            _migrate_in_and_out(ns, nve, f"tap-g{i}")
        time.sleep(0.5)  # the hold watcher's poll and the spare builders
        assert set(nve._ifindex) == cached
        assert not any(name.startswith(("vmh", "tap-g")) for name in nve._ifindex)
        assert _unread(nve) == unread == 0
