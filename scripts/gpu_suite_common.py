"""Pieces every section of the GPU suite shares: the clock, deadlines, the progress log and incremental JSON files.

The suite runs once, on a short machine loan, so each piece is built to fail soft: deadlines are checked by the
code itself, a SIGALRM backstop interrupts what does not check (a long torch.compile), and every file is written
atomically after each step so a kill still leaves the results so far.
"""
from __future__ import annotations

import json
import math
import os
import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass


class DeadlineReached(RuntimeError):
    """Raised where a section's deadline has passed (by the section's own checks or by the alarm backstop)."""


@dataclass(frozen=True)
class Deadline:
    """An absolute point on time.perf_counter's clock."""

    at: float

    @classmethod
    def after(cls, seconds: float) -> "Deadline":
        return cls(time.perf_counter() + seconds)

    def remaining(self) -> float:
        return self.at - time.perf_counter()

    def expired(self) -> bool:
        return self.remaining() <= 0

    def check(self, what: str) -> None:
        if self.expired():
            raise DeadlineReached(f"deadline reached during {what}")

    def earlier(self, other: "Deadline") -> "Deadline":
        return self if self.at <= other.at else other


class Log:
    """Timestamped progress lines, printed and appended to a file as they happen."""

    def __init__(self, path: str, start: float) -> None:
        self.path = path
        self.start = start

    def __call__(self, message: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')} +{time.perf_counter() - self.start:6.1f}s] {message}"
        print(line, flush=True)
        with open(self.path, "a") as f:
            f.write(line + "\n")


def number_cell(value, digits: int = 2, suffix: str = "") -> str:
    """A number for a log line or a table cell: ``digits`` decimals and ``suffix``, or "-" where it is None."""
    return "-" if value is None else f"{value:.{digits}f}{suffix}"


def _finite(value):
    """JSON has no NaN or infinity: such numbers become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def write_json(path: str, doc: dict) -> None:
    """Write atomically, so a kill in the middle leaves the previous complete file."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(_finite(doc), f, indent=1)
    os.replace(tmp, path)


@contextmanager
def alarm_at(deadline: Deadline, grace_s: float):
    """Backstop: raise DeadlineReached in the main thread ``grace_s`` after ``deadline``, interrupting code that
    does not check the deadline itself (a compilation, a stuck loop). No-op where SIGALRM does not exist."""
    if not hasattr(signal, "SIGALRM"):
        yield
        return

    def fire(signum, frame):
        raise DeadlineReached(f"hard limit: {grace_s:.0f} s past the section's deadline")

    previous = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, max(deadline.remaining() + grace_s, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
