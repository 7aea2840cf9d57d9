"""How long moving a VM's firewall state takes, and how much of it falls
inside the VM's pause - with sessions changing during the migration.

Two host namespaces (source, destination), each host built the way ``vmm
agent`` builds it: a config file per host (``[agent] hosts``, its
``[host:<name>]`` group, ``[pipeline] stages`` with the state stages,
``[state]`` with the kinds, key and token, ``[nva]`` naming the directory)
given to the composition root (:func:`vmm_orchestrator.agent.assemble`),
which loads the kinds, the state service and the stages from their entry
points. Only each host's state service is started (HTTP on loopback, as
the orchestrators do in the lab): the data plane is not what this measures.
The directory is the embedded one (what ``vmm nva serve`` runs) in the
benchmark's process, holding the VM's endpoint at the source, pending to
the destination for each migration, so every export and import is vouched
for by it, as deployed. The source's kernel holds N sessions (conntrack)
or N set elements (nftables blacklist) of one VM, and the root's own
stages move them:

* pre-copy: ``state_precopy`` at PREPARE (VM still running): the source
  subscribes to the VM's change events, then the destination pulls a signed
  bundle streamed from the source's export, verifies it, checks every entry
  and installs them;
* churn: while the migration runs, a share of the VM's entries changes at
  the source (a third created, a third changed, a third destroyed);
* delta: ``state_delta`` at SWITCHOVER (VM paused): the source sends only
  what changed since the pre-copy; the destination installs it in one
  batched pass before answering. This stage's wall time is the part inside
  the pause.

The source's service runs in its own process, as on a real source host
(``--one-process``: both in one). Columns: ``pre-copy ms`` is the whole
pre-copy stage; ``pause ms`` the delta stage (inside the VM's pause); each
``(cpu)`` the CPU time both hosts' processes spent meanwhile, which a loaded
machine does not stretch; ``delta`` and ``delta bytes`` what crossed
in the pause; ``mode`` says delta, or resync if events were lost;
``exact`` whether the destination ended with exactly the source's final
set; ``move ms`` is pre-copy plus pause. ``export/s`` is the kind's own
export of the whole table (dump, decode, JSON-able entries); ``import/s``
the destination's check and install of the pre-copy once it has arrived
(entries per second of ``kind.check`` + ``kind.import_``; the conntrack
kind's entries are parsed and checked while the bundle arrives, so what is
left after the signature verifies is mostly the install). The baseline lines give the pause of
the same SWITCHOVER stage without state: with no state kinds at all, and
with the kinds enabled for a VM that has no entries (one round trip). The
closing line of rates is the conntrack kind's own (loaded through its entry
point, no host, no transport).

Run as root:  .venv/bin/python benchmarks/state_transfer.py
   (``--sessions 1000,10000,100000 --churn 0,1,10 --elements 1000``)
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

from oslo_config import cfg

from vmm_lab.libvirt.agents import write_config
from vmm_lab.linux.probe import format_table
from vmm_orchestrator import agent as root
from vmm_orchestrator import options
from vmm_orchestrator.model import Migration, Phase, Role, Vif, Workload
from vmm_orchestrator.nva.client import NvaClient
from vmm_orchestrator.nva.server import NvaServer
from vmm_orchestrator.nva.store import NvaStore
from vmm_orchestrator.stage import Stage, StageContext
from vmm_orchestrator.statekind import KindContext, StateKind
from vmm_state import registry
from vmm_state.kinds import _ctnetlink as ctnl
from vmm_state.kinds import _nft
from vmm_state.kinds._common import no_gc

VM_V4 = "10.77.0.10"
VIF = Vif("52:54:00:77:00:10", 100, (VM_V4,), ("fd77::10",), "tap-bench")
VM = Workload("bench-vm", (VIF,))
DEADLINE_S = 900.0
BLACKLIST = ("inet", "vmm_fw", "blacklist_v4")
#: The two hosts' underlay addresses (in the directory; no data plane is started).
VTEPS = {"src": "192.0.2.1", "dst": "192.0.2.2"}
STAGES = ["state_precopy", "state_delta"]


def sh(*args: str, input_: str | None = None) -> str:
    proc = subprocess.run(args, capture_output=True, text=True, input=input_, timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"`{' '.join(args)}` failed: {proc.stderr.strip()}")
    return proc.stdout


@contextlib.contextmanager
def namespaces(prefix: str) -> Iterator[tuple[str, str]]:
    """A source and a destination namespace with the model firewall loaded."""
    names = (f"{prefix}-src", f"{prefix}-dst")
    try:
        for ns in names:
            sh("ip", "netns", "add", ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            load_firewall(ns)
        yield names
    finally:
        for ns in names:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=60)


def load_firewall(ns: str) -> None:
    """The tables whose sets nft_sets moves (conntrack needs none)."""
    from vmm_lab import firewall

    sh(
        "ip",
        "netns",
        "exec",
        ns,
        "nft",
        "-f",
        "-",
        input_=firewall.ruleset(firewall.FirewallSettings()),
    )


class Directory:
    """The embedded directory (``vmm nva serve``'s) in this process: both NVEs and the
    VM's endpoint at the source; each migration pending to the destination while it
    runs, so the hosts' state services vouch for it as deployed."""

    def __init__(self) -> None:
        self.token = secrets.token_urlsafe(16)
        self.server = NvaServer(NvaStore(":memory:"), self.token, "127.0.0.1", 0)
        self.server.start()
        self.admin = NvaClient(self.server.url, self.token)
        for name, vtep in VTEPS.items():
            self.admin.register_nve(name, vtep, [VIF.vni])
        self.admin.add_endpoint(VIF.vni, VIF.mac, list(VIF.ipv4), list(VIF.ipv6), "src")

    def migrating(self, migration: Migration) -> None:
        self.admin.prestage(VIF.vni, VIF.mac, migration.destination, migration.id)

    def done(self, migration: Migration) -> None:
        """The VM stays at the source for the next case."""
        with contextlib.suppress(Exception):
            self.admin.abort(VIF.vni, VIF.mac, migration.id)

    def close(self) -> None:
        self.admin.close()
        self.server.stop()
        self.server.store.close()


@contextlib.contextmanager
def host_configs(
    directory: Directory, netns: dict[str, str], kinds: list[str]
) -> Iterator[dict[str, str]]:
    """A config file per host, as an operator writes one for each host's ``vmm agent``:
    {host name: path}; removed afterwards."""
    workdir = tempfile.mkdtemp(prefix="vmm-state-bench-")
    state = {
        "kinds": kinds,
        "key": secrets.token_urlsafe(32),
        "key_id": "bench",
        "token": secrets.token_urlsafe(16),
        "bind_host": "127.0.0.1",
        "bind_port": 0,
        "max_entries": 1_000_000,
        "read_timeout": DEADLINE_S,
    }
    try:
        paths = {}
        for name, ns in netns.items():
            path = os.path.join(workdir, f"{name}.conf")
            write_config(
                path,
                {
                    "agent": {"hosts": name},
                    "pipeline": {"stages": STAGES},
                    "nva": {
                        "backend": "embedded",
                        "url": directory.server.url,
                        "token": directory.token,
                    },
                    "state": state,
                    "rarp": {"responder": False},
                    root.host_group(name): {
                        "vtep": VTEPS[name],
                        "vnis": [VIF.vni],
                        "netns": ns,
                        "journal": os.path.join(workdir, f"journal-{name}.sqlite"),
                    },
                },
            )
            paths[name] = path
        yield paths
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


class Host:
    """One host from the composition root, only its state service started."""

    def __init__(self, config_file: str) -> None:
        self.conf = options.new_conf([config_file])
        self.assembly = root.assemble(self.conf)
        (self.host,) = self.assembly.hosts
        self.stages: dict[str, Stage] = {s.name: s for s in self.host.pipeline.stages}
        try:
            if self.host.state is None:
                raise RuntimeError("the root built no state service (no state stage listed)")
            self.state: Any = self.host.state
            self.state.start()
        except BaseException:
            self.assembly.close()
            raise

    @property
    def url(self) -> str:
        return str(self.state.url)

    @property
    def kind(self) -> StateKind:
        return next(iter(self.state.kinds.values()))

    def context(self, migration: Migration, phase: Phase, role: Role) -> StageContext:
        return StageContext(
            migration, phase, role, self.host.context, time.monotonic() + DEADLINE_S
        )

    def run(self, stage: str, migration: Migration, phase: Phase, role: Role) -> StageContext:
        ctx = self.context(migration, phase, role)
        self.stages[stage].run(ctx)
        return ctx

    def close(self) -> None:
        self.assembly.close()


def peer(i: int) -> str:
    """The i-th peer address in 198.18.0.0/15."""
    return str(ipaddress.ip_address(int(ipaddress.ip_address("198.18.0.1")) + i))


def session(i: int, mark: int = 0) -> ctnl.Conn:
    """Established TCP session i that the VM answers (peer -> VM:443)."""
    orig = ctnl.Tuple(2, ctnl.IPPROTO_TCP, peer(i // 60000), VM_V4, 1024 + i % 60000, 443)
    return ctnl.Conn(
        orig,
        orig.inverse(),
        timeout=3600,
        status=ctnl.IPS_SEEN_REPLY | ctnl.IPS_ASSURED,
        mark=mark,
        tcp_state=3,
        tcp_wscale_orig=7,
        tcp_wscale_reply=7,
        tcp_flags_orig=0,
        tcp_flags_reply=0,
    )


def seed_sessions(ns: str, n: int) -> None:
    with ctnl.ctnetlink(ns) as nl:
        codes = nl.apply([("create", session(i)) for i in range(n)])
    if any(codes):
        raise RuntimeError(f"seeding sessions failed: {sorted(set(codes))}")


def churn_sessions(ns: str, n: int, share: float) -> int:
    """Create, change (mark, TCP state) and destroy a third of ``share`` of n each."""
    k = int(n * share / 100.0)
    third = k // 3
    ops: list[tuple[str, ctnl.Conn]] = [("create", session(n + i)) for i in range(k - 2 * third)]
    for i in range(third):
        changed = session(i, mark=7)
        changed.tcp_state = 4  # FIN_WAIT
        ops.append(("update", changed))
    ops += [("delete", session(n - 1 - i)) for i in range(third)]
    with ctnl.ctnetlink(ns) as nl:
        codes = nl.apply(ops)
    if any(codes):
        raise RuntimeError(f"churn failed: {sorted(set(codes))}")
    return k


def element(i: int, timeout: int = 3600) -> str:
    return f"{{ {peer(i)} . {VM_V4} timeout {timeout}s expires {timeout}s }}"


def seed_elements(ns: str, n: int) -> None:
    _nft.transaction(ns, [f"add element {' '.join(BLACKLIST)} " + element(i) for i in range(n)])


def churn_elements(ns: str, n: int, share: float) -> int:
    k = int(n * share / 100.0)
    third = k // 3
    lines = [f"add element {' '.join(BLACKLIST)} " + element(n + i) for i in range(k - 2 * third)]
    lines += [f"add element {' '.join(BLACKLIST)} " + element(i, 7200) for i in range(third)]
    lines += [
        f"delete element {' '.join(BLACKLIST)} {{ {peer(n - 1 - i)} . {VM_V4} }}"
        for i in range(third)
    ]
    _nft.transaction(ns, lines)
    return k


def vm_state(ns: str, kind_name: str) -> set[Any]:
    """What the VM has in ``ns``: session names and marks, or element keys."""
    if kind_name == "conntrack":
        with ctnl.ctnetlink(ns) as nl:
            return {(c.orig.key(), c.mark, c.tcp_state) for c in nl.iter_dump(addresses={VM_V4})}
    _, elements = _nft.list_set(ns, *BLACKLIST)
    return {tuple(e["key"]) for e in elements if e["key"][1] == VM_V4}


SEED: dict[str, Callable[[str, int], None]] = {
    "conntrack": seed_sessions,
    "nft_sets": seed_elements,
}
CHURN: dict[str, Callable[[str, int, float], int]] = {
    "conntrack": churn_sessions,
    "nft_sets": churn_elements,
}


def settle(kind: StateKind, migration_id: str, changed: int) -> None:
    """Let the source's event reader take in the churn's events before the pause.

    The churn stands for changes during the migration's memory copy, while
    the VM still runs: the reader consumes their events as they come, and the
    switchover finds them read (a burst just before the pause would be read
    inside it instead). Waits at most two seconds.
    """
    trackers = getattr(kind, "_trackers", {})
    tracker = trackers.get(migration_id)
    if tracker is None or not changed:
        return
    until = time.monotonic() + 2.0
    while tracker.events < changed and time.monotonic() < until:
        time.sleep(0.01)


class Source:
    """The source host in its own process, as on a real source host (its own
    orchestrator): built there by the composition root from its config file and
    driven over a pipe by the benchmark, which holds the destination. With
    ``separate=False`` it runs in this process."""

    def __init__(self, separate: bool, config_file: str) -> None:
        self.separate = separate
        if not separate:
            self.host = Host(config_file)
            self.url = self.host.url
            return
        import multiprocessing

        ctx = multiprocessing.get_context("fork")
        self.pipe, child = ctx.Pipe()
        self.proc = ctx.Process(target=self._serve, args=(child, config_file), daemon=True)
        self.proc.start()
        status, value = self.pipe.recv()
        if status != "ok":
            self.proc.join(timeout=30)
            raise RuntimeError(f"source process: building the host failed: {value}")
        self.url = value

    @staticmethod
    def _serve(pipe: Any, config_file: str) -> None:
        try:
            host = Host(config_file)
        except Exception as err:
            pipe.send(("error", repr(err)))
            return
        pipe.send(("ok", host.url))
        try:
            while True:
                op, args = pipe.recv()
                if op == "stop":
                    pipe.send(None)
                    return
                try:
                    pipe.send(("ok", Source.do(host, op, *args)))
                except Exception as err:
                    pipe.send(("error", repr(err)))
        finally:
            host.close()

    @staticmethod
    def do(host: Host, op: str, *args: Any) -> Any:
        if op == "cpu":
            return time.process_time()
        if op == "expect":
            host.state.expect(args[0])
            return None
        if op == "peers":
            host.assembly.state_peers.update(args[0])
            return None
        if op == "probe":
            started = time.perf_counter()
            count = sum(
                1 for _ in host.kind.export(KindContext(host.state.netns, VM.vifs, "probe"))
            )
            return count, time.perf_counter() - started
        if op == "settle":
            settle(host.kind, args[0], args[1])
            return None
        if op == "delta":
            started, cpu = time.perf_counter(), time.process_time()
            ctx = host.run("state_delta", args[0], Phase.SWITCHOVER, Role.SOURCE)
            wall = (time.perf_counter() - started) * 1000.0
            return wall, (time.process_time() - cpu) * 1000.0, ctx.notes
        if op == "forget":
            host.state.forget(args[0])
            return None
        raise ValueError(op)

    def call(self, op: str, *args: Any) -> Any:
        if not self.separate:
            return self.do(self.host, op, *args)
        self.pipe.send((op, args))
        status, value = self.pipe.recv()
        if status != "ok":
            raise RuntimeError(f"source process: {op} failed: {value}")
        return value

    def stop(self) -> None:
        if not self.separate:
            self.host.close()
            return
        self.pipe.send(("stop", ()))
        self.pipe.recv()
        self.proc.join(timeout=30)


def run_case(
    directory: Directory, kind_name: str, n: int, churn: float, separate: bool = True
) -> dict[str, Any]:
    """Seed the source, pre-copy, churn, delta through the root's stages; check the result."""
    prefix = f"vmmst{os.getpid() % 10000:04d}{secrets.token_hex(2)}"
    migration = Migration(f"bench-{prefix}", VM, "src", "dst")
    with (
        namespaces(prefix) as (src_ns, dst_ns),
        host_configs(directory, {"src": src_ns, "dst": dst_ns}, [kind_name]) as files,
    ):
        source = Source(separate, files["src"])  # started before the seeding, as a host's is
        try:
            dst = Host(files["dst"])
            try:
                table = {"src": source.url, "dst": dst.url}
                dst.assembly.state_peers.update(table)
                source.call("peers", table)
                SEED[kind_name](src_ns, n)
                exported, export_s = source.call("probe")
                directory.migrating(migration)
                source.call("expect", migration)
                started, cpu = time.perf_counter(), time.process_time()
                src_cpu = source.call("cpu") if separate else 0.0
                pre = dst.run("state_precopy", migration, Phase.PREPARE, Role.DESTINATION)
                precopy_ms = (time.perf_counter() - started) * 1000.0
                precopy_cpu = (time.process_time() - cpu) * 1000.0
                if separate:
                    precopy_cpu += (source.call("cpu") - src_cpu) * 1000.0
                changed = CHURN[kind_name](src_ns, n, churn)
                source.call("settle", migration.id, changed)
                cpu = time.process_time()
                pause_ms, pause_cpu, notes = source.call("delta", migration)
                if separate:
                    pause_cpu += (time.process_time() - cpu) * 1000.0
                exact = vm_state(src_ns, kind_name) == vm_state(dst_ns, kind_name)
                source.call("forget", migration.id)
                dst.state.revert_imports(migration)
                dst.state.forget(migration.id)
            finally:
                dst.close()
        finally:
            source.stop()
            directory.done(migration)
    answer = pre.notes["kinds"][kind_name]
    check_s = float(pre.notes["check_ms"]) / 1000.0
    install_s = float(answer["import_ms"]) / 1000.0
    moved = notes["kinds"][kind_name]
    return {
        "kind": kind_name,
        "entries": exported,
        "churn": f"{churn:g}% ({changed})",
        "precopy_ms": precopy_ms,
        "precopy_cpu": precopy_cpu,
        "pause_ms": pause_ms,
        "pause_cpu": pause_cpu,
        "delta": moved["entries"],
        "delta_bytes": notes["bytes"],
        "mode": moved.get("delta", {}).get("mode", "-"),
        "exact": exact,
        "move_ms": precopy_ms + pause_ms,
        "export_rate": exported / export_s if export_s else 0,
        "import_rate": answer["entries"] / (check_s + install_s) if check_s + install_s else 0,
        "install_rate": answer["entries"] / install_s if install_s else 0,
    }


def baseline(directory: Directory) -> dict[str, float]:
    """The pause of the SWITCHOVER stage without state: no kinds; kinds, no entries."""
    prefix = f"vmmst{os.getpid() % 10000:04d}{secrets.token_hex(2)}"
    out = {}
    with namespaces(prefix) as (src_ns, dst_ns):
        for i, (label, names) in enumerate(
            (("no state kinds", []), ("idle VM", ["conntrack", "nft_sets"]))
        ):
            migration = Migration(f"bench-{prefix}-{i}", VM, "src", "dst")
            with host_configs(directory, {"src": src_ns, "dst": dst_ns}, names) as files:
                src, dst = Host(files["src"]), Host(files["dst"])
                try:
                    table = {"src": src.url, "dst": dst.url}
                    src.assembly.state_peers.update(table)
                    dst.assembly.state_peers.update(table)
                    directory.migrating(migration)
                    src.state.expect(migration)
                    dst.run("state_precopy", migration, Phase.PREPARE, Role.DESTINATION)
                    started = time.perf_counter()
                    src.run("state_delta", migration, Phase.SWITCHOVER, Role.SOURCE)
                    out[label] = (time.perf_counter() - started) * 1000.0
                    src.state.forget(migration.id)
                    dst.state.revert_imports(migration)
                finally:
                    src.close()
                    dst.close()
                    directory.done(migration)
    return out


def rates(conf: cfg.ConfigOpts, n: int) -> dict[str, tuple[float, float]]:
    """The conntrack kind's own rates at ``n`` sessions, without transport:
    export (dump, decode, JSON-able entries), check, import (into an empty
    table) and import replacing (every entry exists). Per step: entries per
    second of wall time and of this process's CPU time."""
    prefix = f"vmmst{os.getpid() % 10000:04d}{secrets.token_hex(2)}"
    out: dict[str, tuple[float, float]] = {}

    def timed(name: str, work: Callable[[], Any]) -> Any:
        wall, cpu = time.perf_counter(), time.process_time()
        result = work()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        out[name] = (n / wall, n / cpu if cpu else 0.0)
        return result

    with namespaces(prefix) as (src_ns, dst_ns):
        kind = registry.load_kinds(conf, ["conntrack"])["conntrack"]
        seed_sessions(src_ns, n)
        src = KindContext(src_ns, VM.vifs, "rates")
        dst = KindContext(dst_ns, VM.vifs, "rates")
        entries = timed("export", lambda: list(kind.export(src)))

        def check() -> None:
            with no_gc():  # as the importer runs it
                for entry in entries:
                    kind.check(dst, entry)

        timed("check", check)
        result = timed("import", lambda: kind.import_(dst, entries))
        if not result.ok:
            raise RuntimeError(f"import failed: {result.detail}")
        again = [dict(e) for e in entries]  # checked first, as the importer does (untimed,
        with no_gc():  # like the check of the first import): the parse is check's work
            for entry in again:
                kind.check(dst, entry)
        timed("import (replace)", lambda: kind.import_(dst, again))
        kind.forget("rates")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else "")
    parser.add_argument("--sessions", default="1000,10000,100000", help="conntrack sizes")
    parser.add_argument("--churn", default="0,1,10", help="percent of entries changing")
    parser.add_argument("--elements", default="1000", help="nft set element sizes")
    parser.add_argument(
        "--one-process",
        action="store_true",
        help="run the source's service in this process too (default: its own process, "
        "as on a real source host)",
    )
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("run as root: the benchmark builds network namespaces", file=sys.stderr)
        return 2
    conf = options.new_conf()  # for the kind's own rates only
    directory = Directory()
    separate = not args.one_process
    churns = [float(c) for c in args.churn.split(",") if c]
    cases = [("conntrack", int(n), c) for n in args.sessions.split(",") if n for c in churns]
    cases += [("nft_sets", int(n), c) for n in args.elements.split(",") if n for c in churns]
    try:
        run_case(directory, "conntrack", 100, 1, separate)  # warm-up: imports, libnftables
        load = os.getloadavg()[0]
        rows = []
        for kind_name, n, churn in cases:
            print(f"-- {kind_name}: {n} entries, {churn:g}% churn ...", flush=True)
            rows.append(run_case(directory, kind_name, n, churn, separate))
        base = baseline(directory)
    finally:
        directory.close()
    top = max((n for kind_name, n, _c in cases if kind_name == "conntrack"), default=0)
    measured = rates(conf, top) if top else {}
    print()
    print(
        format_table(
            rows,
            [
                ("kind", "kind"),
                ("entries", "entries"),
                ("churn", "churn"),
                ("precopy_ms", "pre-copy ms"),
                ("precopy_cpu", "(cpu)"),
                ("pause_ms", "pause ms"),
                ("pause_cpu", "(cpu)"),
                ("delta", "delta"),
                ("delta_bytes", "delta bytes"),
                ("mode", "mode"),
                ("exact", "exact"),
                ("move_ms", "move ms"),
                ("export_rate", "export/s", ".0f"),
                ("import_rate", "import/s", ".0f"),
                ("install_rate", "install/s", ".0f"),
            ],
        )
    )
    print()
    print(
        "no-state baseline (pause ms of the same SWITCHOVER stage): "
        + ", ".join(f"{label} {ms:.1f}" for label, ms in base.items())
    )
    if measured:
        print(
            f"conntrack kind at {top} sessions, entries/s wall (cpu): "
            + ", ".join(f"{k} {w:,.0f} ({c:,.0f})" for k, (w, c) in measured.items())
        )
    print(
        f"load average {load:.2f} at the start, {os.getloadavg()[0]:.2f} at the end "
        f"({os.cpu_count()} cores; the hosts "
        + ("in one process" if not separate else "in two processes")
        + ")"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
