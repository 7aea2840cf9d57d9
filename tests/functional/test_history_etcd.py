"""`vmm migration list|show` on the etcd journal a running agent writes (a real etcd)."""

from __future__ import annotations

import json
import secrets
import time
from typing import Any

from vmm_etcd.backends import open_journal
from vmm_etcd.cluster import LocalEtcdCluster
from vmm_orchestrator import agent, engine, history
from vmm_orchestrator.cli import build_parser, load_config
from vmm_orchestrator.engine import Pipeline
from vmm_orchestrator.errors import StageFailed
from vmm_orchestrator.migration_cmd import MigrationCommand
from vmm_orchestrator.model import Migration, MigrationEvent, Phase, Role, Vif, Workload
from vmm_orchestrator.options import new_conf
from vmm_orchestrator.stage import HostContext, Stage, StageContext


def stage(name: str, phase: Phase, run: Any = None) -> type[Stage]:
    def do_run(self: Stage, ctx: StageContext) -> Any:
        return run(ctx) if run else {}

    attrs = {
        "name": name,
        "phase": phase,
        "role": Role.SOURCE,
        "run": do_run,
        "default_attempts": 1,
    }
    return type(f"E_{name}", (Stage,), attrs)


def tunnel(ctx: StageContext) -> dict[str, Any]:
    ctx.note(vtep="192.0.2.2")
    return {}


def hold(ctx: StageContext) -> None:
    raise StageFailed("the tunnel could not be removed")


def test_history_from_the_etcd_journal(tmp_path, capsys):
    prefix = f"/hist-{secrets.token_hex(4)}/"
    with LocalEtcdCluster(1) as cluster:
        conf_file = tmp_path / "agent.conf"
        conf_file.write_text(
            "[agent]\nhosts = hv1\njournal_backend = etcd\n\n"
            "[host:hv1]\nvtep = 192.0.2.1\nvnis = 100\n\n"
            f"[nva_etcd]\nendpoints = {','.join(cluster.endpoints)}\nprefix = {prefix}\n"
        )
        conf = load_config([str(conf_file)])
        (spec,) = agent.host_specs(conf)
        journal = open_journal(conf, spec, None)
        pconf = new_conf()
        classes = [
            stage("e_tunnel", Phase.SWITCHOVER, tunnel),
            stage("e_hold", Phase.COMPLETED, hold),
        ]
        for cls in classes:
            cls.register_opts(pconf)  # the test's own stages are no entry points
        stages = [cls(pconf) for cls in classes]
        pipe = Pipeline(pconf, HostContext("hv1", nva=None), journal, stages=stages)
        vif = Vif(mac="52:54:00:00:00:01", vni=100, ipv4=("10.0.0.5",))
        mig = Migration("m-etcd", Workload("web-2", (vif,)), "hv1", "hv2")
        engine.add_observer(history.record)
        try:
            event = MigrationEvent(mig, Phase.SWITCHOVER, Role.SOURCE, time.monotonic())
            assert pipe.handle(event).ok
            event = MigrationEvent(mig, Phase.COMPLETED, Role.SOURCE, time.monotonic())
            assert not pipe.handle(event).ok
        finally:
            engine.remove_observer(history.record)
        command = MigrationCommand()
        parser = build_parser({command.name: command})
        outputs = []
        for argv in (["list", "-f", "json"], ["show", "m-etcd", "-f", "json"], ["show", "m-etcd"]):
            args = parser.parse_args(["--config-file", str(conf_file), "migration", *argv])
            assert command.run(load_config(args.config_file), args) == 0
            outputs.append(capsys.readouterr().out)
        journal.close()
    listed, doc, text = json.loads(outputs[0]), json.loads(outputs[1]), outputs[2]
    (row,) = listed["migrations"]
    assert (row["id"], row["vm"], row["status"], row["role"]) == (
        "m-etcd",
        "web-2",
        "failed",
        "source",
    )
    (view,) = doc["migration"]
    stages = {s["stage"]: s for s in view["stages"]}
    assert stages["e_tunnel"]["outcome"] == "reverted"
    assert stages["e_tunnel"]["figures"] == {"vtep": "192.0.2.2"}
    assert stages["e_hold"]["outcome"] == "failed"
    assert "could not be removed" in stages["e_hold"]["error"]
    assert [p["phase"] for p in view["phases"]] == ["SWITCHOVER", "COMPLETED"]
    assert view["phases"][1]["state"] == "failed"
    assert view["reverted"] == ["e_tunnel"]
    assert "failure on hv1: stage e_hold failed in COMPLETED" in text
