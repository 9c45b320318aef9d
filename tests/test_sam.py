"""SamAdapter: IdleViT on timm's VisionTransformerSAM (windowed and global blocks, decomposed relative position, the
neck), against a literal reference: timm's own window and bias math with the full n x n logits, idle keys masked."""
import pytest
import timm
import torch
from timm.models.vision_transformer_sam import (VisionTransformerSAM, get_decomposed_rel_pos_bias, window_partition,
                                                window_unpartition)
from torch.utils.flop_counter import FlopCounterMode

import tokenpace
from tokenpace.core.decomposed_bias import pair_bias, received_bias
from tokenpace.families import adapter_for
from conftest import assert_scores_match_per_window, dense_and_idle_macs, ref_window_idle_attention, spread_weights

# (model options, input size); windows of 4 on a 10x10 map (padded to 12x12: 9 windows, 4 of them part padding),
# global blocks 1 and 3
SAMS = {
    "padded": (dict(img_size=80), 80),
    # built for 64 px, run at 80: the global blocks' tables and the position embedding are resized as timm does
    "resized": (dict(img_size=64), 80),
    # query/key norms (queries not affine: scoring projects them), LayerScale, no absolute position, a norm neck
    "qk_norm": (dict(img_size=80, qk_norm=True, init_values=0.5, use_abs_pos=False, neck_chans=None), 80),
    # no relative position: the padding keys are the only position term
    "no_rel_pos": (dict(img_size=80, use_rel_pos=False), 80),
    # a window larger than the map, a map that is not square: 10x8 tokens in one 12x12 window, global 10x8
    "wide_window": (dict(img_size=(80, 64), window_size=12), (80, 64)),
}
STARTS = (1, 2, 3)


def make_sam(variant: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    options = {**dict(patch_size=8, embed_dim=32, depth=4, num_heads=2, window_size=4, global_attn_indexes=(1, 3),
                      use_rel_pos=True, neck_chans=16, num_classes=5), **SAMS[variant][0], **overrides}
    return spread_weights(VisionTransformerSAM(**options), seed).eval()


def sam_images(variant: str, batch: int = 2) -> torch.Tensor:
    size = SAMS[variant][1]
    size = size if isinstance(size, tuple) else (size, size)
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(1))


def set_fused(model, fused: bool):
    for blk in model.blocks:
        blk.attn.fused_attn = fused
    return model


# ----------------------------------------------------------------------------------------------------------------
# Literal reference: timm's window partition and decomposed bias on every slot, idle keys masked
# ----------------------------------------------------------------------------------------------------------------

def sam_embed(model, img):
    from timm.layers import resample_abs_pos_embed_nhwc

    x = model.patch_embed(img)
    if model.pos_embed is not None:
        x = x + resample_abs_pos_embed_nhwc(model.pos_embed, x.shape[1:3])
    return model.norm_pre(x)


def ref_window(blk, H, W):
    return (blk.window_size, blk.window_size) if blk.window_size > 0 else (H, W)


def ref_windows(blk, t):
    """(B, H, W, D) -> (G, n, D): timm's padded window partition (a global block: the whole map)."""
    if blk.window_size > 0:
        return window_partition(t, blk.window_size)[0].flatten(1, 2)
    return t.flatten(1, 2)


def ref_unwindows(blk, t, H, W):
    ws = blk.window_size
    if ws > 0:
        return window_unpartition(t.reshape(-1, ws, ws, t.shape[-1]), ws, (H, W), (H + -H % ws, W + -W % ws))
    return t.reshape(-1, H, W, t.shape[-1])


