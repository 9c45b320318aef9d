"""apply / remove / trace / macs: patch a model in place by swapping its class (ToMe style), no new parameters.

A patched model pickles, deep-copies and ``torch.save``s like any module: its class is made at run time, so it
reduces to (the original class, its state, the method config) and is re-patched when loaded.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn

from .families import Family, adapter_for
from .families.base import EMBEDDING, IntermediateOptions, parse_img_size
from .methods import ForwardState, MethodConfig, Policy, make_config, make_policy, methods_for
from .methods.base import StopForward

_ATTR = "_tokenpace"
_CONFIG_KEY = "_tokenpace_config"  # the method config in a patched model's pickled state
_PATCHED_CLASSES: dict[tuple[type, bool], type] = {}


@dataclass
class Trace:
    """Filled by a forward inside :func:`trace`: per block that ran, the original patch indices (B, K_i) that took
    the full path (None: the block ran on every token). EViT marks its fused token with -1. A
    ``forward_intermediates(..., stop_early=True)`` lists the blocks up to where it stopped."""

    kept: list[torch.Tensor | None] = field(default_factory=list)


@dataclass
class Patch:
    """What ``apply`` attaches to a model: the config, its policy, the family adapter, per-forward outputs."""

    config: MethodConfig
    policy: Policy
    adapter: Family
    original_class: type
    tracer: Trace | None = None
    # per patched method (forward_features; forward where the family owns it), the masks the class's method takes
    # by name: a call naming only those, set to None or False, is the images alone (read once: the common call then
    # binds no signature, also under torch.compile)
    call_masks: dict = field(default_factory=dict)
    last_state: ForwardState | None = None  # the latest forward's state (what training losses read)

    def _state(self, **taps) -> ForwardState:
        self.last_state = None  # the previous forward's records (activations, their graph) go before this one
        family = self.adapter
        family.check_projections()
        return ForwardState(training=family.model.training, checkpoint=family.checkpointing,
                            kept=[None] * family.depth if self.tracer is not None else None, **taps)

    def _done(self, state: ForwardState) -> None:
        self.last_state = state
        if self.tracer is not None:  # one entry per block that ran: a forward stopped early lists no later block
            ran = state.kept if state.stop_after is None else state.kept[:state.stop_after + 1]
            self.tracer.kept = ran

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x, self.adapter.finish)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The model's forward where it does not go through ``forward_features`` (``Family.owns_forward``)."""
        return self._run(x, self.adapter.model_output)

    def _run(self, x: torch.Tensor, ending) -> torch.Tensor:
        """Images -> the blocks under the method -> ``ending(tokens, frame)``."""
        family, state = self.adapter, self._state()
        x, state.frame = family.embed(x)
        x = ending(self.policy.run(x, state), state.frame)
        self._done(state)
        return x

    def forward_intermediates(self, x: torch.Tensor, indices=None, stop_early: bool = False, coarse: bool = True,
                              **options):
        """timm's ``forward_intermediates`` through the method: the full token map after each feature point (idle
        tokens and placeholders included; tokens a method dropped keep the features they entered their last block
        with), formatted as the model's own method formats it. ``coarse=False`` (Hiera's): a map after every block
        instead of the family's feature points."""
        from timm.models._features import feature_take_indices

        family, options = self.adapter, IntermediateOptions(**options)
        points = family.feature_points() if coarse else list(range(family.depth))
        taken, last = feature_take_indices(len(points), indices)
        # stopping after the last block is the whole run: the method's own ending (tokens a method dropped stay out)
        stop_after = points[last] if stop_early and points[last] != family.depth - 1 else None
        state = self._state(taps=frozenset(points[j] for j in taken), stop_after=stop_after)
        x, state.frame = family.feature_embed(x)
        stopped = False
        try:
            state.tap(EMBEDDING, lambda: x)  # a feature point before every block (timm's MaxxVit: the stem's map)
            x = self.policy.run(x, state)
        except StopForward as stop:
            x, stopped = stop.tokens, True
        self._done(state)
        maps = [state.maps[points[j]] for j in taken]
        return family.intermediates(maps, x, state.frame, list(taken), stopped, options)


