"""timm ViT's differential-attention and parallel blocks (families/vit_blocks.py): the anatomy runs each block as
timm does on both attention paths, EViT equals a literal reference (on a parallel block the MLP runs on every token
of a shrink layer), and training gradients equal the masked reference's. keep=1, Evo, Idle, top-k and MACs run in
test_backbones.py over VIT_BLOCKS."""
import math

import pytest
import torch

import tokenpace
from backbones import (VIT_BLOCKS, _row, embed, finish, has_class_token, literal_qk, make_backbone, ref_evo,
                       ref_idle, scale_of)
from tokenpace.blockops import run_block
from tokenpace.families import adapter_for

VARIANTS = sorted(VIT_BLOCKS)


@pytest.fixture
def images():
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _set_fused(model, fused):
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = fused


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "explicit"])
def test_the_anatomy_runs_each_block_as_timm(variant, fused, images):
    model = make_backbone(variant)
    _set_fused(model, fused)
    family = adapter_for(model)
    with torch.no_grad():
        x, _ = embed(model, images)
        for i, blk in enumerate(model.blocks):
            got, _, _ = run_block(family.parts(i), x, None)
            x = blk(x)
            torch.testing.assert_close(got, x, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", ["diff_token_qknorm", "parallel_xp", "parallel_fused_gap", "diff_parallel_reg_gap"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "explicit"])
def test_training_draws_dropout_and_drop_path_as_timm(variant, fused, images):
    """In training the anatomy draws attention dropout, projection or MLP dropout and drop path in timm's order, so
    one seed gives timm's block output exactly (parallel branches draw one attention dropout for all their heads,
    timm one per branch: not compared)."""
    model = make_backbone(variant, attn_drop_rate=0.2, proj_drop_rate=0.2, drop_path_rate=0.3).train()
    _set_fused(model, fused)
    parts = adapter_for(model).parts(3)
    x, _ = embed(model, images)
    torch.manual_seed(0)
    expected = model.blocks[3](x)
    torch.manual_seed(0)
    got, _, _ = run_block(parts, x, None)
    assert parts.dropout() == 0.2
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.manual_seed(1)
    assert not torch.allclose(run_block(parts, x, None)[0], expected, atol=1e-3)  # the draws matter


def _attention_half(blk, x):
    """x after the attention residual of a sequential block (a Block with DiffAttention, parallel branches)."""
    if hasattr(blk, "attns"):
        return x + torch.stack([branch(x) for branch in blk.attns]).sum(dim=0)
    return x + blk.drop_path1(blk.ls1(blk.attn(blk.norm1(x))))


def _mlp_half(blk, x):
    if hasattr(blk, "ffns"):
        return x + torch.stack([ffn(x) for ffn in blk.ffns]).sum(dim=0)
    return x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))


def _take(x, idx):
    return x.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def ref_evit(model, img, keep, layers, fuse):
    """EViT on these blocks: at a shrink layer the attention runs on every token and the top ceil(keep * n) by the
    head-mean row of every softmax map stay, in raster order, the rest fused by their raw weights; the MLP runs on
    what stays, except in a parallel block, whose MLP ran beside the attention on every token."""
    x, _ = embed(model, img)
    P = model.num_prefix_tokens
    row = "cls" if has_class_token(model) else "mean"
    for i, blk in enumerate(model.blocks):
        if i not in layers:
            x = blk(x)
            continue
        q, k = literal_qk(model, i, x, None)
        a = _row(q, k, scale_of(model, i), torch.ones(x.shape[:2]), row)[:, P:]
        parallel = not hasattr(blk, "attn") and not hasattr(blk, "attns")
        y = blk(x) if parallel else _attention_half(blk, x)
        n = x.shape[1] - P
        kept = math.ceil(keep * n)
        order = a.argsort(dim=1, descending=True)
        parts = [y[:, :P], _take(y[:, P:], order[:, :kept].sort(dim=1).values)]
        if fuse:
            rest = order[:, kept:]
            parts.append((a.gather(1, rest).unsqueeze(-1) * _take(y[:, P:], rest)).sum(1, keepdim=True))
        x = torch.cat(parts, dim=1)
        if not parallel:
            x = _mlp_half(blk, x)
    return finish(model, x)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("fuse", [True, False], ids=["fuse", "drop"])
