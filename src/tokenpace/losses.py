"""Training losses: IdleViT's token cut loss and distillation terms (idlevit.md §5-6), Evo-ViT's head losses."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .core.tokens import gather_tokens
from .methods.idle import IdleRecord

CUT_MODES = ("both", "intra", "inter", "none")


def _project_qk(attn: nn.Module, normed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q and k (B, n, H*d) of ``normed`` through the attention's own layers (values are not projected)."""
    B, n, _ = normed.shape
    H, d = attn.num_heads, attn.head_dim
    bias = attn.qkv.bias[:2 * H * d] if attn.qkv.bias is not None else None
    q, k = F.linear(normed, attn.qkv.weight[:2 * H * d], bias).reshape(B, n, 2, H, d).unbind(2)
    q = attn.q_norm(q.transpose(1, 2)).transpose(1, 2).reshape(B, n, H * d)
    k = attn.k_norm(k.transpose(1, 2)).transpose(1, 2).reshape(B, n, H * d)
    return q, k


def _unselected(index: torch.Tensor, n: int) -> torch.Tensor:
    """Sequence indices (B, n - K) of the tokens not in ``index`` (B, K): a fixed count, no boolean masks."""
    rest = torch.ones(index.shape[0], n, device=index.device).scatter(1, index, 0.0)
    return rest.topk(n - index.shape[1], dim=1, sorted=False).indices


def mean_head_logits(attn: nn.Module, normed: torch.Tensor, index: torch.Tensor | None = None,
                     qk: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """(scale / H) * sum_h q_h k_h^T for every token pair: (B, N, N), from one full-width product.

    The head mean of per-head logits equals one product of the concatenated (normed) queries and keys, so the
    B x H x N x N map is never formed. With ``index`` (B, K) the tokens come reordered, rows and columns alike:
    the selected ones first in ``index`` order, then the others. With ``qk``, the (q, k) the block already
    computed for the selected tokens, only the others are projected (same values, same gradients).
    """
    if index is None:
        q, k = _project_qk(attn, normed)
    elif qk is None:
        q, k = _project_qk(attn, gather_tokens(normed, torch.cat([index, _unselected(index, normed.shape[1])], 1)))
    else:
        q_rest, k_rest = _project_qk(attn, gather_tokens(normed, _unselected(index, normed.shape[1])))
        q, k = torch.cat([qk[0], q_rest], 1), torch.cat([qk[1], k_rest], 1)
    return (q * (attn.scale / attn.num_heads)) @ k.transpose(1, 2)


def cut_terms(logits: torch.Tensor, num_selected: int, num_prefix: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row terms of one idling layer from selected-first head-mean logits (B, N, N); A = softmax(logits).

    ``leak`` (B, K): each selected row's attention to idle tokens, 1 - sum_{j in S} A_ij. It is the row's inter
    term and, negated, its intra - m term. ``cut`` (B, N - K): each idle row's attention to the selected tokens
    other than the prefix (attention to the class token is never a cut); it is the row's inter term, and its intra
    term is 0. Selected-first order turns every mask into a slice.
    """
    attn = logits.softmax(dim=-1)
    to_selected = attn[:, :, :num_selected].sum(-1)
    leak = 1 - to_selected[:, :num_selected]
    cut = to_selected[:, num_selected:] - attn[:, num_selected:, :num_prefix].sum(-1)
    return leak, cut


def token_cut_loss(records: list[IdleRecord], attention_modules: list[nn.Module], num_prefix: int,
                   mode: str = "both") -> torch.Tensor:
    """IdleViT's token cut loss averaged over idling layers (idlevit.md §5.1).

    ``both``: mean inter^2 + mean (intra - m)^2 over every row (the selected rows count twice, as in the official
    code); ``intra``: the second term; ``inter``: the first; ``none``: 0. ``attention_modules[i]`` is the
    attention of ``records[i]``'s block, whose ``index`` lists the prefix tokens first (as IdlePolicy records it).
    With several prefix tokens, attention to any of them is not a cut.
    """
    if mode not in CUT_MODES:
        raise ValueError(f"cut loss mode {mode!r} is not accepted; choose one of {', '.join(CUT_MODES)}")
    if mode == "none" or not records:
        return torch.zeros((), device=records[0].normed.device if records else None)
    total = 0.0
    for record, attn in zip(records, attention_modules, strict=True):
        logits = mean_head_logits(attn, record.normed, record.index, record.qk).float()
        leak, cut = cut_terms(logits, record.index.shape[1], num_prefix)
        rows = logits.shape[0] * logits.shape[1]
        leak_sq = leak.square().sum() / rows
        if mode in ("both", "inter"):
            total = total + leak_sq + cut.square().sum() / rows
        if mode in ("both", "intra"):
            total = total + leak_sq
    return total / len(records)


def distill_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) on logits, temperature 1, batch mean (IdleViT)."""
    return F.kl_div(F.log_softmax(student_logits.float(), -1), F.log_softmax(teacher_logits.float(), -1),
                    reduction="batchmean", log_target=True)


def feature_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """MSE between L2-normalised features (B, C): (2 - 2 cos) / C per image (IdleViT's class-token term)."""
    return F.mse_loss(F.normalize(student.float(), dim=-1), F.normalize(teacher.float(), dim=-1))
