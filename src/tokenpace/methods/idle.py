"""IdleViT: dynamic token idling (arXiv 2310.05654; spec ../shared/specs/idlevit.md).

In every idling layer, the top-K patch tokens by that layer's own scores (the class-query logits, head sum, before
softmax, on class-token models) plus the prefix tokens run the block among themselves; the others are passed
through unchanged and compete again in the next layer. K = int(P * keep**s) in stage s = 1, 2, 3.

One policy for every family: selection happens in groups (one per image on sequence families; one per attention
window on Swin and SAM, one per map on PVTv2 and in SAM's global blocks), k of the n tokens of each group, with the
groups as a batch. Stages follow the global block index (stage_starts (3, 6, 9) at 12 blocks, scaled), so on pyramids
the ratio compounds across the pyramid's own stages too; down-sampling runs on the full grid, and so does a block
that re-samples or mixes its tokens (``Family.resamples``: the stage entries of Hiera and SAM 2's HieraDet,
TinyViT's convolution blocks).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..core.macs import BlockWork, dense_work
from ..core.scores import random_scores
from ..core.schedule import keep_count, scaled_layers, stage_of, validate_layers
from ..core.tokens import top_indices, with_prefix
from ..families.base import GROUPED, SEQUENCE, Family
from .base import ForwardState, MethodConfig, Policy, check_choice, check_keep, check_layers


@dataclass(frozen=True)
class Idle(MethodConfig):
    """IdleViT configuration.

    keep: base keep ratio r; stage s keeps K = int(P * r**s) patch tokens (0.7 is the paper's headline).
    stage_starts: first layer of each stage; idling runs from the first to the last layer.
        None: (3, 6, 9) at depth 12 (the official evaluation layers 3..11), scaled for other depths.
    score: None (the family default), ``"cls"`` (class-query logits of the layer), ``"received"`` (the mean logit a
        token receives from the queries of its group), ``"norm"`` (feature norm) or ``"random"`` (control); see
        docs/scores.md for which family offers which.
    project_keys: project every key to score, as the official code does, instead of the exact W_k^T q shortcut
        (kept for comparing MACs; models whose keys are not affine in the input always project keys).
    """

    keep: float | None = None
    stage_starts: tuple[int, ...] | None = None
    score: str | None = None
    project_keys: bool = False

    name: ClassVar[str] = "idle"
    default_keep: ClassVar[float] = 0.7
    layouts: ClassVar[tuple[str, ...]] = (SEQUENCE, GROUPED)

    def __post_init__(self) -> None:
        check_keep(self, "Idle keep")
        check_layers(self, "Idle stage_starts", "stage_starts")
        check_choice("Idle score", self.score, self.scores, optional=True)
        if not isinstance(self.project_keys, bool):
            raise ValueError(f"Idle project_keys must be True or False; got {self.project_keys!r}")

    def resolved_stage_starts(self, depth: int) -> tuple[int, ...]:
        starts = self.stage_starts if self.stage_starts is not None else scaled_layers(depth, (3, 6, 9))
        validate_layers("Idle stage_starts", starts, depth)
        return starts

    def policy(self, family: Family) -> "IdlePolicy":
        return IdlePolicy(self, family)


@dataclass
class IdleRecord:
    """One idling layer as the token cut loss needs it: the selection and the block's norm1 output (all tokens)."""

    layer: int
    index: torch.Tensor  # (B, prefix + K) sequence indices of the selected tokens, the prefix tokens first
    normed: torch.Tensor  # (B, N, C)
    qk: tuple[torch.Tensor, torch.Tensor] | None = None  # the selected tokens' (q, k) (B, H, prefix + K, d)
    where: Any = None  # where all N tokens sit (TokenSet): position terms for the idle tokens' q and k


class IdlePolicy(Policy):
    config: Idle

    def __init__(self, config: Idle, family: Family) -> None:
        super().__init__(config, family)
        if config.project_keys and family.layout != SEQUENCE:
            raise ValueError(f"Idle project_keys applies to scores of token sequences; {family.name} models accept "
                             "only project_keys=False")
        self.starts = config.resolved_stage_starts(self.depth)
        self.ratios = [self._ratio(i) for i in range(self.depth)]  # asked per block and forward

    def _ratio(self, i: int) -> float | None:
        ratio = self.config.keep ** stage_of(i, self.starts)
        return None if i < self.starts[0] or ratio >= 1.0 or self.family.resamples(i) else ratio

    def keep_ratio(self, i: int) -> float | None:
        """The keep ratio r**s of block i, or None where the block runs on every token."""
        return self.ratios[i]

    def run(self, x: torch.Tensor, state: ForwardState) -> torch.Tensor:
        fam, frame = self.family, state.frame
        record = state.training and fam.has_class_token  # the cut loss is defined on the class token's attention
        for s, blocks in enumerate(fam.stage_blocks):
            x, _ = fam.enter_stage(s, x, frame)
            for i in blocks:
                ratio = self.keep_ratio(i)
                n = fam.group_size(i, x)
                k = keep_count(n, ratio) if ratio is not None else n
                if k == n:
                    x = self.step(state, fam.block, i, x, frame)
                    state.tap(i, lambda: x)
                    continue
                prep = fam.prepare(i, x, frame)
                if self.score == "random":
                    scores = random_scores(torch.empty(fam.score_shape(prep), device=x.device))
                else:
                    scores = fam.token_scores(i, prep, self.score, self.config.project_keys)
                idx = top_indices(scores, k)
                x, qk = self.step(state, fam.run_selected, i, x, prep, idx, keep_qk=record)
                if record:
                    state.records.append(IdleRecord(layer=i, index=with_prefix(idx[:, 0], self.prefix),
                                                    normed=prep.h, qk=qk, where=prep.where))
                if state.kept is not None:
                    state.record_kept(i, fam.raster_positions(i, prep, idx))
                state.tap(i, lambda: x)
        return x

    def work(self, counts) -> list[BlockWork]:
        works = []
        for i, c in enumerate(counts):
            ratio = self.keep_ratio(i)
            k = keep_count(c.tokens, ratio) if ratio is not None else c.tokens
            if k == c.tokens:
                works.append(dense_work(c.tokens + c.prefix))
                continue
            n = k + c.prefix
            works.append(BlockWork(n, n, score=self.score_work(c.tokens + c.prefix, self.config.project_keys)))
        return works
