"""tokenpace tune: the search honours its budget (accuracy checked on images it did not tune on, or a clear "no
configuration meets it" with the closest), cheap measurements first, the time budget, labels or agreement, and the
configuration file it writes, run by apply and by --config on bench, eval and show."""
import io
import json
import os
import re

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

import tokenpace
import tokenpace.tune.search as search_module
from tokenpace.bench import parse_methods
from tokenpace.cli import main
from tokenpace.config_io import load_config, load_config_for, model_record
from tokenpace.errors import TokenpaceError
from tokenpace.tune import TuneSettings, tune
from tokenpace.tune.report import summary, verdict, write_outputs
from tokenpace.tune.space import candidates
from tokenpace.tune.split import has_labels, split_indices

from conftest import make_vit

SHAPE = dict(depth=6)  # 64 patch tokens at 32 px
MODEL_ARGS = "img_size=32,patch_size=4,embed_dim=48,depth=6,num_heads=3,num_classes=10"
QUICK = dict(keeps=(0.3, 0.5, 0.7, 0.9), start_shifts=(0,), batch_size=16, runs=2, screen_runs=3)
CLI_QUICK = ["--methods", "evo,idle", "--keep-sweep", "0.3:0.9:0.2", "--start-shifts", "0", "--batch-size", "16",
             "--runs", "2", "--workers", "0", "--quiet", "--malloc", "system"]  # keep: a subprocess test below


@pytest.fixture(scope="module")
def model():
    return make_vit(**SHAPE)


@pytest.fixture
def macs_speed(monkeypatch):
    """Benchmarks that report the MACs ratio as the speed-up: the search's logic, free of a busy machine's noise.
    Records every call's specs."""
    from tokenpace.bench import BenchResult, configure, restored, spec_config

    calls = []

    def benchmark(model, specs, batch_size, device, **kwargs):
        calls.append(specs)
        with restored(model):
            gmacs = [tokenpace.macs(configure(model, spec_config(s))) / 1e9 for s in specs]
        return [BenchResult(s.method, s.describe(), g, batch_size * gmacs[0] / g, g / gmacs[0] * 10, gmacs[0] / g)
                for s, g in zip(specs, gmacs)]

    monkeypatch.setattr(search_module, "benchmark", benchmark)
    return calls


def images(n, seed=0):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def dense_labels(model, x):
    with torch.no_grad():
        return model(x).argmax(-1)


def mirrored(model, n_unique):
    """2 * n_unique images where the check split holds the same images as the tuning split (so the check figure
    must equal the tuning figure), labelled with the dense model's predictions."""
    x = images(n_unique)
    tune_idx, check_idx = split_indices(2 * n_unique, 0.5)
    order = torch.empty(2 * n_unique, dtype=torch.long)
    order[torch.as_tensor(tune_idx)] = torch.arange(n_unique)
    order[torch.as_tensor(check_idx)] = torch.arange(n_unique)
    x = x[order]
    return torch.utils.data.TensorDataset(x, dense_labels(model, x))


def test_split_is_deterministic_disjoint_and_complete():
    tune_idx, check_idx = split_indices(101, 0.3)
    again = split_indices(101, 0.3)
    assert (tune_idx == again[0]).all() and (check_idx == again[1]).all()
    assert len(check_idx) == 30 and not set(tune_idx) & set(check_idx)
    assert sorted(set(tune_idx) | set(check_idx)) == list(range(101))
    assert not (check_idx == np.arange(30)).all()  # a permutation, not the first images (files are class-sorted)
    with pytest.raises(TokenpaceError, match="at least 2 images"):
        split_indices(1, 0.5)


