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

from .errors import TokenpaceError, note

NPZ_SPLITS = {"train": "train", "val": "test", "test": "test"}


class PackedJpegDataset(Dataset):
    """Images stored as concatenated JPEG bytes: keys ``{split}_jpeg`` (uint8 blob), ``{split}_offsets`` (N+1),
    ``{split}_labels`` and ``classes``. ``split`` is "train" or "test" ("val" reads "test"). A file without
    ``{split}_labels`` holds unlabelled images (label -1)."""

    def __init__(self, path: str, split: str = "train", transform=None, limit: int | None = None) -> None:
        if split not in NPZ_SPLITS:
            raise TokenpaceError(f"split {split!r} is not accepted for {path}; choose one of train, val, test")
        prefix = NPZ_SPLITS[split]
        needed = [f"{prefix}_jpeg", f"{prefix}_offsets"]
        try:  # members are read here, so a truncated member fails now, not in a DataLoader worker
            with np.load(path) as z:
                missing = [k for k in needed if k not in z.files]
                if missing:
                    raise TokenpaceError(f"{path} is not a packed-JPEG .npz: missing keys {missing} (has "
                                         f"{sorted(z.files)})")
                self.blob, offsets = (z[k] for k in needed)
                labelled = f"{prefix}_labels" in z.files
                labels = z[f"{prefix}_labels"] if labelled else np.full(max(len(offsets) - 1, 0), -1)
                self.classes = [str(c) for c in z["classes"]] if "classes" in z.files else None
        except TokenpaceError:
            raise
        except Exception as err:  # not a zip, a truncated zip or member, a pickled member (BadZipFile, EOFError,..)
            raise TokenpaceError(f"{path} is not a readable .npz file (truncated or another format?): "
                                 f"{type(err).__name__}: {err}") from None
        self.path, self.split = path, prefix
        self.offsets = offsets.astype(np.int64)
        self.labels = labels.astype(np.int64)
        self._check()
        self.index = _spread(len(self.labels), limit, f"{path} ({prefix})")
        self.transform = transform

    def _check(self) -> None:
        """Offsets that cut the blob into images, labels within the classes, and JPEG start and end markers around
        every image: a damaged file is refused here with its first bad image named, not at batch 300 of an epoch."""
        where = f"{self.path} ({self.split})"
        offsets, labels = self.offsets, self.labels
        if self.blob.ndim != 1 or len(offsets) != len(labels) + 1:
            raise TokenpaceError(f"{where}: {self.split}_offsets must have one more entry than {self.split}_labels "
                                 f"and {self.split}_jpeg must be one byte string")
        if len(labels) == 0:
            raise TokenpaceError(f"{where} holds no images")
        bad = np.flatnonzero((offsets[1:] <= offsets[:-1]) | (offsets[1:] > len(self.blob)) | (offsets[:-1] < 0))
        if len(bad):
            raise TokenpaceError(f"{where}: bad offsets from image {bad[0]} on (offsets must increase and stay "
                                 f"within the {len(self.blob)}-byte blob)")
        starts, ends = offsets[:-1], offsets[1:]
        blob, last = self.blob, len(self.blob) - 1
        whole = ((ends - starts >= 4) & (blob[starts] == 0xFF) & (blob[np.minimum(starts + 1, last)] == 0xD8)
                 & (blob[np.maximum(ends - 2, 0)] == 0xFF) & (blob[np.maximum(ends - 1, 0)] == 0xD9))
        if not whole.all():
            raise TokenpaceError(f"{where}: image {np.flatnonzero(~whole)[0]} is not a whole JPEG (no start or end "
                                 "marker: truncated or another format)")
        if (labels < 0).all():  # unlabelled images
            return
        if labels.min() < 0 or (self.classes and labels.max() >= len(self.classes)):
            accepted = f"0..{len(self.classes) - 1} (its {len(self.classes)} classes)" if self.classes else ">= 0"
            raise TokenpaceError(f"{where}: labels must lie in {accepted}; found {labels.min()}..{labels.max()}")

    def __len__(self) -> int:
        return len(self.index)

    def image(self, i: int) -> Image.Image:
        data = self.blob[self.offsets[i]:self.offsets[i + 1]].tobytes()
        try:
            return Image.open(io.BytesIO(data)).convert("RGB")
        except (OSError, SyntaxError, ValueError) as err:  # PIL: truncated or corrupt image data
            raise TokenpaceError(f"{self.path} ({self.split}): image {i} cannot be decoded ({err})") from None

    def __getitem__(self, i: int):
        j = int(self.index[i])
        img = self.image(j)
        return (self.transform(img) if self.transform is not None else img), int(self.labels[j])


