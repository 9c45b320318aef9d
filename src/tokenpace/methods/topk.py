"""Plain top-k dropping: the ablation baseline of every token-reduction paper (Evo-ViT Table 3 "naive selection").

At ``layer`` the top K = int(P * keep) patch tokens by the previous layer's class attention stay and the rest are
discarded for good; this is Evo-ViT's first selection without its placeholders.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..core.macs import BlockWork, dense_work
from ..core.schedule import keep_count, scaled_layer, validate_layers
from ..core.tokens import gather_tokens, top_indices, with_prefix
from .base import SCORES, ForwardState, MethodConfig, Policy, check_choice, check_keep


@dataclass(frozen=True)
class TopK(MethodConfig):
    """Top-k dropping configuration.

    keep: fraction of patch tokens kept, K = int(P * keep).
    layer: first layer that runs on the kept tokens only; None: 4 at depth 12 (Evo-ViT's), scaled otherwise.
    score: None (the family default), ``"cls"`` (class attention of the layer before, head sum) or ``"random"``
        (control).
    """

    keep: float = 0.5
    layer: int | None = None
    score: str | None = None

    name: ClassVar[str] = "topk"

    def __post_init__(self) -> None:
        check_keep("TopK keep", self.keep)
        check_choice("TopK score", self.score, SCORES, optional=True)
        if self.layer is not None and (isinstance(self.layer, bool) or not isinstance(self.layer, int)):
            raise ValueError(f"TopK layer must be an int layer index or None for the default; got {self.layer!r}")

    def resolved_layer(self, depth: int) -> int:
        layer = self.layer if self.layer is not None else scaled_layer(depth, 4)
        validate_layers("TopK layer", (layer,), depth, minimum=1)
        return layer

    def policy(self, adapter) -> "TopKPolicy":
        return TopKPolicy(self, adapter)


class TopKPolicy(Policy):
    config: TopK

    def __init__(self, config: TopK, adapter) -> None:
        super().__init__(config, adapter)
        self.layer = config.resolved_layer(self.depth)

    def run(self, x: torch.Tensor, state: ForwardState) -> torch.Tensor:
        ad, prefix = self.adapter, self.prefix
        k = keep_count(x.shape[1] - prefix, self.config.keep)
        for i in range(self.layer - 1):
            x = ad.block(i, x)
        x, cls_row = ad.block_with_cls_attention(self.layer - 1, x, "sum")
        keep_idx = top_indices(self.rank(cls_row[:, prefix:]), k)
        x = gather_tokens(x, with_prefix(keep_idx, prefix))
        for i in range(self.layer, self.depth):
            x = ad.block(i, x)
            state.record_kept(i, keep_idx)
        return x

    def work(self, num_patches: int) -> list[BlockWork]:
        n_all = num_patches + self.prefix
        n = keep_count(num_patches, self.config.keep) + self.prefix
        return ([dense_work(n_all)] * (self.layer - 1) + [BlockWork(n_all, n_all, cls_row_keys=n_all)]
                + [dense_work(n)] * (self.depth - self.layer))
