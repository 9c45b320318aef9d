"""Evo-ViT on LeViT: timm LeViT off the shelf (biases gathered, received-attention score) and tokenpace's
Evo-LeViT (class token, representative token, learnable evolution weights)."""
import copy

import pytest
import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

import tokenpace
from conftest import spread_weights
from tokenpace.families.levit import fuse_batchnorm

SMALL = dict(embed_dim=(32, 48, 64), key_dim=8, num_heads=(2, 3, 4), depth=(3, 2, 2))


def make_levit(name="levit_cifar", seed=0, **overrides):
    torch.manual_seed(seed)
    return spread_weights(timm.create_model(name, **{**SMALL, **overrides}), seed).eval()


def spread_batchnorm_statistics(model):
    """Non-trivial BatchNorm running statistics (timm initialises them to the identity)."""
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return model


@pytest.fixture
def images():
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", ["levit_cifar", "evo_levit_cifar"])
@pytest.mark.parametrize("mode", ["stage", "layer"])
def test_keep_all_equals_the_unpatched_model(name, mode, images):
    model = make_levit(name)
    keys = list(model.state_dict())
    with torch.no_grad():
        ref = model(images)
        out = tokenpace.apply(model, "evo", keep=1.0, mode=mode)(images)
        assert torch.equal(out, ref)
        assert list(model.state_dict()) == keys
        tokenpace.apply(model, "evo", keep=0.5, mode=mode)
        assert not torch.allclose(model(images), ref, atol=1e-3)
        assert torch.equal(tokenpace.remove(model)(images), ref)


def _explicit(q, k, v, bias, scale, key_mask=None):
    logits = (q @ k.transpose(-2, -1)) * scale + bias
    if key_mask is not None:
        logits = logits.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    probs = logits.softmax(-1)
    return (probs @ v).transpose(1, 2).flatten(2), probs


def ref_timm_levit_evo(model, img, keep, first=2, alpha=0.5):
    """Literal Evo on timm LeViT, stage mode: full sequences with masks instead of gathers; g = received attention."""
    x = model.stem(img).flatten(2).transpose(1, 2)
    g, j = None, 0
    for s, stage in enumerate(model.stages):
        if s > 0:
            ds, ad = stage.downsample, stage.downsample.attn_downsample
            B, n, _ = x.shape
            k, v = ad.kv(x).view(B, n, ad.num_heads, -1).split([ad.key_dim, ad.val_dim], dim=3)
            q = ad.q(x).view(B, -1, ad.num_heads, ad.key_dim).transpose(1, 2)
            out, probs = _explicit(q, k.transpose(1, 2), v.transpose(1, 2), ad.get_attention_biases(x.device), ad.scale)
            out = ad.proj(out)
            x_new = out + ds.mlp(out)
            if g is not None:
                rows, cols = ad.resolution
                pos = torch.arange(rows * cols).view(rows, cols)[::2, ::2].reshape(-1)
                received = probs.mean(dim=(1, 2))
                total = g.sum(1, keepdim=True)
                g = (1 - alpha) * g[:, pos] + alpha * received[:, pos]
                g = g * total / g.sum(1, keepdim=True)
            x = x_new
        B, N, _ = x.shape
        kcount = int(N * keep)
        for i, blk in enumerate(stage.blocks):
            attn = blk.attn
            qkv = attn.qkv(x).view(B, N, attn.num_heads, -1).split([attn.key_dim, attn.key_dim, attn.val_dim], dim=3)
            q, k, v = (t.transpose(1, 2) for t in qkv)
            bias = attn.get_attention_biases(x.device)
            if j < first:
                out, probs = _explicit(q, k, v, bias, attn.scale)
                y = x + attn.proj(out)
                x = y + blk.mlp(y)
                g = probs.mean(dim=(1, 2)) if j == first - 1 else g
            else:
                if j == first or i == 0:  # a selection: at the first pruned block and at every stage start
                    mask = torch.zeros(B, N, dtype=torch.bool)
                    mask.scatter_(1, g.topk(kcount, dim=1).indices, True)
                out, probs = _explicit(q, k, v, bias, attn.scale, key_mask=mask)
                y = x + attn.proj(out)
                y = y + blk.mlp(y)
                x = torch.where(mask[..., None], y, x)
                received = (probs * mask[:, None, :, None]).sum(2).mean(1) / kcount  # kept queries only
                g = torch.where(mask, (1 - alpha) * g + alpha * received, g)
            j += 1
    return model.forward_head(x)


