"""Metrics: the engine observer's counts and figures, the directory's lag, the exporter."""

from __future__ import annotations

import itertools
import secrets
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from vmm_orchestrator import engine, metrics, options
from vmm_orchestrator.engine import Pipeline
from vmm_orchestrator.errors import ConfigError, StageFailed
from vmm_orchestrator.journal import Journal
from vmm_orchestrator.model import Migration, MigrationEvent, Phase, Role, Vif, Workload
from vmm_orchestrator.nva.store import NvaStore
from vmm_orchestrator.stage import HostContext, Stage, StageContext

_IDS = itertools.count()


def value(name: str, **labels: str) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


def stage(name: str, phase: Phase, role: Role, run: Any = None) -> type[Stage]:
    def do_run(self: Stage, ctx: StageContext) -> Any:
        return run(ctx) if run else {}

    attrs = {"name": name, "phase": phase, "role": role, "run": do_run, "default_attempts": 1}
    return type(f"S_{name}", (Stage,), attrs)


def migration() -> Migration:
    vif = Vif(mac="52:54:00:00:00:01", vni=100, ipv4=("10.0.0.5",))
    mid = f"m-metrics-{next(_IDS)}"
    return Migration(id=mid, workload=Workload("vm1", (vif,)), source="hv1", destination="hv2")


@pytest.fixture
def observed() -> Iterator[None]:
    engine.add_observer(metrics.observe)
    yield
    engine.remove_observer(metrics.observe)


def make_pipeline(host: str, classes: list[type[Stage]]) -> Pipeline:
    conf = options.new_conf()
    for cls in classes:
        cls.register_opts(conf)  # the test's own stages are no entry points
    stages = [cls(conf) for cls in classes]
    return Pipeline(conf, HostContext(host, nva=None), Journal(":memory:"), stages=stages)


def test_a_successful_destination_counts_started_succeeded_and_the_figures(observed) -> None:
    host = "hv-ok"

    def announce(ctx: StageContext) -> dict[str, Any]:
        ctx.note(first_frame_monotonic=time.monotonic())
        return {}

    def peers(ctx: StageContext) -> dict[str, Any]:
        ctx.note(convergence_ms={"hv7": 12.5, "hv8": 40.0}, laggards=["hv9"])
        return {}

    def state(ctx: StageContext) -> dict[str, Any]:
        ctx.note(kinds={"conntrack": {"installed": 42, "import_ms": 3.0, "export_ms": 2.0}})
        return {}

    pipe = make_pipeline(
        host,
        [
            stage("p_prep", Phase.PREPARE, Role.DESTINATION),
            stage("state_delta", Phase.RESUMED, Role.DESTINATION, state),
            stage("p_announce", Phase.RESUMED, Role.DESTINATION, announce),
            stage("p_peers", Phase.RESUMED, Role.DESTINATION, peers),
        ],
    )
    before = {
        "first": value("vmm_resumed_to_first_announcement_seconds_count"),
        "hv7": value("vmm_peer_convergence_seconds_sum", peer="hv7"),
        "lag": value("vmm_peer_laggards_total", peer="hv9"),
        "ct": value("vmm_state_entries_moved_total", kind="conntrack", stage="state_delta"),
        "pause": value("vmm_state_pause_seconds_sum", kind="conntrack"),
    }
    mig = migration()
    start = time.monotonic()
    assert pipe.handle(MigrationEvent(mig, Phase.PREPARE, Role.DESTINATION, start)).ok
    labels = {"host": host, "role": "destination"}
    assert value("vmm_migrations_started_total", **labels) == 1
    assert value("vmm_migrations_succeeded_total", **labels) == 0  # not done yet
    assert pipe.handle(MigrationEvent(mig, Phase.RESUMED, Role.DESTINATION, start)).ok
    # a duplicate event is ignored: counted nowhere
    pipe.handle(MigrationEvent(mig, Phase.RESUMED, Role.DESTINATION, start))
    assert value("vmm_migrations_started_total", **labels) == 1
    assert value("vmm_migrations_succeeded_total", **labels) == 1
    ok = {"stage": "p_peers", "phase": "RESUMED", "outcome": "ok"}
    assert value("vmm_stage_duration_seconds_count", **ok) >= 1
    assert value("vmm_resumed_to_first_announcement_seconds_count") == before["first"] + 1
    got = value("vmm_peer_convergence_seconds_sum", peer="hv7") - before["hv7"]
    assert got == pytest.approx(0.0125)
    assert value("vmm_peer_laggards_total", peer="hv9") == before["lag"] + 1
    moved = value("vmm_state_entries_moved_total", kind="conntrack", stage="state_delta")
    assert moved == before["ct"] + 42
    paused = value("vmm_state_pause_seconds_sum", kind="conntrack") - before["pause"]
    assert paused == pytest.approx(0.005)


def test_a_failed_stage_counts_failed_by_phase_and_stage_and_reverted(observed) -> None:
    host = "hv-fail"

    def boom(ctx: StageContext) -> None:
        raise StageFailed("directory refused")

    pipe = make_pipeline(
        host,
        [
            stage("f_first", Phase.PREPARE, Role.DESTINATION),
            stage("f_refused", Phase.PREPARE, Role.DESTINATION, boom),
        ],
    )
    report = pipe.handle(
        MigrationEvent(migration(), Phase.PREPARE, Role.DESTINATION, time.monotonic())
    )
    assert not report.ok and report.reverted == ["f_first"]
    common = {"host": host, "role": "destination", "phase": "PREPARE"}
    assert value("vmm_migrations_failed_total", reason="f_refused", **common) == 1
    assert value("vmm_migrations_reverted_total", reason="stage_failed", **common) == 1
    assert value("vmm_migrations_succeeded_total", host=host, role="destination") == 0
    failed = {"stage": "f_refused", "phase": "PREPARE", "outcome": "failed"}
    assert value("vmm_stage_duration_seconds_count", **failed) == 1


