"""How long moving a VM's firewall state takes, and how much of it falls
inside the VM's pause.

Two host namespaces (source, destination) with the real kinds and the real
framework: each host runs its state service (HTTP on loopback, as the
orchestrators do in the lab), the source's kernel holds N sessions
(conntrack) or N set elements (nftables blacklist) of one VM, and the
pipeline's own stages move them:

* pre-copy: ``state_precopy`` at PREPARE (VM still running): the
  destination pulls a signed bundle streamed from the source's export,
  verifies it, checks every entry and installs them;
* delta: ``state_delta`` at SWITCHOVER (VM paused): the source exports what
  changed since the pre-copy and pushes it; the destination installs it
  before answering. This stage's duration is the part inside the pause.

Columns: ``export ms`` is the kind dumping the source table, measured on its
own beforehand; ``transfer ms`` is the pre-copy's wall time minus the
destination's check and install (so: the export again, streamed, plus
encoding, signing, HTTP and verification); ``import ms`` is the
destination's ``kind.check`` pass (shown in brackets) plus the install; ``pause ms`` is the
delta stage's wall time and ``pause entries`` what it carried (a kind
without change times sends everything again, inside the pause).

Run as root:  .venv/bin/python benchmarks/state_transfer.py
   (``--sessions 1000,10000,100000 --elements 10000``; ``--kinds`` picks the
   state kinds by entry point name, falling back to the classes in
   plugins/vmm_state/kinds when the entry points are not installed yet)
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import ipaddress
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

from oslo_config import cfg

from vmm_lab.linux.probe import format_table
from vmm_orchestrator.errors import ConfigError
from vmm_orchestrator.model import Migration, Phase, Role, Vif, Workload
from vmm_orchestrator.stage import HostContext, StageContext
from vmm_state import options, registry
from vmm_state.kind import KindContext, StateKind
from vmm_state.service import StateHost, StateSettings
from vmm_state.stages import StateDelta, StatePrecopy

#: Where each kind lives if its entry point is not installed yet.
FALLBACK = {
    "conntrack": "vmm_state.kinds.conntrack:ConntrackKind",
    "nft_sets": "vmm_state.kinds.nftsets:NftSetsKind",
}

VM_V4 = "10.77.0.10"
VIF = Vif("52:54:00:77:00:10", 100, (VM_V4,), ("fd77::10",), "tap-bench")
VM = Workload("bench-vm", (VIF,))
DEADLINE_S = 900.0


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


def load_kind(conf: cfg.ConfigOpts, name: str) -> StateKind:
    try:
        return registry.load_kinds(conf, [name])[name]
    except ConfigError as err:
        if name not in FALLBACK:
            raise
        module, cls = FALLBACK[name].split(":")
        print(f"({name}: {err.message}; using {FALLBACK[name]} directly)", file=sys.stderr)
        kind: StateKind = getattr(importlib.import_module(module), cls)(conf)
        return kind


def peers(n: int) -> Iterator[str]:
    """Distinct peer addresses in 198.18.0.0/15."""
    base = int(ipaddress.ip_address("198.18.0.1"))
    for i in range(n):
        yield str(ipaddress.ip_address(base + i))


def sessions(n: int) -> list[dict[str, Any]]:
    """N established TCP sessions the VM answers (peers -> VM:443), as the kind exports them."""
    out = []
    for i, peer in enumerate(peers((n + 59999) // 60000)):
        for sport in range(1024, 1024 + min(60000, n - i * 60000)):
            out.append(
                {
                    "family": "ipv4",
                    "proto": "tcp",
                    "orig": {"src": peer, "dst": VM_V4, "sport": sport, "dport": 443},
                    "reply": {"src": VM_V4, "dst": peer, "sport": 443, "dport": sport},
                    "timeout": 3600,
                    "status": ["SEEN_REPLY", "ASSURED"],
                    "tcp": {"state": "ESTABLISHED", "wscale_orig": 7, "wscale_reply": 7},
                }
            )
    return out


def elements(n: int) -> list[dict[str, Any]]:
    """N blacklist elements (flooding peer . VM), as the kind exports them."""
    return [
        {
            "family": "inet",
            "table": "vmm_fw",
            "set": "blacklist_v4",
            "key": [peer, VM_V4],
            "timeout": 3600,
            "expires": 3600,
        }
        for peer in peers(n)
    ]


def settings(token: str, key: bytes) -> StateSettings:
    return StateSettings(
        key_id="bench",
        key=key,
        verify_keys={"bench": key},
        token=token,
        bind_port=0,
        max_entries=1_000_000,
        read_timeout=DEADLINE_S,
    )


def context(host: StateHost, migration: Migration, phase: Phase, role: Role) -> StageContext:
    return StageContext(
        migration,
        phase,
        role,
        HostContext(host.name, None, {"state": host}),
        time.monotonic() + DEADLINE_S,
    )


def run_case(conf: cfg.ConfigOpts, kind_name: str, entries: list[dict[str, Any]]) -> dict[str, Any]:
    """Seed the source, then pre-copy and delta through the real stages."""
    prefix = f"vmmst{os.getpid() % 10000:04d}{secrets.token_hex(2)}"
    migration = Migration(f"bench-{prefix}", VM, "src", "dst")
    token, key = secrets.token_urlsafe(16), secrets.token_bytes(32)
    with namespaces(prefix) as (src_ns, dst_ns):
        kind = load_kind(conf, kind_name)
        seeded = kind.import_(KindContext(src_ns, VM.vifs, "seed"), entries)
        if not seeded.ok:
            raise RuntimeError(f"seeding {kind_name} failed: {seeded.reason} {seeded.detail}")
        started = time.perf_counter()
        exported = sum(1 for _ in kind.export(KindContext(src_ns, VM.vifs, migration.id)))
        export_ms = (time.perf_counter() - started) * 1000.0
        table: dict[str, str] = {}
        src = StateHost("src", src_ns, {kind_name: kind}, settings(token, key), table)
        dst = StateHost("dst", dst_ns, {kind_name: kind}, settings(token, key), table)
        with src, dst:
            table.update(src=src.url, dst=dst.url)
            src.expect(migration)
            pre = context(dst, migration, Phase.PREPARE, Role.DESTINATION)
            started = time.perf_counter()
            StatePrecopy(conf).run(pre)
            precopy_ms = (time.perf_counter() - started) * 1000.0
            delta = context(src, migration, Phase.SWITCHOVER, Role.SOURCE)
            started = time.perf_counter()
            StateDelta(conf).run(delta)
            pause_ms = (time.perf_counter() - started) * 1000.0
            dst.revert_imports(migration)
    answer = pre.notes["kinds"][kind_name]
    check_ms = float(pre.notes["check_ms"])
    install_ms = float(answer["import_ms"])
    return {
        "kind": kind_name,
        "entries": exported,
        "bytes": pre.notes["bytes"],
        "export_ms": f"{export_ms:.1f}",
        "transfer_ms": f"{precopy_ms - check_ms - install_ms:.1f}",
        "import_ms": f"{check_ms + install_ms:.1f} ({check_ms:.0f} check)",
        "precopy_ms": f"{precopy_ms:.1f}",
        "pause_ms": f"{pause_ms:.1f}",
        "pause_entries": delta.notes["kinds"][kind_name]["entries"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else "")
    parser.add_argument("--sessions", default="1000,10000,100000", help="conntrack sizes")
    parser.add_argument("--elements", default="10000", help="nft set element sizes")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("run as root: the benchmark builds network namespaces", file=sys.stderr)
        return 2
    conf = cfg.ConfigOpts()
    conf(args=[], default_config_files=[])
    options.register_opts(conf)
    cases = [("conntrack", int(n)) for n in args.sessions.split(",") if n]
    cases += [("nft_sets", int(n)) for n in args.elements.split(",") if n]
    rows = []
    for kind_name, n in cases:
        print(f"-- {kind_name}: {n} entries ...", flush=True)
        make = sessions if kind_name == "conntrack" else elements
        rows.append(run_case(conf, kind_name, make(n)))
    print()
    print(
        format_table(
            rows,
            [
                ("kind", "kind"),
                ("entries", "entries"),
                ("bytes", "bundle bytes"),
                ("export_ms", "export ms"),
                ("transfer_ms", "transfer ms"),
                ("import_ms", "import ms"),
                ("precopy_ms", "pre-copy ms"),
                ("pause_ms", "in pause ms"),
                ("pause_entries", "in pause entries"),
            ],
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
