"""ONNX Runtime throughput (``tokenpace bench --onnx``): every configuration exported once (``export_onnx``,
checked against PyTorch at batch 1), one CPU session each, then timed on the same protocol as ``bench``: random
input, warm-up rounds, every configuration once per round (interleaved), the median."""
from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import nn

from .bench import (BenchResult, MethodSpec, _results, _time_interleaved, applied_config, configure, random_input,
                    spec_config)
from .onnx_export import export_onnx
from .patch import macs


@dataclass
class OnnxConfig:
    """One exported configuration: its spec, MACs, the config as applied, and its ONNX Runtime session."""

    spec: MethodSpec
    gmacs: float
    applied: Any
    session: Any


@contextlib.contextmanager
def onnx_sessions(model: nn.Module, specs: list[MethodSpec], threads: int | None = None,
                  progress: Callable[[str], None] | None = None) -> Iterator[list[OnnxConfig]]:
    """Export ``model`` in each spec's configuration into a temporary folder and open a CPU session on each
    (``threads`` intra-op threads; None: ONNX Runtime's default, one per physical core)."""
    import onnxruntime as ort

    say = progress or (lambda msg: None)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or 0
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    configs = []
    came_in = applied_config(model)
    with tempfile.TemporaryDirectory(prefix="tokenpace-onnx-") as folder:
        for i, spec in enumerate(specs):
            configure(model, spec_config(spec))
            path = os.path.join(folder, f"{i}_{spec.method}.onnx")
            exported = export_onnx(model, path, check=(1,))
            say(f"[onnx] exported {spec.method} {spec.describe()} (|ONNX Runtime - PyTorch| = "
                f"{exported.max_abs_diff[1]:.1e} at batch 1)")
            session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
            configs.append(OnnxConfig(spec, macs(model) / 1e9, applied_config(model), session))
        configure(model, came_in)  # the method it came in with
        yield configs


def benchmark_onnx(model: nn.Module, configs: list[OnnxConfig], batch_size: int, runs: int = 10, warmup: int = 2,
                   progress: Callable[[str], None] | None = None) -> list[BenchResult]:
    """Median time per batch of each exported configuration, interleaved round by round."""
    images = random_input(model, batch_size, torch.device("cpu")).float().numpy()
    calls = [lambda s=c.session: s.run(None, {"images": images}) for c in configs]
    times = _time_interleaved([c.spec.method for c in configs], [lambda: None] * len(configs), calls,
                              torch.device("cpu"), runs, warmup, contextlib.nullcontext,
                              progress or (lambda msg: None), "onnx ")
    return _results([c.spec for c in configs], [c.gmacs for c in configs], times, batch_size,
                    [c.applied for c in configs])
