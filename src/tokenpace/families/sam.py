"""timm ``VisionTransformerSAM`` (``samvit_*``: Segment Anything's image encoder, a ViTDet-style plain ViT): IdleViT
on blocks that attend within square windows of the (B, H, W, C) map, with a few global-attention blocks between them.

Blocks. A windowed block (``window_size`` > 0) does what timm's does up to its windows (norm1, zero padding at the
bottom and right, window partition), then idles as Swin's blocks do (``families/swin.py``): k selected tokens in each
window, windows as a batch, attention among them, then proj, residual and MLP on them only. As on Swin, padding is
never a key (timm's dense block lets the zero padding act as keys and values): it ranks last, fills the places of a
window with fewer than k real tokens, is masked out as a key, and its outputs are dropped. A global block
(``window_size`` 0) is one window the size of the map: k of its H*W tokens. Drop path acts per image (timm's windowed
block draws it per window).

Position terms. SAM's decomposed relative position (MViTv2): the logit of query i and key j gains
q_i . R_h[r_i - r_j] + q_i . R_w[c_i - c_j] (per head, the query unscaled; r, c the row and column in the window, or
in the map for a global block), a bias that depends on the query (``core.decomposed_bias``). timm's tables, resized
by timm's linear interpolation where the window or map differs from the size they were made for.

Scores. ``"received"`` (default): the mean pre-softmax logit a token receives from all queries of its window (padding
queries included, as in timm's window), summed over heads. Its content part needs no key projection
(``scoring.query_logits``); its position part needs the sum of the queries on each window row and column, which is
W_q times the sum of the inputs there plus the count times b_q: wh + ww projections per window, not one per slot
(with ``qk_norm`` every query and key is projected, and the block reuses the selected ones). ``"norm"``,
``"random"``: as on Swin.

Keep counts a window's slots, padding included (as on Swin): k = int(n * keep) of n = 196 slots at window 14. At
1024 px the 64 x 64 map pads to 70 x 70, so the 9 windows on the bottom and right edges hold 112 or 64 real tokens:
at keep 0.7 (k = 137) they run all of them, and 77% of the real tokens of a windowed block run instead of 70%. The
MACs count says so (padding slots included, as timm computes them).

Not supported: RoPE (``use_rope``: no pretrained model uses it), refused with a TypeError.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..anatomy import Frame
from ..core.decomposed_bias import pair_bias_macs, received_bias, received_bias_macs
from ..core.macs import BlockWork, conv_macs
from ..scoring import score_precision
from .base import Family, check_block_classes
from .swin import SlotBias, SwinAdapter, SwinParts, _Prep, _Slots


def _timm_classes():
    from timm.models.vision_transformer_sam import Attention, Block, VisionTransformerSAM

    return VisionTransformerSAM, Block, Attention


def axis_table(rel_pos: torch.Tensor, size: int) -> torch.Tensor:
    """A decomposed bias table (2*size - 1, d) for one axis of ``size`` positions: the table itself where it has that
    length, else timm's resized one (read back from ``get_rel_pos``'s per-pair table, so the interpolation is
    timm's own)."""
    if rel_pos.shape[0] == 2 * size - 1:
        return rel_pos
    from timm.models.vision_transformer_sam import get_rel_pos

    pairs = get_rel_pos(size, size, rel_pos)  # (size, size, d): [i, j] = table[i - j + size - 1]
    return torch.cat([pairs[0].flip(0), pairs[1:, 0]])


