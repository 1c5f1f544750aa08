"""Stored bytes that can be checked: checksums written with every dataset, and the reads that verify them.

Fixed-size datasets (features, labels, views, fingerprints) are chunked with HDF5's Fletcher-32 filter, so a read
of a damaged chunk fails instead of returning numbers. Variable-length strings cannot take filters; their
dataset carries the sha256 of its values as an attribute instead.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import PurePosixPath

import h5py
import numpy as np

from stages.errors import PipelineError
from store.schema import SKIPPED, STR, TABLE_SEGMENTS

DIGEST_ATTR = "sha256"


def strings_digest(values) -> str:
    """The sha256 of a string column's values, in order."""
    digest = hashlib.sha256()
    for v in values:
        digest.update((v.decode() if isinstance(v, bytes) else str(v)).encode() + b"\0")
    return digest.hexdigest()


def create_checked(group: h5py.Group, name: str, data: np.ndarray, dtype=None, chunks=None) -> h5py.Dataset:
    """A dataset whose bytes can be verified: Fletcher-32 on chunked fixed-size data, a digest on strings."""
    if dtype is STR:
        ds = group.create_dataset(name, data=np.asarray(data, dtype=object), dtype=STR)
        ds.attrs[DIGEST_ATTR] = strings_digest(data)
        return ds
    return group.create_dataset(name, data=data, dtype=dtype, chunks=chunks or True, fletcher32=True)


@dataclass
class Damage:
    """What failed verification in one split group: feature rows (half-open ranges) and whole columns."""

    rows: list[tuple[int, int]] = field(default_factory=list)
    columns: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.rows or self.columns)

    def describe(self) -> str:
        parts = [f"feature rows {a}-{b - 1}" for a, b in self.rows] + [f"column {c}" for c in self.columns]
        return ", ".join(parts)


def _read_checked(ds: h5py.Dataset) -> np.ndarray | None:
    """The whole dataset, or None when its checksum or digest fails."""
    try:
        values = ds[()]
    except OSError:
        return None
    if DIGEST_ATTR in ds.attrs and strings_digest(values) != ds.attrs[DIGEST_ATTR]:
        return None
    return values


def verify_split(group: h5py.Group, block_rows: int = 8192) -> Damage:
    """Read every byte of a split group (a store's or a partition's), chunk by chunk for the features; rows
    whose chunk fails its checksum or that hold NaN or infinite values are damaged."""
    damage = Damage()
    features = group["features"] if "features" in group else np.zeros((0, 0))  # an overlay partition has none
    step = features.chunks[0] if getattr(features, "chunks", None) else block_rows
    for start in range(0, features.shape[0], step):
        stop = min(start + step, features.shape[0])
        try:
            block = features[start:stop]
        except OSError:
            damage.rows.append((start, stop))
            continue
        bad = ~np.isfinite(block).all(1)
        damage.rows += [(start + int(i), start + int(i) + 1) for i in np.flatnonzero(bad)]
    for name, ds in group.items():
        if isinstance(ds, h5py.Dataset) and name != "features" and _read_checked(ds) is None:
            damage.columns.append(name)
    if SKIPPED in group:
        damage.columns += [f"{SKIPPED}/{name}" for name, ds in group[SKIPPED].items() if _read_checked(ds) is None]
    return damage


def read_or_fail(ds: h5py.Dataset, where: str, selection=()):
    """Read (part of) a dataset; a failed checksum becomes one clear error naming the store and what to do."""
    try:
        values = ds[selection]
    except OSError as exc:
        raise PipelineError(
            f"{where} is damaged: {ds.name} fails its checksum ({str(exc).splitlines()[0][:80]}); "
            "featurize again with --verify to recompute the damaged rows (pipeline store info --verify lists "
            "them)"
        ) from None
    if (
        isinstance(selection, tuple)
        and selection == ()
        and DIGEST_ATTR in ds.attrs
        and strings_digest(values) != ds.attrs[DIGEST_ATTR]
    ):
        raise PipelineError(
            f"{where} is damaged: {ds.name} does not match its checksum; featurize again with --verify to "
            "rewrite it (pipeline store info --verify lists what is damaged)"
        )
    return values


