"""The never-stale engine: what a data folder needs from a store's feature set, the partitions of work done, and the
snapshot that maps them.

    with StoreSync(paths, set_name, classes) as sync:  # the live snapshot and this set's partitions not mapped yet
        todo = sync.plan(dataset, views)               # each file: keep its rows, keep its known-bad record, compute
        ...                                            # computed rows go to sync.commit(rows, dtype) as they come
        result = sync.finish(attrs, feature_dim, dtype)  # the root switched to map them, unless up to date

A file's rows are kept when its size, mtime and ctime match the recorded ones, or, when only the times moved, when
its content hash does, or when the store holds its bytes under another path (moved, renamed, copied). Rows are
looked up in the live snapshot first, in the file's split and, without augmented views, in any split (a file moved
by --valid-pct keeps its rows), then in partitions no root maps yet (work of killed runs and of shards, newest
first), then by content. A kept file whose location (path, times) or label changed keeps its feature rows where they
lie: only its location or label columns are written, into one small overlay partition (schema.TABLES). Bytes that
fail verification are never used: their files are computed again.
"""

from __future__ import annotations

import itertools
import json
import operator
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from stages.bulk import collector_paused
from stages.errors import PipelineError
from stages.files import Dataset, Fingerprint, ImageFile, content_sha256, stat_fingerprint
from store.partition_file import delete, open_partition_file, set_aside
from store.paths import StorePaths
from store.reader import (
    ROOT,
    FileRows,
    decode_strings,
    foreign_object,
    lost_partitions,
    open_root,
    split_file_index,
    split_skipped,
    stat_columns,
)
from store.schema import LABELLING, OVERLAYS, SETS, SKIPPED, SPLITS, FileRecord
from store.snapshot import (
    ROW_TABLES,
    SELF,
    Locator,
    Segment,
    SetSnapshot,
    Snapshot,
    SourceShapes,
    merge_segments,
    read_snapshot,
)
from store.verify import verify_split
from store.writer import OverlaySplit, PartitionWriter, SplitRows, switch_root, write_overlay_partition


def views_in(split: str, views: int) -> int:
    """Augmented views are stored for training images only; valid and test keep the plain view."""
    return views if split == "train" else 0


def rows_per_file(split: str, views: int) -> int:
    return views_in(split, views) + 1


LIVE, PENDING = "live", "pending"  # rows the root maps; a partition no root maps yet
# An overlay table written piecemeal may map at most this many more runs than the content (each costs a mapping in
# every later root, and a check when a reader opens it) and this many overlay partitions; past that, the split's
# whole table is written anew (4 bytes a row for labels: 4 MB at a million rows).
OVERLAY_RUNS = 256
OVERLAY_PARTITIONS = 8
_label_of = operator.itemgetter(1)  # an ImageFile's label (a named tuple: no Python call per file)


@dataclass
class Source:
    """Where rows can be kept from: the live snapshot (the root's split groups, in its row order), or a partition
    no root maps yet (its own split groups)."""

    name: str  # LIVE, or the partition's file name
    groups: dict[str, h5py.Group]
    classes: list[str]  # the classes its labels index


@dataclass
class FileDecision:
    """What the run does with one current file of a split."""

    label: int
    fingerprint: Fingerprint
    source: str | None = None  # the Source its rows lie in
    source_split: str | None = None  # the split of the source they lie in
    rows: FileRows | None = None
    skip_reason: str | None = None
    skip_source: tuple[str, str, int] | None = None  # (source, split, row) of a kept skipped-file record
    moved: bool = False  # kept rows whose location (path, mtime, ctime) is written anew: moved, renamed, touched
    relabelled: bool = False  # kept rows whose label is written anew
    by_content: bool = False  # its rows found by its content hash, under another path

    def record(self, path: str) -> FileRecord:
        fp = self.fingerprint
        sha256 = fp.sha256 or (self.rows.sha256 if self.rows is not None else "")
        return FileRecord(path, self.label, fp.size, fp.mtime_ns, fp.ctime_ns, sha256)


@dataclass
class SyncResult:
    """The set's content after a run: its images and rows per split, the files skipped with their reasons, and
    whether the store was already up to date (then nothing was written)."""

    images: dict[str, int]
    rows: dict[str, int]
    skipped: list[dict]
    up_to_date: bool
    snapshot: Snapshot | None = field(default=None, repr=False)


