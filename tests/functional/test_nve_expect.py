"""An incoming VM's MAC expected on a local port, on real kernels (netns).

Two NVE hosts: ``ha`` runs the VM ("vmold" on tap-vmold) and a far peer;
``hb`` is the destination, with two local peers and, once created, the VM's
new port (tap-vm, to namespace "vmnew", which sends nothing by itself). While
``hb`` expects the VM's MAC on tap-vm:

* frames from hb's local peers reach the VM at ha over VXLAN, exactly once,
  and neither tap-vm (even once it exists) nor the other local peer;
* frames that reach hb over VXLAN (ha's in-flight tunnel) reach tap-vm only;

after the pin everything reaches tap-vm; a revert gives the MAC back to ha.
"""

from __future__ import annotations

import errno
import os
import secrets
import socket
import subprocess
import time
from collections.abc import Iterator

import pytest
from pyroute2 import NetlinkError

from vmm_lab.linux.topology import Lab, in_ns, lab_run
from vmm_linux.netns import socket_in
from vmm_linux.nve import LinuxNve, expected_set, inflight_name, pair_set, vxlan_name

pytestmark = pytest.mark.functional

VNI = 100
ETHERTYPE = 0x88B5  # local experimental: nothing else on the wires uses it
FRAMES = 20
SETTLE_S = 0.3  # after the awaited copies arrived: time for strays to show up


def wait_for(predicate, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return bool(predicate())


def mac_bytes(mac: str) -> bytes:
    return bytes.fromhex(mac.replace(":", ""))


class Receiver:
    """Frames of our ethertype that reach one VM namespace's eth0."""

    def __init__(self, ns: str) -> None:
        self.sock = socket_in(ns, socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETHERTYPE))
        self.sock.bind(("eth0", 0))
        self.sock.setblocking(False)
        self.tags: list[bytes] = []

    def count(self, tag: bytes) -> int:
        while True:
            try:
                frame = self.sock.recv(2048)
            except BlockingIOError:
                break
            self.tags.append(frame[14:30])
        return self.tags.count(tag)

    def close(self) -> None:
        self.sock.close()


def send(ns: str, dst: str, tag: bytes, src: str | None = None, count: int = FRAMES) -> None:
    """``count`` frames to ``dst`` from ``ns``'s eth0 (source: eth0's MAC unless ``src``)."""
    sock = socket_in(ns, socket.AF_PACKET, socket.SOCK_RAW, 0)
    try:
        sock.bind(("eth0", 0))
        source = mac_bytes(src) if src else sock.getsockname()[4][:6]
        frame = mac_bytes(dst) + source + ETHERTYPE.to_bytes(2, "big") + tag + bytes(30)
        for _ in range(count):
            sock.send(frame)
    finally:
        sock.close()


