"""The never-stale engine: what a data folder needs from a store's feature set, the journal of work done, the new store.

    with StoreSync(paths, set_name) as sync:        # opens the old set and the journal's parts, verifying both
        todo = sync.plan(dataset, views)            # each file: reuse its rows, keep its known-bad record, or compute
        ...                                         # computed rows go to sync.commit(rows, dtype) as they come
        plans = sync.finish(attrs, feature_dim, dtype)  # the store rewritten from its sources, unless up to date

A file's rows are reused when its size, mtime and ctime match the recorded ones, or, when only the times moved, when
its content hash does. Rows are looked up in the journal's parts (newest first), then in the old store, in the file's
split first and, without augmented views, in any split (a file moved by --valid-pct keeps its rows). Bytes that fail
verification are never reused: their files are computed again.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import h5py
import numpy as np

from stages.files import Dataset, Fingerprint, ImageFile, content_sha256, stat_fingerprint
from store.paths import StorePaths
from store.reader import FileRows, open_h5, split_file_index, split_skipped
from store.schema import ROW_COLUMNS, SETS, SKIPPED_COLUMNS, SPLITS, FileRecord
from store.verify import verify_split
from store.writer import Journal, RowRun, SplitPlan, SplitRows, write_store


def views_in(split: str, views: int) -> int:
    """Augmented views are stored for training images only; valid and test keep the plain view."""
    return views if split == "train" else 0


def rows_per_file(split: str, views: int) -> int:
    return views_in(split, views) + 1


STORE, PART, NEW = "store", "part", "new"  # the old store, a part left by an earlier run, a part of this run


@dataclass
class Source:
    """Somewhere rows can be copied from: the old store's set, or a journal part."""

    name: str
    kind: str
    root: h5py.File | h5py.Group


@dataclass
class FileDecision:
    """What the run does with one current file of a split."""

    label: int
    fingerprint: Fingerprint
    source: str | None = None  # the Source its reusable rows lie in
    source_split: str | None = None  # the split of the source they lie in
    rows: FileRows | None = None
    skip_reason: str | None = None

    def record(self, path: str) -> FileRecord:
        fp = self.fingerprint
        return FileRecord(path, self.label, fp.size, fp.mtime_ns, fp.ctime_ns, fp.sha256)


def open_journal_part(part: Path) -> tuple[h5py.File | None, str | None]:
    """A journal part opened and verified; a damaged one is renamed PART.damaged and its rows done again."""
    try:
        f = h5py.File(part, "r", locking=False)
        try:
            damage = {s: verify_split(f[s]) for s in f if isinstance(f[s], h5py.Group)}
        except (OSError, KeyError) as exc:
            damage = {"part": str(exc).splitlines()[0][:80]}
        if not any(damage.values()):
            return f, None
        f.close()
        reason = "; ".join(f"{s}: {d.describe() if hasattr(d, 'describe') else d}" for s, d in damage.items() if d)
    except OSError as exc:
        reason = str(exc).splitlines()[0][:80]
    aside = part.with_name(part.name + ".damaged")
    os.replace(part, aside)
    return None, f"journal part {part} is damaged ({reason}); set aside as {aside.name}, its images featurized again"


