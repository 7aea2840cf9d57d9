"""State service hardening (issue 13 item 5): a bundle applies once (replays
refused later in the migration, after a session closed, after commit or abort,
after a restart), per-host credentials bound to the migration's other end, and
a cap on concurrent imports.

Real state services on 127.0.0.1; the kind's "kernel" is a dict.
"""

from __future__ import annotations

import hashlib
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import requests
from oslo_config import cfg

from vmm_orchestrator.errors import ConfigError, VmmError
from vmm_orchestrator.model import Migration, Vif, Workload
from vmm_orchestrator.statekind import ImportResult, KindContext, PoisonedEntry, StateKind
from vmm_state import options
from vmm_state.bundle import BundleHeader, SectionSource, read_bundle, write_bundle
from vmm_state.service import StateHost, StateSettings, nva_voucher
from vmm_state.wire import Conflict, Forbidden, TlsFiles, Unauthorized, encode_migration

KEY = b"replay-key-0123456789abcdef"
SHARED = "shared-token"
TOKENS = {"h1": "token-of-h1", "h2": "token-of-h2", "h3": "token-of-h3"}
VIF = Vif("52:54:00:00:00:01", 100, ("10.0.0.1",), (), "tap-vm1")
MIG = Migration("mig-1", Workload("vm1", (VIF,)), "h1", "h2")


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class DictKind(StateKind):
    """Sessions in a dict per netns: key -> entry (with its remaining ``timeout``)."""

    name = "fake"

    def __init__(self, conf: cfg.ConfigOpts, tables: dict[str | None, dict[int, Any]]) -> None:
        super().__init__(conf)
        self.tables = tables

    def table(self, netns: str | None) -> dict[int, Any]:
        return self.tables.setdefault(netns, {})

    def export(self, ctx: KindContext, since: float | None = None) -> Iterator[dict[str, Any]]:
        for entry in list(self.table(ctx.netns).values()):
            if since is None or entry["t"] >= since:
                yield dict(entry)

    def check(self, ctx: KindContext, entry: dict[str, Any]) -> None:
        if entry.get("mac") not in ctx.macs:
            raise PoisonedEntry("not the VM's")

    def import_(self, ctx: KindContext, entries: list[dict[str, Any]]) -> ImportResult:
        table = self.table(ctx.netns)
        for entry in entries:
            table[entry["n"]] = {k: v for k, v in entry.items() if k != "age"}
        return ImportResult.success(self.name, len(entries), {"keys": [e["n"] for e in entries]})

    def revert_import(self, ctx: KindContext, record: dict[str, Any]) -> None:
        for n in record["keys"]:
            self.table(ctx.netns).pop(n, None)

    def cleanup_source(self, ctx: KindContext) -> None:
        self.table(ctx.netns).clear()


class Site:
    def __init__(self) -> None:
        self.conf = cfg.ConfigOpts()
        self.conf(args=[], default_config_files=[])
        self.tables: dict[str | None, dict[int, Any]] = {}
        self.peers: dict[str, str] = {}
        self.hosts: list[StateHost] = []

    def host(self, name: str, vouch: Any = None, **settings: Any) -> StateHost:
        base: dict[str, Any] = {
            "key_id": "k1",
            "key": KEY,
            "verify_keys": {"k1": KEY},
            "token": SHARED,
            "bind_port": 0,
            "retry_delay": 0.01,
        }
        base.update(settings)
        kinds = {"fake": DictKind(self.conf, self.tables)}
        host = StateHost(name, f"ns-{name}", kinds, StateSettings(**base), self.peers, vouch)
        host.start()
        self.hosts.append(host)
        self.peers[name] = host.url
        return host

    def table(self, host: str) -> dict[int, Any]:
        return self.tables.setdefault(f"ns-{host}", {})

    def seed(self, *numbers: int, t: float | None = None) -> None:
        for n in numbers:
            self.table("h1")[n] = {"mac": VIF.mac, "n": n, "timeout": 100, "t": t or time.time()}


