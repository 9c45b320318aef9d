"""One adapter per model family; ``adapter_for`` picks the one that fits a model."""
from __future__ import annotations

from torch import nn

from .base import GROUPED, SEQUENCE, Family, GroupCount, SequenceFamily
from .beit import TimmBeit
from .cait import TimmCait
from .davit import DaVitAdapter
from .eva import TimmEva
from .gemma4_vit import Gemma4VitFamily
from .hiera import TimmHiera
from .hieradet import HieraDetAdapter
from .levit import EvoLevitFamily, TimmLevit
from .lvvit import LvVitFamily
from .maxvit import MaxVitAdapter
from .naflexvit import TimmNaFlexVit
from .pit import TimmPit
from .pvt_v2 import PvtV2Adapter
from .sam import SamAdapter
from .swin import SwinAdapter, SwinV2Adapter, SwinV2CrAdapter
from .timm_vit import TimmViT
from .tiny_vit import TinyVitAdapter
from .vit_relpos import TimmRelPosViT
from .vlm_vit import DeepseekVitFamily, Qwen3VitFamily
from .volo import TimmVolo
from .xcit import TimmXcit

FAMILIES: tuple[type[Family], ...] = (TimmViT, TimmEva, TimmBeit, TimmRelPosViT, TimmNaFlexVit, TimmCait,
                                      TimmXcit, TimmLevit, EvoLevitFamily, LvVitFamily, TimmPit, SwinAdapter,
                                      SwinV2Adapter, SwinV2CrAdapter, PvtV2Adapter, SamAdapter, TimmHiera,
                                      HieraDetAdapter, TinyVitAdapter, MaxVitAdapter, Qwen3VitFamily,
                                      DeepseekVitFamily, Gemma4VitFamily, TimmVolo, DaVitAdapter)

SUPPORTED = ("timm VisionTransformer (DeiT, ViT/AugReg, DeiT-III, registers, qk-norm, SigLIP, AIMv2; class token or "
             "not; tokenpace's evo_deit_*), timm Eva (EVA-02, DINOv3, PE core, RoPE ViTs), timm Beit (BEiT, BEiT v2), "
             "timm VisionTransformerRelPos (vit_relpos_*), timm NaFlexVit (naflexvit_*: SigLIP2 NaFlex, C-RADIO; image "
             "batches), timm Cait (cait_*), timm Xcit (xcit_*), timm VOLO (volo_*), timm Levit (levit_*) and "
             "tokenpace's evo_levit_*, timm PiT (pit_*), tokenpace's LV-ViT (lvvit_*), "
             "timm SwinTransformer (swin_*), SwinTransformerV2 (swinv2_*), SwinTransformerV2Cr (swinv2_cr_*), "
             "PyramidVisionTransformerV2 (pvt_v2_*), VisionTransformerSAM (samvit_*), Hiera (hiera_*), "
             "HieraDet (sam2_hiera_*: SAM 2), TinyVit (tiny_vit_*), MaxxVit (maxvit_*, maxxvit_*, maxxvitv2_*, "
             "coatnet_*, coatnext_*), DaVit (davit_*: DaViT, Florence-2's), and the VLM vision towers "
             "Qwen3VitEncoder / Qwen3VitClassifier (qwen3_vit_*: Qwen3-VL, Qwen3.5), DeepseekVitEncoder / "
             "DeepseekVitClassifier (deepseek_vit_*) and Gemma4VitEncoder / Gemma4VitClassifier (gemma4_vit_*: "
             "Gemma 4)")


class UnsupportedModel(TypeError):
    """No family adapter fits the model's class (its message names the supported families)."""


def adapter_for(model: nn.Module) -> Family:
    """The family adapter for ``model``; UnsupportedModel (a TypeError) naming the supported families when there is
    none."""
    for family in FAMILIES:
        if family.matches(model):
            adapter = family(model)
            if adapter.depth == 0:  # nothing a method could run on, and no block for the cost model to count
                raise UnsupportedModel(f"{type(model).__name__} has no transformer blocks (depth 0); tokenpace needs "
                                       "at least one")
            return adapter
    raise UnsupportedModel(f"{type(model).__module__}.{type(model).__name__} is not a supported model; "
                           f"tokenpace supports: {SUPPORTED}")


__all__ = ["FAMILIES", "GROUPED", "SEQUENCE", "SUPPORTED", "Family", "GroupCount", "SequenceFamily",
           "UnsupportedModel", "adapter_for"]
