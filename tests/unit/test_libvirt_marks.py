"""The incoming-migration marks the hook relay's shell front tests (vmm_libvirt.marks)."""

from __future__ import annotations

from pathlib import Path

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
