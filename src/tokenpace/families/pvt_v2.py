"""timm ``PyramidVisionTransformerV2`` family (PVTv2-B0..B5 and the linear-attention B2-Li): IdleViT on a pyramid ViT.

Layout. Between blocks the tokens travel as a (B, H, W, C) map, so every block knows its grid from its input; a
block sees them as the raster sequence (B, H*W, C). Stage s's entry (``enter_stage``) applies stage s-1's final
norm, the (B, C, H, W) layout and stage s's overlapping strided-conv patch embedding, all on the full map; the last
stage's norm and layout run in ``forward_features``. At keep=1 this is timm's ``forward_features`` op for op.

Idling (one selection group per image: the whole map). In an idling block the top k tokens run the block and the
others pass through bit-identical:

- attention: the selected queries attend to the keys and values of the *whole* map, reduced as the block always
  reduces them (the R x R strided ``sr`` conv + norm when sr_ratio > 1, the plain map when sr_ratio == 1, the
  7 x 7 pool + 1 x 1 conv + norm + GELU of the linear-attention variant). Idle tokens cannot be dropped from the
  keys: a key is a mix of R x R tokens, and the reduction is cheap next to the queries' work.
- MLP (fc1 -> [ReLU, linear variant] -> 3 x 3 depth-wise conv on the grid -> GELU -> fc2): fc1 runs on the
  selected tokens only; they are scattered into a zero hidden grid (B, N, hidden), the depth-wise conv runs on the
  full grid with idle positions contributing zeros (as padding does at the border), then the selected positions are
  gathered for GELU and fc2. Computing fc1 for idle tokens too would be exact with respect to the dense neighbours
  but cost about half the MLP for every idle token, which is most of what idling saves.
- residuals (with drop-path) only on the selected tokens, scattered back into the map.

Scores. There is no class token, so the default criterion is ``"norm"``: the L2 norm of a token's input feature
(before norm1), free to compute; ``"random"`` is the control. The attention a token receives (``"received"``, used
for windowed Swin) is not offered: with spatial reduction the keys belong to R x R cells rather than to tokens, so
the attention a key receives cannot rank the tokens inside its cell.

Input size. timm's PVTv2 keeps no ``img_size`` (it runs at any size): ``input_size`` is the pretrained config's
``input_size`` when the model was built by ``timm.create_model``, else 224 x 224 (the size of every PVTv2 in timm).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..anatomy import BlockParts, Frame, LinearMap, PlainResidual
from ..blockops import attention_branch
from ..core.feature_maps import to_map, to_tokens
from ..core.macs import BlockShape, BlockWork, conv_macs, linear_macs
from ..core.tokens import flat_rows, gather_rows, scatter_rows
from ..scoring import token_norms
from .base import GROUPED, Family, GroupCount, parse_img_size, recorded_input_size

DEFAULT_IMG_SIZE = 224  # every timm PVTv2 config; used when the model carries no pretrained config


def _timm_classes():
    from timm.models.pvt_v2 import Attention, Block, MlpWithDepthwiseConv, PyramidVisionTransformerV2

    return PyramidVisionTransformerV2, Block, Attention, MlpWithDepthwiseConv


def _pair(v: int | tuple[int, ...]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (v[0], v[1])


@dataclass
class _Prep:
    """One idling block's shared state: the raster tokens (B, N, C), their norm1 output and the grid."""

    tokens: torch.Tensor
    normed: torch.Tensor
    grid: tuple[int, int]


@dataclass(frozen=True)
class _Selected:
    """The selected queries ``sel`` (B, k) of a map; keys and values come from the whole map in ``prep``. ``rows``:
    ``sel`` as rows of the flattened map (core.tokens.flat_rows), shared by every gather and scatter of the block."""

    prep: _Prep
    sel: torch.Tensor
    rows: torch.Tensor


