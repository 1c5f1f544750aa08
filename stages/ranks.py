"""This process's place among the processes of one job: one vocabulary for torchrun's ranks and a batch scheduler's
shards, and the collective operations a data-parallel fine-tune needs."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Ranks:
    """Rank `rank` of `world` processes (one process: rank 0 of 1). `distributed` when torchrun started them (a
    process group exists; collectives work), else the shards of a batch-scheduler array job, which never meet;
    `local_world` of them share this machine (and its cores)."""

    rank: int = 0
    world: int = 1
    distributed: bool = False
    local_world: int = 1

    @property
    def leader(self) -> bool:
        """The process that prints, merges and writes what the job writes once."""
        return self.rank == 0

    @property
    def label(self) -> str:
        return f"rank {self.rank}/{self.world}" if self.distributed else f"shard {self.rank}/{self.world}"

    def all_reduce(self, values: list[float]) -> list[float]:
        """Sums over ranks (the values themselves in one process)."""
        if self.world == 1:
            return values
        import torch
        import torch.distributed as dist

        tensor = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def share(self, order: list[int], batch_size: int, first_step: int = 0) -> list[int]:
        """This rank's slice of every global batch of `order` from `first_step` on (all of it in one process).

        Every rank takes a step for every global batch, as DDP's collectives need: a last batch too small for the
        ranks is split as evenly as it goes, topped up from the epoch's first images when it has fewer than ranks.
        """
        mine = []
        for start in range(first_step * batch_size, len(order), batch_size):
            batch = order[start : start + batch_size]
            if len(batch) < self.world:
                batch = batch + (order * self.world)[: self.world - len(batch)]
            bounds = [len(batch) * r // self.world for r in (self.rank, self.rank + 1)]
            mine += batch[bounds[0] : bounds[1]]
        return mine
