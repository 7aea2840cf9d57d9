"""Which directory (NVA) backend serves this site, chosen by ``[nva] backend``.

Backends are found in the ``vmm_orchestrator.nva_backends`` entry points:
classes whose ``from_conf(conf)`` returns the directory client that NVE
agents and stages use and, optionally, whose ``store_from_conf(conf)``
returns the store `vmm nva serve` serves over HTTP.
"""

from __future__ import annotations

from typing import Any

from oslo_config import cfg
from stevedore import driver, extension

from vmm_orchestrator.errors import ConfigError
from vmm_orchestrator.nva import options
from vmm_orchestrator.nva.client import NvaClient
from vmm_orchestrator.nva.store import NvaStore
from vmm_orchestrator.options import require

NAMESPACE = "vmm_orchestrator.nva_backends"


class EmbeddedBackend:
    """The built-in directory: SQLite in the ``vmm nva serve`` process, HTTP to it."""

    name = "embedded"

    @classmethod
    def from_conf(cls, conf: cfg.ConfigOpts) -> NvaClient:
        return NvaClient.from_conf(conf)

    @classmethod
    def store_from_conf(cls, conf: cfg.ConfigOpts) -> NvaStore:
        return NvaStore.from_conf(conf)


def load_backend(conf: cfg.ConfigOpts) -> Any:
    """The backend class named by ``[nva] backend``; ConfigError when not installed."""
    require(conf, options.GROUP, "the directory backend loader", "backend")
    name = conf[options.GROUP].backend
    try:
        return driver.DriverManager(NAMESPACE, name, invoke_on_load=False).driver
    except Exception as exc:
        available = sorted(extension.ExtensionManager(NAMESPACE).names())
        raise ConfigError(
            f"[nva] backend {name!r} cannot be loaded: {exc}",
            hint=f"choose one of {', '.join(available)}, or install the plugin that provides it",
        ) from None


def open_client(conf: cfg.ConfigOpts) -> Any:
    """The directory client for NVE agents and stages."""
    return load_backend(conf).from_conf(conf)


def open_store(conf: cfg.ConfigOpts) -> Any:
    """The store `vmm nva serve` serves."""
    backend = load_backend(conf)
    factory = getattr(backend, "store_from_conf", None)
    if factory is None:
        raise ConfigError(
            f"[nva] backend {conf[options.GROUP].backend!r} cannot be served by `vmm nva serve`",
            hint="its agents and stages reach it directly; there is nothing to serve",
        )
    return factory(conf)
