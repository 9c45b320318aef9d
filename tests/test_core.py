"""Pure tensor functions: selection, gather/scatter, scores, schedules."""

import pytest
import torch

from tokenpace.core.schedule import keep_count, keep_count_ceil, scaled_layers, stage_of, validate_layers
from tokenpace.anatomy import BlockParts, LinearMap
from tokenpace.core.attention import attend, row_scores
from tokenpace.core.scores import evolve
from tokenpace.scoring import query_logits
from tokenpace.core.tokens import (gather_tokens, scatter_tokens, split_indices, top_indices, weighted_merge,
                                   with_prefix)


def test_top_indices_are_the_k_largest_in_order():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.7], [3.0, 1.0, 2.0, 0.0]])
    assert top_indices(scores, 2).tolist() == [[1, 3], [0, 2]]
    keep, rest = split_indices(scores, 2)
    assert keep.tolist() == [[1, 3], [0, 2]] and rest.tolist() == [[2, 0], [1, 3]]


def test_with_prefix_puts_prefix_first_and_shifts_patches():
    idx = torch.tensor([[3, 0], [1, 2]])
    assert with_prefix(idx, 2).tolist() == [[0, 1, 5, 2], [0, 1, 3, 4]]
    assert with_prefix(idx, 0) is idx


@pytest.mark.parametrize("grad", [True, False])
def test_gather_scatter_roundtrip_touches_only_selected_rows(grad):
    x = torch.randn(3, 7, 5)
    idx = torch.stack([torch.randperm(7)[:4] for _ in range(3)])
    sub = gather_tokens(x, idx)
    assert torch.equal(sub, x.gather(1, idx.unsqueeze(-1).expand(-1, -1, 5)))
    with torch.set_grad_enabled(grad):
        out = scatter_tokens(x.clone(), idx, sub * 2)
    mask = torch.zeros(3, 7, dtype=torch.bool).scatter(1, idx, True)
    assert torch.equal(out[mask], (x * 2)[mask]) and torch.equal(out[~mask], x[~mask])


def test_scatter_is_differentiable():
    x = torch.randn(2, 5, 3, requires_grad=True)
    src = torch.randn(2, 2, 3, requires_grad=True)
    idx = torch.tensor([[0, 4], [2, 1]])
    scatter_tokens(x, idx, src).sum().backward()
    assert x.grad.sum().item() == pytest.approx(2 * 3 * 3) and torch.equal(src.grad, torch.ones_like(src))


def test_weighted_merge():
    x = torch.randn(2, 4, 3)
    w = torch.rand(2, 4)
    assert torch.allclose(weighted_merge(x, w, False)[:, 0], (w.unsqueeze(-1) * x).sum(1), atol=1e-6)
    assert torch.allclose(weighted_merge(x, w, True)[:, 0], (w.unsqueeze(-1) * x).sum(1) / w.sum(1, keepdim=True),
                          atol=1e-6)


def test_weighted_merge_renormalises_tiny_weights_before_half_precision():
    """Placeholders' class attention can be 1e-8: cast to fp16 first, the weights flush to 0 (a wrong token, or
    0 / 0); renormalised in float32 first, the fp16 merge matches the float32 one."""
    x = torch.randn(2, 4, 3)
    w = torch.tensor([[1e-8, 3e-8, 2e-8, 4e-8], [5e-9, 5e-9, 5e-9, 5e-9]])
    expected = weighted_merge(x, w, True)
    half = weighted_merge(x.half(), w, True)
    assert half.dtype == torch.float16 and torch.allclose(half.float(), expected, atol=2e-3)
    assert torch.equal(weighted_merge(x, torch.zeros(2, 4), True), torch.zeros(2, 1, 3))  # no weight: 0, not NaN


def test_score_rows_are_rows_of_the_full_map():
    q, k, v = torch.randn(2, 3, 6, 4), torch.randn(2, 3, 6, 4), torch.randn(2, 3, 6, 4)
    bias = torch.randn(3, 6, 6)
    probs = ((q * 0.5) @ k.transpose(-2, -1) + bias).softmax(-1)
    assert torch.allclose(row_scores(q, k, 0.5, bias, "cls", "sum"), probs[:, :, 0].sum(1), atol=1e-6)
    mean_logits = ((q.mean(2, keepdim=True) * 0.5) @ k.transpose(-2, -1) + bias.mean(1, keepdim=True))
    assert torch.allclose(row_scores(q, k, 0.5, bias, "mean", "mean"), mean_logits.softmax(-1)[:, :, 0].mean(1),
                          atol=1e-6)
    for fused in (True, False):
        out, columns = attend(q, k, v, 0.5, bias, fused=fused, row="columns")
        assert torch.allclose(out, probs @ v, atol=1e-5) and torch.allclose(columns, probs.mean(2).mean(1), atol=1e-6)


