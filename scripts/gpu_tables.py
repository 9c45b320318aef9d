#!/usr/bin/env python3
"""Markdown for the README from one GPU suite folder (what `scripts/gpu_suite.py OUTDIR` wrote): the machine, the
targets (met or missed, with the number), the host probe (wall against kernel time per forward), throughput (dense
img/s and each method's speed-up; peak memory; timed calls that compiled or allocated), the CIFAR-10 results, and
whatever did not run.
Usage: python scripts/gpu_tables.py OUTDIR"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from gpu_suite_common import number_cell as _number  # torch-free, as this script

METHOD_ORDER = ("dense", "evo", "idle", "evit", "topk")


def _load(folder: Path, name: str) -> dict:
    path = folder / name
    return json.loads(path.read_text()) if path.is_file() else {}


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table; a "|" inside a cell (an error message, a step mode's reason) is escaped."""
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    return [line(header), "|" + "---|" * len(header)] + [line(r) for r in rows]


def machine(summary: dict) -> list[str]:
    gpu = summary.get("gpu") or {}
    where = f"{gpu['name']} ({gpu['memory_gib']} GiB)" if gpu else summary.get("device", "?")
    return [f"Machine: {where}; torch {summary.get('torch')}, CUDA {summary.get('cuda')}, timm {summary.get('timm')}, "
            f"Python {summary.get('python')}. Suite mode {summary.get('mode')}, started {summary.get('started')}, "
            f"{summary.get('elapsed_s')} s in all."]


def targets(summary: dict) -> list[str]:
    rows = []
    for name, t in summary.get("targets", {}).items():
        verdict = {True: "met", False: "**missed**", None: "not measured"}[t["met"]]
        unit = "" if t["unit"] in ("", "points") else t["unit"]
        rows.append([name, t["what"], _number(t["value"], 3 if unit == "x" else 2, unit),
                     f">= {t['threshold']:g}{unit}", verdict])
    return _table(["target", "what", "measured", "target", "verdict"], rows)


def _methods(groups: list[dict]) -> list[str]:
    present = {r["method"] for g in groups for r in g["rows"]}
    return [m for m in METHOD_ORDER if m in present] + sorted(present - set(METHOD_ORDER))


def _group_cells(g: dict) -> list[str]:
    return [f"`{g['timm_name']}` ({g['model']})", str(g["batch"]), g["precision"],
            _mode(g)]


def _mode(g: dict) -> str:
    """The group's run mode as the suite named it (files from before the modes hold compile alone); a CUDA-graph
    compile mode that ran graphs without their CUDA graphs says so."""
    mode = g.get("mode") or ("compiled" if g["compile"] else "eager")
    skipped = g.get("cudagraph_skips")
    return mode + (f", {skipped} graph(s) run without CUDA graphs" if skipped else "")


def _speed_cell(row: dict | None, dense: dict | None, config: str | None) -> str:
    """speed-up / MACs ratio, both over dense; the configuration too where the column's header cannot name it."""
    if row is None or row["speedup"] is None:
        return "-"
    macs = f" / {dense['gmacs'] / row['gmacs']:.2f}x" if dense and row["gmacs"] else ""
    return f"{row['speedup']:.2f}x{macs}" + ("" if config is not None else f" ({row['config']})")


def throughput(doc: dict) -> list[str]:
    groups = doc.get("groups", [])
    if not groups:
        return ["No throughput group ran."]
    methods = _methods(groups)
    configs = {m: {r["config"] for g in groups for r in g["rows"] if r["method"] == m} for m in methods}
    header = {m: next(iter(c)) if len(c) == 1 else None for m, c in configs.items()}  # None: said per cell
    speed, memory = [], []
    for g in groups:
        by_method = {r["method"]: r for r in g["rows"]}
        dense = by_method.get("dense")
        speed.append(_group_cells(g) + [_number(dense and dense["img_per_s"], 0)]
                     + [_speed_cell(by_method.get(m), dense, header[m]) for m in methods if m != "dense"])
        memory.append(_group_cells(g) + [_number(by_method[m]["peak_mib"], 0) if m in by_method else "-"
                                         for m in methods])
    reduced = [m + (f" {header[m]}" if header[m] else "") for m in methods if m != "dense"]
    out = ["Speed-up over dense (img/s ratio, median of the rounds, methods interleaved) / MACs ratio over dense:",
           ""]
    out += _table(["model", "batch", "precision", "mode", "dense img/s"] + reduced, speed)
    if any(r["peak_mib"] is not None for g in groups for r in g["rows"]):
        out += ["", "Peak memory (MiB, torch.cuda.max_memory_allocated during the method's timed calls):", ""]
        out += _table(["model", "batch", "precision", "mode"] + methods, memory)
    return out


