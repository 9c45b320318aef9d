"""Today's backbones: timm VisionTransformers without a class token (SigLIP, AIMv2, *_gap_*), timm Eva (EVA-02,
DINOv3, PE core, RoPE ViTs), timm Beit (BEiT, BEiT v2), timm VisionTransformerRelPos (relative-position biases),
timm NaFlexVit (SigLIP2 NaFlex, C-RADIO, on image batches), post-norm blocks, and timm ViT's differential-attention
and parallel blocks. keep=1 is the unpatched model; Evo,
Idle and top-k equal literal masked references (full sequences at their own positions, idle keys masked); MACs equal
FlopCounterMode / 2."""
import pytest
import torch

import tokenpace
from backbones import (BEITS, CLASS_FREE, EVAS, NAFLEX, POST_NORM, RELPOS, VIT_BLOCKS,
                       assert_evo_equals_reference, assert_idle_equals_reference, assert_keep_one_equals_unpatched,
                       assert_macs_equal_flop_counter, assert_position_less_tokens_run, has_class_token,
                       make_backbone, ref_topk)

VARIANTS = (sorted(CLASS_FREE) + sorted(EVAS) + sorted(BEITS) + sorted(RELPOS) + sorted(NAFLEX) + sorted(POST_NORM)
            + sorted(VIT_BLOCKS))
ALL_TOKENS = [("evo", {}), ("evo", {"mode": "layer"}), ("idle", {}), ("evit", {}), ("evit", {"fuse": False}),
              ("topk", {})]


@pytest.fixture
def images():
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def default_row(model):
    return "cls" if has_class_token(model) else "mean"


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("method,options", ALL_TOKENS, ids=str)
def test_keep_one_equals_the_unpatched_model(variant, method, options, images):
    assert_keep_one_equals_unpatched(make_backbone(variant), method, options, images)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("keep", [0.7, 0.4])
def test_idle_equals_the_masked_reference(variant, keep, images):
    model = make_backbone(variant)
    assert_idle_equals_reference(model, model, images, keep, "cls" if has_class_token(model) else "received")


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("mode", ["stage", "layer"])
def test_evo_equals_the_masked_reference(variant, mode, images):
    model = make_backbone(variant)
    assert_evo_equals_reference(model, model, images, mode, default_row(model))


@pytest.mark.parametrize("variant", VARIANTS)
def test_topk_equals_the_masked_reference(variant, images):
    model = make_backbone(variant)
    with torch.no_grad():
        expected = ref_topk(model, images, 0.5, 2, default_row(model))
        got = tokenpace.apply(model, "topk", keep=0.5)(images)
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4), (got - expected).abs().max()


@pytest.mark.parametrize("variant", ["eva02", "rope_mixed", "siglip_map", "beit", "beit_both_swiglu", "relpos_gap",
                                     "relpos_rpn_swin_mlp", "naflex_rope_mixed", "naflex_dinov3_swiglu"])
def test_position_less_tokens_run_on_position_models(variant, images):
    """EViT's fused token and Evo's representative token have no position: not rotated, like prefix tokens (Eva);
    the class token's bias entries (Beit)."""
    assert_position_less_tokens_run(make_backbone(variant), images)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("method,options", [(None, {}), ("evo", {}), ("evo", {"representative": True}),
                                            ("idle", {}), ("idle", {"project_keys": True}), ("evit", {}),
                                            ("topk", {})], ids=str)
def test_macs_equal_flop_counter_on_the_non_fused_path(variant, method, options):
    assert_macs_equal_flop_counter(make_backbone(variant), method, options, torch.randn(1, 3, 32, 32))


@pytest.mark.parametrize("variant", ["gap", "dinov3"])
def test_scores_each_family_offers(variant):
    model = make_backbone(variant)
    if variant == "gap":
        with pytest.raises(ValueError, match="idle score='cls' is not available.*accepted here: 'received', 'norm', "
                                             "'random'"):
            tokenpace.apply(model, "idle", score="cls")
    for score in ("received", "random") + (("cls",) if variant == "dinov3" else ()):
        for method in ("evo", "idle", "evit", "topk"):
            tokenpace.apply(model, method, score=score)


def test_random_control_on_a_class_free_model(images):
    model = make_backbone("siglip_map")
    with torch.no_grad():
        ranked = tokenpace.apply(model, "idle", keep=0.5)(images)
        torch.manual_seed(0)
        shuffled = tokenpace.apply(model, "idle", keep=0.5, score="random")(images)
    assert torch.isfinite(shuffled).all() and not torch.allclose(ranked, shuffled, atol=1e-4)


@pytest.mark.parametrize("variant", ["rope_mixed", "beit_both_swiglu", "relpos_rpn_swin_mlp", "naflex_rope_mixed"])
def test_idle_cut_loss_records_positions_on_position_models(variant, images):
    """The token cut loss projects the idle tokens' q and k at their own positions: reusing the block's q and k for
    the selected tokens equals projecting every token."""
    from tokenpace.losses import model_cut_loss, token_cut_loss

    model = tokenpace.apply(make_backbone(variant), "idle", keep=0.5).train()
    model(images)
    reused = model_cut_loss(model)
    patch = tokenpace.get_patch(model)
    records = patch.last_state.records
    fresh = [type(r)(layer=r.layer, index=r.index, normed=r.normed, where=r.where) for r in records]
    projected = token_cut_loss(fresh, [patch.adapter.parts(r.layer) for r in records], 1)
    assert reused.item() > 0 and torch.allclose(reused, projected, rtol=1e-5)


