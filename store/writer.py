"""Write a feature store so that a crash at any moment loses nothing committed and never leaves a broken file.

Work in progress is committed as small journal parts beside the store (`STORE.journal/`), each written to a
temporary name, fsynced and renamed into place. A run ends by writing the new store to a temporary file and
renaming it over the old one. Readers therefore always see a complete store, and a killed run resumes from its parts.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import h5py
import numpy as np

from stages.atomic import atomic_output, writer_alive
from stages.errors import PipelineError
from store.schema import CHUNK_ROWS, FEATURE_DTYPES, ROW_COLUMNS, SCHEMA_VERSION, SETS, SKIPPED, SKIPPED_COLUMNS, STR
from store.verify import create_checked

COPY_BLOCK_ROWS = 8192


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class StoreLock:
    """An exclusive advisory lock on `STORE.lock`, released by the kernel even when the process is killed."""

    def __init__(self, store_path: Path, shared: bool = False):
        self.path = store_path.with_name(store_path.name + ".lock")
        self.shared = shared  # shards of one job write only their own journal parts, side by side
        self._fd = None

    def __enter__(self) -> StoreLock:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise PipelineError(
                f"cannot create {self.path}: {exc.strerror}; choose a --store in a writable folder"
            ) from None
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip()
            os.close(fd)
            raise PipelineError(
                f"store {self.path.with_suffix('')} is being written by another featurize "
                f"(pid {holder or '?'}); wait for it to finish or use another --store"
            ) from None
        if not self.shared:
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        os.close(self._fd)


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


def remove_stale_temporaries(path: Path) -> None:
    """Temporary files of writers that were killed (a live writer holds the lock, so none is in use)."""
    for stale in path.parent.glob(f".{path.name}.tmp-*"):
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

    def __init__(self, store_path: Path, set_name: str, shard: int = 0):
        self.dir = store_path.with_name(store_path.name + ".journal")
        self.set_name = set_name
        self.shard = shard  # each shard numbers its own parts, so shards never collide

    def parts(self) -> list[Path]:
        """Committed parts in commit order; leftovers of a killed write are removed."""
        if not self.dir.is_dir():
            return []
        for stale in self.dir.glob(".*.tmp-*"):
            if not writer_alive(stale):  # shards share the journal: a live shard's temporary is its own
                stale.unlink(missing_ok=True)
        return sorted(self.dir.glob(f"{self.set_name}.part-*.h5"))

    def commit(self, rows: dict[str, SplitRows], feature_dtype: str) -> Path | None:
        """Write the gathered rows as the next part, atomically; None when there is nothing to write."""
        rows = {split: r for split, r in rows.items() if not r.empty}
        if not rows:
            return None
        self.dir.mkdir(exist_ok=True)
        own = [p for p in self.parts() if p.stem.rsplit("-", 2)[-2] == f"{self.shard:03d}"]
        seq = int(own[-1].stem.rsplit("-", 1)[-1]) + 1 if own else 0
        path = self.dir / f"{self.set_name}.part-{self.shard:03d}-{seq:06d}.h5"

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