CHURN_WORDS = {"dynamo_graphs": "compiled a graph", "device_allocs": "allocated device memory",
               "alloc_retries": "retried an allocation"}


def churn(doc: dict) -> list[str]:
    """Which timed calls compiled a graph or allocated device memory (recorded since the third run; empty before)."""
    rows = [(g, r) for g in doc.get("groups", []) for r in g["rows"] if r.get("churn") is not None]
    if not rows:
        return []
    busy = [(g, r) for g, r in rows if any(r["churn"].values())]
    if not busy:
        counted = [w for name, w in CHURN_WORDS.items() if any(r["churn"].get(name) is not None for _, r in rows)]
        return [f"No timed call {', '.join(counted[:-1]) + ' or ' if len(counted) > 1 else ''}{counted[-1]} "
                f"({len(rows)} method rows)."]
    names = sorted({name for _, r in busy for name in r["churn"]})
    return ["Timed calls that compiled a graph (dynamo) or allocated device memory (allocator), summed over the "
            "method's timed calls; every other row: none (- : not counted by that torch):", ""] + _table(
        ["model", "batch", "precision", "mode", "method", "timed calls", *names],
        [_group_cells(g) + [r["method"], str(r["timed_calls"]), *(_number(r["churn"].get(n), 0) for n in names)]
         for g, r in busy])


def host_probe(doc: dict) -> list[str]:
    """The warm-up and each method's forward: wall time beside its kernels' summed time (the gap is the host's)."""
    probe = doc.get("host_probe")
    if not probe:
        return []
    if "error" in probe:
        return [f"The host probe failed: {probe['error']}"]
    w = probe["warmup"]
    out = [f"One forward of `{probe['model']}` at batch {probe['batch']} {probe['precision']}, after a "
           f"{w['seconds']:g} s warm-up of {w['calls']} dense calls (first {w['first_ms']:.1f} ms, last ten "
           f"{w['last_median_ms']:.2f} ms): wall time (median, unprofiled) beside the kernels it ran (summed, "
           f"profiled) and the host's aten calls (nested ones included):", ""]
    out += _table(["method", "config", "wall ms", "kernel ms", "kernels", "aten calls"],
                  [[m["method"], m["config"], _number(m["wall_ms"]), _number(m["kernel_ms"]),
                    "-" if m["kernels"] is None else str(m["kernels"]), str(m["aten_calls"])]
                   for m in probe["methods"]])
    kinds = [m for m in probe["methods"] if m.get("kernel_ms_by_kind")]  # recorded since the second H200 run
    if not kinds:
        return out
    from gpu_kernel_kinds import TABLE_COLUMNS  # torch-free

    out += ["", "The same forwards' kernel ms by kind (names matched by `scripts/gpu_kernel_kinds.py`; conv is the "
            "patch embedding):", ""]
    return out + _table(["method", *TABLE_COLUMNS],
                        [[m["method"], *(_number(m["kernel_ms_by_kind"].get(c)) for c in TABLE_COLUMNS)]
                         for m in kinds])


