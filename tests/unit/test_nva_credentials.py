"""Per-NVE tokens of the directory (issue 13 item 5): a host's token acts only on
its own NVE's records; the admin token ([nva] token) may do everything.

Real server on 127.0.0.1, real client, SQLite in memory.
"""

from __future__ import annotations

import hmac
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from oslo_config import cfg

from vmm_orchestrator.errors import ConfigError
from vmm_orchestrator.model import Migration, Phase, Role, Vif, Workload
from vmm_orchestrator.nva import options
from vmm_orchestrator.nva import server as nva_server
from vmm_orchestrator.nva.client import NvaClient
from vmm_orchestrator.nva.errors import NvaError, Unauthorized
from vmm_orchestrator.nva.server import Credentials, NvaServer, parse_token_file
from vmm_orchestrator.nva.store import NvaStore
from vmm_orchestrator.stage import HostContext, StageContext
from vmm_orchestrator.stages import NvaPrestage, PeerUpdate

ADMIN = "admin-token-0123456789"
TOKENS = {"host-a": "token-a-0123456789", "host-b": "token-b-0123456789"}
VNI = 100
MAC = "52:54:00:00:0a:01"  # lives at host-b
MAC_A = "52:54:00:00:0a:02"  # lives at host-a


class Site:
    def __init__(self, server: NvaServer) -> None:
        self.server = server
        self.clients: list[NvaClient] = []

    def client(self, token: str, stream: bool = False) -> NvaClient:
        c = NvaClient(self.server.url, token, timeout=3.0, stream=stream)
        self.clients.append(c)
        return c

    def raw(self, method: str, path: str, token: str | None, **kw: Any) -> requests.Response:
        headers = {} if token is None else {"X-Auth-Token": token}
        return requests.request(method, self.server.url + path, headers=headers, timeout=5, **kw)


@pytest.fixture
def site() -> Iterator[Site]:
    store = NvaStore(":memory:")
    srv = NvaServer(store, ADMIN, "127.0.0.1", 0, watch_max_timeout=2.0, nve_tokens=TOKENS)
    srv.start()
    s = Site(srv)
    admin = s.client(ADMIN)
    for n, nve in enumerate(("host-a", "host-b", "host-c"), 1):
        admin.register_nve(nve, f"192.0.2.{n}", [VNI])
    admin.add_endpoint(VNI, MAC, ["10.0.0.1"], [], "host-b")
    admin.add_endpoint(VNI, MAC_A, ["10.0.0.2"], [], "host-a")
    yield s
    for c in s.clients:
        c.close()
    srv.stop()
    store.close()


def forbidden(call: Any, *args: Any, **kw: Any) -> NvaError:
    with pytest.raises(NvaError) as info:
        call(*args, **kw)
    assert info.value.http_status == 403, info.value
    return info.value


def test_a_host_cannot_reregister_another_nves_vtep(site: Site) -> None:
    a, admin = site.client(TOKENS["host-a"]), site.client(ADMIN)
    before = admin.get_nve("host-b")
    revision = admin.health()["revision"]
    err = forbidden(a.register_nve, "host-b", "203.0.113.66", [VNI])
    assert "host-a may not register NVE host-b" in str(err)
    assert admin.get_nve("host-b") == before
    assert admin.health()["revision"] == revision  # nothing written, no change announced
    # nor register a new NVE of its own choosing, nor delete one
    forbidden(a.register_nve, "host-x", "203.0.113.66", [VNI])
    forbidden(a.delete_nve, "host-c")
    assert {n["id"] for n in admin.list_nves()} == {"host-a", "host-b", "host-c"}


def test_a_host_cannot_move_another_nves_binding_to_a_third_nve(site: Site) -> None:
    a, admin = site.client(TOKENS["host-a"]), site.client(ADMIN)
    before = admin.get_endpoint(VNI, MAC)
    forbidden(a.move, VNI, MAC, "host-c", before["seq"] + 1)
    forbidden(a.prestage, VNI, MAC, "host-c", "m-evil")
    assert admin.get_endpoint(VNI, MAC) == before
    # a move between b and c (prestaged by the admin) is none of a's business
    admin.prestage(VNI, MAC, "host-c", "m-bc")
    pending = admin.get_endpoint(VNI, MAC)
    forbidden(a.commit, VNI, MAC, "m-bc")
    forbidden(a.abort, VNI, MAC, "m-bc")
    forbidden(a.expire, VNI, MAC, ["host-c"])
    assert admin.get_endpoint(VNI, MAC) == pending
    # and what only the admin does
    forbidden(a.add_endpoint, VNI, "52:54:00:00:0a:09", ["10.0.0.9"], [], "host-a")
    forbidden(a.delete_endpoint, VNI, MAC_A)
    forbidden(a.release, VNI, MAC_A)


