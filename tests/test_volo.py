"""timm VOLO: a convolutional stem and outlooker blocks (dense, the embedding), then transformer blocks without a
class token (the methods), then class-attention blocks and the token-labeling head. keep=1 is the unpatched model;
Idle, Evo and top-k equal the literal references of test_cait run on timm's own VOLO modules; MACs equal
FlopCounterMode / 2; feature maps follow timm's (stage 0 is the outlooker stage's map)."""
import pytest
import timm
import torch
from timm.models.volo import VOLO

import tokenpace
from backbones import (assert_bf16_autocast_as_close_as_dense, assert_keep_one_equals_unpatched,
                       assert_keep_one_intermediates_equal_unpatched, assert_macs_equal_flop_counter,
                       assert_position_less_tokens_run, assert_released_model_counts_as_flop_counter)
from conftest import spread_batchnorm, spread_weights
from test_cait import ALL_TOKENS, LateClassOps, ref_evo, ref_idle, ref_topk

# at 96 px: one outlooker block on a 12 x 12 map (stage 0), then 6 x 6 tokens through stages 1-3 (two transformer
# blocks each)
SMALL = dict(layers=(1, 2, 2, 2), embed_dims=(32, 48, 48, 48), num_heads=(1, 3, 3, 3), img_size=96, patch_size=8,
             stem_hidden_dim=16, num_classes=10)


def make_volo(seed: int = 0, **overrides) -> VOLO:
    torch.manual_seed(seed)
    return spread_batchnorm(spread_weights(VOLO(**{**SMALL, **overrides}), seed), seed).eval()


@pytest.fixture
def images():
    return torch.randn(3, 3, 96, 96, generator=torch.Generator().manual_seed(1))


def embed(model, img):
    """timm's stem, outlooker stage, down-sampling and position embedding, flattened to (B, N, C)."""
    x = model.patch_embed(img).permute(0, 2, 3, 1)
    for blk in model.network[0]:
        x = blk(x)
    x = model.pos_drop(model.network[1](x) + model.pos_embed)
    return x.reshape(x.shape[0], -1, x.shape[-1])


def logits(blk, x):
    """timm's attention logits (B, H, N, N) of the transformer block ``blk`` on the tokens x."""
    attn, h = blk.attn, blk.norm1(x)
    B, N, C = h.shape
    q, k, _ = attn.qkv(h).reshape(B, N, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    return (q * attn.scale) @ k.transpose(-2, -1)


def transformer_blocks(model):
    return [blk for stage in model.network[2:] for blk in stage]


# timm's block takes a (B, H, W, C) map and attends over its H * W tokens: a sequence is a map of one row
VOLO_OPS = LateClassOps(transformer_blocks, embed, logits, lambda blk, x: blk(x.unsqueeze(1)).squeeze(1),
                        lambda model, x: model.forward_head(model.norm(model.forward_cls(x))))


@pytest.mark.parametrize("method,options", ALL_TOKENS, ids=str)
def test_keep_one_equals_the_unpatched_model(method, options, images):
    assert_keep_one_equals_unpatched(make_volo(), method, options, images)


@pytest.mark.parametrize("keep", [0.7, 0.4])
def test_idle_equals_the_literal_reference(keep, images):
    model = make_volo()
    with torch.no_grad():
        expected = ref_idle(model, images, keep, (2, 3, 5), ops=VOLO_OPS)  # 6 transformer blocks: the scaled (3, 6, 9)
        got = tokenpace.apply(model, "idle", keep=keep)(images)
        assert not torch.allclose(got, tokenpace.remove(model)(images), atol=1e-3)  # it did idle something
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4), (got - expected).abs().max()


@pytest.mark.parametrize("mode", ["stage", "layer"])
def test_evo_equals_the_literal_reference(mode, images):
    model = make_volo()
    with torch.no_grad():
        expected = ref_evo(model, images, 0.5, (2, 4), mode, ops=VOLO_OPS)  # the scaled (4, 8)
        got = tokenpace.apply(model, "evo", keep=0.5, mode=mode)(images)
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4), (got - expected).abs().max()


