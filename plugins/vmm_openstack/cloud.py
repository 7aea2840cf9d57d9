"""Connecting to an OpenStack cloud with openstacksdk, and saying clearly why it failed.

The cloud is described exactly as for the openstack CLI: ``--os-cloud`` (or
``OS_CLOUD``) picks an entry of clouds.yaml, otherwise the ``OS_*``
variables of an openrc file describe it. The token is fetched up front, so
wrong credentials or an unreachable Keystone are reported before anything
is changed, in one line that names the cloud and the URL.

openstacksdk and keystoneauth raise many exception types whose text is
long and nested; ``describe`` turns each into one sentence an operator can
act on. Their imports stay inside functions so that ``vmm --help`` and the
other commands do not pay for loading openstacksdk.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

from vmm_orchestrator.errors import ConfigError, TransientError, VmmError
from vmm_orchestrator.options import require

if TYPE_CHECKING:
    from openstack.connection import Connection
    from oslo_config import cfg

LOG = logging.getLogger(__name__)

#: What every credentials error tells the operator to check.
CREDENTIALS_HINT = "check OS_* / clouds.yaml"
#: How to give the product the rights Neutron's default policy asks for.
SERVICE_USER_HINT = (
    "set [neutron] in vmm-orchestrator.conf to Nova's service user, as nova.conf's "
    "[neutron] (auth_type = password, auth_url, username = nova, password, "
    "project_name = service, user_domain_name, project_domain_name), or grant the role: "
    "`openstack role add --user USER --project PROJECT ROLE`"
)


class CloudError(VmmError):
    """OpenStack refused or failed a request; the message names the service and the cause."""


class CloudUnavailable(CloudError, TransientError):
    """An OpenStack service could not be reached or did not answer in time."""


def _quiet_libraries() -> None:
    """keystoneauth logs warnings (failed discovery, ...) that the errors here repeat
    better; keep them out of the one-line error output unless -v asked for logs."""
    if not logging.getLogger("vmm").isEnabledFor(logging.INFO):
        for name in ("keystoneauth", "openstack", "stevedore"):
            logging.getLogger(name).setLevel(logging.ERROR)


def cloud_label(region: Any) -> str:
    """How to name the cloud in a message: its clouds.yaml entry, or ``envvars`` (the name
    openstacksdk and the openstack CLI give a cloud described by the OS_* variables)."""
    name = getattr(region, "name", None) or "envvars"
    return "envvars" if name == "defaults" else str(name)


def connect(
    cloud: str | None,
    region_name: str | None = None,
    api_timeout: float = 30.0,
) -> Connection:
    """An authenticated Connection to ``cloud`` (None: OS_CLOUD, then the OS_* variables).

    Raises ConfigError when nothing describes a cloud or the entry does not
    exist, CloudError when Keystone refuses the credentials, and
    CloudUnavailable when Keystone cannot be reached.
    """
    import keystoneauth1.exceptions as ksa_exc
    import openstack.config
    from openstack import exceptions as sdk_exc
    from openstack.connection import Connection

    _quiet_libraries()
    cloud = cloud or os.environ.get("OS_CLOUD") or None
    try:
        config = openstack.config.OpenStackConfig(load_envvars=True)
        kwargs: dict[str, Any] = {"api_timeout": api_timeout}
        if region_name:
            kwargs["region_name"] = region_name
        region = config.get_one(cloud=cloud, **kwargs)
    except ksa_exc.MissingRequiredOptions as exc:
        missing = ", ".join(o.dest for o in exc.options) if exc.options else "auth_url"
        if cloud:
            raise ConfigError(
                f"cloud {cloud} in clouds.yaml lacks {missing}",
                hint="complete its auth section",
            ) from None
        raise ConfigError(
            f"no OpenStack cloud is configured (missing {missing})",
            hint="give --os-cloud NAME (an entry of clouds.yaml) or set OS_CLOUD, or "
            "source an openrc file (OS_AUTH_URL, OS_USERNAME, OS_PASSWORD, ...)",
        ) from None
    except sdk_exc.ConfigException as exc:
        files = ", ".join(getattr(config, "_config_files", [])[:3]) or "clouds.yaml"
        if cloud and "not found" in str(exc).lower():
            raise ConfigError(
                f"cloud {cloud} is not in clouds.yaml",
                hint=f"check --os-cloud / OS_CLOUD; searched {files}",
            ) from None
        raise ConfigError(f"bad OpenStack configuration: {exc}", hint=CREDENTIALS_HINT) from None
    except ksa_exc.ClientException as exc:
        raise ConfigError(f"bad OpenStack configuration: {exc}", hint=CREDENTIALS_HINT) from None
    auth_url = (region.config.get("auth") or {}).get("auth_url", "?")
    label = cloud_label(region)
    return _authenticated(Connection(config=region), f"cloud {label}", label, auth_url)


def _authenticated(
    conn: Connection, who: str, label: str, auth_url: str, check: str = CREDENTIALS_HINT
) -> Connection:
    """``conn`` once Keystone gave it a token; ``who`` names the credentials in errors,
    ``check`` says where they are written."""
    import keystoneauth1.exceptions as ksa_exc

    try:
        conn.session.get_token()
    except ksa_exc.Unauthorized:
        conn.close()
        raise CloudError(f"authentication failed for {who} at {auth_url}: {check}") from None
    except (ksa_exc.ConnectFailure, ksa_exc.ConnectTimeout, ksa_exc.DiscoveryFailure) as exc:
        conn.close()
        raise CloudUnavailable(
            f"cannot reach Keystone of {who} at {auth_url}: {_short(exc)}",
            hint="check auth_url in OS_AUTH_URL / clouds.yaml and that Keystone runs",
        ) from None
    except ksa_exc.ClientException as exc:
        conn.close()
        raise CloudError(
            f"Keystone of {who} at {auth_url} failed: {_short(exc)}",
            hint=check,
        ) from None
    conn.vmm_label = label  # type: ignore[attr-defined]
    conn.vmm_auth_url = auth_url  # type: ignore[attr-defined]
    return conn


def connect_service_user(conf: cfg.ConfigOpts, api_timeout: float = 30.0) -> Connection | None:
    """The ``[neutron]`` service user's Connection; None when the section is not set.

    Loaded with keystoneauth's own loaders from the same options nova.conf's
    ``[neutron]`` has, so the section reads like Nova's. The token is fetched
    up front, as for the operator's cloud.
    """
    import keystoneauth1.exceptions as ksa_exc
    from keystoneauth1 import loading as ks_loading
    from openstack.connection import Connection

    from vmm_openstack import options

    require(conf, options.NEUTRON_GROUP, "the OpenStack connection")
    name = options.NEUTRON_GROUP
    group = conf[name]
    if not group.auth_type:
        return None
    _quiet_libraries()
    if group.auth_type == "password":
        # keystoneauth notices a missing user or password only at the first request,
        # with a bare Exception: ask for them here, as for the other options.
        absent = [
            option
            for option, present in (
                ("auth_url", getattr(group, "auth_url", None)),
                ("username", getattr(group, "username", None) or getattr(group, "user_id", None)),
                ("password", getattr(group, "password", None)),
            )
            if not present
        ]
        if absent:
            raise ConfigError(
                f"[{name}] lacks {', '.join(absent)}",
                hint=f"write [{name}] like nova.conf's: auth_type, auth_url, username, "
                "password, project_name, user_domain_name, project_domain_name",
            )
    try:
        auth = ks_loading.load_auth_from_conf_options(conf, name)
        session = ks_loading.load_session_from_conf_options(conf, name, auth=auth)
    except ksa_exc.MissingRequiredOptions as exc:
        missing = ", ".join(o.dest for o in exc.options) if exc.options else "auth_url"
        raise ConfigError(
            f"[{name}] lacks {missing}",
            hint=f"write [{name}] like nova.conf's: auth_type, auth_url, username, password, "
            "project_name, user_domain_name, project_domain_name",
        ) from None
    except ksa_exc.ClientException as exc:
        raise ConfigError(f"bad [{name}] section: {_short(exc)}", hint=SERVICE_USER_HINT) from None
    kwargs: dict[str, Any] = {"api_timeout": api_timeout}
    if group.region_name:
        kwargs["region_name"] = group.region_name
    if group.valid_interfaces:
        kwargs["interface"] = group.valid_interfaces[0]
    elif group.interface:  # keystoneauth's deprecated spelling, as DevStack writes nova.conf
        kwargs["interface"] = group.interface
    if group.endpoint_override:
        kwargs["network_endpoint_override"] = group.endpoint_override
    user = getattr(group, "username", None) or getattr(group, "user_id", None) or "?"
    auth_url = getattr(group, "auth_url", None) or "?"
    return _authenticated(
        Connection(session=session, **kwargs),
        f"the [{name}] service user {user}",
        f"[{name}] {user}",
        auth_url,
        f"check [{name}] in vmm-orchestrator.conf",
    )


def _short(exc: BaseException) -> str:
    """The first sentence of a library error, without pool and retry noise."""
    text = str(exc).strip() or type(exc).__name__
    for marker in (" Please check", ": HTTPConnectionPool", " (Caused by"):
        if marker in text:
            text = text.split(marker, 1)[0]
    if "Connection refused" in str(exc) and "refused" not in text:
        text += " (connection refused)"
    return text.rstrip(".: ")


def describe(exc: BaseException, what: str) -> VmmError:
    """One error for a failed SDK call; ``what`` says what was being done.

    404 and 409 keep the service's own message (it names the resource);
    connection failures and 5xx answers become CloudUnavailable so that
    pipeline stages retry them.
    """
    import keystoneauth1.exceptions as ksa_exc
    from openstack import exceptions as sdk_exc

    if isinstance(exc, VmmError):
        return exc
    if isinstance(exc, (ksa_exc.ConnectFailure, ksa_exc.ConnectTimeout)):
        return CloudUnavailable(f"{what}: cannot reach the service ({_short(exc)})")
    if isinstance(exc, sdk_exc.ForbiddenException):
        detail = (exc.details or exc.message or "").strip() or "HTTP 403"
        return CloudError(f"{what}: refused by policy ({detail})", hint=SERVICE_USER_HINT)
    if isinstance(exc, ksa_exc.Unauthorized):
        return CloudError(f"{what}: refused ({_short(exc)})", hint=CREDENTIALS_HINT)
    if isinstance(exc, sdk_exc.HttpException):
        status = exc.status_code or 0
        message = (exc.details or exc.message or "").strip() or f"HTTP {status}"
        if status == 401:
            return CloudError(f"{what}: refused ({message})", hint=CREDENTIALS_HINT)
        if status >= 500 or status in (502, 503, 504):
            return CloudUnavailable(f"{what}: HTTP {status} {message}")
        return CloudError(f"{what}: {message} (HTTP {status})")
    if isinstance(exc, sdk_exc.EndpointNotFound):
        return CloudError(f"{what}: {_short(exc)}", hint="check the cloud's service catalog")
    if isinstance(exc, (sdk_exc.SDKException, ksa_exc.ClientException)):
        return CloudError(f"{what}: {_short(exc)}")
    return CloudError(f"{what}: {type(exc).__name__}: {exc}")


def neutron_error_type(exc: BaseException) -> str | None:
    """The ``NeutronError.type`` of a Neutron error answer (``PortBindingError``, ...)."""
    response = getattr(exc, "response", None)
    if response is None:
        return None
    try:
        body = response.json()
    except Exception:  # not JSON: no type to tell
        return None
    error = body.get("NeutronError") if isinstance(body, dict) else None
    kind = error.get("type") if isinstance(error, dict) else None
    return str(kind) if kind else None


def http_status(exc: BaseException) -> int | None:
    """The HTTP status of an SDK error, or None when it is no HTTP answer."""
    from openstack import exceptions as sdk_exc

    if isinstance(exc, sdk_exc.HttpException):
        return exc.status_code
    return None


def has_service(conn: Connection, service_type: str) -> bool:
    """Whether the catalog offers ``service_type`` (e.g. a cloud without Nova)."""
    try:
        return bool(conn.endpoint_for(service_type))
    except Exception:  # the SDK raises several types for "not in the catalog"
        return False
