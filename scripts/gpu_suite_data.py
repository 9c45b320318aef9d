"""CIFAR-10 held on the training device: the packed JPEGs decoded once (in parallel worker processes) into one
uint8 tensor per split, and batched augmentation run on that device (random crop with padding, flip, random
erasing), so no data loader or CPU transform sits in the training loop."""
from __future__ import annotations

import functools
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from tokenpace.data import PackedJpegDataset

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


@dataclass
class HostSplit:
    images: np.ndarray  # (N, H, W, 3) uint8
    labels: np.ndarray  # (N,)


@dataclass
class DeviceSplit:
    images: torch.Tensor  # (N, 3, H, W) uint8
    labels: torch.Tensor  # (N,) int64

    def __len__(self) -> int:
        return self.labels.numel()


def _decode(path: str, split: str, indices: np.ndarray) -> np.ndarray:
    ds = PackedJpegDataset(path, split)
    return np.stack([np.asarray(ds.image(int(i)), dtype=np.uint8) for i in indices])


def decode_split(path: str, split: str, limit: int | None, workers: int) -> HostSplit:
    """Every image of ``split`` (or ``limit`` of them, spread over the classes), decoded by ``workers``
    processes. Run it before CUDA or torch.compile start threads: the workers are forked."""
    ds = PackedJpegDataset(path, split, limit=limit)
    chunks = np.array_split(ds.index, max(1, min(workers, len(ds.index) // 500)))
    if len(chunks) == 1:
        images = _decode(path, split, chunks[0])
    else:
        with ProcessPoolExecutor(len(chunks), mp_context=multiprocessing.get_context("fork")) as pool:
            images = np.concatenate(list(pool.map(_decode, [path] * len(chunks), [split] * len(chunks), chunks)))
    return HostSplit(images, ds.labels[ds.index])


def decode_cifar(path: str, train_limit: int | None, test_limit: int | None) -> tuple[HostSplit, HostSplit]:
    workers = min(16, os.cpu_count() or 1)
    return decode_split(path, "train", train_limit, workers), decode_split(path, "test", test_limit, workers)


def to_device(split: HostSplit, device: torch.device) -> DeviceSplit:
    """One uint8 tensor on ``device`` (50,000 CIFAR images: 154 MB), channels first."""
    x = torch.from_numpy(split.images).to(device).permute(0, 3, 1, 2).contiguous()
    return DeviceSplit(x, torch.from_numpy(split.labels.astype(np.int64)).to(device))


@functools.lru_cache(maxsize=None)
def _channel_stats(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The CIFAR-10 mean and std (1, 3, 1, 1) in uint8 units, made once per device: building them from Python lists
    at every batch is a pageable host-to-device copy, which waits for the stream, so the host would stop queueing
    the next step's kernels while the GPU drains."""
    mean = torch.tensor(CIFAR_MEAN, device=device).view(1, 3, 1, 1) * 255
    return mean, torch.tensor(CIFAR_STD, device=device).view(1, 3, 1, 1) * 255


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float, standardised with the CIFAR-10 channel statistics."""
    mean, std = _channel_stats(images.device)
    return (images.float() - mean) / std


def random_crop_flip(x: torch.Tensor, pad: int) -> torch.Tensor:
    """Per-image random crop of the reflect-padded image back to its size, then a random horizontal flip."""
    B, C, H, W = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    dy = torch.randint(0, 2 * pad + 1, (B, 1), device=x.device)
    dx = torch.randint(0, 2 * pad + 1, (B, 1), device=x.device)
    rows = (dy + torch.arange(H, device=x.device))[:, :, None]  # (B, H, 1)
    cols = (dx + torch.arange(W, device=x.device))[:, None, :]  # (B, 1, W)
    batch = torch.arange(B, device=x.device)[:, None, None]
    out = padded[batch, :, rows, cols].permute(0, 3, 1, 2)  # advanced indices first: (B, H, W, C) -> (B, C, H, W)
    flip = torch.rand(B, 1, 1, 1, device=x.device) < 0.5
    return torch.where(flip, out.flip(3), out)


def random_erase(x: torch.Tensor, prob: float, area=(0.02, 0.25), log_ratio=(-1.2, 1.2)) -> torch.Tensor:
    """timm's random erasing, batched: with probability ``prob`` one box per image is set to normal noise."""
    B, C, H, W = x.shape
    dev = x.device
    target = torch.empty(B, device=dev).uniform_(*area) * H * W
    ratio = torch.empty(B, device=dev).uniform_(*log_ratio).exp()
    h = (target * ratio).sqrt().round().clamp(1, H).long()
    w = (target / ratio).sqrt().round().clamp(1, W).long()
    top = (torch.rand(B, device=dev) * (H - h + 1)).long()
    left = (torch.rand(B, device=dev) * (W - w + 1)).long()
    r = torch.arange(H, device=dev)[None, :]
    c = torch.arange(W, device=dev)[None, :]
    inside_r = (r >= top[:, None]) & (r < (top + h)[:, None])  # (B, H)
    inside_c = (c >= left[:, None]) & (c < (left + w)[:, None])  # (B, W)
    box = inside_r[:, :, None] & inside_c[:, None, :] & (torch.rand(B, 1, 1, device=dev) < prob)
    return torch.where(box[:, None], torch.randn_like(x), x)


def paste_on_noise(images: torch.Tensor, canvas: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, 3, h, w) -> (B, 3, canvas, canvas): each image at a random place on uniform pixel noise, so the object is
    a minority of the tokens and a token selection that keeps the wrong half loses it (the idea of
    ``tokenpace.data.ClutteredDataset``, made on the device, with other draws). uint8 images get uint8 noise; float
    images (already normalised and augmented) get the noise normalised the same way. ``generator`` fixes the noise
    and the places for one device type."""
    B, C, h, w = images.shape
    if canvas < max(h, w):
        raise ValueError(f"canvas {canvas} is smaller than the {h}x{w} images; accepted: a canvas of at least "
                         f"{max(h, w)}")
    dev = images.device
    noise = torch.randint(0, 256, (B, C, canvas, canvas), dtype=torch.uint8, device=dev, generator=generator)
    if images.is_floating_point():
        noise = normalize(noise).to(images.dtype)
    top = torch.randint(0, canvas - h + 1, (B, 1), device=dev, generator=generator)
    left = torch.randint(0, canvas - w + 1, (B, 1), device=dev, generator=generator)
    rows = torch.arange(canvas, device=dev)[None, :] - top  # (B, canvas): the image row each canvas row shows
    cols = torch.arange(canvas, device=dev)[None, :] - left
    inside = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]  # (B, canvas, canvas)
    batch = torch.arange(B, device=dev)[:, None, None]
    shown = images[batch, :, rows.clamp(0, h - 1)[:, :, None], cols.clamp(0, w - 1)[:, None, :]]  # (B, H, W, C)
    # where() would follow the permuted layout (channels last): the model and cuDNN get the usual one
    return torch.where(inside[:, None], shown.permute(0, 3, 1, 2), noise).contiguous()


def cluttered(split: DeviceSplit, canvas: int, seed: int) -> DeviceSplit:
    """A cluttered copy of ``split`` with its noise and places drawn from ``seed`` (the same set on every run on
    one kind of device; CPU and CUDA generators draw differently): the test set cluttered evaluations read."""
    generator = torch.Generator(device=split.images.device).manual_seed(seed)
    return DeviceSplit(paste_on_noise(split.images, canvas, generator), split.labels)


def augment(images: torch.Tensor, pad: int, erase_prob: float) -> torch.Tensor:
    """A training batch: uint8 images -> normalised, cropped, flipped and erased floats."""
    x = random_crop_flip(normalize(images), pad)
    return random_erase(x, erase_prob) if erase_prob > 0 else x
