"""Migration history from a sqlite journal, `vmm migration`, the picture and JSON logs."""

from __future__ import annotations

import json
import logging
import time
import xml.etree.ElementTree as ET
from typing import Any

import pytest
from oslo_config import cfg

from vmm_orchestrator import engine, history, logs, options, plot
from vmm_orchestrator.cli import build_parser, load_config
from vmm_orchestrator.engine import Pipeline
from vmm_orchestrator.errors import StageFailed, VmmError
from vmm_orchestrator.journal import Journal
from vmm_orchestrator.migration_cmd import MigrationCommand
from vmm_orchestrator.model import Migration, MigrationEvent, Phase, Role, Vif, Workload
from vmm_orchestrator.stage import HostContext, Stage, StageContext


def stage(
    name: str, phase: Phase, role: Role, run: Any = None, *, conf: cfg.ConfigOpts
) -> type[Stage]:
    """A stage class, its options registered on ``conf`` (it is no entry point)."""

    def do_run(self: Stage, ctx: StageContext) -> Any:
        return run(ctx) if run else {"by": name}

    attrs = {"name": name, "phase": phase, "role": role, "run": do_run, "default_attempts": 1}
    cls: type[Stage] = type(f"H_{name}", (Stage,), attrs)
    cls.register_opts(conf)
    return cls


def migration(mid: str) -> Migration:
    vif = Vif(mac="52:54:00:00:00:01", vni=100, ipv4=("10.0.0.5",))
    return Migration(id=mid, workload=Workload("web-1", (vif,)), source="hv1", destination="hv2")


def peers(ctx: StageContext) -> dict[str, Any]:
    ctx.note(convergence_ms={"hv3": 11.5}, laggards=[])
    return {}


def refuse(ctx: StageContext) -> None:
    raise StageFailed("duplicate address 10.0.0.5")


@pytest.fixture
def site(tmp_path):
    """A destination host's pipeline journalling to a file, recorded, and its agent.conf."""
    path = tmp_path / "journal-hv2.sqlite"
    conf = options.new_conf()
    stages = [
        cls(conf)
        for cls in (
            stage("h_prestage", Phase.PREPARE, Role.DESTINATION, conf=conf),
            stage("h_peers", Phase.RESUMED, Role.DESTINATION, peers, conf=conf),
            stage(
                "h_guard", Phase.RESUMED, Role.DESTINATION, lambda ctx: ctx.note(ok=1), conf=conf
            ),
        )
    ]
    journal = Journal(str(path))
    pipe = Pipeline(conf, HostContext("hv2", nva=None), journal, stages=stages)
    conf_file = tmp_path / "agent.conf"
    conf_file.write_text(
        f"[agent]\nhosts = hv2\n\n[host:hv2]\nvtep = 192.0.2.2\nvnis = 100\njournal = {path}\n"
    )
    engine.add_observer(history.record)
    yield pipe, str(conf_file)
    engine.remove_observer(history.record)
    journal.close()


def vmm(capsys, *argv: str) -> str:
    command = MigrationCommand()
    args = build_parser({command.name: command}).parse_args(list(argv))
    assert command.run(load_config(args.config_file), args) == 0
    return capsys.readouterr().out