class _LinearParts(BlockParts):
    """q and k affine in h, H heads side by side (what scoring needs)."""

    def __init__(self, w_q, b_q, w_k, b_k, heads, scale):
        super().__init__(None)
        self.w_q, self.b_q, self.w_k, self.b_k, self.num_heads, self.scale = w_q, b_q, w_k, b_k, heads, scale

    def _heads(self, t):
        return t.reshape(*t.shape[:-1], self.num_heads, -1).transpose(-3, -2)

    def queries(self, h, where):
        return self._heads(torch.nn.functional.linear(h, self.w_q, self.b_q))

    def keys(self, h, where):
        return self._heads(torch.nn.functional.linear(h, self.w_k, self.b_k))

    def linear_queries(self):
        return LinearMap(self.w_q, self.b_q)

    def linear_keys(self):
        return LinearMap(self.w_k, self.b_k)


@pytest.mark.parametrize("query", ["cls", "mean"])
def test_logit_scores_without_key_projection_rank_like_projected_keys(query):
    """sum_h q_h . k_hj = (W_k^T q) . h_j + q . b_k: the shortcut differs from projected keys by one constant per
    group, and the mean query's logits are the mean over every query of the logits a key receives."""
    gen = torch.Generator().manual_seed(0)
    G, n, C, H, scale = 3, 7, 8, 2, 0.37
    h, w_q, w_k = (torch.randn(*shape, generator=gen, dtype=torch.float64) for shape in ((G, n, C), (C, C), (C, C)))
    b_q, b_k = torch.randn(C, generator=gen, dtype=torch.float64), torch.randn(C, generator=gen, dtype=torch.float64)
    parts = _LinearParts(w_q, b_q, w_k, b_k, H, scale)
    q, k = h @ w_q.T + b_q, h @ w_k.T + b_k
    full = scale * q @ k.transpose(-2, -1)  # all heads side by side = the sum over heads
    explicit = full[:, 0] if query == "cls" else full.mean(1)
    cheap = query_logits(parts, h, None, query)
    constant = scale * (q[:, 0] if query == "cls" else q.mean(1)) @ b_k
    torch.testing.assert_close(cheap, explicit - constant[:, None])
    torch.testing.assert_close(query_logits(parts, h, None, query, project_keys=True), explicit)


class _MixedHeadParts(_LinearParts):
    """_LinearParts whose heads' logits are mixed before the softmax (talking heads): the head-summed logits weigh
    head h by ``weights[h]``; ``affine_q`` / ``affine_k`` False hides the linear maps (the other scoring paths)."""

    def __init__(self, *args, weights, affine_q, affine_k):
        super().__init__(*args)
        self.weights, self.affine_q, self.affine_k = weights, affine_q, affine_k

    def logit_head_weights(self):
        return self.weights

    def linear_queries(self):
        return super().linear_queries() if self.affine_q else None

    def linear_keys(self):
        return super().linear_keys() if self.affine_k else None


