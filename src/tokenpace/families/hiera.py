"""timm ``Hiera`` (``hiera_*``: "Hiera: A Hierarchical Vision Transformer without the Bells-and-Whistles", the MAE
pre-trained pyramid ViT): IdleViT on a plain-block pyramid whose early stages attend within mask units.

Layout. timm's Hiera "unrolls" the patch tokens once after the embedding: a (B, N, C) sequence in which the q-stride
cells come first, so that pooling is a max over the first axis of (B, stride, N / stride, C), and the tokens of one
mask unit (window) sit ``nW`` apart: token t * nW + w is slot t of window w. The tokens travel in that order; the
maps ``forward_intermediates`` returns are rerolled to raster order by timm's own ``reroll``.

Blocks. Every block is timm's ``HieraBlock``: pre-norm, ``MaskUnitAttention`` (fused q/k/v, no bias term, no
position term), LayerScale where built with it, and an MLP. A block attends within mask units (``nW`` windows, the
first two stages of the pretrained models) or globally (one window of N tokens). The first block of each later stage
re-samples the tokens: it widens them (``proj``, or max and mean pools side by side without it) and, in the first
``q_pool`` stage entries, pools its queries and its residual over the q-stride; no token can pass it unchanged, so
it runs on every token (``resamples``).

Idling (one selection group per window). In an idling block the top k slots of each window run the block, windows
as a batch: attention among the k selected tokens of their window, then proj, residual and MLP on them only; every
other token passes through bit-identical. Drop path acts per image, as in timm (its windows are inside one
sequence).

Scores (no class token). ``"received"`` (default): the mean pre-softmax logit a token receives from every query of
its window, summed over heads; q and k are affine in the normed input, so no key is projected
(``scoring.query_logits``). ``"norm"``: the L2 norm of the token's input feature. ``"random"``: the control.

Not supported: video Hiera (3-D token grids; TypeError), patch dropout while training (``patch_drop_rate`` > 0:
timm drops random mask units; ValueError at the training forward), the ``mask`` argument of MAE pre-training
(ValueError at the forward). Hiera runs the size it is built for (its unroll is sized at construction).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..anatomy import BlockParts, Frame, LinearMap, qkv_rows
from ..blockops import attention_branch, mlp_half
from ..core.macs import BlockShape, BlockWork, conv_macs, dense_work, linear_macs
from ..core.tokens import flat_rows, gather_rows, scatter_rows
from ..scoring import query_logits, token_norms
from .base import GROUPED, Family, GroupCount, check_block_classes


def _timm_classes():
    from timm.models.hiera import Hiera, HieraBlock, MaskUnitAttention

    return Hiera, HieraBlock, MaskUnitAttention


def _by_window(t: torch.Tensor, windows: int) -> torch.Tensor:
    """Unrolled tokens (B, N, ...) -> (B, nW, N / nW, ...): slot t of window w is token t * nW + w (a view)."""
    B, N = t.shape[:2]
    return t.view(B, N // windows, windows, *t.shape[2:]).transpose(1, 2)


@dataclass
class _Prep:
    """One idling block's shared state: its input (B, N, C), norm1 output and number of windows."""

    x: torch.Tensor
    h: torch.Tensor
    windows: int