def cifar(doc: dict) -> list[str]:
    trained = [name for name in ("dense", "evo", "idle", "clutter") if name in doc]
    if not trained:
        return ["No CIFAR-10 model was trained."]
    dense = doc.get("dense", {}).get("top1")
    rows = []
    for name in trained:
        r = doc[name]
        config = r.get("config")
        how = {"evo": ", from scratch", "idle": ", fine-tuned from dense",
               "clutter": ", from scratch on cluttered 64 px images (their own test set)"}[name] if config else ""
        what = "dense, from scratch" if config is None else f"{config['method']}({config['keep']}){how}"
        # the cluttered model is tested on other images than the dense one: no difference to show
        vs = "-" if dense is None or name in ("dense", "clutter") else f"{r['top1'] - dense:+.2f}"
        train = r["train"]
        rows.append([what, _number(r["top1"]), _number(r.get("random_top1")), vs, _number(r.get("dense_form_top1")),
                     f"{train['epochs']:.1f}", str(train["steps"]), f"{train['seconds']:.0f}", train["stopped_by"],
                     _step_mode(train.get("step_mode"))])
    out = _table(["model", "top-1 %", "random scores %", "vs dense", "its weights run dense %", "epochs", "steps",
                  "seconds", "stopped by", "steps run"], rows)
    pick = doc.get("batch_pick")
    if pick and pick["images_per_s"]:
        rates = ", ".join(f"{b}: {r:.0f}" for b, r in pick["images_per_s"].items())
        out += ["", f"Training batch {pick['batch_size']} (learning rate {pick['lr']:.2e}, Idle's "
                    f"{pick['idle_lr']:.2e}), picked by timing a few steps at each batch (images/s: {rates})."]
    preflight = doc.get("graph_preflight")  # runs from the third on
    if preflight:
        out += ["", "CUDA graph preflight: " + _preflight(preflight) + "."]
    sweeps = doc.get("dense", {}).get("sweeps", {})
    if sweeps:
        keeps = next(iter(sweeps.values()))["keeps"]
        out += ["", "The dense model with each method applied, no fine-tuning (top-1 %, class attention / random "
                    "scores):", ""]
        out += _table(["method"] + [f"keep {k:g}" for k in keeps],
                      [[m] + [f"{a:.2f} / {r:.2f}" for a, r in zip(s["attention"], s["random"])]
                       for m, s in sweeps.items()])
    return out


def _preflight(result: dict) -> str:
    """The CUDA graph preflight in words (gpu_suite_preflight.collect's result)."""
    if "error" in result:
        return result["error"]
    verdict = "every kind of step captured and trained" if result["ok"] else "failed, so the steps ran eagerly"
    variants = ", ".join(f"{k}: {v}" for k, v in result["variants"].items())
    return f"{verdict} in {result['seconds']:.1f} s ({variants})"


def _step_mode(mode: str | None) -> str:
    """How a section's training steps ran (gpu_suite_steps.TrainSteps.mode); files before run 3 do not say."""
    return "-" if not mode else "CUDA graph" if mode == "cuda_graph" else mode


def left_out(summary: dict, doc: dict) -> list[str]:
    lines = [f"- section {name}: {s['status']}" for name, s in summary.get("sections", {}).items()
             if s.get("status") != "ok"]
    lines += [f"- throughput group {g['key']}: dropped by the plan ({g['why']})" for g in doc.get("dropped", [])]
    lines += [f"- throughput group {g['key']}: not run ({g['why']})" for g in doc.get("not_run", [])]
    lines += [f"- throughput group {g['key']}: failed ({g['error']})" for g in doc.get("failed", [])]
    return lines


def render(folder: str | Path) -> str:
    folder = Path(folder)
    summary, doc, results = (_load(folder, n) for n in ("summary.json", "throughput.json", "cifar.json"))
    if not summary:
        raise SystemExit(f"{folder}: no summary.json; give the folder scripts/gpu_suite.py wrote")
    parts = [p for p in (machine(summary), targets(summary), host_probe(doc), throughput(doc), churn(doc),
                          cifar(results)) if p]
    missing = left_out(summary, doc)
    if missing:
        parts.append(["Not run or failed:", ""] + missing)
    return "\n\n".join("\n".join(p) for p in parts) + "\n"


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    print(render(sys.argv[1]), end="")
