"""Epoch-seeded sampling: the order of an epoch and every sample's augmentation depend only on (seed, epoch, index),
so a resumed run replays the same batches whatever the number of workers, and with persistent workers (which
live across epochs and never see a reseeded generator)."""
from __future__ import annotations

import random

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler


class EpochSampler(Sampler):
    """A shuffle of ``length`` indices seeded from (seed, epoch); yields ``(epoch, index)`` keys for
    :class:`SeededSamples`. Call :meth:`start_epoch` before iterating an epoch."""

    def __init__(self, length: int, seed: int) -> None:
        self.length, self.seed, self.epoch = length, seed, 0

    def start_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def __iter__(self):
        order = torch.randperm(self.length, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch))
        return iter([(self.epoch, i) for i in order.tolist()])


class SeededSamples(Dataset):
    """``base[index]`` for a key ``(epoch, index)``, with Python's, NumPy's and torch's RNGs seeded from (seed,
    epoch, index) while the sample loads and restored afterwards."""

    def __init__(self, base: Dataset, seed: int) -> None:
        self.base, self.seed = base, seed

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        seed = (self.seed * 1_000_003 + epoch * 100_003 + index) % 2**32
        saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
        random.seed(seed)
        np.random.seed(seed)
        torch.default_generator.manual_seed(seed)  # the CPU generator only: transforms run on the CPU
        try:
            return self.base[index]
        finally:
            random.setstate(saved[0])
            np.random.set_state(saved[1])
            torch.set_rng_state(saved[2])