def test_history_of_a_done_and_a_failed_migration(site, capsys, tmp_path) -> None:
    pipe, conf_file = site
    good = migration("m-good")
    start = time.monotonic()
    assert pipe.handle(MigrationEvent(good, Phase.PREPARE, Role.DESTINATION, start)).ok
    assert pipe.handle(MigrationEvent(good, Phase.RESUMED, Role.DESTINATION, time.monotonic())).ok
    bad = migration("m-bad")
    pipe.stages.append(
        stage("h_refuse", Phase.PREPARE, Role.DESTINATION, refuse, conf=pipe.conf)(pipe.conf)
    )
    pipe._by_name["h_refuse"] = pipe.stages[-1]
    pipe._groups[(Phase.PREPARE, Role.DESTINATION)].append(pipe.stages[-1])
    report = pipe.handle(MigrationEvent(bad, Phase.PREPARE, Role.DESTINATION, time.monotonic()))
    assert not report.ok

    # Read while the pipeline's journal connection is open (the agent runs).
    listed = json.loads(vmm(capsys, "--config-file", conf_file, "migration", "list", "-f", "json"))
    rows = {m["id"]: m for m in listed["migrations"]}
    assert [m["id"] for m in listed["migrations"]] == ["m-bad", "m-good"]  # newest first
    assert rows["m-good"]["status"] == "done" and rows["m-good"]["vm"] == "web-1"
    assert rows["m-bad"]["status"] == "failed"
    assert "duplicate address" in rows["m-bad"]["failure"]

    doc = json.loads(
        vmm(capsys, "--config-file", conf_file, "migration", "show", "m-good", "-f", "json")
    )
    (view,) = doc["migration"]
    assert (view["source"], view["destination"], view["role"]) == ("hv1", "hv2", "destination")
    assert [p["phase"] for p in view["phases"]] == ["PREPARE", "RESUMED"]
    stages = {s["stage"]: s for s in view["stages"]}
    assert stages["h_peers"]["figures"] == {"convergence_ms": {"hv3": 11.5}, "laggards": []}
    assert stages["h_guard"]["figures"] == {"ok": 1}
    assert all(s["outcome"] == "ok" for s in stages.values())
    assert stages["h_peers"]["offset_ms"] >= 0 and stages["h_peers"]["duration_ms"] >= 0

    shown = vmm(capsys, "--config-file", conf_file, "migration", "show", "m-bad")
    assert "failure on hv2: stage h_refuse failed in PREPARE" in shown
    assert "reverted on hv2 (newest first): h_prestage" in shown
    assert "h_refuse" in shown and "failed" in shown

    out = tmp_path / "m-good.svg"
    assert "wrote" in vmm(capsys, "--config-file", conf_file, "migration", "plot", "m-good",
                          "-o", str(out))  # fmt: skip
    assert ET.parse(out).getroot().tag.endswith("svg")


def test_unknown_migration_and_a_host_without_a_journal(tmp_path) -> None:
    conf_file = tmp_path / "agent.conf"
    conf_file.write_text(
        "[agent]\nhosts = hv9\n\n[host:hv9]\nvtep = 192.0.2.9\n"
        f"journal = {tmp_path / 'none.sqlite'}\n"
    )
    conf = load_config([str(conf_file)])
    readers = history.open_readers(conf)
    assert readers == []
    assert not (tmp_path / "none.sqlite").exists()  # reading creates nothing
    with pytest.raises(VmmError, match="no migration m-x"):
        history.find_migration(readers, "m-x")


def test_timeline_needs_a_recorded_report() -> None:
    with pytest.raises(VmmError, match="nothing to draw"):
        plot.timeline_from_reports("t", [])


def test_json_log_lines_carry_the_migration_id(tmp_path, caplog) -> None:
    conf = options.new_conf()
    pipe = Pipeline(
        conf,
        HostContext("hv2", nva=None),
        Journal(":memory:"),
        stages=[stage("j_one", Phase.PREPARE, Role.DESTINATION, conf=conf)(conf)],
    )
    formatter = logs.JsonFormatter()
    with caplog.at_level(logging.INFO, logger="vmm_orchestrator.engine"):
        mig = migration("m-json")
        assert pipe.handle(MigrationEvent(mig, Phase.PREPARE, Role.DESTINATION, 0.0)).ok
    lines = [json.loads(formatter.format(r)) for r in caplog.records]
    stage_line = next(x for x in lines if x.get("stage") == "j_one")
    assert stage_line["migration_id"] == "m-json" and stage_line["outcome"] == "ok"
    assert stage_line["level"] == "INFO" and "j_one ok" in stage_line["message"]
    assert stage_line["time"].endswith("+00:00")
    phase_line = lines[-1]
    assert phase_line["phase"] == "PREPARE" and phase_line["role"] == "destination"
    assert (
        phase_line["outcome"] == "ok"
        and "m-json PREPARE as destination ok" in (phase_line["message"])
    )
    with pytest.raises(ValueError, match="unknown log format"):
        logs.configure(logging.INFO, "xml")
