"""`vmm migrate-with-network`: the whole flow, its output and every error path.

The command runs in-process (``cli.main``) with the real openstacksdk
against ``tests/fakes/openstack_api.py``, a local stand-in for Keystone,
Nova and Neutron (this machine runs no OpenStack), configured the way an
operator configures the openstack CLI: OS_* variables or clouds.yaml with
``--os-cloud``. The libvirt path runs against libvirt's real test driver
(for its error path) and against a stand-in libvirt module defined here
(for a migration that succeeds; the test driver cannot migrate).

The rules checked: exit 0 only when the VM runs at the destination and the
network has converged; every failure is one ``vmm: error:`` line naming
the phase and what was reverted, exit 2; nothing half-applied (after a
failed migration the destination's inactive binding is gone).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vmm_openstack import libvirt_driver
from vmm_openstack.directory import Nic
from vmm_openstack.driver import AgentReport, MigrationState
from vmm_openstack.progress import LineProgress, TtyProgress, make_progress
from vmm_orchestrator import cli
from vmm_orchestrator.nva.server import NvaServer
from vmm_orchestrator.nva.store import NvaStore

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fakes"))
from openstack_api import Behaviour, FakeCloud, Site, small_site

pytestmark = pytest.mark.filterwarnings(  # raised inside openstacksdk itself
    "ignore::openstack.warnings.RemovedInSDK50Warning",
    "ignore::openstack.warnings.RemovedInSDK60Warning",
)

FAST_CONF = """\
[openstack]
poll_interval = 0.02
converge_timeout = 2
abort_timeout = 3
api_timeout = 5
"""


# ----------------------------------------------------------------- helpers


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No OS_* variable, clouds.yaml or NVA token of the machine leaks into a test."""
    for key in list(os.environ):
        if key.startswith("OS_") or key == cli.TOKEN_ENV:
            monkeypatch.delenv(key)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("OS_CLIENT_CONFIG_FILE", str(tmp_path / "absent-clouds.yaml"))


@pytest.fixture
def conf_file(tmp_path: Path) -> str:
    path = tmp_path / "vmm.conf"
    path.write_text(FAST_CONF)
    return str(path)


#: The running stand-in cloud whose service user vmm() writes into the config file.
_CLOUDS: list[FakeCloud] = []


def make_site(
    monkeypatch: pytest.MonkeyPatch, env: bool = True, **behaviour: Any
) -> Iterator[Site]:
    """The usual scene; the operator's OS_* (unless ``env`` is False) are DevStack's admin."""
    with FakeCloud(Behaviour(**behaviour)) as cloud:
        if env:
            for key, value in cloud.env().items():
                monkeypatch.setenv(key, value)
        _CLOUDS.append(cloud)
        try:
            yield small_site(cloud)
        finally:
            _CLOUDS.remove(cloud)


@pytest.fixture
def site(monkeypatch: pytest.MonkeyPatch) -> Iterator[Site]:
    yield from make_site(monkeypatch)


def vmm(conf_file: str, *args: str, service_user: bool = True) -> int:
    """Run the command; the config file gets ``[neutron]`` (Nova's service user) of the
    running stand-in cloud, as an operator writes it, unless ``service_user`` is False."""
    if service_user and _CLOUDS:
        text = Path(conf_file).read_text()
        if "[neutron]" not in text:
            Path(conf_file).write_text(text + _CLOUDS[-1].neutron_section())
    return cli.main(["--config-file", conf_file, "migrate-with-network", *args])


def one_error_line(stderr: str) -> str:
    """The single ``vmm: error:`` line of ``stderr`` (fails on anything else)."""
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{stderr}"
    assert lines[0].startswith("vmm: error: "), lines[0]
    return lines[0]


def phases(out: str) -> dict[str, str]:
    """PHASE -> RESULT from the closing table of the line output."""
    table = out.split("\nPHASE ", 1)[1].split("\n\n", 1)[0].splitlines()[1:]
    return {row.split()[0]: row.split()[3] for row in table}


# -------------------------------------------------------------- success


