"""Shared pieces of the method configs and their policies."""
from __future__ import annotations

import numbers
from dataclasses import dataclass, field, replace
from typing import Any, Callable, ClassVar

import torch
from torch.utils.checkpoint import checkpoint

from ..anatomy import Frame
from ..blockops import run_block
from ..core.macs import BlockWork, ScoreWork
from ..core.scores import random_scores
from ..families.base import SCORES, SEQUENCE, Family


def check_keep(config: Any, name: str, attr: str = "keep") -> None:
    """Validate a keep ratio and store it as a float (numpy and other real scalars are accepted); None: the
    default (the model's, else the method's), filled in when the method is applied."""
    keep = getattr(config, attr)
    if keep is None and attr == "keep":
        return
    if isinstance(keep, bool) or not isinstance(keep, numbers.Real) or not 0.0 < float(keep) <= 1.0:
        raise ValueError(f"{name} must be a number in (0, 1] (the fraction of patch tokens kept); got {keep!r}")
    object.__setattr__(config, attr, _as_float(keep))


def _as_float(value: numbers.Real) -> float:
    """A real number as a Python float; a narrower float (numpy float32, e.g. from a float32 sweep) as the shortest
    decimal it stands for, so np.float32(0.7) is 0.7 in configs, records and JSON, not 0.699999988079071."""
    if getattr(getattr(value, "dtype", None), "itemsize", 8) < 8:
        return float(str(value))
    return float(value)


def check_choice(name: str, value: Any, accepted: tuple[str, ...], optional: bool = False) -> None:
    if not (optional and value is None) and value not in accepted:
        raise ValueError(f"{name}={value!r} is not accepted; choose one of {', '.join(map(repr, accepted))}")


def check_layers(config: Any, name: str, attr: str) -> None:
    """Layer indices: None (the default), one int, or a tuple/list of ints; stored as a tuple."""
    layers = getattr(config, attr)
    if layers is None:
        return
    if isinstance(layers, numbers.Integral) and not isinstance(layers, bool):
        layers = (layers,)
    if (not isinstance(layers, (tuple, list))
            or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in layers)):
        raise ValueError(f"{name} must be layer indices (an int or a tuple of ints) or None for the default; "
                         f"got {layers!r}")
    object.__setattr__(config, attr, tuple(int(v) for v in layers))


@dataclass
class ForwardState:
    """Everything one forward pass carries between blocks (created per call; never module-level globals)."""

    frame: Frame | None = None  # the family's per-forward position data
    training: bool = False  # the model is in training mode: keep what training losses need
    checkpoint: bool = False  # recompute each block in the backward pass (the model's gradient checkpointing)
    kept: list[torch.Tensor | None] | None = None  # per block: original patch indices on the full path (trace)
    records: list[Any] = field(default_factory=list)  # what training losses need (e.g. IdleViT's cut loss)
    taps: frozenset[int] = frozenset()  # blocks after which the full token map is wanted (forward_intermediates)
    stop_after: int | None = None  # the last block needed (forward_intermediates' stop_early)
    maps: dict[int, torch.Tensor] = field(default_factory=dict)  # block -> the full token map after it

    def record_kept(self, layer: int, patch_idx: torch.Tensor | None) -> None:
        if self.kept is not None:
            self.kept[layer] = patch_idx

    def tap(self, block: int, full_map: Callable[[], torch.Tensor]) -> None:
        """After ``block``: keep the full token map where it was asked for (a copy: later blocks may write their
        tokens in place), and end the forward after the last block asked for when stopping early."""
        if block in self.taps:
            self.maps[block] = full_map().clone()
        if block == self.stop_after:
            raise StopForward(self.maps[block] if block in self.maps else full_map().clone())


class StopForward(Exception):
    """Raised after the last block a ``stop_early`` forward needs, carrying the full token map at that point."""

    def __init__(self, tokens: torch.Tensor) -> None:
        super().__init__("stop early")
        self.tokens = tokens


