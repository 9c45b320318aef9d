"""The VLM vision towers: timm's Qwen3 ViT (Qwen3-VL, Qwen3.5: EvaBlock with RoPE, a learned position grid resampled
to the input, the 2x2 merger) and DeepSeek ViT (its own block: RmsNorm, AttentionRope, SwiGLU; a final norm, the
3x3 aligner), as encoders and as classifiers. keep=1 is the unpatched model; Idle and Evo equal the literal masked
references of backbones.py run through timm's own blocks, position tables and projectors; MACs equal
FlopCounterMode / 2; methods that drop tokens are refused."""
import pytest
import timm
import torch
from timm.models.deepseek_vit import DeepseekVitClassifier, DeepseekVitEncoder
from timm.models.eva import EvaBlock
from timm.models.qwen3_vit import Qwen3VitClassifier, Qwen3VitEncoder

import tokenpace
from backbones import (assert_bf16_autocast_as_close_as_dense, assert_evo_equals_reference,
                       assert_idle_equals_reference, assert_keep_one_equals_unpatched,
                       assert_keep_one_intermediates_equal_unpatched, assert_macs_equal_flop_counter,
                       assert_reduced_intermediates_are_full_maps, assert_released_model_counts_as_flop_counter)
from conftest import spread_weights

SMALL = dict(img_size=32, patch_size=4, embed_dim=48, depth=6, num_heads=3)
TOWERS = {  # (class, options): each tower bare and as a classifier, with and without its projector
    "qwen_cls": (Qwen3VitClassifier, dict(num_classes=10, pos_embed_grid_size=6)),  # 6x6 grid resampled to 8x8
    "qwen_cls_merge": (Qwen3VitClassifier, dict(num_classes=10, encoder_pool="merge", out_features=40,
                                                pos_embed_grid_size=8)),
    "qwen_enc": (Qwen3VitEncoder, dict(out_features=40, pos_embed_grid_size=6)),  # the 2x2 merger's tokens
    "qwen_enc_avg": (Qwen3VitEncoder, dict(global_pool="avg", pos_embed_grid_size=6)),
    "deepseek_cls": (DeepseekVitClassifier, dict(num_classes=10)),
    "deepseek_cls_align": (DeepseekVitClassifier, dict(num_classes=10, encoder_pool="align", out_features=40)),
    "deepseek_enc": (DeepseekVitEncoder, dict(out_features=40)),  # 3x3 aligner on 8x8: the grid is padded
    "deepseek_enc_map": (DeepseekVitEncoder, dict(global_pool="")),  # the raw (B, H, W, C) map
    # classifiers without a pool: the head runs on every feature token (the merger's, or the map's)
    "qwen_cls_tokens": (Qwen3VitClassifier, dict(num_classes=10, global_pool="", encoder_pool="merge",
                                                 out_features=40, pos_embed_grid_size=8)),
    "deepseek_cls_tokens": (DeepseekVitClassifier, dict(num_classes=10, global_pool="")),
}


def make_tower(variant: str, seed: int = 0, **overrides):
    model_class, options = TOWERS[variant]
    torch.manual_seed(seed)
    return spread_weights(model_class(**{**SMALL, **options, **overrides}), seed).eval()


@pytest.fixture
def images():
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


# ----------------------------------------------------------------------------------------------------------------
# The tower as backbones.py's literal references read a flat model
# ----------------------------------------------------------------------------------------------------------------

class LiteralBlock:
    """A tower block that takes an attention mask: timm's EvaBlock does; DeepSeek's block, written out."""

    def __init__(self, block):
        self.block, self.attn, self.norm1 = block, block.attn, block.norm1

    def __call__(self, x, rope=None, attn_mask=None):
        blk = self.block
        if isinstance(blk, EvaBlock):
            return blk(x, rope=rope, attn_mask=attn_mask)
        x = x + blk.attn(blk.norm1(x), rope=rope, attn_mask=attn_mask)
        return x + blk.mlp(blk.norm2(x))


