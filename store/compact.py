"""Compaction and garbage collection: what keeps a growing store small and fast to read.

Removing or changing files only unmaps their rows (they are never read again); compaction reclaims their bytes by
rewriting the partitions whose dead share passes a threshold, and merges small partitions (one per update) into
larger ones, so that a read opens few files. It rewrites those partitions alone, never the store. Partitions it
replaces are deleted only once no reader holds a root that maps them (collect_garbage).
"""

from __future__ import annotations

import os
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from store.locks import unheld
from store.partition_file import delete, open_partition_file
from store.paths import StorePaths
from store.reader import open_root
from store.schema import OVERLAYS, ROW_COLUMNS, SKIPPED, SKIPPED_COLUMNS, STR, TABLE_OF
from store.snapshot import (
    ROW_TABLES,
    SELF,
    Locator,
    Segment,
    SetSnapshot,
    Snapshot,
    SourceShapes,
    merge_segments,
    partition_rows,
    read_snapshot,
)
from store.writer import PartitionSplit, switch_root, write_copied_partition

# Each point of dead share is a point of disk: 0.08 keeps the disk within 1.09x the live rows (bench scale: 1.02x
# and less after its updates).
DEAD_SHARE = 0.08
# Reading through many holes is not free: a read through the root decodes a chunk once per run of live rows that
# touches it (bench scale: a plain read at 0.62x the rate of one array when 1,000 removals cut 90,000 rows into runs
# of 90, 0.87x at runs of 900). A partition whose live rows average shorter runs than this is rewritten, when it
# is no larger than compaction's own partitions: an update never rewrites more than TARGET_ROWS rows for it (a
# version-1 store taken over is one large partition, and rewriting it would cost what v1 cost: 30 s at 1e6 rows).
FRAGMENT_ROWS = 8192
SMALL_ROWS = 65536  # a partition with fewer live rows is small: updates make them, compaction merges them
MERGE_WIDTH = 8  # small partitions are merged once there are this many
TARGET_ROWS = 262144  # the rows of a partition compaction writes (about 0.7 GB of Lite0 features in float16)


@dataclass
class CompactResult:
    """What a compaction did: partitions rewritten and written, rows copied, and the partitions deleted (those of
    earlier compactions that no reader held any more)."""

    rewritten: list[str] = field(default_factory=list)
    written: list[str] = field(default_factory=list)
    rows_copied: int = 0
    deleted: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_json(self) -> dict:
        return {k: getattr(self, k) for k in ("rewritten", "written", "rows_copied", "deleted", "seconds")}


def candidates(paths: StorePaths, snap: SetSnapshot, dead_share: float = DEAD_SHARE) -> list[str]:
    """The partitions of a set worth rewriting, oldest first: those whose dead share reaches `dead_share` or whose
    live rows are cut into runs shorter than FRAGMENT_ROWS on average, and the small ones once there are
    MERGE_WIDTH of them (a legacy version-1 file is rewritten only for its dead rows or its runs)."""
    live = snap.live_rows()
    runs: dict[tuple[str, str], list[int]] = {}  # (partition, its split): [live rows, runs of them]
    for segments in snap.rows.values():
        for s in segments:
            counts = runs.setdefault((s.partition, s.split), [0, 0])
            counts[0] += s.count
            counts[1] += 1
    cut = {p for (p, _), (rows, n) in runs.items() if rows >= FRAGMENT_ROWS and rows / n < FRAGMENT_ROWS}
    skipped_only = {s.partition for segs in snap.skipped.values() for s in segs} - set(live)
    dead, small = [], []
    overlays = snap.overlay_partitions()  # rows of other partitions' files: they go when those rows are rewritten
    for partition in sorted(set(live) | skipped_only):
        if partition == SELF or partition in overlays:
            continue
        total = partition_rows(paths, snap, partition)
        rows = live.get(partition, 0)
        if total and (total - rows) / total >= dead_share:
            dead.append(partition)
        elif partition in cut and total <= TARGET_ROWS:
            dead.append(partition)  # cut into short runs: rewritten (at most TARGET_ROWS), read at full speed again
        elif rows < SMALL_ROWS and not partition.startswith("legacy-"):
            small.append(partition)
    return sorted(dead + (small if len(small) >= MERGE_WIDTH else []))


