"""HieraDetAdapter: IdleViT on timm's HieraDet (SAM 2's image encoder: windowed and global blocks on the (B, H, W, C)
map, stage entries that pool), against a literal reference: timm's own padded window partition, every slot's full
logits with the idle and padding keys masked, then timm's proj, residual and MLP on the selected slots."""
import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models.hieradet_sam2 import HieraDet, window_partition, window_unpartition

import tokenpace
from tokenpace.families import adapter_for
from conftest import (HIERA_INTERMEDIATE_CALLS, assert_idle_equals_reference, assert_keep_one_and_remove,
                      assert_keep_one_intermediates_equal, assert_macs_equal_flop_counter,
                      assert_pruned_features_run_the_method, assert_scores_match_per_window, dense_and_idle_macs,
                      ref_window_idle_attention, spread_weights)

# (model options, input size). Patch stride 4: at 64 px the stages hold 16x16, 8x8, 4x4 and 2x2 maps; windows of 4,
# 2, 4 and 2 (timm lags them by one block at the stage entries), block 4 global. At 96 px (24x24, 12x12, 6x6, 3x3)
# the windows of stages 2 and 3 are padded (and the stage-3 entry pools padded windows)
HIERADETS = {
    "plain": (dict(), 64),
    "padded": (dict(), 96),
    "layerscale": (dict(init_values=0.5), 64),
    "q_pool_2": (dict(q_pool=2), 64),  # the last stage entry widens without pooling
    # the stage-3 entry widens without pooling, over the whole map (timm's own block cannot pool a global block)
    "global_entry": (dict(q_pool=2, global_att_blocks=(6,)), 64),
}
BASE = dict(embed_dim=16, num_heads=1, stages=(1, 2, 3, 2), window_spec=(4, 2, 4, 2), global_att_blocks=(4,),
            global_pos_size=(4, 4), num_classes=5)
STARTS = (0, 2, 4)


def make_hieradet(variant: str = "plain", seed: int = 0, **overrides) -> HieraDet:
    torch.manual_seed(seed)
    return spread_weights(HieraDet(**{**BASE, **HIERADETS[variant][0], **overrides}), seed).eval()


def hieradet_images(variant: str = "plain", batch: int = 2) -> torch.Tensor:
    size = HIERADETS[variant][1]
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


def set_fused(model, fused: bool):
    for blk in model.blocks:
        blk.attn.fused_attn = fused
    return model


# ----------------------------------------------------------------------------------------------------------------
# Literal reference: timm's padding and window partition, every slot's logits, idle and padding keys masked
# ----------------------------------------------------------------------------------------------------------------

def ref_window(blk, H, W):
    return tuple(blk.window_size) if blk.is_windowed else (H, W)


def ref_windows(blk, t):
    """(B, H, W, D) -> (G, n, D): timm's zero padding and window partition (a global block: the whole map)."""
    B, H, W, _ = t.shape
    wh, ww = ref_window(blk, H, W)
    t = F.pad(t, (0, 0, 0, -W % ww, 0, -H % wh))
    return window_partition(t, (wh, ww)).flatten(1, 2)


def ref_unwindows(blk, t, H, W):
    wh, ww = ref_window(blk, H, W)
    Hp, Wp = H + -H % wh, W + -W % ww
    return window_unpartition(t.reshape(-1, wh, ww, t.shape[-1]), (wh, ww), (Hp, Wp))[:, :H, :W]


def ref_padding(blk, x):
    return ref_windows(blk, torch.ones_like(x[..., :1]))[..., 0] == 0  # (G, n)


