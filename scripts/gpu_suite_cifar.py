"""CIFAR-10 section of the GPU suite: a DeiT-Tiny-width ViT trained from scratch inside a time box, Evo(0.5)
trained from scratch the same way, Idle(0.7) fine-tuned from the dense weights, each evaluated with its
random-score control and a keep sweep.

Training is budgeted in time, not epochs: the learning-rate schedule (linear warm-up, cosine decay) follows the
fraction of the budget used, so a run ends annealed and on time on any GPU. A step cap (``max_steps``) can end it
earlier: Evo trains for the dense run's number of steps, the paper's equal-epochs comparison.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field, fields, replace

import torch
from torch import nn

import tokenpace
from gpu_suite_common import Deadline
import gpu_suite_steps
from gpu_suite_data import DeviceSplit, normalize
from gpu_suite_steps import TrainSteps, autocast
from tokenpace.train.objectives import EvoScratchObjective, Objective, make_objective
from tokenpace.train.recipes import get_recipe

SWEEP_METHODS = ("evo", "idle", "evit", "topk")  # applied to the dense model without fine-tuning


@dataclass(frozen=True)
class CifarConfig:
    data: str
    train_limit: int | None = None  # None: all 50,000 training images
    test_limit: int | None = None  # None: all 10,000 test images
    img_size: int = 32
    patch_size: int = 4
    embed_dim: int = 192  # DeiT-Tiny width
    depth: int = 12
    num_heads: int = 3
    batch_size: int = 512  # the batch ``lr`` and ``idle_lr`` are given for
    # batches timed before the dense run; the smallest within PICK_SHARE of the best images/s trains, its learning
    # rates scaled by sqrt(batch / batch_size). The first H200 run's 512-image step (37 ms) looked host-bound; with
    # the steps replayed from CUDA graphs (from the third run on) a step costs its GPU time, so 256 competes too.
    batch_choices: tuple[int, ...] = (256, 512, 1024, 2048)
    lr: float = 1e-3
    min_lr: float = 1e-5
    warmup: float = 0.05  # fraction of the budget
    weight_decay: float = 0.05
    drop_path: float = 0.1
    label_smoothing: float = 0.1
    crop_pad: int = 4
    erase_prob: float = 0.25
    amp: str = "bf16"  # "bf16" or "none"
    max_epochs: int | None = None  # cap (smoke); None: the time budget alone
    eval_batch: int = 1000
    eval_reserve_s: float = 10.0  # left at the end of a training section for its evaluation and sweeps (the dense
    # one: 4 methods x 8 keeps x 2 scores + 1 = 65 passes over the 10,000 test images, ~0.1 s each; an overrun is
    # absorbed by the alarm's grace and comes off the last section)
    evo_keep: float = 0.5
    idle_keep: float = 0.7
    idle_lr: float = 1e-4
    idle_objective: str = "ce"  # "ce" (cross-entropy) or "distill" (the idle-finetune recipe's objective)
    sweep_keeps: tuple[float, ...] = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
    cuda_graphs: bool = True  # on CUDA, replay each training step from a CUDA graph (gpu_suite_steps); the suite
    # turns it off where its preflight (gpu_suite_preflight, in a process of its own) could not capture the steps
    # training images pasted at random places on noise of this size before augmenting (None: the images as they
    # are); img_size must then equal it. The clutter section sets it, with the patch below
    canvas: int | None = None
    clutter_canvas: int = 64
    clutter_patch_size: int = 8  # 8x8 patches of 64 px: as many tokens as patch 4 at 32 px, the object 16 of 64

    def cluttered(self) -> "CifarConfig":
        """This configuration on cluttered images: the canvas, its patch size, the same token count."""
        return replace(self, canvas=self.clutter_canvas, img_size=self.clutter_canvas,
                       patch_size=self.clutter_patch_size)

    def __post_init__(self) -> None:
        for name in ("img_size", "patch_size", "embed_dim", "num_heads", "batch_size", "eval_batch",
                     "clutter_canvas", "clutter_patch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1; got {getattr(self, name)}")
        if self.depth < 2:
            raise ValueError(f"depth must be at least 2 (Evo selects after its first block); got {self.depth}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not a multiple of num_heads {self.num_heads}")
        positive, from_zero = (lambda v: v > 0, "above 0"), (lambda v: v >= 0, "0 or more")
        below_one, up_to_one = (lambda v: 0 <= v < 1, "in [0, 1)"), (lambda v: 0 <= v <= 1, "in [0, 1]")
        for names, (ok, accepted) in ((("lr", "idle_lr"), positive),
                                      (("min_lr", "weight_decay", "eval_reserve_s"), from_zero),
                                      (("warmup", "drop_path", "label_smoothing"), below_one),
                                      (("erase_prob",), up_to_one)):
            for name in names:
                value = getattr(self, name)
                if not (math.isfinite(value) and ok(value)):
                    raise ValueError(f"{name} {value!r} is out of range; accepted: {accepted}")
        if self.crop_pad < 0:
            raise ValueError(f"crop_pad must be 0 or more; got {self.crop_pad}")
        for name in ("evo_keep", "idle_keep"):
            if not 0 < getattr(self, name) < 1:
                raise ValueError(f"{name} {getattr(self, name)!r} is out of range; accepted: (0, 1)")
        if not self.sweep_keeps or any(not 0 < k <= 1 for k in self.sweep_keeps):
            raise ValueError(f"sweep_keeps must be keeps in (0, 1]; got {self.sweep_keeps}")
        if self.canvas is not None and self.canvas != self.img_size:
            raise ValueError(f"canvas {self.canvas} must equal img_size ({self.img_size}): the model sees the canvas")
        for size, patch, what in ((self.img_size, self.patch_size, "img_size"),
                                  (self.clutter_canvas, self.clutter_patch_size, "clutter_canvas")):
            if size % patch:
                raise ValueError(f"{what} {size} is not a multiple of its patch size {patch}")
        if self.clutter_canvas < 32:
            raise ValueError(f"clutter_canvas {self.clutter_canvas} is smaller than the 32 px CIFAR-10 images")
        if not self.batch_choices or any(b < 1 for b in self.batch_choices):
            raise ValueError(f"batch_choices must be positive batch sizes; got {self.batch_choices}")
        if self.amp not in ("bf16", "none"):
            raise ValueError(f"amp {self.amp!r} is not accepted; choose bf16 or none")
        if self.idle_objective not in ("ce", "distill"):
            raise ValueError(f"idle_objective {self.idle_objective!r} is not accepted; choose ce or distill")


# set by the suite itself (the data path, the clutter section's canvas and size, the trial's verdict), None by
# default (a cap, a limit), or a tuple of floats, which key=value lists cannot spell (sweep_keeps)
NOT_OVERRIDABLE = ("data", "canvas", "img_size", "cuda_graphs", "train_limit", "test_limit", "max_epochs",
                   "sweep_keeps")


def override(cfg: CifarConfig, options: dict) -> CifarConfig:
    """``cfg`` with recipe fields replaced (``--cifar depth=6,drop_path=0``): each value must have its default's type
    (an int where a float is due is taken; one int where a tuple of ints is due is a tuple of one)."""
    allowed = {f.name: getattr(cfg, f.name) for f in fields(cfg) if f.name not in NOT_OVERRIDABLE}
    changes = {}
    for key, value in options.items():
        if key not in allowed:
            what = "set by the suite, not by --cifar" if key in NOT_OVERRIDABLE else "not a recipe field"
            raise ValueError(f"--cifar {key}: {what}; accepted: {', '.join(sorted(allowed))}")
        default, plain_int = allowed[key], isinstance(value, int) and not isinstance(value, bool)
        if isinstance(default, tuple) and plain_int:
            value = (value,)
        elif isinstance(default, float) and plain_int:
            value = float(value)
        ok = isinstance(value, type(default)) and (isinstance(default, bool) or not isinstance(value, bool))
        if isinstance(default, tuple):
            ok = ok and len(value) > 0 and all(isinstance(v, type(default[0])) for v in value)
        if not ok:
            raise ValueError(f"--cifar {key}={value!r}: expected a value like its default {default!r}")
        changes[key] = value
    try:
        return replace(cfg, **changes)  # ranges and consistency: CifarConfig.__post_init__
    except ValueError as err:
        raise ValueError(f"--cifar: {err}") from None


@dataclass
class TrainReport:
    steps: int
    epochs: float
    seconds: float
    stopped_by: str  # "time" or "steps"
    history: list[dict] = field(default_factory=list)
    step_mode: str = ""  # how the steps ran: "cuda_graph" or "eager: <why>" (TrainSteps.mode)
    captures: int = 0  # CUDA graph captures of the step (Evo's switch to stage mode captures it again)


def cifar_vit(cfg: CifarConfig, global_pool: str = "token", drop_path: float | None = None) -> nn.Module:
    """timm's VisionTransformer at DeiT-Tiny width, patch 4 at 32 px (64 patch tokens + class token)."""
    import timm

    return timm.create_model("deit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=cfg.img_size,
                             patch_size=cfg.patch_size, embed_dim=cfg.embed_dim, depth=cfg.depth,
                             num_heads=cfg.num_heads, global_pool=global_pool,
                             drop_path_rate=cfg.drop_path if drop_path is None else drop_path)


