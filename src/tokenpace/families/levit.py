"""LeViT families (deep-narrow, three stages with attention down-sampling): Evo-ViT only.

- ``TimmLevit``: timm ``Levit`` / ``LevitDistilled`` (``levit_*``, pretrained weights, BatchNorm-fused or not). Off-
  the-shelf form: no new parameters, LeViT's attention biases gathered at the kept tokens' positions, and a
  class-token-free score: the attention each token receives (mean over heads and queries of the softmax column,
  Evo-ViT Table 4's "attention-column mean").
- ``EvoLevitFamily``: tokenpace's ``EvoLevit`` (``evo_levit_*``, the official Evo-LeViT): class-token attention,
  no biases, representative-token fast path and learnable evolution weights.

Blocks are numbered across stages; down-sampling attentions always run on every token, in raster order.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..core.macs import BlockWork, conv_macs, linear_macs
from .base import RunBlocks, StagedAdapter, parse_img_size


def fuse_batchnorm(model: nn.Module) -> nn.Module:
    """LeViT's inference form, in place: every Linear/Conv + BatchNorm pair (timm's LinearNorm, ConvNorm, NormLinear)
    replaced by the single layer its own ``fuse()`` returns. Call on an eval-mode model; returns it."""
    from timm.models.levit import ConvNorm, LinearNorm, NormLinear

    for name, child in list(model.named_children()):
        if isinstance(child, (ConvNorm, LinearNorm, NormLinear)):
            setattr(model, name, child.fuse())
        else:
            fuse_batchnorm(child)
    return model


def reduce_probs(probs: torch.Tensor, score: str, prefix: int, extra: int) -> torch.Tensor:
    """Per-token scores from attention probabilities (B, H, n_q, n_k) over the patch keys (no prefix, no extra).

    "cls": the class query's row, head mean (Evo-LeViT). "received": the mean over heads and queries of each key's
    column, the attention a token receives (class-token-free).
    """
    keys = probs[..., prefix:probs.shape[-1] - extra]
    return keys[:, :, 0].mean(dim=1) if score == "cls" else keys.mean(dim=(1, 2))


def _attend(q, k, v, bias, scale, score, prefix, extra):
    """Attention (B, H, n, d) -> (B, n, H*dv), plus scores when ``score`` is set (explicit softmax then)."""
    if score is None:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
        scores = None
    else:
        logits = (q * scale) @ k.transpose(-2, -1)
        probs = (logits if bias is None else logits + bias).softmax(dim=-1)
        out, scores = probs @ v, reduce_probs(probs.float(), score, prefix, extra)
    B, _, n, _ = out.shape
    return out.transpose(1, 2).reshape(B, n, -1), scores


class _LevitBase(StagedAdapter):
    methods = ("evo",)

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model, self._stage_block_lists(model))

    def make_policy(self, config):
        super().make_policy(config)  # checks the method name
        from ..methods.evo_levit import EvoLevitPolicy

        return EvoLevitPolicy(config, self)

    def block(self, i: int, x: torch.Tensor) -> torch.Tensor:
        return self.blocks[i](x)

    def block_tokens(self, i: int, x: torch.Tensor, pos: torch.Tensor | None, extra: int,
                     score: str | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Block i on x = [prefix, the patch tokens at grid positions ``pos`` (B, m) (None: all, in raster order),
        ``extra`` position-less tokens], plus the patch tokens' scores when ``score`` is set."""
        blk = self.blocks[i]
        out, scores = self.attention(blk.attn, x, pos, extra, score)
        x = x + blk.drop_path1(out)
        return x + blk.drop_path2(blk.mlp(x)), scores

    def evolution_weight(self, module: nn.Module, learned: bool, default: float) -> float | torch.Tensor:
        return default

    def block_grid(self, i: int) -> tuple[int, int]:
        return self.resolutions(None)[self.stage_of_block(i)]

    # --- cost model --------------------------------------------------------------------------------------------
    def count_macs(self, policy, img_size) -> int:
        resolutions = self.resolutions(img_size)
        patches = [r * c for r, c in resolutions]
        if policy is not None:
            works = policy.work(patches)
        else:
            works = [BlockWork(p + self.num_prefix, p + self.num_prefix)
                     for p, blocks in zip(patches, self.stage_blocks) for _ in blocks]
        total = self.stem_macs(img_size)
        for i, work in enumerate(works):
            total += self._block_macs(self.blocks[i], work)
        for s in range(1, len(patches)):
            total += self._downsample_macs(s, patches[s - 1] + self.num_prefix, patches[s] + self.num_prefix)
        return total + self.head_macs()

    @staticmethod
    def _attention_macs(attn: nn.Module, n_q: int, n_k: int) -> int:
        return n_q * n_k * attn.num_heads * (attn.key_dim + attn.val_dim)

    def _block_macs(self, blk: nn.Module, work: BlockWork) -> int:
        n = work.attn_tokens
        per_token = linear_macs(blk.attn.qkv) + linear_macs(blk.attn.proj)
        dim = blk.attn.qkv.linear.in_features if hasattr(blk.attn.qkv, "linear") else blk.attn.qkv.in_features
        return (n * per_token + self._attention_macs(blk.attn, n, n) + work.mlp_tokens * linear_macs(blk.mlp)
                + work.merged_tokens * dim)

    def input_size(self) -> tuple[int, int, int]:
        size = self._img_size()
        return (self.model.in_chans, *size)


