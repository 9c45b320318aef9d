"""What a model family must provide so that every method runs on it (one adapter per family)."""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable, Iterable

import torch
from torch import nn

from ..core.macs import BlockShape, block_macs, dense_work

RunBlocks = Callable[[torch.Tensor], torch.Tensor]


class FamilyAdapter(ABC):
    """What every family provides: structure, the forward around the blocks, the methods and scores it accepts, and
    its cost model. Methods call adapters and never touch module internals."""

    name: str = "?"
    methods: tuple[str, ...] = ("evo", "idle", "evit", "topk")  # the methods that run on this family
    scores: tuple[str, ...] = ("cls", "random")  # accepted ranking criteria; the first is the default
    default_representative = False  # Evo's representative-token fast path when the config leaves it None

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    @classmethod
    @abstractmethod
    def matches(cls, model: nn.Module) -> bool:
        """True when this adapter is the one for ``model``'s family (it may still reject a variant)."""

    @property
    @abstractmethod
    def depth(self) -> int:
        """Number of blocks the methods act on (numbered across stages in pyramid models)."""

    @property
    def num_prefix(self) -> int:
        """Tokens in front of the patch tokens (class, distillation, registers): always on the full path."""
        return 0

    @property
    def has_class_token(self) -> bool:
        return False

    @abstractmethod
    def forward_features(self, x: torch.Tensor, run_blocks: RunBlocks) -> torch.Tensor:
        """The model's own feature forward, with ``run_blocks`` in place of its block loop."""

    @abstractmethod
    def input_size(self) -> tuple[int, int, int]:
        """(channels, height, width) of the images the model is built for."""

    @abstractmethod
    def block_grid(self, i: int) -> tuple[int, int]:
        """(rows, cols) of the token grid block i works on at the model's input size (trace indices are raster
        positions in it)."""

    @abstractmethod
    def count_macs(self, policy, img_size: int | tuple[int, int] | None) -> int:
        """MACs of one image's forward; ``policy`` None means the unpatched model."""

    # --- methods and scores ------------------------------------------------------------------------------------
    def make_policy(self, config):
        """The policy running ``config`` on this family; ValueError for a method the family does not support."""
        if config.name not in self.methods:
            raise ValueError(f"method {config.name!r} is not available for {self.name} models; "
                             f"accepted here: {', '.join(map(repr, self.methods))}")
        return config.policy(self)

    def resolve_score(self, method: str, score: str | None) -> str:
        """The ranking criterion a method uses here: ``score`` or the family default, checked against it."""
        score = self.scores[0] if score is None else score
        if score not in self.scores:
            raise ValueError(f"{method} score={score!r} is not available for {self.name} models; "
                             f"accepted here: {', '.join(map(repr, self.scores))}")
        return score


def parse_img_size(img_size: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(img_size, int) and not isinstance(img_size, bool):
        img_size = (img_size, img_size)
    if (not isinstance(img_size, (tuple, list)) or len(img_size) != 2
            or any(isinstance(s, bool) or not isinstance(s, int) or s <= 0 for s in img_size)):
        raise ValueError(f"img_size must be a positive int or (height, width); got {img_size!r}")
    return tuple(img_size)


class StagedAdapter(FamilyAdapter):
    """A family whose blocks come in stages (LeViT, Swin, PVTv2); blocks are numbered across stages, 0..depth-1."""

    def __init__(self, model: nn.Module, stages: Iterable[Iterable[nn.Module]]) -> None:
        super().__init__(model)
        self.blocks: list[nn.Module] = []
        self.stage_blocks: list[range] = []  # the global indices of each stage's blocks, in order
        for blocks in stages:
            start = len(self.blocks)
            self.blocks.extend(blocks)
            self.stage_blocks.append(range(start, len(self.blocks)))

    @property
    def depth(self) -> int:
        return len(self.blocks)

    def stage_of_block(self, i: int) -> int:
        return next(s for s, blocks in enumerate(self.stage_blocks) if i in blocks)


class SequenceAdapter(FamilyAdapter):
    """Flat models: one token sequence of constant length through every block (ViT, DeiT)."""

    @property
    @abstractmethod
    def num_prefix(self) -> int:
        """Tokens in front of the patch tokens (class, distillation, registers): always on the full path."""

    @property
    @abstractmethod
    def has_class_token(self) -> bool: ...

    def count_macs(self, policy, img_size: int | tuple[int, int] | None) -> int:
        num_patches = self.num_patches(img_size)
        if policy is not None:
            works = policy.work(num_patches)
        else:
            works = [dense_work(num_patches + self.num_prefix)] * self.depth
        blocks = sum(block_macs(self.block_shape(i), work) for i, work in enumerate(works))
        return self.stem_macs(num_patches) + blocks + self.head_macs()

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
    def block_from_normed(self, i: int, x: torch.Tensor, normed: torch.Tensor, return_qk: bool = False):
        """Block i on x whose norm1 output is already known; with ``return_qk`` also (q, k) (B, n, H*d) as the
        attention used them (after any qk-norm), for the token cut loss to reuse."""

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
