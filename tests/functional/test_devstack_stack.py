"""The DevStack plugin run by DevStack's own code: stack install, post-config, extra,
unstack and clean, each the way stack.sh, unstack.sh and clean.sh run a plugin.

Nothing of DevStack is copied or imitated: every phase sources the snapshot of
DevStack in ``../shared/devstack`` (``functions``, ``stackrc``, ``lib/keystone``)
and goes through DevStack's ``enable_plugin``, ``fetch_plugins`` (a real git clone,
from a commit of this working tree), ``run_phase``, ``setup_develop``,
``setup_devstack_virtualenv``, ``iniset``, ``run_process``/``write_user_unit_file``,
``stop_process``, ``write_clouds_yaml``, ``create_service_user``,
``configure_keystoneauth``. Only what would reach outside this machine or change
the host is a stand-in, each a few lines written below:

* ``sudo``: runs the command as the test's user (``sudo systemctl`` goes to the
  ``systemctl`` stand-in);
* ``systemctl``: records calls and keeps enabled/active units in a state folder;
* ``openstack``: records the Keystone calls (no Keystone runs in this test);
* ``edit-constraints``: the openstack/requirements tool DevStack clones; it does
  what the real one does (drops or replaces one name in upper-constraints.txt).

The virtualenv is DevStack's global one (``setup_devstack_virtualenv``, which
fetches pip and setuptools from PyPI), in the temporary folder; it also sees the
project's .venv site-packages (one .pth line), so the package's requirements are
found installed and nothing else is downloaded. Every DevStack path the plugin
writes to (DEST, DATA_DIR, /etc/..., the systemd and libvirt folders,
/etc/openstack) is moved into the temporary folder, which is removed however the
test ends.
"""

from __future__ import annotations

import configparser
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DEVSTACK_TREE = ROOT.parent / "shared" / "devstack"
PHASE_TIMEOUT = 420

SUDO = r"""#!/bin/bash
# Stand-in for sudo: the test is one user in a temporary folder.
printf 'sudo' >>"$STUB_LOG"; printf '\t%s' "$@" >>"$STUB_LOG"; printf '\n' >>"$STUB_LOG"
while [[ $# -gt 0 ]]; do
    case $1 in
        -u|-g) shift 2 ;;
        --) shift; break ;;
        -*) shift ;;
        *) break ;;
    esac
done
case $1 in
    systemctl|/bin/systemctl|/usr/bin/systemctl) shift; exec "$STUB_DIR/systemctl" "$@" ;;
esac
exec env "$@"
"""

SYSTEMCTL = r"""#!/bin/bash
# Stand-in for systemctl: records calls; units enabled/active are files in $STUB_STATE.
printf 'systemctl' >>"$STUB_LOG"; printf '\t%s' "$@" >>"$STUB_LOG"; printf '\n' >>"$STUB_LOG"
mkdir -p "$STUB_STATE"
verb=$1; shift
case $verb in
    daemon-reload) ;;
    enable) touch "$STUB_STATE/$1.enabled" ;;
    disable) rm -f "$STUB_STATE/$1.enabled" ;;
    start|restart) touch "$STUB_STATE/$1.active" ;;
    stop) rm -f "$STUB_STATE/$1.active" ;;
    is-enabled) [[ -e "$STUB_STATE/$1.enabled" ]] && exit 0; exit 1 ;;
    is-active) [[ -e "$STUB_STATE/$1.active" ]] && exit 0; exit 3 ;;
    *) echo "systemctl stand-in: unexpected $verb" >&2; exit 1 ;;
esac
"""

OPENSTACK = r"""#!/bin/bash
# Stand-in for the openstack CLI: records the Keystone calls, answers like it.
printf 'openstack' >>"$STUB_LOG"; printf '\t%s' "$@" >>"$STUB_LOG"; printf '\n' >>"$STUB_LOG"
args=" $* "
if [[ $args == *" user create "* ]]; then
    echo "id-of-user"
elif [[ $args == *" role assignment list "* ]]; then
    while [[ $# -gt 0 ]]; do [[ $1 == --role ]] && { echo "$2"; exit 0; }; shift; done
fi
"""

