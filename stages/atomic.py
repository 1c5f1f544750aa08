"""Outputs that appear whole or not at all, one writer at a time: a killed run never leaves half a file behind.

The one way this project writes a file: under a temporary name beside the target, fsynced, renamed into place, the
folder fsynced. A folder of outputs (a run, an audit, an evaluation) is written the same way as a whole: into a
hidden staging folder beside it, which then takes its place in one rename. Whoever writes a store or an output
holds an advisory lock on a lock file beside it for as long as it writes.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import math
import os
import re
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

from stages.errors import PipelineError

_TEMPORARY = re.compile(r"^\..+\.tmp-(\d+)(\.[^.]*)?$")


def temporary_path(path: Path) -> Path:
    """`.NAME.tmp-PID.SUFFIX` beside path: hidden, owned by this process, and with the suffix writers look at."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}{path.suffix}")


def writer_pid(temporary: Path) -> int | None:
    """The pid of the process that named a temporary file; None for another kind of file."""
    match = _TEMPORARY.match(temporary.name)
    return int(match.group(1)) if match else None


def writer_alive(temporary: Path) -> bool:
    """Whether the process that is writing a temporary file is still running."""
    pid = writer_pid(temporary)
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_output(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is fsynced and replaces `path` in one rename."""
    path = Path(path)
    tmp = temporary_path(path)
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_csv(path: Path | str) -> Iterator[TextIO]:
    """A CSV file written atomically: UTF-8, newlines left to the csv module, and a file name's bytes that are not
    UTF-8 written back as they were (the path a user can open, not an encoding error)."""
    with atomic_output(path) as tmp, tmp.open("w", newline="", encoding="utf-8", errors="surrogateescape") as f:
        yield f


def strict_json(data, indent: int | None = 2) -> str:
    """JSON that every parser reads: NaN and infinities (a diverged lr-find rate, say) become null. indent=None
    gives one line, written by json's C encoder (an indented million-record summary took 6.6 s, one line 0.9 s)."""

    def clean(value):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value

    try:  # most results hold no such value: cleaning a million skipped-file records first would cost seconds
        return json.dumps(data, indent=indent, default=str, allow_nan=False)
    except ValueError:
        return json.dumps(clean(data), indent=indent, default=str, allow_nan=False)


def write_json(path: Path, data) -> None:
    """Write strict JSON atomically."""
    with atomic_output(path) as tmp:
        tmp.write_text(strict_json(data) + "\n")


class ExclusiveLock:
    """An advisory lock on a lock file, held while something is written; the kernel releases it when its holder
    dies, even by SIGKILL. The file names the holder (pid and command line), so a refused writer can say who it is.
    shared=True takes a shared lock, for the shards of one job that write side by side. remove=True deletes the
    lock file when an exclusive holder is done (a taker checks that the file it locked is still the one there)."""

    def __init__(self, path: Path, shared: bool = False, remove: bool = False):
        self.path, self.shared, self.remove = Path(path), shared, remove and not shared
        self._fd: int | None = None

    def acquire(self) -> str | None:
        """Take the lock; None when taken, else the holder's description. OSError when the file cannot be made."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 512, 0).decode(errors="replace").strip()
                os.close(fd)
                return holder or "pid ?"
            try:
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)  # its holder removed the file as we took it: take the one there now
        if not self.shared:
            command = " ".join(["pipeline", *sys.argv[1:]])[:300]
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()}: {command}".encode(), 0)
        self._fd = fd
        return None

    def release(self) -> None:
        if self._fd is not None:
            if self.remove:
                self.path.unlink(missing_ok=True)  # while still held: no one can take this file meanwhile
            os.close(self._fd)
            self._fd = None


def lock_path(path: Path) -> Path:
    """The lock file of an output: `.NAME.lock` beside it."""
    return path.with_name(f".{path.name}.lock")


@contextmanager
def locked_output(path: Path, option: str = "--out", folder: bool = True) -> Iterator[Path]:
    """Hold an output (a folder, or a file with folder=False) for this process while the block runs: a second
    writer is refused with a one-line error naming the first. A folder path that names a file, or the reverse, is
    refused before any work."""
    path = Path(path)
    if folder and path.is_file():
        raise PipelineError(f"{option} {path} is a file; give a folder path (it will be created)")
    if not folder and path.is_dir():
        raise PipelineError(f"{option} {path} is a folder; give a file path")
    try:
        if folder:  # a folder output is created with its parents; a file's folder must exist (the caller checks)
            path.parent.mkdir(parents=True, exist_ok=True)
        lock = ExclusiveLock(lock_path(path), remove=True)
        holder = lock.acquire()
    except OSError as exc:
        raise PipelineError(f"cannot write {option} {path}: {exc.strerror}; choose a writable place") from None
    if holder is not None:
        raise PipelineError(
            f"{option} {path} is being written by another command ({holder}); wait for it, or give another {option}"
        )
    try:
        yield path
    finally:
        lock.release()


def check_replaceable(path: Path, markers: tuple[str, ...], what: str, replace: bool, option: str = "--out") -> None:
    """Refuse, before any work, to replace a folder that is not this kind of output (it holds none of `markers`),
    or one that is when `replace` is false; a missing or empty folder is always fine."""
    if not path.is_dir() or not any(path.iterdir()):
        return
    if not any((path / marker).exists() for marker in markers):
        raise PipelineError(f"{option} {path} holds other files, not {what}; give a new or empty folder")
    if not replace:
        raise PipelineError(
            f"{option} {path} already holds {what}; give another {option}, or --overwrite to replace it"
        )


@contextmanager
def output_folder(path: Path, markers: tuple[str, ...], what: str, option: str = "--out") -> Iterator[Path]:
    """An output folder a command writes as a whole, replacing the same kind of output: locked (locked_output),
    checked (check_replaceable), and written into a staging folder that is published at the end
    (published_folder). Yields the staging folder."""
    with locked_output(path, option):
        check_replaceable(path, markers, what, True, option)
        with published_folder(path) as staging:
            yield staging


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where the system cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except AttributeError:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    if ctypes.get_errno() in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()), str(b))


def remove_stale_staging(path: Path) -> None:
    """Staging folders and temporaries of writers of `path` that died (a live writer holds the lock)."""
    for stale in path.parent.glob(f".{path.name}.tmp-*"):
        if not writer_alive(stale):
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink(missing_ok=True)


@contextmanager
def published_folder(path: Path) -> Iterator[Path]:
    """Write a folder whole: yield an empty staging folder beside `path`; when the block ends without error it takes
    `path`'s place in one step (a folder already there goes), so a reader sees the old folder or the new one, never
    a mix. On an error or an interrupt the staging folder is removed and `path` is left as it was."""
    path = Path(path)
    remove_stale_staging(path)
    staging = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:  # made inside: an interrupt the moment it exists (before the block began) still removes it
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        yield staging
        for written in staging.rglob("*"):
            fsync_path(written)
        fsync_path(staging)
        if path.exists() and _exchange(staging, path):
            shutil.rmtree(staging)  # now the old folder
        else:
            if path.exists():
                old = path.with_name(f".{path.name}.tmp-{os.getpid()}-old")
                os.replace(path, old)
                os.replace(staging, path)
                shutil.rmtree(old)
            else:
                os.replace(staging, path)
        fsync_path(path.parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
