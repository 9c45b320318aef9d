"""The public API: apply/remove, state_dict, train vs eval, per-image results, trace, dtypes, compile."""
import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

import tokenpace
from conftest import embed, make_vit, ref_block, ref_idle_select

DEFAULTS = [("evo", {}), ("evo", {"representative": True}), ("evo", {"mode": "layer"}), ("idle", {}),
            ("evit", {}), ("topk", {})]


@pytest.mark.parametrize("method,options", DEFAULTS, ids=str)
def test_apply_adds_no_parameters_and_remove_restores_exactly(method, options, images):
    model = make_vit("deit")
    keys = list(model.state_dict())
    n_params = sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        dense = model(images)
        assert tokenpace.apply(model, method, **options) is model
        assert list(model.state_dict()) == keys and sum(p.numel() for p in model.parameters()) == n_params
        assert not torch.allclose(model(images), dense, atol=1e-3)
        assert tokenpace.remove(model) is model
        assert type(model) is VisionTransformer and tokenpace.get_patch(model) is None
        assert torch.equal(model(images), dense)


def test_state_dict_round_trips_through_plain_timm(images):
    patched = tokenpace.apply(make_vit("layerscale", seed=3), "idle", keep=0.5)
    plain = make_vit("layerscale", seed=4)
    plain.load_state_dict(patched.state_dict(), strict=True)  # patched checkpoint -> plain timm
    back = tokenpace.apply(make_vit("layerscale", seed=5), "idle", keep=0.5)
    back.load_state_dict(plain.state_dict(), strict=True)  # and back into a patched model
    with torch.no_grad():
        assert torch.equal(back(images), patched(images))
        assert torch.equal(plain(images), tokenpace.remove(patched)(images))


def test_reapplying_replaces_the_previous_method(images):
    model = make_vit("deit")
    with torch.no_grad():
        idle_only = tokenpace.apply(make_vit("deit"), "idle", keep=0.5)(images)
        tokenpace.apply(model, "evo", keep=0.5)
        tokenpace.apply(model, tokenpace.Idle(keep=0.5))
        assert isinstance(tokenpace.get_patch(model).config, tokenpace.Idle)
        assert torch.equal(model(images), idle_only)
        assert type(tokenpace.remove(model)) is VisionTransformer


def test_failed_reapply_keeps_the_current_patch():
    model = tokenpace.apply(make_vit("deit"), "evo")
    with pytest.raises(ValueError):
        tokenpace.apply(model, "idle", stage_starts=(3, 40))
    assert isinstance(tokenpace.get_patch(model).config, tokenpace.Evo)


@pytest.mark.parametrize("method,options", DEFAULTS, ids=str)
def test_train_and_eval_forwards_agree(method, options, images):
    model = tokenpace.apply(make_vit("avg"), method, **options)
    with torch.no_grad():
        evaluated = model.eval()(images)
        trained = model.train()(images)
    assert torch.allclose(trained, evaluated, atol=1e-5)


@pytest.mark.parametrize("method,options", DEFAULTS, ids=str)
def test_results_are_per_image(method, options, images):
    model = tokenpace.apply(make_vit("distilled"), method, **options)
    with torch.no_grad():
        batch = model(images)
        alone = torch.cat([model(images[i:i + 1]) for i in range(len(images))])
    assert torch.allclose(batch, alone, atol=1e-5)


def test_gradients_flow_in_training_mode(images):
    for method in ("evo", "idle", "evit", "topk"):
        model = tokenpace.apply(make_vit("deit"), method).train()
        model(images).sum().backward()
        grads = [p.grad for p in model.blocks[-1].parameters()]
        assert all(g is not None and g.abs().sum() > 0 for g in grads), method


def test_idle_exposes_what_the_cut_loss_needs_in_training(images):
    model = tokenpace.apply(make_vit("deit"), "idle", keep=0.5).train()
    model(images)
    records = tokenpace.get_patch(model).last_state.records
    assert [r.layer for r in records] == list(range(3, 12))
    assert records[0].normed.shape == (4, 65, 48) and records[0].index.shape == (4, 1 + 32)
    assert records[0].normed.requires_grad
    model.eval()
    with torch.no_grad():
        model(images)
    assert tokenpace.get_patch(model).last_state.records == []  # nothing kept alive at inference


def _valid_unique(idx, num_patches):
    assert idx.dtype == torch.long and idx.min() >= 0 and idx.max() < num_patches
    assert all(len(set(row.tolist())) == len(row) for row in idx)


