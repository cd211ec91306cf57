"""The training batches: which items each step reads, and the random draws attached to them.

Both are a fixed function of the seed and the position in the sample stream (EDM2-style), so
resuming at step k reads exactly the batches, with exactly the draws, that an uninterrupted
run would have: no sampler state needs saving. Neither depends on the number of ranks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset, Sampler, default_collate

from dfm_cli.errors import DfmError
from dfm_cli.method.flow import Draws, FlowObjective
from dfm_cli.seeding import BATCH_STAGE, DATA_ORDER, SAMPLE_DRAWS, mix_seed


class StreamBatches(Sampler[list[int]]):
    """This rank's share of the batches of an endless stream of epochs, each a seeded
    permutation of the dataset.

    Item i of the stream is `perm(epoch = i // n)[i % n]`. Global batch k covers items
    `[k B, (k + 1) B)`, and rank r of W takes the r-th contiguous B / W of them. Starting at
    `start_batch` therefore resumes exactly, for any W that divides B.
    """

    def __init__(self, n: int, batch_size: int, seed: int, start_batch: int = 0, rank: int = 0, world: int = 1):
        self.n, self.batch_size, self.seed, self.start_batch = n, batch_size, seed, start_batch
        self.rank, self.local = rank, batch_size // world
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(mix_seed(self.seed, DATA_ORDER, epoch))
            self._perms = {epoch: torch.randperm(self.n, generator=g)}
        return self._perms[epoch]

    def __iter__(self) -> Iterator[list[int]]:
        k = self.start_batch
        while True:
            first = k * self.batch_size + self.rank * self.local
            yield [int(self._perm(i // self.n)[i % self.n]) for i in range(first, first + self.local)]
            k += 1


def split_batch(b: int, micro: int, world: int) -> tuple[int, int]:
    """(per-rank batch, micro-batch) for the global batch `b` (`train.batch_size`) and the
    micro-batch `micro` (`train.batch_per_gpu`, 0 = the whole per-rank batch), or a clear error."""
    if b % world:
        raise DfmError(f"train.batch_size = {b} does not split over {world} processes; use a multiple of {world}")
    local = b // world
    micro = micro or local
    if local % micro:
        raise DfmError(
            f"train.batch_per_gpu = {micro} does not divide the per-process batch {local} "
            f"(train.batch_size {b} / {world} processes)"
        )
    return local, micro


@dataclass(frozen=True)
class BatchKey:
    """What the loader needs to build one step's batch on one rank."""

    step: int
    first: int  # position in the sample stream of this rank's first sample
    indices: list[int]  # dataset items, in order


class StepBatches(Sampler[BatchKey]):
    """`StreamBatches` with each batch tagged by its step and stream position, the two things
    the per-sample and per-batch seeds of the draws are made from."""

    def __init__(self, n: int, batch_size: int, seed: int, start: int, rank: int, world: int):
        self.stream = StreamBatches(n, batch_size, seed, start, rank, world)
        self.start, self.batch_size, self.rank, self.local = start, batch_size, rank, batch_size // world

    def __iter__(self) -> Iterator[BatchKey]:
        for step, indices in enumerate(self.stream, self.start):
            yield BatchKey(step, step * self.batch_size + self.rank * self.local, indices)


class DrawnBatches(Dataset):
    """The training data with every sample's draws (stage, timesteps, label dropout, noise)
    attached. The `DataLoader` builds these batches, in its worker processes when
    `data.num_workers > 0`, so the step does not wait for the draws; they are the same
    draws, from the same seeds, as if the step made them itself. `objective_at(step)` is the
    objective that draws step `step`'s batch (a method that trains in phases changes it)."""

    def __init__(
        self,
        dataset: Dataset,
        objective_at: Callable[[int], FlowObjective],
        shapes: Sequence[Sequence[int]],
        seed: int,
        label_dropout: float,
    ):
        self.dataset, self.objective_at, self.shapes = dataset, objective_at, shapes
        self.seed, self.label_dropout = seed, label_dropout

    def __getitems__(self, key: BatchKey) -> tuple[torch.Tensor, torch.Tensor, Draws]:
        if hasattr(self.dataset, "__getitems__"):
            x, y = self.dataset.__getitems__(key.indices)
        else:
            x, y = default_collate([self.dataset[i] for i in key.indices])
        seeds = [mix_seed(self.seed, SAMPLE_DRAWS, key.first + i) for i in range(len(key.indices))]
        objective = self.objective_at(key.step)
        draws = objective.draw(self.shapes, seeds, mix_seed(self.seed, BATCH_STAGE, key.step), self.label_dropout)
        return x, y, draws


def keep_batch(batch):
    """`DrawnBatches` returns whole batches from `__getitems__`; nothing to collate."""
    return batch
