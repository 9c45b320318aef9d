"""The ``tokenpace`` command line. Errors in what the user asked for end in one line and exit code 2."""
from __future__ import annotations

import argparse
import json
import sys

import torch

from .models import ModelSourceError, build_model

DEFAULT_MODEL = "deit_small_patch16_224"


class UsageError(Exception):
    """A problem with the user's input, reported as one line."""


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad option ends in one line (no usage dump) and exit code 2, like every other error."""

    def error(self, message: str):
        self.exit(2, f"tokenpace: error: {message} (see: {self.prog} --help)\n")


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


def _family_methods(model: torch.nn.Module) -> str:
    """The default --methods: dense and every method the model's family runs (a clear TypeError when none)."""
    from .patch import supported_methods

    return ",".join(["dense", *supported_methods(model)])


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import benchmark, benchmark_train, format_table, parse_methods, result_json, stderr_progress

    device = _device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    specs = parse_methods(args.methods, train=args.train) if args.methods else None
    extra = {"img_size": args.img_size} if args.img_size else {}
    model = build_model(args.model, pretrained=args.pretrained, checkpoint=args.checkpoint, model_args=extra)
    specs = specs or parse_methods(_family_methods(model))
    if args.fuse_bn:
        from .families.levit import fuse_batchnorm

        fuse_batchnorm(model.eval())
    batch_sizes = args.batch_size or [256 if device.type == "cuda" else 32]
    documents = []
    for bs in batch_sizes:
        what = "training step" if args.train else "inference"
        print(f"benchmarking {args.model} {what}, batch {bs} on {device.type}, amp={args.amp}, "
              f"compile={args.compile}, {args.runs} runs after {args.warmup} warm-up, interleaved",
              file=sys.stderr, flush=True)
        progress = None if args.quiet else stderr_progress
        if args.train:
            if args.compile:
                raise UsageError("--compile is for inference; --train times eager training steps")
            results = benchmark_train(model, specs, bs, device, amp=args.amp, runs=args.runs, warmup=args.warmup,
                                      progress=progress)
        else:
            results = benchmark(model, specs, bs, device, amp=args.amp, compile=args.compile, runs=args.runs,
                                warmup=args.warmup, progress=progress)
        print(f"\n{args.model}  {what}  batch {bs}  {device.type}  amp={args.amp}  compile={args.compile}  "
              f"malloc={args.malloc}  "
              f"(median of {args.runs}; GMACs = multiply-accumulates per image, forward)")
        print(format_table(results), flush=True)
        documents.append(result_json(args.model, bs, device, results, amp=args.amp, compile=args.compile,
                                     runs=args.runs, warmup=args.warmup, train=args.train, malloc=args.malloc,
                                     torch=torch.__version__))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(documents[0] if len(documents) == 1 else documents, f, indent=2)
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


def _model_args(text: str | None) -> dict:
    """"img_size=32,patch_size=4,depths=2/2/6/2" -> kwargs for timm.create_model (ints, floats, true/false,
    '/'-separated int tuples, else strings)."""
    from .bench import _literal

    out: dict = {}
    for pair in filter(None, (text or "").split(",")):
        key, eq, value = pair.partition("=")
        if not eq:
            raise UsageError(f"--model-args entry {pair!r} must be key=value (e.g. img_size=32,depth=6)")
        out[key.strip()] = _literal(value)
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


def _source(args) -> torch.nn.Module:
    return build_model(args.model if args.run is None else None, checkpoint=args.checkpoint, run=args.run,
                       pretrained=args.pretrained, model_args=_model_args(args.model_args))