class PvtParts(PlainResidual, BlockParts):
    """timm pvt_v2 ``Block``: queries of the tokens present, keys and values of the whole (spatially reduced) map,
    and an MLP whose depth-wise conv runs on the full grid."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__(block)
        attn = self.attn = self.hold(block, "attn")
        self.num_heads, self.scale = attn.num_heads, attn.scale
        self.require_plain_linear(attn, "q", f"attn.q of a {type(block).__name__}")

    def dropout(self) -> float:
        return self.attn.attn_drop.p if self.attn.training else 0.0

    def qkv(self, h, where: _Selected):
        attn, prep = self.attn, where.prep
        B, k, C = h.shape
        q = attn.q(h).reshape(B, k, self.num_heads, -1).permute(0, 2, 1, 3)
        src, (H, W) = prep.normed, prep.grid
        if attn.sr is not None:  # spatial reduction (or the linear variant's pool + 1x1 conv) on the full map
            grid = to_map(src, (H, W))
            grid = attn.sr(attn.pool(grid) if attn.pool is not None else grid)
            src = attn.norm(to_tokens(grid))
            if attn.act is not None:
                src = attn.act(src)
        kv = attn.kv(src).reshape(B, -1, 2, self.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        return q, *kv.unbind(0)

    def out(self, o, h):
        return self.attn.proj_drop(self.attn.proj(o))

    def mlp(self, h, where: _Selected):
        """``MlpWithDepthwiseConv`` on the selected tokens h (B, k, C); idle grid positions hold zero hidden."""
        mlp, grid = self.block.mlp, where.prep.grid
        h = mlp.relu(mlp.fc1(h))  # ReLU before scattering: relu(0) = 0 at the idle positions either way
        B, k, hidden = h.shape
        full = scatter_rows(h.new_zeros(B, grid[0] * grid[1], hidden), where.rows, h)
        full = to_tokens(mlp.dwconv(to_map(full, grid)))
        return mlp.drop(mlp.fc2(mlp.drop(mlp.act(gather_rows(full, where.rows)))))

    def linear_queries(self):
        return LinearMap(self.attn.q.weight, self.attn.q.bias)

    def shape(self) -> BlockShape:
        """Per query token; the keys' work (reduction, kv) and the depth-wise conv are counted on the grid."""
        attn, mlp = self.attn, self.block.mlp
        width = attn.num_heads * attn.head_dim
        return BlockShape(dim=attn.q.in_features, qk_dim=width, v_dim=width, qkv=linear_macs(attn.q),
                          proj=linear_macs(attn.proj), mlp=linear_macs(mlp.fc1) + linear_macs(mlp.fc2))


