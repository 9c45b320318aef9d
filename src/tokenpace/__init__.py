"""tokenpace: give each ViT token the pace it deserves (Evo-ViT, IdleViT, and the EViT / top-k baselines).

    import timm, tokenpace
    model = timm.create_model("deit_small_patch16_224")
    tokenpace.apply(model, "evo", keep=0.5)
    with tokenpace.trace(model) as tr:
        model(x)
    tokenpace.macs(model)
    tokenpace.remove(model)

The API is imported on first use, so that ``tokenpace --help`` and the CLI's argument errors do not wait for torch
and timm. tokenpace's models (``evo_levit_*``, ``levit_cifar``) are registered with timm by ``import
tokenpace.archs``, which the API and the CLI do for you; ``import timm, tokenpace`` (timm first) registers them at
once.
"""
from __future__ import annotations

import importlib
import sys

__version__ = "0.1.0"

_API = {
    "METHODS": "methods", "EViT": "methods", "Evo": "methods", "Idle": "methods", "MethodConfig": "methods",
    "TopK": "methods", "make_config": "methods",
    "Trace": "patch", "apply": "patch", "get_patch": "patch", "macs": "patch", "remove": "patch", "trace": "patch",
    "supported_methods": "patch",
    "TokenpaceError": "errors",
    "load_config": "config_io", "save_config": "config_io",
}

__all__ = sorted(_API)


def __getattr__(name: str):
    if name not in _API:  # a submodule (tokenpace.families, tokenpace.train, ...) the caller has not imported
        try:
            return importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as err:
            if err.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module 'tokenpace' has no attribute {name!r}") from None
    if _API[name] != "errors":
        importlib.import_module(".archs", __name__)  # the API's users expect tokenpace's models in timm's registry
    value = getattr(importlib.import_module(f".{_API[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))


if "timm" in sys.modules:  # timm is loaded already: registering tokenpace's models costs nothing more
    importlib.import_module(".archs", __name__)
