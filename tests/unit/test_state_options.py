"""The state plugin reads options registered once at load (register_all), never
registering them itself, and its JSON server takes ``[state]``'s connection limits."""

from __future__ import annotations

import pytest
from oslo_config import cfg

from vmm_orchestrator.errors import ConfigError
from vmm_orchestrator.options import new_conf
from vmm_state import options, warm
from vmm_state.policy import Policy
from vmm_state.service import StateHost, StateSettings


def bare() -> cfg.ConfigOpts:
    conf = cfg.ConfigOpts()
    conf(args=[], default_config_files=[])
    return conf


def test_readers_require_their_groups_instead_of_registering_them() -> None:
    conf = bare()
    with pytest.raises(ConfigError, match=r"the state service reads \[state\]"):
        StateSettings.from_conf(conf)
    with pytest.raises(ConfigError, match=r"the state policy reads \[state\]"):
        Policy.from_conf(conf)
    assert "state" not in conf  # nothing was registered on the way
    options.register_opts(conf)
    conf.set_override("key", "k" * 16, options.GROUP)
    conf.set_override("token", "t", options.GROUP)
    host = StateHost("h1", None, {}, StateSettings.from_conf(conf))
    with pytest.raises(ConfigError, match=r"warm mobility reads \[state_warm\]"):
        warm.WarmService.from_conf(conf, host)
    assert "state_warm" not in conf


def test_the_state_server_takes_its_connection_limits_from_state() -> None:
    conf = new_conf()
    assert conf.state.max_connections == 4096 and conf.state.request_deadline == 5.0
    conf.set_override("key", "k" * 16, options.GROUP)
    conf.set_override("token", "t", options.GROUP)
    conf.set_override("bind_port", 0, options.GROUP)
    conf.set_override("max_connections", 64, options.GROUP)
    conf.set_override("request_deadline", 1.5, options.GROUP)
    settings = StateSettings.from_conf(conf)
    assert (settings.max_connections, settings.request_deadline) == (64, 1.5)
    with StateHost("h1", None, {}, settings) as host:
        httpd = host._server._httpd  # type: ignore[union-attr]
        assert httpd is not None
        assert httpd.connections.limit <= 64 and httpd.connections.head_timeout == 1.5
