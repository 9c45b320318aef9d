"""TinyVitAdapter: IdleViT on timm's TinyViT (a convolutional first stage, then windowed attention with LeViT-style
biases and a local convolution between the halves), against a literal reference: timm's own padding, window
partition and attention norm, every slot's full logits with the biases, idle and padding keys masked, then the
local convolution on the whole map and the MLP on the selected tokens."""
import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models.tiny_vit import TinyVit

import tokenpace
from conftest import (assert_idle_equals_reference, assert_keep_one_and_remove, assert_keep_one_intermediates_equal,
                      assert_macs_equal_flop_counter, dense_and_idle_macs, ref_window_idle_attention, set_fused,
                      spread_batchnorm, spread_weights)

# (model options, input size). Stem stride 4, then each stage halves: at 64 px stage 0 (MBConv) holds 16x16, then
# 8x8 (windows of 4), 4x4 (one window of 4) and 2x2 (one of 2); at 80 px 20x20, 10x10, 5x5 and 3x3: every window
# stage is padded
TINYVITS = {
    "plain": (dict(), 64),
    "padded": (dict(), 80),
}
BASE = dict(embed_dims=(16, 32, 32, 64), depths=(1, 2, 2, 1), num_heads=(1, 2, 2, 2), window_sizes=(4, 4, 4, 2),
            num_classes=5, drop_path_rate=0.0)
STARTS = (1, 3, 5)


def make_tiny_vit(variant: str = "plain", seed: int = 0, **overrides) -> TinyVit:
    torch.manual_seed(seed)
    model = spread_weights(TinyVit(**{**BASE, **TINYVITS[variant][0], **overrides}), seed).eval()
    return spread_batchnorm(model, seed)


def tiny_vit_images(variant: str = "plain", batch: int = 2) -> torch.Tensor:
    size = TINYVITS[variant][1]
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


# ----------------------------------------------------------------------------------------------------------------
# Literal reference
# ----------------------------------------------------------------------------------------------------------------

