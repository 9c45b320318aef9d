"""Training recipes as typed configs, with the official codes' defaults (evovit.md §8, idlevit.md §7 and §9)."""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from ..methods import EViT, Evo, Idle, MethodConfig, TopK

OBJECTIVES = ("ce", "evo_scratch", "idle_distill")


@dataclass(frozen=True)
class Recipe:
    """Everything a training run needs besides the model, the data and the machine."""

    name: str
    method: MethodConfig | None = None  # None: the dense model
    objective: str = "ce"  # ce | evo_scratch (avg head + class-token head) | idle_distill (cut loss + teacher)
    from_checkpoint: bool = False  # starts from dense weights (--init), not from scratch
    epochs: int = 300
    lr: float = 5e-4  # per ``lr_base_batch`` images, scaled linearly with the global batch
    lr_base_batch: int = 512
    min_lr: float = 1e-5
    warmup_lr: float = 1e-6
    warmup_epochs: int = 5
    weight_decay: float = 0.05
    drop_path: float = 0.1
    smoothing: float = 0.1
    mixup: float = 0.8
    cutmix: float = 1.0
    mixup_switch_prob: float = 0.5
    # DeiT's rand-m9-mstd0.5-inc1, with magnitudes capped at 9: at 10 timm's increasing posterize keeps 0 bits,
    # which Pillow >= 13 refuses (ValueError); at 9 it keeps 1 bit
    auto_augment: str | None = "rand-m9-mstd0.5-inc1-mmax9"
    color_jitter: float = 0.4
    reprob: float = 0.25
    ema_decay: float | None = None  # ModelEmaV3 decay; None: no EMA
    freeze: tuple[str, ...] = ()  # parameter names left untouched (IdleViT freezes cls_token and pos_embed)
    global_pool: str | None = None  # head override at model creation ("avg" for Evo-ViT)
    layer_to_stage: float = 2 / 3  # Evo: fraction of the epochs in layer mode before switching to stage mode
    aux_weight: float = 0.5  # Evo: weight of the class-token head's loss (0.5 / 0.5)
    cut_weight: float = 20.0  # IdleViT: token cut loss weight
    cut_mode: str = "both"
    distill_weight: float = 10.0  # IdleViT: logit KL weight (lambda); the feature MSE gets 100 * lambda
    notes: str = field(default="", compare=False)

    def with_method(self, method: MethodConfig | None) -> "Recipe":
        return replace(self, method=method)


RECIPES: dict[str, Recipe] = {
    "dense": Recipe(
        name="dense", notes="DeiT recipe from scratch: AdamW, lr 5e-4 x B/512, cosine, 5 warm-up epochs, "
        "RandAugment, mixup/cutmix, label smoothing 0.1, random erasing 0.25, drop path 0.1"),
    "evo-scratch": Recipe(
        name="evo-scratch", method=Evo(keep=0.5), objective="evo_scratch", global_pool="avg",
        notes="Evo-ViT from scratch: average-pool head + auxiliary class-token head (loss 0.5/0.5), layer-wise "
        "selection for the first 2/3 of the epochs, then stage-wise; DeiT recipe"),
    "idle-finetune": Recipe(
        name="idle-finetune", method=Idle(keep=0.7), objective="idle_distill", from_checkpoint=True, epochs=30,
        lr=1e-5, min_lr=1e-6, warmup_epochs=0, drop_path=0.0, freeze=("cls_token", "pos_embed"),
        notes="IdleViT from a dense checkpoint: frozen dense teacher, CE + 20 x cut loss + 10 x KL + 1000 x "
        "feature MSE, 30 epochs, lr 4e-5 at batch 2048 (1e-5 x B/512), cls_token and pos_embed frozen"),
    "finetune": Recipe(
        name="finetune", method=EViT(keep=0.7), from_checkpoint=True, epochs=30, lr=2e-5, min_lr=2e-6,
        warmup_epochs=0, weight_decay=1e-6, drop_path=0.0,
        notes="any method (default EViT 0.7) fine-tuned from a dense checkpoint with cross-entropy: EViT's "
        "fine-tune recipe (30 epochs, lr 2e-5 x B/512, min lr 2e-6, weight decay 1e-6)"),
}

METHOD_DEFAULTS = {"evo": Evo, "idle": Idle, "evit": EViT, "topk": TopK}


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; accepted: {', '.join(RECIPES)}")
    return RECIPES[name]
