"""The command line as a whole: one model-source convention, help on every option, lazy imports, old spellings,
tokenpace's own errors as one line and everything else with its traceback."""
import os
import subprocess
import sys

import pytest

from tokenpace.cli import main, make_parser
from tokenpace.cli.choices import AMP, COMPILE_MODES, CUT_MODES, METHOD_NAMES, OFFICIAL_ARCHS, RECIPE_NAMES
from tokenpace.errors import TokenpaceError

SOURCE_FLAGS = ("--model", "--pretrained", "--checkpoint", "--run", "--model-args", "--img-size", "--device", "--amp")


def _subparsers():
    parser = make_parser()
    action = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return action.choices


def test_every_command_has_the_model_source_flags_and_help_on_every_option():
    commands = _subparsers()
    assert set(commands) == {"bench", "train", "eval", "show", "models", "convert", "export", "tune"}
    for name in ("models", "convert"):  # a listing and a file conversion: no model source, but help on every option
        for action in commands[name]._actions:
            assert action.help, (name, action.option_strings or action.dest)
    for name, sub in commands.items():
        if name in ("models", "convert"):
            continue
        flags = {s for a in sub._actions for s in a.option_strings}
        assert set(SOURCE_FLAGS) <= flags, (name, set(SOURCE_FLAGS) - flags)
        assert "--keep" in flags, name
        for action in sub._actions:
            assert action.help, (name, action.option_strings or action.dest)
    for name in ("bench", "eval", "show", "export"):  # the commands that run a model read a method configuration
        assert "--config" in {s for a in commands[name]._actions for s in a.option_strings}, name
    assert {"--keep-sweep"} <= {s for a in commands["eval"]._actions for s in a.option_strings}
    assert {"--keep-sweep"} <= {s for a in commands["bench"]._actions for s in a.option_strings}
    assert {"--max-drop", "--min-speedup", "--time-budget", "--keep-sweep", "--output"} <= {
        s for a in commands["tune"]._actions for s in a.option_strings}


def test_cli_names_match_the_registries():
    from tokenpace import METHODS
    from tokenpace.bench import AMP_DTYPES
    from tokenpace.losses import CUT_MODES as LOSS_MODES
    from tokenpace.official import OFFICIAL_ARCHS as ARCHS
    from tokenpace.runners import COMPILE_MODES as RUN_COMPILE_MODES
    from tokenpace.train import RECIPES

    assert set(METHOD_NAMES) == set(METHODS) and tuple(RECIPES) == RECIPE_NAMES
    assert set(OFFICIAL_ARCHS) == set(ARCHS)
    assert CUT_MODES == LOSS_MODES and AMP == tuple(AMP_DTYPES) and COMPILE_MODES == RUN_COMPILE_MODES


