"""torch.compile(fullgraph=True) once per family: fixed token counts, no graph breaks, no host syncs in a patched
forward. Every family is traced through AOTAutograd (the aot_eager backend: dynamo's graph capture and
AOTAutograd's functionalised aten graph, what inductor starts from, without its C++ compiles); a flat ViT and a
pyramid also run inductor itself. Inductor on every family is opt-in (TOKENPACE_TEST_INDUCTOR=all): with a cold
inductor cache, as on a fresh CI machine, its C++ kernel compiles took 15-45 s a family on the 2-core machine,
218 s for the seven."""
import os

import pytest
import timm
import torch

import tokenpace
from backbones import make_backbone
from conftest import make_vit, spread_weights
from test_cait import make_cait
from test_davit import make_davit
from test_volo import make_volo
from test_xcit import make_xcit
from test_hiera import make_hiera
from test_hieradet import make_hieradet
from test_maxvit import make_maxvit
from test_gemma4_vit import make_tower as make_gemma
from test_vlm_vit import make_tower
from test_pit import make_pit
from test_tiny_vit import make_tiny_vit
from test_sam import make_sam
from test_swin import make_swin


def _levit(name, **options):
    torch.manual_seed(0)
    model = timm.create_model(name, embed_dim=(32, 48), key_dim=8, num_heads=(2, 3), depth=(2, 1), **options)
    return spread_weights(model).eval()


def _swin():
    from timm.models.swin_transformer import SwinTransformer

    torch.manual_seed(0)
    return spread_weights(SwinTransformer(img_size=32, patch_size=2, embed_dim=16, depths=(2,), num_heads=(2,),
                                          window_size=4, num_classes=10)).eval()


def _pvt():
    from timm.models.pvt_v2 import PyramidVisionTransformerV2

    torch.manual_seed(0)
    return spread_weights(PyramidVisionTransformerV2(depths=(1, 1), embed_dims=(16, 32), num_heads=(1, 2),
                                                     sr_ratios=(4, 2), mlp_ratios=(4, 4), num_classes=10)).eval()


