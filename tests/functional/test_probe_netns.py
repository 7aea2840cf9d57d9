"""Probe streams between two real network namespaces (needs root and iproute2).

Checks what the unit tests cannot: the programs run under ``ip netns exec``,
the CLOCK_MONOTONIC stamps written in different namespaces line up with the
times this test measures, and an outage of the link shows up as
``lost_while_paused`` when the pause window is the link's down/up times.
The senders run in the ``peer`` namespace, the receivers in ``vm``.

Every run uses a unique name prefix so parallel runs (and leftovers of a
killed run) never collide; namespaces (and with them the veth pair) and
child processes are removed in the fixture finalizer even when a test fails.
"""

from __future__ import annotations

import json
import os
import secrets
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pytest
from pyroute2 import NetNS
from pyroute2.netlink.rtnl.ndmsg import states as NUD

from vmm_lab.linux import probe

pytestmark = [
    pytest.mark.functional,
    pytest.mark.skipif(
        not hasattr(os, "geteuid") or os.geteuid() != 0 or shutil.which("ip") is None,
        reason="needs root and iproute2 (ip netns)",
    ),
]

RATE = 1000
DURATION = 1.0
PORT = 9000
V4 = ("10.77.0.1", "10.77.0.2")  # (peer, vm); private to these namespaces
V6 = ("fd00:77::1", "fd00:77::2")


def ip(*args: str) -> str:
    """Run ``ip`` and fail loudly with its stderr."""
    res = subprocess.run(["ip", *args], check=False, capture_output=True, text=True, timeout=20)
    if res.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {res.stderr.strip()}")
    return res.stdout


@dataclass
class Lab:
    """Two namespaces joined by a veth: probes go from ``peer`` to ``vm``."""

    prefix: str
    peer: str
    vm: str
    peer_dev: str
    vm_dev: str
    procs: list[subprocess.Popen[str]] = field(default_factory=list)

    def start(self, ns: str, *args: str) -> subprocess.Popen[str]:
        """Start a probe program inside ``ns``; the finalizer kills it if still running."""
        p = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-m", "vmm_lab.linux.probe", *args],
            stdout=subprocess.PIPE,
            text=True,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )
        self.procs.append(p)
        return p


def wait_ready(p: subprocess.Popen[str], timeout: float = 20.0) -> None:
    """Wait for the program's "ready" line (it has bound its socket)."""
    assert p.stdout is not None
    ready, _, _ = select.select([p.stdout], [], [], timeout)
    assert ready, f"no 'ready' from {p.args!r} within {timeout}s"
    line = p.stdout.readline().strip()
    assert line == "ready", f"{p.args!r}: expected 'ready', got {line!r} (rc={p.poll()})"


def mac(ns: str, dev: str) -> str:
    return str(json.loads(ip("-n", ns, "-j", "link", "show", "dev", dev))[0]["address"])


def static_neighbours(lab: Lab) -> None:
    """Permanent ARP/ND entries for the vm's addresses on the sending side.

    Then the vm never has to answer ARP/ND. Right after a link comes back its
    transmit path is re-enabled asynchronously (linkwatch), so on a loaded
    machine a reply can be dropped and the next try is a 1 s retransmit
    timer away: an artefact that would blur the outage we measure.
    """
    vm_mac = mac(lab.vm, lab.vm_dev)
    for addr in (V4[1], V6[1]):
        ip(
            *("-n", lab.peer, "neigh", "replace", addr, "lladdr", vm_mac),
            *("dev", lab.peer_dev, "nud", "permanent"),
        )


