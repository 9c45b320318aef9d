"""timm Xcit (XCiT): cross-covariance attention, local patch interaction (LPI) and MLP in each patch block, no class
token until the class-attention blocks. keep=1 is the unpatched model; Idle equals a literal reference that calls
timm's own XCA on the selected tokens, timm's LPI on the whole map (idle tokens at their values) and keeps both
residuals and the MLP's only where selected; the scores are feature norms; MACs equal FlopCounterMode / 2."""
import pytest
import torch
from timm.models.xcit import Xcit

import tokenpace
from backbones import (assert_bf16_autocast_as_close_as_dense, assert_keep_one_equals_unpatched,
                       assert_keep_one_intermediates_equal_unpatched, assert_macs_equal_flop_counter,
                       assert_reduced_intermediates_are_full_maps, assert_released_model_counts_as_flop_counter)
from conftest import spread_batchnorm, spread_weights

VARIANTS = {  # patch 16 and 8 stems, the class-attention blocks' norm on every token, no position features
    "p16": dict(patch_size=16, img_size=64),
    "p8_tokens_norm": dict(patch_size=8, img_size=32, tokens_norm=True, eta=0.5),
    "p16_no_pos_avg": dict(patch_size=16, img_size=64, use_pos_embed=False, global_pool="avg", cls_attn_layers=1),
}


def make_xcit(variant: str = "p16", seed: int = 0, **overrides) -> Xcit:
    torch.manual_seed(seed)
    options = {**dict(embed_dim=48, depth=6, num_heads=3, num_classes=10, eta=1.0), **VARIANTS[variant]}
    return spread_batchnorm(spread_weights(Xcit(**{**options, **overrides}), seed), seed).eval()


def images_for(model, batch=3, seed=1):
    size = model.patch_embed.img_size
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(seed))


def embed(model, img):
    x, grid = model.patch_embed(img)
    if model.pos_embed is not None:
        x = x + model.pos_embed(x.shape[0], *grid).reshape(x.shape[0], -1, x.shape[1]).permute(0, 2, 1)
    return model.pos_drop(x), grid


def finish(model, x):
    return model.forward_head(model.norm(model.forward_cls(x)))


def rows_of(x, idx):
    return idx[..., None].expand(-1, -1, x.shape[-1])


def idle_block(blk, x, idx, grid):
    """timm's XCABlock with the tokens idx (B, K) running: XCA among themselves; LPI over the whole map, idle tokens
    at their values; the LPI and MLP residuals only on the selected tokens."""
    sub = torch.gather(x, 1, rows_of(x, idx))
    sub = sub + blk.gamma1 * blk.attn(blk.norm1(sub))
    x = x.scatter(1, rows_of(x, idx), sub)
    sub = sub + blk.gamma3 * torch.gather(blk.local_mp(blk.norm3(x), *grid), 1, rows_of(x, idx))
    sub = sub + blk.gamma2 * blk.mlp(blk.norm2(sub))
    return x.scatter(1, rows_of(x, idx), sub)


def ref_idle(model, img, keep, starts, scores=lambda x: x.norm(dim=-1)):
    x, grid = embed(model, img)
    N = x.shape[1]
    for i, blk in enumerate(model.blocks):
        stage = sum(1 for s in starts if i >= s)
        if stage == 0:
            x = blk(x, *grid)
            continue
        x = idle_block(blk, x, scores(x).topk(int(N * keep ** stage), dim=1).indices, grid)
    return finish(model, x)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_keep_one_equals_the_unpatched_model(variant):
    model = make_xcit(variant)
    assert_keep_one_equals_unpatched(model, "idle", {}, images_for(model))


@pytest.mark.parametrize("variant,keep,fused", [("p16", 0.7, False), ("p16", 0.4, True),
                                               ("p8_tokens_norm", 0.5, False), ("p16_no_pos_avg", 0.5, True)])
