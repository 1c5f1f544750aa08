"""Read a feature store: validate it, list its feature sets, hand out features and per-row columns."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from stages.errors import PipelineError
from store.identity import FeatureSetIdentity
from store.schema import SCHEMA_VERSION, SETS, SKIPPED, SPLITS, UNKNOWN_CTIME
from store.verify import CheckedDataset, check_values, read_or_fail, value_problem, verify_split


@dataclass(frozen=True)
class FileRows:
    """Where one source file's rows lie in a split, and the fingerprint they were computed from."""

    start: int
    count: int
    size: int
    mtime_ns: int
    sha256: str
    ctime_ns: int = UNKNOWN_CTIME


def open_h5(path: Path) -> h5py.File:
    """Open an existing store read-only, turning every way it can be wrong into one clear error."""
    if not path.exists():
        raise PipelineError(f"store {path} does not exist; create it with: pipeline featurize DATA_DIR --store {path}")
    if path.is_dir():
        raise PipelineError(f"store {path} is a folder; give the path of an .h5 file")
    if not h5py.is_hdf5(str(path)):
        raise PipelineError(
            f"store {path} is not an HDF5 file; give a store written by pipeline featurize or choose a new --store path"
        )
    try:
        f = h5py.File(path, "r", locking=False)
    except OSError as exc:
        raise PipelineError(
            f"store {path} is damaged and cannot be opened ({str(exc).splitlines()[0]}); "
            "move it away and featurize again"
        ) from None
    foreign = foreign_object(f)
    if foreign:
        f.close()
        raise PipelineError(
            f"store {path} is refused: {foreign}, so reading it could open other files; give a store written by "
            "pipeline featurize"
        )
    version = f.attrs.get("schema_version")
    if version != SCHEMA_VERSION:
        f.close()
        raise PipelineError(
            f"store {path} has schema version {version}, this pipeline reads version "
            f"{SCHEMA_VERSION}; featurize again into a new --store"
        )
    return f


def foreign_object(group: h5py.Group) -> str | None:
    """The first object under a group that would make a reader open another file, described, or None: an external
    or soft link, a dataset whose bytes are stored in external files, or a virtual dataset. Links are inspected,
    never followed."""
    for name in group:
        link = group.get(name, getlink=True)
        where = f"{group.name.rstrip('/')}/{name}"
        if not isinstance(link, h5py.HardLink):
            return f"{where} is {'an external' if isinstance(link, h5py.ExternalLink) else 'a soft'} link"
        item = group[name]
        if isinstance(item, h5py.Group):
            found = foreign_object(item)
            if found:
                return found
        elif item.is_virtual:
            return f"{where} is a virtual dataset"
        elif item.external:
            return f"{where} keeps its bytes in external files"
    return None


def split_file_index(group: h5py.Group) -> dict[str, FileRows]:
    """Per source file of a split group (of a store or a journal part): its rows and fingerprint."""
    paths = _decode_strings(group["paths"][()])
    sizes, mtimes, hashes = group["size"][()], group["mtime_ns"][()], group["sha256"][()]
    ctimes = _ctimes(group, len(paths))
    index: dict[str, FileRows] = {}
    for row, path in enumerate(paths):
        prev = index.get(path)
        if prev is not None:
            index[path] = FileRows(prev.start, prev.count + 1, prev.size, prev.mtime_ns, prev.sha256, prev.ctime_ns)
        else:
            index[path] = FileRows(row, 1, int(sizes[row]), int(mtimes[row]), hashes[row].decode(), int(ctimes[row]))
    return index


def split_skipped(group: h5py.Group) -> dict[str, dict]:
    """Files of a split group that could not be featurized: path to reason and fingerprint."""
    if SKIPPED not in group:
        return {}
    g = group[SKIPPED]
    paths, reasons = _decode_strings(g["paths"][()]), _decode_strings(g["reasons"][()])
    return {
        p: {"reason": r, "size": int(s), "mtime_ns": int(m), "ctime_ns": int(c), "sha256": h.decode()}
        for p, r, s, m, c, h in zip(
            paths, reasons, g["size"][()], g["mtime_ns"][()], _ctimes(g, len(paths)), g["sha256"][()]
        )
    }


def _ctimes(group: h5py.Group, n: int) -> np.ndarray:
    """The ctime_ns column, or UNKNOWN_CTIME for stores written before it existed."""
    return group["ctime_ns"][()] if "ctime_ns" in group else np.full(n, UNKNOWN_CTIME, np.int64)