def cmd_eval(args: argparse.Namespace) -> int:
    import dataclasses

    from .bench import MethodSpec, parse_methods, stderr_progress
    from .data import DataSpec, build_dataset
    from .evaluate import evaluate, format_rows, parse_sweep, plot_sweep
    from .train.loop import eval_transform

    device = _device(args.device)
    model = _source(args)
    specs = parse_methods(args.methods or _family_methods(model))
    if args.keep:
        keeps = parse_sweep(args.keep)
        specs = [MethodSpec("dense")] + [MethodSpec(s.method, tuple({**dict(s.options), "keep": k}.items()))
                                          for s in specs if s.method != "dense" for k in keeps]
    ds = build_dataset(DataSpec(args.data, canvas=args.canvas, limit=args.limit), "val", eval_transform(model))
    loader = torch.utils.data.DataLoader(ds, batch_size=args.batch_size, num_workers=args.workers)
    rows = evaluate(model, specs, loader, device, args.batch_size, speed_runs=args.speed_runs,
                    progress=None if args.quiet else stderr_progress)
    name = args.run or args.model
    print(f"\n{name} on {args.data} ({len(ds)} images), throughput at batch {args.batch_size} on {device.type}")
    print(format_rows(rows), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": name, "data": args.data, "images": len(ds), "batch_size": args.batch_size,
                       "rows": [dataclasses.asdict(r) for r in rows]}, f, indent=2)
    if args.keep:
        path = args.plot or "eval_sweep.png"
        plot_sweep(rows, path, f"{name}: top-1 vs throughput (batch {args.batch_size}, {device.type})")
        print(f"wrote {path}", file=sys.stderr)
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    import os

    from PIL import Image, UnidentifiedImageError

    from .patch import apply
    from .train.loop import eval_transform
    from .vis import selection_figure

    model = _source(args)
    options = {} if args.keep is None else {"keep": args.keep}
    if args.mode is not None:
        if args.method != "evo":
            raise UsageError("--mode applies to --method evo only")
        options["mode"] = args.mode
    apply(model, args.method, **options)
    transform = eval_transform(model)
    os.makedirs(args.output, exist_ok=True)
    for path in args.images:
        try:
            image = Image.open(path).convert("RGB")
        except (FileNotFoundError, UnidentifiedImageError, IsADirectoryError) as err:
            raise UsageError(f"cannot read image {path!r}: {type(err).__name__}") from None
        figure = selection_figure(model, transform(image), image,
                                  f"{os.path.basename(path)}  {args.method} {options or ''}  (colour: full path)")
        out = os.path.join(args.output, os.path.splitext(os.path.basename(path))[0] + f"_{args.method}.png")
        figure.save(out)
        print(out)
    return 0


def _add_model_source(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"timm model name (default {DEFAULT_MODEL})")
    p.add_argument("--checkpoint", default=None, help="weights: .safetensors or .pth")
    p.add_argument("--run", default=None, help="a `tokenpace train` output folder (run.json + model.safetensors)")
    p.add_argument("--model-args", default=None, help="timm.create_model kwargs, e.g. img_size=32,patch_size=4")
    p.add_argument("--pretrained", action="store_true", help="load timm's pretrained weights (needs the hub)")


def _add_malloc(p: argparse.ArgumentParser) -> None:
    from .runtime import MALLOC_CHOICES

    p.add_argument("--malloc", choices=MALLOC_CHOICES, default="system",
                   help="CPU: 'keep' makes glibc keep freed memory mapped for reuse (no page faults on every large "
                        "tensor; the process holds its peak memory); default: the system's behaviour")


def _keep_freed_memory() -> None:
    from .runtime import keep_freed_memory

    try:
        keep_freed_memory()
    except RuntimeError as err:
        raise UsageError(str(err)) from None


