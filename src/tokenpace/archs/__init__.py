"""tokenpace's own architectures, registered with timm by ``import tokenpace.archs`` (the API and the CLI do it):

- ``evo_levit_*``, ``evo_levit_cifar``, ``levit_cifar`` (``evo_levit.py``): the official Evo-LeViT and the CIFAR
  LeViTs;
- ``evo_deit_*`` (``evo_deit.py``): Evo-ViT's DeiT, a timm ViT with an average-pool head and the training-only
  class-token head;
- ``lvvit_s``, ``lvvit_m`` and their 384 px variants (``lvvit.py``): LV-ViT, IdleViT's second model family.
"""
from __future__ import annotations

from .evo_deit import EvoDeit
from .evo_levit import CIFAR_CFG, EVO_LEVIT_CFGS, ConvStem, EvoAttention, EvoBlock, EvoDownsample, EvoLevit
from .lvvit import LVVIT_CFGS, LvVit, LvVitBlock, LvVitStem

__all__ = ["CIFAR_CFG", "EVO_LEVIT_CFGS", "LVVIT_CFGS", "ConvStem", "EvoAttention", "EvoBlock", "EvoDeit",
           "EvoDownsample", "EvoLevit", "LvVit", "LvVitBlock", "LvVitStem"]