def test_help_and_argument_errors_import_neither_torch_nor_timm():
    code = ("import sys\nfrom tokenpace.cli import main\n"
            "for argv in (['--help'], ['bench', '--help'], ['train', '--help'], ['eval', '--help'], ['show', '--help'],"
            " ['convert', '--help'], ['export', '--help'], ['convert', 'a', 'b', '--arch', 'x'],"
            " ['tune', '--help'], ['tune', '--data', 'x', '--output', 'y', '--time-budget', '0'],"
            " ['bench', '--runs', '0'], ['train', '--output', 'x', '--epochs', '0']):\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
            "print('torch' in sys.modules, 'timm' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "False False"


def test_import_tokenpace_is_lazy_but_the_api_and_models_are_there():
    code = ("import sys, tokenpace\nlazy = 'torch' not in sys.modules\n"
            "import timm\nassert tokenpace.apply is tokenpace.patch.apply\n"
            "print(lazy, timm.is_model('evo_levit_cifar'), tokenpace.families.adapter_for.__name__)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["True", "True", "adapter_for"]


def test_internal_bugs_keep_their_traceback(monkeypatch):
    """Only tokenpace's own input errors become one line; a ValueError from a bug propagates."""
    import tokenpace.bench

    def broken(*args, **kwargs):
        raise ValueError("an internal bug")

    monkeypatch.setattr(tokenpace.bench, "benchmark", broken)
    with pytest.raises(ValueError, match="an internal bug"):
        main(["bench", "--model", "vit_tiny_patch16_224", "--img-size", "32", "--methods", "dense", "--batch-size",
              "1", "--runs", "1", "--quiet"])


def test_input_errors_are_tokenpace_errors_and_still_value_errors():
    from tokenpace.bench import parse_methods

    with pytest.raises(TokenpaceError) as info:
        parse_methods("evo@2")
    assert isinstance(info.value, ValueError) and "Evo keep must be a number in (0, 1]" in str(info.value)


def test_a_worker_wrapped_error_keeps_only_its_message():
    wrapped = ("Caught TokenpaceError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
               "  File \"x.py\", line 1, in f\ntokenpace.errors.TokenpaceError: data.npz (train): image 3 cannot be "
               "decoded (broken data stream)\n")
    assert str(TokenpaceError(wrapped)) == "data.npz (train): image 3 cannot be decoded (broken data stream)"


@pytest.mark.parametrize("argv,old,new", [
    (["train", "--output", "{tmp}/a", "--recipe", "finetune", "--data", "/no/such.npz", "--init", "w.pth"], "--init",
     "--checkpoint"),
    (["train", "--output", "{tmp}/a", "--recipe", "dense", "--data", "/no/such.npz", "--amp", "no"], "--amp no",
     "--amp none"),
    (["eval", "--data", "/no/such.npz", "--keep", "0.5:1:0.5"], "--keep 0.5:1:0.5 (a sweep)", "--keep-sweep"),
])
def test_old_spellings_still_work_with_a_deprecation_message(argv, old, new, tmp_path, capsys):
    assert main([a.replace("{tmp}", str(tmp_path)) for a in argv]) == 2  # the run then fails on the missing data
    err = capsys.readouterr().err
    assert f"warning: {old} is deprecated" in err and f"use {new}" in err
    assert "data path '/no/such.npz' does not exist" in err


def test_console_script_help_is_fast():
    """`tokenpace --help` imports neither torch nor timm (it took about 10 s before)."""
    env = dict(os.environ)
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "tokenpace.cli", "--help"], capture_output=True,
                          text=True, env=env)
    assert proc.returncode == 0 and "bench" in proc.stdout
    imported = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if "|" in line}
    assert "torch" not in imported and "timm" not in imported


def test_version(capsys):
    import tokenpace

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"tokenpace {tokenpace.__version__}"


def test_messages_name_the_commands_own_method_option(tmp_path, capsys):
    import tokenpace

    config = str(tmp_path / "c.json")
    tokenpace.save_config(tokenpace.Idle(keep=0.5), config)
    common = ["--model", "vit_tiny_patch16_224", "--img-size", "32"]
    assert main(["export", *common, "--config", config, "--method", "idle", "--onnx", str(tmp_path / "m.onnx")]) == 2
    assert "--config and --method both choose the configuration" in capsys.readouterr().err
    assert main(["export", *common, "--keep", "0.5", "--onnx", str(tmp_path / "m.onnx")]) == 2
    assert "--keep 0.5 applies to no method: only dense runs; name a method with --method" in capsys.readouterr().err
    assert main(["bench", *common, "--config", config, "--methods", "idle", "--runs", "1"]) == 2
    assert "--config and --methods both choose the configuration" in capsys.readouterr().err


def test_model_args_may_be_repeated_and_a_key_given_twice_differently_is_refused(tmp_path, capsys):
    import json

    out = tmp_path / "b.json"
    common = ["bench", "--model", "vit_tiny_patch16_224", "--methods", "dense", "--batch-size", "1", "--runs", "1",
              "--warmup", "0", "--quiet"]
    assert main(common + ["--model-args", "img_size=32,depth=2", "--model-args", "patch_size=8", "--json",
                          str(out)]) == 0
    assert json.loads(out.read_text())["model_args"] == {"img_size": 32, "depth": 2, "patch_size": 8}
    assert main(common + ["--model-args", "img_size=32,depth=2", "--model-args", "depth=3"]) == 2
    assert "--model-args gives depth twice (2 and 3); give one" in capsys.readouterr().err


def test_model_args_parse_a_value_that_is_not_equal_to_itself():
    import math

    from tokenpace.cli.source import parse_model_args

    # nan once is a value (the option's consumer judges it); it was taken for a key given twice and crashed
    assert math.isnan(parse_model_args("drop_rate=nan")["drop_rate"])
    assert parse_model_args(["depth=2", "depth=2"]) == {"depth": 2}  # the same value twice is not a conflict