def lr_at(progress: float, peak: float, floor: float, warmup: float) -> float:
    """Linear warm-up over the first ``warmup`` of the budget, then cosine from ``peak`` down to ``floor``."""
    if progress < warmup:
        return peak * max(progress / warmup, 1e-3)
    t = min(1.0, (progress - warmup) / max(1e-9, 1 - warmup))
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * t))


PICK_SHARE = 0.8  # a larger batch trains only if it buys more than 1/0.8 of the smaller one's images per second


def choose_batch(images_per_s: dict[int, float]) -> int:
    """The smallest batch whose images per second are within PICK_SHARE of the best."""
    best = max(images_per_s.values())
    return min(b for b, r in images_per_s.items() if r >= PICK_SHARE * best)


def pick_batch(data: DeviceSplit, cfg: CifarConfig, device: torch.device, log,
               steps: int = 10) -> tuple[CifarConfig, dict]:
    """Time ``steps`` training steps of a throw-away dense model at each batch of ``cfg.batch_choices``, run as the
    training runs them (``TrainSteps``: after its warm-up and, on CUDA, its graph capture); train at the smallest
    batch within PICK_SHARE of the best images per second, with the learning rates scaled by
    sqrt(batch / cfg.batch_size). Where a step is bound by the host, a larger batch costs little more time and
    trains on more images; where the GPU bounds it, the smaller batch's extra steps win."""
    began = time.perf_counter()
    rates, modes = {}, {}
    if len(cfg.batch_choices) == 1:
        chosen = cfg.batch_choices[0]
    else:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            # the dense run's draws stay those of an unpicked run
            rates, modes = _time_batches(data, cfg, device, steps)
        if not rates:
            raise ValueError(f"every batch of {cfg.batch_choices} exceeds the {len(data)} training images")
        chosen = choose_batch(rates)
    scale = math.sqrt(chosen / cfg.batch_size)
    picked = replace(cfg, batch_size=chosen, lr=cfg.lr * scale, idle_lr=cfg.idle_lr * scale)
    record = {"images_per_s": {str(b): round(r, 1) for b, r in rates.items()}, "batch_size": chosen,
              "lr": picked.lr, "idle_lr": picked.idle_lr, "seconds": round(time.perf_counter() - began, 2),
              "step_modes": {str(b): m for b, m in modes.items()}}
    if rates:
        log("  batch pick: " + ", ".join(f"{b}: {r:.0f} img/s ({modes[b]})" for b, r in rates.items())
            + f" -> {chosen}, lr {picked.lr:.2e} ({record['seconds']:.1f} s)")
    return picked, record