def open_partition(paths: StorePaths, name: str, prefix: str = "") -> tuple[h5py.File | None, str | None]:
    """A partition read directly (no root maps it yet, or the root lost another), opened and verified (its splits
    under `prefix`); a damaged one is renamed PART.damaged (its images are then computed again) and said in a note."""
    part = paths.parts / name
    try:
        f = open_partition_file(part)
        try:
            foreign = foreign_object(f)
            base = f[prefix] if prefix else f
            damage = {"part": foreign} if foreign else {s: verify_split(base[s]) for s in base if s in SPLITS}
        except (OSError, KeyError) as exc:
            damage = {"part": str(exc).splitlines()[0][:80]}
        if not any(damage.values()):
            return f, None
        f.close()
        reason = "; ".join(f"{s}: {d.describe() if hasattr(d, 'describe') else d}" for s, d in damage.items() if d)
    except OSError as exc:
        reason = str(exc).splitlines()[0][:80]
    return None, f"partition {part} is damaged ({reason}); set aside as {set_aside(part)}, its images featurized again"


class StoreSync:
    """Brings one feature set of a store up to date with a data folder, for one shard of the work."""

    def __init__(self, paths: StorePaths, set_name: str, classes: list[str], verify: bool = False):
        self.paths, self.set_name, self.verify = paths, set_name, verify
        self.writer = PartitionWriter(paths, set_name, classes)
        self.sources: list[Source] = []  # live first, then unmapped partitions newest first
        self.damaged: dict[tuple[str, str], set[str] | None] = {}  # (source, split): paths not to keep; None: all
        self.notes: list[str] = []  # what was found damaged and repaired
        self.decisions: dict[str, dict[str, FileDecision]] = {}
        self.todo: list[tuple[str, ImageFile]] = []
        self.unchanged: SyncResult | None = None  # plan's answer when nothing changed, found column against column
        self.dataset: Dataset | None = None
        self.views = 0
        self.root: h5py.File | None = None
        self.snapshot: Snapshot | None = None
        self.live: SetSnapshot | None = None
        self.lost: dict[str, str] = {}  # partitions the live snapshot maps that are gone or unreadable: why
        self.root_damage: str | None = None  # the root's mappings disagree with its tables: why
        self._files: dict[str, h5py.File] = {}  # open partitions
        self._checked: dict[tuple, object] = {}

    # Opening: the live snapshot and the unmapped partitions, each verified ---------------------------------------
    def __enter__(self) -> StoreSync:
        self.notes += [
            f"{self.paths.parts.name}/{name} is not a regular file: ignored (never opened); remove it"
            for name in self.paths.strangers()
        ]
        if self.paths.store.exists() and not self._root_unreadable():
            gone: dict[str, str] = {}
            self.root = open_root(self.paths.store, missing=gone)
            self.snapshot = read_snapshot(self.root)
            self.live = self.snapshot.sets.get(self.set_name)
            self.root_damage = gone.pop(ROOT, None)
            mine = self.live.partitions() if self.live else set()
            self.lost = {name: why for name, why in gone.items() if name in mine}
            self._refuse_lost_elsewhere({name: why for name, why in gone.items() if name not in mine})
        if self.live is not None and (self.lost or self.root_damage):
            self._repair()
        elif self.live is not None:
            groups = {split: self.root[f"sets/{self.set_name}/{split}"] for split in self.live.rows}
            self.sources.append(Source(LIVE, groups, self.live.record.classes))
            if self.verify:
                self._verify_live(groups)
        mapped = self.snapshot.partitions() if self.snapshot else set()
        # No root maps this set (a new set, or a root lost): every partition of it is a source, a compaction's and
        # a version-1 file's included, so a lost root is rebuilt from its partitions without computing anything.
        rebuilding = self.live is None
        for name in reversed(self.paths.partitions(None if rebuilding else self.set_name)):
            if name in mapped:
                continue
            if StorePaths.is_legacy(name):
                if rebuilding:
                    self._add_pending(name, prefix=f"/{SETS}/{self.set_name}", optional=True)
            elif rebuilding:
                if StorePaths.set_of(name) == self.set_name and StorePaths.overlay(name):
                    delete(self.paths.parts / name)  # locations and labels of a lost mapping: the scan says them anew
                elif StorePaths.set_of(name) == self.set_name:
                    self._add_pending(name)
            elif StorePaths.compacted(name) or StorePaths.overlay(name):  # a killed compaction's or sync's: rows
                delete(self.paths.parts / name)  # live elsewhere, never work to keep
            else:
                self._add_pending(name)
        return self

    def _root_unreadable(self) -> bool:
        """A root HDF5 cannot open, beside partitions (so it is a store's): set aside as a partition-folder file
        ROOT-TIME.damaged, and the store rebuilt from its partitions. A file that never was a store's root is
        refused by open_root, never replaced."""
        if not self.paths.partitions():
            return False
        try:
            with h5py.File(self.paths.store, "r", locking=False) as f:
                read_snapshot(f)
            return False
        except (OSError, KeyError, ValueError) as exc:
            aside = self.paths.parts / f"root-{time.time_ns()}.damaged"
            os.replace(self.paths.store, aside)
            self.notes.append(
                f"store {self.paths.store}: its root cannot be read ({str(exc).splitlines()[0][:80]}); set aside as "
                f"{self.paths.parts.name}/{aside.name}, the store rebuilt from its partitions"
            )
            return True

    def __exit__(self, *exc) -> None:
        for f in self._files.values():
            f.close()
        if self.root is not None:
            self.root.close()

    def _refuse_lost_elsewhere(self, gone: dict[str, str]) -> None:
        """Partitions of other feature sets lost: this run cannot compute their rows, and readers refuse the store."""
        if gone:
            name = min(gone)
            owner = next((s for s, snap in self.snapshot.sets.items() if name in snap.partitions()), "?")
            raise lost_partitions(self.paths.store, self.paths, gone, owner)

    def _repair(self) -> None:
        """The live snapshot lost partitions, or its root disagrees with itself: the root's virtual datasets are
        not read (they would give fill values, or other rows); the partitions it still has are sources read
        directly, each verified, and the images whose rows were lost are featurized again."""
        if self.root_damage:
            self.notes.append(f"store {self.paths.store}: its root {self.root_damage}; rebuilt from its partitions")
        for name, why in sorted(self.lost.items()):
            part = self.paths.parts / name
            aside = f", set aside as {set_aside(part)}" if part.exists() else ""
            self.notes.append(
                f"store {self.paths.store}: {self.paths.parts.name}/{name} {why}{aside}; the images whose rows it "
                "held are featurized again"
            )
        for name in sorted(self.live.partitions() - set(self.lost)):
            self._add_pending(name, prefix=self.live.prefixes.get(name, ""))

    def _add_pending(self, name: str, first: bool = False, prefix: str = "", optional: bool = False) -> None:
        """A partition read directly as a source of rows (verified). optional: one that may not hold this set (a
        version-1 file holds several). An overlay partition holds no rows: never a source."""
        if StorePaths.overlay(name):
            return
        if optional:
            with open_partition_file(self.paths.parts / name) as f:
                if prefix.strip("/") not in f:
                    return
        opened, note = open_partition(self.paths, name, prefix)
        if note:
            self.notes.append(note)
            return
        self._files[name] = opened
        base = opened[prefix] if prefix else opened
        source = Source(name, {s: base[s] for s in base if s in SPLITS}, json.loads(base.attrs["classes"]))
        self.sources.insert(1 if first and self.live is not None else len(self.sources), source)

    def _verify_live(self, groups: dict[str, h5py.Group]) -> None:
        """Check every byte of every partition the live snapshot maps for this set (featurize --verify; readers
        check what they read): the files whose rows fail are computed again."""
        where = f"store {self.paths.store}"
        for split, group in groups.items():
            paths = group["paths"][()]
            bad: set[str] = set()
            offset = 0
            for segment in self.live.rows.get(split, []):
                damage = self._partition_damage(segment.partition, segment.split)
                end = segment.start + segment.count
                for a, b in [(segment.start, end)] if damage.columns else damage.rows:
                    lo, hi = offset + max(a, segment.start) - segment.start, offset + min(b, end) - segment.start
                    bad.update(p.decode() if isinstance(p, bytes) else p for p in paths[lo:hi])
                offset += segment.count
            if any(self._partition_damage(s.partition, s.split).columns for s in self.live.rows.get(split, [])):
                self.damaged[LIVE, split] = None  # a column of it cannot be read: every image of the split again
                self.notes.append(
                    f"{where} {split}: a column failed verification; every {split} image is featurized again"
                )
            elif bad:
                self.damaged[LIVE, split] = bad
                self.notes.append(
                    f"{where} {split}: rows failed verification; featurized again: "
                    f"{', '.join(sorted(bad)[:5])}{' ...' if len(bad) > 5 else ''}"
                )

    def _partition_damage(self, partition: str, split: str):
        """What fails verification in a partition's split group (checked once per run)."""
        key = ("damage", partition, split)
        if key not in self._checked:
            self._checked[key] = verify_split(self._open(partition, split))
        return self._checked[key]

    def _indexes(self, split: str) -> list[Index]:
        """Per source holding the split: (name, split, file index, skipped index, labels need remapping)."""
        found = []
        for source in self.sources:
            group = source.groups.get(split)
            bad = self.damaged.get((source.name, split), set())
            if group is None or bad is None:
                continue
            try:
                index = {k: v for k, v in split_file_index(group).items() if k not in bad}
                skipped = {k: v for k, v in split_skipped(group).items() if k not in bad}
            except OSError as exc:  # a checksum failed: featurize --verify finds what, and computes it again
                raise PipelineError(
                    f"store {self.paths.store} is damaged ({split}: {str(exc).splitlines()[0][:80]}); run pipeline "
                    "featurize again with --verify to compute the damaged rows again"
                ) from None
            found.append((source.name, split, index, skipped, source.classes != self.dataset.classes))
        return found

    # Planning: what each current file needs ----------------------------------------------------------------------
    def plan(self, dataset: Dataset, views: int) -> list[tuple[str, ImageFile]]:
        """Decide for every current file; return (split, file) of those to compute, in data-set order."""
        self.dataset, self.views = dataset, views
        with collector_paused():  # a file is a few tuples and strings
            return self._plan()

    def _plan(self) -> list[tuple[str, ImageFile]]:
        self.unchanged = self._unchanged()
        if self.unchanged is not None:
            return []
        indexes = {split: self._indexes(split) for split in SPLITS}
        self.decisions, self.todo = plan_files(self.dataset, self.views, indexes)
        return self.todo

    def _unchanged(self) -> SyncResult | None:
        """The up-to-date answer when every current file is the live snapshot's, in its own split, with the
        recorded size, mtime and ctime, and the snapshot holds nothing else; None when anything differs (then each
        file is decided by itself). Column against column, from the scan's stats: a rerun over millions of files
        costs the scan."""
        live, dataset = self.live, self.dataset
        if live is None or self.lost or len(self.sources) > 1 or self.damaged or set(live.rows) != set(dataset.splits):
            return None
        if live.record.classes != dataset.classes or self._labelling_changed():
            return None
        images, rows, skipped = {}, {}, []
        for split, files in dataset.splits.items():
            group, count = self.sources[0].groups[split], rows_per_file(split, self.views)
            paths, stats = stat_columns(group)
            if len(paths) % count or np.any(paths.reshape(-1, count) != paths[::count, None]):
                return None  # a file with other than this run's rows per file
            kept, names, stats, reasons = len(paths) // count, list(paths[::count]), [stats[:, ::count]], []
            if SKIPPED in group:
                bad_paths, bad_stats = stat_columns(group[SKIPPED])
                names += list(bad_paths)
                stats.append(bad_stats)
                reasons = decode_strings(group[SKIPPED]["reasons"][()])
            if len(names) != len(files):
                return None
            now_paths, now = [f.path for f in files], [f.stat for f in files]
            if None in now:
                return None  # a file the scan could not stat: its decision says why
            if now_paths == names:  # stored in the scan's order, as a first run stores them
                order = np.arange(len(names))
            else:
                where = dict(zip(names, range(len(names))))
                if len(where) != len(names):
                    return None
                order = np.fromiter((where.get(p, -1) for p in now_paths), np.int64, len(files))
                if len(files) and order.min() < 0:
                    return None
            now = np.fromiter(itertools.chain.from_iterable(now), np.int64, 3 * len(now)).reshape(-1, 3)
            if not np.array_equal(np.concatenate(stats, axis=1)[:, order].T, now):
                return None
            rowed = order < kept  # files with rows (the rest have skipped records): their labels as stored
            if kept:
                now_labels = np.fromiter(map(_label_of, files), np.int64, len(files))
                if not np.array_equal(group["labels"][()][::count][order[rowed]], now_labels[rowed]):
                    return None
            images[split], rows[split] = kept, len(paths)
            bad = np.flatnonzero(order >= kept)  # files whose record is a skipped one
            records = (order[bad] - kept).tolist()  # which one
            skipped += _skipped(split, zip([now_paths[i] for i in bad.tolist()], [reasons[i] for i in records]))
        return SyncResult(images, rows, skipped, up_to_date=True)

    @property
    def reused(self) -> int:
        if self.unchanged is not None:
            return sum(self.unchanged.images.values())
        return sum(1 for split in self.decisions.values() for d in split.values() if d.source)

    @property
    def reused_by_content(self) -> int:
        """Of the reused files, those found by their content under another path (moved, renamed, copied)."""
        return sum(1 for split in self.decisions.values() for d in split.values() if d.by_content)

    # Finishing: the root switched to the new snapshot ------------------------------------------------------------
    def finish(self, attrs: Callable[[], dict], feature_dim: int, feature_dtype: str) -> SyncResult:
        """Map what the data folder needs: kept rows where they lie, this run's (and earlier runs' and shards')
        partitions, locations and labels written anew in an overlay partition; switch the root to it, unless nothing
        changed."""
        if self.unchanged is not None:
            return self.unchanged
        mapped = self.snapshot.partitions() if self.snapshot else set()
        known = {s.name for s in self.sources}
        for name in self.paths.partitions(self.set_name):
            if name not in mapped and name not in known and not name.startswith("legacy-"):
                self._add_pending(name, first=True)  # this run's and its shards': made for these very files
        self._resolve_computed()
        new = SetSnapshot(self.set_name, {}, dict(self.live.prefixes) if self.live else {})
        overlay = self.paths.new_partition(self.set_name, len(self.writer.written), overlay=True)
        overlays = {split: self._map_split(new, split, overlay.name) for split in self.dataset.splits}
        overlays = {split: o for split, o in overlays.items() if not o.empty}
        if overlays:
            self.paths.parts.mkdir(exist_ok=True)
            write_overlay_partition(overlay, self.set_name, self.dataset.classes, overlays)
            self.writer.written.append(overlay.name)
        result = self._summary()
        old = self.snapshot
        if old is not None and self.live is not None and self._same(new):  # a version-1 store too: read as it is
            result.up_to_date = True
        else:
            new.attrs = attrs()
            for name in new.partitions():
                new.prefixes.setdefault(name, "")
            result.snapshot = successor(self.paths, old, new)
            switch_root(self.paths, old, result.snapshot, SourceShapes(self.paths, self.paths.store))
        used, mapped = new.partitions(), old.partitions() if old else set()
        for source in self.sources:
            if source.name not in used and source.name not in mapped and source.name != LIVE:
                # Work superseded (computed again, or its file gone), never mapped. (What a root mapped is deleted
                # by compaction once no reader holds a root that maps it.)
                self._files.pop(source.name).close()
                delete(self.paths.parts / source.name)
        return result

    def _resolve_computed(self) -> None:
        """Files this run (or a shard) computed: their rows in the partitions just written."""
        fresh: dict[str, dict[str, tuple]] = {}
        for source in self.sources:
            if source.name == LIVE:
                continue
            for split, group in source.groups.items():
                for key, rows in split_file_index(group).items():
                    fresh.setdefault(split, {}).setdefault(key, (source.name, rows, source.classes))
                for key, bad in split_skipped(group).items():
                    fresh.setdefault(split, {}).setdefault(key, (source.name, bad, source.classes))
        for split, decisions in self.decisions.items():
            for path, d in decisions.items():
                if d.source is not None or d.skip_reason is not None or path not in fresh.get(split, {}):
                    continue
                name, found, classes = fresh[split][path]
                if isinstance(found, FileRows):
                    d.source, d.source_split, d.rows = name, split, found
                    d.fingerprint = Fingerprint(found.size, found.mtime_ns, found.sha256, found.ctime_ns)
                    d.relabelled = classes != self.dataset.classes
                else:
                    d.skip_reason, d.skip_source = found["reason"], (name, split, found["row"])
                    d.fingerprint = Fingerprint(found["size"], found["mtime_ns"], found["sha256"], found["ctime_ns"])

    def _map_split(self, new: SetSnapshot, split: str, overlay: str) -> OverlaySplit:
        """A split's new segments in every table: kept live rows in their live order first (those of files moved in
        from another split next), then rows kept from elsewhere, partition by partition (in the order each holds
        them); the order is history's, not the paths', and a file's views stay together. A file moved, touched or
        relabelled keeps its feature rows where they lie: its location or label rows go to the overlay partition
        (returned, written by the caller), the whole table of the split when piecemeal would cut it too fine."""
        kept: list[tuple[Segment, FileDecision, str]] = []
        out, skipped = OverlaySplit(), []
        for f in self.dataset.splits[split]:
            d = self.decisions[split][f.path]
            if d.skip_source is not None:
                skipped.append(Segment(*d.skip_source, 1))
            elif d.skip_reason is not None:  # a file that cannot even be read: recorded anew
                d.record(f.path).add_skipped(out.skipped, d.skip_reason)
            elif d.source is not None:
                kept.append((Segment(d.source, d.source_split, d.rows.start, d.rows.count), d, f.path))
        kept.sort(key=lambda k: _history_order(k[0], split))
        new.rows[split] = self._located("rows", [p for p, _, _ in kept])
        for table in OVERLAYS:
            anew = [d.moved if table == "location" else d.relabelled for _, d, _ in kept]
            segments = self._overlaid(table, kept, anew, overlay, split)
            overlaid = {s.partition for s in segments} - {s.partition for s in new.rows[split]}
            if len(segments) > len(new.rows[split]) + OVERLAY_RUNS or len(overlaid) > OVERLAY_PARTITIONS:
                anew = [True] * len(kept)
                segments = self._overlaid(table, kept, anew, overlay, split)
            for (pick, d, path), written in zip(kept, anew):
                if written:
                    out.add(table, d.record(path), pick.count)
            getattr(new, table)[split] = segments
        new.skipped[split] = self._located("skipped", sorted(skipped, key=lambda p: _history_order(p, split)))
        return out

    def _overlaid(
        self, table: str, kept: list[tuple[Segment, FileDecision, str]], anew: list[bool], overlay: str, split: str
    ) -> list[Segment]:
        """An overlay table's segments: the kept rows' own where unchanged, the overlay partition's where anew."""
        picks, row = [], 0
        for (pick, _, _), written in zip(kept, anew):
            if written:
                picks.append(Segment(overlay, split, row, pick.count))
                row += pick.count
            else:
                picks.append(pick)
        return self._located(table, picks)

    def _located(self, table: str, picks: list[Segment]) -> list[Segment]:
        """Picked runs (LIVE ones in the live snapshot's row order) as source segments of one table: runs joined
        first, so a million kept files cost a lookup per run, not per file."""
        located = []
        for p in merge_segments(picks):
            if p.partition != LIVE:
                located.append(p)
                continue
            key = ("locator", table, p.split)
            if key not in self._checked:
                self._checked[key] = Locator(getattr(self.live, table).get(p.split, []))
            located += self._checked[key].locate(p.start, p.count)
        return merge_segments(located)

    def _open(self, partition: str, split: str) -> h5py.Group:
        """A source partition's split group of this set (SELF: a version-1 store's own file)."""
        if partition not in self._files:
            path = self.paths.store if partition == SELF else self.paths.parts / partition
            self._files[partition] = open_partition_file(path)
        prefix = self.live.prefixes.get(partition, "") if self.live else ""
        f = self._files[partition]
        return (f[prefix] if prefix else f)[split]

    def _labelling_changed(self) -> bool:
        """Whether the data folder's label source says other than the set records (its kind, file or pattern, the
        digest of its labelling, its task): a multi-label or numeric table edited changes no row, only this record,
        which every head command checks the table against."""
        source = self.dataset.label_source
        described = source.describe() if source is not None else {}
        return any(self.live.attrs.get(k) != described.get(k) for k in LABELLING)

    def _same(self, new: SetSnapshot) -> bool:
        """True when the new mapping, the classes and the labelling are the live ones: nothing to write."""
        live = self.live
        if live.record.classes != self.dataset.classes or set(new.rows) != set(live.rows):
            return False
        if self._labelling_changed():
            return False
        tables = (*ROW_TABLES, "skipped")
        return all(getattr(new, t)[s] == merge_segments(getattr(live, t).get(s, [])) for t in tables for s in new.rows)

    def _summary(self) -> SyncResult:
        images, rows, skipped = {}, {}, []
        for split, files in self.dataset.splits.items():
            decisions = [(f.path, self.decisions[split][f.path]) for f in files]
            kept = [p for p, d in decisions if d.skip_reason is None and d.source is not None]
            images[split] = len(kept)
            rows[split] = len(kept) * rows_per_file(split, self.views)
            skipped += _skipped(split, [(p, d.skip_reason) for p, d in decisions if d.skip_reason])
        return SyncResult(images, rows, skipped, up_to_date=False)


