"""The NVE agent against a real directory and a real kernel NVE."""

from __future__ import annotations

import secrets
import socket
import subprocess
import time
from collections.abc import Iterator

import pytest

from vmm_linux.agent import NveAgent
from vmm_linux.netns import socket_in
from vmm_linux.nve import LinuxNve
from vmm_orchestrator import frames
from vmm_orchestrator.nva.client import NvaClient
from vmm_orchestrator.nva.server import NvaServer
from vmm_orchestrator.nva.store import NvaStore

VNI = 200
MAC = "52:54:00:00:c8:0a"


def wait_for(predicate, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return False


@pytest.fixture
def env(prefix) -> Iterator[dict]:
    """One NVE namespace (h1) with a local port, a directory, three NVEs registered."""
    ns = f"{prefix}-h1"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    token = secrets.token_urlsafe(16)
    store = NvaStore(":memory:")
    server = NvaServer(store, token, "127.0.0.1", 0)
    server.start()
    nve = agent = None
    try:
        admin = NvaClient(server.url, token)
        for nve_id, vtep in (("h1", "198.18.9.1"), ("h2", "198.18.9.2"), ("h3", "198.18.9.3")):
            admin.register_nve(nve_id, vtep, [VNI])
        admin.add_endpoint(VNI, MAC, ["198.19.200.10"], [], "h2")
        nve = LinuxNve(ns, "198.18.9.1")
        agent = NveAgent("h1", nve, NvaClient(server.url, token), [VNI], watch_timeout=0.5)
        agent.start()
        yield {"ns": ns, "nve": nve, "agent": agent, "admin": admin, "store": store}
    finally:
        if agent:
            agent.stop()
        if nve:
            nve.close()
        server.stop()
        subprocess.run(["ip", "netns", "del", ns], check=False)


def test_initial_load_programs_remote_entries_and_flood_list(env):
    nve = env["nve"]
    assert nve.vxlan_dst(VNI, MAC) == "198.18.9.2"
    assert nve.master_port(VNI, MAC) == f"vx-{VNI}"
    fdb = subprocess.run(
        ["bridge", "-n", env["ns"], "fdb", "show", "dev", f"vx-{VNI}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "00:00:00:00:00:00 dst 198.18.9.2" in fdb and "00:00:00:00:00:00 dst 198.18.9.3" in fdb
    neigh = subprocess.run(
        ["ip", "-n", env["ns"], "neigh", "show", "nud", "all", "dev", f"br-{VNI}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "198.19.200.10" in neigh and MAC in neigh


def test_a_move_is_applied_and_acknowledged(env):
    admin, nve = env["admin"], env["nve"]
    moved = admin.move(VNI, MAC, "h3")
    assert wait_for(lambda: nve.vxlan_dst(VNI, MAC) == "198.18.9.3")
    assert wait_for(lambda: admin.get_nve("h1")["acked_revision"] >= moved["revision"])


def test_an_older_sequence_number_is_never_applied(env):
    agent, nve = env["agent"], env["nve"]
    env["admin"].move(VNI, MAC, "h3")
    assert wait_for(lambda: nve.vxlan_dst(VNI, MAC) == "198.18.9.3")
    stale = {"vni": VNI, "mac": MAC, "nve": "h2", "seq": 0, "ipv4": [], "ipv6": []}
    assert agent.apply_endpoint(stale) is False
    assert nve.vxlan_dst(VNI, MAC) == "198.18.9.3"


def test_expire_drops_the_entry_and_looks_the_mac_up_again(env):
    store, nve = env["store"], env["nve"]
    # Change the directory behind the agent's back (no change record), then expire.
    with store._lock:
        store._db.execute("UPDATE endpoints SET nve='h3', seq=seq+1 WHERE mac=?", (MAC,))
    assert nve.vxlan_dst(VNI, MAC) == "198.18.9.2"
    env["admin"].expire(VNI, MAC, ["h1"])
    assert wait_for(lambda: nve.vxlan_dst(VNI, MAC) == "198.18.9.3")


def test_a_mac_seen_on_a_local_port_is_reported_as_a_move(env):
    ns, admin = env["ns"], env["admin"]
    subprocess.run(
        ["ip", "-n", ns, "link", "add", "tap0", "type", "veth", "peer", "name", "vm0"], check=True
    )
    for cmd in (
        ["ip", "-n", ns, "link", "set", "vm0", "address", MAC],  # the port's configured MAC
        ["ip", "-n", ns, "link", "set", "tap0", "master", f"br-{VNI}", "up"],
        ["ip", "-n", ns, "link", "set", "vm0", "up"],
    ):
        subprocess.run(cmd, check=True)

    def oper_up(dev: str) -> bool:
        out = subprocess.run(
            ["ip", "-n", ns, "-j", "link", "show", dev], capture_output=True, text=True, check=True
        ).stdout
        return '"operstate":"UP"' in out.replace(" ", "")

    assert wait_for(lambda: oper_up("tap0") and oper_up("vm0"))
    sock = socket_in(ns, socket.AF_PACKET, socket.SOCK_RAW, 0)
    try:
        sock.bind(("vm0", 0))
        for delay in (0, 0.05, 0.15, 0.25, 0.35):  # QEMU's five RARPs after a migration
            time.sleep(delay)
            sock.send(frames.rarp(MAC))
    finally:
        sock.close()
    moved = wait_for(lambda: admin.get_endpoint(VNI, MAC)["nve"] == "h1")
    fdb = subprocess.run(
        ["bridge", "-n", ns, "fdb", "show", "br", f"br-{VNI}"], capture_output=True, text=True
    ).stdout
    assert moved, f"not reported; bridge fdb:\n{fdb}\nagent errors: {env['agent'].errors}"
    assert admin.get_endpoint(VNI, MAC)["seq"] == 1


def test_the_agent_recovers_after_the_directory_was_reset(env):
    agent, nve, store = env["agent"], env["nve"], env["store"]
    admin = env["admin"]
    moved = admin.move(VNI, MAC, "h3")
    assert wait_for(lambda: agent.revision >= moved["revision"])
    # A directory restarted empty: the agent's revision is now ahead of it.
    with store._lock:
        for table in ("changes", "endpoints"):
            store._db.execute(f"DELETE FROM {table}")
    admin.add_endpoint(VNI, "52:54:00:00:c8:0b", [], [], "h2")
    assert wait_for(lambda: nve.vxlan_dst(VNI, "52:54:00:00:c8:0b") == "198.18.9.2", 10)
