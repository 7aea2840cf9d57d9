"""The DevStack plugin: devstack/plugin.sh for each phase, and shellcheck on every shell file.

DevStack does not run on this machine, so each phase runs against
``tests/fakes/devstack-functions.sh``, a stand-in for the DevStack functions
the plugin calls: it records each call and does the host-side effect the
test needs to see (iniset writes the file; sudo runs install and rm) in a
temporary directory. The sequence is DevStack's: the stand-in, then
devstack/settings, then ``plugin.sh <phase...>`` sourced in one bash with
``errexit`` and ``nounset``, so an undefined variable fails the test.
"""

from __future__ import annotations

import configparser
import os
import shutil
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from vmm_openstack import options as os_options
from vmm_orchestrator.cli import check_options, load_config
from vmm_orchestrator.nva import options as nva_options

ROOT = Path(__file__).resolve().parents[2]
DEVSTACK = ROOT / "devstack"
STAND_IN = ROOT / "tests" / "fakes" / "devstack-functions.sh"
SHELL_FILES = ["plugin.sh", "settings", "lib/vmm-orchestrator"]


@dataclass
class Host:
    """The temporary "host" one test's phases run on."""

    root: Path
    env: dict[str, str]
    calls_file: Path

    @property
    def conf(self) -> Path:
        return Path(self.env["VMM_CONF"])

    @property
    def hooks(self) -> Path:
        return Path(self.env["VMM_LIBVIRT_HOOKS_DIR"])

    def calls(self) -> list[list[str]]:
        if not self.calls_file.exists():
            return []
        return [line.split("\t") for line in self.calls_file.read_text().splitlines()]

    def named(self, name: str) -> list[list[str]]:
        return [c[1:] for c in self.calls() if c[0] == name]

    def run(self, *phase: str) -> subprocess.CompletedProcess[str]:
        script = (
            "set -o errexit -o nounset -o pipefail\n"
            f"source {STAND_IN}\n"
            f"source {DEVSTACK}/settings\n"
            f"source {DEVSTACK}/plugin.sh {' '.join(phase)}\n"
        )
        return subprocess.run(
            ["bash", "-c", script], env=self.env, capture_output=True, text=True, timeout=30
        )


@pytest.fixture
def host(tmp_path: Path) -> Host:
    relay = tmp_path / "src" / "vmm-orchestrator-relay"
    relay.parent.mkdir()
    relay.write_text("#!/usr/bin/python3\nprint('relay')\n")
    bin_dir = tmp_path / "venv" / "bin"
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path),
        # DevStack's own variables the plugin reads.
        "DEST": str(tmp_path / "opt-stack"),
        "DATA_DIR": str(tmp_path / "data"),
        "STACK_USER": subprocess.run(["id", "-un"], capture_output=True, text=True).stdout.strip(),
        "HOST_IP": "192.0.2.11",
        "SERVICE_HOST": "192.0.2.10",
        "SERVICE_PASSWORD": "devstack-secret",
        "REGION_NAME": "RegionOne",
        "ENABLED_SERVICES": "key,n-cpu,q-agt,vmm-agent,vmm-nva",
        # The plugin's paths, moved into the temporary directory.
        "VMM_DIR": str(ROOT),
        "VMM_HOST_NAME": "cmp1",
        "VMM_CONF_DIR": str(tmp_path / "etc-vmm"),
        "VMM_CONF": str(tmp_path / "etc-vmm" / "vmm-orchestrator.conf"),
        "VMM_RUN_DIR": str(tmp_path / "run-vmm"),
        "VMM_LIBVIRT_HOOKS_DIR": str(tmp_path / "etc-libvirt-hooks"),
        "VMM_HOOK_RELAY_SRC": str(relay),
        # The stand-in's own.
        "DEVSTACK_CALLS": str(tmp_path / "calls.tsv"),
        "FAKE_BIN_DIR": str(bin_dir),
    }
    return Host(tmp_path, env, tmp_path / "calls.tsv")