Index = tuple[str, str, dict[str, FileRows], dict[str, dict], bool]  # StoreSync._indexes: one source's split


def plan_files(
    dataset: Dataset, views: int, indexes: dict[str, list[Index]]
) -> tuple[dict[str, dict[str, FileDecision]], list[tuple[str, ImageFile]]]:
    """The planner: for every current file, keep its rows, keep its known-bad record, or compute it; from the scan
    (each file's stat) and the store's columns alone (indexes per split: each source's rows and skipped records by
    path), reading nothing but the bytes of a file whose times moved while its size did not (its content hash
    decides). Returns the decisions per split and the (split, file) pairs to compute, in data-set order."""
    decisions: dict[str, dict[str, FileDecision]] = {}
    todo = []
    root = _joinable(dataset.root)
    content = ContentIndex(indexes)
    for split, files in dataset.splits.items():
        count = rows_per_file(split, views)
        # The same split first; with no augmented views a file's row is the same in any split.
        others = [s for s in SPLITS if s != split and rows_per_file(s, views) == count]
        candidates = [i for src in [split, *others] for i in indexes.get(src, [])]
        decisions[split] = {}
        for f in files:
            decision = _decide(f"{root}/{f.path}", f, candidates, count, content)
            if decision.source is None and decision.skip_reason is None:
                todo.append((split, f))
            decisions[split][f.path] = decision
    return decisions, todo


