"""The papers' released checkpoints: ``load_official(checkpoint, arch)`` builds the tokenpace / timm model the
official code's ``arch`` names, loads the file through its layout's key map (``layouts.py``) and patches the model
with the method and keep ratio the checkpoint was trained for; ``convert`` writes it as plain timm / tokenpace keys
(``.safetensors``) with the method configuration beside it (``.json``, ``tokenpace.load_config`` reads it).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any

from ..errors import TokenpaceError, user_input
from .layouts import EVO_DEIT, EVO_LEVIT, TIMM, Layout, remap


@dataclass(frozen=True)
class OfficialArch:
    """One ``arch`` name of the official code: the model tokenpace builds for it, the checkpoint layout, and the
    method (with its default keep ratio) its checkpoints were trained for."""

    model: str
    layout: Layout
    method: str
    keep: float
    code: str  # whose code names it
    model_args: dict[str, Any] = field(default_factory=dict)


def _table() -> dict[str, OfficialArch]:
    table = {}
    for size in ("tiny", "small", "base"):
        for img in (224, 384):
            name = f"evo_deit_{size}_patch16_{img}"
            table[name] = OfficialArch(name, EVO_DEIT, "evo", 0.5, "Evo-ViT")
    for size in ("128S", "128", "192", "256", "384"):
        table[f"EvoLeViT_{size}"] = OfficialArch(f"evo_levit_{size.lower()}", EVO_LEVIT, "evo", 0.5, "Evo-ViT")
        table[f"EvoLeViT_{size}_384"] = OfficialArch(f"evo_levit_{size.lower()}", EVO_LEVIT, "evo", 0.5, "Evo-ViT",
                                                     {"img_size": 384})
    for name, model in (("deit_small", "deit_small_patch16_224"), ("deit_base", "deit_base_patch16_224")):
        table[name] = OfficialArch(model, TIMM, "idle", 0.7, "IdleViT")
    for name in ("lvvit_s", "lvvit_m"):
        # IdleViT evaluates every model with resize 256/224 and centre crop (idlevit.md §7), its LV-ViTs too; the
        # LV-ViT authors' own crop (0.9 / 1.0) is what lvvit_s / lvvit_m record otherwise
        table[name] = OfficialArch(name, TIMM, "idle", 0.7, "IdleViT", {"crop_pct": 0.875})
    return table


OFFICIAL_ARCHS: dict[str, OfficialArch] = _table()


def official_arch(arch: str) -> OfficialArch:
    if arch not in OFFICIAL_ARCHS:
        raise TokenpaceError(f"unknown official arch {arch!r}; accepted (the official code's names): "
                             f"{', '.join(OFFICIAL_ARCHS)}")
    return OFFICIAL_ARCHS[arch]


def official_state(checkpoint) -> tuple[dict, str]:
    """(state dict, a label for errors) of a path (.pth, .pth.tar, .safetensors) or a loaded dict, in the DeiT
    training format (``model``, ``optimizer``, ...; ``state_dict``) or bare; DDP / compile prefixes removed."""
    import torch
    from timm.models import clean_state_dict

    from ..weights import read_state_dict

    if isinstance(checkpoint, (str, os.PathLike)):
        return read_state_dict(os.fspath(checkpoint)), repr(os.fspath(checkpoint))
    if not isinstance(checkpoint, dict):
        raise TokenpaceError(f"checkpoint must be a file path or a loaded dict; got {type(checkpoint).__name__}")
    state = next((checkpoint[k] for k in ("state_dict", "model") if isinstance(checkpoint.get(k), dict)), checkpoint)
    if not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise TokenpaceError("the checkpoint dict holds no state dict of tensors (entries tried: state_dict, model, "
                             "or the dict itself)")
    return clean_state_dict(state), "(the given dict)"


# IdleViT's release names (idlevit_deit_small_ratio0.7.pth), also spelled ratio_0.7 / ratio-0.7 / Ratio0.7; a word
# that only ends in "ratio" (aspectratio1.33) is not one
_RATIO_IN_NAME = re.compile(r"(?<![a-z])ratio[_-]?(\d*\.\d+|\d+)", re.IGNORECASE)


def ratio_in_name(checkpoint) -> float | None:
    """The keep ratio a released file's name states (``..._ratio0.5.pth``: 0.5), or None (no path, no ratio)."""
    if not isinstance(checkpoint, (str, os.PathLike)):
        return None
    found = _RATIO_IN_NAME.search(os.path.basename(os.fspath(checkpoint)))
    return float(found.group(1)) if found else None


