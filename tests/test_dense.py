"""Dense outputs through the method: forward_intermediates, get_intermediate_layers and features_only models return
the full grid at each requested index; gradient checkpointing is honoured."""
import copy

import numpy as np
import pytest
import timm
import torch

import tokenpace
from backbones import make_backbone
from conftest import CIFAR, flatten_outputs, make_vit, needs_cifar, spread_weights
from test_hiera import make_hiera
from test_hieradet import make_hieradet
from test_maxvit import make_maxvit
from test_gemma4_vit import make_tower as make_gemma
from test_vlm_vit import make_tower
from test_pit import make_pit
from test_tiny_vit import make_tiny_vit
from test_sam import make_sam
from test_swin import make_swin

SMALL_LEVIT = dict(embed_dim=(32, 48, 64), key_dim=8, num_heads=(2, 3, 4), depth=(2, 2, 2))


def _swin():
    from timm.models.swin_transformer import SwinTransformer

    torch.manual_seed(0)
    return spread_weights(SwinTransformer(img_size=32, patch_size=2, embed_dim=16, depths=(2, 2, 2), num_heads=(2, 2, 4),
                                          window_size=4, num_classes=10)).eval()


def _pvt():
    from timm.models.pvt_v2 import PyramidVisionTransformerV2

    torch.manual_seed(0)
    return spread_weights(PyramidVisionTransformerV2(depths=(1, 2, 1), embed_dims=(16, 32, 48), num_heads=(1, 2, 3),
                                                     sr_ratios=(4, 2, 1), mlp_ratios=(4, 4, 4),
                                                     num_classes=10)).eval()


def _levit(name, **options):
    torch.manual_seed(0)
    return spread_weights(timm.create_model(name, **SMALL_LEVIT, **options)).eval()


def _small(name):
    torch.manual_seed(0)
    return spread_weights(timm.create_model(name, img_size=32, patch_size=4, depth=4, embed_dim=32, num_heads=2,
                                            num_classes=10)).eval()


FAMILIES = {  # name: (build, input size, methods, flat)
    "vit_registers": (lambda: make_vit("registers", depth=6), 32, ("evo", "idle", "evit", "topk"), True),
    "vit_siglip_map": (lambda: make_backbone("siglip_map"), 32, ("evo", "idle", "evit", "topk"), True),
    "eva_rope_mixed": (lambda: make_backbone("rope_mixed"), 32, ("evo", "idle", "evit", "topk"), True),
    "eva_dinov3": (lambda: make_backbone("dinov3"), 32, ("evo", "idle"), True),
    "beit": (lambda: make_backbone("beit_shared_abs_token"), 32, ("evo", "idle", "evit", "topk"), True),
    "vit_relpos": (lambda: make_backbone("relpos_rpn_swin_mlp"), 32, ("evo", "idle", "evit", "topk"), True),
    "naflexvit": (lambda: make_backbone("naflex_radio"), 32, ("evo", "idle", "evit", "topk"), True),
    "vit_parallel_things": (lambda: make_backbone("parallel_things"), 32, ("evo", "idle", "evit", "topk"), True),
    "lvvit": (lambda: _small("lvvit_s"), 32, ("evo", "idle", "evit", "topk"), True),
    "evo_deit": (lambda: _small("evo_deit_small_patch16_224"), 32, ("evo", "idle", "evit", "topk"), True),
    "levit": (lambda: _levit("levit_cifar"), 32, ("evo", "idle"), False),
    "levit_conv": (lambda: _levit("levit_cifar", use_conv=True), 32, ("evo", "idle"), False),
    "evo_levit": (lambda: _levit("evo_levit_cifar"), 32, ("evo", "idle"), False),
    "swin": (_swin, 32, ("idle",), False),
    "swin_v2": (lambda: make_swin("v2_shifted", embed_dim=16, depths=(2, 2, 2), num_heads=(2, 2, 4)), 32, ("idle",),
                False),
    "swin_v2_cr": (lambda: make_swin("cr_shifted", embed_dim=16, depths=(2, 2, 2), num_heads=(2, 2, 4)), 32,
                   ("idle",), False),
    "pvt_v2": (_pvt, 64, ("idle",), False),
    "sam": (lambda: make_sam("padded"), 80, ("idle",), False),
    "hiera": (lambda: make_hiera(img_size=128), 128, ("idle",), False),  # keep**3 keeps 2 of its last 16
    "hieradet": (lambda: make_hieradet(window_spec=(4, 2, 4, 4)), 128, ("idle",), False),  # keep**3: 2 of 16
    "tiny_vit": (lambda: make_tiny_vit(window_sizes=(4, 4, 4, 4)), 80, ("idle",), False),
    "pit": (lambda: make_pit("distilled"), 32, ("evo", "idle"), False),
    "maxvit": (lambda: make_maxvit("tf_bias"), 64, ("idle",), False),  # the stem's map is feature 0
    "coatnet": (lambda: make_maxvit("coatnet_rmlp"), 64, ("idle",), False),  # NCHW attention over the whole map
    "qwen3_vit": (lambda: make_tower("qwen_cls_merge"), 32, ("evo", "idle"), False),  # features: the merger's
    "deepseek_vit": (lambda: make_tower("deepseek_enc_map"), 32, ("evo", "idle"), False),  # features: the NHWC map
    "gemma4_vit": (lambda: make_gemma("cls"), 32, ("evo", "idle"), False),  # features: every raw token
}