def _history_order(pick: Segment, split: str) -> tuple:
    """The order of a split's kept rows: its own live rows in their live order, then live rows of files moved in
    from another split, then rows from elsewhere, partition by partition."""
    if pick.partition == LIVE:
        return (0, pick.split != split, SPLITS.index(pick.split), "", pick.start)
    return (1, False, SPLITS.index(pick.split), pick.partition, pick.start)


def _joinable(root: Path) -> str:
    """The data folder as a string a file's POSIX relative path is joined to by hand (per file: no Path objects)."""
    return str(root).rstrip("/") or "/"


def _skipped(split: str, files: Iterable[tuple[str, str]]) -> list[dict]:
    """Skipped files of a split, (path, reason) each, as SyncResult (and featurize's --json) lists them."""
    return [{"split": split, "path": p, "reason": r} for p, r in files]


class ContentIndex:
    """Every stored file's rows by content (sha256 and rows per file), over all sources and splits: an image whose
    bytes the store holds is never decoded again, whatever its path, folder, split or label now is. Built on the
    first file that needs it (an up-to-date or path-matched run never does), and only files of a size some stored
    file has are hashed."""

    def __init__(self, indexes: dict[str, list[Index]]):
        self.indexes = indexes
        self._by_content: dict[tuple[str, int], tuple[str, str, FileRows, bool]] | None = None
        self._sizes: set[tuple[int, int]] = set()

    def _build(self) -> dict:
        if self._by_content is None:
            self._by_content = {}
            for entries in self.indexes.values():
                for name, src, index, _, relabel in entries:
                    for rows in index.values():
                        self._by_content.setdefault((rows.sha256, rows.count), (name, src, rows, relabel))
                        self._sizes.add((rows.size, rows.count))
        return self._by_content

    def may_hold(self, size: int, count: int) -> bool:
        self._build()
        return (size, count) in self._sizes

    def find(self, sha256: str, count: int) -> tuple[str, str, FileRows, bool] | None:
        """Where rows of these bytes lie (source, split, rows) and whether their labels index other classes."""
        return self._build().get((sha256, count))