@pytest.fixture
def site() -> Iterator[Site]:
    s = Site()
    yield s
    for h in s.hosts:
        h.stop()


def post(
    host: StateHost,
    data: bytes,
    label: str,
    token: str = SHARED,
    migration: Migration = MIG,
) -> requests.Response:
    return requests.post(
        f"{host.url}/v1/state/{migration.id}",
        params={"label": label},
        data=data,
        headers={"X-Auth-Token": token, "X-Vmm-Migration": encode_migration(migration)},
        timeout=10,
    )


def capture(h1: StateHost, label: str) -> bytes:
    return b"".join(h1.export(MIG, label))


def deadline() -> float:
    return time.monotonic() + 5.0


# ------------------------------------------------------------------ replays


def test_each_export_carries_a_new_higher_seq(site: Site) -> None:
    h1 = site.host("h1")
    h1.expect(MIG)
    seqs = []
    for _ in range(3):
        bundle = read_bundle([capture(h1, "delta")], {"k1": KEY}, 10**7, lambda k: 10**6)
        seqs.append(bundle.header.seq)
    assert seqs == sorted(seqs) and len(set(seqs)) == 3 and seqs[0] > 10**18


def test_a_precopy_replayed_later_in_the_migration_is_refused(site: Site) -> None:
    h1, h2 = site.host("h1"), site.host("h2")
    h1.expect(MIG)
    h2.expect(MIG)
    site.seed(1, 2)
    precopy = capture(h1, "precopy")
    assert post(h2, precopy, "precopy").json()["ok"] is True
    # the migration goes on: session 2 closes at the source, 3 opens; the delta moves that
    site.table("h1").pop(2)
    site.seed(3)
    assert h1.push(MIG, "delta", ["fake"], deadline()).report.ok
    site.table("h2").pop(2)  # the destination's copy of the closed session expires
    site.table("h2")[1]["timeout"] = 7  # and session 1's lifetime runs down
    before = {n: dict(e) for n, e in site.table("h2").items()}
    answer = post(h2, precopy, "precopy")
    assert answer.status_code == 409, answer.text
    error = answer.json()["error"]
    assert error["code"] == "replayed"
    assert "is not newer than seq" in error["message"] and "nothing installed" in error["message"]
    assert site.table("h2") == before  # no session re-created, no lifetime reset


def test_the_same_delta_applies_once(site: Site) -> None:
    h1, h2 = site.host("h1"), site.host("h2")
    h1.expect(MIG)
    h2.expect(MIG)
    site.seed(1)
    delta = capture(h1, "delta")
    assert post(h2, delta, "delta").status_code == 200
    site.table("h2").clear()  # the session closed at the destination
    again = post(h2, delta, "delta")
    assert again.status_code == 409 and again.json()["report"]["reason"] == "policy_conflict"
    assert site.table("h2") == {}
    # through the client: a Conflict, which the stages answer as policy_conflict
    with pytest.raises(Conflict, match="not newer than seq"):
        h1.peer("h2").push(MIG, [delta], label="delta", deadline=deadline())


def test_a_bundle_replayed_after_commit_is_refused_unread(site: Site) -> None:
    h1, h2 = site.host("h1"), site.host("h2")
    h1.expect(MIG)
    h2.expect(MIG)
    site.seed(1)
    delta = capture(h1, "delta")
    unused = capture(h1, "delta")  # captured but never sent: its seq is higher
    assert post(h2, delta, "delta").status_code == 200
    assert h1.peer("h2").commit(MIG, deadline())["committed"] == 1
    site.table("h2").clear()
    for data in (delta, unused):
        answer = post(h2, data, "delta")
        assert answer.status_code == 409
        assert "is closed on host h2" in answer.json()["error"]["message"]
    assert site.table("h2") == {}
    # announced again (a new move under this id), the old bundles are still replays
    h2.expect(MIG)
    for data in (delta, unused):
        answer = post(h2, data, "delta")
        assert answer.status_code == 409
        message = answer.json()["error"]["message"]
        assert "closed on host h2" in message and "was exported before that" in message
    assert site.table("h2") == {}


