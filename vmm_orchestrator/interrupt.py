"""Ctrl-C as KeyboardInterrupt, but never inside logging's fork hooks.

Python's ``logging`` takes its module lock before every ``fork()`` and
releases it afterwards in the parent (``os.register_at_fork``:
``_acquireLock`` / ``_releaseLock``). pyroute2's ``NetNS`` forks a helper
for every namespace socket, so ``vmm lab demo`` forks often from its main
thread. Python's default SIGINT handler raises KeyboardInterrupt at the
next bytecode boundary, which can be the entry of ``_releaseLock``: the
release is skipped ("Exception ignored in: _releaseLock"), the lock stays
held, and every thread that logs afterwards blocks, the cleanup included.
A fresh-clone CI run of ``tests/functional/test_demo_interrupted.py`` hung
exactly so.

The handler here raises KeyboardInterrupt as before, except when the main
thread is inside one of those hooks (or a call made from one): then the
signal is sent again a moment later, when the hook has returned. The hooks are a few bytecodes
long, so the delay only has to outlast them.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType

# The fork hooks that must run whole: (module, function); Python 3.13 renamed them.
_FORK_HOOKS = frozenset(
    ("logging", name) for name in ("_acquireLock", "_releaseLock", "_prepareFork", "_afterFork")
)
# How long a deferred signal waits: far longer than a hook, far shorter than a person.
RETRY_S = 0.02


def in_fork_hook(frame: FrameType | None) -> bool:
    """True when ``frame`` (the interrupted one) or a caller of it is one of logging's
    fork hooks (a second signal can land in this handler's own Timer calls)."""
    while frame is not None:
        if (frame.f_globals.get("__name__"), frame.f_code.co_name) in _FORK_HOOKS:
            return True
        frame = frame.f_back
    return False


def raise_keyboard_interrupt(signum: int, frame: FrameType | None) -> None:
    """A SIGINT/SIGTERM handler: KeyboardInterrupt now, or ``RETRY_S`` later in a fork hook."""
    if in_fork_hook(frame):
        # To the main thread itself, so that a blocking call there wakes with EINTR.
        main = threading.main_thread().ident
        timer = threading.Timer(RETRY_S, signal.pthread_kill, (main, signum))
        timer.daemon = True
        timer.start()
        return
    raise KeyboardInterrupt


@contextlib.contextmanager
def installed(*signums: int) -> Iterator[None]:
    """``signums`` (default SIGINT) handled here for the block, in the main thread
    (elsewhere Python allows no handler); the previous handlers are back afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, raise_keyboard_interrupt) for s in signums or (signal.SIGINT,)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