def test_trace_idle_records_the_top_scoring_tokens(images):
    model = tokenpace.apply(make_vit("registers"), "idle", keep=0.7)
    with torch.no_grad(), tokenpace.trace(model) as tr:
        model(images)
    assert tr.kept[:3] == [None, None, None]
    assert [k.shape[1] for k in tr.kept[3:]] == [44] * 3 + [31] * 3 + [21] * 3  # int(64 * 0.7**s)
    # replay the forward densely and check each layer's choice against the official selection
    x = embed(model, images)
    with torch.no_grad():
        for i, blk in enumerate(model.blocks):
            if tr.kept[i] is None:
                x, _ = ref_block(blk, x)
                continue
            _valid_unique(tr.kept[i], 64)
            expected = ref_idle_select(blk, x, 5, tr.kept[i].shape[1])
            assert torch.equal(tr.kept[i].sort(1).values, expected.sort(1).values)
            idx = torch.cat([torch.arange(5).expand(4, -1), tr.kept[i] + 5], 1)
            sub, _ = ref_block(blk, x.gather(1, idx.unsqueeze(-1).expand(-1, -1, 48)))
            x = x.scatter(1, idx.unsqueeze(-1).expand(-1, -1, 48), sub)


def test_trace_evo_first_selection_is_the_top_class_attention(images):
    model = tokenpace.apply(make_vit("deit"), "evo", keep=0.5)
    with torch.no_grad(), tokenpace.trace(model) as tr:
        model(images)
        x = embed(model, images)
        for blk in model.blocks[:4]:
            x, probs = ref_block(blk, x)
    assert tr.kept[:4] == [None] * 4
    g = probs[:, :, 0, 1:].sum(1)
    expected = g.argsort(1, descending=True)[:, :32]
    assert torch.equal(tr.kept[4].sort(1).values, expected.sort(1).values)
    assert all(torch.equal(tr.kept[i], tr.kept[4]) for i in range(4, 8))  # one selection per stage
    assert not torch.equal(tr.kept[8], tr.kept[4])
    for k in tr.kept[4:]:
        _valid_unique(k, 64)


def test_trace_evit_and_topk(images):
    model = tokenpace.apply(make_vit("deit"), "evit", keep=0.7)
    with torch.no_grad(), tokenpace.trace(model) as tr:
        model(images)
    assert [None if k is None else k.shape[1] for k in tr.kept] == [None] * 3 + [46] * 3 + [34] * 3 + [25] * 3
    for i, k in enumerate(tr.kept[3:]):
        real = k[k >= 0]
        # fused tokens are marked -1; one is made per shrink layer and an earlier one may be kept as a token
        assert real.max() < 64 and (k == -1).sum(1).ge(1).all() and (k == -1).sum(1).le(1 + i // 3).all()
        assert all(len(set(r[r >= 0].tolist())) == int((r >= 0).sum()) for r in k)
    tokenpace.apply(model, "topk", keep=0.25)
    with torch.no_grad(), tokenpace.trace(model) as tr:
        model(images)
    assert tr.kept[3] is None and all(k.shape == (4, 16) for k in tr.kept[4:])


def test_trace_needs_a_patched_model():
    with pytest.raises(ValueError, match="apply"):
        with tokenpace.trace(make_vit("deit")):
            pass


@pytest.mark.parametrize("method", ["evo", "idle", "evit", "topk"])
def test_bf16_autocast_gives_finite_outputs(method, images):
    model = tokenpace.apply(make_vit("deit"), method)
    for dtype in (torch.bfloat16, torch.float16):
        with torch.inference_mode(), torch.autocast("cpu", dtype=dtype):
            out = model(images)
        assert out.dtype == dtype and torch.isfinite(out).all()
    model = tokenpace.apply(make_vit("deit").to(torch.bfloat16), method)
    with torch.inference_mode():
        assert torch.isfinite(model(images.to(torch.bfloat16))).all()


def test_torch_compile_full_graph(images):
    model = tokenpace.apply(make_vit("deit", depth=6), "idle", keep=0.5)
    with torch.no_grad():
        expected = model(images)
        compiled = torch.compile(model, fullgraph=True, backend="eager")
        assert torch.allclose(compiled(images), expected, atol=1e-5)


def test_inference_mode_and_batch_size_one_and_zero(images):
    for method in ("evo", "idle", "evit", "topk"):
        model = tokenpace.apply(make_vit("deit"), method)
        with torch.inference_mode():
            assert model(images[:1]).shape == (1, 10)
            assert model(images[:0]).shape == (0, 10)  # an empty batch, as the plain model runs it


def test_fused_attention_switch_after_apply_takes_effect(images):
    """timm's per-module ``fused_attn`` switch, flipped after ``apply``, is read by the patched forward too."""
    model = tokenpace.apply(make_vit("deit"), "idle", keep=0.5)
    parts = tokenpace.patch.get_patch(model).adapter.parts(0)
    assert parts.fused is model.blocks[0].attn.fused_attn
    for block in model.blocks:
        block.attn.fused_attn = not block.attn.fused_attn
    assert parts.fused is model.blocks[0].attn.fused_attn


def _selection_share(model, images, dtype):
    """Mean and least share of each image's fp32 full-path tokens that the ``dtype`` forward selects too."""
    with torch.no_grad(), tokenpace.trace(model) as tr:
        model(images)
    reference = tr.kept
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype), tokenpace.trace(model) as tr:
        model(images)
    shares = [len(set(a.tolist()) & set(b.tolist())) / a.numel()
              for ref, got in zip(reference, tr.kept) if ref is not None for a, b in zip(ref, got)]
    return sum(shares) / len(shares), min(shares)


