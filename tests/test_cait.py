"""timm Cait (CaiT): talking-heads patch blocks without a class token, then class-attention blocks that read the
tokens left. keep=1 is the unpatched model; Idle, Evo and top-k equal literal references that call timm's own blocks
on the tokens present (talking heads' ``proj_w`` bias weighs every key present, so masking keys in a full sequence
would not be the same computation); scores are the logits after ``proj_l``'s mix; MACs equal FlopCounterMode / 2."""
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
from timm.models.cait import Cait

import tokenpace
from backbones import assert_keep_one_equals_unpatched, assert_macs_equal_flop_counter
from conftest import spread_weights

ALL_TOKENS = [("evo", {}), ("evo", {"mode": "layer"}), ("evo", {"representative": True}), ("idle", {}),
              ("evit", {}), ("topk", {})]


def make_cait(seed: int = 0, **overrides) -> Cait:
    torch.manual_seed(seed)
    options = dict(img_size=32, patch_size=4, embed_dim=48, depth=6, num_heads=3, depth_token_only=2,
                   num_classes=10, init_values=0.5)
    return spread_weights(Cait(**{**options, **overrides}), seed).eval()


@pytest.fixture
def images():
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def embed(model, img):
    return model.pos_drop(model.patch_embed(img) + model.pos_embed)


def finish(model, x):
    return model.forward_head(model.norm(model.forward_cls(x)))


def mixed_logits(blk, x):
    """timm's talking-heads logits (B, H, N, N) of block ``blk`` on the tokens x, after proj_l's mix of the heads."""
    attn, h = blk.attn, blk.norm1(x)
    B, N, C = h.shape
    q, k, _ = attn.qkv(h).reshape(B, N, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    logits = (q * attn.scale) @ k.transpose(-2, -1)
    return attn.proj_l(logits.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def rows_of(x, idx):
    return idx[..., None].expand(-1, -1, x.shape[-1])


@dataclass(frozen=True)
class LateClassOps:
    """How the references below run a model whose class token joins after the patch blocks (CaiT, VOLO): its patch
    blocks, the tokens before the first, a block's head logits (B, H, N, N) as its scores read them, a block called
    on a sequence of its own, and the class-attention blocks, norm and head."""

    blocks: Callable
    embed: Callable
    logits: Callable
    call: Callable
    finish: Callable


CAIT = LateClassOps(lambda model: model.blocks, embed, mixed_logits, lambda blk, x: blk(x), finish)


def on_tokens(blk, x, idx, ops=CAIT):
    """The block on the tokens idx (B, K) as a sequence of their own; every other token unchanged."""
    return x.scatter(1, rows_of(x, idx), ops.call(blk, torch.gather(x, 1, rows_of(x, idx))))


def mean_row(blk, x, ops=CAIT):
    """The softmax of the mean query's logits over the keys, head mean (B, N)."""
    return ops.logits(blk, x).mean(2).softmax(-1).mean(1)


def ref_idle(model, img, keep, starts, ops=CAIT):
    x = ops.embed(model, img)
    N = x.shape[1]
    for i, blk in enumerate(ops.blocks(model)):
        stage = sum(1 for s in starts if i >= s)
        if stage == 0:
            x = ops.call(blk, x)
            continue
        received = ops.logits(blk, x).mean(2).sum(1)  # head-summed mean logit every token receives
        x = on_tokens(blk, x, received.topk(int(N * keep ** stage), dim=1).indices, ops)
    return ops.finish(model, x)


def ref_evo(model, img, keep, starts, mode, alpha=0.5, ops=CAIT):
    """Placeholders carried: g from block first-1's row over every token; each selection's top K by g run the block
    among themselves, and g evolves for them with their own row."""
    x = ops.embed(model, img)
    K, first = int(x.shape[1] * keep), starts[0]
    g = sel = None
    for i, blk in enumerate(ops.blocks(model)):
        if i < first:
            if i == first - 1:
                g = mean_row(blk, x, ops)
            x = ops.call(blk, x)
            continue
        if mode == "layer" or i in starts:
            sel = g.topk(K, dim=1).indices
        a = mean_row(blk, torch.gather(x, 1, rows_of(x, sel)), ops)
        g = g.scatter(1, sel, (1 - alpha) * torch.gather(g, 1, sel) + alpha * a)
        x = on_tokens(blk, x, sel, ops)
    return ops.finish(model, x)


def ref_topk(model, img, keep, layer, ops=CAIT):
    """Top-k dropping: from block ``layer`` on only the top K by block layer-1's row remain, in raster order; the
    class-attention blocks read those."""
    x = ops.embed(model, img)
    for i, blk in enumerate(ops.blocks(model)):
        if i == layer - 1:
            g = mean_row(blk, x, ops)
        if i == layer:
            x = torch.gather(x, 1, rows_of(x, g.topk(int(x.shape[1] * keep), dim=1).indices.sort(1).values))
        x = ops.call(blk, x)
    return ops.finish(model, x)


@pytest.mark.parametrize("method,options", ALL_TOKENS, ids=str)
def test_keep_one_equals_the_unpatched_model(method, options, images):
    assert_keep_one_equals_unpatched(make_cait(), method, options, images)


@pytest.mark.parametrize("keep", [0.7, 0.4])
def test_idle_equals_the_literal_reference(keep, images):
    model = make_cait()
    with torch.no_grad():
        expected = ref_idle(model, images, keep, (2, 3, 5))  # depth 6: the scaled (3, 6, 9)
        got = tokenpace.apply(model, "idle", keep=keep)(images)
        assert not torch.allclose(got, tokenpace.remove(model)(images), atol=1e-3)  # it did idle something
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4), (got - expected).abs().max()


@pytest.mark.parametrize("mode", ["stage", "layer"])
def test_evo_equals_the_literal_reference(mode, images):
    model = make_cait()
    with torch.no_grad():
        expected = ref_evo(model, images, 0.5, (2, 4), mode)  # depth 6: the scaled (4, 8)
        got = tokenpace.apply(model, "evo", keep=0.5, mode=mode)(images)
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4), (got - expected).abs().max()


