"""Throughput benchmark on timm's protocol: warm-up, inference mode, device sync, median; the dense model and every
method are timed interleaved in one process, so their ratio is measured under the same machine state."""
from __future__ import annotations

import statistics
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, fields
from typing import Callable

import torch
from torch import nn

from .errors import TokenpaceError, user_input
from .families import adapter_for
from .methods import METHODS, MethodConfig, make_config
from .modes import mode_kept
from .patch import apply, get_patch, macs, remove
from .runners import RunMode, make_runners, warn_if_graphs_skipped
from .runtime import cudnn_autotuned

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class MethodSpec:
    """One benchmarked configuration: "dense", or a method name with its options."""

    method: str
    options: tuple[tuple[str, object], ...] = ()

    @classmethod
    def from_config(cls, config: MethodConfig) -> "MethodSpec":
        """The spec that rebuilds ``config``: keep, and every option that differs from the method's defaults."""
        default = type(config)()
        options = [("keep", config.keep)] + [(f.name, getattr(config, f.name)) for f in fields(config)
                                             if f.name != "keep" and getattr(config, f.name) != getattr(default, f.name)]
        return cls(config.name, tuple(options))

    def method_options(self) -> dict[str, object]:
        return {k: v for k, v in self.options if k not in RECIPE_OPTIONS}

    def recipe_options(self) -> dict[str, object]:
        return {k: v for k, v in self.options if k in RECIPE_OPTIONS}

    def describe(self, config: MethodConfig | None = None) -> str:
        """keep, plus every option that differs from the method's defaults, plus any recipe option. ``config``: the
        configuration as applied to a model (its defaults filled in), else the spec's own."""
        if self.method == "dense":
            return "-"
        config = config or make_config(self.method, **self.method_options())
        default = type(config)()
        shown = [f"keep={config.keep if config.keep is not None else config.default_keep}"]
        shown += [f"{f.name}={getattr(config, f.name)}" for f in fields(config)
                  if f.name != "keep" and getattr(config, f.name) != getattr(default, f.name)]
        shown += [f"{k}={v}" for k, v in self.recipe_options().items()]
        return " ".join(shown)


# Options of the IdleViT recipe that a --train spec may override, e.g. "idle:distill_weight=0" (no teacher)
RECIPE_OPTIONS = ("distill_weight", "cut_mode", "cut_weight")


def _check_recipe_options(name: str, options: dict[str, object], item: str, train: bool) -> None:
    """Recipe options belong to --train specs of idle; their values are checked by the recipe itself."""
    given = {k: v for k, v in options.items() if k in RECIPE_OPTIONS}
    if not given:
        return
    if not train:
        raise TokenpaceError(f"{next(iter(given))} in {item!r} is an option of the training recipe; use it with "
                             "--train")
    if name != "idle":
        raise TokenpaceError(f"{next(iter(given))} in {item!r} belongs to the idle-finetune recipe; accepted on idle "
                             "only")
    import dataclasses

    from .train.recipes import get_recipe

    try:
        dataclasses.replace(get_recipe(TRAIN_RECIPES[name]), **given)
    except TokenpaceError as err:
        raise TokenpaceError(f"{err} (in {item!r})") from None


def parse_methods(text: str, train: bool = False) -> list[MethodSpec]:
    """"dense,evo,idle@0.5,evo:mode=layer:stage_starts=4/8" -> specs; ``@x`` is short for ``:keep=x``.

    With ``train``, idle also takes the recipe options in RECIPE_OPTIONS (``idle:distill_weight=0``)."""
    specs = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, rest = item.partition(":")
        name, _, keep = name.partition("@")
        if name != "dense" and name not in METHODS:
            raise TokenpaceError(f"unknown method {name!r} in --methods; accepted: dense, {', '.join(sorted(METHODS))}")
        options: dict[str, object] = {}
        if keep:
            options["keep"] = _number(keep, item)
        for pair in filter(None, rest.split(":")):
            key, eq, value = pair.partition("=")
            if not eq:
                raise TokenpaceError(f"option {pair!r} in {item!r} must be key=value")
            if key in options:  # idle@0.5:keep=0.7, or one option twice: which one was meant?
                raise TokenpaceError(f"{item!r} sets {key} twice; give it once")
            options[key] = _literal(value)
        if name == "dense" and options:
            raise TokenpaceError("dense takes no options")
        if name != "dense":
            _check_recipe_options(name, options, item, train)
            with user_input():
                make_config(name, **{k: v for k, v in options.items() if k not in RECIPE_OPTIONS})  # validate now
        specs.append(MethodSpec(name, tuple(options.items())))
    if not specs:
        raise TokenpaceError(f"--methods {text!r} names no method; accepted: dense, " + ", ".join(sorted(METHODS)))
    return specs


