"""timm ``VisionTransformer``: DeiT (and distilled), ViT/AugReg, DeiT-III/LayerScale, registers, qk-norm, gated
attention, SigLIP/SigLIP2 and AIMv2 (no class token, MAP or average pooling), SwiGLU/GeGLU MLPs, RmsNorm.

Blocks are timm's pre-norm ``Block`` with the standard ``Attention``, post-norm ``ResPostBlock``, or those of
``vit_blocks.py`` (differential attention, parallel blocks); there are no position terms inside the blocks (absolute
position embeddings are added at the embedding), so a block runs on any subset as it is.
"""
from __future__ import annotations

from dataclasses import asdict

import torch
import torch.nn.functional as F
from torch import nn

from ..anatomy import BlockParts, Frame, LinearMap, PostNorm, qkv_rows
from ..core.feature_maps import vit_intermediates
from ..core.macs import BlockShape, linear_macs
from .base import SequenceFamily, parse_img_size
from .patch_embed import patch_embed_size_problem, patch_grid

POOLS = ("token", "avg", "avgmax", "max", "map", "")
VIT_BLOCKS = ("timm's pre-norm Block (the standard Attention or DiffAttention), post-norm ResPostBlock, "
              "ParallelScalingBlock, DiffParallelScalingBlock and ParallelThingsBlock with the standard Attention")


def _timm_classes():
    from timm.layers import Attention
    from timm.models.vision_transformer import Block, ResPostBlock, VisionTransformer

    return VisionTransformer, (Block, ResPostBlock), Attention


def counted_macs(module: nn.Module, input_size: tuple[int, int, int]) -> int:
    """MACs of ``module`` on one image of ``input_size`` (C, H, W), counted by torch's FlopCounterMode on an input of
    the module's own device (no compute on the meta device)."""
    from torch.utils.flop_counter import FlopCounterMode

    param = next(module.parameters())
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        module(torch.zeros(1, *input_size, device=param.device, dtype=param.dtype))
    return counter.get_total_flops() // 2


def attention_pool_macs(pool: nn.Module | None, tokens: int) -> int:
    """A MAP head (timm ``AttentionPoolLatent``) over ``tokens`` tokens: their keys and values, the latent queries,
    the two attention products, projection and MLP."""
    if pool is None:
        return 0
    latents, width = pool.latent.shape[1], pool.kv.out_features // 2
    return (tokens * linear_macs(pool.kv) + 2 * latents * tokens * width
            + latents * (linear_macs(pool.q) + linear_macs(pool.proj) + linear_macs(pool.mlp)))


def has_fixed_length_pool(model: nn.Module) -> bool:
    """An attention pool with its own position embedding needs every token in order."""
    return getattr(getattr(model, "attn_pool", None), "pos_embed", None) is not None


def check_pool(model: nn.Module) -> None:
    if model.global_pool not in POOLS:
        raise TypeError(f"global_pool={model.global_pool!r} of this {type(model).__name__} is not supported; "
                        f"accepted: {', '.join(map(repr, POOLS))}")


