"""Method configurations as small JSON files: ``{"method": "idle", "options": {"keep": 0.7, ...}, ...extra}``.

``tokenpace convert`` writes one beside the weights it converts (extra: the model and its arguments); the CLI reads
it with ``--config`` or as a checkpoint's sibling (``W.safetensors`` -> ``W.json``); ``load_config`` gives the
``MethodConfig`` that ``tokenpace.apply`` takes.
"""
from __future__ import annotations

import json
import os
from dataclasses import fields
from typing import Any

from .errors import TokenpaceError

RESERVED = ("method", "options")


def config_path_for(weights_path: str) -> str:
    """The configuration beside a weights file: ``W.safetensors`` -> ``W.json``."""
    return os.path.splitext(weights_path)[0] + ".json"


def config_options(config) -> dict[str, Any]:
    """A config's fields as JSON-ready data (tuples become lists)."""
    return {f.name: list(v) if isinstance(v, tuple) else v
            for f in fields(config) for v in [getattr(config, f.name)]}


def config_from(method: str, options: dict[str, Any]):
    """The config of ``method`` with ``options`` (lists from JSON turned back into tuples); ValueError naming the
    method's accepted options when one does not fit."""
    from .methods import make_config

    return make_config(method, **{k: tuple(v) if isinstance(v, list) else v for k, v in options.items()})


def save_config(config, path: str, **extra: Any) -> None:
    """Write ``config`` (a MethodConfig) to ``path`` as JSON, with ``extra`` top-level entries (e.g. ``model``),
    atomically."""
    clash = [k for k in extra if k in RESERVED]
    if clash:
        raise ValueError(f"extra entries may not be named {', '.join(RESERVED)}; got {', '.join(clash)}")
    document = {"method": config.name, "options": config_options(config), **extra}
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            json.dump(document, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_config_document(path: str) -> dict[str, Any]:
    """The whole JSON document at ``path`` (extra entries included), checked to name a method and its options."""
    if not os.path.isfile(path):
        raise TokenpaceError(f"method configuration {path!r} does not exist")
    try:
        with open(path) as f:
            document = json.load(f)
    except (OSError, ValueError) as err:
        raise TokenpaceError(f"method configuration {path!r} is not readable JSON ({type(err).__name__}: "
                             f"{err})") from None
    if (not isinstance(document, dict) or not isinstance(document.get("method"), str)
            or not isinstance(document.get("options", {}), dict)):
        raise TokenpaceError(f"method configuration {path!r} must be a JSON object "
                             '{"method": NAME, "options": {...}}')
    return document


def load_config(path: str):
    """The MethodConfig saved at ``path`` by :func:`save_config` (``tokenpace convert`` writes one)."""
    document = read_config_document(path)
    try:
        return config_from(document["method"], document.get("options", {}))
    except (ValueError, TypeError) as err:
        raise TokenpaceError(f"method configuration {path!r}: {err}") from None
