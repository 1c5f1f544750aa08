"""A store's snapshot: which rows of which partitions each split of each feature set holds. Read from a root file,
and written as one: virtual datasets over the partitions, so that plain h5py reads a split as one array."""

from __future__ import annotations

import json
from bisect import bisect_right
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import h5py
import numpy as np

from store.partition_file import open_partition_file, partition_id
from store.paths import StorePaths
from store.schema import (
    FEATURE_DTYPES,
    OVERLAYS,
    PARTITION_IDS,
    PARTITIONS,
    ROW_COLUMNS,
    SCHEMA_VERSION,
    SEGMENTS,
    SETS,
    SKIPPED,
    SKIPPED_COLUMNS,
    SPLITS,
    TABLE_SEGMENTS,
    TABLES,
    SetRecord,
)

SELF = "."  # a version-1 store's rows lie in the store file itself (HDF5's name for a virtual dataset's own file)
# What a virtual dataset gives where a source is missing: values no reader takes for data (NaN features, labels
# and views out of range). Readers check that every partition is there before they read; this is the last guard.
FILL = {"features": np.nan, "labels": np.iinfo(np.int32).min, "view": 255, "size": -1, "mtime_ns": -1, "ctime_ns": -1}


class Segment(NamedTuple):
    """Rows [start, start + count) of a partition's split group, in the order a split of the root lists them. (A
    named tuple: a sync over a million files makes several per file, and a frozen dataclass costs five times as
    much to make.)"""

    partition: str  # file name in STORE.parts/ (SELF: a version-1 store's own file)
    split: str
    start: int
    count: int


def merge_segments(segments: list[Segment]) -> list[Segment]:
    """The same rows, runs that continue one another joined."""
    merged: list[Segment] = []
    run: list | None = None  # the run being joined: partition, split, start, count
    for partition, split, start, count in segments:
        if not count:
            continue
        if run is not None and run[0] == partition and run[1] == split and run[2] + run[3] == start:
            run[3] += count
            continue
        if run is not None:
            merged.append(Segment(*run))
        run = [partition, split, start, count]
    if run is not None:
        merged.append(Segment(*run))
    return merged


class Locator:
    """Rows of a split as one table maps them, found by position in O(log segments): a sweep over a million files
    asks once per run of them."""

    def __init__(self, segments: list[Segment]):
        self.segments = segments
        self.offsets = np.cumsum([0] + [s.count for s in segments]).tolist()

    def locate(self, start: int, count: int) -> list[Segment]:
        """The source segments of rows [start, start + count)."""
        found, end = [], start + count
        i = max(0, bisect_right(self.offsets, start) - 1)
        while i < len(self.segments) and self.offsets[i] < end:
            s, offset = self.segments[i], self.offsets[i]
            lo, hi = max(start, offset), min(end, offset + s.count)
            if lo < hi:
                found.append(Segment(s.partition, s.split, s.start + lo - offset, hi - lo))
            i += 1
        return found


ROW_TABLES = tuple(TABLES)  # rows (the content), then the overlays


