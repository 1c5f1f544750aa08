"""Write a feature store so that a crash at any moment loses nothing committed and never leaves a broken file.

Work is committed as immutable partition files in `STORE.parts/`, each written to a temporary name, fsynced and
renamed into place; a run ends by switching the root (a new small root written the same way, renamed over the old
one) to map the new partitions beside the old ones' live rows. Nothing old is copied. Readers therefore always see
a whole snapshot, and a killed run resumes from the partitions it committed.
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import h5py
import numpy as np

from stages.atomic import atomic_output, writer_alive
from stages.errors import PipelineError
from store.partition_file import UID, new_uid
from store.paths import StorePaths
from store.reader import trust_written_root
from store.schema import (
    FEATURE_DTYPES,
    OVERLAYS,
    ROW_COLUMNS,
    SKIPPED,
    SKIPPED_COLUMNS,
    STR,
    TABLES,
    FileRecord,
    feature_chunks,
)
from store.snapshot import SELF, Segment, Snapshot, SourceShapes, root_bytes, write_root
from store.verify import create_checked

COPY_BLOCK_ROWS = 8192
OVERLAY_COLUMNS = [c for table in OVERLAYS for c in TABLES[table]]


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class SplitRows:
    """Rows of one split gathered in memory before a partition commit."""

    features: list[np.ndarray] = field(default_factory=list)
    columns: dict[str, list] = field(default_factory=lambda: {k: [] for k in ROW_COLUMNS})
    skipped: dict[str, list] = field(default_factory=lambda: {k: [] for k in SKIPPED_COLUMNS})

    @property
    def num_rows(self) -> int:
        return len(self.columns["paths"])

    @property
    def empty(self) -> bool:
        return not self.columns["paths"] and not self.skipped["paths"]


ROW_OVERHEAD_BYTES = 256  # per-row columns and HDF5 bookkeeping, generously


def ensure_space(path: Path, needed: int) -> None:
    """Refuse to start a write that cannot fit on the disk or under the process's file-size limit.

    HDF5 reports a failed write only when the file is flushed or closed, and h5py can crash the process then;
    checking first turns a full disk into a clear error.
    """
    import resource

    stat = os.statvfs(path.parent)
    free = stat.f_bavail * stat.f_frsize
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    limit = min(free, soft if soft != resource.RLIM_INFINITY else free)
    if needed > limit:
        raise PipelineError(
            f"no space left writing {path}: it needs about {needed / 1e6:.1f} MB and "
            f"{limit / 1e6:.1f} MB can be written; free disk space and rerun "
            "(work already committed is kept)"
        )


def remove_stale_temporaries(paths: StorePaths) -> None:
    """Temporary files of writers that were killed (the shards of a live job write theirs under a shared lock: a
    temporary is left alone while its writer runs)."""
    for stale in paths.temporaries():
        if not writer_alive(stale):
            stale.unlink(missing_ok=True)


def atomic_h5(path: Path, fill, needed: int) -> None:
    """Write an HDF5 file atomically (stages.atomic): `fill` gets the temporary's path. No-space and permission
    errors are said in one line."""
    ensure_space(path, needed)
    try:
        with atomic_output(path) as tmp:
            fill(tmp)
    except OSError as exc:
        if (
            exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
            or "No space" in str(exc)
            or "File too large" in str(exc)
        ):
            raise PipelineError(
                f"no space left writing {path}; free disk space and rerun (work already committed is kept)"
            ) from None
        if exc.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
            raise PipelineError(f"cannot write {path}: {exc.strerror}; choose a --store in a writable folder") from None
        raise


def _write_columns(group: h5py.Group, columns: dict[str, list], spec: dict) -> None:
    for name, dtype in spec.items():
        create_checked(group, name, np.asarray(columns[name], dtype=object if dtype is STR else dtype), dtype)


def rows_bytes(rows: int, dim: int, dtype: str) -> int:
    """About what `rows` feature rows take on disk, with their columns and HDF5's bookkeeping."""
    return rows * (dim * np.dtype(FEATURE_DTYPES[dtype]).itemsize + ROW_OVERHEAD_BYTES) + (1 << 16)


class PartitionWriter:
    """Commits computed rows of one feature set as new partitions (`STORE.parts/`), each atomically: committed
    work is never lost, and never mapped until a root switch says so (a killed run's partitions are reused)."""

    def __init__(self, paths: StorePaths, set_name: str, classes: list[str]):
        self.paths, self.set_name, self.classes = paths, set_name, classes
        self.written: list[str] = []

    def commit(self, rows: dict[str, SplitRows], feature_dtype: str) -> Path | None:
        """Write the gathered rows as a new partition; None when there is nothing to write."""
        rows = {split: r for split, r in rows.items() if not r.empty}
        if not rows:
            return None
        self.paths.parts.mkdir(exist_ok=True)
        path = self.paths.new_partition(self.set_name, len(self.written))
        width = max((r.features[0].shape[1] for r in rows.values() if r.features), default=0)

        def fill(tmp: Path) -> None:
            with h5py.File(tmp, "w", locking=False) as f:
                _partition_attrs(f, self.set_name, self.classes)
                for split, r in rows.items():
                    g = f.create_group(split)
                    data = np.concatenate(r.features) if r.features else np.zeros((0, width))
                    chunks = feature_chunks(*data.shape)
                    create_checked(g, "features", data.astype(FEATURE_DTYPES[feature_dtype]), chunks=chunks)
                    _write_columns(g, r.columns, ROW_COLUMNS)
                    _write_columns(g.create_group(SKIPPED), r.skipped, SKIPPED_COLUMNS)

        total = sum(r.num_rows + len(r.skipped["paths"]) for r in rows.values())
        atomic_h5(path, fill, rows_bytes(total, width, feature_dtype))
        self.written.append(path.name)
        return path