@pytest.fixture
def lab() -> Iterator[Lab]:
    prefix = f"vmmp{os.getpid() % 10000}{secrets.token_hex(2)}"
    lab = Lab(prefix, f"{prefix}p", f"{prefix}v", f"{prefix}p", f"{prefix}v")
    created: list[str] = []
    try:
        for ns in (lab.peer, lab.vm):
            try:
                ip("netns", "add", ns)
            except RuntimeError as e:
                pytest.skip(f"cannot create network namespaces here: {e}")
            created.append(ns)
            # Keep the IPv6 addresses across link down/up (the default drops
            # them on admin down, which would turn an outage into a permanent
            # loss of the address rather than a pause).
            for conf in ("all", "default"):
                setting = f"net.ipv6.conf.{conf}.keep_addr_on_down=1"
                subprocess.run(
                    ["ip", "netns", "exec", ns, "sysctl", "-qw", setting],
                    check=True,
                    timeout=20,
                )
            ip("-n", ns, "link", "set", "lo", "up")
        ip(
            *("link", "add", lab.peer_dev, "netns", lab.peer, "type", "veth"),
            *("peer", "name", lab.vm_dev, "netns", lab.vm),
        )
        for ns, dev, i in ((lab.peer, lab.peer_dev, 0), (lab.vm, lab.vm_dev, 1)):
            ip("-n", ns, "addr", "add", f"{V4[i]}/24", "dev", dev)
            ip("-n", ns, "addr", "add", f"{V6[i]}/64", "dev", dev, "nodad")
            ip("-n", ns, "link", "set", dev, "up")
        static_neighbours(lab)
        yield lab
    finally:
        for p in lab.procs:
            if p.poll() is None:
                p.kill()
            p.wait()
            if p.stdout is not None:
                p.stdout.close()
        for ns in created:
            subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True, timeout=20)


def run_streams(
    lab: Lab, out: Path, during: Callable[[int], None] | None = None
) -> dict[str, tuple[probe.SendLog, list[probe.Recv]]]:
    """One IPv4 and one IPv6 stream, peer -> vm, ~1 s at 1000 pps.

    ``during(start_ns)`` runs while the streams flow (after this returns the
    senders have been waited for and the receivers stopped with SIGTERM).
    """
    out.mkdir()
    receivers = {
        fam: lab.start(
            lab.vm,
            *("recv", "--bind", addr[1], "--port", str(PORT), "--out", str(out / f"r{fam}.json")),
        )
        for fam, addr in (("v4", V4), ("v6", V6))
    }
    for p in receivers.values():
        wait_ready(p)
    start = time.clock_gettime(time.CLOCK_MONOTONIC) + 1.0
    senders = {
        fam: lab.start(
            lab.peer,
            *("send", "--dst", addr[1], "--port", str(PORT), "--rate", str(RATE)),
            *("--duration", str(DURATION), "--stream", fam, "--out", str(out / f"s{fam}.json")),
            *("--start-at", f"{start:.6f}"),
        )
        for fam, addr in (("v4", V4), ("v6", V6))
    }
    for p in senders.values():
        wait_ready(p)
    if during is not None:
        during(int(start * 1e9))
    for p in senders.values():
        assert p.wait(DURATION + 20) == 0
    time.sleep(0.2)  # let the last packets land
    for p in receivers.values():
        p.send_signal(signal.SIGTERM)
    for p in receivers.values():
        assert p.wait(20) == 0
    return {
        fam: (
            probe.load_send_log(str(out / f"s{fam}.json")),
            probe.load_recv_log(str(out / f"r{fam}.json")),
        )
        for fam in ("v4", "v6")
    }


def sender_table(runs: dict[str, tuple[probe.SendLog, list[probe.Recv]]], origin: int) -> str:
    """How the senders kept their schedule (times in ms from ``origin``), for failures."""
    rows = [
        {
            "stream": fam,
            "sent": log.sent,
            "errors": len(log.errors),
            "late": log.late,
            "max_lag": log.max_lag_ns / 1e6,
            "reanchored": log.reanchored,
            "first": None if log.first_send_ns is None else (log.first_send_ns - origin) / 1e6,
            "last": None if log.last_send_ns is None else (log.last_send_ns - origin) / 1e6,
            "signal": log.stopped_by_signal,
        }
        for fam, (log, _) in runs.items()
    ]
    return probe.format_table(rows, [(k, k) for k in rows[0]])