class PvtV2Adapter(Family):
    name = "timm PyramidVisionTransformerV2"
    layout = GROUPED
    keys_per_token = False  # a key mixes R x R tokens: the attention a token receives is not defined

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model, [stage.blocks for stage in model.stages])
        _, Block, Attention, Mlp = _timm_classes()
        for i, blk in enumerate(self.blocks):
            if type(blk) is not Block or type(blk.attn) is not Attention or type(blk.mlp) is not Mlp:
                raise TypeError(
                    f"block {i} of this PyramidVisionTransformerV2 is {type(blk).__name__} with "
                    f"{type(blk.attn).__name__} and {type(blk.mlp).__name__}; tokenpace supports timm's pvt_v2 Block "
                    "with its Attention (spatial reduction or linear) and MlpWithDepthwiseConv (pvt_v2_b0..b5, b2_li)"
                )

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        try:
            PyramidVisionTransformerV2 = _timm_classes()[0]
        except ImportError:  # timm not installed: nothing of this family can exist
            return False
        return isinstance(model, PyramidVisionTransformerV2)

    def make_parts(self, i: int) -> PvtParts:
        return PvtParts(self.blocks[i])

    # --- forward -------------------------------------------------------------------------------------------------
    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, Frame]:
        x = self.model.patch_embed(x)  # (B, H, W, C) in and out of the blocks
        return x, Frame(grid=tuple(x.shape[1:3]))

    def finish(self, x: torch.Tensor, frame: Frame) -> torch.Tensor:
        return self._stage_map(len(self.model.stages) - 1, x)

    def enter_stage(self, s: int, x: torch.Tensor, frame: Frame, row: str | None = None):
        stages = self.model.stages
        if s > 0:  # the end of stage s-1 as timm runs it: its norm, then the (B, C, H, W) layout
            x = stages[s - 1].norm(x).permute(0, 3, 1, 2).contiguous()
        if stages[s].downsample is not None:
            return stages[s].downsample(x), None  # (B, C, H, W) -> (B, H', W', C')
        return (x.permute(0, 2, 3, 1) if s > 0 else x), None

    @property
    def checkpointing(self) -> bool:
        return any(stage.grad_checkpointing for stage in self.model.stages)

    def _stage_map(self, s: int, x: torch.Tensor) -> torch.Tensor:
        """Stage s's output as timm gives it: its norm, then NCHW."""
        return self.model.stages[s].norm(x).permute(0, 3, 1, 2).contiguous()

    def intermediates(self, maps, final, frame, taken, stopped, options):
        """As timm's PVTv2: each stage's output (its norm applied) as NCHW; the last stage run is the final."""
        options.only_nchw(self.name)
        maps = [self._stage_map(j, y) for j, y in zip(taken, maps)]
        if options.intermediates_only:
            return maps
        return (self._stage_map(max(taken), final) if stopped else self.finish(final, frame)), maps

    def block(self, i: int, x: torch.Tensor, frame: Frame) -> torch.Tensor:
        B, H, W, C = x.shape
        return self.blocks[i](x.reshape(B, H * W, C), (H, W)).reshape(B, H, W, C)

    # --- selection groups: the whole map -------------------------------------------------------------------------
    def group_size(self, i: int, x: torch.Tensor) -> int:
        return x.shape[1] * x.shape[2]

    def prepare(self, i: int, x: torch.Tensor, frame: Frame | None = None) -> _Prep:
        B, H, W, C = x.shape
        tokens = x.reshape(B, H * W, C)
        return _Prep(tokens=tokens, normed=self.blocks[i].norm1(tokens), grid=(H, W))

    def score_shape(self, prep: _Prep) -> tuple[int, int, int]:
        return (prep.tokens.shape[0], 1, prep.tokens.shape[1])

    def token_scores(self, i: int, prep: _Prep, score: str, project_keys: bool = False) -> torch.Tensor:
        if score != "norm":
            raise ValueError(f"score {score!r} is not available for {self.name} models; accepted here: 'norm', "
                             "'random'")
        return token_norms(prep.tokens).unsqueeze(1)

    def run_selected(self, i: int, x: torch.Tensor, prep: _Prep, idx: torch.Tensor, keep_qk: bool = False):
        parts, sel = self.parts(i), idx[:, 0]  # one group per image
        tokens = x.reshape(prep.tokens.shape)
        rows = flat_rows(sel, tokens.shape[1])  # once for every gather and scatter of the block
        where = _Selected(prep, sel, rows)
        y = parts.res_attn(gather_rows(tokens, rows), attention_branch(parts, gather_rows(prep.normed, rows),
                                                                       where)[0])
        y = parts.res_mlp(y, parts.mlp(parts.norm2(y), where))
        return scatter_rows(tokens, rows, y).reshape(x.shape), None  # in place under no_grad, as on flat models

    def raster_positions(self, i: int, prep: _Prep, idx: torch.Tensor) -> torch.Tensor:
        return idx.reshape(idx.shape[0], -1)  # tokens are the stage grid in raster order

    # --- sizes ---------------------------------------------------------------------------------------------------
    def input_size(self) -> tuple[int, int, int]:
        return (self.model.in_chans, *(recorded_input_size(self.model) or (DEFAULT_IMG_SIZE, DEFAULT_IMG_SIZE)))

    def _input_grid(self, img_size: int | tuple[int, int] | None) -> tuple[int, int]:
        return self.input_size()[1:] if img_size is None else parse_img_size(img_size)

    def stage_grids(self, img_size: int | tuple[int, int] | None) -> list[tuple[int, int]]:
        """(rows, cols) of every stage's token grid for ``img_size`` (None: the model's input size)."""
        grid = conv_macs(self.model.patch_embed.proj, self._input_grid(img_size))[1]
        grids = []
        for stage in self.model.stages:
            if stage.downsample is not None:
                grid = conv_macs(stage.downsample.proj, grid)[1]
            grids.append(grid)
        return grids

    def block_grid(self, i: int) -> tuple[int, int]:
        return self.stage_grids(None)[self.stage_of_block(i)]

    def size_problem(self, size: tuple[int, int]) -> str | None:
        """PVTv2 runs any size whose every stage keeps a token grid and every attention at least one key."""
        for s, grid in enumerate(self.stage_grids(size)):
            attn = self.blocks[self.stage_blocks[s][0]].attn
            keys = grid if attn.sr is None or attn.pool is not None else conv_macs(attn.sr, grid)[1]
            if min(*grid, *keys) < 1:
                return f"stage {s} would have no tokens (or no keys) left at {size[0]}x{size[1]}"
        return None

    # --- cost model ----------------------------------------------------------------------------------------------
    def group_counts(self, img_size) -> list[GroupCount]:
        grids = self.stage_grids(img_size)
        return [GroupCount(1, grids[s][0] * grids[s][1]) for s, blocks in enumerate(self.stage_blocks)
                for _ in blocks]

    def count_macs(self, works: list[BlockWork] | None, img_size) -> int:
        """Convolutions, linear layers and attention matmuls; norms, activations, pooling and scores cost 0."""
        m = self.model
        grids = self.stage_grids(img_size)
        total = conv_macs(m.patch_embed.proj, self._input_grid(img_size))[0] + linear_macs(m.head)
        for s, (stage, blocks) in enumerate(zip(m.stages, self.stage_blocks)):
            if stage.downsample is not None:  # stage 0 has none: its embedding is patch_embed
                total += conv_macs(stage.downsample.proj, grids[s - 1])[0]
            n = grids[s][0] * grids[s][1]
            for i in blocks:
                k = works[i].attn_tokens if works is not None else n
                total += self._block_macs(self.blocks[i], grids[s], k)
        return total

    @staticmethod
    def _block_macs(blk: nn.Module, grid: tuple[int, int], k: int) -> int:
        """One block with k of its grid's tokens attending and through the MLP (k = rows * cols: dense)."""
        attn, mlp = blk.attn, blk.mlp
        keys_grid = grid
        total = 0
        if attn.pool is not None:
            keys_grid = _pair(attn.pool.output_size)
        if attn.sr is not None:
            sr_macs, keys_grid = conv_macs(attn.sr, keys_grid)
            total += sr_macs
        m = keys_grid[0] * keys_grid[1]
        total += m * linear_macs(attn.kv) + 2 * k * m * attn.num_heads * attn.head_dim
        total += k * (linear_macs(attn.q) + linear_macs(attn.proj) + linear_macs(mlp.fc1) + linear_macs(mlp.fc2))
        return total + conv_macs(mlp.dwconv, grid)[0]  # the depth-wise conv runs on the full hidden grid
