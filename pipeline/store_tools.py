"""The store subcommands' work (pipeline store info, compact): what the CLI declares and renders, done here."""

from __future__ import annotations

from pathlib import Path

from stages.errors import PipelineError, check_range
from store import CompactResult, FeatureStore, Store, StoreInfo, verify_store


def describe_store(path: Path, verify: bool = False) -> StoreInfo:
    """The store's feature sets and counts (FeatureStore.info), with its `verification` (every dataset read and
    checked) when verify."""
    with FeatureStore(path) as opened:
        info = opened.info()
        if verify:
            info.verification = verify_store(opened)
    return info


def check_undamaged(path: Path, info: StoreInfo) -> None:
    """A verified store with damage is an error naming each damaged split (after its description is shown)."""
    damaged = [d for d in info.verification or () if d.damage]
    if damaged:
        where = "; ".join(f"{d.set} {d.split}: {d.damage}" for d in damaged)
        raise PipelineError(f"store {path} is damaged ({where[:300]}); featurize again to recompute the damaged rows")


def compact_store(path: Path, dead_share: float) -> CompactResult:
    """Compact under the writer's lock: partitions with at least dead_share dead rows (0: any) are rewritten."""
    check_range("--dead-share", dead_share, 0.0, 1.0)
    opened = Store(path)
    opened.check()  # a clear error when it is no store
    with opened.lock():
        return opened.compact(max(dead_share, 1e-9))
