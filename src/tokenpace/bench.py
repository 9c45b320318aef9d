"""Throughput benchmark on timm's protocol: warm-up, inference mode, device sync, median; the dense model and every
method are timed interleaved in one process, so their ratio is measured under the same machine state."""
from __future__ import annotations

import copy
import statistics
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from typing import Callable

import torch
from torch import nn

from .families import adapter_for
from .methods import METHODS, make_config
from .patch import apply, macs

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class MethodSpec:
    """One benchmarked configuration: "dense", or a method name with its options."""

    method: str
    options: tuple[tuple[str, object], ...] = ()

    def method_options(self) -> dict[str, object]:
        return {k: v for k, v in self.options if k not in RECIPE_OPTIONS}

    def recipe_options(self) -> dict[str, object]:
        return {k: v for k, v in self.options if k in RECIPE_OPTIONS}

    def describe(self) -> str:
        """keep, plus every option that differs from the method's defaults, plus any recipe option."""
        if self.method == "dense":
            return "-"
        config = make_config(self.method, **self.method_options())
        default = type(config)()
        shown = [f"keep={config.keep}"]
        shown += [f"{f.name}={getattr(config, f.name)}" for f in fields(config)
                  if f.name != "keep" and getattr(config, f.name) != getattr(default, f.name)]
        shown += [f"{k}={v}" for k, v in self.recipe_options().items()]
        return " ".join(shown)


# Options of the IdleViT recipe that a --train spec may override, e.g. "idle:distill_weight=0" (no teacher)
RECIPE_OPTIONS = ("distill_weight", "cut_mode", "cut_weight")


def _check_recipe_options(name: str, options: dict[str, object], item: str, train: bool) -> None:
    from .losses import CUT_MODES

    for key, value in options.items():
        if key not in RECIPE_OPTIONS:
            continue
        if not train:
            raise ValueError(f"{key} in {item!r} is an option of the training recipe; use it with --train")
        if name != "idle":
            raise ValueError(f"{key} in {item!r} belongs to the idle-finetune recipe; accepted on idle only")
        if key == "cut_mode" and value not in CUT_MODES:
            raise ValueError(f"cut_mode {value!r} in {item!r} is not accepted; choose one of {', '.join(CUT_MODES)}")
        if key != "cut_mode" and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
            raise ValueError(f"{key} in {item!r} must be a number >= 0; got {value!r}")


def parse_methods(text: str, train: bool = False) -> list[MethodSpec]:
    """"dense,evo,idle@0.5,evo:mode=layer:stage_starts=4/8" -> specs; ``@x`` is short for ``:keep=x``.

    With ``train``, idle also takes the recipe options in RECIPE_OPTIONS (``idle:distill_weight=0``)."""
    specs = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, rest = item.partition(":")
        name, _, keep = name.partition("@")
        if name != "dense" and name not in METHODS:
            raise ValueError(f"unknown method {name!r} in --methods; accepted: dense, {', '.join(sorted(METHODS))}")
        options: dict[str, object] = {}
        if keep:
            options["keep"] = _number(keep, item)
        for pair in filter(None, rest.split(":")):
            key, eq, value = pair.partition("=")
            if not eq:
                raise ValueError(f"option {pair!r} in {item!r} must be key=value")
            options[key] = _literal(value)
        if name == "dense" and options:
            raise ValueError("dense takes no options")
        if name != "dense":
            _check_recipe_options(name, options, item, train)
            make_config(name, **{k: v for k, v in options.items() if k not in RECIPE_OPTIONS})  # validate now
        specs.append(MethodSpec(name, tuple(options.items())))
    if not specs:
        raise ValueError("--methods is empty; accepted: dense, " + ", ".join(sorted(METHODS)))
    return specs


def _number(text: str, item: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"keep in {item!r} must be a number; got {text!r}") from None


