"""Token maps: tokens to NCHW maps and back, and timm's ViT ``forward_intermediates`` output formatted from them
(shared by the patched flat families and tokenpace's own flat models, LV-ViT, so both return exactly what timm's ViT
returns)."""
from __future__ import annotations

from typing import Callable

import torch


def to_map(x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Tokens (B, H * W, C) in raster order -> the NCHW map (B, C, H, W) (a view where the layout allows)."""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], *grid)


def to_tokens(x: torch.Tensor) -> torch.Tensor:
    """An NCHW map (B, C, H, W) -> its tokens (B, H * W, C) in raster order."""
    return x.flatten(2).transpose(1, 2)


def vit_intermediates(maps: list[torch.Tensor], final: torch.Tensor, final_norm: Callable, num_prefix: int,
                      grid: tuple[int, int], norm: bool = False, output_fmt: str = "NCHW",
                      intermediates_only: bool = False, return_prefix_tokens: bool = False,
                      output_dict: bool = False):
    """From the (B, prefix + rows * cols, C) token maps after each taken block and the final tokens: optional final
    norm, prefix tokens split off (returned beside the grid on request), NCHW grids or NLC sequences, a dict on
    request, and the normed final tokens unless ``intermediates_only``."""
    if output_fmt not in ("NCHW", "NLC"):
        raise ValueError(f"output_fmt={output_fmt!r} is not accepted; choose 'NCHW' or 'NLC'")
    maps = [final_norm(y) if norm else y for y in maps]
    prefix = [y[:, :num_prefix] for y in maps] if num_prefix else None
    maps = [y[:, num_prefix:] for y in maps]
    if output_fmt == "NCHW":
        rows, cols = grid
        maps = [y.reshape(y.shape[0], rows, cols, -1).permute(0, 3, 1, 2).contiguous() for y in maps]
    if output_dict:
        out = {"image_intermediates": maps}
        if prefix is not None and return_prefix_tokens:
            out["image_intermediates_prefix"] = prefix
        if not intermediates_only:
            out["image_features"] = final_norm(final)
        return out
    if return_prefix_tokens and prefix is not None:
        maps = list(zip(maps, prefix))
    return maps if intermediates_only else (final_norm(final), maps)
