"""timm's Gemma 4 vision tower: sandwich-normed blocks (RmsNorm before and after the attention and the gated MLP), q/k
RmsNorm and an unscaled v norm, logit scale 1, grouped keys, 2D RoPE from each patch's (x, y), clamped projections,
a one-hot position-table matmul, the soft-token pooler (k x k cells, then the standardisation), as the bare encoder
(whose forward pools without calling forward_features) and as a classifier. keep=1 is the unpatched model; Idle, Evo
and top-k equal the literal masked references of backbones.py run through timm's own blocks, RoPE and pooler; MACs
equal FlopCounterMode / 2; methods that drop tokens are refused where the pooler or the map needs every patch."""
import copy
import io

import pytest
import timm
import torch
from timm.models.gemma4_vit import (Gemma4ClippableLinear, Gemma4VitClassifier, Gemma4VitEncoder,
                                    apply_multidimensional_rope)

import tokenpace
from backbones import (assert_bf16_autocast_as_close_as_dense, assert_evo_equals_reference,
                       assert_idle_equals_reference, assert_keep_one_equals_unpatched,
                       assert_keep_one_intermediates_equal_unpatched, assert_macs_equal_flop_counter,
                       assert_position_less_tokens_run, assert_reduced_intermediates_are_full_maps,
                       assert_released_model_counts_as_flop_counter, ref_idle, ref_topk)
from tokenpace.anatomy import TokenSet
from tokenpace.families.gemma4_vit import rope_rows
from conftest import spread_weights

SMALL = dict(patch_size=4, embed_dim=48, depth=6, num_heads=3, head_dim=16, intermediate_size=96,
             position_embedding_size=64, pooling_kernel_size=2)
TOWERS = {  # (class, options): the encoder with each pool, the classifier with and without the soft pool
    "enc_soft": (Gemma4VitEncoder, dict(standardize=True, use_clipped_linears=True)),  # 16 soft tokens, clamped
    "enc_soft_gqa": (Gemma4VitEncoder, dict(num_heads=4, num_kv_heads=2, head_dim=12)),
    "enc_avg": (Gemma4VitEncoder, dict(global_pool="avg")),
    "enc_raw": (Gemma4VitEncoder, dict(global_pool="")),  # every patch token
    "cls": (Gemma4VitClassifier, dict(num_classes=10)),  # mean of the raw tokens, norm, head
    "cls_soft": (Gemma4VitClassifier, dict(num_classes=10, encoder_pool="soft", standardize=True)),
    "cls_tokens": (Gemma4VitClassifier, dict(num_classes=10, global_pool="")),  # the head on every token
}
DROPPING = ["enc_avg", "cls", "cls_tokens"]  # the output needs no patch in place: EViT and top-k run


def make_tower(variant: str, seed: int = 0, img_size: int = 32, **overrides):
    """The tower with spread weights, finite clamps on its clipped projections (as Gemma 4's 167M checkpoint ships
    them) and random standardisation, its input size recorded as timm.create_model records it."""
    model_class, options = TOWERS[variant]
    torch.manual_seed(seed)
    model = spread_weights(model_class(**{**SMALL, **options, **overrides}), seed).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, Gemma4ClippableLinear) and m.use_clipped:
                m.input_min.fill_(-1.0), m.input_max.fill_(1.0), m.output_min.fill_(-2.0), m.output_max.fill_(2.0)
            if isinstance(m, Gemma4VitEncoder) and m.std_bias is not None:
                m.std_bias.copy_(0.3 * torch.randn(m.std_bias.shape, generator=gen))
                m.std_scale.copy_(1 + 0.3 * torch.randn(m.std_scale.shape, generator=gen))
    model.pretrained_cfg = {"input_size": (3, img_size, img_size)}
    return model


@pytest.fixture
def images():
    return torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


# ----------------------------------------------------------------------------------------------------------------
# The tower as backbones.py's literal references read a flat model
# ----------------------------------------------------------------------------------------------------------------