def compact_set(
    paths: StorePaths,
    snap: SetSnapshot,
    chosen: list[str],
    feature_dim: int,
    feature_dtype: str,
    target_rows: int = TARGET_ROWS,
) -> tuple[SetSnapshot, list[str], int]:
    """Rewrite the live rows of the chosen partitions (in the order the set maps them) into new partitions of up
    to TARGET_ROWS rows; returns the set's new snapshot, the partitions written and the rows copied."""
    files: dict[str, h5py.File] = {}

    def group(partition: str, split: str, subgroup: str = "") -> h5py.Group:
        if partition not in files:
            files[partition] = open_partition_file(paths.parts / partition)
        prefix = snap.prefixes.get(partition, "")
        g = (files[partition][prefix] if prefix else files[partition])[split]
        return g[subgroup] if subgroup else g

    chosen_set = set(chosen)
    outputs: list[dict[str, PartitionSplit]] = [{}]
    names = [paths.new_partition(snap.name, 0, compacted=True)]
    mapping: dict[tuple, tuple[int, int]] = {}  # (table, split, segment index) -> (output, start in its split)
    filled = 0
    read: dict[tuple, np.ndarray] = {}
    written: list[str] = []

    def write(i: int) -> None:  # an output as soon as it is full: what is held stays one partition's columns
        if outputs[i]:
            classes = snap.record.classes
            write_copied_partition(names[i], snap.name, classes, outputs[i], group, feature_dim, feature_dtype)
            written.append(names[i].name)
        outputs[i] = {}

    try:
        for table in ("rows", "skipped"):
            spec, sub = (ROW_COLUMNS, "") if table == "rows" else (SKIPPED_COLUMNS, SKIPPED)
            for split, segments in getattr(snap, table).items():
                overlays = {t: Locator(getattr(snap, t).get(split, [])) for t in OVERLAYS}
                for i, (s, at) in enumerate(zip(segments, Locator(segments).offsets)):
                    if s.partition not in chosen_set:
                        continue
                    if table == "rows" and filled and filled + s.count > target_rows:
                        write(len(outputs) - 1)
                        outputs.append({})
                        names.append(paths.new_partition(snap.name, len(names), compacted=True))
                        filled = 0
                    out = outputs[-1].setdefault(
                        split, PartitionSplit([], {k: [] for k in ROW_COLUMNS}, {k: [] for k in SKIPPED_COLUMNS})
                    )
                    columns = out.columns if table == "rows" else out.skipped
                    mapping[table, split, i] = (len(outputs) - 1, len(columns["paths"]))
                    for name in spec:  # a location or a label as its overlay maps it: the rows' own are stale
                        where = TABLE_OF[name] if table == "rows" else "rows"
                        for source in [s] if where == "rows" else overlays[where].locate(at, s.count):
                            key = (source.partition, source.split, sub, name)
                            if key not in read:  # a column read once, not once per segment (a thousand, at times)
                                read[key] = group(source.partition, source.split, sub)[name][()]
                            values = read[key][source.start : source.start + source.count]
                            text = spec[name] is STR
                            columns[name] += [v.decode() if text and isinstance(v, bytes) else v for v in values]
                    if table == "rows":
                        out.copies.append(s)
                        filled += s.count
        write(len(outputs) - 1)
    finally:
        for f in files.values():
            f.close()
    new = SetSnapshot(snap.name, snap.attrs, {**{p: v for p, v in snap.prefixes.items() if p not in chosen_set}})
    for name in written:
        new.prefixes[name] = ""
    copied = 0
    for table in ("rows", "skipped"):
        for split, segments in getattr(snap, table).items():
            mapped = {t: [] for t in (ROW_TABLES if table == "rows" else ["skipped"])}
            overlays = {t: Locator(getattr(snap, t).get(split, [])) for t in OVERLAYS}
            for i, (s, at) in enumerate(zip(segments, Locator(segments).offsets)):
                if (table, split, i) in mapping:
                    out, start = mapping[table, split, i]
                    for t in mapped:
                        mapped[t].append(Segment(names[out].name, split, start, s.count))
                    copied += s.count if table == "rows" else 0
                else:
                    for t in mapped:
                        mapped[t] += [s] if t in ("rows", "skipped") else overlays[t].locate(at, s.count)
            for t, segs in mapped.items():
                getattr(new, t)[split] = merge_segments(segs)
    return new, written, copied


