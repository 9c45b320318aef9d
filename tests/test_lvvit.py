"""LV-ViT (IdleViT's second family): the authors' architecture and inference head, keep=1 equals the unpatched model
for every method, Idle equals a literal masked reference of IdleViT's LV-ViT code (residuals divided by skip_lam,
idle keys masked, updates kept on the selected rows), the official schedules, and MACs equal FlopCounterMode / 2."""
import pytest
import timm
import torch
import torch.nn.functional as F

import tokenpace
from tokenpace.archs import LvVit
from backbones import assert_keep_one_equals_unpatched, assert_macs_equal_flop_counter
from conftest import spread_weights

SMALL = dict(img_size=32, patch_size=4, embed_dim=48, depth=8, num_heads=3, num_classes=10, stem_width=16)


def make_lvvit(seed: int = 0, **overrides) -> LvVit:
    torch.manual_seed(seed)
    return spread_weights(LvVit(**{**SMALL, **overrides}), seed).eval()


@pytest.fixture
def images():
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def literal_forward(model, img, keep=None, starts=()):
    """LV-ViT as the authors write it, with IdleViT's masked training path in the idling layers: the class query's
    head-mean logits pick the top int(N * keep**s) tokens; idle keys are masked out of the attention; both residuals
    are divided by skip_lam and added on the selected rows only; the head is cls + 0.5 * max over tokens of aux."""
    pe = model.patch_embed
    x = F.relu(pe.bn1(pe.conv1(img)))
    x = F.relu(pe.bn2(pe.conv2(x)))
    x = F.relu(pe.bn3(pe.conv3(x)))
    x = pe.proj(x).flatten(2).transpose(1, 2)
    x = torch.cat([model.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + model.pos_embed
    B, N1, C = x.shape
    for i, blk in enumerate(model.blocks):
        attn, lam = blk.attn, blk.skip_lam
        H, d = attn.num_heads, C // attn.num_heads
        stage = sum(1 for s in starts if i >= s)
        h = blk.norm1(x)
        q, k, v = F.linear(h, attn.qkv.weight).reshape(B, N1, 3, H, d).permute(2, 0, 3, 1, 4)
        logits = (q * d ** -0.5) @ k.transpose(-2, -1)
        m = torch.ones(B, N1)
        if stage:
            top = logits[:, :, 0, 1:].mean(1).topk(int((N1 - 1) * keep ** stage), dim=1).indices
            m = torch.zeros(B, N1).scatter(1, top + 1, 1.0)
            m[:, 0] = 1.0
            logits = logits + ((1 - m) * -1e5)[:, None, None, :]
        out = attn.proj((logits.softmax(-1) @ v).transpose(1, 2).reshape(B, N1, C))
        x = x + out / lam * m[..., None]
        x = x + blk.mlp(blk.norm2(x)) / lam * m[..., None]
    x = model.norm(x)
    return model.head(x[:, 0]) + 0.5 * model.aux_head(x[:, 1:]).max(1)[0]


def test_the_authors_architecture_and_inference_head(images):
    model = make_lvvit()
    with torch.no_grad():
        assert torch.allclose(model(images), literal_forward(model, images), atol=1e-5, rtol=1e-5)
    with torch.device("meta"):  # shapes only
        s, m, s384 = (timm.create_model(n) for n in ("lvvit_s", "lvvit_m", "lvvit_s_384"))
    assert round(sum(p.numel() for p in s.parameters()) / 1e6) == 26  # the authors' 26 M and 56 M
    assert round(sum(p.numel() for p in m.parameters()) / 1e6) == 56
    assert (len(s.blocks), s.embed_dim, len(m.blocks), m.embed_dim) == (16, 384, 20, 512)
    assert s.blocks[0].mlp.fc1.out_features == 3 * 384 and s.blocks[0].attn.qkv.bias is None
    assert s384.patch_embed.grid_size == (24, 24) and s384.pos_embed.shape[1] == 24 * 24 + 1


@pytest.mark.parametrize("method,options", [("evo", {}), ("evo", {"mode": "layer"}), ("idle", {}), ("evit", {}),
                                            ("topk", {})], ids=str)
def test_keep_one_equals_the_unpatched_model(method, options, images):
    assert_keep_one_equals_unpatched(make_lvvit(), method, options, images)


@pytest.mark.parametrize("keep", [0.7, 0.5])
def test_idle_equals_the_literal_masked_reference_at_the_official_schedule(keep, images):
    model = make_lvvit()
    tokenpace.apply(model, "idle", keep=keep)
    assert tokenpace.get_patch(model).policy.starts == (2, 4, 6)  # depth 8: a quarter, a half, three quarters
    with torch.no_grad():
        expected = literal_forward(model, images, keep, (2, 4, 6))
        got = model(images)
        assert not torch.allclose(got, tokenpace.remove(model)(images), atol=1e-3)  # it did idle something
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4), (got - expected).abs().max()


def test_official_schedules_and_spec_macs():
    """IdleViT's layers 4-15 (LV-ViT-S) and 5-19 (LV-ViT-M), r, r^2, r^3; MACs against idlevit.md §4.5, which
    counts the official code (every key projected) without the token-labelling head's 196 tokens."""
    for name, starts, dense, idle in (("lvvit_s", (4, 8, 12), 6.48, 4.69), ("lvvit_m", (5, 10, 15), 12.58, 8.76)):
        with torch.device("meta"):  # shapes only: MACs are counted analytically
            model = timm.create_model(name)
        aux = 196 * model.aux_head.in_features * model.aux_head.out_features
        assert round((tokenpace.macs(model) - aux) / 1e9, 2) == dense
        tokenpace.apply(model, "idle", project_keys=True)
        assert tokenpace.get_patch(model).policy.starts == starts
        assert round((tokenpace.macs(model) - aux) / 1e9, 2) == idle
        shortcut = tokenpace.macs(tokenpace.apply(model, "idle"))  # scores without projecting idle keys
        assert shortcut < tokenpace.macs(tokenpace.apply(model, "idle", project_keys=True))


def test_other_depths_round_the_quarters_and_every_listed_method_applies():
    """Depth 6: quarters 1.5, 3, 4.5 round to 2, 3, 5 (not 1, 2, 3); depth 2 keeps one stage (quarters merge)."""
    for depth, starts in ((6, (2, 3, 5)), (7, (2, 4, 5)), (2, (1,))):
        with torch.device("meta"):
            model = timm.create_model("lvvit_s", depth=depth)
        for method in tokenpace.supported_methods(model):  # listed means it applies with its defaults
            tokenpace.apply(model, method)
        assert tokenpace.get_patch(tokenpace.apply(model, "idle")).config.stage_starts == starts


@pytest.mark.parametrize("method,options", [(None, {}), ("evo", {}), ("idle", {}), ("idle", {"project_keys": True}),
                                            ("evit", {}), ("topk", {})], ids=str)
def test_macs_equal_flop_counter_on_the_non_fused_path(method, options):
    assert_macs_equal_flop_counter(make_lvvit(), method, options, torch.randn(1, 3, 32, 32))


def test_without_classes_it_returns_the_class_tokens_features_as_timm_encoders_do(images):
    """num_classes=0: forward is forward_head(pre_logits=True), the class token after the final norm; the same
    after reset_classifier(0), and the classes come back with reset_classifier(n)."""
    for model in (make_lvvit(num_classes=0), make_lvvit()):
        model.reset_classifier(0)
        with torch.no_grad():
            features = model.forward_features(images)
            out = model(images)
        assert out.shape == (3, SMALL["embed_dim"]) and torch.equal(out, features[:, 0])
        assert torch.equal(out, model.forward_head(features, pre_logits=True))
    model.reset_classifier(5)
    with torch.no_grad():
        assert model(images).shape == (3, 5)
    with pytest.raises(ValueError, match="accepted global_pool: 'token'; got 'avg'"):
        model.reset_classifier(5, "avg")


def test_sizes_the_stem_cannot_match_are_refused():
    """The 7x7 stride-2 conv makes ceil(img / 2) rows: at 47 px the stem gives a 3x3 grid but img // 16 = 2
    position embeddings; 48 agrees (3x3), and so does 40 (2x2: the last 8 px fall outside, as in a strided conv)."""
    with pytest.raises(ValueError, match=r"img_size 47 gives a 3x3 stem grid but 2x2 position embeddings "
                                         r"\(img_size // patch_size\); accepted: .*multiples of patch_size 16 such as "
                                         r"32 or 48"):
        LvVit(img_size=47)
    with pytest.raises(ValueError, match="patch_size must be an even integer >= 2; got 7"):
        LvVit(img_size=56, patch_size=7)
    with pytest.raises(ValueError, match="img_size must be an integer >= patch_size"):
        LvVit(img_size=8.5, patch_size=4)
    for size, grid in ((48, 3), (40, 2)):
        model = LvVit(img_size=size, embed_dim=24, depth=1, num_heads=2, stem_width=8)
        with torch.no_grad():
            assert model.patch_embed(torch.zeros(1, 3, size, size)).shape[-2:] == (grid, grid)
            assert model(torch.zeros(1, 3, size, size)).shape == (1, 1000)


def test_the_evaluation_crop_can_be_recorded_otherwise():
    """lvvit_s records its authors' crop 0.9 unless told another (IdleViT's converted files record 0.875)."""
    with torch.device("meta"):
        assert timm.create_model("lvvit_s", crop_pct=0.875).pretrained_cfg["crop_pct"] == 0.875
        with pytest.raises(ValueError, match=r"crop_pct must be a number in \(0, 1\] .*authors use 0.9\); got 1.5"):
            timm.create_model("lvvit_s", crop_pct=1.5)
