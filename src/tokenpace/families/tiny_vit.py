"""timm ``TinyVit`` (``tiny_vit_5m/11m/21m_*``; MobileSAM's image encoder is a modified TinyViT-5M, not this
class): IdleViT on a pyramid whose first stage is convolutional and whose later stages attend within square
windows.

Layout. The convolutional stage (stem, then MBConv blocks) keeps timm's NCHW map; from stage 1 on, whose patch
merging (convolutions, on every token) starts each stage, the tokens travel as (B, H, W, C) maps, the layout timm's
blocks take. The MBConv blocks run on every token (``resamples``: a convolution mixes every position).

Blocks (``TinyVitBlock``). Attention within square windows of the map (zero padding at the bottom and right, as timm
pads the map, before the attention's own LayerNorm, so a padding slot holds the norm's bias), with LeViT's learned
biases per window offset; then a depth-wise convolution + BatchNorm over the whole map (``local_conv``: the map's
own transform, not a residual branch); then a residual MLP with its own norm.

Idling (one selection group per window). The top k slots of each window attend among themselves (padding is never
a key), with the biases gathered at their pairs, and take the attention residual; the local convolution then runs
on the whole map, idle tokens included, as the main-branch norm of SwinV2Cr does: skipping it would leave an idle
token untransformed among transformed neighbours. The MLP residual runs on the selected tokens. An idle token skips
the attention and the MLP, not the convolution.

Scores (no class token). ``"received"`` (default): the mean pre-softmax logit a slot receives from every query of its
window (padding queries included, as timm's window has them), biases included, summed over heads; q and k are
affine in the normed input, so no key is projected. ``"norm"``, ``"random"``: as on Swin.

Sizes: any size that leaves every stage a token (padding fills the windows). ``forward_intermediates``: NCHW stage
maps, as timm's; its ``norm`` flag, which timm's TinyViT ignores, is refused when set.
"""
from __future__ import annotations

import torch
from torch import nn

from ..anatomy import BlockParts, Frame, LinearMap, head_interleaved_rows
from ..blockops import mlp_half
from ..core.macs import BlockShape, BlockWork, conv_macs, linear_macs
from ..core.tokens import gather_rows, scatter_rows
from .base import Family, parse_img_size, recorded_input_size
from .swin import SwinAdapter, SwinParts, _Prep

DEFAULT_IMG_SIZE = 224  # every timm TinyViT is built for 224, 384 or 512; used without a pretrained config


def _timm_classes():
    from timm.models.tiny_vit import (Attention, ConvLayer, MBConv, PatchMerging, TinyVit, TinyVitBlock,
                                      TinyVitStage)

    return TinyVit, (ConvLayer, MBConv), (TinyVitStage, TinyVitBlock, Attention, PatchMerging)


