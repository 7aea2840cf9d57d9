"""Registering every option once, from the plugins' entry points.

Each plugin package lists its options for oslo-config-generator through an
``oslo.config.opts`` entry point (see setup.py). :func:`register_all` loads
those entry points (the project's: names starting with ``vmm_``) and
registers every (group, options) pair on a configuration. The composition
root's callers do it once, when the configuration is made (``vmm``'s
:func:`~vmm_orchestrator.cli.load_config`, the labs, the benchmarks), so the
sample config and the registered options cannot drift apart and no
constructor registers anything lazily.

Code that reads a group checks it is there with :func:`require`: a
configuration nobody registered fails with one line naming the fix, not
with oslo's NoSuchOptError from deep inside a constructor.

The per-host groups are the one exception to "before anything is read":
their names come from ``[agent] hosts``. Plugins list them once for a host
``example`` (``[host:example]``, what the sample shows); :func:`register_hosts`
registers that template for each configured name, and :func:`register_all`
calls it for the hosts known at that moment.
"""

from __future__ import annotations

import functools
import importlib.metadata
import logging
from collections.abc import Sequence
from typing import Any

from oslo_config import cfg
from stevedore import ExtensionManager

from vmm_orchestrator.errors import ConfigError

LOG = logging.getLogger(__name__)

#: Where plugins list their options (oslo-config-generator reads the same).
NAMESPACE = "oslo.config.opts"
#: This project's entry points in NAMESPACE start with this (others' are not ours).
PREFIX = "vmm_"
#: Prefix of the per-host groups: ``[host:compute1]``.
HOST_GROUP_PREFIX = "host:"
#: The per-host group as plugins list it, standing for every configured host.
HOST_TEMPLATE = HOST_GROUP_PREFIX + "example"

OptGroups = tuple[tuple[str, tuple[cfg.Opt, ...]], ...]


@functools.lru_cache(maxsize=1)
def plugin_opts() -> OptGroups:
    """Every (group, options) the installed plugins list, entry point by entry point.

    Cached: entry points do not change while a process runs. A plugin whose
    options cannot be listed is skipped with a warning (its code then fails
    with :func:`require`'s message); the other plugins stay usable.
    """

    def on_failure(_mgr: Any, ep: importlib.metadata.EntryPoint, err: BaseException) -> None:
        LOG.warning("options of plugin %s (%s) cannot be loaded: %s", ep.name, ep.value, err)

    manager: ExtensionManager[Any] = ExtensionManager(
        NAMESPACE, invoke_on_load=False, on_load_failure_callback=on_failure
    )
    found: list[tuple[str, tuple[cfg.Opt, ...]]] = []
    for ext in sorted(manager, key=lambda e: e.name):
        if not ext.name.startswith(PREFIX):
            continue
        try:
            listed = ext.plugin()
        except Exception as err:  # a broken plugin must not take the others down
            LOG.warning("options of plugin %s cannot be listed: %s", ext.name, err)
            continue
        found.extend((str(group), tuple(opts)) for group, opts in listed)
    return tuple(found)


def _register(conf: cfg.ConfigOpts, group: str, opts: tuple[cfg.Opt, ...]) -> None:
    try:
        # Registering the very same option again is a no-op in oslo.config.
        conf.register_opts(list(opts), group=None if group == "DEFAULT" else group)
    except cfg.DuplicateOptError as err:
        raise ConfigError(
            f"two installed plugins define option {err.opt_name} of [{group}] differently",
            hint="uninstall one of them or rename the option in its plugin",
        ) from None


def register_hosts(conf: cfg.ConfigOpts) -> None:
    """Register the per-host template groups for each name of ``[agent] hosts``."""
    if "agent" not in conf or "hosts" not in conf.agent:
        return
    templates = [opts for group, opts in plugin_opts() if group == HOST_TEMPLATE]
    for name in conf.agent.hosts:
        for opts in templates:
            _register(conf, HOST_GROUP_PREFIX + name, opts)


def register_all(conf: cfg.ConfigOpts) -> cfg.ConfigOpts:
    """Register every installed plugin's options on ``conf`` (calling it again is
    harmless); returns ``conf``. Call it once, right after making the
    configuration, before anything reads it."""
    for group, opts in plugin_opts():
        if group != HOST_TEMPLATE:
            _register(conf, group, opts)
    register_hosts(conf)
    return conf


def new_conf(config_files: Sequence[str] = ()) -> cfg.ConfigOpts:
    """A configuration reading exactly ``config_files`` (none: defaults only), with every
    installed plugin's options registered.

    Registered after parsing, as :func:`vmm_orchestrator.cli.load_config` does: the
    per-host groups follow the files' ``[agent] hosts``, and oslo.config checks
    required options when parsing, which an unused plugin's (keystoneauth's
    ``[neutron] auth-url``) would fail.
    """
    conf = cfg.ConfigOpts()
    args: list[str] = []
    for path in config_files:
        args += ["--config-file", path]
    conf(args=args, project="vmm-orchestrator", default_config_files=[])
    return register_all(conf)


#: What to do about a configuration whose options nobody registered.
REGISTER_HINT = (
    "call vmm_orchestrator.options.register_all(conf) once after making it "
    "(`vmm`, the labs and the benchmarks do)"
)


def require(
    conf: cfg.ConfigOpts,
    group: str,
    user: str,
    option: str | None = None,
    hint: str = REGISTER_HINT,
) -> None:
    """ConfigError unless ``[group]`` (and its ``option``) is registered on ``conf``.

    ``user`` names what needs it, so the line says who read a configuration
    that nobody registered.
    """
    if group in conf and (option is None or option in conf[group]):
        return
    what = f"[{group}] {option}" if option else f"[{group}]"
    raise ConfigError(
        f"{user} reads {what}, which is not registered on this configuration", hint=hint
    )