def checkpoint_keep(checkpoint, arch: str, keep: float | None = None) -> tuple[float, str]:
    """The keep ratio to run ``checkpoint`` at, and where it came from: ``keep`` when given, else the ratio the
    file name states (IdleViT's files carry it; a 0.5 file run at the default 0.7 would be silently off), else the
    arch's default."""
    spec = official_arch(arch)
    if keep is not None:
        return keep, "given"
    named = ratio_in_name(checkpoint)
    if named is not None and spec.method == "idle":
        return named, "the file name"
    return spec.keep, f"{spec.code}'s default"


def load_official(checkpoint, arch: str, keep: float | None = None):
    """A released checkpoint as a tokenpace-patched model in eval mode.

    ``arch`` is the official code's name: ``evo_deit_{tiny,small,base}_patch16_{224,384}`` and
    ``EvoLeViT_{128S,128,192,256,384}`` (``_384`` for 384 px) from Evo-ViT, run with Evo (keep 0.5);
    ``deit_small``, ``deit_base``, ``lvvit_s``, ``lvvit_m`` from IdleViT, run with Idle (``keep`` the checkpoint's
    ratio: the one a file name states as ``ratio0.X``, else 0.7; released files cover 0.9 to 0.5). Training-only
    heads are loaded and kept for fine-tuning.
    TokenpaceError for an unknown arch, or a file whose keys or shapes do not fit (naming them and the layout).
    """
    from ..methods import make_config
    from ..models import create_model
    from ..patch import apply

    spec = official_arch(arch)
    keep, origin = checkpoint_keep(checkpoint, arch, keep)
    where = " (the keep ratio its file name states)" if origin == "the file name" else ""
    with user_input(f"{arch}{where}: "):  # a bad keep is refused before anything is read
        config = make_config(spec.method, keep=keep)
    state, label = official_state(checkpoint)
    model = create_model(spec.model, **spec.model_args)
    model.load_state_dict(remap(spec.layout, model, state, label, arch), strict=True)
    return apply(model.eval(), config)


def convert(checkpoint, dst: str, arch: str, keep: float | None = None, overwrite: bool = False) -> str:
    """Write the released ``checkpoint`` as ``dst`` (.safetensors, plain timm / tokenpace keys) and its method
    configuration as the sibling ``.json`` (with the model name and arguments); returns the configuration's path.
    An existing ``dst`` or ``.json`` is replaced only with ``overwrite``; ``dst`` is never the checkpoint itself."""
    from ..config_io import config_path_for, save_config
    from ..patch import get_patch
    from ..weights import export_safetensors

    check_destination(checkpoint, dst, overwrite)  # before the checkpoint is read
    spec = official_arch(arch)
    model = load_official(checkpoint, arch, keep)
    export_safetensors(model, dst)
    path = config_path_for(dst)
    save_config(get_patch(model).config, path, model=spec.model, model_args=spec.model_args, official_arch=arch)
    return path


def check_destination(checkpoint, dst: str, overwrite: bool = False) -> None:
    """TokenpaceError unless ``dst`` and its configuration (``.json``) can be written: ``dst`` ends in
    .safetensors, its folder is there and writable, neither file is the checkpoint, and neither exists unless
    ``overwrite``."""
    from ..config_io import config_path_for
    from ..outputs import output_file_problem

    if not isinstance(overwrite, bool):
        raise TypeError(f"overwrite must be True or False; got {overwrite!r}")
    if not isinstance(dst, (str, os.PathLike)) or not os.fspath(dst).endswith(".safetensors"):
        raise TokenpaceError(f"the converted weights are written as safetensors; DST must end in .safetensors, got "
                             f"{dst!r}")
    dst = os.fspath(dst)
    outputs = (("DST", dst), ("DST's configuration", config_path_for(dst)))
    for what, path in outputs:
        problem = output_file_problem(path)
        if problem is not None:
            raise TokenpaceError(f"{what} {path!r} {problem}")
    if isinstance(checkpoint, (str, os.PathLike)):
        source = os.path.realpath(checkpoint)
        for what, path in outputs:  # even with overwrite: the release would be gone before it was read
            if os.path.realpath(path) == source or (os.path.exists(path) and os.path.exists(source)
                                                    and os.path.samefile(path, source)):
                raise TokenpaceError(f"{what} {path!r} is the checkpoint being converted; write the converted "
                                     "file to another path")
    existing = [(what, path) for what, path in outputs if os.path.lexists(path)]
    if existing and not overwrite:
        what, path = existing[0]
        raise TokenpaceError(f"{what} {path!r} already exists; pass overwrite=True (--overwrite on the command "
                             "line) to replace it, or choose another DST")


__all__ = ["OFFICIAL_ARCHS", "OfficialArch", "check_destination", "checkpoint_keep", "convert", "load_official",
           "official_arch", "official_state", "ratio_in_name"]
