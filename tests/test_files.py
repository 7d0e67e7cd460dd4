"""Atomic writes: a failure part-way leaves the old file whole and no debris."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from scratchnn.files import atomic_path, write_text_atomically


def test_failure_mid_write_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "history.json"
    write_text_atomically(target, "old")
    with pytest.raises(RuntimeError, match="disk full"), atomic_path(target) as temporary:
        temporary.write_text("half of the new")
        raise RuntimeError("disk full")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["history.json"]


def test_success_replaces_and_keeps_the_suffix(tmp_path: Path) -> None:
    target = tmp_path / "curve.png"
    with atomic_path(target) as temporary:
        assert temporary.suffix == ".png" and temporary.parent == tmp_path
        temporary.write_bytes(b"new")
    assert target.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curve.png"]


def test_each_write_has_its_own_temporary_file(tmp_path: Path) -> None:
    # Two writers to one path at once (threads of one process share the pid):
    # neither writes into the other's file, and the last rename wins whole.
    target = tmp_path / "plot.png"
    with atomic_path(target) as first, atomic_path(target) as second:
        assert first != second and first.exists() and second.exists()
        first.write_bytes(b"first" * 1000)
        second.write_bytes(b"second")
    assert target.read_bytes() == b"first" * 1000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plot.png"]


def test_concurrent_threads_leave_one_complete_file(tmp_path: Path) -> None:
    target = tmp_path / "history.json"
    texts = [str(i) * (1000 + i) for i in range(16)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda text: write_text_atomically(target, text), texts * 4))
    assert target.read_text() in texts
    assert sorted(p.name for p in tmp_path.iterdir()) == ["history.json"]


@pytest.mark.skipif(os.name != "posix", reason="the dead-writer cleanup is POSIX only")
def test_temporaries_of_dead_writers_are_removed_by_the_next_write(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # reaped, so its pid names no process (until the system reuses it)
    left = tmp_path / f".curve.{dead.pid}.0123abcd.tmp.png"
    alive = tmp_path / f".curve.{os.getpid()}.89abcdef.tmp.png"
    other = tmp_path / f".other.{dead.pid}.0123abcd.tmp.png"
    for path in (left, alive, other):
        path.write_bytes(b"partial")
    with atomic_path(tmp_path / "curve.png") as temporary:
        temporary.write_bytes(b"new")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["curve.png", alive.name, other.name]
    )


def test_the_file_reaches_the_disk_before_it_is_renamed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "history.csv"
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append("fsync " + os.path.basename(os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(source: Any, destination: Any) -> None:
        events.append("replace")
        real_replace(source, destination)

    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc/self/fd to name the file an fsync flushed")
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    write_text_atomically(target, "epoch,loss\n")
    monkeypatch.undo()
    assert events[0].startswith("fsync .history.") and events[0].endswith(".tmp.csv")
    assert events[1:] == ["replace", f"fsync {tmp_path.name}"]  # then the directory
    assert target.read_text() == "epoch,loss\n"


def test_a_failed_flush_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "drawing.svg"
    write_text_atomically(target, "<svg/>")

    def failing_fsync(fd: int) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="disk full"):
        write_text_atomically(target, "<svg>new</svg>")
    monkeypatch.undo()
    assert target.read_text() == "<svg/>"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["drawing.svg"]


@pytest.mark.parametrize("stem", ["a" * 250, "é" * 124 + "a"])  # 250 and 249 bytes
def test_a_long_valid_name_is_written(tmp_path: Path, stem: str) -> None:
    # The name fits the file system's 255 bytes; the temporary's own 22 must not break it.
    target = tmp_path / f"{stem}.dot"
    assert len(os.fsencode(target.name)) <= 255
    write_text_atomically(target, "digraph {}")
    assert target.read_text() == "digraph {}"
    assert [p.name for p in tmp_path.iterdir()] == [target.name]


@pytest.mark.skipif(os.name != "posix", reason="the dead-writer cleanup is POSIX only")
def test_temporaries_of_a_long_name_are_cleaned_up_too(tmp_path: Path) -> None:
    target = tmp_path / ("b" * 250 + ".png")
    with pytest.raises(RuntimeError), atomic_path(target) as temporary:
        temporary.write_bytes(b"partial")
        left = temporary.with_name(temporary.name.replace(f".{os.getpid()}.", ".999999999."))
        os.link(temporary, left)  # as a writer with a long-dead pid would have left it
        raise RuntimeError("killed")
    assert left.exists()
    write_text_atomically(target, "new")
    assert [p.name for p in tmp_path.iterdir()] == [target.name]


@pytest.mark.parametrize(
    "name",
    ["", "newdir/", "adir", "newdir/.", "afile/.", "adir/.."],
    ids=["empty", "trailing-slash", "dir", "slash-dot", "file-slash-dot", "dot-dot"],
)
def test_a_path_that_names_no_file_is_refused_before_writing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    # As safetensors and torch.save refuse them; "newdir/" used to become a file "newdir".
    monkeypatch.chdir(tmp_path)
    (tmp_path / "adir").mkdir()
    (tmp_path / "afile").write_text("kept")
    error = ValueError if not name else IsADirectoryError
    with pytest.raises(error, match="empty" if not name else f"not a file: '{name}'"):
        write_text_atomically(name, "x")
    assert sorted(os.listdir(tmp_path)) == ["adir", "afile"]
    assert os.listdir(tmp_path / "adir") == []
    assert (tmp_path / "afile").read_text() == "kept"


def test_a_rewritten_file_keeps_its_permissions(tmp_path: Path) -> None:
    # A checkpoint its owner made private stays private after the next epoch's rewrite,
    # as torch.save (which rewrites in place) keeps it.
    target = tmp_path / "private.txt"
    write_text_atomically(target, "one")
    os.chmod(target, 0o600)
    write_text_atomically(target, "two")
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o600
    os.chmod(target, 0o640)
    write_text_atomically(target, "three")
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o640


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o222])
def test_a_new_file_gets_the_mode_a_plain_open_gives(tmp_path: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        with open(tmp_path / "plain.txt", "w") as file:
            file.write("x")
        with atomic_path(tmp_path / "atomic.txt") as temporary:
            # The writer reopens it by name: writable to its owner even under umask 0o222.
            assert stat.S_IMODE(os.stat(temporary).st_mode) & 0o200
            temporary.write_text("x")
    finally:
        os.umask(old)
    plain = stat.S_IMODE(os.stat(tmp_path / "plain.txt").st_mode)
    assert stat.S_IMODE(os.stat(tmp_path / "atomic.txt").st_mode) == plain


def test_a_failure_setting_the_permissions_leaves_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Some file systems (vfat, CIFS) refuse fchmod: the temporary file, already made, was left
    # behind at every failed save.
    import scratchnn.files

    def refused(*args: object) -> None:
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(scratchnn.files, "_chmod", refused)
    target = tmp_path / "w.txt"
    target.write_text("old")
    with pytest.raises(PermissionError):
        write_text_atomically(target, "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.txt"]
    assert target.read_text() == "old"


def test_a_writer_error_without_a_file_name_names_the_file_being_written(tmp_path: Path) -> None:
    # A full disk raises ENOSPC from the writer, with no file name: "No space left on device"
    # alone said nothing of which file failed.
    target = tmp_path / "run" / "checkpoint.safetensors"
    target.parent.mkdir()
    target.write_bytes(b"old")
    with pytest.raises(OSError, match="No space left on device") as raised:
        with atomic_path(target) as temporary:
            temporary.write_bytes(b"new, partly")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert raised.value.errno == errno.ENOSPC and raised.value.filename == str(target)
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in target.parent.iterdir()) == ["checkpoint.safetensors"]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes on this system")
def test_a_pipe_in_the_files_place_is_refused_not_replaced(tmp_path: Path) -> None:
    # The rename would put a regular file where a named pipe was (`--out fifo.png`).
    fifo = tmp_path / "fifo.png"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match=r"fifo\.png: not a regular file"):
        write_text_atomically(fifo, "drawn")
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fifo.png"]