def ref_windows(t, w):
    """(B, H, W, D) -> (G, w*w, D): timm's zero padding (bottom, right) and window partition."""
    B, H, W, D = t.shape
    t = F.pad(t, (0, 0, 0, -W % w, 0, -H % w))
    Hp, Wp = t.shape[1:3]
    return t.view(B, Hp // w, w, Wp // w, w, D).transpose(2, 3).reshape(-1, w * w, D)


def ref_unwindows(t, w, B, H, W):
    Hp, Wp = H + -H % w, W + -W % w
    return t.view(B, Hp // w, Wp // w, w, w, -1).transpose(2, 3).reshape(B, Hp, Wp, -1)[:, :H, :W]


def ref_idle_block(blk, x, k, score):
    attn, w = blk.attn, blk.window_size
    B, H, W, C = x.shape
    pad = ref_windows(torch.ones_like(x[..., :1]), w)[..., 0] == 0
    h = attn.norm(ref_windows(x, w))  # padding slots hold the norm of zero, as in timm's window
    G, n, _ = h.shape
    q, key, v = attn.qkv(h).view(G, n, attn.num_heads, -1).split([attn.key_dim, attn.key_dim, attn.val_dim], dim=3)
    q, key, v = q.transpose(1, 2), key.transpose(1, 2), v.transpose(1, 2)
    logits = (q * attn.scale) @ key.transpose(-2, -1) + attn.attention_biases[:, attn.attention_bias_idxs]
    if score == "received":
        scores = logits.sum(1).mean(1)
    else:
        scores = ref_windows(x.norm(dim=-1, keepdim=True), w)[..., 0]
    o, sel = ref_window_idle_attention(logits, v, pad, scores.masked_fill(pad, float("-inf")), k)
    selected = ref_unwindows(sel.unsqueeze(-1).float(), w, B, H, W) > 0.5
    x = torch.where(selected, x + ref_unwindows(attn.proj(o), w, B, H, W), x)
    x = blk.local_conv(x.permute(0, 3, 1, 2)).flatten(2).transpose(1, 2).reshape(B, H, W, C)  # every token
    return torch.where(selected, x + blk.mlp(x), x)


def ref_idle(model, img, keep, score, starts=STARTS):
    x, i = model.stages[0](model.patch_embed(img)), len(model.stages[0].blocks)  # the convolutional stage
    for stage in model.stages[1:]:
        x = stage.downsample(x).permute(0, 2, 3, 1)
        for blk in stage.blocks:
            s = sum(i >= start for start in starts)
            n = blk.window_size ** 2
            k = int(n * keep ** s)
            x = blk(x) if s == 0 or k == n else ref_idle_block(blk, x, k, score)
            i += 1
        x = x.permute(0, 3, 1, 2)
    return model.forward_head(x)


# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", list(TINYVITS))
def test_keep_one_is_the_model_and_remove_restores_it(variant):
    assert_keep_one_and_remove(make_tiny_vit(variant), tiny_vit_images(variant), stage_starts=STARTS)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("score", ["received", "norm"])
@pytest.mark.parametrize("variant", list(TINYVITS))
def test_idle_equals_the_masked_window_reference(variant, score, fused):
    model, img = set_fused(make_tiny_vit(variant), fused), tiny_vit_images(variant)
    assert_idle_equals_reference(model, img, lambda: ref_idle(model, img, 0.7, score), keep=0.7, score=score,
                                 stage_starts=STARTS)


@pytest.mark.parametrize("variant", [*TINYVITS, "no_pool"])
@pytest.mark.parametrize("options", [None, {}, {"score": "norm"}, {"score": "random", "keep": 0.8}], ids=str)
def test_macs_equal_flop_counter_on_the_non_fused_path(variant, options):
    model = make_tiny_vit("plain" if variant == "no_pool" else variant)
    if variant == "no_pool":  # the head's norm and classifier on every token
        model.reset_classifier(5, global_pool="")
    img = tiny_vit_images("plain" if variant == "no_pool" else variant, batch=1)
    assert_macs_equal_flop_counter(set_fused(model, False), img,
                                   None if options is None else dict(stage_starts=STARTS, **options))


def test_tiny_vit_5m_macs_equal_flop_counter():
    """tiny_vit_5m_224 on the meta device (shapes only): the paper's TinyViT-5M is 1.3 G(MACs)."""
    with torch.device("meta"):
        model = set_fused(timm.create_model("tiny_vit_5m_224"), False)
        img = torch.empty(1, 3, 224, 224)
    counts = dense_and_idle_macs(model, img, lambda m, x: m(x))
    assert 1.2e9 < counts[None] < 1.35e9
    assert 0.7 < counts["idle"] / counts[None] < 0.9


def test_forward_intermediates_match_timm_and_the_idle_run():
    model, img = make_tiny_vit("padded"), tiny_vit_images("padded")
    assert_keep_one_intermediates_equal(model, img, [
        dict(), dict(indices=[0, 2]), dict(indices=2, stop_early=True, intermediates_only=True),
        dict(indices=[0], stop_early=True), dict(indices=[1], stop_early=True)])
    with torch.no_grad():
        tokenpace.apply(model, "idle", keep=0.7, stage_starts=STARTS)
        final, maps = model.forward_intermediates(img)
        assert [m.shape for m in maps] == [(2, 16, 20, 20), (2, 32, 10, 10), (2, 32, 5, 5), (2, 64, 3, 3)]
        torch.testing.assert_close(final, model.forward_features(img), rtol=0, atol=0)
        torch.testing.assert_close(maps[-1], final, rtol=0, atol=0)
        with pytest.raises(ValueError, match="norm=False"):
            model.forward_intermediates(img, norm=True)


def test_trace_names_the_kept_positions():
    model, img = make_tiny_vit("padded"), tiny_vit_images("padded")
    tokenpace.apply(model, "idle", keep=0.7, stage_starts=STARTS)
    with torch.no_grad(), tokenpace.trace(model) as trace:
        model(img)
    # block 0 is the MBConv; blocks 1-2: 9 windows of 16 slots on the 10x10 map (padded to 12x12) keep 11; blocks
    # 3-4: 4 windows of 16 on the 5x5 map (padded to 8x8) keep 7; block 5: 4 windows of 4 on the 3x3 map keep 1
    shapes = [None if k is None else tuple(k.shape) for k in trace.kept]
    assert shapes == [None, (2, 99), (2, 99), (2, 28), (2, 28), (2, 4)]
    for block, cells in ((1, 100), (3, 25), (5, 9)):
        kept = trace.kept[block]
        assert kept.max() < cells and all(len(set(r[r >= 0].tolist())) == int((r >= 0).sum()) for r in kept)
    assert (trace.kept[4] < 0).any()  # a corner window of the 5x5 map holds one real token: its other places pad


def test_only_idle_and_what_is_refused():
    model = make_tiny_vit()
    for method in ("evo", "evit", "topk"):
        with pytest.raises(ValueError, match="sequence"):
            tokenpace.apply(model, method)
    with pytest.raises(ValueError, match="score"):
        tokenpace.apply(model, "idle", score="cls")
    assert tokenpace.macs(model, img_size=96) > tokenpace.macs(model, img_size=64)  # padding makes any size run


@pytest.mark.parametrize("fused", [False, True])
def test_bf16_autocast_and_training(fused):
    model = set_fused(make_tiny_vit("padded"), fused)
    img = tiny_vit_images("padded")
    tokenpace.apply(model, "idle", keep=0.7, stage_starts=STARTS, score="random")
    runs = []
    for autocast in (True, False):
        torch.manual_seed(0)  # random scores: the same selections in both precisions
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            runs.append(model(img))
    low, full = runs
    assert low.dtype == torch.bfloat16 and (low.float() - full).abs().max() < 0.1 * full.abs().max()
    model.train()
    model(img).square().mean().backward()
    blocks = [blk for stage in model.stages[1:] for blk in stage.blocks]
    assert all(blk.attn.qkv.weight.grad is not None and blk.attn.qkv.weight.grad.abs().sum() > 0 for blk in blocks)
