"""EViT baseline (Liang et al., ICLR 2022; spec idlevit.md §9): keep the most attentive tokens, fuse the rest.

At each shrink layer the attention runs on all current tokens; then the top ceil(keep * n) image tokens by the
head-mean class attention stay, the others are dropped or fused into one token weighted by their attention, and
the MLP runs on the reduced sequence. Counts compound across shrink layers (196 -> 138+1 -> 98+1 -> 70+1 at 0.7).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..core.macs import BlockWork, dense_work
from ..core.schedule import keep_count_ceil, scaled_layers, validate_layers
from ..core.tokens import gather_tokens, gather_values, split_indices, top_indices, weighted_merge
from .base import SCORES, ForwardState, MethodConfig, Policy, check_choice, check_keep, check_layers_type


@dataclass(frozen=True)
class EViT(MethodConfig):
    """EViT configuration.

    keep: fraction of the current image tokens kept at each shrink layer, ceil(keep * n).
    layers: shrink layers; None: (3, 6, 9) at depth 12, scaled for other depths.
    fuse: fuse the inattentive tokens into one token (True, EViT's default) or drop them (False).
    score: None (the family default), ``"cls"`` (head-mean class attention) or ``"random"`` (control).
    """

    keep: float = 0.7
    layers: tuple[int, ...] | None = None
    fuse: bool = True
    score: str | None = None

    name: ClassVar[str] = "evit"

    def __post_init__(self) -> None:
        check_keep("EViT keep", self.keep)
        check_layers_type("EViT layers", self.layers)
        check_choice("EViT score", self.score, SCORES, optional=True)
        if not isinstance(self.fuse, bool):
            raise ValueError(f"EViT fuse must be True or False; got {self.fuse!r}")

    def resolved_layers(self, depth: int) -> tuple[int, ...]:
        layers = self.layers if self.layers is not None else scaled_layers(depth, (3, 6, 9))
        validate_layers("EViT layers", layers, depth)
        return layers

    def policy(self, adapter) -> "EViTPolicy":
        return EViTPolicy(self, adapter)


class EViTPolicy(Policy):
    config: EViT

    def __init__(self, config: EViT, adapter) -> None:
        super().__init__(config, adapter)
        self.layers = config.resolved_layers(self.depth)

    def counts(self, num_patches: int) -> list[tuple[int, int]]:
        """Per block: (image tokens entering, image tokens after the block); fused tokens count as image tokens."""
        n, out = num_patches, []
        for i in range(self.depth):
            if i in self.layers:
                k = keep_count_ceil(n, self.config.keep)
                after = k + int(self.config.fuse and k < n)
                out.append((n, after))
                n = after
            else:
                out.append((n, n))
        return out

    def run(self, x: torch.Tensor, state: ForwardState) -> torch.Tensor:
        ad, prefix, fuse = self.adapter, self.prefix, self.config.fuse
        origin = None  # original patch index of each image token (-1: a fused token), only when tracing
        if state.kept is not None:
            origin = torch.arange(x.shape[1] - prefix, device=x.device).expand(x.shape[0], -1)
        for i, (n, after) in enumerate(self.counts(x.shape[1] - prefix)):
            if after == n:  # not a shrink layer, or nothing to drop
                x = ad.block(i, x)
            else:
                x, cls_row = ad.attention_half(i, x, "mean")
                attn = cls_row[:, prefix:]
                k = after - int(fuse)
                scores = self.rank(attn)
                keep_idx, rest_idx = split_indices(scores, k) if fuse else (top_indices(scores, k), None)
                parts = [x[:, :prefix], gather_tokens(x, keep_idx + prefix)]
                if fuse:  # raw attention weights, not renormalised (EViT)
                    rest = gather_tokens(x, rest_idx + prefix)
                    parts.append(weighted_merge(rest, gather_values(attn, rest_idx).to(x.dtype), False))
                x = ad.mlp_half(i, torch.cat(parts, dim=1))
                if origin is not None:
                    origin = origin.gather(1, keep_idx)
                    if fuse:
                        origin = torch.cat([origin, origin.new_full((origin.shape[0], 1), -1)], dim=1)
            if origin is not None and i >= self.layers[0]:
                state.record_kept(i, origin)
        return x

    def work(self, num_patches: int) -> list[BlockWork]:
        works = []
        for n, after in self.counts(num_patches):
            if after == n:
                works.append(dense_work(n + self.prefix))
            else:
                merged = n - (after - 1) if self.config.fuse else 0
                works.append(BlockWork(n + self.prefix, after + self.prefix, cls_row_keys=n + self.prefix,
                                       merged_tokens=merged))
        return works
