"""IdleViT: dynamic token idling (arXiv 2310.05654; spec ../shared/specs/idlevit.md).

In every idling layer, the top-K patch tokens by that layer's own class-query logits (head mean, before softmax)
plus the prefix tokens run the block among themselves; the others are passed through unchanged and compete again
in the next layer. K = int(P * keep**s) in stage s = 1, 2, 3.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..core.macs import BlockWork, dense_work
from ..core.scores import random_scores
from ..core.schedule import keep_count, scaled_layers, stage_of, validate_layers
from ..core.tokens import gather_tokens, scatter_tokens, top_indices, with_prefix
from ..families.grid import GridAdapter
from .base import SCORES, ForwardState, MethodConfig, Policy, check_choice, check_keep, check_layers_type


@dataclass(frozen=True)
class Idle(MethodConfig):
    """IdleViT configuration.

    keep: base keep ratio r; stage s keeps K = int(P * r**s) patch tokens (0.7 is the paper's headline).
    stage_starts: first layer of each stage; idling runs from the first to the last layer.
        None: (3, 6, 9) at depth 12 (the official evaluation layers 3..11), scaled for other depths.
    score: None (the family default), ``"cls"`` (class-query logits of the layer), ``"received"`` (mean logit a
        token receives from the queries of its attention group), ``"norm"`` (feature norm) or ``"random"`` (control);
        see docs/scores.md for which family accepts which.
    project_keys: project every key to score, as the official code does, instead of the exact W_k^T q shortcut
        (kept for comparing MACs; models with a per-head key norm always project keys).
    """

    keep: float = 0.7
    stage_starts: tuple[int, ...] | None = None
    score: str | None = None
    project_keys: bool = False

    name: ClassVar[str] = "idle"

    def __post_init__(self) -> None:
        check_keep("Idle keep", self.keep)
        check_layers_type("Idle stage_starts", self.stage_starts)
        check_choice("Idle score", self.score, SCORES, optional=True)
        if not isinstance(self.project_keys, bool):
            raise ValueError(f"Idle project_keys must be True or False; got {self.project_keys!r}")

    def resolved_stage_starts(self, depth: int) -> tuple[int, ...]:
        starts = self.stage_starts if self.stage_starts is not None else scaled_layers(depth, (3, 6, 9))
        validate_layers("Idle stage_starts", starts, depth)
        return starts

    def policy(self, adapter) -> Policy:
        # pyramid models idle per group (window or map) of their own grid
        return IdleGridPolicy(self, adapter) if isinstance(adapter, GridAdapter) else IdlePolicy(self, adapter)


@dataclass
class IdleRecord:
    """One idling layer as the token cut loss needs it: the selection and the block's norm1 output (all tokens)."""

    layer: int
    index: torch.Tensor  # (B, prefix + K) sequence indices of the selected tokens, the prefix tokens first
    normed: torch.Tensor  # (B, N, C)
    qk: tuple[torch.Tensor, torch.Tensor] | None = None  # the selected tokens' (q, k) (B, prefix + K, H*d)


class IdlePolicy(Policy):
    config: Idle

    def __init__(self, config: Idle, adapter) -> None:
        super().__init__(config, adapter)
        self.starts = config.resolved_stage_starts(self.depth)

    def keep_ratio(self, layer: int) -> float:
        """The keep ratio r**s of ``layer`` (1.0 before idling starts)."""
        return self.config.keep ** stage_of(layer, self.starts)

    def run(self, x: torch.Tensor, state: ForwardState) -> torch.Tensor:
        ad, prefix = self.adapter, self.prefix
        num_patches = x.shape[1] - prefix
        for i in range(self.depth):
            if i < self.starts[0]:
                x = ad.block(i, x)
                continue
            k = keep_count(num_patches, self.keep_ratio(i))
            scores, normed = ad.cls_logit_scores(i, x, self.config.project_keys)
            keep_idx = top_indices(self.rank(scores[:, prefix:]), k)
            seq_idx = with_prefix(keep_idx, prefix)
            if ad.model.training:  # the cut loss reuses the selected tokens' q and k
                sub, qk = ad.block_from_normed(i, gather_tokens(x, seq_idx), gather_tokens(normed, seq_idx), True)
                state.records.append(IdleRecord(layer=i, index=seq_idx, normed=normed, qk=qk))
            else:
                sub = ad.block_from_normed(i, gather_tokens(x, seq_idx), gather_tokens(normed, seq_idx))
            x = scatter_tokens(x, seq_idx, sub)
            state.record_kept(i, keep_idx)
        return x

    def work(self, num_patches: int) -> list[BlockWork]:
        n_all = num_patches + self.prefix
        works = []
        for i in range(self.depth):
            if i < self.starts[0]:
                works.append(dense_work(n_all))
                continue
            n = keep_count(num_patches, self.keep_ratio(i)) + self.prefix
            project = self.config.project_keys or self.adapter.scores_project_keys(i)
            works.append(BlockWork(n, n, score_tokens=n_all, score_projects_keys=project))
        return works


class IdleGridPolicy(Policy):
    """IdleViT on a pyramid model: in each idling block, the top k = int(n * r**s) tokens of every group of n (Swin
    window, PVTv2 map) run the block, the others stay idle. Stages follow the global block index as on flat models
    (stage_starts (3, 6, 9) at 12 blocks, scaled), so the ratio compounds across the pyramid's stages too."""

    config: Idle

    def __init__(self, config: Idle, adapter) -> None:
        super().__init__(config, adapter)
        if config.project_keys:
            raise ValueError("Idle project_keys applies to class-token scores; pyramid models accept only "
                             "project_keys=False")
        self.starts = config.resolved_stage_starts(self.depth)

    def keep_ratio(self, i: int) -> float | None:
        """The keep ratio of block i, or None where the block runs on every token."""
        ratio = self.config.keep ** stage_of(i, self.starts)
        return None if i < self.starts[0] or ratio >= 1.0 else ratio

    def run(self, x: torch.Tensor, state: ForwardState) -> torch.Tensor:
        ad = self.adapter
        for s, blocks in enumerate(ad.stage_blocks):
            x = ad.enter_stage(s, x)
            for i in blocks:
                ratio = self.keep_ratio(i)
                n = ad.group_size(i, x)
                k = keep_count(n, ratio) if ratio is not None else n
                if k == n:
                    x = ad.block(i, x)
                    continue
                prep = ad.prepare(i, x)
                if self.score == "random":
                    scores = random_scores(torch.empty(ad.score_shape(prep), device=x.device))
                else:
                    scores = ad.token_scores(i, prep, self.score)
                idx = top_indices(scores, k)
                x = ad.run_selected(i, x, prep, idx)
                if state.kept is not None:
                    state.record_kept(i, ad.raster_positions(i, prep, idx))
        return x
