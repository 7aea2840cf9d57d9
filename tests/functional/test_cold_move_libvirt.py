"""Cold mobility on real libvirt (issue 14 item 5, draft-ietf-nvo3-vmm section 7).

The lab's diskless TCG guest runs on h1 under the in-process HostAgents. An
operator shuts it down there and starts the same definition on h2
(``virsh destroy`` + ``undefine`` on h1, ``define`` + ``start`` on h2: no
migration job at all). h2's agent sees STARTED/BOOTED while the directory
still places the guest's MAC at h1 and nothing is pending: it moves the
endpoint as one planned move (sequence + 1), pins the MAC to the new tap and
announces it. The guest keeps its addresses (its kernel command line holds
them; the directory holds the same), every peer NVE points at h2, a peer on
h3 reaches the guest over IPv4 and IPv6, and no state was imported.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest

libvirt = pytest.importorskip("libvirt", reason="libvirt-python is not installed")

from vmm_lab.libvirt import site as lv_site  # noqa: E402
from vmm_lab.libvirt.migrate import domain_state  # noqa: E402
from vmm_lab.linux.topology import lab_namespaces, new_prefix  # noqa: E402
from vmm_libvirt import options as lv_options  # noqa: E402
from vmm_linux.nve import vxlan_name  # noqa: E402
from vmm_orchestrator import options  # noqa: E402

pytestmark = pytest.mark.functional


@pytest.fixture
def ls() -> Iterator[lv_site.LibvirtSite]:
    problem = lv_site.platform_problem()
    if problem:
        pytest.skip(problem)
    conf = lv_site.lab_conf(orchestrated=True)
    # The site sets [host:<name>] uri before the root reads [agent] hosts: the
    # per-host groups (every plugin's) follow the hosts set here.
    conf.set_override("hosts", ["h1", "h2", "h3"], group=lv_options.AGENT_GROUP)
    options.register_hosts(conf)
    prefix = new_prefix()
    workdir = ""
    with lv_site.libvirt_site(conf, prefix, orchestrated=True) as site:
        workdir = site.workdir
        yield site
    assert not lab_namespaces(prefix)
    assert not (workdir and os.path.exists(workdir))


def test_a_guest_shut_down_on_h1_and_started_on_h2_keeps_its_addresses(
    ls: lv_site.LibvirtSite,
) -> None:
    client = ls.client()
    before = client.get_endpoint(ls.vni, ls.guest.mac)
    assert before["nve"] == "h1"
    assert domain_state(ls.hosts["h1"], ls.guest.name) == libvirt.VIR_DOMAIN_RUNNING

    # Shut down on h1: the definition goes with the operator (no migration job).
    conn = libvirt.open(ls.hosts["h1"].uri)
    try:
        dom = conn.lookupByName(ls.guest.name)
        xml = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
        dom.destroy()
        dom.undefine()
    finally:
        conn.close()
    time.sleep(0.5)
    assert client.get_endpoint(ls.vni, ls.guest.mac)["nve"] == "h1"  # nothing moved yet

    # Started on h2.
    conn = libvirt.open(ls.hosts["h2"].uri)
    try:
        started = time.monotonic()
        conn.defineXML(xml).create()
    finally:
        conn.close()
    ls.where = "h2"
    agent = ls.agents["h2"]
    deadline = time.monotonic() + 20
    while not agent.cold_moves and time.monotonic() < deadline:
        time.sleep(0.05)
    assert agent.cold_moves, "h2's agent never moved the guest"
    moved_s = time.monotonic() - started
    record = agent.cold_moves[-1]
    assert [m["mac"] for m in record["moved"]] == [ls.guest.mac], record
    assert record["moved"][0]["from"] == "h1"
    assert record["state_imported"] is False

    after = client.get_endpoint(ls.vni, ls.guest.mac)
    assert (after["nve"], after["state"], after["seq"]) == ("h2", "active", before["seq"] + 1)
    assert after["last_migration_id"] == record["migration_id"]
    assert after["last_migration_id"].startswith("cold-")
    assert after["moves"][-1]["planned"] is True
    assert (after["ipv4"], after["ipv6"]) == (before["ipv4"], before["ipv6"])

    # Peers converge: every other NVE tunnels the MAC to h2; h2 pins it to the new tap.
    h2_vtep = ls.lab_site.lab.hosts["h2"].vtep
    deadline = time.monotonic() + 10
    for name in ("h1", "h3"):
        nve = ls.lab_site.hosts[name].nve
        while nve.vxlan_dst(ls.vni, ls.guest.mac) != h2_vtep and time.monotonic() < deadline:
            time.sleep(0.05)
        assert nve.vxlan_dst(ls.vni, ls.guest.mac) == h2_vtep, name
        assert nve.master_port(ls.vni, ls.guest.mac) == vxlan_name(ls.vni), name
    assert ls.lab_site.hosts["h2"].nve.master_port(ls.vni, ls.guest.mac) == ls.guest.tap

    # The guest boots at h2 with the same addresses and a peer on h3 reaches it.
    lv_site.wait_console(ls.hosts["h2"], ls.guest)
    peer = ls.lab_site.lab.vms["vm2"].netns
    for addr in (ls.ipv4, ls.ipv6):
        lv_site.wait_ping(peer, addr)
    print(f"\ncold move: directory moved {moved_s:.2f} s after the start on h2")
