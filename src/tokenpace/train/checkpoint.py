"""Checkpoints written atomically (a crash mid-write never leaves a corrupt file, an exception leaves no temporary
file) and RNG state capture in a form ``torch.load(weights_only=True)`` reads back."""
from __future__ import annotations

import os
import random

import numpy as np
import torch

from ..outputs import write_atomically


def atomic_save(obj, path: str) -> None:
    """torch.save to a temporary file beside ``path``, flushed to disk, then renamed over it (atomic on POSIX)."""
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())

    write_atomically(path, write)


def rng_state() -> dict:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss,
                                                    cached),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
