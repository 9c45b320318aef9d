"""tokenpace bench: throughput of dense and each method, interleaved (PyTorch, or ONNX Runtime with --onnx)."""
from __future__ import annotations

import argparse
import contextlib
import json
import sys

from ..errors import TokenpaceError, memory_guard
from . import source


def run(args: argparse.Namespace) -> int:
    import torch

    from ..bench import result_json, stderr_progress
    from ..runners import CUDA_GRAPH_MODES, RunMode

    source.check_output_file(args.json, "--json")
    device = source.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    for flag, given in (("--compile", args.compile), ("--cuda-graph", args.cuda_graph)):
        if args.train and given:
            raise TokenpaceError(f"{flag} is for inference; --train times eager training steps")
    if args.compile_mode is not None and not args.compile:  # even "default": a flag given is never ignored
        raise TokenpaceError(f"--compile-mode {args.compile_mode} sets how --compile compiles, and --compile is off "
                             "(add --compile)")
    if args.compile_backend is not None and not args.compile:
        raise TokenpaceError(f"--compile-backend {args.compile_backend} sets what --compile compiles with, and "
                             "--compile is off (add --compile)")
    args.compile_mode = args.compile_mode or "default"
    args.compile_backend = args.compile_backend or "inductor"
    args.run_mode = RunMode(compile=args.compile, compile_mode=args.compile_mode, cuda_graph=args.cuda_graph,
                            compile_backend=args.compile_backend)
    args.run_mode.check(device)
    if args.memory_probe is not None:
        return _probe(args, device)
    if args.memory and (args.runs is not None or args.warmup is not None):
        raise TokenpaceError("--memory measures one call per configuration, each in its own process; --runs and "
                             "--warmup set timed rounds (drop them)")
    args.runs = 10 if args.runs is None else args.runs
    args.warmup = 2 if args.warmup is None else args.warmup
    if args.fuse_bn and (args.memory or args.train):
        flag = "--memory" if args.memory else "--train"
        raise TokenpaceError(f"--fuse-bn folds BatchNorm for inference timing; {flag} measures the model as built "
                             "(drop --fuse-bn)")
    if args.grad_checkpointing and not args.train:
        raise TokenpaceError("--grad-checkpointing applies to training steps; add --train")
    if args.onnx:
        refused = [flag for flag, given in (("--train", args.train), ("--compile", args.compile),
                                            ("--cuda-graph", args.cuda_graph), ("--memory", args.memory),
                                            (f"--amp {args.amp}", args.amp != "none"),
                                            (f"--device {args.device}", args.device != "cpu")) if given]
        if refused:
            raise TokenpaceError(f"--onnx times fp32 ONNX Runtime sessions on the CPU; {', '.join(refused)} does not "
                                 "apply there")
    model, record = source.build(args)
    if args.train and not getattr(model, "num_classes", 0):
        raise TokenpaceError(f"--train times a classification training step, and {source.model_name(args, record)} "
                             "is built without a classifier head (num_classes=0, as timm builds image encoders); "
                             "give it one, e.g. --model-args num_classes=1000")
    specs = source.specs(args, model, record, train=args.train)
    if args.memory:
        return _memory(args, device, model, specs, record)
    if args.fuse_bn:
        from timm.models.levit import ConvNorm, LinearNorm, NormLinear

        from ..families.levit import fuse_batchnorm

        if not any(isinstance(m, (ConvNorm, LinearNorm, NormLinear)) for m in model.modules()):
            raise TokenpaceError(f"--fuse-bn folds LeViT's BatchNorm layers, and {type(model).__name__} has none; "
                                 "accepted: timm levit_* and tokenpace's evo_levit_* models")
        fuse_batchnorm(model.eval())
    if args.compile and args.warmup == 0:
        source.note("--compile with --warmup 0: each configuration's first timed call includes its compilation")
    elif args.compile and args.compile_mode in CUDA_GRAPH_MODES and args.warmup < 2:
        source.note(f"--compile-mode {args.compile_mode} with --warmup {args.warmup}: CUDA graphs are recorded in "
                    "each configuration's second call, so its first timed call includes the recording")
    name = source.model_name(args, record)
    what = "training step" if args.train else ("ONNX Runtime inference" if args.onnx else "inference")
    progress = None if args.quiet else stderr_progress
    batches = {}
    with contextlib.ExitStack() as stack:
        sessions = None
        if args.onnx:
            from ..onnx_bench import onnx_sessions

            sessions = stack.enter_context(onnx_sessions(model, specs, args.threads, progress))
        for bs in args.batch_size or [256 if device.type == "cuda" else 32]:
            batches[bs] = _one_batch_size(args, model, specs, sessions, bs, device, name, what, progress)
    if args.json:
        extra = {"onnxruntime": _onnxruntime_version()} if args.onnx else {}
        backend = args.compile_backend if args.compile else None  # none when eager
        document = result_json(name, device, batches, **source.model_settings(args, model, record), run=args.run,
                               amp=args.amp, compile=args.compile, compile_backend=backend,
                               compile_mode=args.compile_mode if backend == "inductor" else None,  # inductor's
                               cuda_graph=args.cuda_graph, runs=args.runs, warmup=args.warmup, train=args.train,
                               onnx=args.onnx, malloc=args.malloc, fuse_bn=args.fuse_bn, **extra)
        with open(args.json, "w") as f:
            json.dump(document, f, indent=2, allow_nan=False)
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


