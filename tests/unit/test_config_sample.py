"""The committed sample config is what oslo-config-generator makes today, and documents
every option.

Regenerate it with the command in REGENERATE (from the repository root)
whenever an option, its default or its help changes.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from oslo_config import cfg

from vmm_linux import opts as linux_opts
from vmm_orchestrator import opts as core_opts

ROOT = Path(__file__).resolve().parents[2]
GENERATOR_CONF = "etc/vmm-orchestrator/config-generator.conf"
SAMPLE = ROOT / "etc/vmm-orchestrator/vmm-orchestrator.conf.sample"
GENERATOR = Path(sys.executable).parent / "oslo-config-generator"
REGENERATE = f".venv/bin/oslo-config-generator --config-file {GENERATOR_CONF}"

_OPTION_LINE = re.compile(r"^#(?P<name>[A-Za-z0-9_-]+) =(?: |$)")
_TYPE_ONLY = re.compile(r"^# \([a-z ]+ value\)$")


def options_without_help(sample: str) -> list[str]:
    """``[group] name`` of each option whose comment block in ``sample`` has no help text.

    oslo-config-generator writes an option as a comment block: the help text,
    then ``(<type> value)``, constraints, and ``#name = default``. Without
    help the block starts right away with ``# (<type> value)``.
    """
    missing = []
    group = "DEFAULT"
    block: list[str] = []
    for line in sample.splitlines():
        if line.startswith("[") and line.endswith("]"):
            group, block = line[1:-1], []
            continue
        if not line.strip():
            block = []
            continue
        found = _OPTION_LINE.match(line)
        if found:
            if not block or _TYPE_ONLY.match(block[0]):
                missing.append(f"[{group}] {found.group('name')}")
            block = []
            continue
        block.append(line)
    return missing


def all_opts() -> list[tuple[str, cfg.Opt]]:
    return [
        (group, opt)
        for group, opts in [*core_opts.list_opts(), *linux_opts.list_opts()]
        for opt in opts
    ]


def test_sample_config_is_current(tmp_path: Path) -> None:
    out = tmp_path / "vmm-orchestrator.conf.sample"
    res = subprocess.run(
        [str(GENERATOR), "--config-file", GENERATOR_CONF, "--output-file", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, f"oslo-config-generator failed:\n{res.stderr}"
    assert SAMPLE.is_file(), f"sample config is missing: run {REGENERATE}"
    assert out.read_text(encoding="utf-8") == SAMPLE.read_text(encoding="utf-8"), (
        f"sample config is stale: run {REGENERATE}"
    )


def test_every_option_in_the_sample_has_help() -> None:
    sample = SAMPLE.read_text(encoding="utf-8")
    names = [m.group("name") for m in map(_OPTION_LINE.match, sample.splitlines()) if m]
    assert len(names) >= len(all_opts()), "the sample lists fewer options than the code has"
    assert options_without_help(sample) == []


def test_every_option_has_help_in_the_code() -> None:
    empty = [f"[{group}] {opt.name}" for group, opt in all_opts() if not (opt.help or "").strip()]
    assert empty == []


def test_every_option_of_the_code_is_in_the_sample() -> None:
    sample = SAMPLE.read_text(encoding="utf-8")
    absent = [
        f"[{group}] {opt.dest}"
        for group, opt in all_opts()
        if not re.search(
            rf"^\[{re.escape(group)}\]$(?:(?!^\[).)*?^#{opt.dest} =(?: |$)", sample, re.M | re.S
        )
    ]
    assert absent == []


@pytest.mark.parametrize(
    ("sample", "expected"),
    [
        ("[g]\n\n# Some help. (string value)\n#a = x\n", []),
        ("[g]\n\n# (string value)\n#a = x\n", ["[g] a"]),
        ("[g]\n\n#a = x\n", ["[g] a"]),
        (
            "[g]\n\n# Help. (integer value)\n# Minimum value: 1\n#a = 2\n\n# (list value)\n#b =\n",
            ["[g] b"],
        ),
    ],
    ids=["with-help", "type-only", "nothing", "second-of-two"],
)
def test_the_help_check_finds_options_without_help(sample: str, expected: list[str]) -> None:
    assert options_without_help(sample) == expected
