"""LeViT families (deep-narrow, three stages joined by attention down-sampling).

- ``TimmLevit``: timm ``Levit`` / ``LevitDistilled`` (``levit_*``, pretrained weights, BatchNorm-fused or not). Its
  attention has learned relative-position biases, taken at the positions of the tokens present; there is no class
  token. ``levit_conv_*`` (the same weights in NCHW layout, 1x1 convolutions + BatchNorm2d) run on tokens too: every
  layer inside a block is token-wise (:func:`tokenwise`), and the stages' blocks, down-sampling and head get the
  NCHW grid they were built for.
- ``EvoLevitFamily``: tokenpace's ``EvoLevit`` (``evo_levit_*``, the official Evo-LeViT): a class token, no biases,
  and a learnable evolution weight in every attention.

Blocks are numbered across stages; down-sampling always runs on every token, in raster order. The attention a token
receives is read exactly (the mean of its softmax column): token counts are small.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..anatomy import BlockParts, Frame, LinearMap, PlainResidual, StageEntry, head_interleaved_rows
from ..core.attention import attend, probs_scores
from ..core.feature_maps import to_map, to_tokens
from ..core.macs import BlockShape, conv_macs, linear_macs, pointwise_conv
from .base import StagedSequenceFamily, parse_img_size


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


def batch_normalised(layer: nn.Module) -> bool:
    """Whether ``layer`` (a Linear or 1x1 Conv2d, or timm's LinearNorm / ConvNorm, which add a BatchNorm) normalises
    with the statistics of the tokens it is called on (BatchNorm in training), so that a token's output depends on the
    others in the call."""
    bn = getattr(layer, "bn", None)
    return bn is not None and bn.training


def inference_map(layer: nn.Module) -> LinearMap:
    """A Linear (or 1x1 Conv2d), or timm's LinearNorm / ConvNorm with BatchNorm's running statistics, as one affine
    map: the layer in eval mode (in training too, where BatchNorm itself would use batch statistics and update its
    running ones)."""
    if isinstance(layer, (nn.Linear, nn.Conv2d)):
        return LinearMap(layer.weight.flatten(1), layer.bias)
    linear, bn = layer.linear, layer.bn
    gain = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    bias = bn.bias - bn.running_mean * gain + (0 if linear.bias is None else linear.bias * gain)
    return LinearMap(linear.weight.flatten(1) * gain[:, None], bias)


_KINDS: list = []  # (containers, channel norms) of timm's NCHW LeViT, filled by levit_kinds()


def levit_kinds() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """The module classes :func:`tokenwise` walks into (their forwards call their children in order) and the
    per-channel norms it runs on tokens (BatchNorm2d; SyncBatchNorm for DDP; FrozenBatchNorm2d from timm's
    freeze_batch_norm_2d). Read once, when a family is built: no cache wrapper on the forward path (dynamo warns)."""
    if not _KINDS:
        from timm.models.levit import ConvNorm, LevitMlp
        from torchvision.ops.misc import FrozenBatchNorm2d

        _KINDS.append(((ConvNorm, LevitMlp, nn.Sequential), (nn.BatchNorm2d, nn.SyncBatchNorm, FrozenBatchNorm2d)))
    return _KINDS[0]


def on_token_map(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A token-wise layer of the NCHW model (a 1x1 Conv2d, a BatchNorm2d) on tokens x (B, n, C), called on the
    (B, C, n, 1) map they form (a view with channels-last strides, no copy): the kernels the dense NCHW model runs,
    and for a norm the same statistics over the tokens present. Not as a matrix product: on the project's CPU,
    oneDNN's channels-last 1x1 convolution took 3.8 ms where MKL's product of the same shapes took 7.4 ms, which
    alone undid Evo's saving on ``levit_conv_*``."""
    return to_tokens(module(to_map(x, (x.shape[1], 1))))


def tokenwise(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A token-wise module of timm's NCHW LeViT (a ConvNorm: 1x1 Conv2d + BatchNorm2d; a LevitMlp; a Sequential of
    them and activations) on tokens x (B, n, C), as it computes on an NCHW map holding them: the convolution and the
    norm run on the (B, C, n, 1) map the tokens form (BatchNorm's batch statistics in training, over the tokens, as
    on the map). Refused: any
    other layer with parameters or buffers (a LoRA wrapper, another convolution), and hooks (pruning and weight
    norm recompute a weight in a hook that a linear map read from the weight would skip)."""
    if module._forward_pre_hooks or module._forward_hooks:
        raise TypeError(f"a {type(module).__name__} with forward hooks inside timm's NCHW LeViT: tokenpace runs its "
                        "layers on tokens without calling their forwards; remove the hooks (torch.nn.utils.prune."
                        "remove, remove_weight_norm) before tokenpace.apply")
    containers, norms = levit_kinds()
    if type(module) in containers:
        for child in module.children():
            x = tokenwise(child, x)
        return x
    if (type(module) is nn.Conv2d and pointwise_conv(module)) or type(module) in norms:
        return on_token_map(module, x)
    if type(module) is nn.Conv2d:
        raise TypeError(f"a {type(module).__name__} with kernel {module.kernel_size}, stride {module.stride}, "
                        f"padding {module.padding} and groups {module.groups} inside timm's NCHW LeViT: tokenpace "
                        "runs its convolutions on tokens as linear layers, which only a plain 1x1 Conv2d (stride 1, "
                        "no padding, one group) is")
    if next(module.parameters(), None) is not None or next(module.buffers(), None) is not None:
        raise TypeError(f"a {type(module).__name__} inside timm's NCHW LeViT: tokenpace runs its 1x1 convolutions "
                        "(ConvNorm: Conv2d + BatchNorm2d, or a fused Conv2d) on tokens as linear layers; merge what "
                        "wraps them into the weights first (peft: merge_and_unload())")
    return module(x)  # activation, dropout


def call_tokenwise(module: nn.Module, x: torch.Tensor, conv: bool) -> torch.Tensor:
    """A token-wise module on tokens (B, n, C), in either layout (``conv``: timm's NCHW LeViT)."""
    return tokenwise(module, x) if conv else module(x)


class LevitParts(PlainResidual, BlockParts):
    """LeViT's block: no norms, q/k/v per head side by side in one projection, an activation before the output
    projection, relative-position biases (timm) or none (Evo-LeViT)."""

    def __init__(self, block: nn.Module, biases: bool, conv: bool = False) -> None:
        super().__init__(block)
        self.conv = conv  # timm's NCHW layout: layers called through tokenwise()
        attn = self.attn = self.hold(block, "attn")
        self.num_heads, self.scale = attn.num_heads, attn.scale
        self.key_dim, self.val_dim = attn.key_dim, attn.val_dim
        # timm's LinearNorm (linear + BatchNorm), or a Linear (Evo-LeViT, or timm's with the BatchNorm fused)
        self.require_plain_linear(attn, "qkv", f"attn.qkv of a {type(block).__name__}", inner="linear")
        self.biases = biases
        self.accepts_extra = not biases  # a bias needs a position for every token
        self.evolution_logit = getattr(attn, "theta", None)

    def norm1(self, x):
        return x

    def norm2(self, x):
        return x

    def qkv(self, h, where):
        B, n, _ = h.shape
        q, k, v = call_tokenwise(self.attn.qkv, h, self.conv).view(B, n, self.num_heads, -1).split(
            [self.key_dim, self.key_dim, self.val_dim], dim=3)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def _project(self, h: torch.Tensor, j: int) -> torch.Tensor:
        """Queries (j=0), keys (1) or values (2) alone, (B, H, n, d), with BatchNorm's running statistics.

        Only the score side and the token cut loss project alone (the block calls :meth:`qkv`). In training, batch
        statistics would depend on which tokens share the call (all of them, one class token per image, the idle
        ones) and every call would update the running statistics: the side uses the statistics inference uses and
        leaves them as they are."""
        rows = self._affine_rows(j)
        B, n, _ = h.shape
        return F.linear(h, rows.weight, rows.bias).view(B, n, self.num_heads, -1).transpose(1, 2)

    def queries(self, h, where):
        return self._project(h, 0)

    def keys(self, h, where):
        return self._project(h, 1)

    def values(self, h, where):
        return self._project(h, 2)

    def bias(self, where):
        if not self.biases:
            return None
        attn = self.attn
        if where is None or where.pos is None:
            return attn.get_attention_biases(attn.attention_biases.device)
        pos = where.pos
        idx = attn.attention_bias_idxs[pos.unsqueeze(2), pos.unsqueeze(1)]  # (B, m, m) into the bias table
        return attn.attention_biases[:, idx].transpose(0, 1)

    def out(self, o, h):
        return call_tokenwise(self.attn.proj, o, self.conv)

    def mlp(self, h, where=None):
        return call_tokenwise(self.block.mlp, h, self.conv)

    def _affine_rows(self, j: int) -> LinearMap:
        affine = inference_map(self.attn.qkv)
        rows = head_interleaved_rows(j, self.num_heads, self.key_dim, self.val_dim, affine.weight.device)
        return LinearMap(affine.weight[rows], None if affine.bias is None else affine.bias[rows])

    def linear_queries(self):
        return self._affine_rows(0)

    def linear_keys(self):
        return self._affine_rows(1)

    def keys_affine(self):
        return True  # with the running statistics in training (see _project)

    def batch_statistics(self):
        return batch_normalised(self.attn.qkv)

    def shape(self) -> BlockShape:
        attn = self.attn
        weight = getattr(attn.qkv, "linear", attn.qkv).weight  # (out, in) or (out, in, 1, 1)
        return BlockShape(dim=weight.shape[1], qk_dim=attn.num_heads * attn.key_dim,
                          v_dim=attn.num_heads * attn.val_dim, qkv=linear_macs(attn.qkv),
                          proj=linear_macs(attn.proj), mlp=linear_macs(self.block.mlp))


def _attention_macs(attn: nn.Module, n_q: int, n_k: int) -> int:
    return n_q * n_k * attn.num_heads * (attn.key_dim + attn.val_dim)


class _LevitBase(StagedSequenceFamily):
    received_row = "columns"
    conv = False  # timm's NCHW layout (levit_conv_*)

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model, self._stage_block_lists(model))

    def finish(self, x: torch.Tensor, frame: Frame) -> torch.Tensor:
        return x

    def intermediates(self, maps, final, frame, taken, stopped, options):
        """As timm's LeViT: each stage's patch tokens as an NCHW grid (a class token is left out); the tokens
        where the run ended are the final."""
        options.only_nchw(self.name)
        rows, cols = frame.grid
        grids = [(rows, cols)]
        for _ in range(1, len(self.stage_blocks)):
            rows, cols = (rows - 1) // 2 + 1, (cols - 1) // 2 + 1
            grids.append((rows, cols))
        p = self.num_prefix
        maps = [to_map(y[:, p:], grids[j]) for j, y in zip(taken, maps)]
        if self.conv:  # the NCHW model's final is a map too, of the stage it ended at
            final = to_map(final, grids[max(taken) if stopped else -1])
        return maps if options.intermediates_only else (final, maps)

    def input_size(self) -> tuple[int, int, int]:
        return (self.model.in_chans, *self._img_size())

    def stage_entry_macs(self, s: int, img_size) -> int:
        patches = self.stage_patches(img_size)
        ds, attn = self._downsample_parts(s)
        n_in, n_out = patches[s - 1] + self.num_prefix, patches[s] + self.num_prefix
        return (n_in * linear_macs(attn.kv) + n_out * (linear_macs(attn.q) + linear_macs(attn.proj)
                                                       + linear_macs(ds.mlp))
                + _attention_macs(attn, n_out, n_in))


class TimmLevit(_LevitBase):
    name = "timm LeViT"

    def __init__(self, model: nn.Module) -> None:
        from timm.models.levit import Attention, LevitBlock, LevitDownsample

        for name, m in model.named_modules():
            if isinstance(m, LevitBlock) and type(m.attn) is not Attention:
                raise TypeError(f"{name} has attention {type(m.attn).__name__}; tokenpace supports timm LeViT's "
                                "Attention")
        for s, stage in enumerate(model.stages):
            if s > 0 and type(stage.downsample) is not LevitDownsample:
                raise TypeError(f"stage {s} down-samples with {type(stage.downsample).__name__}; tokenpace supports "
                                "timm LeViT's LevitDownsample (down_op='subsample')")
        super().__init__(model)
        self.conv = model.use_conv
        if self.conv:
            levit_kinds()  # the classes tokenwise() dispatches on, read now rather than in a compiled forward
        self._final_grid = self.resolutions(None)[-1] if self.conv else None  # the map the NCHW head pools

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

    def make_parts(self, i: int) -> LevitParts:
        return LevitParts(self.blocks[i], biases=True, conv=self.conv)

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, Frame]:
        x = self.model.stem(x)
        return to_tokens(x), Frame(grid=tuple(x.shape[-2:]))

    def block(self, i: int, x: torch.Tensor, frame: Frame) -> torch.Tensor:
        if self.conv:  # the NCHW block on its stage's map (its biases fix the grid)
            return to_tokens(self.blocks[i](to_map(x, self.blocks[i].attn.resolution)))
        return self.blocks[i](x)

    def finish(self, x: torch.Tensor, frame: Frame) -> torch.Tensor:
        return to_map(x, self._final_grid) if self.conv else x  # the NCHW head pools the map

    def _downsample_parts(self, s: int):
        ds = self.model.stages[s].downsample
        return ds, ds.attn_downsample

    def enter_stage(self, s: int, x: torch.Tensor, frame: Frame, row: str | None = None):
        if s == 0:  # stage 0 has no down-sampling
            return x, None
        ds, ad = self._downsample_parts(s)
        if row is None:
            return (to_tokens(ds(to_map(x, ad.resolution))) if self.conv else ds(x)), None
        B, n, _ = x.shape
        k, v = call_tokenwise(ad.kv, x, self.conv).view(B, n, ad.num_heads, -1).split([ad.key_dim, ad.val_dim], dim=3)
        # the query side sub-samples (or pools) the grid first
        q = tokenwise(ad.q.ln, to_tokens(ad.q.down(to_map(x, ad.resolution)))) if self.conv else ad.q(x)
        q = q.view(B, -1, ad.num_heads, ad.key_dim)
        bias = ad.get_attention_biases(x.device)
        out, scores = attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), ad.scale, bias, row=row)
        out = call_tokenwise(ad.proj, out.transpose(1, 2).reshape(B, out.shape[2], -1), self.conv)
        return out + ds.drop_path(call_tokenwise(ds.mlp, out, self.conv)), scores

    def stage_entry(self, s: int, device: torch.device) -> StageEntry:
        rows, cols = self.model.stages[s].downsample.attn_downsample.resolution
        return StageEntry(torch.arange(rows * cols, device=device).view(rows, cols)[::2, ::2].reshape(-1))

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