def test_search_honours_the_accuracy_budget_and_the_check_split_confirms_it(model, tmp_path, macs_speed):
    ds = mirrored(model, 16)
    r = tune(model, ds, "cpu", TuneSettings(max_drop=30, **QUICK), methods=parse_methods("evo,idle"))
    assert r.labelled and r.metric == "top-1" and r.dense_tune == 100.0  # labels = the dense predictions
    assert r.chosen is not None, verdict(r)
    assert r.drop(r.chosen) <= 30 and r.chosen.speedup > 1.0
    assert r.check.images == 16 and r.check.value == r.value(r.chosen) and r.check_within_budget
    # the choice: the fastest within the budget of everything evaluated, from the final benchmark
    assert r.chosen.speedup == max(c.best_speedup for c in r.evaluated() if r.within_budget(c))
    assert [s.method for s in macs_speed[-1]][0] == "dense" and r.chosen.spec() in macs_speed[-1]
    assert any(c.default for c in r.evaluated())  # the methods' defaults are measured, for comparison
    assert len(r.evaluated()) < len(r.candidates)  # the bisection skips keeps
    text = summary(r, "tiny")
    assert "chosen: " in text and "within the budget" in text and "check split (16 images" in text

    record = model_record(model, "vit_tiny_patch16_224")
    written, removed = write_outputs(r, str(tmp_path), record, "tiny")
    assert sorted(os.path.basename(p) for p in written) == ["frontier.png", "search.json", "tokenpace.json"]
    assert removed == []
    document = json.loads((tmp_path / "tokenpace.json").read_text())
    assert document["method"] == r.chosen.config.name and document["depth"] == 6
    measured = document["measured"]
    assert measured["check_split"]["within_budget"] is True and measured["batch_size"] == 16
    assert measured["dtype"] == "float32" and measured["speedup"] == r.chosen.speedup
    assert {"torch", "timm", "tokenpace"} <= set(document["versions"])
    # the file runs the configuration it names: same outputs as the chosen config applied directly
    x = images(4, seed=5)
    config = load_config_for(str(tmp_path / "tokenpace.json"), model, "vit_tiny_patch16_224")
    assert config == r.chosen.config
    with torch.no_grad():
        from_file = tokenpace.apply(model, tokenpace.load_config(str(tmp_path / "tokenpace.json")))(x)
        direct = tokenpace.apply(model, r.chosen.config)(x)
    tokenpace.remove(model)
    assert torch.equal(from_file, direct)


def test_an_unreachable_speedup_gives_no_choice_but_the_closest(model, tmp_path, macs_speed):
    timed = macs_speed
    ds = torch.utils.data.TensorDataset(images(32), torch.zeros(32, dtype=torch.long))
    pool = candidates(model, parse_methods("evo,idle"), QUICK["keeps"], (0,))
    dense = search_module.dense_gmacs(model)
    ratios = sorted(dense / c.gmacs for c in pool)
    target = ratios[-1] * 1.2  # only the configurations with the most MACs saved survive the MACs bound
    r = tune(model, ds, "cpu", TuneSettings(min_speedup=target, **QUICK), methods=parse_methods("evo,idle"))
    survivors = {s for specs in timed[1:] for s in specs if s.method != "dense"}
    assert survivors and all(dense / c.gmacs * search_module.MACS_MARGIN >= target
                             for c in pool if c.spec() in survivors)
    assert r.macs_pruned == sum(ratio * search_module.MACS_MARGIN < target for ratio in ratios) > 0
    assert r.chosen is None and r.closest is not None
    assert r.closest.best_speedup == max(c.best_speedup for c in r.candidates if c.best_speedup is not None)
    assert verdict(r).startswith(f"no configuration meets the budget: none reaches {target:g}x on this device; "
                                 "the closest: ")
    assert r.check is not None  # the closest one's check figure is reported too
    (tmp_path / "tokenpace.json").write_text("{}")  # an earlier search's choice: this one has none
    written, removed = write_outputs(r, str(tmp_path), {}, "t")
    assert [os.path.basename(p) for p in written][0] == "search.json"
    assert removed == [str(tmp_path / "tokenpace.json")] and not (tmp_path / "tokenpace.json").exists()


