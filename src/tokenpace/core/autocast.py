"""Whether autocast is on for a device, asked in a way torch.compile traces on every supported torch."""
from __future__ import annotations

import torch

if hasattr(torch.amp, "is_autocast_available"):  # torch >= 2.4: autocast asked by device type
    def autocast_on(device: str) -> bool:
        # a fixed list rather than torch.amp.is_autocast_available, which torch.compile cannot trace before torch
        # 2.12 (a graph break in every selection); other devices (meta) have no autocast to ask about
        return device in ("cpu", "cuda", "xpu", "mps") and torch.is_autocast_enabled(device)
else:
    def autocast_on(device: str) -> bool:
        return torch.is_autocast_cpu_enabled() if device == "cpu" else device == "cuda" and torch.is_autocast_enabled()


def operand_as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t as an operand of a product (or attention) with tensors of ``dtype``: cast where they differ, and left as
    it is where autocast is on, which casts every operand itself. No explicit cast, no dtype the trace saw pinned
    in an exported graph (a model exported under autocast then runs without it)."""
    return t if t.dtype == dtype or autocast_on(t.device.type) else t.to(dtype)