def test_a_host_cannot_watch_or_ack_as_another(site: Site) -> None:
    a = site.client(TOKENS["host-a"])
    forbidden(a.poll, "host-b", 0, 0.0)
    forbidden(a.ack, "host-b", 1)
    forbidden(a.ack_many, {"host-a": 1, "host-b": 1})
    streaming = site.client(TOKENS["host-a"], stream=True)
    with pytest.raises(NvaError):  # the upgrade is answered 403 before it switches
        streaming.watch("host-b", 0, 0.2)
    upgrade = {"Connection": "Upgrade", "Upgrade": "vmm-nva-stream/1"}
    answer = requests.get(
        site.server.url + "/v1/stream?nve=host-b",
        headers={"X-Auth-Token": TOKENS["host-a"], **upgrade},
        timeout=5,
    )
    assert answer.status_code == 403


def test_a_host_does_its_own_work_with_its_own_token(site: Site) -> None:
    a, admin = site.client(TOKENS["host-a"]), site.client(ADMIN)
    assert a.register_nve("host-a", "192.0.2.11", [VNI])["vtep"] == "192.0.2.11"
    revision, _ = a.snapshot(VNI)
    revision, _changes = a.poll("host-a", revision - 1, 0.0)
    assert a.ack("host-a", revision)["acked_revision"] == revision
    assert a.ack_many({"host-a": revision})["errors"] == {}
    streaming = site.client(TOKENS["host-a"], stream=True)
    streaming.watch("host-a", revision, 0.1)
    assert streaming.open_streams == 1
    # destination of a planned move: prestage to itself, commit, expire laggards
    a.prestage(VNI, MAC, "host-a", "m-ba")
    done = a.commit(VNI, MAC, "m-ba")
    assert done["endpoint"]["nve"] == "host-a"
    a.expire(VNI, MAC, ["host-c"])
    # source of a move: prestage its endpoint elsewhere and abort it
    a.prestage(VNI, MAC_A, "host-b", "m-ab")
    a.abort(VNI, MAC_A, "m-ab")
    # a MAC learned here
    seq = admin.get_endpoint(VNI, MAC)["seq"]
    admin.move(VNI, MAC, "host-b", seq + 1)
    assert a.move(VNI, MAC, "host-a", seq + 2)["nve"] == "host-a"
    # reads are open to any authenticated host
    assert a.get_nve("host-b")["id"] == "host-b"
    assert a.find(VNI, mac=MAC_A)["nve"] == "host-a"
    assert set(a.acks(VNI, 0)) == {"host-a", "host-b", "host-c"}


def test_the_pipeline_stages_of_a_destination_run_with_its_own_token(site: Site) -> None:
    b = site.client(TOKENS["host-b"])
    workload = Workload("vm", (Vif(MAC_A, VNI, ("10.0.0.2",), (), "tap"),))
    migration = Migration("m-1", workload, "host-a", "host-b")
    conf = cfg.ConfigOpts()
    conf(args=[], default_config_files=[])
    PeerUpdate.register_opts(conf)
    conf.set_override("ack_timeout", 0.2, group="stage_peer_update")

    def ctx(phase: Phase) -> StageContext:
        return StageContext(
            migration, phase, Role.DESTINATION, HostContext("host-b", b), time.monotonic() + 5
        )

    NvaPrestage(conf).run(ctx(Phase.PREPARE))
    PeerUpdate(conf).run(ctx(Phase.RESUMED))  # commit, acks, expire of the laggards
    assert b.get_endpoint(VNI, MAC_A)["nve"] == "host-b"
    # host-c's token (had it one) could not have done it: host-a's cannot undo it
    a = site.client(TOKENS["host-a"])
    forbidden(a.prestage, VNI, MAC_A, "host-c", "m-2")


def test_the_admin_token_may_do_everything(site: Site) -> None:
    admin = site.client(ADMIN)
    admin.register_nve("host-b", "192.0.2.22", [VNI])
    admin.prestage(VNI, MAC, "host-c", "m-1")
    assert admin.commit(VNI, MAC, "m-1")["endpoint"]["nve"] == "host-c"
    seq = admin.get_endpoint(VNI, MAC)["seq"]
    admin.move(VNI, MAC, "host-a", seq + 1)
    admin.release(VNI, MAC)
    admin.expire(VNI, MAC, ["host-b"])
    admin.poll("host-b", 0, 0.0)
    admin.ack_many({"host-b": 1, "host-c": 1})
    admin.delete_endpoint(VNI, MAC)
    admin.delete_nve("host-c")
    assert {n["id"] for n in admin.list_nves()} == {"host-a", "host-b"}