def _spread(length: int, limit: int | None, what: str = "the set") -> np.ndarray:
    """Indices of ``limit`` images spread evenly over the set (files are often in class order), or all of them
    (said in a note where ``limit`` asked for more than ``what`` holds)."""
    if limit is not None and limit > length:
        note(f"limit {limit} (--limit) is more than the {length} images of {what}: all of them are used")
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

    def sample(self, i: int) -> tuple[Image.Image, int, tuple[int, int, int, int]]:
        """(the composed image, its label, the object's box (x, y, width, height) in canvas pixels)."""
        img, label = self.base[i]
        rng = np.random.default_rng(self.seed * 1_000_003 + i)
        canvas = rng.integers(0, 256, (self.canvas, self.canvas, 3), dtype=np.uint8)
        w, h = img.size
        if w > self.canvas or h > self.canvas:
            raise TokenpaceError(f"--canvas {self.canvas} is smaller than image {i} ({w}x{h}); accepted: a canvas "
                                 "at least as large as the images")
        x, y = int(rng.integers(0, self.canvas - w + 1)), int(rng.integers(0, self.canvas - h + 1))
        canvas[y:y + h, x:x + w] = np.asarray(img)
        return Image.fromarray(canvas), label, (x, y, w, h)

    def __getitem__(self, i: int):
        out, label, _ = self.sample(i)
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
            raise TokenpaceError(f"data path {path!r} does not exist")
        ds: Dataset = PackedJpegDataset(path, split, inner, spec.limit)
    elif path.lower() in ("cifar10", "torch/cifar10"):
        ds = _cifar10(spec, split, inner)
    elif os.path.isdir(path):
        ds = _image_folder(path, split, inner)
    else:
        problem = "is not a data set" if os.path.exists(path) else "does not exist"
        raise TokenpaceError(f"data path {path!r} {problem}; accepted: a packed-JPEG .npz file, 'cifar10', or "
                             "an ImageNet-style folder with train/ and val/")
    if spec.limit is not None and not isinstance(ds, PackedJpegDataset):
        ds = torch.utils.data.Subset(ds, _spread(len(ds), spec.limit, f"{path} ({split})").tolist())
    if spec.canvas:
        ds = ClutteredDataset(ds, spec.canvas, transform, seed=0 if split == "train" else 1)
        ds[0]  # a canvas smaller than the images fails here, not in a worker
    return ds


CIFAR10_HOST = "www.cs.toronto.edu"  # where torchvision downloads CIFAR-10 from


def _cifar10(spec: DataSpec, split: str, transform) -> Dataset:
    from timm.data import create_dataset

    from .net import reachable

    if not os.path.isdir(os.path.join(spec.download_root, "cifar-10-batches-py")) and not reachable(CIFAR10_HOST):
        raise TokenpaceError(f"--data cifar10: CIFAR-10 is not in {spec.download_root} and {CIFAR10_HOST} cannot be "
                             "reached (offline?); download it once online, or pass a packed-JPEG .npz")
    return create_dataset("torch/cifar10", root=spec.download_root, split="train" if split == "train" else "test",
                          download=True, transform=transform)


def _image_folder(path: str, split: str, transform) -> Dataset:
    from timm.data import create_dataset

    folder = os.path.join(path, split if split == "train" else "val")
    if not os.path.isdir(folder):
        raise TokenpaceError(f"data folder {path!r} has no {os.path.basename(folder)!r} subfolder; expected "
                             "root/train/<class>/... and root/val/<class>/...")
    try:
        return create_dataset("", root=folder, transform=transform)
    except RuntimeError as err:  # timm: "Found 0 images in subfolders of ..."
        if "Found 0 images" not in str(err):
            raise
        raise TokenpaceError(f"data folder {folder!r} holds no images; expected {folder}/<class>/<image>.jpg "
                             "(.png, .jpeg)") from None


