"""timm ``NaFlexVit`` (``naflexvit_*``: SigLIP2 NaFlex towers, C-RADIO v3/v4, NaFlex ViTs) on image batches.

Its blocks are timm's ViT blocks (``Block``, ``ResPostBlock``, differential attention, the parallel blocks), or
timm's ``EvaBlock`` where the model has RoPE, SwiGLU, grouped-query or gated attention: the parts are those of the
ViT and Eva families.
What differs is around the blocks: one ``embeds`` module (patchify + linear, or a conv; learned or factorized
position embeddings resized to the input's grid; class and register tokens), the RoPE table made for the input's
grid, and the pooling.

Packed NaFlex input (patches with ``patch_coord`` / ``patch_valid`` from timm's NaFlex collator) has a grid per
image and padding tokens that must never be selected: it is refused, image batches (B, C, H, W) of any size the
embedding takes are accepted.
"""
from __future__ import annotations

import torch
from torch import nn

from ..anatomy import BlockParts, Frame
from .base import recorded_input_size
from .eva import EvaParts, block_rope, eva_parts_class
from .patch_embed import OneGridSizes, patch_multiple_problem
from .timm_vit import VIT_BLOCKS, PatchSequenceFamily, check_blocks, vit_parts_class


def _parts_class(block: nn.Module) -> type[BlockParts] | None:
    """The parts that read ``block`` (a timm ViT or EVA block), or None."""
    return vit_parts_class(block) or eva_parts_class(block)


class TimmNaFlexVit(OneGridSizes, PatchSequenceFamily):
    name = "timm NaFlexVit"

    def __init__(self, model: nn.Module) -> None:
        check_blocks(model, "NaFlexVit", lambda blk: _parts_class(blk) is not None,
                     f"{VIT_BLOCKS} and EvaBlock with EvaAttention or AttentionRope")
        super().__init__(model)
        self.blocks_use_positions = model.rope is not None

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        try:
            from timm.models.naflexvit import NaFlexVit
        except ImportError:  # an older timm: nothing of this family can exist
            return False
        return isinstance(model, NaFlexVit)

    @property
    def has_class_token(self) -> bool:
        return bool(self.model.has_class_token)

    def make_parts(self, i: int) -> BlockParts:
        blk = self.blocks[i]
        parts = _parts_class(blk)
        if issubclass(parts, EvaParts):
            return parts(blk, i, self.model.rope is not None, self.model.rope_is_mixed)
        return parts(blk)

    # --- the forward around the blocks ---------------------------------------------------------------------------
    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, Frame]:
        if not torch.is_tensor(x) or x.ndim != 4:
            got = f"a {tuple(x.shape)} tensor" if torch.is_tensor(x) else type(x).__name__
            raise ValueError(f"tokenpace runs NaFlexVit on image batches (B, C, H, W); got {got}. Packed or "
                             "pre-patchified NaFlex input (patches with patch_coord / patch_valid) is not supported")
        m = self.model
        x, grid = m.embeds(x)
        grid = (int(grid[0]), int(grid[1]))
        rope = None if m.rope is None else m.rope.get_embed(shape=list(grid))
        return m.norm_pre(x), Frame(grid=grid, rope=rope)

    def block(self, i: int, x: torch.Tensor, frame: Frame) -> torch.Tensor:
        if frame.rope is None:  # timm's ViT Block takes no rope argument
            return self.blocks[i](x)
        return self.blocks[i](x, rope=block_rope(frame.rope, i, self.model.rope_is_mixed))

    # --- sizes and cost ------------------------------------------------------------------------------------------
    @property
    def patch_embedding(self) -> nn.Module:
        return self.model.embeds

    def own_size(self) -> tuple[int, int]:
        """The size the model is used at (it runs others too): its ``img_size`` where timm kept it, else its
        pretrained config's (where ``tokenpace.models.create_model`` records an ``img_size`` timm dropped), else
        its position embedding's grid in pixels."""
        embeds = self.model.embeds
        if getattr(embeds, "default_img_size", None) is not None:
            return tuple(int(s) for s in embeds.default_img_size)
        recorded = recorded_input_size(self.model)
        if recorded is not None:
            return recorded
        if getattr(embeds, "pos_embed_grid_size", None) is None:
            raise TypeError("this NaFlexVit keeps no input size (no img_size, pretrained config or position grid): "
                            "build it with img_size=N, or with tokenpace.models.create_model(name, img_size=N)")
        return tuple(int(g * p) for g, p in zip(embeds.pos_embed_grid_size, embeds.patch_size))

    def input_size(self) -> tuple[int, int, int]:
        return (self.model.in_chans, *self.own_size())

    def size_problem(self, size: tuple[int, int]) -> str | None:
        """Any size whose sides are multiples of the patch (or any size with ``dynamic_img_pad``): the position
        embeddings are resized to the grid."""
        return patch_multiple_problem(self.model.embeds, size)
