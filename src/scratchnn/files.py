"""Writing files so that a reader never sees half of one.

Every file scratchnn writes (checkpoints, histories, plots, drawings) goes
through :func:`atomic_path`: it is written to a temporary file in the same
directory, named ``.<stem>.<pid>.<8 hex digits>.tmp<suffix>`` and created
exclusively, then flushed to disk (fsync) and renamed over the target with
``os.replace`` (atomic on POSIX and Windows), and the directory is fsynced.
A process killed at any moment, even by SIGKILL, leaves the old complete file
or the new complete file. A killed write can leave its temporary file behind;
the next write to the same path deletes the temporary files whose process no
longer runs (on POSIX systems). Concurrent writes to one path, from threads
or processes, do not corrupt it: each has its own temporary file and the last
rename wins. (A writer in another PID namespace or on another host sharing
the directory can be taken for dead; its write then fails with
``FileNotFoundError``, and the file on disk stays complete.)

A rewritten file keeps its permission bits (a checkpoint made private stays
private); a new one gets those a plain ``open(path, "w")`` would give. A path
that names no file (empty, ending in a separator, `.` or `..`, an existing
directory) is refused before anything is written.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path


def check_regular_file(path: str | os.PathLike[str]) -> None:
    """``ValueError`` where ``path`` names something other than a file or a directory (a
    pipe, a socket, a device), checked before it is opened: opening a pipe waits for a
    writer, and a reader that sizes or rewinds a file cannot do either with one. A
    missing path raises ``FileNotFoundError``; a directory is left to ``open``."""
    name = os.fspath(path)
    if not stat.S_ISREG(os.stat(name).st_mode) and not os.path.isdir(name):
        raise ValueError(f"{name}: not a regular file")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a new empty temporary file beside ``path``; on success it replaces ``path``.

    The caller writes the temporary file (by name: any writer will do, such as
    matplotlib's ``savefig``). When the ``with`` block ends without an
    exception, the file is flushed to disk and renamed over ``path``; on an
    exception it is removed and ``path`` is left as it was. The temporary name
    keeps the suffix, so that tools that pick a format by suffix still work.

    >>> import tempfile
    >>> target = Path(tempfile.mkdtemp()) / "note.txt"
    >>> with atomic_path(target) as temporary:
    ...     _ = temporary.write_text("done")
    >>> target.read_text()
    'done'
    """
    target = _file_target(path)
    _remove_stale_temporaries(target)
    temporary = temporary_name(target)
    # O_EXCL: never write into a file that someone else is writing. Mode 0o666
    # less the umask, as a plain open(path, "w") gives: a data file, never executable.
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(temporary, flags, 0o666)
    except OSError as error:  # no such directory, no permission: say so of the user's path
        raise type(error)(error.errno, error.strerror, os.fspath(path)) from None
    try:  # from here on, whatever fails, the temporary file goes
        try:
            mode = _final_mode(target, fd)
            # The writer opens the file again by name: it must stay writable to its owner
            # while it is written (a umask of 0o222 would make it read-only from the start).
            _chmod(fd, mode | 0o600, temporary)
        finally:
            os.close(fd)
        try:
            yield temporary
            _fsync(temporary)  # the bytes must be on disk before the name points at them
            os.chmod(temporary, mode)
            os.replace(temporary, target)
        except OSError as error:
            if error.errno is None or error.filename not in (None, os.fspath(temporary)):
                raise
            # A writer's "No space left on device" names no file (or this temporary one, when
            # it was itself written through atomic_path): name the file being written.
            raise type(error)(error.errno, error.strerror, os.fspath(path)) from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
    _fsync_directory(target.parent)


