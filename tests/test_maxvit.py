"""MaxVitAdapter: IdleViT on timm's MaxViT and MaxxViT (each block a convolution block, then attention within
windows and within a sparse grid) and CoAtNet (convolution blocks, then NCHW transformer blocks attending over the
whole map), against a literal reference: timm's own window and grid partitions or NCHW maps, every slot's full logits
with the relative-position bias, idle keys masked, the MLP on the selected slots."""
import pytest
import timm
import torch
from timm.models.maxxvit import (MaxxVit, MaxxVitBlock, TransformerBlock2d, grid_partition, grid_reverse,
                                 window_partition, window_reverse)

import tokenpace
from conftest import (assert_bf16_autocast_close, assert_idle_equals_reference, assert_keep_one_and_remove,
                      assert_keep_one_intermediates_equal, assert_macs_equal_flop_counter, assert_published_macs,
                      assert_pruned_features_run_the_method, ref_window_idle_attention, set_fused, spread_batchnorm,
                      spread_weights)

# At 64 px: a stride-2 stem (32x32), then stages of 16x16 and 8x8, windows and grids of 4 (16 slots a group)
SMALL = dict(img_size=64, embed_dim=(16, 32), depths=(1, 2), stem_width=(8, 16), transformer_window_size=4,
             transformer_grid_size=4, transformer_dim_head=8, num_classes=5)
MAXVITS = {  # name: (timm model, options): the three relative-position modules and both q/k/v layouts
    "rw_bias": ("maxvit_tiny_rw_224", dict()),  # RelPosBias, q/k/v per head side by side
    "tf_bias": ("maxvit_tiny_tf_224", dict()),  # RelPosBiasTf, q, k and v blocks, 'same' padding, MLP head
    "rmlp": ("maxvit_rmlp_pico_rw_256", dict()),  # RelPosMlp
    "layerscale_grid_only": ("maxvit_tiny_rw_224", dict(transformer_init_values=0.5, transformer_no_block_attn=True,
                                                        transformer_rel_pos_type="none")),
    "maxxvit": ("maxxvit_rmlp_nano_rw_256", dict()),  # ConvNeXt convolution blocks (7x7 depth-wise, conv MLP)
    "maxxvit_v2": ("maxxvitv2_nano_rw_256", dict()),  # ConvNeXt convolutions, grid attention only
    # CoAtNet: an MBConv stage, then transformer blocks over the whole 8x8 map (the first strided: dense)
    "coatnet": ("coatnet_0_rw_224", dict(block_type=("C", "T"), depths=(1, 5),  # LayerNorm2d, RelPosBias,
                                         transformer_init_values=0.5)),  # LayerScale2d
    "coatnet_bn": ("coatnet_bn_0_rw_224", dict(block_type=("C", "T"), depths=(1, 5))),  # BatchNorm2d norms
    "coatnet_rmlp": ("coatnet_rmlp_nano_rw_224", dict(block_type=("C", "T"), depths=(1, 5))),  # RelPosMlp
}
STARTS = (1, 3, 5)  # family blocks: stage 0 [conv, window, grid], stage 1 [conv, window, grid] x 2


def make_maxvit(variant: str = "rw_bias", seed: int = 0, **overrides) -> MaxxVit:
    name, options = MAXVITS[variant]
    torch.manual_seed(seed)
    model = spread_weights(timm.create_model(name, **{**SMALL, **options, **overrides}), seed).eval()
    return spread_batchnorm(model, seed)


def maxvit_images(batch: int = 2, size: int | tuple[int, int] = 64) -> torch.Tensor:
    H, W = (size, size) if isinstance(size, int) else size
    return torch.randn(batch, 3, H, W, generator=torch.Generator().manual_seed(1))


# ----------------------------------------------------------------------------------------------------------------
# Literal reference
# ----------------------------------------------------------------------------------------------------------------

