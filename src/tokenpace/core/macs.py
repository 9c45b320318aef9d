"""Analytic multiply-accumulate counts (MACs, not FLOPs: one multiply-add counts once; FLOPs are about 2x).

LayerNorm, softmax, activations and additions are not counted, as in the papers' tables and fvcore.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn


def conv_macs(module: nn.Module, size: tuple[int, int]) -> tuple[int, tuple[int, int]]:
    """MACs of the Conv2d layers inside ``module`` applied in order to a ``size`` input, and the output size
    (bias not counted, as in FlopCounterMode and fvcore; groups are in the weight's shape)."""
    total = 0
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            size = tuple((s + 2 * p - d * (k - 1) - 1) // st + 1 for s, p, d, k, st in
                         zip(size, m.padding, m.dilation, m.kernel_size, m.stride))
            total += m.weight.numel() * size[0] * size[1]
    return total, size


def linear_macs(module: nn.Module | None) -> int:
    """Per-token MACs of the token-wise linear layers inside ``module`` (itself included; 0 for None)."""
    if module is None:
        return 0
    return sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))


@dataclass(frozen=True)
class BlockShape:
    """Per-token costs of one pre-norm transformer block, read off its linear layers."""

    dim: int
    attn_dim: int  # heads * head_dim
    qkv: int  # MACs per token of the q, k, v projection
    proj: int  # MACs per token of the output projection (plus a gate, if any)
    mlp: int  # MACs per token of the MLP


@dataclass(frozen=True)
class BlockWork:
    """What one block computes in a forward, as token counts (the method decides these)."""

    attn_tokens: int  # tokens projected to q, k, v and attending among themselves
    mlp_tokens: int  # tokens through the MLP
    cls_row_keys: int = 0  # class-query logits against this many keys, for ranking
    score_tokens: int = 0  # IdleViT class-logit scores over this many tokens
    score_projects_keys: bool = False  # scores project every key (qk-norm models) instead of W_k^T q
    merged_tokens: int = 0  # tokens folded into one by a weighted sum (EViT fusion, representative token)


def block_macs(shape: BlockShape, work: BlockWork) -> int:
    n = work.attn_tokens
    total = n * (shape.qkv + shape.proj) + 2 * n * n * shape.attn_dim + work.mlp_tokens * shape.mlp
    total += work.cls_row_keys * shape.attn_dim
    if work.score_tokens:
        q_cls = shape.dim * shape.attn_dim
        if work.score_projects_keys:
            total += q_cls + work.score_tokens * shape.dim * shape.attn_dim + work.score_tokens * shape.attn_dim
        else:
            total += 2 * q_cls + work.score_tokens * shape.dim
    total += work.merged_tokens * shape.dim
    return total


def dense_work(num_tokens: int) -> BlockWork:
    return BlockWork(attn_tokens=num_tokens, mlp_tokens=num_tokens)