class TowerView:
    """Blocks, no prefix token, the encoder's RoPE table from its ``_pos_embed``; ``forward_head`` is everything
    after the last block, as timm writes it: the final norm (DeepSeek), the (B, H, W, C) map, then the encoder's
    projector or pool, or the classifier's features and head."""

    num_prefix_tokens = 0

    def __init__(self, model):
        self.model = model
        self.classifier = hasattr(model, "encoder")
        self.encoder = enc = model.encoder if self.classifier else model
        self.blocks = [LiteralBlock(b) for b in enc.blocks]
        self.rope, self.norm_pre, self.norm = enc.rope, torch.nn.Identity(), torch.nn.Identity()
        self.grid = None

    def patch_embed(self, img):
        x = self.encoder.patch_embed(img)
        self.grid = x.shape[1:3]
        return x

    def _pos_embed(self, x):
        return self.encoder._pos_embed(x)

    def forward_head(self, x):
        enc = self.encoder
        if isinstance(enc, DeepseekVitEncoder):
            x = enc.norm(x)
        x = x.reshape(x.shape[0], *self.grid, x.shape[-1])
        projector = getattr(enc, "merger", None) or getattr(enc, "aligner", None)
        if self.classifier:
            return self.model.forward_head(x if projector is None else projector(x))
        if projector is not None:
            return projector(x)
        return x.mean(dim=(1, 2)) if enc.global_pool == "avg" else x


# ----------------------------------------------------------------------------------------------------------------
# Equivalence
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", list(TOWERS))
@pytest.mark.parametrize("method,options", [("evo", {}), ("evo", {"mode": "layer"}), ("idle", {})], ids=str)
def test_keep_one_equals_the_unpatched_model(variant, method, options, images):
    assert_keep_one_equals_unpatched(make_tower(variant), method, options, images)


@pytest.mark.parametrize("variant", list(TOWERS))
@pytest.mark.parametrize("keep", [0.7, 0.4])
def test_idle_equals_the_masked_reference(variant, keep, images):
    model = make_tower(variant)
    assert_idle_equals_reference(model, TowerView(model), images, keep)


@pytest.mark.parametrize("variant", list(TOWERS))
@pytest.mark.parametrize("mode", ["stage", "layer"])
def test_evo_equals_the_masked_reference(variant, mode, images):
    model = make_tower(variant)
    assert_evo_equals_reference(model, TowerView(model), images, mode)


@pytest.mark.parametrize("variant", ["qwen_cls_merge", "deepseek_enc"])
def test_other_input_sizes_follow_the_grid(variant):
    """48 px: a 12x12 grid (Qwen's 8x8 or 6x6 position grid resampled, RoPE for 12x12, DeepSeek's aligner on 4x4
    blocks), the method's reference there too."""
    model = make_tower(variant)
    images = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(2))
    assert_keep_one_equals_unpatched(model, "idle", {}, images)
    assert_idle_equals_reference(model, TowerView(model), images)
    assert tokenpace.macs(model, img_size=48) > tokenpace.macs(model)


def test_evo_representative_token_runs_without_a_position(images):
    """Evo's representative token has no patch position: it is not rotated (as on Eva without a class token)."""
    model = make_tower("qwen_cls")
    with torch.no_grad():
        plain = tokenpace.apply(model, "evo", keep=0.5)(images)
        rep = tokenpace.apply(model, "evo", keep=0.5, representative=True)(images)
    assert torch.isfinite(rep).all() and not torch.allclose(rep, plain, atol=1e-4)


# ----------------------------------------------------------------------------------------------------------------
# Cost, refusals, feature maps
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", list(TOWERS))
@pytest.mark.parametrize("method,options", [(None, {}), ("evo", {}), ("evo", {"representative": True}),
                                            ("idle", {}), ("idle", {"project_keys": True})], ids=str)
def test_macs_equal_flop_counter_on_the_non_fused_path(variant, method, options):
    assert_macs_equal_flop_counter(make_tower(variant), method, options, torch.randn(1, 3, 32, 32))


