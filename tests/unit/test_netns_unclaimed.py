"""vmm_kernel.netns.drop_unclaimed / lean_iproute: a pyroute2 handle's lookups
leave nothing behind, and it reads 64 KiB at a time instead of 256 KiB.

pyroute2 0.9 files the kernel's ACK of each ``get`` request with the
multicast events, a queue our handles never read: the soak's RSS grew by
what those messages pinned (benchmarks/soak.py; 0.9.7 kept one per lookup).
No test asserts that library behaviour: setup.py takes any pyroute2 >= 0.9,
and a release that fixes it must not fail the suite. Loopback lookups in the
test's own namespace need no privileges.
"""

from __future__ import annotations

from typing import Any

import pytest

from vmm_kernel.netns import NETLINK_READ, drop_unclaimed, lean_iproute

pyroute2 = pytest.importorskip("pyroute2")


def _unread(ipr: Any) -> int:
    return int(ipr.asyncore.msg_queue.root.qsize())


def _lookups(ipr: Any, n: int) -> list[int]:
    found = []
    for _ in range(n):
        found += ipr.link_lookup(ifname="lo")
        found += [link["index"] for link in ipr.get_links(1)]
    return found


def test_dropping_handle_keeps_nothing_and_still_answers() -> None:
    with pyroute2.IPRoute() as ipr:
        assert drop_unclaimed(ipr) is ipr
        found = _lookups(ipr, 50)
        assert found == [1] * 100  # every lookup still answered (lo is 1)
        assert _unread(ipr) == 0
        assert ipr.link_lookup(ifname="no-such-device-x") == []  # errors still reach the caller


def test_other_handles_are_returned_unchanged() -> None:
    class Other:
        pass

    other = Other()
    assert drop_unclaimed(other) is other


def test_lean_handle_reads_64_kib_at_a_time_and_answers_dumps() -> None:
    with pyroute2.IPRoute() as ipr:
        assert ipr.asyncore.local.transport.max_size == 256 * 1024  # asyncio's default
        assert lean_iproute(ipr) is ipr
        assert ipr.asyncore.local.transport.max_size == NETLINK_READ == 64 * 1024
        names = [link.get_attr("IFLA_IFNAME") for link in ipr.get_links()]  # a dump
        assert "lo" in names
        _lookups(ipr, 10)
        assert _unread(ipr) == 0
