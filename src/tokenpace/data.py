"""Datasets for training and evaluation: timm's readers (ImageNet-style folders and the rest), torchvision's
CIFAR-10, and the packed-JPEG ``.npz`` format of ``../shared/data/cifar10_jpeg.npz`` for offline work."""
from __future__ import annotations

import io
import os
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

NPZ_SPLITS = {"train": "train", "val": "test", "test": "test"}


class PackedJpegDataset(Dataset):
    """Images stored as concatenated JPEG bytes: keys ``{split}_jpeg`` (uint8 blob), ``{split}_offsets`` (N+1),
    ``{split}_labels`` and ``classes``. ``split`` is "train" or "test" ("val" reads "test")."""

    def __init__(self, path: str, split: str = "train", transform=None, limit: int | None = None) -> None:
        if split not in NPZ_SPLITS:
            raise ValueError(f"split {split!r} is not accepted for {path}; choose one of train, val, test")
        prefix = NPZ_SPLITS[split]
        try:
            z = np.load(path)
        except (OSError, ValueError) as err:
            raise ValueError(f"{path} is not a readable .npz file ({err})") from None
        needed = [f"{prefix}_jpeg", f"{prefix}_offsets", f"{prefix}_labels"]
        missing = [k for k in needed if k not in z.files]
        if missing:
            raise ValueError(f"{path} is not a packed-JPEG .npz: missing keys {missing} (has {sorted(z.files)})")
        self.blob = z[needed[0]]
        self.offsets = z[needed[1]].astype(np.int64)
        self.labels = z[needed[2]].astype(np.int64)
        self.classes = [str(c) for c in z["classes"]] if "classes" in z.files else None
        if len(self.offsets) != len(self.labels) + 1:
            raise ValueError(f"{path}: {needed[1]} must have one more entry than {needed[2]}")
        self.index = _spread(len(self.labels), limit)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.index)

    def image(self, i: int) -> Image.Image:
        data = self.blob[self.offsets[i]:self.offsets[i + 1]].tobytes()
        return Image.open(io.BytesIO(data)).convert("RGB")

    def __getitem__(self, i: int):
        j = int(self.index[i])
        img = self.image(j)
        return (self.transform(img) if self.transform is not None else img), int(self.labels[j])


def _spread(length: int, limit: int | None) -> np.ndarray:
    """Indices of ``limit`` images spread evenly over the set (files are often in class order), or all of them."""
    if limit is None or limit >= length:
        return np.arange(length)
    return np.linspace(0, length - 1, limit).round().astype(np.int64)


class ClutteredDataset(Dataset):
    """Each image pasted at a random (per index, fixed) position on a ``canvas`` x ``canvas`` noise background: small
    objects in clutter, so that informative tokens are a minority, as in ImageNet."""

    def __init__(self, base: Dataset, canvas: int, transform=None, seed: int = 0) -> None:
        self.base, self.canvas, self.transform, self.seed = base, canvas, transform, seed

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        img, label = self.base[i]
        rng = np.random.default_rng(self.seed * 1_000_003 + i)
        canvas = rng.integers(0, 256, (self.canvas, self.canvas, 3), dtype=np.uint8)
        w, h = img.size
        if w > self.canvas or h > self.canvas:
            raise ValueError(f"canvas {self.canvas} is smaller than the image ({w}x{h})")
        x, y = rng.integers(0, self.canvas - w + 1), rng.integers(0, self.canvas - h + 1)
        canvas[y:y + h, x:x + w] = np.asarray(img)
        out = Image.fromarray(canvas)
        return (self.transform(out) if self.transform is not None else out), label


@dataclass(frozen=True)
class DataSpec:
    """Where images come from: a packed-JPEG .npz path, ``cifar10`` (torchvision; downloads when online) or an
    ImageNet-style folder (timm ``create_dataset``: ``root/train/<class>/*``, ``root/val/<class>/*``)."""

    path: str
    canvas: int | None = None  # cluttered variant: paste onto a noise canvas of this size
    limit: int | None = None  # N images spread evenly over each split (tests, smoke runs)
    download_root: str = os.path.expanduser("~/.cache/tokenpace")


def build_dataset(spec: DataSpec, split: str, transform=None) -> Dataset:
    """The dataset of ``split`` ("train" or "val") with ``transform`` applied last."""
    inner = None if spec.canvas else transform
    path = spec.path
    if path.endswith(".npz"):
        if not os.path.isfile(path):
            raise ValueError(f"data path {path!r} does not exist")
        ds: Dataset = PackedJpegDataset(path, split, inner, spec.limit)
    elif path.lower() in ("cifar10", "torch/cifar10"):
        from timm.data import create_dataset

        ds = create_dataset("torch/cifar10", root=spec.download_root, split="train" if split == "train" else "test",
                            download=True, transform=inner)
    elif os.path.isdir(path):
        from timm.data import create_dataset

        folder = os.path.join(path, split if split == "train" else "val")
        if not os.path.isdir(folder):
            raise ValueError(f"data folder {path!r} has no {os.path.basename(folder)!r} subfolder; expected "
                             "root/train/<class>/... and root/val/<class>/...")
        ds = create_dataset("", root=folder, transform=inner)
    else:
        raise ValueError(f"data path {path!r} does not exist; accepted: a packed-JPEG .npz file, 'cifar10', or an "
                         "ImageNet-style folder with train/ and val/")
    if spec.limit is not None and not isinstance(ds, PackedJpegDataset):
        ds = torch.utils.data.Subset(ds, _spread(len(ds), spec.limit).tolist())
    if spec.canvas:
        ds = ClutteredDataset(ds, spec.canvas, transform, seed=0 if split == "train" else 1)
    return ds


def num_classes_of(ds: Dataset) -> int | None:
    """Number of classes of a dataset built by :func:`build_dataset`, when it knows."""
    while isinstance(ds, (ClutteredDataset, torch.utils.data.Subset)):
        ds = ds.base if isinstance(ds, ClutteredDataset) else ds.dataset
    if isinstance(ds, PackedJpegDataset):
        return len(ds.classes) if ds.classes else int(ds.labels.max()) + 1
    reader = getattr(ds, "reader", None)
    classes = getattr(reader, "class_to_idx", None) or getattr(getattr(reader, "_dataset", None), "classes", None)
    return len(classes) if classes else None