def _time_batches(data: DeviceSplit, cfg: CifarConfig, device: torch.device,
                  steps: int) -> tuple[dict[int, float], dict[int, str]]:
    """Images per second of a throw-away dense model's training steps at each batch that the data can fill, and
    how each batch's steps ran (``TrainSteps.mode``)."""
    rates, modes = {}, {}
    for batch in sorted(cfg.batch_choices):
        if batch > len(data):
            continue
        objective = Objective(cifar_vit(cfg), nn.CrossEntropyLoss()).to(device).train()
        runner = TrainSteps(objective, data, cfg, cfg.lr, device)
        # untimed: the warm-up (lazy initialisation, the first step's cost) and the capture with its first replay
        for i in range(runner.warmup + 1 + steps):
            if i == runner.warmup + 1:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                start = time.perf_counter()
            runner(torch.randint(len(data), (batch,), device=device))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        rates[batch] = batch * steps / (time.perf_counter() - start)
        modes[batch] = runner.mode
        del objective, runner  # the graph and its memory pool with it
    if device.type == "cuda" and not gpu_suite_steps.capture_failed_here:  # (emptying would assert then)
        torch.cuda.empty_cache()  # the largest batch's activations: not held through the dense run
    return rates, modes


def train_timed(objective: Objective, data: DeviceSplit, cfg: CifarConfig, seconds: float, lr: float,
                min_lr: float, device: torch.device, log, max_steps: int | None = None,
                on_progress=None) -> TrainReport:
    """Train until ``seconds`` pass or ``max_steps`` are done, whichever comes first; the schedule follows the
    larger of the two fractions. ``on_progress(p)`` runs before each step and returns whether it changed the
    model's forward (Evo switches its mode there), which a CUDA graph of the step must then capture again."""
    objective.to(device).train()
    runner = TrainSteps(objective, data, cfg, lr, device)
    steps_per_epoch = len(data) // cfg.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"{len(data)} training images are fewer than one batch of {cfg.batch_size}")
    if cfg.max_epochs is not None:
        cap = cfg.max_epochs * steps_per_epoch
        max_steps = cap if max_steps is None else min(max_steps, cap)
    report = TrainReport(steps=0, epochs=0.0, seconds=0.0, stopped_by="time")
    start = time.perf_counter()
    last_log = start
    progress = 0.0
    while progress < 1.0:
        order = torch.randperm(len(data), device=device)
        loss_sum = torch.zeros((), device=device)
        done = 0
        for i in range(steps_per_epoch):
            elapsed = time.perf_counter() - start
            progress = max(elapsed / seconds, report.steps / max_steps if max_steps else 0.0)
            if progress >= 1.0:
                break
            if on_progress is not None and on_progress(progress):
                runner.invalidate()
            step_lr = lr_at(progress, lr, min_lr, cfg.warmup)
            runner.set_lr(step_lr)
            loss_sum += runner(order[i * cfg.batch_size:(i + 1) * cfg.batch_size])
            report.steps += 1
            done += 1
        if done == 0:
            break
        mean_loss = (loss_sum / done).item()  # the one host sync per epoch
        if not math.isfinite(mean_loss):
            raise FloatingPointError(f"training loss is {mean_loss} after {report.steps} steps")
        now = time.perf_counter()
        report.epochs += done / steps_per_epoch
        report.history.append({"epoch": round(report.epochs, 3), "loss": round(mean_loss, 4),
                               "lr": step_lr, "seconds": round(now - start, 2)})
        if now - last_log >= 10 or progress >= 1.0:
            log(f"  epoch {report.epochs:6.2f}  loss {mean_loss:.4f}  lr {step_lr:.2e}  {now - start:6.1f} s")
            last_log = now
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    report.seconds = time.perf_counter() - start
    report.stopped_by = "steps" if max_steps and report.steps >= max_steps else "time"
    report.step_mode, report.captures = runner.mode, runner.captures
    runner.release()
    objective.eval()
    return report


