"""`vmm migrate-with-network SERVER`: live-migrate a server and make its network follow.

With Nova (the default) the cloud is configured as for the openstack CLI:
``--os-cloud`` / ``OS_CLOUD`` name an entry of clouds.yaml, otherwise the
``OS_*`` variables of an openrc file describe it (``[openstack] cloud`` is
the last fallback). The credentials need the admin role: Nova shows a
server's host only to admins. Port bindings are Neutron's service business:
under its default policy they need the ``service`` role (and a network's
VNI the ``admin`` role), the rights of Nova's own service user. So, like
Nova, the command uses the service user of ``[neutron]`` (written as in
nova.conf) for every Neutron call of the directory when that section is
set; otherwise the operator's credentials need both roles.

With ``--libvirt-uri SOURCE --libvirt-uri DESTINATION`` the same flow
drives a plain libvirt migration, for clouds without Nova; the directory
is then Neutron when a cloud is configured, else the embedded NVA
(``[nva] url``, token from ``$VMM_NVA_TOKEN`` or ``[nva] token``).

Every argument and option is checked before anything is changed; every
failure ends in one ``vmm: error:`` line naming the phase that failed and
what was reverted, exit status 2. Exit status 0 means the VM runs at the
destination and its network has converged (with ``--no-wait``: that Nova
accepted the migration).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
from typing import Any

from oslo_config import cfg

from vmm_openstack import options
from vmm_openstack.driver import Driver, PhaseFeed
from vmm_openstack.migrate import Flow, Settings
from vmm_openstack.progress import make_progress
from vmm_orchestrator.cli import TOKEN_ENV, check_options, override_option
from vmm_orchestrator.commands import Command
from vmm_orchestrator.errors import ConfigError

LOG = logging.getLogger(__name__)

#: Entry point namespace of the agents' phase feeds (see driver.PhaseFeed).
FEED_NAMESPACE = "vmm_orchestrator.phase_feeds"


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give a number of seconds > 0")
    return value


def load_feed(conf: cfg.ConfigOpts) -> PhaseFeed | None:
    """The first installed agent phase feed, if any; a broken one is skipped, logged."""
    from stevedore import ExtensionManager

    manager: ExtensionManager[Any] = ExtensionManager(
        FEED_NAMESPACE,
        invoke_on_load=True,
        invoke_args=(conf,),
        on_load_failure_callback=lambda _m, ep, exc: LOG.warning(
            "phase feed %s could not be loaded: %s", ep.name, exc
        ),
    )
    for ext in manager:
        return ext.obj
    return None


class MigrateWithNetworkCommand(Command):
    """The `vmm migrate-with-network` command (entry point in ``vmm_orchestrator.commands``)."""

    name = "migrate-with-network"
    help = "live-migrate a server (Nova, or libvirt) and make its network follow"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.description = (
            "Pre-stage the server's ports at the destination (Neutron port bindings), start "
            "the live migration, follow it, activate the bindings as soon as the VM runs "
            "there and wait until the destination has wired the ports. Exit status 0 only "
            "when the VM runs at the destination and the network has converged. The cloud "
            "is configured as for the openstack CLI (clouds.yaml, OS_* variables, --os-cloud)."
        )
        parser.add_argument("server", metavar="SERVER", help="server name or ID (libvirt: domain)")
        parser.add_argument(
            "--host",
            help="destination host (Nova: checked by the scheduler; default: the scheduler "
            "picks). With --libvirt-uri: the destination's name in the directory "
            "(default: its hostname)",
        )
        parser.add_argument(
            "--block-migration",
            action="store_true",
            help="copy the disks too (no shared storage); default: Nova decides ('auto')",
        )
        wait = parser.add_mutually_exclusive_group()
        wait.add_argument(
            "--wait",
            dest="wait",
            action="store_true",
            default=True,
            help="follow the migration to its end (the default)",
        )
        wait.add_argument(
            "--no-wait",
            dest="wait",
            action="store_false",
            help="return once Nova accepted the migration (Nova only)",
        )
        parser.add_argument(
            "-f",
            "--format",
            choices=("table", "json"),
            default="table",
            help="table: live progress then a table of the phases (default); json: one "
            "JSON document at the end",
        )
        parser.add_argument(
            "--timeout",
            type=_positive,
            metavar="SECONDS",
            help="override [openstack] migration_timeout: abort a migration that has not "
            "ended by then",
        )
        parser.add_argument(
            "--os-cloud",
            metavar="NAME",
            help="cloud entry of clouds.yaml (default: $OS_CLOUD, then [openstack] cloud, "
            "then the OS_* variables)",
        )
        parser.add_argument(
            "--os-region-name",
            metavar="REGION",
            help="region (default: $OS_REGION_NAME, then [openstack] region_name)",
        )
        parser.add_argument(
            "--libvirt-uri",
            action="append",
            metavar="URI",
            help="give twice, source then destination, to migrate with libvirt instead of Nova",
        )
        parser.add_argument(
            "--directory",
            choices=("neutron", "nva"),
            help="with --libvirt-uri: where the ports live (default: neutron when a cloud is "
            "configured, else the embedded NVA of [nva] url)",
        )

    # ------------------------------------------------------------------ run

    def run(self, conf: cfg.ConfigOpts, args: argparse.Namespace) -> int:
        check_options(conf, options.list_opts())
        if args.timeout is not None:
            override_option(
                conf,
                options.GROUP,
                options.OPENSTACK_OPTS,
                "migration_timeout",
                args.timeout,
                "--timeout",
            )
        uris = list(args.libvirt_uri or [])
        if len(uris) not in (0, 2):
            raise ConfigError(
                f"--libvirt-uri given {len(uris)} time(s): it needs the source's URI, then "
                "the destination's",
                hint="--libvirt-uri qemu+ssh://src/system --libvirt-uri qemu+ssh://dst/system",
            )
        if uris and not args.wait:
            raise ConfigError(
                "--no-wait works with Nova only: libvirt cancels a migration when the "
                "command that started it goes away",
                hint="drop --no-wait",
            )
        if args.directory and not uris:
            raise ConfigError(
                "--directory is for --libvirt-uri migrations; with Nova the directory is Neutron",
                hint="drop --directory",
            )
        group = conf[options.GROUP]
        settings = Settings(
            wait=args.wait,
            block_migration=args.block_migration,
            migration_timeout=group.migration_timeout,
            abort_timeout=group.abort_timeout,
            converge_timeout=group.converge_timeout,
            poll_interval=group.poll_interval,
        )
        driver = self._libvirt(conf, args, uris) if uris else self._nova(conf, args)
        try:
            progress = make_progress(args.format)
            flow = Flow(driver, driver.directory, progress, settings, feed=load_feed(conf))
            flow.run(args.server, args.host)
        finally:
            driver.close()
            with contextlib.suppress(Exception):  # the service user's own connection
                driver.directory.close()
        return 0

    @staticmethod
    def _cloud_name(conf: cfg.ConfigOpts, args: argparse.Namespace) -> str | None:
        """--os-cloud, then $OS_CLOUD, then [openstack] cloud (None: the OS_* variables)."""
        name: str | None = (
            args.os_cloud or os.environ.get("OS_CLOUD") or conf[options.GROUP].cloud or None
        )
        return name

    def _connect(self, conf: cfg.ConfigOpts, args: argparse.Namespace) -> Any:
        from vmm_openstack import cloud

        group = conf[options.GROUP]
        region = args.os_region_name or os.environ.get("OS_REGION_NAME") or group.region_name
        return cloud.connect(self._cloud_name(conf, args), region, group.api_timeout)

    def _neutron(self, conf: cfg.ConfigOpts, conn: Any) -> Any:
        """The directory on Neutron, through ``[neutron]``'s service user when it is set."""
        from vmm_openstack import cloud
        from vmm_openstack.neutron import NeutronDirectory

        group = conf[options.GROUP]
        if not cloud.has_service(conn, "network"):
            raise ConfigError(
                f"cloud {conn.vmm_label} has no network service (Neutron) in its catalog",
                hint="use --libvirt-uri with --directory nva for a site without Neutron",
            )
        service_user = cloud.connect_service_user(conf, group.api_timeout)
        return NeutronDirectory(
            service_user or conn,
            nve_hosts=group.nve_hosts,
            poll_interval=group.poll_interval,
            note_level=logging.INFO,  # the progress display shows the notes
        )

    def _nova(self, conf: cfg.ConfigOpts, args: argparse.Namespace) -> Driver:
        from vmm_openstack import cloud
        from vmm_openstack.nova import NovaDriver

        conn = self._connect(conf, args)
        try:
            if not cloud.has_service(conn, "compute"):
                raise ConfigError(
                    f"cloud {conn.vmm_label} has no compute service (Nova) in its catalog",
                    hint="for a cloud without Nova give --libvirt-uri SOURCE --libvirt-uri "
                    "DESTINATION",
                )
            directory = self._neutron(conf, conn)
            return NovaDriver(conn, directory, find_timeout=conf[options.GROUP].api_timeout)
        except BaseException:
            conn.close()
            raise

    def _libvirt(self, conf: cfg.ConfigOpts, args: argparse.Namespace, uris: list[str]) -> Driver:
        from vmm_openstack.directory import NvaDirectory
        from vmm_openstack.libvirt_driver import LibvirtDriver, load_libvirt

        load_libvirt()  # fail on a missing libvirt-python before connecting anywhere
        kind = args.directory
        if kind is None:
            configured = self._cloud_name(conf, args) or os.environ.get("OS_AUTH_URL")
            kind = "neutron" if configured else "nva"
        if kind == "neutron":
            conn = self._connect(conf, args)
            try:
                directory = self._neutron(conf, conn)
            except BaseException:
                conn.close()
                raise
        else:
            from vmm_orchestrator.nva import options as nva_options
            from vmm_orchestrator.nva.client import NvaClient

            check_options(conf, nva_options.list_opts())
            token = os.environ.get(TOKEN_ENV) or conf[nva_options.GROUP].token
            if not token:
                raise ConfigError(
                    "no token for the directory (NVA)",
                    hint=f"set [nva] token in the config file or ${TOKEN_ENV}",
                )
            nva = conf[nva_options.GROUP]
            directory = NvaDirectory(NvaClient(nva.url, token, timeout=nva.request_timeout))
        return LibvirtDriver(uris[0], uris[1], directory)
