"""Commit a move, wait for the NVEs' acknowledgements, expire the laggards.

The one implementation every caller uses (the ``peer_update`` stage, the
``migrate-with-network`` command): after a commit at ``revision``, wait at
most ``timeout`` for every NVE of the VN to acknowledge it, note per NVE the
milliseconds from the commit to its acknowledgement, and tell each NVE that
did not acknowledge in time to expire its entry for the MAC, so it asks the
directory again instead of trusting a cache that may never refresh.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable
from typing import Any

LOG = logging.getLogger(__name__)


@dataclasses.dataclass
class Convergence:
    """What the NVEs of one VN made of one commit."""

    revision: int
    #: NVE id -> ms from the commit to its acknowledgement.
    acked_ms: dict[str, float]
    #: NVEs that had not acknowledged when the wait ended (told to expire).
    laggards: list[str]

    def acked(self, nve: str) -> bool:
        return nve in self.acked_ms


def await_acks(
    directory: Any,
    vni: int,
    mac: str,
    revision: int,
    committed_at: float,
    timeout: float,
    *,
    expire: bool = True,
    exempt: Iterable[str] = (),
) -> Convergence:
    """Wait for acknowledgements of ``revision`` in VN ``vni``; expire laggards.

    ``committed_at`` is the directory's wall time of the commit; ``exempt``
    NVEs are never told to expire (a destination whose own lag is an error
    the caller reports, rather than a cache to flush).
    """
    acks = directory.acks(vni, revision, timeout=max(0.0, timeout))
    acked_ms: dict[str, float] = {}
    laggards: list[str] = []
    for nve_id, ack in sorted(acks.items()):
        if int(ack.get("acked_revision") or 0) >= revision and ack.get("acked_at"):
            acked_ms[nve_id] = max(0.0, (float(ack["acked_at"]) - committed_at) * 1000.0)
        else:
            laggards.append(nve_id)
    late = [n for n in laggards if n not in set(exempt)]
    if expire and late:
        LOG.warning(
            "%s did not apply revision %d for %s within %.2fs; expiring",
            ", ".join(late),
            revision,
            mac,
            timeout,
        )
        directory.expire(vni, mac, late)
    return Convergence(revision, acked_ms, laggards)