def ref_idle_partition(blk, x, k, score):
    """One PartitionAttentionCl idling on (B, H, W, C): timm's partition of the normed map, full logits with the
    bias over every slot pair, the top k slots of each group by ``score`` attending to each other only."""
    attn, size = blk.attn, blk.partition_size
    B, H, W, C = x.shape
    part, unpart = (window_partition, window_reverse) if blk.partition_block else (grid_partition, grid_reverse)
    h = part(blk.norm1(x), size).reshape(-1, size[0] * size[1], C)
    G, n, _ = h.shape
    if attn.head_first:
        q, key, v = attn.qkv(h).view(G, n, attn.num_heads, -1).transpose(1, 2).chunk(3, dim=3)
    else:
        q, key, v = attn.qkv(h).reshape(G, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    logits = (q * attn.scale) @ key.transpose(-2, -1)
    if attn.rel_pos is not None:
        logits = logits + attn.rel_pos.get_bias()
    scores = logits.sum(1).mean(1) if score == "received" else part(x.norm(dim=-1, keepdim=True), size).reshape(G, n)
    pad = torch.zeros(G, n, dtype=torch.bool)
    o, sel = ref_window_idle_attention(logits, v, pad, scores, k)

    def back(t):
        return unpart(t.reshape(G, *size, -1), size, (H, W))

    selected = back(sel.unsqueeze(-1).float()) > 0.5
    x = torch.where(selected, x + blk.ls1(back(attn.proj(o))), x)
    return torch.where(selected, x + blk.ls2(blk.mlp(blk.norm2(x))), x)


def ref_idle_coat(blk, x, k, score):
    """CoAtNet's TransformerBlock2d idling on its NCHW map: timm's own norms, 1x1 convolutions and MLP on the map,
    logits over every token pair with the bias, the top k tokens attending to each other only."""
    attn = blk.attn
    B, C, H, W = x.shape
    n, d = H * W, attn.dim_head
    assert attn.head_first  # timm's TransformerBlock2d never builds another layout
    q, key, v = attn.qkv(blk.norm1(x)).view(B, attn.num_heads, 3 * d, n).chunk(3, dim=2)  # (B, heads, d, n)
    logits = (q * attn.scale).transpose(-2, -1) @ key
    if attn.rel_pos is not None:
        logits = logits + attn.rel_pos.get_bias()
    scores = logits.sum(1).mean(1) if score == "received" else x.flatten(2).norm(dim=1)
    sel = torch.zeros(B, n, dtype=torch.bool).scatter(1, scores.topk(k, dim=1).indices, True)
    probs = logits.masked_fill(~sel[:, None, None, :], float("-inf")).softmax(-1)
    selected = sel.view(B, 1, H, W)
    x = torch.where(selected, x + blk.ls1(attn.proj((v @ probs.transpose(-2, -1)).reshape(B, -1, H, W))), x)
    return torch.where(selected, x + blk.ls2(blk.mlp(blk.norm2(x))), x)


def ref_idle(model, img, keep, score, starts=STARTS):
    x, i = model.stem(img), 0
    for stage in model.stages:
        for blk in stage.blocks:
            if not isinstance(blk, MaxxVitBlock):  # CoAtNet's convolution and transformer blocks
                s, n = sum(i >= start for start in starts), x.shape[2] * x.shape[3]
                idles = isinstance(blk, TransformerBlock2d) and isinstance(blk.shortcut, torch.nn.Identity)
                k = int(n * keep ** s)
                x = ref_idle_coat(blk, x, k, score) if idles and s and k < n else blk(x)
                i += 1
                continue
            x = blk.conv(x).permute(0, 2, 3, 1)
            i += 1
            for part in (blk.attn_block, blk.attn_grid):
                if part is None:
                    continue
                s = sum(i >= start for start in starts)
                n = part.partition_size[0] * part.partition_size[1]
                k = int(n * keep ** s)
                x = part(x) if s == 0 or k == n else ref_idle_partition(part, x, k, score)
                i += 1
            x = x.permute(0, 3, 1, 2)
    return model.forward_head(model.norm(x))


# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", list(MAXVITS))
def test_keep_one_is_the_model_and_remove_restores_it(variant):
    assert_keep_one_and_remove(make_maxvit(variant), maxvit_images(), stage_starts=STARTS)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("score", ["received", "norm"])
@pytest.mark.parametrize("variant", list(MAXVITS))
def test_idle_equals_the_masked_partition_reference(variant, score, fused):
    model, img = set_fused(make_maxvit(variant), fused), maxvit_images()
    if variant == "coatnet_bn":  # its BatchNorms leave the spread weights' activations large (logits in the hundreds),
        model, img = model.double(), img.double()  # so float32 rounding differs by 1e-3: compared in float64
    assert_idle_equals_reference(model, img, lambda: ref_idle(model, img, 0.7, score), keep=0.7, score=score,
                                 stage_starts=STARTS)


@pytest.mark.parametrize("variant", ["rw_bias", "tf_bias", "coatnet"])
def test_idle_on_a_non_square_map_equals_the_reference(variant):
    """64x96 px: stage maps 16x24 and 8x12, so a grid group's rows and columns lie 4 and 6 apart (MaxViT's partitions
    are built for 64 px: the input's other side is any multiple that tiles); CoAtNet built for 64x96 (its bias
    covers the 8x12 map)."""
    build = dict(img_size=(64, 96)) if variant == "coatnet" else {}
    model, img = make_maxvit(variant, **build), maxvit_images(size=(64, 96))
    assert_idle_equals_reference(model, img, lambda: ref_idle(model, img, 0.7, "received"), keep=0.7,
                                 stage_starts=STARTS)


def test_grid_groups_gather_tokens_spread_over_the_map():
    """A grid block's group (r, c) holds the tokens (a * H / g + r, b * W / g + c): trace names them."""
    model = tokenpace.apply(make_maxvit(), "idle", keep=0.5, stage_starts=(2,))  # the first grid block idles
    with torch.no_grad(), tokenpace.trace(model) as trace:
        model(maxvit_images(batch=1, size=(64, 96)))  # a 16x24 map: groups of 4x4 slots 4 rows and 6 columns apart
    kept = trace.kept[2][0].view(24, 8)  # 4x6 groups, 8 of 16 slots each
    rows, cols = kept // 24, kept % 24
    assert trace.kept[1] is None and trace.kept[0] is None
    for g in range(24):  # group (r, c) = (g // 6, g % 6): rows r, r + 4, ...; columns c, c + 6, ...
        assert torch.all(rows[g] % 4 == g // 6) and torch.all(cols[g] % 6 == g % 6)


@pytest.mark.parametrize("variant", list(MAXVITS))
@pytest.mark.parametrize("options", [None, {}, {"score": "norm"}, {"score": "random", "keep": 0.8}], ids=str)
def test_macs_equal_flop_counter_on_the_non_fused_path(variant, options):
    model, img = set_fused(make_maxvit(variant), False), maxvit_images(batch=1)
    assert_macs_equal_flop_counter(model, img, None if options is None else dict(stage_starts=STARTS, **options))


@pytest.mark.parametrize("name, published", [("maxvit_tiny_tf_224", 5.6e9), ("maxvit_nano_rw_256", 4.46e9),
                                             ("coatnet_0_rw_224", 4.43e9)])
def test_published_maxvit_macs(name, published):
    """MaxViT-T's 5.6 GFLOPs (MACs) from the paper, timm's 4.46 and 4.43 GMACs for its MaxViT nano and CoAtNet-0,
    on the meta device."""
    with torch.device("meta"):
        model = set_fused(timm.create_model(name), False)
        size = model.pretrained_cfg["input_size"][-1]
        img = torch.empty(1, 3, size, size)
    assert_published_macs(model, img, published, 0.02, (0.65, 0.85))


def test_forward_intermediates_match_timm_and_the_idle_run():
    """timm's MaxxVit counts the stem's map as feature 0."""
    model, img = make_maxvit("tf_bias"), maxvit_images()
    assert_keep_one_intermediates_equal(model, img, [
        dict(), dict(indices=[0, 2], norm=True), dict(indices=[0], stop_early=True),
        dict(indices=[1], stop_early=True, intermediates_only=True), dict(indices=[2], stop_early=True, norm=True)])
    with torch.no_grad():
        tokenpace.apply(model, "idle", keep=0.7, stage_starts=STARTS)
        final, maps = model.forward_intermediates(img)
        dense = tokenpace.remove(model).forward_intermediates(img)[1]
        assert [tuple(m.shape) for m in maps] == [(2, 16, 32, 32), (2, 16, 16, 16), (2, 32, 8, 8)]
        assert torch.equal(maps[0], dense[0]) and not torch.allclose(maps[2], dense[2], atol=1e-3)
        tokenpace.apply(model, "idle", keep=0.7, stage_starts=STARTS)
        torch.testing.assert_close(final, model.forward_features(img), rtol=0, atol=0)
        with tokenpace.trace(model) as trace:  # a stop at the stem runs no block
            stem = model.forward_intermediates(img, indices=[0], stop_early=True, intermediates_only=True)
        assert trace.kept == [] and torch.equal(stem[0], model.stem(img))
        with pytest.raises(ValueError, match="output_fmt='NCHW'"):
            model.forward_intermediates(img, output_fmt="NLC")


def test_sizes_whose_maps_the_partitions_do_not_tile_are_refused():
    model = tokenpace.apply(make_maxvit(), "idle")
    assert tokenpace.macs(model, img_size=128) > tokenpace.macs(model)  # 64x64 and 32x32 maps: multiples of 4
    with pytest.raises(ValueError, match=r"cannot run 80x80 inputs: stage 1's 10x10 map is not a multiple of its 4x4 "
                                         r"window .*stage maps at this input: 20x20, 10x10"):
        tokenpace.macs(model, img_size=80)
    with pytest.raises(AssertionError, match="must be divisible by window"):  # timm's own forward fails there
        tokenpace.remove(model)(maxvit_images(size=80))
    # at 62 px the stem's map is 31x31: the strided MBConv rounds it up to 16, its shortcut's pooling down to 15
    with pytest.raises(ValueError, match="stage 0's first block halves the 31x31 map to 16x16 and its shortcut pools "
                                         "it to 15x15"):
        tokenpace.macs(model, img_size=62)
    with pytest.raises(RuntimeError, match="size of tensor"):  # as timm's own forward fails
        model(maxvit_images(size=62))
    tf = make_maxvit("tf_bias")  # 'same' padding: both round up, and timm runs it
    assert tokenpace.macs(tf, img_size=62) > 0 and tf(maxvit_images(size=62)).shape == (2, 5)


def test_coatnet_sizes_its_bias_does_not_cover_are_refused():
    model = tokenpace.apply(make_maxvit("coatnet"), "idle", stage_starts=STARTS)  # built for 64 px: an 8x8 map
    with pytest.raises(ValueError, match=r"cannot run 96x96 inputs: stage 1's 12x12 map is not the 8x8 map its "
                                         "relative-position bias is built for"):
        tokenpace.macs(model, img_size=96)
    family = tokenpace.get_patch(model).adapter
    with pytest.raises(ValueError, match=r"block 2 attends over 12x12 tokens, and its relative-position bias is built "
                                         "for 64"):  # timm's strided block fails first in a forward; this guards
        family.prepare(2, torch.zeros(1, 12, 12, 32))  # a gather that would not fail


def test_coatnet_with_batchnorm_trains_and_updates_its_statistics():
    """In training the MLP's BatchNorm normalises over the tokens it runs on (the selected ones)."""
    model = tokenpace.apply(make_maxvit("coatnet_bn"), "idle", stage_starts=STARTS).train()
    norm = model.stages[1].blocks[2].norm2
    before = norm.running_mean.clone()
    model(maxvit_images()).logsumexp(-1).mean().backward()
    assert not torch.equal(norm.running_mean, before)
    assert model.stages[1].blocks[2].attn.qkv.weight.grad.abs().sum() > 0


def test_refusals():
    for name, kwargs, found in [
            ("maxvit_tiny_pm_256", dict(), r"ParallelMaxxVitBlock \(conv Sequential\);"),  # timm's experimental one
            ("maxvit_tiny_rw_224", dict(transformer_use_nchw_attn=True),
             r"MaxxVitBlock \(conv MbConvBlock, attn_block PartitionAttention2d, attn_grid PartitionAttention2d, "
             r"NCHW attention\);")]:
        with torch.device("meta"):
            model = timm.create_model(name, **kwargs)
        with pytest.raises(TypeError, match=f"block 0 of stage 0 of this MaxxVit is {found} tokenpace supports timm's "
                                            "MaxxVitBlock of an MbConvBlock or ConvNeXtBlock"):
            tokenpace.apply(model, "idle")
    model = make_maxvit()
    for method in ("evo", "evit", "topk"):
        with pytest.raises(ValueError, match="needs a sequence layout.*accepted here: 'idle'"):
            tokenpace.apply(model, method)
    with pytest.raises(TypeError, match="FeatureListNet.*feature_cls='getter'"):
        tokenpace.apply(timm.create_model("maxvit_tiny_rw_224", features_only=True, out_indices=(0, 1, 2), **SMALL),
                        "idle")


def test_pruned_features_only_models_run_the_method():
    torch.manual_seed(0)
    features = timm.create_model("maxvit_tiny_rw_224", features_only=True, feature_cls="getter", out_indices=(0, 1),
                                 **SMALL).eval()
    assert_pruned_features_run_the_method(features, maxvit_images(), blocks=3, shapes=[(2, 16, 32, 32),
                                                                                      (2, 16, 16, 16)])


def test_bf16_autocast_and_training_run():
    model, img = make_maxvit("rmlp"), maxvit_images()
    assert_bf16_autocast_close(tokenpace.apply(model, "idle", stage_starts=STARTS), img)
    model.train()
    model(img).sum().backward()
    assert all(p.grad is not None for name, p in model.named_parameters() if "attn_grid.attn.qkv" in name)
