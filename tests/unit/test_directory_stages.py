"""The directory stages against a real NVA server (HTTP + SQLite).

The NVEs here are stand-ins that acknowledge through the real API (or, for
a laggard, do not); the kernel side is covered by the functional tests.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Iterator

import pytest
from oslo_config import cfg

from vmm_orchestrator import options
from vmm_orchestrator.errors import StageFailed, TransientError
from vmm_orchestrator.model import Migration, Phase, Role, Vif, Workload
from vmm_orchestrator.nva.client import NvaClient
from vmm_orchestrator.nva.server import NvaServer
from vmm_orchestrator.nva.store import NvaStore
from vmm_orchestrator.stage import HostContext, StageContext
from vmm_orchestrator.stages import NvaPrestage, PeerUpdate

VNI = 300
MAC = "52:54:00:01:2c:0a"


@pytest.fixture
def nva() -> Iterator[tuple[NvaServer, NvaClient]]:
    token = secrets.token_urlsafe(16)
    server = NvaServer(NvaStore(":memory:"), token, "127.0.0.1", 0)
    server.start()
    client = NvaClient(server.url, token)
    for nve_id in ("a", "b", "c"):
        client.register_nve(nve_id, f"198.18.30.{ord(nve_id) - 96}", [VNI])
    client.add_endpoint(VNI, MAC, ["198.19.30.10"], ["fd00:300::10"], "a")
    yield server, client
    server.stop()


def context(client: NvaClient, phase: Phase, deadline: float = 5.0) -> StageContext:
    workload = Workload("vm", (Vif(MAC, VNI, ("198.19.30.10",), ("fd00:300::10",), "tap-vm"),))
    migration = Migration("m-1", workload, "a", "b")
    return StageContext(
        migration, phase, Role.DESTINATION, HostContext("b", client), time.monotonic() + deadline
    )


def conf() -> cfg.ConfigOpts:
    return options.new_conf()


def ack_loop(client: NvaClient, nve: str, stop: threading.Event) -> None:
    """A stand-in NVE agent: watch and acknowledge every change."""
    revision = client.snapshot(VNI)[0]
    while not stop.is_set():
        revision, _ = client.watch(nve, revision, 0.2)
        client.ack(nve, revision)


def test_prestage_then_abort_leaves_the_endpoint_unchanged(nva):
    _, client = nva
    stage = NvaPrestage(conf())
    ctx = context(client, Phase.PREPARE)
    record = stage.run(ctx)
    assert client.get_endpoint(VNI, MAC)["pending_nve"] == "b"
    stage.revert(ctx, record)
    endpoint = client.get_endpoint(VNI, MAC)
    assert (endpoint["nve"], endpoint["seq"], endpoint["pending_nve"]) == ("a", 0, None)


def test_prestage_refusal_is_a_hard_failure_not_a_retry(nva):
    _, client = nva
    client.prestage(VNI, MAC, "c", "another-migration")
    with pytest.raises(StageFailed):
        NvaPrestage(conf()).run(context(client, Phase.PREPARE))


def test_unreachable_directory_is_transient(nva):
    server, client = nva
    server.stop()
    with pytest.raises(TransientError):
        NvaPrestage(conf()).run(context(client, Phase.PREPARE))


def test_peer_update_commits_and_measures_each_peer(nva):
    _, client = nva
    ctx = context(client, Phase.PREPARE)
    NvaPrestage(conf()).run(ctx)
    stop = threading.Event()
    threads = [threading.Thread(target=ack_loop, args=(client, n, stop)) for n in "abc"]
    for t in threads:
        t.start()
    try:
        ctx = context(client, Phase.RESUMED)
        PeerUpdate(conf()).run(ctx)
    finally:
        stop.set()
        for t in threads:
            t.join()
    endpoint = client.get_endpoint(VNI, MAC)
    assert (endpoint["nve"], endpoint["seq"]) == ("b", 1)
    assert set(ctx.notes["convergence_ms"]) == {"a", "b", "c"}
    assert all(0 <= ms < 1000 for ms in ctx.notes["convergence_ms"].values())
    assert ctx.notes["laggards"] == []


def test_peer_update_expires_the_entry_of_a_peer_that_did_not_acknowledge(nva):
    _, client = nva
    c = conf()
    stage = PeerUpdate(c)
    c.set_override("ack_timeout", 0.3, group="stage_peer_update")
    NvaPrestage(c).run(context(client, Phase.PREPARE))
    stop = threading.Event()
    threads = [threading.Thread(target=ack_loop, args=(client, n, stop)) for n in "ab"]
    for t in threads:
        t.start()
    try:
        ctx = context(client, Phase.RESUMED)
        stage.run(ctx)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert ctx.notes["laggards"] == ["c"]
    _, changes = client.poll("c", 0, 0)  # the change log as it is (a watch streams)
    expires = [ch for ch in changes if ch["kind"] == "expire"]
    assert expires and expires[-1]["mac"] == MAC
    _, changes_a = client.poll("a", 0, 0)
    assert not [ch for ch in changes_a if ch["kind"] == "expire"]
