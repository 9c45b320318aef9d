"""timm ``DaVit`` (DaViT, dual attention: ``davit_tiny`` .. ``davit_giant``, and ``davit_base_fl`` /
``davit_huge_fl``, the image encoders of Florence-2): IdleViT on a pyramid whose stages alternate spatial and
channel attention blocks.

Layout. A stride-4 convolutional stem, then four stages; each stage after the first opens with a strided
convolution (``Downsample``) on every token. The tokens travel as (B, H, W, C) maps, as on Swin; timm's blocks take
NCHW, so a dense block is handed the map in that layout.

Blocks. Both kinds open with a convolutional position encoding (``cpe1``: x + a 3x3 depth-wise convolution, the
map's own transform, not a residual branch), take an attention residual, apply a second one (``cpe2``), and end with
a residual MLP:

- ``SpatialBlock``: attention within windows of the map (zero padding at the bottom and right after the norm), with
  no position bias and no shift;
- ``ChannelBlock``: attention across channels over every token of the map. In each group, the d x d softmax of the
  channels' products over the tokens mixes the channels of a third projection (``ChannelAttention``; the Florence-2
  towers' ``ChannelAttentionV2`` scales by the token count). The tokens meet only in those sums, so the cost grows
  linearly with their count.

Idling. The top k slots of each window (spatial blocks), or the top k tokens of the whole map (channel blocks), run
the attention among themselves, with padding never a key: the selected tokens are the block's input. Unlike XCiT's,
whose q and k are L2-normalised over the tokens, the channel logits are plain sums over the tokens present, so they
shrink with k (by about k / N in ``ChannelAttention``; ``ChannelAttentionV2`` divides by sqrt(k), as timm's does at
any input size). The selected tokens take the attention residual. ``cpe2`` then runs on the whole map,
and the selected tokens take the MLP residual. Both position encodings run on every token, idle ones included, as
TinyViT's local convolution does: an idle token skips the attention and the MLP, not the convolutions.

Scores. There is no class token, and the channel blocks form no token-to-token map, so the criterion is the feature
norm (``"norm"``, after ``cpe1``), with ``"random"`` as the control.

Sizes: any size (the stem and the down-sampling pad, the windows pad). ``forward_intermediates``: NCHW stage maps,
the final norm only on the last with ``norm``, as timm's.
"""
from __future__ import annotations

import torch
from torch import nn

from ..anatomy import BlockParts, Frame, PlainResidual
from ..blockops import mlp_half
from ..core.macs import BlockShape, BlockWork, conv_macs, linear_macs
from ..core.tokens import gather_rows, scatter_rows
from .base import Family, recorded_input_size
from .swin import SlotBias, SwinAdapter, SwinParts, _ceil_div, _Prep, _Slots, nchw_stage_outputs

DEFAULT_IMG_SIZE = 224  # every timm DaViT classifier; used without a pretrained config
STEM_STRIDE = 4  # timm's DaViT stem pads the image to a multiple of 4, then convolves with stride 4


def _timm_classes():
    from timm.models.davit import (ChannelAttention, ChannelAttentionV2, ChannelBlock, ConvPosEnc, DaVit, DaVitStage,
                                   Downsample, SpatialBlock, WindowAttention)

    return (DaVit, DaVitStage, Downsample, ConvPosEnc, (SpatialBlock, (WindowAttention,)),
            (ChannelBlock, (ChannelAttention, ChannelAttentionV2)))


class SpatialParts(PlainResidual, SwinParts):
    """timm DaViT's ``SpatialBlock`` + ``WindowAttention``: no position bias and no shift, so the only position term
    masks padding keys; plain residuals; no attention dropout."""

    def dropout(self) -> float:
        return 0.0

    def bias_table(self) -> None:
        return None

    def bias(self, where: _Slots):
        prep, sel = where.prep, where.sel
        if sel is None or prep.layout.padding is None:
            return None
        B, nW, k = sel.shape
        win = torch.arange(nW, device=sel.device).view(1, nW, 1)
        return SlotBias(None, None, None, prep.layout.padding[win, sel].reshape(B * nW, k))  # padding is never a key

    def out(self, o, h):
        return self.attn.proj(o)  # timm's WindowAttention here has no output dropout