def test_an_export_made_after_the_close_opens_the_id_again(site: Site) -> None:
    """A warm mirror's id is the same for the next planned move of the VM between the
    same hosts (vmm_state.warm.mirror_id): a bundle exported after the close is new."""
    h1, h2 = site.host("h1"), site.host("h2")
    h1.expect(MIG)
    h2.expect(MIG)
    site.seed(1)
    old = capture(h1, "delta")
    assert post(h2, old, "delta").status_code == 200
    h1.peer("h2").commit(MIG, deadline())
    h2.expect(MIG)
    assert post(h2, capture(h1, "delta"), "delta").status_code == 200
    assert post(h2, old, "delta").status_code == 409


def test_a_revert_of_every_label_by_the_source_keeps_the_seq_guard(site: Site) -> None:
    """The warm mirror's rebase: the source reverts the mirror, then pushes it whole."""
    h1, h2 = site.host("h1"), site.host("h2")
    h1.expect(MIG)
    h2.expect(MIG)
    site.seed(1)
    first = capture(h1, "precopy")
    assert post(h2, first, "precopy").status_code == 200
    h1.peer("h2").revert(MIG, None, deadline())
    assert site.table("h2") == {}
    assert post(h2, first, "precopy").status_code == 409  # the old one: still a replay
    assert post(h2, capture(h1, "precopy"), "precopy").status_code == 200  # rebuilt
    assert set(site.table("h2")) == {1}


def test_a_bundle_replayed_after_abort_is_refused(site: Site) -> None:
    h1, h2 = site.host("h1"), site.host("h2")
    h1.expect(MIG)
    h2.expect(MIG)
    site.seed(1)
    precopy, later = capture(h1, "precopy"), capture(h1, "precopy")
    assert post(h2, precopy, "precopy").status_code == 200
    assert h2.revert_imports(MIG) == (1, [])  # ABORTED: every import undone,
    h2.forget(MIG.id)  # and the migration ends here (as StatePrecopy.revert does)
    assert post(h2, later, "precopy").status_code == 409
    assert site.table("h2") == {}


def test_the_pull_path_applies_a_bundle_once(site: Site) -> None:
    h1, h2 = site.host("h1"), site.host("h2")
    h1.expect(MIG)
    site.seed(1)
    bundle = read_bundle([capture(h1, "precopy")], {"k1": KEY}, 10**7, lambda k: 10**6)
    assert h2.importer.import_bundle(MIG, bundle, "precopy").ok
    again = h2.importer.import_bundle(MIG, bundle, "precopy")
    assert again.error is not None and again.error.startswith("replayed: ")
    assert all(not a.ok for a in again.answers.values())


def test_an_unnumbered_bundle_applies_once_per_label(site: Site) -> None:
    h2 = site.host("h2")
    h2.expect(MIG)
    header = BundleHeader(MIG.id, "vm1", "h1", "delta", exported_at=time.time())
    entries = [{"mac": VIF.mac, "n": 5, "timeout": 100, "t": 0.0}]
    data = b"".join(write_bundle(header, "k1", KEY, [SectionSource("fake", entries)]))
    assert post(h2, data, "delta").status_code == 200
    answer = post(h2, data, "delta")
    assert answer.status_code == 409 and "unnumbered delta bundle" in answer.text


class Directory:
    def __init__(self, **endpoint: Any) -> None:
        self.endpoint = {"ipv4": ["10.0.0.1"], "ipv6": [], **endpoint}

    def get_endpoint(self, vni: int, mac: str) -> dict[str, Any]:
        if mac != VIF.mac:
            raise VmmError("no such endpoint")
        return self.endpoint


