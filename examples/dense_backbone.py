"""A tokenpace-patched ViT as the backbone of a small segmentation model.

The decoder reads four feature maps through ``forward_intermediates``. On a patched model that call runs the method
(here IdleViT) and still returns the full grid at every index: idle tokens keep their features, so the maps are
complete and the decoder needs no change. Swap in any timm ViT, Eva, LeViT, Swin or PVTv2 backbone.

    python examples/dense_backbone.py            # ViT-S/16 at 224 px, one training step on random data
    python examples/dense_backbone.py --smoke    # a tiny backbone, for a quick check
"""
from __future__ import annotations

import argparse

import timm
import torch
import torch.nn.functional as F
from torch import nn

import tokenpace


class SimpleDecoder(nn.Module):
    """Project each feature map to a common width, upsample to the finest one, concatenate, classify per pixel."""

    def __init__(self, in_channels: list[int], num_classes: int, width: int = 64) -> None:
        super().__init__()
        self.project = nn.ModuleList(nn.Conv2d(c, width, 1) for c in in_channels)
        self.classify = nn.Sequential(nn.Conv2d(width * len(in_channels), width, 3, padding=1), nn.GELU(),
                                      nn.Conv2d(width, num_classes, 1))

    def forward(self, maps: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        finest = max(m.shape[-1] for m in maps)
        feats = [F.interpolate(p(m), size=(finest, finest), mode="bilinear", align_corners=False)
                 for p, m in zip(self.project, maps)]
        return F.interpolate(self.classify(torch.cat(feats, 1)), size=size, mode="bilinear", align_corners=False)


class Segmenter(nn.Module):
    def __init__(self, backbone: nn.Module, num_classes: int, indices: list[int]) -> None:
        super().__init__()
        self.backbone, self.indices = backbone, indices
        width = backbone.num_features
        self.decoder = SimpleDecoder([width] * len(indices), num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        maps = self.backbone.forward_intermediates(images, indices=self.indices, norm=True, intermediates_only=True)
        return self.decoder(maps, images.shape[-2:])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="a tokenpace-patched ViT feeding a segmentation decoder")
    parser.add_argument("--smoke", action="store_true", help="a tiny backbone at 64 px")
    parser.add_argument("--method", default="idle", help="evo, idle, evit or topk (default idle)")
    args = parser.parse_args(argv)
    if args.smoke:
        backbone = timm.create_model("vit_small_patch16_224", img_size=64, patch_size=8, depth=4, embed_dim=64,
                                     num_heads=2, num_classes=0)
        size, indices = 64, [0, 1, 2, 3]
    else:
        backbone = timm.create_model("vit_small_patch16_224", num_classes=0)  # pretrained=True with the hub
        size, indices = 224, [2, 5, 8, 11]
    tokenpace.apply(backbone, args.method)  # in place: no new parameters, the state dict is timm's
    model = Segmenter(backbone, num_classes=21, indices=indices)
    images, targets = torch.randn(2, 3, size, size), torch.randint(0, 21, (2, size, size))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loss = F.cross_entropy(model(images), targets)  # the method runs in training too; gradients reach the backbone
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        masks = model.eval()(images).argmax(1)
    dense = tokenpace.macs(tokenpace.remove(backbone))
    reduced = tokenpace.macs(tokenpace.apply(backbone, args.method))
    print(f"masks {tuple(masks.shape)}, loss {loss.item():.3f}, backbone GMACs {dense / 1e9:.2f} dense -> "
          f"{reduced / 1e9:.2f} {args.method}")
    return {"masks": masks, "loss": loss.item(), "macs": (dense, reduced)}


if __name__ == "__main__":
    main()
