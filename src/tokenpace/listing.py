"""Which timm models tokenpace runs, and which methods each accepts: every candidate model is built on the meta
device (shapes only: no weights, no memory) and each method is applied to it through the public API, so the listing
says exactly what ``tokenpace.apply`` would say."""
from __future__ import annotations

import fnmatch
import warnings
from dataclasses import dataclass, field

import torch

from .families import UnsupportedModel
from .methods import METHODS
from .patch import apply, remove

# timm modules whose models tokenpace runs
SUPPORTED_MODULES = ("vision_transformer", "vision_transformer_hybrid", "vision_transformer_relpos", "vitamin", "deit",
                     "eva", "beit", "naflexvit", "cait", "levit", "swin_transformer", "swin_transformer_v2",
                     "swin_transformer_v2_cr", "pvt_v2", "vision_transformer_sam", "hiera", "hieradet_sam2",
                     "tiny_vit", "pit", "maxxvit", "qwen3_vit", "deepseek_vit", "gemma4_vit", "xcit", "volo", "davit",
                     "archs")


@dataclass
class ModelSupport:
    """One timm model name: its class, and per method None (accepted) or the one-line reason it is refused."""

    name: str
    model_class: str
    refusals: dict[str, str | None] = field(default_factory=dict)

    def accepted(self) -> list[str]:
        return [m for m, reason in self.refusals.items() if reason is None]


def candidate_names(pattern: str | None = None, pretrained: bool = True) -> list[str]:
    """timm names (with pretrained tags when ``pretrained``) of the ViT-like modules, filtered by ``pattern`` (a
    shell-style wildcard; a bare word matches anywhere)."""
    import timm

    from . import archs  # noqa: F401  (registers tokenpace's own models)

    names = []
    for module in SUPPORTED_MODULES:
        names += timm.list_models(module=module, pretrained=pretrained)
    if pattern:
        wildcard = pattern if any(c in pattern for c in "*?[") else f"*{pattern}*"
        names = [n for n in names if fnmatch.fnmatch(n, wildcard)]
    return sorted(set(names))


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())


def check_model(arch: str) -> ModelSupport:
    """Build ``arch`` on the meta device and try every method on it."""
    import timm

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with torch.device("meta"):
                model = timm.create_model(arch, pretrained=False)
        except Exception as err:  # a model timm itself cannot build here
            return ModelSupport(arch, "?", {m: f"timm cannot build it: {_one_line(err)}" for m in METHODS})
    support = ModelSupport(arch, type(model).__name__)
    for method in METHODS:
        try:
            apply(model, method)
            support.refusals[method] = None
        except UnsupportedModel:  # the supported families' list belongs to the README, not to every row
            support.refusals[method] = f"no tokenpace family runs {type(model).__name__} models"
        except (TypeError, ValueError) as err:
            support.refusals[method] = _one_line(err)
        finally:
            remove(model)
    return support


def list_support(pattern: str | None = None, pretrained: bool = True, progress=None) -> list[ModelSupport]:
    """:func:`check_model` for every candidate name; tags of one architecture share its check."""
    by_arch: dict[str, ModelSupport] = {}
    rows = []
    names = candidate_names(pattern, pretrained)
    for j, name in enumerate(names):
        arch = name.split(".")[0]
        if arch not in by_arch:
            by_arch[arch] = check_model(arch)
            if progress is not None:
                progress(j + 1, len(names))
        checked = by_arch[arch]
        rows.append(ModelSupport(name, checked.model_class, dict(checked.refusals)))
    return rows


def format_support(rows: list[ModelSupport]) -> str:
    """One line per model: class, yes/- per method, and the reasons of the refusals (the same reason once)."""
    width = max([len(r.name) for r in rows] + [5])
    cls_width = max([len(r.model_class) for r in rows] + [5])
    head = f"{'model':<{width}}  {'class':<{cls_width}}  " + "  ".join(f"{m:<4}" for m in METHODS) + "  why not"
    lines = [head, "-" * len(head)]
    for r in rows:
        marks = "  ".join(f"{'yes' if r.refusals[m] is None else '-':<4}" for m in METHODS)
        reasons = {}
        for method, reason in r.refusals.items():
            if reason is not None:
                # a method's refusal names the method: left out, so methods refused for one reason group
                reasons.setdefault(reason.replace(f"method {method!r} is not available", "not available"),
                                   []).append(method)
        why = "; ".join(f"{'/'.join(ms)}: {reason}" if len(reasons) > 1 or len(ms) < len(METHODS) else reason
                        for reason, ms in reasons.items())
        lines.append(f"{r.name:<{width}}  {r.model_class:<{cls_width}}  {marks}  {why}".rstrip())
    return "\n".join(lines)


def summarize(rows: list[ModelSupport]) -> str:
    """Per model class: how many names, and how many each method accepts."""
    classes: dict[str, list[ModelSupport]] = {}
    for r in rows:
        classes.setdefault(r.model_class, []).append(r)
    head = f"{'class':<28} {'names':>6} " + " ".join(f"{m:>6}" for m in METHODS)
    lines = [head, "-" * len(head)]
    for cls, members in sorted(classes.items(), key=lambda kv: -len(kv[1])):
        counts = " ".join(f"{sum(r.refusals[m] is None for r in members):>6}" for m in METHODS)
        lines.append(f"{cls:<28} {len(members):>6} {counts}")
    counts = " ".join(f"{sum(r.refusals[m] is None for r in rows):>6}" for m in METHODS)
    lines.append(f"{'all':<28} {len(rows):>6} {counts}")
    return "\n".join(lines)
