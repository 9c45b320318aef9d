"""timm ``VOLO`` (Vision Outlooker, the LV-ViT authors' successor: ``volo_d1`` .. ``volo_d5`` at 224 to 512 px).

timm's VOLO runs, in ``network``:

1. a convolutional stem (three convolutions with BatchNorm, stride 2, then a strided patch projection);
2. a stage of outlooker blocks on the fine map (28 x 28 at 224 px). Outlook attention gives each position a k x k
   window of weights over its neighbours, made from a linear layer on a pooled map, not from keys;
3. a stride-2 down-sampling, then the position embedding;
4. stages of plain transformer blocks on the coarse map (14 x 14 at 224 px), with no class token;
5. class-attention blocks (``post_network``), the final norm, and the head. The head adds half the maximum, over
   the tokens, of a per-token auxiliary head (token labeling).

The methods run on the transformer blocks, which tokenpace reads as one sequence of patch tokens (timm's stages 1-3
share one grid and width). Steps 1-3 are the embedding and run on every token. The class-attention blocks, norm and
heads run as timm runs them, on the tokens the blocks leave (``ClassAttentionTail``: fewer tokens after EViT or
top-k). Block indices (``stage_starts``, ``layers``, ``trace``) count the transformer blocks only.

Scores: the patch blocks have no class token, so the default is the attention a token receives (``received``).
Queries and keys are affine in the normed input, so no key is projected.

``forward_intermediates`` follows timm: stage 0 is the outlooker stage's own map (kept by ``feature_embed`` only when
feature maps are asked for), then the end of each transformer stage; NCHW only. VOLO is built for one size (its
position embedding).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..anatomy import Frame, PlainResidual
from ..core.macs import conv_macs, linear_macs
from .base import EMBEDDING
from .cait import ClassAttentionTail
from .timm_vit import VitParts

LAYOUT = ("timm's VOLO layout: a stage of Outlooker blocks, a Downsample, then stages of Transformer blocks with "
          "their Attention (volo_d1..d5)")


def _timm_classes():
    from timm.models.volo import VOLO, Attention, ClassAttention, ClassBlock, Downsample, Outlooker, Transformer

    return VOLO, (Outlooker, Downsample), (Transformer, Attention), (ClassBlock, ClassAttention)


class VoloParts(PlainResidual, VitParts):
    """timm VOLO's ``Transformer`` block with its ``Attention``: the standard fused q/k/v and projection, plain
    residuals (no LayerScale)."""


@dataclass(frozen=True)
class OutlookFrame(Frame):
    """A forward's frame with the outlooker stage's map (B, H, W, C), timm's feature 0, where one is asked for."""

    outlooked: torch.Tensor | None = None


def outlooker_macs(block: nn.Module, grid: tuple[int, int]) -> int:
    """One ``Outlooker`` on a (rows, cols) map: the value and output projections and the MLP on every position; the
    window weights (a linear layer) and their k^2 x k^2 products with the values on every pooled position."""
    attn, (rows, cols) = block.attn, grid
    pooled = math.ceil(rows / attn.stride) * math.ceil(cols / attn.stride)
    per_position = linear_macs(attn.v) + linear_macs(attn.proj) + linear_macs(block.mlp)
    return rows * cols * per_position + pooled * (linear_macs(attn.attn) + attn.kernel_size ** 4 * attn.v.in_features)


