"""The demo's side-by-side picture: each mode migrates under probe traffic, as the demo does."""

from __future__ import annotations

import os
import time
import xml.etree.ElementTree as ET

from PIL import Image

from vmm_lab import plot_modes
from vmm_lab.linux.demo import ProbeRun, lab_site
from vmm_lab.linux.hypervisor import LabHypervisor


def run_one(conf, mode: str, prefix: str):
    """One mode as demo.run_mode runs it, keeping the picture's column."""
    settings = conf.lab
    with lab_site(conf, prefix, mode == "orchestrated") as site:
        vm1 = site.lab.vms["vm1"]
        senders = [v for n, v in sorted(site.lab.vms.items()) if n != "vm1" and v.host != "h2"]
        probes = ProbeRun(site, vm1, senders, settings.probe_port)
        hyper = LabHypervisor(site.lab, site.dispatchers, qemu_rarp=mode != "none")
        duration = settings.warmup_s + settings.downtime_ms / 1000.0 + 0.3 + settings.observe_s
        try:
            with plot_modes.Recorder() as recorder:
                start_at = probes.start(settings.probe_rate, duration)
                time.sleep(max(0.0, start_at + settings.warmup_s - time.monotonic()))
                record, futures = hyper.migrate(vm1, "h2", settings.downtime_ms)
                reports = [f.result(timeout=60) for f in futures]
                streams = probes.finish(record)
        finally:
            probes.kill()
        column = plot_modes.mode_timeline(mode, recorder.docs, record, site.workdir)
    return column, reports, streams


def test_demo_picture_per_mode(lab_conf, prefix, tmp_path):
    columns, measured = [], {}
    for mode in ("none", "orchestrated"):
        column, reports, streams = run_one(lab_conf, mode, f"{prefix}{mode[0]}")
        columns.append(column)
        measured[mode] = (reports, streams)
    none, orchestrated = columns
    # The columns carry what the demo's report measured, packet for packet.
    for column, (_, streams) in zip(columns, measured.values(), strict=True):
        by_name = {s.name: s for s in column.streams}
        assert set(by_name) == {s.stream for s in streams}
        for s in streams:
            assert len(by_name[s.stream].received_ms) == s.received, s.stream
            assert len(by_name[s.stream].lost_ms) == s.lost, s.stream
            after = sum(1 for t in by_name[s.stream].lost_ms if t >= 0)
            assert after == s.lost_after_resume, s.stream
    assert none.bars == [] and sum(s.lost_after_resume for s in measured["none"][1]) > 0
    stages = {b.stage for b in orchestrated.bars}
    assert {"nva_prestage", "inflight_tunnel", "announce", "peer_update"} <= stages
    assert orchestrated.pause is not None and orchestrated.pause[0] < -40.0
    assert [m[1] for m in orchestrated.marks] == ["1st announcement"]
    svg = plot_modes.write_side_by_side(columns, str(tmp_path / "demo.svg"))
    png = plot_modes.write_side_by_side(columns, str(tmp_path / "demo.png"))
    assert ET.parse(svg).getroot().tag.endswith("svg")
    with Image.open(png) as image:
        image.verify()
        assert image.format == "PNG" and image.size[0] > 1000  # two columns
    keep = os.environ.get("VMM_KEEP_PICTURE")
    if keep:  # to look at it: VMM_KEEP_PICTURE=/tmp/demo.png pytest ...
        plot_modes.write_side_by_side(columns, keep)
