"""Training losses: IdleViT's token cut loss and distillation terms (idlevit.md §5-6), Evo-ViT's head losses."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .anatomy import BlockParts
from .core.tokens import gather_tokens
from .methods.idle import IdleRecord

CUT_MODES = ("both", "intra", "inter", "none")


def _flat(t: torch.Tensor) -> torch.Tensor:
    """(B, H, n, d) -> (B, n, H*d): all heads side by side."""
    return t.transpose(1, 2).flatten(2)


def _unselected(index: torch.Tensor, n: int) -> torch.Tensor:
    """Sequence indices (B, n - K) of the tokens not in ``index`` (B, K): a fixed count, no boolean masks."""
    rest = torch.ones(index.shape[0], n, device=index.device).scatter(1, index, 0.0)
    return rest.topk(n - index.shape[1], dim=1, sorted=False).indices


def mean_head_logits(parts: BlockParts, normed: torch.Tensor, where, index: torch.Tensor | None = None,
                     qk: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """(scale / H) * sum_h q_h k_h^T for every token pair, plus the head mean of the block's additive bias
    (relative-position biases; BEiT): (B, N, N), from one full-width product.

    The head mean of per-head logits equals one product of the concatenated (normed, rotated) queries and keys,
    so the B x H x N x N map is never formed (a bias is, where the block has one). ``where`` says where the N
    tokens of ``normed`` sit (position terms).
    With ``index`` (B, K) the tokens come reordered, rows and columns alike: the selected ones first in ``index``
    order (prefix tokens first), then the others. With ``qk``, the (q, k) the block already computed for the
    selected tokens, only the others are projected (same values, same gradients; where the block's q/k/v normalise
    over its own tokens, LeViT in training, the others use BatchNorm's running statistics).
    """
    prefix = where.prefix
    tokens = where
    if index is None:
        q, k = parts.queries(normed, where), parts.keys(normed, where)
    else:
        rest = _unselected(index, normed.shape[1])
        order = torch.cat([index, rest], dim=1)
        tokens = where.select(order[:, prefix:] - prefix)
        if qk is None:
            picked = gather_tokens(normed, order)
            q, k = parts.queries(picked, tokens), parts.keys(picked, tokens)
        else:
            others, picked = where.patches(rest - prefix), gather_tokens(normed, rest)
            q = torch.cat([qk[0], parts.queries(picked, others)], dim=2)
            k = torch.cat([qk[1], parts.keys(picked, others)], dim=2)
    logits = (_flat(q) * (parts.scale / parts.num_heads)) @ _flat(k).transpose(1, 2)
    bias = parts.mean_bias(tokens)
    return logits if bias is None else logits + bias


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


def token_cut_loss(records: list[IdleRecord], parts: list[BlockParts], num_prefix: int,
                   mode: str = "both") -> torch.Tensor:
    """IdleViT's token cut loss averaged over idling layers (idlevit.md §5.1).

    ``both``: mean inter^2 + mean (intra - m)^2 over every row (the selected rows count twice, as in the official
    code); ``intra``: the second term; ``inter``: the first; ``none``: 0. ``parts[i]`` is the anatomy of
    ``records[i]``'s block, whose ``index`` lists the prefix tokens first (as IdlePolicy records it).
    With several prefix tokens, attention to any of them is not a cut.
    """
    if mode not in CUT_MODES:
        raise ValueError(f"cut loss mode {mode!r} is not accepted; choose one of {', '.join(CUT_MODES)}")
    if mode == "none" or not records:
        return torch.zeros((), device=records[0].normed.device if records else None)
    total = 0.0
    for record, block in zip(records, parts, strict=True):
        logits = mean_head_logits(block, record.normed, record.where, record.index, record.qk).float()
        leak, cut = cut_terms(logits, record.index.shape[1], num_prefix)
        rows = logits.shape[0] * logits.shape[1]
        leak_sq = leak.square().sum() / rows
        if mode in ("both", "inter"):
            total = total + leak_sq + cut.square().sum() / rows
        if mode in ("both", "intra"):
            total = total + leak_sq
    return total / len(records)


def cut_loss_refusal(model: nn.Module) -> str | None:
    """Why the token cut loss does not apply to ``model`` (no class token, whose attention it is built on), or None."""
    from .families import adapter_for
    from .patch import get_patch, patched_model

    patch, target = get_patch(model), patched_model(model)
    family = patch.adapter if patch is not None else adapter_for(target)
    if family.has_class_token:
        return None
    kind = (patch.original_class if patch is not None else type(target)).__name__
    return (f"the token cut loss is built on the class token's attention and {kind} has none; train it without "
            "the cut loss (--cut-mode none)")


def model_cut_loss(model: nn.Module, mode: str = "both") -> torch.Tensor:
    """The token cut loss of a patched model's latest training forward (IdleViT records every idling layer; 0 when
    no layer idled, e.g. at keep 1). ValueError where there is nothing it could be computed from: a model not
    patched with Idle, one without a class token, or no training forward yet."""
    from .patch import get_patch

    patch = get_patch(model)
    if patch is None or patch.config.name != "idle":
        runs = "is not patched" if patch is None else f"runs {patch.config.name}"
        raise ValueError(f"the token cut loss is IdleViT's: it needs a model patched with Idle "
                         f"(tokenpace.apply(model, \"idle\")); this one {runs}")
    refusal = cut_loss_refusal(model)
    if refusal is not None:
        raise ValueError(refusal)
    if patch.last_state is None or not patch.last_state.training:
        raise ValueError("the token cut loss reads the model's latest forward in training mode; run "
                         "model.train() and a forward first")
    records = patch.last_state.records
    if not records:  # no layer idled (keep 1): a 0 where the model is, to sum with its other loss terms
        return torch.zeros((), device=next(model.parameters()).device)
    parts = [patch.adapter.parts(record.layer) for record in records]
    return token_cut_loss(records, parts, patch.adapter.num_prefix, mode)


def distill_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) on logits, temperature 1, batch mean (IdleViT)."""
    return F.kl_div(F.log_softmax(student_logits.float(), -1), F.log_softmax(teacher_logits.float(), -1),
                    reduction="batchmean", log_target=True)


def feature_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """MSE between L2-normalised features (B, C): (2 - 2 cos) / C per image (IdleViT's class-token term)."""
    return F.mse_loss(F.normalize(student.float(), dim=-1), F.normalize(teacher.float(), dim=-1))
