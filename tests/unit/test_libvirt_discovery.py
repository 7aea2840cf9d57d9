"""Domain XML -> Workload (NICs, VNIs, addresses in the configured source order),
and the Migration each end builds from the directory (a real in-process NvaStore).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest

from vmm_libvirt import discovery, options
from vmm_libvirt.discovery import Discovery, DomainXmlError, VniMap, parse_domain
from vmm_libvirt.resolve import NothingToMove, ResolveError, Resolver
from vmm_orchestrator.errors import ConfigError
from vmm_orchestrator.model import Vif, Workload
from vmm_orchestrator.nva.errors import Unavailable
from vmm_orchestrator.nva.store import NvaStore

UUID = "6c1f5e62-2b0c-4e43-9d7a-0a0b0c0d0e01"
MAC1, MAC2, MAC3 = "52:54:00:aa:00:01", "52:54:00:aa:00:02", "52:54:00:aa:00:03"

XML = f"""
<domain type='qemu' id='3'>
  <name>vm1</name>
  <uuid>{UUID.upper()}</uuid>
  <devices>
    <interface type='bridge'>
      <mac address='52:54:00:AA:00:01'/>
      <source bridge='br-100'/>
      <target dev='tap-vm1'/>
      <model type='virtio'/>
    </interface>
    <interface type='network'>
      <mac address='{MAC2}'/>
      <source network='tenant' bridge='br-int'/>
      <target dev='vnet7'/>
    </interface>
    <interface type='bridge'>
      <mac address='{MAC3}'/>
      <source bridge='virbr0'/>
    </interface>
    <interface type='user'>
      <model type='virtio'/>
    </interface>
  </devices>
