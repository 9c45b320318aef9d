"""timm's Gemma 4 vision tower (``gemma4_vit_*``): the bare encoder (``*_enc``: its forward pools the patch tokens
into Gemma's soft tokens) and the classifier around it (mean pool, norm, linear head).

The blocks are sandwich-normed: RmsNorm before and after the attention and before and after the gated MLP, both
after-norms inside their residuals. The attention has separate q/k/v projections (clamped where the checkpoint ships
finite bounds: ``Gemma4ClippableLinear``), per-head RmsNorm on q and k and an unscaled one on v, 2D RoPE from every
patch's (x, y) coordinate, grouped keys and logit scale 1. Position embeddings come from a (2, P, C) table by a
one-hot matmul, and the soft-token pooler averages k x k patches by their coordinates (a matmul as well); both are
counted as the model runs them.

Methods that keep every token (Idle, Evo) run everywhere. Methods that drop tokens for good run where the output is
made from whatever tokens are left: a classifier whose encoder does not pool (its head averages them, or runs on each)
and an encoder with ``global_pool='avg'``; they are refused where the soft pooler bins every patch by its position,
and on the bare encoder's raw tokens, which a VLM (or a dense head) reads as the whole patch map.
"""
from __future__ import annotations

import torch
from torch import nn

from ..anatomy import BlockParts, Frame, TokenSet
from ..core.feature_maps import vit_intermediates
from ..core.macs import BlockShape, linear_macs
from .base import IntermediateOptions, no_final_norm_problem, recorded_input_size
from .patch_embed import patch_multiple_problem
from .vlm_vit import EncoderTower