@pytest.mark.parametrize("first", [1, 2])
def test_timm_levit_matches_the_literal_reference(first, images):
    model = make_levit("levit_cifar")
    with torch.no_grad():
        expected = ref_timm_levit_evo(model, images, keep=0.5, first=first)
        out = tokenpace.apply(model, "evo", keep=0.5, stage_starts=(first,))(images)
    assert torch.allclose(out, expected, atol=1e-4), (out - expected).abs().max()


def test_defaults_that_pay_on_levit():
    """timm LeViT off the shelf prunes from block 1 (tokenpace.defaults); tokenpace's Evo-LeViT asks for the
    official block 2 and the representative token; an explicit option wins over both."""
    timm_levit = tokenpace.apply(make_levit("levit_cifar"), "evo")
    assert tokenpace.get_patch(timm_levit).config.stage_starts == (1,)
    evo_levit = tokenpace.apply(make_levit("evo_levit_cifar"), "evo")
    assert tokenpace.get_patch(evo_levit).config.stage_starts == (2,) and tokenpace.get_patch(evo_levit).policy.representative
    explicit = tokenpace.apply(make_levit("evo_levit_cifar"), "evo", stage_starts=(3,), representative=False)
    assert tokenpace.get_patch(explicit).config.stage_starts == (3,) and not tokenpace.get_patch(explicit).policy.representative


def test_trace_and_bias_gathering(images):
    model = tokenpace.apply(make_levit("levit_cifar"), "evo", keep=0.5, stage_starts=(2,))
    with torch.no_grad(), tokenpace.trace(model) as tr:
        model(images)
    shapes = [None if k is None else tuple(k.shape) for k in tr.kept]
    assert shapes == [None, None, (3, 32), (3, 8), (3, 8), (3, 2), (3, 2)]  # 64 -> 16 -> 4 tokens, half kept
    assert all(len(set(k[0].tolist())) == k.shape[1] for k in tr.kept if k is not None)
    adapter = tokenpace.get_patch(model).adapter
    pos = tr.kept[2]
    parts = adapter.parts(2)
    gathered = parts.bias(adapter.tokens(None).select(pos))
    full = parts.bias(adapter.tokens(None))
    b = 1
    assert torch.equal(gathered[b], full[:, pos[b]][:, :, pos[b]])


def _evo_levit_block(blk, x, alpha, g, cols):
    """One EvoBlock with explicit attention; g evolved with the head-mean class row over the columns ``cols``
    (initialised by the first attention of the forward)."""
    attn = blk.attn
    B, N, _ = x.shape
    qkv = attn.qkv(x).view(B, N, attn.num_heads, -1).split([attn.key_dim, attn.key_dim, attn.val_dim], dim=3)
    out, probs = _explicit(*(t.transpose(1, 2) for t in qkv), 0.0, attn.scale)
    y = x + attn.proj(out)
    row = probs[:, :, 0, cols].mean(1)
    g = row if g is None else (1 - alpha) * g + alpha * row
    return y + blk.mlp(y), g


def _take(t, idx):
    return t.gather(1, idx) if t.dim() == 2 else t.gather(1, idx[..., None].expand(-1, -1, t.shape[-1]))