CASES = {
    "vit": (lambda: make_vit("deit", depth=3), "evo", dict(stage_starts=(1, 2)), 32),
    "vit_no_class_token": (lambda: make_backbone("siglip_map", depth=2), "idle", dict(stage_starts=(1,)), 32),
    "eva_rope_mixed": (lambda: make_backbone("rope_mixed", depth=2), "idle", dict(stage_starts=(1,)), 32),
    "beit": (lambda: make_backbone("beit_both_swiglu", depth=2), "evo", dict(stage_starts=(1,), representative=True),
             32),
    "vit_relpos": (lambda: make_backbone("relpos_gap", depth=2), "idle", dict(stage_starts=(1,)), 32),
    "naflexvit": (lambda: make_backbone("naflex_rope_mixed", depth=2), "idle", dict(stage_starts=(1,)), 32),
    "vit_diff_parallel": (lambda: make_backbone("diff_parallel_reg_gap", depth=2), "evo", dict(stage_starts=(1,)),
                          32),
    "vit_parallel_things": (lambda: make_backbone("parallel_things", depth=2), "idle", dict(stage_starts=(1,)), 32),
    "cait": (lambda: make_cait(depth=2, depth_token_only=1), "evo", dict(stage_starts=(1,)), 32),
    # XCiT: cross-covariance attention on the selected tokens, the LPI convolutions on the whole map
    "xcit": (lambda: make_xcit(depth=2), "idle", dict(stage_starts=(1,)), 64),
    # VOLO: the stem and outlookers in the embedding, Evo on the transformer blocks, the token-labeling head
    "volo": (lambda: make_volo(layers=(1, 1, 1, 1)), "evo", dict(stage_starts=(1,)), 96),
    # DaViT: padded windows and the whole map (channel attention), position encodings on every token
    "davit": (lambda: make_davit("v2_florence", depths=(1, 1)), "idle", dict(stage_starts=(1,)), 72),
    "levit": (lambda: _levit("levit_cifar"), "evo", dict(stage_starts=(1,)), 32),
    "evo_levit": (lambda: _levit("evo_levit_cifar"), "evo", dict(stage_starts=(1,)), 32),
    "levit_conv": (lambda: _levit("levit_cifar", use_conv=True), "evo", dict(stage_starts=(1,)), 32),
    "swin": (_swin, "idle", dict(stage_starts=(1,)), 32),
    "swin_v2": (lambda: make_swin("v2_padded", depths=(2,), num_heads=(2,)), "idle", dict(stage_starts=(1,)), 40),
    "swin_v2_cr": (lambda: make_swin("cr_padded", depths=(2,), num_heads=(2,)), "idle", dict(stage_starts=(1,)),
                   40),
    "pvt_v2": (_pvt, "idle", dict(stage_starts=(1,)), 64),
    # a padded windowed block and a global one, both idling
    "sam": (lambda: make_sam("padded", depth=2, global_attn_indexes=(1,)), "idle", dict(stage_starts=(0,)), 80),
    # mask-unit windows, a pooling stage entry (always dense) and a global block, idling
    "hiera": (lambda: make_hiera(stages=(1, 1, 2), q_pool=2, mask_unit_size=(4, 4),
                                 mask_unit_attn=(True, False, False)), "idle", dict(stage_starts=(0,)), 64),
    # at 96 px: windows of 4 on 24x24, a pooling stage entry, windows of 8 on 12x12 (padded: padding keys masked),
    # a stage entry pooling padded windows (always dense), a global block, idling
    "hieradet": (lambda: make_hieradet(stages=(1, 2, 2), q_pool=2, window_spec=(4, 8, 4), global_att_blocks=(4,)),
                 "idle", dict(stage_starts=(0,)), 96),
    # an MBConv block and timm's windowed block (dense), then one idling on a 10x10 map (padded windows of 4),
    # LeViT-style biases, the local convolution
    "tiny_vit": (lambda: make_tiny_vit(depths=(1, 2), embed_dims=(16, 32), num_heads=(1, 2), window_sizes=(4, 4)),
                 "idle", dict(stage_starts=(2,)), 80),
    # every attention block idling: no timm attention, whose own bias cache would recompile once (see below)
    "tiny_vit_idling": (lambda: make_tiny_vit(depths=(1, 2), embed_dims=(16, 32), num_heads=(1, 2),
                                              window_sizes=(4, 4)), "idle", dict(stage_starts=(1,)), 80),
    # a distilled PiT: selections in stage 0 and after each pooling (global attention sub-sampled), representative
    "pit_evo": (lambda: make_pit("distilled"), "evo", dict(stage_starts=(1,), representative=True), 32),
    "pit_idle": (lambda: make_pit("distilled"), "idle", dict(stage_starts=(1,)), 32),
    # one MaxViT block: an MBConv (dense), then window and grid attention idling with the einsum-made bias
    "maxvit": (lambda: make_maxvit("tf_bias", depths=(1,), embed_dim=(16,)), "idle", dict(stage_starts=(1,)), 64),
    # CoAtNet: an MBConv stage, a strided transformer block (dense), then two over the whole map idling
    "coatnet": (lambda: make_maxvit("coatnet_bn", depths=(1, 3)), "idle", dict(stage_starts=(2,)), 64),
    # the VLM towers: Qwen's resampled position grid and 2x2 merger under Evo, DeepSeek's padded 3x3 aligner
    "qwen3_vit": (lambda: make_tower("qwen_cls_merge"), "evo", dict(), 32),
    "deepseek_vit": (lambda: make_tower("deepseek_enc"), "idle", dict(), 32),
    # Gemma 4's encoder: its own forward patched, clamped projections, the soft pooler after Idle
    "gemma4_vit": (lambda: make_gemma("enc_soft"), "idle", dict(), 32),
}


INDUCTOR_ALWAYS = ("vit", "pvt_v2")  # Evo's gathers, scatters and representative merge; Idle on a pyramid
INDUCTOR_ALL = os.environ.get("TOKENPACE_TEST_INDUCTOR") == "all"


def _compiled_equals_eager(family, backend, tolerance):
    build, method, options, size = CASES[family]
    torch._dynamo.reset()  # a worker's earlier compiles do not count towards dynamo's recompile limit
    model = tokenpace.apply(build(), method, keep=0.5, **options)
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(images)
        got = torch.compile(model, fullgraph=True, backend=backend)(images)
    assert torch.allclose(got, expected, atol=tolerance, rtol=tolerance), (got - expected).abs().max()


