"""The lab's cleanup steps run to the end however many Ctrl-Cs arrive meanwhile."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator

import pytest

from vmm_lab.cleanup import run_steps, signals_held


@pytest.fixture(autouse=True)
def python_handles_sigint() -> Iterator[None]:
    """Ctrl-C raises KeyboardInterrupt, as in a terminal, whatever this process
    inherited: a test run started in the background of a shell without job
    control has SIGINT ignored, and Python then installs no handler."""
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, inherited)


def test_an_interrupt_during_cleanup_is_delivered_after_every_step_ran() -> None:
    ran: list[str] = []

    def first() -> None:
        ran.append("first")
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while cleaning up
        ran.append("first, after the signal")

    with pytest.raises(KeyboardInterrupt):
        run_steps([("first", first), ("second", lambda: ran.append("second"))])
    assert ran == ["first", "first, after the signal", "second"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored


def test_a_failing_step_does_not_stop_the_others(caplog: pytest.LogCaptureFixture) -> None:
    ran: list[str] = []

    def broken() -> None:
        raise OSError("device busy")

    run_steps([("broken", broken), ("next", lambda: ran.append("next"))])
    assert ran == ["next"]
    assert "cleanup: broken failed: device busy" in caplog.text


def test_nothing_noted_means_nothing_delivered() -> None:
    with signals_held():
        pass
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
