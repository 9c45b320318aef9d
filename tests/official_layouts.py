"""Synthetic released checkpoints: a tokenpace / timm state dict rewritten in each official layout, written from the
specs' key maps (evovit.md §12.4, official-keys.md) independently of tokenpace.official, plus the specs' own
listings to check the writers against, and a literal Evo-ViT DeiT forward on official keys."""
from __future__ import annotations

import re

import torch
import torch.nn.functional as F

BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def to_evo_deit(state: dict) -> dict:
    """evovit.md §12.4: norm1 -> norms.{i}; qkv rows [q; k] -> qks.{i}.qk, [v] -> vs.{i}.v; proj -> projs.{i};
    fc_norm (after the pool) -> norm."""
    out = {}
    for key, value in state.items():
        block = re.fullmatch(r"blocks\.(\d+)\.(norm1|attn\.qkv|attn\.proj)\.(weight|bias)", key)
        if block:
            i, part, kind = block.groups()
            if part == "norm1":
                out[f"norms.{i}.{kind}"] = value
            elif part == "attn.proj":
                out[f"projs.{i}.{kind}"] = value
            else:
                width = value.shape[0] // 3
                out[f"qks.{i}.qk.{kind}"], out[f"vs.{i}.v.{kind}"] = value[:2 * width], value[2 * width:]
        elif key.startswith("fc_norm."):
            out["norm." + key[len("fc_norm."):]] = value
        else:
            out[key] = value
    return out


def to_evo_levit(state: dict, depths: tuple[int, ...]) -> dict:
    """official-keys.md: the flat blocks list is [stage-0 blocks, then per later stage: its down-sampling attention,
    its MLP, its blocks]; Linear/Conv + BN pairs are c + bn; heads bn + l; theta is learn_tradeoff of shape (1,);
    every entry is registered again under stage_blocks (duplicates the loader must not trip on)."""
    def cbn(rest):
        return rest.replace("linear.", "c.", 1)

    out = {}
    for key, value in state.items():
        m = re.fullmatch(r"stem\.conv(\d)\.(.*)", key)
        if key == "pos_embed":
            out["poss"] = value
        elif m:
            out[f"patch_embed.{2 * (int(m.group(1)) - 1)}.{cbn(m.group(2))}"] = value
        elif key.startswith("downsamples."):
            s, rest = key.split(".", 2)[1:]
            b = sum(depths[:int(s)]) + 2 * (int(s) - 1)
            if rest == "pos_embed":
                out[f"blocks.{b}.poss"] = value
            elif rest == "theta":
                out[f"blocks.{b}.learn_tradeoff"] = value.reshape(1)
            elif rest.startswith("mlp.ln1."):
                out[f"blocks.{b + 1}.m.0.{cbn(rest[len('mlp.ln1.'):])}"] = value
            elif rest.startswith("mlp.ln2."):
                out[f"blocks.{b + 1}.m.2.{cbn(rest[len('mlp.ln2.'):])}"] = value
            elif rest.startswith("q."):
                out[f"blocks.{b}.q.1.{cbn(rest[2:])}"] = value
            else:  # kv.*, proj.1.*
                out[f"blocks.{b}.{cbn(rest)}"] = value
        elif key.startswith("stages."):
            s, j, rest = key.split(".", 3)[1:]
            b = sum(depths[:int(s)]) + 2 * int(s) + int(j)
            rest = (rest.replace("attn.theta", "m1.m.learn_tradeoff").replace("attn.", "m1.m.")
                    .replace("mlp.ln1.", "m2.m.0.").replace("mlp.ln2.", "m2.m.2."))
            out[f"blocks.{b}.{cbn(rest)}"] = value.reshape(1) if rest.endswith("learn_tradeoff") else value
        elif key.startswith("head"):
            out[key.replace(".linear.", ".l.")] = value
        else:
            out[key] = value
    duplicates = {"stage_blocks." + k[len("blocks."):]: v.clone() for k, v in out.items() if k.startswith("blocks.")}
    return {**out, **duplicates}


def deit_training_format(state: dict) -> dict:
    """The DeiT training checkpoint a release wraps its weights in."""
    import argparse

    return {"model": state, "optimizer": {"state": {}, "param_groups": [{"lr": 1e-5}]}, "epoch": 29,
            "model_ema": {k: v.clone() for k, v in state.items()}, "args": argparse.Namespace(arch="x")}