EDIT_CONSTRAINTS = r"""#!/usr/bin/env python3
# Stand-in for openstack/requirements' edit-constraints (DevStack clones that repo):
# edit-constraints FILE -- NAME [REPLACEMENT], as the real one; needs both FILE and NAME.
import re
import sys

args = [a for a in sys.argv[1:] if a != "--"]
if len(args) < 2:
    sys.exit("No enough arguments given")
path, name = args[0], args[1]
replacement = args[2] if len(args) > 2 else ""


def canon(text):
    return re.sub(r"[-_.]+", "-", text).lower()


kept = []
for line in open(path).read().splitlines():
    m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", line)
    if not (m and canon(m.group(1)) == canon(name)):
        kept.append(line)
if replacement:
    kept.append(replacement)
open(path, "w").write("".join(line + "\n" for line in kept))
"""

# What stack.sh, unstack.sh and clean.sh do before they run a plugin's phase, in
# their order; the assignments after stackrc are this test's local.conf.
PROLOGUE = r"""
set -o errexit
TOP_DIR=$DEVSTACK_TREE
source "$TOP_DIR/functions"
source "$TOP_DIR/stackrc"
# local.conf: the host's paths in the temporary folder; the test's user is the stack user.
DEST=$T/opt-stack
DATA_DIR=$DEST/data
SERVICE_DIR=$DEST/status
SYSTEMD_DIR=$T/etc-systemd-system
OPENSTACKCLIENT_CONF_DIR=$T/etc-openstack
STACK_USER=$(whoami)
# stack.sh's own (without its spinner).
function echo_summary { echo "$@"; }
function echo_nolog { echo "$@"; }
setup_devstack_virtualenv
sitepackages=$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$PROJECT_SITE_PACKAGES" >"$sitepackages/zz-project-venv.pth"
source "$TOP_DIR/lib/keystone"
enable_plugin vmm-orchestrator "file://$T/src" main
fetch_plugins
run_phase source
"""


