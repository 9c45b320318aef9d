"""Small class-token-free ViTs, timm Eva, Beit, VisionTransformerRelPos and NaFlexVit models (random, well-spread
weights) and literal masked references of Evo, Idle and top-k on them: the full sequence at its original positions
(RoPE and relative-position biases at every token's own position), idle keys masked, updates kept where selected."""
from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import GluMlp, RmsNorm, SwiGLU, apply_rot_embed_cat
from torch.utils.flop_counter import FlopCounterMode

import tokenpace
from timm.models.beit import Beit
from timm.models.eva import Eva, EvaBlockPostNorm
from timm.models.naflexvit import NaFlexVit
from timm.models.vision_transformer import (DiffParallelScalingBlock, ParallelScalingBlock, ParallelThingsBlock,
                                            ResPostBlock, VisionTransformer)
from timm.models.vision_transformer_relpos import ResPostRelPosBlock, VisionTransformerRelPos

from conftest import flatten_outputs, spread_weights

SMALL = dict(img_size=32, patch_size=4, embed_dim=48, depth=6, num_heads=3, num_classes=10)

CLASS_FREE = {  # timm VisionTransformer without a class token (SigLIP, AIMv2, *_gap_*)
    "gap": dict(class_token=False, global_pool="avg", fc_norm=False),
    "siglip_map": dict(class_token=False, global_pool="map"),
    "avgmax_registers": dict(class_token=False, global_pool="avgmax", reg_tokens=2),
    "aimv2": dict(class_token=False, global_pool="avg", qkv_bias=False, proj_bias=False, act_layer="silu",
                  mlp_layer=SwiGLU, norm_layer=partial(RmsNorm, eps=1e-5), mlp_ratio=2.75),
    "geglu_token": dict(mlp_layer=GluMlp, act_layer="gelu", global_pool="token"),
}

EVAS = {  # timm Eva: RoPE plain and mixed, registers, LayerScale, SwiGLU, MAP and average pools, GQA, qk-norm
    "eva02": dict(mlp_ratio=4 * 2 / 3, swiglu_mlp=True, use_rot_pos_emb=True, ref_feat_shape=(8, 8)),
    "dinov3": dict(qkv_bias=False, init_values=0.5, rope_type="dinov3", rope_temperature=100, rope_rotate_half=True,
                   use_rot_pos_emb=True, use_abs_pos_emb=False, num_reg_tokens=4, use_fc_norm=False,
                   dynamic_img_size=True),
    "rope_mixed": dict(attn_type="rope", init_values=0.5, global_pool="token", use_abs_pos_emb=False,
                       use_rot_pos_emb=True, rope_grid_indexing="xy", rope_temperature=10.0, rope_type="mixed"),
    "pe_core_map": dict(global_pool="map", attn_type="rope", use_pre_transformer_norm=True, use_rot_pos_emb=True,
                        ref_feat_shape=(8, 8), rope_grid_offset=1.0, rope_grid_indexing="xy", attn_pool_num_heads=3),
    "gqa_qknorm_no_cls": dict(attn_type="rope", qkv_fused=False, num_kv_heads=1, qk_norm=True, class_token=False,
                              global_pool="avg", use_rot_pos_emb=True),
}

BEITS = {  # timm Beit: a relative-position bias per block, one shared by all blocks, or both; LayerScale or not
    "beit": dict(qkv_bias=True, use_abs_pos_emb=False, use_rel_pos_bias=True, init_values=0.1),
    "beit_shared_abs_token": dict(qkv_bias=True, use_shared_rel_pos_bias=True, global_pool="token"),
    "beit_both_swiglu": dict(qkv_bias=False, use_abs_pos_emb=False, use_rel_pos_bias=True,
                             use_shared_rel_pos_bias=True, swiglu_mlp=True, scale_mlp=True),
}

RELPOS = {  # timm VisionTransformerRelPos: MLP or table bias, per block or shared, pre- or post-norm, class token or no
    "relpos_gap": dict(qkv_bias=True),
    "relpos_cls_shared_table": dict(class_token=True, global_pool="token", shared_rel_pos=True, rel_pos_type="bias",
                                    init_values=0.5),
    "relpos_rpn_swin_mlp": dict(block_fn=ResPostRelPosBlock, rel_pos_type="mlp_swin", class_token=True),
}

