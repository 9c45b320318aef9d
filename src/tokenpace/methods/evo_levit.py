"""Evo-ViT on LeViT (evovit.md §7): one selection per stage (stage mode) or per block (layer mode).

Pruning starts at ``stage_starts[0]`` (block 2 by default: stage-1 blocks 0-1 dense, as the official Evo-LeViT),
and every later stage selects again at its first block. g is the global attention of the block before the first
selection, evolved in pruned blocks for the tokens they processed and, at each down-sampling attention, evolved
with the full-resolution scores, sub-sampled to the stride-2 grid and rescaled to its previous sum (official steps
1-7). Tokens are scattered back to raster order after every segment, so down-sampling sees the full grid.
"""
from __future__ import annotations

import torch

from ..core.macs import BlockWork
from ..core.schedule import keep_count, validate_layers
from ..core.scores import evolve
from ..core.tokens import scatter_values
from .base import ForwardState, Policy
from .evo import Evo, gather_slow_path, scatter_slow_path


class EvoLevitPolicy(Policy):
    config: Evo

    def __init__(self, config: Evo, adapter) -> None:
        super().__init__(config, adapter)
        starts = config.stage_starts if config.stage_starts is not None else (2,)
        validate_layers("Evo stage_starts", starts, self.depth, minimum=1)
        self.first = starts[0]
        stages = adapter.stage_blocks
        if config.mode == "layer":
            selections = set(range(self.first, self.depth))
        else:
            selections = set(starts) | {r.start for r in stages if r.start > self.first}
        self.last_selection = max(selections)
        self.representative = (adapter.default_representative if config.representative is None
                               else config.representative)
        if self.representative and adapter.num_prefix == 0:
            raise ValueError("Evo representative=True needs position-free attention; timm LeViT's attention biases "
                             "have no position for the representative token. Accepted here: representative=False "
                             "(or train tokenpace's evo_levit_* models)")
        # per stage: (lo, hi, pruned) segments; a pruned segment runs its blocks on one selection
        self.segments = []
        for r in stages:
            cuts = sorted({r.start, r.stop} | {i for i in selections if i in r} | ({self.first} & set(r)))
            self.segments.append([(lo, hi, lo >= self.first) for lo, hi in zip(cuts, cuts[1:])])

    def _want(self, needed: bool) -> str | None:
        """The score a block must return, None where no later selection reads g. The random control still
        computes the family's g (it weights the representative token); only the ranking is random."""
        if not needed:
            return None
        return self.adapter.scores[0] if self.score == "random" else self.score

    def run(self, x: torch.Tensor, state: ForwardState) -> torch.Tensor:
        ad, cfg = self.adapter, self.config
        learned = cfg.mode == "stage"
        g = None
        for s, segments in enumerate(self.segments):
            if s > 0:
                want = self._want(g is not None)
                x, full = ad.downsample(s, x, want)
                if g is not None:
                    pos = ad.subsample_index(s, x.device)
                    total = g.sum(dim=1, keepdim=True)
                    alpha = ad.evolution_weight(ad.downsample_module(s), learned, cfg.alpha)
                    g = evolve(g[:, pos], full[:, pos], alpha)
                    g = g * (total / g.sum(dim=1, keepdim=True))
            for lo, hi, pruned in segments:
                if pruned:
                    x, g = self._segment(x, g, lo, hi, hi <= self.last_selection, learned, state)
                    continue
                for i in range(lo, hi):
                    if i == self.first - 1:
                        x, g = ad.block_tokens(i, x, None, 0, self._want(True))
                    else:
                        x = ad.block(i, x)
        return x

    def _segment(self, x, g, lo, hi, evolve_g, learned, state):
        ad, cfg, prefix = self.adapter, self.config, self.prefix
        num_patches = x.shape[1] - prefix
        k = keep_count(num_patches, cfg.keep)
        # the representative token's weights g / sum(g) carry gradient to q, k and theta (Evo-LeViT)
        keep_idx, seq_idx, sub, g_sub, rep_in = gather_slow_path(x, g, self.rank(g), k, prefix, self.representative)
        want = self._want(evolve_g)
        for i in range(lo, hi):
            sub, scores = ad.block_tokens(i, sub, keep_idx, int(rep_in is not None), want)
            if scores is not None:
                g_sub = evolve(g_sub, scores, ad.evolution_weight(ad.blocks[i].attn, learned, cfg.alpha))
            state.record_kept(i, keep_idx)
        x = scatter_slow_path(x, seq_idx, sub, rep_in)
        if want is not None:
            g = scatter_values(g, keep_idx, g_sub)
        return x, g

    def work(self, stage_patches: list[int]) -> list[BlockWork]:
        """Per block, the tokens it processes (prefix and representative included) for these per-stage counts."""
        works = []
        for patches, segments in zip(stage_patches, self.segments):
            for lo, hi, pruned in segments:
                k = keep_count(patches, self.config.keep)
                use_rep = pruned and self.representative and k < patches
                n = (k if pruned else patches) + self.prefix + int(use_rep)
                for i in range(lo, hi):
                    works.append(BlockWork(n, n, merged_tokens=(patches - k) if use_rep and i == lo else 0))
        return works