class TinyVitParts(SwinParts):
    """timm ``TinyVitBlock`` + its ``Attention``: the attention's LayerNorm is norm1; q, k and v side by side per
    head in one projection; LeViT's biases per window offset (``attention_biases`` over ``attention_bias_idxs``);
    the MLP holds its own norm (norm2 is the identity); no LayerScale, no attention dropout."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__(block)
        attn = self.attn
        self.key_dim, self.val_dim = attn.key_dim, attn.val_dim

    def dropout(self) -> float:
        return 0.0

    def norm1(self, x):
        return self.attn.norm(x)

    def norm2(self, x):
        return x  # NormMlp norms its input

    def qkv(self, h, where):
        G, n, _ = h.shape
        q, k, v = self.attn.qkv(h).view(G, n, self.num_heads, -1).split([self.key_dim, self.key_dim, self.val_dim],
                                                                         dim=3)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def out(self, o, h):
        return self.attn.proj(o)

    def _rows(self, j: int) -> LinearMap:
        qkv = self.attn.qkv
        rows = head_interleaved_rows(j, self.num_heads, self.key_dim, self.val_dim, qkv.weight.device)
        return LinearMap(qkv.weight[rows], None if qkv.bias is None else qkv.bias[rows])

    def bias_table(self) -> torch.Tensor:
        return self.attn.attention_biases.t()  # (offsets, heads)

    def pair_bias(self, table: torch.Tensor, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None):
        index = self.attn.attention_bias_idxs
        return table[index] if rows is None else table[index[rows, cols]]

    def shape(self) -> BlockShape:
        attn = self.attn
        return BlockShape(dim=attn.qkv.in_features, qk_dim=self.num_heads * self.key_dim, v_dim=attn.out_dim,
                          qkv=linear_macs(attn.qkv), proj=linear_macs(attn.proj), mlp=linear_macs(self.block.mlp))


class ConvBlockParts(BlockParts):
    """An MBConv block: no attention anatomy (it runs on every token, as the model runs it)."""


class TinyVitAdapter(SwinAdapter):
    """timm ``TinyVit``: ``stages[0]`` a ConvLayer of MBConv blocks, then TinyVitStages (patch merging, blocks)."""

    name = "timm TinyVit"
    classes = staticmethod(_timm_classes)
    parts_class = TinyVitParts
    variants = "TinyViT: tiny_vit_5m/11m/21m_224, tiny_vit_21m_384/512"
    stages_attr = "stages"

    def __init__(self, model: nn.Module) -> None:
        _, (ConvLayer, MBConv), (Stage, Block, Attention, PatchMerging) = self.classes()
        stages = list(model.stages)
        for s, stage in enumerate(stages):
            kind = (ConvLayer, MBConv) if s == 0 else (Stage, Block)
            merge_ok = s == 0 or type(stage.downsample) in (PatchMerging, nn.Identity)
            found = [type(stage).__name__] + [f"{type(b).__name__} with {type(getattr(b, 'attn', None)).__name__}"
                                              for b in stage.blocks]
            if type(stage) is not kind[0] or not merge_ok or any(type(b) is not kind[1] for b in stage.blocks) or (
                    s > 0 and any(type(b.attn) is not Attention for b in stage.blocks)):
                raise TypeError(f"stage {s} of this TinyVit is {', '.join(found)}; tokenpace supports timm's "
                                "ConvLayer of MBConv blocks, then TinyVitStages (PatchMerging) of TinyVitBlocks with "
                                f"their Attention ({self.variants})")
        Family.__init__(self, model, [stage.blocks for stage in stages])
        self._layouts = {}

    def make_parts(self, i: int):
        blk = self.blocks[i]
        return ConvBlockParts(blk) if self.resamples(i) else TinyVitParts(blk)

    def resamples(self, i: int) -> bool:
        """The MBConv blocks of the convolutional stage: a convolution mixes every position."""
        return not hasattr(self.blocks[i], "attn")

    # --- forward -------------------------------------------------------------------------------------------------
    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, Frame]:
        x = self.model.patch_embed(x)  # NCHW through the convolutional stage
        return x, Frame(grid=tuple(x.shape[2:]))

    def enter_stage(self, s: int, x: torch.Tensor, frame: Frame, row: str | None = None):
        if s == 0:
            return x, None
        x = x if s == 1 else x.permute(0, 3, 1, 2)  # the convolutional stage's map is NCHW already
        return self.stages[s].downsample(x).permute(0, 2, 3, 1), None  # (B, H, W, C), as timm's blocks take it

    def block(self, i: int, x: torch.Tensor, frame: Frame) -> torch.Tensor:
        return self.blocks[i](x)  # MBConv on NCHW, TinyVitBlock on (B, H, W, C)

    def finish(self, x: torch.Tensor, frame: Frame) -> torch.Tensor:
        return x.permute(0, 3, 1, 2) if len(self.stage_blocks) > 1 else x  # NCHW, as timm's stages give it

    @property
    def checkpointing(self) -> bool:
        return bool(self.model.grad_checkpointing)

    def intermediates(self, maps, final, frame, taken, stopped, options):
        """As timm's TinyViT: each stage's map as NCHW; the map where the run ended."""
        options.only_nchw(self.name)
        if options.norm:
            raise ValueError(f"{self.name} feature maps take no norm (timm's TinyViT applies none); accepted: "
                             "norm=False")
        maps = [y if j == 0 else y.permute(0, 3, 1, 2) for j, y in zip(taken, maps)]
        if options.intermediates_only:
            return maps
        return (final if stopped and max(taken) == 0 else self.finish(final, frame)), maps

    # --- windows -------------------------------------------------------------------------------------------------
    def group_size(self, i: int, x: torch.Tensor) -> int:
        if self.resamples(i):  # an MBConv block's NCHW map: one group of every position (it never idles)
            return x.shape[-2] * x.shape[-1]
        return super().group_size(i, x)

    def window_shift(self, i: int, grid: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
        if self.resamples(i):
            return tuple(grid), (0, 0)
        w = self.blocks[i].window_size
        return (w, w), (0, 0)

    def prepare(self, i: int, x: torch.Tensor, frame: Frame | None = None) -> _Prep:
        B, H, W, C = x.shape
        layout = self._layout(i, H, W, x.device)
        # timm pads the map, then its attention norms every window slot: a padding slot holds the norm's bias
        windows = self.parts(i).norm1(self._to_windows(x, layout))
        return _Prep(x=x, windows=windows, mask=None, layout=layout, table=self.parts(i).bias_table())

    def run_selected(self, i: int, x: torch.Tensor, prep: _Prep, idx: torch.Tensor, keep_qk: bool = False):
        parts, blk = self.parts(i), self.blocks[i]
        B, H, W, C = x.shape
        tokens, rows = self._selected_rows(i, x, prep, idx)
        y = parts.res_attn(gather_rows(tokens, rows), self._selected_attention(i, prep, idx))
        x = scatter_rows(tokens, rows, y)[:, :H * W].reshape(B, H, W, C)
        # the local convolution on every token, as timm runs it; then the MLP residual on the selected ones
        tokens = self._padding_row(blk.local_conv(x.permute(0, 3, 1, 2)).flatten(2).transpose(1, 2).contiguous(), prep)
        tokens = scatter_rows(tokens, rows, mlp_half(parts, gather_rows(tokens, rows)))
        return tokens[:, :H * W].reshape(B, H, W, C), None

    # --- sizes and cost model ------------------------------------------------------------------------------------
    def input_size(self) -> tuple[int, int, int]:
        size = recorded_input_size(self.model) or (DEFAULT_IMG_SIZE, DEFAULT_IMG_SIZE)
        return (self.model.in_chans, *size)

    def _patch_grid(self, img_size: int | tuple[int, int] | None) -> tuple[int, int]:
        size = self.input_size()[1:] if img_size is None else parse_img_size(img_size)
        return conv_macs(self.model.patch_embed, size)[1]

    def size_problem(self, size: tuple[int, int]) -> str | None:
        return None  # any size: windows pad, and each padded stride-2 convolution leaves a token at least

    def _stage_grids(self, img_size: int | tuple[int, int] | None) -> list[tuple[int, int]]:
        grid, grids = self._patch_grid(img_size), []
        for s, stage in enumerate(self.stages):
            if s > 0 and not isinstance(stage.downsample, nn.Identity):
                grid = conv_macs(stage.downsample, grid)[1]
            grids.append(grid)
        return grids

    def count_macs(self, works: list[BlockWork] | None, img_size) -> int:
        """Swin's count, plus each stage's patch merging (convolutions on the previous stage's map)."""
        grids = self._stage_grids(img_size)
        merges = sum(conv_macs(self.stages[s].downsample, grids[s - 1])[0] for s in range(1, len(grids)))
        return super().count_macs(works, img_size) + merges

    def ends_macs(self, img_size) -> int:
        """The stem's convolutions and the head (its linear layers on every token when it has no pool)."""
        size = self.input_size()[1:] if img_size is None else parse_img_size(img_size)
        last = self._stage_grids(img_size)[-1]
        head_tokens = last[0] * last[1] if self.model.head.global_pool.is_identity() else 1
        return conv_macs(self.model.patch_embed, size)[0] + head_tokens * linear_macs(self.model.head)

    def stage_entry_macs(self, s: int, grid: tuple[int, int]) -> int:
        return 0  # counted by count_macs on the merging's input map

    def resampling_macs(self, i: int, grid_in: tuple[int, int], grid_out: tuple[int, int]) -> int:
        return conv_macs(self.blocks[i], grid_out)[0]  # an MBConv keeps its map

    def extra_macs(self, i: int, work: BlockWork, grid: tuple[int, int], dense: bool) -> int:
        return conv_macs(self.blocks[i].local_conv, grid)[0]  # the local convolution, on every token