@dataclass
class SetSnapshot:
    """One feature set as a root maps it: its attributes, the partitions it uses (with the group prefix of the set
    inside each), and per split the segments of each of its row tables (schema.TABLES: the content's, `rows`, and
    the overlays, `location` and `labels`, each as long) and of its skipped-file records."""

    name: str
    attrs: dict  # the set's attributes, JSON values decoded, `partitions` left out
    prefixes: dict[str, str]  # partition name -> group path of the set inside it ("" for partitions written by v2)
    rows: dict[str, list[Segment]] = field(default_factory=dict)
    skipped: dict[str, list[Segment]] = field(default_factory=dict)
    location: dict[str, list[Segment]] = field(default_factory=dict)
    labels: dict[str, list[Segment]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for table in OVERLAYS:  # a split given its rows only: its overlays are the rows' own columns
            for split, segments in self.rows.items():
                getattr(self, table).setdefault(split, list(segments))

    @property
    def record(self) -> SetRecord:
        """Its attributes, typed."""
        return SetRecord.from_attrs(self.attrs)

    def partitions(self) -> set[str]:
        tables = (*ROW_TABLES, "skipped")
        return {s.partition for t in tables for segs in getattr(self, t).values() for s in segs}

    def overlay_partitions(self) -> set[str]:
        """Partitions only an overlay maps: they hold no feature rows of this set."""
        mapped = {s.partition for t in OVERLAYS for segs in getattr(self, t).values() for s in segs}
        return mapped - {s.partition for segs in self.rows.values() for s in segs}

    def count(self, split: str, table: str = "rows") -> int:
        return sum(s.count for s in getattr(self, table).get(split, []))

    def locate(self, split: str, start: int, count: int, table: str = "rows") -> list[Segment]:
        """The source segments of rows [start, start + count) of a split as the root lists them."""
        return Locator(getattr(self, table).get(split, [])).locate(start, count)

    def append(self, split: str, partition: str, rows: int) -> None:
        """A partition's whole split appended to every row table of the split (a commit of new rows)."""
        for table in ROW_TABLES:
            segments = getattr(self, table).get(split, [])
            getattr(self, table)[split] = merge_segments([*segments, Segment(partition, split, 0, rows)])
        self.skipped.setdefault(split, [])

    def keep(self, split: str, ranges: list[tuple[int, int]]) -> None:
        """Only rows [start, stop) of these ranges (in order) kept in every row table of the split."""
        for table in ROW_TABLES:
            where = Locator(getattr(self, table).get(split, []))
            getattr(self, table)[split] = merge_segments([s for a, b in ranges for s in where.locate(a, b - a)])

    def live_rows(self) -> dict[str, int]:
        """Feature rows mapped from each partition, each counted once (copies of a file map the same rows)."""
        runs: dict[tuple[str, str], list[tuple[int, int]]] = {}
        for segs in self.rows.values():
            for s in segs:
                runs.setdefault((s.partition, s.split), []).append((s.start, s.start + s.count))
        live: dict[str, int] = {}
        for (partition, _), spans in runs.items():
            end = 0
            for a, b in sorted(spans):
                live[partition] = live.get(partition, 0) + max(0, b - max(a, end))
                end = max(end, b)
        return live


@dataclass
class Snapshot:
    """What a root holds: every feature set's mapping, the schema version it was read as, and its generation (one
    more at every switch of the root)."""

    version: int = SCHEMA_VERSION
    created: str | None = None
    generation: int = 0
    sets: dict[str, SetSnapshot] = field(default_factory=dict)

    def partitions(self) -> set[str]:
        return set().union(*(s.partitions() for s in self.sets.values())) if self.sets else set()


def decode_attr(value):
    """Attributes holding JSON come back as Python values."""
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, str) and (value[:1] in "[{" or value == "null"):
        return json.loads(value)
    if isinstance(value, np.generic):
        return value.item()
    return value


def read_snapshot(f: h5py.File) -> Snapshot:
    """The snapshot a root (version 2) or a version-1 store file holds."""
    version = int(f.attrs.get("schema_version", 1))
    snapshot = Snapshot(version, f.attrs.get("created"), int(f.attrs.get("generation", 0)))
    for name in f[SETS] if SETS in f else []:
        group = f[SETS][name]
        attrs = {k: decode_attr(v) for k, v in group.attrs.items() if k not in (PARTITIONS, PARTITION_IDS)}
        if version == 1:
            prefixes = {SELF: f"/{SETS}/{name}"}
        else:
            prefixes = decode_attr(group.attrs.get(PARTITIONS, "{}"))
        order = sorted(prefixes)
        snap = SetSnapshot(name, attrs, prefixes)
        for split in [s for s in SPLITS if s in group]:
            tables = [(t, group[split], TABLE_SEGMENTS[t]) for t in ROW_TABLES]
            for table, where, name_of_segments in [*tables, ("skipped", group[split].get(SKIPPED), SEGMENTS)]:
                if where is None:
                    continue
                if version == 1:
                    n = where["paths"].shape[0]
                    getattr(snap, table)[split] = [Segment(SELF, split, 0, n)] if n else []
                elif name_of_segments in where:
                    getattr(snap, table)[split] = [
                        Segment(order[p], SPLITS[sp], int(a), int(c)) for p, sp, a, c in where[name_of_segments][()]
                    ]
                elif table in OVERLAYS:  # a root written before overlays: the rows' own columns
                    getattr(snap, table)[split] = list(snap.rows.get(split, []))
                else:
                    getattr(snap, table)[split] = []
        snapshot.sets[name] = snap
    return snapshot