# arguments of the models' forward_features / forward_intermediates that ask for another input or output than the
# images and their features (None or False asks for nothing)
_MASKS = ("attn_mask", "is_causal", "mask", "return_intermediates")
_NAFLEX_INPUT = ("patch_coord", "patch_valid")


def _refuse_masks(arguments: dict) -> None:
    """ValueError for an argument beside the images that asks for another input or output than the images and their
    features."""
    given = [name for name, value in arguments.items() if value is not None and value is not False]
    if any(name in _NAFLEX_INPUT for name in given):
        raise ValueError("packed NaFlex input (patches with patch_coord / patch_valid, as timm's NaFlex collator "
                         "makes them) is not supported on a tokenpace-patched model: its images have grids of their "
                         "own and padding tokens; pass image batches (B, C, H, W), or call tokenpace.remove(model) "
                         "first")
    if "return_intermediates" in given:
        raise ValueError("forward_features(..., return_intermediates=True) is not supported on a tokenpace-patched "
                         "model; call model.forward_intermediates(x) for its feature maps")
    if "mask" in given:
        raise ValueError("masked input (mask=..., Hiera's MAE mask units) is not supported on a tokenpace-patched "
                         "model: idling needs every token; call tokenpace.remove(model) first")
    if given:
        raise ValueError("attention masks and causal attention are not supported on a tokenpace-patched model; "
                         "call tokenpace.remove(model) first")


def _own_patch(model: nn.Module) -> Patch:
    """The patch of a patched instance (no lookup through wrappers per call), refused on a copy it does not drive:
    nn.DataParallel's replicas share the original's ``__dict__``, so its patch would run the original's modules."""
    patch = model.__dict__[_ATTR]
    if patch.adapter.model is not model:
        raise RuntimeError(f"this {patch.original_class.__name__} is a copy whose tokenpace patch still drives the "
                           "module it was copied from (nn.DataParallel replicates modules that way); run data "
                           "parallel with DistributedDataParallel (accelerate launch, torchrun: one patched model "
                           "per process), or copy a patched model with copy.deepcopy, which re-patches the copy")
    return patch


def _images(model: nn.Module, method: str, args: tuple, kwargs: dict) -> tuple[Patch, torch.Tensor]:
    """The patch and the images of a call of the class's ``method`` (``forward_features``, or ``forward`` where the
    family owns it); ValueError for an argument asking for another input or output."""
    patch = _own_patch(model)
    masks = patch.call_masks[method]
    if len(args) == 1 and all(name in masks and (value is None or value is False)
                              for name, value in kwargs.items()):
        # the call timm's forward makes: the images, and at most masks that ask for nothing (attn_mask=None)
        return patch, args[0]
    x, given = _bound_arguments(getattr(patch.original_class, method), model, args, kwargs)
    _refuse_masks(given)
    return patch, x


def _forward_features(self, *args, **kwargs) -> torch.Tensor:
    patch, x = _images(self, "forward_features", args, kwargs)
    return patch.forward_features(x)


def _forward(self, x, *args, **kwargs) -> torch.Tensor:
    """The forward of a model whose own forward does not call ``forward_features`` (``Family.owns_forward``). The
    input is named, as in timm's forwards: torch.export matches per-input dynamic shapes to the signature."""
    patch, x = _images(self, "forward", (x, *args), kwargs)
    return patch.forward(x)


def _forward_intermediates(self, x: torch.Tensor, *args, **kwargs):
    """timm's ``forward_intermediates`` with the arguments the model's own class takes, in its order (ViT and Eva
    put ``return_prefix_tokens`` third, the pyramids ``norm``); an argument the class does not take is a TypeError,
    as it is unpatched."""
    patch = _own_patch(self)
    _, given = _bound_arguments(patch.original_class.forward_intermediates, self, (x, *args), kwargs)
    _refuse_masks({name: given.pop(name, None) for name in _MASKS + _NAFLEX_INPUT})
    # the class's own default: timm's Hiera stops early unless told otherwise, the others do not
    param = _signature(patch.original_class.forward_intermediates)[0].parameters.get("stop_early")
    default_stop = param is not None and param.default is not inspect.Parameter.empty and bool(param.default)
    indices, stop_early = given.pop("indices", None), given.pop("stop_early", default_stop)
    return patch.forward_intermediates(x, indices, stop_early, given.pop("coarse", True), **given)