class LiteralBlock:
    """A Gemma 4 block called as the references call blocks (the RoPE context is timm's (cos, sin) of every patch),
    with its q and k written out: the per-head norms, 2D RoPE, grouped keys repeated; logit scale 1."""

    scale = 1.0

    def __init__(self, block):
        self.block = block

    def __call__(self, x, rope=None, attn_mask=None):
        return self.block(x, *rope, attn_mask=attn_mask)

    def literal_qk(self, x, rope):
        attn, h = self.block.attn, self.block.norm1(x)
        B, N, _ = h.shape
        q = attn.q_norm(attn.q_proj(h).view(B, N, attn.num_heads, attn.head_dim))
        k = attn.k_norm(attn.k_proj(h).view(B, N, attn.num_kv_heads, attn.head_dim))
        q, k = (apply_multidimensional_rope(t, *rope, ndim=2, unsqueeze_dim=2).transpose(1, 2) for t in (q, k))
        return q, k.repeat_interleave(attn.num_heads // attn.num_kv_heads, dim=1)


class TowerView:
    """No prefix token; the encoder's patch embedding (tokens and each patch's coordinates), its RoPE from those
    coordinates; ``forward_head`` is everything after the last block as timm writes it: the encoder's pool (the soft
    pooler and standardisation, the mean, or none), then a classifier's head."""

    num_prefix_tokens = 0
    rope = True  # the blocks take a position context

    def __init__(self, model):
        self.model = model
        self.classifier = isinstance(model, Gemma4VitClassifier)
        self.encoder = model.encoder if self.classifier else model
        self.blocks = [LiteralBlock(b) for b in self.encoder.blocks]
        self.norm_pre = self.norm = torch.nn.Identity()
        self.positions = None

    def patch_embed(self, img):
        x, self.positions, _ = self.encoder.patch_embed(img)
        return x

    def _pos_embed(self, x):
        return x, self.encoder.rotary_emb(x, self.positions)

    def forward_head(self, x):
        enc = self.encoder
        if enc.global_pool == "soft":
            x, _ = enc.pooler(x, self.positions, None)
            if enc.std_bias is not None:
                x = (x - enc.std_bias) * enc.std_scale
        elif enc.global_pool == "avg":
            x = x.mean(dim=1)
        return self.model.forward_head(x) if self.classifier else x


# ----------------------------------------------------------------------------------------------------------------
# Equivalence
# ----------------------------------------------------------------------------------------------------------------

KEEP_ONE = [(v, "evo", {}) for v in TOWERS] + [(v, "evo", {"mode": "layer"}) for v in TOWERS] + [
    (v, "idle", {}) for v in TOWERS] + [(v, m, o) for v in DROPPING for m, o in
                                        [("evit", {}), ("evit", {"fuse": False}), ("topk", {})]]


@pytest.mark.parametrize("variant,method,options", KEEP_ONE, ids=str)
def test_keep_one_equals_the_unpatched_model(variant, method, options, images):
    assert_keep_one_equals_unpatched(make_tower(variant), method, options, images)


def test_the_clamps_and_the_standardisation_bite(images):
    """The clipped variant's finite clamps and its standardisation change the output: the equivalences below hold
    with them in force."""
    model = make_tower("enc_soft")
    with torch.no_grad():
        clamped = model(images)
        model.set_clamp_enabled(False)
        free = model(images)
        model.set_clamp_enabled(True)
        model.std_scale.fill_(1.0), model.std_bias.zero_()
        plain = model(images)
    assert not torch.allclose(clamped, free, atol=1e-2) and not torch.allclose(clamped, plain, atol=1e-2)


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


@pytest.mark.parametrize("variant", DROPPING)
def test_topk_equals_the_masked_reference(variant, images):
    model = make_tower(variant)
    with torch.no_grad():
        expected = ref_topk(TowerView(model), images, 0.5, 2, "mean")
        got = tokenpace.apply(model, "topk", keep=0.5)(images)
    assert got.shape == expected.shape and torch.allclose(got, expected, atol=1e-4, rtol=1e-4), \
        (got - expected).abs().max()


def test_position_less_tokens_are_not_rotated(images):
    """EViT's fused token and Evo's representative token have no patch coordinate: the identity rotation (cos 1,
    sin 0) where a kept fused token sits among the patches as a hole, the patches' own rows elsewhere."""
    assert_position_less_tokens_run(make_tower("cls"), images)
    table = torch.randn(2, 2, 5, 4)  # (cos, sin) x batch x patches x channels
    where = TokenSet(prefix=0, pos=torch.tensor([[3, -1, 0], [-1, 4, 2]]), holes=True)
    cos, sin = rope_rows(table, where)
    assert torch.equal(cos[0, 0], table[0, 0, 3]) and torch.equal(sin[1, 2], table[1, 1, 2])
    assert torch.equal(cos[0, 1], torch.ones(4)) and torch.equal(sin[1, 0], torch.zeros(4))


@pytest.mark.parametrize("variant,overrides", [("enc_soft", {}), ("cls", {}), ("enc_soft", {"pooling_kernel_size": 3})],
                         ids=str)
def test_other_input_sizes_follow_the_grid(variant, overrides):
    """48 px: a 12x12 grid, position rows and RoPE from its coordinates, the pooler's 2x2 (or 3x3) cells over it; the
    method's reference and the FLOP count there too."""
    model = make_tower(variant, **overrides)
    images = torch.rand(2, 3, 48, 48, generator=torch.Generator().manual_seed(2))
    assert_keep_one_equals_unpatched(model, "idle", {}, images)
    assert_idle_equals_reference(model, TowerView(model), images)
    for method in (None, "idle"):
        assert_macs_equal_flop_counter(tokenpace.remove(model), method, {}, images[:1], img_size=48)


def test_a_patched_encoder_copies_pickles_and_saves_with_its_forward(images):
    """The encoder's forward is patched beside forward_features: a deep copy, a pickle and torch.save round trip keep
    it (the soft tokens under the method, not the dense ones)."""
    model = tokenpace.apply(make_tower("enc_soft"), "idle", keep=0.5)
    with torch.no_grad():
        expected, dense = model(images), tokenpace.remove(copy.deepcopy(model))(images)
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        for twin in (copy.deepcopy(model), torch.load(buffer, weights_only=False)):
            assert tokenpace.get_patch(twin) is not None and torch.equal(twin(images), expected)
    assert not torch.allclose(expected, dense, atol=1e-3)
    assert torch.equal(tokenpace.remove(model)(images), dense)


# ----------------------------------------------------------------------------------------------------------------
# Cost, refusals, feature maps
# ----------------------------------------------------------------------------------------------------------------

MACS = [(v, m, o) for v in TOWERS for m, o in [(None, {}), ("evo", {}), ("evo", {"representative": True}),
                                                 ("idle", {}), ("idle", {"project_keys": True})]] + [
    (v, m, {}) for v in DROPPING for m in ("evit", "topk")]


@pytest.mark.parametrize("variant,method,options", MACS, ids=str)
def test_macs_equal_flop_counter_on_the_non_fused_path(variant, method, options):
    assert_macs_equal_flop_counter(make_tower(variant), method, options, torch.rand(1, 3, 32, 32))


@pytest.mark.parametrize("variant,reason", [
    ("enc_soft", "encoder pools the patch tokens by their positions into soft tokens"),
    ("cls_soft", "encoder pools the patch tokens by their positions into soft tokens"),
    ("enc_raw", "features are every patch token in place")])
def test_methods_that_drop_tokens_are_refused_where_every_patch_is_needed(variant, reason):
    model = make_tower(variant)
    assert tokenpace.supported_methods(model) == ["evo", "idle"]
    for method in ("evit", "topk"):
        with pytest.raises(ValueError, match=f"method '{method}' is not available.*drops tokens for good, and this "
                                             f"timm Gemma 4 ViT's {reason}"):
            tokenpace.apply(model, method)
    assert tokenpace.supported_methods(make_tower("cls")) == ["evo", "idle", "evit", "topk"]


def test_sizes_the_tower_or_its_pooler_cannot_take_are_refused():
    """Sides not multiples of the patch (of k patches with the soft pooler), and more patches a side than the position
    table has rows (timm's one-hot lookup fails there): refused, before any cost is counted."""
    soft = tokenpace.apply(make_tower("enc_soft"), "idle")
    with pytest.raises(ValueError, match=r"soft-token pooler averages 2x2 patches: the sides must be multiples of "
                                         r"8x8 \(2 patches of 4x4\)"):
        tokenpace.macs(soft, img_size=36)
    with pytest.raises(ValueError, match=r"must be divisible by \(patch_size \* pooling_kernel_size\)"):
        soft(torch.rand(1, 3, 36, 36))  # timm's own check, in the patched forward too
    plain = tokenpace.apply(make_tower("enc_avg"), "idle")
    assert tokenpace.macs(plain, img_size=36) > tokenpace.macs(plain)  # no pooler: any multiple of the patch
    with pytest.raises(ValueError, match=r"multiples of the patch size 4x4$"):
        tokenpace.macs(plain, img_size=34)
    assert tokenpace.macs(plain, img_size=(256, 32)) > 0  # 64 patches a side: the table's 64 rows
    with pytest.raises(ValueError, match=r"position table has 64 rows per axis: at most 64 patches a side \(at most "
                                         r"256x256 px\)"):
        tokenpace.macs(plain, img_size=(260, 32))
    with pytest.raises(RuntimeError, match="Class values must be smaller than num_classes"):
        tokenpace.remove(plain)(torch.rand(1, 3, 260, 32))  # what timm's own forward does there


def test_a_pool_changed_after_apply_is_refused(images):
    """The refusals were decided for the pool the encoder had: top-k on an averaging encoder would hand back the
    kept tokens alone once the pool is switched off."""
    model = tokenpace.apply(make_tower("enc_avg"), "topk", keep=0.5)
    model.global_pool = ""
    with pytest.raises(ValueError, match="global_pool changed from 'avg' to '' after tokenpace.apply"):
        model(images)
    model.global_pool = "avg"
    assert model(images).shape == (3, 48)


def test_input_other_than_image_batches_is_refused(images):
    model = tokenpace.apply(make_tower("enc_avg"), "idle")
    coords = torch.zeros(3, 64, 2, dtype=torch.long)
    for call in (model, tokenpace.apply(make_tower("cls"), "idle")):  # the encoder's forward; the classifier's
        with pytest.raises(ValueError, match="packed NaFlex input .* is not supported on a tokenpace-patched model"):
            call(images, patch_coord=coords)
    with pytest.raises(ValueError, match=r"runs image batches \(B, C, H, W\); got dict"):
        model({"patches": torch.rand(3, 64, 48), "patch_coord": coords})
    with pytest.raises(ValueError, match=r"runs image batches \(B, C, H, W\); got a 3-d tensor"):
        model.forward_features(torch.rand(3, 64, 48))


def test_a_tower_without_an_input_size_is_refused():
    """Built directly, the encoder keeps no size (timm drops img_size; no pretrained config): the token counts a keep
    gives are unknown, so apply names the ways to give one."""
    model = Gemma4VitEncoder(**SMALL)
    with pytest.raises(TypeError, match=r"keeps no input size .*tokenpace.models.create_model\(name, img_size=N\), or "
                                        r"set model.pretrained_cfg = \{'input_size': \(3, H, W\)\}"):
        tokenpace.apply(model, "idle")
    assert tokenpace.get_patch(model) is None
    model.pretrained_cfg = {"input_size": (3, 32, 32)}
    assert tokenpace.macs(tokenpace.apply(model, "idle")) < tokenpace.macs(tokenpace.remove(model))


INTERMEDIATE_CALLS = [dict(), dict(indices=2), dict(indices=[0], stop_early=True),
                      dict(output_fmt="NLC", intermediates_only=True)]


@pytest.mark.parametrize("variant", ["enc_soft", "enc_soft_gqa", "cls", "cls_soft"])
def test_keep_one_intermediates_equal_the_unpatched_model(variant, images):
    calls = INTERMEDIATE_CALLS + ([dict(output_dict=True, indices=[1, 3])] if variant.startswith("enc") else [])
    assert_keep_one_intermediates_equal_unpatched(make_tower(variant), images, calls)


def test_norm_for_intermediates_is_refused_as_there_is_no_final_norm(images):
    model = tokenpace.apply(make_tower("enc_soft"), "idle")
    with pytest.raises(ValueError, match="timm Gemma 4 ViT has no final norm over its patch tokens: accepted "
                                         r"norm=False \(timm ignores norm=True here\)"):
        model.forward_intermediates(images, norm=True)


@pytest.mark.parametrize("variant", ["enc_soft", "cls"])
def test_reduced_intermediates_are_full_maps_and_end_at_the_raw_tokens(variant, images):
    model = make_tower(variant)
    assert_reduced_intermediates_are_full_maps(model, images, (3, 48, 8, 8), 6)
    with torch.no_grad():
        assert model.forward_intermediates(images)[0].shape == (3, 64, 48)  # the raw tokens, as timm's


def test_features_only_models_run_the_method(images):
    torch.manual_seed(0)
    features = timm.create_model("gemma4_vit_167m_enc", features_only=True, out_indices=(1, 3), **SMALL).eval()
    with torch.no_grad():
        dense = features(images)
        idled = tokenpace.apply(features, "idle", keep=0.5)(images)
    assert [t.shape for t in idled] == [t.shape for t in dense] == [(3, 48, 8, 8)] * 2
    assert not torch.allclose(idled[-1], dense[-1], atol=1e-3)


@pytest.mark.parametrize("name", ["gemma4_vit_167m_enc", "gemma4_vit_570m_enc", "gemma4_vit_167m"])
def test_released_configurations_count_as_flop_counter_on_the_meta_device(name):
    """The released towers as timm builds them at 768 px (a 48x48 grid, 3x3 pooler cells; the position table of 10240
    rows per axis), counted on the meta device: dense and idling (the README's speed rows)."""
    assert_released_model_counts_as_flop_counter(name, (1.4, 1.7))  # the default Idle(0.7): 1.53-1.54x


@pytest.mark.parametrize("variant", ["enc_soft", "cls"])
@pytest.mark.parametrize("method", ["evo", "idle"])
def test_bf16_autocast_is_as_close_as_the_dense_models(variant, method, images):
    """Under CPU bf16 autocast with the same selection (seeded random scores) the reduced tower is as close to
    float32 as the dense one; the soft tokens are float32, as timm's pooler and standardisation make them."""
    dtype = torch.float32 if variant == "enc_soft" else torch.bfloat16
    assert_bf16_autocast_as_close_as_dense(make_tower(variant), method, images, dtype)


def test_drop_path_in_training_equals_the_reference(images):
    """Stochastic depth in a training forward: each residual branch drops as in timm's block (one draw per branch,
    the same stream), so Idle equals the masked reference run in training mode from the same seed."""
    model = make_tower("cls", drop_path_rate=0.5).train()
    outputs = []
    for run in (lambda: ref_idle(TowerView(model), images, 0.5, (2, 3, 5), "received"),
                lambda: tokenpace.apply(model, "idle", keep=0.5)(images)):
        torch.manual_seed(3)
        with torch.no_grad():
            outputs.append(run())
    expected, got = outputs
    with torch.no_grad():
        torch.manual_seed(4)
        other = model(images)
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4), (got - expected).abs().max()
    assert not torch.allclose(got, other, atol=1e-3)  # the draws matter