def ref_official_evo_levit(model, img, keep, first=2, mode="stage"):
    """The official Evo-LeViT forward (evovit.md §3.2, §4.3, §7), literally: every attention evolves g from block 0
    on (head-mean class row; learned sigmoid(theta) in stage mode, 0.5 in layer mode); a selection sorts by g,
    pools the placeholders into a representative token (weights g / sum g) appended last, runs the slow blocks on
    [class, kept, representative] and adds the representative's summed residual to every placeholder; down-sampling
    evolves g with its sub-sampled class row over the full-resolution keys and rescales g to its previous sum."""
    alpha = (lambda m: torch.sigmoid(m.theta)) if mode == "stage" else (lambda m: 0.5)
    x, g, j = model.embed(img), None, 0
    for s, stage in enumerate(model.stages):
        if s > 0:
            ds = model.downsamples[s]
            total = g.sum(1, keepdim=True)
            x, probs = ds.attend(x)
            sub, t = ds.subsample_index(), alpha(ds)
            g = (1 - t) * g[:, sub] + t * probs[:, :, 0, 1:].mean(1)[:, sub]
            g = g * total / g.sum(1, keepdim=True)
        slow = []
        for blk in stage:
            if j < first:
                x, g = _evo_levit_block(blk, x, alpha(blk.attn), g, slice(1, None))
            else:
                slow.append(blk)
            j += 1
        for segment in ([[b] for b in slow] if mode == "layer" else [slow] if slow else []):
            k = int((x.shape[1] - 1) * keep)
            order = g.argsort(dim=1, descending=True)
            kept, ph = order[:, :k], order[:, k:]
            w = _take(g, ph) / _take(g, ph).sum(1, keepdim=True)
            rep = (w.unsqueeze(-1) * _take(x[:, 1:], ph)).sum(1, keepdim=True)
            y, g_kept = torch.cat([x[:, :1], _take(x[:, 1:], kept), rep], dim=1), _take(g, kept)
            for blk in segment:
                y, g_kept = _evo_levit_block(blk, y, alpha(blk.attn), g_kept, slice(1, -1))
            patches = x[:, 1:] + (y[:, -1:] - rep)  # every placeholder moved by the representative's residual
            patches = patches.scatter(1, kept[..., None].expand(-1, -1, x.shape[-1]), y[:, 1:-1])
            x, g = torch.cat([y[:, :1], patches], dim=1), g.scatter(1, kept, g_kept)
    return model.forward_head(x)


@pytest.mark.parametrize("mode", ["stage", "layer"])
@pytest.mark.parametrize("first", [2, 4])  # 4: the first selection in the second stage
def test_evo_levit_matches_the_official_forward(mode, first, images):
    model = make_levit("evo_levit_cifar")
    with torch.no_grad():
        for m in model.modules():  # learned evolution weights away from sigmoid(0) = 0.5
            if hasattr(m, "theta"):
                m.theta.uniform_(-2.0, 2.0)
        expected = ref_official_evo_levit(model, images, 0.5, first, mode)
        out = tokenpace.apply(model, "evo", keep=0.5, mode=mode, stage_starts=(first,))(images)
    assert torch.allclose(out, expected, atol=1e-4), (out - expected).abs().max()


def test_evo_levit_representative_moves_every_placeholder_by_one_residual(images):
    model = tokenpace.apply(make_levit("evo_levit_cifar"), "evo", keep=0.5)
    patch = tokenpace.get_patch(model)
    assert patch.policy.representative  # the official Evo-LeViT default
    seen = {}
    hooks = [patch.adapter.blocks[2].attn.qkv.register_forward_pre_hook(lambda m, a: seen.update(n=seen.get("n", a[0].shape[1]))),
             model.downsamples[1].kv.register_forward_pre_hook(lambda m, a: seen.update(x=seen.get("x", a[0])))]
    with torch.no_grad(), tokenpace.trace(model) as tr:
        model(images)
        before = model.stages[0][1](model.stages[0][0](model.embed(images)))  # blocks 0-1 run dense
    for h in hooks:
        h.remove()
    assert seen["n"] == 1 + 32 + 1  # class token, 32 kept, the representative token
    delta = seen["x"] - model.downsamples[1].pos_embed - before  # after block 2 (the first pruned one): placeholders moved by one residual
    for b in range(images.shape[0]):
        placeholders = sorted(set(range(64)) - set(tr.kept[2][b].tolist()))
        d = delta[b, 1:][placeholders]
        assert torch.allclose(d, d[:1].expand_as(d), atol=1e-5) and d.abs().max() > 1e-4


def test_evo_levit_learns_its_evolution_weights_in_stage_mode(images):
    model = make_levit("evo_levit_cifar").train()
    tokenpace.apply(model, "evo", keep=0.5, mode="stage")
    model(images).sum().backward()
    thetas = [m.theta.grad for m in model.modules() if hasattr(m, "theta")]
    assert sum(int(t is not None and t.abs() > 0) for t in thetas) >= 3
    model.zero_grad()
    tokenpace.apply(model, "evo", keep=0.5, mode="layer")  # fixed alpha 0.5 before the layer-to-stage switch
    model(images).sum().backward()
    assert all(m.theta.grad is None or m.theta.grad.abs().max() == 0 for m in model.modules() if hasattr(m, "theta"))


