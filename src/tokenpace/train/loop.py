"""The training loop on Hugging Face Accelerate (one process to many, bf16/fp16) with timm's data and
optimisation pieces. Resumable bit for bit: every epoch reseeds from (seed, epoch), every sample's augmentation from
(seed, epoch, index), and checkpoints are written atomically. No host sync per step: loss terms, accuracy and the
finite-loss check accumulate on the device and are read once per log interval."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from ..data import DataSpec, build_dataset, check_classifier, check_labels, data_config, eval_transform, num_classes_of
from ..errors import TokenpaceError, memory_guard, note, user_input
from ..families import adapter_for
from ..methods import Evo, MethodConfig
from ..outputs import write_atomically
from ..patch import apply, remove
from ..runtime import cudnn_autotuned
from ..weights import classifier_names, export_safetensors, file_sha256, load_weights, mismatch
from . import runfolder
from .checkpoint import atomic_save, rng_state
from .objectives import make_objective
from .recipes import Recipe
from .runfolder import CHECKPOINT, EMA_EXPORT, METRICS
from .sampling import EpochSampler, SeededSamples

AMP_MODES = {"none": "no", "no": "no", "bf16": "bf16", "fp16": "fp16"}  # ours (and Accelerate's "no") -> Accelerate's
LOG_EVERY = 50  # steps between reads of the device-side loss sums (the only host syncs of an epoch)
__all__ = ["TrainConfig", "TrainError", "create_student", "eval_transform", "load_weights", "train"]


@dataclass
class TrainConfig:
    """One training run: a recipe plus model, data, machine and schedule overrides."""

    recipe: Recipe
    model: str
    data: DataSpec
    output: str
    model_args: dict = field(default_factory=dict)  # passed to timm.create_model (img_size, depth, ...)
    init: str | None = None  # weights to start from (required by fine-tuning recipes unless ``pretrained``)
    pretrained: bool = False  # start from timm's pretrained weights (hub or local cache)
    epochs: int | None = None  # overrides the recipe
    batch_size: int = 128  # per process
    lr: float | None = None  # absolute peak learning rate; default: recipe lr x global batch / lr_base_batch
    amp: str = "none"  # none | bf16 | fp16
    workers: int = 2
    seed: int = 0
    resume: bool = False  # continue the run in ``output`` (its recorded settings must match these)
    overwrite: bool = False  # replace a run already in ``output``
    crop_pct: float | None = None  # eval resize/crop ratio; default timm's, or 1.0 for tiny (<= 64 px) inputs
    stop_after: int | None = None  # stop after this many epochs in this invocation (time-limited jobs)
    cpu: bool = False  # force CPU even where a GPU is visible
    progress: bool = True

    @property
    def epochs_total(self) -> int:
        return self.epochs if self.epochs is not None else self.recipe.epochs


class TrainError(TokenpaceError):
    """A problem with the run's inputs (data, checkpoint, options), reported as one line."""


def check_config(cfg: TrainConfig) -> None:
    """Numbers and switches of ``cfg`` (the recipe checks its own settings when it is built)."""
    def at_least(name: str, value, minimum: int, optional: bool = False) -> None:
        if optional and value is None:
            return
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise TrainError(f"{name} must be an integer >= {minimum}; got {value!r}")

    at_least("epochs", cfg.epochs_total, 1)
    at_least("batch size", cfg.batch_size, 1)
    at_least("workers", cfg.workers, 0)
    at_least("stop_after", cfg.stop_after, 1, optional=True)
    if cfg.lr is not None and (isinstance(cfg.lr, bool) or not isinstance(cfg.lr, (int, float)) or not cfg.lr > 0):
        raise TrainError(f"lr must be a number > 0; got {cfg.lr!r}")
    if cfg.amp not in AMP_MODES:
        raise TrainError(f"amp {cfg.amp!r} is not accepted; choose one of none, bf16, fp16")
    if cfg.pretrained and cfg.init is not None:
        raise TrainError("--pretrained and --checkpoint both give the starting weights; choose one")
    if cfg.amp == "fp16" and (cfg.cpu or not torch.cuda.is_available()):
        raise TrainError("--amp fp16 needs a GPU: on the CPU Accelerate runs fp16 in float32; use --amp bf16 or none")
    r = cfg.recipe
    if (r.mixup > 0 or r.cutmix > 0) and cfg.batch_size % 2:
        raise TrainError(f"recipe {r.name!r} mixes images in pairs (mixup/cutmix), which needs an even batch size; "
                         f"got {cfg.batch_size}")
    if cfg.recipe.from_checkpoint and cfg.init is None and not cfg.pretrained:
        raise TrainError(f"recipe {cfg.recipe.name!r} fine-tunes dense weights (and builds any teacher from them): "
                         "pass --checkpoint FILE, --run DIR (a dense run) or --pretrained")


