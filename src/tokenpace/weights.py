"""Weights files in and out: timm's checkpoint reader (safetensors, ``state_dict``/``model`` entries, ``module.``
and ``_orig_mod.`` prefixes), tensors only (``weights_only=True``), and errors that name the keys that do not fit."""
from __future__ import annotations

import argparse
import hashlib
import os

import torch
from torch import nn

from .errors import TokenpaceError
from .outputs import write_atomically

SHOWN_KEYS = 4  # keys named per kind of mismatch in an error message


def read_state_dict(path: str, use_ema: bool = False) -> dict[str, torch.Tensor]:
    """The state dict in ``path`` (.safetensors, or a torch checkpoint holding one, with or without DDP/compile
    prefixes); ``use_ema`` takes timm's EMA entry where there is one. TokenpaceError for a missing, empty,
    truncated or foreign file."""
    from timm.models import load_state_dict

    if os.path.isdir(path):
        raise TokenpaceError(f"checkpoint {path!r} is a folder; accepted: a .safetensors or torch checkpoint file "
                             "(a training run's folder holds model.safetensors)")
    if not os.path.isfile(path):
        raise TokenpaceError(f"checkpoint {path!r} does not exist")
    if os.path.getsize(path) == 0:
        raise TokenpaceError(f"checkpoint {path!r} is an empty file")
    try:
        # timm's training checkpoints also hold the run's arguments (an argparse.Namespace, plain data)
        with torch.serialization.safe_globals([argparse.Namespace]):
            state = load_state_dict(path, use_ema=use_ema, weights_only=True)
    except Exception as err:  # truncated zip/pickle, a safetensors header cut short, a pickled foreign object
        first = (str(err).strip().splitlines() or [""])[0][:160]
        raise TokenpaceError(f"checkpoint {path!r} cannot be read as a .safetensors or torch checkpoint "
                             f"(truncated or another format?): {type(err).__name__}: {first}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise TokenpaceError(f"checkpoint {path!r} holds no state dict of tensors (keys tried: state_dict, model, "
                             "or the file itself)")
    return state


def load_weights(model: nn.Module, path: str, use_ema: bool = False, new_head: tuple[str, ...] = ()) -> list[str]:
    """Load ``path`` into ``model``, strictly; the error names the missing, unexpected and mismatching keys.
    ``new_head``: module names of the classifier (timm's ``pretrained_cfg["classifier"]``) whose weights may be of
    another shape (another class count, as when fine-tuning): those stay at the model's initialisation, as timm
    does for pretrained weights. Returns the keys left so."""
    state = read_state_dict(path, use_ema)
    expected = model.state_dict()
    left = [k for k in expected if k in state and state[k].shape != expected[k].shape
            and any(k.startswith(f"{name}.") for name in new_head)]
    state = {k: v for k, v in state.items() if k not in left}
    problem = mismatch({k: v for k, v in expected.items() if k not in left}, state)
    if problem:
        raise TokenpaceError(f"checkpoint {path!r} does not fit model {type(model).__name__}: {problem}")
    model.load_state_dict(state, strict=not left)
    return left


def classifier_names(model: nn.Module) -> tuple[str, ...]:
    """The classifier's module names timm records for the model (``pretrained_cfg["classifier"]``), or ()."""
    names = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or ()
    return (names,) if isinstance(names, str) else tuple(names)


def mismatch(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor]) -> str:
    """"" when ``found`` has exactly ``expected``'s keys and shapes; else which keys are missing, unexpected or
    of another shape (a few of each, with counts)."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    shapes = [f"{k} {tuple(found[k].shape)} vs model {tuple(expected[k].shape)}" for k in expected
              if k in found and found[k].shape != expected[k].shape]
    return key_problems(missing, unexpected, shapes)


def key_problems(missing: list[str], unexpected: list[str], shapes: list[str]) -> str:
    """One line naming a few keys of each kind of mismatch, with counts ("" when there is none)."""
    def named(keys: list[str]) -> str:
        more = f" and {len(keys) - SHOWN_KEYS} more" if len(keys) > SHOWN_KEYS else ""
        return ", ".join(keys[:SHOWN_KEYS]) + more

    parts = [f"{len(keys)} {label} ({named(keys)})" for label, keys in
             (("missing keys", missing), ("unexpected keys", unexpected), ("keys of another shape", shapes)) if keys]
    return "; ".join(parts)


def export_safetensors(model: nn.Module, path: str) -> None:
    """The model's weights with plain timm keys (no method state: a patched model adds none), written atomically."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    write_atomically(path, lambda tmp: save_file(state, tmp))


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
