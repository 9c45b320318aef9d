"""The ``tokenpace`` command line. Errors in what the user asked for end in one line and exit code 2."""
from __future__ import annotations

import argparse
import json
import sys

import torch

DEFAULT_MODEL = "deit_small_patch16_224"


class UsageError(Exception):
    """A problem with the user's input, reported as one line."""


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return values


def _device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but CUDA is not available here; accepted: cpu")
    return torch.device(name)


def build_model(name: str, pretrained: bool = False, checkpoint: str | None = None, **kwargs) -> torch.nn.Module:
    """A timm model by name, with random, pretrained (hub) or local-checkpoint weights."""
    import timm

    if not timm.is_model(name):
        raise UsageError(f"unknown timm model {name!r}; e.g. deit_small_patch16_224, vit_base_patch16_224 "
                         "(see timm.list_models('deit*'))")
    if checkpoint is not None:
        import os

        if not os.path.isfile(checkpoint):
            raise UsageError(f"checkpoint {checkpoint!r} does not exist")
        kwargs["checkpoint_path"] = checkpoint
    return timm.create_model(name, pretrained=pretrained, **kwargs)


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import benchmark, format_table, parse_methods, result_json, stderr_progress

    device = _device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    specs = parse_methods(args.methods)
    extra = {"img_size": args.img_size} if args.img_size else {}
    model = build_model(args.model, pretrained=args.pretrained, checkpoint=args.checkpoint, **extra)
    from .families import adapter_for

    adapter_for(model)  # a clear TypeError now for an unsupported model, before any timing
    batch_sizes = args.batch_size or [256 if device.type == "cuda" else 32]
    documents = []
    for bs in batch_sizes:
        print(f"benchmarking {args.model} batch {bs} on {device.type}, amp={args.amp}, compile={args.compile}, "
              f"{args.runs} runs after {args.warmup} warm-up, interleaved", file=sys.stderr, flush=True)
        results = benchmark(model, specs, bs, device, amp=args.amp, compile=args.compile, runs=args.runs,
                            warmup=args.warmup,
                            progress=None if args.quiet else stderr_progress)
        print(f"\n{args.model}  batch {bs}  {device.type}  amp={args.amp}  compile={args.compile}  "
              f"(median of {args.runs}; GMACs = multiply-accumulates per image)")
        print(format_table(results), flush=True)
        documents.append(result_json(args.model, bs, device, results, amp=args.amp, compile=args.compile,
                                     runs=args.runs, warmup=args.warmup, torch=torch.__version__))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(documents[0] if len(documents) == 1 else documents, f, indent=2)
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenpace", description="Token pacing for vision transformers.")
    sub = parser.add_subparsers(dest="command", required=True)

    bench = sub.add_parser("bench", help="measure throughput of dense vs each method, interleaved in one run")
    bench.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=f"timm model name (default {DEFAULT_MODEL})")
    bench.add_argument("--methods", default="dense,evo,idle,evit,topk",
                       help="comma list: dense, evo, idle, evit, topk; name@KEEP or name:key=value:... for options "
                            "(default: all at their defaults)")
    bench.add_argument("--batch-size", type=_ints, default=None, help="comma list (default 32 on cpu, 256 on cuda)")
    bench.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none")
    bench.add_argument("--compile", action="store_true", help="torch.compile each model (fixed token counts)")
    bench.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    bench.add_argument("--runs", type=int, default=10, help="timed rounds (default 10)")
    bench.add_argument("--warmup", type=int, default=2, help="warm-up rounds (default 2)")
    bench.add_argument("--img-size", type=int, default=None, help="build the model for this input size")
    bench.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    bench.add_argument("--pretrained", action="store_true", help="load timm's pretrained weights (needs the hub)")
    bench.add_argument("--checkpoint", default=None, help="local weights file for the model")
    bench.add_argument("--json", default=None, help="write the results as JSON to this file")
    bench.add_argument("--quiet", action="store_true", help="no per-run progress lines")
    bench.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    for name in ("runs", "warmup"):
        value = getattr(args, name, None)
        if value is not None and value < (1 if name == "runs" else 0):
            print(f"tokenpace: error: --{name} must be >= {1 if name == 'runs' else 0}; got {value}", file=sys.stderr)
            return 2
    try:
        return args.func(args)
    except (UsageError, ValueError, TypeError) as err:
        print(f"tokenpace: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