class TimmLevit(_LevitBase):
    name = "timm LeViT"
    scores = ("received", "random")

    def __init__(self, model: nn.Module) -> None:
        from timm.models.levit import Attention, LevitBlock, LevitDownsample

        if model.use_conv:
            raise TypeError("timm's levit_conv_* models (NCHW layout) are not supported; use the levit_* models "
                            "(same weights, linear layout)")
        for name, m in model.named_modules():
            if isinstance(m, LevitBlock) and type(m.attn) is not Attention:
                raise TypeError(f"{name} has attention {type(m.attn).__name__}; tokenpace supports timm LeViT's "
                                "Attention")
        for s, stage in enumerate(model.stages):
            if s > 0 and type(stage.downsample) is not LevitDownsample:
                raise TypeError(f"stage {s} down-samples with {type(stage.downsample).__name__}; tokenpace supports "
                                "timm LeViT's LevitDownsample (down_op='subsample')")
        super().__init__(model)

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        try:
            from timm.models.levit import Levit
        except ImportError:
            return False
        return isinstance(model, Levit)

    @staticmethod
    def _stage_block_lists(model: nn.Module) -> list[nn.Sequential]:
        return [stage.blocks for stage in model.stages]

    def forward_features(self, x: torch.Tensor, run_blocks: RunBlocks) -> torch.Tensor:
        return run_blocks(self.model.stem(x).flatten(2).transpose(1, 2))

    @staticmethod
    def _bias(attn: nn.Module, pos: torch.Tensor | None, device) -> torch.Tensor:
        """LeViT's relative-position biases (H, n, n), or (B, H, m, m) gathered at positions pos (B, m)."""
        if pos is None:
            return attn.get_attention_biases(device)
        idx = attn.attention_bias_idxs[pos.unsqueeze(2), pos.unsqueeze(1)]  # (B, m, m) into the bias table
        return attn.attention_biases[:, idx].transpose(0, 1)

    def attention(self, attn, x, pos, extra, score):
        if extra:
            raise ValueError("timm LeViT's attention biases need a position for every token")
        B, n, _ = x.shape
        q, k, v = attn.qkv(x).view(B, n, attn.num_heads, -1).split([attn.key_dim, attn.key_dim, attn.val_dim], dim=3)
        bias = self._bias(attn, pos, x.device).to(q.dtype)
        out, scores = _attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), bias, attn.scale, score, 0, 0)
        return attn.proj(out), scores

    def downsample(self, s: int, x: torch.Tensor, score: str | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Stage s's down-sampling on every token (raster order), plus the full-resolution tokens' scores."""
        ds = self.model.stages[s].downsample
        if score is None:
            return ds(x), None
        ad = ds.attn_downsample
        B, n, _ = x.shape
        k, v = ad.kv(x).view(B, n, ad.num_heads, -1).split([ad.key_dim, ad.val_dim], dim=3)
        q = ad.q(x).view(B, -1, ad.num_heads, ad.key_dim)
        bias = ad.get_attention_biases(x.device).to(q.dtype)
        out, scores = _attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), bias, ad.scale, score, 0, 0)
        out = ad.proj(out)
        return out + ds.drop_path(ds.mlp(out)), scores

    def downsample_module(self, s: int) -> nn.Module:
        return self.model.stages[s].downsample.attn_downsample

    def subsample_index(self, s: int, device=None) -> torch.Tensor:
        rows, cols = self.model.stages[s].downsample.attn_downsample.resolution
        return torch.arange(rows * cols, device=device).view(rows, cols)[::2, ::2].reshape(-1)

    def _img_size(self) -> tuple[int, int]:
        res = self.model.stages[0].blocks[0].attn.resolution if len(self.model.stages[0].blocks) else None
        stride = getattr(self.model.stem, "stride", 16)
        return (res[0] * stride, res[1] * stride)

    def resolutions(self, img_size) -> list[tuple[int, int]]:
        size = self._img_size() if img_size is None else parse_img_size(img_size)
        _, grid = conv_macs(self.model.stem, size)
        out = [grid]
        for _ in range(1, len(self.model.stages)):
            grid = ((grid[0] - 1) // 2 + 1, (grid[1] - 1) // 2 + 1)
            out.append(grid)
        return out

    def stem_macs(self, img_size) -> int:
        size = self._img_size() if img_size is None else parse_img_size(img_size)
        return conv_macs(self.model.stem, size)[0]

    def _downsample_macs(self, s: int, n_in: int, n_out: int) -> int:
        ds = self.model.stages[s].downsample
        ad = ds.attn_downsample
        return (n_in * linear_macs(ad.kv) + n_out * (linear_macs(ad.q) + linear_macs(ad.proj) + linear_macs(ds.mlp))
                + self._attention_macs(ad, n_out, n_in))

    def head_macs(self) -> int:
        m = self.model
        return linear_macs(m.head) + linear_macs(getattr(m, "head_dist", None))


class EvoLevitFamily(_LevitBase):
    name = "tokenpace Evo-LeViT"
    scores = ("cls", "random")
    default_representative = True

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        from ..archs import EvoLevit

        return isinstance(model, EvoLevit)

    @staticmethod
    def _stage_block_lists(model: nn.Module) -> list[nn.Sequential]:
        return list(model.stages)

    @property
    def num_prefix(self) -> int:
        return 1

    @property
    def has_class_token(self) -> bool:
        return True

    def forward_features(self, x: torch.Tensor, run_blocks: RunBlocks) -> torch.Tensor:
        return run_blocks(self.model.embed(x))

    def attention(self, attn, x, pos, extra, score):
        B, n, _ = x.shape
        q, k, v = attn.qkv(x).view(B, n, attn.num_heads, -1).split([attn.key_dim, attn.key_dim, attn.val_dim], dim=3)
        out, scores = _attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, attn.scale, score, 1,
                              extra)
        return attn.proj(out), scores

    def downsample(self, s: int, x: torch.Tensor, score: str | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        out, probs = self.model.downsamples[s].attend(x)
        return out, (reduce_probs(probs.float(), score, 1, 0) if score is not None else None)

    def downsample_module(self, s: int) -> nn.Module:
        return self.model.downsamples[s]

    def subsample_index(self, s: int, device=None) -> torch.Tensor:
        return self.model.downsamples[s].subsample_index(device)

    def evolution_weight(self, module: nn.Module, learned: bool, default: float) -> float | torch.Tensor:
        """sigmoid(theta) of the attention in stage-wise mode (learned, as the official code from epoch 200 on);
        the fixed ``default`` in layer-wise mode."""
        return torch.sigmoid(module.theta) if learned else default

    def _img_size(self) -> tuple[int, int]:
        return (self.model.img_size, self.model.img_size)

    def resolutions(self, img_size) -> list[tuple[int, int]]:
        if img_size is not None and parse_img_size(img_size) != self._img_size():
            raise ValueError(f"Evo-LeViT's position embeddings fix its input size to {self._img_size()}; "
                             f"got img_size={img_size!r}")
        return list(self.model.resolutions)

    def stem_macs(self, img_size) -> int:
        return conv_macs(self.model.stem, self._img_size())[0]

    def _downsample_macs(self, s: int, n_in: int, n_out: int) -> int:
        ds = self.model.downsamples[s]
        return (n_in * linear_macs(ds.kv) + n_out * (linear_macs(ds.q) + linear_macs(ds.proj)
                                                       + linear_macs(ds.mlp))
                + self._attention_macs(ds, n_out, n_in))

    def head_macs(self) -> int:  # inference uses the two average-pool heads
        return linear_macs(self.model.head) + linear_macs(self.model.head_dist)
