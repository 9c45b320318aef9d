"""Markdown rows from `tokenpace bench --json` files: model, method, configuration, GMACs (and their ratio to dense),
ms per batch and the measured speed-up; for `bench --memory` files, the peak memory per configuration and its ratio
to dense. Usage: python scripts/bench_table.py FILE.json [FILE.json ...] (all of one kind)
       python scripts/bench_table.py --compare DIR_A DIR_B   (the same models benched two ways, e.g. --malloc system
       and keep: the files of the same name side by side, each way's ms per batch and speed-up)"""
import json
import os
import sys


def rows(path: str) -> list[str]:
    doc = json.load(open(path))
    dense = {r["batch_size"]: r for r in doc["results"] if r["method"] == "dense"}
    out = []
    for r in doc["results"]:
        base = dense.get(r["batch_size"])
        macs_ratio = f"{base['gmacs'] / r['gmacs']:.2f}x" if base else "-"
        speedup = "-" if r["speedup"] is None else f"{r['speedup']:.2f}x"
        out.append(f"| `{doc['model']}` | {r['batch_size']} | {r['method']} | {r['config']} | {r['gmacs']:.3g} | "
                   f"{macs_ratio} | {r['ms_per_batch']:.1f} | {speedup} |")
    return out


def memory_rows(path: str) -> list[str]:
    doc = json.load(open(path))
    dense = {r["batch_size"]: r["peak_mib"] for r in doc["results"] if r["method"] == "dense"}
    out = []
    for r in doc["results"]:
        base = dense.get(r["batch_size"])
        ratio = f"{r['peak_mib'] / base:.2f}x" if base else "-"
        mode = r["mode"] + (", checkpointing" if r["grad_checkpointing"] else "")
        out.append(f"| `{doc['model']}` | {r['batch_size']} | {mode} | {r['method']} | {r['config']} | "
                   f"{r['peak_mib']:.0f} | {ratio} |")
    return out


def compare_rows(dir_a: str, dir_b: str) -> tuple[str, list[str]]:
    """The header naming both runs by their --malloc setting, and one row per model, method and configuration found
    in both folders."""
    names = sorted(n for n in os.listdir(dir_a) if n.endswith(".json") and os.path.exists(os.path.join(dir_b, n)))
    docs = [(json.load(open(os.path.join(dir_a, n))), json.load(open(os.path.join(dir_b, n)))) for n in names]
    labels = [f"malloc {doc.get('malloc', '?')}" for doc in docs[0]] if docs else ["A", "B"]
    header = ("| model | method | config | MACs ratio | " + " | ".join(f"ms/batch, {lab} | speed-up, {lab}"
                                                                   for lab in labels) + " |")
    out = []
    for a, b in docs:
        dense = next(r for r in a["results"] if r["method"] == "dense")
        other = {(r["method"], r["config"], r["batch_size"]): r for r in b["results"]}
        for r in a["results"]:
            s = other.get((r["method"], r["config"], r["batch_size"]))
            if s is None:
                continue
            cells = [f"{t['ms_per_batch']:.1f} | " + ("-" if t["speedup"] is None else f"{t['speedup']:.2f}x")
                     for t in (r, s)]
            out.append(f"| `{a['model']}` | {r['method']} | {r['config']} | {dense['gmacs'] / r['gmacs']:.2f}x | "
                       + " | ".join(cells) + " |")
    return header, out


if __name__ == "__main__":
    if sys.argv[1] == "--compare":
        header, lines = compare_rows(sys.argv[2], sys.argv[3])
        print(header)
        print("|" + "---|" * (header.count("|") - 1))
        print("\n".join(lines))
        sys.exit(0)
    memory = "measure" in json.load(open(sys.argv[1]))
    if memory:
        print("| model | batch | step | method | config | peak MiB | vs dense |")
        print("|---|---|---|---|---|---|---|")
    else:
        print("| model | batch | method | config | GMACs | MACs ratio | ms/batch | speed-up |")
        print("|---|---|---|---|---|---|---|---|")
    for path in sys.argv[1:]:
        print("\n".join(memory_rows(path) if memory else rows(path)))
