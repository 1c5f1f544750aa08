"""The store's locks, in one place: the writer's lock file, a reader's hold on the root it opened, and the test
that no reader holds a retired root any more.

One writer at a time (`STORE.lock`, an advisory lock the kernel releases when its holder dies; the shards of one job
share it). A reader holds a shared lock on the very root file it opened, for as long as it keeps it open (plain
h5py's own file locking takes the same kind of lock); a replaced root is kept as a retired root (a hard link: the
same file, the same lock), and its partitions are deleted only once an exclusive lock on it can be taken.
"""

from __future__ import annotations

import fcntl

from stages.atomic import ExclusiveLock
from stages.errors import PipelineError
from store.paths import StorePaths


class StoreLock:
    """The writer's lock on `STORE.lock` (stages.atomic.ExclusiveLock): one featurize per store, or the shards of
    one job side by side (shared)."""

    def __init__(self, paths: StorePaths, shared: bool = False):
        self.paths = paths
        self._lock = ExclusiveLock(paths.lock, shared)

    def __enter__(self) -> StoreLock:
        try:
            holder = self._lock.acquire()
        except OSError as exc:
            raise PipelineError(
                f"cannot create {self.paths.lock}: {exc.strerror}; choose a --store in a writable folder"
            ) from None
        if holder is not None:
            raise PipelineError(
                f"store {self.paths.store} is being written by another featurize ({holder}); wait for it to "
                "finish or use another --store"
            )
        return self

    def __exit__(self, *exc) -> None:
        self._lock.release()


def hold_shared(fd: int) -> None:
    """A reader's hold on the root it opened: it lives as long as the file stays open."""
    fcntl.flock(fd, fcntl.LOCK_SH)


def unheld(fd: int) -> bool:
    """Whether no reader holds this (retired) root: an exclusive lock taken at once, kept until fd is closed."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