def assert_rate_sane(log: probe.SendLog) -> None:
    """About RATE packets per second: a sanity check of the pacing, not a timing test."""
    assert abs(log.sent - RATE * DURATION) <= 0.2 * RATE * DURATION, log.sent
    assert log.first_send_ns is not None and log.last_send_ns is not None
    span = (log.last_send_ns - log.first_send_ns) / 1e9
    assert abs(span - DURATION) <= 0.2 * DURATION, span


def test_streams_arrive_complete(lab: Lab, tmp_path: Path) -> None:
    runs = run_streams(lab, tmp_path / "clean")
    for fam, (sent, received) in runs.items():
        assert_rate_sane(sent)
        assert sent.errors == []
        assert {r.stream for r in received} == {fam}
        assert all(r.recv_ns >= r.send_ns for r in received)  # one clock for all namespaces
        after = sent.send_ns[-1] + 1  # no pause: everything is "before"
        rep = probe.analyze(sent, received, after, after)
        assert (rep.received, rep.lost, rep.duplicates, rep.unexpected) == (sent.sent, 0, 0, 0)


def test_link_outage_counts_as_lost_while_paused(lab: Lab, tmp_path: Path) -> None:
    """Set the link down for ~100 ms mid-stream; the pause window is the down/up times.

    The sending end goes down (``ip link set down`` done over netlink): its
    routes go away at once and come back synchronously on up, so recovery
    does not depend on the kernel's asynchronous carrier handling, which on
    a loaded machine would add a variable tail of post-resume loss. An open
    pyroute2 handle toggles the link in ~2 ms where spawning ``ip`` can take
    hundreds of ms under load, which keeps the window tight.
    """
    marks: dict[str, int] = {}
    nl = NetNS(lab.peer)
    try:
        index = nl.link_lookup(ifname=lab.peer_dev)[0]
        vm_mac = mac(lab.vm, lab.vm_dev)

        def outage(start_ns: int) -> None:
            marks["start"] = start_ns
            time.sleep(max(0.0, (start_ns - probe.now_ns()) / 1e9 + 0.4))
            marks["down_start"] = probe.now_ns()
            nl.link("set", index=index, state="down")
            marks["down_done"] = probe.now_ns()
            time.sleep(0.1)
            marks["up_start"] = probe.now_ns()
            nl.link("set", index=index, state="up")
            for addr in (V4[1], V6[1]):  # admin down flushed them (see static_neighbours)
                nl.neigh("replace", dst=addr, lladdr=vm_mac, ifindex=index, state=NUD["permanent"])
            marks["up_done"] = probe.now_ns()

        runs = run_streams(lab, tmp_path / "outage", outage)
    finally:
        nl.close()
    pause_start, pause_end = marks["down_start"], marks["up_done"]
    reports = {
        fam: probe.analyze(sent, received, pause_start, pause_end)
        for fam, (sent, received) in runs.items()
    }
    # Shown by pytest when an assertion below fails.
    print({k: (v - pause_start) / 1e6 for k, v in marks.items()})
    print(probe.format_table([asdict(r) for r in reports.values()], probe.REPORT_COLUMNS))
    print(sender_table(runs, marks["start"]))
    for fam, (sent, received) in runs.items():
        assert_rate_sane(sent)
        rep = reports[fam]
        # Packets sent while the link was certainly down must all be lost,
        # and be counted as lost while paused.
        certain = [
            sent.first_seq + i
            for i, t in enumerate(sent.send_ns)
            if marks["down_done"] <= t <= marks["up_start"]
        ]
        assert len(certain) >= 50, (fam, len(certain))  # ~100 ms at 1000 pps
        lost = set(probe.lost_seqs(sent, received))
        assert set(certain) <= lost, fam
        assert rep.lost_while_paused >= len(certain), (fam, rep)
        assert rep.lost_before_pause == 0, (fam, rep)
        # sendto() failed (ENETUNREACH) only while the link was down.
        for seq, _ in sent.errors:
            assert pause_start <= sent.send_ns[seq - sent.first_seq] <= pause_end, (fam, seq)
        assert rep.converged, (fam, rep)
        assert rep.duplicates == 0 and rep.unexpected == 0, (fam, rep)
        # Sanity of the window: nothing lost far from it.
        assert rep.lost_after_resume <= 5, (fam, rep)