def _one_batch_size(args, model, specs, sessions, bs, device, name, what, progress):
    from ..bench import benchmark, benchmark_train, format_table

    print(f"benchmarking {name} {what}, batch {bs} on {device.type}, amp={args.amp}, {args.run_mode.describe()}, "
          f"{args.runs} runs after {args.warmup} warm-up, interleaved", file=sys.stderr, flush=True)
    with memory_guard(f"{what} at batch size {bs}"):
        if sessions is not None:
            from ..onnx_bench import benchmark_onnx

            results = benchmark_onnx(model, sessions, bs, runs=args.runs, warmup=args.warmup, progress=progress)
        elif args.train:
            results = benchmark_train(model, specs, bs, device, amp=args.amp, runs=args.runs, warmup=args.warmup,
                                      progress=progress)
        else:
            results = benchmark(model, specs, bs, device, amp=args.amp, compile=args.compile, runs=args.runs,
                                warmup=args.warmup, progress=progress, compile_mode=args.compile_mode,
                                cuda_graph=args.cuda_graph, compile_backend=args.compile_backend)
    print(f"\n{name}  {what}  batch {bs}  {device.type}  amp={args.amp}  {args.run_mode.describe()}  "
          f"malloc={args.malloc}" + ("  BatchNorm fused" if args.fuse_bn else "")
          + f"  (median of {args.runs}; GMACs = multiply-accumulates per image, forward)")
    print(format_table(results), flush=True)
    return results


def _onnxruntime_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def _memory(args, device, model, specs, record) -> int:
    """Peak memory of every configuration, each measured by a child process that repeats this command."""
    from ..bench import format_memory_table, memory_json
    from ..memory import measure_in_child

    for flag, given in (("--compile", args.compile), ("--cuda-graph", args.cuda_graph)):
        if given:
            raise TokenpaceError(f"--memory measures eager runs; drop {flag}")
    name = source.model_name(args, record)
    mode = "train" if args.train else "inference"
    rows = []
    for bs in args.batch_size or [256 if device.type == "cuda" else 32]:
        for spec in specs:
            rows.append(measure_in_child(args.argv, spec, bs, mode, args.grad_checkpointing))
            if not args.quiet:
                print(f"[memory] batch {bs} {spec.method} {rows[-1]['config']}: {rows[-1]['peak_mib']:.0f} MiB",
                      file=sys.stderr, flush=True)
    print(f"\n{name}  {mode}  {device.type}  peak memory above the baseline (model, inputs)"
          + ("  gradient checkpointing" if args.grad_checkpointing else ""))
    print(format_memory_table(rows), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(memory_json(name, device, rows, **source.model_settings(args, model, record), amp=args.amp,
                                  train=args.train, grad_checkpointing=args.grad_checkpointing), f, indent=2,
                      allow_nan=False)
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


def _probe(args, device) -> int:
    """The child's side: build the model as the parent does, measure one configuration, print one JSON line."""
    from ..memory import probe

    model, _ = source.build(args)
    print(json.dumps(probe(model, json.loads(args.memory_probe), device, args.amp)), flush=True)
    return 0