def _decide(path: str, f: ImageFile, indexes: list, count: int, content: ContentIndex) -> FileDecision:
    if f.stat is not None:  # as the scan found it
        fp = Fingerprint.of(f.stat)
    else:
        try:
            fp = stat_fingerprint(path)
        except OSError as exc:
            return _unreadable(f, indexes, f"cannot read: {exc.strerror}")
    decision = FileDecision(f.label, fp)
    same_size = False
    for name, src, index, skipped, relabel in indexes:
        rows, bad = index.get(f.path), skipped.get(f.path)
        if rows and rows.count == count and fp.same_stat(rows.size, rows.mtime_ns, rows.ctime_ns):
            decision.source, decision.source_split, decision.rows = name, src, rows
            decision.relabelled = relabel or rows.label != f.label  # compared every run, never assumed
            return decision  # its content hash is the rows' (FileDecision.record)
        if bad and fp.same_stat(bad["size"], bad["mtime_ns"], bad["ctime_ns"]):
            return _kept_skipped(decision, name, src, bad)
        same_size |= bool(rows and rows.count == count and rows.size == fp.size)
    if not same_size and not content.may_hold(fp.size, count):
        return decision  # bytes the store has never seen: computed
    try:
        sha = content_sha256(Path(path).read_bytes())
    except OSError:
        return decision
    for name, src, index, _, relabel in indexes:  # touched but unchanged, at its own path, first
        rows = index.get(f.path)
        if rows and rows.count == count and rows.sha256 == sha:
            decision.source, decision.source_split, decision.rows = name, src, rows
            decision.fingerprint = fp.with_sha256(sha)
            decision.moved = True  # the same features under new times: its location written anew
            decision.relabelled = relabel or rows.label != f.label
            return decision
    found = content.find(sha, count)  # moved, renamed, copied or relabelled: the same bytes, the same features
    if found is not None:
        decision.source, decision.source_split, decision.rows, relabel = found
        decision.fingerprint = fp.with_sha256(sha)
        decision.moved = decision.by_content = True  # its location written anew, and its label where it differs
        decision.relabelled = relabel or decision.rows.label != f.label
    return decision