def test_topk_equals_the_literal_reference(images):
    model = make_cait()
    with torch.no_grad():
        expected = ref_topk(model, images, 0.5, 2)
        got = tokenpace.apply(model, "topk", keep=0.5)(images)
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4), (got - expected).abs().max()


@pytest.mark.parametrize("project_keys", [False, True])
def test_received_scores_are_the_mixed_logits(project_keys, images):
    """Idle's scores: the head-summed mean logit after proj_l's mix, up to a per-image constant (proj_l's bias and the
    key bias, the same for every token); the unmixed heads would rank otherwise."""
    from tokenpace.families import adapter_for

    model = make_cait()
    family = adapter_for(model)
    with torch.no_grad():
        x = embed(model, images)
        prep = family.prepare(1, x, family.embed(images)[1])
        got = family.token_scores(1, prep, "received", project_keys)[:, 0]
        expected = mixed_logits(model.blocks[1], x).mean(2).sum(1)
        attn, h = model.blocks[1].attn, model.blocks[1].norm1(x)
        q, k, _ = attn.qkv(h).reshape(3, 64, 3, 3, 16).permute(2, 0, 3, 1, 4).unbind(0)
        unmixed = ((q * attn.scale) @ k.transpose(-2, -1)).mean(2).sum(1)
    centred = [t - t.mean(1, keepdim=True) for t in (got, expected, unmixed)]
    torch.testing.assert_close(centred[0], centred[1], atol=1e-4, rtol=1e-4)
    assert not torch.equal(got.topk(16).indices, unmixed.topk(16).indices)


@pytest.mark.parametrize("method,options", [(None, {}), ("evo", {}), ("evo", {"representative": True}),
                                            ("idle", {}), ("idle", {"project_keys": True}), ("evit", {}),
                                            ("topk", {})], ids=str)
def test_macs_equal_flop_counter(method, options):
    assert_macs_equal_flop_counter(make_cait(), method, options, torch.randn(1, 3, 32, 32))


def test_macs_of_cait_xxs24_at_its_size():
    """The dense count of timm's cait_xxs24_224 (built on the meta device) equals FlopCounterMode on the real one;
    the class-attention blocks read the tokens a method leaves."""
    import timm
    from torch.utils.flop_counter import FlopCounterMode

    model = timm.create_model("cait_xxs24_224").eval().requires_grad_(False)
    for m in model.modules():  # CPU SDPA has no FLOP formula in some torch versions
        if hasattr(m, "fused_attn"):
            m.fused_attn = False
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(torch.zeros(1, 3, 224, 224))
    with torch.device("meta"):
        meta = timm.create_model("cait_xxs24_224")
    dense = tokenpace.macs(tokenpace.apply(meta, "idle", keep=1.0))
    assert dense == counter.get_total_flops() // 2 and round(dense / 1e9, 2) == 2.52  # the paper: 2.5 GFLOPs
    assert tokenpace.macs(tokenpace.apply(meta, "topk", keep=0.5)) < dense


def test_intermediates_as_timm(images):
    model = make_cait()
    with torch.no_grad():
        final, maps = model.forward_intermediates(images, indices=[1, 4], norm=True)
        tokenpace.apply(model, "idle", keep=1.0)
        got_final, got_maps = model.forward_intermediates(images, indices=[1, 4], norm=True)
        only = model.forward_intermediates(images, indices=2, output_fmt="NLC", intermediates_only=True)
        tokenpace.apply(model, "idle", keep=0.5)
        idle_final, _ = model.forward_intermediates(images, indices=[5])
        features = model.forward_features(images)
    assert torch.equal(got_final, final) and all(torch.equal(a, b) for a, b in zip(got_maps, maps))
    assert maps[0].shape == (3, 48, 8, 8) and final.shape == (3, 65, 48)
    assert [t.shape for t in only] == [(3, 64, 48)] * 2
    assert torch.equal(idle_final, features)