class SourceShapes:
    """Shapes and types of partition datasets, and each partition's identity, read once per partition (a root's
    virtual datasets need the first, its record of what it maps the second)."""

    def __init__(self, paths: StorePaths, root: Path | None = None):
        self.paths, self.root = paths, root
        self._known: dict[tuple[str, str], tuple] = {}
        self._ids: dict[str, str] = {}

    def _read(self, partition: str, dataset: str | None) -> None:
        path = self.root if partition == SELF else self.paths.parts / partition
        with open_partition_file(path) as f:
            if partition not in self._ids:
                self._ids[partition] = partition_id(f)
            if dataset is not None:
                ds = f[dataset]
                self._known[partition, dataset] = (ds.shape, ds.dtype)

    def get(self, partition: str, dataset: str) -> tuple[tuple, object]:
        if (partition, dataset) not in self._known:
            self._read(partition, dataset)
        return self._known[partition, dataset]

    def identity(self, partition: str) -> str:
        if partition not in self._ids:
            self._read(partition, None)
        return self._ids[partition]


MAPPING_BYTES = 128  # what HDF5 keeps per virtual mapping beside its names (measured: 72-90 with short names)


def root_bytes(snapshot: Snapshot, paths: StorePaths) -> int:
    """About what a root takes on disk, from what it maps: every column of every table has one mapping per segment
    (its source file's and dataset's names included), plus HDF5's fixed cost per group. Generous by design, not by
    a megabyte: a nearly full disk still takes an update that fits."""
    total = 1 << 16
    for snap in snapshot.sets.values():
        total += 8192 * (1 + len(SPLITS))
        counts = [(t, len(TABLES[t])) for t in ROW_TABLES]
        for table, columns in [*counts, ("skipped", len(SKIPPED_COLUMNS))]:
            for split, segments in getattr(snap, table).items():
                for s in segments:
                    dataset = source_dataset(snap.prefixes.get(s.partition, ""), split, "features", SKIPPED)
                    names = len(paths.source_name(s.partition)) + len(dataset)
                    total += columns * (MAPPING_BYTES + names) + 32
    return total


def write_root(target: Path, snapshot: Snapshot, paths: StorePaths, shapes: SourceShapes) -> None:
    """Fill a new root file (opened by the caller, who writes it atomically) from a snapshot: every set's attributes
    and, per split, the segment tables and virtual datasets over the segments' partitions."""
    with h5py.File(target, "w", libver="latest", locking=False) as f:
        f.attrs["schema_version"] = SCHEMA_VERSION
        f.attrs["generation"] = snapshot.generation
        if snapshot.created:
            f.attrs["created"] = snapshot.created
        sets = f.create_group(SETS)
        for name, snap in snapshot.sets.items():
            group = sets.create_group(name)
            for key, value in snap.attrs.items():
                group.attrs[key] = json.dumps(value) if value is None or isinstance(value, (dict, list)) else value
            used = snap.partitions()
            prefixes = {p: snap.prefixes[p] for p in sorted(used)}
            group.attrs[PARTITIONS] = json.dumps(prefixes)
            group.attrs[PARTITION_IDS] = json.dumps({p: shapes.identity(p) for p in prefixes if p != SELF})
            identity = snap.record.identity
            dim, dtype = identity.feature_dim, FEATURE_DTYPES[identity.dtype]
            for split in [s for s in SPLITS if s in snap.rows or s in snap.skipped]:
                g = group.create_group(split)
                kinds = {"features": ((dim,), dtype), **{k: ((), v) for k, v in ROW_COLUMNS.items()}}
                for table in ROW_TABLES:
                    columns = {c: kinds[c] for c in TABLES[table]}
                    segments = getattr(snap, table).get(split, [])
                    _virtual_table(g, segments, prefixes, columns, "", paths, shapes, TABLE_SEGMENTS[table])
                skipped = {k: ((), v) for k, v in SKIPPED_COLUMNS.items()}
                group_skipped = g.create_group(SKIPPED)
                _virtual_table(group_skipped, snap.skipped.get(split, []), prefixes, skipped, SKIPPED, paths, shapes)