class VitParts(BlockParts):
    """timm ``Block`` + ``Attention``: fused q/k/v, optional per-head q/k norms, inner norm and sigmoid gate."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__(block)
        attn = self.attn = self.hold(block, "attn")
        self.num_heads, self.scale = attn.num_heads, attn.scale
        self.head_dim = getattr(attn, "head_dim", None) or attn.qkv.out_features // (3 * attn.num_heads)
        self.width = attn.num_heads * self.head_dim
        self.q_norm, self.k_norm, self.inner_norm = (self._norm(attn, n) for n in ("q_norm", "k_norm", "norm"))
        for name in ("qkv", "q_proj", "k_proj", "v_proj"):  # the fused projection, or EVA's separate ones
            if getattr(attn, name, None) is not None:
                self.require_plain_linear(attn, name, f"attn.{name} of a {type(block).__name__}")

    def _norm(self, attn: nn.Module, name: str) -> nn.Module:
        """The attention's norm ``name`` (held), or an Identity where it has none (BEiT's attention)."""
        return self.hold(attn, name, f"attn.{name}") if isinstance(getattr(attn, name, None), nn.Module) else \
            nn.Identity()

    def dropout(self) -> float:
        return self.attn.attn_drop.p if self.attn.training else 0.0

    def _split(self, t: torch.Tensor, parts: int) -> torch.Tensor:
        B, n, _ = t.shape
        return t.reshape(B, n, parts, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)

    def _weights(self, j: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Row block j (0: q, 1: k, 2: v) of the fused projection, and its bias."""
        rows = qkv_rows(self.attn, j, self.width)
        return rows.weight, rows.bias

    def qkv(self, h, where):
        q, k, v = self._split(self.attn.qkv(h), 3).unbind(0)
        return self.q_norm(q), self.k_norm(k), v

    def queries(self, h, where):
        return self.q_norm(self._split(F.linear(h, *self._weights(0)), 1)[0])

    def keys(self, h, where):
        return self.k_norm(self._split(F.linear(h, *self._weights(1)), 1)[0])

    def values(self, h, where):
        return self._split(F.linear(h, *self._weights(2)), 1)[0]

    def out(self, o, h):
        attn = self.attn
        o = self.inner_norm(o)
        if getattr(attn, "gate", None) is not None:
            o = o * attn.gate(h).sigmoid()
        return attn.proj_drop(attn.proj(o))

    def linear_queries(self):
        return LinearMap(*self._weights(0)) if isinstance(self.q_norm, nn.Identity) else None

    def linear_keys(self):
        return LinearMap(*self._weights(1)) if self.keys_affine() else None

    def keys_affine(self):
        return isinstance(self.k_norm, nn.Identity)

    def shape(self) -> BlockShape:
        attn = self.attn
        return BlockShape(dim=attn.qkv.in_features, qk_dim=self.width, v_dim=self.width, qkv=linear_macs(attn.qkv),
                          proj=linear_macs(attn.proj) + linear_macs(getattr(attn, "gate", None)),
                          mlp=linear_macs(getattr(self.block, "mlp", None)))  # none on a parallel branch


class PostNormVitParts(PostNorm, VitParts):
    """timm ``ResPostBlock`` (``vit_*_rpn_*``): the standard attention, post-norm residuals."""


def vit_parts_class(block: nn.Module) -> type[BlockParts] | None:
    """The parts that read a timm ViT block (pre-norm ``Block`` or post-norm ``ResPostBlock`` with the standard
    ``Attention``; differential attention and the parallel blocks: ``vit_blocks.py``), or None for any other."""
    _, (pre_norm, post_norm), Attention = _timm_classes()
    if type(getattr(block, "attn", None)) is Attention and type(block) in (pre_norm, post_norm):
        return VitParts if type(block) is pre_norm else PostNormVitParts
    from .vit_blocks import other_vit_parts_class  # here, not at the top: vit_blocks builds on VitParts

    return other_vit_parts_class(block)


def check_blocks(model: nn.Module, kind: str, readable, supported: str) -> None:
    """TypeError naming the first of the model's blocks its family cannot read (``readable(block)`` false), with the
    block's attention, and what the family supports."""
    for i, blk in enumerate(model.blocks):
        if not readable(blk):
            attn = getattr(blk, "attn", None)
            if attn is None and getattr(blk, "attns", None):  # parallel branches: the first unreadable attention
                _, _, Attention = _timm_classes()
                attn = next((a for a in (getattr(b, "attn", None) for b in blk.attns) if type(a) is not Attention),
                            None)
            raise TypeError(f"block {i} of this {kind} is {type(blk).__name__} with "
                            f"{type(attn).__name__ if attn is not None else 'no separate attention'}; tokenpace "
                            f"supports {supported}")


