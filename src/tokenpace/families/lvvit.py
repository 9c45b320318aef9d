"""tokenpace's LV-ViT (``lvvit_*``, ``archs/lvvit.py``): a flat class-token model whose blocks are timm's
``Attention`` and ``Mlp`` with both residual branches divided by ``skip_lam``; a four-conv stem; and a token-labelling
head that reads every patch token leaving the last block (so its cost follows the token count a method leaves).
"""
from __future__ import annotations

import torch
from torch import nn

from ..anatomy import Frame
from ..core.macs import conv_macs, linear_macs
from .base import parse_img_size
from .patch_embed import patch_grid
from .timm_vit import PatchSequenceFamily, VitParts


class LvVitParts(VitParts):
    """timm's attention parts; the residuals are LV-ViT's scaled ones."""

    def res_attn(self, x, y):
        return x + self.block.drop_path(y) / self.block.skip_lam

    def res_mlp(self, x, y):
        return x + self.block.drop_path(y) / self.block.skip_lam


class LvVitFamily(PatchSequenceFamily):
    name = "tokenpace LV-ViT"
    blocks_use_positions = False  # position embeddings are added at the embedding

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        from ..archs import LvVit

        return isinstance(model, LvVit)

    def make_parts(self, i: int) -> LvVitParts:
        return LvVitParts(self.blocks[i])

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, Frame]:
        return self.model.embed(x), Frame(grid=patch_grid(self.model.patch_embed, tuple(x.shape[-2:])))

    def block(self, i: int, x: torch.Tensor, frame: Frame) -> torch.Tensor:
        return self.blocks[i](x)

    def input_size(self) -> tuple[int, int, int]:
        pe = self.model.patch_embed
        return (pe.in_chans, *pe.img_size)

    def stem_macs(self, img_size) -> int:
        pe = self.model.patch_embed
        return conv_macs(pe, pe.img_size if img_size is None else parse_img_size(img_size))[0]

    def head_macs(self, tokens: int) -> int:
        """The class-token head once, the token-labelling head on every patch token present."""
        return linear_macs(self.model.head) + (tokens - self.num_prefix) * linear_macs(self.model.aux_head)