def test_a_restarted_destination_refuses_a_replay_through_the_directory(site: Site) -> None:
    h1 = site.host("h1")
    h1.expect(MIG)
    site.seed(1)
    delta = capture(h1, "delta")
    # committed: the VM is at h2, nothing pending; h2 restarted and forgot mig-1
    after_commit = Directory(nve="h2", pending_nve=None, migration_id=None)
    h2 = site.host("h2", vouch=nva_voucher(after_commit, "h2"))
    answer = post(h2, delta, "delta")
    assert answer.status_code == 403 and "it is not moving to h2" in answer.text
    # pending to h2, but for another migration
    other = Directory(nve="h1", pending_nve="h2", migration_id="mig-other")
    h2b = site.host("h2", vouch=nva_voucher(other, "h2"))
    answer = post(h2b, delta, "delta")
    assert answer.status_code == 403 and "pending for migration mig-other" in answer.text
    assert site.table("h2") == {}
    # this migration, pending to h2: taken
    pending = Directory(nve="h1", pending_nve="h2", migration_id=MIG.id)
    h2c = site.host("h2", vouch=nva_voucher(pending, "h2"))
    assert post(h2c, delta, "delta").status_code == 200


def test_an_export_needs_the_move_pending_in_the_directory(site: Site) -> None:
    h2 = site.host("h2")
    site.seed(1)
    not_moving = Directory(nve="h1", pending_nve=None, migration_id=None)
    site.host("h1", vouch=nva_voucher(not_moving, "h1"))
    assert not h2.pull(MIG, "precopy", ["fake"], deadline()).report.ok
    assert site.table("h2") == {}
    moving = Directory(nve="h1", pending_nve="h2", migration_id=MIG.id)
    site.host("h1", vouch=nva_voucher(moving, "h1"))
    assert h2.pull(MIG, "precopy", ["fake"], deadline()).report.ok
    assert set(site.table("h2")) == {1}


# ------------------------------------------------------- per-host credentials


def own(name: str) -> dict[str, Any]:
    digests = {peer: digest(token) for peer, token in TOKENS.items() if peer != name}
    return {"token": TOKENS[name], "peer_token_digests": digests}


def test_with_per_host_tokens_a_migration_runs_between_its_two_ends(site: Site) -> None:
    h1, h2 = site.host("h1", **own("h1")), site.host("h2", **own("h2"))
    h1.expect(MIG)
    h2.expect(MIG)
    site.seed(1, 2)
    assert h2.pull(MIG, "precopy", ["fake"], deadline()).report.ok
    site.seed(3)
    assert h1.push(MIG, "delta", ["fake"], deadline()).report.ok
    assert h1.peer("h2").commit(MIG, deadline())["committed"] == 2
    assert set(site.table("h2")) == {1, 2, 3}


def test_a_third_host_cannot_act_in_a_migration_between_two_others(site: Site) -> None:
    h1, h2 = site.host("h1", **own("h1")), site.host("h2", **own("h2"))
    h3 = site.host("h3", **own("h3"))
    h1.expect(MIG)
    h2.expect(MIG)
    site.seed(1)
    precopy = capture(h1, "precopy")  # signed with the shared [state] key: h3 has it too
    assert post(h2, precopy, "precopy", token=TOKENS["h1"]).status_code == 200
    site.peers["h1"], site.peers["h2"] = h1.url, h2.url
    with pytest.raises(Forbidden, match="host h3 is not the destination of migration mig-1"):
        h3.peer("h1").pull(MIG, h3.new_reader(), label="precopy", deadline=deadline())
    peer = h3.peer("h2")
    with pytest.raises(Forbidden, match="host h3 is not the source"):
        peer.push(MIG, [capture(h1, "delta")], label="delta", deadline=deadline())
    with pytest.raises(Forbidden):
        peer.revert(MIG, None, deadline())
    with pytest.raises(Forbidden):
        peer.commit(MIG, deadline())
    with pytest.raises(Forbidden):
        peer.synced(MIG, deadline())
    assert set(site.table("h2")) == {1}  # nothing reverted, nothing committed
    assert h2.importer.synced(MIG.id)
    # h2 may pull mig-1 from h1, but not a migration from h1 to h3
    to_h3 = Migration("mig-3", MIG.workload, "h1", "h3")
    h1.expect(to_h3)
    with pytest.raises(Forbidden, match="host h2 is not the destination of migration mig-3"):
        h2.peer("h1").pull(to_h3, h2.new_reader(), label="precopy", deadline=deadline())
    answer = post(h2, capture(h1, "delta"), "delta", token=TOKENS["h3"])
    assert answer.status_code == 403
    assert post(h2, b"", "delta", token="token-of-nobody").status_code == 401
    assert health_status(h2, TOKENS["h3"]) == 200  # health: any authenticated peer