def test_topk_equals_the_literal_reference(images):
    """The class-attention blocks and the token-labeling head (its maximum over the tokens) read the tokens left."""
    model = make_volo()
    with torch.no_grad():
        expected = ref_topk(model, images, 0.5, 2, ops=VOLO_OPS)
        got = tokenpace.apply(model, "topk", keep=0.5)(images)
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4), (got - expected).abs().max()


def test_position_less_tokens_run(images):
    assert_position_less_tokens_run(make_volo(), images)


@pytest.mark.parametrize("pool,method,options", [("token", None, {}), ("token", "evo", {"representative": True}),
                                                 ("token", "idle", {}), ("token", "idle", {"project_keys": True}),
                                                 ("token", "evit", {}), ("avg", "topk", {}), ("", "idle", {}),
                                                 ("", "evit", {}), ("avg-no-class-blocks", "idle", {})], ids=str)
def test_macs_equal_flop_counter(pool, method, options):
    """The stem, outlookers and down-sampling on every token; the class-attention blocks, the head (on every token
    without a pool) and the token-labeling head (with one; without class-attention blocks timm's reads all tokens but
    the first) on the tokens left."""
    pool, _, bare = pool.partition("-")
    model = make_volo(global_pool=pool, **({"post_layers": None} if bare else {}))
    assert_macs_equal_flop_counter(model, method, options, torch.randn(1, 3, 96, 96))


def test_macs_of_a_released_model():
    """volo_d1_224 on the meta device: MACs as FlopCounterMode's, dense and under Idle(0.7); the dense count near the
    paper's 6.8 GFLOPs (multiply-adds; norms and softmax are not counted here)."""
    assert_released_model_counts_as_flop_counter("volo_d1_224", (1.3, 1.5))
    with torch.device("meta"):
        dense = tokenpace.macs(tokenpace.apply(timm.create_model("volo_d1_224"), "idle", keep=1.0))
    assert round(dense / 1e9, 2) == 6.92


def test_intermediates_as_timm(images):
    """Stage 0 is the outlooker stage's 12 x 12 map, never normed; stopped early there, timm returns that map as
    its final output, (B, H, W, C); the transformer stages' maps are full under the methods."""
    model = make_volo()
    calls = [dict(), dict(indices=[0, 2], norm=True), dict(indices=[0], stop_early=True),
             dict(indices=[1], stop_early=True, norm=True), dict(indices=[3], stop_early=True),
             dict(indices=2, intermediates_only=True)]
    assert_keep_one_intermediates_equal_unpatched(model, images, calls)
    with torch.no_grad():
        final, maps = tokenpace.remove(model).forward_intermediates(images)
        early, _ = model.forward_intermediates(images, indices=[0], stop_early=True)
        tokenpace.apply(model, "idle", keep=0.5)
        idle_final, idle_maps = model.forward_intermediates(images)
        features = model.forward_features(images)
    assert [m.shape for m in maps] == [(3, 32, 12, 12)] + [(3, 48, 6, 6)] * 3 and early.shape == (3, 12, 12, 32)
    assert [m.shape for m in idle_maps] == [m.shape for m in maps] and torch.equal(idle_maps[0], maps[0])
    assert not torch.allclose(idle_maps[-1], maps[-1], atol=1e-3) and torch.equal(idle_final, features)
    with pytest.raises(ValueError, match="NCHW grids"):
        model.forward_intermediates(images, output_fmt="NLC")
    tokenpace.apply(model, "topk", keep=0.5)  # stopping after the last block is the whole run, dropped tokens out
    with torch.no_grad():
        whole = model.forward_intermediates(images, indices=[3])
        stopped = model.forward_intermediates(images, indices=[3], stop_early=True)
    assert torch.equal(whole[0], stopped[0]) and torch.equal(whole[1][0], stopped[1][0])
    assert whole[0].shape == (3, 1 + 18, 48)  # the class token and the 18 of 36 tokens top-k kept


