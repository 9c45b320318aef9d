"""Evo-ViT: slow-fast token evolution (arXiv 2108.01390; spec ../shared/specs/evovit.md).

A global class attention g (per image, over patch tokens) is evolved across layers. From the first stage start on,
the top-K tokens by g (plus prefix tokens) run the full block ("slow"); the placeholders are carried along unchanged
(official DeiT code) or moved by the residual of one representative token (the paper's fast path).

One policy for every sequence family: flat ViTs (one stage), LeViT's stages joined by attention down-sampling and
PiT's joined by pooling. There every later stage selects again at its first block; at each down-sampling, g is
sub-sampled to the new grid (evolved first with the scores of the full-resolution keys where the down-sampling is an
attention, LeViT's) and rescaled to its previous sum (evovit.md §7, steps 1-7).
Tokens are scattered back to raster order after every segment, so down-sampling and the head see the full grid.
"""
from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..blockops import Row, run_block
from ..core.macs import BlockWork, dense_work
from ..core.schedule import keep_count, scaled_layers, validate_layers
from ..core.scores import evolve
from ..core.tokens import (gather_rows, gather_tokens, gather_values, scatter_rows, scatter_values, sequence_rows,
                           split_indices, top_indices, weighted_merge)
from ..families.base import Family
from .base import ForwardState, MethodConfig, Policy, check_choice, check_keep, check_layers

MODES = ("stage", "layer")


@dataclass(frozen=True)
class Evo(MethodConfig):
    """Evo-ViT configuration.

    keep: fraction of patch tokens on the slow path, K = int(P * keep) (0.5 in the paper); keep 1 runs the model
        as it is (no scores, bit-exact).
    stage_starts: layers where a selection is made in ``"stage"`` mode; the first is where pruning starts.
        None: what the model asks for (``tokenpace.defaults``: (1,) on timm LeViT, (2,) on tokenpace's Evo-LeViT as
        in the official code), else (4, 8) at depth 12, scaled for other depths, and (2,) on multi-stage models.
        On multi-stage models every later stage selects again at its first block.
    mode: ``"stage"`` selects at stage starts (inference default, last third of training); ``"layer"`` selects at
        every pruned layer (first two thirds of training).
    representative: False keeps placeholders unchanged (official DeiT code); True moves them with the residual of a
        global-attention-weighted representative token (paper, official LeViT code); None: what the model asks
        for (True on tokenpace's Evo-LeViT), else False.
    alpha: weight of the new layer's class attention when g evolves in pruned layers (0.5 in the paper); dense
        layers overwrite g (DeiT), so the first selection uses the class attention of the layer before it. Models
        with a learned evolution weight (Evo-LeViT) evolve g in every layer from the first on, as the official code,
        with their learned weight in stage mode and alpha in layer mode.
    score: None (the family default), ``"cls"`` (global class attention), ``"received"`` (the attention each token
        receives; class-token-free models) or ``"random"`` (control: random ranking).
    """

    keep: float | None = None
    stage_starts: tuple[int, ...] | None = None
    mode: str = "stage"
    representative: bool | None = None
    alpha: float = 0.5
    score: str | None = None

    name: ClassVar[str] = "evo"
    default_keep: ClassVar[float] = 0.5
    scores: ClassVar[tuple[str, ...]] = ("cls", "received", "random")

    def __post_init__(self) -> None:
        check_keep(self, "Evo keep")
        check_layers(self, "Evo stage_starts", "stage_starts")
        check_choice("Evo mode", self.mode, MODES)
        check_choice("Evo score", self.score, type(self).scores, optional=True)
        if self.representative is not None and not isinstance(self.representative, bool):
            raise ValueError(f"Evo representative must be True, False or None (the family default); "
                             f"got {self.representative!r}")
        alpha = self.alpha
        if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not 0.0 < float(alpha) <= 1.0:
            raise ValueError(f"Evo alpha must be a number in (0, 1] (weight of the new layer); got {alpha!r}")
        object.__setattr__(self, "alpha", float(alpha))

    def resolved_stage_starts(self, family: Family) -> tuple[int, ...]:
        default = (2,) if len(family.stage_blocks) > 1 else scaled_layers(family.depth, (4, 8))
        starts = self.stage_starts if self.stage_starts is not None else default
        # the first selection needs the class attention of the layer before it, so pruning starts at layer >= 1
        validate_layers("Evo stage_starts", starts, family.depth, minimum=1)
        return starts

    def policy(self, family: Family) -> "EvoPolicy":
        return EvoPolicy(self, family)

    def modes_coincide(self, family: Family) -> bool:
        """Layer mode computes what stage mode does on ``family`` (this config resolved for it): every pruned layer
        is a selection either way, and no block learns an evolution weight (which stage mode reads, layer mode not)."""
        if any(parts.evolution_logit is not None for parts in family.anatomy()):
            return False
        stage, layer = (EvoPolicy(dataclasses.replace(self, mode=mode), family) for mode in MODES)
        return stage.segments == layer.segments and stage.scored_dense == layer.scored_dense