def compact(paths: StorePaths, dead_share: float = DEAD_SHARE, target_rows: int = TARGET_ROWS) -> CompactResult:
    """Compact every set of a store that needs it, in one root switch, then collect garbage. The caller holds the
    writer's lock."""
    started = time.perf_counter()
    result = CompactResult()
    with open_root(paths.store) as root:
        old = read_snapshot(root)
    if old.version != 2:  # a version-1 store is one file: its first update makes it a partition
        return result
    new = Snapshot(sets=dict(old.sets))
    for name, snap in old.sets.items():
        chosen = candidates(paths, snap, dead_share)
        if not chosen:
            continue
        identity = snap.record.identity
        dim, dtype = identity.feature_dim, identity.dtype
        new.sets[name], written, copied = compact_set(paths, snap, chosen, dim, dtype, target_rows)
        result.rewritten += chosen
        result.written += written
        result.rows_copied += copied
    if result.rewritten:
        switch_root(paths, old, new, SourceShapes(paths, paths.store))
    result.deleted = collect_garbage(paths)
    result.seconds = round(time.perf_counter() - started, 3)
    return result


def collect_garbage(paths: StorePaths) -> list[str]:
    """Delete the partitions of retired roots that the current root no longer maps, once no reader holds any root
    that maps them: a reader holds a shared lock on the root it opened (this project's readers, and plain h5py's
    own file locking), so a retired root that takes an exclusive lock has none. Partitions of a feature set the
    current root does not hold at all (a root rebuilt for another set) are kept: a featurize of that set rebuilds
    its mapping from them. Returns what was deleted."""
    if not paths.store.exists():
        return []
    with open_root(paths.store) as root:
        current = read_snapshot(root)
    keep, sets = current.partitions(), set(current.sets)
    freed, held = [], set()
    for retired in paths.retired_roots():
        try:  # never a FIFO or a link, even one swapped in since the listing: no hang, nothing followed
            fd = os.open(retired, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
        except OSError:
            continue
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            continue
        free = unheld(fd)
        try:
            with h5py.File(retired, "r", locking=False) as f:
                snapshot = read_snapshot(f)
        except (OSError, KeyError, ValueError):
            snapshot = Snapshot()
        mapped = snapshot.partitions() - {SELF}
        held |= {p for name, snap in snapshot.sets.items() if name not in sets for p in snap.partitions()}
        if free:
            freed.append((retired, fd, mapped))
        else:
            held |= mapped
            os.close(fd)
    deleted = []
    for retired, fd, mapped in freed:
        for partition in sorted(mapped - keep - held):
            delete(paths.parts / partition)
            deleted.append(partition)
        retired.unlink(missing_ok=True)  # while still locked: no reader can take it meanwhile
        os.close(fd)
    # A version-1 file taken over is a hard link among the partitions: once no root maps it (its rows all written
    # anew), or when a takeover was killed before its root switch, it is garbage like any dropped partition. (Other
    # unmapped partitions are committed work that a rerun adopts.)
    for legacy in [p for p in paths.partitions() if StorePaths.is_legacy(p) and p not in keep | held]:
        if _holds_only(paths.parts / legacy, sets):
            delete(paths.parts / legacy)
            deleted.append(legacy)
    return deleted


def _holds_only(legacy: Path, sets: set[str]) -> bool:
    """Whether a version-1 file holds no feature set but these (an unreadable one is left for a person)."""
    try:
        with open_partition_file(legacy) as f:
            return set(f["sets"]) <= sets if "sets" in f else True
    except OSError:
        return False
