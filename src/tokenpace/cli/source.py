"""What every command shares: the model from the model-source options, the configurations to run (a run's recorded
method re-applied unless a flag overrides it, which is said), the device, and outputs checked before any work."""
from __future__ import annotations

import argparse
import os

from ..errors import TokenpaceError, note, user_input
from .choices import DEFAULT_MODEL


def device(name: str):
    import torch

    if name == "cuda" and not torch.cuda.is_available():
        raise TokenpaceError("--device cuda was asked for but CUDA is not available here; accepted: cpu")
    return torch.device(name)


def model_args(args: argparse.Namespace) -> dict:
    """--model-args with --img-size folded in."""
    out = parse_model_args(args.model_args)
    if args.img_size is not None:
        if out.get("img_size", args.img_size) != args.img_size:
            raise TokenpaceError(f"--img-size {args.img_size} and --model-args img_size={out['img_size']} differ; "
                                 "give one")
        out["img_size"] = args.img_size
    return out


def parse_model_args(given: str | list[str] | None) -> dict:
    """--model-args "img_size=32,patch_size=4,depths=2/2/6/2" (ints, floats, true/false, '/'-separated int tuples,
    else strings; a list when the option was repeated) -> timm.create_model keyword arguments."""
    from ..bench import _literal

    out: dict = {}
    for pair in filter(None, (",".join(given) if isinstance(given, list) else given or "").split(",")):
        key, eq, value = pair.partition("=")
        if not eq or not key.strip():
            raise TokenpaceError(f"--model-args entry {pair!r} must be key=value (e.g. img_size=32,depth=6)")
        key, value = key.strip(), _literal(value)
        if key in out and out[key] != value:
            raise TokenpaceError(f"--model-args gives {key} twice ({out[key]!r} and {value!r}); give one")
        out[key] = value
    return out


def build(args: argparse.Namespace):
    """(model, the run's or the configuration's record, or None) from --model --pretrained --checkpoint --run
    --config --model-args --img-size."""
    from ..models import build_model, read_run

    config = configuration(args)
    record = read_run(args.run) if args.run is not None else config
    if args.run is not None and config is not None:
        recorded = recorded_method(record)
        if recorded is not None:
            note(f"--config {args.config} replaces the method {record.origin()} was trained for ({recorded.name})")
    given = model_args(args)
    if config is not None and config.model and args.run is None:
        recorded_model(config, args.model)
        given = {**config.model_args, **given}
    name = args.model if args.run is not None else model_name(args, config)  # a run's own model is read with it
    model = build_model(name, checkpoint=args.checkpoint, run=args.run, pretrained=args.pretrained,
                        model_args=given)
    family_methods(model)  # a model no family supports is refused here, naming the supported ones
    return model, record


def note_random_weights(args: argparse.Namespace) -> None:
    """Says so where no weights were asked for (eval and show judge a model by them); with --config, names the run
    the configuration was tuned on."""
    if args.run is not None or args.checkpoint is not None or args.pretrained:
        return
    tuned_on = None
    if getattr(args, "config", None) is not None:
        from ..config_io import read_document

        tuned_on = read_document(args.config).get("run")
    note("no --run, --checkpoint or --pretrained: the model has random weights (timm's initialisation)"
         + (f"; {args.config} was tuned on the run {tuned_on!r}: add --run {tuned_on}" if tuned_on else ""))


def model_settings(args: argparse.Namespace, model, record) -> dict:
    """What a JSON result needs to be repeated: the input the model takes, the model arguments it was built with
    (a run's or a configuration file's, then the command's), and the weights and configuration files given."""
    from ..families import adapter_for

    applied = record.folder if record is not None and record.kind == "configuration" else None
    return {"input_size": list(adapter_for(model).input_size()), "model_args": built_model_args(args, record),
            "checkpoint": args.checkpoint, "config": getattr(args, "config", None) or applied}


def built_model_args(args: argparse.Namespace, record) -> dict:
    """The timm.create_model arguments the model was built with: a run's, or a configuration's where it names the
    model (as :func:`build` reads them), then the command's."""
    built_from = record is not None and (record.kind == "run" or record.model)
    return {**(record.model_args if built_from else {}), **model_args(args)}


def configuration(args: argparse.Namespace):
    """The method configuration --config names, else the one beside --checkpoint (W.safetensors -> W.json, as
    `tokenpace convert` writes it), as a record like a run's; None when there is neither. Beside --run, --config
    gives the method and the run the model and weights."""
    path = getattr(args, "config", None)
    if path is None and args.run is None:
        path = config_beside(args.checkpoint)
        if path is not None:
            note(f"applying the method configuration beside the checkpoint, {path} ({method_flag(args)} "
                 "overrides it)")
    return None if path is None else config_record(path)


