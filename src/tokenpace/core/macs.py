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


def pointwise_conv(module: nn.Module) -> bool:
    """A Conv2d that is a token-wise linear layer: 1x1 kernel, stride 1, no padding, no groups (timm's NCHW LeViT)."""
    return (isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1) and module.stride == (1, 1)
            and module.padding == (0, 0) and module.groups == 1)


def linear_macs(module: nn.Module | None) -> int:
    """Per-token MACs of the token-wise linear layers inside ``module`` (itself included; 0 for None): Linear layers
    and 1x1 convolutions."""
    if module is None:
        return 0
    return sum(m.in_features * m.out_features if isinstance(m, nn.Linear) else m.in_channels * m.out_channels
               for m in module.modules() if isinstance(m, nn.Linear) or pointwise_conv(m))


@dataclass(frozen=True)
class BlockShape:
    """What one token costs in a block (MACs), read off its layers by the family."""

    dim: int  # token width C
    qk_dim: int  # all heads' query/key width (the q . k products)
    v_dim: int  # all heads' value width (the attention @ v products)
    qkv: int  # per-token MACs of the q, k, v projections
    proj: int  # per-token MACs after the attention (output projection, gate; a ParallelScalingBlock's MLP branch)
    mlp: int  # per-token MACs of the MLP half (0 in a ParallelScalingBlock)
    q_proj: int = 0  # per-token MACs of the query projection alone (scores; 0: dim * qk_dim)
    k_proj: int = 0  # per-token MACs of the key projection alone (scores; 0: dim * qk_dim; less with grouped keys)
    head_mix: int = 0  # per query-key pair, MACs of one mix of the heads (CaiT: logits, then probabilities)
    linear_attention: int = 0  # per-token MACs of an attention linear in the token count (XCiT's covariance: 2 C d)

    def query_macs(self) -> int:
        return self.q_proj or self.dim * self.qk_dim

    def key_macs(self) -> int:
        return self.k_proj or self.dim * self.qk_dim


@dataclass(frozen=True)
class ScoreWork:
    """Scores a block computes before it runs, over ``tokens`` tokens per group (for MACs): the query kind ("cls",
    "mean", or "norm"/"random", which cost nothing) and whether every key is projected (the official IdleViT code
    does; tokenpace only where keys are not affine in the input)."""

    query: str
    tokens: int
    project_keys: bool = False


@dataclass(frozen=True)
class BlockWork:
    """What one block computes per selection group in a forward, as token counts (the method decides these; the
    family turns them into MACs)."""

    attn_tokens: int  # tokens projected to q, k, v and attending among themselves
    mlp_tokens: int  # tokens through the MLP
    row_keys: int = 0  # a score row (one query against this many keys) computed beside the attention
    score: ScoreWork | None = None  # scores computed before the block runs
    merged_tokens: int = 0  # tokens folded into one by a weighted sum (EViT fusion, representative token)
    out_tokens: int | None = None  # tokens per group leaving the block when a method drops some (None: all)


def block_macs(shape: BlockShape, work: BlockWork) -> int:
    """Linear layers, the two attention products and a score row; scores before the block are the family's to add
    (they depend on its projections)."""
    n = work.attn_tokens
    pair = shape.qk_dim + shape.v_dim + 2 * shape.head_mix
    total = n * (shape.qkv + shape.proj + shape.linear_attention) + n * n * pair + work.mlp_tokens * shape.mlp
    return total + work.row_keys * (shape.qk_dim + shape.head_mix) + work.merged_tokens * shape.dim


def dense_work(num_tokens: int) -> BlockWork:
    return BlockWork(attn_tokens=num_tokens, mlp_tokens=num_tokens)