@pytest.mark.parametrize("method", ["evo", "idle", "evit", "topk"])
@pytest.mark.parametrize("variant", ["deit", "eva02", "siglip_map", "beit", "relpos_gap", "naflex_radio",
                                     "diff_parallel_reg_gap"])
def test_bf16_selections_agree_with_fp32(method, variant):
    from backbones import make_backbone

    model = make_vit(variant) if variant == "deit" else make_backbone(variant)
    images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    mean, least = _selection_share(tokenpace.apply(model, method), images, torch.bfloat16)
    assert mean >= 0.9 and least >= 0.75, (mean, least)  # measured: mean 0.94-1.0, least 0.8-1.0


def _families():
    import timm
    from timm.models.pvt_v2 import PyramidVisionTransformerV2
    from timm.models.swin_transformer import SwinTransformer

    from backbones import make_backbone
    from conftest import spread_weights
    from test_cait import make_cait
    from test_davit import make_davit
    from test_volo import make_volo
    from test_xcit import make_xcit
    from test_hiera import make_hiera
    from test_hieradet import make_hieradet
    from test_maxvit import make_maxvit
    from test_pit import make_pit
    from test_tiny_vit import make_tiny_vit
    from test_gemma4_vit import make_tower as make_gemma
    from test_vlm_vit import make_tower
    from test_sam import make_sam
    from test_swin import make_swin

    small_levit = dict(embed_dim=(32, 48), key_dim=8, num_heads=(2, 3), depth=(2, 1))
    return {
        "vit": (make_vit("registers"), "evo", 32),
        "eva": (make_backbone("dinov3"), "idle", 32),
        "beit": (make_backbone("beit_both_swiglu"), "evo", 32),
        "vit_relpos": (make_backbone("relpos_rpn_swin_mlp"), "idle", 32),
        "naflexvit": (make_backbone("naflex_rope_mixed"), "evo", 32),
        "vit_parallel_things": (make_backbone("parallel_things"), "idle", 32),
        "cait": (make_cait(), "evit", 32),
        "xcit": (make_xcit(), "idle", 64),
        "volo": (make_volo(), "evo", 96),
        "davit": (make_davit("v2_florence"), "idle", 72),
        "levit": (spread_weights(timm.create_model("levit_cifar", **small_levit)).eval(), "evo", 32),
        "evo_levit": (spread_weights(timm.create_model("evo_levit_cifar", **small_levit)).eval(), "evo", 32),
        "swin": (spread_weights(SwinTransformer(img_size=32, patch_size=2, embed_dim=16, depths=(2, 2),
                                                num_heads=(2, 2), window_size=4, num_classes=10)).eval(), "idle", 32),
        "swin_v2": (make_swin("v2_padded", depths=(2,), num_heads=(2,)), "idle", 40),
        "swin_v2_cr": (make_swin("cr_padded", depths=(2,), num_heads=(2,)), "idle", 40),
        "pvt_v2": (spread_weights(PyramidVisionTransformerV2(depths=(1, 2), embed_dims=(16, 32), num_heads=(1, 2),
                                                              sr_ratios=(4, 2), mlp_ratios=(4, 4),
                                                              num_classes=10)).eval(), "idle", 64),
        "sam": (make_sam("qk_norm"), "idle", 80),
        "hiera": (make_hiera("layerscale", img_size=128), "idle", 128),
        "hieradet": (make_hieradet("layerscale", window_spec=(4, 2, 4, 4)), "idle", 128),  # keep**3: 2 of 16
        "tiny_vit": (make_tiny_vit("padded", window_sizes=(4, 4, 4, 4)), "idle", 80),
        "pit": (make_pit("distilled"), "evo", 32),
        "maxvit": (make_maxvit("rmlp"), "idle", 64),
        "coatnet": (make_maxvit("coatnet"), "idle", 64),
        "qwen3_vit": (make_tower("qwen_cls_merge"), "evo", 32),
        "deepseek_vit": (make_tower("deepseek_enc"), "idle", 32),
        "gemma4_vit": (make_gemma("enc_soft"), "idle", 32),  # the encoder's own forward patched too
    }


