"""timm ViT blocks beyond the standard one: differential attention (``DiffAttention``: ``vit_dwee``/``vit_dlittle``),
ViT-22B's parallel block (``ParallelScalingBlock``: ``vit_*_xp_*``, ``vit_pwee``; ``DiffParallelScalingBlock``:
``vit_dpwee``) and parallel branches (``ParallelThingsBlock``: ``vit_*_18x2_*``).

Each is read as the anatomy's block (``anatomy.py``), so every method runs on it unchanged:

- differential attention (Differential Transformer): q and k have 2H heads of width d, v has H heads of width 2d;
  head h's output is A1 v - lambda A2 v for the pair of softmax maps (2h, 2h + 1), RMS-normed and scaled by
  (1 - lambda_init). Scores read the 2H maps as heads: their mean is a distribution over the keys, which the
  signed differential map is not (its sum over a subset can vanish, and a fused or representative token is
  weighted by scores).
- a parallel block: attention and MLP read one normed input and share one residual; ``out`` adds the MLP branch
  (the MLP rows of the fused input projection, then the fused or separate output projections), and the MLP half is
  empty. A shrinking method that runs the attention on every token (EViT) thus runs the MLP on every token there.
- parallel branches: P attention branches (each its own norm, LayerScale and drop path) are one attention of P * H
  heads on the branches' normed inputs side by side; the P MLP branches are one MLP half.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..anatomy import BlockParts, LinearMap
from ..core.attention import probs_scores, row_scores, softmax_probs
from ..core.autocast import operand_as
from ..core.macs import BlockShape, linear_macs
from .timm_vit import VitParts


def _heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, n, A) -> (B, heads, n, A / heads)."""
    B, n, width = t.shape
    return t.reshape(B, n, heads, width // heads).transpose(1, 2)


def _project(h: torch.Tensor, linear: LinearMap) -> torch.Tensor:
    return F.linear(h, linear.weight, linear.bias)


def _map_of_pair(t: torch.Tensor | None, c: int) -> torch.Tensor | None:
    """Map c of each pair of heads of an additive bias over 2H heads (or one broadcast over the heads)."""
    return t if t is None or t.dim() < 4 or t.shape[1] == 1 else t.unflatten(1, (-1, 2))[:, :, c]


class DifferentialAttention:
    """Mix in before a family's parts whose attention is differential; ``diff`` is the module holding lambda and the
    sub-norm (timm ``DiffAttention`` or ``DiffParallelScalingBlock``)."""

    diff: nn.Module
    scale: float

    def attend(self, q, k, v, bias, row, heads):
        """q, k (B, 2H, n, d) as H pairs of maps, v (B, H, n, 2d): sub_norm(A1 v - lambda A2 v) * (1 - lambda_init),
        as timm computes it on either path, with the score row of the 2H maps."""
        diff, scale, dropout = self.diff, self.scale, self.dropout()
        lam = diff._compute_lambda()  # a 0-dim float32 tensor: it scales q's dtype without a cast (which would pin
        # the dtype an export under autocast saw)
        if bias is not None:
            bias = operand_as(bias, q.dtype)
        if self.fused and row != "columns":
            pq, pk = q.unflatten(1, (-1, 2)), k.unflatten(1, (-1, 2))
            o1, o2 = (F.scaled_dot_product_attention(pq[:, :, c], pk[:, :, c], v, attn_mask=_map_of_pair(bias, c),
                                                     dropout_p=dropout, scale=scale) for c in (0, 1))
            o = o1 - lam * o2
        else:
            probs, dropped = softmax_probs(q, k, scale, bias, dropout)
            pairs = dropped.unflatten(1, (-1, 2))
            o = (pairs[:, :, 0] - lam * pairs[:, :, 1]) @ v
        if row == "columns":
            scores = probs_scores(probs, row, heads)
        else:  # one query row, as core.attention computes it on either path
            scores = None if row is None else row_scores(q, k, scale, bias, row, heads)
        return diff.sub_norm(o) * (1 - diff.lambda_init), scores


class DiffVitParts(DifferentialAttention, VitParts):
    """timm ``Block`` with ``DiffAttention``: its fused q/k/v, norms and output projection as the standard
    attention's; the heads and the attention differential. MACs count one A v product per pair (the explicit path);
    the fused path's two SDPA calls compute A1 v and A2 v, n^2 C more per block."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__(block)
        self.diff = self.attn
        self.num_heads = 2 * self.attn.num_heads  # the score heads: both maps of every pair
        self.width = self.attn.qkv.out_features // 3

    def qkv(self, h, where):
        q, k, v = self.attn.qkv(h).chunk(3, dim=-1)
        return self.q_norm(_heads(q, self.num_heads)), self.k_norm(_heads(k, self.num_heads)), self.values_of(v)

    def values(self, h, where):
        return self.values_of(F.linear(h, *self._weights(2)))

    def values_of(self, v: torch.Tensor) -> torch.Tensor:
        return _heads(v, self.attn.num_heads)


class ParallelScalingParts(BlockParts):
    """timm ``ParallelScalingBlock``: one input norm; one input projection to the MLP hidden units and q, k, v;
    fused or separate output projections; one LayerScale and drop path on the sum."""

    separate_mlp = False

    def __init__(self, block: nn.Module) -> None:
        super().__init__(block)
        self.hidden, self.dim = block.in_split[0], block.in_split[1]
        self.num_heads = self.dim // block.head_dim  # query heads (2H half-width ones when differential)
        self.value_heads = block.num_heads
        self.scale = block.scale
        self.q_norm, self.k_norm = self.hold(block, "q_norm"), self.hold(block, "k_norm")
        self.require_plain_linear(block, "in_proj", f"in_proj of a {type(block).__name__}")

    @property
    def fused(self) -> bool:
        return self.block.fused_attn

    def dropout(self) -> float:
        return self.block.attn_drop.p if self.block.training else 0.0

    def norm1(self, x):
        return self.block.in_norm(x)

    def _rows(self, start: int, width: int) -> LinearMap:
        """Rows [start, start + width) of the input projection with their bias (the MLP's own bias where the
        projection has none)."""
        proj, stop = self.block.in_proj, start + width
        if proj.bias is not None:
            return LinearMap(proj.weight[start:stop], proj.bias[start:stop])
        return LinearMap(proj.weight[start:stop], self.block.mlp_bias if start == 0 else None)

    def _projection(self, j: int) -> LinearMap:
        """q (0), k (1) or v (2) rows."""
        return self._rows(self.hidden + j * self.dim, self.dim)

    def qkv(self, h, where):
        q, k, v = _project(h, self._rows(self.hidden, 3 * self.dim)).chunk(3, dim=-1)
        return (self.q_norm(_heads(q, self.num_heads)), self.k_norm(_heads(k, self.num_heads)),
                _heads(v, self.value_heads))

    def queries(self, h, where):
        return self.q_norm(_heads(_project(h, self._projection(0)), self.num_heads))

    def keys(self, h, where):
        return self.k_norm(_heads(_project(h, self._projection(1)), self.num_heads))

    def values(self, h, where):
        return _heads(_project(h, self._projection(2)), self.value_heads)

    def out(self, o, h):
        blk = self.block
        m = blk.mlp_drop(blk.mlp_act(_project(h, self._rows(0, self.hidden))))
        if blk.out_proj is not None:
            return blk.out_proj(torch.cat((o, m), dim=-1))
        return blk.attn_out_proj(o) + blk.mlp_out_proj(m)

    def res_attn(self, x, y):
        return x + self.block.drop_path(self.block.ls(y))

    def linear_queries(self):
        return self._projection(0) if isinstance(self.q_norm, nn.Identity) else None

    def linear_keys(self):
        return self._projection(1) if self.keys_affine() else None

    def keys_affine(self):
        return isinstance(self.k_norm, nn.Identity)

    def shape(self) -> BlockShape:
        blk, C = self.block, self.dim
        outputs = sum(linear_macs(getattr(blk, name, None)) for name in ("out_proj", "attn_out_proj", "mlp_out_proj"))
        return BlockShape(dim=C, qk_dim=C, v_dim=C, qkv=3 * C * C, proj=self.hidden * C + outputs, mlp=0)


class DiffParallelScalingParts(DifferentialAttention, ParallelScalingParts):
    """timm ``DiffParallelScalingBlock``: the parallel block with differential attention."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__(block)
        self.diff = block


class ParallelThingsParts(BlockParts):
    """timm ``ParallelThingsBlock`` with standard attention branches: the branches' heads side by side on their
    normed inputs side by side (norm1 is (B, n, P * C)). Its q and k are left non-affine for scoring, whose key-free
    shortcut assumes an input of the token width: scores project each branch's keys (n * P * C * d_qk MACs)."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__(block)
        self.branches = [VitParts(self.hold(block.attns, str(j), f"attns.{j}")) for j in range(len(block.attns))]
        for j, parts in enumerate(self.branches):
            self.projections += parts.projections
            self.held += [(modules, attribute, module, f"attns.{j}.{name}") for modules, attribute, module, name
                          in parts.held]
        self.num_heads = sum(parts.num_heads for parts in self.branches)
        self.scale = self.branches[0].scale

    @property
    def fused(self) -> bool:
        return self.branches[0].fused

    def dropout(self) -> float:
        return self.branches[0].dropout()

    def norm1(self, x):
        return torch.cat([branch.norm(x) for branch in self.block.attns], dim=-1)

    def norm2(self, x):
        return x

    def _each(self, method: str, h, where) -> list:
        return [getattr(parts, method)(hb, where) for parts, hb in zip(self.branches, h.chunk(len(self.branches), -1))]

    def qkv(self, h, where):
        return tuple(torch.cat(t, dim=1) for t in zip(*self._each("qkv", h, where)))

    def queries(self, h, where):
        return torch.cat(self._each("queries", h, where), dim=1)

    def keys(self, h, where):
        return torch.cat(self._each("keys", h, where), dim=1)

    def values(self, h, where):
        return torch.cat(self._each("values", h, where), dim=1)

    def out(self, o, h):
        P = len(self.branches)
        return torch.stack([branch.drop_path(branch.ls(parts.out(ob, hb))) for branch, parts, ob, hb in
                            zip(self.block.attns, self.branches, o.chunk(P, -1), h.chunk(P, -1))]).sum(dim=0)

    def res_attn(self, x, y):
        return x + y

    def mlp(self, h, where=None):
        return torch.stack([ffn(h) for ffn in self.block.ffns]).sum(dim=0)

    def res_mlp(self, x, y):
        return x + y

    def shape(self) -> BlockShape:
        shapes = [parts.shape() for parts in self.branches]
        width = sum(s.qk_dim for s in shapes)
        return BlockShape(dim=shapes[0].dim, qk_dim=width, v_dim=width, qkv=sum(s.qkv for s in shapes),
                          proj=sum(s.proj for s in shapes), mlp=sum(linear_macs(ffn.mlp) for ffn in self.block.ffns))


def other_vit_parts_class(block: nn.Module) -> type[BlockParts] | None:
    """The parts of the timm ViT blocks above, or None (ParallelThingsBlock only with the standard attention)."""
    from timm.layers import Attention, DiffAttention
    from timm.models import vision_transformer as vit

    kind = type(block)
    if kind is vit.Block and type(getattr(block, "attn", None)) is DiffAttention:
        return DiffVitParts
    if kind is vit.ParallelThingsBlock:
        return ParallelThingsParts if all(type(b.attn) is Attention for b in block.attns) else None
    return {vit.ParallelScalingBlock: ParallelScalingParts,
            vit.DiffParallelScalingBlock: DiffParallelScalingParts}.get(kind)
