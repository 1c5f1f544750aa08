"""Which share of the work this process does: one process, a batch-scheduler shard, or a torchrun rank."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

from stages.errors import PipelineError


@dataclass(frozen=True)
class Shard:
    """This process's shard: index of count; `distributed` when torchrun started it (a process group exists)."""

    index: int = 0
    count: int = 1
    distributed: bool = False
    local_count: int = 1

    @property
    def label(self) -> str:
        return f"rank {self.index}/{self.count}" if self.distributed else f"shard {self.index}/{self.count}"


def current_shard(num_shards: int = 1, shard_id: int = 0, device: str = "cpu") -> Shard:
    """torchrun's RANK/WORLD_SIZE when set (joining its process group), else --num-shards/--shard-id."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        if num_shards != 1:
            raise PipelineError("--num-shards is for batch schedulers; under torchrun the world size sets the shards")
        import torch
        import torch.distributed as dist

        local = int(os.environ.get("LOCAL_RANK", "0"))
        if device == "cuda":
            torch.cuda.set_device(local)
        if not dist.is_initialized():
            # A rank that dies makes torchrun stop the others; the timeout only bounds a wedged collective.
            dist.init_process_group("nccl" if device == "cuda" else "gloo", timeout=timedelta(minutes=60))
        return Shard(dist.get_rank(), world, True, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    if num_shards < 1 or not 0 <= shard_id < num_shards:
        raise PipelineError(
            f"--shard-id {shard_id} is out of range for --num-shards {num_shards}; give 0 <= --shard-id < --num-shards"
        )
    return Shard(shard_id, num_shards, False)
