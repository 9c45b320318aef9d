"""Kernel launches of a patched forward, counted on the CPU: small batches on a GPU are bound by them, so a change
that adds index arithmetic per block shows up here before it shows up as a slower batch-1 row on a GPU."""
import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import tokenpace
from conftest import make_vit

# aten calls that launch no kernel: views, and the eval-mode dropouts timm calls (the same in dense and patched)
FREE = {"reshape", "view", "expand", "flatten", "unflatten", "unbind", "select", "slice", "squeeze", "unsqueeze",
        "permute", "transpose", "t", "detach", "alias", "dropout", "split", "split_with_sizes", "chunk", "narrow",
        "_unsafe_view", "contiguous", "as_strided", "lift_fresh", "empty", "empty_like"}


class LaunchCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not func.is_view and name not in FREE:
            self.ops.append(name)
        return func(*args, **(kwargs or {}))


def launches(model, images) -> collections.Counter:
    with torch.inference_mode():
        model(images)
        with LaunchCounter() as counter:
            model(images)
    return collections.Counter(counter.ops)


# per method: options, selections in the forward, the most launches one selection may add, and launches made once
# per forward. Measured: Idle 9 per selection (class-query score 3: the scaled query in one addmm, W_k^T q, the dot
# with every token; top-k 1, row index 2, two row gathers and one row scatter) + 4 for the row offsets every
# selection shares; Evo 12 per stage + the same 4 (28 at two stages, held
# to 16 per stage). Each budget allows at least one more per selection for an op that another torch release
# decomposes differently.
BUDGETS = {"idle": (dict(stage_starts=(1, 2, 3)), 3, 10, 4), "evo": (dict(stage_starts=(1, 2)), 2, 16, 0)}


@pytest.mark.parametrize("method", list(BUDGETS))
def test_launches_added_per_selection_stay_within_budget(method):
    options, selections, per_selection, once = BUDGETS[method]
    model = make_vit("deit", depth=4)
    images = torch.randn(2, 3, 32, 32)
    dense = launches(model, images)
    tokenpace.apply(model, method, keep=0.5, **options)
    added = launches(model, images) - dense
    assert sum(added.values()) <= selections * per_selection + once, dict(added)
    assert added["index_select"] <= 2 * selections  # at most the block's input and norm1 output are gathered
    assert added["arange"] <= 4  # index offsets are made once per forward, not per block


def _anatomy_cases():
    import copy

    import timm
    from timm.models.pvt_v2 import PyramidVisionTransformerV2
    from timm.models.swin_transformer import SwinTransformer

    from backbones import make_backbone

    levit = timm.create_model("levit_128s", embed_dim=(32, 48), key_dim=8, num_heads=(2, 3), depth=(1, 1),
                              img_size=64)
    return {
        "vit": make_vit("deit"), "vit_qknorm": make_vit("qknorm"), "eva_rope": make_backbone("eva02"),
        "eva_no_rope": make_backbone("eva02", use_rot_pos_emb=False), "levit_eval": levit.eval(),
        "levit_train": copy.deepcopy(levit).train(),
        "swin": SwinTransformer(img_size=32, patch_size=2, embed_dim=16, depths=(1,), num_heads=(2,), window_size=4),
        "pvt_v2": PyramidVisionTransformerV2(depths=(1, 1), embed_dims=(16, 32), num_heads=(1, 2)),
    }


def test_keys_affine_answers_as_linear_keys():
    """Scoring asks ``keys_affine`` on every selection instead of building the key map (weight slices, LeViT's
    BatchNorm fusion): the cheap answer must be the map's."""
    from tokenpace.families import adapter_for

    answers = {}
    for name, model in _anatomy_cases().items():
        for parts in adapter_for(model).anatomy():
            assert parts.keys_affine() == (parts.linear_keys() is not None), name
            answers.setdefault(name, parts.keys_affine())
    # LeViT in training: scores use BatchNorm's running statistics, so its keys are affine there too
    assert answers == {"vit": True, "vit_qknorm": False, "eva_rope": False, "eva_no_rope": True, "levit_eval": True,
                       "levit_train": True, "swin": True, "pvt_v2": False}
