"""Real libvirt hosts inside the lab's host namespaces, and a real guest that
live-migrates between them on the lab's NVEs.

One lab per module (the demo topology from lab_site, no orchestrator): a
libvirtd on h1 and on h2, and a tiny TCG guest booted once on h1 whose NIC
is a tap on br-100. The guest is registered in the directory at h1 but not
plugged: the NVE agents' local learning (EVPN-style MAC mobility) moves it,
from the RARPs QEMU sends after each incoming migration. (A plugged MAC is
pinned to its port: the agent would not report it coming back to h1.)

The figures measured on the way (boot time, migration wall time, libvirt's
downtime, RARP timing, echo-probe loss) are printed at the end (pytest -s).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import json
import os
import re
import secrets
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import Any

import libvirt
import libvirt_qemu
import pytest
from oslo_config import cfg

from vmm_lab.libvirt import guest as guest_mod
from vmm_lab.libvirt.domain import GuestSpec, domain_xml
from vmm_lab.libvirt.hosts import LibvirtHost
from vmm_lab.libvirt.migrate import (
    MigrationFailed,
    MigrationRecord,
    RarpWatch,
    abort,
    domain_state,
    kill_qemu,
    migrate,
    qemu_pid,
    wait_job_running,
)
from vmm_lab.linux import probe
from vmm_lab.linux.demo import LabSite, lab_site
from vmm_lab.linux.topology import in_ns, lab_namespaces, new_prefix
from vmm_orchestrator.options import new_conf

pytestmark = pytest.mark.functional

VNI = 100
IPV4, IPV6 = "198.19.100.50", "fd00:100::50"
GUEST = GuestSpec(
    name=f"lg{secrets.token_hex(2)}",  # unique per run: leftovers are told apart
    mac="52:54:00:00:64:32",
    bridge=f"br-{VNI}",
    ipv4=f"{IPV4}/24",
    ipv6=f"{IPV6}/64",
)
BOOT_TIMEOUT_S = 60.0
CONVERGE_TIMEOUT_S = 5.0
PROBE_RATE = 250
WARMUP_S = 0.5  # probe traffic before the migration starts
OBSERVE_S = 1.5  # and after it ended
FIGURES: dict[str, Any] = {}


@dataclasses.dataclass
class GuestLab:
    site: LabSite
    hosts: dict[str, LibvirtHost]
    where: str = "h1"

    def netns(self, vm: str) -> str:
        return self.site.lab.vms[vm].netns

    def host_netns(self, host: str) -> str:
        return self.site.lab.hosts[host].netns


def _conf() -> cfg.ConfigOpts:
    """The lab defaults with short timers (as conftest's lab_conf, module-scoped)."""

    conf = new_conf()
    conf.set_override("watch_timeout", 1.0, group="nve_agent")
    return conf


def ping(netns: str, dst: str, count: int = 3) -> int:
    out = in_ns(netns, "ping", "-c", str(count), "-i", "0.05", "-W", "1", dst, check=False)
    found = re.search(r"(\d+) received", out)
    return int(found.group(1)) if found else 0


def wait_ping(netns: str, dst: str, timeout: float = CONVERGE_TIMEOUT_S) -> float:
    """Seconds until ``dst`` answered a ping from ``netns``."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if ping(netns, dst, count=1):
            return time.monotonic() - start
    raise AssertionError(f"{dst} did not answer a ping from {netns} within {timeout} s")


def wait_console(host: LibvirtHost, mark: str, timeout: float) -> float:
    path = host.path(GUEST.console_log)
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        with contextlib.suppress(OSError), open(path, errors="replace") as fh:
            if mark in fh.read():
                return time.monotonic() - start
        time.sleep(0.05)
    with contextlib.suppress(OSError), open(path, errors="replace") as fh:
        tail = fh.read()[-2000:]
    raise AssertionError(f"guest not ready after {timeout} s; console:\n{tail}")


def agent_ping(host: LibvirtHost, timeout: float = 10.0) -> None:
    """guest-ping through libvirt: proves qemu-ga runs on the virtio port."""
    conn = libvirt.open(host.uri)
    try:
        dom = conn.lookupByName(GUEST.name)
        deadline = time.monotonic() + timeout
        while True:
            try:
                reply = libvirt_qemu.qemuAgentCommand(dom, '{"execute":"guest-ping"}', 2, 0)
                assert json.loads(reply) == {"return": {}}
                return
            except libvirt.libvirtError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
    finally:
        conn.close()


def leftovers(prefix: str, workdir: str) -> list[str]:
    """Namespaces, files, mounts and processes of this run that still exist."""
    found = [f"namespace {ns}" for ns in lab_namespaces(prefix)]
    if os.path.exists(workdir):
        found.append(f"directory {workdir}")
    with open("/proc/self/mounts", encoding="utf-8") as fh:
        found += [f"mount {line.split()[1]}" for line in fh if workdir in line]
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                cmd = fh.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # gone meanwhile
            continue
        if workdir in cmd or f"guest={GUEST.name}," in cmd:
            found.append(f"process {pid}: {cmd[:120]}")
    return found


@pytest.fixture(scope="module")
def glab() -> Iterator[GuestLab]:
    prefix = new_prefix()
    workdir = tempfile.mkdtemp(prefix=f"{prefix}-libvirt-")
    hosts: dict[str, LibvirtHost] = {}
    started = time.monotonic()
    try:
        with lab_site(_conf(), prefix, orchestrated=False) as site:
            try:
                image = guest_mod.build_guest()
                for name in ("h1", "h2"):
                    lab_host = site.lab.hosts[name]
                    hosts[name] = LibvirtHost(name, lab_host.netns, lab_host.vtep, workdir)
                with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
                    list(pool.map(LibvirtHost.start, hosts.values()))
                site.client().add_endpoint(VNI, GUEST.mac, [IPV4], [IPV6], "h1")
                conn = libvirt.open(hosts["h1"].uri)
                try:
                    boot = time.monotonic()
                    conn.defineXML(domain_xml(GUEST, image)).create()
                finally:
                    conn.close()
                wait_console(hosts["h1"], guest_mod.READY_MARK, BOOT_TIMEOUT_S)
                FIGURES["boot_to_ready_s"] = round(time.monotonic() - boot, 2)
                for addr in (IPV4, IPV6):
                    wait_ping(site.lab.vms["vm2"].netns, addr, timeout=10)
                FIGURES["boot_to_ping_s"] = round(time.monotonic() - boot, 2)
                FIGURES["setup_s"] = round(time.monotonic() - started, 2)
                yield GuestLab(site, hosts)
            finally:
                for host in hosts.values():
                    host.stop()
                shutil.rmtree(workdir, ignore_errors=True)
    finally:
        FIGURES["module_s"] = round(time.monotonic() - started, 2)
        print("\nlibvirt lab figures:", json.dumps(FIGURES, indent=1))
    left = leftovers(prefix, workdir)
    assert not left, left


def test_guest_answers_on_the_vn_and_its_agent_runs(glab: GuestLab) -> None:
    assert domain_state(glab.hosts["h1"], GUEST.name) == libvirt.VIR_DOMAIN_RUNNING
    for peer in ("vm2", "vm3", "gw"):  # on h3, on h1 (same bridge), on h3
        assert ping(glab.netns(peer), IPV4) == 3, peer
        assert ping(glab.netns(peer), IPV6) == 3, peer
    agent_ping(glab.hosts["h1"])
    tap = in_ns(glab.host_netns("h1"), "ip", "-j", "link", "show", GUEST.tap)
    assert json.loads(tap)[0]["master"] == f"br-{VNI}"


def _migrate(
    glab: GuestLab, dst: str, probers: tuple[str, ...] = ()
) -> tuple[MigrationRecord, dict[str, probe.StreamReport]]:
    """Migrate the guest to ``dst`` while ``probers`` echo-probe it; record the figures."""
    src = glab.where
    rarp = RarpWatch(glab.host_netns(dst), GUEST.mac, GUEST.tap)
    start_at = probe.now_ns() + 100_000_000
    stop = threading.Event()
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, 2 * len(probers))) as pool:
        streams = {
            f"{peer}-{family}": pool.submit(
                guest_mod.echo_probes,
                glab.netns(peer),
                addr,
                PROBE_RATE,
                60.0,  # at most; stopped OBSERVE_S after the migration
                f"{peer}-{family}",
                start_at_ns=start_at,
                should_stop=stop.is_set,
            )
            for peer in probers
            for family, addr in (("v4", IPV4), ("v6", IPV6))
        }
        try:
            if probers:
                time.sleep(WARMUP_S + 0.1)
            record = migrate(GUEST.name, glab.hosts[src], glab.hosts[dst])
        finally:
            time.sleep(OBSERVE_S)  # also covers QEMU's five RARPs (0.8 s)
            stop.set()
            rarp_times = rarp.close()
        logs = {name: f.result(timeout=30) for name, f in streams.items()}
    glab.where = dst
    assert record.paused_at is not None and record.resumed_at is not None, record.events
    window = int(record.paused_at * 1e9), int(record.resumed_at * 1e9)
    reports = {
        name: probe.analyze(sent, recv.records, *window) for name, (sent, recv) in logs.items()
    }
    assert len(rarp_times) == 5, f"QEMU announces 5 times; seen on {dst}: {rarp_times}"
    took_over = int(rarp_times[0] * 1e9)  # the destination on the wire
    strict = {
        name: probe.analyze(sent, recv.records, min(window[0], took_over), took_over)
        for name, (sent, recv) in logs.items()
    }
    FIGURES[f"migration_{src}_to_{dst}" + ("_under_probes" if probers else "")] = {
        "wall_ms": round(record.wall_ms, 1),
        "libvirt_downtime_ms": record.downtime_ms,
        "libvirt_time_elapsed_ms": record.stats.get("time_elapsed"),
        "events_ms_after_call": [
            f"{e.host} {e.event}/{e.detail} {(e.at - record.started_at) * 1000:.0f}"
            for e in record.events
        ],
        "suspended_to_resumed_event_ms": round((record.resumed_at - record.paused_at) * 1000, 1),
        "rarp_ms_after_resumed_event": [
            round((t - record.resumed_at) * 1000, 1) for t in rarp_times
        ],
        "echo_probes": {
            name: (
                f"sent {r.sent} lost_while_paused {r.lost_while_paused} "
                f"lost_after_resume {r.lost_after_resume} black_hole_ms {r.black_hole_ms:.1f}"
                f"{'' if r.converged else ' NOT converged'}; window ending at the first "
                f"RARP: lost_after_resume {strict[name].lost_after_resume}"
            )
            for name, r in reports.items()
        },
    }
    return record, reports


def _assert_runs_only_on(glab: GuestLab, host: str, other: str) -> None:
    assert domain_state(glab.hosts[host], GUEST.name) == libvirt.VIR_DOMAIN_RUNNING
    assert domain_state(glab.hosts[other], GUEST.name) is None  # undefined at the source
    links = json.loads(in_ns(glab.host_netns(host), "ip", "-j", "link", "show"))
    assert GUEST.tap in {link["ifname"] for link in links}
    links = json.loads(in_ns(glab.host_netns(other), "ip", "-j", "link", "show"))
    assert GUEST.tap not in {link["ifname"] for link in links}


# The peer that shares each host's bridge with the guest.
LOCAL_PEER = {"h1": "vm3", "h2": "vm4"}
PEERS = ("vm2", "vm3", "vm4", "gw")  # on h3, h1, h2, h3


def test_live_migration_there_and_back(glab: GuestLab) -> None:
    for dst, probers in (("h2", ("vm2", "vm4")), ("h1", ())):
        src = glab.where
        record, reports = _migrate(glab, dst, probers)
        _assert_runs_only_on(glab, dst, src)
        assert record.downtime_ms is not None and record.downtime_ms > 0, record.stats
        order = [(e.host, e.event, e.detail) for e in record.events]
        assert order[0] == (dst, "STARTED", "MIGRATED"), order
        assert order.index((src, "SUSPENDED", "MIGRATED")) < order.index(
            (dst, "RESUMED", "MIGRATED")
        ), order
        assert (src, "STOPPED", "MIGRATED") in order, order
        for report in reports.values():
            assert report.sent > 0.8 * PROBE_RATE * (WARMUP_S + OBSERVE_S), report
            assert report.converged, report  # the path to the guest came back
        # No orchestrator: the destination NVE learned the MAC from QEMU's RARP
        # and reported the move; every NVE follows the directory.
        endpoint = glab.site.client().get_endpoint(VNI, GUEST.mac)
        assert endpoint["nve"] == dst, endpoint
        for peer in PEERS:
            wait_ping(glab.netns(peer), IPV4)
            wait_ping(glab.netns(peer), IPV6)
        agent_ping(glab.hosts[dst])


def _slow_migration_fails(glab: GuestLab, break_it: Any) -> MigrationFailed:
    """Start a 1 MiB/s migration away from the guest's host, call ``break_it(src, dst)``
    once it is under way, and return the failure."""
    src, dst = glab.hosts[glab.where], glab.hosts["h2" if glab.where == "h1" else "h1"]
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        future = pool.submit(migrate, GUEST.name, src, dst, bandwidth_mib_s=1, timeout=30)
        wait_job_running(src, GUEST.name, min_bytes=256 * 1024)
        break_it(src, dst)
        with pytest.raises(MigrationFailed) as failed:
            future.result(timeout=30)
    record = failed.value.record
    assert record.event_at(dst.name, "STARTED", "MIGRATED") is not None, record.events
    assert record.event_at(dst.name, "STOPPED", "FAILED") is not None, record.events
    assert domain_state(src, GUEST.name) == libvirt.VIR_DOMAIN_RUNNING
    assert domain_state(dst, GUEST.name) is None
    assert qemu_pid(dst, GUEST.name) is None
    assert ping(glab.netns(LOCAL_PEER[src.name]), IPV4) == 3
    agent_ping(src)
    return failed.value


def test_domjobabort_during_slow_migration_keeps_the_source_running(glab: GuestLab) -> None:
    failure = _slow_migration_fails(glab, lambda src, dst: abort(src, GUEST.name))
    assert "cancel" in str(failure).lower(), failure
    FIGURES["abort_error"] = failure.record.error


def test_killed_destination_qemu_keeps_the_source_running(glab: GuestLab) -> None:
    killed: list[int] = []
    failure = _slow_migration_fails(
        glab, lambda src, dst: killed.append(kill_qemu(dst, GUEST.name))
    )
    assert killed
    FIGURES["kill_destination_error"] = failure.record.error
