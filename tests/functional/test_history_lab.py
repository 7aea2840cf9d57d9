"""`vmm migration list|show|plot` on the journals of a running lab, with the agent's config file."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

from PIL import Image

from vmm_lab.linux.demo import lab_site
from vmm_lab.linux.hypervisor import LabHypervisor
from vmm_orchestrator import agent, engine, history
from vmm_orchestrator.cli import build_parser, load_config
from vmm_orchestrator.migration_cmd import MigrationCommand
from vmm_orchestrator.model import Migration, MigrationEvent, Phase, Role


def agent_conf(conf, path) -> str:
    """The [agent] and [host:<name>] sections an agent of this lab would run with."""
    lines = ["[agent]", f"hosts = {','.join(conf.agent.hosts)}", ""]
    for name in conf.agent.hosts:
        group = conf[agent.host_group(name)]
        lines += [
            f"[{agent.host_group(name)}]",
            f"vtep = {group.vtep}",
            f"vnis = {','.join(map(str, group.vnis))}",
            f"netns = {group.netns}",
            f"journal = {group.journal}",
            "",
        ]
    path.write_text("\n".join(lines))
    return str(path)


def vmm(capsys, *argv: str) -> str:
    """Run `vmm ARGV` with the migration command as the entry point would, return stdout."""
    command = MigrationCommand()
    args = build_parser({command.name: command}).parse_args(list(argv))
    assert command.run(load_config(args.config_file), args) == 0
    return capsys.readouterr().out


def test_list_show_and_plot_a_migration_while_the_agents_run(lab_conf, prefix, tmp_path, capsys):
    engine.add_observer(history.record)
    try:
        with lab_site(lab_conf, prefix, orchestrated=True) as site:
            vm1 = site.lab.vms["vm1"]
            hyper = LabHypervisor(site.lab, site.dispatchers, qemu_rarp=False)
            record, futures = hyper.migrate(vm1, "h2", 50)
            reports = [f.result(timeout=30) for f in futures]
            assert all(r.ok for r in reports), [r.error for r in reports]
            mid = record.migration.id
            notes = {t.stage: t.notes for r in reports for t in r.timeline}
            conf_file = agent_conf(lab_conf, tmp_path / "agent.conf")
            # The hosts' journals stay open by the running pipelines.
            listing = vmm(capsys, "--config-file", conf_file, "migration", "list")
            shown = vmm(capsys, "--config-file", conf_file, "migration", "show", mid)
            doc = json.loads(
                vmm(capsys, "--config-file", conf_file, "migration", "show", mid, "-f", "json")
            )
            listed = json.loads(
                vmm(capsys, "--config-file", conf_file, "migration", "list", "-f", "json")
            )
            svg, png = tmp_path / "m.svg", tmp_path / "m.png"
            for path in (svg, png):
                vmm(capsys, "--config-file", conf_file, "migration", "plot", mid, "-o", str(path))
    finally:
        engine.remove_observer(history.record)

    print(shown)  # for the record of the run
    assert mid in listing and "h1 -> h2" in listing
    assert {(m["host"], m["role"], m["status"]) for m in listed["migrations"]} == {
        ("h1", "source", "done"),
        ("h2", "destination", "done"),
    }
    views = {v["host"]: v for v in doc["migration"]}
    assert set(views) == {"h1", "h2"}
    assert views["h2"]["vm"] == "vm1" and views["h2"]["source"] == "h1"
    assert [p["phase"] for p in views["h2"]["phases"]] == ["PREPARE", "RESUMED"]
    assert [p["phase"] for p in views["h1"]["phases"]] == ["SWITCHOVER", "COMPLETED"]
    assert all(p["state"] == "completed" and p["duration_ms"] >= 0 for p in views["h1"]["phases"])
    stages = {s["stage"]: s for v in views.values() for s in v["stages"]}
    assert set(stages) == set(engine.DEFAULT_STAGES)  # the pipeline an agent runs
    assert all(s["outcome"] == "ok" and s["attempts"] == 1 for s in stages.values())
    # The figures the stages noted are in the history, as the reports had them.
    assert (
        stages["peer_update"]["figures"]["convergence_ms"] == notes["peer_update"]["convergence_ms"]
    )
    # hold_time (1 s), and no longer: every peer had acknowledged by then
    assert 1.0 <= stages["hold_timer"]["figures"]["hold_s"] < 1.5
    assert stages["hold_timer"]["figures"]["unacked"] == []
    assert stages["hold_timer"]["duration_ms"] >= 1000.0
    assert views["h1"]["failure"] is None and views["h1"]["reverted"] == []
    for word in ("peer_update", "convergence_ms", "RESUMED", "h2 (destination): done"):
        assert word in shown, word
    ET.parse(svg)  # well-formed XML
    assert ET.parse(svg).getroot().tag.endswith("svg")
    with Image.open(png) as image:
        image.verify()
        assert image.format == "PNG" and image.size[0] > 300


def test_show_a_reverted_migration(lab_conf, prefix, tmp_path, capsys):
    engine.add_observer(history.record)
    try:
        with lab_site(lab_conf, prefix, orchestrated=True) as site:
            vm1 = site.lab.vms["vm1"]
            mig = Migration("mig-hist-abort", vm1.workload, "h1", "h2")

            def emit(host: str, phase: Phase, role: Role):
                event = MigrationEvent(mig, phase, role, 0.0)
                return site.dispatchers[host].submit(event).result(timeout=30)

            assert emit("h2", Phase.PREPARE, Role.DESTINATION).ok
            assert emit("h1", Phase.SWITCHOVER, Role.SOURCE).ok
            assert emit("h2", Phase.ABORTED, Role.DESTINATION).ok
            assert emit("h1", Phase.ABORTED, Role.SOURCE).ok
            conf_file = agent_conf(lab_conf, tmp_path / "agent.conf")
            shown = vmm(capsys, "--config-file", conf_file, "migration", "show", mig.id)
            doc = json.loads(
                vmm(capsys, "--config-file", conf_file, "migration", "show", mig.id, "-f", "json")
            )
    finally:
        engine.remove_observer(history.record)
    print(shown)
    views = {v["host"]: v for v in doc["migration"]}
    assert views["h2"]["status"] == "reverted"
    # newest first; nve_prepare runs alongside nva_prestage, either may finish last
    assert sorted(views["h2"]["reverted"]) == ["nva_prestage", "nve_prepare"]
    assert views["h1"]["reverted"] == ["inflight_tunnel"]
    assert {s["outcome"] for v in views.values() for s in v["stages"]} == {"reverted"}
    assert all(
        s["revert_ms"] is not None and s["revert_ms"] >= 0
        for v in views.values()
        for s in v["stages"]
    )
    newest_first = ", ".join(views["h2"]["reverted"])
    assert f"reverted on h2 (newest first): {newest_first}" in shown