def _literal(text: str) -> object:
    """Option values: true/false, ints, floats, "4/8" for a tuple of layers, else the string."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    if "/" in text:
        try:
            return tuple(int(v) for v in text.split("/"))
        except ValueError:
            raise ValueError(f"list {text!r} must be ints separated by '/', e.g. 4/8") from None
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
    speedup: float
    times_s: list[float] = field(default_factory=list)


def _autocast(device: torch.device, amp: str):
    """A context factory: autocast to the --amp dtype, or nothing for "none"."""
    dtype = AMP_DTYPES[amp]
    return (lambda: torch.autocast(device.type, dtype=dtype)) if dtype is not None else nullcontext


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
) -> list[BenchResult]:
    """Time every spec on copies of ``model`` with random input, interleaved round by round; medians."""
    say = progress or (lambda msg: None)
    x = torch.randn(batch_size, *adapter_for(model).input_size(), device=device)
    autocast = _autocast(device, amp)
    runners, gmacs = [], []
    for spec in specs:
        m = copy.deepcopy(model).to(device).eval()
        if spec.method != "dense":
            apply(m, spec.method, **dict(spec.options))
        gmacs.append(macs(m) / 1e9)
        runners.append(torch.compile(m) if compile else m)
    calls = [lambda runner=runner: runner(x) for runner in runners]
    with torch.inference_mode():
        times = _time_interleaved([spec.method for spec in specs], calls, device, runs, warmup, autocast, say, "")
    return _results(specs, gmacs, times, batch_size)


TRAIN_RECIPES = {"dense": "dense", "evo": "evo-scratch", "idle": "idle-finetune", "evit": "finetune",
                 "topk": "finetune"}


def train_objective(model: nn.Module, spec: MethodSpec):
    """The training objective a recipe uses for ``spec``: dense and EViT/top-k cross-entropy, Evo's two heads in
    layer mode (the first phase of training), IdleViT's cut loss and dense teacher. Class-token-free models get
    plain cross-entropy for Evo and no cut loss for Idle (both need a class token)."""
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
    options = spec.method_options()
    if spec.method == "evo":
        options.setdefault("mode", "layer")
    method = None if spec.method == "dense" else make_config(spec.method, **options)
    recipe = dataclasses.replace(recipe, method=method, **spec.recipe_options())
    objective = make_objective(recipe, model, nn.CrossEntropyLoss(), dense_model=model)
    if method is not None:
        apply(objective.model, method)
    return objective


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
    """Time one training step (forward, backward, AdamW step; teacher and cut loss included) per spec."""
    say = progress or (lambda msg: None)
    x = torch.randn(batch_size, *adapter_for(model).input_size(), device=device)
    y = torch.randint(0, model.num_classes, (batch_size,), device=device)
    autocast = _autocast(device, amp)
    steps, gmacs = [], []
    for spec in specs:
        objective = train_objective(copy.deepcopy(model), spec).to(device).train()
        params = [p for module in objective.trainable() for p in module.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-6)
        gmacs.append(macs(objective.model) / 1e9)

        def step(objective=objective, optimizer=optimizer):
            with autocast():
                loss = objective(x, y)[0]  # backward and the optimiser step run outside autocast
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        steps.append(step)
    times = _time_interleaved([spec.method for spec in specs], steps, device, runs, warmup, nullcontext, say, "train ")
    return _results(specs, gmacs, times, batch_size)


def _time_interleaved(labels, calls, device, runs, warmup, autocast, say, tag) -> list[list[float]]:
    """Wall time of each call, round by round (every call once per round), after ``warmup`` untimed rounds."""
    times: list[list[float]] = [[] for _ in calls]
    for r in range(warmup + runs):
        for label, call, series in zip(labels, calls, times):
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


def _results(specs, gmacs, times, batch_size) -> list[BenchResult]:
    medians = [statistics.median(series) for series in times]
    base = medians[0] if specs[0].method == "dense" else None
    return [
        BenchResult(
            method=spec.method, config=spec.describe(), gmacs=round(g, 6), img_per_s=batch_size / t,
            ms_per_batch=t * 1000, speedup=(base / t) if base else float("nan"), times_s=series,
        )
        for spec, g, t, series in zip(specs, gmacs, medians, times)
    ]


def format_table(results: list[BenchResult]) -> str:
    head = f"{'method':<7} {'config':<28} {'GMACs':>6} {'img/s':>9} {'ms/batch':>9} {'speed-up':>8}"
    rows = [head, "-" * len(head)]
    for r in results:
        rows.append(f"{r.method:<7} {r.config:<28} {r.gmacs:>6.3g} {r.img_per_s:>9.1f} {r.ms_per_batch:>9.1f} "
                    f"{r.speedup:>7.2f}x")
    return "\n".join(rows)


def result_json(model_name: str, batch_size: int, device: torch.device, results: list[BenchResult],
                **extra) -> dict:
    return {
        "model": model_name,
        "batch_size": batch_size,
        "device": device_name(device),
        **extra,
        "results": [
            {k: v for k, v in asdict(r).items() if k != "times_s"} | {"times_s": [round(t, 5) for t in r.times_s]}
            for r in results
        ],
    }


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads)"


def stderr_progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
