"""Pre-softmax token scores that need no block run (IdleViT ranks by them), written once on the block anatomy, and
their cost.

``query_logits`` is the head-summed logit every token receives from one query vector: the class token's query
(``"cls"``) or the mean of every query (``"mean"``: mean_i q_i . k_j = qbar . k_j, the mean logit token j receives).
Where the keys are affine in the normed input h, no key is projected: sum_h q_h . (W_k,h h_j + b_k,h) =
(W_k^T q) . h_j + q . b_k, and the last term is the same for every token of a group, so it is left out (scores rank
tokens within their group). Where the queries are affine too, qbar = W_q mean_i(h_i) + b_q needs one projection.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch

from .anatomy import BlockParts, LinearMap
from .core.autocast import autocast_on
from .core.macs import BlockShape, ScoreWork

QUERIES = ("cls", "mean")


def _query_row(parts: BlockParts, h: torch.Tensor, where: Any, query: str,
               queries: torch.Tensor | None = None) -> torch.Tensor:
    """The query vector (B, H, 1, d) of ``query`` for the normed tokens h (B, n, C), through the anatomy (``queries``:
    every token's, where the caller projected them)."""
    if query == "cls":
        return parts.queries(h[..., :1, :], None)
    return (parts.queries(h, where) if queries is None else queries).mean(dim=-2, keepdim=True)


def _affine_query(h: torch.Tensor, query: str, linear: LinearMap, scale: float) -> torch.Tensor:
    """scale * q (..., A) of the ``query`` vector where q is affine in h: W_q h_0 + b_q for the class token,
    W_q mean_i(h_i) + b_q for the mean query, in one matrix product with the scale folded in."""
    src = h[..., 0, :] if query == "cls" else h.mean(dim=-2)  # (..., C)
    flat = src.reshape(-1, src.shape[-1])
    if linear.bias is None:
        q = torch.mm(flat, linear.weight.t()).mul_(scale)
    else:
        q = torch.addmm(linear.bias, flat, linear.weight.t(), beta=scale, alpha=scale)
    return q.view(*src.shape[:-1], q.shape[-1])


def score_precision(h: torch.Tensor, weight: torch.Tensor):
    """A context for the score side: autocast off where it is on and h has the weights' dtype, else as it is.
    Under autocast h is often the norm's float32 output; a bfloat16 product over every token would first write a
    half-size copy of the whole sequence and then read it (one more pass per selection, the kind that bounds an
    eager GPU forward at large batch), and every weight slice would be cast (one more kernel each). The score side
    is a few vectors: float32 costs nothing there and ranks exactly. Where h is already narrower than the weights,
    autocast keeps doing the casts: no explicit cast pins a traced dtype (torch.export)."""
    device = h.device.type
    own = h.dtype == weight.dtype and autocast_on(device)
    return torch.autocast(device, enabled=False) if own else nullcontext()


def needs_keys(parts: BlockParts, project_keys: bool = False) -> bool:
    """True when scores must project every key (keys not affine in h, or asked for)."""
    return project_keys or not parts.keys_affine()


def block_reuses_keys(parts: BlockParts, project_keys: bool = False) -> bool:
    """True when the block takes its selected tokens' keys from those scoring projected: always where scoring
    projects them, except where the block's q/k/v normalise over the tokens in the call (BatchNorm in training),
    whose keys for all tokens are not the block's."""
    return needs_keys(parts, project_keys) and not parts.batch_statistics()


def block_reuses_queries(parts: BlockParts, query: str) -> bool:
    """True when scoring projects every token's query (the mean query where queries are not affine: RoPE, cosine
    attention) and the block takes its selected tokens' queries from those (as keys, not under batch
    statistics)."""
    return query == "mean" and parts.linear_queries() is None and not parts.batch_statistics()


def _weigh_heads(q: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """The query vector (..., H, 1, d) with each head times its logit weight
    (:meth:`BlockParts.logit_head_weights`; None: as it is)."""
    return q if weights is None else q * weights.view(-1, 1, 1).to(q.dtype)


def query_logits(parts: BlockParts, h: torch.Tensor, where: Any, query: str, project_keys: bool = False,
                 keys: torch.Tensor | None = None, queries: torch.Tensor | None = None) -> torch.Tensor:
    """Head-summed scaled logits (..., n) that the tokens of h (..., n, C) receive from the ``query`` vector
    (per-group constants left out; heads weighed where they mix before the softmax). Additive position terms are not
    included: see :func:`bias_row`. ``keys``, ``queries``: every token's (B, H, n, d) when the caller projected them
    already."""
    # each asked once: families slice them from a fused weight
    linear_keys = None if project_keys else parts.linear_keys()
    linear_queries = parts.linear_queries()
    weights = parts.logit_head_weights()
    if linear_keys is None:
        if linear_queries is None:
            q = _query_row(parts, h, where, query, queries) * parts.scale  # (..., H, 1, d)
        else:
            q = _affine_query(h, query, linear_queries, parts.scale)
            q = q.view(*q.shape[:-1], parts.num_heads, 1, -1)
        k = parts.keys(h, where) if keys is None else keys  # (B, H, n, d)
        return (_weigh_heads(q, weights) @ k.transpose(-2, -1)).squeeze(-2).sum(dim=-2)
    if linear_queries is None:  # a query through the anatomy (norms, position terms), under the model's autocast
        q = _weigh_heads(_query_row(parts, h, where, query, queries), weights)
        u = (q.flatten(-3) * parts.scale) @ linear_keys.weight
        return (h @ u.unsqueeze(-1)).squeeze(-1)
    with score_precision(h, linear_keys.weight):
        q = _affine_query(h, query, linear_queries, parts.scale)
        if weights is not None:
            q = _weigh_heads(q.view(*q.shape[:-1], parts.num_heads, 1, -1), weights).flatten(-3)
        u = q @ linear_keys.weight  # (..., C): sum over heads of W_k,h^T q_h, every group
        return (h @ u.unsqueeze(-1)).squeeze(-1)


def bias_row(parts: BlockParts, where: Any, query: str) -> torch.Tensor | None:
    """The additive logit terms (relative-position bias, masks) of the ``query`` row, summed over heads
    (broadcastable to the scores), or None."""
    bias = parts.bias(where)
    if bias is None:
        return None
    row = bias[..., 0, :] if query == "cls" else bias.mean(dim=-2)
    return row.sum(dim=-2)


def token_norms(x: torch.Tensor) -> torch.Tensor:
    """The L2 norm of every token (..., n, C) -> (..., n) in float32 (float64 models: float64): free, and defined
    for any attention."""
    return torch.linalg.vector_norm(x, dim=-1, dtype=torch.promote_types(x.dtype, torch.float32))


def score_macs(parts: BlockParts, work: ScoreWork) -> int:
    """MACs of one group's scores as :func:`query_logits` computes them (norms and random scores cost 0)."""
    if work.query not in QUERIES:
        return 0
    shape: BlockShape = parts.shape()
    C, A, n = shape.dim, shape.qk_dim, work.tokens
    one_query = shape.query_macs()  # the class query, or W_q of the mean input
    if work.query == "mean" and parts.linear_queries() is None:
        one_query *= n  # every query, then their mean
    if not work.project_keys and parts.linear_keys() is not None:
        return one_query + A * C + n * C  # W_k^T q, then one dot per token
    return one_query + n * shape.key_macs() + n * A  # every key, then one dot per token and head
