"""The time budget of a search: what is left, what the next step will cost (from the dense model's measured time
per image, corrected by how far earlier estimates were off), and a progress bar with the time left."""
from __future__ import annotations

import sys
import time
from typing import Callable

from tqdm import tqdm


SAFETY = 1.2  # a step is started only when 1.2x its estimate fits in what is left


class Deadline:
    """Seconds spent and left of ``budget_s``, read from ``clock`` (time.monotonic; tests pass their own)."""

    def __init__(self, budget_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.budget_s, self.clock = budget_s, clock
        self.start = clock()
        self.image_s: float | None = None  # the dense model's seconds per image at the search's batch size
        self.correction = 1.0  # measured / estimated seconds of the steps so far

    def elapsed(self) -> float:
        return self.clock() - self.start

    def left(self) -> float:
        return self.budget_s - self.elapsed()

    def fits(self, seconds: float) -> bool:
        """Whether a step estimated at ``seconds`` ends within the budget, with a margin for a machine whose speed
        changes under other jobs."""
        return seconds * SAFETY <= self.left()

    def forwards(self, images: float) -> float:
        """Estimated seconds for ``images`` dense-equivalent image forwards."""
        return images * (self.image_s or 0.0) * self.correction

    def timed(self, estimate_s: float):
        """A context that runs one step and folds how long it really took into later estimates."""
        return _Timed(self, estimate_s)


class _Timed:
    def __init__(self, deadline: Deadline, estimate_s: float) -> None:
        self.deadline, self.estimate_s = deadline, estimate_s

    def __enter__(self):
        self.began = self.deadline.clock()
        return self

    def __exit__(self, *exc) -> None:
        took = self.deadline.clock() - self.began
        if self.estimate_s > 0 and exc[0] is None:
            raw = self.estimate_s / self.deadline.correction
            ratio = took / raw if raw > 0 else 1.0
            # a slower step raises the estimates at once, a faster one lowers them halfway: over budget is worse
            self.deadline.correction = max(ratio, 0.5 * self.deadline.correction + 0.5 * ratio)


class Progress:
    """A tqdm bar counted in estimated seconds of work, so its rate and time left follow the estimates' accuracy;
    the plan is re-estimated as the search prunes. Writes to stderr; ``enabled=False`` shows nothing."""

    def __init__(self, enabled: bool, budget_s: float) -> None:
        self.bar = tqdm(total=1.0, disable=not enabled, file=sys.stderr, dynamic_ncols=True, leave=True,
                        desc=f"tune (budget {format_duration(budget_s)})",
                        bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}<{remaining} {postfix}")

    def plan(self, remaining_s: float) -> None:
        self.bar.total = max(self.bar.n + max(remaining_s, 0.0), 1e-9)
        self.bar.refresh()

    def advance(self, estimated_s: float, status: str) -> None:
        self.bar.set_postfix_str(status, refresh=False)
        self.bar.update(estimated_s)

    def say(self, status: str) -> None:
        self.bar.set_postfix_str(status)

    def close(self) -> None:
        self.bar.n = self.bar.total
        self.bar.close()


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s" if seconds else f"{minutes}m"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"

