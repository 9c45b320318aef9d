"""The images ``tune`` works on: a deterministic split into a tuning part (searched on) and a check part (only the
final figures), labels found or declared absent, and the tuning part decoded once when it fits in memory."""
from __future__ import annotations

import numbers

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from ..data import labels_of
from ..errors import TokenpaceError

CACHE_BYTES = 2 * 2**30  # the tuning split is kept decoded in memory up to this size


def split_indices(n: int, check_fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(tuning, check) image indices: a seeded permutation cut at ``check_fraction``, each part sorted; the same
    for the same ``n``, fraction and seed, so a check figure can be reproduced."""
    if n < 2:
        raise TokenpaceError(f"tune needs at least 2 images (one to tune on, one to check); the data has {n}")
    n_check = min(n - 1, max(1, round(n * check_fraction)))
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[n_check:]), np.sort(order[:n_check])


def _is_label(value) -> bool:
    if isinstance(value, torch.Tensor):
        return value.ndim == 0 and not value.is_floating_point() and int(value) >= 0
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 0


def has_labels(dataset: Dataset) -> bool:
    """Whether every image of ``dataset`` has a class label (items ``(image, label >= 0)``); unlabelled data has
    bare images or -1 labels."""
    labels = labels_of(dataset)
    if labels is not None:
        return len(labels) > 0 and bool((labels >= 0).all())
    item = dataset[0]
    return isinstance(item, (tuple, list)) and len(item) > 1 and _is_label(item[1])


class WithTargets(Dataset):
    """``(image, label)`` items, the label -1 when the labels are not used (bare images included)."""

    def __init__(self, dataset: Dataset, labelled: bool) -> None:
        self.dataset, self.labelled = dataset, labelled

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        item = self.dataset[i]
        image = item[0] if isinstance(item, (tuple, list)) else item
        return image, int(item[1]) if self.labelled else -1


def loader(dataset: Dataset, indices: np.ndarray, labelled: bool, batch_size: int, workers: int,
           pin_memory: bool = False) -> DataLoader:
    return DataLoader(Subset(WithTargets(dataset, labelled), indices.tolist()), batch_size=batch_size,
                      num_workers=workers, pin_memory=pin_memory)


def decoded_once(batches: DataLoader, limit_bytes: int = CACHE_BYTES):
    """The loader's batches as a list (decoded once, reused by every pass) when they fit in ``limit_bytes``, else
    the loader itself (decoded again on each pass)."""
    first = batches.dataset[0][0]
    if len(batches.dataset) * first.numel() * first.element_size() > limit_bytes:
        return batches
    return list(batches)
