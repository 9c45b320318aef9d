"""What a model family must provide so that every method runs on it (one adapter per family)."""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable

import torch
from torch import nn

from ..core.macs import BlockShape

RunBlocks = Callable[[torch.Tensor], torch.Tensor]


class FamilyAdapter(ABC):
    """Token-level operations on one model's blocks. Methods call these and never touch module internals."""

    name: str = "?"

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    @classmethod
    @abstractmethod
    def matches(cls, model: nn.Module) -> bool:
        """True when this adapter is the one for ``model``'s family (it may still reject a variant)."""

    # --- structure -------------------------------------------------------------------------------------------
    @property
    @abstractmethod
    def depth(self) -> int: ...

    @property
    @abstractmethod
    def num_prefix(self) -> int:
        """Tokens in front of the patch tokens (class, distillation, registers): always on the full path."""

    @property
    @abstractmethod
    def has_class_token(self) -> bool: ...

    # --- the forward around the blocks ---------------------------------------------------------------------------
    @abstractmethod
    def forward_features(self, x: torch.Tensor, run_blocks: RunBlocks) -> torch.Tensor:
        """The model's own feature forward, with ``run_blocks`` in place of its block loop."""

    # --- per-block token operations ------------------------------------------------------------------------------
    @abstractmethod
    def block(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Block i on all tokens of x, exactly as the model runs it."""

    @abstractmethod
    def block_with_cls_attention(self, i: int, x: torch.Tensor, heads: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Block i on x, plus the class token's softmax attention over every token of x, reduced over heads."""

    @abstractmethod
    def attention_half(self, i: int, x: torch.Tensor, heads: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Only the attention residual of block i, plus the class-token attention (for EViT's mid-block step)."""

    @abstractmethod
    def mlp_half(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Only the MLP residual of block i."""

    @abstractmethod
    def cls_logit_scores(self, i: int, x: torch.Tensor, project_keys: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(head-summed class-query logits of block i over every token of x (B, n), the block's norm1 output)."""

    @abstractmethod
    def attention_module(self, i: int) -> nn.Module:
        """Block i's attention module (the token cut loss rebuilds its attention graph from it)."""

    @abstractmethod
    def block_from_normed(self, i: int, x: torch.Tensor, normed: torch.Tensor) -> torch.Tensor:
        """Block i on x whose norm1 output is already known."""

    @abstractmethod
    def input_size(self) -> tuple[int, int, int]:
        """(channels, height, width) of the images the model is built for."""

    # --- cost model ----------------------------------------------------------------------------------------------
    @abstractmethod
    def num_patches(self, img_size: int | tuple[int, int] | None) -> int: ...

    @abstractmethod
    def block_shape(self, i: int) -> BlockShape: ...

    @abstractmethod
    def scores_project_keys(self, i: int) -> bool:
        """True when block i's keys are not linear in its input, so class-logit scores must project every key."""

    @abstractmethod
    def stem_macs(self, num_patches: int) -> int: ...

    @abstractmethod
    def head_macs(self) -> int: ...
