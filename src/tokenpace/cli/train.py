"""tokenpace train: a recipe on a model and data. With --resume the run's recorded settings are the defaults, and
an option that changes them is refused by the training loop, by name."""
from __future__ import annotations

import argparse
import dataclasses

from ..errors import TokenpaceError, user_input
from . import source
from .choices import DEFAULT_MODEL


def run(args: argparse.Namespace) -> int:
    from ..train import train

    train(config(args))
    return 0


def config(args: argparse.Namespace):
    """The TrainConfig the options ask for: on top of the recorded run with --resume, else of the recipe."""
    from ..data import DataSpec
    from ..train import TrainConfig
    from ..train.runfolder import config_from_run, read_description

    machine = dict(workers=args.workers, progress=not args.quiet, stop_after=args.stop_after,
                   cpu=args.device == "cpu")
    if args.device == "cuda":
        source.device("cuda")  # refuse at once where there is no GPU
    base = config_from_run(args.output, **machine) if args.resume and read_description(args.output) else None
    if base is None:
        missing = [flag for flag, value in (("--recipe", args.recipe), ("--data", args.data)) if value is None]
        if missing and args.resume:
            raise TokenpaceError(f"--resume: {args.output!r} holds no run to continue (no run.json); start it with "
                                 f"{' and '.join(missing)}")
        if missing:
            raise TokenpaceError(f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} required (unless "
                                 "--resume continues a run with a run.json)")
    recipe = _recipe(args, base.recipe if base is not None else None)
    model, model_args, init, pretrained = _model_source(args, base)
    data = base.data if base is not None else None
    if args.data is not None or args.canvas is not None or args.limit is not None or data is None:
        data = DataSpec(args.data if args.data is not None else data.path,
                        canvas=args.canvas if args.canvas is not None else (data.canvas if data else None),
                        limit=args.limit if args.limit is not None else (data.limit if data else None))
    explicit = {k: v for k, v in (("epochs", args.epochs), ("batch_size", args.batch_size), ("lr", args.lr),
                                  ("amp", args.amp), ("seed", args.seed)) if v is not None}
    if base is not None:
        return dataclasses.replace(base, recipe=recipe, model=model, model_args=model_args, init=init,
                                   pretrained=pretrained, data=data, overwrite=args.overwrite, **explicit)
    return TrainConfig(recipe=recipe, model=model, data=data, output=args.output, model_args=model_args, init=init,
                       pretrained=pretrained, resume=args.resume, overwrite=args.overwrite,
                       **{"batch_size": 128, "amp": "none", "seed": 0, **explicit}, **machine)


def _recipe(args: argparse.Namespace, recorded):
    """The recorded recipe (when --recipe restates it or is absent), else the named one; then the method and
    loss overrides. Every value is checked where it is built: the method config and the Recipe."""
    from ..methods import make_config
    from ..train import get_recipe

    recipe = recorded if recorded is not None and args.recipe in (None, recorded.name) else get_recipe(args.recipe)
    method = recipe.method
    with user_input():
        if args.method is not None:
            method = None if args.method == "dense" else make_config(args.method)
        overrides = {k: v for k, v in (("keep", args.keep), ("score", args.score)) if v is not None}
        if overrides:
            if method is None:
                raise TokenpaceError("--keep/--score need a method; the dense recipe has none")
            method = dataclasses.replace(method, **overrides)
    updates = {k: v for k, v in (("cut_mode", args.cut_mode), ("cut_weight", args.cut_weight),
                                 ("distill_weight", args.distill_weight), ("warmup_epochs", args.warmup_epochs))
               if v is not None}
    loss_options = [k for k in ("cut_mode", "cut_weight", "distill_weight") if k in updates]
    if loss_options and recipe.objective != "idle_distill":
        raise TokenpaceError(f"--{loss_options[0].replace('_', '-')} sets a loss of the idle-finetune recipe; recipe "
                             f"{recipe.name!r} has no such loss")
    return dataclasses.replace(recipe, method=method, **updates)


def _model_source(args: argparse.Namespace, base) -> tuple[str, dict, str | None, bool]:
    """(model name, create_model arguments, starting weights, pretrained) from the model-source options: a dense
    --run to fine-tune from, a name with --checkpoint or --pretrained, or, with --resume, what the run recorded."""
    from ..models import read_run

    given_args = source.model_args(args)
    if args.run is not None:
        record = read_run(args.run)
        return (source.recorded_model(record, args.model), {**record.model_args, **given_args},
                args.checkpoint or record.weights, False)
    if base is not None:
        return (args.model or base.model, {**base.model_args, **given_args}, args.checkpoint or base.init,
                args.pretrained or base.pretrained)
    beside = source.config_beside(args.checkpoint)
    record = source.config_record(beside) if beside is not None else None
    if record is not None and record.model:  # the weights were made for the model the file names
        model = source.recorded_model(record, args.model)
        source.note(f"building {model} as {beside} (beside the checkpoint) records it; the method trained is the "
                    "recipe's (--recipe/--method), not that file's")
        return model, {**record.model_args, **given_args}, args.checkpoint, args.pretrained
    return args.model or DEFAULT_MODEL, given_args, args.checkpoint, args.pretrained
