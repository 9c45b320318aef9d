#!/usr/bin/env python3
"""Where a batch-256 bf16 DeiT-S forward spends its GPU time, per method, eager and compiled: the follow-up
to the second H200 run (docs/gpu/2026-12-04-h200-run2), whose host probe found dense and Evo GPU-bound at batch 256
(kernels 12.95 of 13.46 ms, 10.06 of 10.66 ms) and yet Evo only 1.29x faster in kernel time for 1.52x fewer MACs.

    python scripts/gpu_kernel_profile.py OUTDIR                 # CUDA: DeiT-S, batch 256, bf16
    python scripts/gpu_kernel_profile.py --smoke OUTDIR         # CPU: a tiny ViT, batch 2 (the script's test)
    python scripts/gpu_kernel_profile.py --table FILE.json      # its results as a Markdown table

Writes OUTDIR/kernels.json: per (method, mode) the wall time, the kernels' summed ms per forward by kind (GEMM,
attention, conv, normalisation, softmax, gather/scatter/sort, elementwise, triton-fused, other: gpu_kernel_kinds.py)
and the top kernels by time. --cudnn-benchmark profiles with cuDNN autotuned, as tokenpace bench times on CUDA. On
the CPU the "kernels" are the aten operators' self times, which keeps the script's code paths tested without a GPU.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402

sys.path.insert(0, str(ROOT / "scripts"))
from gpu_kernel_kinds import CATEGORIES_VERSION, category, table  # noqa: E402


def kernel_times(prof, device: torch.device, calls: int) -> list[tuple[str, float, int]]:
    """(name, ms per forward, launches per forward) of each device kernel (CUDA) or aten operator (CPU)."""
    from torch.autograd import DeviceType

    rows = []
    for event in prof.key_averages():
        if device.type == "cuda":
            if event.device_type != DeviceType.CUDA:
                continue
            own = getattr(event, "self_device_time_total", None)  # a 0 is a time: no fallback on it
            us = own if own is not None else event.self_cuda_time_total  # torch before the device names
        else:
            if not event.key.startswith("aten::"):
                continue
            us = event.self_cpu_time_total
        rows.append((event.key, us / 1e3 / calls, event.count // calls))
    return sorted(rows, key=lambda row: -row[1])


def wall_ms(call, device: torch.device, calls: int) -> float:
    """Median synced wall time of ``call`` in ms, unprofiled (after three warm-up calls)."""
    times = []
    for i in range(calls + 3):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        call()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= 3:
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def profile(call, device: torch.device, calls: int) -> torch.profiler.profile:
    """The profile of ``call`` run ``calls`` times: host events, and the device's kernels on CUDA."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(calls):
            call()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return prof


def category_ms(rows: list[tuple[str, float, int]]) -> dict[str, dict]:
    """Per category of :func:`category`: ms and launches, the largest first."""
    cats: dict[str, list[float]] = {}
    for name, ms, count in rows:
        entry = cats.setdefault(category(name), [0.0, 0])
        entry[0] += ms
        entry[1] += count
    return {k: {"ms": round(v[0], 3), "launches": v[1]} for k, v in sorted(cats.items(), key=lambda kv: -kv[1][0])}


def summarise(rows: list[tuple[str, float, int]], top: int) -> dict:
    """Per-category ms and launches, the total, and the ``top`` kernels."""
    return {"total_ms": round(sum(r[1] for r in rows), 3), "launches": sum(r[2] for r in rows),
            "categories": category_ms(rows),
            # each kind from the full name (cuBLAS's names run past the 160 characters kept)
            "top": [{"name": name[:160], "kind": category(name), "ms": round(ms, 4), "launches": count}
                    for name, ms, count in rows[:top]]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("outdir", type=Path, nargs="?", help="where kernels.json goes (not with --table)")
    parser.add_argument("--table", type=Path, metavar="FILE", help="print FILE (a kernels.json) as Markdown; no run")
    parser.add_argument("--smoke", action="store_true", help="CPU, a tiny ViT, batch 2 (aot_eager compile)")
    parser.add_argument("--methods", default="dense,evo,idle,topk")
    parser.add_argument("--compiled", default="dense,evo,idle", help="methods also profiled compiled ('' for none)")
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--top", type=int, default=40, help="kernels kept by name per run (default 40)")
    parser.add_argument("--cudnn-benchmark", action="store_true",
                        help="let cuDNN time its conv algorithms, as tokenpace bench now does on CUDA")
    args = parser.parse_args(argv)
    if (args.table is None) == (args.outdir is None):
        parser.error("give an OUTDIR to profile into, or --table FILE to print one (not both)")
    if args.table is not None:
        print(table(json.loads(args.table.read_text())))
        return 0

    import timm

    from tokenpace.bench import autocast_for, configure, parse_methods, random_input, spec_config
    from tokenpace.runtime import cudnn_autotuned

    smoke = args.smoke
    device = torch.device("cpu" if smoke else "cuda")
    name, batch = ("vit_tiny_patch16_224", 2) if smoke else ("deit_small_patch16_224", 256)
    kwargs = {"img_size": 64, "depth": 4} if smoke else {}
    model = timm.create_model(name, pretrained=False, **kwargs).to(device).eval()
    images = random_input(model, batch, device)
    autocast = autocast_for(device, "bf16")
    backend = "aot_eager" if smoke else "inductor"
    args.outdir.mkdir(parents=True, exist_ok=True)
    doc = {"model": name, "batch": batch, "precision": "bf16", "device": str(device),
           "categories_version": CATEGORIES_VERSION,
           "cudnn_benchmark": args.cudnn_benchmark,
           "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
           "torch": torch.__version__, "timm": timm.__version__, "runs": []}
    compiled = set(filter(None, args.compiled.split(",")))
    start = time.perf_counter()
    for spec in parse_methods(args.methods):
        for mode in ("eager", "compiled") if spec.method in compiled else ("eager",):
            target = copy.deepcopy(model) if mode == "compiled" else model
            configure(target, spec_config(spec))
            runner = torch.compile(target, backend=backend) if mode == "compiled" else target

            def call(runner=runner):
                with torch.inference_mode(), autocast():
                    runner(images)

            with cudnn_autotuned(device) if args.cudnn_benchmark else contextlib.nullcontext():
                wall = wall_ms(call, device, 2 * args.calls)
                rows = kernel_times(profile(call, device, args.calls), device, args.calls)
            entry = {"method": spec.method, "config": spec.describe(), "mode": mode, "wall_ms": round(wall, 3),
                     **summarise(rows, args.top)}
            doc["runs"].append(entry)
            cats = ", ".join(f"{k} {v['ms']:.2f}" for k, v in entry["categories"].items())
            print(f"[{time.perf_counter() - start:6.1f}s] {spec.method:6s} {mode:8s} wall {wall:.2f} ms, kernels "
                  f"{entry['total_ms']:.2f} ms in {entry['launches']} launches: {cats}", flush=True)
            (args.outdir / "kernels.json").write_text(json.dumps(doc, indent=1) + "\n")
            if mode == "compiled":
                torch._dynamo.reset()
    configure(model, None)
    for entry in doc["runs"]:
        print(f"\n== {entry['method']} {entry['mode']}: top kernels (ms per forward, launches)")
        for row in entry["top"][:15]:
            print(f"  {row['ms']:8.3f} {row['launches']:4d}  {row['name'][:110]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