class Site:
    def __init__(self, lab: Lab, nves: dict[str, LinuxNve]) -> None:
        self.lab = lab
        self.nves = nves
        self.rx: dict[str, Receiver] = {}
        self.vm_mac = lab.vms["vmold"].mac

    def listen(self, name: str, ns: str | None = None) -> None:
        self.rx[name] = Receiver(ns or self.lab.vms[name].netns)

    def add_new_port(self) -> None:
        """The destination's tap appears (libvirt creates it after PREPARE)."""
        hb, ns = self.lab.hosts["hb"].netns, f"{self.lab.prefix}-vmnew"
        subprocess.run(["ip", "netns", "add", ns], check=True)
        in_ns(ns, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1")
        in_ns(ns, "sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1")
        in_ns(
            hb, "ip", "link", "add", "tap-vm", "type", "veth", "peer", "name", "eth0", "netns", ns
        )
        in_ns(hb, "sysctl", "-qw", "net.ipv6.conf.tap-vm.disable_ipv6=1")
        in_ns(ns, "ip", "link", "set", "eth0", "mtu", "1450", "up")
        in_ns(hb, "ip", "link", "set", "tap-vm", "master", f"br-{VNI}", "mtu", "1450", "up")
        assert wait_for(
            lambda: '"operstate":"UP"' in in_ns(hb, "ip", "-j", "link", "show", "tap-vm")
        )
        self.listen("vmnew", ns)

    def deliveries(self, sender: str, expect_at: str, src: str | None = None) -> dict[str, int]:
        """Send from ``sender`` to the VM's MAC; wait for ``expect_at``; count everywhere."""
        tag = secrets.token_bytes(16)
        send(self.lab.vms[sender].netns, self.vm_mac, tag, src=src)
        wait_for(lambda: self.rx[expect_at].count(tag) >= FRAMES)
        time.sleep(SETTLE_S)
        return {name: rx.count(tag) for name, rx in self.rx.items()}

    def expectations(self) -> set[tuple[str, str]]:
        return self.nves["hb"].expectations(VNI)


@pytest.fixture
def site(prefix) -> Iterator[Site]:
    nves: dict[str, LinuxNve] = {}
    with lab_run(prefix, VNI) as lab:
        rx: list[Receiver] = []
        try:
            lab.build_underlay()
            for name in ("ha", "hb"):
                host = lab.add_host(name)
                nves[name] = LinuxNve(host.netns, host.vtep)
                nves[name].ensure_vn(VNI)
            vteps = [h.vtep for h in lab.hosts.values()]
            for nve in nves.values():
                nve.set_flood_list(VNI, vteps)
            for name, host in (("vmold", "ha"), ("far", "ha"), ("peer", "hb"), ("other", "hb")):
                lab.add_vm(name, host)
            s = Site(lab, nves)
            for name, vm in lab.vms.items():
                here, there = ("ha", "hb") if vm.host == "ha" else ("hb", "ha")
                nves[here].plug(VNI, vm.mac, vm.port)
                nves[there].set_remote(VNI, vm.mac, lab.hosts[here].vtep)
                s.listen(name)
            rx = list(s.rx.values())
            yield s
            rx = list(s.rx.values())
        finally:
            for r in rx:
                r.close()
            for nve in nves.values():
                nve.close()


def test_expected_mac_is_served_where_the_vm_runs_and_fed_by_the_tunnel(site: Site) -> None:
    hb = site.nves["hb"]
    mac = site.vm_mac
    hb.expect(VNI, mac, "tap-vm")  # PREPARE: the port does not exist yet
    assert site.expectations() == {(mac, "tap-vm")}
    assert hb.expected(VNI, mac) and hb.local_port(VNI, mac) == "tap-vm"
    assert hb.master_port(VNI, mac) is None  # flooded, and the filter picks the copies
    got = site.deliveries("peer", expect_at="vmold")
    assert got == {"vmold": FRAMES, "far": 0, "peer": 0, "other": 0}, got

    site.add_new_port()  # libvirt creates the tap; the guest does not run here yet
    got = site.deliveries("peer", expect_at="vmold")
    assert got == {"vmold": FRAMES, "far": 0, "peer": 0, "other": 0, "vmnew": 0}, got

    # The source pauses the VM and re-tunnels its frames to hb (in-flight).
    site.nves["ha"].start_inflight(VNI, mac, site.lab.hosts["hb"].vtep)
    got = site.deliveries("far", expect_at="vmnew")
    assert got == {"vmold": 0, "far": 0, "peer": 0, "other": 0, "vmnew": FRAMES}, got
    # hb's own peers: over VXLAN to ha, which tunnels them back, to tap-vm only
    got = site.deliveries("peer", expect_at="vmnew")
    assert got == {"vmold": 0, "far": 0, "peer": 0, "other": 0, "vmnew": FRAMES}, got
    assert site.expectations() == {(mac, "tap-vm")}

    hb.plug(VNI, mac, "tap-vm")  # RESUMED: pin
    assert site.expectations() == set() and not hb.expected(VNI, mac)
    assert hb.master_port(VNI, mac) == "tap-vm"
    for sender in ("peer", "other", "far"):
        got = site.deliveries(sender, expect_at="vmnew")
        want = {name: 0 for name in site.rx} | {"vmnew": FRAMES}
        assert got == want, (sender, got)


def test_the_vms_first_frame_ends_the_expectation_in_the_kernel(site: Site) -> None:
    hb = site.nves["hb"]
    mac = site.vm_mac
    hb.expect(VNI, mac, "tap-vm")
    site.add_new_port()
    site.nves["ha"].start_inflight(VNI, mac, site.lab.hosts["hb"].vtep)
    # The guest resumes on hb: QEMU's RARP from the new port, source = the VM's MAC.
    send(f"{site.lab.prefix}-vmnew", "ff:ff:ff:ff:ff:ff", b"rarp".ljust(16, b"."), src=mac)
    assert wait_for(lambda: site.expectations() == set())
    assert hb.expected(VNI, mac)  # the driver's record ends at the pin
    assert hb.master_port(VNI, mac) == "tap-vm"  # learned
    got = site.deliveries("peer", expect_at="vmnew")
    assert got == {name: 0 for name in site.rx} | {"vmnew": FRAMES}, got
    hb.plug(VNI, mac, "tap-vm")  # the pin after the kernel ended it: no error
    assert site.expectations() == set() and hb.master_port(VNI, mac) == "tap-vm"


def test_revert_gives_the_mac_back_to_where_it_runs(site: Site) -> None:
    hb = site.nves["hb"]
    mac = site.vm_mac
    hb.expect(VNI, mac, "tap-vm")
    site.add_new_port()
    hb.unplug(VNI, mac)  # NvePrepare's revert (ABORTED)
    assert site.expectations() == set() and not hb.expected(VNI, mac)
    assert hb.local_port(VNI, mac) is None
    assert hb.master_port(VNI, mac) == vxlan_name(VNI)
    assert hb.vxlan_dst(VNI, mac) == site.lab.hosts["ha"].vtep
    got = site.deliveries("peer", expect_at="vmold")
    assert got == {name: 0 for name in site.rx} | {"vmold": FRAMES}, got
    hb.unplug(VNI, mac)  # again: idempotent
    hb.expect(VNI, mac, "tap-vm")  # and a new attempt works
    assert site.expectations() == {(mac, "tap-vm")}


def test_remove_vn_removes_the_filter_and_the_last_vn_the_table(site: Site) -> None:
    hb = site.nves["hb"]
    ns = site.lab.hosts["hb"].netns
    hb.ensure_vn(VNI + 1)
    hb.expect(VNI + 1, "52:54:00:00:65:99", "tap-x")

    def listed() -> str:
        return in_ns(ns, "nft", "list", "ruleset")

    assert pair_set(VNI + 1) in listed() and "fwd_101" in listed()
    hb.remove_vn(VNI + 1)
    text = listed()
    assert pair_set(VNI + 1) not in text and "fwd_101" not in text and "pre_101" not in text
    assert expected_set(VNI) in text and "fwd_100" in text
    hb.remove_vn(VNI + 1)  # idempotent
    hb.remove_vn(VNI)
    assert "vmm_nve" not in listed()
    assert os.path.exists(f"/run/netns/{ns}")


def test_a_departing_vm_is_followed_in_the_kernel_from_its_first_frame_elsewhere(
    site: Site,
) -> None:
    """The source watches the paused VM's departure (at the pause, before SWITCHOVER):
    until the VM shows up elsewhere its frames still go to its old port; from its
    first frame at the destination (QEMU's RARP) the source's kernel sends them on."""
    ha, hb = site.nves["ha"], site.nves["hb"]
    mac, old_port = site.vm_mac, site.lab.vms["vmold"].port
    hb.expect(VNI, mac, "tap-vm")
    site.add_new_port()
    ha.watch_departure(VNI, mac, old_port)
    ha.watch_departure(VNI, mac, old_port)  # idempotent (the pause seen twice)
    assert ha.departure_watched(VNI, mac) == old_port
    got = site.deliveries("far", expect_at="vmold")  # paused, still here: nothing moves
    assert got == {name: 0 for name in site.rx} | {"vmold": FRAMES}, got

    # The guest resumes on hb; no SWITCHOVER has run on ha (no in-flight entry).
    send(f"{site.lab.prefix}-vmnew", "ff:ff:ff:ff:ff:ff", b"rarp".ljust(16, b"."), src=mac)
    assert wait_for(lambda: site.expectations() == set())
    assert ha.inflight(VNI, mac) is None
    got = site.deliveries("far", expect_at="vmnew")  # ha's local peer, bridged to the old port
    assert got == {name: 0 for name in site.rx} | {"vmnew": FRAMES}, got

    ha.start_inflight(VNI, mac, site.lab.hosts["hb"].vtep)  # SWITCHOVER, late
    ha.stop_inflight(VNI, mac)  # the hold timer's end: the watch goes with the tunnel
    assert ha.departure_watched(VNI, mac) is None
    table = in_ns(site.lab.hosts["ha"].netns, "nft", "list", "table", "netdev", "vmm_depart")
    assert mac not in table and "out_" not in table, table
    got = site.deliveries("far", expect_at="vmold")  # no diversion left behind
    assert got == {name: 0 for name in site.rx} | {"vmold": FRAMES}, got


class _FollowingLeftovers:
    """Records what the NVE asks of its host's tap leftovers (the real ones, which
    borrow a QEMU's tap, are tests/functional/test_tap_leftovers.py's subject and
    run on the libvirt lab); ``follows`` says whether they know the port's reader."""

    def __init__(self, follows: bool) -> None:
        self.follows = follows
        self.calls: list[tuple[str, ...]] = []

    def follow(self, mac: str, port: str, device: str) -> bool:
        self.calls.append(("follow", mac, port, device))
        return self.follows

    def following(self, port: str) -> bool:
        return self.follows and ("unfollow", port) not in [c[:2] for c in self.calls]

    def unfollow(self, port: str, drain: bool = True, mac: str | None = None) -> None:
        self.calls.append(("unfollow", port, drain))


def test_a_departing_vm_whose_tap_reader_is_known_is_followed_there_not_diverted(
    site: Site,
) -> None:
    """With the tap's reader known, the tap's follow sends the frames on in order
    from the pause; the kernel's diversion would overtake the queued ones."""
    ha = site.nves["ha"]
    mac, old_port = site.vm_mac, site.lab.vms["vmold"].port
    ha.leftovers = _FollowingLeftovers(follows=True)  # type: ignore[assignment]
    ha.watch_departure(VNI, mac, old_port)
    assert ha.leftovers.calls == [  # type: ignore[union-attr]
        ("follow", mac, old_port, inflight_name(VNI))
    ]
    assert ha.departure_watched(VNI, mac) == old_port
    table = in_ns(site.lab.hosts["ha"].netns, "nft", "list", "tables")
    assert "vmm_depart" not in table, table  # no kernel diversion
    ha.stop_inflight(VNI, mac)  # the tunnel's end: what is left goes on
    assert ha.leftovers.calls[-1] == ("unfollow", old_port, True)  # type: ignore[union-attr]
    assert ha.departure_watched(VNI, mac) is None
    ha.watch_departure(VNI, mac, old_port)
    ha.end_departure(VNI, mac)  # the VM resumed here: what went on comes back
    assert ha.leftovers.calls[-1] == ("unfollow", old_port, False)  # type: ignore[union-attr]

    ha.leftovers = _FollowingLeftovers(follows=False)  # type: ignore[assignment]
    ha.watch_departure(VNI, mac, old_port)  # reader unknown: the kernel watches
    assert "vmm_depart" in in_ns(site.lab.hosts["ha"].netns, "nft", "list", "tables")
    ha.unplug(VNI, mac)
    assert ha.departure_watched(VNI, mac) is None


def test_a_restarted_nve_drops_the_departure_watch_a_killed_one_left(site: Site) -> None:
    """This kernel keeps a netdev chain whose device went away and binds it to the next
    device of that name (the tap of a VM that comes back): an agent killed while
    watching a departure must not leave it to its successor."""
    ha, mac, old_port = site.nves["ha"], site.vm_mac, site.lab.vms["vmold"].port
    ns = site.lab.hosts["ha"].netns
    ha.watch_departure(VNI, mac, old_port)
    assert f"out_{old_port.replace('-', '_')}" in in_ns(
        ns, "nft", "list", "table", "netdev", "vmm_depart"
    )
    successor = LinuxNve(ns, site.lab.hosts["ha"].vtep)  # ha's agent, killed and restarted
    try:
        successor.ensure_vn(VNI)
        assert "vmm_depart" not in in_ns(ns, "nft", "list", "tables")
    finally:
        successor.close()
    got = site.deliveries("far", expect_at="vmold")
    assert got == {name: 0 for name in site.rx} | {"vmold": FRAMES}, got


def test_a_port_that_goes_away_while_it_is_pinned_leaves_the_mac_to_the_flood(
    site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The directory's entry reaches the old host as its QEMU ends: the tap is looked
    up, then removed before the bridge entry is written (ENODEV). Met on the libvirt
    lab with a late SWITCHOVER: the entry was skipped, the NVE stayed behind the
    directory."""
    hb, mac = site.nves["hb"], site.vm_mac
    hb.expect(VNI, mac, "tap-vm")
    site.add_new_port()
    hb.plug(VNI, mac, "tap-vm")
    assert hb.master_port(VNI, mac) == "tap-vm"
    ns = site.lab.hosts["hb"].netns
    lookup = hb._lookup

    def lookup_then_remove(name: str) -> int | None:
        found = lookup(name)
        if name == "tap-vm" and found is not None:
            in_ns(ns, "ip", "link", "del", "tap-vm")  # libvirt removes it as QEMU ends
        return found

    monkeypatch.setattr(hb, "_lookup", lookup_then_remove)
    hb.set_remote(VNI, mac, site.lab.hosts["ha"].vtep)  # the VM runs at ha (again)
    assert hb.local_port(VNI, mac) == "tap-vm"  # unpinning is the stages' to say
    assert hb.master_port(VNI, mac) is None  # flooded, as for a port not up yet
    assert hb.vxlan_dst(VNI, mac) == site.lab.hosts["ha"].vtep  # the update went through


def test_a_write_the_kernel_refused_is_made_in_full_when_the_change_comes_again(
    site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    hb, far = site.nves["hb"], site.lab.vms["far"].mac
    old_vtep = site.lab.hosts["ha"].vtep
    assert hb.vxlan_dst(VNI, far) == old_vtep
    write = hb._fdb
    refused: list[str] = []

    def refuse_the_first(cmd: str, **kwargs: object) -> None:
        if not refused:
            refused.append(cmd)
            raise NetlinkError(errno.EBUSY, "refused by the test")
        write(cmd, **kwargs)

    monkeypatch.setattr(hb, "_fdb", refuse_the_first)
    with pytest.raises(NetlinkError):
        hb.set_remote(VNI, far, "192.0.2.77")
    assert hb.vxlan_dst(VNI, far) == old_vtep  # nothing written
    hb.set_remote(VNI, far, "192.0.2.77")  # the agent's repeat
    assert hb.vxlan_dst(VNI, far) == "192.0.2.77"


def test_a_change_refused_part_way_is_undone_by_the_next_change(
    site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The VXLAN entry went to the new VTEP, then the bridge write was refused: the
    kernel sends to the new VTEP while the record still says the old one. When the
    directory says the old VTEP again (an aborted move), the kernel must follow it,
    though the record sees no change."""
    hb, far = site.nves["hb"], site.lab.vms["far"].mac
    old_vtep = site.lab.hosts["ha"].vtep
    write = hb._fdb
    calls: list[str] = []

    def refuse_the_second(cmd: str, **kwargs: object) -> None:
        calls.append(cmd)
        if len(calls) == 2:
            raise NetlinkError(errno.EBUSY, "refused by the test")
        write(cmd, **kwargs)

    monkeypatch.setattr(hb, "_fdb", refuse_the_second)
    with pytest.raises(NetlinkError):
        hb.set_remote(VNI, far, "192.0.2.77")
    assert hb.vxlan_dst(VNI, far) == "192.0.2.77"  # the first write went through
    hb.set_remote(VNI, far, old_vtep)
    assert hb.vxlan_dst(VNI, far) == old_vtep
    assert hb.master_port(VNI, far) == vxlan_name(VNI)
