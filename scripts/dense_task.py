"""Evidence on a dense task with real images: cluttered CIFAR-10 (each object pasted at a random position on a noise
canvas), where the object's box gives every patch a foreground/background label.

A small ViT with a class head and a per-patch head (foreground/background from the final patch tokens, read through
``forward_intermediates``, which runs the method and returns the full grid) is trained densely; then dense, Evo and
Idle at keep 0.7 and 0.5, each with its random-score control, and EViT/top-k (whose maps keep the features dropped
tokens entered their last block with) are evaluated off the shelf, and Evo and Idle again after a short fine-tune.
Reported: top-1 and patch-level foreground IoU. Writes RESULTS.json and a picture (image, true mask, predicted masks).
``--arch sam``: the same task on a small timm SAM ViT (windowed blocks with two global ones, decomposed relative
position, a norm neck, average pool), where only Idle runs.

    python scripts/dense_task.py --data ../shared/data/cifar10_jpeg.npz --out runs/dense_task
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
import tokenpace  # noqa: E402
from tokenpace.data import ClutteredDataset, PackedJpegDataset  # noqa: E402

MEAN, STD = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
CONFIGS = [("dense", {}), ("evo", {"keep": 0.7}), ("evo", {"keep": 0.7, "score": "random"}), ("evo", {"keep": 0.5}),
           ("evo", {"keep": 0.5, "score": "random"}), ("idle", {"keep": 0.7}),
           ("idle", {"keep": 0.7, "score": "random"}), ("idle", {"keep": 0.5}),
           ("idle", {"keep": 0.5, "score": "random"}), ("evit", {"keep": 0.7}), ("topk", {"keep": 0.5})]
FINETUNED = [("evo", {"keep": 0.7}), ("evo", {"keep": 0.5}), ("idle", {"keep": 0.7}), ("idle", {"keep": 0.5})]
SHOWN = [("dense", {}), ("evo", {"keep": 0.5}), ("idle", {"keep": 0.5}), ("topk", {"keep": 0.5})]
ARCH_METHODS = {"vit": ("dense", "evo", "idle", "evit", "topk"), "sam": ("dense", "idle")}  # what each arch accepts
ARCH_EXTRA = {"vit": [], "sam": [("idle", {"keep": 0.7, "score": "norm"}), ("idle", {"keep": 0.5, "score": "norm"})]}


class PatchMasks(Dataset):
    """(image tensor, label, patch foreground mask (rows, cols) as 0/1) from the cluttered set: a patch is foreground
    when at least half of it lies inside the object's box. ``flip``: random horizontal flips (training)."""

    def __init__(self, cluttered: ClutteredDataset, patch: int, flip: bool) -> None:
        self.cluttered, self.patch, self.flip = cluttered, patch, flip

    def __len__(self) -> int:
        return len(self.cluttered)

    def __getitem__(self, i: int):
        image, label, (x, y, w, h) = self.cluttered.sample(i)
        pixels = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255
        pixels = (pixels - MEAN[:, None, None]) / STD[:, None, None]
        inside = torch.zeros(pixels.shape[1:])
        inside[y:y + h, x:x + w] = 1
        mask = (F.avg_pool2d(inside[None, None], self.patch)[0, 0] >= 0.5).long()
        if self.flip and torch.rand(()) < 0.5:
            pixels, mask = pixels.flip(-1), mask.flip(-1)
        return pixels, label, mask