@pytest.mark.parametrize("affine_q", [True, False])
@pytest.mark.parametrize("affine_k", [True, False])
@pytest.mark.parametrize("query", ["cls", "mean"])
def test_logit_scores_weigh_mixed_heads_on_every_path(query, affine_q, affine_k):
    """With head weights, each of query_logits' four paths (queries and keys affine or projected) gives
    sum_h w_h (q_h . k_hj) up to one constant per group (the key bias term, where keys are not projected)."""
    gen = torch.Generator().manual_seed(0)
    G, n, C, H, scale = 3, 7, 8, 2, 0.37
    h, w_q, w_k = (torch.randn(*shape, generator=gen, dtype=torch.float64) for shape in ((G, n, C), (C, C), (C, C)))
    b_q, b_k = torch.randn(C, generator=gen, dtype=torch.float64), torch.randn(C, generator=gen, dtype=torch.float64)
    weights = torch.tensor([1.7, -0.6], dtype=torch.float64)
    parts = _MixedHeadParts(w_q, b_q, w_k, b_k, H, scale, weights=weights, affine_q=affine_q, affine_k=affine_k)
    q, k = parts.queries(h, None), parts.keys(h, None)  # (G, H, n, d)
    per_head = scale * q @ k.transpose(-2, -1)  # (G, H, n, n)
    rows = per_head[:, :, 0] if query == "cls" else per_head.mean(2)
    explicit = (rows * weights.view(1, H, 1)).sum(1)
    got = query_logits(parts, h, None, query)
    centred = [t - t.mean(-1, keepdim=True) for t in (got, explicit)]
    torch.testing.assert_close(centred[0], centred[1])
    assert not torch.allclose(centred[0], (rows.sum(1) - rows.sum(1).mean(-1, keepdim=True)))  # the weights count


@pytest.mark.parametrize("query", ["cls", "mean"])
def test_logit_scores_under_autocast_are_the_float32_scores(query):
    """Under bf16 autocast the normed tokens h are float32 (the norm's output): the whole score side (a few vectors)
    runs in float32, so no half-size copy of every token is written, no weight slice is cast, and the scores are
    exactly those of the float32 model."""
    gen = torch.Generator().manual_seed(0)
    G, n, C, H, scale = 2, 9, 8, 2, 0.37
    h = torch.randn(G, n, C, generator=gen)
    w_q, w_k, b_q = torch.randn(C, C, generator=gen), torch.randn(C, C, generator=gen), torch.randn(C, generator=gen)
    parts = _LinearParts(w_q, b_q, w_k, torch.zeros(C), H, scale)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = query_logits(parts, h, None, query)
        assert torch.nn.functional.linear(h, w_q).dtype == torch.bfloat16  # autocast is on for the model's products
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, query_logits(parts, h, None, query), rtol=0, atol=0)
    grouped = query_logits(parts, h.view(1, G, n, C), None, query)  # any leading dims: groups as a batch
    torch.testing.assert_close(grouped, query_logits(parts, h, None, query).view(1, G, n), rtol=0, atol=0)


def test_evolve_weights_the_new_layer():
    g, a = torch.tensor([1.0, 3.0]), torch.tensor([3.0, 1.0])
    assert evolve(g, a, 0.5).tolist() == [2.0, 2.0]
    assert evolve(g, a, 1.0) is a


@pytest.mark.parametrize("r,counts", [(0.9, (176, 158, 142)), (0.8, (156, 125, 100)), (0.7, (137, 96, 67)),
                                      (0.6, (117, 70, 42)), (0.5, (98, 49, 24))])
def test_idle_token_counts_match_the_spec_table(r, counts):
    assert tuple(keep_count(196, r ** s) for s in (1, 2, 3)) == counts


def test_keep_counts():
    assert keep_count(196, 0.5) == 98
    assert keep_count(10, 0.1) == 1
    with pytest.raises(ValueError, match=r"a keep ratio of 0.01 keeps int\(10 \* 0.01\) = 0 of 10 tokens; at least one "
                       r"must be kept \(10 \* ratio >= 1\)"):
        keep_count(10, 0.01)  # refused, not raised to 1: the cost asked for would not be the one run
    assert keep_count(10, 1.0) == 10
    assert [keep_count_ceil(n, 0.7) for n in (196, 139, 99)] == [138, 98, 70]


def test_schedules_scale_with_depth():
    assert scaled_layers(12, (4, 8)) == (4, 8) and scaled_layers(12, (3, 6, 9)) == (3, 6, 9)
    assert scaled_layers(24, (4, 8)) == (8, 16) and scaled_layers(6, (4, 8)) == (2, 4)
    assert [stage_of(i, (3, 6, 9)) for i in (0, 2, 3, 5, 6, 9, 11)] == [0, 0, 1, 1, 2, 3, 3]


def test_validate_layers_messages():
    with pytest.raises(ValueError, match=r"outside the model.*0\.\.11"):
        validate_layers("x", (3, 12), 12)
    with pytest.raises(ValueError, match="strictly increasing"):
        validate_layers("x", (6, 3), 12)
    with pytest.raises(ValueError, match="at least one"):
        validate_layers("x", (), 12)