def test_what_cait_refuses(images):
    from tokenpace.losses import model_cut_loss

    model = tokenpace.apply(make_cait(), "idle", keep=0.5).train()
    model(images)
    with pytest.raises(ValueError, match="class token's attention and Cait has none"):
        model_cut_loss(model)
    with pytest.raises(ValueError, match=r"built for 32x32 inputs only.*img_size=N"):
        tokenpace.macs(model, img_size=64)
    with pytest.raises(ValueError, match="idle score='cls' is not available for timm Cait models"):
        tokenpace.apply(make_cait(), "idle", score="cls")
    odd = make_cait()
    odd.blocks[3].__class__ = type("MyBlock", (type(odd.blocks[3]),), {})
    with pytest.raises(TypeError, match="block 3 of this Cait is MyBlock with TalkingHeadAttn"):
        tokenpace.apply(odd, "evo")


def test_position_less_tokens_and_training(images):
    """EViT's fused token and Evo's representative token reach the class-attention blocks; a training step runs and
    reaches the talking-heads mixes."""
    model = make_cait()
    with torch.no_grad():
        dense = model(images)
        with tokenpace.trace(tokenpace.apply(model, "evit", keep=0.5)) as tr:
            fused = model(images)
        rep = tokenpace.apply(model, "evo", keep=0.5, representative=True)(images)
    assert (tr.kept[-1] == -1).any(1).all()
    for out in (fused, rep):
        assert torch.isfinite(out).all() and not torch.allclose(out, dense, atol=1e-3)
    model = tokenpace.apply(make_cait(), "idle", keep=0.5).train()
    model(images).logsumexp(-1).mean().backward()
    mixes = [blk.attn.proj_l.weight.grad for blk in model.blocks] + [blk.attn.proj_w.weight.grad
                                                                    for blk in model.blocks]
    assert all(g is not None and g.abs().sum() > 0 for g in mixes)


@pytest.mark.parametrize("pool", ["avg", ""])
def test_other_pools_and_a_pruned_model(pool, images):
    """Average pooling and no pooling read the tokens left; after prune_intermediate_layers (no class-attention
    blocks, no class token) the patched model's intermediates are timm's."""
    model = make_cait(global_pool=pool)
    with torch.no_grad():
        dense = model(images)
        assert torch.equal(tokenpace.apply(model, "idle", keep=1.0)(images), dense)
        reduced = tokenpace.apply(model, "evit", keep=0.5)(images)
        tokenpace.remove(model)
        model.prune_intermediate_layers([1, 3])
        expected = model.forward_intermediates(images, indices=[1, 3])
        tokenpace.apply(model, "idle", keep=1.0)
        got = model.forward_intermediates(images, indices=[1, 3])
    assert torch.isfinite(reduced).all()
    if pool:  # without a pool the output is the token sequence, and EViT leaves fewer tokens (the class token first)
        assert reduced.shape == dense.shape
    else:
        assert reduced.shape[0] == 3 and 1 < reduced.shape[1] < dense.shape[1] == 65
    assert torch.equal(got[0], expected[0]) and all(torch.equal(a, b) for a, b in zip(got[1], expected[1]))


def test_bf16_autocast_and_training_with_dropout(images):
    """Under bf16 autocast Idle and EViT run and stay near fp32; with drop path and attention dropout a training
    step of every method reaches both talking-heads mixes."""
    model = make_cait()
    for method in ("idle", "evit"):
        tokenpace.apply(model, method, keep=0.5)
        with torch.no_grad():
            full = model(images)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                half = model(images)
        assert half.dtype == torch.bfloat16 and (half.float() - full).abs().max() < 0.1 * full.abs().max()
    for method in ("evo", "idle", "evit", "topk"):
        model = tokenpace.apply(make_cait(drop_path_rate=0.1, attn_drop_rate=0.1), method, keep=0.5).train()
        model(images).logsumexp(-1).mean().backward()
        assert all(blk.attn.proj_l.weight.grad is not None and blk.attn.proj_w.weight.grad is not None
                   for blk in model.blocks[3:])


def test_a_wrapped_mix_is_refused():
    """The scores read proj_l's weight: a wrapper put in its place after apply (peft's LoRA) is refused at the next
    forward, as on the q/k/v projections."""
    model = tokenpace.apply(make_cait(), "idle", keep=0.5)

    class Wrapped(torch.nn.Linear):
        def forward(self, x):
            return super().forward(x) + 1

    wrapped = Wrapped(3, 3)
    model.blocks[2].attn.proj_l = wrapped
    with pytest.raises(TypeError, match="attn.proj_l of a LayerScaleBlock is a Wrapped, not a plain torch.nn.Linear"):
        model(torch.randn(1, 3, 32, 32))
