"""The `vmm` command.

Built-in commands (the directory server and its status) live here; plugins
add theirs (`vmm lab ...`) through the ``vmm_orchestrator.commands`` entry
points. Every failure the operator can fix ends in one line on stderr,
``vmm: error: <what is wrong> (<what to do>)``, exit status 2, and nothing
half-applied: commands check their arguments and every option they use
before they change anything.

Plugins use :func:`check_options` and :func:`override_option` so their
commands fail the same way.
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import json
import logging
import os
import re
import signal
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, NoReturn

from oslo_config import cfg, types
from stevedore import ExtensionManager

from vmm_orchestrator import __version__, interrupt, logs, metrics, options
from vmm_orchestrator.commands import Command
from vmm_orchestrator.errors import ConfigError, VmmError
from vmm_orchestrator.nva import options as nva_options
from vmm_orchestrator.nva.errors import Unauthorized, Unavailable

LOG = logging.getLogger("vmm")

#: Exit status of every error the operator can fix (bad arguments or configuration,
#: an unreachable or refusing service), as argparse uses for usage errors.
EXIT_ERROR = 2
#: Exit status of an unexpected failure (a bug): still one line, unless -vv.
EXIT_INTERNAL = 1

#: Environment variable `vmm nva status` reads the directory's token from, so the
#: token need not be on a command line (where `ps` shows it) or in a file.
TOKEN_ENV = "VMM_NVA_TOKEN"

OptGroups = Iterable[tuple[str, Iterable[cfg.Opt]]]


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error is one ``vmm: error:`` line like every other error.

    Sub-parsers (also the plugins') are created with the parser's own class,
    so this covers every `vmm ...` command.
    """

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_ERROR, f"vmm: error: {message} (see `{self.prog} --help`)\n")


# ------------------------------------------------------------ configuration


def _file_values(conf: cfg.ConfigOpts) -> dict[tuple[str, str], tuple[str, str]]:
    """(group, key) -> (raw value, file) as the config files set them; the last file wins."""
    found: dict[tuple[str, str], tuple[str, str]] = {}
    for path in conf.config_file or []:
        sections: dict[str, dict[str, Any]] = {}
        try:
            cfg.ConfigParser(path, sections).parse()
        except Exception:  # oslo already parsed it; nothing better to say here
            continue
        for section, keys in sections.items():
            group = section if section == "DEFAULT" else section.lower()
            for key, values in keys.items():
                raw = values[-1] if isinstance(values, list) and values else values
                found[(group, key)] = (str(raw), path)
    return found


def _value_reason(exc: Exception) -> str:
    """The useful end of oslo's 'Value for option X from LocationInfo(...) is not valid: ...'."""
    text = str(exc)
    marker = " is not valid: "
    return text.split(marker, 1)[1] if marker in text else text


def _allowed(opt: cfg.Opt) -> str | None:
    """What values ``opt`` accepts, in words, when its type says so."""
    kind = opt.type
    choices = getattr(kind, "choices", None)
    if choices:
        return "one of " + ", ".join(str(c) for c in choices)
    schemes = getattr(kind, "schemes", None)
    if schemes:
        return "a URL with scheme " + " or ".join(schemes)
    low, high = getattr(kind, "min", None), getattr(kind, "max", None)
    if isinstance(kind, types.Number):
        noun = "an integer" if isinstance(kind, types.Integer) else "a number"
        if low is not None and high is not None:
            return f"{noun} from {low} to {high}"
        if low is not None:
            return f"{noun} >= {low}"
        if high is not None:
            return f"{noun} <= {high}"
        return noun
    return None


def _show(value: Any) -> str:
    """An option value as it would be written in a config file."""
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value)
    return str(value)


