"""Packaging for vmm-orchestrator.

The core package and every plugin package are mapped here; stevedore finds
stages, NVA backends and command extensions through the entry points below.
"""

import os

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def plugin_packages() -> tuple[list[str], dict[str, str]]:
    """Every package under plugins/, importable by its folder name."""
    names: list[str] = []
    dirs: dict[str, str] = {}
    root = os.path.join(HERE, "plugins")
    for entry in sorted(os.listdir(root)):
        if os.path.isfile(os.path.join(root, entry, "__init__.py")):
            dirs[entry] = f"plugins/{entry}"
            names.append(entry)
            names += [f"{entry}.{sub}" for sub in find_packages(os.path.join(root, entry))]
    return names, dirs


PLUGIN_PACKAGES, PLUGIN_DIRS = plugin_packages()

setup(
    name="vmm-orchestrator",
    version="0.1.0",
    description="Make the network follow a live-migrating VM (libvirt/OpenStack plugin)",
    python_requires=">=3.11",
    packages=["vmm_orchestrator", "vmm_orchestrator.nva", "vmm_kernel", *PLUGIN_PACKAGES],
    package_dir={"vmm_orchestrator": "vmm_orchestrator", "vmm_kernel": "vmm_kernel", **PLUGIN_DIRS},
    install_requires=[
        "oslo.config>=9.0",
        "stevedore>=5.0",
        "requests>=2.28",
        "tenacity>=8.0",
        "pyroute2>=0.9",
        "libvirt-python>=9.0",
        "openstacksdk>=4.0",
        "etcd3gw>=2.7",
        "prometheus-client>=0.17",
        "matplotlib>=3.7",
        "ovsdbapp>=2.0",
    ],
    extras_require={
        "test": ["pytest>=8", "ruff", "mypy", "types-requests"],
    },
    entry_points={
        "console_scripts": [
            "vmm = vmm_orchestrator.cli:main",
        ],
        "vmm_orchestrator.stages": [
            "nva_prestage = vmm_orchestrator.stages:NvaPrestage",
            "peer_update = vmm_orchestrator.stages:PeerUpdate",
            "nve_prepare = vmm_linux.stages:NvePrepare",
            "nve_plug = vmm_linux.stages:NvePlug",
            "inflight_tunnel = vmm_linux.stages:InflightTunnel",
            "announce = vmm_linux.stages:Announce",
            "hold_timer = vmm_linux.stages:HoldTimer",
            "arp_refresh = vmm_linux.refresh:ArpRefresh",
            "libvirt_announce = vmm_libvirt.announcers:LibvirtAnnounce",
            "state_precopy = vmm_state.stages:StatePrecopy",
            "state_delta = vmm_state.stages:StateDelta",
            "state_cleanup = vmm_state.stages:StateCleanup",
            "ovn_convergence = vmm_ovn.stages:OvnConvergence",
        ],
        "vmm_orchestrator.commands": [
            "lab = vmm_lab.linux.cli:LabCommand",
            "agent = vmm_orchestrator.agent_cmd:AgentCommand",
            "migration = vmm_orchestrator.migration_cmd:MigrationCommand",
            "migrate-with-network = vmm_openstack.command:MigrateWithNetworkCommand",
            "state = vmm_state.warm:StateCommand",
        ],
        "vmm_orchestrator.nva_backends": [
            "embedded = vmm_orchestrator.nva.backends:EmbeddedBackend",
            "neutron = vmm_openstack.neutron:NeutronDirectory",
            "etcd = vmm_etcd.backends:EtcdBackend",
            "etcd-served = vmm_etcd.backends:EtcdServedBackend",
            "ovn = vmm_ovn.directory:OvnNbDirectory",
        ],
        "oslo.config.opts": [
            "vmm_orchestrator = vmm_orchestrator.opts:list_opts",
            "vmm_orchestrator.agent = vmm_orchestrator.agent:list_opts",
            "vmm_linux = vmm_linux.opts:list_opts",
            "vmm_openstack = vmm_openstack.options:list_opts",
            "vmm_state = vmm_state.options:list_opts",
            "vmm_libvirt = vmm_libvirt.options:list_opts",
            "vmm_state.kinds = vmm_state.kinds:list_opts",
            "vmm_state.warm = vmm_state.warm:list_opts",
            "vmm_etcd = vmm_etcd.options:list_opts",
            "vmm_lab = vmm_lab.linux.options:list_opts",
            "vmm_ovn = vmm_ovn.options:list_opts",
        ],
        "vmm_state.kinds": [
            "conntrack = vmm_state.kinds.conntrack:ConntrackKind",
            "nft_sets = vmm_state.kinds.nftsets:NftSetsKind",
            "mdb = vmm_state.kinds.mdb:MdbKind",
            "dot1x = vmm_state.kinds.dot1x:Dot1xKind",
            "dhcp_snooping = vmm_state.kinds.dhcp_snooping:DhcpSnoopingKind",
            "macsec = vmm_state.kinds.macsec:MacsecKind",
            "ovn_conntrack = vmm_ovn.state:OvnConntrackKind",
        ],
        "vmm_orchestrator.event_sources": [
            "libvirt = vmm_libvirt.daemon:Daemon",
        ],
        "vmm_orchestrator.host_drivers": [
            "linux = vmm_linux.host:LinuxHost.from_spec",
            "ovn = vmm_ovn.host:factory",
        ],
        "vmm_orchestrator.state_services": [
            "state = vmm_state.warm:open_state_service",
        ],
        "vmm_orchestrator.journals": [
            "sqlite = vmm_orchestrator.journal:open_sqlite",
            "etcd = vmm_etcd.backends:open_journal",
        ],
        "vmm_orchestrator.migration_locks": [
            "etcd = vmm_etcd.backends:EtcdMigrationLock",
        ],
    },
)
