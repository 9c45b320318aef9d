"""One adapter per model family; ``adapter_for`` picks the one that fits a model."""
from __future__ import annotations

from torch import nn

from .base import FamilyAdapter, SequenceAdapter
from .grid import GridAdapter
from .levit import EvoLevitFamily, TimmLevit
from .pvt_v2 import PvtV2Adapter
from .swin import SwinAdapter
from .timm_vit import TimmViT

FAMILIES: tuple[type[FamilyAdapter], ...] = (TimmViT, TimmLevit, EvoLevitFamily, SwinAdapter, PvtV2Adapter)

SUPPORTED = ("timm VisionTransformer (DeiT, DeiT distilled, ViT/AugReg, DeiT-III/LayerScale, register tokens, "
             "qk-norm; global_pool token or avg): evo, idle, evit, topk; timm Levit/LevitDistilled (levit_*) and "
             "tokenpace's evo_levit_*: evo; timm SwinTransformer (swin_*) and PyramidVisionTransformerV2 (pvt_v2_*): "
             "idle")


def adapter_for(model: nn.Module) -> FamilyAdapter:
    """The family adapter for ``model``; TypeError naming the supported families when there is none."""
    for family in FAMILIES:
        if family.matches(model):
            return family(model)
    raise TypeError(f"{type(model).__module__}.{type(model).__name__} is not a supported model; "
                    f"tokenpace supports: {SUPPORTED}")


__all__ = ["FAMILIES", "SUPPORTED", "FamilyAdapter", "GridAdapter", "SequenceAdapter", "adapter_for"]
