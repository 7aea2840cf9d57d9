"""Options are registered once, from the plugins' oslo.config.opts entry points, when the
configuration is made; code reading an unregistered configuration fails with one line
naming the fix (vmm_orchestrator.options)."""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path

import pytest
from oslo_config import cfg

from vmm_orchestrator import engine, options
from vmm_orchestrator.cli import load_config
from vmm_orchestrator.engine import Pipeline
from vmm_orchestrator.errors import ConfigError
from vmm_orchestrator.journal import Journal
from vmm_orchestrator.metrics import MetricsExporter
from vmm_orchestrator.nva.client import NvaClient
from vmm_orchestrator.nva.store import NvaStore
from vmm_orchestrator.stage import HostContext

SAMPLE = Path(__file__).resolve().parents[2] / "etc/vmm-orchestrator/vmm-orchestrator.conf.sample"
_OPTION_LINE = re.compile(r"^#(?P<name>[A-Za-z0-9_-]+) =(?: |$)")


def sample_options() -> dict[str, set[str]]:
    """{group: option names} as the committed sample config documents them."""
    found: dict[str, set[str]] = {}
    group = "DEFAULT"
    for line in SAMPLE.read_text(encoding="utf-8").splitlines():
        if line.startswith("[") and line.endswith("]"):
            group = line[1:-1]
            found.setdefault(group, set())
            continue
        match = _OPTION_LINE.match(line)
        if match:
            found.setdefault(group, set()).add(match.group("name").replace("-", "_"))
    return found


def registered(conf: cfg.ConfigOpts, group: str) -> set[str]:
    """The option names (dests) registered in ``[group]``."""
    return set(conf[group])


def groups(conf: cfg.ConfigOpts) -> set[str]:
    """Every registered group but oslo.config's own."""
    found = {name for name in conf if isinstance(conf[name], cfg.ConfigOpts.GroupAttr)}
    return found - {"config_source"}


def test_a_fresh_configuration_has_every_group_and_option_of_the_sample() -> None:
    conf = options.register_all(cfg.ConfigOpts())
    conf.set_override("hosts", ["example"], group="agent")
    options.register_hosts(conf)  # the sample shows the per-host groups for "example"
    for group, names in sample_options().items():
        if group == "DEFAULT":
            continue
        assert group in conf, f"[{group}] of the sample is not registered"
        missing = names - registered(conf, group)
        assert not missing, f"[{group}] misses {sorted(missing)}"


def test_the_registered_groups_are_the_entry_points_lists(
    registered_conf: cfg.ConfigOpts,
) -> None:
    """The shared fixture (tests/conftest.py) is a configuration as `vmm` makes one."""
    listed: set[str] = set()
    for ep in importlib.metadata.entry_points(group=options.NAMESPACE):
        if ep.name.startswith(options.PREFIX):
            listed.update(group for group, _opts in ep.load()())
    conf = registered_conf
    ours = groups(conf)
    # The per-host template is registered per configured host, never as "example".
    assert ours == listed - {options.HOST_TEMPLATE}
    assert options.HOST_TEMPLATE not in conf
    assert "lab" in ours and "nva" in ours and "stage_nva_prestage" in ours


def test_registering_again_is_harmless(registered_conf: cfg.ConfigOpts) -> None:
    conf = registered_conf
    before = {name: registered(conf, name) for name in groups(conf)}
    options.register_all(conf)
    assert {name: registered(conf, name) for name in groups(conf)} == before


def test_per_host_groups_follow_agent_hosts_of_the_files(tmp_path: Path) -> None:
    path = tmp_path / "agent.conf"
    path.write_text(
        "[agent]\nhosts = hv1, hv2\n\n[host:hv1]\nvtep = 192.0.2.1\nuri = qemu:///x\n",
        encoding="utf-8",
    )
    for conf in (options.new_conf([str(path)]), load_config([str(path)])):
        # The core's per-host options and the libvirt plugin's, for each host.
        assert {"vtep", "vnis", "journal", "uri", "hook_socket"} <= registered(conf, "host:hv2")
        assert conf["host:hv1"].vtep == "192.0.2.1"
        assert conf["host:hv1"].uri == "qemu:///x"
        assert options.HOST_TEMPLATE not in conf


def test_an_unused_plugins_required_option_does_not_fail_parsing(tmp_path: Path) -> None:
    """keystoneauth's [neutron] auth-url is required; a site without Neutron never sets it."""
    path = tmp_path / "vmm.conf"
    path.write_text("[nva]\ntoken = t\n", encoding="utf-8")
    conf = options.new_conf([str(path)])
    assert "neutron" in conf and conf.nva.token == "t"


@pytest.mark.parametrize(
    ("build", "group"),
    [
        (lambda conf: NvaClient.from_conf(conf), "nva"),
        (lambda conf: NvaStore.from_conf(conf, ":memory:"), "nva"),
        (lambda conf: MetricsExporter.from_conf(conf), "metrics"),
        (lambda conf: Pipeline(conf, HostContext("h", None), Journal(":memory:"), []), "pipeline"),
    ],
    ids=["directory-client", "directory-store", "metrics", "pipeline"],
)
def test_a_constructor_given_an_unregistered_configuration_fails_with_one_clear_line(
    build, group
) -> None:
    with pytest.raises(ConfigError) as err:
        build(cfg.ConfigOpts())
    text = str(err.value)
    assert "\n" not in text
    assert f"[{group}]" in text and "not registered" in text
    assert "vmm_orchestrator.options.register_all(conf)" in text


def test_plugins_constructors_fail_the_same_way() -> None:
    from vmm_linux.nve import LinuxNve

    with pytest.raises(ConfigError, match=r"\[linux_nve\].*register_all"):
        LinuxNve.from_conf(cfg.ConfigOpts(), None, "192.0.2.1")


def test_the_strict_loader_registers_a_stage_when_it_loads_it() -> None:
    conf = cfg.ConfigOpts()
    assert "stage_nva_prestage" not in conf
    (stage,) = engine.load_stages(conf, ["nva_prestage"])
    assert "stage_nva_prestage" in conf
    assert stage.options.deadline > 0


def test_a_stage_built_by_hand_names_how_to_register_it() -> None:
    from vmm_orchestrator.stages import NvaPrestage

    stage = NvaPrestage(cfg.ConfigOpts())
    with pytest.raises(ConfigError, match=r"NvaPrestage\.register_opts\(conf\)"):
        _ = stage.options.deadline
