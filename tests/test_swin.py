"""SwinAdapter: IdleViT per attention window on timm SwinTransformer, against a literal masked reference."""
import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models.swin_transformer import SwinTransformer, SwinTransformerBlock, window_partition, window_reverse
from torch.utils.flop_counter import FlopCounterMode

import tokenpace
from tokenpace.families.swin import SwinAdapter
from conftest import spread_weights

# (model options, input size); window 4 everywhere
SWINS = {
    # 16x16 -> 8x8 -> 4x4 -> 2x2 maps: shifted windows in stages 0-1, one window in stage 2, a window clamped to 2x2
    "shifted": (dict(img_size=32, patch_size=2, depths=(2, 2, 2, 2), num_heads=(2, 2, 4, 4)), 32),
    # 10x10 -> 5x5 maps, both padded to whole windows (a 5x5 map's corner window holds 1 real token of 16)
    "padded": (dict(img_size=40, patch_size=4, depths=(2, 2), num_heads=(2, 4)), 40),
    # masks built per forward, run at a size it was not built for: 20x20 -> 10x10 -> 5x5 (padded) -> 3x3 (padded)
    "dynamic": (dict(img_size=32, patch_size=2, depths=(2, 2, 2, 2), num_heads=(2, 2, 4, 4), strict_img_size=False),
                40),
}
STARTS = {"shifted": (1, 3, 5), "padded": (1, 2, 3), "dynamic": (1, 3, 5)}  # shifted blocks idle in each model


def make_swin(variant: str, seed: int = 0, **overrides) -> SwinTransformer:
    torch.manual_seed(seed)
    options = {**dict(embed_dim=32, window_size=4, num_classes=10), **SWINS[variant][0], **overrides}
    return spread_weights(SwinTransformer(**options), seed).eval()


def swin_images(variant: str, batch: int = 2) -> torch.Tensor:
    size = SWINS[variant][1]
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


def swin_blocks(model):
    return [blk for stage in model.layers for blk in stage.blocks]


def set_fused(model, fused: bool):
    for blk in swin_blocks(model):
        blk.attn.fused_attn = fused
    return model


# ----------------------------------------------------------------------------------------------------------------
# Literal reference: timm's window math with full n x n logits, idle keys masked, outputs kept where selected
# ----------------------------------------------------------------------------------------------------------------

def ref_shift_pad(blk, t):
    """timm's cyclic shift and bottom/right zero padding of a (B, H, W, D) map."""
    (wh, ww), (sh, sw) = blk.window_size, blk.shift_size
    t = torch.roll(t, (-sh, -sw), (1, 2))
    return F.pad(t, (0, 0, 0, -t.shape[2] % ww, 0, -t.shape[1] % wh))


def ref_windows(blk, t):
    wh, ww = blk.window_size
    return window_partition(ref_shift_pad(blk, t), (wh, ww)).reshape(-1, wh * ww, t.shape[-1])


def ref_unwindows(blk, t, H, W):
    (wh, ww), (sh, sw) = blk.window_size, blk.shift_size
    t = window_reverse(t.reshape(-1, wh, ww, t.shape[-1]), (wh, ww), H + -H % wh, W + -W % ww)
    return torch.roll(t[:, :H, :W], (sh, sw), (1, 2))


