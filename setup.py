"""Packaging for vmm-orchestrator.

The core package and every plugin package are mapped here; stevedore finds
stages, NVA backends and command extensions through the entry points below.
"""

from setuptools import setup

setup(
    name="vmm-orchestrator",
    version="0.1.0",
    description="Make the network follow a live-migrating VM (libvirt/OpenStack plugin)",
    python_requires=">=3.11",
    packages=[
        "vmm_orchestrator",
        "vmm_orchestrator.nva",
        "vmm_linux",
        "vmm_linux.lab",
    ],
    package_dir={
        "vmm_orchestrator": "vmm_orchestrator",
        "vmm_linux": "plugins/vmm_linux",
    },
    install_requires=[
        "oslo.config>=9.0",
        "stevedore>=5.0",
        "requests>=2.28",
        "tenacity>=8.0",
        "pyroute2>=0.9",
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
        ],
        "vmm_orchestrator.commands": [
            "lab = vmm_linux.lab.cli:LabCommand",
        ],
        "oslo.config.opts": [
            "vmm_orchestrator = vmm_orchestrator.opts:list_opts",
            "vmm_linux = vmm_linux.opts:list_opts",
        ],
    },
)