def test_evit_equals_the_literal_reference(variant, fuse, images):
    model = make_backbone(variant)
    with torch.no_grad():
        expected = ref_evit(model, images, 0.5, (2, 4), fuse)
        got = tokenpace.apply(model, "evit", keep=0.5, layers=(2, 4), fuse=fuse)(images)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("variant,idling", [("diff_token_qknorm", "blocks.3.attn.lambda_q1"),
                                            ("diff_parallel_reg_gap", "blocks.3.lambda_k2"),
                                            ("parallel_xp", "blocks.3.mlp_bias"),
                                            ("parallel_fused_gap", "blocks.3.in_proj.bias"),
                                            ("parallel_things", "blocks.3.attns.1.ls.gamma")])
def test_idle_training_gradients_equal_the_masked_reference(variant, idling, images):
    """Every parameter's gradient (lambda, the sub-norm, the MLP bias beside the fused input projection, each
    branch's LayerScale) equals the literal masked reference's."""
    model = make_backbone(variant).train()  # no dropout, no stochastic depth: both runs draw nothing
    score = "cls" if has_class_token(model) else "received"
    ref_idle(model, images, 0.5, (2, 3, 5), score).logsumexp(-1).mean().backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    tokenpace.apply(model, "idle", keep=0.5).train()
    model(images).logsumexp(-1).mean().backward()
    named = dict(model.named_parameters())
    assert named[idling].grad.abs().sum() > 0  # an idling block's own parameter learns
    for name, p in named.items():
        torch.testing.assert_close(p.grad, expected[name], atol=1e-4, rtol=1e-4, msg=name)



@pytest.mark.parametrize("fused", [True, False], ids=["fused", "explicit"])
def test_differential_attention_with_its_other_options(fused, images):
    """DiffAttention with the inner norm before the projection (scale_attn_norm) and the two-scalar lambda
    (dual_lambda, which no timm model sets: swapped in, the rest of each block's weights kept): Idle and Evo equal
    the literal references."""
    from timm.layers import DiffAttention

    model = make_backbone("diff_token_qknorm", scale_attn_norm=True)
    for i, blk in enumerate(model.blocks):
        old = blk.attn
        blk.attn = DiffAttention(48, num_heads=3, qkv_bias=True, qk_norm=True, scale_norm=True, depth=i,
                                 dual_lambda=True, norm_layer=torch.nn.LayerNorm)
        missing, unexpected = blk.attn.load_state_dict(
            {k: v for k, v in old.state_dict().items() if "lambda" not in k}, strict=False)
        assert missing == ["lambda_a", "lambda_b"] and unexpected == []
        with torch.no_grad():
            blk.attn.lambda_a.fill_(0.1 * i)
            blk.attn.lambda_b.fill_(-0.2)
    _set_fused(model, fused)
    with torch.no_grad():
        dense = model(images)
        assert torch.equal(tokenpace.apply(model, "idle", keep=1.0)(images), dense)
        idle = ref_idle(model, images, 0.5, (2, 3, 5), "cls")
        evo = ref_evo(model, images, 0.5, (2, 4), "stage", "cls")
        torch.testing.assert_close(tokenpace.apply(model, "idle", keep=0.5)(images), idle, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(tokenpace.apply(model, "evo", keep=0.5)(images), evo, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(idle, dense, atol=1e-3)


def test_parallel_modules_replaced_after_apply_are_refused(images):
    import copy

    model = tokenpace.apply(make_backbone("parallel_things", depth=2), "idle", keep=1.0)
    model.blocks[1].attns[1] = copy.deepcopy(model.blocks[1].attns[1])
    with pytest.raises(TypeError, match="block 1's attns.1 \\(Sequential\\) was replaced after tokenpace.apply"):
        model(images)
    model = tokenpace.apply(make_backbone("parallel_xp", depth=2), "idle", keep=1.0)
    model.blocks[0].k_norm = copy.deepcopy(model.blocks[0].k_norm)
    with pytest.raises(TypeError, match="block 0's k_norm \\(RmsNorm\\) was replaced after tokenpace.apply"):
        model(images)