def student_args(cfg: TrainConfig, num_classes: int) -> dict:
    """timm.create_model arguments of the student as run.json records them (drop path comes from the recipe)."""
    kwargs = {**cfg.model_args, "num_classes": cfg.model_args.get("num_classes", num_classes)}
    if cfg.recipe.global_pool is not None:
        kwargs["global_pool"] = cfg.recipe.global_pool
    return kwargs


def create_student(cfg: TrainConfig, num_classes: int, notes: list[str] | None = None) -> nn.Module:
    """The student with its starting weights. A checkpoint's classifier made for another class count is left at
    timm's initialisation, as timm does for pretrained weights (said in ``notes``)."""
    from ..models import create_model

    kwargs = student_args(cfg, num_classes)
    kwargs.setdefault("drop_path_rate", cfg.recipe.drop_path)
    model = create_model(cfg.model, pretrained=cfg.pretrained, **kwargs)
    if cfg.init is not None:
        fresh = load_weights(model, cfg.init, new_head=classifier_names(model))
        if fresh:
            _refuse_random_teacher(cfg, f"the classifier of {cfg.init} was made for another class count")
            if notes is not None and not cfg.resume:  # resuming, the head comes from the run's checkpoint
                notes.append(f"{cfg.init}: its classifier ({', '.join(fresh)}) was made for another class count "
                             f"than this model's {num_classes}; it starts from timm's initialisation, as with "
                             "--pretrained")
    return model


def _refuse_random_teacher(cfg: TrainConfig, why: str) -> None:
    """Idle's distillation takes the starting weights as its teacher: with a re-initialised head it would distil
    random logits."""
    if cfg.recipe.distill_weight and cfg.recipe.objective == "idle_distill":
        raise TrainError(f"recipe {cfg.recipe.name!r} distils from its starting weights, and {why}: the teacher's "
                         "head would be random. Fine-tune densely first (--recipe finetune --method dense), then "
                         "start from that run (--run DIR), or use --distill-weight 0")


def _check_teacher_head(cfg: TrainConfig, model: nn.Module, num_classes: int) -> None:
    """A teacher built from pretrained weights whose classifier timm re-initialised (another class count) would
    distil random logits: refuse."""
    pretrained_classes = (getattr(model, "pretrained_cfg", None) or {}).get("num_classes")
    if cfg.pretrained and pretrained_classes not in (None, num_classes):
        _refuse_random_teacher(cfg, f"the pretrained {cfg.model} has a {pretrained_classes}-class head while the "
                                    f"model predicts {num_classes} classes")


def method_for_epoch(recipe: Recipe, epoch: int, epochs: int) -> MethodConfig | None:
    """Evo's layer-to-stage schedule: layer mode for the first ``layer_to_stage`` of the epochs in evo-scratch."""
    method = recipe.method
    if isinstance(method, Evo) and recipe.objective == "evo_scratch":
        mode = "layer" if epoch < math.floor(recipe.layer_to_stage * epochs) else "stage"
        return dataclasses.replace(method, mode=mode)
    return method


