"""timm PyramidVisionTransformerV2 family (IdleViT on a pyramid ViT). Stub: being written."""
from __future__ import annotations

from torch import nn

from .grid import GridAdapter


class PvtV2Adapter(GridAdapter):
    name = "timm PyramidVisionTransformerV2"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return False
