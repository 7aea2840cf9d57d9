"""Find the configured state kinds: stevedore plugins in ``vmm_state.kinds``.

Loading is strict for the same reason the engine's stage loading is: a
kind silently missing would let a VM move without state the operator asked
to move, and nobody would notice until sessions broke.
"""

from __future__ import annotations

from typing import Any

import stevedore
from oslo_config import cfg

from vmm_orchestrator.errors import ConfigError
from vmm_orchestrator.plugin_loader import load_named
from vmm_orchestrator.statekind import StateKind

#: The stevedore namespace kinds are registered in (see setup.py).
NAMESPACE = "vmm_state.kinds"


def installed_kinds() -> list[str]:
    """Names of every installed kind, sorted."""
    manager: stevedore.ExtensionManager[Any] = stevedore.ExtensionManager(
        NAMESPACE, invoke_on_load=False
    )
    return sorted(manager.names())


def load_kinds(conf: cfg.ConfigOpts, names: list[str]) -> dict[str, StateKind]:
    """Instantiate the named kinds, in ``names`` order (the export/import order).

    Raises ConfigError naming the culprit for a name listed twice, a name
    with no entry point (listing the installed ones), a plugin that fails to
    load, a plugin that is not a StateKind, or one whose ``name`` differs from
    its entry point name (bundles carry the name; both ends must agree).
    """
    names = list(names)
    if not names:  # an empty list cannot hold duplicates
        return {}
    loaded = load_named(
        NAMESPACE,
        names,
        conf,
        base=StateKind,
        item="kind",
        noun="state kind",
        option="[state] kinds",
        available_hint=lambda _: f"installed kinds: {', '.join(installed_kinds()) or 'none'}",
        not_base_hint="a vmm_state.kinds entry point must name a StateKind subclass",
    )
    kinds: dict[str, StateKind] = {}
    for name, obj in loaded:
        if obj.name != name:
            raise ConfigError(
                f"state kind entry point {name} names a kind called {obj.name!r}",
                hint="make the entry point name and the class's name attribute equal",
            )
        kinds[name] = obj
    return kinds