POST_NORM = {  # post-norm blocks of timm's ViT (vit_*_rpn_*) and Eva (EVA-02 enormous)
    "vit_rpn": (VisionTransformer, dict(block_fn=ResPostBlock, qkv_bias=True, init_values=0.5)),
    "eva_post_norm": (Eva, dict(use_post_norm=True, use_rot_pos_emb=True, ref_feat_shape=(8, 8))),
}


NAFLEX = {  # timm NaFlexVit on image batches: SigLIP2 NaFlex, C-RADIO (class token, registers, aspect-preserving
    # position embeddings resized at other sizes, LayerScale), and EvaBlock variants: mixed RoPE; DINOv3 RoPE +
    # SwiGLU, factorized position embeddings and a conv patch projection; axial RoPE with grouped-query attention
    # (separate q/k/v) and the sigmoid output gate
    "naflex_siglip": dict(class_token=False, global_pool="map"),
    "naflex_radio": dict(class_token=True, reg_tokens=3, global_pool="token", final_norm=False, init_values=0.5,
                         pos_embed_interp_mode="bilinear", pos_embed_ar_preserving=True,
                         pos_embed_antialias=False),
    "naflex_rope_mixed": dict(class_token=True, global_pool="token", rope_type="mixed", pos_embed="none"),
    "naflex_dinov3_swiglu": dict(reg_tokens=2, global_pool="avg", rope_type="dinov3", rope_rotate_half=True,
                                 swiglu_mlp=True, init_values=0.5, pos_embed="factorized", embed_proj_type="conv"),
    "naflex_axial_gqa_gated": dict(class_token=True, global_pool="token", rope_type="axial", num_kv_heads=1,
                                   qkv_fused=False, attn_gated=True),
}

VIT_BLOCKS = {  # timm ViT blocks beyond the standard one: differential attention (vit_dwee, vit_dlittle), ViT-22B's
    # parallel block (vit_*_xp_* with RmsNorm and qk-norm; fused output projection with biases; vit_pwee), with
    # differential attention (vit_dpwee), and parallel branches (vit_*_18x2_*)
    "diff_reg_gap": dict(attn_layer="diff", class_token=False, no_embed_class=True, reg_tokens=1, global_pool="avg",
                         init_values=0.5),
    "diff_token_qknorm": dict(attn_layer="diff", qk_norm=True, qkv_bias=True),
    "parallel_xp": dict(block_fn=ParallelScalingBlock, qkv_bias=False, qk_norm=True, norm_layer=RmsNorm,
                        no_embed_class=True, pre_norm=True),
    "parallel_fused_gap": dict(block_fn=partial(ParallelScalingBlock, fuse_out_proj=True), qkv_bias=True,
                               class_token=False, global_pool="avg", init_values=0.5),
    "diff_parallel_reg_gap": dict(block_fn=DiffParallelScalingBlock, class_token=False, no_embed_class=True,
                                  reg_tokens=1, global_pool="avg", init_values=0.5),
    "parallel_things": dict(block_fn=ParallelThingsBlock, qkv_bias=True, init_values=0.5),
}