def top1(model: nn.Module, data: DeviceSplit, cfg: CifarConfig, device: torch.device) -> float:
    """Top-1 (%) on every image of ``data``; random scores draw from a fixed seed, so controls repeat."""
    model.eval()
    torch.manual_seed(0)
    correct = torch.zeros((), dtype=torch.long, device=device)
    with torch.inference_mode(), autocast(cfg, device):
        for start in range(0, len(data), cfg.eval_batch):
            images = normalize(data.images[start:start + cfg.eval_batch])
            correct += (model(images).argmax(-1) == data.labels[start:start + cfg.eval_batch]).sum()
    return 100.0 * correct.item() / len(data)  # one host sync per pass, not one per batch


def keep_sweep(model: nn.Module, method: str, options: dict, data: DeviceSplit, cfg: CifarConfig,
               device: torch.device) -> dict:
    """Top-1 of ``method`` at every keep of the sweep, ranked by the model's attention and by random scores.
    Leaves ``model`` patched with the last configuration: callers re-apply their own."""
    out = {"keeps": list(cfg.sweep_keeps), "attention": [], "random": []}
    for keep in cfg.sweep_keeps:
        for score, series in ((None, "attention"), ("random", "random")):
            tokenpace.apply(model, method, **{**options, "keep": keep, "score": score})
            out[series].append(round(top1(model, data, cfg, device), 3))
    return out