def test_idle_equals_the_literal_reference(variant, keep, fused):
    """timm's explicit and fused XCA paths (the fused one has no attention dropout, as timm's)."""
    model = make_xcit(variant)
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = fused
    images = images_for(model)
    with torch.no_grad():
        expected = ref_idle(model, images, keep, (2, 3, 5))  # depth 6: the scaled (3, 6, 9)
        got = tokenpace.apply(model, "idle", keep=keep)(images)
        assert not torch.allclose(got, tokenpace.remove(model)(images), atol=1e-3)  # it did idle something
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4), (got - expected).abs().max()


def test_random_scores_pick_what_the_trace_shows():
    """The control ranks by seeded random scores: the reference fed the traced selections gives the same output."""
    model = make_xcit()
    images = images_for(model)
    tokenpace.apply(model, "idle", keep=0.5, score="random")
    torch.manual_seed(0)
    with torch.no_grad(), tokenpace.trace(model) as tr:
        got = model(images)
    picks = iter([k for k in tr.kept if k is not None])
    with torch.no_grad():
        x, grid = embed(model, images)
        for i, blk in enumerate(model.blocks):
            x = blk(x, *grid) if tr.kept[i] is None else idle_block(blk, x, next(picks), grid)
        expected = finish(model, x)
    assert [k is None for k in tr.kept] == [True, True, False, False, False, False]
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4)


def test_only_idle_runs_and_only_by_norm():
    """No token attends to another in XCA: Evo, EViT and top-k (which rank by attention) are refused, naming why
    and what runs; Idle accepts the feature norm (its default) and the random control."""
    model = make_xcit()
    for method in ("evo", "evit", "topk"):
        with pytest.raises(ValueError, match=rf"method '{method}' is not available for timm Xcit models \(it ranks "
                                             r"tokens by 'cls' or 'received', and timm Xcit models offer 'norm', "
                                             r"'random'\); accepted here: 'idle'"):
            tokenpace.apply(model, method)
    for score in ("cls", "received"):
        with pytest.raises(ValueError, match=f"idle score='{score}' is not available for timm Xcit models; "
                                             "accepted here: 'norm', 'random'"):
            tokenpace.apply(model, "idle", score=score)
    assert tokenpace.get_patch(model) is None
    assert tokenpace.get_patch(tokenpace.apply(model, "idle")).policy.score == "norm"