# official-keys.md, EvoLeViT_256, every line but the BatchNorm ones and the stage_blocks duplicates
EVO_LEVIT_256_SPEC = """
cls_token (1, 1, 256)
poss (1, 197, 256)
patch_embed.0.c.weight (32, 3, 3, 3)
patch_embed.2.c.weight (64, 32, 3, 3)
patch_embed.4.c.weight (128, 64, 3, 3)
patch_embed.6.c.weight (256, 128, 3, 3)
blocks.{i}.m1.m.learn_tradeoff (1,)  i in [0, 1, 2, 3, 6, 7, 8, 9, 12, 13, 14, 15]
blocks.{i}.m1.m.qkv.c.weight (512, 256)  i in 0..3
blocks.{i}.m1.m.proj.1.c.weight (256, 256)  i in 0..3
blocks.{i}.m2.m.0.c.weight (512, 256)  i in 0..3
blocks.{i}.m2.m.2.c.weight (256, 512)  i in 0..3
blocks.{i}.learn_tradeoff (1,)  i in [4, 10]
blocks.{i}.poss (1, 197, 256)  i in 4..4
blocks.{i}.kv.c.weight (1280, 256)  i in 4..4
blocks.{i}.q.1.c.weight (256, 256)  i in 4..4
blocks.{i}.proj.1.c.weight (384, 1024)  i in 4..4
blocks.{i}.m.0.c.weight (768, 384)  i in 5..5
blocks.{i}.m.2.c.weight (384, 768)  i in 5..5
blocks.{i}.m1.m.qkv.c.weight (768, 384)  i in 6..9
blocks.{i}.m1.m.proj.1.c.weight (384, 384)  i in 6..9
blocks.{i}.m2.m.0.c.weight (768, 384)  i in 6..9
blocks.{i}.m2.m.2.c.weight (384, 768)  i in 6..9
blocks.{i}.poss (1, 50, 384)  i in 10..10
blocks.{i}.kv.c.weight (1920, 384)  i in 10..10
blocks.{i}.q.1.c.weight (384, 384)  i in 10..10
blocks.{i}.proj.1.c.weight (512, 1536)  i in 10..10
blocks.{i}.m.0.c.weight (1024, 512)  i in 11..11
blocks.{i}.m.2.c.weight (512, 1024)  i in 11..11
blocks.{i}.m1.m.qkv.c.weight (1024, 512)  i in 12..15
blocks.{i}.m1.m.proj.1.c.weight (512, 512)  i in 12..15
blocks.{i}.m2.m.0.c.weight (1024, 512)  i in 12..15
blocks.{i}.m2.m.2.c.weight (512, 1024)  i in 12..15
head.l.weight (1000, 512)
head.l.bias (1000,)
head_dist.l.weight (1000, 512)
head_dist.l.bias (1000,)
head_cls.l.weight (1000, 512)
head_cls.l.bias (1000,)
head_cls_dist.l.weight (1000, 512)
head_cls_dist.l.bias (1000,)
"""

# official-keys.md, LV-ViT-S (the BatchNorm lines included there)
LVVIT_S_SPEC = """
cls_token (1, 1, 384)
pos_embed (1, 197, 384)
patch_embed.conv1.weight (64, 3, 7, 7)
patch_embed.bn1.weight (64,)
patch_embed.bn1.bias (64,)
patch_embed.bn1.running_mean (64,)
patch_embed.bn1.running_var (64,)
patch_embed.bn1.num_batches_tracked ()
patch_embed.conv2.weight (64, 64, 3, 3)
patch_embed.bn2.weight (64,)
patch_embed.bn2.bias (64,)
patch_embed.bn2.running_mean (64,)
patch_embed.bn2.running_var (64,)
patch_embed.bn2.num_batches_tracked ()
patch_embed.conv3.weight (64, 64, 3, 3)
patch_embed.bn3.weight (64,)
patch_embed.bn3.bias (64,)
patch_embed.bn3.running_mean (64,)
patch_embed.bn3.running_var (64,)
patch_embed.bn3.num_batches_tracked ()
patch_embed.proj.weight (384, 64, 8, 8)
patch_embed.proj.bias (384,)
blocks.{i}.norm1.weight (384,)  i in 0..15
blocks.{i}.norm1.bias (384,)  i in 0..15
blocks.{i}.attn.qkv.weight (1152, 384)  i in 0..15
blocks.{i}.attn.proj.weight (384, 384)  i in 0..15
blocks.{i}.attn.proj.bias (384,)  i in 0..15
blocks.{i}.norm2.weight (384,)  i in 0..15
blocks.{i}.norm2.bias (384,)  i in 0..15
blocks.{i}.mlp.fc1.weight (1152, 384)  i in 0..15
blocks.{i}.mlp.fc1.bias (1152,)  i in 0..15
blocks.{i}.mlp.fc2.weight (384, 1152)  i in 0..15
blocks.{i}.mlp.fc2.bias (384,)  i in 0..15
norm.weight (384,)
norm.bias (384,)
head.weight (1000, 384)
head.bias (1000,)
aux_head.weight (1000, 384)
aux_head.bias (1000,)
"""


