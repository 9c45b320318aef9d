"""timm SwinTransformer family (IdleViT on a pyramid ViT). Stub: being written."""
from __future__ import annotations

from torch import nn

from .grid import GridAdapter


class SwinAdapter(GridAdapter):
    name = "timm SwinTransformer"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return False