def check_options(conf: cfg.ConfigOpts, groups: OptGroups) -> None:
    """Register ``groups`` and read every option now, so a bad value fails up front.

    oslo.config checks a value only when it is first read, which would let
    a command stop halfway; this reads them all before the command starts.
    A key the files set in one of these groups that is no option of it
    (a typo, or ``-`` for ``_``) is refused too: a silently ignored line
    would leave the default in force. Raises ConfigError naming the group,
    option, file and value.
    """
    groups = [(group, list(opts)) for group, opts in groups]
    for group, opts in groups:
        for opt in opts:
            with contextlib.suppress(cfg.DuplicateOptError):
                conf.register_opt(opt, group=group)
    in_files = _file_values(conf)
    for group, opts in groups:
        for opt in opts:
            try:
                getattr(conf[group], opt.dest)
            except cfg.ConfigSourceValueError as exc:
                raw, path = in_files.get((group, opt.dest), ("?", "the config file"))
                allowed = _allowed(opt)
                what = f"bad value in {path}: [{group}] {opt.dest} = {raw}"
                default = "" if opt.default is None else f" {_show(opt.default)}"
                raise ConfigError(
                    what if allowed else f"{what}: {_value_reason(exc)}",
                    hint=(f"give {allowed}, or" if allowed else "fix it or")
                    + f" remove the line to use the default{default}",
                ) from None
        known = {opt.dest for opt in opts} | {opt.name for opt in opts} | set(conf[group])
        for (section, key), (_raw, path) in sorted(in_files.items()):
            if section == group and key not in known:
                raise ConfigError(
                    f"unknown option in {path}: [{group}] {key}",
                    hint=f"[{group}] has {', '.join(sorted(known))}",
                )


def override_option(
    conf: cfg.ConfigOpts,
    group: str,
    opts: Iterable[cfg.Opt],
    name: str,
    value: Any,
    flag: str,
) -> None:
    """``conf.set_override`` for a command-line flag; a bad value names the flag.

    ``opts`` are the group's options (to say what ``name`` accepts).
    """
    opt = next((o for o in opts if o.dest == name), None)
    if opt is not None:
        with contextlib.suppress(cfg.DuplicateOptError):
            conf.register_opt(opt, group=group)
    try:
        conf.set_override(name, value, group=group)
    except ValueError as exc:
        allowed = _allowed(opt) if opt is not None else None
        what = f"{flag} {_show(value)}: not a valid value for [{group}] {name}"
        raise ConfigError(
            what if allowed else f"{what}: {exc}",
            hint=f"give {allowed}" if allowed else f"see the help of {flag}",
        ) from None


def describe_config_error(exc: cfg.Error) -> str:
    """One line for an oslo.config error that escaped a command's own checks."""
    if isinstance(exc, cfg.ConfigFileParseError):
        return f"cannot parse config file {exc.config_file}: {exc.msg} (fix its syntax)"
    if isinstance(exc, cfg.ConfigSourceValueError):
        found = re.search(r"option (\S+) from .*?detail='([^']*)'", str(exc))
        where = f"{found.group(2)}: option {found.group(1)}" if found else "a config file"
        return f"bad value in {where}: {_value_reason(exc)} (fix the config file)"
    return f"bad configuration: {exc} (fix the config file)"


def load_config(files: Sequence[str]) -> cfg.ConfigOpts:
    """A ConfigOpts reading exactly ``files`` (none: defaults only)."""
    for path in files:
        if not os.path.exists(path):
            raise ConfigError(f"config file {path} does not exist", hint="check --config-file")
        if not os.path.isfile(path):
            raise ConfigError(f"config file {path} is not a file", hint="check --config-file")
        if not os.access(path, os.R_OK):
            raise ConfigError(f"config file {path} is not readable", hint="check its permissions")
    conf = cfg.ConfigOpts()
    args: list[str] = []
    for path in files:
        args += ["--config-file", path]
    try:
        conf(args=args, project="vmm-orchestrator", default_config_files=[])
    except cfg.ConfigFileParseError as exc:
        raise ConfigError(
            f"cannot parse config file {exc.config_file}: {exc.msg}", hint="fix its syntax"
        ) from None
    except cfg.Error as exc:
        raise ConfigError(f"bad configuration: {exc}", hint="check --config-file") from None
    # Every installed plugin's options, once (vmm_orchestrator.options). After parsing:
    # the [host:<name>] groups follow the files' [agent] hosts, and an unused plugin's
    # required options (keystoneauth's [neutron] auth-url) must not fail every command.
    options.register_all(conf)
    return conf