def test_the_default_mark_is_the_methods_own_keep_not_a_fixed_one(model):
    """--keep 0.5 fixes the keep searched; Idle's default (0.7) is then not among the candidates, Evo's (0.5) is."""
    from tokenpace.cli.source import with_keep

    pool = candidates(model, with_keep(parse_methods("evo,idle"), 0.5), QUICK["keeps"], (0,))
    marked = {(c.config.name, c.config.keep) for c in pool if c.default}
    assert ("evo", 0.5) in marked and not any(name == "idle" for name, _ in marked)


def test_tune_specs_compare_as_given(model):
    """In tune an option left out is searched: idle (every keep) and idle@0.7 (one) are two lines, not one."""
    from tokenpace.cli.source import check_specs

    specs = parse_methods("idle,idle@0.7")
    assert check_specs(specs, model, resolve=False) == specs
    with pytest.raises(TokenpaceError, match="idle keep=0.7 more than once"):
        check_specs(specs, model)  # bench and eval: one configuration


def test_the_time_budget_stops_the_search_with_the_best_answer_so_far(model, monkeypatch, macs_speed):
    """The clock jumps past most of the budget after the first accuracy pass (the methods' defaults, timed and
    evaluated first): the search stops there and answers with what it has."""
    now = [0.0]
    real = search_module.accuracy_table

    def accuracy_then_late(*args, **kwargs):
        out = real(*args, **kwargs)
        now[0] = 10_000.0 - 1e-3  # almost the whole budget gone
        return out

    monkeypatch.setattr(search_module, "accuracy_table", accuracy_then_late)
    ds = mirrored(model, 16)
    settings = TuneSettings(max_drop=100, **{**QUICK, "keeps": (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)},
                            time_budget_s=10_000)
    r = tune(model, ds, "cpu", settings, methods=parse_methods("evo,idle"), clock=lambda: now[0])
    assert r.stopped == "time budget"
    evaluated = r.evaluated()
    assert evaluated and all(c.default for c in evaluated)  # nothing after the first pass
    assert all(c.default for c in r.candidates if c.screen_speedup is not None)  # nor any other timing
    assert any("stopped the search during the quick benchmark (2 of" in n for n in r.notes)
    assert any("quick benchmark's" in n for n in r.notes)  # no time for the final benchmark
    assert any("check split was not evaluated" in n for n in r.notes) and r.check is None
    within = [c for c in evaluated if r.qualifies(c)]
    assert r.chosen is (max(within, key=lambda c: c.best_speedup) if within else None)


def test_without_labels_the_budget_is_agreement_with_dense(model, macs_speed):
    bare = [(img,) for img in images(24)]
    assert not has_labels(bare) and has_labels(torch.utils.data.TensorDataset(images(2), torch.tensor([0, 1])))
    r = tune(model, bare, "cpu", TuneSettings(max_drop=50, **QUICK), methods=parse_methods("idle"))
    assert not r.labelled and r.metric == "agreement" and r.dense_tune == 100.0
    assert all(c.top1 is None and c.agreement is not None for c in r.evaluated())
    assert any("no labels in the data: the budget is on agreement" in n for n in r.notes)
    labelled = torch.utils.data.TensorDataset(images(24), torch.zeros(24, dtype=torch.long))
    r = tune(model, labelled, "cpu", TuneSettings(max_drop=50, labels="none", **QUICK), methods=parse_methods("idle"))
    assert r.metric == "agreement" and any("no labels used (--labels none)" in n for n in r.notes)


