"""Which share of the work this process does: one process, a batch-scheduler shard, or a torchrun rank. The
environment torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE) is read here and nowhere else."""

from __future__ import annotations

import os
from datetime import timedelta

from stages.errors import PipelineError
from stages.ranks import Ranks


def launched_ranks() -> Ranks:
    """What torchrun says of this process, before any process group is joined (one process: rank 0 of 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Ranks()
    return Ranks(int(os.environ.get("RANK", "0")), world, True, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def current_ranks(num_shards: int = 1, shard_id: int = 0, device: str = "cpu") -> Ranks:
    """torchrun's ranks when it started this process (joining its process group), else --num-shards/--shard-id."""
    launched = launched_ranks()
    if launched.distributed:
        if num_shards != 1:
            raise PipelineError("--num-shards is for batch schedulers; under torchrun the world size sets the shards")
        import torch
        import torch.distributed as dist

        if device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        if not dist.is_initialized():
            # A rank that dies makes torchrun stop the others; the timeout only bounds a wedged collective.
            dist.init_process_group("nccl" if device == "cuda" else "gloo", timeout=timedelta(minutes=60))
        return Ranks(dist.get_rank(), launched.world, True, launched.local_world)
    if num_shards < 1 or not 0 <= shard_id < num_shards:
        raise PipelineError(
            f"--shard-id {shard_id} is out of range for --num-shards {num_shards}; give 0 <= --shard-id < --num-shards"
        )
    return Ranks(shard_id, num_shards)
