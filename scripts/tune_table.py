"""Print the README's Tuning table (markdown) from the search.json files that scripts/tune_results.sh writes: per
search the chosen configuration (or the closest miss), its speed-up, its top-1 on the tuning and check splits
against dense, the search time, and the methods' defaults measured in the same search for comparison.

Usage: python scripts/tune_table.py RUNS_DIR
"""
import glob
import json
import os
import sys


def fmt(value, spec=".2f", suffix=""):
    return "-" if value is None else f"{value:{spec}}{suffix}"


def split(measured, key):
    part = measured.get(key) or {}
    return f"{fmt(part.get('value'))} ({fmt(part.get('dense'))})" if part else "-"


def main(runs: str) -> None:
    print("| model | budget | configuration | speed-up | top-1 tuning split (dense) | top-1 check split (dense) | "
          "search |")
    print("|---|---|---|---|---|---|---|")
    for path in sorted(glob.glob(os.path.join(runs, "tune_*", "search.json"))):
        with open(path) as f:
            doc = json.load(f)
        budget = doc["settings"]
        budget = f"--max-drop {budget['max_drop']:g}" if budget["max_drop"] is not None else \
            f"--min-speedup {budget['min_speedup']:g}"
        model = os.path.basename(doc.get("run") or doc.get("model") or "?")
        answer = doc["chosen"] or doc["closest"]
        picked = next((c for c in doc["candidates"] if c["chosen"] or c["closest"]), None)
        label = "none measured" if picked is None else (
            f"**{picked['method']} {picked['config']}**" if doc["chosen"] else
            f"no configuration meets it; closest: {picked['method']} {picked['config']}")
        search = f"{doc['search_s'] / 60:.1f} min" + (" (time budget)" if doc["stopped"] else "")
        print(f"| {model} | {budget} | {label} | {fmt(answer and answer['speedup'], '.2f', 'x')} | "
              f"{split(answer or {}, 'tuning_split')} | {split(answer or {}, 'check_split')} | {search} |")
        for c in doc["candidates"]:
            if c["default"] and not (c["chosen"] or c["closest"]):
                speed = c["final_speedup"] if c["final_speedup"] is not None else c["quick_speedup"]
                value = c["top1"] if doc["labelled"] else c["agreement"]
                print(f"| | | default: {c['method']} {c['config']} | {fmt(speed, '.2f', 'x')} | "
                      f"{fmt(value)} ({fmt(doc['dense_tune'])}) | - | |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/cifar10")
