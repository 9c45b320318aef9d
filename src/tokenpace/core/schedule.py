"""Where methods act and how many tokens they keep: the one place that maps depths to layers and keeps to K."""
from __future__ import annotations

import math


def scaled_layer(depth: int, layer_at_12: int) -> int:
    """A layer index given for depth 12, scaled to ``depth`` (rounded half up, clamped into the model)."""
    return min(depth - 1, max(1, math.floor(layer_at_12 * depth / 12 + 0.5)))


def scaled_layers(depth: int, layers_at_12: tuple[int, ...]) -> tuple[int, ...]:
    """Several depth-12 layer indices scaled to ``depth``, duplicates merged, ascending."""
    return tuple(sorted({scaled_layer(depth, layer) for layer in layers_at_12}))


class EmptySelection(ValueError):
    """A keep ratio that leaves a selection with no token (told apart from layers a model does not have)."""


def keep_count(num_patches: int, ratio: float) -> int:
    """K = int(P * ratio) (the official rounding, e.g. int(196 * 0.7**3) = 67) for a ratio in (0, 1]; a ratio that
    keeps no token is a ValueError (raised, not raised to 1: the cost and accuracy asked for would not be run)."""
    k = int(num_patches * ratio)
    if k < 1 <= num_patches:
        raise EmptySelection(f"a keep ratio of {ratio:.4g} keeps int({num_patches} * {ratio:.4g}) = 0 of {num_patches} "
                         f"tokens; at least one must be kept ({num_patches} * ratio >= 1)")
    return k


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
        single = len(layers) == 1 and name.endswith(" layer")  # TopK's one layer, not a tuple of one
        given = f"{name}={layers[0]} is" if single else f"{name}={layers} has layer(s) {bad}"
        raise ValueError(
            f"{given} outside the model: accepted layers are {minimum}..{depth - 1} "
            f"for a model of depth {depth}"
        )
    if any(b <= a for a, b in zip(layers, layers[1:])):
        raise ValueError(f"{name}={layers} must be strictly increasing")
