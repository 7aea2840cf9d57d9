"""The state demo: in the lab, vm1 live-migrates through the orchestrator's
pipeline twice, once with state migration and once without, and the four
proofs of :mod:`vmm_lab.proofs` say what the state changed.

Both runs use the same fresh lab (the stateful firewall of
:mod:`vmm_lab.firewall` on every host, IGMP snooping, a state service per
host) and the same hypervisor model: QEMU's ``pause-before-switchover``
(the lab waits for the SWITCHOVER report, i.e. for the state delta, before
it resumes the VM, and counts the wait in the downtime) and ports as
libvirt has them (the destination's tap exists from after PREPARE, a paused
guest's tap stays up). The only difference is the pipeline: with the state
stages (``state_precopy``, ``state_delta``, ``state_cleanup``) or without.

With state every proof must hold; without, every proof must break (a proof
that holds without state proves nothing). The exit status is non-zero if a
proof fails with state, or the with-state migration did not complete.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

from oslo_config import cfg

from vmm_lab import proofs
from vmm_lab.linux import options as lab_opts
from vmm_lab.linux.demo import lab_site
from vmm_lab.linux.hypervisor import MigrationVetoed
from vmm_lab.linux.probe import format_table
from vmm_lab.linux.topology import new_prefix
from vmm_orchestrator.options import require
from vmm_state.stages import DELTA, PRECOPY

#: Seconds to wait for each phase's report.
REPORT_TIMEOUT_S = 120.0


@dataclasses.dataclass
class StateRun:
    """One migration of the demo and what the proofs saw after it."""

    with_state: bool
    prefix: str
    route: str = ""
    verdicts: list[proofs.Verdict] = dataclasses.field(default_factory=list)
    downtime_ms: float | None = None
    switchover_wait_ms: float | None = None
    transfers: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    errors: list[str] = dataclasses.field(default_factory=list)

    @property
    def mode(self) -> str:
        return "with state" if self.with_state else "without state"

    @property
    def ok(self) -> bool:
        """Every proof as the mode predicts, and the migration itself went through."""
        return (
            not self.errors
            and len(self.verdicts) == len(proofs.PROOFS)
            and all(v.ok for v in self.verdicts)
        )


def transfer_rows(reports: list[Any]) -> list[dict[str, Any]]:
    """Per state stage and kind: the answer, entries and timings the stages noted."""
    rows = []
    for report in reports:
        for timing in report.timeline:
            kinds = timing.notes.get("kinds")
            if timing.stage not in ("state_precopy", "state_delta") or kinds is None:
                continue
            label = PRECOPY if timing.stage == "state_precopy" else DELTA
            for kind, fig in kinds.items():
                result = fig["result"] + (f"/{fig['reason']}" if fig.get("reason") else "")
                rows.append(
                    {
                        "transfer": f"{label} ({report.phase.value})",
                        "kind": kind,
                        "result": result,
                        "entries": fig.get("entries"),
                        "installed": fig.get("installed"),
                        "import_ms": fig.get("import_ms"),
                        "stage_ms": round(timing.duration_ms, 1),
                        "detail": fig.get("detail") or "",
                    }
                )
    return rows


def run_state_mode(
    conf: cfg.ConfigOpts,
    prefix: str,
    with_state: bool,
    vm: str = "vm1",
    destination: str = lab_opts.DESTINATION,
) -> StateRun:
    """Migrate ``vm`` to ``destination`` in a fresh lab and run the proofs."""
    run = StateRun(with_state, prefix)
    with lab_site(conf, prefix, orchestrated=True, state=True, move_state=with_state) as site:
        run.route = f"{vm} migrates {site.lab.vms[vm].host} -> {destination}"
        setup = proofs.arrange(site, vm)
        try:
            problems = setup.problems()
            if problems:
                run.errors += [f"before the move: {p}" for p in problems]
                return run
            hyper = site.state_hypervisor()
            try:
                record, futures = hyper.migrate(site.lab.vms[vm], destination, conf.lab.downtime_ms)
            except MigrationVetoed as err:
                run.errors.append(str(err))
                return run
            reports = [f.result(timeout=REPORT_TIMEOUT_S) for f in futures]
            run.errors += [f"{r.phase.value} on {r.host}: {r.error}" for r in reports if not r.ok]
            run.downtime_ms = round(record.downtime_ms, 1)
            if record.switchover_wait_ms is not None:
                run.switchover_wait_ms = round(record.switchover_wait_ms, 1)
            run.transfers = transfer_rows(reports)
            if record.aborted:
                run.errors.append(f"the migration was cancelled: {record.aborted}")
                return run
            run.verdicts = proofs.judge(proofs.observe(setup), with_state)
        finally:
            setup.close()
    return run


def _cell(verdict: proofs.Verdict | None) -> str:
    if verdict is None:
        return "not run"
    if verdict.with_state:
        return ("PASS: " if verdict.ok else "FAIL: ") + verdict.observed
    return ("breaks: " if verdict.ok else "UNEXPECTED: ") + verdict.observed


def render_state(runs: list[StateRun]) -> str:
    """The proofs side by side, then how the state moved and what the pause cost."""
    by_mode = {r.with_state: r for r in runs}
    route = next((r.route for r in runs if r.route), "the VM migrates")
    lines = [f"== State proofs: {route} through the stateful firewall =="]
    rows = []
    for name in proofs.PROOFS:
        row = {"proof": proofs.TITLES[name]}
        for with_state, key in ((True, "with"), (False, "without")):
            run = by_mode.get(with_state)
            found = [v for v in run.verdicts if v.proof == name] if run else []
            row[key] = _cell(found[0] if found else None)
        rows.append(row)
    lines.append(
        format_table(
            rows,
            [
                ("proof", "proof"),
                ("with", "with state (must hold)"),
                ("without", "without state (must break)"),
            ],
        )
    )
    lines.append("")
    lines.append("== Pause (QEMU pause-before-switchover: the VM waits for the state delta) ==")
    lines.append(
        format_table(
            [
                {
                    "mode": r.mode,
                    "downtime": r.downtime_ms,
                    "wait": r.switchover_wait_ms,
                }
                for r in runs
            ],
            [
                ("mode", "mode"),
                ("downtime", "downtime ms"),
                ("wait", "of which waiting for SWITCHOVER ms"),
            ],
        )
    )
    for r in runs:
        if r.transfers:
            lines.append("")
            lines.append(f"== State transfers ({r.mode}) ==")
            lines.append(
                format_table(
                    r.transfers,
                    [
                        ("transfer", "transfer"),
                        ("kind", "kind"),
                        ("result", "result"),
                        ("entries", "entries"),
                        ("installed", "installed"),
                        ("import_ms", "import ms", ".1f"),
                        ("stage_ms", "stage ms", ".1f"),
                        ("detail", "detail"),
                    ],
                )
            )
    for r in runs:
        for err in r.errors:
            lines.append(f"ERROR ({r.mode}): {err}")
    return "\n".join(lines)


def run_state_demo(conf: cfg.ConfigOpts, vm: str = "vm1") -> int:
    """Both runs, the table; 0 only if every proof held with state."""
    require(conf, lab_opts.GROUP, "the state demo")
    runs = []
    for with_state in (True, False):
        prefix = new_prefix()
        mode = "with" if with_state else "without"
        print(f"-- migrating {vm} {mode} state migration (lab prefix {prefix}) ...", flush=True)
        runs.append(run_state_mode(conf, prefix, with_state, vm))
    print()
    print(render_state(runs))
    held, broke = runs
    if not broke.ok:
        print(
            "\nnote: some proof did not break without state migration; it does not show "
            "what the state changed",
            file=sys.stderr,
        )
    if not held.ok:
        print("\nFAIL: with state migration, not every proof held", file=sys.stderr)
        return 1
    return 0
