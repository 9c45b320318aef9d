"""Kinds of GPU kernels (or, on the CPU, aten operators) by name, and the Markdown table of a kernel profile:
torch-free, shared by scripts/gpu_kernel_profile.py (which records profiles), the GPU suite's host probe and
scripts/gpu_tables.py (which render them)."""
from __future__ import annotations

import re

# first match wins: from the most specific name pattern to the least. Version 2 added the conv kind (the first
# files counted cuDNN's convolution kernels among the GEMMs), gemv, bmm and RMSNorm.
CATEGORIES_VERSION = 2
CATEGORIES = (
    ("triton", r"^triton_"),  # inductor's fused kernels, whatever they fuse
    ("attention", r"flash|fmha|attention|sdpa"),
    # the patch embedding: one kernel that no token method shrinks
    ("conv", r"convolve|convolution|conv2d|cudnn::cnn|fprop|dgrad|wgrad|implicit_gemm|nchwtonhwc"),
    ("gemm", r"gemm|gemv|cutlass|xmma|nvjet|cublas|wgmma|\bb?mm\b|baddbmm|addmm|matmul|linear"),
    ("norm", r"layer_norm|layernorm|rms_norm|rmsnorm"),
    ("softmax", r"softmax"),
    ("index", r"index_|aten::index$|gather|scatter|sort|topk|radix|cub::|take_along|masked"),
    ("elementwise", r"elementwise|vectorized|unrolled|reduce|copy|cat|gelu|add|mul|fill"),
)
# the patterns of the files written before CATEGORIES_VERSION (docs/gpu/2026-12-04-h200-kernels, -check)
_LEGACY = (
    ("attention", r"flash|fmha|attention|efficient_attention|sdpa"),
    ("gemm", r"gemm|cutlass|xmma|nvjet|cublas|wgmma|\bmm\b|addmm|matmul|linear"),
    ("triton", r"^triton_"),
    ("norm", r"layer_norm|layernorm|native_layer_norm"),
    ("softmax", r"softmax"),
    ("index", r"index|gather|scatter|sort|topk|radix|cub::|take_along|masked"),
    ("elementwise", r"elementwise|vectorized|unrolled|reduce|copy|cat|gelu|add|mul|fill"),
)
TABLE_COLUMNS = ("gemm", "attention", "conv", "norm", "elementwise", "softmax", "index", "triton", "other")


def category(name: str, patterns=CATEGORIES) -> str:
    """The kind of work a kernel (or an aten operator) does, from its name; "other" where no pattern matches."""
    low = name.lower()
    for label, pattern in patterns:
        if re.search(pattern, low):
            return label
    return "other"


def run_categories(run: dict, version: int) -> dict[str, float]:
    """ms per kind of one profiled run. A file of an older pattern set keeps its recorded kinds, with its top
    kernels (the only names it kept) moved to the kind the current patterns give them (its conv out of "gemm")."""
    cats = dict.fromkeys(TABLE_COLUMNS, 0.0)
    for kind, entry in run["categories"].items():
        cats[kind] += entry["ms"]
    if version < CATEGORIES_VERSION:
        for row in run["top"]:
            old, new = category(row["name"], _LEGACY), category(row["name"])
            cats[old] -= row["ms"]
            cats[new] += row["ms"]
    return cats


def table(doc: dict) -> str:
    """Markdown: per method and mode, wall and kernel ms per forward and the kernel ms by kind."""
    version = doc.get("categories_version", 1)
    head = "| method | mode | wall ms | kernel ms | launches | " + " | ".join(TABLE_COLUMNS) + " |"
    lines = [head, "|" + "---|" * (5 + len(TABLE_COLUMNS))]
    for run in doc["runs"]:
        cats = run_categories(run, version)
        wall = run.get("wall_ms")
        lines.append(f"| {run['method']} | {run['mode']} | {'-' if wall is None else f'{wall:.2f}'} | "
                     f"{run['total_ms']:.2f} | {run['launches']} | "
                     + " | ".join(f"{cats[c]:.2f}" if cats[c] >= 0.005 else "-" for c in TABLE_COLUMNS) + " |")
    return "\n".join(lines)
