"""Data order and augmentation randomness derived from (seed, epoch, index) alone.

A run's views then do not depend on how many loader workers there are, on how many ranks share the
batch, or on where a run was stopped and resumed: ``EpochSampler`` draws each epoch's order from
``seed + epoch`` and deals it to ranks, and ``SeededViews`` augments image ``index`` of epoch ``epoch``
with its own generator state. That is what lets a 2-rank run take the same steps as a 1-rank run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from sslbench.data.datasets import ImageSource


class EpochSampler(Sampler[tuple[int, int]]):
    """Yields ``(epoch, index)``: a fresh permutation per epoch, this rank's share of each global batch.

    Rank ``r`` of ``world`` takes positions ``r, r + world, ...`` of the permutation (as
    DistributedSampler does), truncated to whole global batches, so the union of the ranks' k-th
    batches is the k-th batch of a one-process run with ``batch_per_rank * world`` images.
    """

    def __init__(
        self, size: int, seed: int, batch_per_rank: int, rank: int = 0, world: int = 1, shuffle: bool = True
    ) -> None:
        self.size, self.seed, self.shuffle = size, seed, shuffle
        self.rank, self.world = rank, world
        self.usable = (size // (batch_per_rank * world)) * batch_per_rank * world
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """The epoch whose order to draw; ``skip``: this rank's first images of it already trained on
        (a resume mid-epoch)."""
        self.epoch, self.skip = epoch, skip

    def __len__(self) -> int:
        return self.usable // self.world - self.skip

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.size, generator=generator)
        else:
            order = torch.arange(self.size)
        for index in order[: self.usable][self.rank :: self.world][self.skip :].tolist():
            yield self.epoch, index


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A well-mixed 63-bit seed for one image of one epoch."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(2, np.uint64)[0] >> np.uint64(1))


class SeededViews(Dataset):
    """``(epoch, index) -> (transform(image), label)`` with torch's generator seeded for that pair.

    The transforms draw from torch's global generator (torchvision v1); its state is forked around
    each call so training's own randomness (drop-path, dropout) is untouched.
    """

    def __init__(self, source: ImageSource, transform: Callable[[Any], Any], seed: int) -> None:
        self.source, self.transform, self.seed = source, transform, seed

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: tuple[int, int]) -> tuple[Any, int]:
        epoch, index = key
        image = self.source.load(index)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed(self.seed, epoch, index))
            views = self.transform(image)
        return views, int(self.source.labels[index])
