"""Top-k selection and gather/scatter of token subsets (B, N, C), batched, no Python loops over the batch."""
from __future__ import annotations

import torch

from .autocast import operand_as


def top_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (..., k) of the k largest scores along the last dim, in descending score order."""
    return scores.topk(k, dim=-1, largest=True, sorted=True).indices


def split_indices(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(top k, the rest) per row, both in descending score order, from one sort."""
    order = scores.argsort(dim=1, descending=True)
    return order[:, :k], order[:, k:]


def with_prefix(idx: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """Patch indices (B, K) -> sequence indices (B, P+K): prefix tokens 0..P-1 first, patches shifted by P."""
    if num_prefix == 0:
        return idx
    prefix = torch.arange(num_prefix, device=idx.device, dtype=idx.dtype).expand(idx.shape[0], -1)
    return torch.cat([prefix, idx + num_prefix], dim=1)


def _image_offsets(idx: torch.Tensor, seq_len: int) -> torch.Tensor:
    """(B, 1): the first row of each image in the flattened (B*N, C) batch, in one kernel."""
    return torch.arange(0, idx.shape[0] * seq_len, seq_len, device=idx.device, dtype=idx.dtype).unsqueeze(1)


def flat_rows(idx: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Row indices (B, K) into x.reshape(B*N, C) for per-image indices idx (B, K). Compute them once per selection
    and pass them to :func:`gather_rows`/:func:`scatter_rows` for every tensor of that selection: each recomputation
    is more kernels, and small batches on a GPU are bound by kernel launches."""
    return idx + _image_offsets(idx, seq_len)


def sequence_rows(idx: torch.Tensor, prefix: int, seq_len: int, cache: dict | None = None) -> torch.Tensor:
    """:func:`flat_rows` of :func:`with_prefix`: rows (B, prefix + K) of the flattened sequence for the prefix tokens
    and the patches idx (B, K). The row offsets depend only on (B, N, prefix): with a per-forward ``cache`` they are
    made once, and each selection costs two kernels (an add, a concatenation) instead of five."""
    # no batch size in the key (one forward has one; a symbolic batch in an ONNX export must not be specialised)
    key = ("sequence_rows", seq_len, prefix, idx.device, idx.dtype)
    offsets = None if cache is None else cache.get(key)
    if offsets is None:
        image = _image_offsets(idx, seq_len)
        offsets = (image + torch.arange(prefix, device=idx.device, dtype=idx.dtype), image + prefix)
        if cache is not None:
            cache[key] = offsets
    prefix_rows, patch_base = offsets
    patches = idx + patch_base
    return torch.cat([prefix_rows, patches], dim=1) if prefix else patches


def gather_rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """x (B, N, C), rows (B, K) from :func:`flat_rows` -> (B, K, C).

    A row ``index_select`` on the flattened batch: a plain row copy, about 10x faster on CPU than ``gather`` with an
    index expanded over channels.
    """
    B, N, C = x.shape
    return x.reshape(B * N, C).index_select(0, rows.reshape(-1)).view(B, rows.shape[1], C)


def scatter_rows(x: torch.Tensor, rows: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """Write src (B, K, C) into ``rows`` (B, K) from :func:`flat_rows` of x (B, N, C); the other rows stay as they are.

    Out of place when autograd is recording (the input may be needed for backward); in place otherwise,
    which saves a copy of the whole sequence per call under ``torch.inference_mode``/``no_grad``.
    """
    B, N, C = x.shape
    rows, flat_src = rows.reshape(-1), src.reshape(-1, C)
    if flat_src.dtype != x.dtype:  # no call where they agree (every call costs on a launch-bound GPU)
        flat_src = flat_src.to(x.dtype)
    if torch.is_grad_enabled() or not x.is_contiguous():
        return x.reshape(B * N, C).index_copy(0, rows, flat_src).view(B, N, C)
    x.view(B * N, C).index_copy_(0, rows, flat_src)
    return x


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x (B, N, C), idx (B, K) -> (B, K, C) (one selection, one tensor; see :func:`flat_rows` for several)."""
    return gather_rows(x, flat_rows(idx, x.shape[1]))


def scatter_tokens(x: torch.Tensor, idx: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """Write src (B, K, C) into rows idx (B, K) of x (B, N, C); in place under no_grad (see :func:`scatter_rows`)."""
    return scatter_rows(x, flat_rows(idx, x.shape[1]), src)


def gather_heads(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Per-head vectors t (B, H, N, d), idx (B, K) -> (B, H, K, d): projected queries or keys of chosen tokens."""
    B, H, _, d = t.shape
    return t.gather(2, idx[:, None, :, None].expand(B, H, idx.shape[1], d))


def gather_values(v: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """v (B, N), idx (B, K) -> (B, K)."""
    return v.gather(1, idx)


def scatter_values(v: torch.Tensor, idx: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """Out-of-place write of src (B, K) into positions idx of v (B, N)."""
    return v.scatter(1, idx, src)


def weighted_merge(x: torch.Tensor, weights: torch.Tensor, normalize: bool) -> torch.Tensor:
    """One token (B, 1, C) = sum_j w_j x_j over x (B, M, C); weights (B, M), optionally renormalised to sum 1.

    Renormalised in float32 before they meet x's dtype: the weights of low-ranked tokens (attention of 1e-8 and
    less) flush to zero in half precision, and their sum with them (0 / 0)."""
    if normalize:
        weights = weights.float()
        weights = weights / weights.sum(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    return operand_as(weights, x.dtype).unsqueeze(1) @ x
