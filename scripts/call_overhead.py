#!/usr/bin/env python3
"""Per-call overhead of one forward per method, measured on the CPU: the model's depth, heads and token loop at a
width and input so small that the arithmetic is negligible, batch 1, one thread. What is left is Python and
operator dispatch, which is what bounds an eager GPU forward at batch 1 (and weighs at batch 64 on a fast GPU):
the dense/method ratio here is a floor on how much slower a reduced eager forward can be there.

Dense and reduced are interleaved in every round; the median of the rounds is printed.

    python scripts/call_overhead.py [--model deit_small_patch16_224] [--model-args embed_dim=48,img_size=64]
                                    [--methods dense,evo,idle,evit,topk] [--amp none|bf16] [--compile]

With --compile each configuration is compiled by inductor (mode default) first, and the kernels inductor generated
for it are counted: a compiled forward calls each from Python, so the count is its launch cost on a GPU.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

import timm  # noqa: E402

import tokenpace  # noqa: E402
from tokenpace.bench import AMP_DTYPES, autocast_for, parse_methods, spec_config  # noqa: E402
from tokenpace.cli.source import parse_model_args  # noqa: E402
from tokenpace.errors import TokenpaceError  # noqa: E402
from tokenpace.families import adapter_for  # noqa: E402


def seconds_per_forward(model: torch.nn.Module, images: torch.Tensor, calls: int, amp: str) -> float:
    with torch.inference_mode(), autocast_for(torch.device("cpu"), amp)():
        start = time.perf_counter()
        for _ in range(calls):
            model(images)
        return (time.perf_counter() - start) / calls


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="deit_small_patch16_224")
    p.add_argument("--model-args", default="embed_dim=48,img_size=64",
                   help="key=value,... passed to timm.create_model, as tokenpace --model-args; the default keeps DeiT-S's depth "
                        "and heads at a width and input where dispatch dominates")
    p.add_argument("--methods", default="dense,evo,idle,evit,topk", help="as tokenpace bench --methods")
    p.add_argument("--amp", default="none", choices=tuple(AMP_DTYPES))
    p.add_argument("--rounds", type=int, default=15, help="interleaved rounds; the median is printed (default 15)")
    p.add_argument("--calls", type=int, default=50, help="forwards timed per method and round (default 50)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile each configuration (inductor, mode default) and count its generated kernels")
    p.add_argument("--compile-backend", default="inductor",
                   help="torch.compile's backend with --compile (aot_eager: traced, no kernels generated)")
    a = p.parse_args(argv)
    if a.rounds < 1 or a.calls < 1:
        p.error(f"--rounds and --calls must be at least 1; got {a.rounds} and {a.calls}")
    try:
        kwargs = parse_model_args(a.model_args)
    except TokenpaceError as err:
        p.error(str(err))
    torch.set_num_threads(1)
    torch.manual_seed(0)
    specs, models, kernels = parse_methods(a.methods), [], []
    for spec in specs:
        model = timm.create_model(a.model, **kwargs).eval()
        models.append(tokenpace.apply(model, spec_config(spec)) if spec.method != "dense" else model)
    images = torch.randn(1, *adapter_for(models[0]).input_size())
    if a.compile:
        from torch._inductor import metrics

        compiled = []
        for model in models:
            metrics.reset()
            compiled.append(torch.compile(model, fullgraph=True, backend=a.compile_backend))
            seconds_per_forward(compiled[-1], images, 1, a.amp)  # compiles
            kernels.append(metrics.generated_kernel_count)
        models = compiled
    for model in models:
        seconds_per_forward(model, images, 10, a.amp)  # warm-up: lazily built caches, allocator
    times: list[list[float]] = [[] for _ in models]
    for _ in range(a.rounds):
        for t, model in zip(times, models):
            t.append(seconds_per_forward(model, images, a.calls, a.amp))
    rows = [{"method": s.method, "config": s.describe(), "ms": statistics.median(t) * 1e3,
             "kernels": kernels[i] if kernels else None} for i, (s, t) in enumerate(zip(specs, times))]
    dense = next((r["ms"] for r in rows if r["method"] == "dense"), None)
    mode = f"compiled ({a.compile_backend})" if a.compile else "eager"
    print(f"{a.model} ({a.model_args or 'as built'}), amp={a.amp}, {mode}, batch 1, 1 thread: ms per forward, "
          f"median of {a.rounds} interleaved rounds of {a.calls} calls")
    print(f"{'method':8s}{'config':24s}{'ms':>8s}{'of dense':>10s}" + (f"{'kernels':>9s}" if kernels else ""))
    for r in rows:
        ratio = f"{r['ms'] / dense:.2f}x" if dense else "-"
        print(f"{r['method']:8s}{r['config']:24s}{r['ms']:8.3f}{ratio:>10s}"
              + (f"{r['kernels']:9d}" if kernels else ""))
    return rows


if __name__ == "__main__":
    main()
