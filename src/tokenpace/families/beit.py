"""timm ``Beit``: BEiT and BEiT v2 (``beit_*``, ``beitv2_*``), and custom ``Beit`` models (shared relative-position
bias, absolute position embeddings, LayerScale or not, SwiGLU or scaled MLPs).

The blocks are pre-norm with a learned relative-position bias added to the attention logits: per block, one shared
by all blocks, or both (summed). Over n+1 tokens (the class token first) BEiT's bias has three extra entries besides
the patch-to-patch ones: class-to-patch, patch-to-class and class-to-class. A subset takes the bias rows and columns
of the tokens present; a token without a position (Evo's representative token, EViT's fused token) takes the class
token's entries, the bias BEiT learned for a token outside the grid.
"""
from __future__ import annotations

import torch
from torch import nn

from ..anatomy import Frame
from .base import FIXED_GRID_RESIZE, Family
from .eva import EvaParts
from .patch_embed import patch_grid
from .timm_vit import PatchSequenceFamily, check_blocks


def _timm_classes():
    from timm.models.beit import Attention, Beit, Block

    return Beit, Block, Attention


class BeitParts(EvaParts):
    """timm's BEiT ``Block`` + ``Attention``: EVA's parts without RoPE (fused q/k/v with ``q_bias``, a zero key bias
    and ``v_bias``; LayerScale ``gamma_1``/``gamma_2``), plus the relative-position bias: the block's own table, the
    model's shared one, or their sum (both index the same relative positions)."""

    def __init__(self, block: nn.Module, shared: nn.Module | None) -> None:
        super().__init__(block, 0, has_rope=False, mixed=False)
        self.shared = shared  # the model's RelativePositionBias, or None

    def bias_table(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(table (R, H), index (n+1, n+1) into it) of the block's bias, own and shared summed, or None."""
        own, shared = self.attn, self.shared
        if own.relative_position_bias_table is None:
            return None if shared is None else (shared.relative_position_bias_table, shared.relative_position_index)
        if shared is None:
            return own.relative_position_bias_table, own.relative_position_index
        # one gather of the summed tables: the same values as the model's two gathered biases summed
        return own.relative_position_bias_table + shared.relative_position_bias_table, own.relative_position_index

    @staticmethod
    def _pairs(where, index: torch.Tensor) -> torch.Tensor:
        """The table index (B or 1, n, n) of every token pair at ``where``."""
        if where is None or (where.pos is None and where.prefix == 1 and not where.extra):
            return index.unsqueeze(0)  # every token in order
        rows = where.table_rows(index.shape[0] - 1, 1, 0, index.device)  # position-less: the class token's
        return index[rows.unsqueeze(-1), rows.unsqueeze(-2)]

    def bias(self, where):
        found = self.bias_table()
        if found is None:
            return None
        table, index = found  # a gather of H-wide table rows, not of the (H, n+1, n+1) bias
        return table[self._pairs(where, index)].permute(0, 3, 1, 2)  # (B or 1, H, n, n)

    def mean_bias(self, where):
        found = self.bias_table()
        if found is None:
            return None
        table, index = found
        return table.mean(dim=-1)[self._pairs(where, index)]  # (B or 1, n, n)


class TimmBeit(PatchSequenceFamily):
    name = "timm Beit"
    # the relative-position tables are built for one grid (timm's set_input_size resizes them)
    size_problem = Family.size_problem
    resize_hint = FIXED_GRID_RESIZE

    def __init__(self, model: nn.Module) -> None:
        _, Block, Attention = _timm_classes()
        check_blocks(model, "Beit", lambda blk: type(blk) is Block and type(getattr(blk, "attn", None)) is Attention,
                     "timm's BEiT Block with its Attention")
        super().__init__(model)
        self.blocks_use_positions = model.rel_pos_bias is not None or any(
            blk.attn.relative_position_bias_table is not None for blk in model.blocks)

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        try:
            Beit = _timm_classes()[0]
        except ImportError:
            return False
        return isinstance(model, Beit)

    def make_parts(self, i: int) -> BeitParts:
        return BeitParts(self.blocks[i], self.model.rel_pos_bias)

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, Frame]:
        m = self.model
        grid = patch_grid(m.patch_embed, tuple(x.shape[-2:]))
        x = m.patch_embed(x)
        x = torch.cat((m.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        if m.pos_embed is not None:
            x = x + m.pos_embed
        shared = m.rel_pos_bias() if m.rel_pos_bias is not None else None
        return m.pos_drop(x), Frame(grid=grid, shared_bias=shared)

    def block(self, i: int, x: torch.Tensor, frame: Frame) -> torch.Tensor:
        return self.blocks[i](x, shared_rel_pos_bias=frame.shared_bias)
