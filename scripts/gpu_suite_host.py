"""What bounds a forward on the lent machine, measured before the throughput groups: a warm-up of the machine, then
one profiled forward per method.

The first GPU run (docs/gpu/2026-12-04-h200) found the host of its first DeiT-S groups about twice as slow
as that of later ones (dense bf16 at batch 1: 9.0 ms, against 4.9 ms for DeiT-B's identical call sequence later),
so the first timed group now waits for a warmed machine. It also found reduced forwards at batch 256 taking their
batch-1 time: the probe puts that on record directly, as each forward's wall time beside the summed time of the
kernels it ran and their count.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from gpu_kernel_profile import category_ms, kernel_times, profile  # sibling script: kernel profiles and kinds


@dataclass(frozen=True)
class HostProbe:
    """The target model's dense forward spun for ``warmup_s`` seconds, then ``methods`` each profiled."""

    warmup_s: float
    methods: str = "dense,evo,idle,evit,topk"
    calls: int = 5  # forwards per method, wall-timed (median) and then profiled


def _forward(model: torch.nn.Module, images: torch.Tensor, amp: str, device: torch.device) -> float:
    """One synced forward, its seconds."""
    from tokenpace.bench import autocast_for

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    with torch.inference_mode(), autocast_for(device, amp)():
        model(images)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def warm_up(model: torch.nn.Module, images: torch.Tensor, amp: str, device: torch.device, seconds: float) -> dict:
    """Forwards of ``model`` for ``seconds``: clocks, allocator and lazy initialisation settle before anything is
    timed. The first and the last ten calls' median say whether the machine was still warming."""
    times, end = [], time.perf_counter() + seconds
    while time.perf_counter() < end or len(times) < 2:
        times.append(_forward(model, images, amp, device))
    return {"seconds": round(seconds, 1), "calls": len(times), "first_ms": round(times[0] * 1e3, 3),
            "last_median_ms": round(statistics.median(times[-10:]) * 1e3, 3)}


def _kernels(prof) -> tuple[float | None, int | None, dict | None]:
    """Summed self time (ms), count and per-kind ms (``gpu_kernel_kinds.category``) of the device kernels in a
    profile; (None, None, None) with no device."""
    rows = kernel_times(prof, torch.device("cuda"), 1)  # device events only, whatever device the host is
    if not rows:
        return None, None, None
    return sum(r[1] for r in rows), sum(r[2] for r in rows), {k: v["ms"] for k, v in category_ms(rows).items()}


def probe_method(model: torch.nn.Module, images: torch.Tensor, amp: str, device: torch.device, calls: int) -> dict:
    """One method's forward: median wall ms over ``calls`` (unprofiled), then per forward under the profiler: the
    kernels' summed ms and count (CUDA only) and the aten calls the host made."""
    walls = [_forward(model, images, amp, device) for _ in range(calls + 1)][1:]  # the first call warms caches
    prof = profile(lambda: _forward(model, images, amp, device), device, calls)
    kernel_ms, kernels, categories = _kernels(prof)
    aten = sum(e.count for e in prof.key_averages() if e.key.startswith("aten::"))
    return {"wall_ms": round(statistics.median(walls) * 1e3, 3),
            "kernel_ms": None if kernel_ms is None else round(kernel_ms / calls, 3),
            "kernels": None if kernels is None else kernels // calls, "aten_calls": aten // calls,
            # where the kernel time goes (conv stem, GEMMs, norms, ...): added after the second H200 run
            "kernel_ms_by_kind": None if categories is None else {k: round(ms / calls, 3)
                                                                  for k, ms in categories.items()}}


def run_probe(probe: HostProbe, model: torch.nn.Module, batch: int, amp: str, device: torch.device) -> dict:
    """Warm-up (dense), then each method of ``probe.methods`` profiled on ``model``, moved to ``device``
    (re-configured in place, given back as it came in)."""
    from tokenpace.bench import configure, parse_methods, random_input, restored, spec_config

    model.to(device)  # built on the CPU; the benchmark would move it, and the probe runs before any benchmark
    images = random_input(model, batch, device)
    doc = {"batch": batch, "precision": "fp32" if amp == "none" else amp, "methods": []}
    with restored(model):  # as it came in (dense, eval) for the groups
        configure(model, None)
        doc["warmup"] = warm_up(model, images, amp, device, probe.warmup_s)
        for spec in parse_methods(probe.methods):
            configure(model, spec_config(spec))
            doc["methods"].append({"method": spec.method, "config": spec.describe(),
                                   **probe_method(model, images, amp, device, probe.calls)})
    return doc
