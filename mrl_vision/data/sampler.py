"""Evaluation shards under DDP without repeated samples."""

from __future__ import annotations

import math
from typing import Iterator

from torch.utils.data import Dataset, DistributedSampler


class UnpaddedDistributedSampler(DistributedSampler):
    """Rank ``r`` of ``W`` gets samples ``r, r + W, r + 2W, ...`` of the dataset, in order, and
    nothing else: shards differ by at most one sample instead of being padded with repeats (as
    ``DistributedSampler`` does), so metrics summed over ranks count every sample exactly once.

    Lightning keeps a sampler that is a ``DistributedSampler`` instead of replacing it, so the
    data modules use this one for validation, test and predict under DDP.
    """

    def __init__(self, dataset: Dataset, num_replicas: int | None = None, rank: int | None = None) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        n = len(dataset)  # type: ignore[arg-type]
        self.num_samples = max(0, math.ceil((n - self.rank) / self.num_replicas))
        self.total_size = n

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.total_size, self.num_replicas))

    def __len__(self) -> int:
        return self.num_samples


def eval_sampler(dataset: Dataset, trainer) -> UnpaddedDistributedSampler | None:
    """The evaluation sampler for ``dataset``: unpadded shards when the trainer runs several processes."""
    if trainer is None or trainer.world_size <= 1:
        return None
    return UnpaddedDistributedSampler(dataset, num_replicas=trainer.world_size, rank=trainer.global_rank)
