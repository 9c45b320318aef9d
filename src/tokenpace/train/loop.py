"""The training loop on Hugging Face Accelerate (one process to many, bf16/fp16) with timm's data and
optimisation pieces. Resumable bit for bit: every epoch reseeds from (seed, epoch) and checkpoints atomically."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from ..data import DataSpec, build_dataset, num_classes_of
from ..families import adapter_for
from ..methods import Evo, MethodConfig
from ..patch import apply, remove
from .checkpoint import atomic_save, rng_state
from .objectives import make_objective
from .recipes import Recipe

CHECKPOINT = "last.pth"
METRICS = "metrics.jsonl"
EXPORT = "model.safetensors"
RUN_CONFIG = "run.json"


@dataclass
class TrainConfig:
    """One training run: a recipe plus model, data, machine and schedule overrides."""

    recipe: Recipe
    model: str
    data: DataSpec
    output: str
    model_args: dict = field(default_factory=dict)  # passed to timm.create_model (img_size, depth, ...)
    init: str | None = None  # dense weights to start from (required by fine-tuning recipes)
    epochs: int | None = None  # overrides the recipe
    batch_size: int = 128  # per process
    lr: float | None = None  # absolute peak learning rate; default: recipe lr x global batch / lr_base_batch
    amp: str = "no"  # no | bf16 | fp16
    workers: int = 2
    seed: int = 0
    resume: bool = False
    crop_pct: float | None = None  # eval resize/crop ratio; default timm's, or 1.0 for tiny (<= 64 px) inputs
    stop_after: int | None = None  # stop after this many epochs in this invocation (time-limited jobs)
    cpu: bool = False  # force CPU even where a GPU is visible
    progress: bool = True

    @property
    def epochs_total(self) -> int:
        return self.epochs if self.epochs is not None else self.recipe.epochs


class TrainError(ValueError):
    """A problem with the run's inputs (data, checkpoint, options), reported as one line."""


def create_student(cfg: TrainConfig, num_classes: int) -> nn.Module:
    import timm

    kwargs = dict(cfg.model_args)
    kwargs.setdefault("num_classes", num_classes)
    if cfg.recipe.global_pool is not None:
        kwargs["global_pool"] = cfg.recipe.global_pool
    kwargs.setdefault("drop_path_rate", cfg.recipe.drop_path)
    if not timm.is_model(cfg.model):
        raise TrainError(f"unknown timm model {cfg.model!r}")
    model = timm.create_model(cfg.model, **kwargs)
    if cfg.init is not None:
        load_weights(model, cfg.init)
    return model


def load_weights(model: nn.Module, path: str) -> None:
    """Dense weights from a .safetensors file or a checkpoint (.pth with a "model" entry); strict, one-line errors."""
    if not os.path.isfile(path):
        raise TrainError(f"checkpoint {path!r} does not exist")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=False)
        state = state.get("model", state) if isinstance(state, dict) else state
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first = str(err).splitlines()[0]
        raise TrainError(f"checkpoint {path!r} does not fit model {type(model).__name__} "
                         f"(another architecture?): {first}") from None


def method_for_epoch(recipe: Recipe, epoch: int, epochs: int) -> MethodConfig | None:
    """Evo's layer-to-stage schedule: layer mode for the first ``layer_to_stage`` of the epochs in evo-scratch."""
    method = recipe.method
    if isinstance(method, Evo) and recipe.objective == "evo_scratch":
        mode = "layer" if epoch < math.floor(recipe.layer_to_stage * epochs) else "stage"
        return dataclasses.replace(method, mode=mode)
    return method


def inference_method(recipe: Recipe) -> MethodConfig | None:
    """The configuration evaluated and exported: Evo always in stage mode."""
    method = recipe.method
    return dataclasses.replace(method, mode="stage") if isinstance(method, Evo) else method


def set_method(model: nn.Module, method: MethodConfig | None) -> None:
    if method is None:
        remove(model)
    else:
        apply(model, method)


def _data_config(model: nn.Module) -> dict:
    from timm.data import resolve_data_config

    data_cfg = resolve_data_config({}, model=model)
    data_cfg["input_size"] = adapter_for(model).input_size()  # the size the model was built for, not its weights'
    return data_cfg