def gather_slow_path(x: torch.Tensor, g: torch.Tensor, ranking: torch.Tensor, k: int, prefix: int,
                     representative: bool, cache: dict | None = None):
    """The slow path of one selection: (keep_idx (B, k), rows (the prefix and kept tokens as rows of the flattened
    sequence, core.tokens.sequence_rows, with the forward's ``cache``), tokens, their g, rep_in).

    tokens are the prefix and the top-k patch tokens by ``ranking``. With ``representative`` (and placeholders
    left), the placeholders pooled with weights g / sum(g) (Evo-LeViT merge_tokens) are appended as one more token,
    also returned as rep_in; otherwise rep_in is None.
    """
    use_rep = representative and k < g.shape[1]
    keep_idx, ph_idx = split_indices(ranking, k) if use_rep else (top_indices(ranking, k), None)
    rows = sequence_rows(keep_idx, prefix, x.shape[1], cache)  # once, for the gather here and the scatter after
    tokens = gather_rows(x, rows)
    rep_in = None
    if use_rep:
        rep_in = weighted_merge(gather_tokens(x, ph_idx + prefix), gather_values(g, ph_idx), True)
        tokens = torch.cat([tokens, rep_in], dim=1)
    return keep_idx, rows, tokens, gather_values(g, keep_idx), rep_in


def scatter_slow_path(x: torch.Tensor, rows: torch.Tensor, tokens: torch.Tensor,
                      rep_in: torch.Tensor | None) -> torch.Tensor:
    """Write the slow path's tokens back; with a representative token (last in ``tokens``), every placeholder
    first receives its total residual (the fast path)."""
    if rep_in is not None:
        x = x + (tokens[:, -1:] - rep_in)
        tokens = tokens[:, :-1]
    return scatter_rows(x, rows, tokens)


