"""Cleanup that a Ctrl-C cannot cut short.

A lab removes its namespaces, processes and files in a ``finally``. A
KeyboardInterrupt raised *inside* that ``finally`` (a second Ctrl-C, or the
first one arriving just as the body ended: measured with ``vmm lab demo``
interrupted 14-18 s in, the interrupt landed in the NVE agent's thread join
and every namespace and the work folder stayed behind) would skip the rest
of it. So the cleanup steps run with SIGINT and SIGTERM noted rather than
raised, each step whatever the previous one did, and a signal noted meanwhile
is delivered again once everything is gone.

Python runs signal handlers in the main thread only, and only the main
thread may change them: elsewhere the steps just run in order.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Callable, Iterable, Iterator

LOG = logging.getLogger(__name__)

_HELD = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Note SIGINT/SIGTERM during the block; deliver the first one after it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    noted: list[int] = []

    def note(signum: int, _frame: object) -> None:
        noted.append(signum)

    previous = {sig: signal.signal(sig, note) for sig in _HELD}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if noted:
        signal.raise_signal(noted[0])


def run_steps(steps: Iterable[tuple[str, Callable[[], object]]]) -> None:
    """Run every ``(what, step)`` with signals held; a failing step is logged, not fatal."""
    with signals_held():
        for what, step in steps:
            try:
                step()
            except Exception as exc:  # the next steps must still run
                LOG.warning("cleanup: %s failed: %s", what, exc)
