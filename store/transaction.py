"""A writer's transaction on one feature set: rows added and dropped, made visible together by one root switch, or
not at all.

    with Transaction(paths, set_name, classes, attrs) as tx:  # the writer's lock, and the live snapshot
        tx.add("train", features, records)                    # a new partition, committed but not mapped yet
        tx.drop("valid", np.array([3, 7]))                    # rows of the split as this transaction maps it
        tx.commit()                                           # one root switch; leaving without it aborts

An abort (an error, or no commit) deletes the partitions the transaction wrote: nothing of it was ever visible.
"""

from __future__ import annotations

import numpy as np

from stages.identity import FEATURE_DTYPE
from store.locks import StoreLock
from store.partition_file import delete
from store.paths import StorePaths
from store.reader import open_root
from store.schema import FileRecord
from store.snapshot import ROW_TABLES, SetSnapshot, Snapshot, SourceShapes, read_snapshot
from store.sync import successor
from store.writer import PartitionWriter, SplitRows, now_iso, switch_root


class Transaction:
    def __init__(self, paths: StorePaths, set_name: str, classes: list[str], attrs: dict | None = None):
        self.paths, self.set_name, self.classes = paths, set_name, list(classes)
        self.attrs = attrs
        self.lock = StoreLock(paths)
        self.old: Snapshot | None = None
        self.new: SetSnapshot | None = None
        self.writer = PartitionWriter(paths, set_name, self.classes)
        self.committed: Snapshot | None = None

    def __enter__(self) -> Transaction:
        self.lock.__enter__()
        try:
            if self.paths.store.exists():
                with open_root(self.paths.store) as root:
                    self.old = read_snapshot(root)
            live = self.old.sets.get(self.set_name) if self.old else None
            if live is None:
                if self.attrs is None:
                    raise ValueError(f"a new feature set {self.set_name} needs its attributes")
                self.new = SetSnapshot(self.set_name, {}, {})
            else:
                tables = {t: {k: list(v) for k, v in getattr(live, t).items()} for t in (*ROW_TABLES, "skipped")}
                self.new = SetSnapshot(self.set_name, dict(live.attrs), dict(live.prefixes), **tables)
        except BaseException:
            self.lock.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            if self.committed is None:  # aborted: what it wrote was never mapped, and never will be
                for name in self.writer.written:
                    delete(self.paths.parts / name)
        finally:
            self.lock.__exit__(*exc)

    def count(self, split: str) -> int:
        return self.new.count(split)

    def add(self, split: str, features: np.ndarray, records: list[FileRecord], views: int = 1) -> str:
        """Rows of `records` (each `views` rows, its views together) with their features, written as one new
        partition (fsynced, not mapped until commit) and appended to the split; returns the partition's name."""
        rows = SplitRows()
        rows.features.append(np.asarray(features))
        for record in records:
            record.add_rows(rows.columns, views)
        if rows.num_rows != len(features):
            raise ValueError(f"{len(features)} feature rows for {rows.num_rows} rows of records")
        dtype = self.new.attrs.get("dtype") or (self.attrs or {}).get("dtype") or FEATURE_DTYPE
        part = self.writer.commit({split: rows}, dtype).name
        self.new.prefixes[part] = ""
        self.new.append(split, part, rows.num_rows)
        return part

    def drop(self, split: str, rows: np.ndarray) -> None:
        """Unmap rows of the split (indexes into it as this transaction maps it now); their bytes stay in their
        partitions until compaction reclaims them."""
        n, kept, start = self.new.count(split), [], 0
        for row in np.unique(np.asarray(rows, np.int64)):
            if not 0 <= row < n:
                raise IndexError(f"row {row} of {split}, which has {n}")
            kept.append((start, int(row)))
            start = int(row) + 1
        self.new.keep(split, [*kept, (start, n)])

    def commit(self) -> Snapshot:
        """Switch the root to map this transaction's rows: readers that open the store from now on see them all."""
        attrs = dict(self.new.attrs)
        attrs.update(self.attrs or {})
        attrs["classes"] = self.classes
        attrs.setdefault("created", now_iso())
        attrs["updated"] = now_iso()
        self.new.attrs = attrs
        self.committed = successor(self.paths, self.old, self.new)
        switch_root(self.paths, self.old, self.committed, SourceShapes(self.paths, self.paths.store))
        return self.committed
