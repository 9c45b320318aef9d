"""TimmPit: Evo and Idle on timm's PiT (stages of ViT blocks joined by a depth-wise stride-2 pooling), against
literal masked references that run timm's own stem, pooling and heads: full sequences, idle keys masked, updates kept
on the selected rows only; Evo's global attention sub-sampled at the pooling kernels' centres."""
import pytest
import timm
import torch
from timm.models.pit import PoolingVisionTransformer

import tokenpace
from conftest import (assert_bf16_autocast_close, assert_keep_one_and_remove, assert_keep_one_intermediates_equal,
                      assert_macs_equal_flop_counter, assert_published_macs, assert_pruned_features_run_the_method,
                      ref_attention, ref_mlp, set_fused, spread_weights)

# stem: patch 4, stride 2 at 32 px -> a 15x15 grid (odd: the pooling pads), then 8x8 and 4x4
BASE = dict(img_size=32, patch_size=4, stride=2, base_dims=(8, 8, 8), depth=(2, 2, 2), heads=(1, 2, 2),
            num_classes=5)
PITS = {"plain": dict(), "distilled": dict(distilled=True)}
GRIDS = [(15, 15), (8, 8), (4, 4)]


def make_pit(variant: str = "plain", seed: int = 0, **overrides) -> PoolingVisionTransformer:
    torch.manual_seed(seed)
    return spread_weights(PoolingVisionTransformer(**{**BASE, **PITS[variant], **overrides}), seed).eval()


def pit_images(batch: int = 2, size: int = 32) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


# ----------------------------------------------------------------------------------------------------------------
# Literal references
# ----------------------------------------------------------------------------------------------------------------

def ref_forward(model, img, block):
    """timm's PiT forward, written out, with ``block(i, blk, seq, stage)`` in place of each block and ``pooled(g)``
    called at each pooling."""
    x = model.pos_drop(model.patch_embed(img) + model.pos_embed)
    cls = model.cls_token.expand(x.shape[0], -1, -1)
    p, i = cls.shape[1], 0
    for s, stage in enumerate(model.transformers):
        if stage.pool is not None:
            x, cls = stage.pool(x, cls)
        B, C, H, W = x.shape
        seq = torch.cat([cls, x.flatten(2).transpose(1, 2)], dim=1)
        for blk in stage.blocks:
            seq = block(i, blk, seq, s)
            i += 1
        cls, x = seq[:, :p], seq[:, p:].transpose(1, 2).reshape(B, C, H, W)
    return model.forward_head(model.norm(cls))


