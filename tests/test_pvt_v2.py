"""IdleViT on timm PyramidVisionTransformerV2: exactness at keep=1, a literal masked reference, MACs, trace, errors."""
import pytest
import timm
import torch
from timm.models.pvt_v2 import PyramidVisionTransformerV2
from torch.utils.flop_counter import FlopCounterMode

import tokenpace
from tokenpace.core.schedule import scaled_layers
from conftest import spread_weights

TINY = dict(depths=(1, 2, 1, 1), embed_dims=(16, 32, 48, 64), num_heads=(1, 2, 3, 4), sr_ratios=(8, 4, 2, 1),
            mlp_ratios=(4, 4, 4, 4), num_classes=10)
VARIANTS = {"sr": dict(), "linear": dict(linear=True), "deeper": dict(depths=(2, 2, 2, 2))}


def make_pvt(variant: str = "sr", seed: int = 0, **overrides) -> PyramidVisionTransformerV2:
    torch.manual_seed(seed)
    return spread_weights(PyramidVisionTransformerV2(**{**TINY, **VARIANTS[variant], **overrides}), seed).eval()


@pytest.fixture
def images():
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


# ----------------------------------------------------------------------------------------------------------------
# Literal reference: dense block math, queries restricted by a mask, keys/values from the whole map
# ----------------------------------------------------------------------------------------------------------------

