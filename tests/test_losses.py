"""The token cut loss against the spec's step-by-step definition and its closed form (idlevit.md §5.1)."""
import pytest
import torch

import tokenpace
from tokenpace.anatomy import TokenSet
from tokenpace.losses import CUT_MODES, distill_kl, feature_mse, mean_head_logits, token_cut_loss

from conftest import make_vit


def _reference_cut(attn, normed, index, mode, num_prefix=1):
    """Literal §5.1: per-head logits, head mean, softmax, D = |m_i - m_j| with column 0 zeroed, E = m_i m_j."""
    B, n, _ = normed.shape
    q, k, _ = attn.qkv(normed).reshape(B, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    logits = ((q * attn.scale) @ k.transpose(-2, -1)).mean(1)
    A = logits.softmax(-1)
    m = torch.zeros(B, n).scatter(1, index, 1.0)
    D = (m.unsqueeze(2) - m.unsqueeze(1)).abs()
    D[:, :, :num_prefix] = 0
    E = m.unsqueeze(2) * m.unsqueeze(1)
    inter, intra = (D * A).sum(-1), (E * A).sum(-1)
    inter_loss, intra_loss = (inter ** 2).mean(), ((intra - m) ** 2).mean()
    closed = (2 * ((m * (A * (1 - m).unsqueeze(1)).sum(-1)) ** 2).sum(-1)
              + (((1 - m) * (A * m.unsqueeze(1))[:, :, num_prefix:].sum(-1)) ** 2).sum(-1)).sum() / (B * n)
    return {"both": inter_loss + intra_loss, "inter": inter_loss, "intra": intra_loss, "none": 0.0}[mode], closed


@pytest.mark.parametrize("mode", CUT_MODES)
def test_cut_loss_matches_definition_and_closed_form(mode):
    model = tokenpace.apply(make_vit("deit"), "idle", keep=0.5).train()
    model(torch.randn(3, 3, 32, 32))
    records, parts = _records(model)
    attns = [model.blocks[r.layer].attn for r in records]
    got = token_cut_loss(records, parts, num_prefix=1, mode=mode)
    with torch.no_grad():
        refs = [_reference_cut(a, r.normed, r.index, mode) for r, a in zip(records, attns)]
    expected = sum(float(ref) for ref, _ in refs) / len(refs)
    assert got.item() == pytest.approx(expected, rel=1e-4, abs=1e-6)
    if mode == "both":
        closed = sum(float(c) for _, c in refs) / len(refs)
        assert got.item() == pytest.approx(closed, rel=1e-4)
        assert got.item() > 0
        got.backward()
        assert model.blocks[3].attn.qkv.weight.grad.abs().sum() > 0  # reaches W_q, W_k of the idling layer


def _records(model):
    patch = tokenpace.get_patch(model)
    records = patch.last_state.records
    return records, [patch.adapter.parts(r.layer) for r in records]


def test_mean_head_logits_is_one_product():
    model = tokenpace.apply(make_vit("qknorm"), "idle")
    attn = model.blocks[0].attn
    parts = tokenpace.get_patch(model).adapter.parts(0)
    normed = torch.randn(2, 9, 48)
    B, n, _ = normed.shape
    q, k, _ = attn.qkv(normed).reshape(B, n, 3, 3, 16).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    expected = ((q * attn.scale) @ k.transpose(-2, -1)).mean(1)
    assert torch.allclose(mean_head_logits(parts, normed, TokenSet(prefix=1)), expected, atol=1e-5)


def test_cut_loss_with_register_tokens_never_counts_attention_to_a_prefix_token():
    model = tokenpace.apply(make_vit("registers"), "idle", keep=0.5).train()  # class token + 4 registers
    model(torch.randn(2, 3, 32, 32))
    records, parts = _records(model)
    attns = [model.blocks[r.layer].attn for r in records]
    got = token_cut_loss(records, parts, num_prefix=5)
    with torch.no_grad():
        refs = [_reference_cut(a, r.normed, r.index, "both", num_prefix=5) for r, a in zip(records, attns)]
    assert got.item() == pytest.approx(sum(float(r) for r, _ in refs) / len(refs), rel=1e-4)
    assert got.item() == pytest.approx(sum(float(c) for _, c in refs) / len(refs), rel=1e-4)
    assert got.item() != pytest.approx(token_cut_loss(records, parts, num_prefix=1).item(), rel=1e-3)


def test_cut_loss_bad_mode_and_empty():
    with pytest.raises(ValueError, match="choose one of both, intra, inter, none"):
        token_cut_loss([], [], 1, mode="all")
    assert token_cut_loss([], [], 1).item() == 0.0


def test_distillation_terms():
    s, t = torch.randn(4, 10), torch.randn(4, 10)
    assert distill_kl(t, t).item() == pytest.approx(0.0, abs=1e-6) and distill_kl(s, t).item() > 0
    f = torch.randn(4, 8)
    assert feature_mse(f, 3 * f).item() == pytest.approx(0.0, abs=1e-7)
    assert feature_mse(f, -f).item() == pytest.approx(4 / 8, rel=1e-5)  # (2 - 2 cos) / C with cos = -1


def test_cut_loss_reusing_the_blocks_q_and_k_equals_projecting_every_token():
    model = tokenpace.apply(make_vit("qknorm"), "idle", keep=0.5).train()
    model(torch.randn(2, 3, 32, 32))
    records, parts = _records(model)
    assert all(r.qk is not None for r in records)
    attns = [model.blocks[r.layer].attn for r in records]
    reused = token_cut_loss(records, parts, num_prefix=1)
    reused.backward(retain_graph=True)
    grads = [a.qkv.weight.grad.clone() for a in attns]
    model.zero_grad()
    fresh = [type(r)(layer=r.layer, index=r.index, normed=r.normed, where=r.where) for r in records]  # project all
    projected = token_cut_loss(fresh, parts, num_prefix=1)
    projected.backward()
    assert torch.allclose(reused, projected, rtol=1e-5)
    assert all(torch.allclose(g, a.qkv.weight.grad, atol=1e-6) for g, a in zip(grads, attns))


def test_idle_objective_without_distillation_runs_no_teacher(images):
    """distill_weight 0: no teacher is copied or run, and the loss is CE + 20 x cut loss exactly."""
    import copy
    import dataclasses

    from tokenpace.train.objectives import make_objective
    from tokenpace.train.recipes import get_recipe

    dense = make_vit()
    recipe = dataclasses.replace(get_recipe("idle-finetune"), distill_weight=0.0)
    objective = make_objective(recipe, tokenpace.apply(copy.deepcopy(dense), "idle"), torch.nn.CrossEntropyLoss(),
                               dense_model=dense).train()
    assert objective.teacher is None and not any("teacher" in n for n, _ in objective.named_parameters())
    targets = torch.arange(images.shape[0])
    loss, terms, _ = objective(images, targets)
    assert set(terms) == {"ce", "cut"}
    assert torch.allclose(loss, terms["ce"] + 20 * terms["cut"])
    with_teacher = make_objective(get_recipe("idle-finetune"), tokenpace.apply(copy.deepcopy(dense), "idle"),
                                  torch.nn.CrossEntropyLoss(), dense_model=dense).train()
    assert {"kl", "feature"} <= set(with_teacher(images, targets)[1])


@pytest.mark.parametrize("method", [None, "evo", "evit"])
def test_the_cut_loss_is_refused_where_no_layer_idles(method):
    """idle-finetune with another method (or dense) has no idling layer: its cut loss is refused, not a silent 0."""
    import dataclasses

    from tokenpace.train.objectives import make_objective
    from tokenpace.train.recipes import get_recipe

    recipe = dataclasses.replace(get_recipe("idle-finetune"), distill_weight=0.0,
                                 method=None if method is None else tokenpace.make_config(method))
    runs = "runs no method" if method is None else f"runs {method}"
    with pytest.raises(ValueError, match=f"cut loss is IdleViT's .*the model {runs}.*--cut-mode none"):
        make_objective(recipe, make_vit(), torch.nn.CrossEntropyLoss())
    make_objective(dataclasses.replace(recipe, cut_mode="none"), make_vit(), torch.nn.CrossEntropyLoss())