def parse_listing(text: str) -> dict[str, tuple[int, ...]]:
    """The specs' listing format: ``name (shape)``, with ``{i}`` expanded over ``i in A..B`` or ``i in [a, b]``."""
    out = {}
    for line in filter(None, (ln.strip() for ln in text.splitlines())):
        m = re.fullmatch(r"(\S+) \(([\d, ]*)\)(?:\s+i in (.+))?", line)
        name, shape, where = m.groups()
        dims = tuple(int(v) for v in shape.replace(" ", "").split(",") if v)
        if where is None:
            out[name] = dims
            continue
        if ".." in where:
            lo, hi = where.split("..")
            indices = range(int(lo), int(hi) + 1)
        else:
            indices = [int(v) for v in where.strip("[]").split(",")]
        for i in indices:
            out[name.replace("{i}", str(i))] = dims
    return out


def official_evo_deit(sd: dict, img: torch.Tensor, heads: int, keep: float = 0.5) -> torch.Tensor:
    """Evo-ViT's DeiT at inference (stage-wise, evovit.md §3-§6), step by step on the official keys: class attention
    summed over heads, overwritten in layers 0-3 (trade-off 1), sorted at layers 4 and 8 with the tokens, the top
    K = int(N * keep) and the class token run the layer, g of the kept tokens evolves 0.5 / 0.5, placeholders are
    re-attached unchanged after layers 7 and 11; the head reads LayerNorm(mean of the patch tokens)."""
    x = F.conv2d(img, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=16).flatten(2).transpose(1, 2)
    B, _, C = x.shape
    x = torch.cat([sd["cls_token"].expand(B, -1, -1), x], dim=1) + sd["pos_embed"]

    def ln(t, name):
        return F.layer_norm(t, (C,), sd[f"{name}.weight"], sd[f"{name}.bias"], eps=1e-6)

    g = full = None
    K = x.shape[1] - 1
    for i in range(12):
        if i in (4, 8):
            g, order = g.sort(dim=1, descending=True)
            full = torch.cat([x[:, :1], x[:, 1:].gather(1, order[..., None].expand(-1, -1, C))], dim=1)
            K = int((full.shape[1] - 1) * keep)
            x = full[:, :K + 1]
        n = x.shape[1]
        h = ln(x, f"norms.{i}")
        q, k = F.linear(h, sd[f"qks.{i}.qk.weight"], sd[f"qks.{i}.qk.bias"]).reshape(
            B, n, 2, heads, -1).permute(2, 0, 3, 1, 4)
        v = F.linear(h, sd[f"vs.{i}.v.weight"], sd[f"vs.{i}.v.bias"]).reshape(B, n, heads, -1).transpose(1, 2)
        attn = ((q @ k.transpose(-2, -1)) * (C // heads) ** -0.5).softmax(-1)
        new = attn[:, :, 0, 1:].sum(1)
        g = new if i < 4 else torch.cat([0.5 * g[:, :K] + 0.5 * new, g[:, K:]], dim=1)
        x = x + F.linear((attn @ v).transpose(1, 2).reshape(B, n, C), sd[f"projs.{i}.weight"], sd[f"projs.{i}.bias"])
        hidden = F.gelu(F.linear(ln(x, f"blocks.{i}.norm2"), sd[f"blocks.{i}.mlp.fc1.weight"],
                                 sd[f"blocks.{i}.mlp.fc1.bias"]))
        x = x + F.linear(hidden, sd[f"blocks.{i}.mlp.fc2.weight"], sd[f"blocks.{i}.mlp.fc2.bias"])
        if i in (7, 11):
            full = x = torch.cat([x, full[:, K + 1:]], dim=1)
    return F.linear(ln(x[:, 1:].mean(1), "norm"), sd["head.weight"], sd["head.bias"])