def _images(size, batch=2):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


def _option_sets(flat, model):
    # timm's Hiera and HieraDet norm no map (they assert norm=False); TinyViT and PiT ignore norm (tokenpace refuses
    # it)
    norm = not isinstance(model, (timm.models.hiera.Hiera, timm.models.hieradet_sam2.HieraDet,
                                  timm.models.tiny_vit.TinyVit, timm.models.pit.PoolingVisionTransformer,
                                  timm.models.qwen3_vit.Qwen3VitClassifier,
                                  timm.models.gemma4_vit.Gemma4VitClassifier))
    sets = [dict(), dict(indices=2), dict(indices=[0], stop_early=True), dict(intermediates_only=True, norm=norm)]
    if flat:
        sets += [dict(output_fmt="NLC", return_prefix_tokens=True, norm=True), dict(output_dict=True, indices=[1, 3])]
    return sets


@pytest.mark.parametrize("family", list(FAMILIES))
def test_keep_one_intermediates_equal_the_unpatched_model(family):
    build, size, methods, flat = FAMILIES[family]
    model, images = build(), _images(size)
    for options in _option_sets(flat, model):
        if options.get("output_dict") and not hasattr(model, "pool_include_prefix"):
            continue  # output_dict is timm VisionTransformer's alone
        with torch.no_grad():
            expected = flatten_outputs(tokenpace.remove(model).forward_intermediates(images, **options))
            for method in methods:
                got = flatten_outputs(tokenpace.apply(model, method, keep=1.0).forward_intermediates(images, **options))
                assert len(got) == len(expected), (method, options)
                for a, b in zip(got, expected):
                    assert a.shape == b.shape and torch.equal(a, b), (method, options)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_positional_intermediate_arguments_keep_the_models_own_order(family):
    """timm's ViT and Eva take return_prefix_tokens third, the others norm: a patched model reads them as its class."""
    build, size, methods, _ = FAMILIES[family]
    model, images = build(), _images(size)
    # Hiera: (mask, indices, norm, stop_early)
    args = {"hiera": (None, [1], False, False), "hieradet": ([1], False, False),
            "tiny_vit": ([1], False, False), "pit": ([1], False, False),
            "gemma4_vit": (None, None, [1], False)}.get(family, ([1], True))  # Gemma: (patch_coord, patch_valid, ...)
    with torch.no_grad():
        expected = flatten_outputs(tokenpace.remove(model).forward_intermediates(images, *args))
        got = flatten_outputs(tokenpace.apply(model, methods[0], keep=1.0).forward_intermediates(images, *args))
    assert len(got) == len(expected) and all(torch.equal(a, b) for a, b in zip(got, expected))