def eval_transform(model: nn.Module, crop_pct: float | None = None):
    """timm's evaluation transform for ``model``: resize, centre crop (crop_pct 1.0 for tiny <= 64 px inputs)."""
    from timm.data import create_transform

    c = _data_config(model)
    size = c["input_size"][-1]
    crop_pct = crop_pct if crop_pct is not None else (1.0 if size <= 64 else c["crop_pct"])
    return create_transform(input_size=c["input_size"], mean=c["mean"], std=c["std"],
                            interpolation=c["interpolation"], is_training=False, crop_pct=crop_pct)


def build_transforms(cfg: TrainConfig, model: nn.Module):
    from timm.data import create_transform

    r = cfg.recipe
    c = _data_config(model)
    size = c["input_size"][-1]
    train_tf = create_transform(input_size=c["input_size"], mean=c["mean"], std=c["std"],
                                interpolation=c["interpolation"], is_training=True, auto_augment=r.auto_augment,
                                color_jitter=r.color_jitter, re_prob=r.reprob, re_mode="pixel",
                                scale=(0.35, 1.0) if size <= 64 else None)
    return train_tf, eval_transform(model, cfg.crop_pct)


def param_groups(objective: nn.Module, weight_decay: float) -> list[dict]:
    """The optimiser's parameter groups over ``objective.trainable()``: no weight decay on biases, norms and each
    module's ``no_weight_decay()`` names (timm's rule); frozen parameters left out."""
    from timm.optim import param_groups_weight_decay

    groups = []
    for module in objective.trainable():
        skip = module.no_weight_decay() if hasattr(module, "no_weight_decay") else ()
        groups += param_groups_weight_decay(module, weight_decay, skip)
    return [g | {"params": [p for p in g["params"] if p.requires_grad]} for g in groups]


def evaluate_top1(model: nn.Module, loader, accelerator=None) -> tuple[float, float]:
    """Top-1 and top-5 (percent) of ``model`` on ``loader``, gathered across processes."""
    from ..evaluate import topk_hits

    model.eval()
    correct1 = correct5 = total = 0
    with torch.inference_mode():
        for images, targets in loader:
            logits = model(images)
            if accelerator is not None:
                logits, targets = accelerator.gather_for_metrics((logits, targets))
            hits1, hits5, _ = topk_hits(logits, targets)
            correct1 += hits1
            correct5 += hits5
            total += targets.numel()
    return 100.0 * correct1 / max(total, 1), 100.0 * correct5 / max(total, 1)


