"""Exactness: keep=1 is the original model; at keep<1 each method equals a literal reference of the official code."""
import pytest
import torch

import tokenpace
from conftest import VARIANTS, make_vit, ref_evit, ref_evo, ref_idle, ref_topk

ALL_TOKENS = [
    ("evo", {}), ("evo", {"mode": "layer"}), ("evo", {"representative": True}),
    ("evo", {"mode": "layer", "representative": True}),
    ("idle", {}), ("idle", {"project_keys": True}),
    ("evit", {}), ("evit", {"fuse": False}),
    ("topk", {}),
]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("method,options", ALL_TOKENS, ids=lambda v: str(v))
def test_keep_one_reproduces_the_unpatched_model(variant, method, options, images):
    model = make_vit(variant)
    dense_macs = tokenpace.macs(model)
    with torch.no_grad():
        expected = model(images)
        tokenpace.apply(model, method, keep=1.0, **options)
        with tokenpace.trace(model) as tr:
            got = model(images)
    assert torch.equal(got, expected), (got - expected).abs().max()  # bit-exact: the blocks run as they are
    assert tokenpace.macs(model) == dense_macs and tr.kept == [None] * len(model.blocks)  # and nothing is scored


@pytest.mark.parametrize("variant", ["deit", "avg", "distilled", "registers"])
@pytest.mark.parametrize("mode", ["stage", "layer"])
@pytest.mark.parametrize("representative", [False, True])
def test_evo_matches_the_official_algorithm(variant, mode, representative, images):
    model = make_vit(variant)
    with torch.no_grad():
        expected = ref_evo(model, images, 0.5, (4, 8), mode, representative)
        tokenpace.apply(model, "evo", keep=0.5, mode=mode, representative=representative)
        got = model(images)
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4), (got - expected).abs().max()
    assert not torch.allclose(got, tokenpace.remove(model)(images), atol=1e-3)  # the method did change something


@pytest.mark.parametrize("variant", ["deit", "distilled", "layerscale", "registers", "qknorm", "no_qkv_bias"])
@pytest.mark.parametrize("keep", [0.7, 0.5])
def test_idle_matches_official_eval_and_masked_training_paths(variant, keep, images):
    model = make_vit(variant)
    starts = (3, 6, 9) if len(model.blocks) == 12 else (2, 3, 5)  # depth 6: the scaled default
    with torch.no_grad():
        gathered = ref_idle(model, images, keep, starts)
        masked = ref_idle(model, images, keep, starts, masked=True)
        tokenpace.apply(model, "idle", keep=keep)
        got = model(images)
    assert torch.allclose(gathered, masked, atol=1e-4)  # the two official paths agree (spec §4.3)
    assert torch.allclose(got, gathered, atol=1e-4, rtol=1e-4), (got - gathered).abs().max()


@pytest.mark.parametrize("variant", ["deit", "avg", "distilled"])
@pytest.mark.parametrize("fuse", [True, False])
def test_evit_matches_reference(variant, fuse, images):
    model = make_vit(variant)
    with torch.no_grad():
        expected = ref_evit(model, images, 0.7, (3, 6, 9), fuse)
        tokenpace.apply(model, "evit", keep=0.7, fuse=fuse)
        got = model(images)
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4), (got - expected).abs().max()


def test_evit_fuses_a_single_leftover_token(images):
    """At keep 0.98 each shrink layer keeps ceil(0.98 * 64) = 63 of 64 tokens: the official code still fuses the one
    left over (its attention times itself), so the layer is not dense although the count stays 64."""
    model = make_vit("deit")
    with torch.no_grad():
        dense = model(images)
        expected = ref_evit(model, images, 0.98, (3, 6, 9), True)
        tokenpace.apply(model, "evit", keep=0.98)
        got = model(images)
    assert not torch.allclose(expected, dense, atol=1e-3)
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4), (got - expected).abs().max()


@pytest.mark.parametrize("variant", ["deit", "avg"])
def test_topk_matches_reference(variant, images):
    model = make_vit(variant)
    with torch.no_grad():
        expected = ref_topk(model, images, 0.5, 4)
        tokenpace.apply(model, "topk", keep=0.5)
        got = model(images)
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4)


def test_other_depths_use_scaled_schedules(images):
    model = make_vit("avg", depth=6)
    with torch.no_grad():
        expected = ref_evo(model, images, 0.5, (2, 4))
        got = tokenpace.apply(model, "evo")(images)
    assert torch.allclose(got, expected, atol=1e-4)
    with torch.no_grad():
        expected = ref_idle(model, images, 0.7, (2, 3, 5))
        got = tokenpace.apply(model, "idle")(images)
    assert torch.allclose(got, expected, atol=1e-4)
