"""A libvirt domain as the orchestrator sees it: a Workload with one Vif per
managed NIC, read from the domain XML, with addresses from configurable
sources.

The XML gives each NIC's MAC, bridge and host-side device (``<target
dev>``). The VNI comes from the bridge (an explicit map, else a pattern
such as the Linux NVE's ``br-<vni>``); a NIC on any other bridge is not
managed and left out. Addresses come from the first source, in the
configured order, that knows any for that NIC: the directory (the binding
the NVA registered, the only one a multi-tenant site should trust), the
guest agent, libvirt's DHCP leases or the host's ARP table.

Reading the XML needs no libvirt call, so the hook relay's path (which must
never call back into libvirt) uses ``parse_domain`` plus the directory only.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import re
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from vmm_orchestrator.errors import VmmError
from vmm_orchestrator.model import Vif, Workload, normalize_mac
from vmm_orchestrator.nva import errors as nva_errors

LOG = logging.getLogger(__name__)

# libvirt's VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_* and VIR_IP_ADDR_TYPE_* values.
SRC_LEASE = 0
SRC_AGENT = 1
SRC_ARP = 2
_LIBVIRT_SOURCES = {"agent": SRC_AGENT, "lease": SRC_LEASE, "arp": SRC_ARP}


class DomainXmlError(VmmError):
    """The domain XML cannot be read."""


@dataclasses.dataclass(frozen=True)
class Nic:
    """One ``<interface>`` of a domain, as the XML states it."""

    mac: str
    bridge: str | None
    target: str | None
    kind: str


@dataclasses.dataclass(frozen=True)
class DomainDesc:
    """What the XML says of a domain: identity and NICs."""

    name: str
    uuid: str
    nics: tuple[Nic, ...]


def parse_domain(xml: str) -> DomainDesc:
    """Name, UUID and NICs of a domain XML; DomainXmlError when it is not one.

    The bridge is ``<source bridge>`` (type bridge) or, for a libvirt
    network, the ``bridge`` attribute the live XML adds to ``<source>``.
    A NIC without a MAC is skipped (libvirt always writes one).
    """
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as exc:
        raise DomainXmlError(f"the domain XML is not well-formed: {exc}") from None
    if root.tag != "domain":
        raise DomainXmlError(f"expected a <domain> document, got <{root.tag}>")
    name = (root.findtext("name") or "").strip()
    uuid = (root.findtext("uuid") or "").strip().lower()
    if not name or not uuid:
        raise DomainXmlError("the domain XML has no <name> or no <uuid>")
    nics = []
    for iface in root.findall("./devices/interface"):
        mac_el = iface.find("mac")
        if mac_el is None or not mac_el.get("address"):
            continue
        try:
            mac = normalize_mac(mac_el.get("address", ""))
        except ValueError:
            LOG.warning(
                "domain %s: NIC with a malformed MAC %r skipped", name, mac_el.get("address")
            )
            continue
        source = iface.find("source")
        bridge = source.get("bridge") if source is not None else None
        target_el = iface.find("target")
        target = target_el.get("dev") if target_el is not None else None
        nics.append(Nic(mac, bridge or None, target or None, iface.get("type", "")))
    return DomainDesc(name, uuid, tuple(nics))


class VniMap:
    """Bridge name -> VNI: the explicit map first, then the pattern."""

    def __init__(self, explicit: Mapping[str, int], pattern: re.Pattern[str] | None) -> None:
        self.explicit = dict(explicit)
        self.pattern = pattern

    def __call__(self, bridge: str | None) -> int | None:
        if not bridge:
            return None
        if bridge in self.explicit:
            return self.explicit[bridge]
        if self.pattern is not None:
            found = self.pattern.match(bridge)
            if found and found.group("vni"):
                vni = int(found.group("vni"))
                return vni if 0 < vni < 2**24 else None
        return None


def _split(addresses: Sequence[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(IPv4, IPv6) of the addresses worth announcing: no link-local, loopback or multicast."""
    v4: list[str] = []
    v6: list[str] = []
    for text in addresses:
        try:
            addr = ipaddress.ip_address(text.split("%")[0].split("/")[0])
        except ValueError:
            continue
        if addr.is_link_local or addr.is_loopback or addr.is_multicast or addr.is_unspecified:
            continue
        (v4 if addr.version == 4 else v6).append(str(addr))
    return tuple(dict.fromkeys(v4)), tuple(dict.fromkeys(v6))


