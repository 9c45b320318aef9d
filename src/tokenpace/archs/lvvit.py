"""LV-ViT ("All Tokens Matter: Token Labeling", Jiang et al.), IdleViT's second model family (idlevit.md §4.1, §7;
official-keys.md), as its authors define it: a four-conv patch stem (7x7 stride-2 conv, two 3x3 convs, each with
BatchNorm and ReLU, then a (patch/2)-stride projection), a class token and learned position embeddings, pre-norm
blocks whose two residual branches are divided by ``skip_lam`` (2), MLP ratio 3, no q/k/v bias, LayerNorm eps 1e-5,
and two heads: the class-token head and the token-labelling head ``aux_head`` on every patch token. Inference
predicts ``head(class token) + 0.5 * max over patch tokens of aux_head``.

``lvvit_s`` (384 wide, 16 blocks, 6 heads, 26 M parameters) and ``lvvit_m`` (512, 20, 8; 56 M), also at 384 px
(``lvvit_s_384``, ``lvvit_m_384``). State-dict keys are the authors' (``patch_embed.conv1``, ``blocks.{i}.attn.qkv``,
``aux_head``), so their checkpoints and IdleViT's load as they are. ``tokenpace.apply(model, "idle")`` runs IdleViT's
official schedule: idling from a quarter of the depth, the ratio stepping down at each further quarter (layers
4-15 with r, r^2, r^3 on LV-ViT-S; 5-19 on LV-ViT-M).
"""
from __future__ import annotations

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import Attention, DropPath, Mlp, trunc_normal_
from timm.models._manipulate import checkpoint_seq
from torch import nn

from ..core.feature_maps import vit_intermediates
from ..core.schedule import scaled_layers
from .registry import no_pretrained, register, without_plumbing


class LvVitStem(nn.Module):
    """The authors' ``PatchEmbed4_2``: conv 7x7/2 - BN - ReLU, conv 3x3 - BN - ReLU (twice), then a conv of kernel
    and stride patch_size / 2 to the embedding width. Returns the (B, C, H, W) map."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int, width: int = 64) -> None:
        super().__init__()
        if isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size < 2 or patch_size % 2:
            raise ValueError(f"LV-ViT's stem halves the image first, so patch_size must be an even integer >= 2; got "
                             f"{patch_size!r}")
        if isinstance(img_size, bool) or not isinstance(img_size, int) or img_size < patch_size:
            raise ValueError(f"img_size must be an integer >= patch_size ({patch_size}), e.g. 224; got {img_size!r}")
        # the 7x7 stride-2 conv gives ceil(img / 2) rows, the projection (patch/2)-strided blocks of them; the
        # position embeddings are sized for img // patch
        grid = -(-img_size // 2) // (patch_size // 2)
        if grid != img_size // patch_size:
            below, above = img_size // patch_size * patch_size, (img_size // patch_size + 1) * patch_size
            raise ValueError(f"img_size {img_size} gives a {grid}x{grid} stem grid but {img_size // patch_size}x"
                             f"{img_size // patch_size} position embeddings (img_size // patch_size); accepted: sizes "
                             f"where they agree, e.g. multiples of patch_size {patch_size} such as {below} or {above}")
        self.img_size, self.patch_size = (img_size, img_size), (patch_size, patch_size)
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.in_chans = in_chans
        self.conv1 = nn.Conv2d(in_chans, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, width, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.proj = nn.Conv2d(width, embed_dim, kernel_size=patch_size // 2, stride=patch_size // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        x = self.relu(self.bn3(self.conv3(x)))
        return self.proj(x)


class LvVitBlock(nn.Module):
    """Pre-norm block, both residual branches divided by ``skip_lam``: x + drop_path(branch(norm(x))) / skip_lam."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, skip_lam: float, drop: float = 0.0,
                 attn_drop: float = 0.0, drop_path: float = 0.0) -> None:
        super().__init__()
        self.skip_lam = skip_lam
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=False, attn_drop=attn_drop, proj_drop=drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), attn_mask=attn_mask)) / self.skip_lam
        return x + self.drop_path(self.mlp(self.norm2(x))) / self.skip_lam


