"""timm's ``PatchEmbed`` as the families see it: the patch grid an input size gives, and whether the embedding
takes that size at all (``macs(img_size=...)`` must not count a size the model cannot run)."""
from __future__ import annotations

from torch import nn

from .base import built_for_only, parse_img_size


def patch_grid(patch_embed: nn.Module, img_size: tuple[int, int] | None) -> tuple[int, int]:
    """Rows and columns of patches for ``img_size`` (None: the embedding's own), as timm's PatchEmbed computes
    them (dynamic padding included)."""
    if img_size is None:
        return tuple(patch_embed.grid_size)
    if hasattr(patch_embed, "dynamic_feat_size"):
        return tuple(patch_embed.dynamic_feat_size(img_size))
    return (img_size[0] // patch_embed.patch_size[0], img_size[1] // patch_embed.patch_size[1])


def patch_embed_size_problem(patch_embed: nn.Module, size: tuple[int, int], resize_hint: str) -> str | None:
    """Why ``patch_embed`` refuses (H, W) inputs, as timm's PatchEmbed checks them, or None when it takes them.
    ``resize_hint`` names the model option that lifts the fixed size (e.g. ``dynamic_img_size=True``). An
    embedding without timm's flags (a custom stem) is taken to run its own size only."""
    own = tuple(patch_embed.img_size)
    if size == own:
        return None
    if not hasattr(patch_embed, "strict_img_size"):
        return built_for_only(own)
    if patch_embed.strict_img_size:
        return built_for_only(own, resize_hint)
    if hasattr(patch_embed, "backbone"):  # a hybrid stem: its convolutions round what the patch grid would floor
        stride = (own[0] // patch_embed.grid_size[0], own[1] // patch_embed.grid_size[1])
        if size[0] % stride[0] or size[1] % stride[1]:
            return (f"its sides must be multiples of its stem's stride {stride[0]}x{stride[1]} (other sizes are "
                    "not counted: the stem rounds their grid)")
        return None
    return patch_multiple_problem(patch_embed, size)


def patch_multiple_problem(patch_embed: nn.Module, size: tuple[int, int], can_pad: bool = True) -> str | None:
    """Why an embedding that patchifies any size refuses (H, W): sides not multiples of its patch, unless it pads
    them (``dynamic_img_pad``; ``can_pad``: the model's constructor offers that option); None when it takes them."""
    patch = tuple(patch_embed.patch_size)
    if not getattr(patch_embed, "dynamic_img_pad", False) and (size[0] % patch[0] or size[1] % patch[1]):
        hint = " (or build it with dynamic_img_pad=True)" if can_pad else ""
        return f"its sides must be multiples of the patch size {patch[0]}x{patch[1]}{hint}"
    return None


class OneGridSizes:
    """Sizes and stem cost of a one-stage family whose patch grid follows the input: ``patch_embedding`` makes it,
    ``own_size()`` is the size the model is used at (None: the embedding's own). Mixed in before the family."""

    patch_embedding: nn.Module

    def own_size(self) -> tuple[int, int] | None:
        return None

    def patch_grid_at(self, img_size) -> tuple[int, int]:
        return patch_grid(self.patch_embedding, self.own_size() if img_size is None else parse_img_size(img_size))

    def block_grid(self, i: int) -> tuple[int, int]:
        return self.patch_grid_at(None)

    def stage_patches(self, img_size) -> list[int]:
        rows, cols = self.patch_grid_at(img_size)
        return [rows * cols]

    def stem_macs(self, img_size) -> int:
        # a linear over each flattened patch or a conv with the patch as stride: one weight use per patch
        return self.patch_embedding.proj.weight.numel() * self.stage_patches(img_size)[0]