class EvoPolicy(Policy):
    config: Evo

    def __init__(self, config: Evo, family: Family) -> None:
        super().__init__(config, family)
        starts = config.resolved_stage_starts(family)
        self.first = starts[0]
        representative = self.representative = bool(config.representative)
        if representative and not all(family.parts(i).accepts_extra for i in range(self.first, self.depth)):
            raise ValueError(f"Evo representative=True needs blocks that accept a token without a position, and "
                             f"{family.name} attention biases need a position for every token. Accepted here: "
                             "representative=False")
        if config.mode == "layer":
            selections = set(range(self.first, self.depth))
        else:
            selections = set(starts) | {r.start for r in family.stage_blocks if r.start > self.first}
        last_selection = max(selections)
        # keep 1 keeps every token: the model runs as it is, with no scores (bit-exact, the dense cost)
        self.dense = config.keep == 1.0
        # per stage: (lo, hi, pruned, evolve) segments; a pruned segment runs its blocks on one selection, and g is
        # evolved only where a later selection reads it
        self.segments = []
        for r in family.stage_blocks:
            cuts = sorted({r.start, r.stop} | {i for i in selections if i in r} | ({self.first} & set(r)))
            self.segments.append([(lo, hi, lo >= self.first and not self.dense, hi <= last_selection)
                                  for lo, hi in zip(cuts, cuts[1:])])
        self.row = Row(self.row_query())
        self.learned = config.mode == "stage"  # learned evolution weights replace alpha in stage mode
        # blocks with a learned evolution weight (Evo-LeViT) evolve g from block 0 on, as every attention of the
        # official LeViT code does; the others overwrite it in dense blocks (DeiT's tradeoff 1), so only the block
        # before the first selection is scored
        learns = all(family.parts(i).evolution_logit is not None for i in range(self.first))
        self.scored_dense = range(0) if self.dense else range(0 if learns else self.first - 1, self.first)

    def _alpha(self, logit: torch.Tensor | None) -> float | torch.Tensor:
        """The evolution weight: sigmoid(theta) where the model learns one (stage mode), else the fixed alpha."""
        return torch.sigmoid(logit) if self.learned and logit is not None else self.config.alpha

    def run(self, x: torch.Tensor, state: ForwardState) -> torch.Tensor:
        fam, frame, prefix = self.family, state.frame, self.prefix
        g = None
        for s, segments in enumerate(self.segments):
            if s > 0:
                x, full = fam.enter_stage(s, x, frame, self.row.query if g is not None else None)
                if g is not None:
                    entry = fam.stage_entry(s, x.device)
                    total = g.sum(dim=1, keepdim=True)
                    g = g[:, entry.subsample]
                    if entry.attends:  # a down-sampling attention (LeViT's) evolves g; a pooling (PiT's) has none
                        if full is None:
                            raise RuntimeError(f"{fam.name} stage {s} down-samples by attention but handed no "
                                               "scores of its keys (Family.enter_stage with row set)")
                        g = evolve(g, full[:, entry.subsample], self._alpha(entry.evolution_logit))
                    g = g * (total / g.sum(dim=1, keepdim=True))
            for lo, hi, pruned, evolve_g in segments:
                if pruned:
                    x, g = self._segment(x, g, lo, hi, evolve_g, state)
                    continue
                for i in range(lo, hi):
                    if i in self.scored_dense:
                        parts = fam.parts(i)
                        x, scores, _ = self.step(state, run_block, parts, x, fam.tokens(frame), row=self.row)
                        row = scores[:, prefix:]
                        g = row if g is None else evolve(g, row, self._alpha(parts.evolution_logit))
                    else:
                        x = self.step(state, fam.block, i, x, frame)
                    state.tap(i, lambda: x)
        return x

    def _segment(self, x, g, lo, hi, evolve_g, state):
        fam, prefix = self.family, self.prefix
        k = keep_count(x.shape[1] - prefix, self.config.keep)
        # the representative token's weights g / sum(g) carry gradient to q, k and theta (Evo-LeViT)
        keep_idx, rows, sub, g_sub, rep_in = gather_slow_path(x, g, self.rank(g), k, prefix, self.representative,
                                                              getattr(state.frame, "cache", None))
        where = fam.tokens(state.frame).select(keep_idx, extra=int(rep_in is not None))
        row = self.row if evolve_g else None
        for i in range(lo, hi):
            parts = fam.parts(i)
            sub, scores, _ = self.step(state, run_block, parts, sub, where, row=row)
            if scores is not None:
                g_sub = evolve(g_sub, scores[:, prefix:prefix + k], self._alpha(parts.evolution_logit))
            state.record_kept(i, keep_idx)
            # the full map as if the segment ended here: placeholders moved by the representative's residual so far
            state.tap(i, lambda: scatter_slow_path(x.clone(), rows, sub, rep_in))
        x = scatter_slow_path(x, rows, sub, rep_in)
        if row is not None:
            g = scatter_values(g, keep_idx, g_sub)
        return x, g

    def work(self, counts) -> list[BlockWork]:
        works = []
        for segments in self.segments:
            for lo, hi, pruned, evolve_g in segments:
                patches, prefix = counts[lo].tokens, counts[lo].prefix
                k = keep_count(patches, self.config.keep)
                use_rep = pruned and self.representative and k < patches
                n = (k if pruned else patches) + prefix + int(use_rep)
                for i in range(lo, hi):
                    if not pruned:
                        works.append(BlockWork(n, n, row_keys=self.row_keys(n)) if i in self.scored_dense
                                     else dense_work(n))
                        continue
                    works.append(BlockWork(n, n, row_keys=self.row_keys(n) if evolve_g else 0,
                                           merged_tokens=(patches - k) if use_rep and i == lo else 0))
        return works