class LvVit(nn.Module):
    """LV-ViT with a timm-style API (``forward_features`` ends with the final norm, ``forward_head`` combines the
    class-token head and the token-labelling head)."""

    global_pool = "token"  # the class-token head; the token-labelling head reads every patch token besides
    num_prefix_tokens = 1

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, num_classes: int = 1000,
                 embed_dim: int = 384, depth: int = 16, num_heads: int = 6, mlp_ratio: float = 3.0,
                 skip_lam: float = 2.0, drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, stem_width: int = 64, aux_weight: float = 0.5) -> None:
        super().__init__()
        self.num_classes, self.in_chans = num_classes, in_chans
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.aux_weight = aux_weight
        self.patch_embed = LvVitStem(img_size, patch_size, in_chans, embed_dim, stem_width)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # the authors' linear decay
        self.blocks = nn.ModuleList([LvVitBlock(embed_dim, num_heads, mlp_ratio, skip_lam, drop_rate, attn_drop_rate,
                                                rates[i]) for i in range(depth)])
        self.norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.aux_head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        self.apply(self._init_weights)
        self.grad_checkpointing = False

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    @property
    def tokenpace_defaults(self) -> dict:
        """IdleViT's official LV-ViT schedule: idle from a quarter of the depth, stages at each further quarter
        (LV-ViT-S, 16 blocks: 4, 8, 12; LV-ViT-M, 20 blocks: 5, 10, 15); other depths round the quarters (as DeiT's
        3, 6, 9 of 12 are scaled), merging stages on very shallow models."""
        return {"idle": {"stage_starts": scaled_layers(len(self.blocks), (3, 6, 9))}}

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"}

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool not in (None, "token"):
            raise ValueError(f"LV-ViT classifies with its class token and token-labelling heads; accepted "
                             f"global_pool: 'token'; got {global_pool!r}")
        self.num_classes = num_classes
        weight = self.cls_token  # the new heads join the model's device and dtype
        for name in ("head", "aux_head"):
            head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()
            setattr(self, name, head.to(weight.device, weight.dtype).train(self.training))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> [class token, patch tokens] with position embeddings (the first block's input)."""
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        return self.pos_drop(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        if self.grad_checkpointing and self.training:
            x = checkpoint_seq(self.blocks, x)
        else:
            for blk in self.blocks:
                x = blk(x)
        return self.norm(x)

    def forward_intermediates(self, x: torch.Tensor, indices: int | list[int] | None = None, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = "NCHW", intermediates_only: bool = False,
                              return_prefix_tokens: bool = False, output_dict: bool = False):
        """timm's ViT ``forward_intermediates``: the token map after each requested block (``indices``: the last n
        blocks, or a list of block indices), optionally normed, as NCHW grids or NLC sequences, the class token
        split off (returned beside the grid on request); then the final features unless ``intermediates_only``."""
        from timm.models._features import feature_take_indices

        taken, last = feature_take_indices(len(self.blocks), indices)
        x = self.embed(x)
        maps = []
        for i, blk in enumerate(self.blocks[:last + 1] if stop_early else self.blocks):
            x = blk(x)
            if i in taken:
                maps.append(x)
        return vit_intermediates(maps, x, self.norm, 1, self.patch_embed.grid_size, norm=norm, output_fmt=output_fmt,
                                 intermediates_only=intermediates_only, return_prefix_tokens=return_prefix_tokens,
                                 output_dict=output_dict)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """The class token's logits plus ``aux_weight`` x the token-labelling head's maximum over patch tokens;
        without classes (``num_classes=0``) or with ``pre_logits``, the class token's features, as timm's
        encoders return their pooled features (no max over feature channels to add)."""
        if pre_logits or self.num_classes == 0:
            return x[:, 0]
        return self.head(x[:, 0]) + self.aux_weight * self.aux_head(x[:, 1:]).max(dim=1)[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


LVVIT_CFGS = {  # name: (width, depth, heads, image size, the authors' evaluation crop)
    "lvvit_s": (384, 16, 6, 224, 0.9),
    "lvvit_m": (512, 20, 8, 224, 1.0),
    "lvvit_s_384": (384, 16, 6, 384, 1.0),
    "lvvit_m_384": (512, 20, 8, 384, 1.0),
}


def _lvvit(name: str, pretrained: bool, crop_pct: float | None = None, **kwargs) -> LvVit:
    """``crop_pct``: the evaluation crop to record instead of the authors' (IdleViT evaluates its LV-ViT
    checkpoints with resize 256/224 and centre crop: 0.875)."""
    no_pretrained(name, pretrained, f"tokenpace.load_official(path, \"{name[:7]}\") for the authors' or IdleViT's "
                  "released files")
    dim, depth, heads, img_size, crop = LVVIT_CFGS[name]
    if crop_pct is not None:
        if isinstance(crop_pct, bool) or not isinstance(crop_pct, (int, float)) or not 0 < crop_pct <= 1:
            raise ValueError(f"crop_pct must be a number in (0, 1] (the evaluation crop's share of the resized "
                             f"image; LV-ViT's authors use {crop}); got {crop_pct!r}")
        crop = float(crop_pct)
    model = LvVit(**{"img_size": img_size, "embed_dim": dim, "depth": depth, "num_heads": heads,
                     **without_plumbing(kwargs)})
    size = model.patch_embed.img_size
    model.pretrained_cfg = model.default_cfg = {
        "input_size": (model.in_chans, *size), "crop_pct": crop, "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD, "num_classes": model.num_classes,
        "first_conv": "patch_embed.conv1", "classifier": "head"}
    return model


for _name in LVVIT_CFGS:
    register(_name, lambda pretrained=False, _n=_name, **kw: _lvvit(_n, pretrained, **kw))
