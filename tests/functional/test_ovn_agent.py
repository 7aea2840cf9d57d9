"""The composition root builds OVN hosts: one ``vmm agent`` configuration per
chassis (``[agent] host_driver = ovn``, ``[nva] backend = ovn``, ``[ovn]``
connections), assembled by :func:`vmm_orchestrator.agent.assemble`, and a
migration driven through the assembled hosts' dispatchers loses nothing
after the resume.

Until setup.py registers the plugin's entry points (``ovn`` in
``vmm_orchestrator.host_drivers`` and ``vmm_orchestrator.nva_backends``) the
test resolves those two names itself; everything else is the real loader.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
from oslo_config import cfg

from vmm_orchestrator import agent, contracts
from vmm_orchestrator.model import Migration, MigrationEvent, Phase, Role
from vmm_orchestrator.nva import backends as nva_backends
from vmm_orchestrator.options import new_conf

lab_mod = pytest.importorskip("vmm_lab.ovn.lab")
from vmm_lab.ovn import demo  # noqa: E402
from vmm_ovn import host  # noqa: E402
from vmm_ovn.directory import OvnNbDirectory  # noqa: E402

pytestmark = pytest.mark.skipif(
    bool(lab_mod.missing_binaries()),
    reason="OVN/OVS not installed: apt-get install ovn-central ovn-host openvswitch-switch",
)


@pytest.fixture
def ovn_entry_points(monkeypatch: pytest.MonkeyPatch) -> None:
    real_plugin, real_backend = agent.load_plugin, nva_backends.load_backend

    def load_plugin(namespace: str, name: str, option: str) -> Any:
        if namespace == contracts.HOST_DRIVERS and name == "ovn":
            try:
                return real_plugin(namespace, name, option)
            except Exception:
                return host.factory
        return real_plugin(namespace, name, option)

    def load_backend(conf: cfg.ConfigOpts) -> Any:
        try:
            return real_backend(conf)
        except Exception:
            if conf.nva.backend == "ovn":
                return OvnNbDirectory
            raise

    monkeypatch.setattr(agent, "load_plugin", load_plugin)
    monkeypatch.setattr(nva_backends, "load_backend", load_backend)


@pytest.fixture
def lab() -> Iterator[lab_mod.OvnLab]:
    with lab_mod.ovn_lab(lab_mod.new_prefix(), vni=demo.VNI) as running:
        yield running


def _agent_conf(lab: lab_mod.OvnLab, name: str) -> cfg.ConfigOpts:
    ch = lab.chassis[name]
    path = os.path.join(lab.workdir, f"{name}.conf")
    with open(path, "w", encoding="utf-8") as f:
        f.write(
            f"""[agent]
hosts = {name}
host_driver = ovn
[host:{name}]
vtep = {ch.ip}
vnis = {demo.VNI}
journal = {lab.workdir}/journal-agent-{name}.sqlite
[nva]
backend = ovn
[ovn]
ovsdb_connection = {ch.db}
ovn_nb_connection = {lab.nb}
ovn_sb_connection = {lab.sb}
[pipeline]
stages = {",".join(demo.STAGES)}
[stage_hold_timer]
hold_time = 0.2
"""
        )
    conf = new_conf([path])
    return conf


class AgentSite:
    """The demo's orchestrator interface over one assembled agent per chassis."""

    def __init__(self, lab: lab_mod.OvnLab) -> None:
        self.assemblies: dict[str, agent.Assembly] = {}
        try:
            for name in lab.chassis:
                assembly = agent.assemble(_agent_conf(lab, name))
                self.assemblies[name] = assembly
                assembly.start()
        except BaseException:
            self.close()
            raise
        self.hosts = {name: a[name].driver for name, a in self.assemblies.items()}
        self.directory = self.assemblies[demo.DESTINATION][demo.DESTINATION].directory

    def submit(self, name: str, migration: Migration, phase: Phase, role: Role, at: float) -> Any:
        return self.assemblies[name][name].dispatcher.submit(
            MigrationEvent(migration, phase, role, at)
        )

    def close(self) -> None:
        for assembly in self.assemblies.values():
            assembly.close()


def test_agents_assemble_ovn_hosts_and_migrate_without_loss(
    lab: lab_mod.OvnLab, ovn_entry_points: None
) -> None:
    site = AgentSite(lab)
    try:
        for name, assembly in site.assemblies.items():
            built = assembly[name]
            assert isinstance(built.driver, host.OvnHost)
            assert built.driver.chassis.name == name  # each agent reads its own chassis
            assert isinstance(built.directory, OvnNbDirectory)
            assert {"nve", "announcers", "ovn", "ovn_reader"} <= set(built.context.services)
        settings = demo.Settings(
            rate=200, warmup_s=0.5, downtime_ms=200.0, observe_s=1.5, neutron_delay_s=0.8
        )
        conf = new_conf()
        result = demo.run_mode(conf, lab, demo.MODE_ORCHESTRATED, "vm1", settings, site)  # type: ignore[arg-type]
    finally:
        site.close()
    print(demo.render([result]))
    assert result.errors == []
    assert all(s.lost_while_paused > 0 for s in result.streams)
    assert result.lost_after_resume == 0
    assert all(v is not None for v in result.convergence_ms.values())
