"""The feature store's layout, in one place; README.md documents the same for readers using plain h5py.

Version 2: a small root file whose datasets are virtual (HDF5 virtual datasets) over the live rows of immutable
partition files in `STORE.parts/`; an update writes new partitions and switches the root, never copying old rows.

Root (STORE)                    attrs: schema_version (2), generation, created
/sets/<set_name>/               attrs: identity (JSON) and its fields, classes (JSON), data_dir, layout, ...,
                                       partitions (JSON: {file name: group prefix of the set inside it}),
                                       partition_ids (JSON: {file name: its uid, checked on open})
/sets/<set_name>/<split>/       one group per split: train, valid, test
    features   (N, D) float16|float32   one row per (image, view); a file's views together
    labels     (N,)   int32              class index into the set's `classes`, -1 when unlabelled
    paths      (N,)   utf-8 str          relative to the data folder, POSIX separators
    view       (N,)   uint8              0 = plain centre crop, 1..K = seeded augmented views
    size, mtime_ns, ctime_ns (N,) int64; sha256 (N,) 64 ASCII bytes: the source file's fingerprint
    segments   (S, 4) int64              where the rows come from, in order: partition (index into the set's
                                         partitions, sorted by name), its split (index into SPLITS), start, count
    location_segments, label_segments (S, 4) int64: the same for the columns a move or a relabel changes (TABLES):
                                         absent in roots written before them, where they are `segments`
    skipped/   paths, reasons, size, mtime_ns, ctime_ns, sha256 and segments: files that could not be featurized
Partition (STORE.parts/NAME.h5) attrs: set_name, classes, uid; one group per split holding the columns above, rows
sorted by (path, view) within it (a version-1 store taken over as a partition keeps its /sets/<set_name>/ prefix).
An overlay partition (NAME ending `o.h5`) holds no features: per split, the location columns of files moved or
touched and the labels of files relabelled (each table's columns as long as its own rows), and skipped records.
Every fixed-size dataset of a partition and the root's segment tables are chunked with Fletcher-32 checksums;
string datasets of a partition carry attrs["sha256"]. Version 1 kept the rows themselves in the store file.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import h5py
import numpy as np

from stages.files import SPLIT_NAMES as SPLITS  # noqa: F401 (the store names its split groups so)
from stages.identity import FeatureSetIdentity

SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)
SETS = "sets"
SKIPPED = "skipped"
SEGMENTS = "segments"
PARTITIONS = "partitions"  # the set attribute naming its partitions
PARTITION_IDS = "partition_ids"  # the set attribute recording each partition's identity (store.partition_file)
FEATURE_DTYPES = {"float16": np.float16, "float32": np.float32}
CHUNK_ROWS = 1024


def feature_chunks(rows: int, dim: int) -> tuple[int, int] | bool:
    """A features dataset's chunk shape: whole rows, up to CHUNK_ROWS of them (a row is read from one chunk; h5py's
    own guess cuts rows across chunks, three times slower to read whole); True (h5py's) when there are none."""
    return (min(rows, CHUNK_ROWS), dim) if rows else True


STR = h5py.string_dtype("utf-8")
# Per-row columns other than features, with their HDF5 dtypes.
ROW_COLUMNS = {
    "labels": np.int32,
    "paths": STR,
    "view": np.uint8,
    "size": np.int64,
    "mtime_ns": np.int64,
    "ctime_ns": np.int64,
    "sha256": "S64",
}
# The row tables of a split, each mapped by its own segment table: a file's content (its features and what names
# its bytes) never changes; where it lies and how it is labelled do, and are mapped on their own, so a move, a touch
# or a relabel writes those columns only, never a feature byte (an overlay partition).
TABLES = {
    "rows": ("features", "view", "size", "sha256"),
    "location": ("paths", "mtime_ns", "ctime_ns"),
    "labels": ("labels",),
}
OVERLAYS = ("location", "labels")  # the tables other than the content's
TABLE_OF = {column: table for table, columns in TABLES.items() for column in columns}
TABLE_SEGMENTS = {"rows": SEGMENTS, "location": "location_segments", "labels": "label_segments"}
SKIPPED_COLUMNS = {
    "paths": STR,
    "reasons": STR,
    "size": np.int64,
    "mtime_ns": np.int64,
    "ctime_ns": np.int64,
    "sha256": "S64",
}


@dataclass(frozen=True)
class FileRecord:
    """One image file as the store records it: its fields are the per-row columns (less `view`, which counts a file's
    rows) and the skipped-file columns (less `reasons`). A new column is an entry above and a field here."""

    paths: str
    labels: int
    size: int
    mtime_ns: int
    ctime_ns: int
    sha256: str

    def add_rows(self, columns: dict[str, list], views: int) -> None:
        """Append this file's rows (one per view) to per-row column lists."""
        for view in range(views):
            for name in ROW_COLUMNS:
                columns[name].append(view if name == "view" else getattr(self, name))

    def add_skipped(self, skipped: dict[str, list], reason: str) -> None:
        """Append this file to skipped-file column lists."""
        for name in SKIPPED_COLUMNS:
            skipped[name].append(reason if name == "reasons" else getattr(self, name))


UNKNOWN_CTIME = -1  # rows of stores written before ctime_ns was recorded: the content hash decides


LABELLING = ("label_source", "label_origin", "label_digest", "task", "delim")  # stages.labels.LabelSource.describe


@dataclass(frozen=True)
class SetRecord:
    """A feature set's attributes, typed: its identity (what makes its features), what they were made from (the data
    folder, its layout and split, the labelling of its labels columns) and when. Written by featurize, read here by
    every layer above; the attributes themselves are its to_attrs() (the README's schema)."""

    identity: FeatureSetIdentity
    classes: list[str] = field(default_factory=list)
    data_dir: str | None = None
    weights_path: str | None = None  # the backbone's weights file, when given (--weights)
    layout: str | None = None  # stages.files: how the data folder gives splits and labels
    valid_pct: float | None = None  # --valid-pct of a folder without its own valid split
    split_seed: int = 0
    label_source: str | None = None  # None: class folders
    label_origin: str | None = None
    label_digest: str | None = None
    task: str = "single"  # stages.tasks: what its labels columns give
    delim: str | None = None
    versions: dict | None = None  # of the libraries that made the features
    device: str | None = None
    created: str | None = None
    updated: str | None = None

    @classmethod
    def from_attrs(cls, attrs: dict) -> SetRecord:
        """From a set's attributes, JSON already decoded (stores written before a field existed lack it)."""
        known = {f.name: attrs[f.name] for f in fields(cls) if f.name != "identity" and attrs.get(f.name) is not None}
        return cls(FeatureSetIdentity.from_dict(attrs), **known)

    def to_attrs(self) -> dict:
        """As the set's attributes: the identity's fields beside the rest; labelling fields only when given."""
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "identity"}
        unset = {k for k in LABELLING if values[k] is None} | ({"task"} if self.task == "single" else set())
        return {**self.identity.to_dict(), **{k: v for k, v in values.items() if k not in unset}}

    @property
    def labelling(self) -> dict:
        """Which labelling its labels columns give (stages.labels): a table's or pattern's source, origin and digest,
        or class folders (the data folder)."""
        given = {
            k: getattr(self, k)
            for k in LABELLING
            if getattr(self, k) is not None and (k, self.task) != ("task", "single")
        }
        return given if self.label_source else {"label_source": "folders", "label_origin": self.data_dir}
