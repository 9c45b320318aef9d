"""SwinAdapter, SwinV2Adapter and SwinV2CrAdapter: IdleViT per attention window on timm SwinTransformer,
SwinTransformerV2 (post-norm, cosine attention, continuous position bias) and SwinTransformerV2Cr (NCHW stages, an MLP
bias over log-spaced offsets, main-branch norms), against a literal masked reference."""
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models.swin_transformer import SwinTransformer, SwinTransformerBlock, window_partition, window_reverse
from timm.models.swin_transformer_v2 import SwinTransformerV2, SwinTransformerV2Block
from timm.models.swin_transformer_v2_cr import SwinTransformerV2Cr, SwinTransformerV2CrBlock
from torch.utils.flop_counter import FlopCounterMode

import tokenpace
from tokenpace.families import adapter_for
from conftest import assert_scores_match_per_window, ref_window_idle_attention, spread_weights

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
SWINS.update({f"v2_{name}": SWINS[name] for name in list(SWINS)})  # the same maps on SwinTransformerV2
# and on SwinTransformerV2Cr, the shifted one with a main-branch norm ending every stage (its *_ns_* models)
SWINS.update({"cr_shifted": ({**SWINS["shifted"][0], "extra_norm_stage": True}, 32), "cr_padded": SWINS["padded"],
              "cr_dynamic": SWINS["dynamic"]})
STARTS = {"shifted": (1, 3, 5), "padded": (1, 2, 3), "dynamic": (1, 3, 5)}  # shifted blocks idle in each model
STARTS.update({f"{kind}_{name}": STARTS[name] for kind in ("v2", "cr") for name in list(STARTS)})
CLASSES = {"": SwinTransformer, "v2": SwinTransformerV2, "cr": SwinTransformerV2Cr}


def swin_class(variant: str):
    return CLASSES[variant.split("_")[0] if "_" in variant else ""]


def make_swin(variant: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    options = {**dict(embed_dim=32, window_size=4, num_classes=10), **SWINS[variant][0], **overrides}
    if swin_class(variant) is SwinTransformer:
        return spread_weights(SwinTransformer(**options), seed).eval()
    model = spread_weights(swin_class(variant)(**options), seed).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # logit scales near timm's init (log 10), not spread as weights
        for blk in swin_blocks(model):
            scale = blk.attn.logit_scale
            scale.copy_(math.log(10) + 0.3 * torch.randn(scale.shape, generator=gen))
    return model


def swin_images(variant: str, batch: int = 2) -> torch.Tensor:
    size = SWINS[variant][1]
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


def swin_stages(model):
    return model.stages if isinstance(model, SwinTransformerV2Cr) else model.layers


def swin_blocks(model):
    return [blk for stage in swin_stages(model) for blk in stage.blocks]


def swin_embed(model, img):
    """The first stage's (B, H, W, C) map: SwinV2Cr's embedding gives NCHW, its stages convert."""
    x = model.patch_embed(img)
    return x.permute(0, 2, 3, 1) if isinstance(model, SwinTransformerV2Cr) else x


def set_fused(model, fused: bool):
    """timm's flag, read by tokenpace's attention at each forward (SwinV2Cr's attention has none: set here, it asks
    tokenpace for the explicit softmax too; timm's own Cr attention is always explicit)."""
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
    """Every window's full scaled logits (G, heads, n, n) with relative-position bias and shift mask, and v.
    SwinV2: no norm before the attention, cosine logits times the clamped logit scale, 16 sigmoid(cpb_mlp) bias;
    SwinV2Cr: the same, with its meta MLP's bias over every slot pair."""
    attn = blk.attn
    cr = isinstance(blk, SwinTransformerV2CrBlock)
    v2 = cr or isinstance(blk, SwinTransformerV2Block)
    normed = x if v2 else blk.norm1(x)
    shifted, win = ref_shift_pad(blk, normed), ref_windows(blk, normed)
    G, n, _ = win.shape
    if v2:
        bias = attn.qkv.bias if cr or attn.q_bias is None else torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
        qkv = F.linear(win, attn.qkv.weight, bias)
    else:
        qkv = attn.qkv(win)
    q, k, v = qkv.reshape(G, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    if cr:
        rel = attn.meta_mlp(attn.relative_coordinates_log).transpose(0, 1).reshape(attn.num_heads, n, n)
        scale = torch.clamp(attn.logit_scale, max=math.log(100)).exp().view(-1, 1, 1)
    elif v2:
        table = attn.cpb_mlp(attn.relative_coords_table).view(-1, attn.num_heads)
        rel = 16 * torch.sigmoid(table[attn.relative_position_index].permute(2, 0, 1))
        scale = torch.clamp(attn.logit_scale, max=math.log(100)).exp()
    if v2:
        logits = (F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)) * scale + rel
    else:
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
    o, sel = ref_window_idle_attention(logits, v, ref_padding(blk, x), ref_scores(blk, x, score), k)
    out = ref_unwindows(blk, blk.attn.proj(o), H, W)
    if isinstance(blk, (SwinTransformerV2Block, SwinTransformerV2CrBlock)):  # post-norm
        y = x + blk.norm1(out)
        y = y + blk.norm2(blk.mlp(y))
    else:
        y = x + out
        y = y + blk.mlp(blk.norm2(y))
    y = torch.where(ref_unwindows(blk, sel.unsqueeze(-1).float(), H, W) > 0.5, y, x)
    # SwinV2Cr's main-branch norm (stage end, final): on every token, idle ones too
    return blk.norm3(y) if isinstance(blk, SwinTransformerV2CrBlock) else y


def ref_idle(model, img, keep, score, starts):
    x, i = swin_embed(model, img), 0
    for stage in swin_stages(model):
        x = stage.downsample(x)
        for blk in stage.blocks:
            s = sum(i >= start for start in starts)
            n = blk.window_size[0] * blk.window_size[1]
            k = int(n * keep ** s)
            x = blk(x) if s == 0 or k == n else ref_idle_block(blk, x, k, score)
            i += 1
    if isinstance(model, SwinTransformerV2Cr):  # no final norm module: the last block's norm3
        return model.forward_head(x.permute(0, 3, 1, 2))
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
    assert type(model) is swin_class(variant)


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
                                                ("padded", 3, (5, 5)), ("dynamic", 3, (10, 10)),
                                                ("v2_shifted", 1, (16, 16)), ("v2_padded", 3, (5, 5)),
                                                ("cr_shifted", 1, (16, 16)), ("cr_padded", 3, (5, 5))])
