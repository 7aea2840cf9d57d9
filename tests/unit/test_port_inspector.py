"""Which MAC a local port is configured for (vmm_linux.agent.PortInspector.configured):
a libvirt tap names its guest's MAC in its own (fe: + the last five octets), a veth
in its peer's. A veth's random MAC starts with fe: once in 64 (CI met one): that
is no libvirt tap, its peer still decides. The peer is looked up over netlink;
a stand-in for that lookup returns it here (the netlink side is
tests/functional/test_nve_agent.py's)."""

from __future__ import annotations

from typing import Any

from vmm_linux.agent import PortInspector

MAC = "52:54:00:00:c8:0a"


class Peers(PortInspector):
    def __init__(self, peer: dict[str, Any] | None) -> None:
        super().__init__(None)
        self.peer = peer

    def link(self, ifindex: int, nsid: int | None = None) -> dict[str, Any] | None:
        return self.peer


def port(address: str, kind: str | None, link: int | None = None) -> dict[str, Any]:
    return {"name": "p0", "address": address, "kind": kind, "link": link, "netnsid": None}


def test_a_veth_whose_own_mac_starts_with_fe_is_judged_by_its_peer() -> None:
    peer = {"address": MAC}
    mine, other = Peers(peer).configured(port("fe:32:82:0e:ec:a2", "veth", link=9), MAC)
    assert mine is not None and other is None
    mine, other = Peers({"address": "52:54:00:00:00:99"}).configured(
        port("fe:32:82:0e:ec:a2", "veth", link=9), MAC
    )
    assert mine is None and other is not None


def test_a_libvirt_tap_names_its_guests_mac() -> None:
    assert Peers(None).configured(port("fe:54:00:00:c8:0a", "tun"), MAC)[0] is not None
    assert Peers(None).configured(port("fe:54:00:00:00:01", "tun"), MAC)[1] is not None