def test_intermediate_arguments_the_class_does_not_take_are_refused_as_unpatched():
    model = make_backbone("rope_mixed")  # timm's Eva has no output_dict
    images = _images(32)
    with pytest.raises(TypeError, match="output_dict"):
        model.forward_intermediates(images, output_dict=True)
    tokenpace.apply(model, "idle")
    with pytest.raises(TypeError, match="output_dict"):
        model.forward_intermediates(images, output_dict=True)
    with pytest.raises(ValueError, match="attention masks"):
        model.forward_intermediates(images, attn_mask=torch.ones(1, 1, 65, 65, dtype=torch.bool))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_reduced_intermediates_are_full_grids_and_end_at_forward_features(family):
    build, size, methods, flat = FAMILIES[family]
    model, images = build(), _images(size)
    with torch.no_grad():
        dense_final, dense_maps = model.forward_intermediates(images)
        for method in methods:
            tokenpace.apply(model, method, keep=0.7)  # keep**3 keeps 1 of the pyramids' last 4 tokens
            final, maps = model.forward_intermediates(images)
            assert [m.shape for m in maps] == [m.shape for m in dense_maps], method
            assert torch.allclose(final, model.forward_features(images), atol=1e-5), method
            assert not torch.allclose(maps[-1], dense_maps[-1], atol=1e-3), method  # the method ran
            if flat and method in ("evo", "idle"):  # every token kept: the last map is forward_features' patches
                last = model.forward_intermediates(images, indices=[len(model.blocks) - 1], norm=True,
                                                   output_fmt="NLC", intermediates_only=True)[0]
                assert torch.allclose(last, model.forward_features(images)[:, model.num_prefix_tokens:], atol=1e-5)


def test_get_intermediate_layers_and_features_only_models_run_the_method():
    images = _images(32)
    model = make_vit("deit", depth=6)
    with torch.no_grad():
        dense = model.get_intermediate_layers(images, n=2, reshape=True)
        tokenpace.apply(model, "idle", keep=0.5)
        idled = model.get_intermediate_layers(images, n=2, reshape=True)
    assert [t.shape for t in idled] == [t.shape for t in dense] == [(2, 48, 8, 8)] * 2
    assert not torch.allclose(idled[-1], dense[-1], atol=1e-3)
    for name, kwargs in [("vit_tiny_patch16_224", dict(img_size=32, patch_size=4)),
                         ("naflexvit_base_patch16_siglip", dict(patch_size=4, embed_dim=48, depth=4, num_heads=3,
                                                                pos_embed_grid_size=(8, 8))),
                         ("swin_tiny_patch4_window7_224", dict(img_size=32, patch_size=2, window_size=4,
                                                               feature_cls="getter")),
                         ("samvit_base_patch16", dict(img_size=32, patch_size=4, embed_dim=32, depth=4, num_heads=2,
                                                      window_size=4, global_attn_indexes=(1, 3), neck_chans=16)),
                         ("hiera_tiny_224", dict(img_size=32, patch_stride=(2, 2), embed_dim=16, num_heads=1,
                                                 stages=(1, 2, 3, 2))),
                         ("sam2_hiera_tiny", dict(patch_stride=(2, 2), embed_dim=16, num_heads=1, stages=(1, 2, 3, 2),
                                                  window_spec=(4, 2, 4, 2), global_att_blocks=(4,),
                                                  global_pos_size=(4, 4))),
                         ("tiny_vit_5m_224", dict(feature_cls="getter", embed_dims=(16, 32, 32, 64),
                                                  depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1),
                                                  window_sizes=(4, 4, 4, 4))),
                         ("pit_ti_224", dict(feature_cls="getter", img_size=32, patch_size=4, stride=2,
                                             base_dims=(8, 8, 8), depth=(2, 2, 2), heads=(1, 2, 2))),
                         ("maxvit_tiny_rw_224", dict(feature_cls="getter", img_size=32, embed_dim=(16, 32),
                                                     depths=(1, 1), stem_width=(8, 16), transformer_window_size=2,
                                                     transformer_grid_size=2, transformer_dim_head=8,
                                                     out_indices=(0, 1, 2)))]:
        torch.manual_seed(0)
        features = timm.create_model(name, features_only=True, **kwargs).eval()
        with torch.no_grad():
            dense = features(images)
            got = tokenpace.apply(features, "idle", keep=0.7)(images)
            assert tokenpace.get_patch(features) is not None
            assert [t.shape for t in got] == [t.shape for t in dense]
            assert not torch.allclose(got[-1], dense[-1], atol=1e-4)
            assert all(torch.equal(a, b) for a, b in zip(tokenpace.remove(features)(images), dense))


