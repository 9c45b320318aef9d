"""timm NaFlexVit beyond the shared backbone checks (tests/test_backbones.py): other image sizes (its position
embeddings are resized to each grid), the size it refuses, packed NaFlex input refused loudly, unsupported blocks,
the img_size timm drops recorded, the recipe freeze names it does not have said."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import tokenpace
from backbones import make_backbone, ref_evo, ref_idle


def _images(height, width, batch=2):
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("variant", ["naflex_radio", "naflex_rope_mixed"])
def test_another_size_runs_the_model_at_that_grid(variant):
    """At 48x40 (a 12x10 grid: the learned table resized, aspect preserved; the RoPE table made for that grid)
    keep=1 equals the unpatched model and Idle equals the masked reference."""
    model = make_backbone(variant)
    images = _images(48, 40)
    with torch.no_grad():
        dense = model(images)
        assert torch.equal(tokenpace.apply(model, "idle", keep=1.0)(images), dense)
        got = tokenpace.apply(model, "idle", keep=0.5)(images)
        tokenpace.remove(model)
        expected = ref_idle(model, images, 0.5, (2, 3, 5), "cls")
    assert not torch.allclose(got, dense, atol=1e-3)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("size,options", [((48, 40), {}), ((30, 26), {"dynamic_img_pad": True})], ids=str)
def test_macs_at_another_size_equal_flop_counter(size, options):
    model = make_backbone("naflex_radio", **options).requires_grad_(False)
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False
    for method in (None, "evo", "idle"):
        if method is not None:
            tokenpace.apply(model, method)
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            model(_images(*size, batch=1))
        assert tokenpace.macs(model, img_size=size) == counter.get_total_flops() // 2, method


def test_sides_not_a_multiple_of_the_patch_are_refused_naming_the_option():
    model = tokenpace.apply(make_backbone("naflex_siglip"), "idle")
    assert tokenpace.macs(model, img_size=64) > tokenpace.macs(model)  # any multiple of the patch is counted
    with pytest.raises(ValueError, match=r"cannot run 30x32 inputs: its sides must be multiples of the patch size 4x4 "
                                         r"\(or build it with dynamic_img_pad=True\)"):
        tokenpace.macs(model, img_size=(30, 32))


def _packed(model, images):
    """What timm's NaFlex collator gives: flattened patches (channels last), their (y, x) coordinates, validity
    (the last 8 patches of the second image are padding)."""
    from timm.models.naflexvit import batch_patchify

    patches, (rows, cols) = batch_patchify(images, model.embeds.patch_size, pad=False)
    ys, xs = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    coord = torch.stack([ys.flatten(), xs.flatten()], -1).expand(images.shape[0], -1, -1)
    valid = torch.ones(images.shape[0], rows * cols, dtype=torch.bool)
    valid[1, -8:] = False
    return {"patches": patches, "patch_coord": coord, "patch_valid": valid}


def test_packed_naflex_input_is_refused_naming_what_runs():
    model = make_backbone("naflex_siglip")
    images = _images(32, 32)
    packed = _packed(model, images)
    with torch.no_grad():
        assert torch.isfinite(model(packed)).all()  # the unpatched model takes it
        tokenpace.apply(model, "idle", keep=0.5)
        calls = [lambda: model(packed),
                 lambda: model(packed["patches"], patch_coord=packed["patch_coord"], patch_valid=packed["patch_valid"]),
                 lambda: model.forward_features(packed["patches"], packed["patch_coord"], packed["patch_valid"]),
                 lambda: model.forward_intermediates(images, patch_valid=packed["patch_valid"])]
        for call in calls:
            with pytest.raises(ValueError, match=r"packed NaFlex input \(patches with patch_coord / patch_valid.*pass "
                                                 r"image batches \(B, C, H, W\)"):
                call()
        with pytest.raises(ValueError, match=r"NaFlexVit on image batches \(B, C, H, W\); got a \(2, 64, 48\) tensor"):
            model(packed["patches"])  # pre-patchified, without coordinates
        model.forward_features(images, patch_coord=None)  # a None argument asks for nothing
        with pytest.raises(ValueError, match="attention masks and causal attention are not supported"):
            model.forward_features(images, attn_mask=torch.zeros(1, 1, 64, 64))
        with pytest.raises(TypeError):  # what the model's own forward_features takes, as unpatched
            model.forward_features(images, colour=True)


@pytest.mark.parametrize("block", ["parallel", "branches", "diff"])
def test_parallel_and_differential_blocks_equal_the_references(block, images):
    """timm ViT's parallel and differential-attention blocks (families/vit_blocks.py) in a NaFlexVit."""
    from timm.models.vision_transformer import ParallelScalingBlock, ParallelThingsBlock

    options = {"parallel": dict(block_fn=ParallelScalingBlock), "branches": dict(block_fn=ParallelThingsBlock),
               "diff": dict(attn_layer="diff")}[block]
    model = make_backbone("naflex_siglip", **options)
    with torch.no_grad():
        dense = model(images)
        assert torch.equal(tokenpace.apply(model, "idle", keep=1.0)(images), dense)
        idle, evo = (ref_idle(model, images, 0.5, (2, 3, 5), "received"),
                     ref_evo(model, images, 0.5, (2, 4), "stage", "mean"))
        torch.testing.assert_close(tokenpace.apply(model, "idle", keep=0.5)(images), idle, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(tokenpace.apply(model, "evo", keep=0.5)(images), evo, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(idle, dense, atol=1e-3)


def test_unsupported_blocks_are_refused():
    from timm.models.vision_transformer import ParallelThingsBlock

    with pytest.raises(TypeError, match="block 0 of this NaFlexVit is ParallelThingsBlock with DiffAttention; "
                                        "tokenpace supports timm's pre-norm Block .*ParallelThingsBlock with the "
                                        "standard Attention and EvaBlock with EvaAttention or AttentionRope$"):
        tokenpace.apply(make_backbone("naflex_siglip", depth=2, block_fn=ParallelThingsBlock, attn_layer="diff"),
                        "idle")


def test_img_size_is_the_input_a_naflexvit_runs_at():
    """timm's NaFlexVit drops img_size when its config sets a position grid (the registered models do), and runs
    any size: tokenpace records the size asked for, where bench, MACs and the data transforms read it."""
    from tokenpace.data import data_config
    from tokenpace.families import adapter_for
    from tokenpace.models import create_model

    from tokenpace.models import ModelSourceError

    with torch.device("meta"):
        pretrained_size = create_model("naflexvit_base_patch16_siglip")
        model = create_model("naflexvit_base_patch16_siglip", img_size=224)
        oblong = create_model("naflexvit_base_patch16_siglip", img_size=[224, 192])
        features = create_model("naflexvit_base_patch16_siglip", img_size=224, features_only=True)
        with pytest.raises(ModelSourceError, match=r"'naflexvit_base_patch16_siglip' cannot run 200x200 inputs "
                                                   r"\(img_size=200\): its sides must be multiples of the patch size "
                                                   "16x16"):
            create_model("naflexvit_base_patch16_siglip", img_size=200)  # not silently run at 384
    assert adapter_for(pretrained_size).input_size() == (3, 384, 384)
    assert adapter_for(model).input_size() == (3, 224, 224) and data_config(model)["input_size"] == (3, 224, 224)
    assert adapter_for(oblong).input_size() == (3, 224, 192)
    assert adapter_for(features.model).input_size() == (3, 224, 224)  # recorded on the model a feature net wraps
    assert tokenpace.macs(model) == tokenpace.macs(pretrained_size, img_size=224)


def test_a_naflexvit_that_keeps_no_size_is_refused_naming_the_fix():
    from timm.models.naflexvit import NaFlexVit

    model = NaFlexVit(patch_size=4, embed_dim=48, depth=1, num_heads=3, pos_embed="none", pos_embed_grid_size=None,
                      rope_type="axial", class_token=True, global_pool="token")
    with pytest.raises(TypeError, match=r"keeps no input size.*build it with img_size=N"):
        tokenpace.apply(model, "idle")


def test_a_recipe_freeze_this_model_names_otherwise_is_said():
    """IdleViT's recipe freezes cls_token and pos_embed; NaFlexVit keeps them under embeds. and a class-token-free
    ViT has no cls_token: the run says which names froze nothing, and what is named like them."""
    from conftest import make_vit
    from tokenpace.train.loop import unmatched_freeze

    freeze = ("cls_token", "pos_embed")
    said = unmatched_freeze(make_backbone("naflex_radio", depth=1), freeze)
    assert said == ("the recipe freezes cls_token, pos_embed, which this model has no parameter named (nothing frozen "
                    "for them); named like them: embeds.cls_token, embeds.pos_embed, left trainable")
    assert unmatched_freeze(make_backbone("siglip_map", depth=1), freeze).startswith(
        "the recipe freezes cls_token, which this model has no parameter named (nothing frozen for it)")
    assert unmatched_freeze(make_vit("deit", depth=1), freeze) is None
