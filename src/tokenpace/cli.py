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


def _model_args(text: str | None) -> dict:
    """"img_size=32,patch_size=4,depth=6" -> kwargs for timm.create_model."""
    out: dict = {}
    for pair in filter(None, (text or "").split(",")):
        key, eq, value = pair.partition("=")
        if not eq:
            raise UsageError(f"--model-args entry {pair!r} must be key=value (e.g. img_size=32,depth=6)")
        for cast in (int, float):
            try:
                out[key.strip()] = cast(value)
                break
            except ValueError:
                continue
        else:
            out[key.strip()] = {"true": True, "false": False}.get(value.lower(), value)
    return out


def _method_from_args(recipe, args):
    """The recipe's method, replaced by --method and adjusted by --keep / --score."""
    import dataclasses

    from .methods import make_config

    method = recipe.method
    if args.method:
        method = None if args.method == "dense" else make_config(args.method)
    overrides = {k: v for k, v in (("keep", args.keep), ("score", args.score)) if v is not None}
    if overrides:
        if method is None:
            raise UsageError("--keep/--score need a method; the dense recipe has none")
        method = dataclasses.replace(method, **overrides)
    return method


def cmd_train(args: argparse.Namespace) -> int:
    import dataclasses

    from .data import DataSpec
    from .train import TrainConfig, get_recipe, train
    from .train.loop import TrainError

    recipe = get_recipe(args.recipe)
    recipe = recipe.with_method(_method_from_args(recipe, args))
    updates = {k: v for k, v in (("cut_mode", args.cut_mode), ("cut_weight", args.cut_weight),
                                 ("distill_weight", args.distill_weight), ("warmup_epochs", args.warmup_epochs))
               if v is not None}
    if "cut_mode" in updates:
        from .losses import CUT_MODES

        if updates["cut_mode"] not in CUT_MODES:
            raise UsageError(f"--cut-mode {updates['cut_mode']!r} is not accepted; choose one of "
                             f"{', '.join(CUT_MODES)}")
    recipe = dataclasses.replace(recipe, **updates)
    cfg = TrainConfig(recipe=recipe, model=args.model, data=DataSpec(args.data, canvas=args.canvas,
                                                                     limit=args.limit),
                      output=args.output, model_args=_model_args(args.model_args), init=args.init,
                      epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, amp=args.amp,
                      workers=args.workers, seed=args.seed, resume=args.resume, stop_after=args.stop_after,
                      progress=not args.quiet)
    try:
        train(cfg)
    except TrainError as err:
        raise UsageError(str(err)) from None
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

    from .train.recipes import RECIPES

    tr = sub.add_parser("train", help="train or fine-tune with a recipe (Accelerate; use `accelerate launch -m "
                        "tokenpace.cli train ...` for several GPUs or nodes)")
    tr.add_argument("--recipe", required=True, help=f"one of: {', '.join(RECIPES)}")
    tr.add_argument("--data", required=True, help="packed-JPEG .npz, 'cifar10', or an ImageNet-style folder")
    tr.add_argument("--output", required=True, help="run folder: last.pth, metrics.jsonl, model.safetensors")
    tr.add_argument("--model", default=DEFAULT_MODEL)
    tr.add_argument("--model-args", default=None, help="timm.create_model kwargs, e.g. img_size=32,patch_size=4")
    tr.add_argument("--init", default=None, help="dense weights to fine-tune from (.safetensors or .pth)")
    tr.add_argument("--method", default=None, help="override the recipe's method: dense, evo, idle, evit, topk")
    tr.add_argument("--keep", type=float, default=None)
    tr.add_argument("--score", default=None, help="cls or random (the control)")
    tr.add_argument("--cut-mode", default=None, help="idle-finetune: both, intra, inter, none")
    tr.add_argument("--cut-weight", type=float, default=None)
    tr.add_argument("--distill-weight", type=float, default=None)
    tr.add_argument("--epochs", type=int, default=None)
    tr.add_argument("--batch-size", type=int, default=128, help="per process (default 128)")
    tr.add_argument("--lr", type=float, default=None, help="absolute peak lr (default: recipe lr x batch/base)")
    tr.add_argument("--warmup-epochs", type=int, default=None, help="override the recipe's lr warm-up epochs")
    tr.add_argument("--amp", choices=("no", "bf16", "fp16"), default="no")
    tr.add_argument("--workers", type=int, default=2)
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--canvas", type=int, default=None, help="cluttered variant: paste images on a noise canvas")
    tr.add_argument("--limit", type=int, default=None, help="use only the first N images of each split")
    tr.add_argument("--resume", action="store_true", help="continue from OUTPUT/last.pth")
    tr.add_argument("--stop-after", type=int, default=None, help="stop after N epochs in this invocation")
    tr.add_argument("--quiet", action="store_true", help="no progress bars")
    tr.set_defaults(func=cmd_train)
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