def inference_method(recipe: Recipe) -> MethodConfig | None:
    """The configuration evaluated and exported: evo-scratch's schedule ends in stage mode (the official inference
    form); every other recipe's method as it was given (a fine-tune in layer mode is evaluated in layer mode)."""
    method = recipe.method
    if isinstance(method, Evo) and recipe.objective == "evo_scratch":
        return dataclasses.replace(method, mode="stage")
    return method


def set_method(model: nn.Module, method: MethodConfig | None) -> None:
    if method is None:
        remove(model)
    else:
        apply(model, method)


def build_transforms(cfg: TrainConfig, model: nn.Module):
    from timm.data import create_transform

    r = cfg.recipe
    c = data_config(model)
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
        # by keyword: timm 1.0.x put weight_decay_exclude_1d third, where the list was before
        groups += param_groups_weight_decay(module, weight_decay, no_weight_decay_list=skip)
    return [g | {"params": [p for p in g["params"] if p.requires_grad]} for g in groups]


def evaluate_top1(model: nn.Module, loader, accelerator=None) -> tuple[float, float]:
    """Top-1 and top-5 (percent) of ``model`` on ``loader``, gathered across processes, under the accelerator's
    autocast (the training precision)."""
    from contextlib import nullcontext

    model.eval()
    hits = None
    with torch.inference_mode(), (accelerator.autocast() if accelerator is not None else nullcontext()):
        for images, targets in loader:
            logits = model(images)
            if accelerator is not None:
                logits, targets = accelerator.gather_for_metrics((logits, targets))
            top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
            batch = torch.stack([(top[:, 0] == targets).sum(), (top == targets.unsqueeze(1)).any(1).sum(),
                                 torch.tensor(targets.numel(), device=targets.device)])
            hits = batch if hits is None else hits + batch
    correct1, correct5, total = (0, 0, 0) if hits is None else hits.tolist()
    return 100.0 * correct1 / max(total, 1), 100.0 * correct5 / max(total, 1)


def unmatched_freeze(model: nn.Module, freeze: tuple[str, ...]) -> str | None:
    """What a run says when the recipe freezes parameter names ``model`` does not have (a class-token-free ViT has
    no ``cls_token``; NaFlexVit keeps its embeddings under ``embeds.``): those stay trainable, and the parameters
    named like them are listed; None when every name matched."""
    names = [name for name, _ in model.named_parameters()]
    missing = [entry for entry in freeze if entry not in names]
    if not missing:
        return None
    alike = [name for name in names if name.rsplit(".", 1)[-1] in missing]
    return (f"the recipe freezes {', '.join(missing)}, which this model has no parameter named (nothing frozen for "
            f"{'them' if len(missing) > 1 else 'it'})" + (f"; named like them: {', '.join(alike)}, left trainable"
                                                           if alike else ""))


def _loaders(cfg: TrainConfig, train_ds, val_ds, device: torch.device):
    """Epoch-seeded training batches; pinned memory on CUDA, workers kept alive across epochs."""
    sampler = EpochSampler(len(train_ds), cfg.seed)
    common = dict(batch_size=cfg.batch_size, num_workers=cfg.workers, pin_memory=device.type == "cuda",
                  persistent_workers=cfg.workers > 0)
    train_loader = torch.utils.data.DataLoader(SeededSamples(train_ds, cfg.seed), sampler=sampler, drop_last=True,
                                               **common)
    val_loader = torch.utils.data.DataLoader(val_ds, **common)
    return sampler, train_loader, val_loader


