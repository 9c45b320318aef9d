#!/usr/bin/env python3
"""Can the GPU suite's training steps be captured in CUDA graphs? Tried in a process of its own, at toy size.

    python scripts/gpu_suite_preflight.py --device cuda    # one JSON line: {"ok": ..., "variants": {...}, ...}

A capture that CUDA refuses can leave the capturing process in capture state (the stream, the allocator, the random
generator: ``torch.cuda.graph`` does not restore them when ending the capture raises), and the suite's CIFAR
sections would then fail one after the other. So the suite starts this script beside its own start-up, before any
of its GPU work, and trains from graphs only where every kind of step it trains captured and trained here: dense,
Evo in layer mode then stage mode (captured again after the switch, as the suite does), Idle, and Evo on cluttered
images. The first failure ends the trial (a broken capture state would fail the rest for the wrong reason).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "src")]

import torch  # noqa: E402
from torch import nn  # noqa: E402

import tokenpace  # noqa: E402
from gpu_suite_cifar import CifarConfig, cifar_vit  # noqa: E402
from gpu_suite_data import DeviceSplit  # noqa: E402
from gpu_suite_steps import CudaGraphStep, TrainSteps  # noqa: E402
from tokenpace.train.objectives import EvoScratchObjective, Objective  # noqa: E402
from tokenpace.train.recipes import get_recipe  # noqa: E402

VARIANTS = ("dense", "evo", "idle", "evo-cluttered")
# the suite's recipe at toy width; depth 4 gives Evo pruned layers (from block 1) and Idle idling ones (from 1)
TOY = CifarConfig(data="-", embed_dim=32, depth=4, num_heads=2, batch_size=32, batch_choices=(32,), erase_prob=0.25)
REPLAYS = 3


def toy_objective(variant: str, cfg: CifarConfig) -> Objective:
    """The objective and method the suite trains for ``variant``, on a toy model."""
    if variant.startswith("evo"):
        recipe = get_recipe("evo-scratch")
        model = cifar_vit(cfg, global_pool=recipe.global_pool)
        objective = EvoScratchObjective(model, nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing),
                                        recipe.aux_weight)
        tokenpace.apply(model, "evo", keep=cfg.evo_keep, mode="layer")
        return objective
    model = cifar_vit(cfg)
    if variant == "idle":
        tokenpace.apply(model, "idle", keep=cfg.idle_keep)
    return Objective(model, nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing))


def try_variant(variant: str, device: torch.device, graph=CudaGraphStep) -> None:
    """Warm up, capture and replay ``variant``'s step (Evo: then switch to stage mode and capture again); raises
    where a step ran eagerly, did not train, or left the random generator unusable."""
    cfg = replace(TOY, amp="bf16" if device.type == "cuda" else "none")
    if variant == "evo-cluttered":
        cfg = cfg.cluttered()
    gen = torch.Generator().manual_seed(0)
    data = DeviceSplit(torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=gen).to(device),
                       torch.randint(0, 10, (64,), generator=gen).to(device))
    objective = toy_objective(variant, cfg).to(device).train()
    before = [p.detach().clone() for p in objective.parameters()]
    runner = TrainSteps(objective, data, cfg, 1e-3, device, graphed=True, graph=graph)
    rounds = 2 if variant.startswith("evo") else 1
    losses = []
    for r in range(rounds):
        if r == 1:  # the suite's switch to stage mode, mid-training
            tokenpace.apply(objective.model, "evo", keep=cfg.evo_keep, mode="stage")
            runner.invalidate()
        for i in range(runner.warmup + REPLAYS):
            runner.set_lr(1e-3)
            losses.append(runner(torch.randperm(len(data), device=device)[:cfg.batch_size]))
    if runner.mode != "cuda_graph" or runner.captures != rounds:
        raise RuntimeError(f"the steps ran {runner.mode!r} with {runner.captures} of {rounds} captures")
    runner.release()
    if not torch.stack(losses).isfinite().all():
        raise RuntimeError("a loss is not finite")
    if all(torch.equal(a, b) for a, b in zip(before, objective.parameters())):
        raise RuntimeError("the replayed steps left every parameter as it was")
    torch.rand(1, device=device).item()  # the generator left usable after the captures


def preflight(device: torch.device, graph=CudaGraphStep) -> dict:
    """Each variant in turn, until one fails: {"ok", "variants": {name: "ok" or the error}, "seconds"}."""
    began = time.perf_counter()
    results = {}
    for variant in VARIANTS:
        try:
            try_variant(variant, device, graph)
            results[variant] = "ok"
        except Exception as e:  # noqa: BLE001 - any failure means: no graphs for the suite
            first = str(e).strip().splitlines()
            results[variant] = f"{type(e).__name__}: {first[0][:300] if first else ''}"
            break
    ok = len(results) == len(VARIANTS) and all(v == "ok" for v in results.values())
    return {"ok": ok, "variants": results, "seconds": round(time.perf_counter() - began, 2)}


def start(device: torch.device) -> subprocess.Popen:
    """This script on ``device`` in a new process (the caller's CUDA state is not shared: the child starts its own)."""
    return subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--device", str(device)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def collect(proc: subprocess.Popen, timeout: float) -> dict:
    """The result of a :func:`start`ed preflight, waiting at most ``timeout`` seconds; a preflight that timed out,
    crashed or printed no result reads as not ok, with why."""
    began = time.perf_counter()
    try:
        out, err = proc.communicate(timeout=max(timeout, 0.01))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return {"ok": False, "error": f"no result within {timeout:.0f} s (killed)"}
    lines = out.strip().splitlines()
    try:
        result = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        tail = err.strip().splitlines()[-1:] or ["no output"]
        return {"ok": False, "error": f"exit code {proc.returncode}: {tail[0][:300]}"}
    return {**result, "waited_s": round(time.perf_counter() - began, 2)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="the device to try the captures on (default: cuda)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    torch.backends.cudnn.benchmark = True  # as the suite trains
    result = preflight(torch.device(args.device))
    print(json.dumps(result), flush=True)  # the last line of stdout is the result
    return result


if __name__ == "__main__":
    main()