def evaluate_model(model: nn.Module, own: tuple[str, dict] | None, sweep_methods: tuple[str, ...],
                   data: DeviceSplit, cfg: CifarConfig, device: torch.device) -> dict:
    """Accuracy of ``model`` as trained (``own``: its method and options, None for dense), of the same weights run
    dense, of its random-score control, and the keep sweeps of ``sweep_methods``."""
    tokenpace.remove(model)
    result = {"dense_form_top1": round(top1(model, data, cfg, device), 3), "test_images": len(data)}
    if own is None:
        result["top1"] = result["dense_form_top1"]
    else:
        method, options = own
        tokenpace.apply(model, method, **options)
        result["top1"] = round(top1(model, data, cfg, device), 3)
        result["macs"] = tokenpace.macs(model)
        tokenpace.apply(model, method, **{**options, "score": "random"})
        result["random_top1"] = round(top1(model, data, cfg, device), 3)
        result["config"] = {"method": method, **options}
    result["sweeps"] = {}
    for method in sweep_methods:
        base = dict(own[1]) if own is not None and own[0] == method else {}
        result["sweeps"][method] = keep_sweep(model, method, base, data, cfg, device)
    tokenpace.remove(model)
    if own is not None:
        tokenpace.apply(model, own[0], **own[1])
    return result


def training_seconds(deadline: Deadline, cfg: CifarConfig) -> float:
    seconds = deadline.remaining() - cfg.eval_reserve_s
    if seconds <= 1:
        raise RuntimeError(f"only {deadline.remaining():.1f} s left: no time to train")
    return seconds


def train_dense(train: DeviceSplit, cfg: CifarConfig, device: torch.device, deadline: Deadline, log):
    model = cifar_vit(cfg)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    report = train_timed(Objective(model, criterion), train, cfg, training_seconds(deadline, cfg), cfg.lr,
                         cfg.min_lr, device, log)
    return model, report


def evo_scratch_objective(cfg: CifarConfig) -> EvoScratchObjective:
    """The evo-scratch recipe's objective on a new model: average-pool head + auxiliary class-token head
    (0.5 / 0.5), the model patched with Evo in layer mode (the first 2/3 of training)."""
    recipe = get_recipe("evo-scratch")
    model = cifar_vit(cfg, global_pool=recipe.global_pool)
    objective = EvoScratchObjective(model, nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing),
                                    recipe.aux_weight)
    tokenpace.apply(model, "evo", keep=cfg.evo_keep, mode="layer")
    return objective