def make_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="tokenpace", description="Token pacing for vision transformers.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    bench = sub.add_parser("bench", help="measure throughput of dense vs each method, interleaved in one run")
    bench.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=f"timm model name (default {DEFAULT_MODEL})")
    bench.add_argument("--methods", default=None,
                       help="comma list: dense, evo, idle, evit, topk; name@KEEP or name:key=value:... for options "
                            "(default: all at their defaults); with --train, idle also takes its recipe's distill_weight, "
                            "cut_mode, cut_weight (idle:distill_weight=0: no teacher)")
    bench.add_argument("--batch-size", type=_ints, default=None, help="comma list (default 32 on cpu, 256 on cuda)")
    bench.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none")
    bench.add_argument("--compile", action="store_true", help="torch.compile each model (fixed token counts)")
    bench.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    bench.add_argument("--runs", type=int, default=10, help="timed rounds (default 10)")
    bench.add_argument("--warmup", type=int, default=2, help="warm-up rounds (default 2)")
    bench.add_argument("--img-size", type=int, default=None, help="build the model for this input size")
    bench.add_argument("--fuse-bn", action="store_true",
                       help="LeViT: fold each BatchNorm into its linear/conv layer first (the inference form)")
    bench.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    bench.add_argument("--pretrained", action="store_true", help="load timm's pretrained weights (needs the hub)")
    bench.add_argument("--checkpoint", default=None, help="local weights file for the model")
    bench.add_argument("--json", default=None, help="write the results as JSON to this file")
    bench.add_argument("--quiet", action="store_true", help="no per-run progress lines")
    bench.add_argument("--train", action="store_true",
                       help="time training steps (forward, backward, AdamW; Evo in layer mode with its class-token "
                            "head, Idle with its dense teacher and cut loss) instead of inference")
    _add_malloc(bench)
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
    tr.add_argument("--distill-weight", type=float, default=None,
                    help="idle-finetune: KL weight (the feature MSE gets 100x); 0 runs no teacher")
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
    _add_malloc(tr)
    tr.set_defaults(func=cmd_train)

    ev = sub.add_parser("eval", help="top-1/top-5, agreement with dense, GMACs and img/s of dense and each method")
    _add_model_source(ev)
    ev.add_argument("--data", required=True, help="packed-JPEG .npz, 'cifar10', or an ImageNet-style folder")
    ev.add_argument("--methods", default=None, help="as in bench (default: dense and the family's methods)")
    ev.add_argument("--keep", default=None, help="sweep keep ratios START:STOP:STEP (e.g. 0.3:1.0:0.1) and plot")
    ev.add_argument("--plot", default=None, help="PNG path for the sweep plot (default eval_sweep.png)")
    ev.add_argument("--batch-size", type=int, default=128)
    ev.add_argument("--limit", type=int, default=None)
    ev.add_argument("--canvas", type=int, default=None, help="cluttered variant (as in train)")
    ev.add_argument("--workers", type=int, default=2)
    ev.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ev.add_argument("--speed-runs", type=int, default=5, help="timed rounds for img/s (default 5)")
    ev.add_argument("--json", default=None)
    ev.add_argument("--quiet", action="store_true")
    _add_malloc(ev)
    ev.set_defaults(func=cmd_eval)

    sh = sub.add_parser("show", help="PNG per image: which tokens took the full path at each selection layer")
    sh.add_argument("images", nargs="+", help="image files")
    _add_model_source(sh)
    sh.add_argument("--method", choices=("evo", "idle", "evit", "topk"), default="evo")
    sh.add_argument("--keep", type=float, default=None)
    sh.add_argument("--mode", choices=("stage", "layer"), default=None, help="Evo selection mode")
    sh.add_argument("--output", default="tokenpace_show", help="folder for the PNGs (default tokenpace_show)")
    sh.set_defaults(func=cmd_show)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    for name in ("runs", "warmup"):
        value = getattr(args, name, None)
        if value is not None and value < (1 if name == "runs" else 0):
            print(f"tokenpace: error: --{name} must be >= {1 if name == 'runs' else 0}; got {value}", file=sys.stderr)
            return 2
    try:
        if getattr(args, "malloc", "system") == "keep":
            _keep_freed_memory()
        return args.func(args)
    except (UsageError, ModelSourceError, ValueError, TypeError) as err:
        print(f"tokenpace: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