def test_migrates_and_the_network_follows(
    site: Site, conf_file: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert vmm(conf_file, "web-1", "--host", "cmp2") == 0

    out, err = capsys.readouterr()
    assert err == ""
    assert phases(out) == {
        name: "ok" for name in ("resolve", "prestage", "migrate", "commit", "converge")
    }
    assert "web-1 runs on cmp2 and its network has converged" in out
    assert "Nova migration 1 started" in out
    assert "running" in out and "of 2.0 GiB" in out  # Nova's progress, followed
    assert site.cloud.servers[site.server_id]["OS-EXT-SRV-ATTR:host"] == "cmp2"
    assert site.cloud.port_bindings(site.port_id) == {"cmp2": "ACTIVE"}
    assert site.cloud.ports[site.port_id]["status"] == "ACTIVE"
    # The SDK negotiated the action's microversion; the stand-in checked its body.
    action = [mv for m, p, mv in site.cloud.nova_requests if p.endswith("/action")]
    assert action == [(2, 30)]


def test_json_with_clouds_yaml_and_os_cloud(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    conf_file: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for site in make_site(monkeypatch, env=False):
        path = site.cloud.write_clouds_yaml(str(tmp_path / "clouds.yaml"), cloud="lab")
        monkeypatch.setenv("OS_CLIENT_CONFIG_FILE", path)

        assert vmm(conf_file, "web-1", "--os-cloud", "lab", "--host", "cmp2", "-f", "json") == 0

        out, err = capsys.readouterr()
        doc = json.loads(out)  # one JSON document and nothing else
        assert doc["ok"] is True and err == ""
        assert [s["name"] for s in doc["steps"]] == [
            "resolve",
            "prestage",
            "migrate",
            "commit",
            "converge",
        ]
        assert all(s["state"] == "ok" and s["duration_s"] >= 0 for s in doc["steps"])
        assert doc["target"]["nics"][0]["vni"] == 1001
        assert doc["migration_progress"][-1]["percent"] == 100.0


def test_without_host_the_scheduler_picks_and_the_flow_follows(
    site: Site, conf_file: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert vmm(conf_file, site.server_id) == 0
    out = capsys.readouterr().out
    assert "Nova picked cmp2" in out
    assert site.cloud.port_bindings(site.port_id) == {"cmp2": "ACTIVE"}


def test_a_stale_binding_is_cleaned_and_the_move_goes_through(
    site: Site, conf_file: str, capsys: pytest.CaptureFixture[str]
) -> None:
    site.cloud.add_binding(site.port_id, "cmp2")  # left by an earlier failed migration

    assert vmm(conf_file, "web-1", "--host", "cmp2") == 0

    out = capsys.readouterr().out
    assert "cleaned a stale inactive binding" in out
    assert site.cloud.migrations[-1]["status"] == "completed"


def test_without_the_binding_extension_it_falls_back_saying_so(
    monkeypatch: pytest.MonkeyPatch, conf_file: str, capsys: pytest.CaptureFixture[str]
) -> None:
    for site in make_site(monkeypatch, binding_extension=False):
        assert vmm(conf_file, "web-1", "--host", "cmp2") == 0
        out = capsys.readouterr().out
        assert "no binding-extended extension" in out
        assert "plain host update" in out
        assert site.cloud.ports[site.port_id]["binding:host_id"] == "cmp2"


def test_nve_ids_that_differ_from_host_names(
    site: Site, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """[openstack] nve_hosts maps NVE ids to Nova/Neutron host names; --host is Nova's."""
    conf = tmp_path / "mapped.conf"
    conf.write_text(FAST_CONF + "nve_hosts = h1:cmp1,h2:cmp2\n")
    assert vmm(str(conf), "web-1", "--host", "cmp2") == 0
    assert "ACTIVE on cmp2" in capsys.readouterr().out


def test_no_wait_returns_once_nova_accepted(
    site: Site, conf_file: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert vmm(conf_file, "web-1", "--host", "cmp2", "--no-wait") == 0
    out = capsys.readouterr().out
    assert "not followed (--no-wait)" in out
    assert phases(out)["commit"] == "skipped"


# ---------------------------------------------------------------- errors


def test_wrong_credentials(
    monkeypatch: pytest.MonkeyPatch, conf_file: str, capsys: pytest.CaptureFixture[str]
) -> None:
    for site in make_site(monkeypatch):
        monkeypatch.setenv("OS_PASSWORD", "not-the-password")

        assert vmm(conf_file, "web-1", "--host", "cmp2") == cli.EXIT_ERROR

        line = one_error_line(capsys.readouterr().err)
        assert line == (
            f"vmm: error: authentication failed for cloud envvars at {site.cloud.auth_url}: "
            "check OS_* / clouds.yaml"
        )
        assert site.cloud.calls("GET", "/compute|/networking") == []


def test_wrong_credentials_in_clouds_yaml_name_the_cloud(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    conf_file: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for site in make_site(monkeypatch, env=False):
        path = site.cloud.write_clouds_yaml(str(tmp_path / "c.yaml"), cloud="prod", password="x")
        monkeypatch.setenv("OS_CLIENT_CONFIG_FILE", path)
        monkeypatch.setenv("OS_CLOUD", "prod")
        assert vmm(conf_file, "web-1") == cli.EXIT_ERROR
        line = one_error_line(capsys.readouterr().err)
        assert line.startswith("vmm: error: authentication failed for cloud prod at http://")


def test_no_cloud_configured(conf_file: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert vmm(conf_file, "web-1") == cli.EXIT_ERROR
    line = one_error_line(capsys.readouterr().err)
    assert "no OpenStack cloud is configured" in line and "--os-cloud" in line


def test_unknown_cloud_name(conf_file: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert vmm(conf_file, "web-1", "--os-cloud", "nowhere") == cli.EXIT_ERROR
    assert "cloud nowhere is not in clouds.yaml" in one_error_line(capsys.readouterr().err)


def test_unknown_server(site: Site, conf_file: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert vmm(conf_file, "web-9", "--host", "cmp2") == cli.EXIT_ERROR
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith("vmm: error: phase resolve failed: no server web-9 in cloud envvars")
    # Two logins (the operator's, [neutron]'s service user) and nothing else posted.
    assert site.cloud.calls("POST", ".") == ["/identity/v3/auth/tokens"] * 2


def test_a_migration_that_ends_in_error_is_reverted(
    monkeypatch: pytest.MonkeyPatch, conf_file: str, capsys: pytest.CaptureFixture[str]
) -> None:
    for site in make_site(monkeypatch, migration_error=True):
        assert vmm(conf_file, "web-1", "--host", "cmp2") == cli.EXIT_ERROR

        out, err = capsys.readouterr()
        line = one_error_line(err)
        assert "phase migrate failed: Nova migration 1 ended in failed" in line  # as real Nova
        assert "(Live migration failed: guest memory copy was interrupted)" in line  # Nova's why
        assert f"reverted: deleted the inactive binding of port {site.port_id[:8]} on cmp2" in line
        assert "web-1 still runs on cmp1" in line
        assert phases(out)["migrate"] == "failed" and phases(out)["revert"] == "ok"
        # Nova's rollback leaked the binding; the command removed it.
        assert site.cloud.port_bindings(site.port_id) == {"cmp1": "ACTIVE"}


def test_a_failure_with_json_prints_the_document_and_one_error_line(
    monkeypatch: pytest.MonkeyPatch, conf_file: str, capsys: pytest.CaptureFixture[str]
) -> None:
    for site in make_site(monkeypatch, migration_error=True):
        assert vmm(conf_file, "web-1", "--host", "cmp2", "-f", "json") == cli.EXIT_ERROR
        out, err = capsys.readouterr()
        doc = json.loads(out)
        assert doc["ok"] is False
        assert doc["error"] in one_error_line(err)
        assert doc["reverted"] == [
            f"deleted the inactive binding of port {site.port_id[:8]} on cmp2"
        ]
        assert {s["name"]: s["state"] for s in doc["steps"]}["migrate"] == "failed"


def test_a_migration_that_never_finishes_is_aborted_after_the_timeout(
    monkeypatch: pytest.MonkeyPatch, conf_file: str, capsys: pytest.CaptureFixture[str]
) -> None:
    for site in make_site(monkeypatch, never_finish=True):
        started = time.monotonic()
        assert vmm(conf_file, "web-1", "--host", "cmp2", "--timeout", "0.3") == cli.EXIT_ERROR
        assert time.monotonic() - started < 10

        line = one_error_line(capsys.readouterr().err)
        assert "phase migrate failed: Nova migration 1 did not finish within 0.3 s" in line
        assert "it was aborted (cancelled)" in line
        assert "reverted: deleted the inactive binding" in line
        assert site.cloud.migrations[-1]["status"] == "cancelled"
        assert site.cloud.port_bindings(site.port_id) == {"cmp1": "ACTIVE"}


def test_a_port_the_destination_never_wires_fails_convergence_without_moving_back(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    conf = tmp_path / "short.conf"
    conf.write_text(FAST_CONF.replace("converge_timeout = 2", "converge_timeout = 0.3"))
    for site in make_site(monkeypatch, agent_never_wires=True):
        assert vmm(str(conf), "web-1", "--host", "cmp2") == cli.EXIT_ERROR
        line = one_error_line(capsys.readouterr().err)
        assert "phase converge failed" in line and "not ACTIVE" in line
        assert "left as is: web-1 runs on cmp2" in line
        assert site.cloud.port_bindings(site.port_id) == {"cmp2": "ACTIVE"}


def test_a_destination_neutron_cannot_bind_is_refused_before_nova_starts(
    site: Site, conf_file: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert vmm(conf_file, "web-1", "--host", "cmp9") == cli.EXIT_ERROR
    line = one_error_line(capsys.readouterr().err)
    assert "phase prestage failed: Neutron cannot bind port" in line
    assert site.cloud.migrations == []
    assert site.cloud.port_bindings(site.port_id) == {"cmp1": "ACTIVE"}


def test_without_the_service_user_nova_is_not_started_and_the_role_is_named(
    site: Site, conf_file: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """DevStack's admin alone: Neutron's policy refuses the binding (as the real one does,
    tests/openstack); Nova's migration is never started, nothing is left."""
    assert vmm(conf_file, "web-1", "--host", "cmp2", service_user=False) == cli.EXIT_ERROR
    line = one_error_line(capsys.readouterr().err)
    assert (
        f"phase prestage failed: Neutron refused binding port {site.port_id} on cmp2 "
        "(inactive) for cloud envvars (HTTP 403): under Neutron's default policy it needs "
        "the service role; reverted: nothing; web-1 still runs on cmp1" in line
    )
    assert "set [neutron] in vmm-orchestrator.conf to Nova's service user" in line
    assert site.cloud.migrations == []
    assert site.cloud.port_bindings(site.port_id) == {"cmp1": "ACTIVE"}


def test_a_bad_service_user_section_names_what_it_lacks(
    site: Site, conf_file: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with open(conf_file, "a", encoding="utf-8") as fh:
        fh.write(f"[neutron]\nauth_type = password\nauth_url = {site.cloud.auth_url}\n")
    assert vmm(conf_file, "web-1", "--host", "cmp2") == cli.EXIT_ERROR
    line = one_error_line(capsys.readouterr().err)
    assert "vmm: error: [neutron] lacks username, password" in line
    assert "write [neutron] like nova.conf's" in line
    assert site.cloud.migrations == []


def test_a_wrong_service_user_password_names_the_section(
    site: Site, conf_file: str, capsys: pytest.CaptureFixture[str]
) -> None:
    section = site.cloud.neutron_section().replace(site.cloud.users["nova"][0], "wrong")
    with open(conf_file, "a", encoding="utf-8") as fh:
        fh.write(section)
    assert vmm(conf_file, "web-1", "--host", "cmp2") == cli.EXIT_ERROR
    line = one_error_line(capsys.readouterr().err)
    assert (
        "vmm: error: authentication failed for the [neutron] service user nova at "
        f"{site.cloud.auth_url}: check [neutron] in vmm-orchestrator.conf" in line
    )
    assert site.cloud.migrations == []


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--libvirt-uri", "test:///default"], "--libvirt-uri given 1 time(s)"),
        (
            ["--libvirt-uri", "a", "--libvirt-uri", "b", "--no-wait"],
            "--no-wait works with Nova only",
        ),
        (["--directory", "nva"], "--directory is for --libvirt-uri migrations"),
        (["--timeout", "0"], "argument --timeout: '0': give a number of seconds > 0"),
        (["--wait", "--no-wait"], "not allowed with argument"),
    ],
)
def test_bad_arguments(
    args: list[str], expected: str, conf_file: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as code:
        status = vmm(conf_file, "web-1", *args)
        raise SystemExit(status)
    assert code.value.code == cli.EXIT_ERROR
    assert expected in one_error_line(capsys.readouterr().err)


def test_a_bad_option_value_names_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bad.conf"
    path.write_text("[openstack]\nmigration_timeout = soon\n")
    assert vmm(str(path), "web-1") == cli.EXIT_ERROR
    line = one_error_line(capsys.readouterr().err)
    assert "[openstack] migration_timeout = soon" in line


def test_the_agents_phase_reports_are_shown(
    site: Site,
    conf_file: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A PhaseFeed (the libvirt plugin's agents) adds its pipeline reports to the display."""
    from vmm_openstack import command

    class Feed:
        def reports(self, server_id: str, hosts: Any) -> list[AgentReport]:
            assert server_id == site.server_id and "cmp2" in hosts
            return [AgentReport("cmp2", "RESUMED", True, (("announce", 4.0, "ok"),))]

    monkeypatch.setattr(command, "load_feed", lambda conf: Feed())
    assert vmm(conf_file, "web-1", "--host", "cmp2") == 0
    out = capsys.readouterr().out
    assert out.count("cmp2 RESUMED: ok (announce 4 ms ok)") == 1


# ----------------------------------------------------------------- libvirt


def test_libvirt_test_driver_error_path_reverts_the_binding(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    conf_file: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Real libvirt-python and libvirt's test driver, which cannot migrate peer-to-peer."""
    for site in make_site(monkeypatch):
        net = site.network_id
        site.cloud.add_host("h2")
        _, ports = site.cloud.add_server("test", "vm", [(net, "aa:bb:cc:dd:ee:ff", ["10.0.0.9"])])
        empty = tmp_path / "empty-node.xml"
        empty.write_text("<node>\n</node>\n")

        status = vmm(
            conf_file,
            "test",
            "--libvirt-uri",
            "test:///default",
            "--libvirt-uri",
            f"test://{empty}",
            "--host",
            "h2",
        )

        out, err = capsys.readouterr()
        assert status == cli.EXIT_ERROR
        line = one_error_line(err)
        assert "phase migrate failed: libvirt migration libvirt:" in line
        assert "p2p migration is not supported" in line
        assert f"deleted the inactive binding of port {ports[0][:8]} on h2" in line
        assert "inactive binding on h2" in out  # it was pre-staged first
        assert site.cloud.port_bindings(ports[0]) == {"vm": "ACTIVE"}


class StandInLibvirt:
    """A stand-in for the libvirt module: two hosts, one domain, a migration that copies
    its memory in three polls. libvirt's test driver cannot migrate, so the success
    path of the libvirt driver runs against this."""

    VIR_MIGRATE_LIVE = 1
    VIR_MIGRATE_PEER2PEER = 2
    VIR_MIGRATE_PERSIST_DEST = 8
    VIR_MIGRATE_UNDEFINE_SOURCE = 16
    VIR_MIGRATE_NON_SHARED_DISK = 64

    class libvirtError(Exception):
        def get_error_message(self) -> str:
            return str(self)

    def __init__(self) -> None:
        self.where = {"vm-1": "qemu://h1/system"}
        self.flags: int | None = None
        self.done = threading.Event()
        lv = self

        class Domain:
            def __init__(self, uri: str) -> None:
                self.uri = uri
                self.polls = 0

            def name(self) -> str:
                return "vm-1"

            def UUIDString(self) -> str:
                return "5f0c1d2e-0000-4000-8000-000000000001"

            def isActive(self) -> bool:
                return lv.where["vm-1"] == self.uri

            def XMLDesc(self, _flags: int) -> str:
                return (
                    "<domain><devices><interface type='bridge'>"
                    "<mac address='52:54:00:00:00:01'/></interface></devices></domain>"
                )

            def jobStats(self) -> dict[str, int]:
                self.polls += 1
                done = min(3, self.polls)
                return {"memory_total": 3 << 30, "memory_processed": done << 30}

            def migrateToURI3(self, uri: str, _params: dict[str, Any], flags: int) -> None:
                lv.flags = flags
                while self.polls < 3:
                    time.sleep(0.01)
                lv.where["vm-1"] = uri

            def abortJob(self) -> None:
                raise lv.libvirtError("no job")

        class Conn:
            def __init__(self, uri: str) -> None:
                self.uri = uri

            def getHostname(self) -> str:
                return self.uri.split("/")[2]

            def lookupByName(self, name: str) -> Domain:
                if name != "vm-1":
                    raise lv.libvirtError(f"Domain not found: no domain with name '{name}'")
                return Domain(self.uri)

            def lookupByUUIDString(self, uuid: str) -> Domain:
                if lv.where["vm-1"] != self.uri:
                    raise lv.libvirtError("Domain not found")
                return Domain(self.uri)

            def close(self) -> None:
                pass

        self.Conn = Conn

    def open(self, uri: str) -> Any:
        return self.Conn(uri)


@pytest.fixture
def nva(tmp_path: Path) -> Iterator[NvaServer]:
    store = NvaStore(":memory:")
    server = NvaServer(store, "nva-token", "127.0.0.1", 0)
    server.start()
    try:
        store.register_nve("h1", "192.0.2.1", [100])
        store.register_nve("h2", "192.0.2.2", [100])
        store.add_endpoint(100, "52:54:00:00:00:01", ["10.0.0.1"], [], "h1")
        stop = threading.Event()

        def agents() -> None:  # the NVE agents of h1 and h2, acking what they see
            while not stop.wait(0.02):
                for nve in ("h1", "h2"):
                    store.ack(nve, store.revision)

        thread = threading.Thread(target=agents, daemon=True)
        thread.start()
        yield server
        stop.set()
        thread.join()
    finally:
        server.stop()
        store.close()


def test_libvirt_migration_with_the_embedded_nva(
    nva: NvaServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """No cloud at all: libvirt moves the VM, the embedded NVA is the directory."""
    stand_in = StandInLibvirt()
    monkeypatch.setattr(libvirt_driver, "load_libvirt", lambda: stand_in)
    monkeypatch.setenv(cli.TOKEN_ENV, "nva-token")
    conf = tmp_path / "vmm.conf"
    conf.write_text(FAST_CONF + f"[nva]\nurl = {nva.url}\n")

    status = vmm(
        str(conf),
        "vm-1",
        "--libvirt-uri",
        "qemu://h1/system",
        "--libvirt-uri",
        "qemu://h2/system",
        "--block-migration",
    )

    out, err = capsys.readouterr()
    assert (status, err) == (0, ""), err
    assert "vm-1 runs on h2 and its network has converged" in out
    assert stand_in.flags == 1 | 2 | 8 | 16 | 64
    endpoint = nva.store.get_endpoint(100, "52:54:00:00:00:01")
    assert (endpoint["nve"], endpoint["state"], endpoint["seq"]) == ("h2", "active", 1)


def test_libvirt_and_openstacksdk_are_imported_only_when_used() -> None:
    """`vmm --help` and other commands must not pay for (or need) them."""
    code = (
        "import sys, vmm_orchestrator.cli as c\n"
        "from vmm_openstack import command, libvirt_driver, migrate, neutron, nova, progress\n"
        "c.build_parser({'m': command.MigrateWithNetworkCommand()})\n"
        "print('libvirt' in sys.modules, 'openstack' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.split() == ["False", "False"], result.stderr


# ---------------------------------------------------------------- display


def _drive(progress: Any) -> None:
    progress.title(
        server="web-1", driver="Nova", where="http://n", directory="d", migration_id="vmm-x"
    )
    progress.begin("resolve")
    progress.event("resolve", "port 1 on private")
    progress.end("resolve", "ok", "web-1 on cmp1")
    progress.begin("migrate")
    for done in (0, 1, 2):
        progress.migration(MigrationState("1", "running", "running", "cmp2", 2 << 30, done << 30))
    progress.agent(AgentReport("cmp2", "RESUMED", True, (("announce", 3.2, "ok"),)))
    progress.end("migrate", "ok", "completed")
    progress.finish(True, "web-1 runs on cmp2")


def test_a_terminal_gets_a_block_redrawn_in_place() -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    stream = Tty()
    progress = make_progress("table", stream)
    assert isinstance(progress, TtyProgress)
    _drive(progress)
    text = stream.getvalue()
    assert "\x1b[" in text and "F\x1b[J" in text  # cursor up, clear: redrawn
    assert " + resolve" in text and " + migrate" in text
    assert "cmp2 RESUMED: ok (announce 3 ms ok)" in text
    assert text.rstrip().endswith("web-1 runs on cmp2")


def test_a_pipe_gets_plain_lines_and_a_table() -> None:
    stream = io.StringIO()
    progress = make_progress("table", stream)
    assert isinstance(progress, LineProgress)
    _drive(progress)
    text = stream.getvalue()
    assert "\x1b" not in text
    assert "running 50% (1.0 GiB of 2.0 GiB) -> cmp2" in text
    assert phases(text) == {"resolve": "ok", "migrate": "ok"}


def test_nic_labels() -> None:
    assert Nic("52:54:00:00:00:01", 1, port_id="1234567890").label == "port 12345678"
    assert Nic("52:54:00:00:00:01", 1).label == "NIC 52:54:00:00:00:01"
