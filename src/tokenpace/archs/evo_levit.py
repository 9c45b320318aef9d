"""Evo-LeViT and the CIFAR LeViTs, registered with timm by ``import tokenpace.archs``.

- ``evo_levit_*``: the official Evo-LeViT (evovit.md §7): LeViT with a class token and learned absolute position
  embeddings (after the stem and before each down-sampling attention), no attention biases, a learnable evolution
  weight ``theta`` per attention (alpha = sigmoid(theta)), and four heads (average-pool and class-token heads, each
  with a distillation twin). Unpatched it runs dense; ``tokenpace.apply(model, "evo")`` makes it Evo-LeViT.
- ``levit_cifar`` / ``evo_levit_cifar``: the same two designs at 32 px with a stride-4 stem (8 x 8 tokens), for the
  CIFAR-10 experiment.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from timm.layers import DropPath, get_act_layer, trunc_normal_
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint_seq
from timm.models.levit import ConvNorm, Levit, LevitMlp, LinearNorm, NormLinear

from .registry import no_pretrained, register, without_plumbing


class ConvStem(nn.Sequential):
    """LeViT's conv stem (3x3 stride-2 Conv-BN, activation between) with log2(stride) convs; stride 16 == Stem16."""

    def __init__(self, in_chs: int, out_chs: int, stride: int, act_layer: type[nn.Module]) -> None:
        super().__init__()
        steps = int(math.log2(stride))
        if stride not in (4, 8, 16):
            raise ValueError(f"stem stride must be 4, 8 or 16; got {stride!r}")
        chans = [in_chs] + [out_chs // 2 ** (steps - 1 - j) for j in range(steps)]
        for j in range(steps):
            self.add_module(f"conv{j + 1}", ConvNorm(chans[j], chans[j + 1], 3, stride=2, padding=1))
            if j < steps - 1:
                self.add_module(f"act{j + 1}", act_layer())
        self.stride = stride


class EvoAttention(nn.Module):
    """LeViT attention without position biases; ``theta`` is Evo-LeViT's learnable evolution weight (logit)."""

    def __init__(self, dim: int, key_dim: int, num_heads: int, attn_ratio: float, act_layer: type[nn.Module]) -> None:
        super().__init__()
        self.num_heads, self.key_dim = num_heads, key_dim
        self.val_dim = int(attn_ratio * key_dim)
        self.val_attn_dim = self.val_dim * num_heads
        self.scale = key_dim ** -0.5
        self.qkv = LinearNorm(dim, self.val_attn_dim + 2 * key_dim * num_heads)
        self.proj = nn.Sequential(act_layer(), LinearNorm(self.val_attn_dim, dim, bn_weight_init=0))
        self.theta = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, n, _ = x.shape
        q, k, v = self.qkv(x).view(B, n, self.num_heads, -1).split([self.key_dim, self.key_dim, self.val_dim], dim=3)
        out = nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=self.scale)
        return self.proj(out.transpose(1, 2).reshape(B, n, self.val_attn_dim))


class EvoBlock(nn.Module):
    def __init__(self, dim, key_dim, num_heads, attn_ratio, mlp_ratio, act_layer, drop_path) -> None:
        super().__init__()
        self.attn = EvoAttention(dim, key_dim, num_heads, attn_ratio, act_layer)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.mlp = LevitMlp(dim, int(dim * mlp_ratio), act_layer=act_layer)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.attn(x))
        return x + self.drop_path2(self.mlp(x))