@pytest.mark.parametrize("variant", ["qwen_cls", "deepseek_enc"])
def test_methods_that_drop_tokens_are_refused_naming_the_map(variant):
    model = make_tower(variant)
    assert tokenpace.supported_methods(model) == ["evo", "idle"]
    for method in ("evit", "topk"):
        with pytest.raises(ValueError, match=f"method '{method}' is not available.*drops tokens for good.*features "
                                             r"are the whole patch map \(B, H, W, C\)"):
            tokenpace.apply(model, method)


def test_sizes_the_tower_or_its_projector_cannot_take_are_refused():
    qwen = tokenpace.apply(make_tower("qwen_enc"), "idle")
    with pytest.raises(ValueError, match="projector merges 2x2 patches: the patch grid's sides must be multiples of 2 "
                                         r"\(got 9x9 patches\)"):
        tokenpace.macs(qwen, img_size=36)
    with pytest.raises(ValueError, match=r"multiples of the patch size 4x4$"):  # Qwen's towers cannot pad
        tokenpace.macs(qwen, img_size=34)
    tokenpace.macs(make_tower("qwen_cls"), img_size=36)  # no merger: any multiple of the patch
    deepseek = tokenpace.apply(make_tower("deepseek_enc"), "idle")
    assert tokenpace.macs(deepseek, img_size=36) > 0  # the aligner pads 9x9 to 3x3 blocks
    with pytest.raises(ValueError, match=r"multiples of the patch size 4x4 \(or build it with dynamic_img_pad=True\)"):
        tokenpace.macs(deepseek, img_size=34)


@pytest.mark.parametrize("variant,size,overrides", [("qwen_cls_merge", 48, {}), ("qwen_cls_tokens", 40, {}),
                                                    ("deepseek_enc", 40, {}), ("deepseek_cls_tokens", 40, {}),
                                                    ("deepseek_enc", 30, {"dynamic_img_pad": True})], ids=str)
def test_macs_at_other_sizes_equal_flop_counter(variant, size, overrides):
    """Qwen's grid and merger at 48 and 40 px; DeepSeek's aligner padding a 10x10 grid, and its patch embedding
    padding 30 px images to 32 (``dynamic_img_pad``): dense and idling, as the model runs at that size."""
    model = make_tower(variant, **overrides)
    images = torch.randn(1, 3, size, size)
    for method in (None, "idle"):
        assert_macs_equal_flop_counter(model, method, {}, images, img_size=size)
    if overrides:  # the padded input runs the method's reference too
        images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(3))
        assert_idle_equals_reference(model, TowerView(model), images)


INTERMEDIATE_CALLS = [dict(), dict(indices=2), dict(indices=[0], stop_early=True),
                      dict(output_fmt="NLC", intermediates_only=True), dict(output_dict=True, indices=[1, 3]),
                      dict(return_prefix_tokens=True, indices=1)]


@pytest.mark.parametrize("variant", ["qwen_cls", "qwen_cls_merge", "qwen_enc", "deepseek_cls", "deepseek_cls_align",
                                     "deepseek_enc"])
def test_keep_one_intermediates_equal_the_unpatched_model(variant, images):
    calls = INTERMEDIATE_CALLS + ([dict(norm=True, indices=[2, 5])] if "deepseek" in variant else [])
    assert_keep_one_intermediates_equal_unpatched(make_tower(variant), images, calls)


def test_qwen_norm_for_intermediates_is_refused_as_it_has_no_final_norm(images):
    model = tokenpace.apply(make_tower("qwen_cls"), "idle")
    with pytest.raises(ValueError, match="timm Qwen3 ViT has no final norm over its patch tokens: accepted "
                                         r"norm=False \(timm ignores norm=True here\)"):
        model.forward_intermediates(images, norm=True)


@pytest.mark.parametrize("variant", ["qwen_cls_merge", "deepseek_enc"])
def test_reduced_intermediates_are_full_maps_and_end_at_the_features(variant, images):
    assert_reduced_intermediates_are_full_maps(make_tower(variant), images, (3, 48, 8, 8), 6)


