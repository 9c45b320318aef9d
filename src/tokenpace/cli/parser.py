"""The argument parser: one model-source convention on every command (as timm's scripts have it), checked
numbers, and the old spellings, which still work for one release with a deprecation message."""
from __future__ import annotations

import argparse
import math
import sys

from ..errors import TokenpaceError
from .choices import AMP, COMPILE_MODES, CUT_MODES, DEFAULT_MODEL, DEVICES, METHOD_NAMES, OFFICIAL_ARCHS, RECIPE_NAMES


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad option ends in one line (no usage dump) and exit code 2, like every other error."""

    def error(self, message: str):
        self.exit(2, f"tokenpace: error: {message} (see: {self.prog} --help)\n")


def _integer(minimum: int, maximum: int | None = None):
    within = f">= {minimum}" if maximum is None else f"from {minimum} to {maximum}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum or (maximum is not None and value > maximum):
            raise argparse.ArgumentTypeError(f"expected an integer {within}, got {text!r}")
        return value

    parse.__name__ = f"integer {within}"
    return parse


def _number(minimum: float, inclusive: bool):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = None
        if value is None or not math.isfinite(value) or not (value >= minimum if inclusive else value > minimum):
            raise argparse.ArgumentTypeError(f"expected a finite number {'>=' if inclusive else '>'} {minimum}, "
                                             f"got {text!r}")
        return value

    parse.__name__ = "number"
    return parse


def _keep(text: str) -> float | str:
    """A keep ratio in (0, 1]; START:STOP:STEP passes through (the old spelling of --keep-sweep)."""
    if ":" in text:
        return text
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is None or not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a keep ratio in (0, 1], got {text!r}")
    return value


def _int_list(positive: bool):
    """Comma-separated integers, each > 0 (batch sizes) or of any sign (block shifts)."""
    def parse(text: str) -> list[int]:
        try:
            values = [int(v) for v in text.split(",") if v.strip()]
        except ValueError:
            values = []
        if not values or (positive and any(v <= 0 for v in values)):
            what = "positive integers" if positive else "integers (blocks, may be negative)"
            raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got {text!r}")
        repeated = sorted({v for v in values if values.count(v) > 1})
        if repeated:
            raise argparse.ArgumentTypeError(f"{text!r} lists {', '.join(map(str, repeated))} more than once")
        return values

    parse.__name__ = "integer list"
    return parse


_ints, _shifts = _int_list(positive=True), _int_list(positive=False)


def _duration(text: str) -> float:
    """"90", "90s", "10m", "1h30m" -> seconds (> 0)."""
    import re

    match = re.fullmatch(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s?)?", text.strip())
    seconds = None
    if text.strip() and match is not None and any(match.groups()):
        hours, minutes, secs = (float(g) if g else 0.0 for g in match.groups())
        seconds = hours * 3600 + minutes * 60 + secs
    if not seconds:
        raise argparse.ArgumentTypeError(f"expected a duration > 0 such as 90s, 10m or 1h30m, got {text!r}")
    return seconds


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is None or not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1), got {text!r}")
    return value


POSITIVE, NON_NEGATIVE = _integer(1), _integer(0)


def add_model_source(p: argparse.ArgumentParser, train: bool = False, config: bool = True,
                     overrides: str = "--methods, --keep and --keep-sweep", search: bool = False) -> None:
    """--model --pretrained --checkpoint --run --model-args --img-size --device --amp, the same on every command, and
    --config where the command runs a method (``config``; never on train). ``overrides``: this command's options
    that replace a recorded method; ``search``: tune, where a recorded method is the one searched."""
    g = p.add_argument_group("model source (as in timm's scripts)")
    g.add_argument("--model", default=None, metavar="NAME",
                   help=f"timm model name (default {DEFAULT_MODEL}; with --run, the run's model)")
    g.add_argument("--pretrained", action="store_true",
                   help="timm's pretrained weights: from the Hugging Face hub, or its local cache when offline"
                        + (" (fine-tune from them)" if train else ""))
    g.add_argument("--checkpoint", default=None, metavar="FILE",
                   help=("weights to start from" if train else "weights to load")
                        + ": .safetensors, or a torch checkpoint (a plain state dict, or timm's state_dict/model "
                          "entries; DDP and torch.compile prefixes are removed)"
                        + ("; the model a configuration beside it names (W.json for W.safetensors, as `tokenpace "
                           "convert` writes) is built" if train else
                           "; the method of a configuration beside it (W.json for W.safetensors, as `tokenpace "
                           "convert` writes) is the one searched (--methods searches others)" if search else
                           "; a method configuration beside it (W.json for W.safetensors, as `tokenpace convert` "
                           f"writes) is applied, as with --config ({overrides} override it)"))
    g.add_argument("--run", default=None, metavar="DIR",
                   help="a `tokenpace train` output folder: its model, model arguments and weights"
                        + (" (a dense run to fine-tune from)" if train else
                           ", and the method it was trained for, the one searched (--methods searches others)"
                           if search else f", and the method it was trained for ({overrides} override it)"))
    g.add_argument("--model-args", action="append", default=None, metavar="K=V,...",
                   help="timm.create_model arguments, e.g. img_size=32,patch_size=4,depth=6 ('/' separates tuple "
                        "items: depths=2/2/6/2); may be repeated")
    g.add_argument("--img-size", type=POSITIVE, default=None, metavar="N",
                   help="build the model for N x N inputs (timm's img_size; the same as --model-args img_size=N); "
                        "a model built for any size (PVTv2) is used at N x N")
    if train:
        g.add_argument("--device", choices=DEVICES, default=None,
                       help="cpu, or cuda (default: cuda where Accelerate finds one, else cpu)")
        g.add_argument("--amp", choices=AMP + ("no",), default=None, metavar="{none,bf16,fp16}",
                       help="mixed precision of training and validation (default none); 'no' is the old spelling")
        g.add_argument("--init", default=None, metavar="FILE", help="deprecated: the old spelling of --checkpoint")
    else:
        if config:
            g.add_argument("--config", default=None, metavar="JSON",
                           help="a method configuration file ({\"method\": ..., \"options\": {...}}: `tokenpace "
                                "tune`'s DIR/tokenpace.json, or what `tokenpace convert` writes beside its weights), "
                                f"checked against the model: dense and its configuration run ({overrides} are "
                                "refused beside it); its model is used when neither --model nor --run is given. A "
                                "--checkpoint W.safetensors picks up W.json by itself, and there they override it")
        g.add_argument("--device", choices=DEVICES, default="cpu", help="cpu (default) or cuda")
        g.add_argument("--amp", choices=AMP, default="none", help="autocast dtype: none (default), bf16 or fp16")


def add_methods(p: argparse.ArgumentParser, what: str,
                sweep: str = "run every method at each keep ratio from START to STOP (inclusive), e.g. 0.3:1.0:0.1",
                dense: bool = True) -> None:
    """--methods, --keep, --keep-sweep; ``dense``: dense may be listed (not on tune, where it is the reference)."""
    p.add_argument("--methods", default=None, metavar="LIST",
                   help="comma list of " + ("dense, " if dense else "") + ", ".join(METHOD_NAMES)
                        + "; NAME@KEEP or NAME:key=value:... for options, layer lists as 4/8 (e.g. "
                        + ("dense," if dense else "") + "evo@0.6,idle:score=random). Default: " + what)
    p.add_argument("--keep", type=_keep, default=None, metavar="X",
                   help="keep ratio in (0, 1] for every method that does not set its own")
    p.add_argument("--keep-sweep", default=None, metavar="START:STOP:STEP", help=sweep)


def add_malloc(p: argparse.ArgumentParser, keep_by_default: bool = False) -> None:
    """--malloc; ``keep_by_default`` (tune, whose choice rests on timings): keep where glibc allows it."""
    default = ("keep where the C library is glibc (with the system's behaviour, CPU speed-ups varied by up to 0.5x "
               "between processes), else system" if keep_by_default else "the system's behaviour")
    p.add_argument("--malloc", choices=("system", "keep"), default=None if keep_by_default else "system",
                   help="CPU: 'keep' makes glibc keep freed memory mapped for reuse (no page faults on every large "
                        f"tensor; the process holds its peak memory); default: {default}")


def _version() -> str:
    from .. import __version__

    return __version__


def make_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="tokenpace", description="Token pacing for vision transformers: Evo-ViT, IdleViT, "
                           "EViT and top-k on timm models.")
    parser.add_argument("--version", action="version", version=f"tokenpace {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser, metavar="COMMAND")

    bench = sub.add_parser("bench", help="measure throughput of dense vs each method, interleaved in one run",
                           description="Throughput of the dense model and each method, timed round by round in one "
                           "process (timm's protocol: random input, warm-up, device sync, median; on CUDA cuDNN "
                           "autotunes its convolutions, as timm's benchmark sets it).")
    bench.add_argument("legacy_model", nargs="?", default=None, metavar="MODEL",
                       help="deprecated: the old spelling of --model MODEL")
    add_model_source(bench)
    add_methods(bench, "dense and every method of the model's family (with --run: dense and the run's method)")
    bench.add_argument("--batch-size", type=_ints, default=None, metavar="N[,N...]",
                       help="comma list (default 32 on cpu, 256 on cuda)")
    bench.add_argument("--compile", action="store_true",
                       help="torch.compile each configuration (holds one model copy per configuration: each "
                            "compiled graph is specialised to its configuration)")
    bench.add_argument("--compile-mode", choices=COMPILE_MODES, default=None,
                       help="torch.compile mode for --compile (default: default); reduce-overhead and max-autotune "
                            "also replay CUDA graphs (CUDA only), which removes the per-kernel host cost that "
                            "bounds small batches")
    bench.add_argument("--compile-backend", default=None, metavar="NAME",
                       help="torch.compile backend for --compile (default: inductor); e.g. aot_eager traces without "
                            "generating code: a quick check that every configuration compiles")
    bench.add_argument("--cuda-graph", action="store_true",
                       help="CUDA: capture each configuration's eager forward once in a CUDA graph and time its "
                            "replays (one host call per forward: the kernels' own time, without compilation)")
    bench.add_argument("--runs", type=POSITIVE, default=None, help="timed rounds (default 10; not with --memory)")
    bench.add_argument("--warmup", type=NON_NEGATIVE, default=None,
                       help="untimed warm-up rounds (default 2; not with --memory)")
    bench.add_argument("--onnx", action="store_true",
                       help="time ONNX Runtime instead of PyTorch: each configuration is exported once (checked "
                            "against PyTorch), then its CPU session is timed the same way, fp32 (--threads sets the "
                            "session's threads); needs the onnx extra")
    bench.add_argument("--fuse-bn", action="store_true",
                       help="LeViT: fold each BatchNorm into its linear/conv layer first (the inference form)")
    bench.add_argument("--threads", type=POSITIVE, default=None, help="torch CPU threads (default: torch's)")
    bench.add_argument("--json", default=None, metavar="FILE", help="write the results as JSON to this file")
    bench.add_argument("--quiet", action="store_true", help="no per-run progress lines")
    bench.add_argument("--train", action="store_true",
                       help="time training steps (forward, backward, AdamW; Evo in layer mode with its class-token "
                            "head, Idle with its dense teacher and cut loss) instead of inference; idle then also "
                            "takes its recipe's distill_weight, cut_mode, cut_weight (idle:distill_weight=0: no "
                            "teacher)")
    bench.add_argument("--memory", action="store_true",
                       help="report peak memory instead of time: one forward (or one training step with --train) "
                            "per configuration, each in its own process on the CPU (peak RSS above the process's "
                            "baseline), max_memory_allocated on CUDA")
    bench.add_argument("--grad-checkpointing", action="store_true",
                       help="call the model's set_grad_checkpointing(True) first (for --train)")
    bench.add_argument("--memory-probe", default=None, help=argparse.SUPPRESS)  # one measurement, in a child process
    add_malloc(bench)
    bench.set_defaults(command_module="bench")

    tr = sub.add_parser("train", help="train or fine-tune with a recipe (Accelerate; `accelerate launch -m "
                        "tokenpace.cli train ...` for several processes)",
                        description="Train or fine-tune with a recipe. An existing run folder is continued only with "
                        "--resume (its recorded settings) and replaced only with --overwrite.")
    tr.add_argument("--recipe", choices=RECIPE_NAMES, default=None,
                    help="dense, evo-scratch, idle-finetune or finetune (required unless --resume)")
    tr.add_argument("--data", default=None, metavar="PATH",
                    help="packed-JPEG .npz, 'cifar10', or an ImageNet-style folder (required unless --resume)")
    tr.add_argument("--output", required=True, metavar="DIR",
                    help="run folder: run.json, last.pth, metrics.jsonl, model.safetensors")
    add_model_source(tr, train=True)
    tr.add_argument("--method", choices=("dense",) + METHOD_NAMES, default=None,
                    help="replace the recipe's method")
    tr.add_argument("--keep", type=_keep, default=None, metavar="X", help="the method's keep ratio, in (0, 1]")
    tr.add_argument("--score", default=None, help="the method's ranking: cls, received, norm or random (the control)")
    tr.add_argument("--cut-mode", choices=CUT_MODES, default=None, help="idle-finetune: the token cut loss's terms")
    tr.add_argument("--cut-weight", type=_number(0, inclusive=True), default=None, metavar="W",
                    help="idle-finetune: token cut loss weight (>= 0; default 20)")
    tr.add_argument("--distill-weight", type=_number(0, inclusive=True), default=None, metavar="W",
                    help="idle-finetune: KL weight (>= 0; the feature MSE gets 100x); 0 runs no teacher")
    tr.add_argument("--epochs", type=POSITIVE, default=None, help="override the recipe's epochs")
    tr.add_argument("--batch-size", type=POSITIVE, default=None, help="per process (default 128)")
    tr.add_argument("--lr", type=_number(0, inclusive=False), default=None,
                    help="absolute peak lr (default: recipe lr x global batch / recipe base batch)")
    tr.add_argument("--warmup-epochs", type=NON_NEGATIVE, default=None, help="override the recipe's lr warm-up epochs")
    tr.add_argument("--workers", type=NON_NEGATIVE, default=2, help="data loading processes (default 2)")
    tr.add_argument("--seed", type=_integer(0, 2**32 - 1), default=None, help="random seed, 0 to 2**32-1 (default 0)")
    tr.add_argument("--canvas", type=POSITIVE, default=None, metavar="N",
                    help="cluttered variant: paste each image on an N x N noise canvas")
    tr.add_argument("--limit", type=POSITIVE, default=None, metavar="N",
                    help="use only N images of each split, spread over it")
    tr.add_argument("--resume", action="store_true",
                    help="continue the run in --output from last.pth with its recorded settings (options that "
                         "change them are refused)")
    tr.add_argument("--overwrite", action="store_true", help="replace a run already in --output")
    tr.add_argument("--stop-after", type=POSITIVE, default=None, metavar="N",
                    help="stop after N epochs in this invocation (resume later)")
    tr.add_argument("--quiet", action="store_true", help="no progress bars")
    add_malloc(tr)
    tr.set_defaults(command_module="train")

    ev = sub.add_parser("eval", help="top-1/top-5, agreement with dense, GMACs and img/s of dense and each method",
                        description="Accuracy of the dense model and every method on one pass over the validation "
                        "set (images decoded once), GMACs and measured throughput.")
    add_model_source(ev)
    ev.add_argument("--data", required=True, metavar="PATH",
                    help="packed-JPEG .npz, 'cifar10', or an ImageNet-style folder (its val/ split)")
    add_methods(ev, "dense and every method of the model's family (with --run: dense and the run's method)")
    ev.add_argument("--plot", default=None, metavar="FILE",
                    help="sweep plot path (default eval_sweep.png; any file type matplotlib writes: .png, .pdf, .svg, "
                         "...)")
    ev.add_argument("--batch-size", type=POSITIVE, default=128, help="batch size (default 128)")
    ev.add_argument("--limit", type=POSITIVE, default=None, metavar="N", help="use only N images, spread over the set")
    ev.add_argument("--canvas", type=POSITIVE, default=None, metavar="N", help="cluttered variant (as in train)")
    ev.add_argument("--workers", type=NON_NEGATIVE, default=2, help="data loading processes (default 2)")
    ev.add_argument("--speed-runs", type=POSITIVE, default=5, help="timed rounds for img/s (default 5)")
    ev.add_argument("--json", default=None, metavar="FILE", help="write the table as JSON to this file")
    ev.add_argument("--quiet", action="store_true", help="no progress lines")
    add_malloc(ev)
    ev.set_defaults(command_module="evaluate")

    sh = sub.add_parser("show", help="PNG per image: which tokens took the full path at each selection layer",
                        description="One PNG per image: the image as the model saw it (resized and centre-cropped) "
                        "and, for each distinct selection, the full-path tokens in colour.")
    sh.add_argument("images", nargs="+", metavar="IMAGE", help="image files (all are read before any is drawn)")
    add_model_source(sh, overrides="--method, --keep and --mode")
    sh.add_argument("--method", choices=METHOD_NAMES, default=None,
                    help="default: the run's method with --run, else the family's first (evo on ViTs, LeViT and PiT, "
                         "idle on Swin, PVTv2, SAM, Hiera, SAM 2's HieraDet, TinyViT, MaxViT and CoAtNet)")
    sh.add_argument("--keep", type=_keep, default=None, metavar="X", help="keep ratio in (0, 1]")
    sh.add_argument("--mode", choices=("stage", "layer"), default=None, help="Evo's selection mode")
    sh.add_argument("--output", default="tokenpace_show", metavar="DIR",
                    help="folder for the PNGs (default tokenpace_show)")
    sh.set_defaults(command_module="show")

    cv = sub.add_parser("convert", help="a released Evo-ViT / Evo-LeViT / IdleViT checkpoint as timm / tokenpace "
                        "keys (.safetensors) and its method configuration (.json)",
                        description="Read a released checkpoint in its official layout (DeiT training format or a "
                        "bare state dict), check it, and write plain timm / tokenpace keys to DST plus the method "
                        "configuration it was trained for beside it (DST with .json), which tokenpace.load_config, "
                        "apply and every command's --checkpoint/--config accept.")
    cv.add_argument("src", metavar="SRC", help="the released file: .pth, .pth.tar or .safetensors")
    cv.add_argument("dst", metavar="DST", help="the converted weights, ending in .safetensors (the configuration is "
                                               "written beside it, ending in .json)")
    cv.add_argument("--arch", required=True, choices=OFFICIAL_ARCHS, metavar="ARCH",
                    help="the official code's model name: evo_deit_{tiny,small,base}_patch16_{224,384}, "
                         "EvoLeViT_{128S,128,192,256,384} (+ _384), deit_small, deit_base, lvvit_s, lvvit_m")
    cv.add_argument("--keep", type=_keep, default=None, metavar="X",
                    help="the keep ratio the checkpoint was trained for (default: the file name's ratio0.X for "
                         "IdleViT's files, else 0.7; 0.5 for Evo-ViT's)")
    cv.add_argument("--overwrite", action="store_true",
                    help="replace an existing DST and its .json (never SRC itself)")
    cv.set_defaults(command_module="convert")

    ex = sub.add_parser("export", help="ONNX export of the model, dense or with a method, checked with ONNX Runtime",
                        description="Export the model (dense, or patched with one method) to ONNX for inference: "
                        "opset 17 or newer, batch dimension dynamic, input 'images', output 'logits'. ONNX Runtime "
                        "must then match PyTorch within 1e-4 at batch 1 and 8. Needs the onnx extra.")
    add_model_source(ex, overrides="--method and --keep")
    ex.add_argument("--method", default=None, metavar="SPEC",
                    help="dense, or one method as in bench's --methods: " + ", ".join(METHOD_NAMES) + ", NAME@KEEP "
                         "or NAME:key=value:... (default: the method of --run/--config, else dense)")
    ex.add_argument("--keep", type=_keep, default=None, metavar="X", help="the method's keep ratio, in (0, 1]")
    ex.add_argument("--onnx", required=True, metavar="OUT.onnx", help="the ONNX file to write")
    ex.add_argument("--opset", type=_integer(17), default=18,
                    help="ONNX opset, from 17 to the newest the installed onnx defines (default 18)")
    ex.add_argument("--no-check", action="store_true",
                    help="skip the ONNX Runtime check (then onnxruntime need not be installed)")
    ex.set_defaults(command_module="export")

    add_tune(sub)

    ls = sub.add_parser("models", help="timm models and the methods each accepts (built on the meta device: no weights)",
                        description="List timm model names (pretrained tags included) of the ViT-like families and "
                                    "which tokenpace methods each accepts, with a one-line reason for each refusal. "
                                    "Every model is built on the meta device, so nothing is downloaded.")
    ls.add_argument("pattern", nargs="?", default=None,
                    help="shell-style wildcard or a word the name contains (e.g. 'siglip', 'eva02_*')")
    ls.add_argument("--all", action="store_true",
                    help="every registered architecture, not only those with pretrained weights (names without tags)")
    ls.add_argument("--summary", action="store_true", help="only the counts per model class")
    ls.add_argument("--json", default=None, metavar="FILE", help="also write the listing as JSON to FILE")
    ls.set_defaults(command_module="models")
    return parser


def add_tune(sub) -> None:
    tu = sub.add_parser("tune", help="the fastest configuration within an accuracy budget, measured on this device "
                        "and data (writes DIR/tokenpace.json)",
                        description="Search methods x keep x where selection starts (x Evo's mode) for the fastest "
                        "configuration within --max-drop points of dense (or the most accurate that reaches "
                        "--min-speedup): MACs first, then an interleaved benchmark, then accuracy on a tuning split; "
                        "the reported accuracy comes from a check split the search never saw.")
    add_model_source(tu, config=False, search=True)
    tu.add_argument("--data", required=True, metavar="PATH",
                    help="packed-JPEG .npz, 'cifar10', or an ImageNet-style folder (its val/ split), split "
                         "deterministically into tuning and check images")
    budget = tu.add_mutually_exclusive_group()
    budget.add_argument("--max-drop", type=_number(0, inclusive=True), default=None, metavar="POINTS",
                        help="the fastest configuration whose top-1 (agreement with dense without labels) on the "
                             "tuning split is at most POINTS below dense (default 0.5)")
    budget.add_argument("--min-speedup", type=_number(1, inclusive=False), default=None, metavar="X",
                        help="instead: the most accurate configuration measured at least X times faster than dense")
    add_methods(tu, "every method of the model's family (with --run: the method the run was trained for); options "
                "a method sets (e.g. evo:mode=layer) are not searched",
                sweep="the keep ratios searched, START to STOP inclusive (default 0.3:0.9:0.1)", dense=False)
    tu.add_argument("--start-shifts", type=_shifts, default=None, metavar="N[,N...]",
                    help="where selection starts: each method's default selection layers shifted by each of these "
                         "many blocks (default -1,0,1; 0 keeps the defaults)")
    tu.add_argument("--batch-size", type=POSITIVE, default=None, metavar="N",
                    help="batch size of every measurement (default 32 on cpu, 256 on cuda)")
    tu.add_argument("--time-budget", type=_duration, default=600.0, metavar="DURATION",
                    help="stop with the best answer so far after this long, e.g. 90s, 10m, 1h (default 10m)")
    tu.add_argument("--labels", choices=("auto", "none"), default="auto",
                    help="auto (default): the budget is on top-1 when every image has a label; none: on agreement "
                         "with the dense model's predictions")
    tu.add_argument("--check-fraction", type=_fraction, default=0.5, metavar="F",
                    help="share of the images held out as the check split (default 0.5)")
    tu.add_argument("--limit", type=POSITIVE, default=None, metavar="N", help="use only N images, spread over the set")
    tu.add_argument("--runs", type=POSITIVE, default=10, help="timed rounds of the finalists' benchmark (default 10)")
    tu.add_argument("--screen-runs", type=POSITIVE, default=3,
                    help="timed rounds of the quick benchmark every candidate gets (default 3)")
    tu.add_argument("--finalists", type=POSITIVE, default=6,
                    help="configurations re-timed in the final benchmark (default 6)")
    tu.add_argument("--workers", type=NON_NEGATIVE, default=2, help="data loading processes (default 2)")
    tu.add_argument("--output", required=True, metavar="DIR",
                    help="folder for tokenpace.json (the choice), search.json (every candidate) and frontier.png")
    tu.add_argument("--overwrite", action="store_true",
                    help="replace the results of an earlier search in --output (its files this search does not "
                         "write, e.g. tokenpace.json when nothing meets the budget, are removed)")
    tu.add_argument("--quiet", action="store_true", help="no progress bar")
    add_malloc(tu, keep_by_default=True)
    tu.set_defaults(command_module="tune")


def deprecated(old: str, new: str) -> None:
    print(f"tokenpace: warning: {old} is deprecated and will be removed in the next release; use {new}",
          file=sys.stderr)


def normalise(args: argparse.Namespace) -> None:
    """Map the old spellings onto the new ones (with a deprecation message) and refuse contradictory options."""
    if getattr(args, "legacy_model", None) is not None:
        deprecated(f"the positional MODEL ({args.legacy_model})", f"--model {args.legacy_model}")
        if args.model is not None and args.model != args.legacy_model:
            raise TokenpaceError(f"two models given: {args.legacy_model} and --model {args.model}; give one")
        args.model = args.legacy_model
    if getattr(args, "init", None) is not None:
        deprecated("--init", "--checkpoint")
        if args.checkpoint is not None and args.checkpoint != args.init:
            raise TokenpaceError("--init and --checkpoint both given; --init is the old spelling of --checkpoint")
        args.checkpoint = args.init
    if getattr(args, "amp", None) == "no":
        deprecated("--amp no", "--amp none")
        args.amp = "none"
    if isinstance(getattr(args, "keep", None), str):
        if not hasattr(args, "keep_sweep"):
            raise TokenpaceError(f"--keep must be one ratio in (0, 1]; got {args.keep!r}")
        deprecated(f"--keep {args.keep} (a sweep)", f"--keep-sweep {args.keep}")
        if args.keep_sweep is not None:
            raise TokenpaceError("--keep START:STOP:STEP and --keep-sweep both given; give --keep-sweep")
        args.keep_sweep, args.keep = args.keep, None
    if getattr(args, "keep_sweep", None) is not None and args.keep is not None:
        raise TokenpaceError("--keep and --keep-sweep both set the keep ratio; give one")
    if getattr(args, "pretrained", False) and (args.checkpoint is not None or args.run is not None):
        raise TokenpaceError("--pretrained and --checkpoint/--run both give the weights; choose one")
