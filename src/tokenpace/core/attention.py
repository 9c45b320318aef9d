"""The one attention core every family shares: softmax(q k^T * scale + bias) v, fused where no probabilities are
needed, plus the per-key scores a method may ask for while the attention runs.

A score row is one of (each reduced over heads by ``heads``, "sum" or "mean", in float32):
- ``"cls"``: the softmax row of the first query (the class token) over every key;
- ``"mean"``: the softmax row of the mean query, i.e. of the mean logit each key receives (mean_i q_i . k_j, plus
  the mean of the bias column): one extra row, the class-token-free stand-in for the class token's row;
- ``"columns"``: the mean over the queries of every key's softmax column, the exact attention each key receives
  (needs the explicit n x n probabilities; used where n is small).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from .autocast import operand_as

ROWS = ("cls", "mean", "columns")
HEAD_REDUCTIONS = ("sum", "mean")


def _reduce_heads(scores: torch.Tensor, heads: str) -> torch.Tensor:
    """(B, H, n) -> (B, n) in float32. Casts ride in the reductions (and the softmax) rather than in ``.float()``
    calls: no float32 copy of the probabilities, one kernel less, and a traced graph does not pin the input dtype."""
    f32 = torch.float32
    return scores.sum(dim=1, dtype=f32) if heads == "sum" else scores.mean(dim=1, dtype=f32)


def softmax_probs(q: torch.Tensor, k: torch.Tensor, scale: float, bias: torch.Tensor | None,
                  dropout: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The explicit attention probabilities softmax(q k^T * scale + bias) (B, H, n_q, n_k), and them after dropout."""
    logits = (q * scale) @ k.transpose(-2, -1)
    probs = (logits if bias is None else logits + bias).softmax(dim=-1)
    return probs, (F.dropout(probs, dropout) if dropout > 0 else probs)


def _explicit(q, k, v, scale, bias, dropout):
    probs, dropped = softmax_probs(q, k, scale, bias, dropout)
    return dropped @ v, probs


def row_scores(q: torch.Tensor, k: torch.Tensor, scale: float, bias: torch.Tensor | None, row: str,
               heads: str, mix: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """The ``"cls"`` or ``"mean"`` score row (B, n_k) of q (B, H, n_q, d) against k (B, H, n_k, d): one query row
    per head, never the n_q x n_k map. ``mix``: what the attention does to its logits (B, H, n_q, n_k) across heads
    before the softmax (talking heads); it is affine, so it commutes with the mean query."""
    if row == "cls":
        query, bias_row = q[:, :, :1], None if bias is None else bias[..., :1, :]
    else:
        query, bias_row = q.mean(dim=2, keepdim=True), None if bias is None else bias.mean(dim=-2, keepdim=True)
    logits = (query * scale) @ k.transpose(-2, -1)  # (B, H, 1, n_k)
    if bias_row is not None:
        logits = logits + bias_row
    if mix is not None:
        logits = mix(logits)
    return _reduce_heads(logits.squeeze(2).softmax(dim=-1, dtype=torch.float32), heads)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, bias: torch.Tensor | None = None,
           dropout: float = 0.0, fused: bool = True, row: str | None = None,
           heads: str = "mean") -> tuple[torch.Tensor, torch.Tensor | None]:
    """softmax(q k^T * scale + bias) v for q (B, H, n_q, d), k (B, H, n_k, d), v (B, H, n_k, d_v) -> (B, H, n_q, d_v),
    and the score row (B, n_k) named by ``row`` (None: no scores).

    ``bias`` is an additive logit term broadcastable to (B, H, n_q, n_k) (relative-position biases, masks).
    ``fused`` runs torch's scaled_dot_product_attention; otherwise the explicit softmax (as timm's
    ``fused_attn=False`` path). ``dropout`` is the attention-dropout probability (0 at inference).
    """
    if bias is not None:
        bias = operand_as(bias, q.dtype)
    if row == "columns":
        out, probs = _explicit(q, k, v, scale, bias, dropout)
        return out, _reduce_heads(probs.mean(dim=2, dtype=torch.float32), heads)
    if fused:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout, scale=scale)
    else:
        out = _explicit(q, k, v, scale, bias, dropout)[0]
    return out, (row_scores(q, k, scale, bias, row, heads) if row is not None else None)


def probs_scores(probs: torch.Tensor, row: str, heads: str) -> torch.Tensor:
    """The ``"cls"`` or ``"columns"`` score row (B, n_k) from explicit probabilities (B, H, n_q, n_k) (used where a
    module computes its own softmax, e.g. a down-sampling attention)."""
    if row == "mean":
        raise ValueError("the 'mean' row needs the logits, not the probabilities")
    return _reduce_heads(probs[:, :, 0] if row == "cls" else probs.mean(dim=2, dtype=torch.float32), heads)
