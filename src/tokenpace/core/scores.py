"""Pure score helpers: the evolution of Evo's global attention and the random control (score rows and logits are
in ``core.attention`` and ``scoring``)."""
from __future__ import annotations

import torch


def evolve(previous: torch.Tensor, current: torch.Tensor, alpha: float | torch.Tensor) -> torch.Tensor:
    """Global class attention update (Evo-ViT): (1 - alpha) * previous + alpha * current; alpha weights the new layer
    (a float, or Evo-LeViT's learned sigmoid(theta) tensor: never branched on, so compiled graphs stay static)."""
    if isinstance(alpha, float) and alpha == 1.0:
        return current
    return previous * (1.0 - alpha) + current * alpha


def random_scores(like: torch.Tensor) -> torch.Tensor:
    """Uniform random scores with the shape of ``like``: the control that shows whether attention ranks better."""
    return torch.rand(like.shape, device=like.device, dtype=torch.float32)