def health_status(host: StateHost, token: str) -> int:
    answer = requests.get(f"{host.url}/v1/health", headers={"X-Auth-Token": token}, timeout=5)
    return answer.status_code


def test_peer_digests_are_checked_when_read() -> None:
    conf = cfg.ConfigOpts()
    conf(args=[], default_config_files=[])
    options.register_opts(conf)
    conf.set_override("peer_token_digests", {"h1": "abc"}, "state")
    with pytest.raises(ConfigError, match="not a SHA-256 hex digest"):
        options.peer_digests(conf)
    conf.set_override("peer_token_digests", {"h1": digest("x").upper()}, "state")
    assert options.peer_digests(conf) == {"h1": digest("x")}


def test_a_peer_is_identified_by_its_digest_in_constant_time() -> None:
    settings = StateSettings(
        key_id="k1",
        key=KEY,
        verify_keys={"k1": KEY},
        token="mine",
        peer_token_digests={"h1": digest("t1"), "h2": digest("t2")},
    )
    assert settings.identify(b"mine") == (True, None)
    assert settings.identify(b"t2") == (True, "h2")
    assert settings.identify(b"t3") == (False, None)


# ------------------------------------------------------------ memory: a cap


def test_beyond_the_import_cap_uploads_are_refused_unread_with_retry_after(site: Site) -> None:
    h1 = site.host("h1")
    h2 = site.host("h2", max_concurrent_imports=1)
    h1.expect(MIG)
    h2.expect(MIG)
    site.seed(*range(50))
    first, second = capture(h1, "precopy"), capture(h1, "delta")
    host, port = h2.url.removeprefix("http://").split(":")
    head = (
        f"POST /v1/state/{MIG.id}?label=precopy HTTP/1.1\r\nHost: x\r\nX-Auth-Token: {SHARED}\r\n"
        f"Content-Length: {len(first)}\r\n\r\n"
    ).encode()
    with socket.create_connection((host, int(port)), timeout=10) as slow:
        slow.sendall(head + first[:100])  # holds the only import slot, body half sent
        time.sleep(0.3)
        busy = post(h2, second, "delta")
        assert busy.status_code == 503, busy.text
        assert busy.headers["Retry-After"] == "1"
        assert "max_concurrent_imports" in busy.json()["error"]["message"]
        assert site.table("h2") == {}
        # the destination's own pull waits for the slot, then gives up at its deadline
        pulled = h2.pull(MIG, "precopy", ["fake"], time.monotonic() + 0.3)
        assert "max_concurrent_imports" in (pulled.report.error or "")
        slow.sendall(first[100:])
        answer = b""
        while b"\r\n\r\n" not in answer:
            answer += slow.recv(65536)
        assert answer.startswith(b"HTTP/1.1 200")
    done = post(h2, capture(h1, "delta"), "delta")
    assert done.status_code == 200 and done.json()["ok"], done.text
    assert len(site.table("h2")) == 50


