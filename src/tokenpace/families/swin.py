"""timm ``SwinTransformer`` family (Swin-T/S/B/L v1): IdleViT on a pyramid ViT with shifted-window attention.

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
linearity it needs no key projection (``core.scores.mean_query_logits_linear``). ``"norm"``: the L2 norm of the
token's input feature (before norm1). ``"random"``: the control (uniform over the window's n slots, padding too).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..core.macs import linear_macs
from ..core.schedule import keep_count
from ..core.scores import mean_query_logits_linear
from ..core.tokens import gather_tokens, scatter_tokens
from .base import RunBlocks, parse_img_size
from .grid import GridAdapter

PAD_LOGIT = -1e4  # masks padding keys: exp underflows to exactly 0 next to real keys, and fits fp16/bf16


def _timm_classes():
    from timm.models.swin_transformer import (PatchMerging, SwinTransformer, SwinTransformerBlock,
                                              SwinTransformerStage, WindowAttention)

    return SwinTransformer, SwinTransformerStage, SwinTransformerBlock, WindowAttention, PatchMerging


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _partition(t: torch.Tensor, window: tuple[int, int]) -> torch.Tensor:
    """(B, H, W, D) with H, W multiples of the window -> (B*nW, wh*ww, D), windows in raster order per image."""
    B, H, W, D = t.shape
    wh, ww = window
    return t.reshape(B, H // wh, wh, W // ww, ww, D).transpose(2, 3).reshape(-1, wh * ww, D)


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


@dataclass
class _Prep:
    """One idling block's shared state: its input map, norm1 output in windows, shift mask and layout."""

    x: torch.Tensor  # (B, H, W, C) block input
    windows: torch.Tensor  # (B*nW, n, C) norm1 output, shifted, padded and partitioned as timm does
    mask: torch.Tensor | None  # (nW, n, n) shifted-window mask (0 / -100), None for unshifted blocks
    layout: _Layout


