"""Small timm ViTs (random, well-spread weights) and literal reference implementations from the specs."""
from __future__ import annotations

import math
import os

import pytest
import torch
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer

# Two threads in one process; one per process when pytest-xdist runs workers (`pytest -n auto`, the README's
# command), so two workers on the 2-core machine do not oversubscribe it
torch.set_num_threads(2 if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) <= 1 else 1)

BASE = dict(img_size=32, patch_size=4, embed_dim=48, depth=12, num_heads=3, num_classes=10, qkv_bias=True)

VARIANTS = {
    "deit": dict(),  # class token head, like DeiT
    "avg": dict(global_pool="avg"),  # official Evo-ViT head: mean of patch tokens
    "distilled": dict(distilled=True),  # class + distillation token
    "layerscale": dict(init_values=0.5, no_embed_class=True),  # DeiT-III style
    "registers": dict(reg_tokens=4, global_pool="avg"),  # class token + 4 registers
    "qknorm": dict(qk_norm=True),
    "no_qkv_bias": dict(qkv_bias=False, depth=6),
}


def spread_weights(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Re-draw every parameter so attention is far from uniform and scores are well separated (no near-ties)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.ndim >= 2 and "embed" not in name and "token" not in name:
                p.copy_(noise * 1.5 / math.sqrt(p.shape[-1] if p.ndim == 2 else p[0].numel()))
            elif name.endswith("norm1.weight") or name.endswith("norm2.weight") or "norm.weight" in name:
                p.copy_(1 + 0.2 * noise)
            else:
                p.copy_(0.5 * noise)
    return model


def make_vit(variant: str = "deit", seed: int = 0, **overrides) -> VisionTransformer:
    cfg = {**BASE, **VARIANTS[variant], **overrides}
    distilled = cfg.pop("distilled", False)
    cls = VisionTransformerDistilled if distilled else VisionTransformer
    torch.manual_seed(seed)
    return spread_weights(cls(**cfg), seed).eval()


@pytest.fixture
def images():
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))


# ----------------------------------------------------------------------------------------------------------------
# Literal reference implementations (slow, full attention matrices, written from the specs' descriptions)
# ----------------------------------------------------------------------------------------------------------------

def embed(model, img):
    return model.norm_pre(model._pos_embed(model.patch_embed(img)))


def head(model, x):
    return model.forward_head(model.norm(x))


