"""Fixtures shared by every test directory."""

from __future__ import annotations

import pytest
from oslo_config import cfg

from vmm_orchestrator import options


@pytest.fixture
def registered_conf() -> cfg.ConfigOpts:
    """A configuration as `vmm` makes one: no files, every installed plugin's options
    registered once from the oslo.config.opts entry points (options.register_all).

    Stages or state kinds a test defines itself are no entry points: register them
    with ``TheirClass.register_opts(conf)``, as the strict loader does at load.
    """
    return options.new_conf()
