"""featurize --engine ray: the files a run must compute go to a Ray Data actor pool in blocks; each actor builds the
backbone once, decodes with DALI, runs the forward pass and commits its rows as store partitions on the shared
filesystem. The driver alone plans (the never-stale engine) and switches the store's root when every block is done.

Faults: Ray restarts a killed actor and retries its block. Partitions are committed atomically, so a retried block
leaves at most an unmapped partition of its first attempt: the root switch maps one copy of each file's rows and
deletes the rest (commits are idempotent by file). A killed driver leaves committed partitions that the next run
adopts. A file that fails to decode is recorded as skipped inside the block's partition, never retried.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from stages.errors import PipelineError
from stages.files import Dataset, ImageFile

RAY_EXTRA = "pip install -e '.[ray]'"
BLOCKS_PER_WORKER = 4  # blocks per actor: retries and stragglers cost a quarter of an actor's share at most
MAX_BLOCK_FILES = 4096  # and a block at most this many files (a retry redoes a minute or so of a CPU actor's work)


def require_ray():
    """Ray Data, or a one-line error naming the extra."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise PipelineError(f"--engine ray needs Ray Data, an optional extra: {RAY_EXTRA}") from None
    return ray


@dataclass
class RayWork:
    """What the pool computed: images done and skipped, the loop's seconds (first block begun to last block done),
    the actors' largest peak RSS."""

    done: int
    skipped: int
    seconds: float
    worker_peak_rss_mb: float | None


def plan_blocks(todo: list[tuple[str, ImageFile]], workers: int) -> list[dict]:
    """The files to compute as blocks (a row per block: block, split, path, label); an actor commits a partition
    every --commit-every rows within a block, and at its end."""
    size = max(1, min(MAX_BLOCK_FILES, math.ceil(len(todo) / (workers * BLOCKS_PER_WORKER))))
    return [
        {
            "block": i // size,
            "split": [s for s, _ in todo[i : i + size]],
            "path": [f.path for _, f in todo[i : i + size]],
            "label": [f.label for _, f in todo[i : i + size]],
        }
        for i in range(0, len(todo), size)
    ]


class BlockFeaturizer:
    """A Ray Data actor: builds the backbone (or loads its frozen trace) once, then featurizes block after block into
    partitions of the store."""

    def __init__(self, opts, data_root: str, classes: list[str], splits: list[str], set_name: str, device, precision):
        from pipeline.featurizer import Featurizer
        from pipeline.runtime import configure_process
        from stages.backbones import create_backbone
        from stages.decode import resolve_device
        from store import Store

        configure_process()
        device = resolve_device(device)
        dataset = Dataset(Path(data_root), classes, {split: [] for split in splits}, layout="ray")
        writer = Store(opts.store).partition_writer(set_name, classes)
        backbone = create_backbone(opts.backbone, opts.weights, opts.arch)
        self.featurizer = Featurizer(opts, dataset, backbone, writer, device, precision, progress=None)

    def __call__(self, batch: dict) -> dict:
        began = time.time()  # wall clock: blocks on other nodes are compared by it
        done, skipped, blocks = [], [], []
        for block, splits, paths, labels in zip(batch["block"], batch["split"], batch["path"], batch["label"]):
            before = (self.featurizer.done, self.featurizer.skipped)
            todo = [(str(s), ImageFile(str(p), int(label))) for s, p, label in zip(splits, paths, labels)]
            self.featurizer.run(todo)  # commits its last rows before returning: the block is in partitions
            blocks.append(int(block))
            done.append(self.featurizer.done - before[0])
            skipped.append(self.featurizer.skipped - before[1])
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        span = {"began": [began] * len(blocks), "ended": [time.time()] * len(blocks)}
        return {"block": blocks, "done": done, "skipped": skipped, "peak_rss_mb": [rss] * len(blocks), **span}


def featurize_on_ray(opts, dataset: Dataset, todo: list, set_name: str, precision: str, progress) -> RayWork:
    """Compute `todo` on a Ray cluster (opts.ray_address, or Ray's own rule: RAY_ADDRESS, else a local instance);
    every block committed as partitions when this returns. KeyboardInterrupt stops the pool and propagates."""
    # Ray prints its workers' and raylets' messages (a retried block, say) on the driver's stdout, from its own
    # threads: while it runs, stdout is stderr, so that --json's stdout stays the JSON alone.
    with contextlib.redirect_stdout(sys.stderr):
        return _featurize_on_ray(opts, dataset, todo, set_name, precision, progress)


