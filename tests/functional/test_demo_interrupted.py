"""Ctrl-C anywhere in `vmm lab demo` leaves nothing behind (issue 13 item 7).

The demo runs as the operator runs it (the `vmm` command, SIGINT as a
terminal sends it) and is interrupted at moments read from its own output:
while the first mode's lab is being built, while its probes run, and while
the second mode runs. Afterwards no namespace, work folder or process of
the run's prefix may remain. Whatever a failing run leaves is removed with
`vmm lab cleanup` in the finalizer.
"""

from __future__ import annotations

import glob
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.functional

VMM = str(Path(sys.executable).parent / "vmm")
PREFIX_RE = re.compile(r"lab prefix (vmm[0-9a-f]+)[a-z]\)")


def leftovers(run_prefix: str) -> list[str]:
    names = os.listdir("/run/netns") if os.path.isdir("/run/netns") else []
    found = [f"netns {n}" for n in names if n.startswith(run_prefix)]
    found += [f"folder {d}" for d in glob.glob(f"/tmp/{run_prefix}*") if os.path.isdir(d)]
    procs = subprocess.run(["pgrep", "-f", run_prefix], capture_output=True, text=True)
    found += [f"process {p}" for p in procs.stdout.split()]
    return found


@pytest.mark.parametrize(
    ("marker", "after_s"),
    [
        ("running mode 'none'", 0.3),  # the lab being built
        ("ready", 1.0),  # probes running, before the migration
        ("running mode 'orchestrated'", 2.0),  # the second mode's migration
    ],
    ids=["building", "probing", "second-mode"],
)
def test_ctrl_c_leaves_nothing(marker: str, after_s: float) -> None:
    proc = subprocess.Popen(
        [VMM, "lab", "demo", "--modes", "none,orchestrated"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    run_prefix = None
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            found = PREFIX_RE.search(line)
            if found:
                run_prefix = found.group(1)
            if marker in line:
                break
        assert run_prefix is not None, "the demo printed no lab prefix"
        time.sleep(after_s)
        assert proc.poll() is None, "the demo ended before it could be interrupted"
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=90)
        assert proc.returncode == 130, out
        assert "interrupted" in out
        assert leftovers(run_prefix) == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if run_prefix is not None:
            subprocess.run([VMM, "lab", "cleanup", run_prefix], capture_output=True, check=False)
