"""Bounded memory for state uploads (issue 13 item 5): four large bundles
uploaded at once to one host's state service. A bundle is held until its
signature (at its end) verifies, so the cap on concurrent imports ([state]
max_concurrent_imports) is what bounds the memory: with a cap of 1 the
service's peak RSS grows by about one import, with a cap of 4 (what the
service did before: no cap) by about four.

The service runs in a child process so that its peak RSS (VmHWM) is its
own; the test prints both figures.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import requests

from vmm_orchestrator.model import Migration, Vif, Workload
from vmm_state.bundle import BundleHeader, SectionSource, write_bundle
from vmm_state.wire import encode_migration

KEY = b"memory-key-0123456789abcdef"
TOKEN = "memory-token"
VIF = Vif("52:54:00:00:00:01", 100, ("10.0.0.1",), (), "tap-vm1")
UPLOADS = 4
ENTRIES = 36_000  # about 40 MB a bundle
PAD = "x" * 1000

CHILD = r"""
import json, sys, time
from typing import Any
from oslo_config import cfg
from vmm_orchestrator.model import Migration, Vif, Workload
from vmm_orchestrator.statekind import ImportResult, StateKind
from vmm_state.service import StateHost, StateSettings

class Sink(StateKind):
    name = "fake"
    def export(self, ctx, since=None):
        return iter(())
    def check(self, ctx, entry):
        pass
    def import_(self, ctx, entries):
        return ImportResult.success(self.name, len(entries), {})
    def revert_import(self, ctx, record):
        pass
    def cleanup_source(self, ctx):
        pass

cap, key, token, uploads = int(sys.argv[1]), sys.argv[2].encode(), sys.argv[3], int(sys.argv[4])
conf = cfg.ConfigOpts()
conf(args=[], default_config_files=[])
settings = StateSettings(key_id="k1", key=key, verify_keys={"k1": key}, token=token,
                         bind_port=0, max_bundle_bytes=256 * 1024 * 1024,
                         max_concurrent_imports=cap)
host = StateHost("h2", None, {"fake": Sink(conf)}, settings)
vif = Vif("52:54:00:00:00:01", 100, ("10.0.0.1",), (), "tap-vm1")
for i in range(uploads):
    host.expect(Migration(f"m-{i}", Workload("vm1", (vif,)), "h1", "h2"))
host.start()
print(json.dumps({"url": host.url}), flush=True)
sys.stdin.read()
host.stop()
"""


def status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of ``pid`` in bytes."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            out[name] = int(value.split()[0]) * 1024
    return out


def bundle(migration: Migration) -> Iterator[bytes]:
    header = BundleHeader(migration.id, "vm1", "h1", "delta", exported_at=time.time(), seq=1)
    entries = ({"mac": VIF.mac, "n": n, "pad": PAD} for n in range(ENTRIES))
    yield from write_bundle(header, "k1", KEY, [SectionSource("fake", entries)])


def peak_growth(cap: int) -> tuple[int, int, int]:
    """(peak RSS growth of the service over 4 concurrent uploads, bytes of one bundle, 503s)."""
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(cap), KEY.decode(), TOKEN, str(UPLOADS)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        url = json.loads(child.stdout.readline())["url"]
        base = status(child.pid)["VmRSS"]
        size = sum(len(p) for p in bundle(Migration("m-0", Workload("vm1", (VIF,)), "h1", "h2")))
        busy: list[int] = []
        answers: list[bool] = []
        start = threading.Barrier(UPLOADS)

        def upload(i: int) -> None:
            migration = Migration(f"m-{i}", Workload("vm1", (VIF,)), "h1", "h2")
            headers = {"X-Auth-Token": TOKEN, "X-Vmm-Migration": encode_migration(migration)}
            start.wait()
            for _ in range(600):
                try:
                    answer = requests.post(
                        f"{url}/v1/state/{migration.id}",
                        params={"label": "delta"},
                        data=bundle(migration),
                        headers=headers,
                        timeout=120,
                    )
                except requests.ConnectionError:  # refused (503) and cut while still sending
                    busy.append(i)
                    time.sleep(0.1)
                    continue
                if answer.status_code == 503:
                    busy.append(i)
                    time.sleep(0.1)
                    continue
                answers.append(answer.status_code == 200 and answer.json()["ok"])
                return

        threads = [threading.Thread(target=upload, args=(i,)) for i in range(UPLOADS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert answers == [True] * UPLOADS
        return status(child.pid)["VmHWM"] - base, size, len(busy)
    finally:
        if child.stdin is not None:
            child.stdin.close()
        child.wait(timeout=30)


def test_the_import_cap_bounds_the_memory_of_concurrent_uploads() -> None:
    capped, size, refused = peak_growth(1)
    uncapped, _, _ = peak_growth(UPLOADS)
    mb = 1024 * 1024
    print(
        f"\n{UPLOADS} concurrent uploads of {size / mb:.0f} MB: service peak RSS growth "
        f"{capped / mb:.0f} MB with max_concurrent_imports=1 ({refused} uploads answered 503 "
        f"and retried), {uncapped / mb:.0f} MB with max_concurrent_imports={UPLOADS} (no cap)"
    )
    assert refused >= UPLOADS - 1
    # one import at a time: its raw bytes plus the parsed entries, never four
    assert capped < 3.5 * size, (capped, size)
    assert uncapped > 1.5 * capped, (uncapped, capped)  # the cap is what made the difference
