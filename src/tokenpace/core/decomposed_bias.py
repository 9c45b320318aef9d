"""Decomposed relative-position bias (MViTv2, SAM's ViT) on token subsets, as pure tensor logic.

The logit of query i and key j gains ``q_i . T_h[r_i - r_j + wh - 1] + q_i . T_w[c_i - c_j + ww - 1]`` (per head,
the query unscaled), where (r, c) is a token's row and column in its window of wh x ww slots and T_h (2wh-1, d),
T_w (2ww-1, d) hold one vector per offset. The bias depends on the query, so it is made from the queries present:
each query against every offset (2w-1 of them per axis), then gathered at the pairs' offsets; the wh*ww x wh*ww map
of every slot is never built, nor a (k, k) index.
"""
from __future__ import annotations

import torch


def axis_offsets(size: int, device: torch.device) -> torch.Tensor:
    """(size, size) table index of every (query, key) position pair on one axis: r - r' + size - 1."""
    pos = torch.arange(size, device=device)
    return pos.unsqueeze(1) - pos.unsqueeze(0) + (size - 1)


def _axis_pairs(q: torch.Tensor, table: torch.Tensor, lines: torch.Tensor) -> torch.Tensor:
    """One axis' bias (G, heads, k, k) of queries q (G, heads, k, d) on lines ``lines`` (G, k) to keys on the same
    lines. Two gathers, so that no (k, k) offset index is ever made: each query's products with every offset
    (G, heads, k, 2s-1), then per query the value of each key line (G, heads, k, s), then per key its line's."""
    G, heads, k, _ = q.shape
    size = (table.shape[0] + 1) // 2
    to_line = axis_offsets(size, lines.device)[lines]  # (G, k, s): each query's offset to every line
    per_line = (q @ table.t()).gather(-1, to_line.unsqueeze(1).expand(G, heads, k, size))
    return per_line.gather(-1, lines[:, None, None, :].expand(G, heads, k, k))


def pair_bias(q: torch.Tensor, table_h: torch.Tensor, table_w: torch.Tensor, rows: torch.Tensor,
              cols: torch.Tensor) -> torch.Tensor:
    """The bias (G, heads, k, k) among k tokens of each of G windows, queries q (G, heads, k, d) at window rows
    ``rows`` and columns ``cols`` (G, k), keys the same tokens."""
    return _axis_pairs(q, table_h, rows) + _axis_pairs(q, table_w, cols)


def _axis_received(line_queries: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """(G, size): for each key position on one axis, the bias it receives from every query, summed over queries and
    heads, from the sum of the queries on each line ``line_queries`` (G, heads, size, d)."""
    G, heads, size, _ = line_queries.shape
    index = axis_offsets(size, line_queries.device).expand(G, heads, size, size)  # [line, key line]
    return (line_queries @ table.t()).gather(-1, index).sum(dim=(1, 2))


def received_bias(row_queries: torch.Tensor, col_queries: torch.Tensor, table_h: torch.Tensor,
                  table_w: torch.Tensor) -> torch.Tensor:
    """The bias every slot of a window receives from all the window's queries, summed over queries and heads
    (G, wh, ww), from the sums of the queries in each window row ``row_queries`` (G, heads, wh, d) and column
    ``col_queries`` (G, heads, ww, d): sum_i q_i . T_h[r_i - r_j] = sum_r (sum over row r of q) . T_h[r - r_j]."""
    return _axis_received(row_queries, table_h).unsqueeze(2) + _axis_received(col_queries, table_w).unsqueeze(1)


def received_bias_macs(window: tuple[int, int], qk_dim: int) -> int:
    """MACs of :func:`received_bias` per window (all heads: ``qk_dim`` = heads * d)."""
    wh, ww = window
    return (wh * (2 * wh - 1) + ww * (2 * ww - 1)) * qk_dim


def pair_bias_macs(tokens: int, window: tuple[int, int], qk_dim: int) -> int:
    """MACs of :func:`pair_bias` for ``tokens`` tokens of one window (all heads)."""
    wh, ww = window
    return tokens * (2 * wh - 1 + 2 * ww - 1) * qk_dim
