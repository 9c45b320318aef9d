"""tokenpace eval: accuracy, agreement with dense, GMACs and throughput of dense and each method."""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from ..errors import TokenpaceError, memory_guard
from . import source


def run(args: argparse.Namespace) -> int:
    import torch

    from ..bench import device_name, stderr_progress, versions
    from ..data import DataSpec, build_dataset, check_classifier, check_labels, eval_transform, num_classes_of
    from ..evaluate import evaluate, format_rows, plot_format_problem, plot_sweep

    sweep = args.keep_sweep is not None
    if args.plot is not None and not sweep:
        raise TokenpaceError("--plot draws a keep sweep; add --keep-sweep START:STOP:STEP")
    source.check_output_file(args.json, "--json")
    plot = args.plot or ("eval_sweep.png" if sweep else None)
    source.check_output_file(plot, "--plot")
    problem = plot_format_problem(plot) if plot is not None else None
    if problem is not None:
        raise TokenpaceError(f"--plot {plot!r} {problem}")
    device = source.device(args.device)
    model, record = source.build(args)
    specs = source.specs(args, model, record)
    check_classifier(model, f"model {source.model_name(args, record)}")
    ds = build_dataset(DataSpec(args.data, canvas=args.canvas, limit=args.limit), "val", eval_transform(model))
    check_labels(ds, model.num_classes, f"{args.data}")
    source.note_random_weights(args)
    classes = num_classes_of(ds)
    if classes is not None and classes != model.num_classes:
        source.note(f"the model predicts {model.num_classes} classes and {args.data} has {classes}; top-1 compares "
                    "its predictions with these labels as they are")
    loader = torch.utils.data.DataLoader(ds, batch_size=args.batch_size, num_workers=args.workers,
                                         pin_memory=device.type == "cuda")
    with memory_guard(f"evaluation at --batch-size {args.batch_size}"):
        rows = evaluate(model, specs, loader, device, args.batch_size, speed_runs=args.speed_runs, amp=args.amp,
                        progress=None if args.quiet else stderr_progress)
    name = args.run or source.model_name(args, record)
    print(f"\n{name} on {args.data} ({len(ds)} images), throughput at batch {args.batch_size} on {device.type}, "
          f"amp={args.amp}  malloc={args.malloc}")
    print(format_rows(rows), flush=True)
    if args.json:
        document = {"model": source.model_name(args, record), "run": args.run,
                    **source.model_settings(args, model, record), "data": args.data,
                    "images": len(ds), "batch_size": args.batch_size, "device": device_name(device),
                    "amp": args.amp, "malloc": args.malloc, "speed_runs": args.speed_runs, "versions": versions(),
                    "rows": [dataclasses.asdict(r) for r in rows]}
        with open(args.json, "w") as f:
            json.dump(document, f, indent=2, allow_nan=False)
    if plot is not None and sweep:
        plot_sweep(rows, plot, f"{name}: top-1 vs throughput (batch {args.batch_size}, {device.type})")
        print(f"wrote {plot}", file=sys.stderr)
    return 0