def test_an_aborted_migration_counts_reverted_as_aborted(observed) -> None:
    host = "hv-abort"
    pipe = make_pipeline(host, [stage("a_tunnel", Phase.SWITCHOVER, Role.SOURCE)])
    mig = migration()
    assert pipe.handle(MigrationEvent(mig, Phase.SWITCHOVER, Role.SOURCE, time.monotonic())).ok
    assert pipe.handle(MigrationEvent(mig, Phase.ABORTED, Role.SOURCE, time.monotonic())).ok
    labels = {"host": host, "role": "source", "phase": "ABORTED", "reason": "aborted"}
    assert value("vmm_migrations_reverted_total", **labels) == 1
    reverted = {"stage": "a_tunnel", "phase": "SWITCHOVER", "outcome": "reverted"}
    assert value("vmm_stage_duration_seconds_count", **reverted) == 1


def test_hook_calls_vetoes_and_announcements() -> None:
    calls = {"operation": "migrate", "sub_operation": "begin"}
    before = (value("vmm_hook_calls_total", **calls), value("vmm_hook_vetoes_total", **calls))
    metrics.count_hook("migrate", "begin", {"allow": True, "reason": ""})
    metrics.count_hook("migrate", "begin", {"allow": False, "reason": "duplicate address"})
    assert value("vmm_hook_calls_total", **calls) == before[0] + 2
    assert value("vmm_hook_vetoes_total", **calls) == before[1] + 1
    garp = value("vmm_announcements_sent_total", kind="garp")
    metrics.count_announcement("garp")
    assert value("vmm_announcements_sent_total", kind="garp") == garp + 1


def test_directory_lag_per_nve() -> None:
    store = NvaStore(":memory:")
    try:
        store.register_nve("n1", "192.0.2.1", [100])
        store.register_nve("n2", "192.0.2.2", [100])
        store.add_endpoint(100, "52:54:00:00:00:09", ["10.0.0.9"], [], "n1")
        store.ack("n1", store.revision)
        collector = metrics.DirectoryCollector(store)
        families = {f.name: f for f in collector.collect()}
        lag = {s.labels["nve"]: s.value for s in families["vmm_nva_nve_lag_revisions"].samples}
        assert families["vmm_nva_revision"].samples[0].value == store.revision > 0
        assert families["vmm_nva_up"].samples[0].value == 1
        assert lag == {"n1": 0, "n2": store.revision}
    finally:
        store.close()


def test_the_exporter_checks_its_token_and_refuses_a_public_address_without_one() -> None:
    with pytest.raises(ConfigError, match="token"):
        metrics.MetricsExporter("0.0.0.0", 0, None)
    token = secrets.token_urlsafe(16)
    with metrics.MetricsExporter("127.0.0.1", 0, token) as exporter:
        url = exporter.url
        assert requests.get(url, timeout=5).status_code == 401
        bad = requests.get(url, headers={"Authorization": "Bearer nope"}, timeout=5)
        assert bad.status_code == 401
        basic = requests.get(url, headers={"Authorization": f"Basic {token}"}, timeout=5)
        assert basic.status_code == 401
        good = requests.get(url, headers={"Authorization": f"Bearer {token}"}, timeout=5)
        assert good.status_code == 200
        assert "vmm_migrations_started_total" in good.text
        other = url.replace("/metrics", "/other")
        headers = {"Authorization": f"Bearer {token}"}
        assert requests.get(other, headers=headers, timeout=5).status_code == 404
    with pytest.raises(requests.ConnectionError):
        requests.get(url, timeout=2)


def test_start_from_conf_is_off_by_default_and_serves_when_enabled() -> None:
    conf = options.new_conf()
    try:
        assert metrics.start_from_conf(conf) is None
        assert conf.metrics.bind_host == "127.0.0.1" and not conf.metrics.enabled
        conf.set_override("enabled", True, group="metrics")
        conf.set_override("port", 0, group="metrics")
        exporter = metrics.start_from_conf(conf)
        assert exporter is not None
        try:
            assert requests.get(exporter.url, timeout=5).status_code == 200  # loopback
        finally:
            exporter.stop()
    finally:
        engine.remove_observer(metrics.observe)


def test_the_directory_serves_its_lag_on_its_own_port() -> None:
    conf = options.new_conf()
    conf.set_override("enabled", True, group="metrics")
    conf.set_override("directory_port", 0, group="metrics")
    store = NvaStore(":memory:")
    store.register_nve("n1", "192.0.2.1", [100])
    try:
        exporter = metrics.start_from_conf(conf, directory=store)
        assert exporter is not None and exporter.port == 0  # directory_port, not port
        try:
            text = requests.get(exporter.url, timeout=5).text
            assert 'vmm_nva_nve_lag_revisions{nve="n1"} 1.0' in text
        finally:
            exporter.stop()
        # stopped: the collector is gone with it
        assert metrics.REGISTRY.get_sample_value("vmm_nva_revision") is None
    finally:
        engine.remove_observer(metrics.observe)
        store.close()


def test_a_closed_directory_is_reported_down_and_the_rest_still_served() -> None:
    store = NvaStore(":memory:")
    store.close()
    collector = metrics.DirectoryCollector(store)
    families = {f.name: f for f in collector.collect()}
    assert families["vmm_nva_up"].samples[0].value == 0
    assert "vmm_nva_nve_lag_revisions" not in families
