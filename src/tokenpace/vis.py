"""Pictures of which tokens took the full path (as in the Evo-ViT paper's figure), built on tokenpace.trace, drawn
on the image the model saw (after its resize and centre crop), not on the original squashed to the model's size."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw, UnidentifiedImageError
from torch import nn

from .errors import TokenpaceError
from .modes import mode_kept
from .patch import get_patch, trace

PANEL = 224  # pixels per panel side (the shorter side, for non-square inputs)


def load_image(path: str) -> Image.Image:
    """An image file as 8-bit RGB; 16-bit and float grayscale are scaled to 8 bits (PIL's convert would clip them
    to white). TokenpaceError for a missing, unreadable or truncated file."""
    try:
        with Image.open(path) as image:
            image.load()
            return to_rgb(image)
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as err:  # missing, a folder, truncated, foreign
        raise TokenpaceError(f"cannot read image {path!r}: {type(err).__name__}: {err}") from None


def to_rgb(image: Image.Image) -> Image.Image:
    if image.mode.startswith(("I", "F")):  # 16-bit or 32-bit integer, or float, single channel
        values = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or values.max() > 255 else 255.0
        if image.mode == "F" and values.max() <= 1.0:
            peak = 1.0
        image = Image.fromarray(np.clip(values / peak * 255.0, 0, 255).round().astype(np.uint8))
    return image.convert("RGB")


def model_view(pixels: torch.Tensor, mean, std) -> Image.Image:
    """The normalised input tensor (C, H, W) back as the RGB picture the model saw."""
    mean_t = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
    rgb = (pixels.detach().float().cpu() * std_t + mean_t).clamp(0, 1)
    if rgb.shape[0] == 1:
        rgb = rgb.expand(3, -1, -1)
    return Image.fromarray((rgb[:3].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


def panel_size(image: Image.Image) -> tuple[int, int]:
    w, h = image.size
    return (PANEL, PANEL) if w == h else (max(1, round(PANEL * w / h)), PANEL)


def selection_layers(kept: list[torch.Tensor | None]) -> list[int]:
    """Layers where the full-path set changes (a new selection), so each distinct choice is drawn once."""
    layers, previous = [], None
    for i, k in enumerate(kept):
        if k is not None and (previous is None or k.shape != previous.shape or not torch.equal(k, previous)):
            layers.append(i)
        previous = k
    return layers


def token_overlay(image: Image.Image, kept: torch.Tensor, grid: tuple[int, int], fade: float = 0.75) -> Image.Image:
    """``image`` (what the model saw) with every patch not in ``kept`` (1-D patch indices, raster order over
    ``grid``) faded towards white."""
    image = image.convert("RGB").resize(panel_size(image), Image.BICUBIC)
    rows, cols = grid
    mask = torch.zeros(rows * cols, dtype=torch.bool)
    valid = kept[(kept >= 0) & (kept < rows * cols)]
    mask[valid] = True
    white = Image.new("RGB", image.size, (255, 255, 255))
    faded = Image.blend(image, white, fade)
    alpha = Image.fromarray((mask.view(rows, cols).numpy() * 255).astype("uint8")).resize(image.size, Image.NEAREST)
    return Image.composite(image, faded, alpha)


def selection_figure(model: nn.Module, pixels: torch.Tensor, image: Image.Image | None = None,
                     title: str = "") -> Image.Image:
    """One row: the input, then one panel per selection layer (full-path tokens in colour, the rest faded).

    ``pixels`` is the model's input (C, H, W). The panels show ``image`` when given (it must be what the model saw,
    e.g. already resized and cropped); by default the picture is recovered from ``pixels`` with the model's mean
    and std, so overlays sit exactly on the tokens. The model runs in eval mode (its mode is restored after)."""
    patch = get_patch(model)
    if patch is None:
        raise ValueError("selection_figure needs a patched model: call tokenpace.apply(model, method) first")
    if image is None:
        from .data import data_config

        config = data_config(model)
        image = model_view(pixels, config["mean"], config["std"])
    param = next(model.parameters())
    # the selection inference makes: eval mode (no dropout, BatchNorm's running statistics), restored after
    with mode_kept(model), torch.inference_mode(), trace(model.eval()) as tr:
        model(pixels.unsqueeze(0).to(param.device, param.dtype))
    layers = selection_layers(tr.kept)
    panels = [("input", image.convert("RGB").resize(panel_size(image), Image.BICUBIC))]
    for i in layers:
        grid = patch.adapter.block_grid(i)  # pyramid models: the grid of block i's stage
        panels.append((f"layer {i}: {int((tr.kept[i][0] >= 0).sum())}/{grid[0] * grid[1]}",
                       token_overlay(image, tr.kept[i][0].cpu(), grid)))
    pad, head = 6, 34
    width = sum(panel.size[0] + pad for _, panel in panels) + pad
    canvas = Image.new("RGB", (width, PANEL + head + pad), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    draw.text((pad, 2), title, fill=(0, 0, 0))
    x = pad
    for label, panel in panels:
        canvas.paste(panel, (x, head))
        draw.text((x, head - 14), label, fill=(0, 0, 0))
        x += panel.size[0] + pad
    return canvas