class StoreSync:
    """Brings one feature set of a store up to date with a data folder, for one shard of the work."""

    def __init__(self, paths: StorePaths, set_name: str, shard: int = 0):
        self.store_path, self.set_name = paths.store, set_name
        self.journal = Journal(paths, set_name, shard)
        self.sources: list[Source] = []  # newest first
        self.damaged: dict[tuple[str, str], set[str] | None] = {}  # (source, split): paths not to reuse; None: all
        self._indexes: dict[tuple[str, str], tuple] = {}
        self.notes: list[str] = []  # what was found damaged and repaired
        self.decisions: dict[str, dict[str, FileDecision]] = {}
        self.todo: list[tuple[str, ImageFile]] = []
        self.dataset: Dataset | None = None
        self.views = 0
        self._old: h5py.File | None = None
        self.old_set: h5py.Group | None = None
        self.finished = False

    # Opening: the old set and the journal's parts, each verified ------------------------------------------------
    def __enter__(self) -> StoreSync:
        if self.store_path.exists():
            self._old = open_h5(self.store_path)
            sets = self._old[SETS] if SETS in self._old else {}
            self.old_set = sets[self.set_name] if self.set_name in sets else None
        if self.old_set is not None:
            self.sources.append(Source(STORE, STORE, self.old_set))
            self._verify_store()
        for part in self.journal.parts():
            opened, note = open_journal_part(part)
            if note:
                self.notes.append(note)
            else:
                self.sources.insert(0, Source(part.name, PART, opened))
        return self

    def __exit__(self, *exc) -> None:
        for source in self.sources:
            if source.kind != STORE:
                source.root.close()
        if self._old is not None:
            self._old.close()
        if self.finished:
            self.journal.clear()

    def _verify_store(self) -> None:
        """Check every byte of the old store's set; damaged files are featurized again."""
        where = f"store {self.store_path}"
        for split in [s for s in self.old_set if isinstance(self.old_set[s], h5py.Group)]:
            damage = verify_split(self.old_set[split])
            if not damage:
                continue
            if damage.columns:
                self.damaged[STORE, split] = None
                self.notes.append(
                    f"{where} {split}: {damage.describe()} failed verification; every {split} image is featurized again"
                )
                continue
            paths = self.old_set[split]["paths"][()]
            bad = {(p.decode() if isinstance(p, bytes) else p) for a, b in damage.rows for p in paths[a:b]}
            self.damaged[STORE, split] = bad
            self.notes.append(
                f"{where} {split}: {damage.describe()} failed verification; featurized again: "
                f"{', '.join(sorted(bad)[:5])}{' ...' if len(bad) > 5 else ''}"
            )

    def _groups(self, split: str, kinds=(STORE, PART, NEW)):
        for source in self.sources:
            if source.kind in kinds and split in source.root and self.damaged.get((source.name, split), ()) is not None:
                yield source.name, source.root[split]

    def _index(self, name: str, split: str, group: h5py.Group) -> tuple[dict[str, FileRows], dict[str, dict]]:
        """The reusable files of a source's split: its index less the files whose rows failed verification."""
        if (name, split) not in self._indexes:
            bad = self.damaged.get((name, split), set())
            self._indexes[name, split] = (
                {k: v for k, v in split_file_index(group).items() if k not in bad},
                {k: v for k, v in split_skipped(group).items() if k not in bad},
            )
        return self._indexes[name, split]

    # Planning: what each current file needs --------------------------------------------------------------------
    def plan(self, dataset: Dataset, views: int) -> list[tuple[str, ImageFile]]:
        """Decide for every current file; return (split, file) of those to compute, in data-set order."""
        self.dataset, self.views = dataset, views
        todo = []
        for split, files in dataset.splits.items():
            count = rows_per_file(split, views)
            # The same split first; with no augmented views a file's row is the same in any split.
            others = [s for s in SPLITS if s != split and rows_per_file(s, views) == count]
            indexes = [
                (name, src, *self._index(name, src, g)) for src in [split, *others] for name, g in self._groups(src)
            ]
            self.decisions[split] = {}
            for f in files:
                decision = self._decide(dataset.root / f.path, f, indexes, count)
                if decision.source is None and decision.skip_reason is None:
                    todo.append((split, f))
                self.decisions[split][f.path] = decision
        self.todo = todo
        return todo

    @staticmethod
    def _decide(path: Path, f: ImageFile, indexes: list, count: int) -> FileDecision:
        try:
            fp = stat_fingerprint(path)
        except OSError as exc:
            return FileDecision(f.label, Fingerprint(0, 0), skip_reason=f"cannot read: {exc.strerror}")
        decision = FileDecision(f.label, fp)
        same_size = False
        for name, src, index, skipped in indexes:
            rows, bad = index.get(f.path), skipped.get(f.path)
            if rows and rows.count == count and fp.same_stat(rows.size, rows.mtime_ns, rows.ctime_ns):
                decision.source, decision.source_split, decision.rows = name, src, rows
                decision.fingerprint = replace(fp, sha256=rows.sha256)
                return decision
            if bad and fp.same_stat(bad["size"], bad["mtime_ns"], bad["ctime_ns"]):
                decision.skip_reason, decision.fingerprint = bad["reason"], replace(fp, sha256=bad["sha256"])
                return decision
            same_size |= bool(rows and rows.count == count and rows.size == fp.size)
        if same_size:  # touched but perhaps unchanged: the content hash decides
            try:
                sha = content_sha256(path.read_bytes())
            except OSError:
                return decision
            for name, src, index, _ in indexes:
                rows = index.get(f.path)
                if rows and rows.count == count and rows.sha256 == sha:
                    decision.source, decision.source_split, decision.rows = name, src, rows
                    decision.fingerprint = replace(fp, sha256=sha)
                    return decision
        return decision

    @property
    def reused(self) -> int:
        return sum(1 for split in self.decisions.values() for d in split.values() if d.source)

    # Work done: committed to the journal as it comes -----------------------------------------------------------
    def commit(self, rows: dict[str, SplitRows], feature_dtype: str) -> None:
        self.journal.commit(rows, feature_dtype)

    # Finishing: the store rewritten from its sources ----------------------------------------------------------
    def finish(
        self, attrs: Callable[[], dict], feature_dim: int, feature_dtype: str
    ) -> tuple[dict[str, SplitPlan], bool]:
        """Merge this run's parts and every reused row into the store (atomically); return the plans and whether
        the store was already up to date (then it is left untouched and `attrs`, the set's attributes, never asked)."""
        rewrite = any(s.kind == PART for s in self.sources) or bool(self.damaged)  # parts to merge, damage to repair
        for part in self.journal.parts():
            if all(s.name != part.name for s in self.sources):
                self.sources.insert(0, Source(part.name, NEW, h5py.File(part, "r", locking=False)))
        rewrite |= any(s.kind == NEW for s in self.sources)
        plans = self._plan_splits()
        up_to_date = not self.todo and not rewrite and self._same_as_old(plans)
        if not up_to_date:
            write_store(
                self.store_path,
                self.set_name,
                attrs(),
                plans,
                {s.name: s.root for s in self.sources},
                feature_dim,
                feature_dtype,
                self._old,
            )
        self.finished = True
        return plans, up_to_date

    def _plan_splits(self) -> dict[str, SplitPlan]:
        """The new content of every split, in path order: reused and new rows, and the skipped files."""
        plans = {}
        for split, files in self.dataset.splits.items():
            count = rows_per_file(split, self.views)
            fresh = {}
            for name, g in self._groups(split, kinds=(NEW,)):
                for key, rows in split_file_index(g).items():
                    fresh.setdefault(key, (name, rows))
                for key, bad in split_skipped(g).items():
                    fresh.setdefault(key, (name, bad))
            runs: list[RowRun] = []
            columns = {k: [] for k in ROW_COLUMNS}
            skipped = {k: [] for k in SKIPPED_COLUMNS}
            for f in files:
                d = self.decisions[split][f.path]
                if d.source is None and d.skip_reason is None and f.path in fresh:
                    name, found = fresh[f.path]
                    if isinstance(found, FileRows):
                        d.source, d.source_split, d.rows = name, split, found
                        d.fingerprint = Fingerprint(found.size, found.mtime_ns, found.sha256, found.ctime_ns)
                    else:
                        d.skip_reason = found["reason"]
                        d.fingerprint = Fingerprint(
                            found["size"], found["mtime_ns"], found["sha256"], found["ctime_ns"]
                        )
                if d.source is not None:
                    last = runs[-1] if runs else None
                    if (
                        last
                        and (last.source, last.split) == (d.source, d.source_split)
                        and (last.start + last.count == d.rows.start)
                    ):
                        runs[-1] = RowRun(last.source, last.start, last.count + count, last.split)
                    else:
                        runs.append(RowRun(d.source, d.rows.start, count, d.source_split))
                    d.record(f.path).add_rows(columns, count)
                elif d.skip_reason is not None:
                    d.record(f.path).add_skipped(skipped, d.skip_reason)
            plans[split] = SplitPlan(runs, columns, skipped)
        return plans

    def _same_as_old(self, plans: dict[str, SplitPlan]) -> bool:
        """True when the new content equals the old store's byte for byte."""
        old_set = self.old_set
        if old_set is None or json.loads(old_set.attrs.get("classes", "[]")) != self.dataset.classes:
            return False
        if set(plans) != set(old_set):
            return False
        for split, plan in plans.items():
            old = old_set[split]
            if not old["features"].fletcher32:  # written before checksums: rewritten once, with them
                return False
            n = old["features"].shape[0]
            if plan.runs != ([RowRun(STORE, 0, n, split)] if n else []):
                return False
            for name in ("labels", "mtime_ns", "ctime_ns"):
                if name not in old or not np.array_equal(
                    old[name][()], np.asarray(plan.columns[name], dtype=old[name].dtype)
                ):
                    return False
            if sorted(split_skipped(old)) != sorted(plan.skipped["paths"]):
                return False
        return True


@dataclass
class PendingRows:
    """Rows computed since the last journal commit, per split."""

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