def _featurize_on_ray(opts, dataset: Dataset, todo: list, set_name: str, precision: str, progress) -> RayWork:
    ray = require_ray()
    from ray.data import ActorPoolStrategy, DataContext

    started_ray = not ray.is_initialized()
    # Ray's C++ core logs warnings to the terminal (one on every actor pool: its constructor arguments live in the
    # object store, which restarts need): its log files keep them.
    os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
    # A local instance started here would also start idle worker processes at once, one per core, importing Ray on
    # the cores the actor is about to use (read by a raylet this process starts; a running cluster keeps its own).
    os.environ.setdefault("RAY_prestart_worker_first_driver", "0")
    os.environ.setdefault("RAY_enable_worker_prestart", "0")
    if started_ray:
        try:
            ray.init(address=opts.ray_address, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
        except ConnectionError as exc:
            raise PipelineError(
                f"--ray-address {opts.ray_address}: no Ray cluster answers ({str(exc).splitlines()[0][:80]}); "
                "start one with `ray start --head` or leave the option out for a local instance"
            ) from None
    logging.getLogger("ray.data").setLevel(logging.ERROR)  # Ray Data's INFO lines: the bar says what runs
    context = DataContext.get_current()
    context.enable_progress_bars = False  # one bar for the whole job: ours
    context.enable_operator_progress_bars = False
    # CPUs per actor: the cluster's shared evenly, but never more than one node has (an actor lives on one node).
    largest = max((n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")), default=1)
    cpus = int(max(1, min(largest, ray.cluster_resources().get("CPU", 1) // opts.workers)))
    blocks = plan_blocks(todo, opts.workers)
    pool = _actor_pool(ray, ActorPoolStrategy, opts, dataset, blocks, set_name, precision, cpus)
    done = skipped = 0
    peak, began, ended = 0.0, math.inf, 0.0
    try:
        for row in pool.iter_rows():
            done += int(row["done"])
            skipped += int(row["skipped"])
            peak = max(peak, float(row["peak_rss_mb"]))
            began, ended = min(began, float(row["began"])), max(ended, float(row["ended"]))
            if progress:
                progress(done, len(todo))
    except (PipelineError, KeyboardInterrupt):
        raise
    except Exception as exc:  # a block that failed for good (after Ray's retries): said in one line
        cause = getattr(exc, "cause", None) or exc
        raise PipelineError(
            f"--engine ray: a block failed ({type(cause).__name__}: {str(cause).splitlines()[-1][:160]}); "
            "rerun to resume from the committed partitions"
        ) from None
    finally:
        if started_ray:
            ray.shutdown()  # this driver's actors stop with it; what they committed is mapped by the root switch
    # The loop's seconds: from the first block's start to the last one's end (actors' start-up left out, as a
    # local run's loop leaves out building the backbone).
    return RayWork(done, skipped, max(0.0, ended - began), round(peak, 1) if peak else None)


def _actor_pool(ray, strategy, opts, dataset: Dataset, blocks: list[dict], set_name: str, precision: str, cpus: int):
    """The blocks as a Ray Data dataset mapped by a pool of BlockFeaturizer actors."""
    # Ray Data's actor pools restart killed actors and retry their blocks by default (max_restarts and
    # max_task_retries -1).
    return ray.data.from_items(blocks, override_num_blocks=len(blocks)).map_batches(
        BlockFeaturizer,
        fn_constructor_kwargs={
            "opts": opts,
            "data_root": str(Path(dataset.root).resolve()),
            "classes": dataset.classes,
            "splits": list(dataset.splits),
            "set_name": set_name,
            "device": "cuda" if opts.gpus_per_worker else "cpu",
            "precision": precision,
        },
        batch_size=1,
        compute=strategy(size=opts.workers),
        num_cpus=cpus,
        num_gpus=opts.gpus_per_worker,
        # One malloc arena from the actor's start (see pipeline.runtime.tune_allocator: its threads exist before
        # the constructor runs, and a thread keeps the arena it first used).
        runtime_env={"env_vars": {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": str(cpus), "MALLOC_ARENA_MAX": "1"}},
    )
