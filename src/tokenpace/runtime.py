"""Process-level settings for timed runs: what the host C library does with freed memory (CPU), and whether
cuDNN times its convolution algorithms (CUDA)."""
from __future__ import annotations

import ctypes
from contextlib import contextmanager
from typing import Iterator

import torch

MALLOC_CHOICES = ("system", "keep")
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's mallopt parameter numbers (malloc.h)


def keep_freed_memory() -> None:
    """Make glibc keep freed memory in the process for reuse instead of handing it back to the kernel.

    By default glibc serves every allocation above 32 MiB (a ViT's activations at batch 32) with a fresh mmap
    and unmaps it on free, so each training step page-faults its working set in again; on the project's VM that
    was 355,000 faults and about a third of a DeiT-S training step. No mmap and no trimming keeps the pages
    mapped: the process holds its peak memory until it exits. The effect of jemalloc or tcmalloc, which
    PyTorch's CPU tuning guide recommends, without a preloaded library. Raises RuntimeError where the C library
    has no glibc mallopt (macOS, musl).
    """
    try:
        libc = ctypes.CDLL(None)  # the symbols already loaded into this process, the C library's among them
    except (OSError, TypeError):  # Windows has no such handle
        libc = None
    if libc is None or not hasattr(libc, "gnu_get_libc_version"):
        raise RuntimeError("--malloc keep needs glibc (Linux) and this process runs on another C library; "
                           "accepted here: --malloc system")
    if not (libc.mallopt(_M_MMAP_MAX, 0) and libc.mallopt(_M_TRIM_THRESHOLD, -1)):
        raise RuntimeError("glibc refused mallopt(M_MMAP_MAX=0, M_TRIM_THRESHOLD=-1); use --malloc system")


def keep_freed_memory_where_possible() -> str:
    """A command's default of ``--malloc keep`` where glibc allows it; returns what is in effect ("keep", or
    "system" after a note on stderr)."""
    from .errors import note

    try:
        keep_freed_memory()
    except RuntimeError:
        note("the C library is not glibc: freed memory goes back to the system (--malloc system); CPU timings may "
             "vary more between runs")
        return "system"
    return "keep"


@contextmanager
def cudnn_autotuned(device: torch.device) -> Iterator[None]:
    """On CUDA, let cuDNN time its algorithms for each convolution shape and keep the fastest
    (``torch.backends.cudnn.benchmark``, as timm's benchmark and train scripts set it); the caller's setting comes
    back afterwards. Without it cuDNN's heuristic picked an implicit-GEMM kernel for ViT's 16x16 stride-16 patch
    embedding at batch 256 bf16 on an H200: 1.66 ms of a 13 ms DeiT-S forward, a cost no token method reduces
    (docs/gpu/2026-12-04-h200-kernels/kernels.json; 0.97 ms autotuned). The search runs in the first call of each
    shape: time after a warm-up call. Nothing changes off CUDA."""
    if torch.device(device).type != "cuda":
        yield
        return
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before