@dataclass
class Stack:
    """A temporary "host" and what each phase printed and left."""

    tmp: Path
    env: dict[str, str]
    results: dict[str, subprocess.CompletedProcess[str]] = field(default_factory=dict)

    @property
    def dest(self) -> Path:
        return self.tmp / "opt-stack"

    @property
    def clone(self) -> Path:
        return self.dest / "vmm-orchestrator"

    @property
    def venv(self) -> Path:
        return self.dest / "data" / "venv"

    @property
    def conf(self) -> Path:
        return self.tmp / "etc-vmm-orchestrator" / "vmm-orchestrator.conf"

    @property
    def hooks(self) -> Path:
        return self.tmp / "etc-libvirt-hooks"

    @property
    def units(self) -> Path:
        return self.tmp / "etc-systemd-system"

    @property
    def clouds_yaml(self) -> Path:
        return self.tmp / "etc-openstack" / "clouds.yaml"

    def calls(self, name: str) -> list[list[str]]:
        log = self.tmp / "stub-calls.tsv"
        lines = log.read_text().splitlines() if log.exists() else []
        return [line.split("\t")[1:] for line in lines if line.split("\t")[0] == name]

    def phase(self, *words: str) -> subprocess.CompletedProcess[str]:
        script = PROLOGUE
        if words == ("stack", "post-config"):
            # stack.sh writes its clouds.yaml (devstack-admin, ...) just before. As user
            # nobody: write_clouds_yaml also removes ~STACK_USER/.config/openstack/clouds.yaml.
            script += "(STACK_USER=nobody; write_clouds_yaml)\n"
        script += f"run_phase {' '.join(words)}\n"
        # Its own process group: a phase that hangs is ended with pip and git under it.
        proc = subprocess.Popen(
            ["bash", "-c", script],
            env=self.env,
            cwd=self.tmp,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        try:
            out, err = proc.communicate(timeout=PHASE_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise
        result = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
        self.results[" ".join(words)] = result
        assert result.returncode == 0, (
            f"{' '.join(words)} failed ({result.returncode})\n"
            f"stdout:\n{result.stdout[-6000:]}\nstderr:\n{result.stderr[-6000:]}"
        )
        return result

    def in_venv(self, code: str) -> str:
        result = subprocess.run(
            [str(self.venv / "bin" / "python3"), "-c", code],
            env={"PATH": os.environ["PATH"], "HOME": str(self.tmp)},
            cwd=self.tmp,  # not this work tree, whose packages "-c" would import first
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        return result.stdout


def _snapshot_work_tree(dst: Path) -> None:
    """This work tree as a git repository DevStack can clone: tracked and new files,
    as they are now (not only what is committed)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for raw in listed:
        rel = raw.decode()
        src = ROOT / rel
        if rel and src.is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@localhost"]
    for args in (["init", "-q", "-b", "main"], ["add", "-A"], ["commit", "-q", "-m", "snapshot"]):
        subprocess.run([*git, *args], cwd=dst, check=True, capture_output=True)


def _read_ini(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    parser.read(path)
    return parser


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    if not (DEVSTACK_TREE / "functions").is_file():
        pytest.fail(f"DevStack's code is not at {DEVSTACK_TREE} (the workplace's shared/devstack)")
    tmp = Path(tempfile.mkdtemp(prefix="vmm-devstack-"))
    try:
        stubs = tmp / "stub-bin"
        stubs.mkdir()
        for name, text in (("sudo", SUDO), ("systemctl", SYSTEMCTL), ("openstack", OPENSTACK)):
            (stubs / name).write_text(text)
            (stubs / name).chmod(0o755)
        requirements = tmp / "requirements"
        (requirements / ".venv" / "bin").mkdir(parents=True)
        (requirements / ".venv" / "bin" / "edit-constraints").write_text(EDIT_CONSTRAINTS)
        (requirements / ".venv" / "bin" / "edit-constraints").chmod(0o755)
        # An old pin of this project: pip cannot install the checkout unless DevStack
        # drops the project's name (read from setup.cfg) from the constraints first.
        (requirements / "upper-constraints.txt").write_text("vmm-orchestrator===0.0.1\n")
        (tmp / "src").mkdir()
        _snapshot_work_tree(tmp / "src")
        relay_src = ROOT / "etc" / "libvirt" / "hooks" / "qemu.d" / "vmm-orchestrator"
        env = {
            "PATH": f"{stubs}:{os.environ['PATH']}",
            "HOME": str(tmp),
            "LANG": "C.UTF-8",
            "T": str(tmp),
            "DEVSTACK_TREE": str(DEVSTACK_TREE),
            "STUB_DIR": str(stubs),
            "STUB_LOG": str(tmp / "stub-calls.tsv"),
            "STUB_STATE": str(tmp / "systemd-state"),
            "PROJECT_SITE_PACKAGES": sysconfig.get_paths()["purelib"],
            # DevStack's Python: the interpreter this project's .venv is made from.
            "PYTHON": sys._base_executable,
            "PIP_CACHE_DIR": str(Path.home() / ".cache" / "pip"),
            "PIP_DISABLE_PIP_VERSION_CHECK": "1",
            "GIT_CONFIG_SYSTEM": str(tmp / "gitconfig"),
            "GIT_CONFIG_GLOBAL": str(tmp / "gitconfig-global"),
            # local.conf [[local|localrc]]
            "ENABLED_SERVICES": "key,n-cpu,q-svc,vmm-agent,vmm-nva",
            "DEVSTACK_VENV": str(tmp / "opt-stack" / "data" / "venv"),
            "REQUIREMENTS_DIR": str(requirements),
            "HOST_IP": "192.0.2.11",
            "SERVICE_HOST": "192.0.2.10",
            "SERVICE_PASSWORD": "devstack-secret",
            "ADMIN_PASSWORD": "devstack-secret",
            "VMM_HOST_NAME": "cmp1",
            "VMM_CONF_DIR": str(tmp / "etc-vmm-orchestrator"),
            "VMM_CONF": str(tmp / "etc-vmm-orchestrator" / "vmm-orchestrator.conf"),
            "VMM_RUN_DIR": str(tmp / "run-vmm-orchestrator"),
            "VMM_LIBVIRT_HOOKS_DIR": str(tmp / "etc-libvirt-hooks"),
        }
        assert relay_src.is_file()
        yield Stack(tmp, env)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def test_setup_cfg_names_the_distribution_for_devstack() -> None:
    """DevStack's setup_develop runs exactly this awk on setup.cfg."""
    name = subprocess.run(
        ["awk", "/^name.*=/ {print $3}", str(ROOT / "setup.cfg")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert name == ["vmm-orchestrator"]


def test_stack_install_installs_the_package_in_develop_mode(stack: Stack) -> None:
    stack.phase("stack", "install")

    # Cloned by DevStack's git_clone, from the snapshot of this work tree.
    assert (stack.clone / "devstack" / "plugin.sh").is_file()
    # The project's own pin left the constraints: its name came from setup.cfg.
    constraints = (stack.tmp / "requirements" / "upper-constraints.txt").read_text()
    assert "vmm-orchestrator" not in constraints
    # Develop mode: imported from the clone, recorded as an editable install.
    shown = json.loads(
        stack.in_venv(
            "import json, importlib.metadata as m, vmm_orchestrator, vmm_linux;"
            "d = m.distribution('vmm-orchestrator');"
            "print(json.dumps({'core': vmm_orchestrator.__file__, 'plugin': vmm_linux.__file__,"
            "'url': json.loads(d.read_text('direct_url.json'))}))"
        )
    )
    assert shown["core"] == str(stack.clone / "vmm_orchestrator" / "__init__.py")
    assert shown["plugin"] == str(stack.clone / "plugins" / "vmm_linux" / "__init__.py")
    assert shown["url"]["dir_info"] == {"editable": True}
    assert shown["url"]["url"] == f"file://{stack.clone}"
    # The console script the services run.
    vmm = stack.venv / "bin" / "vmm"
    help_text = subprocess.run(
        [str(vmm), "--help"], cwd=stack.tmp, capture_output=True, text=True, timeout=60, check=True
    ).stdout
    assert "migrate-with-network" in help_text and "agent" in help_text
    # The relay, beside any other qemu hook.
    relay = stack.hooks / "qemu.d" / "vmm-orchestrator"
    shipped = stack.clone / "etc" / "libvirt" / "hooks" / "qemu.d" / "vmm-orchestrator"
    assert relay.read_bytes() == shipped.read_bytes()
    assert relay.stat().st_mode & 0o777 == 0o755
    assert not stack.conf.exists()  # configuration is post-config's
    assert stack.calls("openstack") == []


def test_stack_post_config_writes_the_configuration_and_the_credentials(stack: Stack) -> None:
    stack.phase("stack", "post-config")

    conf = _read_ini(stack.conf)
    assert set(conf.sections()) >= {"nva", "pipeline", "openstack", "neutron", "agent", "host:cmp1"}
    assert conf["nva"]["url"] == "http://192.0.2.10:9797"
    assert conf["nva"]["token"] == "devstack-secret"
    assert conf["openstack"]["cloud"] == "devstack-admin"
    assert conf["openstack"]["region_name"] == "RegionOne"
    assert conf["agent"]["hosts"] == "cmp1"
    assert conf["host:cmp1"]["vtep"] == "192.0.2.11"
    data_dir = stack.dest / "data" / "vmm-orchestrator"
    assert conf["pipeline"]["journal"] == str(data_dir / "journal.sqlite")
    assert stack.conf.stat().st_mode & 0o777 == 0o640  # it holds the token and a password
    relay = _read_ini(stack.hooks / "vmm-orchestrator.conf")
    assert relay["hook_relay"]["socket"] == conf["agent"]["hook_socket"]
    assert ["restart", "libvirtd"] in stack.calls("systemctl")

    # The service user, made by DevStack's create_service_user with Nova's roles.
    keystone = stack.calls("openstack")
    created = [c for c in keystone if c[2:4] == ["user", "create"]]
    assert [c[4] for c in created] == ["vmm-orchestrator"]
    added = [c for c in keystone if c[2:4] == ["role", "add"]]
    assert sorted(c[4] for c in added) == ["admin", "service"]
    assert all(c[c.index("--project") + 1] == "service" for c in added)


def test_the_command_finds_its_cloud_and_its_service_user(stack: Stack) -> None:
    """With the product's own loaders: openstacksdk finds [openstack] cloud in the
    clouds.yaml DevStack wrote; keystoneauth loads [neutron] as the service user."""
    from keystoneauth1 import loading as ks_loading
    from openstack import config as os_config

    from vmm_openstack import options as os_options
    from vmm_orchestrator.cli import check_options, load_config
    from vmm_orchestrator.nva import options as nva_options

    conf = load_config([str(stack.conf)])
    check_options(conf, [*os_options.list_opts(), *nva_options.list_opts()])
    loader = os_config.OpenStackConfig(config_files=[str(stack.clouds_yaml)])
    operator = loader.get_one(cloud=conf.openstack.cloud).config["auth"]
    assert (operator["username"], operator["project_name"]) == ("admin", "admin")
    assert operator["auth_url"] == "http://192.0.2.10/identity"
    service = ks_loading.load_auth_from_conf_options(conf, "neutron")
    assert service.auth_url == operator["auth_url"]
    assert (service._username, service._project_name) == ("vmm-orchestrator", "service")
    assert service._password == "devstack-secret"
    assert conf.neutron.region_name == "RegionOne"


def test_stack_extra_writes_devstack_units_that_run_the_installed_vmm(stack: Stack) -> None:
    stack.phase("stack", "extra")

    vmm = stack.venv / "bin" / "vmm"
    me = subprocess.run(["whoami"], capture_output=True, text=True, check=True).stdout.strip()
    for service, user, args in (("vmm-nva", None, "nva serve"), ("vmm-agent", "root", "agent")):
        unit_file = stack.units / f"devstack@{service}.service"
        unit = _read_ini(unit_file)
        exec_start = unit["Service"]["ExecStart"]
        assert exec_start == f"{vmm} --config-file {stack.conf} {args}"
        assert Path(exec_start.split()[0]).is_file()  # the script install created
        assert unit["Service"]["User"] == (user or me)
        assert unit["Install"]["WantedBy"] == "multi-user.target"
        state = Path(stack.env["STUB_STATE"])
        assert (state / f"devstack@{service}.service.enabled").exists()
        assert (state / f"devstack@{service}.service.active").exists()


def test_unstack_stops_and_disables_the_units(stack: Stack) -> None:
    stack.phase("unstack")

    state = Path(stack.env["STUB_STATE"])
    assert sorted(p.name for p in state.glob("devstack@*")) == []
    stopped = [c for c in stack.calls("systemctl") if c[0] in ("stop", "disable")]
    assert stopped == [
        ["stop", "devstack@vmm-agent.service"],
        ["disable", "devstack@vmm-agent.service"],
        ["stop", "devstack@vmm-nva.service"],
        ["disable", "devstack@vmm-nva.service"],
    ]


def test_clean_removes_what_install_post_config_and_extra_made(stack: Stack) -> None:
    devstack_clouds = stack.clouds_yaml.read_text()
    before = len(stack.calls("systemctl"))
    stack.phase("clean")

    assert not (stack.hooks / "qemu.d" / "vmm-orchestrator").exists()
    assert not (stack.hooks / "vmm-orchestrator.conf").exists()
    # libvirtd forgets the relay only when it restarts; systemd forgets removed units.
    assert stack.calls("systemctl")[before:] == [["restart", "libvirtd"], ["daemon-reload"]]
    for gone in ("etc-vmm-orchestrator", "run-vmm-orchestrator", "opt-stack/data/vmm-orchestrator"):
        assert not (stack.tmp / gone).exists(), gone
    assert list(stack.units.glob("devstack@vmm-*")) == []
    assert stack.clouds_yaml.read_text() == devstack_clouds  # DevStack's: clean.sh removes it
    assert not (stack.venv / "bin" / "vmm").exists()
    left = stack.in_venv(
        "import importlib.metadata as m\n"
        "try:\n    print(m.distribution('vmm-orchestrator').locate_file(''))\n"
        "except m.PackageNotFoundError:\n    print('gone')\n"
    )
    # Only the project's .venv copy (seen through the .pth line) may remain visible.
    assert left.strip() in ("gone", sysconfig.get_paths()["purelib"])
