"""Building the model a command works on: a timm name with random, hub or local weights, or a training run folder."""
from __future__ import annotations

import json
import os

from torch import nn


class ModelSourceError(ValueError):
    """The model or its weights cannot be built as asked (reported as one line by the CLI)."""


def build_model(name: str | None = None, *, checkpoint: str | None = None, run: str | None = None,
                pretrained: bool = False, model_args: dict | None = None) -> nn.Module:
    """A timm model: ``run`` (a ``tokenpace train`` output folder: run.json + model.safetensors) or ``name`` with
    ``model_args``, random weights, ``pretrained`` (the hub) or a local ``checkpoint``. Unpatched, eval mode."""
    import timm

    kwargs = dict(model_args or {})
    if run is not None:
        desc_path = os.path.join(run, "run.json")
        if not os.path.isfile(desc_path):
            raise ModelSourceError(f"run folder {run!r} has no run.json (is it a `tokenpace train` output?)")
        desc = json.load(open(desc_path))
        name, kwargs = desc["model"], {**desc["model_args"], **kwargs}
        checkpoint = checkpoint or os.path.join(run, "model.safetensors")
        if not os.path.isfile(checkpoint):
            raise ModelSourceError(f"run folder {run!r} has no model.safetensors yet (training not finished?)")
    if name is None or not timm.is_model(name):
        raise ModelSourceError(f"unknown timm model {name!r}; e.g. deit_small_patch16_224, vit_base_patch16_224 "
                               "(see timm.list_models('deit*'))")
    try:
        model = timm.create_model(name, pretrained=pretrained, **kwargs)
    except TypeError as err:
        raise ModelSourceError(f"model {name!r} does not accept these arguments: {err}") from None
    if checkpoint is not None:
        from .train.loop import TrainError, load_weights

        try:
            load_weights(model, checkpoint)
        except TrainError as err:
            raise ModelSourceError(str(err)) from None
    return model.eval()
