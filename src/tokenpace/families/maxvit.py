"""timm ``MaxxVit``: MaxViT and MaxxViT (``maxvit_*``, ``maxxvit_*``, ``maxxvitv2_*``: IdleViT on block (window) and
grid attention) and CoAtNet (``coatnet_*``, ``coatnext_*``: IdleViT on attention over the whole map).

Layout. Each timm ``MaxxVitBlock`` is three blocks of the family: its convolution block (MBConv, or ConvNeXt's in
MaxxViT, on the NCHW map; the first of a stage strides), then two ``PartitionAttentionCl`` blocks on the
(B, H, W, C) map, one attending within square windows of neighbours ("block" partition), one within a sparse grid of
tokens spread over the whole map ("grid" partition: slot (a, b) of group (r, c) is token
(a * H / g + r, b * W / g + c)). The tokens travel as
(B, H, W, C) maps; the convolution blocks run on every token (``resamples``: a convolution mixes every position).
MaxxViT-V2 has no window attention: a grid block follows each convolution block.

Idling (one selection group per window or grid group). The top k slots of each group attend among themselves, with
the relative-position bias (``RelPosBias``, ``RelPosBiasTf`` or ``RelPosMlp``, made once per block call over every
slot pair) gathered at their pairs, then run the MLP; the others pass through unchanged. MaxViT's partitions never
pad (timm requires every stage map to be a multiple of the window and grid sizes), so every slot is a token.

CoAtNet's stages hold stand-alone blocks instead: convolution blocks (MBConv, ConvNeXt's), which run on every token,
and ``TransformerBlock2d`` (NCHW: norms over channels, 1x1-convolution projections, a convolutional MLP), whose
attention spans the whole map with a relative-position bias over every token pair. The first transformer block of
a stage pools its input and shortcut (stride 2) and runs on every token; the others idle with one selection group,
the map, their layers run on token sets through the (B, C, n, 1) maps the sets form (``levit.on_token_map``). With
BatchNorm norms (``coatnet_bn_*``) in training, the MLP's norm normalises over the tokens it runs on, as LeViT's
blocks do.

Scores (no class token). ``"received"`` (default): the mean pre-softmax logit a slot receives from every query of its
group, bias included, summed over heads; q and k are affine in the normed input, so no key is projected. ``"norm"``,
``"random"``: as on Swin.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..anatomy import Frame, LinearMap, head_interleaved_rows
from ..core.macs import BlockShape, linear_macs
from .base import EMBEDDING, Family, IntermediateOptions, parse_img_size
from .levit import on_token_map
from .swin import PairTable, SwinAdapter, SwinParts, _ceil_div, _Prep, nchw_stage_outputs
from .tiny_vit import ConvBlockParts


def _timm_classes():
    from timm.models.maxxvit import (Attention2d, AttentionCl, ConvNeXtBlock, MaxxVit, MaxxVitBlock, MaxxVitStage,
                                     MbConvBlock, PartitionAttentionCl, TransformerBlock2d)

    return (MaxxVit, MaxxVitStage, MaxxVitBlock, (MbConvBlock, ConvNeXtBlock), PartitionAttentionCl, AttentionCl,
            TransformerBlock2d, Attention2d)


MAXVIT_PARTS = ("conv", "attn_block", "attn_grid")  # a MaxxVitBlock's three blocks of the family, in order


def _table_macs(rel_pos: nn.Module | None) -> int:
    """Making a relative-position bias once per block call: RelPosMlp's MLP over its offsets; RelPosBiasTf's two
    einsums over one-hot lookups (rows, then columns); RelPosBias's table lookup costs none."""
    if rel_pos is None:
        return 0
    if hasattr(rel_pos, "rel_coords_log"):  # RelPosMlp
        coords = rel_pos.rel_coords_log
        return coords.numel() // coords.shape[-1] * linear_macs(rel_pos.mlp)
    if hasattr(rel_pos, "height_lookup"):  # RelPosBiasTf
        heads, rows, cols = rel_pos.bias_shape
        wh, ww = rel_pos.window_size
        return heads * wh * wh * cols * rows + heads * wh * wh * ww * ww * cols
    return 0