def train(cfg: TrainConfig) -> list[dict]:
    """Run (or resume) training; returns the per-epoch metrics. Writes last.pth, metrics.jsonl, run.json and,
    at the end, model.safetensors (plain timm keys) under ``cfg.output``."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2
    from timm.utils import ModelEmaV3

    r = cfg.recipe
    if r.from_checkpoint and cfg.init is None and not cfg.resume:
        raise TrainError(f"recipe {r.name!r} fine-tunes dense weights: pass --init CHECKPOINT")
    accelerator = Accelerator(mixed_precision=cfg.amp, cpu=cfg.cpu)
    os.makedirs(cfg.output, exist_ok=True)
    set_seed(cfg.seed)

    train_ds = build_dataset(cfg.data, "train")
    num_classes = num_classes_of(train_ds) or 1000
    model = create_student(cfg, num_classes)
    adapter_for(model)  # unsupported models fail here, with the supported families named
    train_tf, val_tf = build_transforms(cfg, model)
    train_ds = build_dataset(cfg.data, "train", train_tf)
    val_ds = build_dataset(cfg.data, "val", val_tf)

    criterion_train = SoftTargetCrossEntropy() if (r.mixup > 0 or r.cutmix > 0) else (
        LabelSmoothingCrossEntropy(r.smoothing) if r.smoothing > 0 else nn.CrossEntropyLoss())
    objective = make_objective(r, model, criterion_train, dense_model=model)  # teacher copied before patching
    student = objective.model
    set_method(student, method_for_epoch(r, 0, cfg.epochs_total))
    for name, p in student.named_parameters():
        if name in r.freeze:
            p.requires_grad_(False)

    global_batch = cfg.batch_size * accelerator.num_processes
    lr = cfg.lr if cfg.lr is not None else r.lr * global_batch / r.lr_base_batch
    optimizer = create_optimizer_v2(param_groups(objective, r.weight_decay), opt="adamw", lr=lr,
                                    weight_decay=r.weight_decay)

    generator = torch.Generator()
    train_loader = torch.utils.data.DataLoader(train_ds, batch_size=cfg.batch_size, shuffle=True, drop_last=True,
                                               num_workers=cfg.workers, generator=generator,
                                               persistent_workers=False)
    val_loader = torch.utils.data.DataLoader(val_ds, batch_size=cfg.batch_size, num_workers=cfg.workers)
    if len(train_loader) == 0:
        raise TrainError(f"the training set has {len(train_ds)} images, fewer than one batch of {cfg.batch_size}")
    scheduler, _ = create_scheduler_v2(optimizer, sched="cosine", num_epochs=cfg.epochs_total, min_lr=r.min_lr,
                                       warmup_lr=r.warmup_lr, warmup_epochs=r.warmup_epochs, step_on_epochs=False,
                                       updates_per_epoch=len(train_loader))
    mixup = Mixup(mixup_alpha=r.mixup, cutmix_alpha=r.cutmix, switch_prob=r.mixup_switch_prob,
                  label_smoothing=r.smoothing, num_classes=num_classes) if (r.mixup > 0 or r.cutmix > 0) else None
    ema = ModelEmaV3(student, decay=r.ema_decay) if r.ema_decay else None

    objective, optimizer, train_loader, val_loader = accelerator.prepare(objective, optimizer, train_loader,
                                                                         val_loader)
    start_epoch, history = 0, []
    ckpt_path = os.path.join(cfg.output, CHECKPOINT)
    if cfg.resume:
        start_epoch, history = _resume(ckpt_path, accelerator.unwrap_model(objective), optimizer, scheduler, ema,
                                       accelerator)
    if accelerator.is_main_process:
        with open(os.path.join(cfg.output, RUN_CONFIG), "w") as f:
            json.dump(run_description(cfg, num_classes), f, indent=2)
        _rewrite_metrics(cfg.output, history)
    writer = _tensorboard(cfg.output) if accelerator.is_main_process else None

    steps_per_epoch = len(train_loader)
    last_epoch = cfg.epochs_total if cfg.stop_after is None else min(cfg.epochs_total, start_epoch + cfg.stop_after)
    for epoch in range(start_epoch, last_epoch):
        # every epoch starts from seeds that depend only on (seed, epoch): resuming replays the same batches
        set_seed(cfg.seed + epoch * 1009 + accelerator.process_index * 7919)
        generator.manual_seed(cfg.seed + epoch)
        method = method_for_epoch(r, epoch, cfg.epochs_total)
        set_method(student, method)
        objective.train()
        sums: dict[str, float] = {}
        correct = seen = 0
        start = time.perf_counter()
        bar = _progress(cfg, accelerator, steps_per_epoch, f"epoch {epoch + 1}/{cfg.epochs_total}")
        for step, (images, targets) in enumerate(train_loader):
            hard = targets
            if mixup is not None:
                images, targets = mixup(images, targets)
            loss, terms, logits = objective(images, targets)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss is {loss.item()} at epoch {epoch + 1}, step {step}")
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step_update(epoch * steps_per_epoch + step + 1)
            if ema is not None:
                ema.update(student, step=epoch * steps_per_epoch + step)
            for k, v in {"loss": loss.detach(), **terms}.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            correct += (logits.argmax(-1) == hard).sum().item()
            seen += hard.numel()
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{float(loss):.3f}")
        if bar is not None:
            bar.close()
        elapsed = time.perf_counter() - start
        # loss terms and train accuracy summed over every process, not just the main one
        keys = sorted(sums)
        totals = accelerator.reduce(torch.tensor([sums[k] for k in keys] + [correct, seen], dtype=torch.float64,
                                                 device=accelerator.device), reduction="sum").tolist()
        sums = {k: v / accelerator.num_processes for k, v in zip(keys, totals)}
        correct, seen = totals[-2], totals[-1]
        scheduler.step(epoch + 1)
        set_method(student, inference_method(r))
        val1, val5 = evaluate_top1(student, val_loader, accelerator)
        metrics = {"epoch": epoch + 1, "method_mode": getattr(method, "mode", None),
                   "lr": optimizer.param_groups[0]["lr"],
                   **{k: v / steps_per_epoch for k, v in sums.items()},
                   "train_top1": 100.0 * correct / max(seen, 1), "val_top1": val1, "val_top5": val5,
                   "img_per_s": seen / elapsed, "epoch_s": elapsed}
        if ema is not None:
            set_method(ema.module, inference_method(r))
            metrics["ema_val_top1"] = evaluate_top1(ema.module, val_loader, accelerator)[0]
        history.append(metrics)
        if accelerator.is_main_process:
            _save_checkpoint(ckpt_path, epoch + 1, accelerator.unwrap_model(objective), optimizer, scheduler, ema,
                             accelerator, history)
            with open(os.path.join(cfg.output, METRICS), "a") as f:
                f.write(json.dumps(metrics) + "\n")
            if writer is not None:
                for k, v in metrics.items():
                    if isinstance(v, (int, float)):
                        writer.add_scalar(k, v, epoch + 1)
            accelerator.print(json.dumps(metrics))
        accelerator.wait_for_everyone()
    if accelerator.is_main_process and last_epoch == cfg.epochs_total:
        export_safetensors(accelerator.unwrap_model(objective).model, os.path.join(cfg.output, EXPORT))
        if ema is not None:
            export_safetensors(ema.module, os.path.join(cfg.output, "model_ema.safetensors"))
    return history


def export_safetensors(model: nn.Module, path: str) -> None:
    """The model's weights with plain timm keys (no method state: a patched model adds none)."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tmp = f"{path}.tmp-{os.getpid()}"
    save_file(state, tmp)
    os.replace(tmp, path)