@pytest.mark.parametrize("variant,method", [("cls_soft", "evo"), ("cls", "idle")])
def test_training_step_reaches_every_block(variant, method, images):
    """A training forward (Evo in layer mode, as its recipe starts; Idle as fine-tuned) and a backward: gradients
    reach the attention and MLP of every block, the position table and the head."""
    options = {"mode": "layer"} if method == "evo" else {}
    model = tokenpace.apply(make_tower(variant), method, keep=0.5, **options).train()
    model(images).logsumexp(-1).mean().backward()
    for i, blk in enumerate(model.encoder.blocks):
        for proj in (blk.attn.q_proj, blk.attn.k_proj, blk.attn.v_proj, blk.attn.o_proj, blk.mlp.gate_proj):
            assert proj.linear.weight.grad.abs().sum() > 0, i
    assert model.encoder.patch_embed.position_embedding_table.grad.abs().sum() > 0
    assert model.head.weight.grad.abs().sum() > 0


def test_blocks_the_family_cannot_read_are_refused_by_name():
    model = make_tower("enc_soft")
    model.blocks[2].attn = torch.nn.Identity()
    with pytest.raises(TypeError, match="block 2 of this timm Gemma 4 ViT is Gemma4Block with Identity; tokenpace "
                                        "supports timm's Gemma4Block with Gemma4Attention"):
        tokenpace.apply(model, "idle")
