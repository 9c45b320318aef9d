"""A block, or one of its halves, on any subset of tokens: written once on the block anatomy (``anatomy.py``)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .anatomy import BlockParts

# torch.export's tracing flag (older torch has none, and no exporter that needs the copy below)
_exporting = getattr(torch.compiler, "is_exporting", lambda: False)


@dataclass(frozen=True)
class Row:
    """A score row a method wants while the attention runs (``core.attention``): ``query`` "cls", "mean" or
    "columns", reduced over heads by ``heads``."""

    query: str
    heads: str = "mean"


def attention_branch(parts: BlockParts, h: torch.Tensor, where: Any, row: Row | None = None,
                     keep_qk: bool = False, keys: torch.Tensor | None = None, queries: torch.Tensor | None = None):
    """The attention branch on normed tokens h (B, n, C) -> (its output before the residual, the row's scores over
    every key or None, and with ``keep_qk`` (q, k) (B, H, n, d) as the attention used them). ``keys``,
    ``queries``: the tokens' own when a caller already projected them (scoring did); the rest is projected."""
    if keys is None and queries is None:
        q, k, v = parts.qkv(h, where)
    else:
        q = parts.queries(h, where) if queries is None else queries
        k = parts.keys(h, where) if keys is None else keys
        v = parts.values(h, where)
    o, scores = parts.attend(q, k, v, parts.bias(where), None if row is None else row.query,
                             "mean" if row is None else row.heads)
    B, H, n, dv = o.shape
    o = o.transpose(1, 2)
    if _exporting():  # a layout-free copy: torch.onnx's SDPA decomposition may not keep the
        o = o.clone(memory_format=torch.contiguous_format)  # output layout the trace saw (a reshape became a view)
    return parts.out(o.reshape(B, n, H * dv), h), scores, ((q, k) if keep_qk else None)


def attention_half(parts: BlockParts, x: torch.Tensor, where: Any, h: torch.Tensor | None = None,
                   row: Row | None = None, keep_qk: bool = False, keys: torch.Tensor | None = None,
                   queries: torch.Tensor | None = None):
    """x after the attention residual, with the scores and (q, k) of :func:`attention_branch`. ``h`` is norm1(x)
    when the caller already has it."""
    y, scores, qk = attention_branch(parts, parts.norm1(x) if h is None else h, where, row, keep_qk, keys, queries)
    return parts.res_attn(x, y), scores, qk


def mlp_half(parts: BlockParts, x: torch.Tensor, where: Any = None) -> torch.Tensor:
    """x after the MLP residual (x itself after a parallel block, whose attention half ran its MLP)."""
    if not parts.separate_mlp:
        return x
    return parts.res_mlp(x, parts.mlp(parts.norm2(x), where))


def run_block(parts: BlockParts, x: torch.Tensor, where: Any, h: torch.Tensor | None = None,
              row: Row | None = None, keep_qk: bool = False, keys: torch.Tensor | None = None,
              queries: torch.Tensor | None = None):
    """The whole block on x: (x, scores, (q, k) or None), as :func:`attention_half`."""
    x, scores, qk = attention_half(parts, x, where, h, row, keep_qk, keys, queries)
    return mlp_half(parts, x, where), scores, qk
