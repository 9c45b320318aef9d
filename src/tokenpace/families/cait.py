"""timm ``Cait`` (CaiT, "Going deeper with Image Transformers": ``cait_xxs24`` .. ``cait_m48``).

The patch blocks see no class token: the patch tokens, with their absolute position embedding added at the
embedding, run ``LayerScaleBlock``s (LayerScale residuals ``gamma_1``/``gamma_2``) whose attention is talking heads:
the heads' logits are mixed by a linear layer over heads (``proj_l``) before the softmax, and the probabilities by
another (``proj_w``) after it. The class token joins only in the class-attention blocks (``blocks_token_only``),
where it alone attends to every patch token; they, the final norm and the head run as the model runs them, on the
tokens the patch blocks leave (a method that drops tokens leaves fewer for them to read).

Scores, with no class token in the patch blocks: the attention a token receives (``"received"``) is read after
``proj_l``'s mix, where each head's row is still a distribution over keys: summed over heads, the mixed logits are
the heads' own logits weighed by the column sums of ``proj_l``'s weight (its bias is the same for every key). A
score row (Evo, EViT) is the softmax of the mean query's mixed logits per head; ``proj_w``'s mix of the
probabilities is left out of it, since its mixes are not distributions.

The second mix's bias adds the same weight to every key present, so a block run on k tokens adds k values there
where the dense block adds all n: the tokens a method runs are the block's input, as they are for dropping methods.
"""
from __future__ import annotations

from dataclasses import asdict, replace

import torch
from torch import nn

from ..anatomy import Frame
from ..core.attention import probs_scores, row_scores
from ..core.feature_maps import vit_intermediates
from ..core.macs import BlockShape, linear_macs
from .base import Family
from .patch_embed import patch_grid
from .timm_vit import PatchSequenceFamily, VitParts, check_blocks


def _timm_classes():
    from timm.models.cait import Cait, ClassAttn, LayerScaleBlock, LayerScaleBlockClassAttn, TalkingHeadAttn

    return Cait, (LayerScaleBlock, TalkingHeadAttn), (LayerScaleBlockClassAttn, ClassAttn)


