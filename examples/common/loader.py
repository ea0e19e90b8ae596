"""A loader that gives each rank its shard of every global batch, as DDP users do.

Each epoch shuffles the dataset with ``seed + epoch`` (the same permutation on
every rank), cuts it into global batches of ``batch_size`` samples, and hands
rank r the r-th contiguous slice of ``batch_size // world_size`` samples.
Concatenating the ranks' batches in rank order therefore gives exactly the
batch a single process (``world_size=1``) would see.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import torch
from torch import Tensor


class Dataset(Protocol):
    def __len__(self) -> int: ...
    def __getitem__(self, i: int) -> dict[str, Tensor]: ...


class ShardedLoader:
    """Iterate over this rank's shard of each global batch (dicts of stacked tensors).

    Takes the dataset, the *global* batch size (divisible by ``world_size``),
    this process's ``rank`` and the ``world_size``, a shuffling ``seed``
    (default 0), ``drop_last`` (default True: the final incomplete global batch
    is dropped; False completes it with samples from the start of the epoch's
    order, like ``DistributedSampler``) and ``shuffle`` (default True).
    Call :meth:`set_epoch` before each epoch for a new order.

    Raises ``ValueError`` for a batch size not divisible by the world size, a
    rank outside ``[0, world_size)``, or a dataset smaller than one batch.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        drop_last: bool = True,
        shuffle: bool = True,
    ) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size) (got rank {rank}, world_size {world_size})")
        if batch_size < 1 or batch_size % world_size != 0:
            raise ValueError(
                f"global batch_size ({batch_size}) must be a positive multiple of world_size ({world_size})"
            )
        if drop_last and len(dataset) < batch_size:
            raise ValueError(
                f"dataset has {len(dataset)} samples, fewer than one global batch of {batch_size}; "
                "use a smaller batch or more data"
            )
        self.dataset = dataset
        self.batch_size = batch_size
        self.local_batch_size = batch_size // world_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.drop_last = drop_last
        self.shuffle = shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose order the next iteration follows."""
        self.epoch = epoch

    def __len__(self) -> int:
        n = len(self.dataset)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _order(self) -> Tensor:
        n = len(self.dataset)
        if not self.shuffle:
            order = torch.arange(n)
        else:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        total = len(self) * self.batch_size
        if total > n:  # drop_last=False: complete the last batch by wrapping around
            order = torch.cat([order, order.repeat(-(-total // n))])[:total]
        return order[:total]

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        return self.batches()

    def batches(self, start: int = 0) -> Iterator[dict[str, Tensor]]:
        """This epoch's batches from batch index ``start`` on (to resume mid-epoch)."""
        order = self._order()
        for b in range(start, len(self)):
            start = b * self.batch_size + self.rank * self.local_batch_size
            idx = order[start : start + self.local_batch_size].tolist()
            samples = [self.dataset[i] for i in idx]
            yield {k: torch.stack([s[k] for s in samples]) for k in samples[0]}
