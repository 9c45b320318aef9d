"""The released checkpoints' key layouts, each as a map from every key of the tokenpace / timm model to the official
key(s) it is read from (specs: evovit.md §12.4, official-keys.md). One map serves loading and the error that names
the official keys a file lacks.

- ``TIMM``: the same names (IdleViT's DeiT files are timm's DeiT; LV-ViT's are the authors', which tokenpace keeps).
- ``EVO_DEIT``: Evo-ViT's split attention: ``norms.{i}`` (norm1), ``qks.{i}.qk`` (q and k rows) stacked on
  ``vs.{i}.v`` (v rows) as timm's fused ``qkv``, ``projs.{i}``; the LayerNorm after the average pool is ``norm``
  (timm ``fc_norm``); the training-only class-token head is ``norm_cls`` + ``head_cls``.
- ``EVO_LEVIT``: the official Evo-LeViT module tree: a flat ``blocks.{b}`` list (each block ``m1.m`` attention and
  ``m2.m`` MLP; each down-sampling attention, then its MLP ``m``), Linear/Conv + BatchNorm pairs as ``c`` + ``bn``,
  heads as ``bn`` + ``l``, ``poss`` position embeddings, ``learn_tradeoff`` evolution weights of shape (1,). Every
  module is registered a second time under ``stage_blocks.*``; those duplicates are not read, but each must equal a
  tensor that is (a file whose twins differ was edited or mixed from two checkpoints).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..errors import TokenpaceError
from ..weights import SHOWN_KEYS, key_problems


@dataclass(frozen=True)
class Source:
    """Where one model key comes from: official keys, joined by rows (``concat``), or one key reshaped to the
    model's shape (``reshape``: a (1,) parameter held as a scalar)."""

    keys: tuple[str, ...]
    join: str = "same"  # same | concat | reshape


@dataclass(frozen=True)
class Layout:
    name: str
    description: str  # the expected layout, as an error names it
    sources: Callable[[nn.Module], dict[str, Source]]
    duplicates: tuple[str, ...] = ()  # prefixes of official entries that repeat others (not read; checked equal)


def _same(model: nn.Module) -> dict[str, Source]:
    return {k: Source((k,)) for k in model.state_dict()}


def _evo_deit(model: nn.Module) -> dict[str, Source]:
    out = {}
    for key in model.state_dict():
        parts = key.split(".")
        if parts[0] == "blocks" and parts[2] == "norm1":
            out[key] = Source((f"norms.{parts[1]}.{parts[3]}",))
        elif parts[0] == "blocks" and parts[2:4] == ["attn", "qkv"]:
            out[key] = Source((f"qks.{parts[1]}.qk.{parts[4]}", f"vs.{parts[1]}.v.{parts[4]}"), "concat")
        elif parts[0] == "blocks" and parts[2:4] == ["attn", "proj"]:
            out[key] = Source((f"projs.{parts[1]}.{parts[4]}",))
        elif parts[0] == "fc_norm":
            out[key] = Source((f"norm.{parts[1]}",))
        else:
            out[key] = Source((key,))
    return out


def _linear_bn(rest: list[str]) -> str:
    """timm's LinearNorm / ConvNorm (``linear``, ``bn``) as the official Linear_BN / Conv2d_BN (``c``, ``bn``)."""
    return ".".join(["c" if rest[0] == "linear" else rest[0], *rest[1:]])


def _evo_levit(model: nn.Module) -> dict[str, Source]:
    flat, b = {}, 0  # the official flat block index of each stage's down-sampling and blocks
    for s, stage in enumerate(model.stages):
        if s > 0:
            flat[("down", s)] = b
            b += 2  # the down-sampling attention, then its residual MLP
        for j in range(len(stage)):
            flat[("block", s, j)] = b
            b += 1
    out = {}
    for key in model.state_dict():
        p = key.split(".")
        if key == "cls_token":
            name = key
        elif key == "pos_embed":
            name = "poss"
        elif p[0] == "stem":
            name = f"patch_embed.{2 * (int(p[1][len('conv'):]) - 1)}.{_linear_bn(p[2:])}"
        elif p[0] == "downsamples":
            at = flat[("down", int(p[1]))]
            rest = p[2:]
            if rest == ["pos_embed"]:
                name = f"blocks.{at}.poss"
            elif rest == ["theta"]:
                name = f"blocks.{at}.learn_tradeoff"
            elif rest[0] == "mlp":
                name = f"blocks.{at + 1}.m.{0 if rest[1] == 'ln1' else 2}.{_linear_bn(rest[2:])}"
            elif rest[0] == "q":
                name = f"blocks.{at}.q.1.{_linear_bn(rest[1:])}"
            elif rest[0] == "proj":
                name = f"blocks.{at}.proj.1.{_linear_bn(rest[2:])}"
            else:  # kv
                name = f"blocks.{at}.{rest[0]}.{_linear_bn(rest[1:])}"
        elif p[0] == "stages":
            at, rest = flat[("block", int(p[1]), int(p[2]))], p[3:]
            if rest == ["attn", "theta"]:
                name = f"blocks.{at}.m1.m.learn_tradeoff"
            elif rest[:2] == ["attn", "qkv"]:
                name = f"blocks.{at}.m1.m.qkv.{_linear_bn(rest[2:])}"
            elif rest[:2] == ["attn", "proj"]:
                name = f"blocks.{at}.m1.m.proj.1.{_linear_bn(rest[3:])}"
            else:  # mlp.ln1 / mlp.ln2
                name = f"blocks.{at}.m2.m.{0 if rest[1] == 'ln1' else 2}.{_linear_bn(rest[2:])}"
        else:  # head, head_dist, head_cls, head_cls_dist: BatchNorm ``bn`` + Linear ``l``
            name = ".".join([p[0], "l" if p[1] == "linear" else p[1], *p[2:]])
        out[key] = Source((name,), "reshape" if key.endswith("theta") else "same")
    return out


