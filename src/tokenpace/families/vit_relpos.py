"""timm ``VisionTransformerRelPos`` (``vit_relpos_*``, ``vit_srelpos_*``): a flat ViT whose attention adds a relative
position bias, from a small MLP over log-spaced offsets (``RelPosMlp``) or a table (``RelPosBias``), per block or
one shared by all blocks; pre-norm blocks (``RelPosBlock``, LayerScale optional) or post-norm ones
(``ResPostRelPosBlock``, the ``*_rpn_*`` models); class token or not.

A subset takes the bias rows and columns of the tokens present. A token without a position (Evo's representative
token, EViT's fused token) takes the class token's entries where the model has a class token (zeros for the MLP
bias, which pads the class token's rows), and zero bias where it has none.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from ..anatomy import Frame, PostNorm
from ..core.macs import linear_macs
from .base import FIXED_GRID_RESIZE, Family, SequencePrep
from .patch_embed import patch_grid
from .timm_vit import PatchSequenceFamily, VitParts, check_blocks


def _timm_classes():
    from timm.models.vision_transformer_relpos import (RelPosAttention, RelPosBlock, ResPostRelPosBlock,
                                                       VisionTransformerRelPos)

    return VisionTransformerRelPos, (RelPosBlock, ResPostRelPosBlock), RelPosAttention


@dataclass(frozen=True)
class RelPosFrame(Frame):
    """A forward's position data (the shared bias (1, H, N, N), if any) and, in the token set one block's scoring
    and run share, that block's own bias, made once for both."""

    block_bias: torch.Tensor | None = None


def bias_macs(rel_pos: nn.Module | None) -> int:
    """MACs of making a bias: the MLP over every relative offset (``RelPosMlp``), 0 for a table."""
    coords = getattr(rel_pos, "rel_coords_log", None)
    return 0 if coords is None else coords.numel() // coords.shape[-1] * linear_macs(rel_pos.mlp)


class RelPosParts(VitParts):
    """``RelPosBlock`` + ``RelPosAttention``: timm's fused q/k/v with optional q/k norms, the relative-position bias,
    pre-norm residuals with LayerScale ``ls1``/``ls2`` (the defaults)."""

    def __init__(self, block: nn.Module, prefix: int) -> None:
        super().__init__(block)
        self.prefix = prefix

    def full_bias(self, frame: Frame | None) -> torch.Tensor | None:
        """The bias (1, H, N, N) over every token: the block's own (timm's attention ignores a shared one then), or
        the shared one, or None."""
        if getattr(frame, "block_bias", None) is not None:
            return frame.block_bias
        rel_pos = self.attn.rel_pos
        return rel_pos.get_bias() if rel_pos is not None else getattr(frame, "shared_bias", None)

    def _every_token(self, where) -> bool:
        return where is None or (where.pos is None and where.prefix == self.prefix and not where.extra)

    def _gather(self, grid: torch.Tensor, where) -> torch.Tensor:
        """grid (N, N, C) over every token -> (B, n, n, C) at the token pairs of ``where``."""
        N = grid.shape[0]
        if self.prefix:  # position-less tokens take the class token's entries
            blank = 0
        else:  # none learned: one zero row and column
            grid, blank = F.pad(grid, (0, 0, 0, 1, 0, 1)), N
        rows = where.table_rows(N - self.prefix, self.prefix, blank, grid.device)
        return grid[rows.unsqueeze(-1), rows.unsqueeze(-2)]

    def bias(self, where):
        full = self.full_bias(getattr(where, "frame", None))
        if full is None or self._every_token(where):
            return full
        return self._gather(full[0].permute(1, 2, 0), where).permute(0, 3, 1, 2)  # H-wide rows gathered

    def mean_bias(self, where):
        full = self.full_bias(getattr(where, "frame", None))
        if full is None or self._every_token(where):
            return None if full is None else full.mean(dim=1)
        return self._gather(full[0].mean(dim=0).unsqueeze(-1), where).squeeze(-1)  # (B, n, n)


class PostNormRelPosParts(PostNorm, RelPosParts):
    """``ResPostRelPosBlock`` (the ``*_rpn_*`` models): the same attention, post-norm residuals."""


class TimmRelPosViT(PatchSequenceFamily):
    name = "timm VisionTransformerRelPos"
    # the position bias is built for one grid (timm's set_input_size resizes it)
    size_problem = Family.size_problem
    resize_hint = FIXED_GRID_RESIZE

    def __init__(self, model: nn.Module) -> None:
        _, blocks, Attention = _timm_classes()
        check_blocks(model, "VisionTransformerRelPos",
                     lambda blk: type(blk) in blocks and type(getattr(blk, "attn", None)) is Attention,
                     "timm's RelPosBlock and ResPostRelPosBlock with RelPosAttention")
        super().__init__(model)
        self.blocks_use_positions = model.shared_rel_pos is not None or any(
            blk.attn.rel_pos is not None for blk in model.blocks)

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        try:
            Model = _timm_classes()[0]
        except ImportError:
            return False
        return isinstance(model, Model)

    def make_parts(self, i: int) -> RelPosParts:
        _, post_norm = _timm_classes()[1]
        parts = PostNormRelPosParts if type(self.blocks[i]) is post_norm else RelPosParts
        return parts(self.blocks[i], self.num_prefix)

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, RelPosFrame]:
        m = self.model
        grid = patch_grid(m.patch_embed, tuple(x.shape[-2:]))
        x = m.patch_embed(x)
        if m.cls_token is not None:
            x = torch.cat((m.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        shared = m.shared_rel_pos.get_bias() if m.shared_rel_pos is not None else None
        return x, RelPosFrame(grid=grid, shared_bias=shared)

    def block(self, i: int, x: torch.Tensor, frame: RelPosFrame) -> torch.Tensor:
        return self.blocks[i](x, shared_rel_pos=frame.shared_bias)

    def prepare(self, i: int, x: torch.Tensor, frame: RelPosFrame) -> SequencePrep:
        """The block's own bias is made here once, for its scores and its run (an MLP where timm's ``RelPosMlp``)."""
        prep = super().prepare(i, x, frame)
        rel_pos = self.blocks[i].attn.rel_pos
        if rel_pos is not None:
            prep.where = replace(prep.where, frame=replace(frame, block_bias=rel_pos.get_bias()))
        return prep

    def count_macs(self, works, img_size) -> int:
        """The blocks, stem and head, plus the bias MLPs: each block's once per forward, the shared one once."""
        total = super().count_macs(works, img_size) + bias_macs(self.model.shared_rel_pos)
        return total + sum(bias_macs(blk.attn.rel_pos) for blk in self.blocks)
