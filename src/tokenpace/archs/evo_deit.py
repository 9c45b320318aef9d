"""Evo-ViT's DeiT (``evo_deit_{tiny,small,base}_patch16_{224,384}``, evovit.md §6, §12.1): a timm
``VisionTransformer`` with a class token and an average-pool head (its LayerNorm after the pool, timm's ``fc_norm``),
plus the training-only class-token head (``norm_cls``, ``head_cls``) of the assisted class-token loss.

Unpatched it runs dense; ``tokenpace.apply(model, "evo")`` is the official Evo-ViT (keep 0.5, selections at layers 4
and 8, placeholders carried unchanged). The class-token head is never used at inference, as in the official code.
"""
from __future__ import annotations

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from .registry import no_pretrained, register, without_plumbing


class EvoDeit(VisionTransformer):
    """DeiT with an average-pool head and Evo-ViT's auxiliary class-token head (training only)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**{"class_token": True, "global_pool": "avg", "qkv_bias": True, **kwargs})
        if self.global_pool != "avg" or self.cls_token is None:
            raise ValueError("Evo-ViT's DeiT classifies the average-pooled patch tokens and steers selection with a "
                             "class token; accepted: global_pool='avg', class_token=True")
        self.norm_cls = nn.LayerNorm(self.embed_dim, eps=1e-6)
        self.head_cls = nn.Linear(self.embed_dim, self.num_classes) if self.num_classes > 0 else nn.Identity()

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """New heads (``head`` and the class-token ``head_cls``) for ``num_classes``; the pool stays the average."""
        if global_pool not in (None, "avg"):
            raise ValueError(f"Evo-ViT's DeiT classifies the average-pooled patch tokens; accepted global_pool: "
                             f"'avg' (or None: unchanged); got {global_pool!r}")
        super().reset_classifier(num_classes, global_pool)
        weight = self.norm_cls.weight  # the new head joins the model's device and dtype
        self.head_cls = (nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()).to(
            weight.device, weight.dtype).train(self.training)

    def forward_train_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(head(average pool), head_cls(class token)): what the evo-scratch objective trains, 0.5 / 0.5."""
        return self.forward_head(x), self.head_cls(self.norm_cls(x[:, 0]))


EVO_DEIT_WIDTHS = {"tiny": (192, 3), "small": (384, 6), "base": (768, 12)}


def _evo_deit(name: str, size: str, native_size: int, pretrained: bool, **kwargs) -> EvoDeit:
    no_pretrained(name, pretrained, "tokenpace.load_official(path, \"" + name + "\") for the released files")
    dim, heads = EVO_DEIT_WIDTHS[size]
    kwargs = without_plumbing(kwargs)
    img_size = kwargs.pop("img_size", native_size)  # create_model(img_size=...) resizes, as on timm's ViT
    model = EvoDeit(**{"img_size": img_size, "patch_size": 16, "embed_dim": dim, "depth": 12, "num_heads": heads,
                       **kwargs})
    # the official evaluation transform at every size (evovit.md §8): resize to 256/224 x size, centre crop
    model.pretrained_cfg = model.default_cfg = {
        "input_size": (3, img_size, img_size), "crop_pct": 224 / 256,
        "interpolation": "bicubic", "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "num_classes": model.num_classes, "first_conv": "patch_embed.proj", "classifier": "head"}
    return model


for _size in EVO_DEIT_WIDTHS:
    for _img in (224, 384):
        _name = f"evo_deit_{_size}_patch16_{_img}"
        register(_name, lambda pretrained=False, _n=_name, _s=_size, _i=_img, **kw: _evo_deit(_n, _s, _i, pretrained,
                                                                                            **kw))
