"""A store as a pair of paths: copied or moved as one (its root names its partitions' folder, which is named for the
root), and a root rewritten from its own tables to map its own partitions (a pair renamed by hand, or a root whose
virtual datasets disagree with its segment tables).
"""

from __future__ import annotations

import errno
import os
import shutil
from dataclasses import dataclass, replace

from stages.atomic import fsync_path
from stages.errors import PipelineError
from store.locks import StoreLock
from store.paths import StorePaths
from store.reader import open_root, recorded_ids
from store.snapshot import SELF, SourceShapes, read_snapshot
from store.writer import atomic_h5, switch_root


@dataclass
class RelocateResult:
    """What a copy or move did: the new store, its partitions, and how many were hard-linked (no bytes copied)."""

    source: str
    store: str
    partitions: int
    linked: int
    moved: bool

    def to_json(self) -> dict:
        return dict(vars(self))


def relocate(source: StorePaths, target: StorePaths, move: bool) -> RelocateResult:
    """Copy (or move) a store: its partitions hard-linked into the new pair's folder where the filesystem allows
    (copied otherwise), then a root written that maps them there; a move then removes the source pair. Crash-safe:
    until the new root is in place the source is whole and the target has no root; after it, both are whole."""
    if target.store == source.store:
        raise PipelineError(f"{target.store} is the store itself; give another path")
    for existing in (target.store, target.parts):
        if existing.exists() or existing.is_symlink():
            raise PipelineError(f"{existing} exists; give a new path (nothing is ever replaced by a copy)")
    target.store.parent.mkdir(parents=True, exist_ok=True)
    with StoreLock(source), StoreLock(target):
        with open_root(source.store) as root:  # a clear error when it is no store, or damaged
            snapshot = read_snapshot(root)
        linked, names = 0, source.partitions()
        try:
            if snapshot.version == 1:  # one file, no partitions
                linked += _link_or_copy(source.store, target.store)
            else:
                target.parts.mkdir()
                for name in names:  # committed work no root maps yet travels too: a rerun there adopts it
                    linked += _link_or_copy(source.parts / name, target.parts / name)
                fsync_path(target.parts)
                switch_root(target, None, snapshot, SourceShapes(target, target.store))
        except BaseException:  # a copy cut short (no space, Ctrl-C) leaves no half of a store behind
            if not target.store.exists():
                shutil.rmtree(target.parts, ignore_errors=True)
            raise
        if move:
            source.store.unlink()
            fsync_path(source.store.parent)
            if source.parts.exists():
                shutil.rmtree(source.parts)
            source.lock.unlink(missing_ok=True)
    return RelocateResult(str(source.store), str(target.store), len(names), linked, move)


def _link_or_copy(source, target) -> int:
    """1 when hard-linked, 0 when copied (another filesystem, or one without hard links)."""
    try:
        os.link(source, target)
        return 1
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
            raise
    atomic_h5(target, lambda tmp: shutil.copyfile(source, tmp), os.path.getsize(source))
    return 0


@dataclass
class RepairResult:
    """A root rewritten: the partitions it maps, all its own and verified to be the ones it recorded."""

    store: str
    partitions: int
    generation: int

    def to_json(self) -> dict:
        return dict(vars(self))


def rewrite_root(paths: StorePaths) -> RepairResult:
    """Write a store's root again from its segment tables and set attributes, mapping the partitions those name in
    its own folder (each must be there, readable and the one recorded): what a pair renamed by hand needs, and a
    root whose virtual datasets disagree with its tables. A root whose tables are lost is rebuilt by featurize from
    the partitions themselves."""
    import h5py

    with StoreLock(paths):
        try:
            with h5py.File(paths.store, "r", locking=False) as root:
                snapshot, recorded = read_snapshot(root), recorded_ids(root)
        except (OSError, KeyError, ValueError) as exc:
            raise PipelineError(
                f"store {paths.store}: its root cannot be read ({str(exc).splitlines()[0][:80]}); pipeline featurize "
                "with the set's settings rebuilds it from its partitions"
            ) from None
        if snapshot.version != 2:
            raise PipelineError(f"store {paths.store} is a version-1 store (one file): it has no root to rewrite")
        missing = sorted(p for p in snapshot.partitions() - {SELF} if not (paths.parts / p).is_file())
        if missing:
            raise PipelineError(
                f"store {paths.store}: {paths.parts.name}/{missing[0]} is missing ({len(missing)} in all); put the "
                "partitions folder beside its root, or run pipeline featurize with the set's settings to compute "
                "their rows again"
            )
        shapes = SourceShapes(paths, paths.store)
        swapped = sorted(p for p in recorded if p in snapshot.partitions() and shapes.identity(p) != recorded[p])
        if swapped:
            raise PipelineError(
                f"store {paths.store}: {paths.parts.name}/{swapped[0]} is not the partition its root recorded "
                "(another store's, put in its place); put the right file back, or run pipeline featurize with the "
                "set's settings to compute its rows again"
            )
        switch_root(paths, replace(snapshot), snapshot, shapes)
    with open_root(paths.store):  # what it wrote is a whole store: its own partitions, agreeing with its tables
        pass
    return RepairResult(str(paths.store), len(snapshot.partitions() - {SELF}), snapshot.generation)
