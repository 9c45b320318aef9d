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
    """A tqdm bar in percent of the estimated seconds of work, so its rate and time left follow the estimates'
    accuracy; the plan is re-estimated as the search prunes, and the percentage shown never goes back (a plan that
    grows holds it until the work catches up). Writes to stderr; ``enabled=False`` shows nothing. Where stderr is not
    a terminal (a log file), each status is one plain line instead of carriage-return redraws."""

    def __init__(self, enabled: bool, budget_s: float, stream=None) -> None:
        self.stream = stream or sys.stderr
        self.lines = enabled and not (hasattr(self.stream, "isatty") and self.stream.isatty())
        self.bar = tqdm(total=100.0, disable=not enabled or self.lines, file=self.stream, dynamic_ncols=True,
                        leave=True, desc=f"tune (budget {format_duration(budget_s)})",
                        bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}<{remaining} {postfix}")
        self.done_s, self.total_s, self.shown, self.start = 0.0, 1.0, 0.0, time.perf_counter()

    def plan(self, remaining_s: float) -> None:
        self.total_s = max(self.done_s + max(remaining_s, 0.0), 1e-9)
        self._show()

    def advance(self, estimated_s: float, status: str) -> None:
        self.done_s += estimated_s
        self.bar.set_postfix_str(status, refresh=False)
        self._show()
        self._line(status)

    def say(self, status: str) -> None:
        self.bar.set_postfix_str(status)
        self._line(status)

    def _show(self) -> None:
        self.shown = max(self.shown, min(100.0, 100.0 * self.done_s / self.total_s))
        self.bar.n = self.shown
        self.bar.refresh()

    def _line(self, status: str) -> None:
        if self.lines:
            print(f"tune: {self.shown:3.0f}% after {format_duration(time.perf_counter() - self.start)}: {status}",
                  file=self.stream, flush=True)

    def close(self) -> None:
        self.done_s = self.total_s
        self._show()
        self.bar.close()
        self._line("done")


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s" if seconds else f"{minutes}m"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"

