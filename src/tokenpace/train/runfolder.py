"""The run folder: what a run records (run.json), when a folder may be written to, and what ``--resume`` must find
unchanged. Nothing here overwrites a run unless asked: ``resume`` continues it with its recorded settings,
``overwrite`` starts afresh."""
from __future__ import annotations

import dataclasses
import glob
import json
import os

from ..data import DataSpec
from ..errors import TokenpaceError
from ..models import EXPORT, RUN_CONFIG
from ..outputs import output_folder_problem, write_atomically
from .recipes import method_to_dict, recipe_from_dict, recipe_to_dict

CHECKPOINT = "last.pth"
METRICS = "metrics.jsonl"
EMA_EXPORT = "model_ema.safetensors"
RUN_FILES = (RUN_CONFIG, CHECKPOINT, METRICS, EXPORT, EMA_EXPORT)
RESULTS = (CHECKPOINT, EXPORT, EMA_EXPORT)  # what a run has produced (a folder without them holds no finished epoch)
MACHINE_SETTINGS = ("versions",)  # recorded for the reader; a resumed run may differ in them
# derived from the recipe (compared through it), and how it is derived may change between versions: the method
# evaluated and exported (a layer-mode Evo fine-tune was recorded as evaluated in stage mode before)
DERIVED_SETTINGS = ("method",)


class RunFolderError(TokenpaceError):
    """The output folder cannot be used as asked (an existing run, a resume that changes the run)."""


def existing_results(output: str) -> list[str]:
    return [name for name in RESULTS if os.path.exists(os.path.join(output, name))]


def check_output(output: str, resume: bool, overwrite: bool) -> None:
    """Refuse to start over an existing run unless ``overwrite``; ``resume`` needs the run's checkpoint."""
    if resume and overwrite:
        raise RunFolderError("--resume continues a run and --overwrite replaces it; choose one")
    if os.path.exists(output) and not os.path.isdir(output):
        raise RunFolderError(f"--output {output!r} is a file; accepted: a new or empty folder, or a run folder with "
                             "--resume / --overwrite")
    problem = output_folder_problem(output)
    if problem is not None:
        raise RunFolderError(f"--output {output!r} {problem}")
    if resume:
        if not os.path.isfile(os.path.join(output, CHECKPOINT)):
            raise RunFolderError(f"--resume: no checkpoint at {os.path.join(output, CHECKPOINT)}")
        return
    found = existing_results(output)
    if found and not overwrite:
        raise RunFolderError(f"--output {output!r} already holds a run ({', '.join(found)}); continue it with "
                             "--resume, replace it with --overwrite, or choose another folder")


def start(output: str, description: dict, fresh: bool) -> None:
    """Make the folder ready to write: remove what interrupted writes left behind and, for a fresh start, the files
    of a run being overwritten; record the run's settings."""
    os.makedirs(output, exist_ok=True)
    for name in RUN_FILES:
        for leftover in glob.glob(os.path.join(glob.escape(output), f"{name}.tmp*")):
            os.remove(leftover)
        if fresh and name != RUN_CONFIG and os.path.exists(os.path.join(output, name)):
            os.remove(os.path.join(output, name))
    if fresh or not os.path.isfile(os.path.join(output, RUN_CONFIG)):
        write_json_atomic(os.path.join(output, RUN_CONFIG), description)


def write_json_atomic(path: str, data) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2)

    write_atomically(path, write)


def describe(cfg, model_args: dict, processes: int, init_sha256: str | None) -> dict:
    """Everything that defines the run, as run.json records it (``model_args`` as the student is built)."""
    from ..bench import versions
    from .loop import inference_method

    data = dataclasses.asdict(cfg.data)
    data["path"] = _absolute(data["path"])
    return {"model": cfg.model, "model_args": model_args, "pretrained": cfg.pretrained, "init": _absolute(cfg.init),
            "init_sha256": init_sha256, "recipe": recipe_to_dict(cfg.recipe),
            "method": method_to_dict(inference_method(cfg.recipe)), "data": data,
            "epochs": cfg.epochs_total, "batch_size": cfg.batch_size, "processes": processes, "lr": cfg.lr,
            "seed": cfg.seed, "amp": cfg.amp, "crop_pct": cfg.crop_pct, "versions": versions()}