def test_a_search_measures_on_the_device(model):
    """The real interleaved benchmark: every candidate timed, the finalists again, dense in every call."""
    ds = torch.utils.data.TensorDataset(images(16), torch.zeros(16, dtype=torch.long))
    r = tune(model, ds, "cpu", TuneSettings(max_drop=100, **{**QUICK, "keeps": (0.3, 0.7)}),
             methods=parse_methods("idle"))
    assert all(c.screen_speedup > 0 for c in r.candidates) and r.dense_img_per_s > 0
    assert any(c.speedup is not None for c in r.candidates) and r.check is not None
    assert (r.chosen or r.closest) is not None and r.elapsed_s > 0


# ---------------------------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------------------------

def write_npz(path, n, labelled=True, seed=0):
    """A packed-JPEG .npz (the format of ../shared/data/cifar10_jpeg.npz) of n random 32 px images."""
    rng = np.random.default_rng(seed)
    blobs = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, format="JPEG")
        blobs.append(np.frombuffer(buf.getvalue(), dtype=np.uint8))
    arrays = {"test_jpeg": np.concatenate(blobs), "test_offsets": np.cumsum([0] + [len(b) for b in blobs])}
    if labelled:
        arrays["test_labels"] = rng.integers(0, 10, n)
        arrays["classes"] = np.array([str(i) for i in range(10)])
    np.savez(path, **arrays)
    return str(path)