@pytest.mark.parametrize("family", list(CASES))
def test_aot_autograd_full_graph(family):
    _compiled_equals_eager(family, "aot_eager", 1e-5)


@pytest.mark.parametrize("family", list(CASES))
def test_inductor_full_graph(family):
    if family not in INDUCTOR_ALWAYS and not INDUCTOR_ALL:
        pytest.skip("inductor on every family is opt-in: TOKENPACE_TEST_INDUCTOR=all (cold, its C++ compiles take "
                    "15-45 s a family on 2 cores)")
    _compiled_equals_eager(family, "inductor", 1e-4)


@pytest.mark.parametrize("family", ["vit", "vit_no_class_token", "eva_rope_mixed", "evo_levit", "swin", "pvt_v2",
                                    "sam", "hiera", "hieradet", "tiny_vit_idling", "pit_evo", "maxvit", "xcit", "volo",
                                    "davit", "coatnet", "qwen3_vit", "deepseek_vit", "gemma4_vit"])
def test_compiled_fresh_patch_does_not_recompile(family):
    """A model compiled straight after ``apply`` (as ``tokenpace bench --compile`` does) compiles once: nothing the
    first forward builds (the block anatomy) may change what the compiled graph's guards check. (Not timm's LeViT, nor
    TinyViT's dense attention blocks: their own per-device attention-bias cache, filled by the first eval forward,
    recompiles the dense model once too; tokenpace's Evo-LeViT has none, and idling blocks read the biases.)"""
    build, method, options, size = CASES[family]
    torch._dynamo.reset()
    model = tokenpace.apply(build(), method, keep=0.5, **options)
    compiled = torch.compile(model, backend="eager")
    images = torch.randn(2, 3, size, size)
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        first = compiled(images)
        for _ in range(2):
            assert torch.equal(compiled(images), first)


@pytest.mark.parametrize("method", ["evo", "idle", "evit", "topk"])
def test_full_graph_under_autocast(method):
    """The GPU suite times compiled models under bf16 autocast: the score paths that ask whether autocast is on
    (scoring's float32 dot product) must trace into the one graph too (torch.amp.is_autocast_available did not
    before torch 2.12)."""
    model = tokenpace.apply(make_vit("deit", depth=3), method, keep=0.5)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = model(images)
        got = torch.compile(model, fullgraph=True, backend="eager")(images)
    assert torch.equal(got, expected)


# not DeepSeek's or Gemma 4's tower: timm's own model exported under autocast does not run without it ("Tensor
# dtype mismatch! Expected: BFloat16, Got: float"), unpatched as patched
EXPORT_CASES = [("vit", m, {}) for m in ("evo", "idle", "evit", "topk")] + [
    (family, method, options) for family, (_, method, options, _) in CASES.items()
    if family not in ("vit", "deepseek_vit", "gemma4_vit")]


@pytest.mark.parametrize("family,method,options", EXPORT_CASES, ids=[f"{f}-{m}" for f, m, _ in EXPORT_CASES])
def test_export_under_autocast_runs_without_it(family, method, options):
    """A model exported with torch.export under an autocast the caller had on runs outside it, as the plain timm
    model does: no cast in the forward may pin a dtype the trace saw (casts ride in the reductions, the score side
    switches autocast off only where the tokens already have the weights' dtype, attention biases are cast by
    autocast, Evo's and EViT's merge weights too). Families whose token stream turns bf16 under autocast (Swin,
    LeViT) failed before. timm's EVA attention casts RoPE'd q and k with ``type_as``, so its own export keeps bf16
    there: on models with it (Eva, a NaFlexVit with RoPE, the Qwen3 tower), the patched model at keep=1 is held to
    the plain model's export instead."""
    build, _, _, size = CASES[family]
    pinned_by_timm = family in ("eva_rope_mixed", "naflexvit", "qwen3_vit")
    model = tokenpace.apply(build(), method, keep=1.0 if pinned_by_timm else 0.5, **options)
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        exported = torch.export.export(model, (images,))
        plain = torch.export.export(build(), (images,)) if pinned_by_timm else None
    with torch.no_grad():
        expected = plain.module()(images) if pinned_by_timm else model(images)
        torch.testing.assert_close(exported.module()(images), expected, rtol=1e-5, atol=1e-5)
