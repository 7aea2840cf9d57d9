"""vmm_state's ruleset-generation reader: one socket per migration, and a
generation that every committed nftables transaction raises (the
dhcp_snooping kind's "did anything change?" check inside the pause)."""

from __future__ import annotations

import os
import subprocess

import pytest

from vmm_state.kinds._watch import GenerationReader

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (namespaces)")


def nft(netns: str, *args: str) -> None:
    subprocess.run(["ip", "netns", "exec", netns, "nft", *args], check=True)


def test_one_socket_answers_each_generation_as_transactions_commit(netns: str) -> None:
    reader = GenerationReader(netns)
    try:
        first = reader.read()
        sock = reader._sock
        assert sock is not None
        assert reader.read() == first  # nothing committed: the same generation
        nft(netns, "add", "table", "inet", "snoop")
        second = reader.read()
        assert second > first
        nft(netns, "add", "set", "inet", "snoop", "b", "{ type ipv4_addr; }")
        assert reader.read() > second
        assert reader._sock is sock  # one socket for every question
        reader.close()
        assert reader._sock is None
        assert reader.read() > second  # opened again when asked again
    finally:
        reader.close()
