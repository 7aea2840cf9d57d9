"""Prometheus metrics after a real migration in the namespace lab, scraped over HTTP."""

from __future__ import annotations

import secrets
import time

import requests
from prometheus_client.parser import text_string_to_metric_families

from vmm_lab.linux.demo import lab_site
from vmm_lab.linux.hypervisor import LabHypervisor
from vmm_orchestrator import engine, metrics


def scrape(url: str, token: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the endpoint: (name, sorted labels) -> value."""
    answer = requests.get(url, headers={"Authorization": f"Bearer {token}"}, timeout=5)
    assert answer.status_code == 200, answer.text
    assert answer.headers["Content-Type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(answer.text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def delta(after, before, name: str, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


def test_scrape_after_a_lab_migration(lab_conf, prefix):
    token = secrets.token_urlsafe(16)
    exporter = metrics.MetricsExporter("127.0.0.1", 0, token)
    exporter.start()
    engine.add_observer(metrics.observe)
    try:
        # Without the token, or with a wrong one, nothing is served.
        assert requests.get(exporter.url, timeout=5).status_code == 401
        wrong = {"Authorization": "Bearer " + token[:-1] + "x"}
        assert requests.get(exporter.url, headers=wrong, timeout=5).status_code == 401
        before = scrape(exporter.url, token)
        with lab_site(lab_conf, prefix, orchestrated=True) as site:
            exporter.collectors.append(metrics.watch_directory(site.server.store))
            vm1 = site.lab.vms["vm1"]
            hyper = LabHypervisor(site.lab, site.dispatchers, qemu_rarp=False)
            record, futures = hyper.migrate(vm1, "h2", 50)
            reports = [f.result(timeout=30) for f in futures]
            assert all(r.ok for r in reports), [r.error for r in reports]
            notes = {t.stage: t.notes for r in reports for t in r.timeline}
            resumed = next(r for r in reports if r.phase.value == "RESUMED")
            # The NVE agents acknowledge the directory's last revision shortly after.
            deadline = time.monotonic() + 5
            while True:
                after = scrape(exporter.url, token)
                lags = {
                    dict(labels)["nve"]: value
                    for (name, labels), value in after.items()
                    if name == "vmm_nva_nve_lag_revisions"
                }
                if (lags and not any(lags.values())) or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            revision = site.server.store.revision
    finally:
        engine.remove_observer(metrics.observe)
        exporter.stop()

    assert lags == {"h1": 0, "h2": 0, "h3": 0}
    assert after[("vmm_nva_revision", ())] == revision > 0
    for host, role in (("h1", "source"), ("h2", "destination")):
        assert delta(after, before, "vmm_migrations_started_total", host=host, role=role) == 1
        assert delta(after, before, "vmm_migrations_succeeded_total", host=host, role=role) == 1
    assert not any(
        name in ("vmm_migrations_failed_total", "vmm_migrations_reverted_total")
        and after[(name, labels)] != before.get((name, labels), 0.0)
        for name, labels in after
    )
    for stage, phase in (
        ("nva_prestage", "PREPARE"),
        ("nve_prepare", "PREPARE"),
        ("inflight_tunnel", "SWITCHOVER"),
        ("announce", "RESUMED"),
        ("nve_plug", "RESUMED"),
        ("peer_update", "RESUMED"),
        ("hold_timer", "COMPLETED"),
    ):
        labels = {"stage": stage, "phase": phase, "outcome": "ok"}
        assert delta(after, before, "vmm_stage_duration_seconds_count", **labels) == 1, stage
    hold = delta(
        after,
        before,
        "vmm_stage_duration_seconds_sum",
        stage="hold_timer",
        phase="COMPLETED",
        outcome="ok",
    )
    assert 0.9 < hold < 5.0  # [stage_hold_timer] hold_time = 1 s in lab_conf
    # RESUMED -> first announcement: the value the announce stage noted, in seconds.
    first = notes["announce"]["first_frame_monotonic"]
    origin_to_first = delta(after, before, "vmm_resumed_to_first_announcement_seconds_sum")
    assert delta(after, before, "vmm_resumed_to_first_announcement_seconds_count") == 1
    offset = next(t.started_offset_ms for t in resumed.timeline if t.stage == "announce")
    assert 0 < origin_to_first < 0.5
    assert origin_to_first * 1000 >= offset  # the frame left after the stage started
    assert abs(origin_to_first - (first - record.resumed_at)) < 1e-6
    # Per-peer convergence: one observation per peer the stage measured, same values.
    convergence = notes["peer_update"]["convergence_ms"]
    assert set(convergence) >= {"h1", "h3"}
    for peer, ms in convergence.items():
        assert delta(after, before, "vmm_peer_convergence_seconds_count", peer=peer) == 1
        got = delta(after, before, "vmm_peer_convergence_seconds_sum", peer=peer)
        assert abs(got - ms / 1000.0) < 1e-6, peer