def ref_attention(blk, x, key_bias=None):
    """Pre-norm attention residual with the full (B, H, n, n) map; returns (x after residual, probs)."""
    attn = blk.attn
    B, n, _ = x.shape
    xn = blk.norm1(x)
    q, k, v = attn.qkv(xn).reshape(B, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    logits = (q * attn.scale) @ k.transpose(-2, -1)
    if key_bias is not None:
        logits = logits + key_bias[:, None, None, :]
    probs = logits.softmax(-1)
    out = (probs @ v).transpose(1, 2).reshape(B, n, -1)
    return x + blk.ls1(attn.proj(attn.norm(out))), probs


def ref_mlp(blk, x):
    return x + blk.ls2(blk.mlp(blk.norm2(x)))


def ref_block(blk, x):
    x, probs = ref_attention(blk, x)
    return ref_mlp(blk, x), probs


def take(t, idx):
    """Per-row gather along dim 1 for (B, N) or (B, N, C)."""
    if t.ndim == 2:
        return t.gather(1, idx)
    return t.gather(1, idx.unsqueeze(-1).expand(-1, -1, t.shape[-1]))


def ref_evo(model, img, keep, stage_starts, mode="stage", representative=False, alpha=0.5):
    """Evo-ViT as in the official DeiT code (evovit.md §3-4, §12.2): tokens kept sorted by g, concatenation,
    placeholders re-appended, stale g for placeholders, raster order restored at the end."""
    x = embed(model, img)
    P0, depth = model.num_prefix_tokens, len(model.blocks)
    N = x.shape[1] - P0
    K = int(N * keep)
    first = stage_starts[0]
    g = None
    for i in range(first):
        x, probs = ref_block(model.blocks[i], x)
        g = probs[:, :, 0, P0:].sum(1)  # tradeoff 1 in dense layers: overwrite
    perm = torch.arange(N).expand(x.shape[0], -1)
    use_rep = representative and K < N
    for i in range(first, depth):
        if mode == "layer" or i in stage_starts:
            order = g.argsort(dim=1, descending=True)
            img_tok, g, perm = take(x[:, P0:], order), take(g, order), take(perm, order)
            pre, kept, ph = x[:, :P0], img_tok[:, :K], img_tok[:, K:]
            rep = None
            if use_rep:
                w = g[:, K:] / g[:, K:].sum(1, keepdim=True)
                rep_in = (w.unsqueeze(-1) * ph).sum(1, keepdim=True)
                rep = rep_in
        seq = torch.cat([pre, kept] + ([rep] if use_rep else []), dim=1)
        seq, probs = ref_block(model.blocks[i], seq)
        cls = probs[:, :, 0, P0:P0 + K].sum(1)
        g = torch.cat([(1 - alpha) * g[:, :K] + alpha * cls, g[:, K:]], dim=1)
        pre, kept = seq[:, :P0], seq[:, P0:P0 + K]
        if use_rep:
            rep = seq[:, -1:]
        if mode == "layer" or (i + 1) in stage_starts or i == depth - 1:
            if use_rep:
                ph = ph + (rep - rep_in)
            x = torch.cat([pre, kept, ph], dim=1)
    raster = torch.empty_like(x[:, P0:]).scatter(1, perm.unsqueeze(-1).expand(-1, -1, x.shape[-1]), x[:, P0:])
    return head(model, torch.cat([x[:, :P0], raster], dim=1))


def ref_idle_select(blk, x, P0, K):
    """Official eval selection (idlevit.md §4.3): keys projected for all tokens, head-mean class-query logits."""
    attn = blk.attn
    B, n, _ = x.shape
    xn = blk.norm1(x)
    q, k, _ = attn.qkv(xn).reshape(B, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    logits = (q[:, :, :1] @ k.transpose(-2, -1)).mean(1)[:, 0, P0:]
    return logits.argsort(dim=1, descending=True)[:, :K]


def ref_idle(model, img, keep, stage_starts, masked=False):
    """IdleViT: the official eval path (gather, attend among selected, scatter) or, with ``masked``, the official
    training path (full compute, -1e5 on idle keys, idle rows' updates multiplied by 0)."""
    x = embed(model, img)
    P0 = model.num_prefix_tokens
    N = x.shape[1] - P0
    for i, blk in enumerate(model.blocks):
        stage = sum(1 for s in stage_starts if i >= s)
        if stage == 0:
            x, _ = ref_block(blk, x)
            continue
        K = int(N * keep ** stage)
        top = ref_idle_select(blk, x, P0, K)
        idx = torch.cat([torch.arange(P0).expand(x.shape[0], -1), top + P0], dim=1)
        if masked:
            m = torch.zeros(x.shape[:2]).scatter(1, idx, 1.0)
            y, _ = ref_attention(blk, x, key_bias=(1 - m) * -1e5)
            x = x + (y - x) * m.unsqueeze(-1)
            x = x + (ref_mlp(blk, x) - x) * m.unsqueeze(-1)
        else:
            sub, _ = ref_block(blk, take(x, idx))
            x = x.scatter(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]), sub)
    return head(model, x)


def ref_evit(model, img, keep, layers, fuse=True):
    """EViT (idlevit.md §9): shrink between attention and MLP, head-mean softmax attention, ceil counts, fusion."""
    x = embed(model, img)
    P0 = model.num_prefix_tokens
    for i, blk in enumerate(model.blocks):
        if i not in layers:
            x, _ = ref_block(blk, x)
            continue
        x, probs = ref_attention(blk, x)
        n = x.shape[1] - P0
        k = math.ceil(keep * n)
        if k < n:
            a = probs[:, :, 0, P0:].mean(1)
            order = a.argsort(dim=1, descending=True)
            parts = [x[:, :P0], take(x[:, P0:], order[:, :k])]
            if fuse:
                rest = order[:, k:]
                parts.append((take(a, rest).unsqueeze(-1) * take(x[:, P0:], rest)).sum(1, keepdim=True))
            x = torch.cat(parts, dim=1)
        x = ref_mlp(blk, x)
    return head(model, x)


def ref_topk(model, img, keep, layer):
    assert layer >= 1, "top-k ranks by the class attention of the block before its cut layer"
    x = embed(model, img)
    g = None
    P0 = model.num_prefix_tokens
    N = x.shape[1] - P0
    for i, blk in enumerate(model.blocks):
        if i == layer:
            order = g.argsort(dim=1, descending=True)[:, :int(N * keep)]
            x = torch.cat([x[:, :P0], take(x[:, P0:], order)], dim=1)
        x, probs = ref_block(blk, x)
        g = probs[:, :, 0, P0:].sum(1)
    return head(model, x)


