"""apply / remove / trace / macs: patch a model in place by swapping its class (ToMe style), no new parameters."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from functools import partial
from typing import Iterator

import torch
from torch import nn

from .families import FamilyAdapter, adapter_for
from .methods import ForwardState, MethodConfig, Policy, make_config

_ATTR = "_tokenpace"
_PATCHED_CLASSES: dict[type, type] = {}


@dataclass
class Trace:
    """Filled by a forward inside :func:`trace`: per block, the original patch indices (B, K_i) that took the full
    path (None: the block ran on every token). EViT marks its fused token with -1."""

    kept: list[torch.Tensor | None] = field(default_factory=list)


@dataclass
class Patch:
    """What ``apply`` attaches to a model: the config, its policy, the family adapter, per-forward outputs."""

    config: MethodConfig
    policy: Policy
    adapter: FamilyAdapter
    original_class: type
    tracer: Trace | None = None
    last_state: ForwardState | None = None  # the latest forward's state (what training losses read)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        state = ForwardState(kept=[None] * self.adapter.depth if self.tracer is not None else None)
        out = self.adapter.forward_features(x, partial(self.policy.run, state=state))
        self.last_state = state
        if self.tracer is not None:
            self.tracer.kept = state.kept
        return out


def _forward_features(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    if args or any(v is not None and v is not False for v in kwargs.values()):
        raise ValueError("attention masks and causal attention are not supported on a tokenpace-patched model; "
                         "call tokenpace.remove(model) first")
    return getattr(self, _ATTR).forward_features(x)


def _patched_class(cls: type) -> type:
    if cls not in _PATCHED_CLASSES:
        _PATCHED_CLASSES[cls] = type(f"TokenPace{cls.__name__}", (cls,), {"forward_features": _forward_features})
    return _PATCHED_CLASSES[cls]


def get_patch(model: nn.Module) -> Patch | None:
    """The patch on ``model``, or None when it is not patched."""
    return model.__dict__.get(_ATTR)


def apply(model: nn.Module, method: str | MethodConfig, **options) -> nn.Module:
    """Patch ``model`` in place to run ``method`` ("evo", "idle", "evit", "topk" or a config object); returns it.

    Options are the config's fields (``apply(model, "evo", keep=0.5, mode="layer")``). Re-applying replaces the
    previous method. No parameters or buffers are added, so ``state_dict`` keys stay those of the plain model.
    """
    config = make_config(method, **options)
    adapter = adapter_for(model)
    policy = adapter.make_policy(config)  # validates method, score and layer indices against this model
    remove(model)
    original = type(model)
    model.__dict__[_ATTR] = Patch(config=config, policy=policy, adapter=adapter, original_class=original)
    model.__class__ = _patched_class(original)
    return model


def remove(model: nn.Module) -> nn.Module:
    """Undo :func:`apply`: the model's own class and forward come back; a model that is not patched is returned as is."""
    patch = model.__dict__.pop(_ATTR, None)
    if patch is not None:
        model.__class__ = patch.original_class
    return model


@contextlib.contextmanager
def trace(model: nn.Module) -> Iterator[Trace]:
    """Record which patch tokens take the full path in each block during the forwards inside the block."""
    patch = get_patch(model)
    if patch is None:
        raise ValueError("trace needs a patched model: call tokenpace.apply(model, method) first")
    tracer = Trace(kept=[None] * patch.adapter.depth)
    patch.tracer = tracer
    try:
        yield tracer
    finally:
        patch.tracer = None


def macs(model: nn.Module, img_size: int | tuple[int, int] | None = None) -> int:
    """Multiply-accumulates (MACs, not FLOPs) of one image's forward under the current configuration.

    Counted analytically from the per-layer token counts the method really uses: patch embedding, every linear
    layer and attention matmul, the scoring work, and the classifier head. ``img_size`` overrides the model's own.
    """
    patch = get_patch(model)
    if patch is not None:
        return patch.adapter.count_macs(patch.policy, img_size)
    return adapter_for(model).count_macs(None, img_size)