class SamParts(SwinParts):
    """timm SAM ``Block`` + ``Attention``: pre-norm, optional query/key norms (``qk_norm``), optional LayerScale; the
    decomposed relative-position bias and padding keys are the position terms, made from the selected slots'
    queries in ``SwinParts.attend`` (a ``SlotBias``)."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__(block)
        attn = self.attn
        if attn.rope is not None:
            raise TypeError("SAM ViT blocks with RoPE (use_rope=True) are not supported; tokenpace runs SAM's ViT with "
                            "its decomposed relative position (use_rel_pos=True) or without position terms")
        self.q_norm = self.hold(attn, "q_norm", "attn.q_norm")
        self.k_norm = self.hold(attn, "k_norm", "attn.k_norm")
        self.rel_pos = bool(attn.use_rel_pos)

    def qkv(self, h, where):
        G, n, _ = h.shape
        q, k, v = self.attn.qkv(h).reshape(G, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        return self.q_norm(q), self.k_norm(k), v

    def _project(self, h: torch.Tensor, j: int) -> torch.Tensor:
        """Queries (j=0), keys (1) or values (2) of h (G, n, C) -> (G, heads, n, d), before any norm."""
        rows = self._rows(j)
        G, n, _ = h.shape
        return F.linear(h, rows.weight, rows.bias).view(G, n, self.num_heads, -1).transpose(1, 2)

    def queries(self, h, where):
        return self.q_norm(self._project(h, 0))

    def keys(self, h, where):
        return self.k_norm(self._project(h, 1))

    def values(self, h, where):
        return self._project(h, 2)

    def linear_queries(self):
        return self._rows(0) if type(self.q_norm) is nn.Identity else None

    def linear_keys(self):
        return self._rows(1) if type(self.k_norm) is nn.Identity else None

    def keys_affine(self):
        return type(self.k_norm) is nn.Identity

    def axis_tables(self, window: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The row and column tables for a ``window`` (rows, cols) of slots, or None without relative position."""
        if not self.rel_pos:
            return None
        return axis_table(self.attn.rel_pos_h, window[0]), axis_table(self.attn.rel_pos_w, window[1])

    def bias(self, where: _Slots) -> SlotBias | None:
        prep = where.prep
        layout = prep.layout
        B, nW, n = prep.x.shape[0], layout.num_windows, layout.positions.shape[1]
        sel = where.sel
        if sel is None:  # every slot of every window
            sel = torch.arange(n, device=prep.x.device).expand(B, nW, n)
        pad_keys = None
        if layout.padding is not None:  # padding is never a key
            pad_keys = layout.padding[torch.arange(nW, device=sel.device).view(1, nW, 1), sel].flatten(0, 1)
        if prep.table is None and pad_keys is None:
            return None
        ww = layout.window[1]
        slots = sel.flatten(0, 1)
        return SlotBias(slots // ww, slots % ww, prep.table, pad_keys)

    def mean_bias(self, where):
        raise NotImplementedError("SAM's position bias depends on the query: there is no query-free mean")


class SamAdapter(SwinAdapter):
    """timm ``VisionTransformerSAM``: one stage of blocks over a (B, H, W, C) map, the neck (convolutions and norms
    over the NCHW map) as the final norm, as timm's ``forward_features`` runs them."""

    name = "timm VisionTransformerSAM"
    classes = staticmethod(_timm_classes)  # (model, block, attention) classes
    parts_class = SamParts
    variants = "SAM's ViT: samvit_base/large/huge_patch16, samvit_base_patch16_224"

    def __init__(self, model: nn.Module) -> None:
        Model, Block, Attention = self.classes()
        Family.__init__(self, model, [model.blocks])
        check_block_classes(self.blocks, Block, Attention, Model.__name__, self.variants)
        self._layouts = {}

    # --- forward -------------------------------------------------------------------------------------------------
    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, Frame]:
        from timm.layers import resample_abs_pos_embed_nhwc

        m = self.model
        x = m.patch_embed(x)  # (B, H, W, C)
        if m.pos_embed is not None:  # resized to the grid, as timm does for every input
            x = x + resample_abs_pos_embed_nhwc(m.pos_embed, x.shape[1:3])
        x = m.norm_pre(m.patch_drop(m.pos_drop(x)))
        return x, Frame(grid=tuple(x.shape[1:3]))

    def finish(self, x: torch.Tensor, frame: Frame) -> torch.Tensor:
        return self.model.neck(x.permute(0, 3, 1, 2))

    def enter_stage(self, s: int, x: torch.Tensor, frame: Frame, row: str | None = None):
        return x, None

    @property
    def checkpointing(self) -> bool:
        return bool(self.model.grad_checkpointing)

    def feature_points(self) -> list[int]:
        return list(range(self.depth))  # timm's SAM indexes blocks

    def intermediates(self, maps, final, frame, taken, stopped, options):
        """As timm's SAM: each block's map as NCHW (through the neck with ``norm``); the neck on the final map."""
        options.only_nchw(self.name)
        maps = [y.permute(0, 3, 1, 2) for y in maps]
        if options.norm:
            maps = [self.model.neck(y) for y in maps]
        return maps if options.intermediates_only else (self.finish(final, frame), maps)

    # --- windows: square windows, or the whole map in a global block ----------------------------------------------
    def window_shift(self, i: int, grid: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
        w = self.blocks[i].window_size
        return ((w, w) if w > 0 else tuple(grid)), (0, 0)

    def prepare(self, i: int, x: torch.Tensor, frame: Frame | None = None) -> _Prep:
        B, H, W, C = x.shape
        parts = self.parts(i)
        layout = self._layout(i, H, W, x.device)
        windows = self._to_windows(parts.norm1(x), layout)
        return _Prep(x=x, windows=windows, mask=None, layout=layout, table=parts.axis_tables(layout.window))

    def received_bias(self, i: int, prep: _Prep, queries: torch.Tensor | None) -> torch.Tensor | None:
        if prep.table is None:
            return None
        parts = self.parts(i)
        B, nW, n = self.score_shape(prep)
        G, heads = B * nW, parts.num_heads
        wh, ww = prep.layout.window
        table_h, table_w = prep.table
        with score_precision(prep.windows, table_h):  # ranked in the weights' precision, as the content part
            if queries is None:  # affine queries: a line's queries sum to W_q (their inputs' sum) + count b_q
                linear = parts.linear_queries()
                h = prep.windows.view(G, wh, ww, -1)

                def line_queries(sums: torch.Tensor, count: int) -> torch.Tensor:
                    q = F.linear(sums, linear.weight)
                    q = q if linear.bias is None else q + count * linear.bias
                    return q.view(G, sums.shape[1], heads, -1).transpose(1, 2)

                rows, cols = line_queries(h.sum(2), ww), line_queries(h.sum(1), wh)
            else:  # every query projected (query norm, under the model's autocast): summed in the tables' dtype
                every = queries.view(G, heads, wh, ww, -1)
                rows, cols = every.sum(3, dtype=table_h.dtype), every.sum(2, dtype=table_h.dtype)
            return received_bias(rows, cols, table_h, table_w).view(B, nW, n) / n

    # --- structure and cost model --------------------------------------------------------------------------------
    def _stage_grids(self, img_size: int | tuple[int, int] | None) -> list[tuple[int, int]]:
        return [self._patch_grid(img_size)]

    def ends_macs(self, img_size) -> int:
        """The patch embedding, the neck (its convolutions) and the head."""
        return super().ends_macs(img_size) + conv_macs(self.model.neck, self._patch_grid(img_size))[0]

    def stage_entry_macs(self, s: int, grid: tuple[int, int]) -> int:
        return 0  # one stage, no down-sampling

    def extra_macs(self, i: int, work: BlockWork, grid: tuple[int, int], dense: bool) -> int:
        """The decomposed bias as timm computes it when dense (every window query against every key row and column);
        when idling, each selected query against every offset, plus the received score's line sums and their
        products with the tables."""
        parts = self.parts(i)
        if not parts.rel_pos:
            return 0
        shape = parts.shape()
        num_windows, n = self._windows(i, grid)
        window = self.window_shift(i, grid)[0]
        if dense:
            return num_windows * n * (window[0] + window[1]) * shape.qk_dim
        macs = pair_bias_macs(work.attn_tokens, window, shape.qk_dim)
        if work.score is not None and work.score.query == "mean":
            macs += received_bias_macs(window, shape.qk_dim)
            if parts.linear_queries() is not None:  # the line sums' queries
                macs += (window[0] + window[1]) * shape.query_macs()
        return num_windows * macs
