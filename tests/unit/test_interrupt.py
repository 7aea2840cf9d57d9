"""Ctrl-C never lands inside logging's fork hooks (vmm_orchestrator.interrupt).

A KeyboardInterrupt raised at the entry of ``logging._releaseLock`` (run
after every fork in the parent) leaves logging's module lock held and every
thread that logs blocks: a `vmm lab demo` interrupted while pyroute2 forked
hung so in CI. These tests drive the handler with a real hook frame and with
real forks.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from types import FrameType

import pytest

from vmm_orchestrator import interrupt


def _release_lock_frame() -> FrameType:
    """A live frame of logging._releaseLock, caught by a profile hook."""
    caught: list[FrameType] = []

    def profile(frame: FrameType, event: str, _arg: object) -> None:
        if event == "call" and frame.f_code.co_name == "_releaseLock":
            caught.append(frame)

    logging._acquireLock()  # type: ignore[attr-defined]
    sys.setprofile(profile)
    try:
        logging._releaseLock()  # type: ignore[attr-defined]
    finally:
        sys.setprofile(None)
    assert caught, "logging._releaseLock was not called"
    return caught[0]


@pytest.fixture
def handler_installed():
    """The handler on SIGINT, as `vmm` installs it, and on SIGALRM (the kernel's timer
    sends that one: a signal from a Python thread would wait for the GIL, which the
    main thread holds across fork(), and never land inside a fork hook)."""
    with interrupt.installed(signal.SIGINT, signal.SIGALRM):
        yield
        signal.setitimer(signal.ITIMER_REAL, 0)


@pytest.mark.skipif(sys.version_info >= (3, 13), reason="logging's fork hooks were renamed in 3.13")
def test_a_signal_inside_the_fork_hook_is_delivered_again_after_it(handler_installed) -> None:
    frame = _release_lock_frame()
    assert interrupt.in_fork_hook(frame)
    returned = False
    with pytest.raises(KeyboardInterrupt):
        # Inside the hook: no exception now ...
        interrupt.raise_keyboard_interrupt(signal.SIGINT, frame)
        returned = True
        # ... but the interrupt arrives a moment later, in the main thread.
        time.sleep(5)
    assert returned


def test_a_signal_elsewhere_interrupts_at_once() -> None:
    with pytest.raises(KeyboardInterrupt):
        interrupt.raise_keyboard_interrupt(signal.SIGINT, sys._getframe())
    assert not interrupt.in_fork_hook(None)


def _logging_lock_is_free() -> bool:
    """Whether another thread can take logging's lock (an RLock: the main thread always can)."""
    taken: list[bool] = []

    def probe() -> None:
        taken.append(logging._lock.acquire(timeout=1))  # type: ignore[attr-defined]
        if taken[0]:
            logging._lock.release()  # type: ignore[attr-defined]

    thread = threading.Thread(target=probe)
    thread.start()
    thread.join()
    return taken[0]


def test_ctrl_c_during_forks_is_never_lost_nor_leaves_logging_locked(handler_installed) -> None:
    """Forks in the main thread, a signal at varying moments: every one interrupts.

    With Python's default handler most such interrupts land in ``_releaseLock``
    and are swallowed as "Exception ignored" (the fork loop goes on as if no
    Ctrl-C came), and logging's lock stays held. The ballast makes each fork
    take long enough for the signal to land inside it often.
    """
    ballast = bytearray(400 * 1024 * 1024)
    lost = []
    for attempt in range(100):
        try:
            signal.setitimer(signal.ITIMER_REAL, 0.0001 + 0.0002 * (attempt % 20))
            deadline = time.monotonic() + 1
            while time.monotonic() < deadline:
                pid = os.fork()
                if pid == 0:
                    os._exit(0)
                os.waitpid(pid, 0)
            lost.append(attempt)
        except KeyboardInterrupt:
            pass
        assert _logging_lock_is_free(), f"logging's lock left held after interrupt {attempt}"
    del ballast
    assert lost == [], f"interrupts swallowed in a fork hook: {lost}"
