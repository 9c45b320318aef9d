"""What a training step optimises, per recipe. Each objective holds the student (and any training-only head or
teacher) and returns the loss with its terms; the student itself stays a plain (patched) timm model."""
from __future__ import annotations

import copy

import torch
from torch import nn

from ..families import adapter_for
from ..losses import cut_loss_refusal, distill_kl, feature_mse, model_cut_loss
from ..patch import get_patch
from .recipes import Recipe


class Objective(nn.Module):
    def __init__(self, model: nn.Module, criterion: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.criterion = criterion

    def trainable(self) -> list[nn.Module]:
        """Modules whose parameters the optimiser updates."""
        return [self.model]

    def extra_state(self) -> dict:
        """Training-only weights to checkpoint beside the model."""
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass

    def forward(self, images: torch.Tensor, targets: torch.Tensor):
        logits = self.model(images)
        loss = self.criterion(logits, targets)
        return loss, {"ce": loss.detach()}, logits


class EvoScratchObjective(Objective):
    """Average-pool head + an auxiliary class-token head, losses weighted 0.5 / 0.5.

    timm ViTs get a training-only LayerNorm + Linear class-token head (Evo-ViT DeiT). Models with their own heads
    (``forward_train_heads``: average-pool heads, then as many class-token heads) bring them: tokenpace's Evo-ViT DeiT
    its two, Evo-LeViT its four, where each pooling's two twins are averaged and, without a teacher, the
    distillation twins learn from the labels too (the official code distils them from a RegNetY-160).
    """

    def __init__(self, model: nn.Module, criterion: nn.Module, aux_weight: float) -> None:
        super().__init__(model, criterion)
        self.own_heads = hasattr(model, "forward_train_heads")
        if not self.own_heads and not adapter_for(model).has_class_token:
            raise ValueError(f"the evo-scratch recipe trains a class-token head and {type(model).__name__} has no "
                             "class token; accepted: timm ViTs with a class token, tokenpace's evo_deit_* and "
                             "evo_levit_* models, "
                             "or --recipe finetune --method evo for class-token-free models")
        width = model.num_features
        self.aux_head = None if self.own_heads else nn.Sequential(nn.LayerNorm(width, eps=1e-6),
                                                                  nn.Linear(width, model.num_classes))
        self.aux_weight = aux_weight

    def trainable(self) -> list[nn.Module]:
        return [self.model] if self.own_heads else [self.model, self.aux_head]

    def extra_state(self) -> dict:
        return {} if self.own_heads else {"aux_head": self.aux_head.state_dict()}

    def load_extra_state(self, state: dict) -> None:
        if not self.own_heads:
            self.aux_head.load_state_dict(state["aux_head"])

    def forward(self, images, targets):
        feats = self.model.forward_features(images)
        if self.own_heads:  # the average-pool heads, then as many class-token heads
            heads = self.model.forward_train_heads(feats)
            pooled, cls = heads[:len(heads) // 2], heads[len(heads) // 2:]
            logits = sum(pooled) / len(pooled)
            main_loss = sum(self.criterion(h, targets) for h in pooled) / len(pooled)
            aux_loss = sum(self.criterion(h, targets) for h in cls) / len(cls)
        else:
            logits = self.model.forward_head(feats)
            main_loss, aux_loss = self.criterion(logits, targets), self.criterion(self.aux_head(feats[:, 0]), targets)
        loss = (1 - self.aux_weight) * main_loss + self.aux_weight * aux_loss
        return loss, {"ce": main_loss.detach(), "ce_cls_head": aux_loss.detach()}, logits


class IdleDistillObjective(Objective):
    """CE + cut_weight x token cut loss + lambda x KL(teacher || student) + 100 lambda x class-feature MSE.

    With lambda = 0 there is no teacher at all (``teacher`` None): its dense forward is a third of a dense
    training step, the largest cost of the recipe after the student itself."""

    def __init__(self, model: nn.Module, teacher: nn.Module | None, criterion: nn.Module, recipe: Recipe) -> None:
        super().__init__(model, criterion)
        refusal = cut_loss_refusal(model) if recipe.cut_mode != "none" else None
        if refusal is not None:
            raise ValueError(refusal)
        method = recipe.method.name if recipe.method is not None else None
        if recipe.cut_mode != "none" and method != "idle":  # the model is patched after this, with recipe.method
            runs = f"runs {method}" if method is not None else "runs no method (dense)"
            raise ValueError(f"the token cut loss is IdleViT's (it reads the idling layers) and the model {runs}; "
                             "train it with --cut-mode none, or with --method idle")
        if recipe.distill_weight and teacher is None:
            raise ValueError(f"distill_weight {recipe.distill_weight} needs a teacher; pass the dense model, "
                             "or set distill_weight 0")
        self.teacher = teacher.eval().requires_grad_(False) if recipe.distill_weight else None
        self.recipe = recipe

    def train(self, mode: bool = True):
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # the teacher always runs in eval mode (the official code forgets this)
        return self

    def forward(self, images, targets):
        r = self.recipe
        feats = self.model.forward_features(images)
        logits = self.model.forward_head(feats)
        ce = self.criterion(logits, targets)
        terms = {"ce": ce.detach()}
        loss = ce
        if r.cut_mode != "none" and get_patch(self.model) is not None and self.model.training:
            cut = model_cut_loss(self.model, r.cut_mode)
            loss = loss + r.cut_weight * cut
            terms["cut"] = cut.detach()
        if self.teacher is not None:
            with torch.no_grad():
                t_feats = self.teacher.forward_features(images)
                t_logits = self.teacher.forward_head(t_feats)
            kl = distill_kl(logits, t_logits)
            feat = feature_mse(self.model.forward_head(feats, pre_logits=True),
                               self.teacher.forward_head(t_feats, pre_logits=True))
            loss = loss + r.distill_weight * kl + 100 * r.distill_weight * feat
            terms.update(kl=kl.detach(), feature=feat.detach())
        return loss, terms, logits


def make_objective(recipe: Recipe, model: nn.Module, criterion: nn.Module, dense_model: nn.Module | None = None):
    """The recipe's objective around ``model``; ``dense_model`` (unpatched) is copied as the teacher when needed."""
    if recipe.objective == "evo_scratch":
        return EvoScratchObjective(model, criterion, recipe.aux_weight)
    if recipe.objective == "idle_distill":
        if not recipe.distill_weight:
            return IdleDistillObjective(model, None, criterion, recipe)
        if dense_model is None or get_patch(dense_model) is not None:
            raise ValueError("the idle_distill objective needs the dense (unpatched) model as teacher")
        return IdleDistillObjective(model, copy.deepcopy(dense_model), criterion, recipe)
    return Objective(model, criterion)
