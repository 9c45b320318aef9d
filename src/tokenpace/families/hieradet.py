"""timm ``HieraDet`` (``sam2_hiera_*``: SAM 2's image encoder, a Hiera; ``hieradet_small``): IdleViT on a pyramid
whose blocks attend within square windows of the (B, H, W, C) map or over the whole map.

Layout. Between blocks the tokens travel as timm's (B, H, W, C) map. The position embedding (a table resized to the
grid plus a window table tiled over it) is added once after the patch embedding; the blocks have no position term.

Blocks. A block that keeps its tokens idles as SAM's ViT does (``families/sam.py``, on Swin's windows): k selected
slots of each window (zero padding at the bottom and right, never a key; it ranks last and fills the places of a
window with fewer real tokens), windows as a batch, attention among them, then proj, residual and MLP on them only;
a global block (window 0) is one window the size of the map. The first block of each later stage widens the tokens
(``proj``) and, in the first ``q_pool`` stage entries, max-pools its queries per window and its residual over the
map (``q_stride``): no token can pass it unchanged, so it runs on every token (``resamples``).

Scores (no class token). ``"received"`` (default): the mean pre-softmax logit a token receives from every query of
its window (padding queries included, as in timm's window), summed over heads; q and k are affine, so no key is
projected. ``"norm"``, ``"random"``: as on Swin.

Sizes: any input whose patch grid has sides that are multiples of the window position table's (8 on the SAM 2
models: timm tiles it over the grid); windows that do not divide a stage's map are padded, as timm pads them. A grid
where a pooling stage entry's padded windows, once pooled, would not tile the pooled map is refused (timm's block
fails there, or at batch 1 broadcasts to several images): by ``size_problem``, and by the forward.
"""
from __future__ import annotations

import torch
from torch import nn

from ..anatomy import Frame
from ..core.macs import BlockWork, conv_macs, linear_macs
from .base import Family, check_block_classes, parse_img_size, recorded_input_size
from .hiera import stage_lists
from .patch_embed import patch_grid
from .swin import SlotBias, SwinAdapter, SwinParts, _ceil_div, _Prep, _Slots

DEFAULT_IMG_SIZE = 224  # for a model built without a pretrained config (the SAM 2 configs say 896 or 1024)


def _timm_classes():
    from timm.models.hieradet_sam2 import HieraDet, MultiScaleAttention, MultiScaleBlock

    return HieraDet, MultiScaleBlock, MultiScaleAttention


class HieraDetParts(SwinParts):
    """timm ``MultiScaleBlock`` + ``MultiScaleAttention`` (of a block that keeps its tokens): pre-norm, fused affine
    q/k/v, no attention dropout, LayerScale where built with it; padding keys are the only additive term."""

    def dropout(self) -> float:
        return 0.0

    def out(self, o, h):
        return self.attn.proj(o)

    def bias(self, where: _Slots) -> SlotBias | None:
        """Padding keys among the selected slots; None for every slot of a window (scoring ranks padding last and no
        real key has a term) or where no window is padded."""
        padding, sel = where.prep.layout.padding, where.sel
        if padding is None or sel is None:
            return None
        windows = torch.arange(sel.shape[1], device=sel.device).view(1, -1, 1)
        return SlotBias(None, None, None, padding[windows, sel].flatten(0, 1))

    def mean_bias(self, where):
        raise NotImplementedError("HieraDet has no class token: there is no token cut loss to need a mean bias")


