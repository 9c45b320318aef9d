"""How a benchmark runs its configurations: one eager model re-configured before each call, a torch.compile'd copy
per configuration, or a CUDA graph per configuration, captured once and replayed.

At small batches a GPU waits on the host: a forward costs about one kernel launch per operation, and a reduced
forward makes more operations than the dense one. A replayed graph launches all of them in one host call, so its
time is the kernels' own; torch.compile's "reduce-overhead" mode does the same for compiled code.
"""
from __future__ import annotations

import copy
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn

from .errors import TokenpaceError

# torch.compile's modes; "reduce-overhead" and "max-autotune" also replay CUDA graphs, so they need a CUDA device
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


@dataclass(frozen=True)
class RunMode:
    """How each configuration runs: eager (the default), compiled (``compile``, by torch.compile's
    ``compile_backend``, inductor's in ``compile_mode``) or eager kernels captured in a CUDA graph (``cuda_graph``).
    Another backend than inductor (e.g. ``aot_eager``: traced, no code generated) checks that a configuration
    compiles without inductor's minutes of code generation on a small CPU."""

    compile: bool = False
    compile_mode: str = "default"
    cuda_graph: bool = False
    compile_backend: str = "inductor"

    def check(self, device: torch.device) -> None:
        """Refuse a mode that is unknown, that needs CUDA off CUDA, or that does not apply to the others given."""
        mode = self.compile_mode
        if mode not in COMPILE_MODES:
            raise TokenpaceError(f"unknown compile mode {mode!r}; accepted: {', '.join(COMPILE_MODES)}")
        if self.cuda_graph and device.type != "cuda":
            raise TokenpaceError(f"CUDA-graph capture (cuda_graph, --cuda-graph) needs a CUDA device (got "
                                 f"{device.type})")
        if mode in CUDA_GRAPH_MODES and device.type != "cuda":
            without = ", ".join(m for m in COMPILE_MODES if m not in CUDA_GRAPH_MODES)
            raise TokenpaceError(f"compile mode {mode!r} replays CUDA graphs and needs a CUDA device (got "
                                 f"{device.type}); accepted on {device.type}: {without}")
        if mode != "default" and not self.compile:
            raise TokenpaceError(f"compile mode {mode!r} (--compile-mode) sets how compiled runs compile, and "
                                 "compile (--compile) is off")
        if self.cuda_graph and self.compile:
            raise TokenpaceError("CUDA-graph capture (cuda_graph, --cuda-graph) takes eager kernels; for compiled "
                                 "code with CUDA graphs use compile mode 'reduce-overhead'")
        self._check_backend()

    def _check_backend(self) -> None:
        backend = self.compile_backend
        if backend == "inductor":
            return
        if not self.compile:
            raise TokenpaceError(f"compile backend {backend!r} (--compile-backend) sets what compiles, and compile "
                                 "(--compile) is off")
        known = sorted(torch._dynamo.list_backends(exclude_tags=()))
        if backend not in known:
            raise TokenpaceError(f"unknown compile backend {backend!r}; accepted: {', '.join(known)}")
        if self.compile_mode != "default":
            raise TokenpaceError(f"compile mode {self.compile_mode!r} is inductor's, and the compile backend is "
                                 f"{backend!r}; accepted with {backend!r}: default")

    @property
    def replays_graphs(self) -> bool:
        return self.cuda_graph or (self.compile and self.compile_mode in CUDA_GRAPH_MODES)

    def describe(self) -> str:
        """The mode in a table header: eager, compiled, compiled (MODE or BACKEND), eager+cuda-graph."""
        if self.compile:
            if self.compile_backend != "inductor":
                return f"compiled ({self.compile_backend})"
            return "compiled" if self.compile_mode == "default" else f"compiled ({self.compile_mode})"
        return "eager+cuda-graph" if self.cuda_graph else "eager"


@dataclass
class Runners:
    """Per configuration: ``prepare`` (outside the timing) and ``call``; ``autocast`` wraps each call."""

    prepares: list[Callable[[], object]]
    calls: list[Callable[[], object]]
    autocast: Callable[[], object]


def make_runners(model: nn.Module, configs: list, labels: list[str], configure: Callable, x: torch.Tensor,
                 mode: RunMode, autocast: Callable[[], object], say: Callable[[str], None]) -> Runners:
    """Runners for every configuration of ``model`` (``labels`` name them); call outside torch.inference_mode (the
    copies it makes hold ordinary parameters; graphs are captured in inference mode here).

    Eager runs share ``model``, re-configured before each call. Compiled and graphed runs get a copy per
    configuration: a compiled graph is specialised to its configuration (re-patching would recompile it every
    call), and a captured graph keeps reading its configuration's tensors."""
    if not (mode.compile or mode.cuda_graph):
        return Runners([lambda config=config: configure(model, config) for config in configs],
                       [lambda: model(x)] * len(configs), autocast)
    dense = configure(model, None)  # copies of the unpatched model, each then patched once
    copies = [configure(copy.deepcopy(dense), config) for config in configs]
    idle = [lambda: None for _ in configs]
    if mode.compile:
        how = ({"mode": mode.compile_mode} if mode.compile_backend == "inductor"
               else {"backend": mode.compile_backend})  # other backends take no mode
        compiled = [torch.compile(m, **how) for m in copies]
        return Runners(idle, [lambda m=m: m(x) for m in compiled], autocast)
    replays = []
    for label, m in zip(labels, copies):
        say(f"capturing {label} in a CUDA graph")  # a forward that cannot be captured fails right after this line
        with torch.inference_mode():
            replays.append(capture_cuda_graph(lambda m=m: m(x), x.device, autocast))
    # a replay runs the kernels captured under autocast, and needs no autocast around it
    return Runners(idle, replays, nullcontext)


@dataclass
class GraphReplay:
    """A captured graph with what its replays read (the model and input ``call`` holds) and write (``output``):
    they live as long as the replay does."""

    graph: torch.cuda.CUDAGraph
    output: object
    call: Callable[[], object]

    def __call__(self) -> None:
        self.graph.replay()


def capture_cuda_graph(call: Callable[[], object], device: torch.device,
                       autocast: Callable[[], object]) -> GraphReplay:
    """Capture ``call`` in a CUDA graph. Three warm-up calls on a side stream first (lazy initialisation, cuBLAS
    workspaces), as capture requires. ``autocast`` must not cache casts (a cast cached in the capture would be
    freed when autocast exits). A forward that syncs with the host or changes shape cannot be captured."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(3):
            with autocast():
                call()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), autocast():
        output = call()
    return GraphReplay(graph, output, call)


def cudagraph_skips() -> int:
    """How many compiled graphs inductor has run without their CUDA graphs so far in this process (it logs why
    under TORCH_LOGS=cudagraphs)."""
    from torch._dynamo.utils import counters

    return counters["inductor"]["cudagraph_skips"]


@contextmanager
def warn_if_graphs_skipped(mode: RunMode) -> Iterator[None]:
    """Warn after a block in which inductor ran any compiled graph without its CUDA graph, when ``mode`` asked
    torch.compile for graph replay (the times then are plain compiled ones)."""
    watch = mode.compile and mode.replays_graphs
    before = cudagraph_skips() if watch else 0
    yield
    skipped = cudagraph_skips() - before if watch else 0
    if skipped:
        warnings.warn(f"compile mode {mode.compile_mode!r}: inductor ran {skipped} compiled graph(s) without CUDA "
                      "graphs (TORCH_LOGS=cudagraphs says why); their times are torch.compile's without graph replay",
                      stacklevel=3)