# ----------------------------------------------------------------------------------------------------------------
# Training runs on a few dozen real CIFAR-10 images (../shared/data, or $TOKENPACE_CIFAR) and a tiny timm ViT
# ----------------------------------------------------------------------------------------------------------------
CIFAR = os.environ.get("TOKENPACE_CIFAR", os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data",
                                                       "cifar10_jpeg.npz"))
TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2)
TINY_ARGS = "img_size=32,patch_size=8,embed_dim=32,depth=4,num_heads=2"
needs_cifar = pytest.mark.skipif(not os.path.isfile(CIFAR), reason="../shared/data/cifar10_jpeg.npz not found")


def ref_window_idle_attention(logits, v, pad, scores, k):
    """Literal masked-window Idle attention (Swin, SAM): the top k slots of each window by ``scores`` (G, n) are
    selected (padding scores -inf: it ranks last); every query attends to the selected real keys only, over the full
    logits (G, heads, n, n). -> (the attention output (G, n, heads * d) before the projection, selected (G, n))."""
    sel = torch.zeros_like(pad).scatter(1, scores.topk(k, dim=1).indices, True)
    probs = logits.masked_fill(~(sel & ~pad)[:, None, None, :], float("-inf")).softmax(-1)
    return (probs @ v).transpose(1, 2).reshape(*pad.shape, -1), sel


def spread_batchnorm(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """BatchNorm2d running statistics with some spread (spread_weights leaves them at 0 / 1), seeded."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1, generator=torch.Generator().manual_seed(seed))
                m.running_var.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(seed))
    return model


def assert_published_macs(model, img, published: float, tolerance: float, idle_ratio: tuple[float, float]) -> None:
    """The dense model's MACs (FlopCounterMode's, equal to ``tokenpace.macs``) within ``tolerance`` of a published
    count, and Idle's at its defaults a fraction within ``idle_ratio`` of them."""
    counts = dense_and_idle_macs(model, img, lambda m, x: m(x))
    assert abs(counts[None] - published) / published < tolerance
    assert idle_ratio[0] < counts["idle"] / counts[None] < idle_ratio[1]


def assert_bf16_autocast_close(model, img) -> None:
    """The (patched) model under CPU bf16 autocast gives bf16 logits within 0.1 of its float32 ones."""
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(img)
    with torch.no_grad():
        full = model(img)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), full, atol=0.1, rtol=0.1)


def set_fused(model, fused: bool):
    """Every attention's ``fused_attn`` flag (timm's; read by tokenpace's attention at each forward)."""
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = fused
    return model


def assert_keep_one_and_remove(model, img, **idle_options) -> None:
    """Idle at keep=1 is the model exactly; Idle with ``idle_options`` (keep 0.7) changes its output; the state_dict
    keys stay those of the plain model; ``remove`` restores its output and its class."""
    import tokenpace

    own_class, keys = type(model), list(model.state_dict())
    with torch.no_grad():
        ref = model(img)
        assert torch.equal(tokenpace.apply(model, "idle", keep=1.0)(img), ref)
        assert not torch.allclose(tokenpace.apply(model, "idle", keep=0.7, **idle_options)(img), ref, atol=1e-3)
        assert list(model.state_dict()) == keys
        assert torch.equal(tokenpace.remove(model)(img), ref)
    assert type(model) is own_class


def assert_idle_equals_reference(model, img, reference, **idle_options) -> None:
    """Idle with ``idle_options`` changes the model's output, and exactly as ``reference()`` computes it."""
    import tokenpace

    with torch.no_grad():
        ref = reference()
        out = tokenpace.apply(model, "idle", **idle_options)(img)
        dense = tokenpace.remove(model)(img)
    assert not torch.allclose(out, dense, atol=1e-2)  # idling changed the result ...
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)  # ... exactly as the reference says


def assert_macs_equal_flop_counter(model, img, idle_options: dict | None) -> None:
    """``tokenpace.macs`` at the image's size equals FlopCounterMode's count (FLOPs / 2) of one forward, for the dense
    model (``idle_options`` None) or under Idle with them."""
    import tokenpace
    from torch.utils.flop_counter import FlopCounterMode

    if idle_options is not None:
        tokenpace.apply(model, "idle", **idle_options)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(img)
    assert tokenpace.macs(model, img_size=tuple(img.shape[-2:])) == counter.get_total_flops() // 2


