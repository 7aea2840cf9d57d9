"""Errors that carry a message an operator can act on.

Every error the command line shows is a VmmError: ``str(err)`` says what is
wrong and, where there is one, what to do about it.
"""

from __future__ import annotations


class VmmError(Exception):
    """Base of all orchestrator errors; ``hint`` says what to do."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class ConfigError(VmmError):
    """The configuration is missing or holds a bad value."""


class TransientError(VmmError):
    """A failure worth retrying (a timeout, a busy peer, a lost connection)."""


class StageFailed(VmmError):
    """A stage failed for good (after its retries, or past its deadline)."""


class UnknownWorkload(VmmError):
    """No workload (VM) of that name is known here."""