def ref_logits(blk, x):
    """Every window's full scaled logits (G, heads, n, n) with timm's decomposed bias, and v."""
    attn = blk.attn
    B, H, W, _ = x.shape
    win = ref_windows(blk, blk.norm1(x))
    G, n, _ = win.shape
    q, k, v = attn.qkv(win).reshape(G, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    logits = (q * attn.scale) @ k.transpose(-2, -1)
    if attn.use_rel_pos:
        size = ref_window(blk, H, W)
        bias = get_decomposed_rel_pos_bias(q.reshape(G * attn.num_heads, n, -1), attn.rel_pos_h, attn.rel_pos_w,
                                           size, size)
        logits = logits + bias.view(G, attn.num_heads, n, n)
    return logits, v


def ref_padding(blk, x):
    return ref_windows(blk, torch.ones_like(x[..., :1]))[..., 0] == 0  # (G, n)


def ref_scores(blk, x, score):
    if score == "received":
        scores = ref_logits(blk, x)[0].sum(1).mean(1)
    else:
        scores = ref_windows(blk, x.norm(dim=-1, keepdim=True))[..., 0]
    return scores.masked_fill(ref_padding(blk, x), float("-inf"))


def ref_idle_block(blk, x, k, score):
    B, H, W, C = x.shape
    logits, v = ref_logits(blk, x)
    o, sel = ref_window_idle_attention(logits, v, ref_padding(blk, x), ref_scores(blk, x, score), k)
    out = ref_unwindows(blk, blk.attn.proj(o), H, W)
    y = x + blk.ls1(out)
    y = y + blk.ls2(blk.mlp(blk.norm2(y)))
    return torch.where(ref_unwindows(blk, sel.unsqueeze(-1).float(), H, W) > 0.5, y, x)


def ref_idle(model, img, keep, score, starts=STARTS):
    x = sam_embed(model, img)
    for i, blk in enumerate(model.blocks):
        s = sum(i >= start for start in starts)
        wh, ww = ref_window(blk, *x.shape[1:3])
        k = int(wh * ww * keep ** s)
        x = blk(x) if s == 0 or k == wh * ww else ref_idle_block(blk, x, k, score)
    return model.forward_head(model.neck(x.permute(0, 3, 1, 2)))


# ----------------------------------------------------------------------------------------------------------------

def test_pair_bias_equals_timms_decomposed_bias():
    """The bias among a subset of slots (each query against every offset, gathered) is timm's full bias there."""
    gen = torch.Generator().manual_seed(0)
    wh, ww, heads, d, G = 3, 5, 2, 4, 6
    q = torch.randn(G, heads, wh * ww, d, generator=gen, dtype=torch.float64)
    th, tw = (torch.randn(2 * s - 1, d, generator=gen, dtype=torch.float64) for s in (wh, ww))
    full = get_decomposed_rel_pos_bias(q.flatten(0, 1), th, tw, (wh, ww), (wh, ww)).view(G, heads, wh * ww, wh * ww)
    sel = torch.rand(G, wh * ww, generator=gen).argsort(dim=1)[:, :7]
    ours = pair_bias(q.gather(2, sel[:, None, :, None].expand(G, heads, 7, d)), th, tw, sel // ww, sel % ww)
    rows = sel[:, None, :, None].expand(G, heads, 7, wh * ww)
    ref = full.gather(2, rows).gather(3, sel[:, None, None, :].expand(G, heads, 7, 7))
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)
    line_sums = q.view(G, heads, wh, ww, d)
    torch.testing.assert_close(received_bias(line_sums.sum(3), line_sums.sum(2), th, tw).flatten(1),
                               full.sum(dim=(1, 2)), rtol=0, atol=1e-11)


@pytest.mark.parametrize("variant", list(SAMS))
def test_keep_one_is_the_model_and_remove_restores_it(variant):
    model, img = make_sam(variant), sam_images(variant)
    keys = list(model.state_dict())
    with torch.no_grad():
        ref = model(img)
        assert torch.equal(tokenpace.apply(model, "idle", keep=1.0)(img), ref)
        assert not torch.allclose(tokenpace.apply(model, "idle", keep=0.7)(img), ref, atol=1e-3)
        assert list(model.state_dict()) == keys
        assert torch.equal(tokenpace.remove(model)(img), ref)
    assert type(model) is VisionTransformerSAM


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("score", ["received", "norm"])
@pytest.mark.parametrize("variant", list(SAMS))
def test_idle_equals_the_masked_window_reference(variant, score, fused):
    model, img = set_fused(make_sam(variant), fused), sam_images(variant)
    with torch.no_grad():
        ref = ref_idle(model, img, 0.7, score)
        out = tokenpace.apply(model, "idle", keep=0.7, score=score, stage_starts=STARTS)(img)
        dense = tokenpace.remove(model)(img)
    assert not torch.allclose(out, dense, atol=1e-2)  # idling changed the result ...
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)  # ... exactly as the reference says


@pytest.mark.parametrize("variant,block", [("padded", 0), ("padded", 1), ("resized", 1), ("qk_norm", 0),
                                           ("qk_norm", 1), ("no_rel_pos", 2)])