class DenseViT(nn.Module):
    """A timm ViT (or SAM ViT) with its class head and a per-patch foreground head on the final normed patch tokens.
    The SAM ViT: windows of ``window`` tokens a side, global attention in the middle and last blocks (SAM-B's
    pattern at half its depth), a LayerNorm2d neck, average pool."""

    def __init__(self, canvas: int, patch: int, width: int, depth: int, heads: int, arch: str = "vit",
                 window: int = 4) -> None:
        super().__init__()
        self.arch = arch
        if arch == "sam":
            from timm.models.vision_transformer_sam import VisionTransformerSAM

            self.backbone = VisionTransformerSAM(img_size=canvas, patch_size=patch, embed_dim=width, depth=depth,
                                                 num_heads=heads, window_size=window, use_rel_pos=True,
                                                 global_attn_indexes=(depth // 2 - 1, depth - 1), neck_chans=None,
                                                 num_classes=10)
        else:
            from timm.models.vision_transformer import VisionTransformer

            self.backbone = VisionTransformer(img_size=canvas, patch_size=patch, embed_dim=width, depth=depth,
                                              num_heads=heads, num_classes=10)
        self.patch_head = nn.Linear(width, 2)

    def forward(self, x: torch.Tensor):
        last = [len(self.backbone.blocks) - 1]
        if self.arch == "sam":  # NCHW maps only; norm=True runs the neck on them, as on the final map
            final, maps = self.backbone.forward_intermediates(x, indices=last, norm=True)
            tokens = maps[0].flatten(2).transpose(1, 2)
        else:
            final, maps = self.backbone.forward_intermediates(x, indices=last, norm=True, output_fmt="NLC")
            tokens = maps[0]
        return self.backbone.forward_head(final), self.patch_head(tokens)  # (B, 10), (B, N, 2)


def loaders(args):
    def split(name, limit, seed, flip):
        base = PackedJpegDataset(args.data, name, limit=limit)
        return PatchMasks(ClutteredDataset(base, args.canvas, seed=seed), args.patch, flip)

    train = DataLoader(split("train", args.train_limit, 0, True), batch_size=args.batch_size, shuffle=True,
                       num_workers=args.workers, generator=torch.Generator().manual_seed(0))
    test = DataLoader(split("test", args.test_limit, 1, False), batch_size=256, num_workers=args.workers)
    return train, test


def train(model: DenseViT, loader, epochs: int, lr: float, say) -> None:
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    steps = epochs * len(loader)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=steps, pct_start=0.1)
    model.train()
    for epoch in range(epochs):
        start, total = time.time(), 0.0
        for images, labels, masks in loader:
            logits, patches = model(images)
            loss = F.cross_entropy(logits, labels) + F.cross_entropy(patches.flatten(0, 1), masks.flatten())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item()
        say(f"epoch {epoch + 1}/{epochs}: loss {total / len(loader):.3f} ({time.time() - start:.0f} s)")
    model.eval()


@torch.no_grad()
def evaluate(model: DenseViT, loader) -> dict:
    """Top-1, patch-level foreground IoU (summed over the set), the foreground share predicted, and on a patched
    model, per block that selects, the share of the tokens it runs in full that lie on the object (``tokenpace.trace``:
    does the score find the object?)."""
    torch.manual_seed(0)  # the random controls draw the same scores every time
    hits = total = inter = union = predicted = 0
    on_object: dict[int, list[int]] = {}  # block: [tokens on the object, tokens]
    patched = tokenpace.get_patch(model.backbone) is not None
    for images, labels, masks in loader:
        if patched:
            with tokenpace.trace(model.backbone) as trace:
                logits, patches = model(images)
            for i, kept in enumerate(trace.kept):
                if kept is not None:  # -1: a padding slot or a fused token, not a patch
                    real = kept >= 0
                    counts = on_object.setdefault(i, [0, 0])
                    counts[0] += (masks.flatten(1).gather(1, kept.clamp(min=0)) * real).sum().item()
                    counts[1] += real.sum().item()
        else:
            logits, patches = model(images)
        fg, true = patches.argmax(-1), masks.flatten(1)
        hits += (logits.argmax(-1) == labels).sum().item()
        total += labels.numel()
        inter += (fg & true).sum().item()
        union += (fg | true).sum().item()
        predicted += fg.sum().item()
    row = {"top1": 100 * hits / total, "iou": 100 * inter / max(union, 1),
           "fg_share": 100 * predicted / (total * patches.shape[1])}
    if on_object:
        row["object_share"] = {i: 100 * hit / max(n, 1) for i, (hit, n) in on_object.items()}
    return row


def configured(model: DenseViT, method: str, options: dict) -> DenseViT:
    tokenpace.remove(model.backbone)
    if method != "dense":
        tokenpace.apply(model.backbone, method, **options)
    return model


def label(method: str, options: dict) -> str:
    return method if not options else f"{method} " + " ".join(f"{k}={v}" for k, v in options.items())


def picture(model: DenseViT, dataset: PatchMasks, path: str, configs) -> None:
    """Rows of test images: the image, the true patch mask, then each configuration's predicted mask."""
    from PIL import Image, ImageDraw

    cell, pad = 96, 4
    indices = [3, 17, 42, 77]
    columns = ["image", "true"] + [label(m, o) for m, o in configs]
    sheet = Image.new("RGB", (len(columns) * (cell + pad) + pad, len(indices) * (cell + pad) + 24), "white")
    draw = ImageDraw.Draw(sheet)
    for c, name in enumerate(columns):
        draw.text((pad + c * (cell + pad), 4), name[:16], fill="black")
    for r, i in enumerate(indices):
        image, _, box = dataset.cluttered.sample(i)
        pixels, _, mask = dataset[i]
        tiles = [image.resize((cell, cell), Image.NEAREST), _mask_image(mask, cell)]
        for method, options in configs:
            with torch.no_grad():
                _, patches = configured(model, method, options)(pixels[None])
            tiles.append(_mask_image(patches[0].argmax(-1).view(mask.shape), cell))
        for c, tile in enumerate(tiles):
            sheet.paste(tile, (pad + c * (cell + pad), 20 + r * (cell + pad)))
    configured(model, "dense", {})
    sheet.save(path)


