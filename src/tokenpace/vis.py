"""Pictures of which tokens took the full path (as in the Evo-ViT paper's figure), built on tokenpace.trace."""
from __future__ import annotations

import torch
from PIL import Image, ImageDraw
from torch import nn

from .patch import get_patch, trace

PANEL = 224  # pixels per panel side


def selection_layers(kept: list[torch.Tensor | None]) -> list[int]:
    """Layers where the full-path set changes (a new selection), so each distinct choice is drawn once."""
    layers, previous = [], None
    for i, k in enumerate(kept):
        if k is not None and (previous is None or k.shape != previous.shape or not torch.equal(k, previous)):
            layers.append(i)
        previous = k
    return layers


def token_overlay(image: Image.Image, kept: torch.Tensor, grid: tuple[int, int], fade: float = 0.75) -> Image.Image:
    """``image`` with every patch not in ``kept`` (1-D patch indices, raster order) faded towards white."""
    image = image.convert("RGB").resize((PANEL, PANEL), Image.BICUBIC)
    rows, cols = grid
    mask = torch.zeros(rows * cols, dtype=torch.bool)
    valid = kept[(kept >= 0) & (kept < rows * cols)]
    mask[valid] = True
    white = Image.new("RGB", image.size, (255, 255, 255))
    faded = Image.blend(image, white, fade)
    alpha = Image.fromarray((mask.view(rows, cols).numpy() * 255).astype("uint8")).resize(image.size, Image.NEAREST)
    return Image.composite(image, faded, alpha)


def selection_figure(model: nn.Module, pixels: torch.Tensor, image: Image.Image, title: str = "") -> Image.Image:
    """One row: the input, then one panel per selection layer (full-path tokens in colour, the rest faded)."""
    patch = get_patch(model)
    if patch is None:
        raise ValueError("selection_figure needs a patched model: call tokenpace.apply(model, method) first")
    with torch.inference_mode(), trace(model) as tr:
        model(pixels.unsqueeze(0))
    layers = selection_layers(tr.kept)
    panels = [("input", image.convert("RGB").resize((PANEL, PANEL), Image.BICUBIC))]
    for i in layers:
        grid = patch.adapter.block_grid(i)  # pyramid models: the grid of block i's stage
        panels.append((f"layer {i}: {int((tr.kept[i][0] >= 0).sum())}/{grid[0] * grid[1]}",
                       token_overlay(image, tr.kept[i][0], grid)))
    pad, head = 6, 34
    canvas = Image.new("RGB", (len(panels) * (PANEL + pad) + pad, PANEL + head + pad), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    draw.text((pad, 2), title, fill=(0, 0, 0))
    for j, (label, panel) in enumerate(panels):
        x = pad + j * (PANEL + pad)
        canvas.paste(panel, (x, head))
        draw.text((x, head - 14), label, fill=(0, 0, 0))
    return canvas
