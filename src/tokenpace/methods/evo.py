"""Evo-ViT: slow-fast token evolution (arXiv 2108.01390; spec ../shared/specs/evovit.md).

A global class attention g (per image, over patch tokens) is evolved across layers. From the first stage start on,
the top-K tokens by g (plus prefix tokens) run the full block ("slow"); the placeholders are carried along unchanged
(official DeiT code) or moved by the residual of one representative token (the paper's fast path).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..core.macs import BlockWork, dense_work
from ..core.schedule import keep_count, scaled_layers, validate_layers
from ..core.scores import evolve
from ..core.tokens import (gather_tokens, gather_values, scatter_tokens, scatter_values, split_indices,
                           top_indices, weighted_merge, with_prefix)
from .base import SCORES, ForwardState, MethodConfig, Policy, check_choice, check_keep, check_layers_type

MODES = ("stage", "layer")


@dataclass(frozen=True)
class Evo(MethodConfig):
    """Evo-ViT configuration.

    keep: fraction of patch tokens on the slow path, K = int(P * keep) (0.5 in the paper).
    stage_starts: layers where a selection is made in ``"stage"`` mode; the first is where pruning starts.
        None: (4, 8) at depth 12, scaled proportionally for other depths; on LeViT (2,), and every later stage
        selects again at its first block.
    mode: ``"stage"`` selects at stage starts (inference default, last third of training); ``"layer"`` selects at
        every pruned layer (first two thirds of training).
    representative: False keeps placeholders unchanged (official DeiT code); True moves them with the residual of a
        global-attention-weighted representative token (paper, official LeViT code); None: the family's default
        (True on tokenpace's Evo-LeViT, False elsewhere).
    alpha: weight of the new layer's class attention when g evolves in pruned layers (0.5 in the paper); dense
        layers overwrite g, so the first selection uses the class attention of the layer before it.
    score: None (the family default), ``"cls"`` (global class attention), ``"received"`` (attention each token
        receives, class-token-free LeViT) or ``"random"`` (control: random ranking).
    """

    keep: float = 0.5
    stage_starts: tuple[int, ...] | None = None
    mode: str = "stage"
    representative: bool | None = None
    alpha: float = 0.5
    score: str | None = None

    name: ClassVar[str] = "evo"

    def __post_init__(self) -> None:
        check_keep("Evo keep", self.keep)
        check_layers_type("Evo stage_starts", self.stage_starts)
        check_choice("Evo mode", self.mode, MODES)
        check_choice("Evo score", self.score, SCORES, optional=True)
        if self.representative is not None and not isinstance(self.representative, bool):
            raise ValueError(f"Evo representative must be True, False or None (the family default); "
                             f"got {self.representative!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0.0 < self.alpha <= 1.0:
            raise ValueError(f"Evo alpha must be a number in (0, 1] (weight of the new layer); got {self.alpha!r}")

    def resolved_stage_starts(self, depth: int) -> tuple[int, ...]:
        starts = self.stage_starts if self.stage_starts is not None else scaled_layers(depth, (4, 8))
        # the first selection needs the class attention of the layer before it, so pruning starts at layer >= 1
        validate_layers("Evo stage_starts", starts, depth, minimum=1)
        return starts

    def policy(self, adapter) -> "EvoPolicy":
        return EvoPolicy(self, adapter)


def gather_slow_path(x: torch.Tensor, g: torch.Tensor, ranking: torch.Tensor, k: int, prefix: int,
                     representative: bool):
    """The slow path of one selection: (keep_idx (B, k), seq_idx (B, prefix + k), tokens, their g, rep_in).

    tokens are the prefix and the top-k patch tokens by ``ranking``. With ``representative`` (and placeholders
    left), the placeholders pooled with weights g / sum(g) (Evo-LeViT merge_tokens) are appended as one more token,
    also returned as rep_in; otherwise rep_in is None.
    """
    use_rep = representative and k < g.shape[1]
    keep_idx, ph_idx = split_indices(ranking, k) if use_rep else (top_indices(ranking, k), None)
    seq_idx = with_prefix(keep_idx, prefix)
    tokens = gather_tokens(x, seq_idx)
    rep_in = None
    if use_rep:
        rep_in = weighted_merge(gather_tokens(x, ph_idx + prefix), gather_values(g, ph_idx).to(x.dtype), True)
        tokens = torch.cat([tokens, rep_in], dim=1)
    return keep_idx, seq_idx, tokens, gather_values(g, keep_idx), rep_in


def scatter_slow_path(x: torch.Tensor, seq_idx: torch.Tensor, tokens: torch.Tensor,
                      rep_in: torch.Tensor | None) -> torch.Tensor:
    """Write the slow path's tokens back; with a representative token (last in ``tokens``), every placeholder
    first receives its total residual (the fast path)."""
    if rep_in is not None:
        x = x + (tokens[:, -1:] - rep_in)
        tokens = tokens[:, :-1]
    return scatter_tokens(x, seq_idx, tokens)


class EvoPolicy(Policy):
    config: Evo

    def __init__(self, config: Evo, adapter) -> None:
        super().__init__(config, adapter)
        starts = config.resolved_stage_starts(self.depth)
        self.first = starts[0]
        self.representative = (adapter.default_representative if config.representative is None
                               else config.representative)
        bounds = range(self.first, self.depth + 1) if config.mode == "layer" else (*starts, self.depth)
        # each segment runs its layers on one selection; g is needed only where a later selection reads it
        self.segments = [(lo, hi) for lo, hi in zip(bounds, bounds[1:])]

    def run(self, x: torch.Tensor, state: ForwardState) -> torch.Tensor:
        ad, prefix = self.adapter, self.prefix
        num_patches = x.shape[1] - prefix
        k = keep_count(num_patches, self.config.keep)
        for i in range(self.first - 1):
            x = ad.block(i, x)
        # dense layers overwrite g, so only the last one before pruning matters
        x, cls_row = ad.block_with_cls_attention(self.first - 1, x, "sum")
        g = cls_row[:, prefix:]
        for s, (lo, hi) in enumerate(self.segments):
            x, g = self._segment(x, g, lo, hi, k, s < len(self.segments) - 1, state)
        return x

    def _segment(self, x, g, lo, hi, k, evolve_g, state):
        cfg, ad, prefix = self.config, self.adapter, self.prefix
        keep_idx, seq_idx, sub, g_sub, rep_in = gather_slow_path(x, g, self.rank(g), k, prefix, self.representative)
        for i in range(lo, hi):
            if evolve_g:
                sub, cls_row = ad.block_with_cls_attention(i, sub, "sum")
                g_sub = evolve(g_sub, cls_row[:, prefix:prefix + k], cfg.alpha)
            else:
                sub = ad.block(i, sub)
            state.record_kept(i, keep_idx)
        x = scatter_slow_path(x, seq_idx, sub, rep_in)
        if evolve_g:
            g = scatter_values(g, keep_idx, g_sub)
        return x, g

    def work(self, num_patches: int) -> list[BlockWork]:
        k = keep_count(num_patches, self.config.keep)
        n_all = num_patches + self.prefix
        use_rep = self.representative and k < num_patches
        n = k + self.prefix + int(use_rep)
        works = [dense_work(n_all)] * (self.first - 1) + [BlockWork(n_all, n_all, cls_row_keys=n_all)]
        for s, (lo, hi) in enumerate(self.segments):
            evolve_g = s < len(self.segments) - 1
            for i in range(lo, hi):
                merged = (num_patches - k) if (use_rep and i == lo) else 0
                works.append(BlockWork(n, n, cls_row_keys=n if evolve_g else 0, merged_tokens=merged))
        return works
