"""Strict loading of named stevedore plugins (stages, state kinds, ...).

A plugin silently missing from a configured list would leave the network
(or the VM's state) behind without anyone noticing, so every problem is a
ConfigError that names the culprit: a name listed twice, a name with no
entry point (listing the installed ones), a plugin that cannot be loaded,
or one that is not of the expected base class.

A plugin's options are registered when it is loaded (its ``register_opts``
classmethod, if it has one), never lazily by its constructor.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable
from typing import Any, NoReturn

import stevedore
from oslo_config import cfg

from vmm_orchestrator.errors import ConfigError


def load_named(
    namespace: str,
    names: list[str],
    conf: cfg.ConfigOpts,
    *,
    base: type,
    item: str,
    noun: str,
    option: str,
    available_hint: Callable[[list[str]], str],
    not_base_hint: str | None = None,
) -> list[tuple[str, Any]]:
    """Instantiate ``names`` (in that order) from ``namespace`` with ``conf``;
    returns (entry point name, plugin) pairs.

    ``item`` is how the list's entries are called in the duplicate message
    ("stage"), ``noun`` in the others ("state kind"); ``option`` is the
    option holding the list ("[pipeline] stages"); ``available_hint`` turns
    the installed names into the hint for an unknown name.
    """
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(
            f"{item} listed more than once in {option}: {', '.join(duplicates)}",
            hint=f"list each {item} once; its position sets its order",
        )
    missing: list[str] = []

    def on_missing(not_found: Any) -> None:
        missing.extend(sorted(not_found))

    def on_load_failure(
        _manager: Any, entry_point: importlib.metadata.EntryPoint, err: BaseException
    ) -> NoReturn:
        raise ConfigError(
            f"{noun} {entry_point.name} ({entry_point.value}) could not be loaded: {err}",
            hint="check that the package providing it is installed and its options are valid",
        ) from err

    manager: stevedore.NamedExtensionManager[Any] = stevedore.NamedExtensionManager(
        namespace,
        names=names,
        invoke_on_load=False,
        name_order=True,
        on_missing_entrypoints_callback=on_missing,
        on_load_failure_callback=on_load_failure,
    )
    if missing:
        available = sorted(set(manager.entry_points_names()))
        raise ConfigError(
            f"unknown {noun} in {option}: {', '.join(missing)}",
            hint=available_hint(available),
        )
    loaded: list[tuple[str, Any]] = []
    for ext in manager.extensions:
        if not (isinstance(ext.plugin, type) and issubclass(ext.plugin, base)):
            raise ConfigError(
                f"plugin {ext.name} ({ext.entry_point.value}) is not a {base.__name__}",
                hint=not_base_hint,
            )
        factory: Any = ext.plugin
        try:
            # Its options are registered as it is loaded (a no-op after register_all).
            register = getattr(factory, "register_opts", None)
            if register is not None:
                register(conf)
            obj = factory(conf)
        except Exception as err:
            on_load_failure(manager, ext.entry_point, err)
        loaded.append((ext.name, obj))
    return loaded