# ---------------------------------------------------------------- vmm nva


def format_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain left-aligned text table."""
    cells = [list(header), *([str(c) for c in row] for row in rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    )


def _client_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", help="override [nva] url")
    parser.add_argument(
        "-f",
        "--format",
        choices=("table", "json"),
        default="table",
        help="output format (default: table)",
    )


def _key_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--vni", required=True, help="the endpoint's VN (VXLAN VNI)")
    parser.add_argument("--mac", required=True, help="the endpoint's MAC")


def _endpoint_row(e: dict[str, Any]) -> list[Any]:
    state = str(e["state"])
    if e.get("pending_nve"):
        state += f" -> {e['pending_nve']} ({e.get('migration_id')})"
    flags = [name for name in ("sticky", "frozen") if e.get(name)]
    return [
        e["vni"],
        e["mac"],
        ",".join(e.get("ipv4") or []) or "-",
        ",".join(e.get("ipv6") or []) or "-",
        e["nve"],
        e.get("vtep") or "-",
        e["seq"],
        state,
        ",".join(flags) or "-",
    ]


_ENDPOINT_HEADER = ["VN", "MAC", "IPv4", "IPv6", "NVE", "VTEP", "seq", "state", "flags"]


def _where(e: dict[str, Any]) -> str:
    """One sentence: where the directory places an endpoint."""
    addresses = ", ".join((e.get("ipv4") or []) + (e.get("ipv6") or [])) or "no address"
    text = (
        f"{e['mac']} ({addresses}) in VN {e['vni']} is at NVE {e['nve']} "
        f"(VTEP {e.get('vtep') or '?'}), seq {e['seq']}, {e['state']}"
    )
    if e.get("pending_nve"):
        text += f", migrating to {e['pending_nve']} (migration {e.get('migration_id')})"
    if e.get("sticky"):
        text += ", sticky"
    if e.get("frozen"):
        text += f", FROZEN ({e.get('frozen_reason')})"
    return text


class NvaCommand(Command):
    """`vmm nva serve` runs the embedded directory; the other commands talk to one."""

    name = "nva"
    help = "run the directory (NVA) service, show its state, manage endpoints and NVEs"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        sub = parser.add_subparsers(
            dest="nva_command", metavar="{serve,status,endpoint,nve}", required=True
        )
        serve = sub.add_parser("serve", help="serve the directory's HTTP API until stopped")
        serve.add_argument("--bind-host", help="override [nva] bind_host")
        serve.add_argument("--bind-port", type=int, help="override [nva] bind_port")
        serve.add_argument("--database", help="override [nva] database")
        status = sub.add_parser(
            "status",
            help="show the directory's revision, its NVEs and the endpoints per VN, "
            "or where one VM is (--mac or --ip)",
            description="Ask the directory at [nva] url (or --url) for its state. The token "
            f"is ${TOKEN_ENV} if set, else [nva] token. With --mac or --ip, say where that "
            "endpoint is (in every VN, or only in --vni).",
        )
        _client_flags(status)
        status.add_argument("--mac", help="say where the endpoint with this MAC is")
        status.add_argument("--ip", help="say where the endpoint with this address is")
        status.add_argument("--vni", help="look in this VN only")

        endpoint = sub.add_parser(
            "endpoint",
            help="register, list, show, delete or release a VM's endpoints",
            description="A VM's endpoint is one interface: its VN (VNI), MAC, IPv4/IPv6 "
            "addresses and the NVE (host) it runs behind. Register each VM's endpoints "
            "before its first migration.",
        )
        ep_sub = endpoint.add_subparsers(
            dest="endpoint_command",
            metavar="{add,list,show,delete,release}",
            required=True,
        )
        add = ep_sub.add_parser("add", help="register an endpoint at an NVE")
        _key_flags(add)
        add.add_argument("--ipv4", action="append", default=[], help="an IPv4 address (repeatable)")
        add.add_argument("--ipv6", action="append", default=[], help="an IPv6 address (repeatable)")
        add.add_argument("--nve", required=True, help="the NVE (host) it runs behind")
        add.add_argument(
            "--sticky",
            action="store_true",
            help="a static MAC (a gateway, an appliance): it never moves",
        )
        _client_flags(add)
        listing = ep_sub.add_parser("list", help="list endpoints (of one VN with --vni)")
        listing.add_argument("--vni", help="only this VN")
        _client_flags(listing)
        for name, text in (
            ("show", "show one endpoint"),
            ("delete", "remove an endpoint (its NVEs forget it)"),
            ("release", "unfreeze a MAC the directory froze as flapping"),
        ):
            one = ep_sub.add_parser(name, help=text)
            _key_flags(one)
            _client_flags(one)

        nve = sub.add_parser("nve", help="list NVEs, or remove one that went away")
        nve_sub = nve.add_subparsers(dest="nve_command", metavar="{list,delete}", required=True)
        nve_list = nve_sub.add_parser("list", help="list the registered NVEs")
        _client_flags(nve_list)
        nve_delete = nve_sub.add_parser(
            "delete", help="remove an NVE that serves no endpoint; peers stop flooding to it"
        )
        nve_delete.add_argument("id", help="the NVE's id")
        _client_flags(nve_delete)

    def run(self, conf: cfg.ConfigOpts, args: argparse.Namespace) -> int:
        check_options(conf, nva_options.list_opts() + metrics.list_opts())
        if args.nva_command == "status":
            if args.mac is not None or args.ip is not None:
                return self.locate(conf, args)
            if args.vni is not None:
                raise ConfigError("--vni goes with --mac or --ip", hint="add one, or drop --vni")
            return self.status(conf, args)
        if args.nva_command == "endpoint":
            return self.endpoint(conf, args)
        if args.nva_command == "nve":
            return self.nve(conf, args)
        return self.serve(conf, args)

    # -- talking to the directory ---------------------------------------------

    @contextlib.contextmanager
    def _client(self, conf: cfg.ConfigOpts, args: argparse.Namespace) -> Iterator[Any]:
        """A client for the directory; refused tokens and an unreachable directory
        become one clear line each."""
        from vmm_orchestrator.nva.client import NvaClient

        if args.url is not None:
            override_option(conf, nva_options.GROUP, nva_options.NVA_OPTS, "url", args.url, "--url")
        opts = conf.nva
        url: str = opts.url
        token = os.environ.get(TOKEN_ENV)
        if token is not None and not token:
            raise ConfigError(
                f"{TOKEN_ENV} is set but empty",
                hint="set it to the directory's token, or unset it to use [nva] token",
            )
        token = token or opts.token
        if not token:
            raise ConfigError(
                "no token for the directory",
                hint=f"set [nva] token in the config file or the {TOKEN_ENV} environment variable",
            )
        with NvaClient(url, token, timeout=opts.request_timeout) as client:
            try:
                yield client
            except Unauthorized as exc:
                raise VmmError(
                    f"the directory at {url} refused the token ({exc.message})",
                    hint=f"use the token `vmm nva serve` runs with: [nva] token or {TOKEN_ENV}",
                ) from None
            except Unavailable as exc:
                raise VmmError(
                    exc.message,
                    hint="is `vmm nva serve` running there? check --url or [nva] url "
                    "and that the port is reachable",
                ) from None

    @staticmethod
    def _vni(value: str | None) -> int | None:
        from vmm_orchestrator.nva.store import check_vni

        if value is None:
            return None
        if not re.fullmatch(r"[0-9]{1,9}", value.strip()):
            raise ConfigError(
                f"--vni {value}: not a VNI", hint="give an integer from 1 to 16777215"
            )
        try:
            return check_vni(int(value))
        except VmmError as exc:
            raise ConfigError(
                f"--vni {value}: {exc.message}", hint="give an integer from 1 to 16777215"
            ) from None

    @staticmethod
    def _flag(flag: str, check: Any, value: Any) -> Any:
        """Run a directory check on a flag's value; a refusal names the flag."""
        try:
            return check(value)
        except VmmError as exc:
            raise ConfigError(
                f"{flag} {value}: {exc.message}", hint=f"give a valid value for {flag}"
            ) from None

    # -- endpoint --------------------------------------------------------------

    def endpoint(self, conf: cfg.ConfigOpts, args: argparse.Namespace) -> int:
        from vmm_orchestrator.nva import store as rules

        command = args.endpoint_command
        vni = self._vni(args.vni)
        mac = None
        if command != "list":  # an existing entry may be named by any MAC (to delete it)
            check = rules.check_mac if command == "add" else rules.check_mac_syntax
            mac = self._flag("--mac", check, args.mac)
        if command == "add":
            # Everything is checked here, before the one request that registers it.
            ipv4 = [
                str(self._flag("--ipv4", lambda v: rules.check_ips([v], 4, "ipv4")[0], v))
                for v in args.ipv4
            ]
            ipv6 = [
                str(self._flag("--ipv6", lambda v: rules.check_ips([v], 6, "ipv6")[0], v))
                for v in args.ipv6
            ]
            nve = self._flag("--nve", rules.check_nve_id, args.nve)
        with self._client(conf, args) as client:
            if command == "add":
                result: Any = client.add_endpoint(vni, mac, ipv4, ipv6, nve, sticky=args.sticky)
                verb = "registered"
            elif command == "list":
                result = client.list_endpoints(vni)
                verb = ""
            elif command == "show":
                result = client.get_endpoint(vni, mac)
                verb = ""
            elif command == "delete":
                result = client.delete_endpoint(vni, mac)
                verb = "deleted"
            else:
                result = client.release(vni, mac)
                verb = "released"
        if args.format == "json":
            print(json.dumps(result))
        elif command == "list":
            if result:
                print(format_table(_ENDPOINT_HEADER, [_endpoint_row(e) for e in result]))
            else:
                print("no endpoint" + (f" in VN {vni}" if vni is not None else ""))
        elif command == "show":
            print(_where(result))
            if result.get("moves"):
                print(f"recent moves: {len(result['moves'])}")
                for move in result["moves"]:
                    kind = "planned" if move.get("planned") else "learned"
                    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(move["at"]))
                    print(f"  {stamp}  {move['from']} -> {move['to']}  {kind}")
        else:
            print(f"{verb}: {_where(result)}")
        return 0

    # -- nve -------------------------------------------------------------------

    def nve(self, conf: cfg.ConfigOpts, args: argparse.Namespace) -> int:
        from vmm_orchestrator.nva import store as rules

        nve_id = None
        if args.nve_command == "delete":
            nve_id = self._flag("NVE id", lambda v: rules.check_nve_id(v, "id"), args.id)
        with self._client(conf, args) as client:
            if nve_id is not None:
                result: Any = client.delete_nve(nve_id)
            else:
                result = client.list_nves()
        if args.format == "json":
            print(json.dumps(result))
        elif nve_id is not None:
            print(
                f"deleted NVE {result['id']} (VTEP {result['vtep']}); its peers stop flooding to it"
            )
        elif result:
            rows = [
                [
                    n["id"],
                    n["vtep"],
                    ",".join(str(v) for v in n["vnis"]) or "-",
                    n["acked_revision"],
                ]
                for n in result
            ]
            print(format_table(["NVE", "VTEP", "VNIs", "acked revision"], rows))
        else:
            print("no NVE registered")
        return 0

    # -- where is a VM ---------------------------------------------------------

    def locate(self, conf: cfg.ConfigOpts, args: argparse.Namespace) -> int:
        """Where the directory places the endpoint with a MAC or an address."""
        from vmm_orchestrator.nva import store as rules

        vni = self._vni(args.vni)
        mac = None if args.mac is None else self._flag("--mac", rules.check_mac, args.mac)
        ip = None if args.ip is None else str(self._flag("--ip", rules.check_endpoint_ip, args.ip))
        with self._client(conf, args) as client:
            endpoints = client.list_endpoints(vni)
        found = [
            e
            for e in endpoints
            if (mac is None or e["mac"] == mac)
            and (ip is None or ip in (e.get("ipv4") or []) + (e.get("ipv6") or []))
        ]
        if not found:
            wanted = " and ".join(x for x in (mac and f"MAC {mac}", ip and f"address {ip}") if x)
            raise VmmError(
                f"no endpoint with {wanted} in " + (f"VN {vni}" if vni is not None else "any VN"),
                hint="register it with `vmm nva endpoint add`",
            )
        if args.format == "json":
            print(json.dumps({"endpoints": found}))
        else:
            for e in found:
                print(_where(e))
        return 0

    # -- serve ---------------------------------------------------------------

    def serve(self, conf: cfg.ConfigOpts, args: argparse.Namespace) -> int:
        from vmm_orchestrator.nva.backends import open_store
        from vmm_orchestrator.nva.server import NvaServer
        from vmm_orchestrator.nva.store import NvaStore

        for key in ("bind_host", "bind_port", "database"):
            value = getattr(args, key)
            flag = "--" + key.replace("_", "-")
            if value is not None:
                override_option(conf, nva_options.GROUP, nva_options.NVA_OPTS, key, value, flag)
        opts = conf.nva
        if not opts.token:
            raise ConfigError(
                "[nva] token is not set",
                hint="set a long random token in the config file; every client needs it",
            )
        database: str = opts.database
        created = False
        if opts.backend != "embedded":
            # Another backend (etcd): nothing local to check or create.
            database = ":memory:"
        if database != ":memory:":
            path = os.path.abspath(database)
            directory = os.path.dirname(path)
            if not os.path.isdir(directory):
                raise ConfigError(
                    f"[nva] database: directory {directory} does not exist",
                    hint="create it or point [nva] database elsewhere",
                )
            if os.path.isdir(path):
                raise ConfigError(
                    f"[nva] database: {path} is a directory",
                    hint="point [nva] database at a file in it",
                )
            created = not os.path.exists(path)
            if created and not os.access(directory, os.W_OK | os.X_OK):
                raise ConfigError(
                    f"[nva] database: directory {directory} is not writable",
                    hint="fix its permissions or point [nva] database elsewhere",
                )
        store = (
            NvaStore.from_conf(conf, database) if opts.backend == "embedded" else open_store(conf)
        )
        exporter = None
        try:
            server = NvaServer.from_conf(conf, store=store)
            server.start()  # binds, or raises ConfigError naming bind_host/bind_port
            try:
                exporter = metrics.start_from_conf(conf, directory=store)
            except BaseException:
                server.stop()
                raise
        except BaseException:
            store.close()
            if created:  # nothing half-applied: no empty database left behind
                for suffix in ("", "-wal", "-shm", "-journal"):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(database + suffix)
            raise
        with interrupt.installed(signal.SIGTERM):
            try:
                print(f"vmm nva: serving on {server.url}", flush=True)
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass
            finally:
                if exporter is not None:
                    exporter.stop()
                server.stop()
                store.close()
        return 0

    # -- status --------------------------------------------------------------

    def status(self, conf: cfg.ConfigOpts, args: argparse.Namespace) -> int:
        with self._client(conf, args) as client:
            # NVEs first: every acked revision is then <= the revision shown.
            nves = client.list_nves()
            revision, endpoints = client.snapshot()
        url: str = conf.nva.url
        per_vn: dict[int, int] = {vni: 0 for nve in nves for vni in nve["vnis"]}
        for endpoint in endpoints:
            per_vn[endpoint["vni"]] = per_vn.get(endpoint["vni"], 0) + 1
        nve_rows = [
            {
                "id": n["id"],
                "vtep": n["vtep"],
                "vnis": list(n["vnis"]),
                "acked_revision": n["acked_revision"],
                "acked_at": n.get("acked_at"),
            }
            for n in sorted(nves, key=lambda n: str(n["id"]))
        ]
        vns = [{"vni": vni, "endpoints": count} for vni, count in sorted(per_vn.items())]
        frozen = [
            {k: e.get(k) for k in ("vni", "mac", "nve", "frozen_at", "frozen_reason")}
            for e in endpoints
            if e.get("frozen")
        ]
        if args.format == "json":
            print(
                json.dumps(
                    {
                        "url": url,
                        "revision": revision,
                        "nves": nve_rows,
                        "vns": vns,
                        "frozen": frozen,
                    }
                )
            )
            return 0
        print(f"directory {url} at revision {revision}")
        print()
        if nve_rows:
            rows = [
                [
                    n["id"],
                    n["vtep"],
                    ",".join(str(v) for v in n["vnis"]) or "-",
                    n["acked_revision"],
                ]
                for n in nve_rows
            ]
            print(format_table(["NVE", "VTEP", "VNIs", "acked revision"], rows))
        else:
            print("no NVE registered")
        print()
        if vns:
            print(format_table(["VN", "endpoints"], [[v["vni"], v["endpoints"]] for v in vns]))
        else:
            print("no VN")
        if frozen:  # flapping MACs the directory refuses to move until released
            print()
            print(f"{len(frozen)} frozen MAC(s) (release with `vmm nva endpoint release`):")
            for f in frozen:
                print(f"  {f['mac']} in VN {f['vni']} at {f['nve']}: {f['frozen_reason']}")
        return 0


