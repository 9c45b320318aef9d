"""Method configurations as JSON files: ``{"method": "evo", "options": {"keep": 0.5, ...}, ...extra}``.

``tokenpace tune`` writes its choice this way (the extra keys record the model and what was measured), ``tokenpace
convert`` writes one beside the weights it converts (``W.safetensors`` -> ``W.json``), and
``tokenpace.apply(model, tokenpace.load_config(path))`` or the CLI's ``--config`` runs it."""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from .errors import TokenpaceError, user_input
from .methods import METHODS, MethodConfig, make_config
from .outputs import write_atomically, written_path

RESERVED = ("method", "options")


def config_path_for(weights_path: str) -> str:
    """The configuration beside a weights file: ``W.safetensors`` -> ``W.json``."""
    return os.path.splitext(weights_path)[0] + ".json"


def config_options(config: MethodConfig) -> dict[str, Any]:
    """A config's fields as JSON-ready data (tuples become lists)."""
    return {f.name: _json_ready(getattr(config, f.name)) for f in dataclasses.fields(config)}


def config_from(method: str, options: dict[str, Any]) -> MethodConfig:
    """The config of ``method`` with JSON ``options`` (lists turned back into tuples); ValueError naming the
    method's accepted options when one does not fit."""
    return make_config(method, **{k: tuple(v) if isinstance(v, list) else v for k, v in options.items()})


def save_config(config: MethodConfig, path: str, **extra: Any) -> None:
    """Write ``config`` (every field) and the JSON-ready ``extra`` entries to ``path``, atomically."""
    if not isinstance(config, MethodConfig):
        raise TypeError(f"save_config takes a method config (tokenpace.Evo(...), Idle, EViT, TopK, or a patched "
                        f"model's tokenpace.get_patch(model).config); got {type(config).__name__}")
    folder = os.path.dirname(written_path(path))
    if not os.path.isdir(folder):
        raise TokenpaceError(f"configuration file {path!r}: folder {folder!r} does not exist")
    clash = [k for k in extra if k in RESERVED]
    if clash:
        raise ValueError(f"extra entries may not be named {', '.join(RESERVED)}; got {clash}")
    document = {"method": config.name, "options": config_options(config), **extra}
    try:  # an entry JSON cannot hold fails here, before any file is written
        text = json.dumps(document, indent=2, allow_nan=False) + "\n"
    except (TypeError, ValueError) as err:
        raise ValueError(f"save_config: the entries must be JSON data (numbers, strings, lists, dicts); {err}") \
            from None
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)

    write_atomically(path, write)


def load_config(path: str, model=None, name: str | None = None) -> MethodConfig:
    """The method configuration a file written by :func:`save_config` names; TokenpaceError naming the problem
    for a missing or malformed file, an unknown method or option, or a value the method refuses. With ``model``
    (timm name ``name``, else the model's own record of it) it is checked as :func:`load_config_for` does: a file
    recorded for another model, or a configuration the model cannot run, is refused before ``apply``."""
    if model is not None:
        return load_config_for(path, model, name)
    if name is not None:
        raise TypeError("load_config: name= describes the model; pass the model too (load_config(path, model, name))")
    return config_of(read_document(path), path)


def read_document(path: str) -> dict:
    """The JSON object of a configuration file, with its ``method`` and ``options`` entries checked for shape."""
    if os.path.isdir(path):
        raise TokenpaceError(f"configuration file {path!r} is a folder; accepted: a JSON file (a tune folder's is "
                             f"{os.path.join(path, 'tokenpace.json')!r})")
    if not os.path.isfile(path):
        raise TokenpaceError(f"configuration file {path!r} does not exist")
    try:
        with open(path) as f:
            document = json.load(f)
    except (ValueError, UnicodeDecodeError) as err:
        raise TokenpaceError(f"configuration file {path!r} is not JSON ({err})") from None
    if not isinstance(document, dict) or not isinstance(document.get("method"), str):
        raise TokenpaceError(f"configuration file {path!r} must hold an object with a \"method\" name and "
                             "\"options\", e.g. {\"method\": \"evo\", \"options\": {\"keep\": 0.5}}")
    if not isinstance(document.get("options", {}), dict):
        raise TokenpaceError(f"configuration file {path!r}: \"options\" must be an object of field: value")
    return document


def config_of(document: dict, path: str) -> MethodConfig:
    """The configuration a checked document names; TokenpaceError naming the file for an unknown method or option."""
    name = document["method"]
    if name not in METHODS:
        raise TokenpaceError(f"configuration file {path!r} names an unknown method {name!r}; accepted: "
                             f"{', '.join(sorted(METHODS))}")
    with user_input(f"configuration file {path!r}: "):
        return config_from(name, document.get("options", {}))


def _json_ready(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def model_record(model, name: str | None = None) -> dict:
    """What a configuration file records about the model it was made for: the timm name (``name``, else the
    model's own record of it), depth and input size. :func:`load_config_for` compares them."""
    from .families import adapter_for
    from .patch import patched_model

    model = patched_model(model)  # a features_only getter records the model it wraps
    family = adapter_for(model)
    name = name or (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
    return {"model": name, "depth": family.depth, "input_size": list(family.input_size())}


def _architecture(name) -> str | None:
    """A timm name as the architecture it builds, its pretrained tag dropped (``deit_small_patch16_224.fb_in1k``
    and a model's ``pretrained_cfg`` name the same model); None for names that say no architecture (hf-hub:...)."""
    from timm.models import parse_model_name, split_model_name_tag

    if not isinstance(name, str):
        return None
    source, name = parse_model_name(name)
    return split_model_name_tag(name)[0] if source is None else None


def load_config_for(path: str, model, name: str | None = None) -> MethodConfig:
    """:func:`load_config`, checked against ``model`` (timm name ``name``): a file recorded for another model
    (name, depth or input size) or a configuration the model's family cannot run gives a TokenpaceError."""
    from .families import adapter_for
    from .methods import make_policy
    from .patch import patched_model

    model = patched_model(model)
    document = read_document(path)
    config = config_of(document, path)
    here = model_record(model, name)
    recorded = {**document, "model": _architecture(document.get("model"))}
    current = {**here, "model": _architecture(here["model"])}
    differ = [key for key in ("model", "depth", "input_size")
              if recorded.get(key) is not None and current[key] is not None and recorded[key] != current[key]]
    if differ:
        def text(record):
            return ", ".join(f"{key} {record.get(key)}" for key in differ)

        raise TokenpaceError(f"configuration file {path!r} was made for another model ({text(document)}; this one "
                             f"has {text(here)}); run `tokenpace tune` on this model, or use the model it names")
    with user_input(f"configuration file {path!r} does not run on this model: "):
        make_policy(config, adapter_for(model))
    return config
