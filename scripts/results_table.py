"""Print the README's CIFAR-10 table (markdown) from the eval JSON files that scripts/cifar10_results.sh writes.

Usage: python scripts/results_table.py RUNS_DIR
"""
import json
import os
import sys

ROWS = [  # (file, method, score, label)
    ("eval_dense.json", "dense", None, "dense (trained from scratch)"),
    ("eval_evo.json", "evo", "cls", "Evo(0.5) trained from scratch"),
    ("eval_evo.json", "evo", "random", "  control: same model, random scores"),
    ("eval_idle_cut.json", "idle", "cls", "Idle(0.7) fine-tuned from dense, cut loss"),
    ("eval_idle_cut.json", "idle", "random", "  control: same model, random scores"),
    ("eval_idle_nocut.json", "idle", "cls", "Idle(0.7) fine-tuned from dense, no cut loss"),
    ("eval_idle_noteacher.json", "idle", "cls", "Idle(0.7) fine-tuned, cut loss, no teacher"),
    ("eval_idle_ce.json", "idle", "cls", "Idle(0.7) fine-tuned, cross-entropy only"),
    ("eval_evit.json", "evit", "cls", "EViT(0.7) fine-tuned from dense"),
    ("eval_evit.json", "evit", "random", "  control: same model, random scores"),
    ("eval_dense.json", "evo", "cls", "Evo(0.5) on the dense model, no fine-tuning"),
    ("eval_dense.json", "evo", "random", "  control: random scores"),
    ("eval_dense.json", "idle", "cls", "Idle(0.7) on the dense model, no fine-tuning"),
    ("eval_dense.json", "idle", "random", "  control: random scores"),
    ("eval_dense.json", "evit", "cls", "EViT(0.7) on the dense model, no fine-tuning"),
    ("eval_dense.json", "evit", "random", "  control: random scores"),
    ("eval_dense.json", "topk", "cls", "TopK(0.5) on the dense model, no fine-tuning"),
    ("eval_dense.json", "topk", "random", "  control: random scores"),
    ("eval_clutter.json", "dense", None, "cluttered 64 px: dense (trained from scratch)"),
    ("eval_clutter.json", "evo", "cls", "  Evo(0.5), no fine-tuning"),
    ("eval_clutter.json", "evo", "random", "  control: random scores"),
    ("eval_clutter.json", "idle", "cls", "  Idle(0.7), no fine-tuning"),
    ("eval_clutter.json", "idle", "random", "  control: random scores"),
    ("eval_clutter.json", "evit", "cls", "  EViT(0.7), no fine-tuning"),
    ("eval_clutter.json", "evit", "random", "  control: random scores"),
    ("eval_clutter.json", "topk", "cls", "  TopK(0.5), no fine-tuning"),
    ("eval_clutter.json", "topk", "random", "  control: random scores"),
]


def main(runs: str) -> None:
    print("| model | top-1 | same weights run dense: top-1 | agreement with it | GMACs | img/s | speed-up |")
    print("|---|---|---|---|---|---|---|")
    for name, method, score, label in ROWS:
        path = os.path.join(runs, name)
        if not os.path.isfile(path):
            continue
        rows = json.load(open(path))["rows"]
        dense = next(r for r in rows if r["method"] == "dense")
        for r in rows:
            random = "score=random" in r["config"]
            if r["method"] == method and (score is None or random == (score == "random")):
                print(f"| {label} | {r['top1']:.2f} | {dense['top1']:.2f} | {r['agreement']:.2f} | "
                      f"{r['gmacs']:.4f} | {r['img_per_s']:.0f} | {r['speedup']:.2f}x |")
                break


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/cifar10")
