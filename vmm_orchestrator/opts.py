"""Every option of the core, for oslo-config-generator and the sample file.

Stage options are read from the stage classes found through the
``vmm_orchestrator.stages`` entry points, so a new stage plugin appears in
the sample without the core knowing it.
"""

from __future__ import annotations

from oslo_config import cfg
from stevedore import ExtensionManager

from vmm_orchestrator import engine, metrics
from vmm_orchestrator.nva import options as nva_options
from vmm_orchestrator.stage import Stage, group_name, stage_opts


def stage_option_groups() -> list[tuple[str, list[cfg.Opt]]]:
    manager: ExtensionManager[Stage] = ExtensionManager(
        "vmm_orchestrator.stages", invoke_on_load=False
    )
    groups = [(group_name(ext.plugin.name), stage_opts(ext.plugin)) for ext in manager]
    return sorted(groups)


def list_opts() -> list[tuple[str, list[cfg.Opt]]]:
    return [
        *engine.list_opts(),
        *nva_options.list_opts(),
        *metrics.list_opts(),
        *stage_option_groups(),
    ]
