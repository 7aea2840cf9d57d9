"""The `vmm` command.

Built-in commands (the directory server) live here; plugins add theirs
(`vmm lab ...`) through the ``vmm_orchestrator.commands`` entry points.
Every failure the operator can fix ends in one line on stderr that says what
is wrong and what to do, and a non-zero exit status.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Sequence

from oslo_config import cfg
from stevedore import ExtensionManager

from vmm_orchestrator import __version__
from vmm_orchestrator.commands import Command
from vmm_orchestrator.errors import ConfigError, VmmError
from vmm_orchestrator.nva import options as nva_options

LOG = logging.getLogger("vmm")
EXIT_ERROR = 2


class NvaCommand(Command):
    """`vmm nva serve`: run the embedded directory (HTTP + SQLite)."""

    name = "nva"
    help = "run the embedded directory (NVA) service"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        sub = parser.add_subparsers(dest="nva_command", required=True)
        serve = sub.add_parser("serve", help="serve the directory's HTTP API until stopped")
        serve.add_argument("--bind-host", help="override [nva] bind_host")
        serve.add_argument("--bind-port", type=int, help="override [nva] bind_port")
        serve.add_argument("--database", help="override [nva] database")

    def run(self, conf: cfg.ConfigOpts, args: argparse.Namespace) -> int:
        from vmm_orchestrator.nva.server import NvaServer
        from vmm_orchestrator.nva.store import NvaStore

        nva_options.register_opts(conf)
        for key in ("bind_host", "bind_port", "database"):
            value = getattr(args, key)
            if value is not None:
                conf.set_override(key, value, group="nva")
        opts = conf.nva
        if not opts.token:
            raise ConfigError(
                "[nva] token is not set",
                hint="set a long random token in the config file; every client needs it",
            )
        directory = os.path.dirname(os.path.abspath(opts.database))
        if not os.path.isdir(directory):
            raise ConfigError(
                f"[nva] database: directory {directory} does not exist",
                hint="create it or point [nva] database elsewhere",
            )
        server = NvaServer(
            NvaStore(opts.database),
            opts.token,
            opts.bind_host,
            opts.bind_port,
            max_body_bytes=opts.max_body_bytes,
        )
        signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
        print(f"vmm nva: serving on http://{opts.bind_host}:{opts.bind_port}", flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            server.stop()
        return 0


def _commands() -> dict[str, Command]:
    found: dict[str, Command] = {NvaCommand.name: NvaCommand()}
    manager = ExtensionManager(
        "vmm_orchestrator.commands",
        invoke_on_load=True,
        on_load_failure_callback=lambda _m, ep, exc: LOG.warning(
            "command plugin %s could not be loaded: %s", ep.name, exc
        ),
    )
    for ext in manager:
        found[ext.obj.name] = ext.obj
    return found


def build_parser(commands: dict[str, Command]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vmm", description="Make the network follow a live-migrating VM."
    )
    parser.add_argument("--version", action="version", version=f"vmm {__version__}")
    parser.add_argument(
        "--config-file",
        action="append",
        default=[],
        help="an oslo.config file (may be given more than once)",
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="log more (-v info, -vv debug)",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, command in sorted(commands.items()):
        command.add_arguments(sub.add_parser(name, help=command.help))
    return parser


def load_config(files: Sequence[str]) -> cfg.ConfigOpts:
    """A ConfigOpts reading exactly ``files`` (none: defaults only)."""
    for path in files:
        if not os.path.isfile(path):
            raise ConfigError(f"config file {path} does not exist", hint="check --config-file")
    conf = cfg.ConfigOpts()
    args: list[str] = []
    for path in files:
        args += ["--config-file", path]
    try:
        conf(args=args, project="vmm-orchestrator", default_config_files=[])
    except cfg.Error as exc:
        raise ConfigError(f"bad configuration: {exc}") from None
    return conf


def main(argv: Sequence[str] | None = None) -> int:
    commands = _commands()
    parser = build_parser(commands)
    args = parser.parse_args(argv)
    level = {0: logging.WARNING, 1: logging.INFO}.get(args.verbose, logging.DEBUG)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        conf = load_config(args.config_file)
        return commands[args.command].run(conf, args)
    except VmmError as exc:
        print(f"vmm: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except (
        cfg.ConfigFileValueError,
        cfg.ConfigFileParseError,
        cfg.RequiredOptError,
    ) as exc:
        print(
            f"vmm: error: bad configuration: {exc} (fix the config file)",
            file=sys.stderr,
        )
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("vmm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
