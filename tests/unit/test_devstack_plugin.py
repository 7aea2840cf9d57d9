"""The DevStack plugin, phase by phase, with DevStack's real function library.

Each phase sources the DevStack snapshot in ``../shared/devstack`` (``functions``,
``stackrc``, ``lib/keystone``) and runs ``run_phase`` exactly as stack.sh,
unstack.sh and clean.sh do, so ``setup_develop`` really reads setup.cfg,
``iniset`` and ``configure_keystoneauth`` really write the files and
``run_process`` really writes DevStack's systemd units, all in a temporary
folder. The stand-ins are those of
tests/functional/test_devstack_stack.py (sudo, systemctl, openstack,
edit-constraints) plus, to stay quick here, pip: DevStack's virtualenv holds a
``pip`` that records its arguments (the functional test installs for real) and
the plugin is the work tree itself where DevStack would have cloned it.
"""

from __future__ import annotations

import configparser
import importlib.util
import os
import shutil
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from vmm_openstack import options as os_options
from vmm_orchestrator.cli import check_options, load_config
from vmm_orchestrator.nva import options as nva_options

ROOT = Path(__file__).resolve().parents[2]
DEVSTACK = ROOT / "devstack"
DEVSTACK_TREE = ROOT.parent / "shared" / "devstack"
SHELL_FILES = ["plugin.sh", "settings", "lib/vmm-orchestrator"]