def _file_target(path: str | os.PathLike[str]) -> Path:
    """``path`` made absolute, refused before anything is written where it cannot name a
    file: empty, ending in a separator, or an existing directory."""
    text = os.fspath(path)
    if not isinstance(text, str):
        text = os.fsdecode(text)
    if not text:
        raise ValueError("the path to write is empty")
    separators = tuple(sep for sep in (os.sep, os.altsep) if sep)
    # "x/", "x/." and "x/.." name folders (abspath would turn "x/." into the file x).
    if text.endswith(separators) or os.path.basename(text) in (".", "..") or os.path.isdir(text):
        raise IsADirectoryError(errno.EISDIR, "names a directory, not a file", text)
    with contextlib.suppress(FileNotFoundError):
        if not stat.S_ISREG(os.stat(text).st_mode):
            # A pipe, a socket or a device: the rename would put a file in its place.
            raise ValueError(f"{text}: not a regular file (a pipe or a device); write to a file")
    return Path(os.path.abspath(text))


def _final_mode(target: Path, fd: int) -> int:
    """The permission bits the written file gets: those of the file it replaces (a file
    its owner made private stays private), else those the umask gave the new file."""
    with contextlib.suppress(OSError):
        return stat.S_IMODE(os.stat(target).st_mode)
    return stat.S_IMODE(os.fstat(fd).st_mode)


def _chmod(fd: int, mode: int, temporary: Path) -> None:
    if hasattr(os, "fchmod"):
        os.fchmod(fd, mode)
    else:  # Windows: only the read-only flag exists
        os.chmod(temporary, mode)


def write_text_atomically(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` through :func:`atomic_path`."""
    with atomic_path(path) as temporary:
        temporary.write_text(text, encoding="utf-8")


# The longest file name most file systems take (NAME_MAX), in bytes.
_NAME_MAX = 255


def temporary_name(target: Path) -> Path:
    """A new hidden name beside ``target`` for a file on its way to or from it: one that
    the next write to ``target`` deletes (``_remove_stale_temporaries``) once the process
    that chose it has ended."""
    return target.with_name(
        f".{_temporary_stem(target)}.{os.getpid()}.{secrets.token_hex(4)}.tmp{target.suffix}"
    )


def _temporary_stem(target: Path) -> str:
    """``target``'s stem, cut so that the temporary's name stays within ``_NAME_MAX`` bytes.

    Why: a valid name of 240 bytes would otherwise fail as "File name too long"
    only because of the 22 bytes the temporary adds.
    """
    added = len(os.fsencode(f"..{'9' * 10}.{'0' * 8}.tmp{target.suffix}"))
    stem = os.fsencode(target.stem)
    if len(stem) + added <= _NAME_MAX:
        return target.stem
    # "ignore": a character cut in two is dropped, not left as half a UTF-8 sequence.
    return stem[: max(_NAME_MAX - added, 1)].decode("utf-8", "ignore")


def _remove_stale_temporaries(target: Path) -> None:
    """Delete the temporary files of earlier writes to ``target`` whose process has died."""
    if os.name != "posix":
        return  # without os.kill(pid, 0) we cannot tell a dead writer from a live one
    pattern = re.compile(
        re.escape(f".{_temporary_stem(target)}.")
        + r"([0-9]+)\.[0-9a-f]{8}"
        + re.escape(f".tmp{target.suffix}")
    )
    with contextlib.suppress(OSError):
        for entry in os.listdir(target.parent):
            match = pattern.fullmatch(entry)
            if match and not _process_exists(int(match.group(1))):
                with contextlib.suppress(OSError):
                    os.unlink(target.parent / entry)


def _process_exists(pid: int) -> bool:
    """Whether a process with this id exists (POSIX only)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # someone else's process, or a number we cannot judge: keep its file
    return True


def _fsync(path: Path) -> None:
    """Flush a file that another writer may have written, by name, to disk."""
    fd = os.open(path, os.O_RDWR | getattr(os, "O_BINARY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_directory(directory: Path) -> None:
    """Make the rename durable; skipped where directories cannot be opened (Windows)."""
    if os.name != "posix":
        return
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