@pytest.mark.parametrize("name,kwargs", [
    ("qwen3_vit_88m", dict(img_size=32, patch_size=4, embed_dim=48, depth=4, num_heads=3, pos_embed_grid_size=8)),
    ("deepseek_vit_412m", dict(img_size=32, patch_size=4, embed_dim=48, depth=4, num_heads=3))])
def test_features_only_models_run_the_method(name, kwargs, images):
    torch.manual_seed(0)
    features = timm.create_model(name, features_only=True, out_indices=(1, 3), **kwargs).eval()
    with torch.no_grad():
        dense = features(images)
        idled = tokenpace.apply(features, "idle", keep=0.5)(images)
    assert [t.shape for t in idled] == [t.shape for t in dense] == [(3, 48, 8, 8)] * 2
    assert not torch.allclose(idled[-1], dense[-1], atol=1e-3)


@pytest.mark.parametrize("name", ["qwen3_vit_88m_enc", "qwen3_vit_306m_enc", "deepseek_vit_412m_enc",
                                  "deepseek_vit_412m_align"])
def test_released_configurations_count_as_flop_counter_on_the_meta_device(name):
    """The released towers as timm builds them (Qwen's at 768 px with the 2x2 merger, DeepSeek-V4's at 546 px with
    its 3x3 aligner on a 39x39 grid; the classifier's head on the pooled token), counted on the meta device: dense
    and idling (the README's speed rows)."""
    assert_released_model_counts_as_flop_counter(name, (1.4, 1.7))  # the default Idle(0.7)


@pytest.mark.parametrize("variant", ["qwen_cls", "deepseek_cls_align"])
@pytest.mark.parametrize("method", ["evo", "idle"])
def test_bf16_autocast_is_as_close_as_the_dense_models(variant, method, images):
    """Under CPU bf16 autocast with the same selection (seeded random scores: bf16 rounding flips near-tied ranks,
    which moves the output by more than rounding) the reduced tower is as close to float32 as the dense one (0.02-0.04
    here)."""
    assert_bf16_autocast_as_close_as_dense(make_tower(variant), method, images)


@pytest.mark.parametrize("variant,method", [("qwen_cls_merge", "evo"), ("deepseek_cls", "idle")])
def test_training_step_reaches_every_block(variant, method, images):
    """A training forward (Evo in layer mode, as its recipe starts; Idle as fine-tuned) and a backward: gradients
    reach the attention and MLP of every block, the projector and the head."""
    options = {"mode": "layer"} if method == "evo" else {}
    model = tokenpace.apply(make_tower(variant), method, keep=0.5, **options).train()
    model(images).logsumexp(-1).mean().backward()
    for i, blk in enumerate(model.encoder.blocks):
        assert blk.attn.qkv.weight.grad.abs().sum() > 0 and blk.mlp.fc1.weight.grad.abs().sum() > 0, i
    assert model.head.weight.grad.abs().sum() > 0
    if variant == "qwen_cls_merge":
        assert model.encoder.merger.fc1.weight.grad.abs().sum() > 0


def test_blocks_the_family_cannot_read_are_refused_by_name():
    qwen, deepseek = make_tower("qwen_cls"), make_tower("deepseek_enc")
    qwen.encoder.blocks[2].attn = torch.nn.Identity()
    with pytest.raises(TypeError, match="block 2 of this timm Qwen3 ViT is EvaBlock with Identity; tokenpace supports "
                                        "timm's EvaBlock or EvaBlockPostNorm with AttentionRope or EvaAttention"):
        tokenpace.apply(qwen, "idle")
    deepseek.blocks[0] = EvaBlock(48, 3)
    with pytest.raises(TypeError, match="block 0 of this timm DeepSeek ViT is EvaBlock with EvaAttention; tokenpace "
                                        "supports timm's DeepseekVitBlock with AttentionRope"):
        tokenpace.apply(deepseek, "evo")
