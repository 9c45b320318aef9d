"""Training steps of the GPU suite's CIFAR sections: run eagerly, or replayed from one CUDA graph of the whole step.

Eager steps of the suite's small ViT are bound by the host below batch 2048: the second H200 run timed 512- and
1024-image steps at about 35 ms each (14,853 and 27,566 images/s against 37,015 at 2048), so the batch pick chose
2048 and the dense model got 1,632 optimizer steps in 89 s. A CUDA graph of the step (augmentation, forward,
backward, AdamW) is one launch, so a step costs its GPU time and a smaller batch buys more steps in the same time.

The graph is captured after a few eager warm-up steps (the lazy initialisations: cuDNN's algorithm search, the
optimizer's state), the last one under CUDA's sync debug mode: a step that waits for the host cannot be captured,
and it is then run eagerly, with the reason recorded, instead of failing inside a capture.
"""
from __future__ import annotations

import collections
from contextlib import contextmanager, nullcontext
from typing import TYPE_CHECKING, Callable

import torch

from gpu_suite_common import DeadlineReached
from gpu_suite_data import DeviceSplit, augment, paste_on_noise
from tokenpace.train.loop import param_groups
from tokenpace.train.objectives import Objective

if TYPE_CHECKING:
    from gpu_suite_cifar import CifarConfig

WARMUP_STEPS = 3  # eager steps before a capture
# steps the host may queue before the GPU has run them: a replay is one launch, so without a bound the host would
# queue a whole epoch ahead, and the time-based schedule (its warm-up, its end) would read the clock of work not
# yet done. Four 15 ms steps keep the GPU fed.
AHEAD = 4


def autocast(cfg: "CifarConfig", device: torch.device):
    """bf16 autocast, or nothing. No cast cache: a CUDA graph may not capture autocast's cached weight casts, and a
    ViT uses each weight once per forward, so the cache saves nothing here."""
    if cfg.amp != "bf16":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False)


def adamw(objective: Objective, cfg: "CifarConfig", lr: float | torch.Tensor, device: torch.device,
          capturable: bool = False) -> torch.optim.AdamW:
    """AdamW over the objective's trainable parameters; fused on CUDA (one kernel for the whole update).
    ``capturable`` keeps its step counts on the device, so a CUDA graph can hold the update; the learning rate is
    then a device tensor (``lr``) that the graph reads at every replay."""
    return torch.optim.AdamW(param_groups(objective, cfg.weight_decay), lr=lr, weight_decay=cfg.weight_decay,
                             fused=device.type == "cuda", capturable=capturable)


def step_loss(objective: Objective, data: DeviceSplit, idx: torch.Tensor, cfg: "CifarConfig",
              device: torch.device) -> torch.Tensor:
    """Forward and backward of one training batch (the images at ``idx``, augmented on the device); the loss."""
    images = augment(data.images[idx], cfg.crop_pad, cfg.erase_prob)
    if cfg.canvas is not None:  # augmented at their own size (an erased box stays a part of the object), then
        images = paste_on_noise(images, cfg.canvas)  # placed on fresh noise at a fresh place every step
    with autocast(cfg, device):
        loss = objective(images, data.labels[idx])[0]
    loss.backward()
    return loss.detach()


# set once a capture has failed in this process: CUDA may leave the capture's stream current and its allocator
# and random generator in capture state (torch.cuda.graph does not undo them when ending the capture raises), so no
# later step here is captured, nor the allocator's cache emptied
capture_failed_here = False


class CudaGraphStep:
    """``fn`` captured in a CUDA graph; ``replay()`` runs it again and returns its output (the same tensor each
    time: the graph writes into it)."""

    def __init__(self, fn: Callable[[], torch.Tensor]) -> None:
        global capture_failed_here
        self.graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.current_stream()
        try:
            with torch.cuda.graph(self.graph):
                self.output = fn()
        except BaseException:
            capture_failed_here = True
            torch.cuda.set_stream(stream)  # what the context manager leaves undone where ending the capture raised
            raise

    def replay(self) -> torch.Tensor:
        self.graph.replay()
        return self.output


@contextmanager
def _sync_debug_errors():
    """Make a synchronising CUDA call raise (the calls a CUDA graph cannot capture)."""
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