class SwinAdapter(GridAdapter):
    name = "timm SwinTransformer"

    def __init__(self, model: nn.Module) -> None:
        _, Stage, Block, WindowAttention, PatchMerging = _timm_classes()
        for s, stage in enumerate(model.layers):
            if type(stage) is not Stage or type(stage.downsample) not in (PatchMerging, nn.Identity):
                raise TypeError(f"stage {s} of this SwinTransformer is {type(stage).__name__} with "
                                f"{type(stage.downsample).__name__}; tokenpace supports timm's SwinTransformerStage "
                                "with PatchMerging or no down-sampling (Swin v1: swin_tiny..swin_large)")
        super().__init__(model, [stage.blocks for stage in model.layers])
        for i, blk in enumerate(self.blocks):
            if type(blk) is not Block or type(blk.attn) is not WindowAttention:
                raise TypeError(f"block {i} of this SwinTransformer is {type(blk).__name__} with "
                                f"{type(blk.attn).__name__}; tokenpace supports timm's SwinTransformerBlock with "
                                "WindowAttention (Swin v1: swin_tiny..swin_large)")
        self._layouts: dict[tuple, _Layout] = {}  # per (map size, window, shift, device): built once

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        try:
            SwinTransformer = _timm_classes()[0]
        except ImportError:  # timm not installed: nothing of this family can exist
            return False
        return isinstance(model, SwinTransformer)

    # --- forward -------------------------------------------------------------------------------------------------
    def forward_features(self, x: torch.Tensor, run_blocks: RunBlocks) -> torch.Tensor:
        m = self.model
        return m.norm(run_blocks(m.patch_embed(x)))  # (B, H, W, C) in and out of the blocks, as timm runs them

    def enter_stage(self, s: int, x: torch.Tensor) -> torch.Tensor:
        return self.model.layers[s].downsample(x)

    def block(self, i: int, x: torch.Tensor) -> torch.Tensor:
        return self.blocks[i](x)

    def group_size(self, i: int, x: torch.Tensor) -> int:
        wh, ww = self.blocks[i].window_size
        return wh * ww

    def _layout(self, i: int, H: int, W: int, device: torch.device) -> _Layout:
        blk = self.blocks[i]
        window, shift = tuple(blk.window_size), tuple(blk.shift_size)
        key = (H, W, window, shift, device)
        if key not in self._layouts:
            pad = ((window[0] - H % window[0]) % window[0], (window[1] - W % window[1]) % window[1])
            pos = torch.arange(H * W, device=device).view(1, H, W, 1)
            pos = torch.roll(pos, shifts=(-shift[0], -shift[1]), dims=(1, 2)) if any(shift) else pos
            pos = F.pad(pos, (0, 0, 0, pad[1], 0, pad[0]), value=-1)
            pos = _partition(pos, window).squeeze(-1)
            padding = pos < 0 if any(pad) else None
            self._layouts[key] = _Layout(window, shift, pad, pos.shape[0], pos, padding)
        return self._layouts[key]

    def _to_windows(self, t: torch.Tensor, layout: _Layout) -> torch.Tensor:
        """(B, H, W, D) -> (B*nW, n, D): timm's cyclic shift, zero padding and window partition."""
        if any(layout.shift):
            t = torch.roll(t, shifts=(-layout.shift[0], -layout.shift[1]), dims=(1, 2))
        t = F.pad(t, (0, 0, 0, layout.pad[1], 0, layout.pad[0])) if any(layout.pad) else t
        return _partition(t, layout.window)

    def prepare(self, i: int, x: torch.Tensor) -> _Prep:
        blk = self.blocks[i]
        B, H, W, C = x.shape
        layout = self._layout(i, H, W, x.device)
        windows = self._to_windows(blk.norm1(x), layout)
        mask = blk.attn_mask
        if blk.dynamic_mask and any(layout.shift):  # timm builds the mask for the padded map on every forward
            Hp, Wp = H + layout.pad[0], W + layout.pad[1]
            mask = blk.get_attn_mask(torch.empty(1, Hp, Wp, 0, device=x.device, dtype=windows.dtype))
        return _Prep(x=x, windows=windows, mask=mask, layout=layout)

    def score_shape(self, prep: _Prep) -> tuple[int, int, int]:
        G, n, _ = prep.windows.shape
        return (G // prep.layout.num_windows, prep.layout.num_windows, n)

    @torch.no_grad()  # selection is a top-k: no gradient flows through scores, so build no graph for them
    def token_scores(self, i: int, prep: _Prep, score: str) -> torch.Tensor:
        B, nW, n = self.score_shape(prep)
        if score == "norm":
            scores = self._to_windows(prep.x.norm(dim=-1, keepdim=True), prep.layout).view(B, nW, n)
        else:  # "received": the mean over rows of the window's logits, summed over heads
            attn = self.blocks[i].attn
            width = attn.qkv.out_features // 3
            weight, bias = attn.qkv.weight, attn.qkv.bias
            scores = mean_query_logits_linear(prep.windows, weight[:width], None if bias is None else bias[:width],
                                              weight[width:2 * width], attn.scale).view(B, nW, n)
            rel_bias = attn.relative_position_bias_table[attn.relative_position_index]  # (n, n, heads)
            scores = scores + rel_bias.sum(-1).mean(0)
            if prep.mask is not None:  # the mask is the same for every head
                scores = scores + attn.num_heads * prep.mask.mean(1)
        if prep.layout.padding is not None:
            scores = scores.masked_fill(prep.layout.padding, float("-inf"))
        return scores

    def _selected_bias(self, attn: nn.Module, prep: _Prep, sel: torch.Tensor) -> torch.Tensor:
        """Additive logits (B*nW, heads, k, k) among the selected slots sel (B, nW, k): relative-position bias,
        shifted-window mask and padding keys, each taken at [sel, sel]."""
        B, nW, k = sel.shape
        rows, cols = sel.unsqueeze(-1), sel.unsqueeze(-2)  # (B, nW, k, 1), (B, nW, 1, k)
        pos_index = attn.relative_position_index[rows, cols]  # (B, nW, k, k)
        bias = attn.relative_position_bias_table[pos_index].permute(0, 1, 4, 2, 3)  # (B, nW, heads, k, k)
        win = torch.arange(nW, device=sel.device).view(1, nW, 1, 1)
        if prep.mask is not None:
            bias = bias + prep.mask[win, rows, cols].unsqueeze(2)
        if prep.layout.padding is not None:
            pad_keys = prep.layout.padding[win.view(1, nW, 1), sel]  # (B, nW, k)
            bias = bias.masked_fill(pad_keys[:, :, None, None, :], PAD_LOGIT)
        return bias.reshape(B * nW, -1, k, k)

    def _attend_selected(self, attn: nn.Module, normed: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """timm ``WindowAttention.forward`` on the selected tokens normed (G, k, C) with additive logits bias."""
        G, k, _ = normed.shape
        q, key, v = attn.qkv(normed).reshape(G, k, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        if attn.fused_attn:
            out = F.scaled_dot_product_attention(q, key, v, attn_mask=bias.to(q.dtype), scale=attn.scale,
                                                 dropout_p=attn.attn_drop.p if attn.training else 0.0)
        else:
            weights = attn.softmax((q * attn.scale) @ key.transpose(-2, -1) + bias)
            out = attn.attn_drop(weights) @ v
        return attn.proj_drop(attn.proj(out.transpose(1, 2).reshape(G, k, -1)))

    def run_selected(self, i: int, x: torch.Tensor, prep: _Prep, idx: torch.Tensor) -> torch.Tensor:
        blk = self.blocks[i]
        B, H, W, C = x.shape
        _, nW, k = idx.shape
        attn_out = self._attend_selected(blk.attn, gather_tokens(prep.windows, idx.reshape(B * nW, k)),
                                         self._selected_bias(blk.attn, prep, idx))
        pos = self.raster_positions(i, prep, idx)  # (B, nW*k): per image, so drop-path stays per image as in timm
        tokens = x.reshape(B, H * W, C)
        if prep.layout.padding is not None:  # padding slots write into one extra row, dropped afterwards
            tokens = torch.cat([tokens, tokens.new_zeros(B, 1, C)], dim=1)
            pos = torch.where(pos < 0, H * W, pos)
        y = gather_tokens(tokens, pos) + blk.drop_path1(_layer_scale(blk, "ls1", attn_out.reshape(B, nW * k, C)))
        y = y + blk.drop_path2(_layer_scale(blk, "ls2", blk.mlp(blk.norm2(y))))
        tokens = scatter_tokens(tokens, pos, y)
        return tokens[:, :H * W].reshape(B, H, W, C)

    def raster_positions(self, i: int, prep: _Prep, idx: torch.Tensor) -> torch.Tensor:
        B, nW, k = idx.shape
        positions = prep.layout.positions.unsqueeze(0).expand(B, -1, -1)
        return positions.gather(2, idx).reshape(B, nW * k)

    # --- structure and cost model --------------------------------------------------------------------------------
    def input_size(self) -> tuple[int, int, int]:
        pe = self.model.patch_embed
        return (pe.proj.in_channels, *pe.img_size)

    def _patch_grid(self, img_size: int | tuple[int, int] | None) -> tuple[int, int]:
        pe = self.model.patch_embed
        if img_size is None:
            return tuple(pe.grid_size)
        img_size = parse_img_size(img_size)
        if hasattr(pe, "dynamic_feat_size"):
            return tuple(pe.dynamic_feat_size(img_size))
        return (img_size[0] // pe.patch_size[0], img_size[1] // pe.patch_size[1])

    def _stage_grids(self, img_size: int | tuple[int, int] | None) -> list[tuple[int, int]]:
        """(H, W) of each stage's blocks: patch merging halves the map, rounding up as its padding does."""
        _, _, _, _, PatchMerging = _timm_classes()
        grid, grids = self._patch_grid(img_size), []
        for stage in self.model.layers:
            if isinstance(stage.downsample, PatchMerging):
                grid = (_ceil_div(grid[0], 2), _ceil_div(grid[1], 2))
            grids.append(grid)
        return grids

    def block_grid(self, i: int) -> tuple[int, int]:
        return self._stage_grids(None)[self.stage_of_block(i)]

    def count_macs(self, policy, img_size: int | tuple[int, int] | None) -> int:
        m = self.model
        grid = self._patch_grid(img_size)
        proj = m.patch_embed.proj
        total = proj.weight.numel() * grid[0] * grid[1] if isinstance(proj, nn.Conv2d) else 0
        for s, (stage, (H, W)) in enumerate(zip(m.layers, self._stage_grids(img_size))):
            total += linear_macs(stage.downsample) * H * W  # patch merging: one reduction per output token
            for i in self.stage_blocks[s]:
                total += self._block_macs(i, H, W, policy)
        return total + linear_macs(m.head)

    def _block_macs(self, i: int, H: int, W: int, policy) -> int:
        """Block i on an (H, W) map: q, k, v and proj per window token (padding included, as timm computes it),
        the two attention matmuls per window, the MLP per real token; when idling, all of it on k tokens per window
        plus the scoring."""
        blk = self.blocks[i]
        attn = blk.attn
        dim, width = attn.qkv.in_features, attn.qkv.out_features // 3
        wh, ww = blk.window_size
        n, num_windows = wh * ww, _ceil_div(H, wh) * _ceil_div(W, ww)
        ratio = policy.keep_ratio(i) if policy is not None else None
        k = keep_count(n, ratio) if ratio is not None else n
        tokens_mlp = H * W if k == n else num_windows * k
        total = num_windows * (k * (linear_macs(attn.qkv) + linear_macs(attn.proj)) + 2 * k * k * width)
        total += tokens_mlp * linear_macs(blk.mlp)
        if k < n and policy.score == "received":  # mean query (W_q), W_k^T qbar, one dot per window token
            total += num_windows * (2 * dim * width + n * dim)
        return total
