#!/usr/bin/env python3
"""Memory traffic of one forward per method, counted on the CPU: the bytes every aten call reads and writes (its
tensor inputs and outputs; views, aliases and no-op calls excluded; a row gather or an in-place row scatter counts
the rows it touches), per image, from the difference between two batch sizes, so the weights (read once per forward,
and cast once under autocast) drop out. An eager forward of a small ViT at large batch on a GPU is bound by this
traffic more than by its multiply-accumulates, so the dense/method ratio of these bytes is the speed-up such a
forward can reach, where the MACs ratio is the one a compute-bound forward can.

    python scripts/bytes_moved.py [--model deit_small_patch16_224] [--amp bf16] [--methods dense,evo,idle,evit,topk]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

import timm  # noqa: E402

import tokenpace  # noqa: E402
from tokenpace.bench import AMP_DTYPES, autocast_for, parse_methods, spec_config  # noqa: E402
from tokenpace.cli.source import parse_model_args  # noqa: E402
from tokenpace.errors import TokenpaceError  # noqa: E402
from tokenpace.families import adapter_for  # noqa: E402


class TrafficCounter(TorchDispatchMode):
    """Sums the bytes of the tensors each aten call reads and writes."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        ins = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        storages = {t.untyped_storage().data_ptr() for t in ins}
        if not name.endswith("_") and outs and all(o.untyped_storage().data_ptr() in storages for o in outs):
            return out  # a view, or the input returned as it is (dropout at inference)
        if name == "index_select":
            ins = outs  # reads the rows it writes (the small index is left out)
        elif name == "index_copy_":
            ins = outs = [args[3]]  # reads the source, writes its rows (the index left out)
        self.bytes += sum(t.numel() * t.element_size() for t in ins + outs)
        return out


def forward_bytes(model: torch.nn.Module, images: torch.Tensor, amp: str) -> int:
    with torch.inference_mode(), autocast_for(torch.device("cpu"), amp)():
        model(images)  # once before counting: lazily built caches are not traffic
        counter = TrafficCounter()
        with counter:
            model(images)
    return counter.bytes


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="deit_small_patch16_224")
    p.add_argument("--amp", default="bf16", choices=tuple(AMP_DTYPES))
    p.add_argument("--methods", default="dense,evo,idle,evit,topk", help="as tokenpace bench --methods")
    p.add_argument("--batch-sizes", default="2,4", help="two batch sizes; their difference gives bytes per image")
    p.add_argument("--model-args", default="", help="key=value,... passed to timm.create_model, as tokenpace --model-args")
    a = p.parse_args(argv)
    small, large = (int(b) for b in a.batch_sizes.split(","))
    if not 0 < small < large:
        p.error(f"--batch-sizes {a.batch_sizes!r}: two increasing positive sizes, e.g. 2,4")
    try:
        kwargs = parse_model_args(a.model_args)
    except TokenpaceError as err:
        p.error(str(err))
    torch.manual_seed(0)
    rows = []
    for spec in parse_methods(a.methods):
        model = timm.create_model(a.model, **kwargs).eval()
        if spec.method != "dense":
            tokenpace.apply(model, spec_config(spec))
        size = adapter_for(model).input_size()
        per = [forward_bytes(model, torch.randn(b, *size), a.amp) for b in (small, large)]
        rows.append({"method": spec.method, "config": spec.describe(),
                     "mib_per_image": (per[1] - per[0]) / (large - small) / 2**20})
    dense = next((r["mib_per_image"] for r in rows if r["method"] == "dense"), None)
    print(f"{a.model}, amp={a.amp}: MiB read and written per image, one forward (batch {large} minus batch {small})")
    print(f"{'method':8s}{'config':24s}{'MiB/image':>10s}{'vs dense':>10s}")
    for r in rows:
        ratio = f"{dense / r['mib_per_image']:.2f}x" if dense else "-"
        print(f"{r['method']:8s}{r['config']:24s}{r['mib_per_image']:10.1f}{ratio:>10s}")
    return rows


if __name__ == "__main__":
    main()