class ChannelParts(PlainResidual, BlockParts):
    """timm DaViT's ``ChannelBlock``: attention across channels over the tokens present. ``ChannelAttention``
    weighs the values' channels by the keys (the softmax of k^T v, scaled) and applies the result to the queries,
    as timm's does; ``ChannelAttentionV2`` applies the softmax of q^T k to the values, with q scaled by the token
    count (``dynamic_scale``) or the head width."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__(block)
        attn = self.attn = self.hold(block, "attn")
        self.num_heads = getattr(attn, "num_heads", None) or attn.groups
        self.scale = 1.0  # each variant scales inside attend
        self.v2 = hasattr(attn, "dynamic_scale")

    def qkv(self, h, where):
        G, n, C = h.shape
        return self.attn.qkv(h).reshape(G, n, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)

    def attend(self, q, k, v, bias, row, heads):
        """The channel attention on q, k, v (G, H, n, d) of the n tokens present -> (G, H, n, d)."""
        if row is not None:
            raise TypeError("DaViT's channel attention has no token-to-token map: no score row")
        attn = self.attn
        if self.v2:
            q = q * (q.shape[-2] ** -0.5 if attn.dynamic_scale else attn.head_dim ** -0.5)
            return ((q.transpose(-1, -2) @ k).softmax(dim=-1) @ v.transpose(-1, -2)).transpose(-1, -2), None
        weights = ((k * attn.scale).transpose(-1, -2) @ v).softmax(dim=-1)
        return (weights @ q.transpose(-1, -2)).transpose(-1, -2), None

    def out(self, o, h):
        return self.attn.proj(o)

    def shape(self) -> BlockShape:
        """Per token: q/k/v, the two d x d products of every head (2 C d), projection, MLP."""
        attn, dim = self.attn, self.attn.qkv.in_features
        return BlockShape(dim=dim, qk_dim=0, v_dim=0, qkv=linear_macs(attn.qkv), proj=linear_macs(attn.proj),
                          mlp=linear_macs(self.block.mlp), linear_attention=2 * dim * dim // self.num_heads)


class DaVitAdapter(SwinAdapter):
    """timm ``DaVit``: ``stem``, then ``stages`` (``Downsample`` or none, then pairs of a spatial and a channel
    block)."""

    name = "timm DaVit"
    classes = staticmethod(_timm_classes)
    variants = "DaViT: davit_tiny..davit_giant, Florence-2's davit_base_fl and davit_huge_fl"
    stages_attr = "stages"

    def __init__(self, model: nn.Module) -> None:
        _, Stage, Downsample, PosEnc, (Spatial, spatial_attn), (Channel, channel_attn) = self.classes()
        stages = []
        for s, stage in enumerate(model.stages):
            if type(stage) is not Stage or type(stage.downsample) not in (Downsample, nn.Identity):
                raise TypeError(f"stage {s} of this DaVit is {type(stage).__name__} with "
                                f"{type(getattr(stage, 'downsample', None)).__name__}; tokenpace supports timm's "
                                f"DaVitStage with Downsample or none ({self.variants})")
            kernel = getattr(stage.downsample, "conv", None)
            if kernel is not None and kernel.kernel_size[0] % 2 == 0 and kernel.kernel_size[0] != 2:
                raise TypeError(f"stage {s} of this DaVit down-samples with a {kernel.kernel_size[0]}x"
                                f"{kernel.kernel_size[0]} kernel; tokenpace supports down_kernel_size 2 or an odd one "
                                f"(the maps it counts halve, rounding up) ({self.variants})")
            if any(not isinstance(pair, nn.Sequential) for pair in stage.blocks):
                raise TypeError(f"stage {s} of this DaVit does not hold its blocks in pairs (nn.Sequential); "
                                f"tokenpace supports timm's DaVitStage ({self.variants})")
            blocks = [blk for pair in stage.blocks for blk in pair]
            for blk in blocks:
                kind = {Spatial: spatial_attn, Channel: channel_attn}.get(type(blk))
                if (kind is None or type(blk.attn) not in kind or blk.mlp is None
                        or any(type(c) is not PosEnc for c in (blk.cpe1, blk.cpe2))):
                    what = f"{type(blk).__name__} with {type(getattr(blk, 'attn', None)).__name__}"
                    what += "" if getattr(blk, "mlp", None) is not None else " and no MLP"
                    raise TypeError(f"a block of stage {s} of this DaVit is {what}; tokenpace supports timm's "
                                    "SpatialBlock with WindowAttention and ChannelBlock with ChannelAttention or "
                                    f"ChannelAttentionV2, each with its MLP (ffn=True) ({self.variants})")
            stages.append(blocks)
        Family.__init__(self, model, stages)
        self._layouts = {}

    def make_parts(self, i: int) -> BlockParts:
        return ChannelParts(self.blocks[i]) if self._channel(i) else SpatialParts(self.blocks[i])

    def _channel(self, i: int) -> bool:
        return type(self.blocks[i]).__name__ == "ChannelBlock"

    def scores(self) -> tuple[str, ...]:
        return ("norm", "random")  # channel blocks form no token-to-token map: the feature norm ranks every block

    # --- forward -------------------------------------------------------------------------------------------------
    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, Frame]:
        x = self.model.stem(x).permute(0, 2, 3, 1)  # (B, H, W, C) between blocks
        return x, Frame(grid=tuple(x.shape[1:3]))

    def enter_stage(self, s: int, x: torch.Tensor, frame: Frame, row: str | None = None):
        return self.stages[s].downsample(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1), None

    def block(self, i: int, x: torch.Tensor, frame: Frame) -> torch.Tensor:
        return self.blocks[i](x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)  # an NCHW block, as timm runs it

    def finish(self, x: torch.Tensor, frame: Frame) -> torch.Tensor:
        return self.model.norm_pre(x.permute(0, 3, 1, 2))  # NCHW, as timm's forward_features gives it

    @property
    def checkpointing(self) -> bool:
        return bool(self.model.grad_checkpointing) or any(stage.grad_checkpointing for stage in self.stages)

    def intermediates(self, maps, final, frame, taken, stopped, options):
        """As timm's DaViT: each stage's map as NCHW, the final norm on the last stage's with ``norm``; the final
        map normed where the run reached the last stage."""
        return nchw_stage_outputs(self.name, self.model.norm_pre, len(self.stage_blocks) - 1, maps, final, taken,
                                  stopped, options)

    # --- selection groups: windows (spatial blocks), the whole map (channel blocks) -------------------------------
    def window_shift(self, i: int, grid: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
        if self._channel(i):
            return tuple(grid), (0, 0)
        return tuple(self.blocks[i].window_size), (0, 0)

    def prepare(self, i: int, x: torch.Tensor, frame: Frame | None = None) -> _Prep:
        """The map after ``cpe1`` (every token's, the residual's base and what ``norm`` ranks), and its norm1 output
        in windows, padded after the norm as timm pads it."""
        B, H, W, C = x.shape
        blk, layout = self.blocks[i], self._layout(i, H, W, x.device)
        x = blk.cpe1(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return _Prep(x=x, windows=self._to_windows(blk.norm1(x), layout), mask=None, layout=layout, table=None)

    def run_selected(self, i: int, x: torch.Tensor, prep: _Prep, idx: torch.Tensor, keep_qk: bool = False):
        parts, blk = self.parts(i), self.blocks[i]
        B, H, W, C = x.shape
        tokens, rows = self._selected_rows(i, prep.x, prep, idx)
        y = parts.res_attn(gather_rows(tokens, rows), self._selected_attention(i, prep, idx))
        x = scatter_rows(tokens, rows, y)[:, :H * W].reshape(B, H, W, C)
        # cpe2 on every token, as timm runs it; then the MLP residual on the selected ones
        tokens = self._padding_row(blk.cpe2(x.permute(0, 3, 1, 2)).flatten(2).transpose(1, 2), prep)
        tokens = scatter_rows(tokens, rows, mlp_half(parts, gather_rows(tokens, rows)))
        return tokens[:, :H * W].reshape(B, H, W, C), None

    # --- sizes and cost model ------------------------------------------------------------------------------------
    def input_size(self) -> tuple[int, int, int]:
        return (self.model.in_chans, *(recorded_input_size(self.model) or (DEFAULT_IMG_SIZE, DEFAULT_IMG_SIZE)))

    def _patch_grid(self, img_size) -> tuple[int, int]:
        H, W = self.image_size(img_size)
        return _ceil_div(H, STEM_STRIDE), _ceil_div(W, STEM_STRIDE)

    def size_problem(self, size: tuple[int, int]) -> str | None:
        return None  # any size: the stem, the down-sampling and the windows pad

    def ends_macs(self, img_size) -> int:
        """The stem's convolution (on the image padded to a multiple of 4) and the head (on every position without
        a pool)."""
        rows, cols = self._patch_grid(img_size)
        last = self._stage_grids(img_size)[-1]
        head_tokens = last[0] * last[1] if self.model.head.global_pool.is_identity() else 1
        return self.model.stem.conv.weight.numel() * rows * cols + head_tokens * linear_macs(self.model.head)

    def stage_entry_macs(self, s: int, grid: tuple[int, int]) -> int:
        """Stage s's strided convolution, one kernel application per output token."""
        downsample = self.stages[s].downsample
        return 0 if isinstance(downsample, nn.Identity) else downsample.conv.weight.numel() * grid[0] * grid[1]

    def extra_macs(self, i: int, work: BlockWork, grid: tuple[int, int], dense: bool) -> int:
        """Both position encodings' depth-wise convolutions, on every token."""
        blk = self.blocks[i]
        return conv_macs(blk.cpe1, grid)[0] + conv_macs(blk.cpe2, grid)[0]
