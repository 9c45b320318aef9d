"""Markdown rows from `tokenpace bench --json` files: model, method, configuration, GMACs (and their ratio to dense),
ms per batch and the measured speed-up; for `bench --memory` files, the peak memory per configuration and its ratio
to dense. Usage: python scripts/bench_table.py FILE.json [FILE.json ...] (all of one kind)"""
import json
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


if __name__ == "__main__":
    memory = "measure" in json.load(open(sys.argv[1]))
    if memory:
        print("| model | batch | step | method | config | peak MiB | vs dense |")
        print("|---|---|---|---|---|---|---|")
    else:
        print("| model | batch | method | config | GMACs | MACs ratio | ms/batch | speed-up |")
        print("|---|---|---|---|---|---|---|---|")
    for path in sys.argv[1:]:
        print("\n".join(memory_rows(path) if memory else rows(path)))
