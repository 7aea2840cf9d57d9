"""libnftables keeps process-wide state it does not guard (vmm_kernel.nft's
docstring), so no two calls into it may overlap, even on two contexts."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from vmm_kernel import nft


class FakeLibrary:
    """Records how many calls into the library overlap at most."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.inside = 0
        self.most = 0
        self.contexts = 0

    def _enter(self) -> None:
        with self._lock:
            self.inside += 1
            self.most = max(self.most, self.inside)

    def _leave(self) -> None:
        with self._lock:
            self.inside -= 1

    def nft_ctx_new(self, flags: int) -> int:
        self.contexts += 1
        return 1000 + self.contexts

    def nft_ctx_buffer_output(self, ctx: int) -> None: ...

    def nft_ctx_buffer_error(self, ctx: int) -> None: ...

    def nft_ctx_output_set_flags(self, ctx: int, flags: int) -> None: ...

    def nft_run_cmd_from_buffer(self, ctx: int, text: bytes) -> int:
        self._enter()
        time.sleep(0.002)  # long enough for another thread to come in, were it let
        self._leave()
        return 0

    def nft_ctx_get_output_buffer(self, ctx: int) -> bytes:
        return b""

    def nft_ctx_get_error_buffer(self, ctx: int) -> bytes:
        return b""


@pytest.fixture
def library(monkeypatch: pytest.MonkeyPatch) -> FakeLibrary:
    fake = FakeLibrary()
    monkeypatch.setattr(nft.Nft, "_lib", fake)
    monkeypatch.setattr(nft.Nft, "_contexts", {})
    return fake


def test_calls_on_two_contexts_never_overlap(library: Any) -> None:
    # The host's namespace's text and JSON contexts: two contexts, used from 8 threads.
    def work(json_output: bool) -> None:
        for _ in range(20):
            nft.nft(None, "list ruleset", json_output=json_output)

    threads = [threading.Thread(target=work, args=(i % 2 == 0,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert library.contexts == 2
    assert library.most == 1