@pytest.fixture(scope="module")
def checkpoint(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("tune") / "spread.safetensors"
    save_file(model.state_dict(), str(path))
    return str(path)


def source(checkpoint):
    return ["--model", "vit_tiny_patch16_224", "--model-args", MODEL_ARGS, "--checkpoint", checkpoint]


def test_cli_tune_writes_the_choice_and_config_runs_it(checkpoint, tmp_path, capsys, macs_speed):
    data = write_npz(tmp_path / "d.npz", 48)
    out = tmp_path / "tuned"
    assert main(["tune", *source(checkpoint), "--data", data, "--max-drop", "100", "--output", str(out),
                 *CLI_QUICK]) == 0
    printed = capsys.readouterr().out
    assert "budget: top-1 at most 100 points below dense on the tuning split" in printed
    assert "24 tuning + 24 check images" in printed and "chosen: " in printed and "check split (24 images" in printed
    document = json.loads((out / "tokenpace.json").read_text())
    assert document["model"] == "vit_tiny_patch16_224" and document["model_args"]["img_size"] == 32
    assert document["malloc"] == "system" and json.loads((out / "search.json").read_text())["malloc"] == "system"
    assert document["measured"]["tuning_split"]["images"] == 24 and (out / "frontier.png").exists()
    config = str(out / "tokenpace.json")
    described = tokenpace.bench.MethodSpec.from_config(load_config(config)).describe(load_config(config))

    eval_json = tmp_path / "e.json"
    assert main(["eval", *source(checkpoint), "--data", data, "--config", config, "--workers", "0", "--quiet",
                 "--speed-runs", "1", "--json", str(eval_json)]) == 0
    rows = json.loads(eval_json.read_text())["rows"]
    assert [r["method"] for r in rows] == ["dense", document["method"]] and rows[1]["config"] == described
    capsys.readouterr()
    assert main(["bench", *source(checkpoint), "--config", config, "--batch-size", "2", "--runs", "1", "--quiet"]) == 0
    assert described in capsys.readouterr().out
    bench_json = tmp_path / "b.json"  # the model from the file alone: its arguments are recorded with the timings
    assert main(["bench", "--checkpoint", checkpoint, "--config", config, "--batch-size", "2", "--runs", "1",
                 "--warmup", "0", "--quiet", "--json", str(bench_json)]) == 0
    timed = json.loads(bench_json.read_text())
    assert timed["model_args"] == document["model_args"] and timed["input_size"] == [3, 32, 32]
    picture = tmp_path / "img.png"
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(picture)
    assert main(["show", str(picture), *source(checkpoint), "--config", config, "--output", str(tmp_path / "s")]) == 0
    assert os.listdir(tmp_path / "s") == [f"img_{document['method']}.png"]

    # the same file on another model, beside --methods, and an earlier search in --output: one line each
    capsys.readouterr()
    assert main(["eval", "--model", "vit_tiny_patch16_224", "--img-size", "48", "--data", data, "--config",
                 config]) == 2
    assert main(["bench", *source(checkpoint), "--config", config, "--methods", "evo"]) == 2
    assert main(["tune", *source(checkpoint), "--data", data, "--output", str(out), *CLI_QUICK]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    # the file's model arguments (depth 6) are used; --img-size 48 overrides its input size, which it then refuses
    assert "was made for another model (input_size [3, 32, 32]; this one has input_size [3, 48, 48])" in err[0]
    assert err[1].endswith("--config and --methods both choose the configuration; give one")
    assert ("already holds tokenpace.json, search.json, frontier.png from an earlier search; add --overwrite"
            in err[2])

    # --overwrite with a search that chooses nothing (no configuration is 50x faster; none is even measured):
    # the earlier choice and plot go, so the folder holds no file of the earlier search
    assert main(["tune", *source(checkpoint), "--data", data, "--min-speedup", "50", "--output", str(out),
                 "--overwrite", *CLI_QUICK]) == 1
    err = capsys.readouterr().err
    assert sorted(os.listdir(out)) == ["search.json"]
    assert f"removed {out / 'tokenpace.json'} (from the earlier search" in err
    assert f"removed {out / 'frontier.png'} (from the earlier search" in err
    assert json.loads((out / "search.json").read_text())["settings"]["min_speedup"] == 50
    (out / "search.json").unlink()
    (out / "frontier.png").write_bytes(b"")  # a plot alone is an earlier search's output too
    assert main(["tune", *source(checkpoint), "--data", data, "--output", str(out), *CLI_QUICK]) == 2
    assert "already holds frontier.png from an earlier search" in capsys.readouterr().err


def test_cli_tune_on_unlabelled_images_says_the_budget_is_agreement(checkpoint, tmp_path, capsys, macs_speed):
    data = write_npz(tmp_path / "bare.npz", 24, labelled=False)
    assert main(["tune", *source(checkpoint), "--data", data, "--min-speedup", "1.5", "--output",
                 str(tmp_path / "o"), *CLI_QUICK]) == 0
    printed = capsys.readouterr().out
    assert "note: no labels in the data: the budget is on agreement with the dense model's predictions" in printed
    assert ("budget: at least 1.5x faster than dense (measured, interleaved with dense), the best agreement among "
            "those") in printed
    chosen = json.loads((tmp_path / "o" / "tokenpace.json").read_text())["measured"]
    assert chosen["metric"] == "agreement" and chosen["speedup"] >= 1.5 and chosen["check_split"]["images"] == 12
    assert main(["eval", *source(checkpoint), "--data", data, "--workers", "0"]) == 2
    assert "has no labels (unlabelled images)" in capsys.readouterr().err


def run(argv):
    """main's exit code, parser errors (SystemExit) included."""
    try:
        return main(argv)
    except SystemExit as exit:
        return exit.code


@pytest.mark.parametrize("argv,message", [
    ([], "data path"),
    (["--methods", "dense,evo"], "--methods: dense is the reference"),
    (["--max-drop", "1", "--min-speedup", "2"], "argument --min-speedup: not allowed with argument --max-drop"),
    (["--min-speedup", "1"], "expected a finite number > 1"),
    (["--min-speedup", "inf"], "expected a finite number > 1, got 'inf'"),
    (["--max-drop", "inf"], "expected a finite number >= 0, got 'inf'"),
    (["--time-budget", "0s"], "expected a duration > 0 such as 90s, 10m or 1h30m, got '0s'"),
    (["--time-budget", "ten"], "got 'ten'"),
    (["--start-shifts", "a"], "expected comma-separated integers"),
    (["--check-fraction", "1"], "expected a fraction in (0, 1)"),
    (["--methods", "evit", "--model", "swin_tiny_patch4_window7_224"], "method 'evit' is not available for timm SwinTransformer models"),
])
def test_cli_tune_refuses_bad_input_in_one_line(argv, message, tmp_path, capsys):
    assert run(["tune", "--data", str(tmp_path / "none.npz"), "--output", str(tmp_path / "o"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_durations():
    from tokenpace.cli.parser import _duration

    assert [_duration(t) for t in ("90", "90s", "10m", "1h30m", "1.5m")] == [90, 90, 600, 5400, 90]


def test_progress_to_a_log_file_is_plain_lines():
    """Redirected stderr gets one line per status (no carriage-return redraws); disabled shows nothing."""
    from tokenpace.tune.clock import Progress

    log = io.StringIO()  # not a terminal
    bar = Progress(True, 120.0, stream=log)
    bar.plan(10.0)
    bar.say("timing the dense model")
    bar.advance(5.0, "timed 2/4")
    bar.plan(15.0)  # the plan grows (20 s in all): the percentage shown holds at 50, never goes back
    bar.advance(2.0, "evaluated 1")
    bar.advance(8.0, "evaluated 2")
    bar.close()
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and len(lines) == 5
    assert lines[0].startswith("tune:   0% after 0s: timing the dense model") and "50%" in lines[1]
    assert " 50% " in lines[2] and " 75% " in lines[3]  # 7/20 = 35% held at 50; 15/20
    assert lines[4].startswith("tune: 100% after") and lines[4].endswith(": done")
    quiet = io.StringIO()
    silent = Progress(False, 120.0, stream=quiet)
    silent.say("x")
    silent.close()
    assert quiet.getvalue() == ""


def test_tune_keeps_freed_memory_by_default_where_glibc_allows():
    """tune's --malloc default: keep on glibc (its choice rests on CPU timings that the default allocator made vary
    by up to 0.5x between processes); bench keeps the system's behaviour unless asked. In a child process: the
    setting is process-wide."""
    import subprocess
    import sys

    code = ("from tokenpace.cli import make_parser; from tokenpace.runtime import keep_freed_memory_where_possible;"
            " p = make_parser(); print(p.parse_args(['tune', '--data', 'd', '--output', 'o']).malloc, "
            "p.parse_args(['bench']).malloc, keep_freed_memory_where_possible())")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    glibc = hasattr(__import__("ctypes").CDLL(None), "gnu_get_libc_version")
    assert done.stdout.split() == ["None", "system", "keep" if glibc else "system"], done.stderr


def test_tune_keep_fixes_the_methods_without_their_own():
    import argparse

    import timm

    from tokenpace.cli.tune import _methods

    # 16 tokens: Idle(0.5) keeps int(16 * 0.5 ** 3) = 2 at its last stage (4 tokens would leave none)
    model = timm.create_model("vit_tiny_patch16_224", img_size=64, depth=4)
    specs = _methods(argparse.Namespace(methods="evo@0.4,idle", keep=0.5), model, None)
    assert [(s.method, dict(s.options)["keep"]) for s in specs] == [("evo", 0.4), ("idle", 0.5)]


def test_evos_modes_are_one_candidate_where_they_compute_the_same():
    """At depth 2 Evo prunes one layer, a stage start either way: layer mode is stage mode, so it is not a second
    candidate; at depth 6 (stage starts 2 and 4, pruned layers 2-5) the modes differ."""
    shallow = make_vit("deit", depth=2)
    pool = candidates(shallow, parse_methods("evo"), (0.5,), (0,))
    assert [c.config.mode for c in pool] == ["stage"]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():  # what the twin rule claims: the two modes give the same logits
        stage = tokenpace.apply(shallow, "evo", keep=0.5)(x)
        assert torch.equal(tokenpace.apply(shallow, "evo", keep=0.5, mode="layer")(x), stage)
    deep = make_vit("deit", depth=6)
    assert [c.config.mode for c in candidates(deep, parse_methods("evo"), (0.5,), (0,))] == ["stage", "layer"]


def test_a_rewrite_removes_the_earlier_outputs_it_does_not_replace(tmp_path):
    """Nothing evaluated and nothing chosen: only search.json is written, and an earlier search's choice and plot
    are removed rather than left beside it; a folder where a file goes is refused before anything is removed."""
    from tokenpace.tune.search import TuneResult

    r = TuneResult(settings=TuneSettings(max_drop=1), labelled=True, device="cpu", dtype="float32", dense_gmacs=1.0,
                   candidates=[], tune_images=2, check_images=2)
    for name in ("tokenpace.json", "search.json", "frontier.png"):
        (tmp_path / name).write_text("earlier")
    written, removed = write_outputs(r, str(tmp_path), {}, "t")
    assert written == [str(tmp_path / "search.json")]
    assert removed == [str(tmp_path / "tokenpace.json"), str(tmp_path / "frontier.png")]
    assert sorted(os.listdir(tmp_path)) == ["search.json"]
    assert json.loads((tmp_path / "search.json").read_text())["chosen"] is None
    (tmp_path / "tokenpace.json").mkdir()
    with pytest.raises(TokenpaceError, match="tokenpace.json' is a folder; tune writes a file of that name"):
        write_outputs(r, str(tmp_path), {}, "t")
    assert (tmp_path / "search.json").exists()


def test_start_shifts_that_leave_the_model_are_named_in_the_notes(model, tmp_path, macs_speed):
    """Depth 6: Idle's default layers (2, 3, 5) moved by +1 reach block 6, which is not there; +3 too. The note
    names both for idle with the accepted layers, and the summary and search.json carry it."""
    from tokenpace.tune.space import search_space

    space = search_space(model, parse_methods("idle,evo"), (0.5,), (0, 1, 3))
    assert space.skipped_shifts["idle"] == (1, 3) and "evo" in space.skipped_shifts
    assert {c.config.name for c in space.candidates} == {"idle", "evo"}
    ds = mirrored(model, 8)
    r = tune(model, ds, "cpu", TuneSettings(max_drop=100, **{**QUICK, "keeps": (0.5,), "start_shifts": (0, 1, 3)}),
             methods=parse_methods("idle"))
    note = ("start shifts +1, +3 skipped for idle (at +1: Idle stage_starts=(3, 4, 6) has layer(s) [6] outside the "
            "model: accepted layers are 0..5 for a model of depth 6)")
    assert note in r.notes and f"note: {note}" in summary(r, "tiny")
    write_outputs(r, str(tmp_path), {}, "t")
    assert note in json.loads((tmp_path / "search.json").read_text())["notes"]
    fitting = tune(model, ds, "cpu", TuneSettings(max_drop=100, **{**QUICK, "keeps": (0.5,)}),
                   methods=parse_methods("idle"))
    assert not any("skipped" in n for n in fitting.notes)  # shift 0 fits: nothing to say


def test_keeps_that_leave_a_block_no_token_are_named_in_the_notes():
    """LeViT at 32 px ends in 2x2 tokens: Idle's keep**3 at 0.5 keeps int(4 * 0.125) = 0 of them. That keep is left
    out for Idle, not for Evo (which keeps 0.5 of larger stages), and said so; a space of such keeps alone is
    refused, naming them."""
    from tokenpace.errors import TokenpaceError
    from tokenpace.tune.space import search_space

    model = timm.create_model("levit_cifar")
    space = search_space(model, parse_methods("idle,evo"), (0.5, 0.7), (0,))
    assert sorted({(c.config.name, c.config.keep) for c in space.candidates}) == [
        ("evo", 0.5), ("evo", 0.7), ("idle", 0.7)]
    assert [n for n in space.notes() if "no token" in n] == [
        "idle with keep 0.5 skipped where a block would keep no token (e.g. idle keep=0.5 on this timm LeViT model: "
        "a block would run on no token: a keep ratio of 0.125 keeps int(4 * 0.125) = 0 of 4 tokens; at least one must "
        "be kept (4 * ratio >= 1); choose a larger keep)"]
    with pytest.raises(TokenpaceError, match="no configuration to search: idle with keep 0.3, 0.5 skipped where a "
                                             "block would keep no token"):
        search_space(model, parse_methods("idle"), (0.3, 0.5), (0,))


@pytest.mark.parametrize("option,value,message", [
    ("time_budget_s", float("nan"), "time_budget_s must be a finite number of seconds > 0; got nan"),
    ("time_budget_s", float("inf"), "time_budget_s must be a finite number"),
    ("time_budget_s", 0, "time_budget_s must be a finite number"),
    ("runs", 2.5, "runs must be an integer >= 1; got 2.5"),
    ("runs", True, "runs must be an integer >= 1; got True"),
    ("screen_runs", 0, "screen_runs must be an integer >= 1"),
    ("finalists", 2.0, "finalists must be an integer >= 1; got 2.0"),
    ("workers", 0.5, "workers must be an integer >= 0; got 0.5"),
    ("workers", -1, "workers must be an integer >= 0; got -1"),
    ("batch_size", "8", "batch_size must be an integer >= 1"),
    ("start_shifts", (0, 0.5), "start_shifts must be whole numbers of blocks"),
])
def test_settings_refuse_what_is_not_a_count_or_a_duration(option, value, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        TuneSettings(**{option: value})
    assert TuneSettings(runs=np.int64(3), workers=0, time_budget_s=90).runs == 3  # numpy integers are integers


def test_tune_gives_the_model_back_where_and_as_it_came(model, monkeypatch, macs_speed):
    """The search moves the model to its device; whatever it changes (here: a dtype, then an error) is put back:
    the same parameter objects, on their device with their dtype, the method configuration and the train mode."""
    from tokenpace.tune.search import placement_kept

    params = {name: p for name, p in model.named_parameters()}
    tokenpace.apply(model, "idle", keep=0.6)
    before = tokenpace.get_patch(model).config
    model.train()
    real_run = search_module._Search.run

    def moved_then_failed(self):
        self.model.to(torch.float64)  # what a device move does to the parameters' placement
        raise RuntimeError("the search failed")

    monkeypatch.setattr(search_module._Search, "run", moved_then_failed)
    try:
        with pytest.raises(RuntimeError, match="the search failed"):
            tune(model, mirrored(model, 8), "cpu", TuneSettings(max_drop=100, **QUICK), methods=parse_methods("idle"))
        assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in model.parameters())
        assert all(p is params[name] for name, p in model.named_parameters())
        assert model.training and tokenpace.get_patch(model).config == before
    finally:
        monkeypatch.setattr(search_module._Search, "run", real_run)
        tokenpace.remove(model).eval()
    bn = torch.nn.BatchNorm1d(3)  # buffers too, and a gradient moves with its parameter
    bn.weight.grad = torch.ones(3)
    with placement_kept(bn):
        bn.to(torch.float64)
    assert bn.running_mean.dtype == bn.weight.dtype == bn.weight.grad.dtype == torch.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_tune_on_cuda_leaves_a_cpu_model_on_the_cpu(model, macs_speed):
    params = list(model.parameters())
    r = tune(model, mirrored(model, 8), "cuda", TuneSettings(max_drop=100, **QUICK), methods=parse_methods("idle"))
    assert r.dense_tune is not None and r.evaluated()  # the search ran (on the GPU)
    assert all(p.device.type == "cpu" for p in model.parameters()) and all(
        a is b for a, b in zip(params, model.parameters()))
    assert all(b.device.type == "cpu" for b in model.buffers())
