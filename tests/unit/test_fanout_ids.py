"""check_nve_ids checks a thousand ids in one match (the orchestrator's wait for a move's
acks names every peer) and refuses exactly what checking each id refuses."""

from __future__ import annotations

import pytest

from vmm_orchestrator.nva.errors import BadRequest
from vmm_orchestrator.nva.store import check_nve_id, check_nve_ids

CASES = [
    [],
    ["a"],
    ["a", "b", "a"],
    [f"peer{i:04d}" for i in range(1000)],
    ["a.b:c@d-e_f", "A9"],
    ["a" * 255, "b"],
    ["a" * 256],
    ["a", ""],
    ["a,b"],
    ["x", "y,"],
    ["-a"],
    ["a b"],
    ["ok", 3],
    ["a\n"],
]


def _one_by_one(values: list[object]) -> list[str] | None:
    try:
        return list(dict.fromkeys(check_nve_id(v, "nves") for v in values))
    except BadRequest:
        return None


@pytest.mark.parametrize("values", CASES, ids=lambda v: repr(v)[:30])
def test_the_ids_are_checked_as_one_by_one(values: list[object]) -> None:
    expected = _one_by_one(values)
    if expected is None:
        with pytest.raises(BadRequest):
            check_nve_ids(values)
    else:
        assert check_nve_ids(values) == expected
