"""Token scores computed from one row or one mean query (O(N*C), never the N x N map): class-token attention and
logits, and the class-token-free mean received logit."""
from __future__ import annotations

import torch
import torch.nn.functional as F

HEAD_REDUCTIONS = ("sum", "mean")


def cls_attention(q_cls: torch.Tensor, k: torch.Tensor, scale: float, heads: str) -> torch.Tensor:
    """Softmax attention of the class query over all keys, reduced over heads.

    q_cls (B, H, 1, d), k (B, H, n, d) -> (B, n) in float32. Softmax rows are independent, so this row equals
    row 0 of the full attention map. ``heads`` is "sum" (Evo-ViT DeiT) or "mean" (EViT, Evo-LeViT).
    """
    logits = (q_cls * scale) @ k.transpose(-2, -1)  # (B, H, 1, n)
    probs = logits.squeeze(2).float().softmax(dim=-1)
    return probs.sum(dim=1) if heads == "sum" else probs.mean(dim=1)


def cls_logits_from_keys(q_cls: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Head-summed class-query logits q_cls . k_j (unscaled): q_cls (B, H, 1, d), k (B, H, n, d) -> (B, n).

    Positive scale and the 1/H of a head mean do not change a ranking, so they are left out.
    """
    return (q_cls @ k.transpose(-2, -1)).squeeze(2).sum(dim=1)


def cls_logits_linear(normed: torch.Tensor, q_cls: torch.Tensor, w_k: torch.Tensor) -> torch.Tensor:
    """The ranking of :func:`cls_logits_from_keys` without projecting any key (IdleViT spec §4.4).

    sum_h q_h . (W_k,h x_j + b_k,h) = (W_k^T q) . x_j + q . b_k, and the last term is the same for every j.
    normed (B, n, C) is the block's norm1 output; q_cls (B, A) the class query (all heads side by side);
    w_k (A, C). Valid only when keys are a linear function of the normed input (no per-head key norm).
    """
    u = q_cls @ w_k  # (B, C): W_k^T q for every image at once
    return (normed @ u.unsqueeze(-1)).squeeze(-1)


def mean_query_logits_linear(normed: torch.Tensor, w_q: torch.Tensor, b_q: torch.Tensor | None,
                             w_k: torch.Tensor, scale: float) -> torch.Tensor:
    """Head-summed mean scaled logit each token receives from all queries of its group, without projecting keys.

    normed (G, n, C): the block's norm1 output in G groups (e.g. attention windows); w_q, w_k (A, C) and b_q (A,)
    the query and key projections (all heads side by side); returns (G, n).
    Queries are linear in their input, so mean_i q_i . k_j = qbar . k_j with qbar = W_q mean_i(x_i) + b_q, and
    summed over heads sum_h qbar_h . (W_k,h x_j + b_k,h) = (W_k^T qbar) . x_j + qbar . b_k. The last term is the
    same for every token of a group and is left out: scores rank tokens within their group. O(n*C + A*C) per group.
    Additive logit terms (relative-position bias, masks) are the caller's to add.
    """
    q_mean = F.linear(normed.mean(dim=1), w_q, b_q)  # (G, A)
    u = (q_mean @ w_k) * scale  # (G, C); the scale matters once additive biases are added to the scores
    return (normed @ u.unsqueeze(-1)).squeeze(-1)


def evolve(previous: torch.Tensor, current: torch.Tensor, alpha: float | torch.Tensor) -> torch.Tensor:
    """Global class attention update (Evo-ViT): (1 - alpha) * previous + alpha * current; alpha weights the new layer
    (a float, or Evo-LeViT's learned sigmoid(theta) tensor: never branched on, so compiled graphs stay static)."""
    if isinstance(alpha, float) and alpha == 1.0:
        return current
    return previous * (1.0 - alpha) + current * alpha


def random_scores(like: torch.Tensor) -> torch.Tensor:
    """Uniform random scores with the shape of ``like``: the control that shows whether attention ranks better."""
    return torch.rand(like.shape, device=like.device, dtype=torch.float32)