def num_classes_of(ds: Dataset) -> int | None:
    """Number of classes of a dataset built by :func:`build_dataset`, when it knows."""
    while isinstance(ds, (ClutteredDataset, torch.utils.data.Subset)):
        ds = ds.base if isinstance(ds, ClutteredDataset) else ds.dataset
    if isinstance(ds, PackedJpegDataset):
        return len(ds.classes) if ds.classes else int(ds.labels.max()) + 1
    reader = getattr(ds, "reader", None)
    classes = getattr(reader, "class_to_idx", None) or getattr(getattr(reader, "_dataset", None), "classes", None)
    return len(classes) if classes else None


def labels_of(ds: Dataset) -> np.ndarray | None:
    """Every label of a dataset built by :func:`build_dataset`, read without decoding an image; None when the
    dataset does not say."""
    base, index = ds.base if isinstance(ds, ClutteredDataset) else ds, None
    if isinstance(base, torch.utils.data.Subset):
        base, index = base.dataset, np.asarray(base.indices)
    if isinstance(base, PackedJpegDataset):
        labels = base.labels[base.index]
    else:
        reader = getattr(base, "reader", None)
        samples = getattr(reader, "samples", None)
        targets = getattr(getattr(reader, "_dataset", None), "targets", None)
        if samples is not None:
            labels = np.asarray([target for _, target in samples], dtype=np.int64)
        elif targets is not None:
            labels = np.asarray(targets, dtype=np.int64)
        else:
            return None
    return labels if index is None else labels[index]


def check_classifier(model, what: str) -> None:
    """TokenpaceError when ``model`` has no classifier (``num_classes`` 0: it returns features, as timm's encoders
    do, which also drop a ``num_classes`` argument), for a command that needs logits."""
    if getattr(model, "num_classes", None) == 0:
        raise TokenpaceError(f"{what} has no classifier (num_classes=0): it returns features, not class logits; this "
                             "command needs a classifier: build one with --model-args num_classes=N (its head then "
                             "starts untrained). timm's encoders ignore num_classes (e.g. the VLM towers' *_enc "
                             "models: choose the name without _enc)")


def check_labels(ds: Dataset, num_classes: int, what: str) -> None:
    """TokenpaceError when a label of ``ds`` is not a class index of a ``num_classes``-way classifier."""
    labels = labels_of(ds)
    if labels is not None and len(labels) and (labels < 0).all():
        raise TokenpaceError(f"{what} has no labels (unlabelled images); this command needs class labels "
                             "(`tokenpace tune` can use agreement with the dense model instead)")
    if labels is not None and len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise TokenpaceError(f"{what} has labels {labels.min()}..{labels.max()}, outside the model's "
                             f"{num_classes} classes (0..{num_classes - 1}); build the model with "
                             f"num_classes={labels.max() + 1} or more (--model-args num_classes=N)")


def data_config(model) -> dict:
    """timm's data config of ``model`` (mean, std, interpolation, crop_pct) at the input size it was built for."""
    from timm.data import resolve_data_config

    from .families import adapter_for

    config = resolve_data_config({}, model=model)
    config["input_size"] = adapter_for(model).input_size()  # the size the model was built for, not its weights'
    return config


def eval_transform(model, crop_pct: float | None = None):
    """timm's evaluation transform for ``model``: resize, centre crop (crop_pct 1.0 for tiny <= 64 px inputs)."""
    from timm.data import create_transform

    c = data_config(model)
    size = c["input_size"][-1]
    crop_pct = crop_pct if crop_pct is not None else (1.0 if size <= 64 else c["crop_pct"])
    return create_transform(input_size=c["input_size"], mean=c["mean"], std=c["std"],
                            interpolation=c["interpolation"], is_training=False, crop_pct=crop_pct)