</domain>
"""

PATTERN = re.compile(r"^br-(?P<vni>[0-9]+)$")


class FakeDirectory:
    """get_endpoint answers from a dict; (vni, mac) missing -> NotFound; None -> outage."""

    def __init__(self, endpoints: dict[tuple[int, str], dict[str, Any]] | None) -> None:
        self.endpoints = endpoints
        self.asked: list[tuple[int, str]] = []

    def get_endpoint(self, vni: int, mac: str) -> dict[str, Any]:
        from vmm_orchestrator.nva.errors import NotFound

        self.asked.append((vni, mac))
        if self.endpoints is None:
            raise Unavailable("cannot reach the NVA at http://nva: Connection refused")
        try:
            return self.endpoints[(vni, mac)]
        except KeyError:
            raise NotFound(f"no endpoint {mac} in VNI {vni}") from None


class FakeDomain:
    """interfaceAddresses per libvirt source; a source missing raises like libvirt would."""

    def __init__(self, by_source: dict[int, dict[str, Any]]) -> None:
        self.by_source = by_source
        self.asked: list[int] = []

    def interfaceAddresses(self, source: int) -> dict[str, Any]:
        self.asked.append(source)
        if source not in self.by_source:
            raise RuntimeError("Guest agent is not responding: QEMU guest agent is not connected")
        return self.by_source[source]


def agent_view(mac: str, *addrs: str) -> dict[str, Any]:
    return {"eth0": {"hwaddr": mac, "addrs": [{"type": 0, "addr": a, "prefix": 24} for a in addrs]}}


# -- parsing -------------------------------------------------------------------------


def test_parse_domain_reads_identity_and_every_nic_with_a_mac() -> None:
    desc = parse_domain(XML)
    assert (desc.name, desc.uuid) == ("vm1", UUID)
    assert [(n.mac, n.bridge, n.target, n.kind) for n in desc.nics] == [
        (MAC1, "br-100", "tap-vm1", "bridge"),
        (MAC2, "br-int", "vnet7", "network"),
        (MAC3, "virbr0", None, "bridge"),
    ]


@pytest.mark.parametrize(
    ("xml", "message"),
    [
        ("<domain><name>x", "not well-formed"),
        ("<network><name>n</name></network>", "expected a <domain>"),
        ("<domain><name>x</name></domain>", "no <name> or no <uuid>"),
    ],
)
def test_parse_domain_refuses_what_is_not_a_domain(xml: str, message: str) -> None:
    with pytest.raises(DomainXmlError, match=message):
        parse_domain(xml)


def test_vni_map_prefers_the_explicit_map_then_the_pattern() -> None:
    vni_of = VniMap({"br-int": 200, "br-100": 101}, PATTERN)
    assert vni_of("br-int") == 200
    assert vni_of("br-100") == 101  # explicit beats pattern
    assert vni_of("br-42") == 42
    assert vni_of("br-0") is None  # not a VNI
    assert vni_of("br-99999999") is None
    assert vni_of("virbr0") is None
    assert vni_of(None) is None


def test_bridge_options_are_checked() -> None:
    from oslo_config import cfg

    conf = cfg.ConfigOpts()
    conf(args=[], default_config_files=[])
    options.register_opts(conf)
    assert options.bridge_pattern(conf).match("br-7")
    conf.set_override("bridge_vni_pattern", r"^br-(\d+)$", group="libvirt")
    with pytest.raises(ConfigError, match="no named group 'vni'"):
        options.bridge_pattern(conf)
    conf.set_override("bridge_vni_pattern", r"^br-(", group="libvirt")
    with pytest.raises(ConfigError, match="not a regular expression"):
        options.bridge_pattern(conf)
    conf.set_override("bridge_vnis", {"br-int": "x"}, group="libvirt")
    with pytest.raises(ConfigError, match="br-int:x"):
        options.bridge_vnis(conf)
    conf.set_override("bridge_vnis", {"br-int": "300"}, group="libvirt")
    assert options.bridge_vnis(conf) == {"br-int": 300}


# -- workloads and addresses -------------------------------------------------------------


def test_workload_keeps_managed_nics_with_directory_addresses() -> None:
    nva = FakeDirectory(
        {
            (100, MAC1): {"ipv4": ["10.0.0.5"], "ipv6": ["fd00::5"]},
            (200, MAC2): {"ipv4": ["10.1.0.5"], "ipv6": []},
        }
    )
    found = Discovery(VniMap({"br-int": 200}, PATTERN), nva).workload(XML)
    assert found == Workload(
        "vm1",
        (
            Vif(MAC1, 100, ("10.0.0.5",), ("fd00::5",), "tap-vm1"),
            Vif(MAC2, 200, ("10.1.0.5",), (), "vnet7"),
        ),
    )


def test_sources_are_asked_in_order_and_the_first_that_knows_wins() -> None:
    nva = FakeDirectory({(100, MAC1): {"ipv4": [], "ipv6": []}})  # known, no address
    dom = FakeDomain(
        {
            discovery.SRC_AGENT: agent_view(MAC1, "10.0.0.9", "fe80::1", "127.0.0.1"),
            discovery.SRC_LEASE: agent_view(MAC1, "10.0.0.77"),
        }
    )
    disc = Discovery(VniMap({}, PATTERN), nva, ["directory", "agent", "lease"])
    (vif,) = disc.workload(XML, dom).vifs
    assert (vif.ipv4, vif.ipv6) == (("10.0.0.9",), ())  # link-local and loopback dropped
    assert dom.asked == [discovery.SRC_AGENT]  # lease never needed


def test_an_absent_agent_falls_through_to_the_next_source() -> None:
    nva = FakeDirectory({})
    dom = FakeDomain({discovery.SRC_ARP: agent_view(MAC1, "10.0.0.44")})
    disc = Discovery(VniMap({}, PATTERN), nva, ["agent", "directory", "arp"])
    (vif,) = disc.workload(XML, dom).vifs
    assert vif.ipv4 == ("10.0.0.44",)
    assert dom.asked == [discovery.SRC_AGENT, discovery.SRC_ARP]
    assert nva.asked == [(100, MAC1)]


def test_without_a_domain_only_the_directory_is_asked() -> None:
    # The hook path: it must never call back into libvirt.
    nva = FakeDirectory({})
    disc = Discovery(VniMap({}, PATTERN), nva, ["agent", "lease", "arp", "directory"])
    (vif,) = disc.workload(XML).vifs
    assert (vif.ipv4, vif.ipv6) == ((), ())
    assert nva.asked == [(100, MAC1)]


def test_a_directory_outage_is_not_fatal(caplog: pytest.LogCaptureFixture) -> None:
    dom = FakeDomain({discovery.SRC_AGENT: agent_view(MAC1, "10.0.0.9")})
    disc = Discovery(VniMap({}, PATTERN), FakeDirectory(None), ["directory", "agent"])
    (vif,) = disc.workload(XML, dom).vifs
    assert vif.ipv4 == ("10.0.0.9",)
    assert "directory lookup of 52:54:00:aa:00:01 failed" in caplog.text


def test_unknown_sources_are_refused() -> None:
    with pytest.raises(ValueError, match="dhcp"):
        Discovery(VniMap({}, None), FakeDirectory({}), ["directory", "dhcp"])


def test_libvirt_addresses_groups_by_mac() -> None:
    dom = FakeDomain(
        {
            discovery.SRC_AGENT: {
                "lo": {"hwaddr": "00:00:00:00:00:00", "addrs": [{"addr": "127.0.0.1"}]},
                "eth0": {"hwaddr": MAC1.upper(), "addrs": [{"addr": "10.0.0.9"}]},
                "eth0.5": {"hwaddr": MAC1, "addrs": [{"addr": "10.5.0.9"}]},
                "weird": {"hwaddr": None, "addrs": []},
            }
        }
    )
    found = discovery.libvirt_addresses(dom, discovery.SRC_AGENT)
    assert found[MAC1] == ["10.0.0.9", "10.5.0.9"]


# -- resolving migrations from the directory -----------------------------------------------


@pytest.fixture
def store() -> Iterator[NvaStore]:
    nva = NvaStore(":memory:")
    for name, vtep in (("a", "192.0.2.1"), ("b", "192.0.2.2"), ("c", "192.0.2.3")):
        nva.register_nve(name, vtep, [100])
    nva.add_endpoint(100, MAC1, ["10.0.0.5"], [], "a")
    yield nva
    nva.close()


VM = Workload("vm1", (Vif(MAC1, 100, ("10.0.0.5",), (), "tap-vm1"),))


def test_the_destination_chooses_the_id_and_learns_the_source(store: NvaStore) -> None:
    migration = Resolver(store, "b", clock=lambda: 123).for_destination(UUID, VM)
    assert (migration.id, migration.source, migration.destination) == (f"{UUID}-123", "a", "b")


def test_the_destination_reuses_the_id_it_prestaged(store: NvaStore) -> None:
    store.prestage(100, MAC1, "b", "m-1")
    resolver = Resolver(store, "b", clock=lambda: 456)
    assert resolver.for_destination(UUID, VM).id == "m-1"
    # ... unless that id is spent here (journalled as finished): a new attempt, a new id.
    assert resolver.for_destination(UUID, VM, reusable=lambda mid: False).id == f"{UUID}-456"
    assert resolver.pending_for_destination(VM) is not None
    assert Resolver(store, "c").pending_for_destination(VM) is None


def test_the_source_learns_destination_and_id_while_pending_and_after_commit(
    store: NvaStore,
) -> None:
    source = Resolver(store, "a")
    with pytest.raises(ResolveError, match="no move of VM vm1 away from a"):
        source.for_source(VM)
    store.prestage(100, MAC1, "b", "m-1")
    pending = source.for_source(VM)
    assert (pending.id, pending.source, pending.destination) == ("m-1", "a", "b")
    store.commit(100, MAC1, "m-1")  # the destination's RESUMED comes before our STOPPED
    committed = source.for_source(VM)
    assert (committed.id, committed.source, committed.destination) == ("m-1", "a", "b")


def test_nothing_to_move_when_the_directory_already_places_the_vm_here(store: NvaStore) -> None:
    with pytest.raises(NothingToMove, match="already places VM vm1 at a"):
        Resolver(store, "a").for_destination(UUID, VM)


def test_unknown_nics_cannot_be_resolved(store: NvaStore) -> None:
    stranger = Workload("vm9", (Vif(MAC2, 100, (), (), "tap9"),))
    with pytest.raises(ResolveError, match="knows none of the NICs of VM vm9"):
        Resolver(store, "b").for_destination(UUID, stranger)
    with pytest.raises(ResolveError, match="no managed NIC"):
        Resolver(store, "b").for_destination(UUID, Workload("bare", ()))
