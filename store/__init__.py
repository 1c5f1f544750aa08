"""The feature store's one door: what the rest of the project (and a user's script) may use of it.

    store = Store("runs/s.h5")
    with store.read() as snapshot:              # a reader's snapshot, held (with what it maps) until it closes
        X = snapshot.feature_set().features("train")[()]
    with store.transaction(set_name, classes, attrs) as tx:   # the writer's lock; rows added and dropped
        tx.add("train", features, records)
        tx.commit()                             # one root switch; leaving without it aborts, leaving nothing
    store.compact(); store.verify(); store.repair(); store.copy("other.h5"); store.move("other.h5")

Featurize's never-stale engine (`store.sync`) is a writer too, on the same lock and the same root switch.
The modules behind the door: paths (every path derived from a store), partition_file (a partition opened and
identified), snapshot (what a root maps), reader, writer, transaction, sync, compact, verify, relocate.
"""

from __future__ import annotations

from pathlib import Path

from stages.identity import FeatureSetIdentity
from store.compact import DEAD_SHARE, CompactResult, compact
from store.locks import StoreLock
from store.paths import StorePaths
from store.reader import FeatureSet, FeatureStore, SplitCheck, StoreInfo, open_root, store_bytes, verify_store
from store.relocate import RelocateResult, RepairResult, relocate, rewrite_root
from store.schema import FEATURE_DTYPES, FileRecord, SetRecord
from store.sync import PendingRows, StoreSync, views_in
from store.transaction import Transaction
from store.writer import PartitionWriter, SplitRows, now_iso, remove_stale_temporaries


class Store:
    """One store, by path (through a symlink: its target). Nothing is opened until asked."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.paths = StorePaths.of(path)

    def exists(self) -> bool:
        return self.paths.store.exists()

    def check(self) -> None:
        """A clear error when the path holds no readable store."""
        open_root(self.paths.store).close()

    def read(self) -> FeatureStore:
        """A reader's snapshot: everything it reads is of the root it opened, until it is closed."""
        return FeatureStore(self.path)

    def lock(self, shared: bool = False) -> StoreLock:
        """The writer's lock (shared: the shards of one job, writing partitions side by side)."""
        return StoreLock(self.paths, shared)

    def transaction(self, set_name: str, classes: list[str], attrs: dict | None = None) -> Transaction:
        return Transaction(self.paths, set_name, classes, attrs)

    def sync(self, set_name: str, classes: list[str], verify: bool = False) -> StoreSync:
        """Featurize's engine for one set (under the writer's lock): plan, commit computed rows, finish."""
        return StoreSync(self.paths, set_name, classes, verify)

    def partition_writer(self, set_name: str, classes: list[str]) -> PartitionWriter:
        """Commits computed rows as partitions no root maps yet (a shard's, or a Ray actor's): the run that maps
        them is a sync's finish."""
        return PartitionWriter(self.paths, set_name, classes)

    def compact(self, dead_share: float = DEAD_SHARE) -> CompactResult:
        """Rewrite partitions with dead rows or too small, then delete what no reader holds (under the lock)."""
        return compact(self.paths, dead_share)

    def remove_stale_temporaries(self) -> None:
        remove_stale_temporaries(self.paths)

    def verify(self) -> list[SplitCheck]:
        """Every byte the store maps, checked: what failed."""
        with self.read() as snapshot:
            return verify_store(snapshot)

    def repair(self) -> RepairResult:
        """The root rewritten from its tables to map this store's own partitions."""
        return rewrite_root(self.paths)

    def copy(self, target: str | Path) -> RelocateResult:
        return relocate(self.paths, StorePaths.of(target), move=False)

    def move(self, target: str | Path) -> RelocateResult:
        return relocate(self.paths, StorePaths.of(target), move=True)

    def size_bytes(self) -> int:
        return store_bytes(self.paths)


__all__ = [
    "FEATURE_DTYPES",
    "CompactResult",
    "FeatureSet",
    "FeatureSetIdentity",
    "FeatureStore",
    "FileRecord",
    "SetRecord",
    "SplitCheck",
    "StoreInfo",
    "PendingRows",
    "SplitRows",
    "RelocateResult",
    "RepairResult",
    "Store",
    "Transaction",
    "now_iso",
    "verify_store",
    "views_in",
]