def ok(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"


def read_ini(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(path)
    return parser


# ------------------------------------------------------------------ phases


def test_stack_install_installs_the_package_and_the_hook_relay(host: Host) -> None:
    ok(host.run("stack", "install"))

    assert host.named("setup_develop") == [[str(ROOT)]]
    assert host.named("pip_install_gr") == [["libvirt-python"]]
    installed = host.hooks / "qemu.d" / "vmm-orchestrator"
    assert installed.read_text() == Path(host.env["VMM_HOOK_RELAY_SRC"]).read_text()
    assert stat.S_IMODE(installed.stat().st_mode) == 0o755
    assert host.named("run_process") == []  # nothing starts before "extra"


def test_the_default_relay_is_the_repositorys(host: Host) -> None:
    del host.env["VMM_HOOK_RELAY_SRC"]
    ok(host.run("stack", "install"))
    installed = host.hooks / "qemu.d" / "vmm-orchestrator"
    repo_relay = ROOT / "etc" / "libvirt" / "hooks" / "qemu.d" / "vmm-orchestrator"
    assert installed.read_bytes() == repo_relay.read_bytes()


def test_stack_post_config_writes_the_configuration(host: Host) -> None:
    ok(host.run("stack", "post-config"))

    conf = read_ini(host.conf)
    assert conf["nva"]["url"] == "http://192.0.2.10:9797"
    assert conf["nva"]["token"] == "devstack-secret"
    assert conf["openstack"]["cloud"] == "devstack-admin"
    assert conf["openstack"]["region_name"] == "RegionOne"
    assert conf["agent"]["hosts"] == "cmp1"
    assert conf["host:cmp1"]["uri"] == "qemu:///system"
    assert conf["host:cmp1"]["vtep"] == "192.0.2.11"
    assert conf["pipeline"]["journal"].startswith(host.env["DATA_DIR"])
    assert stat.S_IMODE(host.conf.stat().st_mode) == 0o640  # it holds the token
    # The relay talks to the socket the agent listens on.
    relay = read_ini(host.hooks / "vmm-orchestrator.conf")
    assert relay["hook_relay"]["socket"] == conf["agent"]["hook_socket"]
    assert relay["hook_relay"]["fail_mode"] == "open"
    assert host.named("restart_service") == [["libvirtd"]]  # it reads hooks at start


def test_the_written_configuration_is_valid_for_vmm(host: Host) -> None:
    ok(host.run("stack", "post-config"))
    conf = load_config([str(host.conf)])
    # Every key of these groups is a known option with a valid value.
    check_options(conf, [*os_options.list_opts(), *nva_options.list_opts()])
    assert conf.openstack.cloud == "devstack-admin"


def test_stack_extra_starts_the_services(host: Host) -> None:
    ok(host.run("stack", "extra"))

    vmm = f"{host.env['FAKE_BIN_DIR']}/vmm --config-file {host.env['VMM_CONF']}"
    assert host.named("run_process") == [
        ["vmm-nva", f"{vmm} nva serve"],
        ["vmm-agent", f"{vmm} agent", "", "root"],
    ]


def test_a_compute_host_runs_the_agent_only(host: Host) -> None:
    host.env["ENABLED_SERVICES"] = "n-cpu,q-agt,vmm-agent"
    host.env["VMM_NVA_URL"] = "http://192.0.2.10:9797"
    ok(host.run("stack", "extra"))
    assert [c[0] for c in host.named("run_process")] == ["vmm-agent"]


def test_unstack_stops_the_services(host: Host) -> None:
    ok(host.run("unstack"))
    assert host.named("stop_process") == [["vmm-agent"], ["vmm-nva"]]


def test_clean_removes_what_install_and_post_config_left(host: Host) -> None:
    for phase in (("stack", "install"), ("stack", "post-config")):
        ok(host.run(*phase))
    Path(host.env["VMM_RUN_DIR"], "hook.sock").touch()

    ok(host.run("clean"))

    assert not (host.hooks / "qemu.d" / "vmm-orchestrator").exists()
    assert not (host.hooks / "vmm-orchestrator.conf").exists()
    for key in ("VMM_CONF_DIR", "VMM_RUN_DIR"):
        assert not Path(host.env[key]).exists()
    assert not Path(host.env["DATA_DIR"], "vmm-orchestrator").exists()


def test_nothing_happens_when_no_service_is_enabled(host: Host) -> None:
    host.env["ENABLED_SERVICES"] = "key,n-cpu"
    for phase in (("stack", "install"), ("stack", "post-config"), ("stack", "extra"), ("clean",)):
        ok(host.run(*phase))
    assert [c[0] for c in host.calls()] == ["define_plugin"] * 4
    assert not host.conf.exists()


def test_a_missing_relay_stops_stack_sh_with_a_clear_message(host: Host) -> None:
    host.env["VMM_HOOK_RELAY_SRC"] = str(host.root / "nowhere")
    result = host.run("stack", "install")
    assert result.returncode != 0
    assert "hook relay" in result.stderr and "VMM_HOOK_RELAY_SRC" in result.stderr


def test_the_sample_local_conf_enables_the_plugin_and_its_services() -> None:
    text = (DEVSTACK / "local.conf.sample").read_text()
    assert "enable_plugin vmm-orchestrator " in text
    assert "enable_service vmm-agent" in text and "enable_service vmm-nva" in text


# --------------------------------------------------------------- shellcheck


def test_every_shell_file_passes_shellcheck() -> None:
    shellcheck = shutil.which("shellcheck")
    assert shellcheck, "shellcheck is not installed (apt-get install shellcheck)"
    found = sorted(
        str(p.relative_to(DEVSTACK))
        for p in DEVSTACK.rglob("*")
        if p.is_file() and p.name != "local.conf.sample"
    )
    assert found == sorted(SHELL_FILES), "a new file under devstack/: is it shell?"
    files = [str(DEVSTACK / f) for f in SHELL_FILES] + [str(STAND_IN)]
    result = subprocess.run(
        [shellcheck, "--external-sources", "--shell=bash", *files],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
