"""timm ``Eva``: EVA-02 (``eva02_*``), DINOv3 (``vit_*_dinov3*``), PE core (``vit_pe_core_*``), RoPE ViTs
(``vit_*_rope_*``), EVA-CLIP towers.

The blocks are pre-norm with rotary position embeddings applied inside attention to the non-prefix tokens: the RoPE
table (per depth and head in the ``mixed`` form) is gathered at the positions of the tokens present, and tokens
without a position (class and register tokens, Evo's representative token, EViT's fused token) are not rotated.
Also: fused or separate q/k/v with EVA's zero key bias, grouped-query attention, qk-norm, LayerScale (``gamma_*``),
SwiGLU / GLU MLPs, class token or not, average, token and MAP pooling.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..anatomy import Frame, PostNorm, TokenSet, fused_qkv_bias
from ..core.macs import BlockShape, linear_macs
from .patch_embed import patch_grid
from .timm_vit import PatchSequenceFamily, VitParts, check_blocks


def _timm_classes():
    from timm.layers import AttentionRope
    from timm.models.eva import Eva, EvaAttention, EvaBlock, EvaBlockPostNorm

    return Eva, (EvaBlock, EvaBlockPostNorm), (EvaAttention, AttentionRope)


def rope_at(table: torch.Tensor, where: TokenSet) -> torch.Tensor:
    """The sin/cos rows of ``table`` ((N, D), or (H, N, D) per head) at the patch positions of ``where``, shaped
    (B, 1 or H, m, D) (or the table itself when every patch is present in order). Position -1 (a token without a
    position) gets the identity rotation (sin 0, cos 1)."""
    if where.pos is None:
        return table
    pos = where.pos.clamp(min=0) if where.holes else where.pos
    rows = table[pos].unsqueeze(1) if table.ndim == 2 else table[:, pos].transpose(0, 1)
    if where.holes:
        half = table.shape[-1] // 2
        identity = torch.cat([table.new_zeros(half), table.new_ones(half)])
        rows = torch.where((where.pos >= 0)[:, None, :, None], rows, identity)
    return rows


def block_rope(rope: torch.Tensor | None, i: int, mixed: bool) -> torch.Tensor | None:
    """The RoPE table block i takes: its own of a per-depth (``mixed``) table, else the one every block shares."""
    return rope[i] if rope is not None and mixed else rope


class EvaParts(VitParts):
    """``EvaBlock`` with ``EvaAttention`` or ``AttentionRope``."""

    def __init__(self, block: nn.Module, index: int, has_rope: bool, mixed: bool) -> None:
        super().__init__(block)
        attn = self.attn
        self.index, self.has_rope, self.mixed = index, has_rope, mixed
        self.kv_heads = getattr(attn, "num_kv_heads", attn.num_heads)
        self.half = getattr(attn, "rotate_half", False)

    def _weights(self, j: int):
        """Row block j of the fused projection (EVA's separate q/k/v biases included), or projection j itself."""
        attn = self.attn
        if attn.qkv is None:
            proj = (attn.q_proj, attn.k_proj, attn.v_proj)[j]
            return proj.weight, proj.bias
        return super()._weights(j)

    def _heads(self, t: torch.Tensor, heads: int) -> torch.Tensor:
        B, n, _ = t.shape
        return t.reshape(B, n, heads, self.head_dim).transpose(1, 2)

    def _rotate(self, t: torch.Tensor, where: TokenSet | None) -> torch.Tensor:
        if not self.has_rope or where is None:
            return t
        from timm.layers import apply_rot_embed_cat

        rope = rope_at(block_rope(where.frame.rope, self.index, self.mixed), where)
        p, m = where.prefix, rope.shape[-2]
        rotated = apply_rot_embed_cat(t[:, :, p:p + m], rope, half=self.half)
        return torch.cat([t[:, :, :p], rotated, t[:, :, p + m:]], dim=2)

    def _expand(self, t: torch.Tensor) -> torch.Tensor:
        groups = self.num_heads // self.kv_heads
        return t.repeat_interleave(groups, dim=1) if groups > 1 else t

    def qkv(self, h, where):
        attn = self.attn
        if attn.qkv is not None:
            q, k, v = self._split(F.linear(h, attn.qkv.weight, fused_qkv_bias(attn)), 3).unbind(0)
        else:
            q = self._heads(attn.q_proj(h), self.num_heads)
            k, v = self._heads(attn.k_proj(h), self.kv_heads), self._heads(attn.v_proj(h), self.kv_heads)
        q, k = self._rotate(self.q_norm(q), where), self._rotate(self.k_norm(k), where)
        return q.type_as(v), self._expand(k.type_as(v)), self._expand(v)

    def queries(self, h, where):
        q = self._heads(F.linear(h, *self._weights(0)), self.num_heads)
        return self._rotate(self.q_norm(q), where)

    def keys(self, h, where):
        k = self._heads(F.linear(h, *self._weights(1)), self.kv_heads)
        return self._expand(self._rotate(self.k_norm(k), where))

    def values(self, h, where):
        return self._expand(self._heads(F.linear(h, *self._weights(2)), self.kv_heads))

    def res_attn(self, x, y):
        blk = self.block
        return x + blk.drop_path1(y if blk.gamma_1 is None else blk.gamma_1 * y)

    def res_mlp(self, x, y):
        blk = self.block
        return x + blk.drop_path2(y if blk.gamma_2 is None else blk.gamma_2 * y)

    def linear_queries(self):
        return None if self.has_rope else super().linear_queries()

    def keys_affine(self):
        return not self.has_rope and self.kv_heads == self.num_heads and super().keys_affine()

    def shape(self) -> BlockShape:
        attn = self.attn
        qkv = sum(linear_macs(getattr(attn, name, None)) for name in ("qkv", "q_proj", "k_proj", "v_proj"))
        dim = attn.proj.out_features
        return BlockShape(dim=dim, qk_dim=self.width, v_dim=self.width, qkv=qkv,
                          proj=linear_macs(attn.proj) + linear_macs(getattr(attn, "gate", None)),
                          mlp=linear_macs(self.block.mlp), k_proj=dim * self.head_dim * self.kv_heads)


class PostNormEvaParts(PostNorm, EvaParts):
    """timm ``EvaBlockPostNorm`` (EVA-02 enormous): EVA's attention, post-norm residuals."""


def eva_parts_class(block: nn.Module) -> type[EvaParts] | None:
    """The parts that read a timm EVA block (``EvaBlock`` or ``EvaBlockPostNorm`` with ``EvaAttention`` or
    ``AttentionRope``), or None for any other block."""
    _, (pre_norm, post_norm), attentions = _timm_classes()
    if type(getattr(block, "attn", None)) not in attentions:
        return None
    return {pre_norm: EvaParts, post_norm: PostNormEvaParts}.get(type(block))


class TimmEva(PatchSequenceFamily):
    name = "timm Eva"

    def __init__(self, model: nn.Module) -> None:
        check_blocks(model, "Eva", lambda blk: eva_parts_class(blk) is not None,
                     "timm's EvaBlock or EvaBlockPostNorm with EvaAttention or AttentionRope (EVA-02, DINOv3, PE, "
                     "RoPE ViTs)")
        super().__init__(model)
        self.blocks_use_positions = model.rope is not None

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        try:
            Eva = _timm_classes()[0]
        except ImportError:
            return False
        return isinstance(model, Eva)

    def make_parts(self, i: int) -> EvaParts:
        m = self.model
        return eva_parts_class(self.blocks[i])(self.blocks[i], i, m.rope is not None, getattr(m, "rope_mixed", False))

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, Frame]:
        m = self.model
        grid = patch_grid(m.patch_embed, tuple(x.shape[-2:]))
        x, rope = m._pos_embed(m.patch_embed(x))
        return m.norm_pre(x), Frame(grid=grid, rope=rope)

    def block(self, i: int, x: torch.Tensor, frame: Frame) -> torch.Tensor:
        return self.blocks[i](x, rope=block_rope(frame.rope, i, getattr(self.model, "rope_mixed", False)))
