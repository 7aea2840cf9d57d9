"""Find the configured state kinds: stevedore plugins in ``vmm_state.kinds``.

Loading is strict for the same reason the engine's stage loading is: a
kind silently missing would let a VM move without state the operator asked
to move, and nobody would notice until sessions broke.
"""

from __future__ import annotations

import importlib.metadata
from typing import Any

import stevedore
from oslo_config import cfg

from vmm_orchestrator.errors import ConfigError
from vmm_state.kind import StateKind

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
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(
            f"kind listed more than once in [state] kinds: {', '.join(duplicates)}",
            hint="list each kind once; its position sets its order",
        )
    if not names:
        return {}
    missing: list[str] = []

    def on_missing(not_found: Any) -> None:
        missing.extend(sorted(not_found))

    def on_load_failure(
        _manager: Any, entry_point: importlib.metadata.EntryPoint, err: BaseException
    ) -> None:
        raise ConfigError(
            f"state kind {entry_point.name} ({entry_point.value}) could not be loaded: {err}",
            hint="check that the package providing it is installed and its options are valid",
        ) from err

    manager: stevedore.NamedExtensionManager[Any] = stevedore.NamedExtensionManager(
        NAMESPACE,
        names=names,
        invoke_on_load=True,
        invoke_args=(conf,),
        name_order=True,
        on_missing_entrypoints_callback=on_missing,
        on_load_failure_callback=on_load_failure,
    )
    if missing:
        raise ConfigError(
            f"unknown state kind in [state] kinds: {', '.join(missing)}",
            hint=f"installed kinds: {', '.join(installed_kinds()) or 'none'}",
        )
    kinds: dict[str, StateKind] = {}
    for ext in manager.extensions:
        obj = ext.obj
        if not isinstance(obj, StateKind):
            raise ConfigError(
                f"plugin {ext.name} ({ext.entry_point.value}) is not a StateKind",
                hint="a vmm_state.kinds entry point must name a StateKind subclass",
            )
        if obj.name != ext.name:
            raise ConfigError(
                f"state kind entry point {ext.name} names a kind called {obj.name!r}",
                hint="make the entry point name and the class's name attribute equal",
            )
        kinds[ext.name] = obj
    return kinds
