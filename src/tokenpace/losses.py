"""Training losses: IdleViT's token cut loss and distillation terms (idlevit.md §5-6), Evo-ViT's head losses."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .core.tokens import gather_tokens, scatter_tokens
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


def mean_head_logits(attn: nn.Module, normed: torch.Tensor, index: torch.Tensor | None = None,
                     qk: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """(scale / H) * sum_h q_h k_h^T for every token pair: (B, N, N), from one full-width product.

    The head mean of per-head logits equals one product of the concatenated (normed) queries and keys, so the
    B x H x N x N map is never formed. With ``qk``, the (q, k) the block already computed for the tokens at
    sequence positions ``index`` (B, K), only the other tokens are projected (same values, same gradients).
    """
    if qk is None:
        q, k = _project_qk(attn, normed)
    else:
        B, n, _ = normed.shape
        idle = torch.ones(B, n, device=normed.device).scatter(1, index, 0.0)
        idle_idx = idle.topk(n - index.shape[1], dim=1, sorted=False).indices  # fixed count: no boolean masks
        q_idle, k_idle = _project_qk(attn, gather_tokens(normed, idle_idx))
        q, k = (scatter_tokens(scatter_tokens(sel.new_empty(B, n, sel.shape[-1]), index, sel), idle_idx, rest)
                for sel, rest in ((qk[0], q_idle), (qk[1], k_idle)))
    H = attn.num_heads
    return (q * (attn.scale / H)) @ k.transpose(1, 2)


def cut_terms(logits: torch.Tensor, selected: torch.Tensor, num_prefix: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (inter, intra) of one idling layer, from head-mean logits (B, N, N) and a 0/1 mask (B, N).

    With A = softmax(logits): inter_i = sum_j |m_i - m_j| A_ij over non-prefix columns j (attention to the class
    token is never a cut), intra_i = sum_j m_i m_j A_ij. Both come from masked log-sum-exps, no N x N mask.
    """
    log_all = logits.logsumexp(dim=-1)
    log_sel = (logits + torch.log(selected).unsqueeze(1)).logsumexp(dim=-1)
    to_sel = torch.exp(log_sel - log_all)  # sum_{j in S} A_ij, prefix columns included
    to_prefix = torch.exp(logits[:, :, :num_prefix].logsumexp(dim=-1) - log_all)
    inter = selected * (1 - to_sel) + (1 - selected) * (to_sel - to_prefix)
    intra = selected * to_sel
    return inter, intra


def token_cut_loss(records: list[IdleRecord], attention_modules: list[nn.Module], num_prefix: int,
                   mode: str = "both") -> torch.Tensor:
    """IdleViT's token cut loss averaged over idling layers (idlevit.md §5.1).

    ``both``: mean inter^2 + mean (intra - m)^2 over every row (the selected rows count twice, as in the official
    code); ``intra``: the second term; ``inter``: the first; ``none``: 0. ``attention_modules[i]`` is the
    attention of ``records[i]``'s block. With several prefix tokens, attention to any of them is not a cut.
    """
    if mode not in CUT_MODES:
        raise ValueError(f"cut loss mode {mode!r} is not accepted; choose one of {', '.join(CUT_MODES)}")
    if mode == "none" or not records:
        return torch.zeros((), device=records[0].normed.device if records else None)
    total = 0.0
    for record, attn in zip(records, attention_modules, strict=True):
        logits = mean_head_logits(attn, record.normed, record.index, record.qk).float()
        selected = torch.zeros(logits.shape[:2], device=logits.device).scatter(1, record.index, 1.0)
        inter, intra = cut_terms(logits, selected, num_prefix)
        loss = 0.0
        if mode in ("both", "inter"):
            loss = loss + inter.square().mean()
        if mode in ("both", "intra"):
            loss = loss + (intra - selected).square().mean()
        total = total + loss
    return total / len(records)


def distill_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) on logits, temperature 1, batch mean (IdleViT)."""
    return F.kl_div(F.log_softmax(student_logits.float(), -1), F.log_softmax(teacher_logits.float(), -1),
                    reduction="batchmean", log_target=True)


def feature_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """MSE between L2-normalised features (B, C): (2 - 2 cos) / C per image (IdleViT's class-token term)."""
    return F.mse_loss(F.normalize(student.float(), dim=-1), F.normalize(teacher.float(), dim=-1))
