"""The contract of a `vmm` sub-command provided by a plugin.

Plugins add commands through the ``vmm_orchestrator.commands`` entry point
namespace, so the core's command line never imports plugin code itself.
"""

from __future__ import annotations

import abc
import argparse
from typing import ClassVar

from oslo_config import cfg


class Command(abc.ABC):
    """A `vmm <name> ...` command."""

    name: ClassVar[str]
    help: ClassVar[str]

    @abc.abstractmethod
    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """Declare the command's own arguments (sub-commands allowed)."""

    @abc.abstractmethod
    def run(self, conf: cfg.ConfigOpts, args: argparse.Namespace) -> int:
        """Do the work; return the exit status. Raise VmmError for clear failures."""