class CheckedDataset:
    """An h5py dataset whose reads fail with a clear error, never with numbers, when a checksum fails."""

    def __init__(self, ds: h5py.Dataset, where: str):
        self._ds, self._where = ds, where

    def __getitem__(self, selection):
        return read_or_fail(self._ds, self._where, selection)

    def read_direct(self, dest: np.ndarray, source_sel, dest_sel) -> None:
        """Read into an existing array (h5py's read_direct), failing as reads do when a checksum fails."""
        try:
            self._ds.read_direct(dest, source_sel, dest_sel)
        except OSError as exc:
            raise PipelineError(
                f"{self._where} is damaged: {self._ds.name} fails its checksum ({str(exc).splitlines()[0][:80]}); "
                "featurize again with --verify to recompute the damaged rows (pipeline store info --verify lists them)"
            ) from None

    def __len__(self) -> int:
        return len(self._ds)

    def __getattr__(self, name):
        return getattr(self._ds, name)


def check_values(group: h5py.Group, split: str, num_classes: int, views: int, unlabelled: bool = False) -> list[str]:
    """The values readers trust, checked (checksums say the bytes are as written, not that they make sense):
    every column as long as the features, then each column's values (value_problem). Returns what is wrong, as
    short phrases (empty when nothing)."""
    problems = length_problems(group)
    if problems:
        return problems
    for name in TRUSTED_COLUMNS:
        values = _read_checked(group[name]) if name in group else None
        problem = value_problem(name, values, split, num_classes, views, unlabelled) if values is not None else None
        if problem:
            problems.append(problem)
    return problems


def length_problems(group: h5py.Group) -> list[str]:
    """Every column of a split as long as its features, or what is not, as short phrases."""
    rows = group["features"].shape[0]
    return [
        f"{name} has {ds.shape[0] if ds.shape else 0} values for {rows} feature rows"
        for name, ds in group.items()
        if isinstance(ds, h5py.Dataset)
        and name not in ("features", *TABLE_SEGMENTS.values())
        and ds.shape[:1] != (rows,)
    ]


TRUSTED_COLUMNS = ("labels", "view", "sha256", "paths")
_HEX64 = re.compile(rb"[0-9a-f]{64}")


def value_problem(name: str, values, split: str, num_classes: int, views: int, unlabelled: bool = False) -> str | None:
    """What is wrong with one column's values, or None: labels within the classes (-1, unlabelled, only in test,
    or anywhere in a set whose labels stay in their table: `unlabelled`),
    view numbers within the set's views (0 outside train), content hashes of 64 hex digits, paths inside the data
    folder (relative, no '..')."""
    if not len(values):
        return None
    if name == "labels":
        lowest = -1 if split == "test" or unlabelled else 0
        bad = sorted({int(v) for v in values[(values < lowest) | (values >= num_classes)]})
        return f"labels holds {', '.join(map(str, bad[:3]))}, outside the {num_classes} classes" if bad else None
    if name == "view":
        most = views if split == "train" else 0
        return (
            f"view holds {int(values.max())}, more than the set's {most} augmented views"
            if values.max() > most
            else None
        )
    if name == "sha256":
        ok = all(_HEX64.fullmatch(bytes(h)) for h in values)
        return None if ok else "sha256 holds values that are not 64 hex digits"
    if name == "paths":
        ok = all(_is_inside(p.decode() if isinstance(p, bytes) else p) for p in values)
        return None if ok else "paths holds a path outside the data folder (absolute, or with '..')"
    return None


def _is_inside(path: str) -> bool:
    return bool(path) and not PurePosixPath(path).is_absolute() and ".." not in PurePosixPath(path).parts