def test_concurrent_uploads_get_their_turn_through_the_senders_retry(site: Site) -> None:
    h2 = site.host("h2", max_concurrent_imports=1)
    sources = []
    for i in range(4):
        mig = Migration(f"mig-{i}", Workload("vm1", (VIF,)), f"s{i}", "h2")
        src = site.host(f"s{i}")
        src.expect(mig)
        h2.expect(mig)
        sources.append((src, mig))
    site.tables["ns-s0"] = {
        n: {"mac": VIF.mac, "n": n, "timeout": 1, "t": 0.0} for n in range(2000)
    }
    for i in range(1, 4):
        site.tables[f"ns-s{i}"] = dict(site.tables["ns-s0"])
    results: list[Any] = []

    def send(src: StateHost, mig: Migration) -> None:
        for _ in range(200):  # a sender's policy retries a transfer_failed; this one until taken
            done = src.push(mig, "delta", ["fake"], time.monotonic() + 5)
            if done.report.ok:
                results.append(True)
                return
            time.sleep(0.02)
        results.append(done.report.error)

    threads = [threading.Thread(target=send, args=pair) for pair in sources]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [True] * 4


def test_an_upload_declared_over_the_byte_limit_is_refused_before_it_is_read(site: Site) -> None:
    h2 = site.host("h2", max_bundle_bytes=1024 * 1024)
    h2.expect(MIG)
    host, port = h2.url.removeprefix("http://").split(":")
    head = (
        f"POST /v1/state/{MIG.id}?label=delta HTTP/1.1\r\nHost: x\r\nX-Auth-Token: {SHARED}\r\n"
        f"Content-Length: {10**9}\r\n\r\n"
    ).encode()
    started = time.monotonic()
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(head + b"VMMSTATE")  # a gigabyte announced, 8 bytes sent
        answer = b""
        while True:
            got = sock.recv(65536)
            if not got:
                break  # the service closed the connection: it will not read the rest
            answer += got
    assert time.monotonic() - started < 2.0
    assert answer.startswith(b"HTTP/1.1 200") and b"Connection: close" in answer
    report = json.loads(answer.split(b"\r\n\r\n", 1)[1])
    assert report["error"].startswith("oversized: bundle of 1000000000 bytes")
    assert report["reason"] == "resource_limit"


# ------------------------------------------------- identity by client certificate


def test_with_tls_peer_identity_the_certificate_names_the_peer(
    site: Site, pki: Callable[[str], TlsFiles]
) -> None:
    h1 = site.host("h1", tls=pki("h1"), tls_peer_identity=True)
    h2 = site.host("h2", tls=pki("h2"), tls_peer_identity=True)
    h3 = site.host("h3", tls=pki("h3"), tls_peer_identity=True)
    h1.expect(MIG)
    h2.expect(MIG)
    site.seed(1)
    assert h2.pull(MIG, "precopy", ["fake"], deadline()).report.ok  # h2's certificate: the end
    with pytest.raises(Forbidden, match="host h3 is not the destination of migration mig-1"):
        h3.peer("h1").pull(MIG, h3.new_reader(), label="precopy", deadline=deadline())
    with pytest.raises(Forbidden, match="host h3 is not the source"):
        h3.peer("h2").commit(MIG, deadline())
    assert h1.peer("h2").commit(MIG, deadline())["committed"] == 1
    # a peer's token over another host's certificate is refused
    digests = {"h1": digest("t-h1"), "h2": digest("t-h2")}
    site.host("h4", tls=pki("h4"), tls_peer_identity=True, peer_token_digests=digests)
    liar = site.host("h5", tls=pki("h5"), token="t-h2")
    with pytest.raises(Unauthorized, match="the client certificate names h5, the token is h2's"):
        liar.peer("h4").synced(MIG, deadline())
    with pytest.raises(ConfigError, match="tls_peer_identity needs mutual TLS"):
        StateSettings(key_id="k1", key=KEY, verify_keys={"k1": KEY}, token="t",
                      tls_peer_identity=True)  # fmt: skip