class TrainSteps:
    """Optimizer steps on batches given by their indices into ``data``: ``steps(idx)`` runs one and returns its
    loss (not synced), ``set_lr`` sets the learning rate of the next ones. With ``graphed`` (default: on CUDA),
    the first ``warmup`` steps run eagerly and the step is then captured once and replayed; ``invalidate()``
    after a change of the model's forward (Evo's switch to stage mode) captures it again. On CUDA the host stays
    at most ``AHEAD`` steps ahead of the GPU.

    ``graph``: how a step is captured (``CudaGraphStep``; tests pass a stand-in that reruns the step).
    """

    def __init__(self, objective: Objective, data: DeviceSplit, cfg: "CifarConfig", lr: float,
                 device: torch.device, graphed: bool | None = None, warmup: int = WARMUP_STEPS,
                 graph: Callable[[Callable[[], torch.Tensor]], CudaGraphStep] = CudaGraphStep) -> None:
        if warmup < 1:  # the optimizer's state must exist before the capture, or every replay would zero it
            raise ValueError(f"warmup must be at least 1 eager step; got {warmup}")
        self.objective, self.data, self.cfg, self.device = objective, data, cfg, device
        if graphed is None:
            graphed = device.type == "cuda" and cfg.cuda_graphs and not capture_failed_here
        self.graphed = graphed
        self.warmup, self.make_graph = warmup, graph
        # a graph reads the learning rate from a device tensor, filled before each replay
        self.optimizer = adamw(objective, cfg, torch.tensor(lr, device=device) if self.graphed else lr, device,
                               capturable=self.graphed and device.type == "cuda")
        self.eager_reason = None if self.graphed else (
            "not on CUDA" if device.type != "cuda" else "a capture failed earlier in this process"
            if capture_failed_here else "CUDA graphs off (cuda_graphs=False)")
        self.captures = 0
        self._graph = None
        self._static_idx = None
        self._warm = 0
        self._side = torch.cuda.Stream(device) if self.graphed and device.type == "cuda" else None
        self._queued = collections.deque()  # an event per step the GPU may not have run yet (CUDA)

    @property
    def mode(self) -> str:
        """How the steps run: ``"cuda_graph"``, or ``"eager: <why>"``."""
        return "cuda_graph" if self.graphed else f"eager: {self.eager_reason}"

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].fill_(lr)  # a kernel on the stream: no host sync, seen by the next replay
            else:
                group["lr"] = lr

    def invalidate(self) -> None:
        """The model's forward changed: warm up and capture again before the next replay."""
        self.release()
        self._warm = 0

    def release(self) -> None:
        """Drop the graph and the gradients it wrote (a replayed backward leaves them set, where an eager one would
        add to them, and a copy of the model would carry them)."""
        if self._graph is not None and self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()  # its last replay ends before the graph goes
        self._graph = None
        self.optimizer.zero_grad(set_to_none=True)

    def __call__(self, idx: torch.Tensor) -> torch.Tensor:
        loss = self._step(idx)
        if self.device.type == "cuda":
            self._queued.append(torch.cuda.Event())
            self._queued[-1].record()
            if len(self._queued) > AHEAD:
                self._queued.popleft().synchronize()  # the host waits for an older step, the GPU keeps running
        return loss

    def _step(self, idx: torch.Tensor) -> torch.Tensor:
        if not self.graphed:
            return self._eager(idx)
        if self._graph is None:
            if self._warm < self.warmup:
                self._warm += 1
                return self._warm_up(idx, check_syncs=self._warm == self.warmup)
            self._capture(idx)
            if not self.graphed:  # the capture failed: this step runs eagerly
                return self._eager(idx)
        self._static_idx.copy_(idx)
        return self._graph.replay().clone()  # the graph overwrites its output at the next replay

    def _eager(self, idx: torch.Tensor) -> torch.Tensor:
        loss = step_loss(self.objective, self.data, idx, self.cfg, self.device)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss

    def _warm_up(self, idx: torch.Tensor, check_syncs: bool) -> torch.Tensor:
        """An eager step, on a side stream as CUDA graph captures want their warm-up (PyTorch's CUDA graphs notes);
        the last one with synchronising calls made errors."""
        if self._side is None:  # a stand-in graph off CUDA
            return self._eager(idx)
        self._side.wait_stream(torch.cuda.current_stream(self.device))
        try:
            with torch.cuda.stream(self._side), (_sync_debug_errors() if check_syncs else nullcontext()):
                loss = self._eager(idx)
        except RuntimeError as e:
            if not check_syncs or isinstance(e, DeadlineReached):
                raise
            # a host sync in the step: no graph, and this step again, eagerly
            torch.cuda.current_stream(self.device).wait_stream(self._side)
            self._fall_back(f"the step synchronises with the host ({_first_line(e)})")
            return self._eager(idx)
        torch.cuda.current_stream(self.device).wait_stream(self._side)
        return loss

    def _capture(self, idx: torch.Tensor) -> None:
        self._graph = None  # the previous graph's memory goes before the new one takes its own
        self.optimizer.zero_grad(set_to_none=True)  # the graph's backward allocates the gradients it writes
        self._static_idx = torch.empty_like(idx)
        static_idx = self._static_idx

        def step() -> torch.Tensor:
            loss = step_loss(self.objective, self.data, static_idx, self.cfg, self.device)
            self.optimizer.step()
            return loss

        try:
            self._graph = self.make_graph(step)
        except DeadlineReached:
            raise
        except RuntimeError as e:
            self._fall_back(f"the capture failed ({_first_line(e)})")
            return
        self.captures += 1

    def _fall_back(self, reason: str) -> None:
        """Eager steps from now on; the failed step's gradients go (the eager rerun of the step writes its own)."""
        self.graphed, self.eager_reason, self._graph = False, reason, None
        self.optimizer.zero_grad(set_to_none=True)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:200] if text else type(error).__name__
