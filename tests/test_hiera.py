"""TimmHiera: IdleViT on timm's Hiera (mask-unit and global attention, stage entries that pool), against a literal
reference: each window's tokens sliced from the unrolled sequence (token t * nW + w is slot t of window w), ranked by
their full logits, and the selected ones run through timm's own block as one sequence per window."""
import copy

import pytest
import timm
import torch
from timm.models.hiera import Hiera

import tokenpace
from tokenpace.families import adapter_for
from conftest import (HIERA_INTERMEDIATE_CALLS, assert_idle_equals_reference, assert_keep_one_and_remove,
                      assert_keep_one_intermediates_equal, assert_macs_equal_flop_counter,
                      assert_pruned_features_run_the_method, assert_scores_match_per_window, dense_and_idle_macs,
                      spread_weights)

# 64 px, patch stride 4: 16x16 tokens in 4 mask units of 8x8; stages (1, 2, 3, 2) on 16x16, 8x8, 4x4 and 2x2 grids;
# mask-unit attention in stages 0-1 (and block 3, the first of stage 2: timm lags it by one block), global after
HIERAS = {
    "plain": dict(),
    "layerscale": dict(init_values=0.5),
    "no_expand_proj": dict(use_expand_proj=False),  # stage entries pool (max and mean) instead of projecting
    "abswin": dict(abs_win_pos_embed=True, global_pos_size=(4, 4)),
    "q_pool_2": dict(q_pool=2, mask_unit_size=(4, 4)),  # the last stage entry widens without pooling
}
STARTS = (0, 2, 4)


def make_hiera(variant: str = "plain", seed: int = 0, **overrides) -> Hiera:
    torch.manual_seed(seed)
    options = {**dict(img_size=64, embed_dim=16, num_heads=1, stages=(1, 2, 3, 2), num_classes=5),
               **HIERAS[variant], **overrides}
    return spread_weights(Hiera(**options), seed).eval()


def hiera_images(batch: int = 2, size: int = 64) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


def set_fused(model, fused: bool):
    for blk in model.blocks:
        blk.attn.fused_attn = fused
    return model


# ----------------------------------------------------------------------------------------------------------------
# Literal reference
# ----------------------------------------------------------------------------------------------------------------

def ref_windows(blk, N):
    attn = blk.attn
    return N // attn.window_size if attn.use_mask_unit_attn else 1