def test_adapter_scores_rank_like_the_full_logits(variant, block, grid):
    """Shifted-window mask, relative-position bias and padding included: scores differ by one constant per window."""
    model = make_swin(variant)
    adapter = adapter_for(model)
    blk = adapter.blocks[block]
    x = torch.randn(2, *grid, blk.norm1.normalized_shape[0], generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = adapter.token_scores(block, adapter.prepare(block, x), "received").flatten(0, 1)
        ref = ref_scores(blk, x, "received")
    assert_scores_match_per_window(ours, ref, ~ref_padding(blk, x))


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
    if not variant.endswith("dynamic"):
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


def test_swinv2_tiny_gmacs():
    with torch.device("meta"):  # shapes only
        model = timm.create_model("swinv2_tiny_window8_256")
    dense = tokenpace.macs(model)
    assert abs(dense / 5.96e9 - 1) < 0.01  # timm's table: 5.96 G (its count adds a few small terms)
    # every slot's query and key projected for scoring (cosine attention), reused by the block: 0.70 of dense
    assert 0.69 < tokenpace.macs(tokenpace.apply(model, "idle", keep=0.7)) / dense < 0.71


@pytest.mark.parametrize("variant", list(SWINS))
def test_trace_positions(variant):
    model = tokenpace.apply(make_swin(variant), "idle", keep=0.7, stage_starts=STARTS[variant])
    adapter = tokenpace.get_patch(model).adapter
    img = swin_images(variant)
    with torch.no_grad(), tokenpace.trace(model) as tr:
        model(img)
        x = swin_embed(model, img)  # the real map of each stage (the dynamic model runs at another size)
        grids = []
        for stage in swin_stages(model):
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
        if variant.endswith("shifted"):
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


def test_unknown_blocks_are_rejected():
    model = make_swin("padded")
    model.layers[1].blocks[0].__class__ = type("MyBlock", (SwinTransformerBlock,), {})
    with pytest.raises(TypeError, match="block 2 of this SwinTransformer is MyBlock.*supports timm's "
                                        "SwinTransformerBlock with WindowAttention \\(Swin v1"):
        tokenpace.apply(model, "idle")
    v2 = make_swin("v2_padded")
    v2.layers[0].blocks[1].__class__ = type("MyBlock", (SwinTransformerV2Block,), {})
    with pytest.raises(TypeError, match="block 1 of this SwinTransformerV2 is MyBlock.*supports timm's "
                                        "SwinTransformerV2Block with WindowAttention \\(SwinV2"):
        tokenpace.apply(v2, "idle")
    cr = make_swin("cr_padded")
    cr.stages[1].blocks[1].__class__ = type("MyBlock", (SwinTransformerV2CrBlock,), {})
    with pytest.raises(TypeError, match="block 3 of this SwinTransformerV2Cr is MyBlock.*supports timm's "
                                        "SwinTransformerV2CrBlock with WindowMultiHeadAttention \\(SwinV2 Cr"):
        tokenpace.apply(cr, "idle")


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("variant", ["padded", "v2_padded", "cr_padded"])
def test_bf16_autocast_and_training(variant, fused):
    model = tokenpace.apply(set_fused(make_swin(variant, drop_path_rate=0.2), fused), "idle", keep=0.5)
    img = swin_images(variant)
    with torch.no_grad():
        fp32 = model(img)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = model(img)
    assert half.isfinite().all() and (half.float() - fp32).abs().max() < 0.1 * fp32.abs().max()
    model.train()
    model(img).logsumexp(-1).mean().backward()
    attn = tokenpace.get_patch(model).adapter.blocks[3].attn
    if variant.startswith("v2_"):
        bias = (attn.cpb_mlp[0].weight, attn.logit_scale)
    elif variant.startswith("cr_"):
        bias = (attn.meta_mlp.fc1.weight, attn.logit_scale)
    else:
        bias = (attn.relative_position_bias_table,)
    for p in (attn.qkv.weight, *bias, tokenpace.get_patch(model).adapter.blocks[3].mlp.fc1.weight):
        assert p.grad is not None and p.grad.isfinite().all() and p.grad.abs().sum() > 0


@pytest.mark.parametrize("variant", ["v2_padded", "cr_padded"])
def test_v2_gradients_equal_the_references(variant):
    """SwinV2 in training: the keys scoring projected are reused by the block with their gradient, so every
    parameter's gradient (q/k/v, the logit scale, the position-bias MLP) equals the literal reference's."""
    model = make_swin(variant, drop_path_rate=0.0).train()  # no stochastic depth: both runs are the same
    for blk in swin_blocks(model):  # SwinV2Cr's meta MLP has dropout: off, so both runs draw nothing
        for m in blk.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
    img = swin_images(variant)
    ref_idle(model, img, 0.5, "received", STARTS[variant]).logsumexp(-1).mean().backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    tokenpace.apply(model, "idle", keep=0.5, stage_starts=STARTS[variant]).train()
    model(img).logsumexp(-1).mean().backward()
    idling = tokenpace.get_patch(model).adapter.blocks[3]
    mlp = idling.attn.meta_mlp.fc1 if variant.startswith("cr") else idling.attn.cpb_mlp[0]
    assert idling.attn.logit_scale.grad.abs().sum() > 0 and mlp.weight.grad.abs().sum() > 0
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], atol=1e-4, rtol=1e-4, msg=name)


def test_torch_compile_full_graph():
    model = tokenpace.apply(make_swin("shifted"), "idle", keep=0.7, stage_starts=STARTS["shifted"])
    images = swin_images("shifted")
    with torch.no_grad():
        expected = model(images)
        compiled = torch.compile(model, fullgraph=True, backend="eager")
        assert torch.allclose(compiled(images), expected, atol=1e-5)


def test_swinv2_cr_sizes():
    """A strict SwinV2Cr runs its own size only; built with strict_img_size=False it runs any size (masks built per
    forward, the patch conv rounding the sides down), and the count follows what runs."""
    with pytest.raises(ValueError, match=r"built for 40x40 inputs only \(build it with strict_img_size=False"):
        tokenpace.macs(make_swin("cr_padded"), img_size=48)
    model = tokenpace.apply(set_fused(make_swin("cr_dynamic"), False), "idle")
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(torch.randn(1, 3, 33, 35))
    assert tokenpace.macs(model, img_size=(33, 35)) == counter.get_total_flops() // 2
