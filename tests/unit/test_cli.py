"""The `vmm` command line: every operator mistake ends in one clear line.

The rule: bad input gets ONE line on stderr, ``vmm: error: <what> (<what to
do>)``, exit status 2, no traceback, and nothing half-applied. Most cases run
the installed ``vmm`` script (as an operator would); the others call
``cli.main`` in-process where a fake is needed (a non-root user, a lab that
must not be built).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from oslo_config import cfg

from vmm_orchestrator import cli
from vmm_orchestrator.errors import VmmError
from vmm_orchestrator.nva.server import NvaServer
from vmm_orchestrator.nva.store import NvaStore

VMM = str(Path(sys.executable).parent / "vmm")
TOKEN = "cli-test-token"
VNI = 100


# ----------------------------------------------------------------- helpers


def one_error_line(stderr: str) -> str:
    """The single ``vmm: error:`` line of ``stderr`` (fails on anything else)."""
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{stderr}"
    assert lines[0].startswith("vmm: error: "), lines[0]
    return lines[0]


def netns_names() -> set[str]:
    try:
        return set(os.listdir("/run/netns"))
    except FileNotFoundError:
        return set()


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != cli.TOKEN_ENV}
    env.update(extra)
    return env


def run_vmm(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> tuple[subprocess.CompletedProcess[str], int]:
    """Run the installed `vmm`; (result, its pid), the pid to find namespaces it made."""
    with subprocess.Popen(
        [VMM, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env if env is not None else clean_env(),
    ) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            pytest.fail(f"vmm {' '.join(args)} did not finish: {out}\n{err}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), proc.pid


def write_conf(tmp_path: Path, text: str, name: str = "vmm.conf") -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# ------------------------------------------- errors through the real script

# (id, config file text or None, arguments after --config-file, words the line must hold)
LAB_DEMO_ERRORS = [
    (
        "downtime-not-a-number",
        "[lab]\ndowntime_ms = abc\n",
        ["lab", "demo"],
        ["[lab] downtime_ms = abc", "vmm.conf", "0.0 to 10000.0"],
    ),
    (
        "unknown-mode",
        "[lab]\nmodes = none,bogus\n",
        ["lab", "demo"],
        ["[lab] modes", "bogus", "none, rarp, orchestrated"],
    ),
    (
        "empty-modes",
        "[lab]\nmodes =\n",
        ["lab", "demo"],
        ["[lab] modes is empty"],
    ),
    (
        "announce-mode-loud",
        "[announce]\nmode = loud\n",
        ["lab", "demo"],
        ["[announce] mode = loud", "full, rarp, none"],
    ),
    (
        "announce-schedule-negative",
        "[announce]\nschedule_ms = 0,-50\n",
        ["lab", "demo"],
        ["[announce] schedule_ms = 0,-50"],
    ),
    (
        "unknown-key",
        "[lab]\ndowntime-ms = 5\n",
        ["lab", "demo"],
        ["unknown option", "[lab] downtime-ms", "downtime_ms"],
    ),
    (
        "same-vxlan-ports",
        "[linux_nve]\ninflight_port = 4789\n",
        ["lab", "demo"],
        ["inflight_port", "vxlan_port", "4789"],
    ),
    (
        "unknown-stage",
        "[lab]\nmodes = orchestrated\n[pipeline]\nstages = nva_prestage,bogus\n",
        ["lab", "demo"],
        ["unknown stage", "bogus", "available stages"],
    ),
    (
        "bad-stage-option",
        "[lab]\nmodes = orchestrated\n[stage_hold_timer]\nhold_time = soon\n",
        ["lab", "demo"],
        ["[stage_hold_timer] hold_time = soon"],
    ),
    (
        "malformed-syntax",
        "[lab\ndowntime_ms = 5\n",
        ["lab", "demo"],
        ["cannot parse config file", "vmm.conf", "fix its syntax"],
    ),
    (
        "downtime-flag-negative",
        None,
        ["lab", "demo", "--downtime-ms", "-5"],
        ["--downtime-ms -5.0", "[lab] downtime_ms", "0.0 to 10000.0"],
    ),
    (
        "rate-flag-too-low",
        None,
        ["lab", "demo", "--rate", "1"],
        ["--rate 1", "[lab] probe_rate", "10 to 5000"],
    ),
    (
        "modes-flag-unknown",
        None,
        ["lab", "demo", "--modes", "none,loud"],
        ["--modes", "loud"],
    ),
    (
        "modes-flag-empty-item",
        None,
        ["lab", "demo", "--modes", "none,"],
        ["--modes", "empty mode name"],
    ),
    (
        "unknown-vm",
        None,
        ["lab", "demo", "--vm", "vm9"],
        ["--vm vm9", "no such lab VM", "vm1, vm2, vm3"],
    ),
    (
        "vm-on-destination",
        None,
        ["lab", "demo", "--vm", "vm4"],
        ["--vm vm4", "destination h2", "vm1, vm2, vm3"],
    ),
    (
        "json-in-missing-directory",
        None,
        ["lab", "demo", "--json", "/nonexistent-vmm-dir/out.json"],
        ["--json", "/nonexistent-vmm-dir", "does not exist"],
    ),
]


@pytest.mark.parametrize(
    ("conf_text", "args", "words"),
    [case[1:] for case in LAB_DEMO_ERRORS],
    ids=[case[0] for case in LAB_DEMO_ERRORS],
)
def test_lab_demo_refuses_bad_input_before_building_anything(
    tmp_path: Path, conf_text: str | None, args: list[str], words: list[str]
) -> None:
    before = netns_names()
    prefix_args = ["--config-file", write_conf(tmp_path, conf_text)] if conf_text else []
    res, pid = run_vmm(*prefix_args, *args)
    line = one_error_line(res.stderr)
    assert res.returncode == 2, res
    for word in words:
        assert word in line, f"{word!r} not in {line!r}"
    # The demo prints this before it builds each lab, and names its
    # namespaces after its pid (topology.new_prefix): neither may show up.
    assert "running mode" not in res.stdout
    ours = f"vmm{pid % 10000:04d}"
    assert not {n for n in netns_names() - before if n.startswith(ours)}


def test_config_file_that_does_not_exist(tmp_path: Path) -> None:
    missing = tmp_path / "nope.conf"
    for args in (["lab", "demo"], ["nva", "status"], ["nva", "serve"]):
        res, _ = run_vmm("--config-file", str(missing), *args)
        line = one_error_line(res.stderr)
        assert res.returncode == 2
        assert f"config file {missing} does not exist" in line
        assert "--config-file" in line
    assert not missing.exists()


def test_config_file_that_is_a_directory(tmp_path: Path) -> None:
    res, _ = run_vmm("--config-file", str(tmp_path), "nva", "status")
    assert res.returncode == 2
    assert "is not a file" in one_error_line(res.stderr)


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("[nva\ntoken = x\n", ["cannot parse config file", "fix its syntax"]),
        ("[nva]\ntoken = x\nrequest_timeout = later\n", ["[nva] request_timeout = later"]),
        ("[nva]\ntoken = x\nurl = ftp://example.org\n", ["[nva] url = ftp://example.org"]),
        ("[nva]\ntoken = x\ntimeout = 3\n", ["unknown option", "[nva] timeout"]),
    ],
    ids=["syntax", "timeout-not-a-number", "url-scheme", "unknown-key"],
)
def test_nva_status_refuses_a_bad_config_file(tmp_path: Path, text: str, words: list[str]) -> None:
    res, _ = run_vmm("--config-file", write_conf(tmp_path, text), "nva", "status")
    line = one_error_line(res.stderr)
    assert res.returncode == 2
    for word in words:
        assert word in line, line
    assert res.stdout == ""


@pytest.mark.parametrize(
    ("args", "words"),
    [
        ([], ["required: {agent,lab,migrate-with-network,migration,nva,state}", "vmm --help"]),
        (["lab", "demo", "--vm"], ["--vm", "expected one argument"]),
        (["lab", "demo", "--rate", "fast"], ["--rate", "invalid int value"]),
        (["nva", "status", "-f", "xml"], ["--format", "xml", "vmm nva status --help"]),
        (["nva"], ["required: {serve,status,endpoint,nve}", "vmm nva --help"]),
        (["lab"], ["required: {demo,state-demo,cleanup}", "vmm lab --help"]),
    ],
    ids=[
        "no-command",
        "vm-without-name",
        "rate-not-int",
        "bad-format",
        "no-nva-command",
        "no-lab-command",
    ],
)
def test_usage_errors_are_one_line(args: list[str], words: list[str]) -> None:
    res, _ = run_vmm(*args)
    line = one_error_line(res.stderr)
    assert res.returncode == 2
    for word in words:
        assert word in line, line


# --------------------------------------------------------------- nva serve


def test_nva_serve_without_a_token(tmp_path: Path) -> None:
    db = tmp_path / "nva.sqlite"
    conf = write_conf(tmp_path, f"[nva]\nbind_port = 0\ndatabase = {db}\n")
    res, _ = run_vmm("--config-file", conf, "nva", "serve", timeout=20)
    line = one_error_line(res.stderr)
    assert res.returncode == 2
    assert "[nva] token is not set" in line
    assert res.stdout == ""
    assert not db.exists()


def test_nva_serve_with_a_database_in_a_missing_directory(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such"
    conf = write_conf(tmp_path, f"[nva]\ntoken = {TOKEN}\nbind_port = 0\n")
    res, _ = run_vmm(
        "--config-file", conf, "nva", "serve", "--database", str(missing / "nva.sqlite")
    )
    line = one_error_line(res.stderr)
    assert res.returncode == 2
    assert f"directory {missing} does not exist" in line
    assert "[nva] database" in line
    assert not (tmp_path / "no").exists()


def test_nva_serve_with_a_bad_port_flag(tmp_path: Path) -> None:
    db = tmp_path / "nva.sqlite"
    conf = write_conf(tmp_path, f"[nva]\ntoken = {TOKEN}\ndatabase = {db}\n")
    res, _ = run_vmm("--config-file", conf, "nva", "serve", "--bind-port", "70000")
    line = one_error_line(res.stderr)
    assert res.returncode == 2
    assert "--bind-port 70000" in line and "0 to 65535" in line
    assert not db.exists()


def test_nva_serve_on_a_busy_port_leaves_no_database(tmp_path: Path) -> None:
    db = tmp_path / "nva.sqlite"
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        conf = write_conf(
            tmp_path, f"[nva]\ntoken = {TOKEN}\nbind_port = {port}\ndatabase = {db}\n"
        )
        res, _ = run_vmm("--config-file", conf, "nva", "serve")
    line = one_error_line(res.stderr)
    assert res.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in line
    assert "serving" not in res.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vmm.conf"]


def test_nva_serve_runs_answers_status_and_stops_on_sigterm(tmp_path: Path) -> None:
    db = tmp_path / "nva.sqlite"
    conf = write_conf(tmp_path, f"[nva]\ntoken = {TOKEN}\nbind_port = 0\ndatabase = {db}\n")
    proc = subprocess.Popen(
        [VMM, "--config-file", conf, "nva", "serve"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=clean_env(),
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline().strip()
        assert first.startswith("vmm nva: serving on http://127.0.0.1:"), first
        url = first.rsplit(" ", 1)[1]
        assert not url.endswith(":0")  # the real port, not the one asked for
        res, _ = run_vmm(
            "nva", "status", "--url", url, "-f", "json", env=clean_env(VMM_NVA_TOKEN=TOKEN)
        )
        assert res.returncode == 0, res.stderr
        assert json.loads(res.stdout) == {
            "url": url,
            "revision": 0,
            "nves": [],
            "vns": [],
            "frozen": [],
        }
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=10)
        assert proc.returncode == 0, err
        assert "Traceback" not in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert db.exists()


# -------------------------------------------------------------- nva status


@pytest.fixture
def nva() -> Iterator[NvaServer]:
    """A directory with two NVEs (one acked) and three endpoints on two VNs."""
    store = NvaStore(":memory:")
    server = NvaServer(store, TOKEN, "127.0.0.1", 0)
    server.start()
    try:
        store.register_nve("h1", "192.0.2.1", [VNI])
        store.register_nve("h2", "192.0.2.2", [VNI, 200])
        store.add_endpoint(VNI, "52:54:00:00:00:01", ["10.0.0.1"], [], "h1")
        store.add_endpoint(VNI, "52:54:00:00:00:02", ["10.0.0.2"], [], "h2")
        store.add_endpoint(200, "52:54:00:00:00:03", ["10.0.1.3"], [], "h2")
        store.ack("h1", store.revision)
        yield server
    finally:
        server.stop()
        store.close()


def status_conf(tmp_path: Path, url: str, token: str | None = TOKEN) -> str:
    text = f"[nva]\nurl = {url}\n" + (f"token = {token}\n" if token else "")
    return write_conf(tmp_path, text)


def test_nva_status_json(
    nva: NvaServer, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: Any
) -> None:
    monkeypatch.delenv(cli.TOKEN_ENV, raising=False)
    conf = status_conf(tmp_path, nva.url)
    assert cli.main(["--config-file", conf, "nva", "status", "-f", "json"]) == 0
    out = json.loads(capsys.readouterr().out)
    revision = nva.store.revision
    assert out["url"] == nva.url
    assert out["revision"] == revision
    assert [(n["id"], n["vtep"], n["vnis"], n["acked_revision"]) for n in out["nves"]] == [
        ("h1", "192.0.2.1", [VNI], revision),
        ("h2", "192.0.2.2", [VNI, 200], 0),
    ]
    assert out["vns"] == [{"vni": VNI, "endpoints": 2}, {"vni": 200, "endpoints": 1}]


def test_nva_status_table(
    nva: NvaServer, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: Any
) -> None:
    monkeypatch.delenv(cli.TOKEN_ENV, raising=False)
    conf = status_conf(tmp_path, nva.url)
    assert cli.main(["--config-file", conf, "nva", "status"]) == 0
    out = capsys.readouterr().out
    revision = nva.store.revision
    assert f"directory {nva.url} at revision {revision}" in out
    rows = [line.split() for line in out.splitlines()]
    assert ["h1", "192.0.2.1", str(VNI), str(revision)] in rows
    assert ["h2", "192.0.2.2", f"{VNI},200", "0"] in rows
    assert [str(VNI), "2"] in rows
    assert ["200", "1"] in rows


def test_nva_status_token_from_the_environment_wins(
    nva: NvaServer, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: Any
) -> None:
    conf = status_conf(tmp_path, nva.url, token="wrong-token")
    monkeypatch.setenv(cli.TOKEN_ENV, TOKEN)
    assert cli.main(["--config-file", conf, "nva", "status", "-f", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["revision"] == nva.store.revision


def test_nva_status_url_flag_overrides_the_config(
    nva: NvaServer, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: Any
) -> None:
    monkeypatch.delenv(cli.TOKEN_ENV, raising=False)
    conf = status_conf(tmp_path, f"http://127.0.0.1:{closed_port()}")
    args = ["--config-file", conf, "nva", "status", "--url", nva.url, "-f", "json"]
    assert cli.main(args) == 0
    assert json.loads(capsys.readouterr().out)["url"] == nva.url


@pytest.mark.parametrize("source", ["config", "environment"])
def test_nva_status_with_a_refused_token(
    nva: NvaServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: Any,
    source: str,
) -> None:
    if source == "config":
        monkeypatch.delenv(cli.TOKEN_ENV, raising=False)
        conf = status_conf(tmp_path, nva.url, token="wrong-token")
    else:
        monkeypatch.setenv(cli.TOKEN_ENV, "wrong-token")
        conf = status_conf(tmp_path, nva.url, token=None)
    assert cli.main(["--config-file", conf, "nva", "status"]) == 2
    captured = capsys.readouterr()
    line = one_error_line(captured.err)
    assert f"the directory at {nva.url} refused the token" in line
    assert cli.TOKEN_ENV in line and "[nva] token" in line
    assert captured.out == ""


def test_nva_status_without_any_token(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: Any
) -> None:
    monkeypatch.delenv(cli.TOKEN_ENV, raising=False)
    conf = status_conf(tmp_path, "http://127.0.0.1:9", token=None)
    assert cli.main(["--config-file", conf, "nva", "status"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "no token" in line and cli.TOKEN_ENV in line


def test_nva_status_with_an_empty_token_variable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: Any
) -> None:
    monkeypatch.setenv(cli.TOKEN_ENV, "")
    conf = status_conf(tmp_path, "http://127.0.0.1:9")
    assert cli.main(["--config-file", conf, "nva", "status"]) == 2
    assert f"{cli.TOKEN_ENV} is set but empty" in one_error_line(capsys.readouterr().err)


def test_nva_status_against_a_closed_port(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{closed_port()}"
    res, _ = run_vmm(
        "--config-file",
        status_conf(tmp_path, url),
        "nva",
        "status",
        timeout=30,
    )
    line = one_error_line(res.stderr)
    assert res.returncode == 2
    assert f"cannot reach the NVA at {url}" in line
    assert "is `vmm nva serve` running there?" in line and "[nva] url" in line
    assert res.stdout == ""


# ------------------------------------------------------ lab, in-process fakes


@pytest.fixture
def no_lab(monkeypatch: Any) -> list[str]:
    """Make building a lab fail the test: validation must stop first."""
    from vmm_lab.linux import demo

    built: list[str] = []

    def refuse(*args: Any, **kwargs: Any) -> Any:
        built.append("lab_site")
        raise AssertionError("a lab was built despite bad input")

    monkeypatch.setattr(demo, "lab_site", refuse)
    return built


def test_lab_demo_as_non_root(
    monkeypatch: Any, capsys: pytest.CaptureFixture[str], no_lab: list[str]
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert cli.main(["lab", "demo"]) == 2
    captured = capsys.readouterr()
    line = one_error_line(captured.err)
    assert "the lab needs root" in line and "run it as root" in line
    assert captured.out == ""
    assert no_lab == []


def test_lab_cleanup_as_non_root(monkeypatch: Any, capsys: pytest.CaptureFixture[str]) -> None:
    from vmm_lab.linux import cli as lab_cli

    removed: list[str] = []

    def remove(prefix: str) -> list[str]:
        removed.append(prefix)
        return []

    monkeypatch.setattr(lab_cli, "remove_namespaces", remove)
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert cli.main(["lab", "cleanup", "vmm1234abcd"]) == 2
    assert "the lab needs root" in one_error_line(capsys.readouterr().err)
    assert removed == []


@pytest.mark.parametrize(
    "text",
    [
        "[lab]\ndowntime_ms = abc\n",
        "[lab]\nmodes = none,bogus\n",
        "[announce]\nmode = loud\n",
        "[nve_agent]\nwatch_timeout = 0\n",
    ],
    ids=["downtime", "modes", "announce", "agent-below-min"],
)
def test_lab_demo_bad_config_stops_before_the_lab(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    no_lab: list[str],
    text: str,
) -> None:
    assert cli.main(["--config-file", write_conf(tmp_path, text), "lab", "demo"]) == 2
    captured = capsys.readouterr()
    one_error_line(captured.err)
    assert captured.out == ""
    assert no_lab == []


def test_lab_demo_good_input_reaches_the_demo(
    tmp_path: Path, monkeypatch: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """The checks do not refuse good input, and the flags reach the demo."""
    from vmm_lab.linux import cli as lab_cli
    from vmm_lab.linux import demo

    seen: dict[str, Any] = {}

    def fake_run_demo(
        conf: cfg.ConfigOpts,
        json_out: str | None = None,
        vm: str = "vm1",
        picture_out: str | None = None,
    ) -> int:
        seen.update(
            modes=list(conf.lab.modes),
            downtime_ms=conf.lab.downtime_ms,
            probe_rate=conf.lab.probe_rate,
            mode=conf.announce.mode,
            json_out=json_out,
        )
        return 0

    monkeypatch.setattr(demo, "run_demo", fake_run_demo)
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(lab_cli.shutil, "which", lambda name: f"/usr/sbin/{name}")
    conf = write_conf(tmp_path, "[lab]\nprobe_rate = 200\n[announce]\nmode = rarp\n")
    out = str(tmp_path / "out.json")
    args = ["--config-file", conf, "lab", "demo", "--vm", "vm1", "--modes", "none, orchestrated"]
    args += ["--downtime-ms", "50", "--json", out]
    assert cli.main(args) == 0, capsys.readouterr().err
    assert seen == {
        "modes": ["none", "orchestrated"],
        "downtime_ms": 50.0,
        "probe_rate": 200,
        "mode": "rarp",
        "json_out": out,
    }


# --------------------------------------------------------- unexpected errors


def test_an_unexpected_error_is_one_line_unless_verbose(
    monkeypatch: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    def boom(self: Any, conf: cfg.ConfigOpts, args: Any) -> int:
        raise RuntimeError("kaput")

    monkeypatch.setattr(cli.NvaCommand, "run", boom)
    assert cli.main(["nva", "status"]) == cli.EXIT_INTERNAL
    line = one_error_line(capsys.readouterr().err)
    assert "unexpected RuntimeError: kaput" in line and "-vv" in line
    with pytest.raises(RuntimeError, match="kaput"):
        cli.main(["-vv", "nva", "status"])


def test_describe_config_error_names_file_and_option() -> None:
    exc = cfg.ConfigFileValueError(
        "Value for option bind_port from LocationInfo(location=<Locations.user: (4, True)>, "
        "detail='/etc/vmm.conf') is not valid: invalid literal for int() with base 10: 'x'"
    )
    text = cli.describe_config_error(exc)
    assert text.startswith("bad value in /etc/vmm.conf: option bind_port: invalid literal")
    assert "LocationInfo" not in text
    parse = cli.describe_config_error(cfg.ConfigFileParseError("/etc/vmm.conf", "bad line"))
    assert parse == "cannot parse config file /etc/vmm.conf: bad line (fix its syntax)"


# ------------------------------------------------- nva endpoint / nve / where


def _vmm(conf: str, *args: str) -> int:
    return cli.main(["--config-file", conf, "nva", *args])


def test_nva_endpoint_add_list_show_delete(
    nva: NvaServer, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: Any
) -> None:
    monkeypatch.delenv(cli.TOKEN_ENV, raising=False)
    conf = status_conf(tmp_path, nva.url)
    mac = "52:54:00:00:00:0a"
    add = ["endpoint", "add", "--vni", str(VNI), "--mac", mac.upper()]
    add += ["--ipv4", "10.0.0.10", "--ipv6", "2001:db8::a", "--ipv6", "2001:DB8::b", "--nve", "h2"]
    assert _vmm(conf, *add) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"registered: {mac} (10.0.0.10, 2001:db8::a, 2001:db8::b)")
    assert "is at NVE h2 (VTEP 192.0.2.2), seq 0, active" in out
    stored = nva.store.get_endpoint(VNI, mac)
    assert (stored["ipv4"], stored["ipv6"], stored["nve"]) == (
        ["10.0.0.10"],
        ["2001:db8::a", "2001:db8::b"],
        "h2",
    )
    assert _vmm(conf, *add) == 0  # the same add again is harmless
    capsys.readouterr()

    assert _vmm(conf, "endpoint", "list", "--vni", str(VNI)) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["VN", "MAC", "IPv4", "IPv6", "NVE", "VTEP", "seq", "state", "flags"]
    assert len(table) == 4 and any(mac in row and "h2" in row for row in table)
    assert _vmm(conf, "endpoint", "list", "-f", "json") == 0
    assert len(json.loads(capsys.readouterr().out)) == 4

    assert _vmm(conf, "endpoint", "show", "--vni", str(VNI), "--mac", mac, "-f", "json") == 0
    assert json.loads(capsys.readouterr().out)["nve"] == "h2"
    assert _vmm(conf, "endpoint", "delete", "--vni", str(VNI), "--mac", mac) == 0
    assert capsys.readouterr().out.startswith(f"deleted: {mac}")
    assert [e["mac"] for e in nva.store.list_endpoints(VNI)] == [
        "52:54:00:00:00:01",
        "52:54:00:00:00:02",
    ]


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (["--mac", "01:00:5e:00:00:01"], ["--mac 01:00:5e:00:00:01", "multicast"]),
        (["--mac", "ff:ff:ff:ff:ff:ff"], ["broadcast"]),
        (["--mac", "00:00:00:00:00:00"], ["all zeros"]),
        (["--mac", "52:54:00:00:00:0b", "--ipv6", "fe80::1%eth0"], ["--ipv6", "zone id"]),
        (["--mac", "52:54:00:00:00:0b", "--ipv4", "2001:db8::1"], ["--ipv4", "not IPv4"]),
        (["--mac", "52:54:00:00:00:0b", "--ipv4", "10.0.0.300"], ["not an IP address"]),
        (["--mac", "52:54:00:00:00:0b", "--vni-x"], ["unrecognized arguments"]),
    ],
    ids=["multicast", "broadcast", "zero", "zone-id", "v6-as-v4", "bad-ip", "bad-flag"],
)
def test_nva_endpoint_add_refuses_bad_input_and_registers_nothing(
    nva: NvaServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: Any,
    flags: list[str],
    words: list[str],
) -> None:
    monkeypatch.delenv(cli.TOKEN_ENV, raising=False)
    conf = status_conf(tmp_path, nva.url)
    before = nva.store.revision
    args = ["endpoint", "add", "--vni", str(VNI), "--nve", "h1", *flags]
    try:
        code = _vmm(conf, *args)
    except SystemExit as exc:  # argparse's usage errors
        code = int(exc.code or 0)
    captured = capsys.readouterr()
    assert code == 2
    line = one_error_line(captured.err)
    for word in words:
        assert word in line, line
    assert captured.out == ""
    assert nva.store.revision == before and len(nva.store.list_endpoints()) == 3


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (
            ["endpoint", "add", "--vni", "0", "--mac", "52:54:00:00:00:0c", "--nve", "h1"],
            ["--vni 0"],
        ),
        (
            ["endpoint", "add", "--vni", "x", "--mac", "52:54:00:00:00:0c", "--nve", "h1"],
            ["--vni x"],
        ),
        (
            ["endpoint", "add", "--vni", "100", "--mac", "52:54:00:00:00:0c", "--nve", "a b"],
            ["--nve"],
        ),
        (
            ["endpoint", "add", "--vni", "100", "--mac", "52:54:00:00:00:0c", "--nve", "h9"],
            ["no NVE 'h9'"],
        ),
        (
            [
                "endpoint",
                "add",
                "--vni",
                "100",
                "--mac",
                "52:54:00:00:00:0c",
                "--nve",
                "h1",
                "--ipv4",
                "10.0.0.1",
            ],
            ["duplicate address", "10.0.0.1", "52:54:00:00:00:01"],
        ),
        (["endpoint", "show", "--vni", "100", "--mac", "52:54:00:00:00:0c"], ["no endpoint"]),
        (["endpoint", "delete", "--vni", "100", "--mac", "52:54:00:00:00:0c"], ["no endpoint"]),
        (["nve", "delete", "h1"], ["NVE 'h1' still serves endpoints", "move or delete"]),
        (["status", "--vni", "100"], ["--vni goes with --mac or --ip"]),
        (["status", "--mac", "52:54:00:00:00:0c"], ["no endpoint with MAC", "any VN"]),
    ],
    ids=[
        "vni-0",
        "vni-word",
        "nve-space",
        "nve-unknown",
        "duplicate-ip",
        "show-missing",
        "delete-missing",
        "nve-busy",
        "vni-alone",
        "where-missing",
    ],
)
def test_nva_commands_refuse_with_one_line_and_change_nothing(
    nva: NvaServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: Any,
    args: list[str],
    words: list[str],
) -> None:
    monkeypatch.delenv(cli.TOKEN_ENV, raising=False)
    conf = status_conf(tmp_path, nva.url)
    before = (nva.store.revision, nva.store.list_endpoints(), nva.store.list_nves())
    assert _vmm(conf, *args) == 2
    captured = capsys.readouterr()
    line = one_error_line(captured.err)
    for word in words:
        assert word in line, line
    assert captured.out == ""
    assert (nva.store.revision, nva.store.list_endpoints(), nva.store.list_nves()) == before


def test_nva_status_says_where_a_vm_is_by_mac_or_ip(
    nva: NvaServer, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: Any
) -> None:
    monkeypatch.delenv(cli.TOKEN_ENV, raising=False)
    conf = status_conf(tmp_path, nva.url)
    assert _vmm(conf, "status", "--mac", "52-54-00-00-00-02") == 0
    assert capsys.readouterr().out.strip() == (
        "52:54:00:00:00:02 (10.0.0.2) in VN 100 is at NVE h2 (VTEP 192.0.2.2), seq 0, active"
    )
    nva.store.prestage(VNI, "52:54:00:00:00:01", "h2", "mig-7")
    assert _vmm(conf, "status", "--ip", "10.0.0.1") == 0
    out = capsys.readouterr().out
    assert "52:54:00:00:00:01 (10.0.0.1) in VN 100 is at NVE h1" in out
    assert "migrating to h2 (migration mig-7)" in out
    assert _vmm(conf, "status", "--ip", "10.0.1.3", "--vni", "200", "-f", "json") == 0
    found = json.loads(capsys.readouterr().out)["endpoints"]
    assert [(e["mac"], e["nve"]) for e in found] == [("52:54:00:00:00:03", "h2")]
    assert _vmm(conf, "status", "--ip", "10.0.1.3", "--vni", str(VNI)) == 2
    assert "no endpoint with address 10.0.1.3 in VN 100" in one_error_line(capsys.readouterr().err)


def test_nva_endpoint_release_and_sticky(
    nva: NvaServer, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: Any
) -> None:
    monkeypatch.delenv(cli.TOKEN_ENV, raising=False)
    conf = status_conf(tmp_path, nva.url)
    gw = "52:54:00:00:00:fe"
    assert (
        _vmm(conf, "endpoint", "add", "--vni", str(VNI), "--mac", gw, "--nve", "h1", "--sticky")
        == 0
    )
    assert "sticky" in capsys.readouterr().out
    assert nva.store.get_endpoint(VNI, gw)["sticky"] is True
    mac = "52:54:00:00:00:01"
    nva.store.mobility = dataclasses.replace(nva.store.mobility, move_limit=2)
    for nve in ("h2", "h1"):
        nva.store.move(VNI, mac, nve)
    with pytest.raises(VmmError, match="frozen"):
        nva.store.move(VNI, mac, "h2")
    assert _vmm(conf, "endpoint", "list", "--vni", str(VNI)) == 0
    rows = capsys.readouterr().out.splitlines()
    assert any(mac in row and "frozen" in row for row in rows)
    assert any(gw in row and "sticky" in row for row in rows)
    assert _vmm(conf, "endpoint", "show", "--vni", str(VNI), "--mac", mac) == 0
    shown = capsys.readouterr().out
    assert "FROZEN (3 moves in 180 s, over the limit of 2" in shown and "recent moves: 3" in shown
    assert _vmm(conf, "status") == 0
    status = capsys.readouterr().out
    assert "1 frozen MAC(s) (release with `vmm nva endpoint release`):" in status
    assert f"  {mac} in VN {VNI} at h1: 3 moves in 180 s" in status
    assert _vmm(conf, "status", "-f", "json") == 0
    assert [f["mac"] for f in json.loads(capsys.readouterr().out)["frozen"]] == [mac]
    assert _vmm(conf, "endpoint", "release", "--vni", str(VNI), "--mac", mac) == 0
    assert capsys.readouterr().out.startswith(f"released: {mac}")
    assert nva.store.move(VNI, mac, "h2")["nve"] == "h2"


def test_nva_nve_list_and_delete(
    nva: NvaServer, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: Any
) -> None:
    monkeypatch.delenv(cli.TOKEN_ENV, raising=False)
    conf = status_conf(tmp_path, nva.url)
    nva.store.register_nve("h3", "192.0.2.3", [VNI])
    assert _vmm(conf, "nve", "list") == 0
    assert [r.split()[0] for r in capsys.readouterr().out.splitlines()] == ["NVE", "h1", "h2", "h3"]
    assert _vmm(conf, "nve", "delete", "h3") == 0
    assert "deleted NVE h3 (VTEP 192.0.2.3)" in capsys.readouterr().out
    assert [n["id"] for n in nva.store.list_nves()] == ["h1", "h2"]
