"""Shared pieces of the method configs and their policies."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ..core.macs import BlockWork
from ..core.scores import random_scores
from ..families.base import FamilyAdapter

# ranking criteria: the class token's attention, the attention a token receives (class-token-free models), the
# token's feature norm, or random (the control); each family accepts some of them (FamilyAdapter.scores)
SCORES = ("cls", "received", "norm", "random")


def check_keep(name: str, keep: Any) -> None:
    if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0.0 < keep <= 1.0:
        raise ValueError(f"{name} must be a number in (0, 1] (the fraction of patch tokens kept); got {keep!r}")


def check_choice(name: str, value: Any, accepted: tuple[str, ...], optional: bool = False) -> None:
    if not (optional and value is None) and value not in accepted:
        raise ValueError(f"{name}={value!r} is not accepted; choose one of {', '.join(map(repr, accepted))}")


def check_layers_type(name: str, layers: Any) -> None:
    if layers is None:
        return
    if not isinstance(layers, tuple) or not all(isinstance(v, int) and not isinstance(v, bool) for v in layers):
        raise ValueError(f"{name} must be a tuple of layer indices (ints) or None for the default; got {layers!r}")


@dataclass
class ForwardState:
    """Everything one forward pass carries between blocks (created per call; never module-level globals)."""

    kept: list[torch.Tensor | None] | None = None  # per block: original patch indices on the full path (trace)
    records: list[Any] = field(default_factory=list)  # what training losses need (e.g. IdleViT's cut loss)

    def record_kept(self, layer: int, patch_idx: torch.Tensor | None) -> None:
        if self.kept is not None:
            self.kept[layer] = patch_idx


@dataclass(frozen=True)
class MethodConfig:
    """Base of the typed method configs; subclasses validate in ``__post_init__``."""

    name: ClassVar[str] = "?"

    def policy(self, adapter: FamilyAdapter) -> "Policy":
        raise NotImplementedError


class Policy:
    """Runs the block loop for one method on one model (through its family adapter)."""

    def __init__(self, config: MethodConfig, adapter: FamilyAdapter) -> None:
        self.config = config
        self.adapter = adapter
        self.depth = adapter.depth
        self.prefix = adapter.num_prefix
        self.score = adapter.resolve_score(config.name, getattr(config, "score", None))

    def run(self, x: torch.Tensor, state: ForwardState) -> torch.Tensor:
        raise NotImplementedError

    def work(self, num_patches: int) -> list[BlockWork]:
        """Per block, what it computes for an input with ``num_patches`` patch tokens (for MACs)."""
        raise NotImplementedError

    def rank(self, scores: torch.Tensor) -> torch.Tensor:
        """Patch-token scores used for ranking: the class-attention scores, or random ones as a control."""
        return random_scores(scores) if self.score == "random" else scores