def _unreadable(f: ImageFile, indexes: list, reason: str) -> FileDecision:
    """A file that cannot be stat'ed (a broken symlink): skipped, under its earlier record when that says the same,
    so a folder holding one is up to date on a rerun."""
    decision = FileDecision(f.label, Fingerprint(0, 0), skip_reason=reason)
    for name, src, _, skipped, _ in indexes:
        bad = skipped.get(f.path)
        if (
            bad
            and bad["reason"] == reason
            and decision.fingerprint.same_stat(bad["size"], bad["mtime_ns"], bad["ctime_ns"])
        ):
            return _kept_skipped(decision, name, src, bad)
    return decision


def _kept_skipped(decision: FileDecision, name: str, src: str, bad: dict) -> FileDecision:
    """The decision to keep a file's skipped-file record (source `name`, split `src`) as it is."""
    decision.skip_reason, decision.skip_source = bad["reason"], (name, src, bad["row"])
    decision.fingerprint = decision.fingerprint.with_sha256(bad["sha256"])
    return decision


def successor(paths: StorePaths, old: Snapshot | None, new: SetSnapshot) -> Snapshot:
    """The next snapshot: the old one with this set replaced. A version-1 store becomes a partition (a hard link
    to its file: its rows are never copied) and every set it held maps its rows there."""
    sets = dict(old.sets) if old is not None else {}
    if old is not None and old.version == 1:
        legacy = paths.legacy_partition()
        paths.parts.mkdir(exist_ok=True)
        os.link(paths.store, legacy)
        sets = {name: _rename(snap, SELF, legacy.name) for name, snap in sets.items()}
        new = _rename(new, SELF, legacy.name)
    sets[new.name] = new
    return Snapshot(sets=sets)


