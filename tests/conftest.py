"""Fixtures shared by every test directory."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from oslo_config import cfg

from vmm_orchestrator import options


@pytest.fixture
def registered_conf() -> cfg.ConfigOpts:
    """A configuration as `vmm` makes one: no files, every installed plugin's options
    registered once from the oslo.config.opts entry points (options.register_all).

    Stages or state kinds a test defines itself are no entry points: register them
    with ``TheirClass.register_opts(conf)``, as the strict loader does at load.
    """
    return options.new_conf()


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


@pytest.fixture
def pki(tmp_path: Path) -> Callable[[str], object]:
    """A CA and, on request, a certificate with CN=<name> for 127.0.0.1 signed by it
    (vmm_state.wire.TlsFiles: certificate, key, CA)."""
    from vmm_state.wire import TlsFiles

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1",
            "-subj", "/CN=test-ca", cwd=tmp_path)  # fmt: skip

    def issue(name: str) -> TlsFiles:
        openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr",
                "-subj", f"/CN={name}", cwd=tmp_path)  # fmt: skip
        (tmp_path / f"{name}.ext").write_text("subjectAltName=IP:127.0.0.1\n")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                "-CAcreateserial", "-out", f"{name}.pem", "-days", "1",
                "-extfile", f"{name}.ext", cwd=tmp_path)  # fmt: skip
        return TlsFiles(
            str(tmp_path / f"{name}.pem"), str(tmp_path / f"{name}.key"), str(tmp_path / "ca.pem")
        )

    return issue
