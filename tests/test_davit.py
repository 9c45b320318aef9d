"""DaVitAdapter: IdleViT on timm's DaViT (stages alternating window attention and channel attention, each block
opened by a convolutional position encoding and another between its halves), against a literal reference: timm's
own position encodings on the whole map; for spatial blocks timm's padding and windows, every slot's full logits,
idle and padding keys masked; for channel blocks timm's own attention on the selected tokens (its sums run over the
tokens present); the MLP on the selected tokens. Scores are feature norms after the first position encoding."""
import pytest
import timm
import torch
from timm.models.davit import DaVit

import tokenpace
from backbones import assert_macs_equal_flop_counter, assert_released_model_counts_as_flop_counter
from conftest import (assert_bf16_autocast_close, assert_keep_one_and_remove, assert_keep_one_intermediates_equal,
                      ref_window_idle_attention, set_fused, spread_batchnorm, spread_weights)
from test_tiny_vit import ref_unwindows, ref_windows

# stem stride 4, then the second stage halves: at 64 px 16 x 16 (windows of 4: 16 windows) then 8 x 8 (4 windows);
# at 72 px 18 x 18 and 9 x 9, every window stage padded. Blocks: stage 0 spatial, channel; stage 1 (s, c) x 2
DAVITS = {
    "v1": dict(),
    "v2_florence": dict(channel_attn_v2=True, named_blocks=True, down_kernel_size=3),
}
BASE = dict(depths=(1, 2), embed_dims=(16, 32), num_heads=(2, 4), window_size=4, num_classes=5)
STARTS = (2, 3, 5)  # depth 6: the scaled (3, 6, 9)


def make_davit(variant: str = "v1", seed: int = 0, **overrides) -> DaVit:
    torch.manual_seed(seed)
    model = spread_weights(DaVit(**{**BASE, **DAVITS[variant], **overrides}), seed).eval()
    return spread_batchnorm(model, seed)