@functools.lru_cache(maxsize=None)
def _signature(method) -> tuple[inspect.Signature, tuple[inspect.Parameter, ...]]:
    """A method's signature and its parameters after self: read once per class, not on every call."""
    signature = inspect.signature(method)
    return signature, tuple(signature.parameters.values())[1:]


def _bound_arguments(method, model: nn.Module, args: tuple, kwargs: dict):
    """A call of ``method`` bound as the model's own class binds it (a TypeError where it would be one): its input
    (the first argument, whatever the class names it: ``x``, NaFlexVit's ``patches``) and the other arguments the
    call names, by name (defaults left out)."""
    signature, params = _signature(method)
    bound = signature.bind(model, *args, **kwargs).arguments
    given = {}
    for param in params[1:]:
        if param.name in bound:
            value = bound[param.name]
            given.update(value if param.kind is inspect.Parameter.VAR_KEYWORD else {param.name: value})
    if params[0].name not in bound:
        raise TypeError(f"{method.__qualname__}() missing its input argument {params[0].name!r}")
    return bound[params[0].name], given


def _reduce_ex(self, protocol):
    """Pickle and deepcopy as (original class, plain module state + the method config): no run-time class needed."""
    state = dict(self.__dict__)
    patch = state.pop(_ATTR)
    state[_CONFIG_KEY] = patch.config
    return (_new_patched, (patch.original_class,), state)


def _setstate(self, state):
    state = dict(state)
    config = state.pop(_CONFIG_KEY)
    original = type(self).__mro__[1]
    original.__setstate__(self, state)
    self.__class__ = original
    apply(self, config)


def _new_patched(original_class: type) -> nn.Module:
    cls = _patched_class(original_class)  # its __setstate__ re-applies the method, which picks the class
    return cls.__new__(cls)


def _refuse_pruning(self, *args, **kwargs):
    raise RuntimeError("prune_intermediate_layers changes the blocks of a patched model, whose method was resolved "
                       "for the blocks it had at tokenpace.apply (layer schedule, scores, cost): prune first, then "
                       "apply (tokenpace.remove(model), model.prune_intermediate_layers(...), tokenpace.apply(...))")


def _patched_class(cls: type, owns_forward: bool = False) -> type:
    """The run-time subclass of ``cls`` whose forwards go through the patch (``forward`` too where the family owns
    it: the model's own forward does not call ``forward_features``)."""
    key = (cls, owns_forward)
    if key not in _PATCHED_CLASSES:
        members = {"forward_features": _forward_features, "forward_intermediates": _forward_intermediates,
                   "__reduce_ex__": _reduce_ex, "__setstate__": _setstate}
        if owns_forward:
            members["forward"] = _forward
        if hasattr(cls, "prune_intermediate_layers"):
            members["prune_intermediate_layers"] = _refuse_pruning
        _PATCHED_CLASSES[key] = type(f"TokenPace{cls.__name__}", (cls,), members)
    return _PATCHED_CLASSES[key]