def run_description(cfg: TrainConfig, num_classes: int) -> dict:
    method = inference_method(cfg.recipe)
    return {"model": cfg.model, "model_args": {**cfg.model_args, "num_classes": num_classes,
                                               **({"global_pool": cfg.recipe.global_pool}
                                                  if cfg.recipe.global_pool else {})},
            "recipe": cfg.recipe.name,
            "method": None if method is None else {"name": method.name, **dataclasses.asdict(method)},
            "data": dataclasses.asdict(cfg.data), "epochs": cfg.epochs_total, "batch_size": cfg.batch_size,
            "seed": cfg.seed, "amp": cfg.amp, "init": cfg.init}


def _save_checkpoint(path, epoch, objective, optimizer, scheduler, ema, accelerator, history) -> None:
    state = {
        "epoch": epoch,
        "model": objective.model.state_dict(),
        "extra": objective.extra_state(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
        "ema": ema.state_dict() if ema is not None else None,
        "rng": rng_state(),
        "history": history,
    }
    atomic_save(state, path)


def _resume(path, objective, optimizer, scheduler, ema, accelerator) -> tuple[int, list[dict]]:
    if not os.path.isfile(path):
        raise TrainError(f"--resume: no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # a truncated or foreign file
        raise TrainError(f"--resume: {path} is not a readable checkpoint ({type(err).__name__})") from None
    try:
        objective.model.load_state_dict(state["model"], strict=True)
    except RuntimeError as err:
        raise TrainError(f"--resume: {path} holds another architecture: {str(err).splitlines()[0]}") from None
    objective.load_extra_state(state["extra"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if state.get("scaler") is not None and accelerator.scaler is not None:
        accelerator.scaler.load_state_dict(state["scaler"])
    if ema is not None and state.get("ema") is not None:
        ema.load_state_dict(state["ema"])
    return state["epoch"], list(state.get("history", []))


def _rewrite_metrics(output: str, history: list[dict]) -> None:
    """metrics.jsonl holds exactly the completed epochs (a resumed run drops lines of an unfinished epoch)."""
    tmp = os.path.join(output, METRICS + ".tmp")
    with open(tmp, "w") as f:
        for m in history:
            f.write(json.dumps(m) + "\n")
    os.replace(tmp, os.path.join(output, METRICS))


def _progress(cfg, accelerator, total, desc):
    if not cfg.progress or not accelerator.is_local_main_process:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)


def _tensorboard(output: str):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # TensorBoard is optional
        return None
    return SummaryWriter(os.path.join(output, "tb"))