def _stand_ins() -> object:
    """The functional test's stand-ins (one copy of them)."""
    path = ROOT / "tests" / "functional" / "test_devstack_stack.py"
    spec = importlib.util.spec_from_file_location("_devstack_stand_ins", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


STAND_INS = _stand_ins()

PIP = r"""#!/bin/bash
# Stand-in for DevStack's virtualenv pip: records the call.
printf 'pip' >>"$STUB_LOG"; printf '\t%s' "$@" >>"$STUB_LOG"; printf '\n' >>"$STUB_LOG"
"""

# stack.sh's steps before a phase (see the functional test); the plugin is already
# where DevStack clones it, and DevStack's virtualenv already exists.
PROLOGUE = r"""
set -o errexit
TOP_DIR=$DEVSTACK_TREE
source "$TOP_DIR/functions"
source "$TOP_DIR/stackrc"
DEST=$T/opt-stack
DATA_DIR=$DEST/data
SERVICE_DIR=$DEST/status
SYSTEMD_DIR=$T/etc-systemd-system
OPENSTACKCLIENT_CONF_DIR=$T/etc-openstack
STACK_USER=$(whoami)
function echo_summary { echo "$@"; }
function echo_nolog { echo "$@"; }
setup_devstack_virtualenv
source "$TOP_DIR/lib/keystone"
enable_plugin vmm-orchestrator "file://$T/nowhere" main
run_phase source
"""


@dataclass
class Host:
    """The temporary "host" one test's phases run on."""

    root: Path
    env: dict[str, str]

    @property
    def conf(self) -> Path:
        return Path(self.env["VMM_CONF"])

    @property
    def hooks(self) -> Path:
        return Path(self.env["VMM_LIBVIRT_HOOKS_DIR"])

    @property
    def venv(self) -> Path:
        return Path(self.env["DEVSTACK_VENV"])

    @property
    def units(self) -> Path:
        return self.root / "etc-systemd-system"

    def calls(self, name: str | None = None) -> list[list[str]]:
        log = Path(self.env["STUB_LOG"])
        rows = [line.split("\t") for line in log.read_text().splitlines()] if log.exists() else []
        return [row if name is None else row[1:] for row in rows if name in (None, row[0])]

    def run(self, *phase: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", "-c", PROLOGUE + f"run_phase {' '.join(phase)}\n"],
            env=self.env,
            cwd=self.root,
            capture_output=True,
            text=True,
            timeout=60,
        )


@pytest.fixture
def host(tmp_path: Path) -> Host:
    if not (DEVSTACK_TREE / "functions").is_file():
        pytest.fail(f"DevStack's code is not at {DEVSTACK_TREE} (the workplace's shared/devstack)")
    stubs = tmp_path / "stub-bin"
    stubs.mkdir()
    for name in ("SUDO", "SYSTEMCTL", "OPENSTACK"):
        (stubs / name.lower()).write_text(getattr(STAND_INS, name))
        (stubs / name.lower()).chmod(0o755)
    venv_bin = tmp_path / "opt-stack" / "data" / "venv" / "bin"
    venv_bin.mkdir(parents=True)
    (venv_bin / "pip").write_text(PIP)
    (venv_bin / "pip").chmod(0o755)
    # DevStack's Python: this one.
    (venv_bin / "python3").symlink_to(sys.executable)
    requirements = tmp_path / "requirements"
    (requirements / ".venv" / "bin").mkdir(parents=True)
    (requirements / ".venv" / "bin" / "edit-constraints").write_text(STAND_INS.EDIT_CONSTRAINTS)
    (requirements / ".venv" / "bin" / "edit-constraints").chmod(0o755)
    (requirements / "upper-constraints.txt").write_text(
        "vmm-orchestrator===0.0.1\nrequests===2.0\n"
    )
    # Where fetch_plugins would have cloned the plugin.
    (tmp_path / "opt-stack" / "vmm-orchestrator").symlink_to(ROOT)
    env = {
        "PATH": f"{stubs}:{os.environ['PATH']}",
        "HOME": str(tmp_path),
        "LANG": "C.UTF-8",
        "T": str(tmp_path),
        "DEVSTACK_TREE": str(DEVSTACK_TREE),
        "STUB_DIR": str(stubs),
        "STUB_LOG": str(tmp_path / "stub-calls.tsv"),
        "STUB_STATE": str(tmp_path / "systemd-state"),
        # local.conf [[local|localrc]]
        "ENABLED_SERVICES": "key,n-cpu,q-svc,vmm-agent,vmm-nva",
        "DEVSTACK_VENV": str(venv_bin.parent),
        "REQUIREMENTS_DIR": str(requirements),
        "HOST_IP": "192.0.2.11",
        "SERVICE_HOST": "192.0.2.10",
        "SERVICE_PASSWORD": "devstack-secret",
        "ADMIN_PASSWORD": "devstack-secret",
        "VMM_HOST_NAME": "cmp1",
        "VMM_CONF_DIR": str(tmp_path / "etc-vmm"),
        "VMM_CONF": str(tmp_path / "etc-vmm" / "vmm-orchestrator.conf"),
        "VMM_RUN_DIR": str(tmp_path / "run-vmm"),
        "VMM_LIBVIRT_HOOKS_DIR": str(tmp_path / "etc-libvirt-hooks"),
    }
    return Host(tmp_path, env)


def ok(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"


def read_ini(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    parser.read(path)
    return parser


# ------------------------------------------------------------------ packaging


def test_setup_cfg_and_setup_py_name_the_same_distribution() -> None:
    """DevStack reads setup.cfg's name; pip installs setup.py's: one name."""
    from_setup_py = subprocess.run(
        [sys.executable, "setup.py", "--name"], cwd=ROOT, capture_output=True, text=True
    ).stdout.split()[-1]
    parser = configparser.ConfigParser()
    parser.read(ROOT / "setup.cfg")
    assert parser["metadata"]["name"] == from_setup_py == "vmm-orchestrator"


# ------------------------------------------------------------------ phases


def test_stack_install_develops_the_package_under_the_constraints(host: Host) -> None:
    ok(host.run("stack", "install"))

    clone = str(host.root / "opt-stack" / "vmm-orchestrator")
    constraints = Path(host.env["REQUIREMENTS_DIR"]) / "upper-constraints.txt"
    assert host.calls("pip") == [["install", "-c", str(constraints), "-e", clone]]
    # setup_develop dropped this project's pin (by setup.cfg's name), nothing else.
    assert constraints.read_text() == "requests===2.0\n"
    installed = host.hooks / "qemu.d" / "vmm-orchestrator"
    shipped = ROOT / "etc" / "libvirt" / "hooks" / "qemu.d" / "vmm-orchestrator"
    assert installed.read_bytes() == shipped.read_bytes()
    assert stat.S_IMODE(installed.stat().st_mode) == 0o755
    assert not host.conf.exists()
    assert not host.units.exists()  # nothing starts before "extra"


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
    assert conf["pipeline"]["journal"] == str(
        host.root / "opt-stack" / "data" / "vmm-orchestrator" / "journal.sqlite"
    )
    assert stat.S_IMODE(host.conf.stat().st_mode) == 0o640  # it holds the token
    relay = read_ini(host.hooks / "vmm-orchestrator.conf")
    assert relay["hook_relay"]["socket"] == conf["agent"]["hook_socket"]
    assert relay["hook_relay"]["fail_mode"] == "open"
    assert ["restart", "libvirtd"] in host.calls("systemctl")  # it reads hooks at start


def test_post_config_writes_the_neutron_service_user_like_novas(host: Host) -> None:
    ok(host.run("stack", "post-config"))

    keystone = host.calls("openstack")
    created = [c for c in keystone if c[2:4] == ["user", "create"]]
    assert [c[4] for c in created] == ["vmm-orchestrator"]
    roles = sorted(c[4] for c in keystone if c[2:4] == ["role", "add"])
    assert roles == ["admin", "service"]
    neutron = dict(read_ini(host.conf)["neutron"])
    assert neutron == {
        "auth_type": "password",
        "auth_url": "http://192.0.2.10/identity",
        "username": "vmm-orchestrator",
        "password": "devstack-secret",
        "user_domain_name": "Default",
        "project_name": "service",
        "project_domain_name": "Default",
        "region_name": "RegionOne",
        "valid_interfaces": "public",
    }


def test_the_written_configuration_is_valid_for_vmm(host: Host) -> None:
    ok(host.run("stack", "post-config"))
    conf = load_config([str(host.conf)])
    # Every key of these groups is a known option with a valid value.
    check_options(conf, [*os_options.list_opts(), *nva_options.list_opts()])
    assert conf.openstack.cloud == "devstack-admin"  # DevStack's own clouds.yaml entry
    # [neutron] loads with keystoneauth's loaders, as the product loads it.
    from keystoneauth1 import loading as ks_loading

    auth = ks_loading.load_auth_from_conf_options(conf, "neutron")
    assert auth.auth_url == "http://192.0.2.10/identity"
    assert auth._username == "vmm-orchestrator" and auth._project_name == "service"


def test_stack_extra_writes_and_starts_devstack_units(host: Host) -> None:
    ok(host.run("stack", "extra"))

    vmm = f"{host.venv}/bin/vmm --config-file {host.env['VMM_CONF']}"
    nva = read_ini(host.units / "devstack@vmm-nva.service")
    agent = read_ini(host.units / "devstack@vmm-agent.service")
    assert nva["Service"]["ExecStart"] == f"{vmm} nva serve"
    assert agent["Service"]["ExecStart"] == f"{vmm} agent"
    assert agent["Service"]["User"] == "root"
    assert (
        nva["Service"]["User"]
        == subprocess.run(["whoami"], capture_output=True, text=True, check=True).stdout.strip()
    )
    started = [c for c in host.calls("systemctl") if c[0] in ("enable", "start")]
    assert started == [
        ["enable", "devstack@vmm-nva.service"],
        ["start", "devstack@vmm-nva.service"],
        ["enable", "devstack@vmm-agent.service"],
        ["start", "devstack@vmm-agent.service"],
    ]


def test_a_compute_host_runs_the_agent_only_and_creates_no_user(host: Host) -> None:
    host.env["ENABLED_SERVICES"] = "n-cpu,q-agt,vmm-agent"
    for phase in (("stack", "post-config"), ("stack", "extra")):
        ok(host.run(*phase))
    assert sorted(p.name for p in host.units.iterdir()) == ["devstack@vmm-agent.service"]
    assert host.calls("openstack") == []  # Keystone runs on the controller
    assert read_ini(host.conf)["neutron"]["username"] == "vmm-orchestrator"


def test_unstack_stops_and_disables_the_services(host: Host) -> None:
    ok(host.run("stack", "extra"))
    ok(host.run("unstack"))
    stopped = [c for c in host.calls("systemctl") if c[0] in ("stop", "disable")]
    assert stopped == [
        ["stop", "devstack@vmm-agent.service"],
        ["disable", "devstack@vmm-agent.service"],
        ["stop", "devstack@vmm-nva.service"],
        ["disable", "devstack@vmm-nva.service"],
    ]


def test_clean_removes_what_the_stack_phases_left(host: Host) -> None:
    for phase in (("stack", "install"), ("stack", "post-config"), ("stack", "extra"), ("unstack",)):
        ok(host.run(*phase))
    Path(host.env["VMM_RUN_DIR"], "hook.sock").touch()

    ok(host.run("clean"))

    assert not (host.hooks / "qemu.d" / "vmm-orchestrator").exists()
    assert not (host.hooks / "vmm-orchestrator.conf").exists()
    for key in ("VMM_CONF_DIR", "VMM_RUN_DIR"):
        assert not Path(host.env[key]).exists()
    assert not (host.root / "opt-stack" / "data" / "vmm-orchestrator").exists()
    assert list(host.units.iterdir()) == []
    assert host.calls("pip")[-1] == ["uninstall", "-y", "vmm-orchestrator"]


def test_nothing_happens_when_no_service_is_enabled(host: Host) -> None:
    host.env["ENABLED_SERVICES"] = "key,n-cpu"
    phases = (("stack", "install"), ("stack", "post-config"), ("stack", "extra"))
    for phase in (*phases, ("unstack",), ("clean",)):
        ok(host.run(*phase))
    assert host.calls() == []
    assert not host.conf.exists() and not host.units.exists() and not host.hooks.exists()


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
    files = [str(DEVSTACK / f) for f in SHELL_FILES]
    result = subprocess.run(
        [shellcheck, "--external-sources", "--shell=bash", *files],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