def ref_logits(blk, x):
    attn = blk.attn
    win = ref_windows(blk, blk.norm1(x))
    G, n, _ = win.shape
    q, k, v = attn.qkv(win).reshape(G, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    return (q * attn.scale) @ k.transpose(-2, -1), v


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
    y = x + blk.ls1(ref_unwindows(blk, blk.attn.proj(o), H, W))
    y = y + blk.ls2(blk.mlp(blk.norm2(y)))
    return torch.where(ref_unwindows(blk, sel.unsqueeze(-1).float(), H, W) > 0.5, y, x)


def ref_idle(model, img, keep, score, starts=STARTS):
    x = model._pos_embed(model.patch_embed(img))
    for i, blk in enumerate(model.blocks):
        s = sum(i >= start for start in starts)
        wh, ww = ref_window(blk, *x.shape[1:3])
        k = int(wh * ww * keep ** s)
        entry = blk.dim != blk.dim_out or blk.q_stride is not None
        x = blk(x) if s == 0 or k == wh * ww or entry else ref_idle_block(blk, x, k, score)
    return model.forward_head(x)


# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", list(HIERADETS))
def test_keep_one_is_the_model_and_remove_restores_it(variant):
    assert_keep_one_and_remove(make_hieradet(variant), hieradet_images(variant), stage_starts=STARTS)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("score", ["received", "norm"])
@pytest.mark.parametrize("variant", list(HIERADETS))
def test_idle_equals_the_masked_window_reference(variant, score, fused):
    model, img = set_fused(make_hieradet(variant), fused), hieradet_images(variant)
    assert_idle_equals_reference(model, img, lambda: ref_idle(model, img, 0.7, score), keep=0.7, score=score,
                                 stage_starts=STARTS)


@pytest.mark.parametrize("variant,block", [("plain", 0), ("plain", 2), ("padded", 4), ("padded", 5), ("padded", 7)])
def test_scores_rank_like_the_full_logits(variant, block):
    """Global (block 4) and padded windows (at 96 px, block 5: windows of 4 on 6x6, block 7: of 2 on 3x3) included:
    the scores differ from the full logits' mean by one constant a window."""
    model, img = make_hieradet(variant), hieradet_images(variant)
    adapter = adapter_for(model)
    x = model._pos_embed(model.patch_embed(img))
    with torch.no_grad():
        for i in range(block):
            x = model.blocks[i](x)
        blk = model.blocks[block]
        assert not adapter.resamples(block)
        ours = adapter.token_scores(block, adapter.prepare(block, x), "received").flatten(0, 1)
        ref = ref_scores(blk, x, "received")
    assert_scores_match_per_window(ours, ref, ~ref_padding(blk, x))


@pytest.mark.parametrize("variant", [*HIERADETS, "no_pool"])
@pytest.mark.parametrize("options", [None, {}, {"score": "norm"}, {"score": "random", "keep": 0.8}], ids=str)
def test_macs_equal_flop_counter_on_the_non_fused_path(variant, options):
    model = make_hieradet("plain" if variant == "no_pool" else variant)
    if variant == "no_pool":  # the head's norm and classifier on every token
        model.reset_classifier(5, global_pool="")
    img = hieradet_images("plain" if variant == "no_pool" else variant, batch=1)
    assert_macs_equal_flop_counter(set_fused(model, False), img,
                                   None if options is None else dict(stage_starts=STARTS, **options))


def test_sam2_hiera_tiny_macs_equal_flop_counter():
    """sam2_hiera_tiny on the meta device (shapes only) at its 896 px: 224x224 tokens in windows of 8, then 4, 14
    and 7, global blocks 5, 7 and 9."""
    with torch.device("meta"):
        model = set_fused(timm.create_model("sam2_hiera_tiny"), False)
        img = torch.empty(1, 3, 896, 896)
    counts = dense_and_idle_macs(model, img, lambda m, x: m.forward_features(x))
    print(f"sam2_hiera_tiny at 896 px: dense {counts[None] / 1e9:.1f} GMACs, idle {counts['idle'] / 1e9:.1f} GMACs")
    assert 0.6 < counts["idle"] / counts[None] < 0.8


def test_sizes_timm_runs_and_no_other():
    model = make_hieradet()
    assert tokenpace.macs(model, img_size=96) > tokenpace.macs(model, img_size=64)
    with pytest.raises(ValueError, match=r"patch grid \(18x18\) must have sides that are multiples of 4"):
        tokenpace.macs(model, img_size=72)
    with pytest.raises(ValueError, match="block 6 pools windows of 4x4 on a 5x5 map.*timm's HieraDet fails there"):
        tokenpace.macs(model, img_size=80)
    with pytest.raises(RuntimeError):  # timm's own forward at that size (at batch 1 it broadcasts to 4 images)
        model(torch.randn(2, 3, 80, 80))
    tokenpace.apply(model, "idle")
    for batch in (1, 2):  # the patched forward refuses it by name, at batch 1 too
        with pytest.raises(ValueError, match="cannot run a 20x20 patch grid: block 6 pools windows of 4x4"):
            model(torch.randn(batch, 3, 80, 80))


def test_forward_intermediates_match_timm_and_the_idle_run():
    model, img = make_hieradet("padded"), hieradet_images("padded")
    assert_keep_one_intermediates_equal(model, img, HIERA_INTERMEDIATE_CALLS)
    with torch.no_grad():
        tokenpace.apply(model, "idle", keep=0.7, stage_starts=STARTS)
        final, maps = model.forward_intermediates(img)
        assert [m.shape for m in maps] == [(2, 16, 24, 24), (2, 32, 12, 12), (2, 64, 6, 6), (2, 128, 3, 3)]
        torch.testing.assert_close(final, model.forward_features(img), rtol=0, atol=0)
        torch.testing.assert_close(maps[-1], final.permute(0, 3, 1, 2), rtol=0, atol=0)
        with pytest.raises(ValueError, match="norm=False"):
            model.forward_intermediates(img, norm=True)


def test_trace_names_the_kept_positions():
    model, img = make_hieradet("padded"), hieradet_images("padded")
    tokenpace.apply(model, "idle", keep=0.7, stage_starts=STARTS)
    with torch.no_grad(), tokenpace.trace(model) as trace:
        model(img)
    # block 0: 36 windows of 16 keep 11; block 2: 36 windows of 4 keep 1; block 4: the 6x6 map, global, keeps 12;
    # block 5: 4 windows of 16 slots on the 6x6 map padded to 8x8 keep 5; block 7: the 3x3 map in 4 windows of 4
    shapes = [None if k is None else tuple(k.shape) for k in trace.kept]
    assert shapes == [(2, 396), None, (2, 36), None, (2, 12), (2, 20), None, (2, 4)]
    for block, cells in ((0, 576), (2, 144), (4, 36), (5, 36)):
        kept = trace.kept[block]
        real = kept[kept >= 0]
        assert real.max() < cells and all(len(set(r[r >= 0].tolist())) == int((r >= 0).sum()) for r in kept)
    assert (trace.kept[5] < 0).any()  # the corner window holds 4 real tokens: one of its 5 places is padding


def test_only_idle_and_what_is_refused():
    model = make_hieradet()
    for method in ("evo", "evit", "topk"):
        with pytest.raises(ValueError, match="sequence"):
            tokenpace.apply(model, method)
    with pytest.raises(ValueError, match="score"):
        tokenpace.apply(model, "idle", score="cls")
    tokenpace.apply(model, "idle")
    model.blocks[2] = type(model.blocks[2])(16, 16, 1)
    with pytest.raises(TypeError, match="block 2 .*was replaced after tokenpace.apply"):
        model(hieradet_images())


@pytest.mark.parametrize("fused", [False, True])
def test_bf16_autocast_and_training(fused):
    model = set_fused(make_hieradet("padded", init_values=0.5), fused)
    img = hieradet_images("padded")
    for score in ("random", "received"):
        tokenpace.apply(model, "idle", keep=0.7, stage_starts=STARTS, score=score)
        runs = []
        for autocast in (True, False):
            torch.manual_seed(0)  # random scores: the same selections in both precisions
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), \
                    tokenpace.trace(model) as trace:
                runs.append((model(img), trace.kept))
        (low, low_kept), (full, full_kept) = runs
        assert low.dtype == torch.bfloat16
        same = all((a is None and b is None) or torch.equal(a, b) for a, b in zip(low_kept, full_kept))
        if score == "random":
            assert same
        if same:  # where bf16 scores picked what fp32 ones did, only the blocks' rounding differs
            assert (low.float() - full).abs().max() < 0.1 * full.abs().max(), score
    model.train()
    model(img).square().mean().backward()
    assert all(blk.attn.qkv.weight.grad is not None and blk.attn.qkv.weight.grad.abs().sum() > 0
               for blk in model.blocks)


def test_a_pruned_features_only_model_runs_the_method():
    """timm prunes a features_only model's blocks after its last out_index but keeps the stage ends: the stages left
    empty are not stages of the family."""
    torch.manual_seed(0)
    features = timm.create_model("sam2_hiera_tiny", features_only=True, out_indices=(0, 1),
                                 **{k: v for k, v in BASE.items() if k != "num_classes"}).eval()
    assert_pruned_features_run_the_method(features, hieradet_images("padded"), 3, [(2, 16, 24, 24), (2, 32, 12, 12)])
