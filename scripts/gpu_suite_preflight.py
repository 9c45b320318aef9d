#!/usr/bin/env python3
"""Can the GPU suite's training steps be captured in CUDA graphs? Tried in a process of its own, at toy size.

    python scripts/gpu_suite_preflight.py --device cuda    # one JSON line: {"ok": ..., "variants": {...}, ...}

A capture that CUDA refuses can leave the capturing process in capture state (the stream, the allocator, the random
generator: ``torch.cuda.graph`` does not restore them when ending the capture raises), and the suite's CIFAR
sections would then fail one after the other. So the suite starts this script first thing, beside its own imports
and data decoding, and trains from graphs only where every kind of step it trains captured and trained here: dense,
Evo in layer mode then stage mode (captured again after the switch, as the suite does), Idle, and Evo on cluttered
images. The first failure ends the trial (a broken capture state would fail the rest for the wrong reason).

The launcher half (:func:`start`, :func:`collect`) imports no torch, so the suite can start the trial before its
own ``import torch``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
VARIANTS = ("dense", "evo", "idle", "evo-cluttered")
REPLAYS = 3


# --- the launcher (no torch) -------------------------------------------------------------------------------------

class Launched:
    """A started trial: its process, when it started, and the files its output goes to (no pipe to fill)."""

    def __init__(self, command: list[str]) -> None:
        self.out, self.err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(command, stdout=self.out, stderr=self.err, stdin=subprocess.DEVNULL)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def start(device: str = "cuda") -> Launched:
    """This script on ``device`` in a new process (the caller's CUDA state is not shared: the child starts its own)."""
    return Launched([sys.executable, str(Path(__file__).resolve()), "--device", device])


def collect(run: Launched, limit_s: float) -> dict:
    """The trial's result, waiting until ``limit_s`` seconds after its start; a trial that timed out, crashed or
    printed no result reads as not ok, with why."""
    began = time.perf_counter()
    try:
        run.proc.wait(timeout=max(limit_s - (began - run.started), 0.01))
    except subprocess.TimeoutExpired:
        run.stop()
        return {"ok": False, "error": f"no result within {limit_s:.0f} s of its start (killed)"}
    run.out.seek(0)
    lines = run.out.read().strip().splitlines()
    try:
        result = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        result = None
    if not isinstance(result, dict) or not isinstance(result.get("ok"), bool):
        run.err.seek(0)
        tail = run.err.read().strip().splitlines()[-1:] or ["no output"]
        return {"ok": False, "error": f"exit code {run.proc.returncode}, no result: {tail[0][:300]}"}
    return {**result, "waited_s": round(time.perf_counter() - began, 2)}


# --- the trial (torch) -------------------------------------------------------------------------------------------

def toy_config(device_type: str):
    """The suite's recipe on a toy model with the suite's head size (64: the attention kernels it captures);
    depth 4 gives Evo pruned layers (from block 1) and Idle idling ones (from block 1)."""
    from gpu_suite_cifar import CifarConfig

    return CifarConfig(data="-", embed_dim=128, depth=4, num_heads=2, batch_size=32, batch_choices=(32,),
                       amp="bf16" if device_type == "cuda" else "none")


def toy_objective(variant: str, cfg):
    """The objective and method the suite trains for ``variant``, built as the suite builds them, on a toy model."""
    from torch import nn

    import tokenpace
    from gpu_suite_cifar import cifar_vit, evo_scratch_objective, freeze_as_idle_finetune
    from tokenpace.train.objectives import Objective

    if variant.startswith("evo"):
        return evo_scratch_objective(cfg)
    model = cifar_vit(cfg)
    if variant == "idle":  # fine-tuned from dense weights (here: fresh ones), its recipe's parameters frozen
        tokenpace.apply(freeze_as_idle_finetune(model), "idle", keep=cfg.idle_keep)
    return Objective(model, nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing))


def try_variant(variant: str, device, graph=None) -> None:
    """Warm up, capture and replay ``variant``'s step (Evo: then switch to stage mode and capture again); raises
    where a step ran eagerly, where replays did not train, where a replay at learning rate 0 moved a weight (the
    graph must read the rate set before each replay), or where the random generator is left unusable."""
    import torch

    import tokenpace
    from gpu_suite_data import DeviceSplit
    from gpu_suite_steps import CudaGraphStep, TrainSteps

    cfg = toy_config(device.type)
    if variant == "evo-cluttered":
        cfg = cfg.cluttered()
    gen = torch.Generator().manual_seed(0)
    data = DeviceSplit(torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=gen).to(device),
                       torch.randint(0, 10, (64,), generator=gen).to(device))
    objective = toy_objective(variant, cfg).to(device).train()
    runner = TrainSteps(objective, data, cfg, 1e-3, device, graphed=True, graph=graph or CudaGraphStep)

    def weights():
        return [p.detach().clone() for p in objective.parameters() if p.requires_grad]

    def step(lr: float):
        runner.set_lr(lr)
        return runner(torch.randperm(len(data), device=device)[:cfg.batch_size])

    rounds = 2 if variant.startswith("evo") else 1
    losses = []
    for r in range(rounds):
        if r == 1:  # the suite's switch to stage mode, mid-training
            tokenpace.apply(objective.model, "evo", keep=cfg.evo_keep, mode="stage")
            runner.invalidate()
        for _ in range(runner.warmup + 1):  # the warm-up, then the capture with its first replay
            losses.append(step(1e-3))
        replayed = weights()
        losses += [step(1e-3) for _ in range(REPLAYS)]
        if all(torch.equal(a, b) for a, b in zip(replayed, weights())):
            raise RuntimeError(f"round {r + 1}: the replays left every weight as it was")
        still = weights()
        losses.append(step(0.0))
        if not all(torch.equal(a, b) for a, b in zip(still, weights())):
            raise RuntimeError(f"round {r + 1}: a replay at learning rate 0 moved weights (a stale learning rate)")
    if runner.mode != "cuda_graph" or runner.captures != rounds:
        raise RuntimeError(f"the steps ran {runner.mode!r} with {runner.captures} of {rounds} captures")
    runner.release()
    if not torch.stack(losses).isfinite().all():
        raise RuntimeError("a loss is not finite")
    torch.rand(1, device=device).item()  # the generator left usable after the captures


def preflight(device, graph=None) -> dict:
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="the device to try the captures on (default: cuda)")
    args = parser.parse_args(argv)
    sys.path[:0] = [str(HERE), str(HERE.parent / "src")]  # the sibling modules, and this checkout's tokenpace
    import torch

    torch.manual_seed(0)
    torch.backends.cudnn.benchmark = True  # as the suite trains
    print(json.dumps(preflight(torch.device(args.device))), flush=True)  # the last line of stdout is the result
    sys.stderr.flush()
    os._exit(0)  # no interpreter teardown: a process left in capture state must not hang on its way out


if __name__ == "__main__":
    main()
