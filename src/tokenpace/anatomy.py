"""Block anatomy: what a model family says its blocks are made of, so that scores, methods, the token cut loss and
the cost model are written once (``blockops.py``, ``scoring.py``, ``methods/``, ``losses.py``).

Every supported block is read as the pre-norm transformer block

    h = norm1(x);  q, k, v = qkv(h, where);  o = softmax(q k^T * scale + bias(where)) v
    x = res_attn(x, out(o, h));  x = res_mlp(x, mlp(norm2(x)))

A family without norms (LeViT) returns its input from ``norm1``/``norm2``; ``res_*`` hold LayerScale, drop path and
scaled residuals; ``out`` the inner norm, the gate, the output projection and its dropout. A parallel block (ViT-22B:
attention and MLP read the same normed input and share one residual) has no separate MLP half
(``separate_mlp = False``): its ``out`` adds the MLP branch computed from h. ``attend`` is the softmax attention
(``core.attention``) unless the block mixes its maps otherwise (differential attention). Position-dependent terms
(RoPE, relative-position biases, shift masks) are taken where the tokens sit, which ``where`` describes: a
:class:`TokenSet` on sequence families, the family's own slot description on windowed ones. Methods never read
module internals; they call these parts.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from .core.attention import attend
from .core.macs import BlockShape, pointwise_conv


@dataclass(frozen=True)
class TokenSet:
    """Where the tokens of a (sub)sequence sit.

    ``prefix`` position-less tokens come first (class, distillation, registers); then the patch tokens at raster
    positions ``pos`` (B, m) of the stage grid (None: every patch, in raster order); then ``extra`` position-less
    tokens (Evo's representative token, EViT's fused token). ``frame`` is the family's per-forward position data
    (e.g. the RoPE table at the input size), passed through untouched. ``holes`` marks that ``pos`` may hold -1:
    a token without a position among the patch tokens (EViT's fused token once it is kept).
    """

    prefix: int
    pos: torch.Tensor | None = None
    extra: int = 0
    frame: Any = None
    holes: bool = False

    def select(self, idx: torch.Tensor, extra: int = 0) -> "TokenSet":
        """The set holding this set's prefix, then the patch tokens idx (B, m) (indices into this set's patches),
        then ``extra`` position-less tokens."""
        pos = idx if self.pos is None else self.pos.gather(1, idx)
        # built directly: dataclasses.replace costs several times more, once per selection
        return TokenSet(self.prefix, pos, extra, self.frame, self.holes)

    def table_rows(self, patches: int, first: int, blank: int, device: torch.device) -> torch.Tensor:
        """Each token's row (B or 1, n) in a table over token positions (a relative-position bias): the patch at
        raster position p -> ``first`` + p; every token without a position (prefix, extra, a hole) -> ``blank``.
        ``patches``: the patch count when ``pos`` is None (every patch, in order)."""
        pos = torch.arange(patches, device=device).unsqueeze(0) if self.pos is None else self.pos
        rows = torch.where(pos >= 0, pos + first, blank) if self.holes else pos + first
        if not self.prefix and not self.extra:
            return rows
        B = rows.shape[0]
        return torch.cat([rows.new_full((B, self.prefix), blank), rows, rows.new_full((B, self.extra), blank)], dim=1)

    def patches(self, idx: torch.Tensor) -> "TokenSet":
        """The set holding only the patch tokens idx (B, m) of this set (no prefix, no extra tokens)."""
        return replace(self.select(idx), prefix=0)


@dataclass(frozen=True)
class Frame:
    """Per-forward data a family's position terms need: the patch grid (rows, cols) at this input and the family's
    own tables (e.g. RoPE sin/cos over every patch position; a relative-position bias every block shares, over every
    token, as the model makes it once per forward: BEiT, RelPos ViT). ``cache`` holds what every selection of this
    forward shares (core.tokens.sequence_rows' row offsets), made once instead of once per block."""

    grid: tuple[int, int]
    rope: torch.Tensor | None = None
    shared_bias: torch.Tensor | None = None
    patch_coords: torch.Tensor | None = None  # each patch's (x, y) (B, N, 2), where a pool bins by them (Gemma 4)
    cache: dict = field(default_factory=dict, compare=False, repr=False)


@dataclass(frozen=True)
class StageEntry:
    """How a stage's tokens come from the previous stage's: the input raster positions they are sub-sampled from
    (LeViT's stride-2 attention down-sampling, whose queries sit there; the centres of PiT's pooling kernels, an
    approximation: each pooled token mixes its kernel's neighbourhood), whether the down-sampling attends (then
    ``enter_stage`` hands the scores of the full-resolution keys, and Evo evolves its global attention with them),
    and a learned Evo evolution weight (logit) the down-sampling attention carries, if any."""

    subsample: torch.Tensor
    evolution_logit: torch.Tensor | None = None
    attends: bool = True


@dataclass(frozen=True)
class LinearMap:
    """An affine projection y = x W^T + b (all heads side by side: W (A, C), b (A,) or None)."""

    weight: torch.Tensor
    bias: torch.Tensor | None


def fused_qkv_bias(attn: nn.Module) -> torch.Tensor | None:
    """The bias of an attention's fused q/k/v projection (``attn.qkv``): timm's separate ``q_bias``, zero ``k_bias``
    and ``v_bias`` side by side (EVA, BEiT, SwinV2), else the Linear's own (None without)."""
    if getattr(attn, "q_bias", None) is not None:
        return torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
    return attn.qkv.bias


def qkv_rows(attn: nn.Module, j: int, width: int) -> LinearMap:
    """Row block j (0: q, 1: k, 2: v) of the fused projection ``attn.qkv`` (``width`` rows each) with its bias, read
    as :func:`fused_qkv_bias` reads it, without concatenating."""
    rows = slice(j * width, (j + 1) * width)
    if getattr(attn, "q_bias", None) is not None:
        bias = (attn.q_bias, attn.k_bias, attn.v_bias)[j]
    else:
        bias = None if attn.qkv.bias is None else attn.qkv.bias[rows]
    return LinearMap(attn.qkv.weight[rows], bias)


def head_interleaved_rows(j: int, num_heads: int, key_dim: int, val_dim: int, device: torch.device) -> torch.Tensor:
    """Rows of a q/k/v projection laid out per head, q, k and v side by side (LeViT, TinyViT), that hold the queries
    (j=0), keys (1) or values (2) of every head. Made per call, not kept: a tensor kept from a traced call
    (torch.export, ONNX) would outlive it."""
    per_head = 2 * key_dim + val_dim
    start, stop = (0, key_dim, 2 * key_dim, per_head)[j:j + 2]
    rows = torch.arange(num_heads * per_head, device=device).view(num_heads, per_head)
    return rows[:, start:stop].reshape(-1)


def _plain_forwards() -> tuple:
    forwards = [nn.Linear.forward]
    try:  # timm's Linear subclass only casts its bias for TorchScript: the same product
        from timm.layers import Linear as TimmLinear

        forwards.append(TimmLinear.forward)
    except ImportError:
        pass
    return tuple(forwards)


def check_plain_linear(module: nn.Module, name: str) -> None:
    """Refuse (TypeError) a projection whose weight and bias do not say all it computes: the scores and the split
    q/k/v projections read them directly, so what a wrapper adds in its forward (a LoRA adapter) would be left out
    there while the block's own call kept it. A plain 1x1 convolution is a linear layer on tokens (NCHW LeViT)."""
    if isinstance(module, nn.Linear) and type(module).forward in _plain_forwards():
        return
    if type(module) is nn.Conv2d and pointwise_conv(module):
        return
    raise TypeError(f"{name} is a {type(module).__name__}, not a plain torch.nn.Linear: tokenpace reads its weight "
                    "and bias for token scores and split q/k/v projections, which would leave out what its forward "
                    "adds (e.g. a LoRA adapter); merge that into the weights first (peft: merge_and_unload())")


def check_projections(projections: list[tuple[dict, str, nn.Module, str, str | None]]) -> None:
    """Each projection checked when the anatomy was built is still the module it was, or another plain Linear or 1x1
    Conv2d (or a module whose ``inner`` submodule is one)."""
    for modules, attribute, module, label, inner in projections:
        current = modules.get(attribute)
        if current is not module:
            check_plain_linear(getattr(current, inner, current) if inner else current, label)


def check_held(held: list[tuple[dict, str, nn.Module, str]]) -> None:
    """Each module the anatomy was built from is still where it was: the parts (and a family's block list) hold the
    modules themselves, so one put in its place after ``apply`` would be left out of the forward (TypeError)."""
    for modules, attribute, module, label in held:
        if modules.get(attribute) is not module:
            raise TypeError(f"{label} was replaced after tokenpace.apply, which built the forward from the module it "
                            "had; call tokenpace.apply(model, ...) again so that the new one runs")


class PostNorm:
    """Mix in before a family's parts for post-norm blocks, ``x + drop_path(norm(branch(x)))``: the branches read the
    tokens as they are, and each norm sits in its residual (timm's ``ResPostBlock``, ``EvaBlockPostNorm``, SwinV2)."""

    block: nn.Module

    def norm1(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def norm2(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def res_attn(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return x + self.block.drop_path1(self.block.norm1(y))

    def res_mlp(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return x + self.block.drop_path2(self.block.norm2(y))


class PlainResidual:
    """Mix in before a family's parts for blocks without LayerScale, ``x + drop_path(branch(x))`` (LeViT's, PVTv2's,
    DeepSeek's tower)."""

    block: nn.Module

    def res_attn(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return x + self.block.drop_path1(y)

    def res_mlp(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return x + self.block.drop_path2(y)


class BlockParts:
    """The anatomy of one block; families subclass it. Defaults fit timm's pre-norm ``Block``."""

    num_heads: int
    scale: float
    accepts_extra: bool = True  # position-less tokens after the patches are allowed (no bias needs a position)
    separate_mlp: bool = True  # False: a parallel block, whose ``out`` holds the MLP branch (no MLP half)
    evolution_logit: torch.Tensor | None = None  # a learned Evo evolution weight (logit) the block carries

    def __init__(self, block: nn.Module) -> None:
        self.block = block
        # (the owner's submodules, attribute, the module checked, label, inner): the dict lookup costs a fraction
        # of nn.Module.__getattr__, and the check runs at every forward
        self.projections: list[tuple[dict, str, nn.Module, str, str | None]] = []
        self.held: list[tuple[dict, str, nn.Module, str]] = []  # (owner's submodules, attribute, module, name)

    def hold(self, owner: nn.Module, attribute: str, name: str | None = None) -> nn.Module:
        """``owner.<attribute>``, which the parts keep: :func:`check_held` refuses a forward after it is replaced.
        ``name``: how an error names it within the block (default: the attribute)."""
        module = getattr(owner, attribute)
        self.held.append((owner._modules, attribute, module, name or attribute))
        return module

    def require_plain_linear(self, owner: nn.Module, attribute: str, label: str, inner: str | None = None) -> None:
        """Refuse (TypeError) a projection ``owner.<attribute>`` that is not a plain Linear, now and at each forward
        (:func:`check_projections`): peft wraps the Linears of a model already patched in place. ``inner``: the
        projection's own Linear where it wraps one (timm LeViT's LinearNorm or ConvNorm: ``linear``, then a BatchNorm); both
        levels are watched, and either may become a plain Linear (BatchNorm fused after ``apply``)."""
        module = getattr(owner, attribute)
        linear = getattr(module, inner, module) if inner else module
        check_plain_linear(linear, label)
        self.projections.append((owner._modules, attribute, module, label, inner))
        if linear is not module:
            self.projections.append((module._modules, inner, linear, label, None))

    @property
    def fused(self) -> bool:
        """Fused SDPA (timm's ``fused_attn``), read at each forward, so flipping it after ``apply`` takes effect as
        on the plain model; False computes the explicit softmax. True where the attention has no such switch."""
        return getattr(getattr(self.block, "attn", None), "fused_attn", True)

    # --- the forward, part by part --------------------------------------------------------------------------------
    def dropout(self) -> float:
        """Attention-dropout probability of this forward (0 at inference)."""
        return 0.0

    def norm1(self, x: torch.Tensor) -> torch.Tensor:
        return self.block.norm1(x)

    def norm2(self, x: torch.Tensor) -> torch.Tensor:
        return self.block.norm2(x)

    def qkv(self, h: torch.Tensor, where: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v (B, H, n, d) of the normed tokens h (B, n, C), with norms and position terms applied."""
        raise NotImplementedError

    def queries(self, h: torch.Tensor, where: Any) -> torch.Tensor:
        """q (B, H, n, d) alone (where None: position-less tokens, e.g. the class token)."""
        return self.qkv(h, where)[0]

    def keys(self, h: torch.Tensor, where: Any) -> torch.Tensor:
        """k (B, H, n, d) alone, with norms and position terms."""
        return self.qkv(h, where)[1]

    def values(self, h: torch.Tensor, where: Any) -> torch.Tensor:
        """v (B, H, n, d_v) alone."""
        return self.qkv(h, where)[2]

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, row: str | None,
               heads: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The attention (B, H, n, d_v) of q, k, v with :meth:`bias`, and the score ``row`` over the keys reduced over
        heads by ``heads`` (``core.attention.attend``)."""
        return attend(q, k, v, self.scale, bias, self.dropout(), self.fused, row, heads)

    def bias(self, where: Any) -> torch.Tensor | None:
        """Additive logits among the tokens at ``where`` (relative-position bias, masks), broadcastable to
        (B, H, n, n); None when the block has none."""
        return None

    def mean_bias(self, where: Any) -> torch.Tensor | None:
        """The head mean of :meth:`bias`, broadcastable to (B, n, n) (the token cut loss's logits); families whose
        bias is gathered from a table override it to average the table first, so no (B, H, n, n) tensor is made."""
        bias = self.bias(where)
        return None if bias is None else bias.mean(dim=1)

    def out(self, o: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """Attention output o (B, n, H*d_v) -> the branch output (inner norm, gate from h, projection, dropout)."""
        raise NotImplementedError

    def mlp(self, h: torch.Tensor, where: Any = None) -> torch.Tensor:
        return self.block.mlp(h)

    def res_attn(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return x + self.block.drop_path1(self.block.ls1(y))

    def res_mlp(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return x + self.block.drop_path2(self.block.ls2(y))

    # --- what scoring may skip ------------------------------------------------------------------------------------
    def linear_queries(self) -> LinearMap | None:
        """The query projection when q is affine in h (no query norm, no position terms), else None."""
        return None

    def linear_keys(self) -> LinearMap | None:
        """The key projection when k is affine in h (no key norm, no position terms), else None: scores then need no
        key projection (sum_h q_h . k_hj = (W_k^T q) . h_j + const)."""
        return None

    def batch_statistics(self) -> bool:
        """Whether the block's q/k/v projection normalises with the statistics of the tokens it is called on
        (BatchNorm in training): a token's keys then depend on which tokens share the call, so keys projected for
        scoring are not the block's. The separate projections (:meth:`queries`, :meth:`keys`) must not depend on
        the call then (LeViT uses the running statistics there)."""
        return False

    def logit_head_weights(self) -> torch.Tensor | None:
        """Per-head weights (H,) of the head-summed logits a token receives where the heads mix before the softmax
        (talking heads: sum_h' L'_h' = sum_h w_h L_h + const), else None (each head counts once)."""
        return None

    def keys_affine(self) -> bool:
        """Whether :meth:`linear_keys` gives a map. Scoring asks on every selection: families override it where
        the answer costs less than building the map (slicing or fusing weights)."""
        return self.linear_keys() is not None

    # --- cost ----------------------------------------------------------------------------------------------------
    def shape(self) -> BlockShape:
        raise NotImplementedError