def _mask_image(mask: torch.Tensor, cell: int):
    from PIL import Image

    return Image.fromarray((mask.numpy().astype(np.uint8) * 255)).resize((cell, cell), Image.NEAREST).convert("RGB")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/cifar10_jpeg.npz", help="packed-JPEG CIFAR-10 .npz")
    parser.add_argument("--out", default="runs/dense_task", help="folder for RESULTS.json, the picture, weights")
    parser.add_argument("--canvas", type=int, default=64, help="noise canvas size in pixels (objects are 32 px)")
    parser.add_argument("--patch", type=int, default=8, help="patch size: 8 x 8 patches on a 64 px canvas")
    parser.add_argument("--width", type=int, default=128, help="ViT width")
    parser.add_argument("--depth", type=int, default=6, help="ViT depth")
    parser.add_argument("--heads", type=int, default=4, help="attention heads")
    parser.add_argument("--arch", choices=tuple(ARCH_METHODS), default="vit",
                        help="vit: timm VisionTransformer (every method); sam: timm VisionTransformerSAM (Idle)")
    parser.add_argument("--window", type=int, default=4, help="--arch sam: window side in tokens")
    parser.add_argument("--epochs", type=int, default=6, help="dense training epochs")
    parser.add_argument("--finetune-epochs", type=int, default=1, help="epochs of each method's fine-tune")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate of the dense training")
    parser.add_argument("--finetune-lr", type=float, default=2e-4, help="peak learning rate of the fine-tunes")
    parser.add_argument("--batch-size", type=int, default=128, help="training batch size")
    parser.add_argument("--train-limit", type=int, default=20000, help="training images (spread over the classes)")
    parser.add_argument("--test-limit", type=int, default=5000, help="test images (spread over the classes)")
    parser.add_argument("--workers", type=int, default=1, help="data loader workers")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(0)
    log = open(os.path.join(args.out, "log.txt"), "a")

    def say(msg: str) -> None:
        print(msg, flush=True)
        log.write(msg + "\n")
        log.flush()

    train_loader, test_loader = loaders(args)
    model = DenseViT(args.canvas, args.patch, args.width, args.depth, args.heads, args.arch, args.window)
    accepted = ARCH_METHODS[args.arch]
    weights = os.path.join(args.out, "dense.pt")
    if os.path.isfile(weights):
        model.load_state_dict(torch.load(weights, weights_only=True))
        model.eval()
        say(f"loaded {weights}")
    else:
        train(model, train_loader, args.epochs, args.lr, say)
        torch.save(model.state_dict(), weights)
    results = {"settings": vars(args), "off_the_shelf": {}, "fine_tuned": {}}
    for method, options in [(m, o) for m, o in CONFIGS if m in accepted] + ARCH_EXTRA[args.arch]:
        row = evaluate(configured(model, method, options), test_loader)
        results["off_the_shelf"][label(method, options)] = row
        share = " ".join(f"{i}:{s:.0f}%" for i, s in row.get("object_share", {}).items())
        say(f"{label(method, options):<28} top-1 {row['top1']:.2f}  IoU {row['iou']:.2f}"
            + (f"  on the object (block: share run) {share}" if share else ""))
    picture(model, test_loader.dataset, os.path.join(args.out, "dense_task.png"),
            [(m, o) for m, o in SHOWN if m in accepted])
    for method, options in [(m, o) for m, o in FINETUNED if m in accepted]:
        tuned = configured(copy.deepcopy(configured(model, "dense", {})), method, options)
        say(f"fine-tuning {label(method, options)}")
        train(tuned, train_loader, args.finetune_epochs, args.finetune_lr, say)
        for name, control in ((label(method, options), {}), (label(method, options) + " score=random",
                                                               {"score": "random"})):
            row = evaluate(configured(tuned, method, {**options, **control}), test_loader)
            row["dense_top1"] = evaluate(configured(tuned, "dense", {}), test_loader)["top1"]
            results["fine_tuned"][name] = row
            say(f"fine-tuned {name:<28} top-1 {row['top1']:.2f}  IoU {row['iou']:.2f}")
    with open(os.path.join(args.out, "RESULTS.json"), "w") as f:
        json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