def config_beside(checkpoint: str | None) -> str | None:
    """The configuration file beside a weights file (W.json for W.safetensors, as `tokenpace convert` writes it),
    or None where there is none."""
    from ..config_io import config_path_for

    path = None if checkpoint is None else config_path_for(checkpoint)
    return path if path is not None and os.path.isfile(path) else None


def config_record(path: str):
    """A configuration file (its method checked) as a record like a run's: model, model arguments, method."""
    from ..config_io import config_of, read_document
    from ..models import RunRecord
    from ..train.recipes import method_to_dict

    document = read_document(path)
    config = config_of(document, path)
    return RunRecord(folder=path, model=document.get("model"), model_args=dict(document.get("model_args") or {}),
                     method=method_to_dict(config), kind="configuration")


def recorded_model(record, given: str | None) -> str:
    """The model a run or configuration ``record`` names; a different --model ``given`` is refused."""
    if given is not None and given != record.model:
        raise TokenpaceError(f"--model {given} differs from the model of {record.origin()} ({record.model}); drop "
                             f"--model (the {record.kind}'s model is used)")
    return record.model


def family_methods(model) -> list[str]:
    """Every method the model's family runs (TokenpaceError naming the supported families when none)."""
    from ..patch import supported_methods

    with user_input():
        return supported_methods(model)


def recorded_method(record):
    """The run's recorded method config, or None (dense, or no run)."""
    if record is None or not record.method:
        return None
    from ..train.recipes import method_from_dict

    with user_input(f"{record.origin()} records a method this version cannot rebuild: "):
        return method_from_dict(record.method)


def specs(args: argparse.Namespace, model, record, train: bool = False) -> list:
    """The configurations bench and eval run: --config (dense and the file's configuration), else --methods
    (default: the run's method, else the family's), each method's keep from --keep or --keep-sweep, and a recorded
    method's settings as the defaults of that method. Each is checked against the model."""
    from ..bench import MethodSpec

    config = file_config(args, model, record, (method_flag(args), "--keep", "--keep-sweep"))
    if config is not None:
        return [MethodSpec("dense"), MethodSpec.from_config(config)]
    return check_specs(_chosen_specs(args, model, record, train), model, train)


def check_specs(chosen: list, model, train: bool = False, resolve: bool = True) -> list:
    """TokenpaceError for a spec the model's family refuses (method, score, layers): now, not after other work.
    ``train``: the specs are training steps (bench --train), whose configs differ (Evo trains in layer mode).
    ``resolve``: specs that run the same configuration once defaults are filled in are duplicates (bench, eval);
    False where an option left out means something else (tune searches it: idle and idle@0.7 differ)."""
    from ..bench import spec_config, train_config
    from ..families import adapter_for
    from ..methods import make_policy

    family = adapter_for(model)
    seen = []
    for spec in chosen:
        config = (train_config if train else spec_config)(spec)
        if config is not None:
            with user_input():
                policy = make_policy(config, family)
            if resolve:
                config = policy.config  # defaults filled in: evo and evo@0.5 run the same
        # one configuration however it was spelled (option order, @KEEP, --keep, a run's options, defaults); a
        # training step's recipe options (idle's distill_weight, ...) make another
        key = (spec.method, config, sorted(spec.recipe_options().items()))
        if key in seen:
            what = spec.method if spec.method == "dense" else f"{spec.method} {spec.describe(config)}"
            raise TokenpaceError(f"the configurations list {what} more than once (each runs once)")
        seen.append(key)
    return chosen


def model_name(args: argparse.Namespace, record) -> str:
    """The timm name of the model the options build: --model, else the run's or configuration's, else the default."""
    return args.model or (record.model if record is not None else None) or DEFAULT_MODEL


def file_config(args: argparse.Namespace, model, record, replaced_flags: tuple[str, ...]):
    """The configuration of --config (checked against the model), or None without --config. The flags that also
    choose the configuration are refused beside it; a run's recorded method is replaced, which is said."""
    if getattr(args, "config", None) is None:
        return None
    given = [flag for flag in replaced_flags if getattr(args, flag.lstrip("-").replace("-", "_"), None) is not None]
    if given:
        raise TokenpaceError(f"--config and {given[0]} both choose the configuration; give one")
    from ..config_io import load_config_for

    return load_config_for(args.config, model, model_name(args, record))


