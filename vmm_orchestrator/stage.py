"""The stage contract: the small abstract base every pipeline plugin implements.

Modelled on os-vif's PluginBase: a stage is a class found by stevedore in the
``vmm_orchestrator.stages`` namespace, it declares the phase and role it runs
in, and registers its own options in its own config group
(``[stage_<name>]``). Every group also gets the common ``deadline`` and
``attempts`` options so an operator can tune each stage separately.
"""

from __future__ import annotations

import abc
import dataclasses
import time
from collections.abc import Callable
from typing import Any, ClassVar

from oslo_config import cfg

from vmm_orchestrator.model import Migration, Phase, Role
from vmm_orchestrator.options import REGISTER_HINT, require


def common_stage_opts(deadline: float = 5.0, attempts: int = 3) -> list[cfg.Opt]:
    """The options every stage group has, with the stage's own defaults."""
    return [
        cfg.FloatOpt(
            "deadline",
            default=deadline,
            min=0.001,
            help="Seconds this stage may take (all attempts together) before it "
            "counts as failed and the migration's completed stages are reverted.",
        ),
        cfg.IntOpt(
            "attempts",
            default=attempts,
            min=1,
            help="How many times the stage is tried when it fails with a transient "
            "error (a timeout, a busy or unreachable service).",
        ),
    ]


def group_name(stage_name: str) -> str:
    """The config group that holds a stage's options."""
    return f"stage_{stage_name}"


@dataclasses.dataclass
class HostContext:
    """What a host offers its stages.

    ``name`` is this host's NVE identifier in the directory. ``nva`` is the
    directory client. ``services`` holds what plugins provide (the Linux NVE
    driver under "nve", the announcer under "announcer", ...); a stage looks
    up only what it needs and fails clearly when it is missing.
    """

    name: str
    nva: Any
    services: dict[str, Any] = dataclasses.field(default_factory=dict)

    def service(self, key: str) -> Any:
        try:
            return self.services[key]
        except KeyError:
            raise LookupError(
                f"host {self.name} offers no '{key}' service; enable the plugin that provides it"
            ) from None


@dataclasses.dataclass
class StageContext:
    """Everything one run (or revert) of a stage may use.

    ``checkpoint`` persists a small JSON-able dict in the journal at once, so
    that a stage re-run after a crash can pick up where it was (the data comes
    back in ``saved``). ``note`` adds figures to the timeline entry of this
    stage (for example per-peer convergence times).
    """

    migration: Migration
    phase: Phase
    role: Role
    host: HostContext
    deadline: float
    saved: dict[str, Any] = dataclasses.field(default_factory=dict)
    checkpoint: Callable[[dict[str, Any]], None] = lambda data: None
    notes: dict[str, Any] = dataclasses.field(default_factory=dict)

    def remaining(self) -> float:
        """Seconds left before this stage's deadline (never negative)."""
        return max(0.0, self.deadline - time.monotonic())

    def note(self, **figures: Any) -> None:
        self.notes.update(figures)


class Stage(abc.ABC):
    """One step of the pipeline, run in one phase by one role.

    ``run`` must be idempotent: after a crash the engine runs it again. It
    returns a JSON-able record (or None) that the journal keeps and that
    ``revert`` receives, so a revert after a restart knows what to undo.
    ``revert`` undoes what ``run`` did; it is called newest-first on ABORTED
    or when a later stage fails, and must tolerate a partly done run.
    """

    name: ClassVar[str]
    phase: ClassVar[Phase]
    role: ClassVar[Role]
    #: Options of this stage beyond the common ones, in [stage_<name>].
    opts: ClassVar[list[cfg.Opt]] = []
    #: A best-effort stage's failure is reported but neither stops nor
    #: reverts the migration (an announcement that could not be sent must
    #: not unplug a VM that already runs at its destination).
    best_effort: ClassVar[bool] = False
    #: A best-effort stage that runs beside the stages after it in its phase (a
    #: thread of its own) instead of before them: the phase waits for it before it
    #: ends or reverts, but the phase's outcome (libvirt's hook answer) does not.
    alongside: ClassVar[bool] = False
    #: Host services this stage needs beyond the data plane's (``nve``,
    #: ``announcers``): the composition root builds them only when a listed
    #: stage requires them (for example ``state``).
    requires: ClassVar[tuple[str, ...]] = ()
    #: Defaults of the common options for this stage.
    default_deadline: ClassVar[float] = 5.0
    default_attempts: ClassVar[int] = 3

    def __init__(self, conf: cfg.ConfigOpts) -> None:
        self.conf = conf
        self.group = group_name(self.name)

    @classmethod
    def register_opts(cls, conf: cfg.ConfigOpts) -> None:
        """Register this stage's group; the strict loader calls it when it loads the
        stage (register_all has done so already for every installed stage)."""
        register_stage_opts(conf, cls)

    @property
    def options(self) -> Any:
        """This stage's own config group (ConfigError naming the fix if unregistered)."""
        require(
            self.conf,
            self.group,
            f"stage {self.name}",
            hint=f"{REGISTER_HINT}; a stage that is no installed entry point: "
            f"{type(self).__name__}.register_opts(conf)",
        )
        return self.conf[self.group]

    @abc.abstractmethod
    def run(self, ctx: StageContext) -> dict[str, Any] | None:
        """Do the stage's work for ``ctx.migration``."""

    def revert(self, ctx: StageContext, record: dict[str, Any] | None) -> None:  # noqa: B027
        """Undo ``run``; the default has nothing to undo."""


def register_stage_opts(conf: cfg.ConfigOpts, stage_cls: type[Stage]) -> None:
    """Register the common and the stage's own options in its group (once)."""
    group = group_name(stage_cls.name)
    for opt in stage_opts(stage_cls):
        try:
            conf.register_opt(opt, group=group)
        except cfg.DuplicateOptError:
            pass


def stage_opts(stage_cls: type[Stage]) -> list[cfg.Opt]:
    """All options of a stage's group: the common ones and its own."""
    return [
        *common_stage_opts(stage_cls.default_deadline, stage_cls.default_attempts),
        *stage_cls.opts,
    ]