def _virtual_table(
    group: h5py.Group,
    segments: list[Segment],
    prefixes: dict[str, str],
    columns: dict[str, tuple],
    subgroup: str,
    paths: StorePaths,
    shapes: SourceShapes,
    segments_name: str = SEGMENTS,
) -> None:
    """One table of a split (a row table, or its skipped files): the segment table, and a virtual dataset per column
    mapping the segments in order (an empty table gets empty plain datasets)."""
    order = sorted(prefixes)
    table = np.asarray(
        [[order.index(s.partition), SPLITS.index(s.split), s.start, s.count] for s in segments], np.int64
    ).reshape(-1, 4)
    group.create_dataset(segments_name, data=table, chunks=(max(1, len(table)), 4), maxshape=(None, 4), fletcher32=True)
    total = int(table[:, 3].sum())
    for name, (tail, dtype) in columns.items():
        if not total:
            group.create_dataset(name, shape=(0, *tail), dtype=dtype)
            continue
        # HDF5's own calls, not h5py.VirtualLayout: that copies a selection per mapping, 0.3 ms each, and a root
        # of a thousand segments (files removed here and there) took seconds to write.
        dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        tid = h5py.h5t.py_create(np.dtype(dtype), logical=True)
        if name in FILL:
            dcpl.set_fill_value(np.array(FILL[name], dtype=dtype))
        space = h5py.h5s.create_simple((total, *tail))
        row = 0
        for s in segments:
            dataset = source_dataset(prefixes[s.partition], s.split, name, subgroup)
            shape, _ = shapes.get(s.partition, dataset)
            source = s.partition if s.partition == SELF else paths.source_name(s.partition)
            space.select_hyperslab((row, *(0 for _ in tail)), (s.count, *tail))
            source_space = h5py.h5s.create_simple(shape)
            source_space.select_hyperslab((s.start, *(0 for _ in tail)), (s.count, *tail))
            dcpl.set_virtual(space, source.encode(), dataset.encode(), source_space)
            row += s.count
        h5py.h5d.create(group.id, name.encode(), tid, h5py.h5s.create_simple((total, *tail)), dcpl=dcpl)


def mapping_problem(f: h5py.File, snapshot: Snapshot, paths: StorePaths) -> str | None:
    """Where a version-2 root's virtual datasets map other rows than its segment tables say (the two are written
    together from one snapshot, so any difference is damage), described; None when they agree. Reads the mappings
    only, never a row."""
    for name, snap in snapshot.sets.items():
        group = f[SETS][name]
        for split in [s for s in SPLITS if s in group]:
            tables = [*((t, "", TABLES[t]) for t in ROW_TABLES), ("skipped", SKIPPED, SKIPPED_COLUMNS)]
            for table, sub, columns in tables:
                where = group[split][sub] if sub else group[split]
                segments = getattr(snap, table).get(split, [])
                for column in columns:
                    problem = _column_problem(where, column, segments, snap.prefixes, sub, paths)
                    if problem:
                        return f"{name}/{split}/{sub + '/' if sub else ''}{column} {problem}"
    return None


def _column_problem(
    group: h5py.Group, column: str, segments: list[Segment], prefixes: dict, sub: str, paths: StorePaths
) -> str | None:
    if column not in group:
        return "is missing"
    ds, total = group[column], sum(s.count for s in segments)
    if not ds.shape or ds.shape[0] != total:
        return f"has {ds.shape[0] if ds.shape else 0} rows where its segments hold {total}"
    if not total:
        return None
    if not ds.is_virtual:
        return "is not a virtual dataset"
    dcpl = ds.id.get_create_plist()
    if dcpl.get_virtual_count() != len(segments):
        return f"maps {dcpl.get_virtual_count()} runs of rows where its segment table lists {len(segments)}"
    row = 0
    for i, s in enumerate(segments):
        source = (dcpl.get_virtual_filename(i), dcpl.get_virtual_dsetname(i))
        expected = (paths.source_name(s.partition), source_dataset(prefixes.get(s.partition, ""), s.split, column, sub))
        (src_lo, *_), (src_hi, *_) = dcpl.get_virtual_srcspace(i).get_select_bounds()
        (dst_lo, *_), (dst_hi, *_) = dcpl.get_virtual_vspace(i).get_select_bounds()
        bounds = (src_lo, src_hi, dst_lo, dst_hi)
        if source != expected or bounds != (s.start, s.start + s.count - 1, row, row + s.count - 1):
            return f"maps rows {dst_lo}-{dst_hi} to {source[0]} rows {src_lo}-{src_hi}, its segment table otherwise"
        row += s.count
    return None


def source_dataset(prefix: str, split: str, name: str, subgroup: str = "") -> str:
    """A column's dataset inside a partition: PREFIX/SPLIT[/skipped]/NAME."""
    return "/".join(part for part in (prefix.strip("/"), split, subgroup, name) if part)


def partition_rows(paths: StorePaths, snapshot: SetSnapshot, partition: str) -> int:
    """Feature rows a partition holds for a set, live or dead (all its splits; an overlay partition holds none)."""
    path = paths.store if partition == SELF else paths.parts / partition
    prefix = snapshot.prefixes.get(partition, "")
    with open_partition_file(path) as f:
        base = f[prefix] if prefix else f
        return sum(base[s]["features"].shape[0] for s in SPLITS if s in base and "features" in base[s])