def ref_block(blk, x, grid, mask=None):
    """timm's pvt_v2 Block on x (B, N, C), written out; with ``mask`` (B, N) the MLP's hidden grid is zero at
    unmasked positions (only the masked rows of the result are meant to be used)."""
    attn, mlp = blk.attn, blk.mlp
    B, N, C = x.shape
    H, W = grid
    xn = blk.norm1(x)
    q = attn.q(xn).reshape(B, N, attn.num_heads, -1).transpose(1, 2)
    src = xn
    if attn.pool is not None:
        src = attn.act(attn.norm(attn.sr(attn.pool(xn.transpose(1, 2).reshape(B, C, H, W))).flatten(2).transpose(1, 2)))
    elif attn.sr is not None:
        src = attn.norm(attn.sr(xn.transpose(1, 2).reshape(B, C, H, W)).flatten(2).transpose(1, 2))
    k, v = attn.kv(src).reshape(B, -1, 2, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    probs = ((q @ k.transpose(-2, -1)) * attn.scale).softmax(-1)
    y = x + attn.proj((probs @ v).transpose(1, 2).reshape(B, N, C))
    hidden = mlp.relu(mlp.fc1(blk.norm2(y)))
    if mask is not None:
        hidden = hidden * mask.unsqueeze(-1)
    hidden = mlp.dwconv(hidden.transpose(1, 2).reshape(B, -1, H, W)).flatten(2).transpose(1, 2)
    return y + mlp.fc2(mlp.act(hidden))


def ref_idle(model, img, keep, stage_starts):
    """IdleViT on PVTv2 with norm scores: per block k = int(H*W*keep**s) tokens of largest input norm are updated,
    the rest are copied through."""
    x = model.patch_embed(img)
    i = 0
    for stage in model.stages:
        if stage.downsample is not None:
            x = stage.downsample(x)
        B, H, W, C = x.shape
        x = x.reshape(B, H * W, C)
        for blk in stage.blocks:
            s = sum(1 for start in stage_starts if i >= start)
            k = int(H * W * keep ** s)
            if s == 0 or k == H * W:
                x = ref_block(blk, x, (H, W))
            else:
                top = x.norm(dim=-1).argsort(dim=1, descending=True)[:, :k]
                mask = torch.zeros(B, H * W).scatter(1, top, 1.0)
                x = torch.where(mask.bool().unsqueeze(-1), ref_block(blk, x, (H, W), mask), x)
            i += 1
        x = stage.norm(x).reshape(B, H, W, C).permute(0, 3, 1, 2)
    return model.forward_head(x)


# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", list(VARIANTS))
def test_keep_one_is_the_unpatched_model_and_remove_restores_it(variant, images):
    model = make_pvt(variant)
    keys = list(model.state_dict())
    with torch.no_grad():
        dense = model(images)
        assert torch.allclose(ref_idle(model, images, 1.0, (1,)), dense, atol=1e-5)  # the reference itself
        assert torch.equal(tokenpace.apply(model, "idle", keep=1.0)(images), dense)
        assert list(model.state_dict()) == keys
        tokenpace.apply(model, "idle", keep=0.7)
        assert not torch.allclose(model(images), dense, atol=1e-3)
        assert torch.equal(tokenpace.remove(model)(images), dense)
    assert type(model) is PyramidVisionTransformerV2


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("keep", [0.7, 0.65])  # 0.65**3 keeps 1 of the last stage's 4 tokens
def test_idle_equals_the_masked_reference(variant, keep, images):
    model = make_pvt(variant)
    starts = scaled_layers(sum(model.depths), (3, 6, 9))
    with torch.no_grad():
        expected = ref_idle(model, images, keep, starts)
        got = tokenpace.apply(model, "idle", keep=keep, stage_starts=starts)(images)
    assert torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(got, tokenpace.remove(model)(images), atol=1e-3)


@pytest.mark.parametrize("variant", ["sr", "linear"])
def test_idle_tokens_pass_through_bit_identical(variant):
    model = tokenpace.apply(make_pvt(variant), "idle", keep=0.7)
    ad = tokenpace.get_patch(model).adapter
    x = torch.randn(2, 8, 8, 32)  # stage 1 of the tiny model at 64 px
    with torch.no_grad():
        prep = ad.prepare(1, x.clone())
        idx = ad.token_scores(1, prep, "norm").topk(20, dim=-1).indices
        out, _ = ad.run_selected(1, x.clone(), prep, idx)
    idle = torch.ones(2, 64, dtype=torch.bool).scatter(1, idx[:, 0], False)
    assert torch.equal(out.reshape(2, 64, 32)[idle], x.reshape(2, 64, 32)[idle])
    assert not torch.equal(out.reshape(2, 64, 32)[~idle], x.reshape(2, 64, 32)[~idle])


def _flop_counter_macs(model, img):
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(img)
    return counter.get_total_flops() // 2  # FlopCounterMode counts 2 FLOPs per MAC


@pytest.mark.parametrize("variant", ["sr", "linear"])
@pytest.mark.parametrize("options", [None, {"keep": 0.7}, {"keep": 0.65, "score": "random"}], ids=str)
def test_macs_equal_flop_counter_on_the_non_fused_path(variant, options):
    model = make_pvt(variant)
    for stage in model.stages:
        for blk in stage.blocks:
            blk.attn.fused_attn = False  # CPU SDPA has no FLOP formula in some torch versions: count explicit matmuls
    if options is not None:
        tokenpace.apply(model, "idle", **options)
    for size in (64, (64, 96)):
        assert tokenpace.macs(model, img_size=size) == _flop_counter_macs(model, torch.randn(1, 3, *(
            (size, size) if isinstance(size, int) else size)))


def test_pvt_v2_b2_gmacs_match_the_paper():
    """PVTv2 paper (arXiv 2106.13797, Table 1): B2 4.0 GFLOPs (their 'FLOPs' are multiply-adds); we count 4.03."""
    with torch.device("meta"):
        model = timm.create_model("pvt_v2_b2")
    dense = tokenpace.macs(model) / 1e9
    assert abs(dense - 4.0) / 4.0 < 0.02
    assert round(tokenpace.macs(tokenpace.apply(model, "idle", keep=0.7, stage_starts=(4, 8, 12))) / 1e9, 2) == 2.92
    tokenpace.apply(model, "idle")  # the default measured to pay on the CPU (tokenpace.defaults)
    assert tokenpace.get_patch(model).config.keep == 0.4 and tokenpace.get_patch(model).config.stage_starts == (2, 7, 13)
    assert round(tokenpace.macs(model) / 1e9, 2) == 1.88
    assert tokenpace.get_patch(model).adapter.input_size() == (3, 224, 224)


def test_sizes_and_grids():
    model = tokenpace.apply(make_pvt("deeper"), "idle", keep=0.7)  # the default 0.4**3 keeps none of 2x3 tokens
    ad = tokenpace.get_patch(model).adapter
    assert ad.input_size() == (3, 224, 224)  # built without timm.create_model: no pretrained config
    grids = [(56, 56), (28, 28), (14, 14), (7, 7)]
    assert [ad.block_grid(i) for i in range(ad.depth)] == [g for g in grids for _ in range(2)]
    model.pretrained_cfg = {"input_size": (3, 64, 96)}
    assert ad.input_size() == (3, 64, 96) and ad.block_grid(0) == (16, 24) and ad.block_grid(7) == (2, 3)
    assert tokenpace.macs(model) == tokenpace.macs(model, img_size=(64, 96))
    assert [list(r) for r in ad.stage_blocks] == [[0, 1], [2, 3], [4, 5], [6, 7]]


@pytest.mark.parametrize("score", ["norm", "random"])
def test_trace_positions_are_unique_inside_the_grid(score, images):
    model = make_pvt("deeper")
    tokenpace.apply(model, "idle", keep=0.7, score=score, stage_starts=scaled_layers(sum(model.depths), (3, 6, 9)))
    model.pretrained_cfg = {"input_size": (3, 64, 64)}
    ad = tokenpace.get_patch(model).adapter
    starts = scaled_layers(ad.depth, (3, 6, 9))
    with torch.no_grad(), tokenpace.trace(model) as tr:
        model(images)
    for i, kept in enumerate(tr.kept):
        rows, cols = ad.block_grid(i)
        n = rows * cols
        s = sum(1 for start in starts if i >= start)
        k = int(n * 0.7 ** s)
        if s == 0 or k == n:
            assert kept is None
            continue
        assert kept.shape == (2, k)
        assert kept.min() >= 0 and kept.max() < n
        assert all(len(set(row.tolist())) == k for row in kept)


def test_errors():
    model = make_pvt()
    with pytest.raises(ValueError, match="method 'evo' is not available.*accepted here: 'idle'"):
        tokenpace.apply(model, "evo")
    with pytest.raises(ValueError, match="score='received' is not available.*accepted here: 'norm', 'random'"):
        tokenpace.apply(model, "idle", score="received")
    with pytest.raises(ValueError, match="project_keys=False"):
        tokenpace.apply(model, "idle", project_keys=True)
    assert tokenpace.get_patch(model) is None

    class MyBlock(type(model.stages[0].blocks[0])):
        pass

    model.stages[1].blocks[0].__class__ = MyBlock
    with pytest.raises(TypeError, match="block 1 of this PyramidVisionTransformerV2 is MyBlock.*pvt_v2_b0..b5, b2_li"):
        tokenpace.apply(model, "idle")


@pytest.mark.parametrize("variant", ["sr", "linear"])
def test_bf16_autocast_and_training(variant, images):
    model = tokenpace.apply(make_pvt(variant, drop_path_rate=0.1), "idle", keep=0.7)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.isfinite(model(images)).all()
    model.train()
    model(images).logsumexp(-1).mean().backward()
    last = model.stages[3].blocks[0]  # idling (keep 0.7**3: 1 of 4 tokens)
    for p in (last.attn.q.weight, last.attn.kv.weight, last.mlp.fc1.weight, last.mlp.dwconv.weight):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


def test_torch_compile_full_graph(images):
    model = tokenpace.apply(make_pvt("sr"), "idle", keep=0.7)
    with torch.no_grad():
        expected = model(images)
        compiled = torch.compile(model, fullgraph=True, backend="eager")
        assert torch.allclose(compiled(images), expected, atol=1e-5)


def test_img_size_sets_the_input_of_a_model_built_for_any_size(tmp_path):
    """PVTv2 takes no img_size argument: --img-size is the input it is used at, recorded in its pretrained_cfg,
    where bench, MACs and the data transforms read it."""
    import json

    from tokenpace.cli import main
    from tokenpace.data import data_config
    from tokenpace.families import adapter_for
    from tokenpace.models import create_model

    model = create_model("pvt_v2_b0", img_size=64)
    assert adapter_for(model).input_size() == (3, 64, 64) and data_config(model)["input_size"] == (3, 64, 64)
    out = tmp_path / "bench.json"
    assert main(["bench", "--model", "pvt_v2_b0", "--img-size", "64", "--methods", "dense", "--batch-size", "1",
                 "--runs", "1", "--warmup", "0", "--quiet", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["input_size"] == [3, 64, 64] and doc["model_args"] == {"img_size": 64}
    assert main(["bench", "--model", "pvt_v2_b0", "--model-args", "no_such_arg=1", "--runs", "1"]) == 2