def test_any_input_size():
    """The stem and the Fourier features follow the input: another size (not a multiple of the patch) runs, keep=1
    as timm's model, and MACs follow it."""
    model = make_xcit()
    images = torch.randn(2, 3, 72, 40, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model(images)
        assert torch.equal(tokenpace.apply(model, "idle", keep=1.0)(images), expected)
        reduced = tokenpace.apply(model, "idle", keep=0.5)(images)
    assert torch.isfinite(reduced).all() and not torch.allclose(reduced, expected, atol=1e-3)
    assert_macs_equal_flop_counter(make_xcit(), "idle", {}, images[:1], img_size=(72, 40))


@pytest.mark.parametrize("variant,method", [("p16", None), ("p16", "idle"), ("p8_tokens_norm", "idle"),
                                            ("p16_no_pos_avg", None), ("p16_no_pos_avg", "idle")])
def test_macs_equal_flop_counter(variant, method):
    model = make_xcit(variant)
    assert_macs_equal_flop_counter(model, method, {"keep": 0.5} if method else {}, images_for(model, batch=1))


@pytest.mark.parametrize("name,gmacs", [("xcit_nano_12_p16_224", 0.55), ("xcit_small_12_p8_224", 18.62)])
def test_macs_of_released_models(name, gmacs):
    """timm's released configs (meta device): MACs as FlopCounterMode's, dense and under Idle(0.7), and the dense
    count near the paper's (XCiT: N12/16 0.5, S12/8 18.9 GFLOPs, counted as multiply-adds; norms and
    softmax are not counted here)."""
    import timm

    assert_released_model_counts_as_flop_counter(name, (1.3, 1.6))
    with torch.device("meta"):
        dense = tokenpace.macs(tokenpace.apply(timm.create_model(name), "idle", keep=1.0))
    assert round(dense / 1e9, 2) == gmacs


def test_intermediates_and_feature_maps():
    """forward_intermediates as timm's at keep=1; under Idle full maps, the last one moved; features_only (timm's
    feature getter over forward_intermediates) gives full maps too."""
    import timm

    model = make_xcit()
    images = images_for(model)
    calls = [dict(indices=[1, 4], norm=True), dict(indices=2, output_fmt="NLC", intermediates_only=True),
             dict(indices=[2], stop_early=True)]
    assert_keep_one_intermediates_equal_unpatched(model, images, calls, methods=("idle",))
    assert_reduced_intermediates_are_full_maps(tokenpace.remove(model), images, (3, 48, 4, 4), 6, methods=("idle",))

    torch.manual_seed(0)
    extractor = timm.create_model("xcit_nano_12_p16_224", features_only=True, out_indices=(0, 3), img_size=64,
                                  embed_dim=48, depth=4, num_heads=3).eval()
    with torch.no_grad():
        dense = extractor(images)
        reduced = tokenpace.apply(extractor, "idle", keep=0.5)(images)
    assert [m.shape for m in reduced] == [m.shape for m in dense] == [(3, 48, 4, 4)] * 2
    assert torch.equal(reduced[0], dense[0]) and not torch.allclose(reduced[1], dense[1], atol=1e-4)  # idling from 1


def test_a_pruned_model_and_what_xcit_refuses():
    """After prune_intermediate_layers (no class-attention blocks, no class token) the patched intermediates are
    timm's; the token cut loss needs a class token; another block class is named."""
    from tokenpace.losses import model_cut_loss

    model = make_xcit()
    images = images_for(model)
    with torch.no_grad():
        model.prune_intermediate_layers([1, 3])
        expected = model.forward_intermediates(images, indices=[1, 3])
        got = tokenpace.apply(model, "idle", keep=1.0).forward_intermediates(images, indices=[1, 3])
    assert torch.equal(got[0], expected[0]) and all(torch.equal(a, b) for a, b in zip(got[1], expected[1]))
    trained = tokenpace.apply(make_xcit(), "idle", keep=0.5).train()
    trained(images)
    with pytest.raises(ValueError, match="class token's attention and Xcit has none"):
        model_cut_loss(trained)
    odd = make_xcit()
    odd.blocks[3].local_mp.__class__ = type("MyLocal", (type(odd.blocks[3].local_mp),), {})
    with pytest.raises(TypeError, match=r"block 3 of this Xcit has a MyLocal as its local patch interaction "
                                        r"\(local_mp\); tokenpace supports timm's XCABlock with XCA and LPI"):
        tokenpace.apply(odd, "idle")


def test_training_with_drop_path_reaches_every_branch():
    """A training step with drop path and attention dropout: the idling blocks' XCA temperature, LPI convolutions
    and MLP get gradients; the same seed gives the same output twice and another seed another one (drop path and
    dropout drawn through timm's modules); with gradient checkpointing the step is the same."""
    model = tokenpace.apply(make_xcit(drop_path_rate=0.2, attn_drop_rate=0.1), "idle", keep=0.5).train()
    images = images_for(model, batch=4)
    outs = []
    for seed in (3, 3, 4):
        torch.manual_seed(seed)
        outs.append(model(images))
    outs[0].logsumexp(-1).mean().backward()
    assert torch.equal(outs[0], outs[1]) and not torch.allclose(outs[0], outs[2], atol=1e-4)
    model.set_grad_checkpointing(True)
    torch.manual_seed(3)
    assert torch.allclose(model(images), outs[0], atol=1e-6)
    for blk in model.blocks[2:]:
        grads = (blk.attn.temperature.grad, blk.local_mp.conv1.weight.grad, blk.mlp.fc1.weight.grad, blk.gamma3.grad)
        assert all(g is not None and g.abs().sum() > 0 for g in grads)


def test_bf16_autocast_is_as_close_as_dense():
    model = make_xcit()
    assert_bf16_autocast_as_close_as_dense(model, "idle", images_for(model))