def ref_scores(blk, x, score):
    """(nW, B, T): per window, the mean logit each slot receives from every query of its window, summed over heads
    (or its input's norm)."""
    windows = ref_windows(blk, x.shape[1])
    out = []
    for w in range(windows):
        xw = x[:, w::windows]  # slot t of window w is token t * nW + w
        if score == "norm":
            out.append(xw.norm(dim=-1))
            continue
        attn = blk.attn
        B, T, _ = xw.shape
        q, k, _ = attn.qkv(blk.norm1(xw)).reshape(B, T, 3, attn.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        out.append(((q * attn.scale) @ k.transpose(-2, -1)).sum(1).mean(1))
    return torch.stack(out)


def ref_idle_block(blk, x, k, score):
    """The top k slots of each window run timm's own block among themselves (global attention over them); the rest
    pass through."""
    windows = ref_windows(blk, x.shape[1])
    whole = copy.deepcopy(blk)
    whole.attn.use_mask_unit_attn = False  # attention over every token it is given: here one window's selected
    y = x.clone()
    scores = ref_scores(blk, x, score)
    for w in range(windows):
        slots = scores[w].topk(k, dim=1).indices  # (B, k)
        for b in range(x.shape[0]):
            seq = slots[b] * windows + w
            y[b, seq] = whole(x[b:b + 1, seq])[0]
    return y


def ref_idle(model, img, keep, score, starts=STARTS):
    x = model.unroll(model._pos_embed(model.patch_embed(img)))
    for i, blk in enumerate(model.blocks):
        s = sum(i >= start for start in starts)
        n = x.shape[1] // ref_windows(blk, x.shape[1])
        k = int(n * keep ** s)
        pools = blk.dim != blk.dim_out
        x = blk(x) if s == 0 or k == n or pools else ref_idle_block(blk, x, k, score)
    return model.forward_head(x)


# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", list(HIERAS))
def test_keep_one_is_the_model_and_remove_restores_it(variant):
    assert_keep_one_and_remove(make_hiera(variant), hiera_images(), stage_starts=STARTS)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("score", ["received", "norm"])
@pytest.mark.parametrize("variant", list(HIERAS))
def test_idle_equals_the_window_reference(variant, score, fused):
    model, img = set_fused(make_hiera(variant), fused), hiera_images()
    assert_idle_equals_reference(model, img, lambda: ref_idle(model, img, 0.7, score), keep=0.7, score=score,
                                 stage_starts=STARTS)


@pytest.mark.parametrize("block", [0, 2, 4, 5, 7])  # windowed in stages 0-1, global from block 4 (1, 3, 6 pool)
def test_scores_rank_like_the_full_logits(block):
    """The mean received logit without projecting a key: equal to the full logits' mean up to one constant a
    window (the query's product with the key bias)."""
    model = make_hiera()
    adapter = adapter_for(model)
    x = model.unroll(model._pos_embed(model.patch_embed(hiera_images())))
    with torch.no_grad():
        for i in range(block):
            x = model.blocks[i](x)
        ours = adapter.token_scores(block, adapter.prepare(block, x), "received")
        ref = ref_scores(model.blocks[block], x, "received").transpose(0, 1)
    assert ours.shape == ref.shape
    assert_scores_match_per_window(ours.flatten(0, 1), ref.flatten(0, 1), torch.ones(ref.flatten(0, 1).shape,
                                                                                      dtype=torch.bool))


@pytest.mark.parametrize("variant", [*HIERAS, "no_pool"])
@pytest.mark.parametrize("options", [None, {}, {"score": "norm"}, {"score": "random", "keep": 0.8}], ids=str)
def test_macs_equal_flop_counter_on_the_non_fused_path(variant, options):
    if variant == "no_pool":  # the head's norm and classifier on every token
        model = make_hiera()
        model.reset_classifier(5, global_pool="")
    else:
        model = make_hiera(variant)
    assert_macs_equal_flop_counter(set_fused(model, False), hiera_images(batch=1),
                                   None if options is None else dict(stage_starts=STARTS, **options))


def test_hiera_tiny_macs_equal_flop_counter():
    """hiera_tiny_224 on the meta device (shapes only): the paper's Hiera-T is 4.9 GFLOPs (MACs, as it counts)."""
    with torch.device("meta"):
        model = set_fused(timm.create_model("hiera_tiny_224"), False)
        img = torch.empty(1, 3, 224, 224)
    counts = dense_and_idle_macs(model, img, lambda m, x: m(x))
    assert 4.8e9 < counts[None] < 5.0e9
    assert 0.6 < counts["idle"] / counts[None] < 0.8


@pytest.mark.parametrize("variant", ["plain", "q_pool_2"])
def test_unrolled_tokens_map_to_timms_raster_positions(variant):
    """Each stage's map from unrolled place to raster position, against timm's own unroll of a raster sequence and
    its pooling (a max over the q-stride axis): after s poolings, a token holds the largest stage-0 raster position of
    its 2^s x 2^s cell, whose bottom-right corner it is."""
    model = make_hiera(variant)
    adapter = adapter_for(model)
    rows, cols = model.tokens_spatial_shape
    x = model.unroll(torch.arange(rows * cols, dtype=torch.float64).view(1, -1, 1))
    for s, blocks in enumerate(adapter.stage_blocks):
        if s > 0 and model.blocks[blocks[0]].attn.q_stride > 1:
            x = x.view(1, 4, -1, 1).amax(dim=1)
        grid = adapter.block_grid(blocks[0])
        cell = rows // grid[0]
        corner = x.flatten().long()
        expected = (corner // cols // cell) * grid[1] + corner % cols // cell
        assert torch.equal(adapter._raster(blocks[0], torch.device("cpu")), expected), s


def test_window_slots_are_timms_mask_units():
    """The reference's (and the family's) window membership: timm's mask-unit block equals its own block with
    global attention run on each window's tokens x[:, w::nW] alone."""
    model = make_hiera()
    x = model.unroll(model._pos_embed(model.patch_embed(hiera_images())))
    checked = []
    with torch.no_grad():
        for i, blk in enumerate(model.blocks[:3]):
            if blk.dim == blk.dim_out:  # blocks 0 and 2: mask units of 64 and 16 slots
                checked.append(i)
                windows = x.shape[1] // blk.attn.window_size
                whole = copy.deepcopy(blk)
                whole.attn.use_mask_unit_attn = False
                out, ref = blk(x), x.clone()
                for w in range(windows):
                    ref[:, w::windows] = whole(x[:, w::windows])
                torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
            x = blk(x)
    assert checked == [0, 2]


def test_trace_names_the_kept_positions():
    model, img = make_hiera(), hiera_images()
    tokenpace.apply(model, "idle", keep=0.7, stage_starts=STARTS)
    with torch.no_grad(), tokenpace.trace(model) as trace:
        model(img)
    # block 0: 4 windows of 64 keep 44 each; block 1 pools (every token); block 2: 4 windows of 16 keep 7 each
    assert [None if k is None else tuple(k.shape) for k in trace.kept] == [
        (2, 176), None, (2, 28), None, (2, 5), (2, 5), None, (2, 1)]
    for block, grid in ((0, 256), (2, 64), (4, 16)):
        kept = trace.kept[block]
        assert kept.min() >= 0 and kept.max() < grid and all(len(set(row.tolist())) == kept.shape[1] for row in kept)
    # each window of block 0 is an 8x8 mask unit of the 16x16 map: its kept positions lie in one quadrant
    quadrant = (trace.kept[0] // 16 // 8) * 2 + trace.kept[0] % 16 // 8
    assert all(len(set(q.tolist())) == 1 for q in quadrant.view(2, 4, 44).flatten(0, 1))


def test_forward_intermediates_match_timm_and_the_idle_run():
    model, img = make_hiera(), hiera_images()
    assert_keep_one_intermediates_equal(model, img, HIERA_INTERMEDIATE_CALLS)
    with torch.no_grad():
        tokenpace.apply(model, "idle", keep=0.7, stage_starts=STARTS)
        final, maps = model.forward_intermediates(img)
        assert [m.shape for m in maps] == [(2, 16, 16, 16), (2, 32, 8, 8), (2, 64, 4, 4), (2, 128, 2, 2)]
        torch.testing.assert_close(final, model.forward_features(img), rtol=0, atol=0)
        # the last map is the final tokens in raster order
        torch.testing.assert_close(maps[-1], model.reroll(final, 7).permute(0, 3, 1, 2), rtol=0, atol=0)
        with pytest.raises(ValueError, match="norm=False"):
            model.forward_intermediates(img, norm=True)


def test_masked_input_and_other_outputs_are_refused():
    model = tokenpace.apply(make_hiera(), "idle")
    img = hiera_images()
    mask = torch.ones(2, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="masked input .*Hiera's MAE mask units"):
        model.forward_features(img, mask=mask)
    with pytest.raises(ValueError, match="masked input"):
        model(img, mask=mask)
    with pytest.raises(ValueError, match="masked input"):
        model.forward_intermediates(img, mask=mask)
    with pytest.raises(ValueError, match=r"return_intermediates=True\) is not supported.*forward_intermediates"):
        model.forward_features(img, return_intermediates=True)
    with torch.no_grad():  # the calls timm's forward makes: masks that ask for nothing
        torch.testing.assert_close(model.forward_features(img, mask=None, return_intermediates=False),
                                   model.forward_features(img), rtol=0, atol=0)


def test_only_idle_and_what_is_refused():
    model = make_hiera()
    for method in ("evo", "evit", "topk"):
        with pytest.raises(ValueError, match="sequence"):
            tokenpace.apply(model, method)
    with pytest.raises(ValueError, match="score"):
        tokenpace.apply(model, "idle", score="cls")
    dropping = tokenpace.apply(make_hiera(patch_drop_rate=0.25), "idle")
    with torch.no_grad():
        dropping(hiera_images())  # timm drops mask units only while training
    with pytest.raises(ValueError, match="patch_drop_rate=0.25.*model.patch_drop_rate = 0"):
        dropping.train()(hiera_images())
    with pytest.raises(ValueError, match="built for 64x64 inputs only"):
        tokenpace.macs(model, img_size=96)
    tokenpace.apply(model, "idle")
    model.blocks[4] = copy.deepcopy(model.blocks[4])
    with pytest.raises(TypeError, match="block 4 .*was replaced after tokenpace.apply"):
        model(hiera_images())


@pytest.mark.parametrize("fused", [False, True])
def test_bf16_autocast_and_training(fused):
    model = set_fused(make_hiera("layerscale"), fused)
    img = hiera_images()
    tokenpace.apply(model, "idle", keep=0.7, stage_starts=STARTS)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(img)
    with torch.no_grad():
        full = model(img)
    assert low.dtype == torch.bfloat16 and (low.float() - full).abs().max() < 0.1 * full.abs().max()
    model.train()
    model(img).square().mean().backward()
    assert all(blk.attn.qkv.weight.grad is not None and blk.attn.qkv.weight.grad.abs().sum() > 0
               for blk in model.blocks)


def test_a_pruned_features_only_model_runs_the_method():
    """timm prunes a features_only model's blocks after its last out_index but keeps the stage ends: the stages left
    empty are not stages of the family."""
    torch.manual_seed(0)
    features = timm.create_model("hiera_tiny_224", features_only=True, out_indices=(0, 1), img_size=64, embed_dim=16,
                                 num_heads=1, stages=(1, 2, 3, 2)).eval()
    assert_pruned_features_run_the_method(features, hiera_images(), 3, [(2, 16, 16, 16), (2, 32, 8, 8)])