def full_logits(blk, x):
    """(B, H, n, n) logits of every query against every key (scaled)."""
    attn = blk.attn
    B, n, _ = x.shape
    q, k, _ = attn.qkv(blk.norm1(x)).reshape(B, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    return (q * attn.scale) @ k.transpose(-2, -1)


def masked_block(blk, x, m):
    """The block on the tokens m (B, n) among themselves (idle keys masked), every other token unchanged."""
    y, probs = ref_attention(blk, x, key_bias=(1.0 - m) * -1e9)
    keep = m.bool()[..., None]
    x = torch.where(keep, y, x)
    return torch.where(keep, ref_mlp(blk, x), x), probs


def ref_idle(model, img, keep, starts, score):
    p = model.num_tokens

    def block(i, blk, x, s):
        stage = sum(i >= start for start in starts)
        n = x.shape[1] - p
        if stage == 0 or int(n * keep ** stage) == n:
            return blk(x)
        logits = full_logits(blk, x)
        scores = {"cls": lambda: logits[:, :, 0].sum(1), "received": lambda: logits.mean(2).sum(1),
                  "norm": lambda: x.norm(dim=-1)}[score]()[:, p:]
        m = torch.zeros(x.shape[:2]).scatter(1, scores.topk(int(n * keep ** stage), dim=1).indices + p, 1.0)
        m[:, :p] = 1.0
        return masked_block(blk, x, m)[0]

    return ref_forward(model, img, block)


def ref_evo(model, img, keep, first, alpha=0.5):
    """Evo, stage mode, placeholders carried: g = the class query's softmax row (head mean) of block first-1; a
    selection at ``first`` and at every later stage's first block; at a pooling, g taken at the kernel centres (every
    other row and column) and rescaled to its sum."""
    p = model.num_tokens
    state = dict(g=None, m=None, stage=0)

    def block(i, blk, x, s):
        g = state["g"]
        if s != state["stage"]:  # pooled: sub-sample g at the centres of the kernels
            state["stage"] = s
            if g is not None:
                rows, cols = GRIDS[s - 1]
                centres = torch.arange(rows * cols).view(rows, cols)[::2, ::2].reshape(-1)
                g = g[:, centres] * (g.sum(1, keepdim=True) / g[:, centres].sum(1, keepdim=True))
            if i > first:
                state["m"] = None  # every later stage selects again
        if i < first:
            y, probs = masked_block(blk, x, torch.ones(x.shape[:2]))
            state["g"] = probs[:, :, 0, p:].mean(1) if i == first - 1 else g
            return y
        n = x.shape[1] - p
        if state["m"] is None or i == first:
            m = torch.zeros(x.shape[:2]).scatter(1, g.topk(int(n * keep), dim=1).indices + p, 1.0)
            m[:, :p] = 1.0
            state["m"] = m
        m = state["m"]
        y, probs = masked_block(blk, x, m)
        row = probs[:, :, 0, p:].mean(1)
        state["g"] = torch.where(m[:, p:].bool(), (1 - alpha) * g + alpha * row, g)
        return y

    return ref_forward(model, img, block)


# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", list(PITS))
def test_keep_one_is_the_model_and_remove_restores_it(variant):
    model, img = make_pit(variant), pit_images()
    assert_keep_one_and_remove(model, img, stage_starts=(1, 2, 4))
    with torch.no_grad():
        ref = model(img)
        assert torch.equal(tokenpace.apply(model, "evo", keep=1.0)(img), ref)
        assert not torch.allclose(tokenpace.apply(model, "evo", keep=0.5)(img), ref, atol=1e-3)
        assert torch.equal(tokenpace.remove(model)(img), ref)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("score", ["cls", "received", "norm"])
@pytest.mark.parametrize("variant", list(PITS))
def test_idle_equals_the_masked_reference(variant, score, fused):
    model, img = set_fused(make_pit(variant), fused), pit_images()
    starts = (1, 2, 4)  # idling from stage 0's last block, the ratio stepping down inside stage 1 and at stage 2
    with torch.no_grad():
        expected = ref_idle(model, img, 0.7, starts, score)
        out = tokenpace.apply(model, "idle", keep=0.7, stage_starts=starts, score=score)(img)
        dense = tokenpace.remove(model)(img)
    assert not torch.allclose(out, dense, atol=1e-2)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("first", [1, 2, 3])
@pytest.mark.parametrize("variant", list(PITS))
def test_evo_equals_the_masked_reference(variant, first):
    """first 1: selected in stage 0, then again at stages 1 and 2 with g pooled twice; 2: the first selection at
    stage 1's start; 3: inside stage 1 (its first block dense and scored)."""
    model, img = make_pit(variant), pit_images()
    with torch.no_grad():
        expected = ref_evo(model, img, 0.5, first)
        out = tokenpace.apply(model, "evo", keep=0.5, stage_starts=(first,))(img)
        dense = tokenpace.remove(model)(img)
    assert not torch.allclose(out, dense, atol=1e-2)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_evo_sub_samples_its_global_attention_at_the_pooling_kernels_centres():
    patch = tokenpace.get_patch(tokenpace.apply(make_pit(), "evo"))
    entry = patch.adapter.stage_entry(1, torch.device("cpu"))
    assert entry.evolution_logit is None
    assert entry.subsample.tolist() == [15 * r + c for r in range(0, 15, 2) for c in range(0, 15, 2)]
    assert patch.adapter.stage_entry(2, torch.device("cpu")).subsample.tolist() == [
        8 * r + c for r in range(0, 8, 2) for c in range(0, 8, 2)]


@pytest.mark.parametrize("variant", list(PITS))
@pytest.mark.parametrize("method, options", [(None, None), ("idle", {}), ("idle", {"score": "norm"}),
                                             ("idle", {"score": "received", "stage_starts": (0, 3)}),
                                             ("evo", {}), ("evo", {"stage_starts": (1,), "representative": True})],
                         ids=str)
def test_macs_equal_flop_counter(variant, method, options):
    # no parameter requires grad: FlopCounterMode's module tracker fails on the expanded class token under no_grad
    model = set_fused(make_pit(variant), False).requires_grad_(False)
    img = pit_images(batch=1)
    if method == "idle" or method is None:
        assert_macs_equal_flop_counter(model, img, options)
        return
    from torch.utils.flop_counter import FlopCounterMode

    tokenpace.apply(model, method, **options)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(img)
    assert tokenpace.macs(model) == counter.get_total_flops() // 2


@pytest.mark.parametrize("name, published", [("pit_ti_224", 0.7e9), ("pit_s_224", 2.9e9), ("pit_b_224", 12.5e9)])
def test_published_pit_macs(name, published):
    """The PiT paper's GFLOPs (MACs) for PiT-Ti / S / B, counted on the meta device (shapes only)."""
    with torch.device("meta"):
        model = set_fused(timm.create_model(name), False).requires_grad_(False)
        img = torch.empty(1, 3, 224, 224)
    assert_published_macs(model, img, published, 0.04, (0.6, 0.8))


def test_forward_intermediates_match_timm_and_the_idle_run():
    model, img = make_pit("distilled"), pit_images()
    assert_keep_one_intermediates_equal(model, img, [
        dict(), dict(indices=[0, 2]), dict(indices=[1], stop_early=True), dict(indices=[2], stop_early=True),
        dict(indices=[0], stop_early=True, intermediates_only=True)])
    with torch.no_grad():
        tokenpace.apply(model, "idle", keep=0.7, stage_starts=(1,))
        final, maps = model.forward_intermediates(img)
        assert [tuple(m.shape) for m in maps] == [(2, 8, 15, 15), (2, 16, 8, 8), (2, 16, 4, 4)]
        torch.testing.assert_close(final, model.forward_features(img), rtol=0, atol=0)
        for options, message in ((dict(norm=True), "norm=False"), (dict(output_fmt="NLC"), "output_fmt='NCHW'")):
            with pytest.raises(ValueError, match=message):
                model.forward_intermediates(img, **options)


def test_trace_names_positions_in_each_stages_grid():
    model, img = tokenpace.apply(make_pit(), "idle", keep=0.7, stage_starts=(1,)), pit_images()
    with torch.no_grad(), tokenpace.trace(model) as trace:
        model(img)
    assert trace.kept[0] is None
    sizes = [int(15 * 15 * 0.7), int(8 * 8 * 0.7), int(8 * 8 * 0.7), int(4 * 4 * 0.7), int(4 * 4 * 0.7)]
    for i, (kept, n) in enumerate(zip(trace.kept[1:], sizes), start=1):
        rows, cols = GRIDS[(i // 2)]
        assert kept.shape == (2, n) and 0 <= kept.min() and kept.max() < rows * cols


def test_training_with_the_cut_loss_and_distilled_heads():
    """Idle trains on PiT: the token cut loss reads the class attention of each idling block, and gradients reach
    every block; a distilled PiT in distilled training returns both heads' logits."""
    from tokenpace.losses import model_cut_loss

    model = tokenpace.apply(make_pit("distilled"), "idle", keep=0.7, stage_starts=(1,)).train()
    model.set_distilled_training(True)
    logits, dist = model(pit_images())
    cut = model_cut_loss(model)
    assert cut > 0 and logits.shape == dist.shape == (2, 5)
    cut.backward()  # the cut loss alone reaches the q/k projections of every idling block (blocks 1-5)
    blocks = [blk for stage in model.transformers for blk in stage.blocks]
    assert all(blk.attn.qkv.weight.grad.abs().sum() > 0 for blk in blocks[1:])


def test_refusals():
    model = make_pit()
    for method in ("evit", "topk"):
        with pytest.raises(ValueError, match=f"method '{method}' is not available for timm PiT models .*down-sample "
                                             "a full grid between stages.*accepted here: 'evo', 'idle'"):
            tokenpace.apply(model, method)
    tokenpace.apply(model, "idle")
    with pytest.raises(ValueError, match="this PiT got a 48x48 input; it is built for 32x32 inputs only"):
        model(pit_images(size=48))
    with pytest.raises(ValueError, match="cannot run 48x48 inputs: it is built for 32x32 inputs only"):
        tokenpace.macs(model, img_size=48)
    with pytest.raises(TypeError, match="feature_cls='getter'"):
        tokenpace.apply(timm.create_model("pit_ti_224", features_only=True, **BASE), "idle")
    block = model.transformers[1].blocks[0]
    block.attn = torch.nn.Identity()
    with pytest.raises(TypeError, match="block 0 of PiT stage 1 is Block with Identity; tokenpace supports timm's "
                                        "pre-norm Block"):
        tokenpace.apply(tokenpace.remove(model), "idle")
    for build, message in ((lambda m: setattr(m.transformers[2], "pool", None), "stage 2 of this PiT has no pooling"),
                           (lambda m: setattr(m.transformers[1], "blocks", torch.nn.Sequential()),
                            "stage 1 of this PiT has no blocks")):
        model = make_pit()
        build(model)
        with pytest.raises(TypeError, match=message):
            tokenpace.apply(model, "idle")


def test_pruned_features_only_models_run_the_method():
    torch.manual_seed(0)
    features = timm.create_model("pit_ti_224", features_only=True, feature_cls="getter", out_indices=(0, 1),
                                 **BASE).eval()
    assert_pruned_features_run_the_method(features, pit_images(), blocks=4, shapes=[(2, 8, 15, 15), (2, 16, 8, 8)])


def test_bf16_autocast_runs_both_methods():
    model, img = make_pit(), pit_images()
    for method in ("evo", "idle"):
        assert_bf16_autocast_close(tokenpace.apply(model, method), img)
