"""Plain top-k dropping: the ablation baseline of every token-reduction paper (Evo-ViT Table 3 "naive selection").

At ``layer`` the top K = int(P * keep) patch tokens by the previous layer's class attention stay and the rest are
discarded for good; this is Evo-ViT's first selection without its placeholders.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..blockops import Row, run_block
from ..core.macs import BlockWork, dense_work
from ..core.schedule import keep_count, scaled_layer, validate_layers
from ..core.tokens import gather_tokens, scatter_tokens, top_indices, with_prefix
from ..families.base import Family
from .base import ForwardState, MethodConfig, Policy, check_choice, check_keep
from .evit import token_dropping_refusal


@dataclass(frozen=True)
class TopK(MethodConfig):
    """Top-k dropping configuration.

    keep: fraction of patch tokens kept, K = int(P * keep).
    layer: first layer that runs on the kept tokens only; None: 4 at depth 12 (Evo-ViT's), scaled otherwise.
    score: None (the family default), ``"cls"`` (class attention of the layer before), ``"received"``
        (class-token-free models) or ``"random"`` (control).
    """

    keep: float | None = None
    layer: int | None = None
    score: str | None = None

    name: ClassVar[str] = "topk"
    default_keep: ClassVar[float] = 0.5
    scores: ClassVar[tuple[str, ...]] = ("cls", "received", "random")

    def __post_init__(self) -> None:
        check_keep(self, "TopK keep")
        check_choice("TopK score", self.score, type(self).scores, optional=True)
        if self.layer is not None and (isinstance(self.layer, bool) or not isinstance(self.layer, numbers.Integral)):
            raise ValueError(f"TopK layer must be an int layer index or None for the default; got {self.layer!r}")
        if self.layer is not None:  # numpy ints as Python ints: configs compare, print and save as JSON alike
            object.__setattr__(self, "layer", int(self.layer))

    def refusal(self, family: Family) -> str | None:
        return token_dropping_refusal(self, family)

    def resolved_layer(self, depth: int) -> int:
        layer = self.layer if self.layer is not None else scaled_layer(depth, 4)
        validate_layers("TopK layer", (layer,), depth, minimum=1)
        return int(layer)

    def policy(self, family: Family) -> "TopKPolicy":
        return TopKPolicy(self, family)


class TopKPolicy(Policy):
    config: TopK

    def __init__(self, config: TopK, family: Family) -> None:
        super().__init__(config, family)
        self.layer = config.resolved_layer(self.depth)
        self.row = Row(self.row_query())

    def run(self, x: torch.Tensor, state: ForwardState) -> torch.Tensor:
        fam, frame, prefix = self.family, state.frame, self.prefix
        k = keep_count(x.shape[1] - prefix, self.config.keep)
        drops = k < x.shape[1] - prefix  # keep 1 drops nothing: the model runs as it is, unscored
        for i in range(self.layer - 1 if drops else self.depth):
            x = self.step(state, fam.block, i, x, frame)
            state.tap(i, lambda: x)
        if not drops:
            return x
        where = fam.tokens(frame)
        x, scores, _ = self.step(state, run_block, fam.parts(self.layer - 1), x, where, row=self.row)
        state.tap(self.layer - 1, lambda: x)
        keep_idx = top_indices(self.rank(scores[:, prefix:]), k).sort(dim=1).values  # raster order stays
        seq_idx = with_prefix(keep_idx, prefix)
        dropped_at = x  # dropped tokens keep the features they entered their last block with, as idle tokens do
        x = gather_tokens(x, seq_idx)
        where = where.select(keep_idx)
        for i in range(self.layer, self.depth):
            x = self.run_on(i, x, where, state)
            state.record_kept(i, keep_idx)
            state.tap(i, lambda: scatter_tokens(dropped_at.clone(), seq_idx, x))
        return x

    def work(self, counts) -> list[BlockWork]:
        prefix = counts[0].prefix
        n_all = counts[0].tokens + prefix
        n = keep_count(counts[0].tokens, self.config.keep) + prefix
        if n == n_all:
            return [dense_work(n_all)] * self.depth
        return ([dense_work(n_all)] * (self.layer - 1) + [BlockWork(n_all, n_all, row_keys=self.row_keys(n_all))]
                + [BlockWork(n, n, out_tokens=n)] * (self.depth - self.layer))