def _over_heads(layer: nn.Linear, t: torch.Tensor) -> torch.Tensor:
    """A linear layer over the head axis of (B, H, n_q, n_k) maps, as timm's ``TalkingHeadAttn`` applies it."""
    return layer(t.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class CaitParts(VitParts):
    """timm ``LayerScaleBlock`` + ``TalkingHeadAttn``: the standard fused q/k/v and projection, talking-heads mixes
    around the softmax, LayerScale residuals."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__(block)
        # the scores read proj_l's weight: a wrapper (LoRA) would run in the block and be left out of them
        self.require_plain_linear(self.attn, "proj_l", f"attn.proj_l of a {type(block).__name__}")
        self.require_plain_linear(self.attn, "proj_w", f"attn.proj_w of a {type(block).__name__}")

    def attend(self, q, k, v, bias, row, heads):
        """timm's talking-heads attention (always explicit: the mixes need the n x n maps), and the score ``row``
        from the mixed logits. CaiT's blocks have no position terms, so there is never a ``bias``."""
        if bias is not None:
            raise TypeError("CaiT's talking-heads attention takes no additive bias (it has no position terms)")
        attn = self.attn
        logits = _over_heads(attn.proj_l, (q * self.scale) @ k.transpose(-2, -1))
        probs = logits.softmax(dim=-1)
        out = attn.attn_drop(_over_heads(attn.proj_w, probs)) @ v
        if row is None:
            return out, None
        if row == "columns":
            return out, probs_scores(probs, row, heads)
        return out, row_scores(q, k, self.scale, None, row, heads, mix=lambda t: _over_heads(attn.proj_l, t))

    def logit_head_weights(self) -> torch.Tensor:
        return self.attn.proj_l.weight.sum(dim=0)  # sum_h' L'_h' = sum_h (sum_h' W[h', h]) L_h + sum_h' b[h']

    def res_attn(self, x, y):
        return x + self.block.drop_path(self.block.gamma_1 * y)

    def res_mlp(self, x, y):
        return x + self.block.drop_path(self.block.gamma_2 * y)

    def shape(self) -> BlockShape:
        return replace(super().shape(), head_mix=linear_macs(self.attn.proj_l))


class ClassAttentionTail(PatchSequenceFamily):
    """A flat model whose class token joins after the patch blocks (CaiT, XCiT, VOLO): the patch blocks see no prefix
    token, and the class-attention blocks (``class_blocks``; None after timm's ``prune_intermediate_layers``), the
    final norm and the head run as the model runs them, on the tokens the patch blocks leave. Built for one size
    (a position embedding) unless the family says otherwise."""

    class_blocks: str  # the model's attribute holding its class-attention blocks
    resize_hint = "img_size=N: its position embedding is built for one grid"

    @property
    def num_prefix(self) -> int:
        return 0  # the class token joins after the patch blocks

    @property
    def has_class_token(self) -> bool:
        return False

    def finish(self, x: torch.Tensor, frame: Frame) -> torch.Tensor:
        """The class-attention blocks (the class token reads the tokens left), then the final norm, as timm."""
        m = self.model
        return m.norm(x if getattr(m, self.class_blocks) is None else m.forward_cls(x))

    def intermediates(self, maps, final, frame, taken, stopped, options):
        """As timm's: patch-token maps (the final norm on request), and the final tokens through :meth:`finish`."""
        maps = vit_intermediates(maps, final, self.model.norm, 0, frame.grid,
                                 **{**asdict(options), "intermediates_only": True})
        return maps if options.intermediates_only else (self.finish(final, frame), maps)

    def size_problem(self, size: tuple[int, int]) -> str | None:
        return Family.size_problem(self, size)  # the size it is built for only

    def head_macs(self, tokens: int) -> int:
        """The class-attention blocks over the class token and ``tokens`` patch tokens (keys and values projected
        apart, CaiT's and XCiT's, or fused, VOLO's), then the head: on the pooled token, or on every token without a
        pool."""
        blocks = getattr(self.model, self.class_blocks)
        n = tokens + 1 if blocks is not None else tokens  # the class token joins (finish), even with no block
        total = linear_macs(self.model.head) * (1 if self.model.global_pool else n)
        for blk in blocks or ():
            attn = blk.attn
            keys_values = sum(linear_macs(getattr(attn, name, None)) for name in ("k", "v", "kv"))
            total += (linear_macs(attn.q) + n * keys_values + 2 * n * attn.q.out_features + linear_macs(attn.proj)
                      + linear_macs(blk.mlp))
        return total


class TimmCait(ClassAttentionTail):
    name = "timm Cait"
    class_blocks = "blocks_token_only"
    blocks_use_positions = False  # absolute position embeddings are added at the embedding

    def __init__(self, model: nn.Module) -> None:
        _, patch_block, class_block = _timm_classes()

        def made_of(pair):
            return lambda blk: type(blk) is pair[0] and type(getattr(blk, "attn", None)) is pair[1]

        check_blocks(model, "Cait", made_of(patch_block), "timm's LayerScaleBlock with TalkingHeadAttn (cait_*)")
        for i, blk in enumerate(model.blocks_token_only or ()):  # run as timm runs them; counted by head_macs
            if not made_of(class_block)(blk):
                raise TypeError(f"class-attention block {i} of this Cait is {type(blk).__name__}; tokenpace "
                                "supports timm's LayerScaleBlockClassAttn with ClassAttn (cait_*)")
        super().__init__(model)

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        try:
            Cait = _timm_classes()[0]
        except ImportError:  # timm not installed: nothing of this family can exist
            return False
        return isinstance(model, Cait)

    def make_parts(self, i: int) -> CaitParts:
        return CaitParts(self.blocks[i])

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, Frame]:
        m = self.model
        grid = patch_grid(m.patch_embed, tuple(x.shape[-2:]))
        return m.pos_drop(m.patch_embed(x) + m.pos_embed), Frame(grid=grid)

    def block(self, i: int, x: torch.Tensor, frame: Frame) -> torch.Tensor:
        return self.blocks[i](x)
