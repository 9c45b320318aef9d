"""timm ``SwinTransformer`` (Swin v1), ``SwinTransformerV2`` and ``SwinTransformerV2Cr`` families: IdleViT on a
pyramid ViT with shifted-window attention. SwinV2's blocks are post-norm with cosine attention (a learned per-head
logit scale) and a continuous position bias (16 sigmoid of a small MLP over log-spaced offsets); its anatomy says so
(``SwinV2Parts``) and the windows, padding, masks and idling below are the same. SwinV2Cr (``swinv2_cr_*``, another
implementation of SwinV2) differs in its bias (an MLP over every slot pair's log-spaced offset), its NCHW stages and a
main-branch norm some blocks end with (``SwinV2CrParts``, ``SwinV2CrAdapter``).

Layout. Between blocks the tokens travel as timm's (B, H, W, C) map. Blocks are numbered across stages; stage s's
entry runs its patch merging (or nothing) on the full map, so idle tokens merge with the others as usual.

Idling (one selection group per attention window). An idling block does what timm's block does up to the windows
(norm1, cyclic shift, zero padding, window partition), then keeps a fixed number k of tokens in each of the nW
windows of n tokens, windows as a batch:

- attention among the k selected tokens of each window only, with the relative-position bias and the
  shifted-window mask taken at [selected, selected];
- proj, attention residual, norm2 + MLP and MLP residual on the selected tokens only, then written back to their
  places in the map. Every other token is passed through bit-identical.

Padding (a map not divisible by the window) is never a key: timm lets zero padding act as keys and values, but here
padding counts as permanently idle. It ranks last; when a window has fewer than k real tokens the padding slots
still fill its k places (fixed shapes), are masked out as keys, and their outputs are dropped (trace shows them as
-1).

Scores (no class token). ``"received"`` (default): the mean pre-softmax logit a token receives from all queries of
its window (padding queries included, as in timm's window), summed over heads, with the bias and mask terms; by
linearity it needs no key projection on Swin v1 (``scoring.query_logits``); SwinV2's cosine attention projects every
query and key, and the block reuses the selected ones. ``"norm"``: the L2 norm of the token's input feature (before
norm1). ``"random"``: the control (uniform over the window's n slots, padding too).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..anatomy import BlockParts, Frame, LinearMap, PostNorm, fused_qkv_bias, qkv_rows
from ..blockops import attention_branch, mlp_half
from ..core.decomposed_bias import pair_bias as decomposed_pair_bias
from ..core.macs import BlockShape, BlockWork, linear_macs
from ..core.tokens import flat_rows, gather_heads, gather_rows, gather_tokens, scatter_rows
from ..scoring import bias_row, block_reuses_keys, block_reuses_queries, query_logits, token_norms
from .base import GROUPED, Family, GroupCount, built_for_only, parse_img_size
from .patch_embed import patch_embed_size_problem, patch_grid

PAD_LOGIT = -1e4  # masks padding keys: exp underflows to exactly 0 next to real keys, and fits fp16/bf16


def _timm_classes():
    from timm.models.swin_transformer import (PatchMerging, SwinTransformer, SwinTransformerBlock,
                                              SwinTransformerStage, WindowAttention)

    return SwinTransformer, SwinTransformerStage, SwinTransformerBlock, WindowAttention, PatchMerging


def _timm_v2_classes():
    from timm.models.swin_transformer_v2 import (PatchMerging, SwinTransformerV2, SwinTransformerV2Block,
                                                 SwinTransformerV2Stage, WindowAttention)

    return SwinTransformerV2, SwinTransformerV2Stage, SwinTransformerV2Block, WindowAttention, PatchMerging


def _timm_v2_cr_classes():
    from timm.models.swin_transformer_v2_cr import (PatchMerging, SwinTransformerV2Cr, SwinTransformerV2CrBlock,
                                                    SwinTransformerV2CrStage, WindowMultiHeadAttention)

    return (SwinTransformerV2Cr, SwinTransformerV2CrStage, SwinTransformerV2CrBlock, WindowMultiHeadAttention,
            PatchMerging)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _partition(t: torch.Tensor, window: tuple[int, int]) -> torch.Tensor:
    """(B, H, W, D) with H, W multiples of the window -> (B*nW, wh*ww, D), windows in raster order per image."""
    B, H, W, D = t.shape
    wh, ww = window
    return t.reshape(B, H // wh, wh, W // ww, ww, D).transpose(2, 3).reshape(-1, wh * ww, D)


def _grid_partition(t: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, H, W, D) with H, W multiples of the grid -> (B * groups, gh * gw, D): timm MaxViT's grid partition, where
    slot (a, b) of group (r, c) is the token (a * H / gh + r, b * W / gw + c); groups in raster order per image."""
    B, H, W, D = t.shape
    gh, gw = grid
    return t.reshape(B, gh, H // gh, gw, W // gw, D).permute(0, 2, 4, 1, 3, 5).reshape(-1, gh * gw, D)


def _layer_scale(blk: nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
    """``blk.<name>(x)`` when the block has a layer scale (timm's Swin v1 blocks have none today), else x."""
    ls = getattr(blk, name, None)
    return x if ls is None else ls(x)


@dataclass(frozen=True)
class _Layout:
    """Where the window slots of one block sit in its (H, W) map."""

    window: tuple[int, int]
    shift: tuple[int, int]
    pad: tuple[int, int]  # rows and columns of zero padding at the bottom and right
    num_windows: int
    positions: torch.Tensor  # (nW, n) raster position in the unshifted map of every window slot; -1 for padding
    padding: torch.Tensor | None  # (nW, n) True on padding slots; None when there is no padding
    grid: bool = False  # a group gathers tokens spread over the map (MaxViT's grid partition), not a window

    def partition(self, t: torch.Tensor) -> torch.Tensor:
        """(B, H, W, D), shifted and padded -> (B*nW, n, D): this layout's windows or grid groups."""
        return (_grid_partition if self.grid else _partition)(t, self.window)


@dataclass
class _Prep:
    """One idling block's shared state: its input map, norm1 output in windows, shift mask, layout and bias table."""

    x: torch.Tensor  # (B, H, W, C) block input
    windows: torch.Tensor  # (B*nW, n, C) norm1 output, shifted, padded and partitioned as timm does
    mask: torch.Tensor | None  # (nW, n, n) shifted-window mask (0 / -100), None for unshifted blocks
    layout: _Layout
    table: object  # the block's position table(s) (``bias_table``; SAM: its axis tables), made once per block call
    keys: torch.Tensor | None = None  # (B*nW, heads, n, d) every slot's keys where scoring had to project them
    queries: torch.Tensor | None = None  # (B*nW, heads, n, d) every slot's queries, likewise


@dataclass(frozen=True)
class SlotBias:
    """Additive terms among the selected slots of each window that are made once their queries are known (so that
    they take the queries' dtype, and SAM's decomposed bias depends on them): slot rows and columns (G, k) in the
    window and SAM's axis tables (None without relative position), and the padding keys (G, k) or None.
    :meth:`SwinParts.attend` turns them into logits."""

    rows: torch.Tensor | None
    cols: torch.Tensor | None
    tables: tuple[torch.Tensor, torch.Tensor] | None
    pad_keys: torch.Tensor | None

    def logits(self, q: torch.Tensor) -> torch.Tensor:
        """The additive logits for queries q (G, heads, k, d), broadcastable to (G, heads, k, k)."""
        bias = None if self.tables is None else decomposed_pair_bias(q, *self.tables, self.rows, self.cols)
        if self.pad_keys is None:
            return bias
        mask = self.pad_keys[:, None, None, :]
        if bias is None:
            return q.new_zeros(mask.shape).masked_fill(mask, PAD_LOGIT)
        return bias.masked_fill(mask, PAD_LOGIT)


@dataclass(frozen=True)
class _Slots:
    """Where tokens sit in their windows: the slots ``sel`` (B, nW, k) of each window (None: all n slots)."""

    prep: _Prep
    sel: torch.Tensor | None = None


class SwinParts(BlockParts):
    """timm ``SwinTransformerBlock`` + ``WindowAttention``: the relative-position bias, shifted-window mask and
    padding keys are the position terms, taken at [selected, selected] slots of each window."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__(block)
        attn = self.attn = self.hold(block, "attn")
        self.num_heads = attn.num_heads
        self.scale = getattr(attn, "scale", 1.0)  # SwinV2 has none: its logit scale multiplies the queries
        self.require_plain_linear(attn, "qkv", f"attn.qkv of a {type(block).__name__}")
        qkv = attn.qkv  # a Linear, or a 1x1 convolution (CoAtNet's NCHW attention)
        self.width = (qkv.out_features if isinstance(qkv, nn.Linear) else qkv.out_channels) // 3

    def dropout(self) -> float:
        return self.attn.attn_drop.p if self.attn.training else 0.0

    def attend(self, q, k, v, bias, row, heads):
        if isinstance(bias, SlotBias):  # terms made from the queries, in their dtype (SAM, HieraDet)
            bias = bias.logits(q)
        return super().attend(q, k, v, bias, row, heads)

    def qkv(self, h, where):
        G, k, _ = h.shape
        return self.attn.qkv(h).reshape(G, k, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)

    def bias_table(self) -> torch.Tensor:
        """The relative-position bias per offset and head (R, heads)."""
        return self.attn.relative_position_bias_table

    def table_macs(self) -> int:
        """MACs of making :meth:`bias_table` (once per block call)."""
        return 0

    def pair_bias(self, table: torch.Tensor, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None):
        """The bias (..., heads) of the slot pairs [rows, cols] of a window, from :meth:`bias_table` (every pair,
        (n, n, heads), when rows is None)."""
        index = self.attn.relative_position_index
        return table[index] if rows is None else table[index[rows, cols]]

    def bias(self, where: _Slots):
        prep = where.prep
        if where.sel is None:  # every slot of every window: (nW or 1, heads, n, n)
            bias = self.pair_bias(prep.table).permute(2, 0, 1)
            return bias if prep.mask is None else bias + prep.mask.unsqueeze(1)
        sel = where.sel
        B, nW, k = sel.shape
        rows, cols = sel.unsqueeze(-1), sel.unsqueeze(-2)  # (B, nW, k, 1), (B, nW, 1, k)
        bias = self.pair_bias(prep.table, rows, cols).permute(0, 1, 4, 2, 3)
        win = torch.arange(nW, device=sel.device).view(1, nW, 1, 1)
        if prep.mask is not None:
            bias = bias + prep.mask[win, rows, cols].unsqueeze(2)
        if prep.layout.padding is not None:  # padding is never a key
            pad_keys = prep.layout.padding[win.view(1, nW, 1), sel]  # (B, nW, k)
            bias = bias.masked_fill(pad_keys[:, :, None, None, :], PAD_LOGIT)
        return bias.reshape(B * nW, -1, k, k)

    def out(self, o, h):
        return self.attn.proj_drop(self.attn.proj(o))

    def res_attn(self, x, y):
        return x + self.block.drop_path1(_layer_scale(self.block, "ls1", y))

    def res_mlp(self, x, y):
        return x + self.block.drop_path2(_layer_scale(self.block, "ls2", y))

    def _rows(self, j: int) -> LinearMap:
        """Row block j (0: q, 1: k, 2: v) of the fused projection, with its bias (SwinV2: q_bias, a zero k_bias,
        v_bias)."""
        return qkv_rows(self.attn, j, self.width)

    def linear_queries(self):
        return self._rows(0)

    def linear_keys(self):
        return self._rows(1)

    def keys_affine(self):
        return True

    def shape(self) -> BlockShape:
        attn = self.attn
        return BlockShape(dim=attn.qkv.in_features, qk_dim=self.width, v_dim=self.width, qkv=linear_macs(attn.qkv),
                          proj=linear_macs(attn.proj), mlp=linear_macs(self.block.mlp))


class SwinV2Parts(PostNorm, SwinParts):
    """timm ``SwinTransformerV2Block`` + its ``WindowAttention``: post-norm residuals (``x + norm1(attn(x))``,
    ``x + norm2(mlp(x))``), cosine attention, continuous position bias. The per-head logit scale multiplies the
    normalised queries, so the attention core's own scale is 1; queries and keys are not affine in the input, so
    scoring projects every query and key and the block reuses the selected ones."""

    def _project(self, h: torch.Tensor, j: int) -> torch.Tensor:
        """Queries (j=0), keys (1) or values (2) of h, all heads side by side, before any norm."""
        rows = self._rows(j)
        return F.linear(h, rows.weight, rows.bias)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        """(G, n, heads * d) -> (G, n, heads, d): normalised in this layout, then the head axis moves second."""
        G, n, _ = t.shape
        return t.reshape(G, n, self.num_heads, -1)

    def _scaled(self, q: torch.Tensor) -> torch.Tensor:
        """Normalised queries (G, n, heads, d) times the per-head logit scale, clamped as timm clamps it."""
        logit_scale = torch.clamp(self.attn.logit_scale, max=math.log(1.0 / 0.01)).exp()  # (heads, 1, 1)
        return F.normalize(q, dim=-1) * logit_scale.view(-1, 1)

    def qkv(self, h, where):
        attn = self.attn
        G, n, _ = h.shape
        q, k, v = F.linear(h, attn.qkv.weight, fused_qkv_bias(attn)).reshape(G, n, 3, self.num_heads, -1).unbind(2)
        return self._scaled(q).transpose(1, 2), F.normalize(k, dim=-1).transpose(1, 2), v.transpose(1, 2)

    def queries(self, h, where):
        return self._scaled(self._heads(self._project(h, 0))).transpose(1, 2)

    def keys(self, h, where):
        return F.normalize(self._heads(self._project(h, 1)), dim=-1).transpose(1, 2)

    def values(self, h, where):
        return self._heads(self._project(h, 2)).transpose(1, 2)

    def linear_queries(self):
        return None

    def linear_keys(self):
        return None

    def keys_affine(self):
        return False

    def bias_table(self) -> torch.Tensor:
        attn = self.attn
        return 16 * torch.sigmoid(attn.cpb_mlp(attn.relative_coords_table).view(-1, self.num_heads))

    def table_macs(self) -> int:
        coords = self.attn.relative_coords_table
        return coords.numel() // coords.shape[-1] * linear_macs(self.attn.cpb_mlp)


class PairTable:
    """Parts whose :meth:`bias_table` is the (heads, n, n) bias over every slot pair itself (made by an MLP or a
    lookup once per block call), read by :meth:`pair_bias` without an index table."""

    def pair_bias(self, table: torch.Tensor, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None):
        pairs = table.permute(1, 2, 0)  # (n, n, heads)
        return pairs if rows is None else pairs[rows, cols]


class SwinV2CrParts(PairTable, SwinV2Parts):
    """timm ``SwinTransformerV2CrBlock`` + ``WindowMultiHeadAttention`` (``swinv2_cr_*``): SwinV2's post-norm
    residuals and cosine attention; the bias is a small MLP over the log-spaced offsets of every slot pair, no sigmoid
    and no index table, so :meth:`bias_table` is the (heads, n, n) bias itself. The block's main-branch norm
    (``norm3``, the stage-end and final norm) is not a residual: the adapter applies it to every token. With
    ``extra_norm_period`` (huge and giant, no pretrained weights) a token idle across several such blocks is normed
    at each of them, as a dense run would norm it."""

    def bias_table(self) -> torch.Tensor:
        attn = self.attn
        n = attn.window_size[0] * attn.window_size[1]
        return attn.meta_mlp(attn.relative_coordinates_log).transpose(0, 1).reshape(self.num_heads, n, n)

    def table_macs(self) -> int:
        return self.attn.relative_coordinates_log.shape[0] * linear_macs(self.attn.meta_mlp)


def nchw_stage_outputs(name: str, norm: nn.Module, last: int, maps, final, taken, stopped, options):
    """``forward_intermediates``' outputs from (B, H, W, C) maps where timm's stages give NCHW maps and its final
    norm works on them (MaxViT's, DaViT's): ``norm`` on the last feature's map (index ``last``) with
    ``options.norm``; the final map normed where the run reached it."""
    options.only_nchw(name)
    maps = [y.permute(0, 3, 1, 2) for y in maps]
    maps = [norm(y) if options.norm and j == last else y for j, y in zip(taken, maps)]
    if options.intermediates_only:
        return maps
    final = final.permute(0, 3, 1, 2)
    return (final if stopped and max(taken) < last else norm(final)), maps


class SwinAdapter(Family):
    name = "timm SwinTransformer"
    layout = GROUPED
    classes = staticmethod(_timm_classes)  # (model, stage, block, attention, patch merging) classes
    parts_class = SwinParts
    variants = "Swin v1: swin_tiny..swin_large"
    stages_attr = "layers"  # where the model keeps its stages

    def __init__(self, model: nn.Module) -> None:
        Model, Stage, Block, WindowAttention, PatchMerging = self.classes()
        for s, stage in enumerate(getattr(model, self.stages_attr)):
            if type(stage) is not Stage or type(stage.downsample) not in (PatchMerging, nn.Identity):
                raise TypeError(f"stage {s} of this {Model.__name__} is {type(stage).__name__} with "
                                f"{type(stage.downsample).__name__}; tokenpace supports timm's {Stage.__name__} "
                                f"with PatchMerging or no down-sampling ({self.variants})")
        super().__init__(model, [stage.blocks for stage in getattr(model, self.stages_attr)])
        for i, blk in enumerate(self.blocks):
            if type(blk) is not Block or type(blk.attn) is not WindowAttention:
                raise TypeError(f"block {i} of this {Model.__name__} is {type(blk).__name__} with "
                                f"{type(blk.attn).__name__}; tokenpace supports timm's {Block.__name__} with "
                                f"{WindowAttention.__name__} ({self.variants})")
        self._layouts: dict[tuple, _Layout] = {}  # per (map size, window, shift, device): built once

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        try:
            Model = cls.classes()[0]
        except ImportError:  # timm not installed: nothing of this family can exist
            return False
        return isinstance(model, Model)

    def make_parts(self, i: int) -> SwinParts:
        return self.parts_class(self.blocks[i])

    # --- forward -------------------------------------------------------------------------------------------------
    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, Frame]:
        x = self.model.patch_embed(x)  # (B, H, W, C) in and out of the blocks, as timm runs them
        return x, Frame(grid=tuple(x.shape[1:3]))

    def finish(self, x: torch.Tensor, frame: Frame) -> torch.Tensor:
        return self.model.norm(x)

    @property
    def stages(self) -> nn.Module:
        return getattr(self.model, self.stages_attr)

    def enter_stage(self, s: int, x: torch.Tensor, frame: Frame, row: str | None = None):
        return self.stages[s].downsample(x), None

    @property
    def checkpointing(self) -> bool:
        return any(stage.grad_checkpointing for stage in self.stages)

    def intermediates(self, maps, final, frame, taken, stopped, options):
        """As timm's Swin: each stage's (B, H, W, C) map as NCHW; the final norm only on the last stage's."""
        options.only_nchw(self.name)
        last = len(self.stage_blocks) - 1
        maps = [(self.model.norm(y) if options.norm and j == last else y).permute(0, 3, 1, 2).contiguous()
                for j, y in zip(taken, maps)]
        if options.intermediates_only:
            return maps
        return (final if stopped and max(taken) < last else self.model.norm(final)), maps

    def block(self, i: int, x: torch.Tensor, frame: Frame) -> torch.Tensor:
        return self.blocks[i](x)

    def window_shift(self, i: int, grid: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
        """Block i's attention window (rows, cols) and cyclic shift on a ``grid`` map."""
        blk = self.blocks[i]
        return tuple(blk.window_size), tuple(blk.shift_size)

    def grid_partitioned(self, i: int) -> bool:
        """Block i groups tokens spread over the map (MaxViT's grid attention) instead of windows of neighbours."""
        return False

    def _layout(self, i: int, H: int, W: int, device: torch.device) -> _Layout:
        window, shift = self.window_shift(i, (H, W))
        grid = self.grid_partitioned(i)
        key = (H, W, window, shift, grid, device)
        if key not in self._layouts:
            pad = ((window[0] - H % window[0]) % window[0], (window[1] - W % window[1]) % window[1])
            pos = torch.arange(H * W, device=device).view(1, H, W, 1)
            pos = torch.roll(pos, shifts=(-shift[0], -shift[1]), dims=(1, 2)) if any(shift) else pos
            pos = F.pad(pos, (0, 0, 0, pad[1], 0, pad[0]), value=-1)
            pos = (_grid_partition if grid else _partition)(pos, window).squeeze(-1)
            layout = _Layout(window, shift, pad, pos.shape[0], pos, pos < 0 if any(pad) else None, grid)
            if torch.compiler.is_compiling():  # traced tensors (torch.export, ONNX) must not outlive the trace
                return layout
            self._layouts[key] = layout
        return self._layouts[key]

    def _to_windows(self, t: torch.Tensor, layout: _Layout) -> torch.Tensor:
        """(B, H, W, D) -> (B*nW, n, D): timm's cyclic shift, zero padding and window partition."""
        if any(layout.shift):
            t = torch.roll(t, shifts=(-layout.shift[0], -layout.shift[1]), dims=(1, 2))
        t = F.pad(t, (0, 0, 0, layout.pad[1], 0, layout.pad[0])) if any(layout.pad) else t
        return layout.partition(t)

    # --- selection groups: the attention windows -----------------------------------------------------------------
    def group_size(self, i: int, x: torch.Tensor) -> int:
        wh, ww = self.window_shift(i, tuple(x.shape[1:3]))[0]
        return wh * ww

    def prepare(self, i: int, x: torch.Tensor, frame: Frame | None = None) -> _Prep:
        blk = self.blocks[i]
        B, H, W, C = x.shape
        parts = self.parts(i)
        layout = self._layout(i, H, W, x.device)
        windows = self._to_windows(parts.norm1(x), layout)
        mask = blk.attn_mask
        if blk.dynamic_mask and any(layout.shift):  # timm builds the mask for the padded map on every forward
            Hp, Wp = H + layout.pad[0], W + layout.pad[1]
            mask = blk.get_attn_mask(torch.empty(1, Hp, Wp, 0, device=x.device, dtype=windows.dtype))
        return _Prep(x=x, windows=windows, mask=mask, layout=layout, table=parts.bias_table())

    def score_shape(self, prep: _Prep) -> tuple[int, int, int]:
        G, n, _ = prep.windows.shape
        return (G // prep.layout.num_windows, prep.layout.num_windows, n)

    def token_scores(self, i: int, prep: _Prep, score: str, project_keys: bool = False) -> torch.Tensor:
        B, nW, n = self.score_shape(prep)
        parts, where, keys, queries = self.parts(i), _Slots(prep), None, None
        if score != "norm":  # projected anyway (SwinV2's cosine attention): the block reuses the selected slots'
            if block_reuses_keys(parts, project_keys):  # keys and queries, with their gradient
                keys = prep.keys = parts.keys(prep.windows, where)
            if block_reuses_queries(parts, "mean"):
                queries = prep.queries = parts.queries(prep.windows, where)
        with torch.no_grad():  # selection is a top-k: no gradient flows through scores, so build no graph for them
            if score == "norm":
                scores = self._to_windows(token_norms(prep.x).unsqueeze(-1), prep.layout).view(B, nW, n)
            else:  # "received": the mean over the window's queries of the logits, summed over heads
                queries = None if queries is None else queries.detach()
                scores = query_logits(parts, prep.windows, where, "mean", project_keys,
                                      None if keys is None else keys.detach(), queries).view(B, nW, n)
                extra = self.received_bias(i, prep, queries)
                scores = scores if extra is None else scores + extra
            if prep.layout.padding is not None:
                scores = scores.masked_fill(prep.layout.padding, float("-inf"))
        return scores

    def received_bias(self, i: int, prep: _Prep, queries: torch.Tensor | None) -> torch.Tensor | None:
        """The position terms (bias, shift mask) of the mean logit each slot receives from its window's queries,
        summed over heads, broadcastable to (B, nW, n), or None (``queries``: every slot's, where scoring projected
        them)."""
        return bias_row(self.parts(i), _Slots(prep), "mean")

    def run_selected(self, i: int, x: torch.Tensor, prep: _Prep, idx: torch.Tensor, keep_qk: bool = False):
        parts = self.parts(i)
        B, H, W, C = x.shape
        tokens, rows = self._selected_rows(i, x, prep, idx)
        y = mlp_half(parts, parts.res_attn(gather_rows(tokens, rows), self._selected_attention(i, prep, idx)))
        tokens = scatter_rows(tokens, rows, y)
        return tokens[:, :H * W].reshape(B, H, W, C), None

    def _selected_attention(self, i: int, prep: _Prep, idx: torch.Tensor) -> torch.Tensor:
        """The attention branch (B, nW*k, C) of the slots idx (B, nW, k), windows as a batch."""
        B, nW, k = idx.shape
        slots = idx.reshape(B * nW, k)
        keys = None if prep.keys is None else gather_heads(prep.keys, slots)
        queries = None if prep.queries is None else gather_heads(prep.queries, slots)
        out = attention_branch(self.parts(i), gather_tokens(prep.windows, slots), _Slots(prep, idx), keys=keys,
                               queries=queries)[0]
        return out.reshape(B, nW * k, -1)

    def _selected_rows(self, i: int, x: torch.Tensor, prep: _Prep, idx: torch.Tensor):
        """The map x (B, H, W, C) as tokens (B, H*W (+1), C) and the rows (B, nW*k) of the slots idx in them, per
        image, so drop path stays per image as in timm; padding slots point at one extra zero row (dropped by the
        caller after its scatter)."""
        B, H, W, C = x.shape
        pos = self.raster_positions(i, prep, idx)
        tokens = self._padding_row(x.reshape(B, H * W, C), prep)
        if prep.layout.padding is not None:
            pos = torch.where(pos < 0, H * W, pos)
        return tokens, flat_rows(pos, tokens.shape[1])

    @staticmethod
    def _padding_row(tokens: torch.Tensor, prep: _Prep) -> torch.Tensor:
        """tokens (B, N, C) with one zero row after them where the windows are padded (padding slots' rows)."""
        if prep.layout.padding is None:
            return tokens
        return torch.cat([tokens, tokens.new_zeros(tokens.shape[0], 1, tokens.shape[2])], dim=1)

    def raster_positions(self, i: int, prep: _Prep, idx: torch.Tensor) -> torch.Tensor:
        B, nW, k = idx.shape
        positions = prep.layout.positions.unsqueeze(0).expand(B, -1, -1)
        return positions.gather(2, idx).reshape(B, nW * k)

    # --- structure and cost model --------------------------------------------------------------------------------
    def input_size(self) -> tuple[int, int, int]:
        pe = self.model.patch_embed
        return (pe.proj.in_channels, *pe.img_size)

    def _patch_grid(self, img_size: int | tuple[int, int] | None) -> tuple[int, int]:
        return patch_grid(self.model.patch_embed, None if img_size is None else parse_img_size(img_size))

    def size_problem(self, size: tuple[int, int]) -> str | None:
        return patch_embed_size_problem(self.model.patch_embed, size, "strict_img_size=False")

    def _stage_grids(self, img_size: int | tuple[int, int] | None) -> list[tuple[int, int]]:
        """(H, W) of each stage's blocks: patch merging halves the map, rounding up as its padding does."""
        grid, grids = self._patch_grid(img_size), []
        for stage in self.stages:
            if not isinstance(stage.downsample, nn.Identity):  # patch merging
                grid = (_ceil_div(grid[0], 2), _ceil_div(grid[1], 2))
            grids.append(grid)
        return grids

    def block_grid(self, i: int) -> tuple[int, int]:
        return self._stage_grids(None)[self.stage_of_block(i)]

    def _windows(self, i: int, grid: tuple[int, int]) -> tuple[int, int]:
        (wh, ww), (H, W) = self.window_shift(i, grid)[0], grid
        return _ceil_div(H, wh) * _ceil_div(W, ww), wh * ww

    def group_counts(self, img_size) -> list[GroupCount]:
        grids = self._stage_grids(img_size)
        return [GroupCount(*self._windows(i, grids[s])) for s, blocks in enumerate(self.stage_blocks) for i in blocks]

    def count_macs(self, works: list[BlockWork] | None, img_size) -> int:
        """Per window token (padding included, as timm computes it): q, k, v, proj and the attention products; the
        MLP per real token when dense, per selected token when idling; plus the scores."""
        grids = self._stage_grids(img_size)
        total = self.ends_macs(img_size)
        for s, blocks in enumerate(self.stage_blocks):
            H, W = grids[s]
            total += self.stage_entry_macs(s, grids[s])
            for i in blocks:
                if self.resamples(i):  # a stage entry that pools or widens its tokens (HieraDet): always dense
                    grid_in = grids[s] if i > blocks.start else grids[s - 1] if s else self._patch_grid(img_size)
                    total += self.resampling_macs(i, grid_in, grids[s])
                    continue
                num_windows, n = self._windows(i, grids[s])
                work = works[i] if works is not None else BlockWork(n, n)
                dense = work.attn_tokens == n
                if dense:  # timm's MLP runs on the real tokens only
                    total += H * W * self.parts(i).shape().mlp
                total += self.block_work_macs(i, BlockWork(n, 0, score=work.score) if dense else work, num_windows)
                total += self.extra_macs(i, work, grids[s], dense)
        return total

    def ends_macs(self, img_size) -> int:
        """MACs of the patch embedding and the head."""
        proj = self.model.patch_embed.proj
        rows, cols = self._patch_grid(img_size)
        return (proj.weight.numel() * rows * cols if isinstance(proj, nn.Conv2d) else 0) + linear_macs(self.model.head)

    def stage_entry_macs(self, s: int, grid: tuple[int, int]) -> int:
        """MACs of stage s's patch merging on its ``grid`` output map: one reduction per output token."""
        return linear_macs(self.stages[s].downsample) * grid[0] * grid[1]

    def extra_macs(self, i: int, work: BlockWork, grid: tuple[int, int], dense: bool) -> int:
        """MACs of block i's work beside its linear layers and attention products, on a ``grid`` map: its position
        terms in all its windows (here the bias table, made once a call; SAM: its decomposed bias), or a convolution
        between its halves (TinyViT)."""
        return self.parts(i).table_macs()

    def resampling_macs(self, i: int, grid_in: tuple[int, int], grid_out: tuple[int, int]) -> int:
        """MACs of block i where it re-samples its tokens (``resamples``) from a ``grid_in`` map to ``grid_out``."""
        raise NotImplementedError(f"{self.name} blocks keep their tokens")


class SwinV2Adapter(SwinAdapter):
    name = "timm SwinTransformerV2"
    classes = staticmethod(_timm_v2_classes)
    parts_class = SwinV2Parts
    variants = "SwinV2: swinv2_tiny..swinv2_large; swinv2_cr_* is SwinTransformerV2Cr, also supported"


class SwinV2CrAdapter(SwinV2Adapter):
    """timm ``SwinTransformerV2Cr``: its stages take and give NCHW maps and convert to (B, H, W, C) inside, so the
    tokens travel as (B, H, W, C) here too and ``finish`` gives NCHW back; there is no final norm module (the last
    block's ``norm3`` is it), and each block's ``norm3`` runs on every token, idle ones included."""

    name = "timm SwinTransformerV2Cr"
    classes = staticmethod(_timm_v2_cr_classes)
    parts_class = SwinV2CrParts
    variants = "SwinV2 Cr: swinv2_cr_tiny..swinv2_cr_giant"
    stages_attr = "stages"

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, Frame]:
        x = self.model.patch_embed(x).permute(0, 2, 3, 1)
        return x, Frame(grid=tuple(x.shape[1:3]))

    def finish(self, x: torch.Tensor, frame: Frame) -> torch.Tensor:
        return x.permute(0, 3, 1, 2)  # NCHW, as timm's forward_features gives it to the head

    def intermediates(self, maps, final, frame, taken, stopped, options):
        """As timm's SwinV2Cr: each stage's map as NCHW (its ``norm`` argument changes nothing there)."""
        options.only_nchw(self.name)
        maps = [y.permute(0, 3, 1, 2) for y in maps]
        return maps if options.intermediates_only else (self.finish(final, frame), maps)

    def run_selected(self, i: int, x: torch.Tensor, prep: _Prep, idx: torch.Tensor, keep_qk: bool = False):
        x, qk = super().run_selected(i, x, prep, idx, keep_qk)
        return self.blocks[i].norm3(x), qk

    def size_problem(self, size: tuple[int, int]) -> str | None:
        """Its own size, or any size when built with ``strict_img_size=False`` (then its blocks build their masks per
        forward, and its patch conv rounds the sides down, as ``patch_grid`` counts them)."""
        pe = self.model.patch_embed
        own = tuple(pe.img_size)
        return None if size == own or not pe.strict_img_size else built_for_only(own, "strict_img_size=False")