@pytest.mark.parametrize("name", ["levit_cifar", "evo_levit_cifar"])
@pytest.mark.parametrize("options", [None, {}, {"mode": "layer"}, {"keep": 0.3}], ids=str)
def test_macs_equal_flop_counter(name, options, images):
    model = make_levit(name)
    if options is not None:
        tokenpace.apply(model, "evo", **options)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(images[:1])
    assert tokenpace.macs(model) == counter.get_total_flops() // 2


def test_published_levit_macs():
    with torch.device("meta"):
        model = timm.create_model("levit_256")
    assert abs(tokenpace.macs(model) / 1.12e9 - 1) < 0.01  # LeViT paper: 1120 M multiply-adds (we count 1127 M)
    evo = tokenpace.macs(tokenpace.apply(model, "evo")) / 1e9
    assert 0.7 < evo < 0.95


def test_batchnorm_fused_levit_keeps_working(images):
    model = make_levit("levit_cifar")
    spread_batchnorm_statistics(model)  # fusing changes the weights
    with torch.no_grad():
        ref = tokenpace.apply(model, "evo", keep=0.5)(images)
        fused = fuse_batchnorm(copy.deepcopy(tokenpace.remove(model)))
        assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in fused.modules())
        out = tokenpace.apply(fused, "evo", keep=0.5)(images)
    assert torch.allclose(out, ref, atol=1e-4)


def test_levit_errors():
    model = make_levit("levit_cifar")
    with pytest.raises(ValueError, match="'evit' is not available for timm LeViT models .*down-sample a full grid"
                                         ".*accepted here: 'evo', 'idle'"):
        tokenpace.apply(model, "evit")
    with pytest.raises(ValueError, match="accepted here: 'received', 'random'"):
        tokenpace.apply(model, "evo", score="cls")
    with pytest.raises(ValueError, match="representative=False"):
        tokenpace.apply(model, "evo", representative=True)
    with pytest.raises(ValueError, match="outside the model"):
        tokenpace.apply(model, "evo", stage_starts=(0,))
    evo = make_levit("evo_levit_cifar")
    with pytest.raises(ValueError, match="cannot run 64x64 inputs: it is built for 32x32 inputs only"):
        tokenpace.macs(evo, img_size=64)
    with pytest.raises(ValueError, match="no pretrained weights"):
        timm.create_model("evo_levit_256", pretrained=True)


def test_evo_scratch_objective_trains_the_four_heads(images):
    from tokenpace.train.objectives import make_objective
    from tokenpace.train.recipes import get_recipe

    model = tokenpace.apply(make_levit("evo_levit_cifar").train(), "evo", mode="layer")
    objective = make_objective(get_recipe("evo-scratch"), model, torch.nn.CrossEntropyLoss())
    assert objective.trainable() == [model] and objective.extra_state() == {}  # the heads live in the model
    loss, terms, logits = objective(images, torch.tensor([0, 1, 2]))
    loss.backward()
    assert set(terms) == {"ce", "ce_cls_head"} and logits.shape == (3, 10)
    assert torch.allclose(loss, (terms["ce"] + terms["ce_cls_head"]) / 2)
    for head in (model.head, model.head_dist, model.head_cls, model.head_cls_dist):
        assert head.linear.weight.grad.abs().sum() > 0


def test_cut_loss_is_refused_without_a_class_token():
    from tokenpace.train.objectives import make_objective
    from tokenpace.train.recipes import get_recipe

    with torch.device("meta"):
        model = timm.create_model("pvt_v2_b0", num_classes=10)
    student = tokenpace.apply(copy.deepcopy(model), "idle")
    with pytest.raises(ValueError, match=r"PyramidVisionTransformerV2 has none; train it without the cut loss "
                                         r"\(--cut-mode none\)"):
        make_objective(get_recipe("idle-finetune"), student, torch.nn.CrossEntropyLoss(), dense_model=model)