@dataclass(frozen=True)
class MethodConfig:
    """Base of the typed method configs; subclasses validate in ``__post_init__``.

    ``layouts`` are the family layouts the method runs on, ``scores`` the ranking criteria it knows (the first one
    a family offers is its default)."""

    name: ClassVar[str] = "?"
    layouts: ClassVar[tuple[str, ...]] = (SEQUENCE,)
    scores: ClassVar[tuple[str, ...]] = SCORES
    default_keep: ClassVar[float] = 0.5

    def resolved(self, family: Family) -> "MethodConfig":
        """This config with the fields left at None filled in: first what the model asks for
        (``defaults.model_defaults``), then the method's own keep."""
        filled = {k: v for k, v in family.model_defaults(self.name).items() if getattr(self, k, 0) is None}
        config = replace(self, **filled) if filled else self
        return replace(config, keep=self.default_keep) if config.keep is None else config

    def refusal(self, family: Family) -> str | None:
        """Why this method cannot run on ``family`` (None: it can)."""
        if family.layout not in self.layouts:
            return f"it needs a {' or '.join(self.layouts)} layout and {family.name} models are {family.layout}"
        if all(s == "random" for s in available_scores(self, family)):  # a control needs a criterion to control
            ranked = " or ".join(repr(s) for s in self.scores if s != "random")
            return (f"it ranks tokens by {ranked}, and {family.name} models offer "
                    f"{', '.join(map(repr, family.scores()))}")
        return None

    def policy(self, family: Family) -> "Policy":
        raise NotImplementedError


class Policy:
    """Runs the block loop for one method on one model, through its family."""

    def __init__(self, config: MethodConfig, family: Family) -> None:
        self.config = config
        self.family = family
        self.depth = family.depth
        self.prefix = family.num_prefix
        self.score = resolve_score(config, family)

    def run(self, x: torch.Tensor, state: ForwardState) -> torch.Tensor:
        raise NotImplementedError

    def work(self, counts) -> list[BlockWork]:
        """Per block, what it computes for these selection groups (``Family.group_counts``), for MACs."""
        raise NotImplementedError

    def rank(self, scores: torch.Tensor) -> torch.Tensor:
        """Patch-token scores used for ranking: the family's scores, or random ones as a control."""
        return random_scores(scores) if self.score == "random" else scores

    def row_query(self) -> str:
        """The attention row that stands for this method's score while a block runs (the random control still
        computes its family's default row, which may weight tokens)."""
        score = self.score if self.score != "random" else default_score(self.config, self.family)
        return "cls" if score == "cls" else self.family.received_row

    def row_keys(self, keys: int) -> int:
        """MACs-relevant keys of a score row: one extra query row, except where the row comes from the explicit
        probabilities the attention computes anyway ("columns")."""
        return 0 if self.row_query() == "columns" else keys

    def score_work(self, tokens: int, project_keys: bool = False) -> ScoreWork:
        query = {"cls": "cls", "received": "mean"}.get(self.score, self.score)
        return ScoreWork(query, tokens, project_keys)

    def run_on(self, i: int, x: torch.Tensor, where, state: "ForwardState") -> torch.Tensor:
        """Block i on the tokens ``where`` describes: the model's own block where every token is present or the
        blocks have no position terms, else the block's anatomy with its position terms taken at ``where``."""
        if where.pos is None or not self.family.blocks_use_positions:
            return self.step(state, self.family.block, i, x, state.frame)
        return self.step(state, run_block, self.family.parts(i), x, where)[0]

    @staticmethod
    def step(state: "ForwardState", fn: Callable, *args, **kwargs):
        """``fn(*args, **kwargs)``: one block's computation, recomputed in the backward pass when the model asks for
        gradient checkpointing (activations inside the block are not kept)."""
        if state.checkpoint and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False, **kwargs)
        return fn(*args, **kwargs)


def available_scores(config: MethodConfig, family: Family) -> tuple[str, ...]:
    offered = family.scores()
    return tuple(s for s in config.scores if s in offered)


def default_score(config: MethodConfig, family: Family) -> str:
    return next(s for s in available_scores(config, family) if s != "random")


def resolve_score(config: MethodConfig, family: Family) -> str:
    """The ranking criterion a method uses on a family: its ``score`` or the default, checked against both."""
    accepted = available_scores(config, family)
    score = getattr(config, "score", None)
    score = default_score(config, family) if score is None else score
    if score not in accepted:
        raise ValueError(f"{config.name} score={score!r} is not available for {family.name} models; "
                         f"accepted here: {', '.join(map(repr, accepted))}")
    return score
