"""The NVA HTTP API, through the real client against a real server on 127.0.0.1."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from oslo_config import cfg

from vmm_orchestrator.errors import ConfigError, TransientError
from vmm_orchestrator.nva import options
from vmm_orchestrator.nva.client import NvaClient
from vmm_orchestrator.nva.errors import (
    BadRequest,
    Conflict,
    NotFound,
    PayloadTooLarge,
    Unauthorized,
    Unavailable,
)
from vmm_orchestrator.nva.server import NvaServer
from vmm_orchestrator.nva.store import NvaStore

TOKEN = "s3cret-token"
VNI = 100
MAC = "52:54:00:00:00:01"
MAC2 = "52:54:00:00:00:02"
MAX_BODY = 4096


@pytest.fixture
def server() -> Iterator[NvaServer]:
    store = NvaStore(":memory:")
    srv = NvaServer(store, TOKEN, "127.0.0.1", 0, max_body_bytes=MAX_BODY, watch_max_timeout=5.0)
    srv.start()
    yield srv
    srv.stop()
    store.close()


@pytest.fixture
def client(server: NvaServer) -> Iterator[NvaClient]:
    with NvaClient(server.url, TOKEN, timeout=2.0) as c:
        c.register_nve("host-a", "192.0.2.1", [VNI])
        c.register_nve("host-b", "192.0.2.2", [VNI])
        yield c


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _raw(server: NvaServer, method: str, path: str, **kwargs: Any) -> requests.Response:
    return requests.request(method, server.url + path, timeout=5, **kwargs)


# ------------------------------------------------------------------ auth


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/health"),
        ("GET", "/v1/nves"),
        ("POST", "/v1/endpoints"),
        ("DELETE", f"/v1/endpoints/{VNI}/{MAC}"),
        ("GET", "/v1/watch?nve=host-a"),
        ("GET", "/v1/no-such-route"),
    ],
)
@pytest.mark.parametrize("token", [None, "wrong", ""], ids=["missing", "wrong", "empty"])
def test_every_route_needs_the_token(
    server: NvaServer, method: str, path: str, token: str | None
) -> None:
    headers = {} if token is None else {"X-Auth-Token": token}
    resp = _raw(server, method, path, headers=headers, json={"vni": VNI})
    assert resp.status_code == 401
    assert resp.json()["error"]["code"] == "unauthorized"


def test_client_with_wrong_token_gets_unauthorized(server: NvaServer) -> None:
    with NvaClient(server.url, "not-the-token") as bad:
        with pytest.raises(Unauthorized, match="invalid X-Auth-Token") as info:
            bad.health()
        assert "token" in (info.value.hint or "")
        with pytest.raises(Unauthorized):
            bad.register_nve("evil", "192.0.2.66", [VNI])
    with NvaClient(server.url, TOKEN) as good:
        assert good.list_nves() == []  # the rejected write did nothing


def test_server_refuses_an_empty_token() -> None:
    with pytest.raises(ConfigError, match="token"):
        NvaServer(NvaStore(":memory:"), "", "127.0.0.1", 0)


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    "data",
    [b"{not json", b"[1, 2]", b"\xff\xfe", b'{"revision": NaN}'],
    ids=["syntax", "not-object", "not-utf8", "nan"],
)
def test_malformed_json_is_400(server: NvaServer, client: NvaClient, data: bytes) -> None:
    resp = _raw(
        server,
        "POST",
        "/v1/nves/host-a/ack",
        data=data,
        headers={"X-Auth-Token": TOKEN, "Content-Type": "application/json"},
    )
    assert resp.status_code == 400
    assert resp.json()["error"]["code"] == "bad_request"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"vni": "100", "mac": MAC, "nve": "host-a"}, "vni must be an integer"),
        ({"vni": VNI, "mac": 5, "nve": "host-a"}, "mac must be a string"),
        ({"vni": VNI, "mac": MAC, "nve": "host-a", "ipv4": "10.0.0.1"}, "must be a list"),
        ({"vni": VNI, "mac": MAC}, "missing field"),
        ({"vni": VNI, "mac": MAC, "nve": "host-a", "ipv5": []}, "unknown field"),
    ],
)
def test_wrong_field_types_are_400(
    server: NvaServer, client: NvaClient, body: dict, message: str
) -> None:
    resp = _raw(server, "POST", "/v1/endpoints", json=body, headers={"X-Auth-Token": TOKEN})
    assert resp.status_code == 400
    assert message in resp.json()["error"]["message"]


def test_bad_query_parameters_are_400(client: NvaClient) -> None:
    with pytest.raises(BadRequest, match="vni must be an integer"):
        client.list_nves(vni="abc")  # type: ignore[arg-type]
    with pytest.raises(BadRequest, match="vni in the path"):
        client.get_endpoint("x", MAC)  # type: ignore[arg-type]


def test_conflicting_ip_is_409(client: NvaClient) -> None:
    client.add_endpoint(VNI, MAC, ["10.0.0.1"], [], "host-a")
    with pytest.raises(Conflict, match=r"10\.0\.0\.1 \(held by 52:54:00:00:00:01\)"):
        client.add_endpoint(VNI, MAC2, ["10.0.0.1"], [], "host-b")
    assert client.add_endpoint(VNI, MAC, ["10.0.0.1"], [], "host-a")["mac"] == MAC  # same again
    client.add_endpoint(VNI, MAC2, [], ["2001:db8::1"], "host-b")
    with pytest.raises(Conflict, match=r"2001:db8::1 \(held by 52:54:00:00:00:02\)"):
        client.add_endpoint(VNI, "52:54:00:00:00:03", [], ["2001:db8:0::1"], "host-a")
    with pytest.raises(NotFound):
        client.get_endpoint(VNI, "52:54:00:00:00:03")


def test_unknown_endpoint_is_404(client: NvaClient) -> None:
    with pytest.raises(NotFound, match=f"no endpoint {MAC} in VNI {VNI}"):
        client.get_endpoint(VNI, MAC)
    with pytest.raises(NotFound):
        client.commit(VNI, MAC, "m1")
    with pytest.raises(NotFound):
        client.find(VNI, ip="10.9.9.9")


def test_unknown_route_is_404_and_wrong_method_405(server: NvaServer) -> None:
    headers = {"X-Auth-Token": TOKEN}
    resp = _raw(server, "GET", "/v1/nothing", headers=headers)
    assert resp.status_code == 404 and resp.json()["error"]["code"] == "not_found"
    resp = _raw(server, "PUT", "/v1/nves", headers=headers, json={})
    assert resp.status_code == 405
    assert resp.headers["Allow"] == "GET, POST"
    assert resp.json()["error"]["code"] == "method_not_allowed"


def test_oversized_body_is_413(server: NvaServer, client: NvaClient) -> None:
    big = {"id": "host-x", "vtep": "192.0.2.9", "vnis": [VNI] * MAX_BODY}
    with pytest.raises(PayloadTooLarge, match=f"over the limit of {MAX_BODY} bytes"):
        client._request("POST", "/v1/nves", body=big)
    resp = _raw(
        server, "POST", "/v1/nves", data=b" " * (MAX_BODY + 1), headers={"X-Auth-Token": TOKEN}
    )
    assert resp.status_code == 413
    assert [n["id"] for n in client.list_nves()] == ["host-a", "host-b"]


def test_unreachable_server_is_unavailable_with_a_hint() -> None:
    url = f"http://127.0.0.1:{_free_port()}"
    with NvaClient(url, TOKEN, timeout=1.0) as c:
        with pytest.raises(Unavailable) as info:
            c.health()
    err = info.value
    assert isinstance(err, TransientError)
    assert url in err.message and "refused" in err.message.lower()
    assert "vmm nva serve" in str(err) and "[nva] url" in str(err)


def test_slow_server_is_unavailable(server: NvaServer, client: NvaClient) -> None:
    # The server holds an acks request for 2 s; a client that allows 0.2 s gives up.
    client.add_endpoint(VNI, MAC, [], [], "host-a")
    impatient = NvaClient(server.url, TOKEN, timeout=0.2)
    started = time.monotonic()
    with pytest.raises(Unavailable, match="did not answer"):
        impatient._request("GET", "/v1/acks", params={"vni": VNI, "min_revision": 1, "timeout": 2})
    assert time.monotonic() - started < 1.5
    impatient.close()


def test_stopped_server_is_unavailable(server: NvaServer, client: NvaClient) -> None:
    assert client.health() == {"revision": server.store.revision}
    server.stop()
    with pytest.raises(Unavailable):
        client.health()


# ------------------------------------------------------------------ flows


def test_migration_flow_over_http(client: NvaClient) -> None:
    created = client.add_endpoint(VNI, MAC, ["10.0.0.1"], ["2001:db8::1"], "host-a")
    assert (created["nve"], created["seq"], created["state"]) == ("host-a", 0, "active")
    assert client.add_endpoint(VNI, MAC, ["10.0.0.1"], ["2001:db8::1"], "host-a") == created
    assert client.find(VNI, ip="10.0.0.1")["mac"] == MAC
    assert client.find(VNI, mac=MAC.upper())["nve"] == "host-a"

    pending = client.prestage(VNI, MAC, "host-b", "m1")
    assert (pending["state"], pending["nve"], pending["seq"]) == ("pending", "host-a", 0)
    result = client.commit(VNI, MAC, "m1")
    assert (result["endpoint"]["nve"], result["endpoint"]["seq"]) == ("host-b", 1)
    assert client.commit(VNI, MAC, "m1") == result
    with pytest.raises(Conflict, match="stale sequence"):
        client.move(VNI, MAC, "host-a", seq=1)
    assert client.move(VNI, MAC, "host-a", seq=5)["seq"] == 2

    assert client.abort(VNI, MAC, "m9")["nve"] == "host-a"
    expired = client.expire(VNI, MAC, ["host-b"])
    assert expired["nves"] == ["host-b"]
    revision, endpoints = client.snapshot(VNI)
    assert revision == expired["revision"] and [e["mac"] for e in endpoints] == [MAC]
    assert client.delete_endpoint(VNI, MAC)["mac"] == MAC
    assert client.list_endpoints() == []


def test_add_endpoint_answers_201_then_200(server: NvaServer, client: NvaClient) -> None:
    body = {"vni": VNI, "mac": MAC, "ipv4": ["10.0.0.1"], "nve": "host-a"}
    headers = {"X-Auth-Token": TOKEN}
    assert _raw(server, "POST", "/v1/endpoints", json=body, headers=headers).status_code == 201
    assert _raw(server, "POST", "/v1/endpoints", json=body, headers=headers).status_code == 200


def test_watch_long_polls_and_acks_wait(client: NvaClient) -> None:
    client.add_endpoint(VNI, MAC, ["10.0.0.1"], [], "host-a")
    since = client.health()["revision"]

    def later() -> None:
        time.sleep(0.1)
        client.move(VNI, MAC, "host-b")

    mover = threading.Thread(target=later, daemon=True)
    mover.start()
    started = time.monotonic()
    revision, changes = client.watch("host-a", since, timeout=4.0)  # shared with the mover
    assert time.monotonic() - started < 2.0
    mover.join()
    assert revision == since + 1
    assert [(c["kind"], c["endpoint"]["nve"]) for c in changes] == [("endpoint", "host-b")]

    client.ack("host-a", revision)
    acks = client.acks(VNI, revision, timeout=0.2)
    assert acks["host-a"]["acked_revision"] == revision
    assert acks["host-b"]["acked_revision"] == 0  # timed out waiting for host-b
    client.ack("host-b", revision)
    assert client.acks(VNI, revision, nves=["host-b"]) == {
        "host-b": {"acked_revision": revision, "acked_at": client.get_nve("host-b")["acked_at"]}
    }


def test_watch_timeout_is_capped_by_the_server(server: NvaServer, client: NvaClient) -> None:
    server._api.watch_max_timeout = 0.2
    start = server.store.revision  # after the fixture's NVE registrations
    started = time.monotonic()
    # The cap is the long-poll's (a stream holds no request open); poll() long-polls.
    revision, changes = client.poll("host-a", start, timeout=30.0)
    assert time.monotonic() - started < 2.0
    assert (revision, changes) == (start, [])


def test_client_from_conf(server: NvaServer) -> None:
    conf = cfg.ConfigOpts()
    options.register_opts(conf)
    options.register_opts(conf)  # idempotent
    with pytest.raises(ConfigError, match="token"):
        NvaClient.from_conf(conf)
    with pytest.raises(cfg.RequiredOptError, match="token"):
        conf([], default_config_files=[])
    conf.set_override("url", server.url, group=options.GROUP)
    conf.set_override("token", TOKEN, group=options.GROUP)
    with NvaClient.from_conf(conf) as c:
        assert c.health() == {"revision": 0}
        assert c.timeout == 2.0


def test_options_have_help_and_secret_token() -> None:
    by_name = {opt.name: opt for opt in options.NVA_OPTS}
    assert set(by_name) == {
        "url",
        "token",
        "request_timeout",
        "bind_host",
        "bind_port",
        "database",
        "backend",
        "max_body_bytes",
        "watch_max_timeout",
        "mac_move_limit",
        "mac_move_window",
        "migration_grace",
        "change_log_keep",
        "max_json_depth",
    }
    assert all(len(opt.help or "") > 30 for opt in options.NVA_OPTS)
    assert by_name["token"].secret is True
    assert by_name["max_body_bytes"].default == 1024 * 1024