class EvoDownsample(nn.Module):
    """Down-sampling attention: queries from [class token, stride-2 grid], keys and values from every token, with
    its own position embedding added first; then a residual MLP (LeViT's LevitDownsample without biases)."""

    def __init__(self, in_dim, out_dim, key_dim, resolution: tuple[int, int], act_layer, drop_path) -> None:
        super().__init__()
        self.num_heads = in_dim // key_dim
        self.key_dim, self.val_dim = key_dim, 4 * key_dim
        self.val_attn_dim = self.val_dim * self.num_heads
        self.scale = key_dim ** -0.5
        self.resolution = resolution
        self.pos_embed = nn.Parameter(torch.zeros(1, resolution[0] * resolution[1] + 1, in_dim))
        trunc_normal_(self.pos_embed, std=0.02)
        self.kv = LinearNorm(in_dim, (key_dim + self.val_dim) * self.num_heads)
        self.q = LinearNorm(in_dim, key_dim * self.num_heads)
        self.proj = nn.Sequential(act_layer(), LinearNorm(self.val_attn_dim, out_dim))
        self.theta = nn.Parameter(torch.zeros(()))
        self.mlp = LevitMlp(out_dim, 2 * out_dim, act_layer=act_layer)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def subsample_index(self, device=None) -> torch.Tensor:
        """Raster positions (of the input grid) of the output tokens: the stride-2 grid, as LeViT's Subsample."""
        rows, cols = self.resolution
        grid = torch.arange(rows * cols, device=device).view(rows, cols)
        return grid[::2, ::2].reshape(-1)

    def attend(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(output tokens, attention probabilities (B, H, 1 + n_out, 1 + n_in))."""
        B, n, _ = x.shape
        x = x + self.pos_embed
        k, v = self.kv(x).view(B, n, self.num_heads, -1).split([self.key_dim, self.val_dim], dim=3)
        rows = torch.cat([torch.zeros(1, dtype=torch.long, device=x.device), 1 + self.subsample_index(x.device)])
        q = self.q(x[:, rows]).view(B, rows.numel(), self.num_heads, self.key_dim).transpose(1, 2)
        probs = ((q * self.scale) @ k.permute(0, 2, 3, 1)).softmax(dim=-1)
        out = (probs @ v.transpose(1, 2)).transpose(1, 2).reshape(B, rows.numel(), self.val_attn_dim)
        out = self.proj(out)
        return out + self.drop_path(self.mlp(out)), probs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attend(x)[0]


class EvoLevit(nn.Module):
    """Evo-LeViT (dense until patched with ``tokenpace.apply(model, "evo")``); timm-style API."""

    # the official Evo-LeViT: Evo's representative token, pruning from block 2 (blocks 0-1 dense)
    @property
    def tokenpace_defaults(self) -> dict:
        """The official schedule: representative token, pruning from block 2 (from the last block on models built
        with fewer than 3 blocks)."""
        depth = sum(len(stage) for stage in self.stages)
        return {"evo": {"representative": True, "stage_starts": (max(1, min(2, depth - 1)),)}}

    def __init__(self, img_size: int = 224, in_chans: int = 3, num_classes: int = 1000,
                 embed_dim: tuple[int, ...] = (256, 384, 512), key_dim: int = 32, depth: tuple[int, ...] = (4, 4, 4),
                 num_heads: tuple[int, ...] = (4, 6, 8), attn_ratio: float = 2.0, mlp_ratio: float = 2.0,
                 stem_stride: int = 16, act_layer: str = "hard_swish", drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, global_pool: str = "avg") -> None:
        super().__init__()
        if global_pool != "avg":
            raise ValueError(f"Evo-LeViT classifies the average-pooled tokens; accepted global_pool: 'avg'; "
                             f"got {global_pool!r}")
        _check_shape(img_size, stem_stride, embed_dim=embed_dim, depth=depth, num_heads=num_heads)
        act = get_act_layer(act_layer)
        self.num_classes, self.in_chans, self.img_size = num_classes, in_chans, img_size
        self.drop_rate = drop_rate
        self.num_features = self.head_hidden_size = embed_dim[-1]
        self.global_pool = "avg"
        self.stem = ConvStem(in_chans, embed_dim[0], stem_stride, act)
        res = (img_size // stem_stride, img_size // stem_stride)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim[0]))
        self.pos_embed = nn.Parameter(torch.zeros(1, res[0] * res[1] + 1, embed_dim[0]))
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        self.downsamples = nn.ModuleList([nn.Identity()])
        self.stages = nn.ModuleList()
        self.resolutions = []
        for s, (dim, d, heads) in enumerate(zip(embed_dim, depth, num_heads)):
            if s > 0:
                self.downsamples.append(EvoDownsample(embed_dim[s - 1], dim, key_dim, res, act, drop_path_rate))
                res = ((res[0] - 1) // 2 + 1, (res[1] - 1) // 2 + 1)
            self.resolutions.append(res)
            self.stages.append(nn.Sequential(*[EvoBlock(dim, key_dim, heads, attn_ratio, mlp_ratio, act,
                                                        drop_path_rate) for _ in range(d)]))
        head = (lambda: NormLinear(self.num_features, num_classes, drop=drop_rate)) if num_classes > 0 else nn.Identity
        self.head, self.head_dist = head(), head()
        self.head_cls, self.head_cls_dist = head(), head()  # training-only: the assisted class-token loss
        self.grad_checkpointing = False

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def no_weight_decay(self):
        return {"cls_token", "pos_embed"} | {f"downsamples.{s}.pos_embed" for s in range(1, len(self.downsamples))}

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """New heads for ``num_classes``: all four (the average-pool head, the class-token head and their
        distillation twins), so that training and inference agree; the pool stays the average."""
        if global_pool not in (None, "avg"):
            raise ValueError(f"Evo-LeViT classifies the average-pooled tokens; accepted global_pool: 'avg' (or "
                             f"None: unchanged); got {global_pool!r}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"num_classes must be an integer >= 0 (0: no head, pooled features out); got "
                             f"{num_classes!r}")
        self.num_classes = num_classes
        weight = self.cls_token  # the new heads join the model's device and dtype
        for name in ("head", "head_dist", "head_cls", "head_cls_dist"):
            head = NormLinear(self.num_features, num_classes, drop=self.drop_rate) if num_classes > 0 else nn.Identity()
            setattr(self, name, head.to(weight.device, weight.dtype).train(self.training))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x).flatten(2).transpose(1, 2)
        return torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for down, stage in zip(self.downsamples, self.stages):
            x = down(x)
            x = checkpoint_seq(stage, x) if self.grad_checkpointing and self.training else stage(x)
        return x

    def forward_intermediates(self, x: torch.Tensor, indices: int | list[int] | None = None, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = "NCHW", intermediates_only: bool = False):
        """timm's LeViT interface: each stage's patch tokens (the class token left out) as an NCHW grid."""
        if output_fmt != "NCHW":
            raise ValueError(f"Evo-LeViT feature maps are NCHW grids; got output_fmt={output_fmt!r}")
        take, max_index = feature_take_indices(len(self.stages), indices)
        x, maps = self.embed(x), []
        for s, (down, stage) in enumerate(zip(self.downsamples, self.stages)):
            if stop_early and s > max_index:
                break
            x = stage(down(x))
            if s in take:
                rows, cols = self.resolutions[s]
                maps.append(x[:, 1:].reshape(x.shape[0], rows, cols, -1).permute(0, 3, 1, 2))
        return maps if intermediates_only else (x, maps)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        pooled = x[:, 1:].mean(dim=1)  # the class token steers selection; classification uses the pooled tokens
        return pooled if pre_logits else (self.head(pooled) + self.head_dist(pooled)) / 2

    def forward_train_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(head(avg), head_dist(avg), head_cls(cls), head_cls_dist(cls)): what the evo-scratch objective trains."""
        pooled = x[:, 1:].mean(dim=1)
        return self.head(pooled), self.head_dist(pooled), self.head_cls(x[:, 0]), self.head_cls_dist(x[:, 0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _check_shape(img_size, stem_stride: int, **per_stage) -> None:
    """ValueError for an input size the stem does not divide (the stem's grid would not match the position
    embeddings), or per-stage tuples of different lengths."""
    if stem_stride not in (4, 8, 16):
        raise ValueError(f"stem stride must be 4, 8 or 16; got {stem_stride!r}")
    if isinstance(img_size, bool) or not isinstance(img_size, int) or img_size < stem_stride \
            or img_size % stem_stride:
        examples = "224"
        if isinstance(img_size, int) and not isinstance(img_size, bool):  # the multiples either side
            below = img_size // stem_stride * stem_stride
            examples = " or ".join(str(n) for n in (below, below + stem_stride) if n > 0)
        raise ValueError(f"img_size must be a positive multiple of the stem stride {stem_stride} (the stem's output "
                         f"grid must match the position embeddings), e.g. {examples}; got {img_size!r}")
    lengths = {name: len(value) if isinstance(value, (tuple, list)) else None for name, value in per_stage.items()}
    if None in lengths.values() or len(set(lengths.values())) != 1 or 0 in lengths.values():
        given = ", ".join(f"{name}={value!r}" for name, value in per_stage.items())
        raise ValueError(f"{', '.join(per_stage)} give one value per stage and must be tuples of the same length "
                         f"(at least 1), e.g. embed_dim=(128, 256, 384), depth=(2, 3, 4), num_heads=(4, 6, 8); "
                         f"got {given}")


EVO_LEVIT_CFGS = {
    "evo_levit_128s": dict(embed_dim=(128, 256, 384), key_dim=16, num_heads=(4, 6, 8), depth=(2, 3, 4)),
    "evo_levit_128": dict(embed_dim=(128, 256, 384), key_dim=16, num_heads=(4, 8, 12), depth=(4, 4, 4)),
    "evo_levit_192": dict(embed_dim=(192, 288, 384), key_dim=32, num_heads=(3, 5, 6), depth=(4, 4, 4)),
    "evo_levit_256": dict(embed_dim=(256, 384, 512), key_dim=32, num_heads=(4, 6, 8), depth=(4, 4, 4)),
    "evo_levit_384": dict(embed_dim=(384, 512, 768), key_dim=32, num_heads=(6, 9, 12), depth=(4, 4, 4)),
}
# 32 px CIFAR models: a stride-4 stem gives 8 x 8 tokens -> 4 x 4 -> 2 x 2 (LeViT-128 depths, 3/4 of its widths)
CIFAR_CFG = dict(img_size=32, embed_dim=(96, 144, 192), key_dim=16, num_heads=(4, 6, 8), depth=(4, 4, 4),
                 num_classes=10)


def _evo_levit(name: str, pretrained: bool, **kwargs) -> EvoLevit:
    no_pretrained(name, pretrained, "a --checkpoint of your own run (Evo-LeViT trains from scratch), or "
                  "tokenpace.load_official for the released files")
    return EvoLevit(**{**EVO_LEVIT_CFGS.get(name, {}), **without_plumbing(kwargs)})


for _name in EVO_LEVIT_CFGS:
    register(_name, lambda pretrained=False, _n=_name, **kw: _evo_levit(_n, pretrained, **kw))


def evo_levit_cifar(pretrained: bool = False, **kwargs) -> EvoLevit:
    return _evo_levit("evo_levit_cifar", pretrained, **{**CIFAR_CFG, "stem_stride": 4, **kwargs})


def levit_cifar(pretrained: bool = False, **kwargs) -> Levit:
    """The dense baseline of evo_levit_cifar: timm's LeViT (attention biases, no class token) with the same stem."""
    no_pretrained("levit_cifar", pretrained, "a --checkpoint of your own run")
    cfg = {**CIFAR_CFG, **without_plumbing(kwargs)}
    stem = ConvStem(cfg.get("in_chans", 3), cfg["embed_dim"][0], 4, get_act_layer(cfg.get("act_layer", "hard_swish")))
    return Levit(stem_backbone=stem, stem_stride=4, **cfg)


register("evo_levit_cifar", evo_levit_cifar)
register("levit_cifar", levit_cifar)
