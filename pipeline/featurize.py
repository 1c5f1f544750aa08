"""Featurize: image files -> DALI decode -> frozen backbone -> feature store, computing only what the store lacks."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import h5py
import numpy as np
import torch

from pipeline.distributed import current_ranks, launched_ranks
from pipeline.featurizer import Featurizer
from pipeline.runtime import available_memory, cpu_count, torch_threads
from stages.backbones import (
    DEFAULT_BACKBONE,
    create_backbone,
    resolve_precision,
)
from stages.decode import Augmentation, batch_memory_bytes, resolve_device
from stages.errors import MAX_VIEWS, SEED_MAX, PipelineError, check_memory, check_range
from stages.files import scan_dataset
from stages.identity import FEATURE_DTYPE
from stages.labels import LabelOptions
from stages.ranks import Ranks
from stages.runner import package_version
from store import FEATURE_DTYPES, FeatureSetIdentity, SetRecord, Store, now_iso

Progress = Callable[[int, int], None]


@dataclass
class FeaturizeOptions:
    """Everything `featurize` needs; the CLI fills it from its options."""

    data_dir: Path
    store: Path
    backbone: str = DEFAULT_BACKBONE
    weights: Path | None = None
    arch: str | None = None
    views: int = 0
    seed: int = 0
    valid_pct: float | None = None
    labels: LabelOptions | None = None  # a label source other than class folders (stages.labels)
    dtype: str = FEATURE_DTYPE
    precision: str = "auto"
    device: str = "auto"
    batch_size: int = 32
    commit_every: int = 2048  # journal commit after this many rows (or commit_seconds), whichever comes first
    commit_seconds: float = 30.0
    num_shards: int = 1
    shard_id: int = 0
    threads: int | None = None  # torch's threads while featurizing; None: the cores, shared among local ranks
    verify: bool = False  # check every stored byte first (readers check what they read; an update its new partitions)
    engine: str = "local"  # "ray": the files to compute go to a Ray Data actor pool (pipeline.ray_engine)
    ray_address: str | None = None  # None: Ray's own rule (RAY_ADDRESS, else a local instance)
    workers: int = 1  # Ray actors
    gpus_per_worker: float = 0.0


def _library_versions() -> dict:
    import nvidia.dali

    return {
        "torch": torch.__version__,
        "dali": nvidia.dali.__version__,
        "timm": package_version("timm"),  # read from its metadata: a run loading a cached trace never imports timm
        "h5py": h5py.__version__,
        "numpy": np.__version__,
    }


@dataclass
class FeaturizeWork:
    """What one process did: images computed here and reused from the store, how fast, into which set."""

    featurized: int
    reused: int
    reused_by_content: int  # of reused: found by their bytes under another path (moved, renamed, copied, relabelled)
    seconds: float
    images_per_second: float | None
    interrupted: bool
    set: str
    store: str
    device: str
    precision: str
    backbone: str
    views: int
    notes: list[str]
    engine: str  # local or ray
    worker_peak_rss_mb: float | None  # --engine ray: the largest peak RSS of its actors


@dataclass
class ShardResult(FeaturizeWork):
    """A shard's share of the work (--shard-id, or a torchrun rank other than 0): its partitions wait, unmapped, for
    the run that maps them."""

    shard: str

    def to_json(self) -> dict:
        return {**asdict(self), "merged": False, "up_to_date": False}


@dataclass
class FeaturizeResult(FeaturizeWork):
    """The store brought up to date: what it holds now (images and rows per split, files skipped with reasons)."""

    data_dir: str
    up_to_date: bool
    images: dict[str, int]
    rows: dict[str, int]
    skipped: list[dict]  # {split, path, reason}
    classes: list[str]
    store_bytes: int  # the root and its partitions
    compaction: dict  # partitions compaction rewrote and wrote, rows it copied, partitions deleted
    shards: list[dict] | None = None  # torchrun's rank 0: every rank's {shard, featurized, images_per_second}

    def to_json(self) -> dict:
        # Field by field, not asdict: its deep copy of a million skipped-file records took 8 s. Every field is plain.
        data = {**{f.name: getattr(self, f.name) for f in fields(self)}, "merged": True}
        if self.shards is None:
            del data["shards"]
        return data


ENGINES = ("local", "ray")


def check_engine(opts: FeaturizeOptions) -> None:
    """The engine's options, checked before anything runs (and Ray's presence, for --engine ray)."""
    if opts.engine not in ENGINES:
        raise PipelineError(f"--engine {opts.engine!r} is not one of {', '.join(ENGINES)}")
    if opts.engine == "local":
        return
    check_range("--workers", opts.workers, 1, None)
    check_range("--gpus-per-worker", opts.gpus_per_worker, 0, None)
    if opts.num_shards > 1 or launched_ranks().distributed:  # asked, not joined: the check must not start a group
        raise PipelineError("--engine ray schedules the work itself: drop --num-shards, and run it without torchrun")
    from pipeline.ray_engine import require_ray

    require_ray()


def featurize(opts: FeaturizeOptions, progress: Progress | None = None) -> FeaturizeResult | ShardResult:
    """Bring the store's feature set for these settings up to date with the data folder; return a summary.

    Sharded (torchrun ranks, or --num-shards/--shard-id), each process featurizes its share of the missing files
    into its own partitions; then torchrun's rank 0, or a later plain run, maps them all in one root switch.
    """
    started = time.perf_counter()
    if opts.dtype not in FEATURE_DTYPES:
        raise PipelineError(f"--dtype {opts.dtype!r} is not one of {', '.join(FEATURE_DTYPES)}")
    for option, value, low, high in (
        ("--views", opts.views, 0, MAX_VIEWS),
        ("--batch-size", opts.batch_size, 1, None),
        ("--commit-every", opts.commit_every, 1, None),
        ("--seed", opts.seed, 0, SEED_MAX),
        ("--num-shards", opts.num_shards, 1, None),
    ):
        check_range(option, value, low, high)
    check_range("--shard-id", opts.shard_id, 0, opts.num_shards - 1)
    check_engine(opts)
    store = Store(opts.store)  # through a symlink: the real file is written and locked
    store.paths.store.parent.mkdir(parents=True, exist_ok=True)
    dataset = scan_dataset(opts.data_dir, opts.valid_pct, opts.seed, opts.labels)
    device = resolve_device(opts.device) if opts.engine == "local" else "cuda" if opts.gpus_per_worker else "cpu"
    ranks = current_ranks(opts.num_shards, opts.shard_id, device)
    precision = resolve_precision(opts.precision, device)
    # A registered backbone is built only when a forward pass needs it: an up-to-date store answers at once.
    backbone = create_backbone(opts.backbone, opts.weights, opts.arch)
    check_memory(
        f"--batch-size {opts.batch_size} x (--views {opts.views} + 1)",
        batch_memory_bytes(opts.batch_size, opts.views, backbone.preprocessing.size),
        available_memory(),
        f"{opts.batch_size} images x {opts.views + 1} decoded views",
    )
    identity = FeatureSetIdentity.of(
        backbone,
        views=opts.views,
        seed=opts.seed,
        augmentation=Augmentation().to_dict() if opts.views else None,
        precision=precision,
        dtype=opts.dtype,
    )
    job = FeaturizeJob(opts, dataset, backbone, identity, device, precision, store, progress)
    if ranks.world == 1:
        with store.lock():
            store.remove_stale_temporaries()
            return job.run(ranks, merge=True, started=started)
    with store.lock(shared=True):
        mine = job.run(ranks, merge=False, started=started)
    if not ranks.distributed:
        return mine
    import torch.distributed as dist

    shards = [None] * ranks.world
    own = {"shard": mine.shard, "featurized": mine.featurized, "images_per_second": mine.images_per_second}
    dist.all_gather_object(shards, own)  # a barrier too
    if not ranks.leader:
        return mine
    with store.lock():
        merged = job.run(Ranks(), merge=True, started=started)
    featurized = sum(r["featurized"] for r in shards)
    return replace(
        merged,
        shards=shards,
        featurized=featurized,
        reused=merged.reused - featurized,
        images_per_second=round(sum(r["images_per_second"] or 0 for r in shards), 1) or None,
    )


class FeaturizeJob:
    """One featurize invocation's settings, run for this process's share, with or without the merge."""

    def __init__(self, opts, dataset, backbone, identity, device, precision, store: Store, progress):
        self.opts, self.dataset, self.backbone, self.identity = opts, dataset, backbone, identity
        self.device, self.precision, self.store, self.progress = device, precision, store, progress
        self.name = identity.name

    def run(self, ranks: Ranks, merge: bool, started: float) -> FeaturizeResult | ShardResult:
        opts, dataset = self.opts, self.dataset
        with self.store.sync(self.name, dataset.classes, verify=opts.verify) as sync:
            todo = sync.plan(dataset, opts.views)
            if ranks.world > 1:  # a file's rank follows from its place in the whole data set, not in what is left
                place = {
                    (split, f.path): i
                    for i, (split, f) in enumerate((split, f) for split, files in dataset.splits.items() for f in files)
                }
                todo = [(split, f) for split, f in todo if place[split, f.path] % ranks.world == ranks.rank]
            computed, loop_seconds, interrupted, worker_rss = 0, 0.0, False, None
            if todo and opts.engine == "ray":
                from pipeline.ray_engine import featurize_on_ray

                try:
                    pooled = featurize_on_ray(opts, dataset, todo, self.name, self.precision, self.progress)
                    computed, loop_seconds = pooled.done - pooled.skipped, pooled.seconds
                    worker_rss = pooled.worker_peak_rss_mb
                except KeyboardInterrupt:
                    interrupted = True  # the blocks done are committed: the root maps them, then stop
            elif todo:
                run = Featurizer(opts, dataset, self.backbone, sync.writer, self.device, self.precision, self.progress)
                loop_started = time.perf_counter()
                try:
                    with torch_threads(opts.threads or cpu_count() // ranks.local_world):
                        run.run(todo)
                except KeyboardInterrupt:
                    interrupted = True  # what was decoded is committed; write the store with it, then stop
                loop_seconds = time.perf_counter() - loop_started
                computed = run.done - run.skipped
            work = FeaturizeWork(
                featurized=computed,
                reused=sync.reused,
                reused_by_content=sync.reused_by_content,
                seconds=round(time.perf_counter() - started, 3),
                images_per_second=round(computed / loop_seconds, 1) if computed else None,
                interrupted=interrupted,
                set=self.name,
                store=str(opts.store),
                device=self.device,
                precision=self.precision,
                backbone=self.identity.backbone,
                views=opts.views,
                notes=list(sync.notes),
                engine=opts.engine,
                worker_peak_rss_mb=worker_rss,
            )
            if not merge:
                note = f"{ranks.label}: partitions in {self.store.paths.parts}; a run without --shard-id maps them"
                return ShardResult(**{**asdict(work), "notes": work.notes + [note]}, shard=ranks.label)
            synced = sync.finish(lambda: self._attrs(sync), self.identity.feature_dim, opts.dtype)
        # Compaction after the switch, on every run (one killed while compacting is finished by the next): it rewrites
        # only partitions with dead rows, or small ones, then deletes those no reader holds any more.
        compacted = self.store.compact()
        return FeaturizeResult(
            **{**asdict(work), "notes": dataset.notes + work.notes},
            data_dir=str(opts.data_dir),
            up_to_date=synced.up_to_date,
            images=synced.images,
            rows=synced.rows,
            skipped=synced.skipped,
            classes=dataset.classes,
            store_bytes=self.store.size_bytes(),
            compaction=compacted.to_json(),
        )

    def _attrs(self, sync) -> dict:
        """The set's attributes: its identity, what it was made from, and when."""
        old = sync.live.record.created if sync.live is not None else None
        return SetRecord(
            self.identity,
            classes=self.dataset.classes,
            data_dir=str(Path(self.opts.data_dir).resolve()),
            weights_path=self.backbone.weights_path,
            **{k: v for k, v in self.dataset.describe().items() if v is not None},
            versions=_library_versions(),
            device=self.device,
            created=old or now_iso(),
            updated=now_iso(),
        ).to_attrs()
