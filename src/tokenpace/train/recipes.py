"""Training recipes as typed configs, with the official codes' defaults (evovit.md §8, idlevit.md §7 and §9)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace

from ..config_io import config_from, config_options
from ..errors import TokenpaceError
from ..losses import CUT_MODES
from ..methods import EViT, Evo, Idle, MethodConfig, TopK

OBJECTIVES = ("ce", "evo_scratch", "idle_distill")


def _check_number(name: str, value, minimum: float, inclusive: bool = True) -> None:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value) and (
        value >= minimum if inclusive else value > minimum)
    if not ok:
        raise TokenpaceError(f"recipe {name} must be a finite number {'>=' if inclusive else '>'} {minimum}; "
                             f"got {value!r}")


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

    def __post_init__(self) -> None:
        """Every recipe, built in code, from the CLI's overrides or from a run's record, is checked here, once."""
        if self.objective not in OBJECTIVES:
            raise TokenpaceError(f"recipe objective {self.objective!r} is not accepted; choose one of "
                                 f"{', '.join(OBJECTIVES)}")
        if self.cut_mode not in CUT_MODES:
            raise TokenpaceError(f"cut_mode {self.cut_mode!r} is not accepted; choose one of {', '.join(CUT_MODES)}")
        for name in ("cut_weight", "distill_weight", "aux_weight", "weight_decay", "drop_path", "smoothing", "mixup",
                     "cutmix", "reprob", "warmup_epochs"):
            _check_number(name, getattr(self, name), minimum=0)
        for name in ("epochs", "lr", "lr_base_batch"):
            _check_number(name, getattr(self, name), minimum=0, inclusive=False)

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
        raise TokenpaceError(f"unknown recipe {name!r}; accepted: {', '.join(RECIPES)}")
    return RECIPES[name]


def method_to_dict(method: MethodConfig | None) -> dict | None:
    """A method config as JSON-ready data: ``{"name": "evo", "keep": 0.5, ...}`` (None: dense)."""
    return None if method is None else {"name": method.name, **config_options(method)}


def method_from_dict(data: dict | None) -> MethodConfig | None:
    """The inverse of :func:`method_to_dict` (JSON turns tuples into lists; they are turned back)."""
    if data is None:
        return None
    return config_from(data["name"], {k: v for k, v in data.items() if k != "name"})


def recipe_to_dict(recipe: Recipe) -> dict:
    """Every setting of ``recipe`` as JSON-ready data (what run.json records)."""
    data = {f.name: getattr(recipe, f.name) for f in fields(recipe) if f.name not in ("method", "notes")}
    return {**data, "freeze": list(recipe.freeze), "method": method_to_dict(recipe.method)}


def recipe_from_dict(data: dict) -> Recipe:
    """The recipe a run recorded; a record written before a setting existed takes the named recipe's value."""
    base = RECIPES.get(data.get("name"), Recipe(name=str(data.get("name"))))
    known = {f.name for f in fields(Recipe)} - {"notes", "method", "name"}
    updates = {k: tuple(v) if k == "freeze" else v for k, v in data.items() if k in known}
    method = method_from_dict(data["method"]) if "method" in data else base.method
    return replace(base, **updates, method=method)