class PatchSequenceFamily(SequenceFamily):
    """A flat timm model: one patch embedding (``patch_embed``), ``num_prefix_tokens`` prefix tokens, one stage of
    ``blocks`` (or the ``blocks`` given: VOLO's, gathered from its stages), a final ``norm``; the family checks its
    blocks and pooling before building."""

    def __init__(self, model: nn.Module, blocks: list[nn.Module] | None = None) -> None:
        check_pool(model)
        patch_drop = getattr(model, "patch_drop", None)  # None or an Identity when off, as timm's classes keep it
        if patch_drop is not None and not isinstance(patch_drop, nn.Identity):
            raise TypeError("patch dropout (patch_drop_rate > 0) changes the token count before the blocks; "
                            "build the model with patch_drop_rate=0 to use tokenpace")
        super().__init__(model, [model.blocks if blocks is None else blocks])
        self.fixed_length_head = has_fixed_length_pool(model)

    @property
    def num_prefix(self) -> int:
        return self.model.num_prefix_tokens

    @property
    def has_class_token(self) -> bool:
        return self.model.cls_token is not None

    def finish(self, x: torch.Tensor, frame: Frame) -> torch.Tensor:
        return self.model.norm(x)

    def feature_points(self) -> list[int]:
        return list(range(self.depth))  # flat models index blocks

    def intermediates(self, maps, final, frame, taken, stopped, options):
        """As timm's ViT/Eva ``forward_intermediates`` (core.feature_maps)."""
        return vit_intermediates(maps, final, self.model.norm, self.num_prefix, frame.grid, **asdict(options))

    def patch_grid_at(self, img_size) -> tuple[int, int]:
        """(rows, cols) of the patch tokens at ``img_size`` (None: the model's own)."""
        return patch_grid(self.model.patch_embed, None if img_size is None else parse_img_size(img_size))

    def block_grid(self, i: int) -> tuple[int, int]:
        return self.patch_grid_at(None)

    def stage_patches(self, img_size) -> list[int]:
        rows, cols = self.patch_grid_at(img_size)
        return [rows * cols]

    def stem_macs(self, img_size) -> int:
        pe = self.model.patch_embed
        if hasattr(pe, "backbone"):  # a hybrid stem (ResNet, ViTamin's MbConv stages): counted by running it
            size = pe.img_size if img_size is None else parse_img_size(img_size)
            return counted_macs(pe, (self._in_chans(), *size))
        proj = pe.proj
        return proj.weight.numel() * self.stage_patches(img_size)[0] if isinstance(proj, nn.Conv2d) else 0

    def _in_chans(self) -> int:
        return getattr(self.model, "in_chans", None) or next(
            m.in_channels for m in self.model.patch_embed.modules() if isinstance(m, nn.Conv2d))

    def input_size(self) -> tuple[int, int, int]:
        pe = self.model.patch_embed
        return (self._in_chans() if hasattr(pe, "backbone") else pe.proj.in_channels, *pe.img_size)

    def size_problem(self, size: tuple[int, int]) -> str | None:
        return patch_embed_size_problem(self.model.patch_embed, size, "dynamic_img_size=True")

    def head_macs(self, tokens: int) -> int:
        m = self.model
        pooled = tokens if getattr(m, "pool_include_prefix", True) else tokens - self.num_prefix
        return (linear_macs(m.head) + linear_macs(getattr(m, "head_dist", None))
                + attention_pool_macs(getattr(m, "attn_pool", None), pooled))


class TimmViT(PatchSequenceFamily):
    name = "timm VisionTransformer"
    blocks_use_positions = False  # absolute position embeddings are added at the embedding

    def __init__(self, model: nn.Module) -> None:
        check_blocks(model, "VisionTransformer", lambda blk: vit_parts_class(blk) is not None, VIT_BLOCKS)
        super().__init__(model)

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        try:
            VisionTransformer = _timm_classes()[0]
        except ImportError:  # timm not installed: nothing of this family can exist
            return False
        return isinstance(model, VisionTransformer)

    def make_parts(self, i: int) -> BlockParts:
        return vit_parts_class(self.blocks[i])(self.blocks[i])

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, Frame]:
        m = self.model
        grid = patch_grid(m.patch_embed, tuple(x.shape[-2:]))
        x = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x))))
        return x, Frame(grid=grid)

    def block(self, i: int, x: torch.Tensor, frame: Frame) -> torch.Tensor:
        return self.blocks[i](x)