class EvoLevitFamily(_LevitBase):
    name = "tokenpace Evo-LeViT"
    blocks_use_positions = False  # position embeddings are added before the blocks, not inside them

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        from ..archs import EvoLevit

        return isinstance(model, EvoLevit)

    @staticmethod
    def _stage_block_lists(model: nn.Module) -> list[nn.Sequential]:
        return list(model.stages)

    def make_parts(self, i: int) -> LevitParts:
        return LevitParts(self.blocks[i], biases=False)

    @property
    def num_prefix(self) -> int:
        return 1

    @property
    def has_class_token(self) -> bool:
        return True

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, Frame]:
        return self.model.embed(x), Frame(grid=self.model.resolutions[0])

    def _downsample_parts(self, s: int):
        ds = self.model.downsamples[s]
        return ds, ds

    def enter_stage(self, s: int, x: torch.Tensor, frame: Frame, row: str | None = None):
        if s == 0:
            return x, None
        out, probs = self.model.downsamples[s].attend(x)
        return out, (probs_scores(probs, row, "mean")[:, 1:] if row is not None else None)

    def stage_entry(self, s: int, device: torch.device) -> StageEntry:
        ds = self.model.downsamples[s]
        return StageEntry(ds.subsample_index(device), ds.theta)

    def _img_size(self) -> tuple[int, int]:
        return (self.model.img_size, self.model.img_size)

    def resolutions(self, img_size) -> list[tuple[int, int]]:
        if img_size is not None and parse_img_size(img_size) != self._img_size():
            raise ValueError(f"Evo-LeViT's position embeddings fix its input size to {self._img_size()}; "
                             f"got img_size={img_size!r}")
        return list(self.model.resolutions)

    def stem_macs(self, img_size) -> int:
        return conv_macs(self.model.stem, self._img_size())[0]