def _unwrapped(model: nn.Module) -> nn.Module:
    """The model a ``FeatureGetterNet`` wraps, else the model; TypeError for what is not a module or is a
    torch.compile wrapper."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"tokenpace patches a torch.nn.Module (a timm model); got {type(model).__name__}")
    kind = type(model).__name__
    if kind == "OptimizedModule":
        raise TypeError("this is a torch.compile wrapper, whose graphs keep the forward the model had when it was "
                        "compiled: apply or remove the method on the model first, then compile it "
                        "(tokenpace.apply(model, ...); torch.compile(model))")
    return model.model if kind == "FeatureGetterNet" else model


def patched_model(model: nn.Module) -> nn.Module:
    """The model the method patches: the model itself, or the one a feature extractor wraps. timm's
    ``features_only`` models of the flat families and LeViT (``FeatureGetterNet``) call its
    ``forward_intermediates``, so the method runs there. Pyramids' default
    ``FeatureListNet`` calls the stage modules one by one, around any method, and PiT's ``FeatureHookNet`` reads
    hooks on stage modules a patched forward never calls: both refused (and what :func:`_unwrapped` refuses)."""
    model = _unwrapped(model)
    kind = type(model).__name__
    if kind in ("FeatureListNet", "FeatureDictNet", "FeatureHookNet"):
        how = ("reads its features from hooks on stage modules that a patched forward does not call" if
               kind == "FeatureHookNet" else "calls the stage modules one by one and would run dense")
        raise TypeError(f"this features_only model is a timm {kind}, which {how}; build it with "
                        "timm.create_model(..., features_only=True, feature_cls='getter') so that features come from "
                        "forward_intermediates")
    return model


def supported_methods(model: nn.Module) -> list[str]:
    """The methods that run on ``model`` ("evo", "idle", "evit", "topk"); TypeError for an unsupported model."""
    return methods_for(adapter_for(patched_model(model)))


def get_patch(model: nn.Module) -> Patch | None:
    """The patch on ``model`` (or on the model a feature extractor wraps), or None when it is not patched;
    TypeError for a torch.compile wrapper (patch the model it wraps) or what is not a module."""
    return _unwrapped(model).__dict__.get(_ATTR)


def apply(model: nn.Module, method: str | MethodConfig, **options) -> nn.Module:
    """Patch ``model`` in place to run ``method`` ("evo", "idle", "evit", "topk" or a config object); returns it.

    Options are the config's fields (``apply(model, "evo", keep=0.5, mode="layer")``). Re-applying replaces the
    previous method. No parameters or buffers are added, so ``state_dict`` keys stay those of the plain model.
    """
    config = make_config(method, **options)
    target = patched_model(model)
    family = adapter_for(target)
    policy = make_policy(config, family)  # validates method, score and layer indices against this model
    family.anatomy()  # now, not in the first forward (a compiled model would compile twice)
    remove(target)
    original = type(target)
    patched = ("forward_features", "forward") if family.owns_forward else ("forward_features",)
    masks = {name: frozenset(p.name for p in _signature(getattr(original, name))[1]).intersection(
        _MASKS + _NAFLEX_INPUT) for name in patched}
    target.__dict__[_ATTR] = Patch(config=policy.config, policy=policy, adapter=family, original_class=original,
                                   call_masks=masks)
    target.__class__ = _patched_class(original, family.owns_forward)
    return model


def remove(model: nn.Module) -> nn.Module:
    """Undo :func:`apply`: the model's own class and forward come back; a model that is not patched is returned as is."""
    target = _unwrapped(model)
    patch = target.__dict__.pop(_ATTR, None)
    if patch is not None:
        target.__class__ = patch.original_class
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

    Counted analytically from the per-block token counts the method reports: patch embedding, every linear layer
    and attention product, the scoring work, and the head. ``img_size`` overrides the model's own; a size the model
    cannot run (a fixed-size model, sides not a multiple of the patch) gives a ValueError naming why.
    """
    patch = get_patch(model)
    family = patch.adapter if patch is not None else adapter_for(patched_model(model))
    if img_size is not None:  # count only what the model can run
        size = parse_img_size(img_size)
        problem = family.size_problem(size)
        if problem is not None:
            kind = patch.original_class if patch is not None else type(patched_model(model))
            raise ValueError(f"macs(img_size={img_size!r}): {kind.__name__} cannot run "
                             f"{size[0]}x{size[1]} inputs: {problem}")
    works = patch.policy.work(family.group_counts(img_size)) if patch is not None else None
    return family.count_macs(works, img_size)
