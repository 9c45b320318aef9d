"""timm ``Xcit`` (XCiT, "Cross-Covariance Image Transformers": ``xcit_nano`` .. ``xcit_large``, 12 or 24 blocks,
patch 8 or 16, and their distilled weights).

The patch tokens come from a convolutional stem (stride-2 3x3 convolutions with BatchNorm), with Fourier position
features added (a 1x1 convolution of sines and cosines over the grid). The patch blocks see no class token; each
``XCABlock`` has three LayerScale residual branches:

- cross-covariance attention (XCA). Per head, q and k are L2-normalised along the token axis. The d x d softmax of
  their covariance, times a learned temperature, mixes the values' channels. Tokens meet only through that
  normalisation and covariance, so the cost grows linearly with their count.
- local patch interaction (LPI): two 3x3 depth-wise convolutions, with GELU and BatchNorm between them, on the token
  map.
- the MLP.

The class-attention blocks, the final norm and the head then run as the model runs them (``ClassAttentionTail``).

Idling. The top k tokens run the XCA among themselves: their own normalisation and covariance, the same rule as
for CaiT, where the tokens a method runs are the block's input. They take its residual. The LPI then reads the whole
map, idle tokens at their current values, because a convolution needs its neighbours where they are. Only the
selected tokens take the LPI residual and then run the MLP. An idle token skips all three branches; the LPI's
convolutions run on every position, as two 3x3 depth-wise convolutions cost little next to the linear layers.

Scores. XCA forms no token-to-token attention, and the patch blocks have no class token. So neither the class
token's attention nor the attention a token receives exists here. The criterion is the feature norm (``"norm"``),
with ``"random"`` as the control. Idle ranks by it; Evo, EViT and top-k rank by attention and are refused.

Sizes: any. The stem's strided convolutions and the Fourier features follow the input, as in timm's forward.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..anatomy import BlockParts, Frame
from ..blockops import attention_half, mlp_half
from ..core.macs import BlockShape, BlockWork, conv_macs, linear_macs
from ..core.tokens import gather_rows, scatter_rows, sequence_rows
from .base import SequencePrep
from .cait import ClassAttentionTail
from .timm_vit import check_blocks


def _timm_classes():
    from timm.models.cait import ClassAttn
    from timm.models.xcit import LPI, XCA, ClassAttentionBlock, XCABlock, Xcit

    return Xcit, (XCABlock, XCA, LPI), (ClassAttentionBlock, ClassAttn)


class XcitParts(BlockParts):
    """timm ``XCABlock``: norm1 -> XCA -> LayerScale ``gamma1``; the LPI branch (``norm3``, ``local_mp``,
    ``gamma3``), which the family runs on the whole map; norm2 -> MLP -> ``gamma2``."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__(block)
        attn = self.attn = self.hold(block, "attn")
        self.num_heads, self.scale = attn.num_heads, 1.0  # the temperature is XCA's scale

    def dropout(self) -> float:
        return self.attn.attn_drop.p if self.attn.training else 0.0

    def qkv(self, h, where):
        B, n, C = h.shape
        q, k, v = self.attn.qkv(h).reshape(B, n, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        return q, k, v

    def attend(self, q, k, v, bias, row, heads):
        """timm's XCA on q, k, v (B, H, n, d): the softmax over channels of the tokens' cross-covariance. It has no
        token-to-token map, so there is no bias and no score row."""
        if bias is not None or row is not None:
            raise TypeError("XCiT's cross-covariance attention has no token-to-token map: no bias, no score row")
        # timm's layout (B, H, d, n): channels are the attention's 'tokens', tokens its features
        q, k, v = (F.normalize(q.transpose(-2, -1), dim=-1), F.normalize(k.transpose(-2, -1), dim=-1),
                   v.transpose(-2, -1))
        temperature = self.attn.temperature
        if self.fused:  # as timm: no attention dropout on the fused path
            o = F.scaled_dot_product_attention(q * temperature, k, v, scale=1.0)
        else:
            o = F.dropout(((q @ k.transpose(-2, -1)) * temperature).softmax(dim=-1), self.dropout()) @ v
        return o.transpose(-2, -1), None

    def out(self, o, h):
        return self.attn.proj_drop(self.attn.proj(o))

    def res_attn(self, x, y):
        return x + self.block.drop_path1(self.block.gamma1 * y)

    def res_local(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The LPI residual: LayerScale ``gamma3`` and its drop path."""
        return x + self.block.drop_path3(self.block.gamma3 * y)

    def res_mlp(self, x, y):
        return x + self.block.drop_path2(self.block.gamma2 * y)

    def shape(self) -> BlockShape:
        """Per token: q/k/v, the two d x d products of every head (2 C d: linear in the tokens), projection, MLP;
        the LPI's convolutions run on the map and are counted by the family."""
        attn, dim = self.attn, self.attn.qkv.in_features
        return BlockShape(dim=dim, qk_dim=0, v_dim=0, qkv=linear_macs(attn.qkv), proj=linear_macs(attn.proj),
                          mlp=linear_macs(self.block.mlp), linear_attention=2 * dim * dim // self.num_heads)


class TimmXcit(ClassAttentionTail):
    name = "timm Xcit"
    class_blocks = "cls_attn_blocks"
    blocks_use_positions = False  # the Fourier position features are added at the embedding

    def __init__(self, model: nn.Module) -> None:
        _, (Block, Attention, Local), (ClassBlock, ClassAttn) = _timm_classes()
        check_blocks(model, "Xcit", lambda blk: type(blk) is Block and type(getattr(blk, "attn", None)) is Attention,
                     "timm's XCABlock with XCA and LPI (xcit_*)")
        for i, blk in enumerate(model.blocks):
            if type(blk.local_mp) is not Local:
                raise TypeError(f"block {i} of this Xcit has a {type(blk.local_mp).__name__} as its local patch "
                                "interaction (local_mp); tokenpace supports timm's XCABlock with XCA and LPI (xcit_*)")
        for i, blk in enumerate(model.cls_attn_blocks or ()):  # run as timm runs them; counted by head_macs
            if type(blk) is not ClassBlock or type(getattr(blk, "attn", None)) is not ClassAttn:
                raise TypeError(f"class-attention block {i} of this Xcit is {type(blk).__name__}; tokenpace supports "
                                "timm's ClassAttentionBlock with ClassAttn (xcit_*)")
        super().__init__(model)

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        try:
            Xcit = _timm_classes()[0]
        except ImportError:  # timm not installed: nothing of this family can exist
            return False
        return isinstance(model, Xcit)

    def scores(self) -> tuple[str, ...]:
        return ("norm", "random")  # no token attends to another token: only the feature norm ranks them

    def make_parts(self, i: int) -> XcitParts:
        return XcitParts(self.blocks[i])

    # --- the forward around the blocks ---------------------------------------------------------------------------
    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, Frame]:
        m, B = self.model, x.shape[0]
        x, grid = m.patch_embed(x)
        if m.pos_embed is not None:
            x = x + m.pos_embed(B, *grid).reshape(B, -1, x.shape[1]).permute(0, 2, 1)
        return m.pos_drop(x), Frame(grid=tuple(grid))

    def block(self, i: int, x: torch.Tensor, frame: Frame) -> torch.Tensor:
        return self.blocks[i](x, *frame.grid)

    def run_selected(self, i: int, x: torch.Tensor, prep: SequencePrep, idx: torch.Tensor, keep_qk: bool = False):
        """The selected tokens' XCA residual; the LPI over the whole map, its residual on the selected tokens; their
        MLP residual. Every other token passes through unchanged."""
        parts, blk = self.parts(i), self.blocks[i]
        rows = sequence_rows(idx[:, 0], 0, x.shape[1], prep.where.frame.cache)
        y, _, _ = attention_half(parts, gather_rows(x, rows), None, h=gather_rows(prep.h, rows))
        x = scatter_rows(x, rows, y)
        local = blk.local_mp(blk.norm3(x), *prep.where.frame.grid)
        return scatter_rows(x, rows, mlp_half(parts, parts.res_local(y, gather_rows(local, rows)))), None

    # --- sizes and cost ------------------------------------------------------------------------------------------
    def patch_grid_at(self, img_size) -> tuple[int, int]:
        return conv_macs(self.model.patch_embed, self.image_size(img_size))[1]  # the stem's convolutions make it

    def input_size(self) -> tuple[int, int, int]:
        return (self.model.in_chans, *self.model.patch_embed.img_size)

    def size_problem(self, size: tuple[int, int]) -> str | None:
        return None  # any size: the stem's padded stride-2 convolutions leave a token at least

    def stem_macs(self, img_size) -> int:
        """The convolutional stem and the Fourier features' 1x1 convolution (made once per forward)."""
        m = self.model
        stem, grid = conv_macs(m.patch_embed, self.image_size(img_size))
        return stem + (conv_macs(m.pos_embed, grid)[0] if m.pos_embed is not None else 0)

    def count_macs(self, works: list[BlockWork] | None, img_size) -> int:
        """The sequence count, plus every block's LPI convolutions on the whole map."""
        grid = self.patch_grid_at(img_size)
        return super().count_macs(works, img_size) + sum(conv_macs(blk.local_mp, grid)[0] for blk in self.blocks)
