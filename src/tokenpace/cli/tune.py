"""tokenpace tune: the fastest configuration within an accuracy budget on this device and data (the search lives in
``tokenpace.tune``)."""
from __future__ import annotations

import argparse
import sys

from ..errors import TokenpaceError, memory_guard, user_input
from . import source


def run(args: argparse.Namespace) -> int:
    from ..config_io import model_record
    from ..data import DataSpec, build_dataset, check_classifier, check_labels, eval_transform
    from ..evaluate import parse_sweep
    from ..tune import TuneSettings, tune
    from ..tune.report import earlier_outputs, summary, write_outputs
    from ..tune.split import has_labels

    source.check_output_folder(args.output, "--output")
    done = earlier_outputs(args.output)
    if done and not args.overwrite:
        raise TokenpaceError(f"--output {args.output!r} already holds {', '.join(done)} from an earlier search; add "
                             "--overwrite to replace them (those this search does not write are removed), or choose "
                             "another folder")
    device = source.device(args.device)
    model, record = source.build(args)
    check_classifier(model, f"model {source.model_name(args, record)}")  # its scores compare class predictions
    specs = _methods(args, model, record)
    keeps = tuple(parse_sweep(args.keep_sweep)) if args.keep_sweep is not None else None
    with user_input():
        settings = TuneSettings(
            max_drop=args.max_drop, min_speedup=args.min_speedup,
            **({"keeps": keeps} if keeps else {}),
            **({"start_shifts": tuple(args.start_shifts)} if args.start_shifts else {}),
            batch_size=args.batch_size or (256 if device.type == "cuda" else 32), amp=args.amp,
            time_budget_s=args.time_budget, runs=args.runs, screen_runs=args.screen_runs,
            finalists=args.finalists, check_fraction=args.check_fraction, labels=args.labels, workers=args.workers)
    ds = build_dataset(DataSpec(args.data, limit=args.limit), "val", eval_transform(model))
    if args.labels == "auto" and has_labels(ds):
        check_labels(ds, model.num_classes, args.data)
    if args.malloc is None:  # the default, applied once the input is checked: keep where glibc allows it
        from ..runtime import keep_freed_memory_where_possible

        args.malloc = keep_freed_memory_where_possible()
    name = source.model_name(args, record)
    with memory_guard(f"tuning at --batch-size {settings.batch_size}"):
        result = tune(model, ds, device, settings, methods=specs, progress=not args.quiet)
    print(summary(result, args.run or name), flush=True)
    described = {**model_record(model, name), "model_args": source.built_model_args(args, record), "run": args.run,
                 "data": args.data, "limit": args.limit, "malloc": args.malloc}
    written, removed = write_outputs(result, args.output, described,
                                     f"{args.run or name}: {result.metric} vs speed-up ({result.device}, batch "
                                     f"{settings.batch_size})")
    for path in removed:
        print(f"removed {path} (from the earlier search; this one does not write it)", file=sys.stderr)
    for path in written:
        print(f"wrote {path}", file=sys.stderr)
    return 0 if result.chosen is not None else 1


def _methods(args: argparse.Namespace, model, record) -> list:
    """The method specs to search: --methods (dense refused: it is the reference), else the run's method, else the
    family's; --keep fixes the keep of every method that does not set its own."""
    from ..bench import MethodSpec, parse_methods

    recorded = source.recorded_method(record)
    if args.methods is not None:
        specs = parse_methods(args.methods)
        if any(s.method == "dense" for s in specs):
            raise TokenpaceError("--methods: dense is the reference every configuration is measured against; "
                                 "list methods only (e.g. evo,idle)")
    elif recorded is not None:
        source.note(f"searching {recorded.name}, the method {record.origin()} was trained for (--methods "
                    "searches others)")
        specs = [MethodSpec(recorded.name)]
    else:
        specs = [MethodSpec(name) for name in source.family_methods(model)]
    if args.keep is not None:
        specs = source.with_keep(specs, args.keep)
    return source.check_specs(specs, model, resolve=False)  # an option left out is searched, not defaulted