def test_a_replica_sharing_the_originals_patch_is_refused():
    """nn.DataParallel copies a module's __dict__ into each replica: the patch in it would run the original's
    modules on the replica's device, so a replica's forward is refused, naming what to use instead."""
    model = tokenpace.apply(make_vit("deit", depth=2), "idle")
    replica = model._replicate_for_data_parallel()  # what nn.parallel.replicate makes of each module
    images = torch.randn(1, 3, 32, 32)
    for call in (lambda: replica(images), lambda: replica.forward_intermediates(images)):
        with pytest.raises(RuntimeError, match="is a copy whose tokenpace patch still drives the module it was copied "
                                               "from .*DistributedDataParallel"):
            call()
    model(images)  # the original runs


def test_training_records_of_the_previous_forward_are_released_before_the_next_runs(monkeypatch):
    """Patch.last_state holds the cut loss's activations (with their graph): a new forward drops them first, so two
    forwards' records never live at once."""
    model = tokenpace.apply(make_vit("deit", depth=4), "idle").train()
    patch = tokenpace.get_patch(model)
    model(torch.randn(2, 3, 32, 32))
    assert patch.last_state.records  # what the cut loss reads
    seen = []
    run = patch.policy.run
    monkeypatch.setattr(patch.policy, "run", lambda x, state: seen.append(patch.last_state) or run(x, state))
    model(torch.randn(2, 3, 32, 32))
    assert seen == [None] and patch.last_state.records


def test_a_keep_that_keeps_no_token_is_refused():
    """K = int(P * ratio) is never silently raised to 1 (cost and accuracy would not be those asked for)."""
    model = make_vit("deit", depth=12)  # 64 patches; Idle keeps keep**3 in its third stage
    with pytest.raises(ValueError, match=r"idle keep=0.2 on this timm VisionTransformer model: a block would run on "
                                         r"no token: a keep ratio of 0.008 keeps int\(64 \* 0.008\) = 0 of 64 "
                                         "tokens.*choose a larger keep"):
        tokenpace.apply(model, "idle", keep=0.2)
    assert tokenpace.get_patch(model) is None  # nothing was patched
    for method, keep in (("evo", 0.01), ("topk", 0.01)):
        with pytest.raises(ValueError, match=f"{method} keep=0.01 .* = 0 of 64 tokens"):
            tokenpace.apply(model, method, keep=keep)
    tokenpace.apply(model, "idle", keep=0.3)  # int(64 * 0.027) = 1: one token runs
    assert tokenpace.get_patch(model).config.keep == 0.3
    tokenpace.apply(model, "evit", keep=0.01)  # EViT's ceiling keeps one token at least, as the official code


@pytest.mark.parametrize("family", ["vit", "eva", "beit", "vit_relpos", "naflexvit", "vit_parallel_things", "cait",
                                    "xcit", "levit", "evo_levit", "swin", "swin_v2", "swin_v2_cr", "pvt_v2", "sam",
                                    "hiera", "hieradet", "tiny_vit", "pit", "maxvit",
                                    "coatnet", "qwen3_vit", "deepseek_vit", "gemma4_vit", "volo",
                                    "davit"])
def test_patched_models_pickle_deepcopy_and_torch_save(family, tmp_path):
    import copy
    import pickle

    model, method, size = _families()[family]
    tokenpace.apply(model, method, keep=0.5)
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    path = tmp_path / "model.pt"
    torch.save(model, path)
    copies = [pickle.loads(pickle.dumps(model)), copy.deepcopy(model), torch.load(path, weights_only=False)]
    with torch.no_grad():
        expected = model(images)
        for other in copies:
            patch = tokenpace.get_patch(other)
            assert patch is not None and patch.config == tokenpace.get_patch(model).config
            assert patch.adapter.model is other  # the copy runs its own weights
            assert torch.equal(other(images), expected)
            assert type(tokenpace.remove(other)) is tokenpace.get_patch(model).original_class