def test_model_cut_loss_refuses_what_it_cannot_compute(images):
    from tokenpace.losses import model_cut_loss

    model = make_levit("evo_levit_cifar")
    with pytest.raises(ValueError, match="needs a model patched with Idle .*this one is not patched"):
        model_cut_loss(model)
    with pytest.raises(ValueError, match="this one runs evo"):
        model_cut_loss(tokenpace.apply(model, "evo"))
    tokenpace.remove(model)
    with pytest.raises(ValueError, match="latest forward in training mode"):
        model_cut_loss(tokenpace.apply(model, "idle"))  # no forward yet
    with torch.no_grad():
        model.eval()(images)
    with pytest.raises(ValueError, match="latest forward in training mode"):
        model_cut_loss(model)  # an eval forward records nothing
    model.train()(images)
    assert model_cut_loss(model).item() > 0
    with pytest.raises(ValueError, match="class token.s attention and Levit has none"):
        model_cut_loss(tokenpace.apply(make_levit("levit_cifar"), "idle"))


@pytest.mark.parametrize("name", ["levit_cifar", "evo_levit_cifar"])
def test_random_control_changes_only_the_ranking(name, images):
    model = make_levit(name)
    with torch.no_grad():
        cls_out = tokenpace.apply(model, "evo", keep=0.5)(images)
        torch.manual_seed(0)
        rand_out = tokenpace.apply(model, "evo", keep=0.5, score="random")(images)
        with tokenpace.trace(model) as tr:
            torch.manual_seed(0)
            model(images)
    assert torch.isfinite(rand_out).all()  # the representative token is still weighted by the real g
    assert not torch.allclose(rand_out, cls_out, atol=1e-4)
    assert tr.kept[2] is not None and tr.kept[2].shape == (3, 32)


def test_evo_scratch_needs_a_class_token_or_its_own_heads():
    from tokenpace.train.objectives import make_objective
    from tokenpace.train.recipes import get_recipe

    with pytest.raises(ValueError, match="--recipe finetune --method evo"):
        make_objective(get_recipe("evo-scratch"), make_levit("levit_cifar"), torch.nn.CrossEntropyLoss())


def test_bench_train_on_levit(images):
    from tokenpace.bench import MethodSpec, benchmark_train

    results = benchmark_train(make_levit("levit_cifar"), [MethodSpec("dense"), MethodSpec("evo")], 2,
                              torch.device("cpu"), runs=1, warmup=0)
    assert [r.method for r in results] == ["dense", "evo"] and results[1].gmacs < results[0].gmacs


@pytest.mark.parametrize("name", ["levit_cifar", "evo_levit_cifar"])
def test_torch_compile_full_graph(name, images):
    model = tokenpace.apply(make_levit(name), "evo", keep=0.5)  # stage mode: Evo-LeViT's learned alpha is a tensor
    with torch.no_grad():
        expected = model(images)
        compiled = torch.compile(model, fullgraph=True, backend="eager")
        assert torch.allclose(compiled(images), expected, atol=1e-5)


def ref_levit_idle(model, img, keep, starts, score):
    """IdleViT on a LeViT, masked: scores from the full logits (biases included), idle keys masked, updates kept on
    the selected rows; down-sampling runs on every token."""
    evo = hasattr(model, "downsamples")
    x = model.embed(img) if evo else model.stem(img).flatten(2).transpose(1, 2)
    P, i = (1 if evo else 0), 0
    stages = model.stages if evo else [stage.blocks for stage in model.stages]
    for s, blocks in enumerate(stages):
        x = model.downsamples[s](x) if evo else model.stages[s].downsample(x)
        B, N, _ = x.shape
        for blk in blocks:
            stage = sum(1 for start in starts if i >= start)
            i += 1
            if stage == 0:
                x = blk(x)
                continue
            attn = blk.attn
            q, k, v = (t.transpose(1, 2) for t in attn.qkv(x).view(B, N, attn.num_heads, -1).split(
                [attn.key_dim, attn.key_dim, attn.val_dim], dim=3))
            logits = (q @ k.transpose(-2, -1)) * attn.scale
            if not evo:
                logits = logits + attn.get_attention_biases(x.device)
            scores = (logits[:, :, 0] if score == "cls" else logits.mean(2)).sum(1)[:, P:]
            top = scores.topk(int((N - P) * keep ** stage), dim=1).indices
            m = torch.zeros(B, N).scatter(1, top + P, 1.0)
            m[:, :P] = 1.0
            probs = (logits + ((1 - m) * -1e9)[:, None, None, :]).softmax(-1)
            y = x + attn.proj((probs @ v).transpose(1, 2).flatten(2))
            x = torch.where(m.bool()[..., None], y + blk.mlp(y), x)
    return model.forward_head(x)


