"""tokenpace: give each ViT token the pace it deserves (Evo-ViT, IdleViT, and the EViT / top-k baselines).

    import timm, tokenpace
    model = timm.create_model("deit_small_patch16_224")
    tokenpace.apply(model, "evo", keep=0.5)
    with tokenpace.trace(model) as tr:
        model(x)
    tokenpace.macs(model)
    tokenpace.remove(model)
"""
from . import archs  # registers evo_levit_* and the CIFAR LeViTs with timm
from .methods import METHODS, EViT, Evo, Idle, MethodConfig, TopK, make_config
from .patch import Trace, apply, get_patch, macs, remove, supported_methods, trace

__version__ = "0.1.0"

__all__ = ["METHODS", "EViT", "Evo", "Idle", "MethodConfig", "TopK", "Trace", "apply", "get_patch", "macs",
           "make_config", "remove", "supported_methods", "trace"]
