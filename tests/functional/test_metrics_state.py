"""State metrics after a lab migration that moves firewall and bridge state, scraped over HTTP."""

from __future__ import annotations

import secrets

import requests
from prometheus_client.parser import text_string_to_metric_families

from vmm_lab import proofs
from vmm_lab.linux.demo import lab_site
from vmm_orchestrator import engine, metrics


def scrape(url: str, token: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    answer = requests.get(url, headers={"Authorization": f"Bearer {token}"}, timeout=5)
    assert answer.status_code == 200
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(answer.text)
        for s in family.samples
    }


def test_state_entries_and_pause_time_per_kind(lab_conf, prefix):
    token = secrets.token_urlsafe(16)
    exporter = metrics.MetricsExporter("127.0.0.1", 0, token)
    exporter.start()
    engine.add_observer(metrics.observe)
    try:
        before = scrape(exporter.url, token)
        with lab_site(lab_conf, prefix, orchestrated=True, state=True) as site:
            setup = proofs.arrange(site)
            try:
                hyper = site.state_hypervisor()
                _, futures = hyper.migrate(site.lab.vms["vm1"], "h2", 50)
                reports = [f.result(timeout=60) for f in futures]
            finally:
                setup.close()
            after = scrape(exporter.url, token)
    finally:
        engine.remove_observer(metrics.observe)
        exporter.stop()
    assert all(r.ok for r in reports), [r.error for r in reports]
    notes = {t.stage: t.notes for r in reports for t in r.timeline}
    moved_total = 0
    for stage in ("state_precopy", "state_delta"):
        for kind, figures in notes[stage]["kinds"].items():
            key = ("vmm_state_entries_moved_total", (("kind", kind), ("stage", stage)))
            moved = after.get(key, 0.0) - before.get(key, 0.0)
            assert moved == figures["installed"], (stage, kind)
            moved_total += moved
    assert moved_total > 0  # the proofs' sessions, sets and memberships moved
    for kind, figures in notes["state_delta"]["kinds"].items():
        count = ("vmm_state_pause_seconds_count", (("kind", kind),))
        total = ("vmm_state_pause_seconds_sum", (("kind", kind),))
        assert after[count] - before.get(count, 0.0) == 1, kind
        inside = (figures["import_ms"] + (figures["export_ms"] or 0.0)) / 1000.0
        assert abs((after[total] - before.get(total, 0.0)) - inside) < 1e-6, kind
