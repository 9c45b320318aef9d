"""The vision towers of today's vision-language models in timm: Qwen3-VL / Qwen3.5 / Qwen3.8 / Qwen-Drive
(``qwen3_vit_*``) and DeepSeek-V4 (``deepseek_vit_*``), each as a bare encoder (``*_enc``: it returns the VLM
projector's tokens) or wrapped as a classifier (mean pool, norm, linear head; ``*_merge`` / ``*_align`` keep the
projector in front of it).

The blocks are pre-norm with axial 2D RoPE inside attention and no prefix token: Qwen's are timm's ``EvaBlock``
(read by the Eva family's parts), DeepSeek's its own block around timm's ``AttentionRope`` and a SwiGLU MLP. What
is theirs is around the blocks: the features are the whole patch map (B, H, W, C), which the VLM projector (Qwen's
``merger``, DeepSeek's ``aligner``) pixel-unshuffles in k x k blocks. Methods that keep every token (Idle, Evo) run;
methods that drop tokens for good are refused, as the map needs every token.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..anatomy import BlockParts, Frame, PlainResidual
from ..core.feature_maps import vit_intermediates
from ..core.macs import linear_macs
from .base import IntermediateOptions, SequenceFamily, no_final_norm_problem
from .eva import EvaParts, eva_parts_class
from .patch_embed import OneGridSizes, patch_multiple_problem
from .timm_vit import check_blocks


class PlainResidualEvaParts(PlainResidual, EvaParts):
    """A pre-norm RoPE block with timm's ``AttentionRope`` and plain residuals (no LayerScale): DeepSeek's."""


class EncoderTower(OneGridSizes, SequenceFamily):
    """A vision tower: an encoder, bare or wrapped by a classifier (its ``encoder``), with one stage of ``blocks``
    over a patch grid (``patch_embed``) that follows the input; every block is a feature point. Subclasses name
    timm's classes and what the blocks must be."""

    block_description: str  # what the blocks must be, in a refusal

    def __init__(self, model: nn.Module) -> None:
        self.classifier = self._is_classifier(model)  # read once: the forward must not import (torch.compile)
        self.encoder = model.encoder if self.classifier else model
        check_blocks(self.encoder, self.name, self.readable, self.block_description)
        super().__init__(model, [self.encoder.blocks])

    @staticmethod
    def timm_classes() -> tuple[type, type]:
        """timm's (encoder, classifier) classes of the tower."""
        raise NotImplementedError

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        try:
            classes = cls.timm_classes()
        except ImportError:  # an older timm: nothing of this family can exist
            return False
        return isinstance(model, classes)

    @classmethod
    def _is_classifier(cls, model: nn.Module) -> bool:
        return isinstance(model, cls.timm_classes()[1])

    def readable(self, block: nn.Module) -> bool:
        """Whether the family's parts read ``block``."""
        raise NotImplementedError

    @property
    def patch_embedding(self) -> nn.Module:
        return self.encoder.patch_embed

    @property
    def checkpointing(self) -> bool:
        return bool(self.encoder.grad_checkpointing)

    def feature_points(self) -> list[int]:
        return list(range(self.depth))

    def head_macs(self, tokens: int) -> int:
        return 0  # counted by ``count_macs``, which knows the grid

    def classifier_head_macs(self, features: int) -> int:
        """A classifier's linear head over its pooled token (``global_pool='avg'``), or over each of its ``features``
        tokens without a pool (``''``, Gemma's ``'none'``); 0 on a bare encoder."""
        if not self.classifier:
            return 0
        return (1 if self.model.global_pool == "avg" else features) * linear_macs(self.model.head)