def davit_images(size: int = 64, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


def blocks_of(model):
    return [blk for stage in model.stages for pair in stage.blocks for blk in pair]


def rows_of(x, idx):
    return idx[..., None].expand(-1, -1, x.shape[-1])


def ref_spatial(blk, x, k):
    """timm's SpatialBlock on x (B, C, H, W) with the top k slots of each window (by the norm after cpe1)
    attending among themselves, the rest idle."""
    attn, w = blk.attn, blk.window_size[0]
    shortcut = blk.cpe1(x).permute(0, 2, 3, 1)
    B, H, W, C = shortcut.shape
    pad = ref_windows(torch.ones_like(shortcut[..., :1]), w)[..., 0] == 0
    h = ref_windows(blk.norm1(shortcut), w)  # padded after the norm, as timm pads
    G, n, _ = h.shape
    q, key, v = attn.qkv(h).reshape(G, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    scores = ref_windows(shortcut.norm(dim=-1, keepdim=True), w)[..., 0]
    o, sel = ref_window_idle_attention((q * attn.scale) @ key.transpose(-2, -1), v, pad,
                                       scores.masked_fill(pad, float("-inf")), k)
    selected = ref_unwindows(sel.unsqueeze(-1).float(), w, B, H, W) > 0.5
    y = torch.where(selected, shortcut + ref_unwindows(attn.proj(o), w, B, H, W), shortcut)
    y = blk.cpe2(y.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)  # every token
    return torch.where(selected, y + blk.mlp(blk.norm2(y)), y).permute(0, 3, 1, 2)


def ref_channel(blk, x, k):
    """timm's ChannelBlock on x (B, C, H, W) with the top k tokens of the map running its attention (its own module
    on them alone) and MLP, the rest idle."""
    B, C, H, W = x.shape
    shortcut = blk.cpe1(x).flatten(2).transpose(1, 2)
    idx = shortcut.norm(dim=-1).topk(k, dim=1).indices
    sub = torch.gather(shortcut, 1, rows_of(shortcut, idx))
    y = shortcut.scatter(1, rows_of(shortcut, idx), sub + blk.attn(blk.norm1(sub)))
    y = blk.cpe2(y.transpose(1, 2).reshape(B, C, H, W)).flatten(2).transpose(1, 2)  # every token
    sub = torch.gather(y, 1, rows_of(y, idx))
    y = y.scatter(1, rows_of(y, idx), sub + blk.mlp(blk.norm2(sub)))
    return y.transpose(1, 2).reshape(B, C, H, W)


def ref_idle(model, img, keep, starts=STARTS):
    x, i = model.stem(img), 0
    for stage in model.stages:
        x = stage.downsample(x)
        for pair in stage.blocks:
            for blk in pair:
                s = sum(1 for start in starts if i >= start)
                if s == 0:
                    x = blk(x)
                elif type(blk).__name__ == "ChannelBlock":
                    x = ref_channel(blk, x, int(x.shape[-2] * x.shape[-1] * keep ** s))
                else:
                    x = ref_spatial(blk, x, int(blk.window_size[0] * blk.window_size[1] * keep ** s))
                i += 1
    return model.forward_head(model.norm_pre(x))


@pytest.mark.parametrize("variant", list(DAVITS))
def test_keep_one_equals_the_unpatched_model(variant):
    assert_keep_one_and_remove(make_davit(variant), davit_images())


@pytest.mark.parametrize("variant,size,keep,fused", [("v1", 64, 0.7, False), ("v1", 72, 0.5, True),
                                                     ("v2_florence", 64, 0.5, False),
                                                     ("v2_florence", 72, 0.7, True)])
def test_idle_equals_the_literal_reference(variant, size, keep, fused):
    """Unpadded and padded windows, both channel attentions, timm's explicit and fused window attention."""
    model = set_fused(make_davit(variant), fused)
    images = davit_images(size)
    with torch.no_grad():
        expected = ref_idle(model, images, keep)
        got = tokenpace.apply(model, "idle", keep=keep)(images)
        assert not torch.allclose(got, tokenpace.remove(model)(images), atol=1e-3)  # it did idle something
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4), (got - expected).abs().max()


def test_only_idle_runs_and_only_by_norm():
    model = make_davit()
    for method in ("evo", "evit", "topk"):
        with pytest.raises(ValueError, match=rf"method '{method}' is not available for timm DaVit models \(it needs a "
                                             r"sequence layout.*accepted here: 'idle'"):
            tokenpace.apply(model, method)
    with pytest.raises(ValueError, match="idle score='received' is not available for timm DaVit models; accepted "
                                         "here: 'norm', 'random'"):
        tokenpace.apply(model, "idle", score="received")
    assert tokenpace.get_patch(tokenpace.apply(model, "idle")).policy.score == "norm"


@pytest.mark.parametrize("variant,size,options", [("v1", 64, {}), ("v1", 72, {}), ("v2_florence", 72, {}),
                                                  ("v1", 66, dict(depths=(1, 1, 1), embed_dims=(16, 32, 32),
                                                                  num_heads=(2, 4, 4)))], ids=str)
@pytest.mark.parametrize("method", [None, "idle"])
def test_macs_equal_flop_counter(variant, size, options, method):
    """The stem (its input padded to a multiple of 4), the down-sampling (66 px: odd maps, 17 -> 9 -> 5, padded for
    the 2x2 kernel or by the 3x3 one), both position encodings on every token, padded windows as timm computes them
    dense, channel attention linear in the tokens."""
    assert_macs_equal_flop_counter(make_davit(variant, **options), method, {}, davit_images(size, batch=1),
                                   img_size=size)


@pytest.mark.parametrize("name", ["davit_tiny", "davit_base_fl"])
def test_macs_of_released_models(name):
    """timm's released configs on the meta device (the Florence-2 tower at 768 px), dense and under Idle(0.7)."""
    assert_released_model_counts_as_flop_counter(name, (1.2, 1.6))


def test_intermediates_and_features_only():
    """As timm's at keep=1, with the final norm before the head (head_norm_first: timm's norm_pre, applied to the
    last stage's map with norm=True and to a run that reaches it); full maps under Idle; timm's feature getter."""
    model = make_davit(head_norm_first=True)
    images = davit_images(72)
    calls = [dict(), dict(indices=[0, 1], norm=True), dict(indices=[0], stop_early=True, norm=True),
             dict(indices=1, intermediates_only=True, norm=True)]
    assert_keep_one_intermediates_equal(model, images, calls)
    with torch.no_grad():
        dense_final, dense_maps = tokenpace.remove(model).forward_intermediates(images)
        tokenpace.apply(model, "idle", keep=0.5)
        final, maps = model.forward_intermediates(images)
        features = model.forward_features(images)
    assert [m.shape for m in maps] == [m.shape for m in dense_maps] == [(2, 16, 18, 18), (2, 32, 9, 9)]
    assert torch.equal(final, features) and not torch.allclose(maps[1], dense_maps[1], atol=1e-3)
    torch.manual_seed(0)
    extractor = timm.create_model("davit_tiny", features_only=True, feature_cls="getter",
                                  **{k: v for k, v in BASE.items() if k != "num_classes"}).eval()
    with torch.no_grad():
        dense = extractor(images)
        reduced = tokenpace.apply(extractor, "idle", keep=0.5)(images)
    assert [m.shape for m in reduced] == [m.shape for m in dense]
    assert torch.equal(reduced[0], dense[0]) and not torch.allclose(reduced[1], dense[1], atol=1e-4)


def test_refusals_and_training(monkeypatch):
    """Another block class and an even down-sampling kernel other than 2 are named; a block put in after apply is
    refused; a training step with drop path reaches both attentions and both position encodings of the idling
    blocks, and with gradient checkpointing every block is checkpointed and the step is the same."""
    import tokenpace.methods.base as methods
    odd = make_davit()
    odd.stages[1].blocks[0][1].__class__ = type("MyChannelBlock", (type(odd.stages[1].blocks[0][1]),), {})
    with pytest.raises(TypeError, match="a block of stage 1 of this DaVit is MyChannelBlock with ChannelAttention; "
                                        "tokenpace supports timm's SpatialBlock"):
        tokenpace.apply(odd, "idle")
    with pytest.raises(TypeError, match="stage 1 of this DaVit down-samples with a 4x4 kernel; tokenpace supports "
                                        "down_kernel_size 2 or an odd one"):
        tokenpace.apply(make_davit(down_kernel_size=4), "idle")
    replaced = tokenpace.apply(make_davit(), "idle")
    replaced.stages[1].blocks[1][0] = make_davit(seed=1).stages[1].blocks[1][0]
    with pytest.raises(TypeError, match=r"block 4 \(SpatialBlock\) was replaced after tokenpace.apply"):
        replaced(davit_images())
    calls = []
    real = methods.checkpoint
    monkeypatch.setattr(methods, "checkpoint", lambda fn, *a, **k: calls.append(fn) or real(fn, *a, **k))
    images, runs = davit_images(72, batch=4), []
    for checkpointing in (False, True):
        model = tokenpace.apply(make_davit(drop_path_rate=0.2), "idle", keep=0.5).train()
        model.set_grad_checkpointing(checkpointing)
        torch.manual_seed(3)
        out = model(images)
        out.logsumexp(-1).mean().backward()
        runs.append((out, model.stages[1].blocks[1][1].attn.qkv.weight.grad, len(calls)))
    (out, grad, before), (again, grad_again, after) = runs
    assert before == 0 and after == 6 and torch.allclose(out, again, atol=1e-6)
    assert torch.allclose(grad, grad_again, atol=1e-6)
    for blk in blocks_of(model)[2:]:
        grads = (blk.attn.qkv.weight.grad, blk.cpe1.proj.weight.grad, blk.cpe2.proj.weight.grad,
                 blk.mlp.fc1.weight.grad)
        assert all(g is not None and g.abs().sum() > 0 for g in grads), type(blk).__name__


def test_bf16_autocast():
    assert_bf16_autocast_close(tokenpace.apply(make_davit("v2_florence"), "idle", keep=0.5), davit_images(72))