class HieraDetAdapter(SwinAdapter):
    """timm ``HieraDet``: one block list cut into stages at ``stage_ends``; ``forward_features`` returns the last
    (B, H, W, C) map, which the head pools."""

    name = "timm HieraDet"
    classes = staticmethod(_timm_classes)  # (model, block, attention) classes
    parts_class = HieraDetParts
    variants = "SAM 2's Hiera: sam2_hiera_tiny/small/base_plus/large, hieradet_small"

    def __init__(self, model: nn.Module) -> None:
        _, Block, Attention = self.classes()
        Family.__init__(self, model, stage_lists(model))
        check_block_classes(self.blocks, Block, Attention, "HieraDet", self.variants)
        self._layouts = {}

    def resamples(self, i: int) -> bool:
        """Stage entries widen the tokens and (the first q_pool of them) pool them: they run on every token."""
        blk = self.blocks[i]
        return blk.dim != blk.dim_out or blk.q_stride is not None

    # --- forward -------------------------------------------------------------------------------------------------
    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, Frame]:
        x = self.model._pos_embed(self.model.patch_embed(x))  # (B, H, W, C) in and out of the blocks
        grid = tuple(x.shape[1:3])
        problem = self._pooled_windows_problem(grid)  # timm's block would fail there, or broadcast at batch 1
        if problem is not None:
            raise ValueError(f"this HieraDet cannot run a {grid[0]}x{grid[1]} patch grid: {problem}")
        return x, Frame(grid=grid)

    def finish(self, x: torch.Tensor, frame: Frame) -> torch.Tensor:
        return x  # timm's forward_features ends at the last block's map; the head pools and norms

    def enter_stage(self, s: int, x: torch.Tensor, frame: Frame, row: str | None = None):
        return x, None  # the stage entries are blocks (``resamples``)

    @property
    def checkpointing(self) -> bool:
        return bool(self.model.grad_checkpointing)

    def intermediates(self, maps, final, frame, taken, stopped, options):
        """As timm's HieraDet: the maps as NCHW or NHWC; the map where the run ended."""
        if options.norm or options.output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"{self.name} feature maps: accepted norm=False and output_fmt 'NCHW' or 'NHWC' (timm's "
                             f"HieraDet norms none); got norm={options.norm}, output_fmt={options.output_fmt!r}")
        maps = [y.permute(0, 3, 1, 2) if options.output_fmt == "NCHW" else y for y in maps]
        return maps if options.intermediates_only else (final, maps)

    # --- windows: square windows, or the whole map in a global block ----------------------------------------------
    def window_shift(self, i: int, grid: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
        window = tuple(self.blocks[i].window_size)
        return (window if any(window) else tuple(grid)), (0, 0)

    def prepare(self, i: int, x: torch.Tensor, frame: Frame | None = None) -> _Prep:
        B, H, W, C = x.shape
        layout = self._layout(i, H, W, x.device)
        windows = self._to_windows(self.parts(i).norm1(x), layout)
        return _Prep(x=x, windows=windows, mask=None, layout=layout, table=None)

    # --- sizes and cost model ------------------------------------------------------------------------------------
    def input_size(self) -> tuple[int, int, int]:
        size = recorded_input_size(self.model) or (DEFAULT_IMG_SIZE, DEFAULT_IMG_SIZE)
        return (self.model.in_chans, *size)

    def _patch_grid(self, img_size: int | tuple[int, int] | None) -> tuple[int, int]:
        size = self.input_size()[1:] if img_size is None else parse_img_size(img_size)
        pe = self.model.patch_embed
        if hasattr(pe, "patch_size"):  # timm's PatchEmbed (``patch_size=``): dynamic padding
            return patch_grid(pe, size)
        return conv_macs(pe.proj, size)[1]

    def size_problem(self, size: tuple[int, int]) -> str | None:
        """Any size whose patch grid the window position table tiles, with tokens left at every stage."""
        side = self.model.pos_embed_window.shape[-1]
        grid = self._patch_grid(size)
        if grid[0] % side or grid[1] % side:
            return (f"its patch grid ({grid[0]}x{grid[1]}) must have sides that are multiples of {side}, the window "
                    "position table timm tiles over it")
        if min(self._stage_grids(size)[-1]) < 1:
            return f"the last stage would have no tokens at {size[0]}x{size[1]}"
        return self._pooled_windows_problem(grid)

    def _pooled_windows_problem(self, grid: tuple[int, int]) -> str | None:
        """Why a stage entry cannot pool its padded windows on this patch ``grid``, or None: their pooled windows
        must tile the pooled map, else timm's block fails (or, at batch 1, broadcasts to several images)."""
        grids = self._grids_from(grid)
        for s, blocks in enumerate(self.stage_blocks[1:], start=1):
            blk = self.blocks[blocks[0]]
            if blk.q_stride is None or not blk.is_windowed:
                continue
            window, stride = tuple(blk.window_size), blk.q_stride
            if any(_ceil_div(n, w) != _ceil_div(n // q, w // q) for n, w, q in zip(grids[s - 1], window, stride)):
                return (f"block {blocks[0]} pools windows of {window[0]}x{window[1]} on a {grids[s - 1][0]}x"
                        f"{grids[s - 1][1]} map: its padded windows would not tile the pooled map (timm's HieraDet "
                        "fails there too)")
        return None

    def _stage_grids(self, img_size: int | tuple[int, int] | None) -> list[tuple[int, int]]:
        return self._grids_from(self._patch_grid(img_size))

    def _grids_from(self, grid: tuple[int, int]) -> list[tuple[int, int]]:
        """(H, W) of each stage's map from the patch ``grid``: a pooling stage entry halves it, rounding down
        (MaxPool2d)."""
        grids = []
        for blocks in self.stage_blocks:
            stride = self.blocks[blocks[0]].q_stride
            if stride is not None:
                grid = (grid[0] // stride[0], grid[1] // stride[1])
            grids.append(grid)
        return grids

    def ends_macs(self, img_size) -> int:
        """The patch embedding and the head (its linear layers on every token when it has no pool)."""
        rows, cols = self._patch_grid(img_size)
        last = self._stage_grids(img_size)[-1]
        head_tokens = 1 if self.model.head.pool_type else last[0] * last[1]
        return self.model.patch_embed.proj.weight.numel() * rows * cols + head_tokens * linear_macs(self.model.head)

    def stage_entry_macs(self, s: int, grid: tuple[int, int]) -> int:
        return 0  # the stage entries are blocks, counted by resampling_macs

    def resampling_macs(self, i: int, grid_in: tuple[int, int], grid_out: tuple[int, int]) -> int:
        """A stage entry as timm computes it: the widening proj on every input token; q/k/v and the attention's proj
        on the (padded) window slots, with the pooled queries of each window against all its keys; the MLP on the
        pooled map."""
        blk, attn = self.blocks[i], self.blocks[i].attn
        windows, slots = self._windows(i, grid_in)
        window = self.window_shift(i, grid_in)[0]
        stride = blk.q_stride or (1, 1)
        queries = (window[0] // stride[0]) * (window[1] // stride[1])
        return (grid_in[0] * grid_in[1] * linear_macs(blk.proj)
                + windows * (slots * linear_macs(attn.qkv) + 2 * queries * slots * attn.dim_out
                             + queries * linear_macs(attn.proj))
                + grid_out[0] * grid_out[1] * linear_macs(blk.mlp))

    def extra_macs(self, i: int, work: BlockWork, grid: tuple[int, int], dense: bool) -> int:
        return 0  # no position term inside the blocks