class HieraParts(BlockParts):
    """timm ``HieraBlock`` + ``MaskUnitAttention`` (of a block that keeps its token count and width): pre-norm,
    fused affine q/k/v, no position terms, LayerScale (``ls1``/``ls2``, Identity without ``init_values``)."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__(block)
        attn = self.attn = self.hold(block, "attn")
        self.num_heads, self.scale = attn.heads, attn.scale
        self.require_plain_linear(attn, "qkv", f"attn.qkv of a {type(block).__name__}")
        self.width = attn.dim_out

    def qkv(self, h, where):
        G, n, _ = h.shape
        return self.attn.qkv(h).reshape(G, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)

    def out(self, o, h):
        return self.attn.proj(o)

    def linear_queries(self) -> LinearMap:
        return qkv_rows(self.attn, 0, self.width)

    def linear_keys(self) -> LinearMap:
        return qkv_rows(self.attn, 1, self.width)

    def keys_affine(self) -> bool:
        return True

    def shape(self) -> BlockShape:
        attn = self.attn
        return BlockShape(dim=attn.dim, qk_dim=self.width, v_dim=self.width, qkv=linear_macs(attn.qkv),
                          proj=linear_macs(attn.proj), mlp=linear_macs(self.block.mlp))


def stage_lists(model: nn.Module) -> list[list[nn.Module]]:
    """The blocks of each stage of a timm Hiera or HieraDet, cut at its ``stage_ends``; the stages a
    ``prune_intermediate_layers`` emptied (it cuts the blocks, not the stage ends) are left out."""
    ends, blocks = [-1, *model.stage_ends], list(model.blocks)
    return [stage for stage in (blocks[a + 1:b + 1] for a, b in zip(ends, ends[1:])) if stage]


class TimmHiera(Family):
    name = "timm Hiera"
    layout = GROUPED

    def __init__(self, model: nn.Module) -> None:
        _, Block, Attention = _timm_classes()
        if len(model.tokens_spatial_shape) != 2:
            raise TypeError(f"this Hiera has a {len(model.tokens_spatial_shape)}-D token grid (video); tokenpace "
                            "supports 2-D image Hiera models (hiera_*)")
        super().__init__(model, stage_lists(model))
        check_block_classes(self.blocks, Block, Attention, "Hiera", "hiera_*")
        self._rasters: dict = {}  # per (stage, device): each unrolled token's raster position

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        try:
            Model = _timm_classes()[0]
        except ImportError:  # timm not installed: nothing of this family can exist
            return False
        return isinstance(model, Model)

    def make_parts(self, i: int) -> HieraParts:
        return HieraParts(self.blocks[i])

    def resamples(self, i: int) -> bool:
        """Stage entries widen the tokens and pool them over the q-stride: they run on every token."""
        blk = self.blocks[i]
        return blk.dim != blk.dim_out or blk.attn.q_stride > 1

    # --- forward -------------------------------------------------------------------------------------------------
    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, Frame]:
        m = self.model
        if m.training and m.patch_drop_rate > 0:  # timm would drop random mask units here
            raise ValueError(f"this Hiera drops random mask units while training (patch_drop_rate="
                             f"{m.patch_drop_rate}); tokenpace needs every token: set model.patch_drop_rate = 0")
        x = m.unroll(m._pos_embed(m.patch_embed(x)))
        return x, Frame(grid=tuple(m.tokens_spatial_shape))

    def block(self, i: int, x: torch.Tensor, frame: Frame) -> torch.Tensor:
        return self.blocks[i](x)

    def finish(self, x: torch.Tensor, frame: Frame) -> torch.Tensor:
        return x  # timm's forward_features ends at the last block; the head pools and norms

    def intermediates(self, maps, final, frame, taken, stopped, options):
        """As timm's Hiera: the maps rerolled to (B, H, W, C), as NCHW or NHWC; the tokens where the run ended."""
        if options.norm or options.output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"{self.name} feature maps: accepted norm=False and output_fmt 'NCHW' or 'NHWC' (timm's "
                             f"Hiera norms none); got norm={options.norm}, output_fmt={options.output_fmt!r}")
        maps = [self._reroll(y) for y in maps]
        maps = [y.permute(0, 3, 1, 2) if options.output_fmt == "NCHW" else y for y in maps]
        return maps if options.intermediates_only else (final, maps)

    def _reroll(self, tokens: torch.Tensor) -> torch.Tensor:
        """Unrolled tokens (B, N, C) -> their (B, H, W, C) map, by timm's reroll. Its schedule changes only where the
        tokens are pooled, so the token count says which block's schedule applies (the maps come from block
        outputs, after every block with ``coarse=False``)."""
        block = next(i for i in range(self.depth) if math.prod(self.block_grid(i)) == tokens.shape[1])
        return self.model.reroll(tokens, block)

    # --- selection groups: the mask units, or the whole map in a global block ------------------------------------
    def _windows(self, i: int, tokens: int) -> tuple[int, int]:
        """(windows, slots per window) of block i on ``tokens`` input tokens."""
        attn = self.blocks[i].attn
        if not attn.use_mask_unit_attn:
            return 1, tokens
        windows = tokens // (attn.q_stride * attn.window_size)
        return windows, tokens // windows

    def group_size(self, i: int, x: torch.Tensor) -> int:
        return self._windows(i, x.shape[1])[1]

    def prepare(self, i: int, x: torch.Tensor, frame: Frame | None = None) -> _Prep:
        return _Prep(x=x, h=self.parts(i).norm1(x), windows=self._windows(i, x.shape[1])[0])

    def score_shape(self, prep: _Prep) -> tuple[int, int, int]:
        B, N, _ = prep.x.shape
        return (B, prep.windows, N // prep.windows)

    def token_scores(self, i: int, prep: _Prep, score: str, project_keys: bool = False) -> torch.Tensor:
        with torch.no_grad():  # a top-k follows: no gradient flows through scores
            if score == "norm":
                return _by_window(token_norms(prep.x), prep.windows)
            return query_logits(self.parts(i), _by_window(prep.h, prep.windows), None, "mean")

    def _sequence_positions(self, idx: torch.Tensor) -> torch.Tensor:
        """Slots idx (B, nW, k) -> their places (B, nW * k) in the unrolled sequence, window by window."""
        B, windows, k = idx.shape
        return (idx * windows + torch.arange(windows, device=idx.device).view(1, windows, 1)).view(B, windows * k)

    def run_selected(self, i: int, x: torch.Tensor, prep: _Prep, idx: torch.Tensor, keep_qk: bool = False):
        parts = self.parts(i)
        B, N, C = x.shape
        _, windows, k = idx.shape
        rows = flat_rows(self._sequence_positions(idx), N)  # once for every gather and scatter of the block
        h = gather_rows(prep.h, rows).view(B * windows, k, C)  # windows as a batch
        y = attention_branch(parts, h, None)[0].view(B, windows * k, C)
        y = mlp_half(parts, parts.res_attn(gather_rows(x, rows), y))
        return scatter_rows(x, rows, y), None

    def raster_positions(self, i: int, prep: _Prep, idx: torch.Tensor) -> torch.Tensor:
        return self._raster(i, idx.device)[self._sequence_positions(idx)]

    def _raster(self, i: int, device: torch.device) -> torch.Tensor:
        """The raster position in block i's grid of each unrolled token, from timm's own reroll."""
        key = (self.stage_of_block(i), device)
        if key not in self._rasters:
            tokens = math.prod(self.block_grid(i))
            order = self.model.reroll(torch.arange(tokens, device=device).view(1, tokens, 1), i).flatten()
            raster = torch.empty_like(order)
            raster[order] = torch.arange(tokens, device=device)
            if torch.compiler.is_compiling():  # traced tensors must not outlive the trace
                return raster
            self._rasters[key] = raster
        return self._rasters[key]

    # --- sizes and cost model ------------------------------------------------------------------------------------
    def input_size(self) -> tuple[int, int, int]:
        m = self.model
        return (m.in_chans, *(t * s for t, s in zip(m.tokens_spatial_shape, m.patch_stride)))

    def block_grid(self, i: int) -> tuple[int, int]:
        return tuple(self.model.reroll.schedule[i][1])  # the grid of block i's output (a stage entry's pooled one)

    def _tokens_in(self, i: int) -> int:
        return math.prod(self.block_grid(i - 1) if i > 0 else self.model.tokens_spatial_shape)

    def group_counts(self, img_size) -> list[GroupCount]:
        return [GroupCount(*self._windows(i, self._tokens_in(i))) for i in range(self.depth)]

    def count_macs(self, works: list[BlockWork] | None, img_size) -> int:
        """The patch embedding, each block's linear layers and attention products (a stage entry always dense),
        the scores, and the head's linear layers (on every token without a pool); norms, pooling and the position
        embedding count 0."""
        m = self.model
        # without a pool (global_pool=''), timm's head runs its linear layers on every token
        head_tokens = 1 if m.head.pool_type else math.prod(self.block_grid(self.depth - 1))
        total = conv_macs(m.patch_embed.proj, self.input_size()[1:])[0] + head_tokens * linear_macs(m.head)
        for i in range(self.depth):
            tokens = self._tokens_in(i)
            if self.resamples(i):
                total += self._resampling_macs(i, tokens)
                continue
            windows, slots = self._windows(i, tokens)
            total += self.block_work_macs(i, dense_work(slots) if works is None else works[i], windows)
        return total

    def _resampling_macs(self, i: int, tokens: int) -> int:
        """A stage entry on ``tokens`` inputs: q/k/v and the widening projection on every input, the pooled queries
        against every key of their window, proj and MLP on the pooled outputs."""
        blk, attn = self.blocks[i], self.blocks[i].attn
        outputs = tokens // attn.q_stride
        keys = self._windows(i, tokens)[1]
        return (tokens * (linear_macs(attn.qkv) + linear_macs(blk.proj)) + 2 * outputs * keys * attn.dim_out
                + outputs * (linear_macs(attn.proj) + linear_macs(blk.mlp)))
