"""Stored bytes that can be checked: checksums written with every dataset, and the reads that verify them.

Fixed-size datasets (features, labels, views, fingerprints) are chunked with HDF5's Fletcher-32 filter, so a read
of a damaged chunk fails instead of returning numbers. Variable-length strings cannot take filters; their
dataset carries the sha256 of its values as an attribute instead.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import h5py
import numpy as np

from stages.errors import PipelineError
from store.schema import SKIPPED, STR

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
    """Read every byte of a split group (a store's or a journal part's), chunk by chunk for the features; rows
    whose chunk fails its checksum or that hold NaN or infinite values are damaged."""
    damage = Damage()
    features = group["features"]
    step = features.chunks[0] if features.chunks else block_rows
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
            "featurize again to recompute the damaged rows (pipeline store info --verify lists "
            "them)"
        ) from None
    if (
        isinstance(selection, tuple)
        and selection == ()
        and DIGEST_ATTR in ds.attrs
        and strings_digest(values) != ds.attrs[DIGEST_ATTR]
    ):
        raise PipelineError(
            f"{where} is damaged: {ds.name} does not match its checksum; featurize again to "
            "rewrite it (pipeline store info --verify lists what is damaged)"
        )
    return values


class CheckedDataset:
    """An h5py dataset whose reads fail with a clear error, never with numbers, when a checksum fails."""

    def __init__(self, ds: h5py.Dataset, where: str):
        self._ds, self._where = ds, where

    def __getitem__(self, selection):
        return read_or_fail(self._ds, self._where, selection)

    def __len__(self) -> int:
        return len(self._ds)

    def __getattr__(self, name):
        return getattr(self._ds, name)
