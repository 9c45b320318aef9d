"""timm ``PoolingVisionTransformer`` (PiT, arXiv 2103.16302; ``pit_*``): stages of timm's ViT ``Block`` on
[class token(s), patch tokens] sequences, joined by a pooling layer that runs a depth-wise stride-2 convolution on
the patch grid and a linear layer on the class tokens.

The blocks have no position terms (the position embedding is added once, at the stem's grid), so each stage is a
sequence any method may gather: Idle picks k of the stage's patches in each idling block, and Evo's global class
attention crosses a pooling by sub-sampling at the grid positions the pooling kernels centre on. Pooling always runs
on the full grid, idle tokens and placeholders included: nothing is dropped, so no spatial structure is lost.
"""
from __future__ import annotations

import torch
from torch import nn

from ..anatomy import BlockParts, Frame, StageEntry
from ..core.feature_maps import to_map, to_tokens
from ..core.macs import conv_macs, linear_macs
from .base import StagedSequenceFamily, built_for_only, parse_img_size
from .timm_vit import VIT_BLOCKS, vit_parts_class


class TimmPit(StagedSequenceFamily):
    name = "timm PiT"
    blocks_use_positions = False  # the position embedding is added at the stem

    def __init__(self, model: nn.Module) -> None:
        from timm.models.pit import Pooling, Transformer

        for s, stage in enumerate(model.transformers):
            if type(stage) is not Transformer:
                raise TypeError(f"stage {s} of this PiT is {type(stage).__name__}; tokenpace supports timm PiT's "
                                "Transformer stages")
            if s > 0 and type(stage.pool) is not Pooling:
                pooling = "has no pooling" if stage.pool is None else f"pools with {type(stage.pool).__name__}"
                raise TypeError(f"stage {s} of this PiT {pooling}; tokenpace supports timm PiT's Pooling (a depth-wise "
                                "convolution and a linear layer on the class tokens) at every stage after the first")
            if not len(stage.blocks):  # its feature map would be taken after the previous stage, before the pooling
                raise TypeError(f"stage {s} of this PiT has no blocks; tokenpace needs at least one in every stage")
            for j, blk in enumerate(stage.blocks):
                if vit_parts_class(blk) is None:
                    raise TypeError(f"block {j} of PiT stage {s} is {type(blk).__name__} with "
                                    f"{type(getattr(blk, 'attn', None)).__name__}; tokenpace supports {VIT_BLOCKS}")
        if model.transformers[0].pool is not None:  # timm's stage 0 never pools
            raise TypeError("stage 0 of this PiT pools the stem's grid; tokenpace supports timm PiT's layout, where "
                            "only later stages pool")
        super().__init__(model, [stage.blocks for stage in model.transformers])

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        try:
            from timm.models.pit import PoolingVisionTransformer
        except ImportError:
            return False
        return isinstance(model, PoolingVisionTransformer)

    # --- structure -----------------------------------------------------------------------------------------------
    @property
    def num_prefix(self) -> int:
        return self.model.num_tokens  # the class token, and the distillation token of pit_*_distilled

    @property
    def has_class_token(self) -> bool:
        return True

    def make_parts(self, i: int) -> BlockParts:
        return vit_parts_class(self.blocks[i])(self.blocks[i])

    def _stage(self, s: int) -> nn.Module:
        return self.model.transformers[s]

    # --- the forward around the blocks ---------------------------------------------------------------------------
    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, Frame]:
        """timm's stem, position embedding and class tokens, then stage 0's entry (it pools nothing): the sequence
        [class tokens, patches in raster order], with the stage's norm as timm applies it."""
        m, size = self.model, tuple(x.shape[-2:])
        x = m.patch_embed(x)
        if x.shape[-2:] != m.pos_embed.shape[-2:]:  # timm fails in the addition below: say which size it takes
            raise ValueError(f"this PiT got a {size[0]}x{size[1]} input; {built_for_only(self.input_size()[1:])}")
        x = m.pos_drop(x + m.pos_embed)
        grid = tuple(x.shape[-2:])
        cls_tokens = m.cls_token.expand(x.shape[0], -1, -1)
        tokens = torch.cat((cls_tokens, to_tokens(x)), dim=1)
        return self._stage(0).norm(tokens), Frame(grid=grid)

    def enter_stage(self, s: int, x: torch.Tensor, frame: Frame, row: str | None = None):
        """Stage s's pooling on every token: the depth-wise convolution on the patch grid, the linear layer on the
        class tokens, then the stage's norm. It has no attention, so no scores come with it."""
        if s == 0:  # pooled nothing: embed made its sequence
            return x, None
        stage, p = self._stage(s), self.num_prefix
        grid = self._grids(frame.grid)[s - 1]
        patches, cls_tokens = stage.pool(to_map(x[:, p:], grid), x[:, :p])
        return stage.norm(torch.cat((cls_tokens, to_tokens(patches)), dim=1)), None

    def stage_entry(self, s: int, device: torch.device) -> StageEntry:
        """The raster positions of stage s-1's grid the pooling kernels centre on (stride 2: every other row and
        column), where Evo's global attention is sub-sampled; the pooling has no attention to evolve it with."""
        # timm's Pooling: stride 2, kernel 3, padding 1, so output (r, c) centres on input (2r, 2c)
        stride = self._stage(s).pool.conv.stride
        (_, cols), (out_rows, out_cols) = self.resolutions(None)[s - 1:s + 1]
        rows = torch.arange(out_rows, device=device) * stride[0]
        centres = rows[:, None] * cols + torch.arange(out_cols, device=device) * stride[1]
        return StageEntry(centres.reshape(-1), attends=False)

    def finish(self, x: torch.Tensor, frame: Frame) -> torch.Tensor:
        """What timm's ``forward_features`` returns: the normed class tokens."""
        return self.model.norm(x[:, :self.num_prefix])

    # --- feature maps --------------------------------------------------------------------------------------------
    def intermediates(self, maps, final, frame, taken, stopped, options):
        """As timm's PiT: each stage's patch tokens as an NCHW grid; the class tokens where the run ended, normed
        when the last stage ran (timm's PiT has no norm for its maps: norm=True is refused, where timm ignores it)."""
        options.only_nchw(self.name)
        if options.norm:
            raise ValueError(f"{self.name} feature maps have no norm (timm's PiT norms only its class tokens and "
                             "ignores norm=True): accepted norm=False")
        grids, p = self._grids(frame.grid), self.num_prefix
        maps = [to_map(y[:, p:], grids[j]) for j, y in zip(taken, maps)]
        if options.intermediates_only:
            return maps
        ended_last = not stopped or max(taken) == len(self.stage_blocks) - 1
        return (self.finish(final, frame) if ended_last else final[:, :p]), maps

    # --- sizes and cost ------------------------------------------------------------------------------------------
    def _grids(self, grid: tuple[int, int]) -> list[tuple[int, int]]:
        """Every stage's patch grid from the stem's ``grid``."""
        grids = [tuple(grid)]
        for stage in list(self.model.transformers)[1:]:
            grids.append(conv_macs(stage.pool.conv, grids[-1])[1])
        return grids

    def _size(self, img_size) -> tuple[int, int]:
        return tuple(self.input_size()[1:]) if img_size is None else parse_img_size(img_size)

    def resolutions(self, img_size) -> list[tuple[int, int]]:
        return self._grids(conv_macs(self.model.patch_embed.conv, self._size(img_size))[1])

    def input_size(self) -> tuple[int, int, int]:
        return (self.model.patch_embed.conv.in_channels, *self.model.patch_embed.img_size)

    def stem_macs(self, img_size) -> int:
        return conv_macs(self.model.patch_embed.conv, self._size(img_size))[0]

    def stage_entry_macs(self, s: int, img_size) -> int:
        pool = self._stage(s).pool
        return conv_macs(pool.conv, self.resolutions(img_size)[s - 1])[0] + self.num_prefix * linear_macs(pool.fc)