def _number(text: str, item: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise TokenpaceError(f"keep in {item!r} must be a number; got {text!r}") from None


def _literal(text: str) -> object:
    """Option values: true/false, ints, floats, "4/8" for a tuple of layers, else the string."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    if "/" in text:
        try:
            return tuple(int(v) for v in text.split("/"))
        except ValueError:
            raise TokenpaceError(f"list {text!r} must be ints separated by '/', e.g. 4/8") from None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


@dataclass
class BenchResult:
    method: str
    config: str
    gmacs: float
    img_per_s: float
    ms_per_batch: float
    speedup: float | None  # against the dense row; None when no dense row was run
    times_s: list[float] = field(default_factory=list)
    keep: float | None = None  # the keep ratio as applied (None: dense)


def autocast_for(device: torch.device, amp: str, cache: bool = True):
    """A context factory: autocast to the --amp dtype, or nothing for "none". ``cache=False``: no cast is cached
    (as CUDA-graph capture needs)."""
    dtype = AMP_DTYPES[amp]
    if dtype is None:
        return nullcontext
    return lambda: torch.autocast(device.type, dtype=dtype, cache_enabled=cache)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def spec_config(spec: MethodSpec) -> MethodConfig | None:
    """The method config a spec runs (None: dense)."""
    return None if spec.method == "dense" else make_config(spec.method, **spec.method_options())


def configure(model: nn.Module, config: MethodConfig | None) -> nn.Module:
    """Put ``model`` in ``config`` (None: dense). apply adds no parameters and replaces the previous method, so one
    model serves every configuration in turn."""
    return remove(model) if config is None else apply(model, config)


@contextmanager
def restored(model: nn.Module):
    """Run a block that re-configures ``model`` (method, train/eval mode), then give it back as it came in."""
    patch = get_patch(model)
    original = None if patch is None else patch.config
    try:
        with mode_kept(model):
            yield model
    finally:
        configure(model, original)


def random_input(model: nn.Module, batch_size: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    """Timing input: a batch of the model's input size in its parameters' dtype on ``device``, drawn there from a
    private generator (the caller's global RNG stream is left as it was). Drawn on the device, not on the host and
    copied: ViT-B at 1024 px and batch 256 is 805 M values, seconds on a CPU."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1; got {batch_size!r}")
    dtype = next(model.parameters()).dtype
    device = torch.device(device)
    x = torch.randn(batch_size, *adapter_for(model).input_size(), device=device,
                    generator=torch.Generator(device=device).manual_seed(seed))
    return x.to(dtype if dtype.is_floating_point else torch.float32)


def check_timing(specs: list, runs: int, warmup: int, amp: str) -> None:
    """The arguments every benchmark takes, checked before any work."""
    if not specs:
        raise ValueError("specs is empty: give at least one MethodSpec (e.g. parse_methods(\"dense,evo\"))")
    for name, value, minimum in (("runs", runs, 1), ("warmup", warmup, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}")
    if amp not in AMP_DTYPES:
        raise ValueError(f"amp {amp!r} is not accepted; choose one of {', '.join(AMP_DTYPES)}")


def benchmark(
    model: nn.Module,
    specs: list[MethodSpec],
    batch_size: int,
    device: torch.device,
    amp: str = "none",
    compile: bool = False,
    runs: int = 10,
    warmup: int = 2,
    progress: Callable[[str], None] | None = None,
    compile_mode: str = "default",
    cuda_graph: bool = False,
    compile_backend: str = "inductor",
) -> list[BenchResult]:
    """Time every spec with random input, interleaved round by round; medians.

    One model (moved to ``device``) is re-configured before each timed call, outside the timing. With ``compile``
    (by torch.compile's ``compile_backend``; inductor's in ``compile_mode``, one of ``runners.COMPILE_MODES``) or
    ``cuda_graph`` (CUDA: eager kernels captured once in a CUDA graph, then replayed) each configuration gets its
    own copy instead (``runners``).
    torch.compile's CUDA-graph modes record their graphs in the second call: give them two warm-up rounds; they warn
    if inductor ran any graph without its CUDA graph."""
    device = torch.device(device)
    check_timing(specs, runs, warmup, amp)
    mode = RunMode(compile=compile, compile_mode=compile_mode, cuda_graph=cuda_graph, compile_backend=compile_backend)
    mode.check(device)
    say = progress or (lambda msg: None)
    model = model.to(device)
    x = random_input(model, batch_size, device)
    configs = [spec_config(spec) for spec in specs]
    with restored(model), cudnn_autotuned(device):  # the warm-up rounds (or capture's own) pick the algorithms
        model.eval()
        gmacs = [macs(configure(model, config)) / 1e9 for config in configs]
        applied = [applied_config(configure(model, config)) for config in configs]
        labels = [spec.method for spec in specs]
        with warn_if_graphs_skipped(mode):
            run = make_runners(model, configs, labels, configure, x, mode,
                               autocast_for(device, amp, cache=not mode.cuda_graph), say)
            with torch.inference_mode():
                times = _time_interleaved(labels, run.prepares, run.calls, device, runs, warmup, run.autocast,
                                          say, "")
    return _results(specs, gmacs, times, batch_size, applied)


def applied_config(model: nn.Module) -> MethodConfig | None:
    """The configuration a model runs, its defaults filled in (None: dense)."""
    patch = get_patch(model)
    return None if patch is None else patch.config


TRAIN_RECIPES = {"dense": "dense", "evo": "evo-scratch", "idle": "idle-finetune", "evit": "finetune",
                 "topk": "finetune"}


def train_objective(model: nn.Module, spec: MethodSpec):
    """The training objective a recipe uses for ``spec``: dense and EViT/top-k cross-entropy, Evo's two heads in
    layer mode (the first phase of training), IdleViT's cut loss and dense teacher. Class-token-free models get
    plain cross-entropy for Evo and no cut loss for Idle (both need a class token). ``model`` must be unpatched
    (it is copied as the teacher); the method is applied to it."""
    import dataclasses

    from .train.objectives import make_objective
    from .train.recipes import get_recipe

    name = TRAIN_RECIPES[spec.method]
    class_free = not adapter_for(model).has_class_token
    if name == "evo-scratch" and class_free and not hasattr(model, "forward_train_heads"):
        name = "finetune"  # no class token for the auxiliary head (timm LeViT): plain cross-entropy
    recipe = get_recipe(name)
    if recipe.objective == "idle_distill" and class_free:
        recipe = dataclasses.replace(recipe, cut_mode="none")  # the cut loss needs a class token (Swin, PVTv2)
    recipe = dataclasses.replace(recipe, method=train_config(spec), **spec.recipe_options())
    objective = make_objective(recipe, model, nn.CrossEntropyLoss(), dense_model=model)
    configure(objective.model, recipe.method)
    return objective


def train_config(spec: MethodSpec) -> MethodConfig | None:
    """The method config a training step of ``spec`` runs (None: dense): Evo in layer mode unless it says."""
    options = spec.method_options()
    if spec.method == "evo":
        options.setdefault("mode", "layer")
    return None if spec.method == "dense" else make_config(spec.method, **options)


def benchmark_train(
    model: nn.Module,
    specs: list[MethodSpec],
    batch_size: int,
    device: torch.device,
    amp: str = "none",
    runs: int = 5,
    warmup: int = 1,
    progress: Callable[[str], None] | None = None,
) -> list[BenchResult]:
    """Time one training step (forward, backward, AdamW step; teacher and cut loss included) per spec.

    The specs share one student (re-configured before each step, outside the timing) and one AdamW over every
    trainable parameter (parameters without a gradient in a step are skipped); only Idle's frozen teacher and
    Evo's class-token head are extra. The steps update the model's weights (lr 1e-6)."""
    device = torch.device(device)
    check_timing(specs, runs, warmup, amp)
    say = progress or (lambda msg: None)
    method_in, training_in = applied_config(model), model.training
    model = remove(model).to(device)
    x = random_input(model, batch_size, device)
    y = torch.randint(0, model.num_classes, (batch_size,), generator=torch.Generator().manual_seed(1)).to(device)
    autocast = autocast_for(device, amp)
    objectives = [train_objective(configure(model, None), spec).to(device).train() for spec in specs]
    params = list({id(p): p for o in objectives for m in o.trainable() for p in m.parameters()
                   if p.requires_grad}.values())
    optimizer = torch.optim.AdamW(params, lr=1e-6)
    methods = [train_config(spec) for spec in specs]
    gmacs = [macs(configure(model, method)) / 1e9 for method in methods]
    applied = [applied_config(configure(model, method)) for method in methods]

    def step(objective):
        with autocast():
            loss = objective(x, y)[0]  # backward and the optimiser step run outside autocast
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    prepares = [lambda method=method: configure(model, method) for method in methods]
    steps = [lambda objective=objective: step(objective) for objective in objectives]
    with cudnn_autotuned(device):
        times = _time_interleaved([spec.method for spec in specs], prepares, steps, device, runs, warmup,
                                  nullcontext, say, "train ")
    configure(model, method_in).train(training_in)  # the method and mode it came in with (its weights moved)
    return _results(specs, gmacs, times, batch_size, applied)


def _time_interleaved(labels, prepares, calls, device, runs, warmup, autocast, say, tag) -> list[list[float]]:
    """Wall time of each call, round by round (every call once per round), after ``warmup`` untimed rounds; each
    call's ``prepare`` (re-configuring the model) runs before its timer starts."""
    times: list[list[float]] = [[] for _ in calls]
    for r in range(warmup + runs):
        for label, prepare, call, series in zip(labels, prepares, calls, times):
            prepare()
            _sync(device)
            start = time.perf_counter()
            with autocast():
                call()
            _sync(device)
            elapsed = time.perf_counter() - start
            if r >= warmup:
                series.append(elapsed)
            phase = f"warm-up {r + 1}/{warmup}" if r < warmup else f"run {r - warmup + 1}/{runs}"
            say(f"[{tag}{phase}] {label:<6} {elapsed * 1000:9.1f} ms")
    return times


def _results(specs, gmacs, times, batch_size, applied) -> list[BenchResult]:
    medians = [statistics.median(series) for series in times]
    base = next((m for spec, m in zip(specs, medians) if spec.method == "dense"), None)  # the first dense row
    return [
        BenchResult(
            method=spec.method, config=spec.describe(config), gmacs=round(g, 6), img_per_s=batch_size / t,
            ms_per_batch=t * 1000, speedup=(base / t) if base else None, times_s=series,
            keep=None if config is None else config.keep,
        )
        for spec, g, t, series, config in zip(specs, gmacs, medians, times, applied)
    ]


def speedup_text(speedup: float | None) -> str:
    return "-" if speedup is None else f"{speedup:.2f}x"


def config_width(configs) -> int:
    """The config column's width: 28, or the longest configuration (long option lists stay in their column)."""
    return max([28, *(len(c) for c in configs)])


def format_table(results: list[BenchResult]) -> str:
    w = config_width(r.config for r in results)
    head = f"{'method':<7} {'config':<{w}} {'GMACs':>6} {'img/s':>9} {'ms/batch':>9} {'speed-up':>8}"
    rows = [head, "-" * len(head)]
    for r in results:
        rows.append(f"{r.method:<7} {r.config:<{w}} {r.gmacs:>6.3g} {r.img_per_s:>9.1f} {r.ms_per_batch:>9.1f} "
                    f"{speedup_text(r.speedup):>8}")
    return "\n".join(rows)


def result_json(model_name: str, device: torch.device, batches: dict[int, list[BenchResult]], **extra) -> dict:
    """One document for one or several batch sizes: the settings, then one row per (batch size, configuration).
    ``speedup`` is null when no dense row was run."""
    return {
        "model": model_name,
        "device": device_name(device),
        "versions": versions(),
        "cudnn_autotuned": torch.device(device).type == "cuda",  # benchmark() times under cudnn_autotuned
        **extra,
        "batch_sizes": list(batches),
        "results": [
            {"batch_size": bs, **{k: v for k, v in asdict(r).items() if k != "times_s"},
             "times_s": [round(t, 5) for t in r.times_s]}
            for bs, results in batches.items() for r in results
        ],
    }


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads)"


def versions() -> dict[str, str]:
    """Versions of what produced a result (written into every JSON output)."""
    import platform

    import timm

    from . import __version__

    return {"tokenpace": __version__, "torch": torch.__version__, "timm": timm.__version__,
            "python": platform.python_version()}


def stderr_progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def format_memory_table(rows: list[dict]) -> str:
    head = f"{'batch':>5} {'method':<7} {'config':<28} {'mode':<9} {'ckpt':<4} {'peak MiB':>9} {'vs dense':>8}"
    lines = [head, "-" * len(head)]
    dense = {(r["batch_size"], r["mode"]): r["peak_mib"] for r in rows if r["method"] == "dense"}
    for r in rows:
        base = dense.get((r["batch_size"], r["mode"]))
        ratio = f"{r['peak_mib'] / base:.2f}x" if base else "-"
        lines.append(f"{r['batch_size']:>5} {r['method']:<7} {r['config']:<28} {r['mode']:<9} "
                     f"{'yes' if r['grad_checkpointing'] else 'no':<4} {r['peak_mib']:>9.1f} {ratio:>8}")
    return "\n".join(lines)


def memory_json(model_name: str, device: torch.device, rows: list[dict], **settings) -> dict:
    """One document for a --memory run: the settings, versions and device, then one row per measurement."""
    return {"model": model_name, "device": device_name(device), "versions": versions(), **settings,
            "measure": "peak RSS above the process baseline (CPU) or max_memory_allocated above the allocated "
                       "baseline (CUDA)", "results": rows}