def test_refused_feature_requests_name_what_is_accepted():
    swin = tokenpace.apply(_swin(), "idle")
    with pytest.raises(ValueError, match="NCHW grids: accepted output_fmt='NCHW'"):
        swin.forward_intermediates(_images(32), output_fmt="NLC")
    with pytest.raises(TypeError, match="return_prefix_tokens"):  # as unpatched: timm's Swin does not take it
        swin.forward_intermediates(_images(32), return_prefix_tokens=True)
    vit = tokenpace.apply(make_vit("deit", depth=4), "evo")
    with pytest.raises(ValueError, match="output_fmt='NHWC' is not accepted; choose 'NCHW' or 'NLC'"):
        vit.forward_intermediates(_images(32), output_fmt="NHWC")
    with pytest.raises(ValueError, match="attention masks"):
        vit.forward_intermediates(_images(32), attn_mask=torch.zeros(65, 65))
    torch.manual_seed(0)
    listed = timm.create_model("swin_tiny_patch4_window7_224", features_only=True, img_size=32, patch_size=2,
                               window_size=4)
    with pytest.raises(TypeError, match="FeatureListNet.*feature_cls='getter'"):
        tokenpace.apply(listed, "idle")


def _linear_calls(block):
    """Count the calls of every Linear and convolution inside ``block`` (however the block is run: whole or through
    its parts; CoAtNet's MLP is convolutions)."""
    calls = []
    hooks = [m.register_forward_pre_hook(lambda module, args: calls.append(1))
             for m in block.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    return calls, hooks


@pytest.mark.parametrize("family,method", [("vit_registers", "evo"), ("vit_registers", "idle"),
                                           ("vit_registers", "evit"), ("eva_rope_mixed", "idle"),
                                           ("eva_rope_mixed", "topk"), ("beit", "evo"), ("vit_relpos", "idle"),
                                           ("naflexvit", "evo"),
                                           ("levit", "evo"), ("evo_levit", "evo"),
                                           ("swin", "idle"), ("swin_v2", "idle"), ("swin_v2_cr", "idle"),
                                           ("pvt_v2", "idle"), ("sam", "idle"), ("hiera", "idle"),
                                           ("hieradet", "idle"), ("tiny_vit", "idle"), ("maxvit", "idle"),
                                           ("coatnet", "idle"), ("qwen3_vit", "evo"), ("deepseek_vit", "idle"),
                                           ("gemma4_vit", "evo")])
def test_gradient_checkpointing_is_honoured_with_equal_gradients(family, method):
    build, size, _, _ = FAMILIES[family]
    plain = build().train()
    checkpointed = copy.deepcopy(plain)
    checkpointed.set_grad_checkpointing(True)
    images = _images(size)
    counts = []
    for model in (plain, checkpointed):
        tokenpace.apply(model, method, keep=0.5)
        calls, hooks = _linear_calls(tokenpace.get_patch(model).adapter.blocks[-1])
        torch.manual_seed(0)  # random drop path and dropout are replayed in the recomputation
        model(images).logsumexp(-1).mean().backward()
        for hook in hooks:
            hook.remove()
        counts.append(len(calls))
    assert counts[1] > counts[0] > 0  # the last block ran again in the backward pass
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters()):
        assert (a.grad is None) == (b.grad is None), name
        if a.grad is not None:
            assert torch.allclose(a.grad, b.grad, atol=1e-5, rtol=1e-4), name