def libvirt_addresses(domain: Any, source: int) -> dict[str, list[str]]:
    """MAC -> addresses from ``virDomainInterfaceAddresses`` with ``source``."""
    found: dict[str, list[str]] = {}
    for info in (domain.interfaceAddresses(source) or {}).values():
        hwaddr = info.get("hwaddr")
        if not hwaddr:
            continue
        try:
            mac = normalize_mac(hwaddr)
        except ValueError:
            continue
        found.setdefault(mac, []).extend(a["addr"] for a in info.get("addrs") or () if "addr" in a)
    return found


class Discovery:
    """Domain XML (+ directory, + libvirt sources) -> Workload.

    ``nva`` is the directory client. ``sources`` is the lookup order (see
    [libvirt] address_sources). ``lookup`` reads addresses from a libvirt
    domain for one of libvirt's sources (tests replace it).
    """

    def __init__(
        self,
        vni_of: Callable[[str | None], int | None],
        nva: Any,
        sources: Sequence[str] = ("directory",),
        lookup: Callable[[Any, int], dict[str, list[str]]] = libvirt_addresses,
    ) -> None:
        unknown = [s for s in sources if s != "directory" and s not in _LIBVIRT_SOURCES]
        if unknown:
            raise ValueError(f"unknown address source(s): {', '.join(unknown)}")
        self.vni_of = vni_of
        self.nva = nva
        self.sources = tuple(sources)
        self._lookup = lookup

    def workload(self, xml: str, domain: Any = None) -> Workload:
        """The Workload of a domain XML; libvirt sources are used only with ``domain``.

        Without ``domain`` (the hook path) only the directory is asked.
        Directory outages are not fatal here: the NIC is kept without the
        addresses that source would have given, and the next source is tried.
        """
        desc = parse_domain(xml)
        vifs = []
        cache: dict[str, dict[str, list[str]]] = {}
        for nic in desc.nics:
            vni = self.vni_of(nic.bridge)
            if vni is None:
                LOG.debug(
                    "domain %s: NIC %s on bridge %s is not managed", desc.name, nic.mac, nic.bridge
                )
                continue
            if nic.target is None:
                LOG.warning(
                    "domain %s: NIC %s names no host device (<target dev>) yet", desc.name, nic.mac
                )
            ipv4, ipv6 = self._addresses(desc.name, vni, nic.mac, domain, cache)
            vifs.append(Vif(mac=nic.mac, vni=vni, ipv4=ipv4, ipv6=ipv6, port=nic.target))
        return Workload(name=desc.name, vifs=tuple(vifs))

    def _addresses(
        self,
        name: str,
        vni: int,
        mac: str,
        domain: Any,
        cache: dict[str, dict[str, list[str]]],
    ) -> tuple[tuple[str, ...], tuple[str, ...]]:
        for source in self.sources:
            if source == "directory":
                found = self._from_directory(name, vni, mac)
            elif domain is None:
                continue
            else:
                if source not in cache:
                    cache[source] = self._from_libvirt(name, domain, source)
                found = _split(cache[source].get(mac, []))
            if found[0] or found[1]:
                return found
        return (), ()

    def _from_directory(
        self, name: str, vni: int, mac: str
    ) -> tuple[tuple[str, ...], tuple[str, ...]]:
        try:
            endpoint = self.nva.get_endpoint(vni, mac)
        except nva_errors.NotFound:
            return (), ()
        except nva_errors.NvaError as exc:
            LOG.warning("domain %s: directory lookup of %s failed: %s", name, mac, exc)
            return (), ()
        return _split(list(endpoint.get("ipv4") or []) + list(endpoint.get("ipv6") or []))

    def _from_libvirt(self, name: str, domain: Any, source: str) -> dict[str, list[str]]:
        try:
            return self._lookup(domain, _LIBVIRT_SOURCES[source])
        except Exception as exc:  # libvirtError, without importing libvirt here
            LOG.info("domain %s: no addresses from libvirt source '%s': %s", name, source, exc)
            return {}
