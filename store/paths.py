"""Every path derived from a store's path, in one place: the store itself, its lock, its journal and temporaries."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


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
    def journal(self) -> Path:
        """`STORE.journal/`: the committed parts of runs not yet merged into the store."""
        return self.store.with_name(self.store.name + ".journal")

    def journal_part(self, set_name: str, shard: int, seq: int) -> Path:
        """Part `seq` of shard `shard` of a set: shards number their own parts, so they never collide."""
        return self.journal / f"{set_name}.part-{shard:03d}-{seq:06d}.h5"

    def journal_parts(self, set_name: str | None = None) -> list[Path]:
        """Committed parts (of one set, or all), in commit order."""
        if not self.journal.is_dir():
            return []
        return sorted(self.journal.glob(f"{set_name or '*'}.part-*.h5"))

    @staticmethod
    def part_shard(part: Path) -> int:
        return int(part.stem.rsplit("-", 2)[-2])

    @staticmethod
    def part_seq(part: Path) -> int:
        return int(part.stem.rsplit("-", 1)[-1])

    def temporaries(self) -> list[Path]:
        """Files being written (or left by killed writers) under a temporary name beside the store."""
        return list(self.store.parent.glob(f".{self.store.name}.tmp-*"))