def make_backbone(variant: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    if variant in CLASS_FREE:
        model = VisionTransformer(**{**SMALL, "qkv_bias": True, **CLASS_FREE[variant], **overrides})
    elif variant in VIT_BLOCKS:
        model = VisionTransformer(**{**SMALL, **VIT_BLOCKS[variant], **overrides})
    elif variant in BEITS:
        model = Beit(**{**SMALL, **BEITS[variant], **overrides})
    elif variant in RELPOS:
        model = VisionTransformerRelPos(**{**SMALL, **RELPOS[variant], **overrides})
    elif variant in NAFLEX:
        model = NaFlexVit(**{**SMALL, "pos_embed_grid_size": (8, 8), **NAFLEX[variant], **overrides})
    elif variant in POST_NORM:
        model_class, options = POST_NORM[variant]
        model = model_class(**{**SMALL, **options, **overrides})
    else:
        model = Eva(**{**SMALL, **EVAS[variant], **overrides})
    return spread_weights(model, seed).eval()


def is_eva(model) -> bool:
    """Blocks that take a RoPE table (Eva, a NaFlexVit with RoPE)."""
    return isinstance(model, Eva) or getattr(model, "rope", None) is not None


def has_class_token(model) -> bool:
    return getattr(model, "cls_token", None) is not None or bool(getattr(model, "has_class_token", False))


def embed(model, img):
    """Tokens before the first block, and the blocks' position context: the RoPE table (Eva, NaFlexVit), the shared
    relative-position bias (Beit), or None."""
    if isinstance(model, NaFlexVit):  # timm's own embedding path, image mode
        embeds = model._forward_embeds(img, None, None, None)
        return embeds["patches"], embeds["rope_embeds"]
    if is_eva(model):
        x, rope = model._pos_embed(model.patch_embed(img))
        return model.norm_pre(x), rope
    if isinstance(model, Beit):
        x = model.patch_embed(img)
        x = torch.cat((model.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        x = x if model.pos_embed is None else x + model.pos_embed
        return x, None if model.rel_pos_bias is None else model.rel_pos_bias()
    if isinstance(model, VisionTransformerRelPos):
        x = model.patch_embed(img)
        if model.cls_token is not None:
            x = torch.cat((model.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        return x, None if model.shared_rel_pos is None else model.shared_rel_pos.get_bias()
    return model.norm_pre(model._pos_embed(model.patch_embed(img))), None


def block_rope(model, rope, i):
    mixed = getattr(model, "rope_mixed", False) or getattr(model, "rope_is_mixed", False)
    return rope[i] if rope is not None and mixed else rope


def call_block(model, i, x, context, mask=None):
    blk = model.blocks[i]
    if is_eva(model):
        return blk(x, rope=block_rope(model, context, i), attn_mask=mask)
    if isinstance(model, Beit):  # the mask rides on the shared bias, which BEiT adds to every logit
        extra = mask if context is None else context if mask is None else context + mask
        return blk(x, shared_rel_pos_bias=extra)
    if isinstance(model, VisionTransformerRelPos):
        return relpos_block(model, i, x, context, mask)
    return blk(x, attn_mask=mask)


def is_post_norm(blk) -> bool:
    return isinstance(blk, (ResPostBlock, EvaBlockPostNorm, ResPostRelPosBlock))


def relpos_block(model, i, x, context, mask=None):
    """timm's RelPos block written out (its attention takes no mask): explicit softmax over the full sequence with
    the bias at every token's own position plus ``mask``; pre- or post-norm residuals."""
    blk = model.blocks[i]
    attn, post = blk.attn, is_post_norm(blk)
    h = x if post else blk.norm1(x)
    B, N, C = h.shape
    q, k, v = attn.qkv(h).reshape(B, N, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    logits = attn.q_norm(q) @ attn.k_norm(k).transpose(-2, -1) * attn.scale + literal_bias(model, i, context)
    probs = (logits if mask is None else logits + mask).softmax(-1)
    o = attn.proj((probs @ v).transpose(1, 2).reshape(B, N, C))
    x = x + (blk.norm1(o) if post else blk.ls1(o))
    y = blk.mlp(x if post else blk.norm2(x))
    return x + (blk.norm2(y) if post else blk.ls2(y))


def literal_bias(model, i, context):
    """The additive logits (1, H, N, N) of block i over the full sequence at its own positions (0: none)."""
    if isinstance(model, VisionTransformerRelPos):  # the block's own bias, else the shared one
        rel_pos = model.blocks[i].attn.rel_pos
        return rel_pos.get_bias() if rel_pos is not None else 0 if context is None else context
    if not isinstance(model, Beit):
        return 0
    attn, bias = model.blocks[i].attn, 0
    if attn.relative_position_bias_table is not None:
        bias = attn._get_rel_pos_bias()
    return bias if context is None else bias + context


def scale_of(model, i):
    blk = model.blocks[i]
    return blk.attns[0].attn.scale if hasattr(blk, "attns") else getattr(blk, "attn", blk).scale


def heads_of(t, heads):
    B, N, width = t.shape
    return t.reshape(B, N, heads, width // heads).transpose(1, 2)


def other_block_qk(blk, x):
    """q, k of timm's parallel and differential-attention blocks, as their forwards make them: the parallel block's
    from the q and k rows of its input projection; differential attention's as 2H heads of half width (both maps of
    every pair); parallel branches' side by side."""
    if isinstance(blk, ParallelThingsBlock):
        pairs = [_standard_qk(branch.attn, branch.norm(x)) for branch in blk.attns]
        return tuple(torch.cat(t, dim=1) for t in zip(*pairs))
    if isinstance(blk, (ParallelScalingBlock, DiffParallelScalingBlock)):
        _, q, k, _ = torch.split(blk.in_proj(blk.in_norm(x)), blk.in_split, dim=-1)
        heads = q.shape[-1] // blk.head_dim
        return blk.q_norm(heads_of(q, heads)), blk.k_norm(heads_of(k, heads))
    attn = blk.attn  # a Block with DiffAttention
    q, k, _ = attn.qkv(blk.norm1(x)).chunk(3, dim=-1)
    return attn.q_norm(heads_of(q, 2 * attn.num_heads)), attn.k_norm(heads_of(k, 2 * attn.num_heads))


def _standard_qk(attn, h):
    B, N, _ = h.shape
    q, k, _ = attn.qkv(h).reshape(B, N, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    return attn.q_norm(q), attn.k_norm(k)


def literal_qk(model, i, x, context):
    """q, k (B, H, N, d) of block i on the full sequence, position terms at every token's own position."""
    blk, P = model.blocks[i], model.num_prefix_tokens
    if hasattr(blk, "literal_qk"):  # a test's own view of a block (Gemma 4's: its own norms and 2D RoPE)
        return blk.literal_qk(x, context)
    if type(getattr(blk, "attn", None)).__name__ == "DiffAttention" or not hasattr(blk, "attn"):
        return other_block_qk(blk, x)
    attn, h = blk.attn, (x if is_post_norm(blk) else blk.norm1(x))
    B, N, _ = h.shape
    H = attn.num_heads
    d = getattr(attn, "head_dim", None) or attn.qkv.out_features // 3 // H
    if getattr(attn, "qkv", None) is not None:
        bias = attn.qkv.bias
        if getattr(attn, "q_bias", None) is not None:
            bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
        q, k, _ = F.linear(h, attn.qkv.weight, bias).reshape(B, N, 3, H, d).permute(2, 0, 3, 1, 4).unbind(0)
    else:
        q = attn.q_proj(h).reshape(B, N, H, d).transpose(1, 2)
        k = attn.k_proj(h).reshape(B, N, -1, d).transpose(1, 2)
    if not isinstance(model, Beit):
        q, k = attn.q_norm(q), attn.k_norm(k)
    r = block_rope(model, context, i) if is_eva(model) else None
    if r is not None:
        half = attn.rotate_half
        q = torch.cat([q[:, :, :P], apply_rot_embed_cat(q[:, :, P:], r, half=half)], dim=2)
        k = torch.cat([k[:, :, :P], apply_rot_embed_cat(k[:, :, P:], r, half=half)], dim=2)
    return q, k.repeat_interleave(H // k.shape[1], dim=1)


def key_mask(m):
    """Additive logits (B, 1, 1, N): 0 on present keys, a large negative number on the others."""
    return ((1.0 - m) * -1e9)[:, None, None, :]


def finish(model, x):
    return model.forward_head(model.norm(x))


def ref_idle(model, img, keep, starts, score):
    """IdleViT, the official masked training path: scores from the full q, k; idle keys masked; updates kept on the
    selected rows only. score "cls": the class query's logits; "received": the mean over every query's logits."""
    x, context = embed(model, img)
    P = model.num_prefix_tokens
    N = x.shape[1] - P
    for i in range(len(model.blocks)):
        stage = sum(1 for s in starts if i >= s)
        if stage == 0:
            x = call_block(model, i, x, context)
            continue
        q, k = literal_qk(model, i, x, context)
        logits = q @ k.transpose(-2, -1) * scale_of(model, i) + literal_bias(model, i, context)
        scores = (logits[:, :, 0] if score == "cls" else logits.mean(2)).sum(1)[:, P:]
        top = scores.topk(int(N * keep ** stage), dim=1).indices
        m = torch.zeros(x.shape[:2]).scatter(1, top + P, 1.0)
        m[:, :P] = 1.0
        x = torch.where(m.bool()[..., None], call_block(model, i, x, context, key_mask(m)), x)
    return finish(model, x)


def _row(q, k, scale, m, row, bias=0):
    """The softmax row of the class query (row "cls") or of the mean of the present queries (row "mean") over the
    present keys, head mean; ``bias`` (1, H, N, N): the block's additive logits, its row taken the same way."""
    def pick(t):
        return t[:, :, :1] if row == "cls" else (t * m[:, None, :, None]).sum(2, keepdim=True) / m.sum(1)[
            :, None, None, None]

    logits = (pick(q) * scale) @ k.transpose(-2, -1) + key_mask(m)
    if torch.is_tensor(bias):
        logits = logits + pick(bias)
    return logits.softmax(-1)[:, :, 0].mean(1)


def ref_evo(model, img, keep, starts, mode, row, alpha=0.5):
    """Evo-ViT with placeholders carried unchanged, masked: g from block first-1's row; at each selection the top K
    by g take the full path among themselves; g evolves for them with their row."""
    x, context = embed(model, img)
    P = model.num_prefix_tokens
    N = x.shape[1] - P
    K, first = int(N * keep), starts[0]
    ones = torch.ones(x.shape[:2])
    g = m = None
    for i in range(len(model.blocks)):
        if i < first:
            if i == first - 1:
                q, k = literal_qk(model, i, x, context)
                g = _row(q, k, scale_of(model, i), ones, row, literal_bias(model, i, context))[:, P:]
            x = call_block(model, i, x, context)
            continue
        if mode == "layer" or i in starts:
            m = torch.zeros(x.shape[:2]).scatter(1, g.topk(K, dim=1).indices + P, 1.0)
            m[:, :P] = 1.0
        q, k = literal_qk(model, i, x, context)
        a = _row(q, k, scale_of(model, i), m, row, literal_bias(model, i, context))[:, P:]
        g = torch.where(m[:, P:].bool(), (1 - alpha) * g + alpha * a, g)
        x = torch.where(m.bool()[..., None], call_block(model, i, x, context, key_mask(m)), x)
    return finish(model, x)


def ref_topk(model, img, keep, layer, row):
    """Top-k dropping, masked: dropped tokens never update again and are never keys again."""
    x, context = embed(model, img)
    P = model.num_prefix_tokens
    N = x.shape[1] - P
    m = torch.ones(x.shape[:2])
    for i in range(len(model.blocks)):
        if i == layer - 1:
            q, k = literal_qk(model, i, x, context)
            g = _row(q, k, scale_of(model, i), m, row, literal_bias(model, i, context))[:, P:]
        if i == layer:
            m = torch.zeros(x.shape[:2]).scatter(1, g.topk(int(N * keep), dim=1).indices + P, 1.0)
            m[:, :P] = 1.0
        x = torch.where(m.bool()[..., None], call_block(model, i, x, context, key_mask(m)), x)
    keep_rows = m.bool()
    x = x[keep_rows].view(x.shape[0], -1, x.shape[-1])  # the kept tokens, in raster order
    return finish(model, x)


def assert_idle_equals_reference(model, view, images, keep=0.5, score="received"):
    """Idle at ``keep`` (depth 6: stages (2, 3, 5), the scaled (3, 6, 9)) equals :func:`ref_idle` run on ``view``
    (the model itself, or a test's view of it), and it idled something: the output keeps the dense shape and moves."""
    with torch.no_grad():
        expected = ref_idle(view, images, keep, (2, 3, 5), score)
        dense = tokenpace.remove(model)(images)
        got = tokenpace.apply(model, "idle", keep=keep)(images)
    assert got.shape == dense.shape and not torch.allclose(got, dense, atol=1e-3)
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4), (got - expected).abs().max()


def assert_evo_equals_reference(model, view, images, mode, row="mean"):
    """Evo(0.5) in ``mode`` (depth 6: stages (2, 4), the scaled (4, 8)) equals :func:`ref_evo` run on ``view``."""
    with torch.no_grad():
        expected = ref_evo(view, images, 0.5, (2, 4), mode, row)
        got = tokenpace.apply(model, "evo", keep=0.5, mode=mode)(images)
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4), (got - expected).abs().max()


def assert_position_less_tokens_run(model, images):
    """EViT's fused token and Evo's representative token have no position (not rotated, or their bias entries are
    the class token's): both runs are finite and move the output, a fused token is still there at the end, and the
    representative token changes Evo's result."""
    with torch.no_grad():
        dense = model(images)
        with tokenpace.trace(tokenpace.apply(model, "evit", keep=0.5)) as tr:
            fused = model(images)
        rep = tokenpace.apply(model, "evo", keep=0.5, representative=True)(images)
        plain = tokenpace.apply(model, "evo", keep=0.5)(images)
    assert (tr.kept[-1] == -1).any(1).all()
    for out in (fused, rep):
        assert torch.isfinite(out).all() and not torch.allclose(out, dense, atol=1e-3)
    assert not torch.allclose(rep, plain, atol=1e-4)


def assert_keep_one_intermediates_equal_unpatched(model, images, calls, methods=("evo", "idle")):
    """Each ``forward_intermediates`` call (its keyword options) gives the unpatched model's outputs under each of
    ``methods`` at keep=1, bit for bit."""
    for options in calls:
        with torch.no_grad():
            expected = flatten_outputs(tokenpace.remove(model).forward_intermediates(images, **options))
            for method in methods:
                got = flatten_outputs(tokenpace.apply(model, method, keep=1.0).forward_intermediates(images, **options))
                assert len(got) == len(expected) and all(a.shape == b.shape and torch.equal(a, b)
                                                         for a, b in zip(got, expected)), (method, options)


def assert_reduced_intermediates_are_full_maps(model, images, maps_shape, count, methods=("evo", "idle")):
    """Under each of ``methods`` at keep 0.5 the maps are full (``count`` of them, ``maps_shape`` each), the last one
    moved by the method, and the final tokens are the patched ``forward_features``' (their shape the unpatched
    model's)."""
    with torch.no_grad():
        dense_final, dense_maps = model.forward_intermediates(images)
        for method in methods:
            tokenpace.apply(model, method, keep=0.5)
            final, maps = model.forward_intermediates(images)
            assert [m.shape for m in maps] == [m.shape for m in dense_maps] == [maps_shape] * count
            assert final.shape == dense_final.shape
            assert torch.allclose(final, model.forward_features(images), atol=1e-5), method
            assert not torch.allclose(maps[-1], dense_maps[-1], atol=1e-3), method


def assert_bf16_autocast_as_close_as_dense(model, method, images, dtype=torch.bfloat16):
    """Under CPU bf16 autocast with the same selection (seeded random scores: bf16 rounding flips near-tied ranks,
    which moves the output by more than rounding) the reduced model is as close to float32 as the dense one; its
    output has the dense model's dtype under autocast (``dtype``)."""
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        dense_bf16 = model(images)
    with torch.no_grad():
        dense_error = (dense_bf16.float() - model(images)).abs().max()
    tokenpace.apply(model, method, score="random")
    runs = []
    for autocast in (True, False):
        torch.manual_seed(0)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), \
                tokenpace.trace(model) as trace:
            runs.append((model(images), trace.kept))
    (low, low_kept), (full, full_kept) = runs
    assert low.dtype == dense_bf16.dtype == dtype
    assert all(a is None and b is None or torch.equal(a, b) for a, b in zip(low_kept, full_kept))
    assert (low.float() - full).abs().max() <= 2 * dense_error + 1e-3


def assert_released_model_counts_as_flop_counter(name, ratio):
    """timm's released ``name`` at its pretrained input size, built on the meta device: MACs equal FlopCounterMode
    dense and under the default Idle, whose MACs ratio lies in ``ratio`` (low, high)."""
    import timm

    model = timm.create_model(name, device="meta").eval()
    images = torch.zeros(1, *model.pretrained_cfg["input_size"], device="meta")
    counts = []
    for method in (None, "idle"):
        assert_macs_equal_flop_counter(model, method, {}, images)
        counts.append(tokenpace.macs(model))
    assert ratio[0] < counts[0] / counts[1] < ratio[1]


def assert_keep_one_equals_unpatched(model, method, options, images):
    """keep=1 gives the unpatched model's logits, adds no state-dict key, and remove() restores it exactly."""
    keys = list(model.state_dict())
    with torch.no_grad():
        expected = model(images)
        got = tokenpace.apply(model, method, keep=1.0, **options)(images)
        assert torch.equal(got, expected), (got - expected).abs().max()
        assert list(model.state_dict()) == keys
        assert torch.equal(tokenpace.remove(model)(images), expected)


def assert_macs_equal_flop_counter(model, method, options, image, img_size=None):
    """tokenpace.macs equals FlopCounterMode / 2 on the non-fused attention path (CPU SDPA has no FLOP formula in
    some torch versions); ``method`` None: the dense model; ``img_size``: the image's, when not the model's own."""
    model.requires_grad_(False)  # FlopCounterMode's module hooks trip on leaf inputs
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = False
    if method is not None:
        tokenpace.apply(model, method, **options)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(image)
    assert tokenpace.macs(model, img_size=img_size) == counter.get_total_flops() // 2