def test_bench_memory_reports_a_positive_peak_per_configuration(tmp_path, capsys):
    import json

    from tokenpace.cli import main

    path = tmp_path / "memory.json"
    argv = ["bench", "--model", "vit_tiny_patch16_224", "--model-args", "img_size=32,patch_size=4", "--memory",
            "--batch-size", "4", "--methods", "dense,idle", "--json", str(path), "--quiet"]
    assert main(argv) == 0
    doc = json.loads(path.read_text())
    assert doc["measure"].startswith("peak RSS") and doc["train"] is False and doc["versions"]["torch"]
    assert doc["input_size"] == [3, 32, 32] and doc["model_args"] == {"img_size": 32, "patch_size": 4}
    rows = doc["results"]
    assert [r["method"] for r in rows] == ["dense", "idle"] and rows[1]["keep"] == 0.7
    for row in rows:
        assert set(row) >= {"config", "batch_size", "mode", "grad_checkpointing", "peak_mib", "baseline_mib"}
        assert row["peak_mib"] > 0 and row["baseline_mib"] > 0 and row["mode"] == "inference"
    assert "peak memory above the baseline" in capsys.readouterr().out
    assert main(["bench", "--model", "vit_tiny_patch16_224", "--memory", "--grad-checkpointing"]) == 2
    assert "--grad-checkpointing applies to training steps" in capsys.readouterr().err


def test_the_dense_backbone_example_runs():
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).parent.parent / "examples" / "dense_backbone.py"
    spec = importlib.util.spec_from_file_location("dense_backbone", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    for method in ("idle", "evo"):
        out = example.main(["--smoke", "--method", method])
        assert out["masks"].shape == (2, 64, 64) and out["loss"] > 0 and out["macs"][1] < out["macs"][0]


@needs_cifar
def test_cluttered_samples_know_their_box():
    from tokenpace.data import ClutteredDataset, PackedJpegDataset

    base = PackedJpegDataset(CIFAR, "test", limit=4)
    cluttered = ClutteredDataset(base, 64, seed=1)
    image, label, (x, y, w, h) = cluttered.sample(2)
    assert (w, h) == (32, 32) and 0 <= x <= 32 and 0 <= y <= 32 and image.size == (64, 64)
    assert label == cluttered[2][1] and (x, y) == cluttered.sample(2)[2][:2]  # the same box every time
    assert (np.asarray(image.crop((x, y, x + w, y + h))) == np.asarray(base.image(base.index[2].item()))).all()


def test_pruning_a_patched_model_is_refused_and_pruning_first_works():
    """The method is resolved for the blocks at apply: pruning after it would leave the method running the old ones."""
    images = _images(32)
    model = tokenpace.apply(make_vit("deit", depth=6), "idle", keep=1.0)
    with pytest.raises(RuntimeError, match="prune first, then apply"):
        model.prune_intermediate_layers([2])
    assert len(model.blocks) == 6
    tokenpace.remove(model).prune_intermediate_layers([2])
    with torch.no_grad():
        expected = model.forward_intermediates(images, [2])
        got = tokenpace.apply(model, "idle", keep=1.0).forward_intermediates(images, [2])
    assert len(model.blocks) == 3
    assert all(torch.equal(a, b) for a, b in zip(flatten_outputs(got), flatten_outputs(expected)))


def test_a_trace_of_a_forward_stopped_early_lists_the_blocks_that_ran():
    images = _images(32)
    model = tokenpace.apply(make_vit("deit", depth=6), "evo", keep=0.5, stage_starts=(2,))
    with torch.no_grad(), tokenpace.trace(model) as full:
        model(images)
    with torch.no_grad(), tokenpace.trace(model) as stopped:
        model.forward_intermediates(images, [3], stop_early=True, intermediates_only=True)
    assert len(full.kept) == 6 and len(stopped.kept) == 4  # blocks 4 and 5 never ran: not "every token" (None)
    assert stopped.kept[:2] == [None, None]
    assert all(torch.equal(a, b) for a, b in zip(stopped.kept[2:], full.kept[2:4]))
