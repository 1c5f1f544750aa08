"""Every path derived from a store's path, in one place: the root, its lock, its partitions and their kinds."""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

# Partition file names: `SET.TIME-PID-SEQ.h5` (a commit of computed rows, or rows a compaction rewrote: `...c.h5`,
# or an overlay of locations and labels, no features: `...o.h5`),
# `legacy-TIME.h5` (a version-1 store taken in whole), `retired-GENERATION.h5` (an earlier root, kept while a reader
# may still map its partitions). Names sort by the time they were made.
_PARTITION = re.compile(
    r"^(?:(?P<set>[\w.@-]+?)\.(?P<time>\d+)-(?P<pid>\d+)-(?P<seq>\d+)(?P<kind>[co]?)|legacy-\d+)\.h5$"
)
_RETIRED = re.compile(r"^retired-\d+\.h5$")


@dataclass(frozen=True)
class StorePaths:
    """The files of one store. A store given through a symlink is its target: the real file is written and
    locked, so that every path to one store takes the same lock."""

    store: Path

    @classmethod
    def of(cls, path: str | Path) -> StorePaths:
        return cls(Path(os.path.realpath(path)))

    @property
    def lock(self) -> Path:
        """`STORE.lock`: the writer's advisory lock (its content names the holder)."""
        return self.store.with_name(self.store.name + ".lock")

    @property
    def parts(self) -> Path:
        """`STORE.parts/`: the immutable partition files the root maps (and committed work not mapped yet)."""
        return self.store.with_name(self.store.name + ".parts")

    def source_name(self, partition: str) -> str:
        """A partition's file name as the root's virtual datasets give it: relative to the root's folder, so that
        the root and its partitions can be moved or copied together."""
        return f"{self.parts.name}/{partition}"

    def new_partition(self, set_name: str, seq: int, compacted: bool = False, overlay: bool = False) -> Path:
        """A new partition's path: named by the set, the time, this process, a sequence number and its kind."""
        kind = "c" if compacted else "o" if overlay else ""
        return self.parts / f"{set_name}.{time.time_ns()}-{os.getpid()}-{seq}{kind}.h5"

    def legacy_partition(self) -> Path:
        return self.parts / f"legacy-{time.time_ns()}.h5"

    def retired_root(self, generation: int) -> Path:
        return self.parts / f"retired-{generation:08d}.h5"

    def partitions(self, set_name: str | None = None) -> list[str]:
        """Partition files in the parts folder (of one set, or all), oldest first: legacy ones hold every set. Only
        regular files: anything else so named (a FIFO, a folder, a symlink) is never opened (`strangers`)."""
        found = [name for name in self._regular(_PARTITION) if set_name is None or _set_of(name) in (None, set_name)]
        return sorted(found, key=partition_order)

    def retired_roots(self) -> list[Path]:
        """Replaced roots kept while a reader may hold them (regular files only, as partitions)."""
        return [self.parts / name for name in sorted(self._regular(_RETIRED))]

    def strangers(self) -> list[str]:
        """Entries of the parts folder named like a partition or a retired root that are not regular files: never
        opened (a FIFO would hang an open), said in a note."""
        if not self.parts.is_dir():
            return []
        return sorted(
            e.name
            for e in os.scandir(self.parts)
            if (_PARTITION.match(e.name) or _RETIRED.match(e.name)) and not e.is_file(follow_symlinks=False)
        )

    def _regular(self, pattern: re.Pattern) -> list[str]:
        if not self.parts.is_dir():
            return []
        return [e.name for e in os.scandir(self.parts) if pattern.match(e.name) and e.is_file(follow_symlinks=False)]

    def temporaries(self) -> list[Path]:
        """Files being written (or left by killed writers) under a temporary name beside the root or among the
        partitions."""
        found = list(self.store.parent.glob(f".{self.store.name}.tmp-*"))
        return found + (list(self.parts.glob(".*.tmp-*")) if self.parts.is_dir() else [])

    @staticmethod
    def is_partition_name(name: str) -> bool:
        """A name a partition of this store can have: one file name, no folder, no `..` (a root may map nothing
        else)."""
        return bool(_PARTITION.match(name))

    @staticmethod
    def set_of(name: str) -> str | None:
        """The feature set a partition's name says it holds (None: a legacy partition, holding every set)."""
        return _set_of(name)

    @staticmethod
    def is_legacy(name: str) -> bool:
        return name.startswith("legacy-")

    @staticmethod
    def compacted(name: str) -> bool:
        match = _PARTITION.match(name)
        return bool(match and match["kind"] == "c")

    @staticmethod
    def overlay(name: str) -> bool:
        """An overlay partition: location and label columns of rows other partitions hold, never a source of rows."""
        match = _PARTITION.match(name)
        return bool(match and match["kind"] == "o")


def partition_order(name: str) -> tuple[int, str]:
    """Oldest first: by the time in the name (legacy partitions carry theirs too)."""
    digits = re.search(r"(\d{10,})", name)
    return (int(digits[1]) if digits else 0, name)


def _set_of(name: str) -> str | None:
    """The feature set a partition's name says it holds (None: a legacy partition, holding every set)."""
    match = _PARTITION.match(name)
    return match["set"] if match else None