@pytest.mark.parametrize("name", ["levit_cifar", "evo_levit_cifar"])
def test_idle_on_levit_equals_the_masked_reference(name, images):
    model = make_levit(name)
    spread_batchnorm_statistics(model)  # scores fold BatchNorm into the key projection
    score = "cls" if name == "evo_levit_cifar" else "received"
    with torch.no_grad():
        dense = model(images)
        assert torch.equal(tokenpace.apply(model, "idle", keep=1.0)(images), dense)
        expected = ref_levit_idle(model, images, 0.65, (2, 4, 5), score)
        got = tokenpace.apply(model, "idle", keep=0.65)(images)
    assert not torch.allclose(got, dense, atol=1e-3)
    assert torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()


def ref_evo_levit_idle_training(model, img, keep, starts):
    """IdleViT on Evo-LeViT in training, gathered: class-query scores with the q/k BatchNorm's running statistics
    (the score side never uses or updates batch statistics), then the block runs on [class token, top-K], its
    BatchNorms normalising over those tokens and updating their running statistics once."""
    x, i = model.embed(img), 0
    for s, blocks in enumerate(model.stages):
        x = model.downsamples[s](x)
        B, N, C = x.shape
        for blk in blocks:
            stage = sum(1 for start in starts if i >= start)
            i += 1
            if stage == 0:
                x = blk(x)
                continue
            attn, bn = blk.attn, blk.attn.qkv.bn
            with torch.no_grad():
                qkv = torch.nn.functional.batch_norm(attn.qkv.linear(x).flatten(0, 1), bn.running_mean,
                                                     bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
                q, k, _ = (t.transpose(1, 2) for t in qkv.view(B, N, attn.num_heads, -1).split(
                    [attn.key_dim, attn.key_dim, attn.val_dim], dim=3))
                scores = (q[:, :, :1] @ k.transpose(-2, -1)).sum(1)[:, 0, 1:]
            top = scores.topk(int((N - 1) * keep ** stage), dim=1).indices
            rows = torch.cat([torch.zeros(B, 1, dtype=torch.long), 1 + top], dim=1)
            x = x.scatter(1, rows[..., None].expand(-1, -1, C), blk(_take(x, rows)))
    return model.forward_head(x)


@pytest.mark.parametrize("project_keys", [False, True])
def test_idle_in_training_normalises_each_block_once_over_its_tokens(project_keys, images):
    """In training, LeViT's q/k/v BatchNorm of an idling block runs once, over the tokens the block runs on; scores
    and the cut loss use its running statistics and leave them as they are (they updated them up to 4 times per
    block, with statistics of other token sets). Keys projected for scoring (project_keys) are not the block's."""
    from tokenpace.losses import model_cut_loss

    model = make_levit("evo_levit_cifar")
    spread_batchnorm_statistics(model)
    reference = copy.deepcopy(model).train()
    expected = ref_evo_levit_idle_training(reference, images, 0.65, (2, 4, 5))
    tokenpace.apply(model.train(), "idle", keep=0.65, project_keys=project_keys)
    rows = []
    hooks = [b.attn.qkv.bn.register_forward_pre_hook(lambda m, a: rows.append(a[0].shape[0]))
             for stage in model.stages for b in stage]
    got = model(images)
    for h in hooks:
        h.remove()
    assert rows == [3 * 65, 3 * 65, 3 * 42, 3 * 11, 3 * 7, 3 * 2, 3 * 2]  # once per block: 3 images x (1 + K)
    assert torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()
    buffers = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
    assert all(torch.allclose(buffers[k], v, atol=1e-6) for k, v in reference.state_dict().items() if k in buffers)
    model_cut_loss(model).backward()
    assert all(torch.equal(buffers[k], v) for k, v in model.state_dict().items() if k in buffers)


@pytest.mark.parametrize("name", ["levit_cifar", "evo_levit_cifar"])
@pytest.mark.parametrize("options", [{}, {"score": "norm"}, {"project_keys": True}], ids=str)
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])  # train: BatchNorm batch statistics
def test_idle_macs_on_levit_equal_flop_counter(name, options, training, images):
    model = tokenpace.apply(make_levit(name).train(training), "idle", **options)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(images[:2])
    assert tokenpace.macs(model) == counter.get_total_flops() // 4  # 2 FLOPs per MAC, 2 images


