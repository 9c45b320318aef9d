"""Peak memory of one forward or one training step, measured in a process of its own so that configurations do not
share an allocator: peak RSS above the process's baseline on the CPU, ``max_memory_allocated`` above the allocated
baseline on CUDA."""
from __future__ import annotations

import json
import resource
import subprocess
import sys

import torch
from torch import nn

from .errors import TokenpaceError

MIB = 2 ** 20


def current_rss() -> int:
    """Resident set size of this process now, in bytes (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def reset_peak_rss() -> None:
    """Start the peak resident set size over from the current one (Linux: ``5`` to /proc/self/clear_refs), so that
    what the process held before (a checkpoint read and freed) is not counted as the measured run's peak."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError as err:
        raise TokenpaceError(f"the CPU memory probe cannot reset this process's peak memory ({err}); it needs "
                             "Linux's /proc/self/clear_refs") from None


def peak_rss() -> int:
    """The largest resident set size of this process since the last :func:`reset_peak_rss`, in bytes (VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise TokenpaceError("this system's /proc/self/status has no VmHWM line: the CPU memory probe needs Linux")


def probe(model: nn.Module, request: dict, device: torch.device, amp: str = "none") -> dict:
    """Run one configuration once and report its peak memory above the baseline (model, inputs, nothing else).

    ``request``: {"method", "options", "batch_size", "mode": "inference" | "train", "grad_checkpointing"}."""
    from .bench import MethodSpec, autocast_for, configure, random_input, spec_config, train_objective

    spec = MethodSpec(request["method"], tuple((k, tuple(v) if isinstance(v, list) else v)
                                               for k, v in request["options"]))
    batch, train = request["batch_size"], request["mode"] == "train"
    model = model.to(device)
    x = random_input(model, batch, device)
    autocast = autocast_for(device, amp)
    if train:
        if request["grad_checkpointing"]:
            model.set_grad_checkpointing(True)
        y = torch.randint(0, max(model.num_classes, 1), (batch,), device=device)
        objective = train_objective(model, spec).to(device).train()
        params = [p for m in objective.trainable() for p in m.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-6)
        applied = objective.model

        def run():
            with autocast():
                loss = objective(x, y)[0]
            loss.backward()
            optimizer.step()
    else:
        applied = configure(model.eval(), spec_config(spec))

        def run():
            with torch.inference_mode(), autocast():
                applied(x)

    from .bench import applied_config

    config = applied_config(applied)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
        run()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - baseline
    else:
        baseline = current_rss()
        reset_peak_rss()
        run()
        peak = max(peak_rss() - baseline, 0)
    return {"method": spec.method, "config": spec.describe(config), "keep": None if config is None else config.keep,
            "batch_size": batch, "mode": request["mode"], "grad_checkpointing": bool(request["grad_checkpointing"]),
            "peak_mib": round(peak / MIB, 1), "baseline_mib": round(baseline / MIB, 1)}


def measure_in_child(argv: list[str], spec, batch_size: int, mode: str, grad_checkpointing: bool) -> dict:
    """:func:`probe` in a fresh ``tokenpace bench`` process built from the same command line ``argv``."""
    request = {"method": spec.method, "options": list(spec.options), "batch_size": batch_size, "mode": mode,
               "grad_checkpointing": grad_checkpointing}
    cmd = [sys.executable, "-m", "tokenpace.cli", *argv, "--memory-probe", json.dumps(request), "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise TokenpaceError(f"the memory probe of {spec.method} at batch size {batch_size} failed: {tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
