"""The state kinds (stevedore plugins in ``vmm_state.kinds``), one module each.

Every kind reads and writes the real kernel of a host's network namespace:

==================  =====================================================
``conntrack``       firewall sessions (the namespace's conntrack table)
``nft_sets``        firewall cumulative data: flood meters and blacklists
``mdb``             IGMP/MLD snooping membership of the VM's port
``dot1x``           802.1X-authorized MAC (locked port) and dynamic ACL
``dhcp_snooping``   DHCP-snooping bindings and the port's anti-spoof guard
``macsec``          MACsec secure associations (key, next packet number)
==================  =====================================================

The firewall whose tables they move is :mod:`vmm_lab.firewall`.
"""

from __future__ import annotations

from oslo_config import cfg

from vmm_orchestrator.statekind import StateKind

#: Entry point name -> "module:Class", as setup.py registers them.
KINDS = {
    "conntrack": "vmm_state.kinds.conntrack:ConntrackKind",
    "nft_sets": "vmm_state.kinds.nftsets:NftSetsKind",
    "mdb": "vmm_state.kinds.mdb:MdbKind",
    "dot1x": "vmm_state.kinds.dot1x:Dot1xKind",
    "dhcp_snooping": "vmm_state.kinds.dhcp_snooping:DhcpSnoopingKind",
    "macsec": "vmm_state.kinds.macsec:MacsecKind",
}


def kind_classes() -> list[type[StateKind]]:
    """The kind classes, in the order of KINDS."""
    import importlib

    classes: list[type[StateKind]] = []
    for target in KINDS.values():
        module, _, name = target.partition(":")
        classes.append(getattr(importlib.import_module(module), name))
    return classes


def list_opts() -> list[tuple[str, list[cfg.Opt]]]:
    """Every kind's options, by group (``state_<kind>``), for oslo-config-generator."""
    return [(f"state_{cls.name}", list(cls.opts)) for cls in kind_classes()]