def _absolute(path: str | None) -> str | None:
    """A file or folder as an absolute path (run.json is read from other working folders on --resume); anything
    else (None, a data set name such as ``cifar10``) as it is."""
    return os.path.abspath(path) if path is not None and os.path.exists(path) else path


def read_description(output: str) -> dict | None:
    path = os.path.join(output, RUN_CONFIG)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            description = json.load(f)
    except ValueError as err:
        raise RunFolderError(f"{path} is not readable JSON ({err}); start afresh with --overwrite") from None
    if not isinstance(description, dict) or not description:
        raise RunFolderError(f"{path} is not a run description (a JSON object of the run's settings); start afresh "
                             "with --overwrite")
    return description


def check_resume(output: str, description: dict) -> None:
    """``--resume`` continues the recorded run: refuse, naming them, settings that differ from run.json."""
    recorded = read_description(output)
    if recorded is None:
        return  # a folder from before run.json existed: nothing to compare against
    recorded = _normalised(recorded)
    if recorded.get("init_sha256") and description.get("init_sha256") and \
            recorded["init_sha256"] != description["init_sha256"] and recorded.get("init") == description.get("init"):
        raise RunFolderError(f"--resume: {description['init']} changed since the run started (its sha256 differs); "
                             "the run's starting weights (and any teacher built from them) would differ")
    mine, theirs = _flat(description), _flat(recorded)
    skipped = MACHINE_SETTINGS + DERIVED_SETTINGS
    changed = [f"{key} {mine[key]!r} (recorded {theirs[key]!r})" for key in mine
               if key in theirs and key != "init_sha256" and key.split(".")[0] not in skipped
               and mine[key] != theirs[key]]
    if changed:
        raise RunFolderError(f"--resume continues the run recorded in {os.path.join(output, RUN_CONFIG)}, and these "
                             f"settings differ: {'; '.join(changed)}. Drop them to continue as recorded, or start "
                             "afresh with --overwrite")


def config_from_run(output: str, **machine):
    """The TrainConfig a run recorded (``--resume`` from the CLI), with machine settings (workers, progress, ...)
    from ``machine``."""
    from .loop import TrainConfig

    recorded = read_description(output)
    if recorded is None:
        raise RunFolderError(f"--resume: {output!r} has no {RUN_CONFIG}; restate --recipe, --data and the model")
    recorded = _normalised(recorded)
    try:
        model_args = dict(recorded["model_args"])
        recipe = recipe_from_dict(recorded["recipe"])
        return TrainConfig(recipe=recipe, model=recorded["model"], data=DataSpec(**recorded["data"]), output=output,
                           model_args=model_args, init=recorded.get("init"),
                           pretrained=bool(recorded.get("pretrained", False)),
                           epochs=recorded["epochs"], batch_size=recorded["batch_size"], lr=recorded.get("lr"),
                           amp=recorded.get("amp", "none"), seed=recorded.get("seed", 0),
                           crop_pct=recorded.get("crop_pct"), resume=True, **machine)
    except (KeyError, TypeError) as err:
        raise RunFolderError(f"{os.path.join(output, RUN_CONFIG)} lacks a setting ({err}); restate --recipe, --data "
                             "and the model, or start afresh with --overwrite") from None


def _normalised(recorded: dict) -> dict:
    """Records written by earlier versions: the recipe as a bare name (method separate), amp "no"."""
    recorded = dict(recorded)
    if isinstance(recorded.get("recipe"), str):
        recorded["recipe"] = {"name": recorded["recipe"], "method": recorded.get("method")}
    if recorded.get("amp") == "no":
        recorded["amp"] = "none"
    recorded["init"] = _absolute(recorded.get("init"))  # relative paths: to the working folder, as they were meant
    if isinstance(recorded.get("data"), dict):
        recorded["data"] = {**recorded["data"], "path": _absolute(recorded["data"].get("path"))}
    return recorded


def _flat(data: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in data.items():
        if isinstance(value, dict) and key != "method" and not prefix:
            out.update(_flat(value, f"{key}."))
        else:
            out[prefix + key] = json.loads(json.dumps(value))  # tuples and lists compare equal, as JSON has them
    return out
