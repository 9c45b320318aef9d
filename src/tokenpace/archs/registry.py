"""Registering tokenpace's architectures with timm under one module name, ``archs`` (what
``timm.list_models(module="archs")`` and ``tokenpace models`` find), whichever file defines them."""
from __future__ import annotations

from typing import Callable

from timm.models import register_model

# create_model passes these along to every model function; tokenpace's constructors do not take them
_TIMM_PLUMBING = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")


def without_plumbing(kwargs: dict) -> dict:
    return {k: v for k, v in kwargs.items() if k not in _TIMM_PLUMBING}


def register(name: str, fn: Callable) -> None:
    fn.__name__ = name
    fn.__module__ = "tokenpace.archs"
    register_model(fn)


def no_pretrained(name: str, pretrained: bool, where: str) -> None:
    """timm's ``pretrained=True`` cannot download anything for tokenpace's models: say where weights come from."""
    if pretrained:
        raise ValueError(f"{name} has no pretrained weights to download; use pretrained=False and {where}")