def test_features_only_runs_the_method(images):
    """timm's feature getter (what features_only builds for VOLO) over a pruned VOLO: no class-attention blocks, no
    class token, no heads."""
    from timm.models._features import FeatureGetterNet

    extractor = FeatureGetterNet(make_volo(), out_indices=(0, 1, 3)).eval()
    with torch.no_grad():
        dense = extractor(images)
        reduced = tokenpace.apply(extractor, "idle", keep=0.5)(images)
    assert [m.shape for m in reduced] == [m.shape for m in dense] == [(3, 32, 12, 12)] + [(3, 48, 6, 6)] * 2
    assert torch.equal(reduced[0], dense[0]) and torch.equal(reduced[1], dense[1])  # idling from block 2 on
    assert not torch.allclose(reduced[2], dense[2], atol=1e-4)


def test_what_volo_refuses(images):
    from tokenpace.losses import model_cut_loss

    model = tokenpace.apply(make_volo(), "idle", keep=0.5).train()
    model(images)
    with pytest.raises(ValueError, match="class token's attention and VOLO has none"):
        model_cut_loss(model)
    with pytest.raises(ValueError, match=r"built for 96x96 inputs only.*img_size=N"):
        tokenpace.macs(model, img_size=128)
    with pytest.raises(ValueError, match="idle score='cls' is not available for timm VOLO models"):
        tokenpace.apply(make_volo(), "idle", score="cls")
    odd = make_volo()
    odd.network[3][1].__class__ = type("MyBlock", (type(odd.network[3][1]),), {})
    with pytest.raises(TypeError, match=r"network.3 of this VOLO holds MyBlock with Attention; tokenpace supports "
                                        "timm's VOLO layout"):
        tokenpace.apply(odd, "evo")
    replaced = tokenpace.apply(make_volo(), "idle")
    replaced.network[2][0] = make_volo(seed=1).network[2][0]  # a block put in after apply is refused, not skipped
    with pytest.raises(TypeError, match="block 0 .* was replaced after tokenpace.apply"):
        replaced(images)
    cut = tokenpace.apply(make_volo(), "idle")
    with pytest.raises(RuntimeError, match="prune_intermediate_layers changes the blocks of a patched model"):
        cut.prune_intermediate_layers([1])
    cut.network = cut.network[:3]  # sliced by hand: the blocks it cut must not run on
    with pytest.raises(TypeError, match="the model's module 'network' was replaced after tokenpace.apply"):
        cut(images)


def test_training_with_drop_path_and_checkpointing(images, monkeypatch):
    """A training step with drop path (timm gives it to the transformer blocks only) reaches the outlookers, the
    transformer blocks and both heads; with gradient checkpointing every outlooker and block is checkpointed, and
    the step gives the same output and gradients."""
    import tokenpace.families.volo as volo
    import tokenpace.methods.base as methods

    calls = []
    for module in (volo, methods):
        real = module.checkpoint
        monkeypatch.setattr(module, "checkpoint", lambda fn, *a, _real=real, **k: calls.append(fn) or _real(fn, *a, **k))
    runs = []
    for checkpointing in (False, True):
        model = tokenpace.apply(make_volo(drop_path_rate=0.1), "evo", keep=0.5).train()
        model.set_grad_checkpointing(checkpointing)
        torch.manual_seed(3)
        out = model(images)
        out.logsumexp(-1).mean().backward()
        runs.append((out, [p.grad for p in (model.network[0][0].attn.attn.weight, model.network[4][1].mlp.fc1.weight,
                                            model.aux_head.weight, model.head.weight)], len(calls)))
    (out, first, before), (again, second, after) = runs
    assert before == 0 and after == 1 + 6  # the outlooker, then the six transformer blocks (segments run per block)
    assert torch.allclose(out, again, atol=1e-6)
    assert all(a is not None and a.abs().sum() > 0 and torch.allclose(a, b, atol=1e-6) for a, b in zip(first, second))
    torch.manual_seed(4)
    assert not torch.allclose(model(images), again, atol=1e-4)  # another seed drops other paths


def test_bf16_autocast_is_as_close_as_dense(images):
    assert_bf16_autocast_as_close_as_dense(make_volo(), "idle", images)
