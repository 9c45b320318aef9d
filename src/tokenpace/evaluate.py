"""Accuracy of the dense model and every method on one validation pass (images decoded once, every
configuration run on each batch), plus GMACs and measured throughput; keep-ratio sweeps and their plot."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from .bench import (MethodSpec, autocast_for, benchmark, config_width, configure, restored, spec_config,
                    speedup_text)
from .errors import TokenpaceError


@dataclass
class EvalRow:
    method: str
    config: str
    keep: float | None
    top1: float
    top5: float
    agreement: float  # % of images where the prediction equals the dense model's
    gmacs: float
    img_per_s: float
    speedup: float | None


def topk_hits(logits: torch.Tensor, targets: torch.Tensor) -> tuple[int, int, torch.Tensor]:
    """(top-1 hits, top-5 hits, top-1 predictions) of one batch."""
    top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
    return (top[:, 0] == targets).sum().item(), (top == targets.unsqueeze(1)).any(1).sum().item(), top[:, 0]


def accuracy_table(model: nn.Module, specs: list[MethodSpec], loader, device: torch.device, amp: str = "none",
                   progress=None) -> list[tuple[float, float, float]]:
    """(top-1, top-5, agreement with dense) per spec, in percent, from one pass over ``loader``. One model (moved to
    ``device``) is re-configured for each spec on each batch, in eval mode; it is given back in the configuration
    and mode it came in."""
    configs = [spec_config(s) for s in specs]
    autocast = autocast_for(device, amp)
    model = model.to(device)
    dtype = next(model.parameters()).dtype
    counts = [[0, 0, 0] for _ in specs]
    total = 0
    with torch.inference_mode(), autocast(), restored(model):
        model.eval()
        for step, (images, targets) in enumerate(loader):
            images, targets = images.to(device, dtype), targets.to(device)
            reference = configure(model, None)(images).argmax(-1)
            for config, c in zip(configs, counts):
                hits1, hits5, predicted = topk_hits(configure(model, config)(images), targets)
                c[0] += hits1
                c[1] += hits5
                c[2] += (predicted == reference).sum().item()
            total += targets.numel()
            if progress is not None:
                progress(f"[eval] batch {step + 1}/{len(loader)}")
    if total == 0:
        raise ValueError("the loader gave no images: accuracy needs at least one labelled image")
    return [tuple(100.0 * v / total for v in c) for c in counts]


def evaluate(model: nn.Module, specs: list[MethodSpec], loader, device: torch.device, batch_size: int,
             speed_runs: int = 5, amp: str = "none", progress=None) -> list[EvalRow]:
    """One row per spec: accuracy on ``loader``; GMACs; img/s from an interleaved benchmark at ``batch_size``."""
    if specs[0].method != "dense":
        specs = [MethodSpec("dense"), *specs]
    acc = accuracy_table(model, specs, loader, device, amp, progress)
    speed = benchmark(model, specs, batch_size, device, amp=amp, runs=speed_runs, warmup=1, progress=progress)
    return [EvalRow(method=s.method, config=b.config, keep=b.keep,
                    top1=a[0], top5=a[1], agreement=a[2], gmacs=b.gmacs, img_per_s=b.img_per_s, speedup=b.speedup)
            for s, a, b in zip(specs, acc, speed)]


def parse_sweep(text: str) -> list[float]:
    """"0.3:1.0:0.1" -> [0.3, 0.4, ..., 1.0] (inclusive); every value must lie in (0, 1]."""
    parts = text.split(":")
    if len(parts) != 3:
        raise TokenpaceError(f"--keep-sweep {text!r} must be START:STOP:STEP, e.g. 0.3:1.0:0.1")
    try:
        start, stop, step = (float(p) for p in parts)
    except ValueError:
        raise TokenpaceError(f"--keep-sweep {text!r} must hold three numbers, e.g. 0.3:1.0:0.1") from None
    if step <= 0 or not 0 < start <= stop <= 1:
        raise TokenpaceError(f"--keep-sweep {text!r} needs 0 < START <= STOP <= 1 and STEP > 0")
    n = int(round((stop - start) / step))
    return [round(start + i * step, 6) for i in range(n + 1) if start + i * step <= stop + 1e-9]


def format_rows(rows: list[EvalRow]) -> str:
    w = config_width(r.config for r in rows)
    head = (f"{'method':<7} {'config':<{w}} {'top-1':>6} {'top-5':>6} {'agree':>6} {'GMACs':>6} {'img/s':>8} "
            f"{'speed-up':>8}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r.method:<7} {r.config:<{w}} {r.top1:>6.2f} {r.top5:>6.2f} {r.agreement:>6.2f} "
                     f"{r.gmacs:>6.3g} {r.img_per_s:>8.1f} {speedup_text(r.speedup):>8}")
    return "\n".join(lines)


def plot_sweep(rows: list[EvalRow], path: str, title: str) -> None:
    """Top-1 against measured throughput, one line per method (keep ratios annotated), dense as a star. ValueError
    for a path matplotlib would not write as named (see :func:`plot_format_problem`)."""
    problem = plot_format_problem(path)
    if problem is not None:
        raise ValueError(f"plot {path!r} {problem}")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for method in dict.fromkeys(r.method for r in rows if r.method != "dense"):
        pts = sorted((r for r in rows if r.method == method), key=lambda r: r.keep)
        ax.plot([r.img_per_s for r in pts], [r.top1 for r in pts], marker="o", label=method)
        for r in pts:
            ax.annotate(f"{r.keep:g}", (r.img_per_s, r.top1), textcoords="offset points", xytext=(3, 3), fontsize=7)
    for r in rows:
        if r.method == "dense":
            ax.scatter([r.img_per_s], [r.top1], marker="*", s=160, color="black", zorder=5, label="dense")
            break
    save_plot(fig, ax, path, title, "throughput (images/s, measured)", "top-1 (%)")


def plot_format_problem(path: str) -> str | None:
    """Why matplotlib cannot write a figure to ``path`` (no suffix, or one it has no writer for), or None. Checked
    before the work: matplotlib would otherwise fail after it, or add ``.png`` to a name without a suffix."""
    from matplotlib.figure import Figure

    suffix = os.path.splitext(path)[1].lower()
    supported = sorted(set(Figure().canvas.get_supported_filetypes()) - {"pgf"})  # pgf needs a LaTeX install
    if suffix[1:] in supported:
        return None
    what = "has no file type suffix" if not suffix else f"has a file type matplotlib cannot write ({suffix})"
    return f"{what}; accepted: {', '.join('.' + s for s in supported)}"


def save_plot(fig, ax, path: str, title: str, xlabel: str, ylabel: str) -> None:
    """Label, grid and legend the axes the way every tokenpace plot is, write the PNG and free the figure."""
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