def ref_logits(blk, x):
    """Every window's full scaled logits (G, heads, n, n) with relative-position bias and shift mask, and v."""
    attn = blk.attn
    normed = blk.norm1(x)
    shifted, win = ref_shift_pad(blk, normed), ref_windows(blk, normed)
    G, n, _ = win.shape
    q, k, v = attn.qkv(win).reshape(G, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    logits = (q * attn.scale) @ k.transpose(-2, -1) + attn._get_rel_pos_bias()
    mask = blk.get_attn_mask(shifted) if blk.dynamic_mask else blk.attn_mask
    if mask is not None:
        logits = (logits.view(-1, mask.shape[0], attn.num_heads, n, n) + mask[None, :, None]).view(logits.shape)
    return logits, v


def ref_padding(blk, x):
    return ref_windows(blk, torch.ones_like(x[..., :1]))[..., 0] == 0  # (G, n): zero padding slots


def ref_scores(blk, x, score):
    """(G, n): the mean over the rows (queries) of each window's logits, summed over heads, or the input norm."""
    if score == "received":
        scores = ref_logits(blk, x)[0].sum(1).mean(1)
    else:
        scores = ref_windows(blk, x.norm(dim=-1, keepdim=True))[..., 0]
    return scores.masked_fill(ref_padding(blk, x), float("-inf"))


def ref_idle_block(blk, x, k, score):
    """IdleViT block: the top k slots of every window (padding last) update; queries see only selected real keys."""
    B, H, W, C = x.shape
    logits, v = ref_logits(blk, x)
    pad = ref_padding(blk, x)
    sel = torch.zeros_like(pad).scatter(1, ref_scores(blk, x, score).topk(k, dim=1).indices, True)
    probs = logits.masked_fill(~(sel & ~pad)[:, None, None, :], float("-inf")).softmax(-1)
    out = blk.attn.proj((probs @ v).transpose(1, 2).reshape(*pad.shape, -1))
    y = x + ref_unwindows(blk, out, H, W)
    y = y + blk.mlp(blk.norm2(y))
    return torch.where(ref_unwindows(blk, sel.unsqueeze(-1).float(), H, W) > 0.5, y, x)


def ref_idle(model, img, keep, score, starts):
    x, i = model.patch_embed(img), 0
    for stage in model.layers:
        x = stage.downsample(x)
        for blk in stage.blocks:
            s = sum(i >= start for start in starts)
            n = blk.window_size[0] * blk.window_size[1]
            k = int(n * keep ** s)
            x = blk(x) if s == 0 or k == n else ref_idle_block(blk, x, k, score)
            i += 1
    return model.forward_head(model.norm(x))


# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", list(SWINS))
def test_keep_one_is_the_model_and_remove_restores_it(variant):
    model, img = make_swin(variant), swin_images(variant)
    keys = list(model.state_dict())
    with torch.no_grad():
        ref = model(img)
        assert torch.equal(tokenpace.apply(model, "idle", keep=1.0)(img), ref)
        assert not torch.allclose(tokenpace.apply(model, "idle", keep=0.7)(img), ref, atol=1e-3)
        assert list(model.state_dict()) == keys
        assert torch.equal(tokenpace.remove(model)(img), ref)
    assert type(model) is SwinTransformer


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("score", ["received", "norm"])
@pytest.mark.parametrize("variant", list(SWINS))
def test_idle_equals_the_masked_window_reference(variant, score, fused):
    model, img = set_fused(make_swin(variant), fused), swin_images(variant)
    with torch.no_grad():
        ref = ref_idle(model, img, 0.7, score, STARTS[variant])
        out = tokenpace.apply(model, "idle", keep=0.7, score=score, stage_starts=STARTS[variant])(img)
        dense = tokenpace.remove(model)(img)
    assert not torch.allclose(out, dense, atol=1e-2)  # idling changed the result ...
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)  # ... exactly as the reference says


@pytest.mark.parametrize("variant,block,grid", [("shifted", 1, (16, 16)), ("shifted", 2, (8, 8)),
                                                ("padded", 3, (5, 5)), ("dynamic", 3, (10, 10))])
