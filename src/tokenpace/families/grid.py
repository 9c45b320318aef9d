"""Pyramid families (Swin, PVTv2): stages of blocks on a token grid that shrinks between stages.

Idle tokens keep their features, so patch merging and down-sampling run unchanged on the full grid. Blocks are
numbered across stages (0..depth-1). A block that idles selects k tokens in each of its G groups of n tokens (G
windows in Swin, the whole map in PVTv2); the adapter owns the layout (rolls, windows, grids), the policy only sees
scores of shape (B, G, n) and indices (B, G, k).

``count_macs(policy, img_size)`` reads the plan from the policy: ``policy.keep_ratio(i)`` (None: block i runs
dense; else k = ``keep_count(n, ratio)`` per group, dense again when k == n) and ``policy.score`` (scoring cost).
"""
from __future__ import annotations

from abc import abstractmethod
from typing import Any

import torch

from .base import StagedAdapter


class GridAdapter(StagedAdapter):
    methods = ("idle",)
    scores = ("received", "norm", "random")

    @abstractmethod
    def enter_stage(self, s: int, x: torch.Tensor) -> torch.Tensor:
        """Stage s's down-sampling (patch merging, strided conv) on the full grid; identity where there is none."""

    @abstractmethod
    def block(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Block i on every token, exactly as the model runs it."""

    @abstractmethod
    def group_size(self, i: int, x: torch.Tensor) -> int:
        """Tokens per selection group in block i for input x (a window's tokens, or the whole map's)."""

    @abstractmethod
    def prepare(self, i: int, x: torch.Tensor) -> Any:
        """What scoring and the selected-token forward of block i share (e.g. normed tokens laid out in groups)."""

    @abstractmethod
    def score_shape(self, prep: Any) -> tuple[int, int, int]:
        """(B, G, n) of the scores for ``prep``."""

    @abstractmethod
    def token_scores(self, i: int, prep: Any, score: str) -> torch.Tensor:
        """Scores (B, G, n) of every token in its group by criterion ``score`` ("received" or "norm")."""

    @abstractmethod
    def run_selected(self, i: int, x: torch.Tensor, prep: Any, idx: torch.Tensor) -> torch.Tensor:
        """Block i on the tokens idx (B, G, k) of each group only; every other token passes through unchanged."""

    @abstractmethod
    def raster_positions(self, i: int, prep: Any, idx: torch.Tensor) -> torch.Tensor:
        """idx (B, G, k) as raster positions (B, G*k) in block i's grid (what ``trace`` reports)."""