def _out_side(module: nn.Module, side: int, axis: int) -> int:
    """One side of the map a strided convolution or pooling gives: timm's 'same' variants (``Conv2dSame``,
    ``AvgPool2dSame``, ``MaxPool2dSame``) pad to ceil(side / stride); the others follow their own padding."""
    pair = lambda v: v if isinstance(v, (tuple, list)) else (v, v)  # noqa: E731
    stride, kernel = pair(module.stride)[axis], pair(module.kernel_size)[axis]
    if type(module).__name__.endswith("Same"):
        return _ceil_div(side, stride)
    padding, dilation = pair(module.padding)[axis], pair(getattr(module, "dilation", 1))[axis]
    span = side + 2 * padding - dilation * (kernel - 1) - 1
    # ceil_mode without PyTorch's correction for a last window starting in the padding: no timm block here sets it
    return (_ceil_div(span, stride) if getattr(module, "ceil_mode", False) else span // stride) + 1


def _strided(modules) -> nn.Module | None:
    """The first convolution or pooling with stride 2 among ``modules`` (in order, their children included)."""
    return next((m for module in modules for m in module.modules()
                 if isinstance(m, (nn.Conv2d, nn.AvgPool2d, nn.MaxPool2d))
                 and 2 in (m.stride if isinstance(m.stride, tuple) else (m.stride,))), None)


class MaxVitParts(PairTable, SwinParts):
    """timm ``PartitionAttentionCl`` + ``AttentionCl``: pre-norm, q/k/v side by side per head (``head_first``, the
    default) or q, k and v blocks, a relative-position module whose ``get_bias()`` is the (heads, n, n) bias over
    every slot pair, or none; LayerScale where configured."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__(block)
        attn = self.attn
        self.head_first, self.head_dim = attn.head_first, attn.dim_head

    def _projected(self, h: torch.Tensor) -> torch.Tensor:
        return self.attn.qkv(h)

    def qkv(self, h, where):
        G, n, _ = h.shape
        t = self._projected(h)
        if self.head_first:
            return t.view(G, n, self.num_heads, 3 * self.head_dim).transpose(1, 2).chunk(3, dim=3)
        return t.reshape(G, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)

    def _rows(self, j: int) -> LinearMap:
        qkv = self.attn.qkv
        weight = qkv.weight.flatten(1)  # a Linear's, or a 1x1 convolution's (CoAtNet)
        if self.head_first:
            rows = head_interleaved_rows(j, self.num_heads, self.head_dim, self.head_dim, weight.device)
        else:
            rows = slice(j * self.width, (j + 1) * self.width)
        return LinearMap(weight[rows], None if qkv.bias is None else qkv.bias[rows])

    def bias_table(self) -> torch.Tensor | None:
        rel_pos = self.attn.rel_pos
        if rel_pos is None:
            return None
        bias = rel_pos.get_bias()  # (1, heads, n, n), or (heads, n, n) from RelPosBiasTf's einsum lookup
        return bias[0] if bias.dim() == 4 else bias

    def table_macs(self) -> int:
        return _table_macs(self.attn.rel_pos)

    def bias(self, where):
        return None if where.prep.table is None else super().bias(where)


class CoatParts(MaxVitParts):
    """timm ``TransformerBlock2d`` + ``Attention2d`` (CoAtNet, NCHW) without its stride: norms over channels
    (LayerNorm2d or BatchNorm2d), a convolutional MLP and LayerScale2d, run on a token set as on the (B, C, n, 1) map
    it forms; the q/k/v and output projections (1x1 convolutions) as linear maps of their weights."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__(block)
        self.require_plain_linear(self.attn, "proj", f"attn.proj of a {type(block).__name__}")  # read as weights

    @staticmethod
    def _on_tokens(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """An NCHW module on tokens (B, n, C) or a (B, H, W, C) map, as on the NCHW map they form."""
        return on_token_map(module, x.reshape(x.shape[0], -1, x.shape[-1])).reshape(x.shape[:-1] + (-1,))

    def norm1(self, x):
        return self._on_tokens(self.block.norm1, x)

    def norm2(self, x):
        return self._on_tokens(self.block.norm2, x)

    def _projected(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h, self.attn.qkv.weight.flatten(1), self.attn.qkv.bias)

    def out(self, o, h):
        proj = self.attn.proj
        return self.attn.proj_drop(F.linear(o, proj.weight.flatten(1), proj.bias))

    def mlp(self, h, where=None):
        return self._on_tokens(self.block.mlp, h)

    def res_attn(self, x, y):
        return x + self.block.drop_path1(self._on_tokens(self.block.ls1, y))

    def res_mlp(self, x, y):
        return x + self.block.drop_path2(self._on_tokens(self.block.ls2, y))

    def shape(self) -> BlockShape:
        attn = self.attn
        return BlockShape(dim=attn.qkv.in_channels, qk_dim=self.width, v_dim=self.width, qkv=linear_macs(attn.qkv),
                          proj=linear_macs(attn.proj), mlp=linear_macs(self.block.mlp))


class MaxVitAdapter(SwinAdapter):
    """timm ``MaxxVit`` whose stages hold ``MaxxVitBlock``s: a convolution block and channels-last partition
    attention."""

    name = "timm MaxxVit"
    classes = staticmethod(_timm_classes)
    parts_class = MaxVitParts
    variants = ("MaxViT, MaxxViT and CoAtNet: maxvit_*, maxxvit_*, maxxvitv2_*, coatnet_*, coatnext_*; not the "
                "experimental parallel block of maxvit_tiny_pm_256")
    stages_attr = "stages"

    def __init__(self, model: nn.Module) -> None:
        _, Stage, Block, convs, Partition, Attention, Transformer, Attention2d = self.classes()
        stages, held = [], []
        for s, stage in enumerate(model.stages):
            if type(stage) is not Stage:
                raise TypeError(f"stage {s} of this MaxxVit is {type(stage).__name__}; tokenpace supports timm's "
                                f"MaxxVitStage ({self.variants})")
            family_blocks = []
            for j, blk in enumerate(stage.blocks):
                held.append((stage.blocks._modules, str(j), blk, f"stage {s} block {j} ({type(blk).__name__})"))
                if type(blk) in convs or (type(blk) is Transformer and type(blk.attn) is Attention2d):
                    family_blocks.append(blk)  # CoAtNet's stand-alone blocks
                    continue
                parts = [getattr(blk, name, None) for name in MAXVIT_PARTS]
                if (type(blk) is not Block or type(parts[0]) not in convs or blk.nchw_attn
                        or any(p is not None and (type(p) is not Partition or type(p.attn) is not Attention)
                               for p in parts[1:])):
                    raise TypeError(f"block {j} of stage {s} of this MaxxVit is {type(blk).__name__}"
                                    f"{self._describe(blk)}; tokenpace supports timm's MaxxVitBlock of an MbConvBlock "
                                    "or ConvNeXtBlock and channels-last PartitionAttentionCl with AttentionCl, and "
                                    "CoAtNet's MbConvBlock, ConvNeXtBlock and TransformerBlock2d with Attention2d "
                                    f"({self.variants})")
                family_blocks += [p for p in parts if p is not None]
                held += [(blk._modules, name, p, f"stage {s} block {j}'s {name}")
                         for name, p in zip(MAXVIT_PARTS, parts) if p is not None]
            stages.append(family_blocks)
        Family.__init__(self, model, stages)
        self._held += held
        self._layouts = {}

    @staticmethod
    def _describe(blk: nn.Module) -> str:
        inner = [f"{name} {type(getattr(blk, name)).__name__}" for name in MAXVIT_PARTS
                 if getattr(blk, name, None) is not None]
        if getattr(blk, "nchw_attn", False):
            inner.append("NCHW attention")
        return f" ({', '.join(inner)})" if inner else ""

    def make_parts(self, i: int):
        blk = self.blocks[i]
        if self.resamples(i):
            return ConvBlockParts(blk)
        return MaxVitParts(blk) if self._partitioned(i) else CoatParts(blk)

    def resamples(self, i: int) -> bool:
        """The convolution blocks (a convolution mixes every position; the first of each stage also strides) and
        CoAtNet's strided transformer blocks (they pool their input and shortcut)."""
        blk = self.blocks[i]
        return not hasattr(blk, "attn") or not isinstance(getattr(blk, "shortcut", nn.Identity()), nn.Identity)

    def _partitioned(self, i: int) -> bool:
        """Block i attends within windows or grid groups on the (B, H, W, C) map (MaxViT), not over the NCHW map."""
        return hasattr(self.blocks[i], "partition_block")

    # --- forward -------------------------------------------------------------------------------------------------
    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, Frame]:
        x = self.model.stem(x).permute(0, 2, 3, 1)  # (B, H, W, C), as timm's partition attention takes it
        return x, Frame(grid=tuple(x.shape[1:3]))

    def enter_stage(self, s: int, x: torch.Tensor, frame: Frame, row: str | None = None):
        return x, None  # a stage's first MBConv strides

    def block(self, i: int, x: torch.Tensor, frame: Frame) -> torch.Tensor:
        if self._partitioned(i):
            return self.blocks[i](x)
        return self.blocks[i](x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)  # an NCHW block, as timm runs it

    def finish(self, x: torch.Tensor, frame: Frame) -> torch.Tensor:
        return self.model.norm(x.permute(0, 3, 1, 2))

    def feature_points(self) -> list[int]:
        """timm's MaxxVit counts the stem's output as feature 0, then each stage's."""
        return [EMBEDDING] + super().feature_points()

    def intermediates(self, maps, final, frame, taken, stopped, options: IntermediateOptions):
        """As timm's MaxxVit: the stem's and each stage's map as NCHW, the final norm on the last stage's with
        ``norm``; the final map normed when the run reached the last stage."""
        return nchw_stage_outputs(self.name, self.model.norm, len(self.stage_blocks), maps, final, taken, stopped,
                                  options)

    # --- windows and grids ---------------------------------------------------------------------------------------
    def window_shift(self, i: int, grid: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
        """MaxViT's window or grid size; the whole map elsewhere (CoAtNet's attention, a convolution block)."""
        if self._partitioned(i):
            return tuple(self.blocks[i].partition_size), (0, 0)
        return tuple(grid), (0, 0)

    def grid_partitioned(self, i: int) -> bool:
        return self._partitioned(i) and not self.blocks[i].partition_block

    def prepare(self, i: int, x: torch.Tensor, frame: Frame | None = None) -> _Prep:
        B, H, W, C = x.shape
        parts, layout = self.parts(i), self._layout(i, H, W, x.device)
        table = parts.bias_table()
        slots = layout.window[0] * layout.window[1]
        if table is not None and table.shape[-1] != slots:  # timm's block fails there; gathering would not
            raise ValueError(f"block {i} attends over {layout.window[0]}x{layout.window[1]} tokens, and its "
                             f"relative-position bias is built for {table.shape[-1]}: build the model for this input "
                             "size (img_size=N, or model.set_input_size(img_size=N))")
        return _Prep(x=x, windows=self._to_windows(parts.norm1(x), layout), mask=None, layout=layout, table=table)

    # --- sizes and cost model ------------------------------------------------------------------------------------
    def input_size(self) -> tuple[int, int, int]:
        return (self.model.in_chans, *self.model.img_size)

    def _patch_grid(self, img_size: int | tuple[int, int] | None) -> tuple[int, int]:
        """The stem's map: its first convolution halves the sides."""
        H, W = self.input_size()[1:] if img_size is None else parse_img_size(img_size)
        conv = self.model.stem.conv1
        return _out_side(conv, H, 0), _out_side(conv, W, 1)

    def _strides(self, img_size) -> list[tuple[tuple[int, int], tuple[int, int] | None]]:
        """Per stage, the map its first block's main path gives, and the map its shortcut gives (None: no pooling
        shortcut); the two differ where a side is odd and only one of them rounds up."""
        grid, out = self._patch_grid(img_size), []
        for blocks in self.stage_blocks:
            conv = self.blocks[blocks.start]
            main = _strided(c for name, c in conv.named_children() if name != "shortcut")
            short = _strided([conv.shortcut])
            sides = [tuple(_out_side(m, grid[a], a) for a in (0, 1)) if m is not None else None for m in (main, short)]
            grid = sides[0] or grid
            out.append((grid, sides[1]))
        return out

    def _stage_grids(self, img_size: int | tuple[int, int] | None) -> list[tuple[int, int]]:
        return [grid for grid, _ in self._strides(img_size)]

    def size_problem(self, size: tuple[int, int]) -> str | None:
        """timm partitions without padding: every stage's map must be a multiple of its window and grid sizes; and
        a stage's strided block fails where its convolution and its shortcut's pooling round an odd side apart."""
        stem = self._patch_grid(size)
        for s, (grid, short) in enumerate(self._strides(size)):
            if short is not None and short != grid:
                before = stem if s == 0 else self._stage_grids(size)[s - 1]
                return (f"stage {s}'s first block halves the {before[0]}x{before[1]} map to {grid[0]}x{grid[1]} and "
                        f"its shortcut pools it to {short[0]}x{short[1]} (timm's forward fails on odd sides here); "
                        "choose a size whose maps stay even")
        grids = [grid for grid, _ in self._strides(size)]
        maps = ", ".join(f"{h}x{w}" for h, w in grids)
        for s, blocks in enumerate(self.stage_blocks):
            (H, W) = grids[s]
            for i in blocks:
                blk = self.blocks[i]
                if self._partitioned(i):
                    window = tuple(blk.partition_size)
                    if H % window[0] or W % window[1]:
                        kind = "window" if blk.partition_block else "grid"
                        return (f"stage {s}'s {H}x{W} map is not a multiple of its {window[0]}x{window[1]} {kind} "
                                f"(timm partitions without padding; stage maps at this input: {maps}; "
                                "model.set_input_size(img_size=N) sets partitions for another size)")
                elif getattr(getattr(blk, "attn", None), "rel_pos", None) is not None:
                    table = tuple(blk.attn.rel_pos.window_size)
                    if table != (H, W):
                        return (f"stage {s}'s {H}x{W} map is not the {table[0]}x{table[1]} map its relative-position "
                                f"bias is built for (attention over the whole map; stage maps at this input: {maps}; "
                                "build the model with img_size=N, or call model.set_input_size(img_size=N))")
        return None

    def ends_macs(self, img_size) -> int:
        """The stem's two convolutions on its map and the head (its linear layers on every token when it has no
        pool)."""
        rows, cols = self._patch_grid(img_size)
        stem = sum(m.weight.numel() for m in self.model.stem.modules() if isinstance(m, nn.Conv2d)) * rows * cols
        last = self._stage_grids(img_size)[-1]
        head_tokens = last[0] * last[1] if self.model.head.global_pool.is_identity() else 1
        return stem + head_tokens * linear_macs(self.model.head)

    def stage_entry_macs(self, s: int, grid: tuple[int, int]) -> int:
        return 0  # the stride is in the stage's first convolution block, counted as resampling

    def resampling_macs(self, i: int, grid_in: tuple[int, int], grid_out: tuple[int, int]) -> int:
        """A convolution block (MBConv, ConvNeXt) or CoAtNet's strided transformer block: each convolution's weights
        and each linear layer's once per output position (a squeeze-excitation's on the pooled 1x1 map), MBConv's
        expansion on the input map unless the block strides before it; the transformer block's attention over the
        pooled map and its bias."""
        blk = self.blocks[i]
        pooled = {id(m) for name in ("se", "se_early") if getattr(blk, name, None) is not None
                  for m in getattr(blk, name).modules()}
        expansion = getattr(blk, "conv1_1x1", None)  # MBConv's
        on_input = expansion is not None and expansion.stride == (1, 1) and isinstance(blk.down, nn.Identity)
        attn = getattr(blk, "attn", None)
        table = set() if attn is None or attn.rel_pos is None else {id(m) for m in attn.rel_pos.modules()}
        total = 0
        if attn is not None:
            n = grid_out[0] * grid_out[1]
            total += 2 * n * n * (attn.qkv.out_channels // 3) + _table_macs(attn.rel_pos)
        for m in blk.modules():
            if not isinstance(m, (nn.Conv2d, nn.Linear)) or id(m) in table:
                continue
            if id(m) in pooled:
                positions = 1
            elif m is expansion and on_input:
                positions = grid_in[0] * grid_in[1]
            else:
                positions = grid_out[0] * grid_out[1]
            total += m.weight.numel() * positions
        return total