def test_adapter_scores_rank_like_the_full_logits(variant, block, grid):
    """Shifted-window mask, relative-position bias and padding included: scores differ by one constant per window."""
    model = make_swin(variant)
    adapter = SwinAdapter(model)
    blk = adapter.blocks[block]
    x = torch.randn(2, *grid, blk.norm1.normalized_shape[0], generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = adapter.token_scores(block, adapter.prepare(block, x), "received").flatten(0, 1)
        ref = ref_scores(blk, x, "received")
    real = ~ref_padding(blk, x)
    assert torch.equal(ours.isinf(), ~real)
    diff = torch.where(real, ours - ref, 0.0)
    per_window = diff.sum(1, keepdim=True) / real.sum(1, keepdim=True)
    torch.testing.assert_close(torch.where(real, diff - per_window, 0.0), torch.zeros_like(diff), atol=1e-4, rtol=0)


@pytest.mark.parametrize("variant", list(SWINS))
@pytest.mark.parametrize("method,options", [(None, {}), ("idle", {}), ("idle", {"score": "norm"}),
                                            ("idle", {"score": "random", "keep": 0.65})], ids=str)
def test_macs_equal_flop_counter_on_the_non_fused_path(variant, method, options):
    model = set_fused(make_swin(variant), False)  # count explicit matmuls (CPU SDPA has no FLOP formula everywhere)
    if method is not None:
        tokenpace.apply(model, method, **options)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(swin_images(variant, batch=1))
    assert tokenpace.macs(model, img_size=SWINS[variant][1]) == counter.get_total_flops() // 2
    if variant != "dynamic":
        assert tokenpace.macs(model) == tokenpace.macs(model, img_size=SWINS[variant][1])


def test_swin_tiny_gmacs():
    with torch.device("meta"):  # shapes only
        model = timm.create_model("swin_tiny_patch4_window7_224")
    dense = tokenpace.macs(model)
    idle = tokenpace.macs(tokenpace.apply(model, "idle", keep=0.7))
    print(f"swin_tiny_patch4_window7_224: dense {dense / 1e9:.3f} GMACs, idle keep=0.7 {idle / 1e9:.3f} GMACs")
    assert abs(dense / 4.5e9 - 1) < 0.01  # timm and the Swin paper: 4.5 G
    assert 0.6 < idle / dense < 0.7
    with pytest.raises(ValueError, match="built for 224x224 .*strict_img_size=False"):
        tokenpace.macs(tokenpace.remove(model), img_size=448)  # timm's fixed-size Swin cannot run it
    with torch.device("meta"):
        resizable = timm.create_model("swin_tiny_patch4_window7_224", strict_img_size=False)
    assert 3.95 < tokenpace.macs(resizable, img_size=448) / dense < 4  # 4x the windows of 7x7


@pytest.mark.parametrize("variant", list(SWINS))
def test_trace_positions(variant):
    model = tokenpace.apply(make_swin(variant), "idle", keep=0.7, stage_starts=STARTS[variant])
    adapter = tokenpace.get_patch(model).adapter
    img = swin_images(variant)
    with torch.no_grad(), tokenpace.trace(model) as tr:
        model(img)
        x = model.patch_embed(img)  # the real map of each stage (the dynamic model runs at another size)
        grids = []
        for stage in model.layers:
            x = stage.downsample(x)
            grids += [x.shape[1:3]] * len(stage.blocks)
    assert [kept is None for kept in tr.kept] == [i < STARTS[variant][0] for i in range(adapter.depth)]
    for i, kept in enumerate(tr.kept):
        if kept is None:
            continue
        blk, (H, W) = adapter.blocks[i], grids[i]
        wh, ww = blk.window_size
        num_windows, n = -(-H // wh) * -(-W // ww), wh * ww
        k = int(n * 0.7 ** sum(i >= s for s in STARTS[variant]))
        assert kept.shape == (img.shape[0], num_windows * k)
        if variant == "shifted":
            assert (kept >= 0).all() and tuple(grids[i]) == adapter.block_grid(i)
        real_per_window = (~ref_padding(blk, torch.ones(1, H, W, 1))).sum(1)
        for row in kept:
            real = row[row >= 0]  # -1: a padding slot filling a window's k places
            assert real.numel() == real.unique().numel() and real.max() < H * W
            assert real.numel() == real_per_window.clamp(max=k).sum()  # padding ranks last in every window


def test_only_idle_and_window_scores():
    model = make_swin("shifted")
    with pytest.raises(ValueError, match="'idle'"):
        tokenpace.apply(model, "evo")
    with pytest.raises(ValueError, match="score='cls' is not available"):
        tokenpace.apply(model, "idle", score="cls")
    with pytest.raises(ValueError, match="project_keys"):
        tokenpace.apply(model, "idle", project_keys=True)
    assert tokenpace.get_patch(model) is None


def test_unknown_blocks_and_swin_v2_are_rejected():
    from timm.models.swin_transformer_v2 import SwinTransformerV2

    model = make_swin("padded")
    model.layers[1].blocks[0].__class__ = type("MyBlock", (SwinTransformerBlock,), {})
    with pytest.raises(TypeError, match="block 2 of this SwinTransformer is MyBlock.*supports timm's SwinTransformer"):
        tokenpace.apply(model, "idle")
    v2 = SwinTransformerV2(img_size=32, patch_size=2, embed_dim=16, depths=(2,), num_heads=(2,), window_size=4)
    with pytest.raises(TypeError, match="not a supported model"):
        tokenpace.apply(v2, "idle")


@pytest.mark.parametrize("fused", [False, True])
def test_bf16_autocast_and_training(fused):
    model = tokenpace.apply(set_fused(make_swin("padded", drop_path_rate=0.2), fused), "idle", keep=0.5)
    img = swin_images("padded")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(img).isfinite().all()
    model.train()
    model(img).logsumexp(-1).mean().backward()
    idling = tokenpace.get_patch(model).adapter.blocks[3]
    for p in (idling.attn.qkv.weight, idling.attn.relative_position_bias_table, idling.mlp.fc1.weight):
        assert p.grad is not None and p.grad.isfinite().all() and p.grad.abs().sum() > 0


def test_torch_compile_full_graph():
    model = tokenpace.apply(make_swin("shifted"), "idle", keep=0.7, stage_starts=STARTS["shifted"])
    images = swin_images("shifted")
    with torch.no_grad():
        expected = model(images)
        compiled = torch.compile(model, fullgraph=True, backend="eager")
        assert torch.allclose(compiled(images), expected, atol=1e-5)