class TimmVolo(ClassAttentionTail):
    name = "timm VOLO"
    class_blocks = "post_network"
    blocks_use_positions = False  # the position embedding is added before the transformer blocks

    def __init__(self, model: nn.Module) -> None:
        _, (Outlooker, Downsample), (Block, Attention), (ClassBlock, ClassAttention) = _timm_classes()
        network = list(model.network)
        stages = network[2:]
        for s, part in enumerate(network):
            expected = Downsample if s == 1 else nn.Sequential
            if type(part) is not expected or (s == 0 and not all(type(b) is Outlooker for b in part)):
                inside = f" of {', '.join(sorted({type(b).__name__ for b in part}))}" if s != 1 else ""
                raise TypeError(f"network.{s} of this VOLO is {type(part).__name__}{inside}; tokenpace supports "
                                f"{LAYOUT}")
        for s, stage in enumerate(stages, start=2):
            for blk in stage:
                if type(blk) is not Block or type(getattr(blk, "attn", None)) is not Attention:
                    raise TypeError(f"network.{s} of this VOLO holds {type(blk).__name__} with "
                                    f"{type(getattr(blk, 'attn', None)).__name__}; tokenpace supports {LAYOUT}")
        for i, blk in enumerate(model.post_network or ()):  # run as timm runs them; counted by head_macs
            if type(blk) is not ClassBlock or type(getattr(blk, "attn", None)) is not ClassAttention:
                raise TypeError(f"post_network.{i} of this VOLO is {type(blk).__name__}; tokenpace supports timm's "
                                "ClassBlock with ClassAttention (volo_*)")
        self.stage_lengths = [len(stage) for stage in stages]
        super().__init__(model, [blk for stage in stages for blk in stage])

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        try:
            VOLO = _timm_classes()[0]
        except ImportError:  # timm not installed: nothing of this family can exist
            return False
        return isinstance(model, VOLO)

    def make_parts(self, i: int) -> VoloParts:
        return VoloParts(self.blocks[i])

    # --- the forward around the blocks ---------------------------------------------------------------------------
    def _outlooked(self, x: torch.Tensor) -> torch.Tensor:
        """The stem and the outlooker stage, as timm runs them: (B, H, W, C) on the fine map."""
        m = self.model
        x = m.patch_embed(x).permute(0, 2, 3, 1)
        for blk in m.network[0]:
            use_checkpoint = m.grad_checkpointing and torch.is_grad_enabled()
            x = checkpoint(blk, x, use_reentrant=False) if use_checkpoint else blk(x)
        return x

    def _tokens(self, outlooked: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """The down-sampling and the position embedding: the transformer blocks' tokens (B, N, C) and their grid."""
        m = self.model
        x = m.network[1](outlooked)
        if m.pos_embed is not None:
            x = m.pos_drop(x + m.pos_embed)
        B, H, W, C = x.shape
        return x.reshape(B, H * W, C), (H, W)

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, Frame]:
        x, grid = self._tokens(self._outlooked(x))
        return x, Frame(grid=grid)

    def feature_embed(self, x: torch.Tensor) -> tuple[torch.Tensor, Frame]:
        outlooked = self._outlooked(x)
        x, grid = self._tokens(outlooked)
        return x, OutlookFrame(grid=grid, outlooked=outlooked)

    def block(self, i: int, x: torch.Tensor, frame: Frame) -> torch.Tensor:
        # timm's block takes a (B, H, W, C) map and attends over H * W: a (B, 1, n, C) row is the same computation
        # and also holds a sequence EViT or top-k has shortened
        return self.blocks[i](x.unsqueeze(1)).squeeze(1)

    # --- feature maps --------------------------------------------------------------------------------------------
    def feature_points(self) -> list[int]:
        """timm's VOLO counts the outlooker stage's map as feature 0, then each transformer stage's end."""
        ends, total = [], 0
        for length in self.stage_lengths:
            total += length
            ends.append(total - 1)
        return [EMBEDDING] + ends

    def intermediates(self, maps, final, frame, taken, stopped, options):
        """As timm's VOLO: NCHW maps (a permuted view, as timm's), the final norm on the transformer stages' with
        ``norm``; the final tokens through :meth:`finish` where the run reached the last stage, else the last map
        as timm leaves it, (B, H, W, C)."""
        options.only_nchw(self.name)
        norm = self.model.norm
        grids = [frame.outlooked if j == 0 else y.reshape(y.shape[0], *frame.grid, -1) for j, y in zip(taken, maps)]
        maps = [(norm(y) if options.norm and j > 0 else y).permute(0, 3, 1, 2) for j, y in zip(taken, grids)]
        if options.intermediates_only:
            return maps
        if stopped and max(taken) < len(self.stage_lengths):
            return (frame.outlooked if max(taken) == 0 else final.reshape(final.shape[0], *frame.grid, -1)), maps
        return self.finish(final, frame), maps

    # --- sizes and cost ------------------------------------------------------------------------------------------
    def _stride(self) -> int:
        """The stem's and the down-sampling's strides together: input pixels per transformer token (per side)."""
        convs = [m for part in (self.model.patch_embed, self.model.network[1]) for m in part.modules()
                 if isinstance(m, nn.Conv2d)]
        return math.prod(m.stride[0] for m in convs)

    def input_size(self) -> tuple[int, int, int]:
        rows, cols = self.model.pos_embed.shape[1:3]
        return (self.model.in_chans, rows * self._stride(), cols * self._stride())

    def _grids(self, img_size) -> tuple[tuple[int, int], tuple[int, int]]:
        """The outlooker stage's map and the transformer blocks' grid at ``img_size``."""
        fine = conv_macs(self.model.patch_embed, self.image_size(img_size))[1]
        return fine, conv_macs(self.model.network[1], fine)[1]

    def patch_grid_at(self, img_size) -> tuple[int, int]:
        return self._grids(img_size)[1]

    def stem_macs(self, img_size) -> int:
        """The convolutional stem, the outlooker blocks and the down-sampling, all on every token."""
        m, fine = self.model, self._grids(img_size)[0]
        return (conv_macs(m.patch_embed, self.image_size(img_size))[0]
                + sum(outlooker_macs(blk, fine) for blk in m.network[0])
                + conv_macs(m.network[1], fine)[0])

    def head_macs(self, tokens: int) -> int:
        """The class-attention blocks and the head, and the auxiliary head on every patch token left (with a
        pool, as timm runs it)."""
        m = self.model
        read = tokens if m.post_network is not None else tokens - 1  # timm's aux head skips the first token
        aux = read * linear_macs(m.aux_head) if m.aux_head is not None and m.global_pool else 0
        return super().head_macs(tokens) + aux