TIMM = Layout("timm", "timm's key names (cls_token, pos_embed, patch_embed.*, blocks.{i}.norm1/attn.qkv/attn.proj/"
              "norm2/mlp.fc1/mlp.fc2, norm, head; LV-ViT: the authors' patch_embed.conv1-3/bn1-3/proj and aux_head)",
              _same)
EVO_DEIT = Layout("Evo-ViT DeiT", "Evo-ViT's split attention (norms.{i}, qks.{i}.qk, vs.{i}.v, projs.{i}, "
                  "blocks.{i}.norm2/mlp, norm after the pool, head, norm_cls and head_cls)", _evo_deit)
EVO_LEVIT = Layout("Evo-LeViT", "the official Evo-LeViT tree (cls_token, poss, patch_embed.{0,2,4,6}.c/bn, "
                   "blocks.{b}.m1.m.qkv/proj.1/learn_tradeoff and m2.m.0/2 per block, blocks.{b}.poss/kv/q.1/proj.1/"
                   "learn_tradeoff and blocks.{b+1}.m.0/2 per down-sampling, head/head_dist/head_cls/head_cls_dist "
                   ".bn/.l)", _evo_levit, duplicates=("stage_blocks.",))


def _join(tensors: list[torch.Tensor], join: str, shape: torch.Size) -> torch.Tensor:
    if join == "concat":
        return torch.cat(tensors, dim=0)
    if join == "reshape" and tensors[0].numel() == shape.numel():
        return tensors[0].reshape(shape)
    return tensors[0]


def _fingerprint(tensor: torch.Tensor) -> tuple:
    """What equal tensors share: dtype, shape and a 128-bit digest of the raw bytes (a digest collision is no
    practical concern). Meta tensors have no values: dtype and shape only."""
    head = (tensor.dtype, tuple(tensor.shape))
    if tensor.device.type == "meta":
        return head
    raw = tensor.detach().reshape(-1).contiguous().cpu().view(torch.uint8).numpy()
    return head + (hashlib.blake2b(raw.tobytes(), digest_size=16).digest(),)


def _without_twin(duplicates: list[str], read: list[torch.Tensor], state: dict[str, torch.Tensor]) -> list[str]:
    """The ``duplicates`` whose tensor equals none of ``read`` in dtype, shape and values."""
    present = {_fingerprint(tensor) for tensor in read}
    return [key for key in duplicates if _fingerprint(state[key]) not in present]


def remap(layout: Layout, model: nn.Module, state: dict[str, torch.Tensor], label: str,
          arch: str) -> dict[str, torch.Tensor]:
    """``state`` (official keys) as ``model``'s state dict; TokenpaceError naming the official keys that are missing,
    unexpected or of another shape, and the layout expected."""
    expected = model.state_dict()
    out, used, missing, shapes = {}, set(), [], []
    for key, source in layout.sources(model).items():
        absent = [k for k in source.keys if k not in state]
        if absent:
            missing += absent
            continue
        used.update(source.keys)
        tensor = _join([state[k] for k in source.keys], source.join, expected[key].shape)
        if tensor.shape != expected[key].shape:
            found = " + ".join(f"{k} {tuple(state[k].shape)}" for k in source.keys)
            shapes.append(f"{found} vs {tuple(expected[key].shape)} expected")
            continue
        out[key] = tensor
    duplicates = [k for k in state if k not in used and k.startswith(layout.duplicates)]
    unexpected = [k for k in state if k not in used and not k.startswith(layout.duplicates)]
    problems = key_problems(missing, unexpected, shapes)
    if not problems:  # twins are compared only once every key read fits
        orphans = _without_twin(duplicates, [state[k] for k in used], state)
        if orphans:
            shown = ", ".join(orphans[:SHOWN_KEYS]) + (f" and {len(orphans) - SHOWN_KEYS} more"
                                                       if len(orphans) > SHOWN_KEYS else "")
            problems = (f"{len(orphans)} duplicate keys ({', '.join(layout.duplicates)}*) equal to no key read "
                        f"({shown}); the official code registers each of these modules twice, so each must repeat "
                        "one of the keys read, with the same shape and values")
    if problems:
        raise TokenpaceError(f"checkpoint {label} does not fit {arch} ({layout.name} layout: {layout.description}): "
                             f"{problems}")
    return out
