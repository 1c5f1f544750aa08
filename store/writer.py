"""Write a feature store so that a crash at any moment loses nothing committed and never leaves a broken file.

Work in progress is committed as small journal parts beside the store (`STORE.journal/`), each written to a
temporary name, fsynced and renamed into place. A run ends by writing the new store to a temporary file and
renaming it over the old one. Readers therefore always see a complete store, and a killed run resumes from its parts.
"""

from __future__ import annotations

import errno
import json
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import h5py
import numpy as np

from stages.atomic import ExclusiveLock, atomic_output, writer_alive
from stages.errors import PipelineError
from store.paths import StorePaths
from store.schema import CHUNK_ROWS, FEATURE_DTYPES, ROW_COLUMNS, SCHEMA_VERSION, SETS, SKIPPED, SKIPPED_COLUMNS, STR
from store.verify import create_checked

COPY_BLOCK_ROWS = 8192


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


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


@dataclass
class SplitRows:
    """Rows of one split gathered in memory before a journal commit."""

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
    """Temporary files of writers that were killed (a live writer holds the lock, so none is in use)."""
    for stale in paths.temporaries():
        stale.unlink(missing_ok=True)


def _atomic_h5(path: Path, fill, needed: int) -> None:
    """Write an HDF5 file atomically (stages.atomic), with no-space and permission errors said in one line."""
    ensure_space(path, needed)
    try:
        with atomic_output(path) as tmp, h5py.File(tmp, "w", locking=False) as f:
            fill(f)
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


class Journal:
    """The committed parts of an unfinished run for one feature set, in `STORE.journal/`."""

    def __init__(self, paths: StorePaths, set_name: str, shard: int = 0):
        self.paths, self.dir = paths, paths.journal
        self.set_name = set_name
        self.shard = shard  # each shard numbers its own parts, so shards never collide

    def parts(self) -> list[Path]:
        """Committed parts in commit order; leftovers of a killed write are removed."""
        if not self.dir.is_dir():
            return []
        for stale in self.dir.glob(".*.tmp-*"):
            if not writer_alive(stale):  # shards share the journal: a live shard's temporary is its own
                stale.unlink(missing_ok=True)
        return self.paths.journal_parts(self.set_name)

    def commit(self, rows: dict[str, SplitRows], feature_dtype: str) -> Path | None:
        """Write the gathered rows as the next part, atomically; None when there is nothing to write."""
        rows = {split: r for split, r in rows.items() if not r.empty}
        if not rows:
            return None
        self.dir.mkdir(exist_ok=True)
        own = [p for p in self.parts() if StorePaths.part_shard(p) == self.shard]
        path = self.paths.journal_part(self.set_name, self.shard, StorePaths.part_seq(own[-1]) + 1 if own else 0)

        def fill(f: h5py.File) -> None:
            f.attrs["set_name"] = self.set_name
            for split, r in rows.items():
                g = f.create_group(split)
                dim = r.features[0].shape[1] if r.features else 0
                data = np.concatenate(r.features) if r.features else np.zeros((0, dim))
                create_checked(g, "features", data.astype(FEATURE_DTYPES[feature_dtype]))
                _write_columns(g, r.columns, ROW_COLUMNS)
                _write_columns(g.create_group(SKIPPED), r.skipped, SKIPPED_COLUMNS)

        rows_total = sum(r.num_rows + len(r.skipped["paths"]) for r in rows.values())
        width = max((r.features[0].shape[1] for r in rows.values() if r.features), default=0)
        _atomic_h5(
            path,
            fill,
            rows_total * (width * np.dtype(FEATURE_DTYPES[feature_dtype]).itemsize + ROW_OVERHEAD_BYTES) + (1 << 16),
        )
        return path

    def clear(self) -> None:
        for part in self.parts():
            part.unlink()
        if self.dir.is_dir() and not any(self.dir.iterdir()):
            self.dir.rmdir()


@dataclass(frozen=True)
class RowRun:
    """Consecutive rows [start, start+count) of a split of one source file (the old store or a journal part)."""

    source: str
    start: int
    count: int
    split: str  # the source's split: a file keeps its rows when it moves between splits (--valid-pct changed)


@dataclass
class SplitPlan:
    """The new content of one split: runs of feature rows to copy, and all per-row and skipped columns."""

    runs: list[RowRun]
    columns: dict[str, list]
    skipped: dict[str, list]


def write_store(
    store_path: Path,
    set_name: str,
    set_attrs: dict,
    plans: dict[str, SplitPlan],
    sources: dict[str, h5py.Group | h5py.File],
    feature_dim: int,
    feature_dtype: str,
    keep_sets_from: h5py.File | None,
) -> None:
    """Atomically replace the store with one whose set `set_name` is built from `plans`; other sets are copied."""
    dtype = FEATURE_DTYPES[feature_dtype]

    def fill(f: h5py.File) -> None:
        created = keep_sets_from.attrs.get("created") if keep_sets_from is not None else None
        f.attrs["schema_version"] = SCHEMA_VERSION
        f.attrs["created"] = created or now_iso()
        f.attrs["updated"] = now_iso()
        sets = f.create_group(SETS)
        if keep_sets_from is not None and SETS in keep_sets_from:
            for name in keep_sets_from[SETS]:
                if name != set_name:
                    keep_sets_from.copy(keep_sets_from[SETS][name], sets, name=name)
        group = sets.create_group(set_name)
        for key, value in set_attrs.items():
            group.attrs[key] = json.dumps(value) if value is None or isinstance(value, (dict, list)) else value
        for split, plan in plans.items():
            g = group.create_group(split)
            n = len(plan.columns["paths"])
            out = g.create_dataset(
                "features",
                shape=(n, feature_dim),
                dtype=dtype,
                fletcher32=True,
                chunks=(max(1, min(n, CHUNK_ROWS)), feature_dim) if n else True,
            )
            row = 0
            for run in plan.runs:
                src = sources[run.source][run.split]["features"]
                for offset in range(0, run.count, COPY_BLOCK_ROWS):
                    k = min(COPY_BLOCK_ROWS, run.count - offset)
                    out[row : row + k] = src[run.start + offset : run.start + offset + k]
                    row += k
            if row != n:
                raise AssertionError(f"store plan for {split}: {row} feature rows for {n} paths")
            _write_columns(g, plan.columns, ROW_COLUMNS)
            _write_columns(g.create_group(SKIPPED), plan.skipped, SKIPPED_COLUMNS)

    rows = sum(len(p.columns["paths"]) + len(p.skipped["paths"]) for p in plans.values())
    kept = os.path.getsize(keep_sets_from.filename) if keep_sets_from is not None else 0
    _atomic_h5(
        store_path, fill, kept + rows * (feature_dim * np.dtype(dtype).itemsize + ROW_OVERHEAD_BYTES) + (1 << 16)
    )