def dense_and_idle_macs(model, img, forward) -> dict:
    """MACs (FlopCounterMode's FLOPs / 2) of ``forward(model, img)`` for the dense model, then with Idle at its
    defaults, each asserted equal to ``tokenpace.macs``: {None: dense, "idle": idle}."""
    import tokenpace
    from torch.utils.flop_counter import FlopCounterMode

    counts = {}
    for method in (None, "idle"):
        if method is not None:
            tokenpace.apply(model, method)
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            forward(model, img)
        counts[method] = counter.get_total_flops() // 2
        assert tokenpace.macs(model) == counts[method], method
    return counts


# timm's Hiera and HieraDet forward_intermediates calls: stage maps (NCHW, NHWC), stop_early, and coarse=False (maps
# after blocks), which tokenpace must answer as timm does at keep=1
HIERA_INTERMEDIATE_CALLS = [dict(), dict(indices=[0, 2], output_fmt="NHWC"),
                            dict(indices=2, stop_early=True, intermediates_only=True),
                            dict(coarse=False, indices=[1, 3, 6]), dict(coarse=False, indices=3, stop_early=False)]


def flatten_outputs(out) -> list[torch.Tensor]:
    """Every tensor of a forward_intermediates result (tensors, lists, tuples, dicts by key), in order."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for key in sorted(out) for t in flatten_outputs(out[key])]
    return [t for item in out for t in flatten_outputs(item)]


def assert_keep_one_intermediates_equal(model, img, calls):
    """Each forward_intermediates call of the unpatched model and of the model under Idle at keep=1 gives the same
    final tokens and maps, exactly (the model is left patched)."""
    import tokenpace

    with torch.no_grad():
        refs = [tokenpace.remove(model).forward_intermediates(img, **call) for call in calls]
        tokenpace.apply(model, "idle", keep=1.0)
        for call, ref in zip(calls, refs):
            ours = model.forward_intermediates(img, **call)
            if not call.get("intermediates_only"):
                torch.testing.assert_close(ours[0], ref[0], rtol=0, atol=0)
                ours, ref = ours[1], ref[1]
            assert len(ours) == len(ref), call
            for a, b in zip(ours, ref):
                torch.testing.assert_close(a, b, rtol=0, atol=0)


def assert_pruned_features_run_the_method(features, img, blocks: int, shapes: list) -> None:
    """A features_only model timm pruned to its first stages: the family holds the ``blocks`` left, keep=1 equals
    the unpatched model, and Idle from block 0 changes the last map without changing the ``shapes``."""
    import tokenpace

    assert len(tokenpace.get_patch(tokenpace.apply(features, "idle")).adapter.blocks) == blocks
    with torch.no_grad():
        dense = tokenpace.remove(features)(img)
        assert all(torch.equal(a, b) for a, b in zip(tokenpace.apply(features, "idle", keep=1.0)(img), dense))
        idled = tokenpace.apply(features, "idle", keep=0.7, stage_starts=(0,))(img)
    assert [tuple(t.shape) for t in idled] == [tuple(t.shape) for t in dense] == shapes
    assert not torch.allclose(idled[-1], dense[-1], atol=1e-4)


def assert_scores_match_per_window(ours, ref, real):
    """Window scores (G, n) that rank like the reference: -inf exactly on the padding (``real`` False), and equal to
    it up to one constant per window on the real slots (the per-group constants scoring leaves out)."""
    assert torch.equal(ours.isinf(), ~real)
    diff = torch.where(real, ours - ref, 0.0)
    per_window = diff.sum(1, keepdim=True) / real.sum(1, keepdim=True)
    torch.testing.assert_close(torch.where(real, diff - per_window, 0.0), torch.zeros_like(diff), atol=1e-4, rtol=0)


def train_config(tmp_path, recipe="dense", name="run", **kw):
    from tokenpace.data import DataSpec
    from tokenpace.train import TrainConfig, get_recipe

    return TrainConfig(recipe=get_recipe(recipe), model="vit_tiny_patch16_224", model_args=dict(TINY),
                       data=DataSpec(CIFAR, limit=kw.pop("limit", 64)), output=str(tmp_path / name),
                       batch_size=kw.pop("batch_size", 16), workers=kw.pop("workers", 0), epochs=kw.pop("epochs", 2),
                       progress=False, **kw)


def train_argv(out, *extra):
    """`tokenpace train` on the tiny ViT and 64 CIFAR images."""
    return ["train", "--data", CIFAR, "--output", str(out), "--model", "vit_tiny_patch16_224", "--model-args",
            TINY_ARGS, "--limit", "64", "--batch-size", "16", "--workers", "0", "--quiet", *extra]
