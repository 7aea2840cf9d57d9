"""The incoming-migration marks the hook relay's shell front tests (vmm_libvirt.marks)."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from vmm_libvirt.marks import IncomingMarks, marks_dir


def test_a_guest_is_marked_until_its_migration_ends(tmp_path: Path) -> None:
    marks = IncomingMarks(str(tmp_path / "hook.sock"))
    assert marks_dir(str(tmp_path / "hook.sock")) == str(tmp_path / "hook.sock.incoming")
    marks.mark("m-1", "vm1")  # not open: the relay forwards everything, nothing to write
    assert not (tmp_path / "hook.sock.incoming").exists()
    marks.open()
    marks.mark("m-1", "vm1")
    marks.mark("m-2", "vm2")
    assert marks.marked() == ["vm1", "vm2"]
    marks.unmark("m-1")
    marks.unmark("m-unknown")
    assert marks.marked() == ["vm2"]
    marks.close()
    assert not (tmp_path / "hook.sock.incoming").exists()


def test_a_guest_stays_marked_while_another_of_its_migrations_is_under_way(
    tmp_path: Path,
) -> None:
    """A vetoed attempt and the next one of the same guest: the first one's end keeps
    the mark of the second."""
    marks = IncomingMarks(str(tmp_path / "hook.sock"))
    marks.open()
    marks.mark("m-1", "vm1")
    marks.mark("m-2", "vm1")
    marks.unmark("m-1")
    assert marks.marked() == ["vm1"]
    marks.unmark("m-2")
    assert marks.marked() == []


def test_open_drops_a_previous_process_marks_and_names_that_are_no_file_are_skipped(
    tmp_path: Path,
) -> None:
    stale = tmp_path / "hook.sock.incoming"
    stale.mkdir()
    (stale / "vm-old").touch()
    marks = IncomingMarks(str(tmp_path / "hook.sock"))
    marks.open()
    assert marks.marked() == []
    for name in ("../escape", "", ".", ".."):
        marks.mark("m-x", name)
    assert marks.marked() == [] and not (tmp_path / "escape").exists()


def test_marks_that_cannot_be_kept_leave_no_directory_so_the_relay_forwards_all(
    tmp_path: Path,
) -> None:
    """A directory the agent cannot make its own (here a symlink to elsewhere), or a
    mark it cannot write: no directory is left, and the relay forwards every call
    instead of dropping a marked guest's."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "hook.sock.incoming").symlink_to(elsewhere)
    marks = IncomingMarks(str(tmp_path / "hook.sock"))
    marks.open()
    assert not (tmp_path / "hook.sock.incoming").is_symlink()
    assert (tmp_path / "hook.sock.incoming").is_dir() and elsewhere.is_dir()
    marks.mark("m-1", "v" * 300)  # longer than a file name may be
    assert not os.path.lexists(tmp_path / "hook.sock.incoming")
    marks.mark("m-2", "vm2")  # given up: nothing is written any more
    assert not os.path.lexists(tmp_path / "hook.sock.incoming")


def test_the_end_of_one_attempt_never_removes_the_next_ones_mark(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Attempt m-1's ABORTED (a pipeline thread) and m-2's migrate begin (the hook's
    thread) for the same guest: m-2 marks while m-1 unmarks."""
    marks = IncomingMarks(str(tmp_path / "hook.sock"))
    marks.open()
    marks.mark("m-1", "vm1")
    real_unlink = os.unlink
    racing = threading.Thread(target=marks.mark, args=("m-2", "vm1"))

    def unlink_while_marking(path: str) -> None:
        racing.start()
        racing.join(0.2)  # blocked on the lock, if unmark holds it
        real_unlink(path)

    monkeypatch.setattr(os, "unlink", unlink_while_marking)
    marks.unmark("m-1")
    racing.join(5)
    assert marks.marked() == ["vm1"]