def _chosen_specs(args: argparse.Namespace, model, record, train: bool) -> list:
    from ..bench import MethodSpec, parse_methods
    from ..evaluate import parse_sweep

    recorded = recorded_method(record)
    if args.methods is not None:
        chosen = parse_methods(args.methods, train=train)
    elif recorded is not None:
        chosen = [MethodSpec("dense"), MethodSpec(recorded.name)]
    else:
        chosen = parse_methods(",".join(["dense"] + family_methods(model)), train=train)
    if args.keep_sweep is not None:
        if all(s.method == "dense" for s in chosen):
            raise TokenpaceError(f"--keep-sweep {args.keep_sweep} applies to no method: only dense runs; name a "
                                 f"method with {method_flag(args)}")
        own = [s.method for s in chosen if "keep" in dict(s.options)]
        if own:
            raise TokenpaceError(f"--keep-sweep sets the keep of every method, and {own[0]} in --methods sets its "
                                 "own; give one")
        chosen = [s for s in chosen if s.method == "dense"][:1] + [
            MethodSpec(s.method, (("keep", k),) + s.options) for s in chosen if s.method != "dense"
            for k in parse_sweep(args.keep_sweep)]
    elif args.keep is not None:
        chosen = with_keep(chosen, args.keep, method_flag(args))
    if recorded is None:
        return chosen
    if recorded.name not in {s.method for s in chosen}:
        note(f"{method_flag(args)} replaces the method {record.origin()} was trained for ({recorded.name} "
             f"{MethodSpec.from_config(recorded).describe()})")
        return chosen
    base = dict(MethodSpec.from_config(recorded).options)
    out = []
    for s in chosen:
        if s.method != recorded.name:
            out.append(s)
            continue
        given = dict(s.options)
        replaced = {k: v for k, v in given.items() if k in base and base[k] != v}
        if replaced:
            note(f"{record.origin()} was trained with {recorded.name} "
                 + " ".join(f"{k}={base[k]}" for k in replaced) + "; the command line gives "
                 + " ".join(f"{k}={v}" for k, v in replaced.items()))
        out.append(MethodSpec(s.method, tuple({**base, **given}.items())))
    return out


def method_flag(args: argparse.Namespace) -> str:
    """The option that names the methods on this command: --method (show, export) or --methods."""
    return "--method" if hasattr(args, "method") else "--methods"


def with_keep(specs: list, keep: float, flag: str = "--methods") -> list:
    """--keep X: the keep of every method in ``specs`` that does not set its own (dense has none); refused where
    every method sets its own, since --keep would then change nothing."""
    from ..bench import MethodSpec

    own = [s.method for s in specs if "keep" in dict(s.options)]
    if len(own) == sum(s.method != "dense" for s in specs):  # no method left for --keep (none at all, or all set)
        if not own:
            raise TokenpaceError(f"--keep {keep} applies to no method: only dense runs; name a method with {flag}")
        raise TokenpaceError(f"--keep {keep} applies to no method: {', '.join(own)} in {flag} "
                             f"set{'s' if len(own) == 1 else ''} {'its' if len(own) == 1 else 'their'} own keep; "
                             "give one")
    return [s if s.method == "dense" or "keep" in dict(s.options) else
            MethodSpec(s.method, (("keep", keep),) + s.options) for s in specs]


def show_method(args: argparse.Namespace, model, record) -> tuple[str, dict]:
    """(method, options) for show: --config, else --method, else the run's, else the family's first; the run's
    settings are the defaults of its own method; --keep and --mode adjust."""
    from ..bench import MethodSpec

    config = file_config(args, model, record, ("--method", "--keep", "--mode"))
    if config is not None:
        return config.name, dict(MethodSpec.from_config(config).options)
    recorded = recorded_method(record)
    method = args.method or (recorded.name if recorded is not None else family_methods(model)[0])
    options: dict = {}
    if recorded is not None:
        if method == recorded.name:
            options = dict(MethodSpec.from_config(recorded).options)
        else:
            note(f"--method {method} replaces the method {record.origin()} was trained for ({recorded.name})")
    if args.keep is not None:
        if "keep" in options and options["keep"] != args.keep:
            note(f"{record.origin()} was trained with keep={options['keep']}; --keep gives {args.keep}")
        options["keep"] = args.keep
    if args.mode is not None:
        if method != "evo":
            raise TokenpaceError("--mode applies to --method evo only")
        options["mode"] = args.mode
    return method, options


def check_output_file(path: str | None, flag: str) -> None:
    """An output file must be writable before the work that produces it starts."""
    from ..outputs import output_file_problem

    problem = None if path is None else output_file_problem(path)
    if problem is not None:
        raise TokenpaceError(f"{flag} {path!r} {problem}")


def check_output_folder(path: str, flag: str) -> None:
    """An output folder must be creatable (or exist) and writable before the work that fills it starts."""
    from ..outputs import output_folder_problem

    problem = output_folder_problem(path)
    if problem is not None:
        raise TokenpaceError(f"{flag} {path!r} {problem}")