def train(cfg: TrainConfig) -> list[dict]:
    """Run (or resume) training; returns the per-epoch metrics. Writes last.pth, metrics.jsonl, run.json and,
    at the end, model.safetensors (plain timm keys) under ``cfg.output``. Every input is checked before anything
    is written."""
    from accelerate import Accelerator, DistributedDataParallelKwargs
    from accelerate.utils import set_seed
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2
    from timm.utils import ModelEmaV3

    if cfg.amp == "no":
        cfg = dataclasses.replace(cfg, amp="none")
    check_config(cfg)
    r = cfg.recipe
    runfolder.check_output(cfg.output, cfg.resume, cfg.overwrite)
    # Some parameters get no gradient in some steps (Evo's learned evolution weights in layer mode, heads a
    # recipe does not train): DDP must look for them rather than wait for their gradients.
    accelerator = Accelerator(mixed_precision=AMP_MODES[cfg.amp], cpu=cfg.cpu,
                              kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    set_seed(cfg.seed)

    train_ds = build_dataset(cfg.data, "train")
    num_classes = student_args(cfg, num_classes_of(train_ds) or 1000)["num_classes"]
    init_sha = file_sha256(cfg.init) if cfg.init is not None and os.path.isfile(cfg.init) else None
    description = runfolder.describe(cfg, student_args(cfg, num_classes), accelerator.num_processes, init_sha)
    if cfg.resume:
        runfolder.check_resume(cfg.output, description)
    notes: list[str] = []
    model = create_student(cfg, num_classes, notes)
    if accelerator.is_main_process:
        for line in notes:
            note(line)
    with user_input():
        adapter_for(model)  # unsupported models fail here, with the supported families named
    check_classifier(model, f"model {cfg.model}")
    _check_teacher_head(cfg, model, num_classes)
    train_tf, val_tf = build_transforms(cfg, model)
    train_ds = build_dataset(cfg.data, "train", train_tf)
    val_ds = build_dataset(cfg.data, "val", val_tf)
    check_labels(train_ds, num_classes, f"the training set of {cfg.data.path}")
    check_labels(val_ds, num_classes, f"the validation set of {cfg.data.path}")

    criterion_train = SoftTargetCrossEntropy() if (r.mixup > 0 or r.cutmix > 0) else (
        LabelSmoothingCrossEntropy(r.smoothing) if r.smoothing > 0 else nn.CrossEntropyLoss())
    with user_input():
        objective = make_objective(r, model, criterion_train, dense_model=model)  # teacher copied before patching
        student = objective.model
        set_method(student, method_for_epoch(r, 0, cfg.epochs_total))
    for name, p in student.named_parameters():
        if name in r.freeze:
            p.requires_grad_(False)
    unmatched = unmatched_freeze(student, r.freeze)
    if unmatched and accelerator.is_main_process and not cfg.resume:
        note(unmatched)

    global_batch = cfg.batch_size * accelerator.num_processes
    lr = cfg.lr if cfg.lr is not None else r.lr * global_batch / r.lr_base_batch
    optimizer = create_optimizer_v2(param_groups(objective, r.weight_decay), opt="adamw", lr=lr,
                                    weight_decay=r.weight_decay)

    sampler, train_loader, val_loader = _loaders(cfg, train_ds, val_ds, accelerator.device)
    if len(train_loader) == 0:
        raise TrainError(f"the training set has {len(train_ds)} images, fewer than one batch of {cfg.batch_size}"
                         + (f" per process ({accelerator.num_processes} processes)"
                            if accelerator.num_processes > 1 else ""))
    # a peak below the recipe's floor (a small batch scales the peak down, not the floor) would make the "decay"
    # rise and the warm-up fall: the floor is lowered to the peak, and the run says so
    min_lr, warmup_lr = min(r.min_lr, lr), min(r.warmup_lr, lr)
    if (min_lr, warmup_lr) != (r.min_lr, r.warmup_lr) and accelerator.is_main_process and not cfg.resume:
        note(f"the peak learning rate {lr:.3g} is below the recipe's min_lr {r.min_lr:.3g} or warmup_lr "
             f"{r.warmup_lr:.3g}; both are lowered to it (the lr then stays at {lr:.3g}); raise --lr or the batch size")
    scheduler, _ = create_scheduler_v2(optimizer, sched="cosine", num_epochs=cfg.epochs_total, min_lr=min_lr,
                                       warmup_lr=warmup_lr, warmup_epochs=r.warmup_epochs, step_on_epochs=False,
                                       updates_per_epoch=len(train_loader))
    if r.warmup_epochs >= cfg.epochs_total and accelerator.is_main_process and not cfg.resume:
        note(f"the learning rate warms up over {r.warmup_epochs} epochs and the run has {cfg.epochs_total}: it never "
             f"reaches its peak ({lr:.3g}); shorten --warmup-epochs")
    mixup = Mixup(mixup_alpha=r.mixup, cutmix_alpha=r.cutmix, switch_prob=r.mixup_switch_prob,
                  label_smoothing=r.smoothing, num_classes=num_classes) if (r.mixup > 0 or r.cutmix > 0) else None
    ema = ModelEmaV3(student, decay=r.ema_decay, device=accelerator.device) if r.ema_decay else None

    objective, optimizer, train_loader, val_loader = accelerator.prepare(objective, optimizer, train_loader,
                                                                         val_loader)
    start_epoch, history = 0, []
    ckpt_path = os.path.join(cfg.output, CHECKPOINT)
    if cfg.resume:
        start_epoch, history = _resume(ckpt_path, accelerator.unwrap_model(objective), optimizer, scheduler, ema,
                                       accelerator)
        if start_epoch >= cfg.epochs_total and accelerator.is_main_process:
            note(f"{cfg.output} already holds all {cfg.epochs_total} epochs; nothing to resume")
    if accelerator.is_main_process:
        runfolder.start(cfg.output, description, fresh=not cfg.resume)
        _rewrite_metrics(cfg.output, history)
    accelerator.wait_for_everyone()
    writer = _tensorboard(cfg.output) if accelerator.is_main_process else None

    steps_per_epoch = len(train_loader)
    last_epoch = cfg.epochs_total if cfg.stop_after is None else min(cfg.epochs_total, start_epoch + cfg.stop_after)
    for epoch in range(start_epoch, last_epoch):
        # every epoch starts from seeds that depend only on (seed, epoch): resuming replays the same batches
        set_seed((cfg.seed + epoch * 1009 + accelerator.process_index * 7919) % 2**32)  # numpy's seed range
        sampler.start_epoch(epoch)
        method = method_for_epoch(r, epoch, cfg.epochs_total)
        set_method(student, method)
        objective.train()
        start = time.perf_counter()
        bar = _progress(cfg, accelerator, steps_per_epoch, f"epoch {epoch + 1}/{cfg.epochs_total}")
        try:
            # fixed shapes every step: cuDNN's timed pick of conv algorithms pays (timm's train.py sets it too)
            with memory_guard(f"a training step at --batch-size {cfg.batch_size}"), \
                    cudnn_autotuned(accelerator.device):
                sums, correct, seen, (lr_peak, lr_last) = _run_epoch(
                    epoch, objective, student, train_loader, optimizer, scheduler, ema, mixup, accelerator, bar, cfg)
        finally:
            if bar is not None:
                bar.close()
        elapsed = time.perf_counter() - start
        scheduler.step(epoch + 1)
        set_method(student, inference_method(r))
        val1, val5 = evaluate_top1(student, val_loader, accelerator)
        metrics = {"epoch": epoch + 1, "method_mode": getattr(method, "mode", None),
                   "lr": lr_last, "lr_peak": lr_peak,  # of the epoch's steps (the last one's, the highest)
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
        export_safetensors(accelerator.unwrap_model(objective).model, os.path.join(cfg.output, runfolder.EXPORT))
        if ema is not None:
            export_safetensors(ema.module, os.path.join(cfg.output, EMA_EXPORT))
    return history


def _run_epoch(epoch, objective, student, loader, optimizer, scheduler, ema, mixup, accelerator, bar, cfg):
    """One epoch of steps. Returns (mean-over-processes sums of the loss terms, correct, seen, the learning rates
    the steps used: (peak, last)); device values are read once per LOG_EVERY steps; a non-finite loss stops the run
    there, naming its epoch and first step."""
    steps = len(loader)
    lr_peak = lr_last = optimizer.param_groups[0]["lr"]
    step_lrs = []  # each step's lr, host floats: a non-finite loss is reported with the lr of its step
    stats, keys = None, None  # device tensor: [loss terms..., correct, seen]
    first_bad = torch.tensor(float("inf"), device=accelerator.device)
    for step, (images, targets) in enumerate(loader):
        hard = targets
        if mixup is not None:
            images, targets = mixup(images, targets)
        loss, terms, logits = objective(images, targets)
        accelerator.backward(loss)
        lr_last = optimizer.param_groups[0]["lr"]  # a Python float: what this step uses (set by the last update)
        lr_peak = max(lr_peak, lr_last)
        step_lrs.append(lr_last)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step_update(epoch * steps + step + 1)
        if ema is not None:
            ema.update(student, step=epoch * steps + step)
        values = {"loss": loss.detach(), **terms}
        if stats is None:
            keys = list(values)
            stats = torch.zeros(len(keys) + 2, dtype=torch.float64, device=accelerator.device)
        stats += torch.stack([*(values[k].double() for k in keys), (logits.argmax(-1) == hard).sum().double(),
                              torch.tensor(float(hard.numel()), dtype=torch.float64, device=stats.device)])
        first_bad = torch.where(torch.isfinite(loss.detach()) | (first_bad < float("inf")), first_bad,
                                torch.tensor(float(step), device=first_bad.device))
        if bar is not None:
            bar.update(1)
        if (step + 1) % LOG_EVERY == 0 or step + 1 == steps:
            bad = accelerator.gather(first_bad.reshape(1)).min().item()
            if math.isfinite(bad):
                raise _nonfinite_loss(cfg, epoch, int(bad), step_lrs[int(bad)])
            if bar is not None:
                bar.set_postfix(loss=f"{stats[0].item() / (step + 1):.3f}")
    totals = accelerator.reduce(stats, reduction="sum").tolist()  # every process's terms and accuracy
    sums = {k: v / accelerator.num_processes for k, v in zip(keys, totals)}
    return sums, totals[-2], totals[-1], (lr_peak, lr_last)


def _nonfinite_loss(cfg: TrainConfig, epoch: int, step: int, lr: float) -> TrainError:
    path = os.path.join(cfg.output, CHECKPOINT)
    kept = (f"the last complete checkpoint, {path} (epoch {epoch}), is kept" if epoch > 0 and os.path.isfile(path)
            else "no checkpoint was written yet")
    hint = "Lower --lr" + (", or train with --amp bf16 or none" if cfg.amp == "fp16" else "")
    return TrainError(f"the loss became NaN or infinite at epoch {epoch + 1}, step {step} (lr {lr:.3g}); training "
                      f"stopped and {kept}. {hint}")


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
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or foreign file
        raise TrainError(f"--resume: {path} is not a readable checkpoint ({type(err).__name__})") from None
    if not isinstance(state, dict) or "model" not in state or "epoch" not in state:
        raise TrainError(f"--resume: {path} is not a tokenpace training checkpoint (no model and epoch entries)")
    problem = mismatch(objective.model.state_dict(), state["model"])
    if problem:
        raise TrainError(f"--resume: {path} does not fit the run's model {type(objective.model).__name__}: "
                         f"{problem}")
    objective.model.load_state_dict(state["model"], strict=True)
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
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            for m in history:
                f.write(json.dumps(m) + "\n")

    write_atomically(os.path.join(output, METRICS), write)


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