def test_bench_fuse_bn_is_recorded_and_refused_where_it_cannot_apply(tmp_path, capsys):
    import json

    from tokenpace.cli import main

    out = tmp_path / "bench.json"
    common = ["bench", "--model", "levit_cifar", "--methods", "dense", "--batch-size", "1", "--quiet", "--fuse-bn"]
    assert main(common + ["--json", str(out), "--runs", "1", "--warmup", "0"]) == 0
    assert "BatchNorm fused" in capsys.readouterr().out and json.loads(out.read_text())["fuse_bn"] is True
    for flag in ("--memory", "--train"):
        assert main(common + [flag]) == 2
        assert f"--fuse-bn folds BatchNorm for inference timing; {flag} measures" in capsys.readouterr().err


def test_a_two_block_evo_levit_prunes_from_its_last_block_by_default():
    model = timm.create_model("evo_levit_cifar", depth=(1, 1), embed_dim=(96, 144), num_heads=(4, 6))
    assert tokenpace.supported_methods(model) == ["evo", "idle"]
    assert tokenpace.get_patch(tokenpace.apply(model, "evo")).config.stage_starts == (1,)  # block 2 is not there


# ----------------------------------------------------------------------------------------------------------------
# timm's NCHW LeViT (levit_conv_*): the same weights as 1x1 convolutions and BatchNorm2d, run on tokens
# ----------------------------------------------------------------------------------------------------------------
def make_levit_twins(**overrides):
    """timm LeViT in its linear layout and in NCHW (``use_conv``) with the same weights and BatchNorm statistics."""
    linear = spread_batchnorm_statistics(make_levit("levit_cifar", **overrides))
    torch.manual_seed(0)
    conv = timm.create_model("levit_cifar", use_conv=True, **{**SMALL, **overrides}).eval()
    target = conv.state_dict()
    assert list(target) == list(linear.state_dict())
    conv.load_state_dict({k: v.view_as(target[k]) for k, v in linear.state_dict().items()})
    return linear, conv


TWIN_OPTIONS = [("evo", {}), ("evo", {"mode": "layer"}), ("evo", {"keep": 0.3}), ("idle", {}),
                ("idle", {"project_keys": True}), ("idle", {"score": "norm"})]


def test_conv_levit_keep_one_is_the_unpatched_model(images):
    linear, conv = make_levit_twins()
    with torch.no_grad():
        dense = conv(images)
        torch.testing.assert_close(dense, linear(images), atol=1e-5, rtol=1e-5)  # the twins are one model
        for method in ("evo", "idle"):
            assert torch.equal(tokenpace.apply(conv, method, keep=1.0)(images), dense)
            assert torch.equal(tokenpace.remove(conv)(images), dense)


@pytest.mark.parametrize("method,options", TWIN_OPTIONS, ids=str)
def test_conv_levit_equals_its_linear_twin(method, options, images):
    """Each method on the NCHW model computes what it computes on the linear one (held to the literal references
    above): scores, gathered biases, down-sampling rows and the blocks on token subsets."""
    linear, conv = make_levit_twins()
    with torch.no_grad():
        expected = tokenpace.apply(linear, method, **options)(images)
        got = tokenpace.apply(conv, method, **options)(images)
        assert not torch.allclose(got, tokenpace.remove(copy.deepcopy(conv))(images), atol=1e-3)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", ["idle", "evo"])