def test_adapter_scores_rank_like_the_full_logits(variant, block):
    """Decomposed bias and padding included: the scores differ from the full logits' mean by one constant a window."""
    model = make_sam(variant)
    adapter = adapter_for(model)
    blk = adapter.blocks[block]
    x = torch.randn(2, 10, 10, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = adapter.token_scores(block, adapter.prepare(block, x), "received").flatten(0, 1)
        ref = ref_scores(blk, x, "received")
    assert_scores_match_per_window(ours, ref, ~ref_padding(blk, x))


@pytest.mark.parametrize("variant", list(SAMS))
@pytest.mark.parametrize("method,options", [(None, {}), ("idle", {}), ("idle", {"score": "norm"}),
                                            ("idle", {"score": "random", "keep": 0.65})], ids=str)
def test_macs_equal_flop_counter_on_the_non_fused_path(variant, method, options):
    model = set_fused(make_sam(variant), False)
    if method is not None:
        tokenpace.apply(model, method, **options)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(sam_images(variant, batch=1))
    assert tokenpace.macs(model, img_size=SAMS[variant][1]) == counter.get_total_flops() // 2


def test_samvit_base_macs_at_1024_equal_flop_counter():
    """The full-size SAM encoder on the meta device (shapes only): 64x64 tokens, 25 padded windows of 14x14."""
    with torch.device("meta"):
        model = set_fused(timm.create_model("samvit_base_patch16"), False)
        img = torch.empty(1, 3, 1024, 1024)
    counts = dense_and_idle_macs(model, img, lambda m, x: m.forward_features(x))
    print(f"samvit_base_patch16 at 1024 px: dense {counts[None] / 1e9:.1f} GMACs, "
          f"idle keep=0.7 {counts['idle'] / 1e9:.1f} GMACs")
    assert 480e9 < counts[None] < 500e9  # SAM ViT-B's image encoder: about 487 GMACs
    assert 0.55 < counts["idle"] / counts[None] < 0.7


def test_forward_intermediates_match_timm_and_the_idle_run():
    model, img = make_sam("padded"), sam_images("padded")
    with torch.no_grad():
        ref = model.forward_intermediates(img, indices=[0, 2], norm=True)
        ref_stop = model.forward_intermediates(img, indices=2, stop_early=True, intermediates_only=True)
        tokenpace.apply(model, "idle", keep=1.0)
        ours = model.forward_intermediates(img, indices=[0, 2], norm=True)
        ours_stop = model.forward_intermediates(img, indices=2, stop_early=True, intermediates_only=True)
        torch.testing.assert_close(ours[0], ref[0], rtol=0, atol=0)
        for a, b in zip(ours[1] + ours_stop, ref[1] + ref_stop):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        tokenpace.apply(model, "idle", keep=0.7)
        final, maps = model.forward_intermediates(img)
        assert len(maps) == 4 and maps[-1].shape == (2, 32, 10, 10) and final.shape == (2, 16, 10, 10)
        torch.testing.assert_close(final, model.forward_features(img), rtol=0, atol=0)
        with pytest.raises(ValueError, match="NCHW"):
            model.forward_intermediates(img, output_fmt="NLC")


def test_trace_names_the_kept_positions():
    model, img = make_sam("padded"), sam_images("padded")
    tokenpace.apply(model, "idle", keep=0.5, stage_starts=STARTS)
    with torch.no_grad(), tokenpace.trace(model) as trace:
        model(img)
    assert trace.kept[0] is None
    # stage 1: the 10x10 map keeps 50 of 100; stage 2: 9 windows of 16 slots keep 4 each
    windowed, whole = trace.kept[2], trace.kept[1]
    assert windowed.shape == (2, 9 * 4) and whole.shape == (2, 50)
    assert whole.min() >= 0 and whole.max() < 100 and all(len(set(row.tolist())) == 50 for row in whole)
    real = windowed[windowed >= 0]
    assert real.max() < 100 and len(set(windowed[0][windowed[0] >= 0].tolist())) == int((windowed[0] >= 0).sum())


def test_only_idle_and_no_rope():
    model = make_sam("padded")
    for method in ("evo", "evit", "topk"):
        with pytest.raises(ValueError, match="sequence"):
            tokenpace.apply(model, method)
    with pytest.raises(ValueError, match="score"):
        tokenpace.apply(model, "idle", score="cls")
    rope = VisionTransformerSAM(img_size=64, patch_size=8, embed_dim=32, depth=2, num_heads=2, window_size=4,
                                global_attn_indexes=(1,), use_rope=True)
    with pytest.raises(TypeError, match="RoPE"):
        tokenpace.apply(rope, "idle")


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("variant", ["padded", "qk_norm"])
def test_bf16_autocast_and_training(variant, fused):
    model = set_fused(make_sam(variant), fused)
    img = sam_images(variant)
    tokenpace.apply(model, "idle", keep=0.7, stage_starts=STARTS)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(img)
    with torch.no_grad():
        full = model(img)
    assert low.dtype == torch.bfloat16 and (low.float() - full).abs().max() < 0.1 * full.abs().max()
    model.train()
    model(img).square().mean().backward()
    assert all(blk.attn.rel_pos_h.grad is not None and blk.attn.rel_pos_h.grad.abs().sum() > 0
               for blk in model.blocks[1:])