def _partition_attrs(f: h5py.File, set_name: str, classes: list[str]) -> None:
    """What a partition says of itself: its set, the classes its labels index (a partition written before the
    class folders changed is relabelled when it is used), and its uid (store.partition_file)."""
    f.attrs["set_name"] = set_name
    f.attrs["classes"] = json.dumps(classes)
    f.attrs[UID] = new_uid()


@dataclass
class PartitionSplit:
    """The content of one split of a partition written by copying: the feature rows to copy, in order, and every
    per-row and skipped-file column (labels already in the new classes)."""

    copies: list[Segment]  # the feature rows to copy, in order (a partition's, or SELF: a version-1 file's)
    columns: dict[str, list]
    skipped: dict[str, list]


@dataclass
class OverlaySplit:
    """One split of an overlay partition: the location columns of files moved or touched, the labels of files
    relabelled (each table as long as its own rows), and skipped-file records made anew."""

    location: dict[str, list] = field(default_factory=lambda: {k: [] for k in TABLES["location"]})
    labels: list[int] = field(default_factory=list)
    skipped: dict[str, list] = field(default_factory=lambda: {k: [] for k in SKIPPED_COLUMNS})

    def add(self, table: str, record: FileRecord, rows: int) -> None:
        """A file's `rows` rows of one overlay table."""
        if table == "labels":
            self.labels += [record.labels] * rows
        else:
            for name, values in self.location.items():
                values += [getattr(record, name)] * rows

    @property
    def empty(self) -> bool:
        return not self.location["paths"] and not self.labels and not self.skipped["paths"]


def write_overlay_partition(path: Path, set_name: str, classes: list[str], splits: dict[str, OverlaySplit]) -> None:
    """An overlay partition: no feature bytes, only the columns a move, a touch or a relabel changed."""

    def fill(tmp: Path) -> None:
        with h5py.File(tmp, "w", locking=False) as f:
            _partition_attrs(f, set_name, classes)
            for split, part in splits.items():
                g = f.create_group(split)
                _write_columns(
                    g, {**part.location, "labels": part.labels}, {c: ROW_COLUMNS[c] for c in OVERLAY_COLUMNS}
                )
                _write_columns(g.create_group(SKIPPED), part.skipped, SKIPPED_COLUMNS)

    rows = sum(len(p.location["paths"]) + len(p.labels) + len(p.skipped["paths"]) for p in splits.values())
    atomic_h5(path, fill, rows * ROW_OVERHEAD_BYTES + (1 << 16))


def write_copied_partition(
    path: Path,
    set_name: str,
    classes: list[str],
    splits: dict[str, PartitionSplit],
    open_source: Callable[[str, str], h5py.Group],
    feature_dim: int,
    feature_dtype: str,
) -> None:
    """A new partition whose features are copied from other partitions' rows (compaction), block by block, its
    columns as given (locations and labels as the overlays map them)."""
    dtype = FEATURE_DTYPES[feature_dtype]

    def fill(tmp: Path) -> None:
        with h5py.File(tmp, "w", locking=False) as f:
            _partition_attrs(f, set_name, classes)
            for split, part in splits.items():
                g = f.create_group(split)
                n = len(part.columns["paths"])
                out = g.create_dataset(
                    "features",
                    shape=(n, feature_dim),
                    dtype=dtype,
                    fletcher32=True,
                    chunks=feature_chunks(n, feature_dim),
                )
                row = 0
                for c in part.copies:
                    src = open_source(c.partition, c.split)["features"]
                    for offset in range(0, c.count, COPY_BLOCK_ROWS):
                        k = min(COPY_BLOCK_ROWS, c.count - offset)
                        out[row : row + k] = src[c.start + offset : c.start + offset + k]
                        row += k
                if row != n:
                    raise AssertionError(f"partition plan for {split}: {row} feature rows for {n} paths")
                _write_columns(g, part.columns, ROW_COLUMNS)
                _write_columns(g.create_group(SKIPPED), part.skipped, SKIPPED_COLUMNS)

    rows = sum(len(p.columns["paths"]) + len(p.skipped["paths"]) for p in splits.values())
    atomic_h5(path, fill, rows_bytes(rows, feature_dim, feature_dtype))


def switch_root(paths: StorePaths, old: Snapshot | None, new: Snapshot, shapes: SourceShapes) -> None:
    """Make `new` the store's snapshot in one rename: its root written beside the old one, fsynced, renamed over
    it. The old root is first kept as a retired root (a hard link), every time: a reader holding it may still map
    partitions that this switch keeps but a later one drops, so its partitions are deleted only once no reader holds
    it (store.compact.collect_garbage)."""
    new.generation = (old.generation if old is not None else 0) + 1
    new.created = (old.created if old is not None else None) or now_iso()
    if old is not None and paths.store.exists():
        paths.parts.mkdir(exist_ok=True)
        retired = paths.retired_root(old.generation)
        retired.unlink(missing_ok=True)
        os.link(paths.store, retired)
    atomic_h5(paths.store, lambda tmp: write_root(tmp, new, paths, shapes), root_bytes(new, paths))
    trust_written_root(paths.store, {paths.parts / p: shapes.identity(p) for p in new.partitions() - {SELF}})