def rope_rows(table: torch.Tensor, where: TokenSet) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (B, m, D) at the patch positions of ``where`` from the forward's table (2, B, N, D) (cos, sin of
    every patch); position -1 (a token without a position) gets the identity rotation (cos 1, sin 0)."""
    if where.pos is None:
        return table[0], table[1]
    pos = where.pos.clamp(min=0) if where.holes else where.pos
    rows = table.gather(2, pos[None, :, :, None].expand(2, -1, -1, table.shape[-1]))
    if where.holes:
        present = (where.pos >= 0)[:, :, None]
        return torch.where(present, rows[0], 1.0), torch.where(present, rows[1], 0.0)
    return rows[0], rows[1]


class Gemma4Parts(BlockParts):
    """timm's ``Gemma4Block``: norm1 before the attention and norm2 after it (in its residual), norm3 before the
    gated MLP and norm4 after it; one drop path for both residuals."""

    def __init__(self, block: nn.Module) -> None:
        from timm.models.gemma4_vit import apply_multidimensional_rope

        super().__init__(block)
        attn = self.attn = self.hold(block, "attn")
        self.num_heads, self.kv_heads, self.head_dim = attn.num_heads, attn.num_kv_heads, attn.head_dim
        self.scale = 1.0  # q and k are RmsNormed: the logits are not scaled
        self.width = self.num_heads * self.head_dim
        self.q_norm = self.hold(attn, "q_norm", "attn.q_norm")
        self.k_norm = self.hold(attn, "k_norm", "attn.k_norm")
        self.v_norm = self.hold(attn, "v_norm", "attn.v_norm")
        self.apply_rope = apply_multidimensional_rope  # timm's, bound here: the forward imports nothing

    def dropout(self) -> float:
        return self.attn.attn_drop.p if self.attn.training else 0.0

    def norm2(self, x: torch.Tensor) -> torch.Tensor:
        return self.block.norm3(x)  # the pre-feed-forward norm: norm2 is the attention's after-norm

    def _project(self, proj: nn.Module, h: torch.Tensor, heads: int) -> torch.Tensor:
        """(B, n, heads, d), as the model lays heads out before its norms and RoPE."""
        B, n, _ = h.shape
        return proj(h).view(B, n, heads, self.head_dim)

    def _rotate(self, t: torch.Tensor, where: TokenSet | None, rows=None) -> torch.Tensor:
        """RoPE on the patch tokens of t (B, n, heads, d) at their positions (``rows``: their cos, sin where already
        gathered). Prefix and extra tokens (Evo's representative token) have no position and are not rotated, nor
        is a hole among the patches (EViT's fused token once kept: :func:`rope_rows`' identity rows)."""
        if where is None:
            return t
        cos, sin = rope_rows(where.frame.rope, where) if rows is None else rows
        p, m = where.prefix, cos.shape[1]
        rotated = self.apply_rope(t[:, p:p + m], cos, sin, ndim=2, unsqueeze_dim=2)
        return rotated if p == 0 and m == t.shape[1] else torch.cat([t[:, :p], rotated, t[:, p + m:]], dim=1)

    def _expand(self, t: torch.Tensor) -> torch.Tensor:
        """(B, n, kv heads, d) -> (B, H, n, d), each key/value head repeated for its group of query heads."""
        t = t.transpose(1, 2)
        groups = self.num_heads // self.kv_heads
        return t.repeat_interleave(groups, dim=1) if groups > 1 else t

    def queries(self, h, where, rows=None):
        q = self.q_norm(self._project(self.attn.q_proj, h, self.num_heads))
        return self._rotate(q, where, rows).transpose(1, 2)

    def keys(self, h, where, rows=None):
        return self._expand(self._rotate(self.k_norm(self._project(self.attn.k_proj, h, self.kv_heads)), where, rows))

    def values(self, h, where):
        return self._expand(self.v_norm(self._project(self.attn.v_proj, h, self.kv_heads)))

    def qkv(self, h, where):
        rows = None if where is None else rope_rows(where.frame.rope, where)  # gathered once for q and k
        return self.queries(h, where, rows), self.keys(h, where, rows), self.values(h, where)

    def out(self, o, h):
        return self.attn.proj_drop(self.attn.o_proj(o))

    def res_attn(self, x, y):
        return x + self.block.drop_path(self.block.norm2(y))

    def res_mlp(self, x, y):
        return x + self.block.drop_path(self.block.norm4(y))

    def shape(self) -> BlockShape:
        attn = self.attn
        dim = self.block.norm1.normalized_shape[0]
        return BlockShape(dim=dim, qk_dim=self.width, v_dim=self.width,
                          qkv=sum(linear_macs(p) for p in (attn.q_proj, attn.k_proj, attn.v_proj)),
                          proj=linear_macs(attn.o_proj), mlp=linear_macs(self.block.mlp),
                          k_proj=dim * self.head_dim * self.kv_heads)


class Gemma4VitFamily(EncoderTower):
    """The encoder (``patch_embed``: patches to tokens with their position embeddings and (x, y) coordinates,
    ``rotary_emb``, ``blocks``, ``pooler``) bare or in the classifier. The bare encoder's forward pools after the
    blocks without calling ``forward_features``, so the patch runs that forward too (``owns_forward``)."""

    name = "timm Gemma 4 ViT"
    block_description = "timm's Gemma4Block with Gemma4Attention"

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        enc = self.encoder
        self.owns_forward = not self.classifier
        # what the encoder's forward returns (a classifier's features): the soft tokens, for which the pooler bins
        # every patch by its position; the bare encoder's raw tokens, which a VLM or a dense head reads as the patch
        # map; or an output made of whatever tokens are left (a mean, a classifier's head), where dropping may run.
        # Read once: the refusals above hold for this pool, so a forward after it changed is refused (``embed``)
        self.encoder_pool = enc.global_pool
        soft, raw = self.encoder_pool == "soft", self.encoder_pool in ("", "none")
        self.fixed_length_head = soft or (raw and not self.classifier)
        self.fixed_length_why = ("encoder pools the patch tokens by their positions into soft tokens" if soft else
                                 "features are every patch token in place")

    @staticmethod
    def timm_classes():
        from timm.models.gemma4_vit import Gemma4VitClassifier, Gemma4VitEncoder

        return Gemma4VitEncoder, Gemma4VitClassifier

    def readable(self, block: nn.Module) -> bool:
        from timm.models.gemma4_vit import Gemma4Attention, Gemma4Block

        return type(block) is Gemma4Block and type(getattr(block, "attn", None)) is Gemma4Attention

    def make_parts(self, i: int) -> BlockParts:
        return Gemma4Parts(self.blocks[i])

    # --- the forward around the blocks ---------------------------------------------------------------------------
    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, Frame]:
        if not isinstance(x, torch.Tensor) or x.ndim != 4:
            got = type(x).__name__ if not isinstance(x, torch.Tensor) else f"a {x.ndim}-d tensor"
            raise ValueError(f"a tokenpace-patched {self.name} runs image batches (B, C, H, W); got {got} (packed "
                             "NaFlex patches have grids of their own and padding tokens: call tokenpace.remove(model) "
                             "first)")
        enc = self.encoder
        if enc.global_pool != self.encoder_pool:
            raise ValueError(f"the encoder's global_pool changed from {self.encoder_pool!r} to {enc.global_pool!r} "
                             "after tokenpace.apply, which chose the method for the pool it had; call "
                             "tokenpace.apply(model, ...) again")
        enc._assert_raw_img_conformant(x)  # the soft pooler's cells must tile the grid, as the model checks
        grid = (x.shape[-2] // enc.patch_size[0], x.shape[-1] // enc.patch_size[1])
        x, positions, _ = enc.patch_embed(x)  # no padding tokens in an image batch
        cos, sin = enc.rotary_emb(x, positions)
        return x, Frame(grid=grid, rope=torch.stack((cos, sin)), patch_coords=positions)

    def block(self, i: int, x: torch.Tensor, frame: Frame) -> torch.Tensor:
        return self.blocks[i](x, frame.rope[0], frame.rope[1])

    def encoder_output(self, x: torch.Tensor, frame: Frame) -> torch.Tensor:
        """What the encoder's forward makes of its last block's tokens: Gemma's soft tokens (the pooler, then the
        standardisation where the model has one), the mean token, or the tokens as they are."""
        enc = self.encoder
        if self.encoder_pool == "soft":
            x, _ = enc.pooler(x, frame.patch_coords, None)
            return x if enc.std_bias is None else (x - enc.std_bias) * enc.std_scale
        return x.mean(dim=1) if self.encoder_pool == "avg" else x

    def finish(self, x: torch.Tensor, frame: Frame) -> torch.Tensor:
        """``forward_features``: the encoder's raw tokens; a classifier's features are its encoder's output."""
        return self.encoder_output(x, frame) if self.classifier else x

    def model_output(self, x: torch.Tensor, frame: Frame) -> torch.Tensor:
        return self.encoder_output(x, frame)

    def intermediates(self, maps, final, frame, taken, stopped, options: IntermediateOptions):
        """As timm's: every block's tokens (NCHW or NLC) and the last block's raw tokens; a dict adds every patch's
        validity (all valid in an image batch)."""
        if options.norm:
            raise ValueError(no_final_norm_problem(self.name))
        out = vit_intermediates(maps, final, nn.Identity(), 0, frame.grid, output_fmt=options.output_fmt,
                                intermediates_only=options.intermediates_only, output_dict=options.output_dict)
        if options.output_dict:
            out["patch_valid"] = torch.ones(final.shape[:2], dtype=torch.bool, device=final.device)
        return out

    # --- sizes and cost ------------------------------------------------------------------------------------------
    def own_size(self) -> tuple[int, int]:
        """The encoder keeps no input size (timm drops its img_size): its pretrained config's, where
        ``tokenpace.models.create_model`` records one asked for."""
        recorded = recorded_input_size(self.model)
        if recorded is None:
            raise TypeError(f"this {type(self.model).__name__} keeps no input size (timm drops its img_size and it "
                            "has no pretrained config), which tokenpace needs for token counts and cost: build it with "
                            "timm.create_model(name) or tokenpace.models.create_model(name, img_size=N), or set "
                            "model.pretrained_cfg = {'input_size': (3, H, W)}")
        return recorded

    def input_size(self) -> tuple[int, int, int]:
        return (self.encoder.in_chans, *self.own_size())

    def size_problem(self, size: tuple[int, int]) -> str | None:
        """Any size whose sides are multiples of the patch, and of k patches where the soft pooler averages k x k
        cells, with no more patches a side than the position table has rows: position embeddings, RoPE and the
        pooler follow each patch's coordinates."""
        enc = self.encoder
        (ph, pw), k = enc.patch_size, enc.pooling_kernel_size
        if self.encoder_pool == "soft" and (size[0] % (ph * k) or size[1] % (pw * k)):
            return (f"its soft-token pooler averages {k}x{k} patches: the sides must be multiples of {ph * k}x{pw * k}"
                    f" ({k} patches of {ph}x{pw})")
        problem = patch_multiple_problem(enc.patch_embed, size, can_pad=False)
        rows = enc.patch_embed.position_embedding_size
        if problem is None and max(size[0] // ph, size[1] // pw) > rows:
            problem = (f"its position table has {rows} rows per axis: at most {rows} patches a side (at most "
                       f"{rows * ph}x{rows * pw} px)")
        return problem

    def stem_macs(self, img_size) -> int:
        """Per patch: the linear patch projection, the one-hot rows times the (2, P, C) position table (a matmul as
        timm runs it), and the RoPE angles (each axis's frequencies times its coordinate)."""
        enc, patches = self.encoder, self.stage_patches(img_size)[0]
        table = enc.patch_embed.position_embedding_table
        angles = 2 * enc.rotary_emb.inv_freq.numel()
        return patches * (linear_macs(enc.patch_embed.input_proj) + table.shape[0] * table[0].numel() + angles)

    def count_macs(self, works, img_size) -> int:
        """The blocks and stem as every sequence family's; then the soft pooler (each soft token a weighted sum over
        every patch, a matmul) where the forward pools, and a classifier's head over its pooled token, or over each
        feature token without a pool (``global_pool=''``)."""
        rows, cols = self.patch_grid_at(img_size)
        tokens = rows * cols if works is None or works[-1].out_tokens is None else works[-1].out_tokens
        ends = 0
        if self.encoder_pool == "soft":
            k = self.encoder.pooling_kernel_size
            soft = (rows // k) * (cols // k)
            ends += soft * tokens * self.encoder.embed_dim
            tokens = soft
        return super().count_macs(works, img_size) + ends + self.classifier_head_macs(tokens)