class VlmTowerFamily(EncoderTower):
    """A VLM vision tower read by the Eva parts: its encoder (``patch_embed`` to an NHWC grid, ``_pos_embed`` giving
    tokens and the RoPE table, ``blocks``), an optional projector over the final map, and, for a classifier, a pooled
    linear head. Subclasses name the classes, the projector attribute and the encoder's final norm."""

    projector_name: str  # the encoder's attribute holding the VLM projector (None where the model has none)
    can_pad: bool = False  # the patch embedding can pad an input to the patch (``dynamic_img_pad``)
    fixed_length_head = True  # the features are the whole patch map
    fixed_length_why = "features are the whole patch map (B, H, W, C), as the VLM projector needs it"

    def readable(self, block: nn.Module) -> bool:
        return self.parts_class(block) is not None

    def parts_class(self, block: nn.Module) -> type[EvaParts] | None:
        raise NotImplementedError

    def make_parts(self, i: int) -> BlockParts:
        block = self.blocks[i]
        return self.parts_class(block)(block, i, has_rope=True, mixed=False)

    @property
    def projector(self) -> nn.Module | None:
        return getattr(self.encoder, self.projector_name, None)

    def final_norm(self) -> nn.Module | None:
        """The encoder's norm over its final patch tokens, or None where it has none."""
        return None

    # --- the forward around the blocks ---------------------------------------------------------------------------
    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, Frame]:
        enc = self.encoder
        x = enc.patch_embed(x)
        grid = (x.shape[1], x.shape[2])
        x, rope = enc._pos_embed(x)
        return x, Frame(grid=grid, rope=rope)

    def block(self, i: int, x: torch.Tensor, frame: Frame) -> torch.Tensor:
        return self.blocks[i](x, rope=frame.rope)

    def patch_map(self, x: torch.Tensor, frame: Frame) -> torch.Tensor:
        """The final tokens as the encoder's ``forward_features`` returns them: normed (where it has a final norm),
        as a (B, H, W, C) map."""
        norm = self.final_norm()
        x = x if norm is None else norm(x)
        return x.reshape(x.shape[0], *frame.grid, x.shape[-1])

    def finish(self, x: torch.Tensor, frame: Frame) -> torch.Tensor:
        """The encoder's map; a classifier's features are its encoder's output: the projector's tokens where it
        keeps the projector."""
        x = self.patch_map(x, frame)
        projector = self.projector
        return projector(x) if projector is not None and self.classifier else x

    def intermediates(self, maps, final, frame, taken, stopped, options: IntermediateOptions):
        """As timm's towers: every block's map (NCHW or NLC; the final norm on request where the encoder has one),
        and the features where the run ended (a classifier's through its projector)."""
        norm = self.final_norm()
        if options.norm and norm is None:
            raise ValueError(no_final_norm_problem(self.name))
        maps = vit_intermediates(maps, final, norm, 0, frame.grid, norm=options.norm, output_fmt=options.output_fmt,
                                 intermediates_only=True)
        if options.intermediates_only:
            return {"image_intermediates": maps} if options.output_dict else maps
        features = self.finish(final, frame)
        return {"image_features": features, "image_intermediates": maps} if options.output_dict else (features, maps)

    # --- sizes and cost ------------------------------------------------------------------------------------------
    def input_size(self) -> tuple[int, int, int]:
        pe = self.encoder.patch_embed
        return (self.encoder.in_chans, *pe.img_size)

    def size_problem(self, size: tuple[int, int]) -> str | None:
        """Any size whose sides are multiples of the patch (any size with ``dynamic_img_pad``): RoPE and Qwen's
        position grid follow the input; the projector's own condition on the grid on top."""
        return (patch_multiple_problem(self.encoder.patch_embed, size, self.can_pad)
                or self.projector_problem(self.patch_grid_at(size)))

    def projector_problem(self, grid: tuple[int, int]) -> str | None:
        """Why the projector refuses a patch grid, or None."""
        return None

    def merge_factor(self) -> int:
        """k: the projector joins k x k patches into one token."""
        raise NotImplementedError

    def count_macs(self, works, img_size) -> int:
        """The blocks and stem as every sequence family's; then the projector over its tokens (k x k blocks of the
        map; the map padded to them), and a classifier's head over one pooled token, or over every feature token
        without a pool (timm's ``global_pool=''``)."""
        rows, cols = self.patch_grid_at(img_size)
        features = rows * cols
        ends = 0
        if self.projector is not None:
            k = self.merge_factor()
            features = math.ceil(rows / k) * math.ceil(cols / k)
            ends += features * linear_macs(self.projector)
        return super().count_macs(works, img_size) + ends + self.classifier_head_macs(features)


class Qwen3VitFamily(VlmTowerFamily):
    name = "timm Qwen3 ViT"
    projector_name = "merger"
    block_description = "timm's EvaBlock or EvaBlockPostNorm with AttentionRope or EvaAttention (Qwen3-VL's)"

    @staticmethod
    def timm_classes():
        from timm.models.qwen3_vit import Qwen3VitClassifier, Qwen3VitEncoder

        return Qwen3VitEncoder, Qwen3VitClassifier

    def parts_class(self, block):
        return eva_parts_class(block)

    def projector_problem(self, grid):
        k = None if self.projector is None else self.merge_factor()
        if k is not None and (grid[0] % k or grid[1] % k):
            return (f"its projector merges {k}x{k} patches: the patch grid's sides must be multiples of {k} (got "
                    f"{grid[0]}x{grid[1]} patches)")
        return None

    def merge_factor(self):
        return self.projector.merge_size


class DeepseekVitFamily(VlmTowerFamily):
    name = "timm DeepSeek ViT"
    projector_name = "aligner"
    block_description = "timm's DeepseekVitBlock with AttentionRope"
    can_pad = True

    @staticmethod
    def timm_classes():
        from timm.models.deepseek_vit import DeepseekVitClassifier, DeepseekVitEncoder

        return DeepseekVitEncoder, DeepseekVitClassifier

    def parts_class(self, block):
        from timm.layers import AttentionRope
        from timm.models.deepseek_vit import DeepseekVitBlock

        plain = type(block) is DeepseekVitBlock and type(getattr(block, "attn", None)) is AttentionRope
        return PlainResidualEvaParts if plain else None

    def final_norm(self):
        return self.encoder.norm

    def merge_factor(self):
        return self.projector.downsample_ratio