def test_a_wrong_or_missing_token_is_401(site: Site) -> None:
    with pytest.raises(Unauthorized):
        site.client("token-a-0123456788").health()
    answer = site.raw("GET", "/v1/health", None)
    assert answer.status_code == 401
    answer = site.raw("POST", "/v1/nves", "nope", json={"id": "host-b", "vtep": "203.0.113.1"})
    assert answer.status_code == 401
    answer = site.raw(
        "POST", "/v1/nves", TOKENS["host-a"], json={"id": "host-b", "vtep": "203.0.113.1"}
    )
    assert answer.status_code == 403
    assert answer.json()["error"]["code"] == "forbidden"
    assert "admin token" in answer.json()["error"]["hint"]


def test_every_known_token_is_compared_whichever_matches(monkeypatch: Any) -> None:
    creds = Credentials(ADMIN, {f"h{i}": f"tok-{i:04d}-secret" for i in range(20)})
    calls: list[int] = []
    real = hmac.compare_digest

    def counting(a: Any, b: Any) -> bool:
        calls.append(1)
        return real(a, b)

    monkeypatch.setattr(nva_server.hmac, "compare_digest", counting)
    for given in (ADMIN, "tok-0000-secret", "tok-0019-secret", "wrong"):
        calls.clear()
        creds.identify(given.encode())
        assert len(calls) == 21, given
    assert creds.identify(b"tok-0007-secret") == nva_server.Principal(False, frozenset({"h7"}))
    assert creds.identify(ADMIN.encode()) == nva_server.ADMIN
    assert creds.identify(b"wrong") is None


def test_one_token_may_name_several_nves() -> None:
    creds = Credentials(ADMIN, {"h1": "shared-by-two", "h2": "shared-by-two"})
    found = creds.identify(b"shared-by-two")
    assert found is not None and found.nves == {"h1", "h2"}


def test_the_tokens_file_is_read_checked_and_reloaded(tmp_path: Path) -> None:
    path = tmp_path / "nve-tokens"
    path.write_text("# host tokens\nhost-a token-a-1   # a comment\n\nhost-b token-b-1\n")
    os.chmod(path, 0o600)
    creds = Credentials(ADMIN, None, str(path))
    assert creds.identify(b"token-a-1") == nva_server.Principal(False, frozenset({"host-a"}))
    path.write_text("host-a token-a-2\nhost-b token-b-1\n")
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    creds._checked = 0.0  # skip the once-a-second wait
    assert creds.identify(b"token-a-1") is None
    assert creds.identify(b"token-a-2") is not None
    # a broken file keeps the tokens in force
    path.write_text("host-a\n")
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 2 * 10**9))
    creds._checked = 0.0
    assert creds.identify(b"token-a-2") is not None
    with pytest.raises(ConfigError, match="line 1: expected '<nve-id> <token>'"):
        parse_token_file("host-a\n", "f")
    with pytest.raises(ConfigError, match="listed twice"):
        parse_token_file("h t1\nh t2\n", "f")
    with pytest.raises(ConfigError, match="is the admin token"):
        Credentials(ADMIN, {"h": ADMIN})
    with pytest.raises(ConfigError, match="cannot read"):
        Credentials(ADMIN, None, str(tmp_path / "missing"))


def test_the_server_takes_the_tokens_from_its_config(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text("host-a token-a-file\n")
    conf = cfg.ConfigOpts()
    conf(args=[], default_config_files=[])
    options.register_opts(conf)
    conf.set_override("token", ADMIN, "nva")
    conf.set_override("bind_port", 0, "nva")
    conf.set_override("nve_tokens", {"host-b": "token-b-dict"}, "nva")
    conf.set_override("nve_tokens_file", str(path), "nva")
    store = NvaStore(":memory:")
    with NvaServer.from_conf(conf, store=store) as srv:
        with NvaClient(srv.url, ADMIN) as admin:
            admin.register_nve("host-a", "192.0.2.1", [VNI])
        for token, nve in (("token-a-file", "host-a"), ("token-b-dict", "host-b")):
            with NvaClient(srv.url, token) as c:
                assert c.register_nve(nve, "192.0.2.9", [VNI])["id"] == nve
    store.close()


def test_concurrent_scoped_commits_have_one_winner(site: Site) -> None:
    """Check and write of a scoped request are one step: racing hosts cannot interleave."""
    a, b = site.client(TOKENS["host-a"]), site.client(TOKENS["host-b"])
    results: list[str] = []

    def claim(client: NvaClient, nve: str) -> None:
        try:
            client.prestage(VNI, MAC, nve, f"m-{nve}")
            results.append(nve)
        except NvaError as err:
            results.append(f"refused {err.http_status}")

    threads = [
        threading.Thread(target=claim, args=(c, n)) for c, n in ((a, "host-a"), (b, "host-b"))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results)[0] in ("host-a", "host-b")
    assert any(r.startswith("refused 409") for r in results)