# ------------------------------------------------------------------ main


def _commands() -> dict[str, Command]:
    found: dict[str, Command] = {NvaCommand.name: NvaCommand()}
    manager: ExtensionManager[Command] = ExtensionManager(
        "vmm_orchestrator.commands",
        invoke_on_load=True,
        on_load_failure_callback=lambda _m, ep, exc: LOG.warning(
            "command plugin %s could not be loaded: %s", ep.name, exc
        ),
    )
    for ext in manager:
        if isinstance(ext.obj, Command):
            found[ext.obj.name] = ext.obj
        else:
            LOG.warning("command plugin %s is not a Command; ignored", ext.name)
    return found


def build_parser(commands: dict[str, Command]) -> ArgumentParser:
    parser = ArgumentParser(prog="vmm", description="Make the network follow a live-migrating VM.")
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
        help="log more (-v info, -vv debug and tracebacks)",
    )
    parser.add_argument(
        "--log-format",
        choices=logs.FORMATS,
        default="text",
        help="log lines as text (default) or one JSON object per line, for log shippers",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.metavar = "{" + ",".join(sorted(commands)) + "}"
    for name, command in sorted(commands.items()):
        command.add_arguments(sub.add_parser(name, help=command.help))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    commands = _commands()
    parser = build_parser(commands)
    args = parser.parse_args(argv)
    level = {0: logging.WARNING, 1: logging.INFO}.get(args.verbose, logging.DEBUG)
    logs.configure(level, args.log_format)
    # The agent and the directory run for months and call C libraries (libvirt,
    # libnftables, libc through ctypes): should one of them crash the process, every
    # thread's Python stack goes to stderr, which systemd keeps in the journal.
    # (A stderr with no file descriptor, a test's capture, has none to give.)
    with contextlib.suppress(AttributeError, ValueError, OSError, RuntimeError):
        faulthandler.enable()
    try:
        conf = load_config(args.config_file)
        with interrupt.installed():
            return commands[args.command].run(conf, args)
    except VmmError as exc:
        print(f"vmm: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except (cfg.ConfigSourceValueError, cfg.ConfigFileParseError, cfg.RequiredOptError) as exc:
        print(f"vmm: error: {describe_config_error(exc)}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("vmm: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.verbose >= 2:
            raise
        print(
            f"vmm: error: unexpected {type(exc).__name__}: {exc} "
            "(this is a bug: rerun with -vv for the traceback and report it)",
            file=sys.stderr,
        )
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
