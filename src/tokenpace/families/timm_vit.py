"""timm ``VisionTransformer`` family: DeiT (and distilled), ViT/AugReg, DeiT-III and LayerScale models, registers,
qk-norm, gated attention, token or average pooling. Blocks must be timm's pre-norm ``Block`` with ``Attention``."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..core.macs import BlockShape, linear_macs
from ..core.scores import cls_attention, cls_logits_from_keys, cls_logits_linear
from .base import RunBlocks, SequenceAdapter, parse_img_size


def _timm_classes():
    from timm.layers import Attention
    from timm.models.vision_transformer import Block, VisionTransformer

    return VisionTransformer, Block, Attention


def _attend(attn: nn.Module, normed: torch.Tensor, heads: str | None):
    """timm ``Attention.forward`` on ``normed`` (B, n, C): (output, the class row when ``heads`` is set, (q, k)).

    Uses the module's own layers; fused SDPA unless the module was built with ``fused_attn=False``. q and k
    (B, H, n, d), after any qk-norm, come back so a training loss can reuse them instead of projecting again.
    """
    B, n, _ = normed.shape
    num_heads, head_dim = attn.num_heads, attn.head_dim
    gate = attn.gate(normed).sigmoid() if getattr(attn, "gate", None) is not None else None
    q, k, v = attn.qkv(normed).reshape(B, n, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    cls_row = cls_attention(q[:, :, :1], k, attn.scale, heads) if heads else None
    if attn.fused_attn:
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=attn.attn_drop.p if attn.training else 0.0)
    else:
        weights = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        out = attn.attn_drop(weights) @ v
    out = out.transpose(1, 2).reshape(B, n, num_heads * head_dim)
    out = getattr(attn, "norm", nn.Identity())(out)
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out)), cls_row, (q, k)


class TimmViT(SequenceAdapter):
    name = "timm VisionTransformer"

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        _, Block, Attention = _timm_classes()
        for i, blk in enumerate(model.blocks):
            if type(blk) is not Block or type(blk.attn) is not Attention:
                raise TypeError(
                    f"block {i} of this VisionTransformer is {type(blk).__name__} with {type(blk.attn).__name__}; "
                    "tokenpace supports timm's pre-norm Block with the standard Attention (DeiT, ViT/AugReg, "
                    "DeiT-III, register, qk-norm models)"
                )
        if not isinstance(model.patch_drop, nn.Identity):
            raise TypeError("patch dropout (patch_drop_rate > 0) changes the token count before the blocks; "
                            "build the model with patch_drop_rate=0 to use tokenpace")
        self.blocks = model.blocks

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        try:
            VisionTransformer, _, _ = _timm_classes()
        except ImportError:  # timm not installed: nothing of this family can exist
            return False
        return isinstance(model, VisionTransformer)

    @property
    def depth(self) -> int:
        return len(self.blocks)

    @property
    def num_prefix(self) -> int:
        return self.model.num_prefix_tokens

    @property
    def has_class_token(self) -> bool:
        return self.model.cls_token is not None

    def resolve_score(self, method: str, score: str | None) -> str:
        if not self.has_class_token:  # even random ranking runs the class-token paths of the flat policies
            raise ValueError(f"method {method!r} ranks tokens by the class token's attention, but this "
                             f"{type(self.model).__name__} has no class token; accepted: models built with "
                             "class_token=True")
        return super().resolve_score(method, score)

    def block_grid(self, i: int) -> tuple[int, int]:
        return tuple(self.model.patch_embed.grid_size)

    def forward_features(self, x: torch.Tensor, run_blocks: RunBlocks) -> torch.Tensor:
        m = self.model
        x = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x))))
        return m.norm(run_blocks(x))

    def block(self, i: int, x: torch.Tensor) -> torch.Tensor:
        return self.blocks[i](x)

    def block_with_cls_attention(self, i: int, x: torch.Tensor, heads: str) -> tuple[torch.Tensor, torch.Tensor]:
        x, cls_row = self.attention_half(i, x, heads)
        return self.mlp_half(i, x), cls_row

    def attention_half(self, i: int, x: torch.Tensor, heads: str) -> tuple[torch.Tensor, torch.Tensor]:
        blk = self.blocks[i]
        out, cls_row, _ = _attend(blk.attn, blk.norm1(x), heads)
        return x + blk.drop_path1(blk.ls1(out)), cls_row

    def mlp_half(self, i: int, x: torch.Tensor) -> torch.Tensor:
        blk = self.blocks[i]
        return x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))

    def attention_module(self, i: int) -> nn.Module:
        return self.blocks[i].attn

    def block_from_normed(self, i: int, x: torch.Tensor, normed: torch.Tensor, return_qk: bool = False):
        blk = self.blocks[i]
        out, _, (q, k) = _attend(blk.attn, normed, None)
        x = self.mlp_half(i, x + blk.drop_path1(blk.ls1(out)))
        return (x, (q.transpose(1, 2).flatten(2), k.transpose(1, 2).flatten(2))) if return_qk else x

    def cls_logit_scores(self, i: int, x: torch.Tensor, project_keys: bool) -> tuple[torch.Tensor, torch.Tensor]:
        blk = self.blocks[i]
        attn = blk.attn
        normed = blk.norm1(x)
        width = attn.num_heads * attn.head_dim
        weight, bias = attn.qkv.weight, attn.qkv.bias
        w_q, w_k = weight[:width], weight[width:2 * width]
        b_q = bias[:width] if bias is not None else None
        if project_keys or self.scores_project_keys(i):
            B, n, _ = normed.shape
            b_k = bias[width:2 * width] if bias is not None else None
            q_cls = F.linear(normed[:, :1], w_q, b_q).reshape(B, 1, attn.num_heads, attn.head_dim).transpose(1, 2)
            k = F.linear(normed, w_k, b_k).reshape(B, n, attn.num_heads, attn.head_dim).transpose(1, 2)
            return cls_logits_from_keys(attn.q_norm(q_cls), attn.k_norm(k)), normed
        B = normed.shape[0]
        q_cls = F.linear(normed[:, 0], w_q, b_q)
        q_cls = attn.q_norm(q_cls.reshape(B, attn.num_heads, attn.head_dim)).reshape(B, width)  # per-head norm is fine
        return cls_logits_linear(normed, q_cls, w_k), normed

    def scores_project_keys(self, i: int) -> bool:
        return not isinstance(self.blocks[i].attn.k_norm, nn.Identity)

    def input_size(self) -> tuple[int, int, int]:
        pe = self.model.patch_embed
        return (pe.proj.in_channels, *pe.img_size)

    def num_patches(self, img_size: int | tuple[int, int] | None) -> int:
        pe = self.model.patch_embed
        if img_size is None:
            return pe.num_patches
        img_size = parse_img_size(img_size)
        grid = pe.dynamic_feat_size(img_size) if hasattr(pe, "dynamic_feat_size") else (
            img_size[0] // pe.patch_size[0], img_size[1] // pe.patch_size[1])
        return grid[0] * grid[1]

    def block_shape(self, i: int) -> BlockShape:
        attn = self.blocks[i].attn
        proj = linear_macs(attn.proj) + linear_macs(getattr(attn, "gate", None))
        return BlockShape(
            dim=attn.qkv.in_features,
            attn_dim=attn.num_heads * attn.head_dim,
            qkv=linear_macs(attn.qkv),
            proj=proj,
            mlp=linear_macs(self.blocks[i].mlp),
        )

    def stem_macs(self, num_patches: int) -> int:
        proj = self.model.patch_embed.proj
        return proj.weight.numel() * num_patches if isinstance(proj, nn.Conv2d) else 0

    def head_macs(self) -> int:
        m = self.model
        return linear_macs(m.head) + linear_macs(getattr(m, "head_dist", None))