def test_beit_bias_of_a_subset_is_the_full_bias_at_its_tokens():
    """A subset's relative-position bias is the model's bias (own + shared) at the tokens' rows and columns; a token
    without a position (an extra token, or a hole at -1) takes the class token's entries."""
    from tokenpace.anatomy import TokenSet
    from tokenpace.families import adapter_for

    model = make_backbone("beit_both_swiglu")
    parts = adapter_for(model).parts(2)
    with torch.no_grad():
        full = model.blocks[2].attn._get_rel_pos_bias()[0] + model.rel_pos_bias()  # (H, 65, 65): class token first
        pos = torch.tensor([[5, -1, 63], [0, 17, 2]])
        got = parts.bias(TokenSet(prefix=1, pos=pos, extra=1, holes=True))
        assert torch.equal(parts.bias(TokenSet(prefix=1)), full[None])
    assert got.shape == (2, 3, 5, 5)
    for b, rows in enumerate(([0, 6, 0, 64, 0], [0, 1, 18, 3, 0])):
        rows = torch.tensor(rows)
        assert torch.equal(got[b], full[:, rows][:, :, rows])


def test_beit_other_sizes_are_refused_naming_the_fix():
    model = make_backbone("beit")
    with pytest.raises(ValueError, match=r"built for 32x32 inputs only.*set_input_size"):
        tokenpace.macs(tokenpace.apply(model, "evo"), img_size=64)


def test_beit_cut_loss_logits_carry_the_bias(images):
    """On BEiT the token cut loss's head-mean logits are those of the block's attention: the bias included."""
    from backbones import embed, literal_bias, literal_qk
    from tokenpace.anatomy import TokenSet
    from tokenpace.families import adapter_for
    from tokenpace.losses import _unselected, mean_head_logits

    model = make_backbone("beit_both_swiglu")
    parts = adapter_for(model).parts(1)
    with torch.no_grad():
        x, context = embed(model, images)
        q, k = literal_qk(model, 1, x, context)
        expected = (q @ k.transpose(-2, -1) * parts.scale + literal_bias(model, 1, context)).mean(1)
        got = mean_head_logits(parts, model.blocks[1].norm1(x), TokenSet(prefix=1))
        order = torch.randperm(64, generator=torch.Generator().manual_seed(0))[:20].repeat(3, 1) + 1
        index = torch.cat([torch.zeros(3, 1, dtype=torch.long), order.sort(1).values], 1)
        picked = mean_head_logits(parts, model.blocks[1].norm1(x), TokenSet(prefix=1), index)
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)
    reorder = torch.cat([index, _unselected(index, 65)], 1)  # selected first, then the others
    for b in range(3):
        assert torch.allclose(picked[b], expected[b][reorder[b]][:, reorder[b]], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", sorted(RELPOS))
def test_relpos_literal_block_is_timms(variant, images):
    """The references' written-out RelPos block (it takes a mask, timm's does not) equals timm's block unmasked."""
    from backbones import embed, relpos_block

    model = make_backbone(variant)
    with torch.no_grad():
        x, context = embed(model, images)
        for i in range(2):
            expected = model.blocks[i](x, shared_rel_pos=context)
            torch.testing.assert_close(relpos_block(model, i, x, context), expected, atol=1e-5, rtol=1e-5)
            x = expected


def test_relpos_position_less_tokens_take_zero_bias_without_a_class_token():
    """A class-token-free RelPos model has no learned entry for a token without a position: zero bias."""
    from tokenpace.anatomy import TokenSet
    from tokenpace.families import adapter_for

    model = make_backbone("relpos_gap")
    parts = adapter_for(model).parts(1)
    with torch.no_grad():
        full = model.blocks[1].attn.rel_pos.get_bias()[0]  # (H, 64, 64)
        got = parts.bias(TokenSet(prefix=0, pos=torch.tensor([[3, -1, 9]]), extra=1, holes=True))
    rows = torch.tensor([3, 9])
    assert torch.equal(got[0][:, [0, 2]][:, :, [0, 2]], full[:, rows][:, :, rows])
    assert not got[0][:, [1, 3]].any() and not got[0][:, :, [1, 3]].any()


@pytest.mark.parametrize("variant", ["beit_both_swiglu", "relpos_gap", "relpos_cls_shared_table"])
def test_mean_bias_is_the_head_mean_of_the_bias(variant):
    """The cut loss's head-mean bias, averaged before the gather, equals the gathered bias averaged over heads."""
    from tokenpace.anatomy import TokenSet
    from tokenpace.families import adapter_for

    model = make_backbone(variant)
    family = adapter_for(model)
    parts, prefix = family.parts(1), family.num_prefix
    with torch.no_grad():
        frame = family.embed(torch.zeros(1, 3, 32, 32))[1]
        for where in (TokenSet(prefix, frame=frame),
                      TokenSet(prefix, pos=torch.tensor([[5, -1, 63], [0, 17, 2]]), extra=1, frame=frame,
                               holes=True)):
            expected = parts.bias(where).mean(dim=1)
            torch.testing.assert_close(parts.mean_bias(where).expand_as(expected), expected)