def freeze_as_idle_finetune(model: nn.Module) -> nn.Module:
    """``model`` with the parameters the idle-finetune recipe freezes (cls_token, pos_embed) frozen."""
    for name, p in model.named_parameters():
        if name in get_recipe("idle-finetune").freeze:
            p.requires_grad_(False)
    return model


def train_evo(train: DeviceSplit, cfg: CifarConfig, device: torch.device, deadline: Deadline, log,
              max_steps: int | None):
    """Evo-ViT from scratch (the evo-scratch recipe, :func:`evo_scratch_objective`), layer-wise selection for the
    first 2/3 of training, then stage-wise."""
    recipe = get_recipe("evo-scratch")
    objective = evo_scratch_objective(cfg)
    model = objective.model
    switched = []

    def to_stage_mode(progress: float) -> bool:
        if switched or progress < recipe.layer_to_stage:
            return False
        tokenpace.apply(model, "evo", keep=cfg.evo_keep, mode="stage")
        switched.append(progress)
        log(f"  Evo: layer -> stage mode at {progress:.2f} of training")
        return True

    report = train_timed(objective, train, cfg, training_seconds(deadline, cfg), cfg.lr, cfg.min_lr, device, log,
                         max_steps=max_steps, on_progress=to_stage_mode)
    tokenpace.apply(model, "evo", keep=cfg.evo_keep, mode="stage")
    return model, report


def finetune_idle(dense: nn.Module, train: DeviceSplit, cfg: CifarConfig, device: torch.device,
                  deadline: Deadline, log):
    """Idle from the dense weights: cross-entropy, or the idle-finetune recipe's objective (frozen dense teacher,
    token cut loss, distillation); cls_token and pos_embed frozen as in that recipe."""
    recipe = get_recipe("idle-finetune")
    model = freeze_as_idle_finetune(copy.deepcopy(dense).train())
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    if cfg.idle_objective == "distill":
        objective = make_objective(replace(recipe, method=tokenpace.Idle(keep=cfg.idle_keep)), model, criterion,
                                   dense_model=dense)
    else:
        objective = Objective(model, criterion)
    tokenpace.apply(model, "idle", keep=cfg.idle_keep)
    fine = replace(cfg, warmup=0.0)
    report = train_timed(objective, train, fine, training_seconds(deadline, cfg), cfg.idle_lr, cfg.idle_lr / 100,
                         device, log)
    return model, report


def plot_sweeps(results: dict, path: str) -> None:
    """Top-1 against keep per trained model: class attention (solid) against random scores (dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    titles = {"dense": "dense, methods applied without training", "evo": "Evo(0.5) trained from scratch",
              "idle": "Idle(0.7) fine-tuned from dense", "clutter": "Evo(0.5) from scratch, cluttered 64 px"}
    names = [n for n in titles if n in results and results[n].get("sweeps")]
    if not names:
        return
    fig, axes = plt.subplots(1, len(names), figsize=(4.6 * len(names), 3.8), dpi=120, squeeze=False)
    for ax, name in zip(axes[0], names):
        res = results[name]
        for i, (method, sweep) in enumerate(res["sweeps"].items()):
            color = f"C{i}"
            ax.plot(sweep["keeps"], sweep["attention"], "-o", color=color, ms=3, label=f"{method}: attention")
            ax.plot(sweep["keeps"], sweep["random"], "--x", color=color, ms=3, label=f"{method}: random")
        ax.axhline(res["dense_form_top1"], color="black", lw=0.8, ls=":", label="same weights, dense")
        ax.set_title(f"{titles[name]}\n(top-1 {res['top1']:.2f}%, {res['test_images']} test images)", fontsize=8)
        ax.set_xlabel("keep")
        ax.set_ylabel("top-1 (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