def test_conv_levit_trains_as_its_linear_twin(method, images):
    """In training BatchNorm2d normalises over the tokens a block runs on (and the down-sampling's over its
    sub-sampled queries, where Evo reads the scores), as the linear model's BatchNorm1d: outputs, running statistics
    and gradients agree. In float64: batch statistics over a few tokens amplify float32 rounding (the unpatched
    twins' stem gradients differ by 3e-4 in float32)."""
    linear, conv = (model.double() for model in make_levit_twins())
    outputs = []
    for model in (linear, conv):
        tokenpace.apply(model.train(), method, keep=0.65)
        out = model(images.double())
        out.logsumexp(-1).mean().backward()
        outputs.append(out)
    torch.testing.assert_close(outputs[1], outputs[0], atol=1e-10, rtol=1e-10)
    for (name, a), b in zip(linear.state_dict().items(), conv.state_dict().values()):
        torch.testing.assert_close(b.view_as(a), a, atol=1e-10, rtol=1e-10, msg=name)
    for (name, a), b in zip(linear.named_parameters(), conv.parameters()):
        torch.testing.assert_close(b.grad.view_as(a.grad), a.grad, atol=1e-10, rtol=1e-10, msg=name)


@pytest.mark.parametrize("method,options", [(None, {})] + TWIN_OPTIONS, ids=str)
def test_conv_levit_macs_equal_flop_counter(method, options, images):
    _, conv = make_levit_twins()
    if method is not None:
        tokenpace.apply(conv, method, **options)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        conv(images[:1])
    assert tokenpace.macs(conv) == counter.get_total_flops() // 2


def test_batchnorm_fused_conv_levit_keeps_working(images):
    """fuse_batchnorm turns every ConvNorm into one 1x1 Conv2d with a bias: still read as a linear map."""
    _, conv = make_levit_twins()
    with torch.no_grad():
        expected = tokenpace.apply(conv, "evo", keep=0.5)(images)
        fused = fuse_batchnorm(copy.deepcopy(tokenpace.remove(conv)))
        assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in fused.modules())
        got = tokenpace.apply(fused, "evo", keep=0.5)(images)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_published_conv_levit_is_the_linear_one():
    with torch.device("meta"):
        conv, linear = timm.create_model("levit_conv_256"), timm.create_model("levit_256")
    assert tokenpace.macs(conv) == tokenpace.macs(linear)
    assert tokenpace.macs(tokenpace.apply(conv, "evo")) == tokenpace.macs(tokenpace.apply(linear, "evo"))


def test_conv_levit_refuses_a_wrapped_convolution(images):
    """The NCHW layers run on tokens as linear maps read from their weights: a wrapper (a LoRA conv) would be left
    out, so the forward refuses it, naming the fix."""
    _, conv = make_levit_twins()
    tokenpace.apply(conv, "idle", keep=0.65)
    inner = conv.stages[1].blocks[0].mlp.ln1
    inner.linear = type("LoraConv2d", (torch.nn.Conv2d,), {})(inner.linear.in_channels, inner.linear.out_channels, 1)
    with pytest.raises(TypeError, match="a LoraConv2d inside timm's NCHW LeViT.*merge_and_unload"):
        conv(images)


def test_conv_levit_runs_frozen_and_sync_batchnorm_and_refuses_hooks(images):
    """timm's freeze_batch_norm_2d (FrozenBatchNorm2d) and DDP's SyncBatchNorm are per-channel norms on tokens too;
    a pruning hook recomputes a weight the token path would not read: refused."""
    import torch.nn.utils.prune as prune
    from timm.layers import freeze_batch_norm_2d

    _, conv = make_levit_twins()
    with torch.no_grad():
        expected = tokenpace.apply(conv, "idle", keep=0.65)(images)
        plain = tokenpace.remove(conv)
        frozen = freeze_batch_norm_2d(copy.deepcopy(plain))
        sync = torch.nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(plain)).eval()
        assert type(frozen.stages[1].blocks[0].mlp.ln1.bn).__name__ == "FrozenBatchNorm2d"
        assert type(sync.stages[1].blocks[0].mlp.ln1.bn) is torch.nn.SyncBatchNorm
        for model in (frozen, sync):
            torch.testing.assert_close(tokenpace.apply(model, "idle", keep=0.65)(images), expected, atol=1e-5,
                                       rtol=1e-5)
    prune.l1_unstructured(conv.stages[1].blocks[0].mlp.ln1.linear, "weight", amount=0.5)
    tokenpace.apply(conv, "idle", keep=0.65)
    with pytest.raises(TypeError, match="a Conv2d with forward hooks inside timm's NCHW LeViT.*prune.remove"):
        conv(images)
