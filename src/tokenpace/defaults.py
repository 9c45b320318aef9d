"""Per-model-class defaults where a method's generic default does not pay on the CPU (measured; README "Speed").

A method config field left at None takes, in order: the model's own ``tokenpace_defaults`` attribute (tokenpace's
models declare what they were designed with), this table (for timm classes tokenpace cannot annotate), then the
method's generic default. Keys are class names, matched along the model's class hierarchy.
"""
from __future__ import annotations

from typing import Any, Callable


def _pvt_v2_idle(model: Any) -> dict[str, Any]:
    """Idle from the last block of PVTv2's first stage; the ratio steps down at its third and fourth stages."""
    d = list(model.depths)
    starts = {max(0, d[0] - 1)} | {sum(d[:j]) for j in (2, 3) if sum(d[:j]) < sum(d)}
    return {"keep": 0.4, "stage_starts": tuple(sorted(starts))}


MODEL_DEFAULTS: dict[str, dict[str, dict[str, Any] | Callable[[Any], dict[str, Any]]]] = {
    # LeViT off the shelf: its conv stem (a fifth of the time) is never reduced and its late stages have few tokens,
    # so pruning from block 2 gains 1.13-1.22x; from block 1 it gains 1.30x (README, LeViT rows)
    "Levit": {"evo": {"stage_starts": (1,)}},
    # PVTv2: the MLP's depth-wise conv needs the full hidden grid, so an idling block at keep 0.7 costs as much as a
    # dense one in stages 1-2, and stage 1 (44% of the time) would run dense with the scaled (3, 6, 9). Keep 0.4
    # from stage 1's last block, stepping down at stages 3 and 4 (B2: (2, 7, 13)), pays 1.31x (README, PVTv2 rows)
    "PyramidVisionTransformerV2": {"idle": _pvt_v2_idle},
}


def model_defaults(model: Any, method: str) -> dict[str, Any]:
    """The options ``model`` asks for under ``method`` (its own attribute first, then the table)."""
    own = getattr(model, "tokenpace_defaults", {}).get(method)
    if own is not None:
        return dict(own)
    for cls in type(model).__mro__:
        table = MODEL_DEFAULTS.get(cls.__name__, {}).get(method)
        if table is not None:
            return dict(table(model) if callable(table) else table)
    return {}