def test_a_projection_that_adds_to_its_weights_is_refused():
    """Scores and split q/k/v projections read a projection's weight and bias: a layer whose forward adds more
    (a LoRA adapter, as peft's wrapper or a Linear subclass) is refused, naming the fix; timm's Linear is plain."""
    from timm.layers import Linear as TimmLinear

    class LoraWrapped(torch.nn.Module):  # peft's shape: the base layer's weight and bias, plus a low-rank delta
        def __init__(self, base):
            super().__init__()
            self.base_layer, self.a = base, torch.nn.Linear(base.in_features, 2, bias=False)
            self.b = torch.nn.Linear(2, base.out_features, bias=False)

        weight = property(lambda self: self.base_layer.weight)
        bias = property(lambda self: self.base_layer.bias)

        def forward(self, x):
            return self.base_layer(x) + self.b(self.a(x))

    class LoraLinear(torch.nn.Linear):  # loralib's shape: a Linear subclass with its own forward
        def forward(self, x):
            return super().forward(x) * 2

    def plain_qkv(model):
        return torch.nn.Linear(model.blocks[1].attn.qkv.in_features, model.blocks[1].attn.qkv.out_features)

    for wrap in (LoraWrapped, lambda base: LoraLinear(base.in_features, base.out_features)):
        model = make_vit("deit", depth=2)
        model.blocks[1].attn.qkv = wrap(model.blocks[1].attn.qkv)
        with pytest.raises(TypeError, match=r"attn.qkv of a Block is a Lora\w+, not a plain torch.nn.Linear: .*merge "
                                            r"that into the weights first \(peft: merge_and_unload\(\)\)"):
            tokenpace.apply(model, "idle")
        assert tokenpace.get_patch(model) is None
        model.blocks[1].attn.qkv = model.blocks[1].attn.qkv.base_layer if wrap is LoraWrapped else plain_qkv(model)
        tokenpace.apply(model, "idle")  # wrapped after apply (peft patches Linears in place): refused at the forward
        model.blocks[1].attn.qkv = wrap(model.blocks[1].attn.qkv)
        with pytest.raises(TypeError, match=r"attn.qkv of a Block is a Lora\w+, not a plain torch.nn.Linear"):
            model(torch.ones(1, 3, 32, 32))
    model = make_vit("deit", depth=2)
    plain = model.blocks[1].attn.qkv
    model.blocks[1].attn.qkv = TimmLinear(plain.in_features, plain.out_features)
    model.blocks[1].attn.qkv.load_state_dict(plain.state_dict())
    expected = model(torch.ones(1, 3, 32, 32))
    assert torch.equal(tokenpace.apply(model, "idle", keep=1.0)(torch.ones(1, 3, 32, 32)), expected)
    other = torch.nn.Linear(plain.in_features, plain.out_features)  # other weights, swapped in after apply: read
    model.blocks[1].attn.qkv = other
    fresh = make_vit("deit", depth=2)
    fresh.blocks[1].attn.qkv = other
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    tokenpace.remove(model)
    model = tokenpace.apply(model, "idle", keep=1.0)
    assert torch.equal(model(images), fresh(images))
    reduced, reference = make_vit("deit", depth=2), make_vit("deit", depth=2)
    tokenpace.apply(reduced, "idle", keep=0.5)
    reduced.blocks[1].attn.qkv = reference.blocks[1].attn.qkv = other
    assert torch.equal(reduced(images), tokenpace.apply(reference, "idle", keep=0.5)(images))


def test_a_levit_projection_wrapped_after_apply_is_refused_at_either_level():
    """timm's LeViT projects q/k/v with a LinearNorm (a Linear, then a BatchNorm): a wrapper on the LinearNorm's
    Linear, or in place of the LinearNorm, is refused at the next forward; a plain Linear in its place (the
    BatchNorm fused after apply) runs."""
    from test_levit import make_levit

    class Doubled(torch.nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    model = tokenpace.apply(make_levit("levit_cifar"), "evo", keep=0.5)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    attn = model.stages[1].blocks[0].attn
    linear_norm, linear = attn.qkv, attn.qkv.linear
    for owner, name in ((linear_norm, "linear"), (attn, "qkv")):
        setattr(owner, name, Doubled(linear.in_features, linear.out_features))
        with pytest.raises(TypeError, match="attn.qkv of a LevitBlock is a Doubled, not a plain torch.nn.Linear"):
            model(images)
        setattr(owner, name, linear if name == "linear" else linear_norm)
    attn.qkv = torch.nn.Linear(linear.in_features, linear.out_features)
    assert model(images).isfinite().all()


def test_an_unknown_option_on_a_config_object_names_the_accepted_ones():
    with pytest.raises(ValueError, match="Evo got an unknown option .*; accepted: keep, stage_starts, mode"):
        tokenpace.apply(make_vit("deit", depth=4), tokenpace.Evo(), foo=1)
