"""EViT baseline (Liang et al., ICLR 2022; spec idlevit.md §9): keep the most attentive tokens, fuse the rest.

At each shrink layer the attention runs on all current tokens; then the top ceil(keep * n) image tokens by the
head-mean class attention stay, the others are dropped or fused into one token weighted by their attention, and
the MLP runs on the reduced sequence (in a parallel block the MLP ran beside the attention, on every token). Counts
compound across shrink layers (196 -> 138+1 -> 98+1 -> 70+1 at 0.7).
A fused token has no position: where blocks have position terms (RoPE) it is not rotated, like a prefix token.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..blockops import Row, attention_half, mlp_half
from ..core.macs import BlockWork
from ..core.schedule import keep_count_ceil, scaled_layers, validate_layers
from ..core.tokens import gather_tokens, gather_values, scatter_tokens, split_indices, top_indices, weighted_merge
from ..families.base import Family
from .base import ForwardState, MethodConfig, Policy, check_choice, check_keep, check_layers


@dataclass(frozen=True)
class EViT(MethodConfig):
    """EViT configuration.

    keep: fraction of the current image tokens kept at each shrink layer, ceil(keep * n).
    layers: shrink layers; None: (3, 6, 9) at depth 12, scaled for other depths.
    fuse: fuse the inattentive tokens into one token (True, EViT's default) or drop them (False).
    score: None (the family default), ``"cls"`` (head-mean class attention), ``"received"`` (class-token-free
        models) or ``"random"`` (control).
    """

    keep: float | None = None
    layers: tuple[int, ...] | None = None
    fuse: bool = True
    score: str | None = None

    name: ClassVar[str] = "evit"
    default_keep: ClassVar[float] = 0.7
    scores: ClassVar[tuple[str, ...]] = ("cls", "received", "random")

    def __post_init__(self) -> None:
        check_keep(self, "EViT keep")
        check_layers(self, "EViT layers", "layers")
        check_choice("EViT score", self.score, type(self).scores, optional=True)
        if not isinstance(self.fuse, bool):
            raise ValueError(f"EViT fuse must be True or False; got {self.fuse!r}")

    def refusal(self, family: Family) -> str | None:
        return token_dropping_refusal(self, family)

    def resolved_layers(self, depth: int) -> tuple[int, ...]:
        layers = self.layers if self.layers is not None else scaled_layers(depth, (3, 6, 9))
        validate_layers("EViT layers", layers, depth)
        return layers

    def policy(self, family: Family) -> "EViTPolicy":
        return EViTPolicy(self, family)


def token_dropping_refusal(config: MethodConfig, family: Family) -> str | None:
    """Why a method that shortens the sequence for good cannot run on ``family`` (None: it can)."""
    reason = MethodConfig.refusal(config, family)
    if reason is not None:
        return reason
    if len(family.stage_blocks) > 1:
        return f"it drops tokens for good, and {family.name} models down-sample a full grid between stages"
    if family.fixed_length_head:
        return f"it drops tokens for good, and this {family.name}'s {family.fixed_length_why}"
    return None


def paint(canvas: torch.Tensor, where, x: torch.Tensor) -> torch.Tensor:
    """Write the tokens of x (prefix, then patch tokens at ``where.pos``; -1: a fused token, which has no place)
    onto the full map ``canvas`` (B, prefix + P, C)."""
    B, N, C = canvas.shape
    prefix = where.prefix
    rows = torch.where(where.pos < 0, N - prefix, where.pos)  # fused tokens land in one extra row, dropped after
    rows = torch.cat([torch.arange(prefix, device=x.device).expand(B, -1), rows + prefix], dim=1)
    grown = torch.cat([canvas, canvas.new_zeros(B, 1, C)], dim=1)
    return scatter_tokens(grown, rows, x)[:, :N]


class EViTPolicy(Policy):
    config: EViT

    def __init__(self, config: EViT, family: Family) -> None:
        super().__init__(config, family)
        self.layers = config.resolved_layers(self.depth)
        self.row = Row(self.row_query(), heads="mean")

    def counts(self, num_patches: int) -> list[tuple[int, int, int]]:
        """Per block: (image tokens entering, kept, after the block); fused tokens count as image tokens.

        A block shrinks where it keeps fewer than it receives (kept < entering). With one token left over, the fused
        token replaces it and the count stays (the official code fuses whenever a token is left over)."""
        n, out = num_patches, []
        for i in range(self.depth):
            if i in self.layers:
                k = keep_count_ceil(n, self.config.keep)
                after = k + int(self.config.fuse and k < n)
                out.append((n, k, after))
                n = after
            else:
                out.append((n, n, n))
        return out

    def run(self, x: torch.Tensor, state: ForwardState) -> torch.Tensor:
        fam, frame, prefix, fuse = self.family, state.frame, self.prefix, self.config.fuse
        where = fam.tokens(frame)
        canvas = x  # the full map: every dropped token keeps the features it entered its last block with
        for i, (n, k, after) in enumerate(self.counts(x.shape[1] - prefix)):
            if k == n:  # not a shrink layer, or nothing to drop
                x = self.run_on(i, x, where, state)
            else:
                if state.taps:
                    canvas = x if where.pos is None else paint(canvas, where, x)
                parts = fam.parts(i)
                x, scores, _ = self.step(state, attention_half, parts, x, where, row=self.row)
                attn = scores[:, prefix:]
                ranking = self.rank(attn)
                keep_idx, rest_idx = split_indices(ranking, k) if fuse else (top_indices(ranking, k), None)
                keep_idx = keep_idx.sort(dim=1).values  # the kept tokens stay in raster order
                kept = [x[:, :prefix], gather_tokens(x, keep_idx + prefix)]
                if fuse:  # raw attention weights, not renormalised (EViT)
                    rest = gather_tokens(x, rest_idx + prefix)
                    kept.append(weighted_merge(rest, gather_values(attn, rest_idx), False))
                where = self._shrunk(where, keep_idx, x.shape[0], n)
                x = self.step(state, mlp_half, parts, torch.cat(kept, dim=1), where)
            if i >= self.layers[0]:
                state.record_kept(i, where.pos)
            state.tap(i, lambda: x if where.pos is None else paint(canvas, where, x))
        return x

    def _shrunk(self, where, keep_idx, batch, n):
        """The token set after a shrink: the kept image tokens' positions, then -1 for the fused token."""
        pos = keep_idx if where.pos is None else where.pos.gather(1, keep_idx)
        if self.config.fuse:
            pos = torch.cat([pos, pos.new_full((batch, 1), -1)], dim=1)
        return type(where)(prefix=where.prefix, pos=pos, frame=where.frame, holes=where.holes or self.config.fuse)

    def work(self, counts) -> list[BlockWork]:
        prefix = counts[0].prefix
        works = []
        for n, k, after in self.counts(counts[0].tokens):
            if k == n:
                works.append(BlockWork(n + prefix, n + prefix, out_tokens=n + prefix))
            else:
                merged = n - k if self.config.fuse else 0
                works.append(BlockWork(n + prefix, after + prefix, row_keys=self.row_keys(n + prefix),
                                       merged_tokens=merged, out_tokens=after + prefix))
        return works
