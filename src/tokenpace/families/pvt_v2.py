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
import torch.nn.functional as F
from torch import nn

from ..core.macs import conv_macs, linear_macs
from ..core.schedule import keep_count
from ..core.tokens import gather_tokens, scatter_tokens
from .base import RunBlocks, parse_img_size
from .grid import GridAdapter

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


class PvtV2Adapter(GridAdapter):
    name = "timm PyramidVisionTransformerV2"
    scores = ("norm", "random")

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

    # --- forward -------------------------------------------------------------------------------------------------
    def forward_features(self, x: torch.Tensor, run_blocks: RunBlocks) -> torch.Tensor:
        m = self.model
        x = run_blocks(m.patch_embed(x))  # (B, H, W, C) in and out
        return m.stages[-1].norm(x).permute(0, 3, 1, 2).contiguous()

    def enter_stage(self, s: int, x: torch.Tensor) -> torch.Tensor:
        stages = self.model.stages
        if s > 0:  # the end of stage s-1 as timm runs it: its norm, then the (B, C, H, W) layout
            x = stages[s - 1].norm(x).permute(0, 3, 1, 2).contiguous()
        if stages[s].downsample is not None:
            return stages[s].downsample(x)  # (B, C, H, W) -> (B, H', W', C')
        return x.permute(0, 2, 3, 1) if s > 0 else x

    def block(self, i: int, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        return self.blocks[i](x.reshape(B, H * W, C), (H, W)).reshape(B, H, W, C)

    # --- idling --------------------------------------------------------------------------------------------------
    def group_size(self, i: int, x: torch.Tensor) -> int:
        return x.shape[1] * x.shape[2]

    def prepare(self, i: int, x: torch.Tensor) -> _Prep:
        B, H, W, C = x.shape
        tokens = x.reshape(B, H * W, C)
        return _Prep(tokens=tokens, normed=self.blocks[i].norm1(tokens), grid=(H, W))

    def score_shape(self, prep: _Prep) -> tuple[int, int, int]:
        return (prep.tokens.shape[0], 1, prep.tokens.shape[1])

    def token_scores(self, i: int, prep: _Prep, score: str) -> torch.Tensor:
        if score != "norm":
            raise ValueError(f"score {score!r} is not available for {self.name} models; "
                             f"accepted here: {', '.join(map(repr, self.scores))}")
        return torch.linalg.vector_norm(prep.tokens, dim=-1, dtype=torch.float32).unsqueeze(1)

    def run_selected(self, i: int, x: torch.Tensor, prep: _Prep, idx: torch.Tensor) -> torch.Tensor:
        blk = self.blocks[i]
        sel = idx[:, 0]  # (B, k): one group per image
        tokens = x.reshape(prep.tokens.shape)
        y = gather_tokens(tokens, sel) + blk.drop_path1(self._attend(blk.attn, prep, sel))
        y = y + blk.drop_path2(self._mlp(blk.mlp, blk.norm2(y), sel, prep.grid))
        return scatter_tokens(tokens, sel, y).reshape(x.shape)  # in place under no_grad, as on flat models

    @staticmethod
    def _attend(attn: nn.Module, prep: _Prep, sel: torch.Tensor) -> torch.Tensor:
        """timm pvt_v2 ``Attention.forward`` for the queries ``sel`` (B, k) against the keys of the whole map."""
        normed, (H, W) = prep.normed, prep.grid
        B, N, C = normed.shape
        k = sel.shape[1]
        q = attn.q(gather_tokens(normed, sel)).reshape(B, k, attn.num_heads, -1).permute(0, 2, 1, 3)
        src = normed
        if attn.sr is not None:  # spatial reduction (or the linear variant's pool + 1x1 conv) on the full map
            grid = normed.permute(0, 2, 1).reshape(B, C, H, W)
            grid = attn.sr(attn.pool(grid) if attn.pool is not None else grid)
            src = attn.norm(grid.reshape(B, C, -1).permute(0, 2, 1))
            if attn.act is not None:
                src = attn.act(src)
        kv = attn.kv(src).reshape(B, -1, 2, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        keys, values = kv.unbind(0)
        if attn.fused_attn:
            out = F.scaled_dot_product_attention(q, keys, values, dropout_p=attn.attn_drop.p if attn.training else 0.)
        else:
            weights = ((q * attn.scale) @ keys.transpose(-2, -1)).softmax(dim=-1)
            out = attn.attn_drop(weights) @ values
        return attn.proj_drop(attn.proj(out.transpose(1, 2).reshape(B, k, C)))

    @staticmethod
    def _mlp(mlp: nn.Module, h: torch.Tensor, sel: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """``MlpWithDepthwiseConv`` on the selected tokens h (B, k, C); idle grid positions hold zero hidden."""
        h = mlp.relu(mlp.fc1(h))  # ReLU before scattering: relu(0) = 0 at the idle positions either way
        B, k, hidden = h.shape
        N = grid[0] * grid[1]
        full = scatter_tokens(h.new_zeros(B, N, hidden), sel, h)
        full = mlp.dwconv(full.transpose(1, 2).reshape(B, hidden, *grid)).flatten(2).transpose(1, 2)
        h = mlp.drop(mlp.act(gather_tokens(full, sel)))
        return mlp.drop(mlp.fc2(h))

    def raster_positions(self, i: int, prep: _Prep, idx: torch.Tensor) -> torch.Tensor:
        return idx.reshape(idx.shape[0], -1)  # tokens are the stage grid in raster order

    # --- sizes ---------------------------------------------------------------------------------------------------
    def input_size(self) -> tuple[int, int, int]:
        cfg = getattr(self.model, "pretrained_cfg", None) or {}
        _, H, W = cfg.get("input_size", (None, DEFAULT_IMG_SIZE, DEFAULT_IMG_SIZE))
        return (self.model.in_chans, H, W)

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

    # --- cost model ----------------------------------------------------------------------------------------------
    def count_macs(self, policy, img_size: int | tuple[int, int] | None) -> int:
        """Convolutions, linear layers and attention matmuls; norms, activations, pooling and scores cost 0."""
        m = self.model
        grids = self.stage_grids(img_size)
        total = conv_macs(m.patch_embed.proj, self._input_grid(img_size))[0] + linear_macs(m.head)
        for s, (stage, blocks) in enumerate(zip(m.stages, self.stage_blocks)):
            if stage.downsample is not None:  # stage 0 has none: its embedding is patch_embed
                total += conv_macs(stage.downsample.proj, grids[s - 1])[0]
            n = grids[s][0] * grids[s][1]
            for i in blocks:
                ratio = policy.keep_ratio(i) if policy is not None else None
                total += self._block_macs(self.blocks[i], grids[s], keep_count(n, ratio) if ratio is not None else n)
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
