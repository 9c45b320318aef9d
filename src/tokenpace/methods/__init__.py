"""One small policy per method, each with its typed config."""
from __future__ import annotations

from dataclasses import fields, replace

from ..core.schedule import EmptySelection
from .base import ForwardState, MethodConfig, Policy
from .evit import EViT
from .evo import Evo
from .idle import Idle, IdleRecord
from .topk import TopK

METHODS: dict[str, type[MethodConfig]] = {cls.name: cls for cls in (Evo, Idle, EViT, TopK)}

__all__ = ["METHODS", "EViT", "Evo", "ForwardState", "Idle", "IdleRecord", "MethodConfig", "Policy", "TopK",
           "make_config", "make_policy", "methods_for"]


def make_config(method: str | MethodConfig, **options) -> MethodConfig:
    """A method config from a name and options (``make_config("idle", keep=0.5)``) or a config (options override)."""
    if isinstance(method, MethodConfig):
        cls, build = type(method), (lambda: replace(method, **options) if options else method)
    elif not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"unknown method {method!r}; accepted: {', '.join(sorted(METHODS))} "
                         f"(or a config object: {', '.join(c.__name__ for c in METHODS.values())})")
    else:
        cls = METHODS[method]
        build = lambda: cls(**options)  # noqa: E731
    try:
        return build()
    except TypeError as err:  # an unknown keyword: name the accepted ones
        accepted = [f.name for f in fields(cls)]
        raise ValueError(f"{cls.__name__} got an unknown option ({err}); accepted: {', '.join(accepted)}") from None


def methods_for(family) -> list[str]:
    """The methods that run on ``family`` with their defaults (a shallow model may leave no layer for one), in
    METHODS order."""
    return [name for name, cls in METHODS.items() if cls().refusal(family) is None and _runs_by_default(cls(), family)]


def _runs_by_default(config: MethodConfig, family) -> bool:
    try:
        config.resolved(family).policy(family)
    except ValueError:
        return False
    return True


def make_policy(config: MethodConfig, family) -> Policy:
    """The policy running ``config`` on ``family``; ValueError naming why and what runs there when it cannot."""
    reason = config.refusal(family)
    if reason is not None:
        accepted = ", ".join(map(repr, methods_for(family))) or "none"
        raise ValueError(f"method {config.name!r} is not available for {family.name} models ({reason}); "
                         f"accepted here: {accepted}")
    policy = config.resolved(family).policy(family)
    try:  # every block keeps a token at the model's own size (a forward at another size checks its own)
        policy.work(family.group_counts(None))
    except EmptySelection as err:
        raise EmptySelection(f"{policy.config.name} keep={policy.config.keep:g} on this {family.name} model: a block "
                         f"would run on no token: {err}; choose a larger keep") from None
    return policy