def _rename(snap: SetSnapshot, old: str, new: str) -> SetSnapshot:
    """A set's snapshot with one partition renamed (the version-1 file, now a partition)."""

    def moved(segments: list[Segment]) -> list[Segment]:
        return [s._replace(partition=new) if s.partition == old else s for s in segments]

    prefixes = {(new if k == old else k): (f"/sets/{snap.name}" if k == old else v) for k, v in snap.prefixes.items()}
    tables = {t: {split: moved(s) for split, s in getattr(snap, t).items()} for t in (*ROW_TABLES, "skipped")}
    return SetSnapshot(snap.name, snap.attrs, prefixes, **tables)


@dataclass
class PendingRows:
    """Rows computed since the last commit, per split."""

    splits: list[str]
    rows: dict[str, SplitRows] = field(default_factory=dict)
    count: int = 0

    def __post_init__(self) -> None:
        self.clear()

    def add(self, split: str, record: FileRecord, features: np.ndarray, views: int) -> None:
        self.rows[split].features.append(features)
        record.add_rows(self.rows[split].columns, views)
        self.count += views

    def add_skipped(self, split: str, record: FileRecord, reason: str) -> None:
        record.add_skipped(self.rows[split].skipped, reason)

    def clear(self) -> None:
        self.rows = {split: SplitRows() for split in self.splits}
        self.count = 0
