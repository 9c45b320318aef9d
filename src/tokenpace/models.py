"""Building the model a command works on: a timm name with random, pretrained (hub or local cache) or local
weights, or a ``tokenpace train`` run folder (run.json + model.safetensors) with the method it was trained for."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .errors import TokenpaceError

if TYPE_CHECKING:
    from torch import nn

RUN_CONFIG = "run.json"
EXPORT = "model.safetensors"


class ModelSourceError(TokenpaceError):
    """The model or its weights cannot be built as asked (reported as one line by the CLI)."""


@dataclass(frozen=True)
class RunRecord:
    """What a training run folder (or a method configuration file) says about its model: timm name, create_model
    arguments, the method it was trained for (``{"name": "evo", "keep": 0.5, ...}``, None for dense) and its exported
    weights."""

    folder: str
    model: str | None
    model_args: dict = field(default_factory=dict)
    method: dict | None = None
    weights: str = ""
    kind: str = "run"  # "run": a training run folder; "configuration": a method configuration file (--config)

    def origin(self) -> str:
        """How messages name it: run 'runs/evo', configuration 'w.json'."""
        return f"{self.kind} {self.folder!r}"


def read_run(folder: str) -> RunRecord:
    """The record of a ``tokenpace train`` output folder; ModelSourceError when it is not one."""
    path = os.path.join(folder, RUN_CONFIG)
    if not os.path.isfile(path):
        raise ModelSourceError(f"run folder {folder!r} has no {RUN_CONFIG} (is it a `tokenpace train` output?)")
    try:
        with open(path) as f:
            desc = json.load(f)
        model, model_args = desc["model"], dict(desc.get("model_args") or {})
    except (ValueError, KeyError, TypeError) as err:
        raise ModelSourceError(f"{path} is not a readable run description ({type(err).__name__}: {err})") from None
    method = desc.get("method")
    if isinstance(desc.get("recipe"), dict):
        method = desc["recipe"].get("method")
    return RunRecord(folder=folder, model=model, model_args=model_args, method=method,
                     weights=os.path.join(folder, EXPORT))


def create_model(name: str, pretrained: bool = False, **kwargs) -> nn.Module:
    """``timm.create_model`` with one-line errors: an unknown name, arguments the model refuses, and pretrained
    weights that are neither in the local cache nor downloadable (found out in seconds when offline)."""
    import timm

    from . import archs  # noqa: F401  (tokenpace's own models in timm's registry)
    from .net import hub_host, hub_offline, hub_offline_requested, reachable

    if not isinstance(name, str) or not timm.is_model(name):
        raise ModelSourceError(f"unknown timm model {name!r}; e.g. deit_small_patch16_224, vit_base_patch16_224 "
                               "(see timm.list_models('deit*'))")
    offline = pretrained and (hub_offline_requested() or not reachable(hub_host()))

    def build(**given):
        if offline:
            with hub_offline():
                return timm.create_model(name, pretrained=True, **given)
        return timm.create_model(name, pretrained=pretrained, **given)

    try:
        try:
            model = build(**kwargs)
        except TypeError as err:
            if "img_size" not in kwargs or "'img_size'" not in str(err):
                raise
            # a model built for any input size (PVTv2) takes no img_size: the size is recorded below
            model = build(**{k: v for k, v in kwargs.items() if k != "img_size"})
    except (TypeError, ValueError, AssertionError) as err:  # arguments the model's constructor refuses
        raise ModelSourceError(f"model {name!r} cannot be built with {kwargs or 'its defaults'}: {err}") from None
    except OSError as err:
        if not offline:
            raise
        raise ModelSourceError(f"the pretrained weights of {name!r} are not in the local cache and {hub_host()} "
                               "cannot be reached (offline?); download them once online, or pass --checkpoint "
                               f"FILE ({type(err).__name__})") from None
    return _recorded_size(model, name, kwargs.get("img_size"))


def _recorded_size(model: nn.Module, name: str, img_size) -> nn.Module:
    """``model``, with ``img_size`` recorded in its pretrained_cfg where the model keeps no size of its own: it
    takes no img_size (PVTv2), or drops it (timm's NaFlexVit, when its config sets a position grid) and runs any
    size. Bench, MACs and the data transforms then use the size asked for; a size the model cannot run is refused
    (ModelSourceError) instead of silently replaced by its pretrained one."""
    from .families import adapter_for
    from .families.base import parse_img_size
    from .patch import patched_model

    if img_size is None:
        return model
    try:
        target = patched_model(model)  # a features_only wrapper records on the model it wraps
        family = adapter_for(target)
    except TypeError:  # not a model tokenpace runs: what it was built with is the caller's business
        return model
    hw = parse_img_size(img_size)
    chans, *own = family.input_size()
    if tuple(own) == hw:
        return model
    problem = family.size_problem(hw)
    if problem is not None:
        raise ModelSourceError(f"model {name!r} cannot run {hw[0]}x{hw[1]} inputs (img_size={img_size!r}): {problem}")
    target.pretrained_cfg = target.default_cfg = {**(getattr(target, "pretrained_cfg", None) or {}),
                                                  "input_size": (chans, *hw)}
    return model


def build_model(name: str | None = None, *, checkpoint: str | None = None, run: str | None = None,
                pretrained: bool = False, model_args: dict | None = None) -> nn.Module:
    """A timm model: ``run`` (a ``tokenpace train`` output folder) or ``name`` with ``model_args``, random weights,
    ``pretrained`` (hub or local cache) or a local ``checkpoint`` (which also overrides a run's weights).
    Unpatched, eval mode."""
    from .weights import load_weights

    kwargs = dict(model_args or {})
    if pretrained and (checkpoint is not None or run is not None):
        raise ModelSourceError("--pretrained and --checkpoint/--run both give the weights; choose one")
    if run is not None:
        record = read_run(run)
        if name is not None and name != record.model:
            raise ModelSourceError(f"--model {name} differs from the model of run {run!r} ({record.model}); "
                                   "drop --model (the run's model is used)")
        name, kwargs = record.model, {**record.model_args, **kwargs}
        checkpoint = checkpoint or record.weights
        if not os.path.isfile(checkpoint):
            raise ModelSourceError(f"run folder {run!r} has no {EXPORT} yet (training not finished?)")
    model = create_model(name, pretrained=pretrained, **kwargs)
    if checkpoint is not None:
        load_weights(model, checkpoint)
    return model.eval()