class FeatureSet:
    """One feature set of a store: features of one backbone, weights, preprocessing and views."""

    def __init__(self, group: h5py.Group):
        self.group = group
        self.name = group.name.rsplit("/", 1)[-1]
        self.attrs = {k: _attr(v) for k, v in group.attrs.items()}
        self.identity = FeatureSetIdentity.from_dict(self.attrs)
        self.classes: list[str] = self.attrs.get("classes", [])

    @property
    def splits(self) -> list[str]:
        return [name for name in SPLITS if name in self.group]

    def features(self, split: str) -> CheckedDataset:
        """The split's features; a read of a damaged chunk is an error, never numbers."""
        return CheckedDataset(self._split(split)["features"], self.where)

    def rows(self, split: str, rows: np.ndarray, in_memory: bool, block_rows: int = 65536):
        """Rows of a split to train on, with their labels (stages.head.Rows): loaded whole (one verified read) or
        streamed (store.rows.StoredRows). torch is imported here, on first use: reading a store needs none."""
        from stages.head import TensorRows
        from store.rows import StoredRows

        features, labels = self.features(split), self.column(split, "labels")
        if in_memory:
            chunk_rows = features.chunks[0] if features.chunks else 1024
            return TensorRows(
                features[()], labels, rows, name=features.name, chunk_rows=chunk_rows, block_rows=block_rows
            )
        return StoredRows(features, labels, rows, block_rows)

    def column(self, split: str, name: str) -> np.ndarray:
        """A per-row column; labels and view numbers out of range are an error, never used."""
        values = read_or_fail(self._split(split)[name], self.where)
        if name in ("labels", "view"):
            problem = value_problem(name, values, split, len(self.classes), int(self.attrs.get("views", 0)))
            if problem:
                raise PipelineError(
                    f"{self.where} is damaged: set {self.name} {split}/{problem}; featurize again to rewrite it "
                    "(pipeline store info --verify lists what is wrong)"
                )
        return _decode_strings(values)

    @property
    def where(self) -> str:
        return f"store {self.group.file.filename}"

    def skipped(self, split: str) -> dict[str, dict]:
        """Files of a split that could not be featurized: path to reason and fingerprint."""
        return split_skipped(self.group[split]) if split in self.group else {}

    def _split(self, split: str) -> h5py.Group:
        if split not in self.group:
            raise PipelineError(f"feature set {self.name} has no {split!r} split (it has: {', '.join(self.splits)})")
        group = self.group[split]
        rows = group["features"].shape[0]
        for name, ds in group.items():
            if isinstance(ds, h5py.Dataset) and ds.shape[:1] != (rows,):
                raise PipelineError(
                    f"{self.where} is damaged: set {self.name} {split}/{name} has {ds.shape[0] if ds.shape else 0} "
                    f"values for {rows} feature rows; featurize into a new --store"
                )
        return group


class FeatureStore:
    """A read-only view of a store file; `with FeatureStore(path) as store:` closes it."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.file = open_h5(self.path)

    def __enter__(self) -> FeatureStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.file.close()

    @property
    def set_names(self) -> list[str]:
        return sorted(self.file[SETS]) if SETS in self.file else []

    def feature_set(self, name: str | None = None, **identity) -> FeatureSet:
        """The named set; else the only set, or the most recently updated one matching the given identity fields."""
        if name is not None:
            if name not in self.set_names:
                raise PipelineError(
                    f"store {self.path} has no feature set {name!r} (it has: {', '.join(self.set_names) or 'none'})"
                )
            return FeatureSet(self.file[SETS][name])
        sets = [FeatureSet(self.file[SETS][n]) for n in self.set_names]
        sets = [s for s in sets if all(s.attrs.get(k) == v for k, v in identity.items() if v is not None)]
        if not sets:
            wanted = ", ".join(f"{k}={v}" for k, v in identity.items() if v is not None)
            raise PipelineError(
                f"store {self.path} holds no feature set"
                + (f" with {wanted}" if wanted else "")
                + f"; featurize into it first (sets: {', '.join(self.set_names) or 'none'})"
            )
        return max(sets, key=lambda s: s.attrs.get("updated", ""))

    def info(self) -> dict:
        """What the store holds: each set's identity, splits with counts, classes; size on disk."""
        sets = []
        for name in self.set_names:
            feature_set = FeatureSet(self.file[SETS][name])
            splits = {}
            for split in feature_set.splits:
                try:
                    images = len(set(feature_set.column(split, "paths")))
                except PipelineError:  # a damaged column: --verify says which
                    images = None
                rows = feature_set.features(split).shape[0]
                splits[split] = {"rows": rows, "images": images, "skipped": len(feature_set.skipped(split))}
            sets.append(
                {
                    "name": name,
                    **feature_set.identity.to_dict(),
                    "classes": feature_set.classes,
                    "splits": splits,
                    **{
                        k: feature_set.attrs.get(k)
                        for k in ("data_dir", "layout", "valid_pct", "split_seed", "created", "updated", "versions")
                    },
                }
            )
        return {
            "path": str(self.path),
            "size_bytes": os.path.getsize(self.path),
            "schema_version": int(self.file.attrs["schema_version"]),
            "sets": sets,
        }


def verify_store(store: FeatureStore) -> list[dict]:
    """Every set and split read and checked byte by byte; returns what failed: [{set, split, damage}]. Splits
    written before checksums existed are checked for non-finite values only, and listed as unchecked."""
    failed = []
    for name in store.set_names:
        group = store.file[SETS][name]
        feature_set = FeatureSet(group)
        views = int(feature_set.attrs.get("views", 0))
        for split in [s for s in group if isinstance(group[s], h5py.Group)]:
            if not group[split]["features"].fletcher32:
                failed.append({"set": name, "split": split, "damage": None, "unchecked": True})
            try:
                damage = verify_split(group[split]).describe()
                problems = check_values(group[split], split, len(feature_set.classes), views)
                damage = ", ".join(filter(None, [damage, *problems]))
            except (OSError, KeyError) as exc:  # its metadata itself is unreadable
                damage = f"unreadable ({str(exc).splitlines()[0][:80]})"
            if damage:
                failed.append({"set": name, "split": split, "damage": damage})
    return failed


def _attr(value):
    """Attributes holding JSON come back as Python values."""
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, str) and (value[:1] in "[{" or value == "null"):
        return json.loads(value)
    if isinstance(value, np.generic):
        return value.item()
    return value


def _decode_strings(values: np.ndarray) -> np.ndarray | list:
    if values.dtype.kind == "O":
        return [v.decode() if isinstance(v, bytes) else v for v in values]
    return values
