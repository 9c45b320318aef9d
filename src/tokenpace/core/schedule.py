"""Where methods act and how many tokens they keep: the one place that maps depths to layers and keeps to K."""
from __future__ import annotations

import math


def scaled_layer(depth: int, layer_at_12: int) -> int:
    """A layer index given for depth 12, scaled to ``depth`` (rounded half up, clamped into the model)."""
    return min(depth - 1, max(1, math.floor(layer_at_12 * depth / 12 + 0.5)))


def scaled_layers(depth: int, layers_at_12: tuple[int, ...]) -> tuple[int, ...]:
    """Several depth-12 layer indices scaled to ``depth``, duplicates merged, ascending."""
    return tuple(sorted({scaled_layer(depth, layer) for layer in layers_at_12}))


def keep_count(num_patches: int, ratio: float) -> int:
    """K = int(P * ratio) (the official rounding, e.g. int(196 * 0.7**3) = 67), at least 1, at most P."""
    return min(num_patches, max(1, int(num_patches * ratio)))


def keep_count_ceil(num_tokens: int, ratio: float) -> int:
    """EViT's count: ceil(ratio * n) of the current n image tokens, at least 1, at most n."""
    return min(num_tokens, max(1, math.ceil(ratio * num_tokens)))


def stage_of(layer: int, stage_starts: tuple[int, ...]) -> int:
    """1-based stage of ``layer`` (0 before the first stage start)."""
    return sum(1 for start in stage_starts if layer >= start)


def validate_layers(name: str, layers: tuple[int, ...], depth: int, minimum: int = 0) -> None:
    """Raise ValueError unless ``layers`` is a non-empty, strictly increasing tuple inside [minimum, depth)."""
    if not layers:
        raise ValueError(f"{name} must name at least one layer; got an empty tuple")
    if minimum >= depth:
        raise ValueError(f"{name}: a model of depth {depth} has no layer this method can act at (accepted layers "
                         f"start at {minimum}); it needs at least {minimum + 1} blocks")
    bad = [layer for layer in layers if not minimum <= layer < depth]
    if bad:
        raise ValueError(
            f"{name}={layers} has layer(s) {bad} outside the model: accepted layers are {minimum}..{depth - 1} "
            f"for a model of depth {depth}"
        )
    if any(b <= a for a, b in zip(layers, layers[1:])):
        raise ValueError(f"{name}={layers} must be strictly increasing")
