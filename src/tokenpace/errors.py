"""tokenpace's own exception for input it cannot use: the CLI prints it as one line (exit code 2), while every
other exception, an internal bug included, keeps its traceback. And notes: what a run should know but that does not
stop it, one line each on stderr."""
from __future__ import annotations

import contextlib
import re
import sys
from typing import Iterator


def note(message: str) -> None:
    """One line on stderr: ``tokenpace: note: message``."""
    print(f"tokenpace: note: {message}", file=sys.stderr, flush=True)


class TokenpaceError(ValueError):
    """A problem with what the user gave (a value, a file, a folder, an option): the message names it and what is
    accepted. A ValueError, so callers catching ValueError keep working."""

    def __init__(self, message: str = "") -> None:
        # a DataLoader worker re-raises this class with the worker's traceback wrapped around the message
        # ("Caught TokenpaceError in DataLoader worker process 0. Original Traceback ... TokenpaceError: msg"):
        # keep only the message, so the CLI still prints one line
        if "Original Traceback" in message:
            last = message.rstrip().splitlines()[-1]
            message = last.partition(f"{type(self).__name__}: ")[2] or last
        super().__init__(message)


@contextlib.contextmanager
def user_input(prefix: str = "") -> Iterator[None]:
    """Turn ValueError/TypeError raised while validating what the user asked for (method options, the model's
    family) into TokenpaceError. Wrap only calls whose errors are about that input, never whole commands."""
    try:
        yield
    except TokenpaceError:
        raise
    except (ValueError, TypeError) as err:
        raise TokenpaceError(f"{prefix}{err}") from None


_ASKED = re.compile(r"(?:tried to allocate|Tried to allocate)\s+([\d.]+\s*[KMGT]?i?B|\d+ bytes)")


def memory_error(err: BaseException, what: str) -> TokenpaceError | None:
    """A one-line TokenpaceError for an allocation that failed (CUDA out of memory, or the CPU allocator refusing),
    naming ``what`` was being run and the memory asked for; None when ``err`` is something else."""
    import torch

    text = str(err)
    if not (isinstance(err, torch.OutOfMemoryError)
            or (isinstance(err, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text))):
        return None
    found = _ASKED.search(text)
    asked = found.group(1) if found else "an unknown amount"
    if found and found.group(1).endswith(" bytes"):
        asked = f"{int(found.group(1).split()[0]) / 2**30:.1f} GiB"
    return TokenpaceError(f"{what} does not fit in memory: one allocation asked for {asked}; use a smaller "
                          "--batch-size")


@contextlib.contextmanager
def memory_guard(what: str) -> Iterator[None]:
    """Turn an allocation failure inside the block into a one-line TokenpaceError naming ``what`` was run."""
    import torch

    try:
        yield
    except (RuntimeError, torch.OutOfMemoryError) as err:
        problem = memory_error(err, what)
        if problem is None:
            raise
        raise problem from None
