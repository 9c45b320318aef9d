"""A model handed back in the train/eval mode it came in, whatever a function switched it to meanwhile."""
from __future__ import annotations

from contextlib import contextmanager

from torch import nn


@contextmanager
def mode_kept(model: nn.Module):
    """Run a block that may switch ``model`` between train and eval mode; restore its mode after (errors too)."""
    was_training = model.training
    try:
        yield model
    finally:
        model.train(was_training)
