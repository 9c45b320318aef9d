"""The benchmark command: table, JSON layout, method parsing."""
import contextlib
import json
import subprocess
import sys
import warnings

import pytest

from tokenpace.bench import MethodSpec, parse_methods
from tokenpace.cli import main


def test_parse_methods():
    specs = parse_methods("dense, evo@0.6, idle:keep=0.5:stage_starts=2/4/6, evit:fuse=false")
    assert [s.method for s in specs] == ["dense", "evo", "idle", "evit"]
    assert dict(specs[1].options) == {"keep": 0.6}
    assert dict(specs[2].options) == {"keep": 0.5, "stage_starts": (2, 4, 6)}
    assert dict(specs[3].options) == {"fuse": False}
    assert specs[3].describe() == "keep=0.7 fuse=False" and MethodSpec("dense").describe() == "-"
    with pytest.raises(ValueError, match="key=value"):
        parse_methods("evo:mode")


def test_bench_cli_writes_table_and_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = main(["bench", "--model", "vit_tiny_patch16_224", "--methods", "dense,evo,idle,evit,topk", "--batch-size",
               "2", "--runs", "1", "--warmup", "0", "--img-size", "64", "--json", str(out)])
    assert rc == 0
    printed = capsys.readouterr()
    assert "speed-up" in printed.out and "[run 1/1] idle" in printed.err and "deprecated" not in printed.err
    doc = json.loads(out.read_text())
    assert doc["model"] == "vit_tiny_patch16_224" and doc["batch_sizes"] == [2] and doc["device"].startswith("cpu")
    assert doc["input_size"] == [3, 64, 64] and doc["model_args"] == {"img_size": 64}  # what was timed, repeatable
    assert set(doc["versions"]) == {"tokenpace", "torch", "timm", "python"}
    assert doc["compile"] is False and doc["compile_mode"] is None and doc["compile_backend"] is None  # eager
    assert doc["cudnn_autotuned"] is False  # CUDA only
    rows = doc["results"]
    assert all(r["batch_size"] == 2 for r in rows)
    assert [r["method"] for r in rows] == ["dense", "evo", "idle", "evit", "topk"]
    assert rows[0]["speedup"] == 1.0 and all(r["img_per_s"] > 0 and r["gmacs"] > 0 for r in rows)
    assert all(r["gmacs"] < rows[0]["gmacs"] for r in rows[1:])
    assert {"method", "config", "gmacs", "img_per_s", "speedup"} <= set(rows[1])


def test_bench_several_batch_sizes_write_the_same_shape(tmp_path):
    out = tmp_path / "bench.json"
    assert main(["bench", "--model", "vit_tiny_patch16_224", "--methods", "dense,topk", "--batch-size", "1,2",
                 "--runs", "1", "--warmup", "0", "--img-size", "32", "--quiet", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["batch_sizes"] == [1, 2]
    assert [(r["batch_size"], r["method"]) for r in doc["results"]] == [(1, "dense"), (1, "topk"), (2, "dense"),
                                                                        (2, "topk")]


def test_bench_without_a_dense_row_prints_dash_and_writes_valid_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--model", "vit_tiny_patch16_224", "--methods", "evo@0.5", "--batch-size", "1",
                 "--runs", "1", "--warmup", "0", "--img-size", "32", "--quiet", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "nan" not in table.lower() and table.rstrip().endswith("-")
    text = out.read_text()
    assert "NaN" not in text and json.loads(text)["results"][0]["speedup"] is None


def test_bench_without_model_names_the_default_model_it_built(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--methods", "dense", "--batch-size", "1", "--runs", "1", "--warmup", "0", "--img-size",
                 "32", "--quiet", "--json", str(out)]) == 0
    assert "\ndeit_small_patch16_224  inference  batch 1" in capsys.readouterr().out
    assert json.loads(out.read_text())["model"] == "deit_small_patch16_224"


def test_bench_keep_applies_to_the_methods_without_their_own(tmp_path):
    out = tmp_path / "bench.json"
    assert main(["bench", "--model", "vit_tiny_patch16_224", "--methods", "dense,evo@0.6,idle,topk:layer=2",
                 "--keep", "0.5", "--batch-size", "1", "--runs", "1", "--warmup", "0", "--img-size", "64", "--quiet",
                 "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    assert [(r["method"], r["config"]) for r in rows] == [("dense", "-"), ("evo", "keep=0.6"), ("idle", "keep=0.5"),
                                                          ("topk", "keep=0.5 layer=2")]


def test_bench_old_positional_model_still_works_with_a_deprecation(capsys):
    assert main(["bench", "vit_tiny_patch16_224", "--methods", "dense", "--batch-size", "1", "--runs", "1",
                 "--warmup", "0", "--img-size", "32", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "warning: the positional MODEL (vit_tiny_patch16_224) is deprecated" in err and "--model" in err


def test_bench_keep_and_keep_sweep(tmp_path):
    out = tmp_path / "bench.json"
    assert main(["bench", "--model", "vit_tiny_patch16_224", "--methods", "dense,evo,idle", "--keep-sweep",
                 "0.5:1.0:0.5", "--batch-size", "1", "--runs", "1", "--warmup", "0", "--img-size", "64", "--quiet",
                 "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    assert [(r["method"], r["config"]) for r in rows] == [("dense", "-"), ("evo", "keep=0.5"), ("evo", "keep=1.0"),
                                                          ("idle", "keep=0.5"), ("idle", "keep=1.0")]
    assert main(["bench", "--model", "vit_tiny_patch16_224", "--methods", "evo,topk", "--keep", "0.25",
                 "--batch-size", "1", "--runs", "1", "--warmup", "0", "--img-size", "32", "--quiet",
                 "--json", str(out)]) == 0
    assert [r["config"] for r in json.loads(out.read_text())["results"]] == ["keep=0.25", "keep=0.25"]


def test_benchmark_and_eval_keep_one_model(monkeypatch):
    """Each configuration is applied to the one model in turn: no copy per configuration."""
    import copy

    import torch

    import tokenpace
    from tokenpace.bench import benchmark
    from tokenpace.evaluate import accuracy_table
    from conftest import make_vit

    model = tokenpace.apply(make_vit("deit", depth=4), "idle", keep=0.5)
    specs = parse_methods("dense,evo,evo@0.3,idle,evit,topk")
    monkeypatch.setattr(copy, "deepcopy", lambda *a, **k: pytest.fail("a configuration was deep-copied"))
    results = benchmark(model, specs, 2, torch.device("cpu"), runs=1, warmup=0)
    assert [r.gmacs for r in results][2] < results[1].gmacs < results[0].gmacs
    images = torch.randn(4, 3, 32, 32)
    loader = [(images, torch.zeros(4, dtype=torch.long))]
    table = accuracy_table(model, specs, loader, torch.device("cpu"))
    assert table[0][2] == 100.0  # dense agrees with itself
    assert tokenpace.get_patch(model).config == tokenpace.Idle(keep=0.5)  # given back as it came
    monkeypatch.undo()
    for spec, row in zip(specs, table):  # the same numbers as a separately configured copy of the model
        ref = copy.deepcopy(model)
        tokenpace.remove(ref) if spec.method == "dense" else tokenpace.apply(ref, spec.method, **dict(spec.options))
        with torch.inference_mode():
            dense = tokenpace.remove(copy.deepcopy(model))(images).argmax(-1)
            assert row[2] == 100.0 * (ref(images).argmax(-1) == dense).float().mean().item()


@pytest.mark.parametrize("argv,message", [
    (["--methods", ""], "--methods '' names no method; accepted: dense"),
    (["--methods", "dense,evo@0.5,evo:keep=0.5"], "the configurations list evo keep=0.5 more than once"),
    (["--methods", "dense,evo,evo@0.5", "--keep", "0.5"], "the configurations list evo keep=0.5 more than once"),
    (["--methods", "dense,dense"], "the configurations list dense more than once"),
    (["--methods", "dense,evo,evo@0.5"], "the configurations list evo keep=0.5 more than once"),  # the default keep
    (["--methods", "idle:keep=0.7,idle"], "the configurations list idle keep=0.7 more than once"),
    (["--train", "--methods", "evo:mode=layer,evo"], "the configurations list evo keep=0.5 mode=layer more than once"),
    (["--methods", "dense", "--keep", "0.5"], "--keep 0.5 applies to no method: only dense runs; name a method with "
                                             "--methods"),
    (["--methods", "evo@0.4", "--keep", "0.5"], "--keep 0.5 applies to no method: evo in --methods sets its own keep"),
    (["--batch-size", "1,2,1"], "argument --batch-size: '1,2,1' lists 1 more than once"),
    (["--threads", "0"], "argument --threads: expected an integer >= 1, got '0'"),
    (["--keep", "1.5"], "argument --keep: expected a keep ratio in (0, 1], got '1.5'"),
    (["--keep", "0.5", "--keep-sweep", "0.3:1:0.1"], "--keep and --keep-sweep both set the keep ratio"),
    (["--methods", "dense", "--keep-sweep", "0.3:0.5:0.1"], "--keep-sweep 0.3:0.5:0.1 applies to no method: only "
                                                            "dense runs; name a method with --methods"),
    (["--methods", "evo@0.6", "--keep-sweep", "0.3:1:0.1"], "--keep-sweep sets the keep of every method, and evo in "
                                                             "--methods sets its own; give one"),
    (["--json", "/no/such/folder/bench.json"], "--json '/no/such/folder/bench.json' is in folder '/no/such/folder', "
                                               "which does not exist"),
    (["--batch-size", "100000000"], "inference at batch size 100000000 does not fit in memory: one allocation asked"),
    (["--train", "--model-args", "num_classes=0"], "--train times a classification training step, and "
                                                   "vit_tiny_patch16_224 is built without a classifier head (num_"
                                                   "classes=0, as timm builds image encoders); give it one, e.g. "
                                                   "--model-args num_classes=1000"),
    (["--memory"], "--memory measures one call per configuration, each in its own process; --runs and --warmup set "
                   "timed rounds (drop them)"),
])
def test_bench_bad_input_is_one_line_before_any_work(argv, message, capsys):
    full = ["bench", "--model", "vit_tiny_patch16_224", "--img-size", "32", "--runs", "1", "--warmup", "0",
            "--quiet", "--batch-size", "1", *argv]
    try:
        code = main(full)
    except SystemExit as exit_info:  # argparse's own checks
        code = exit_info.code
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") <= 2 and "Traceback" not in err
    if "memory" not in message:
        assert "benchmarking" not in err  # refused before any work


def test_training_steps_differ_where_their_training_configs_do():
    """bench --train runs Evo in layer mode unless told: evo and evo:mode=stage are two training steps."""
    from tokenpace.cli.source import check_specs
    from conftest import make_vit

    specs = parse_methods("dense,evo:mode=stage,evo", train=True)
    assert check_specs(specs, make_vit("deit", depth=4), train=True) == specs


def test_training_specs_take_idle_recipe_options():
    spec = parse_methods("idle:distill_weight=0:cut_mode=none", train=True)[0]
    assert spec.method_options() == {} and spec.recipe_options() == {"distill_weight": 0, "cut_mode": "none"}
    assert spec.describe() == "keep=0.7 distill_weight=0 cut_mode=none"
    with pytest.raises(ValueError, match="use it with --train"):
        parse_methods("idle:distill_weight=0")
    with pytest.raises(ValueError, match="accepted on idle only"):
        parse_methods("evit:cut_mode=none", train=True)
    with pytest.raises(ValueError, match="choose one of both, intra, inter, none"):
        parse_methods("idle:cut_mode=all", train=True)
    with pytest.raises(ValueError, match="must be a finite number >= 0"):
        parse_methods("idle:cut_weight=-1", train=True)


def test_train_bench_without_teacher(capsys):
    assert main(["bench", "--model", "vit_tiny_patch16_224", "--train", "--methods", "dense,idle,idle:distill_weight=0",
                 "--batch-size", "2", "--runs", "1", "--warmup", "0", "--img-size", "32", "--quiet"]) == 0
    assert "distill_weight=0" in capsys.readouterr().out


def test_malloc_keep_is_recorded_and_other_values_refused(tmp_path, capsys):
    out = tmp_path / "bench.json"
    # a separate process: mallopt would change this test process's allocator for good
    run = subprocess.run([sys.executable, "-m", "tokenpace.cli", "bench", "--model", "vit_tiny_patch16_224",
                          "--methods", "dense",
                          "--batch-size", "1", "--runs", "1", "--warmup", "0", "--img-size", "32", "--quiet",
                          "--malloc", "keep", "--json", str(out)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert json.loads(out.read_text())["malloc"] == "keep" and "malloc=keep" in run.stdout
    with pytest.raises(SystemExit):
        main(["bench", "--malloc", "jemalloc"])
    assert "choose from 'system', 'keep'" in capsys.readouterr().err


def test_compiled_benchmark_holds_one_copy_per_configuration(monkeypatch):
    """--compile: each configuration gets its own copy (a compiled graph is specialised to it); the model itself is
    given back as it came."""
    import torch

    import tokenpace
    from tokenpace.bench import benchmark
    from conftest import make_vit

    compiled = []
    monkeypatch.setattr(torch, "compile", lambda m, **kw: compiled.append(m) or m)
    model = make_vit("deit", depth=4)
    benchmark(model, parse_methods("dense,evo,idle@0.5"), 1, torch.device("cpu"), compile=True, runs=1, warmup=0)
    configs = [None if tokenpace.get_patch(m) is None else tokenpace.get_patch(m).config for m in compiled]
    assert configs == [None, tokenpace.Evo(keep=0.5), tokenpace.Idle(keep=0.5)]  # as applied: defaults filled
    assert len({id(m) for m in compiled} | {id(model)}) == 4 and tokenpace.get_patch(model) is None


def test_compile_mode_reaches_torch_compile(monkeypatch):
    import torch

    from tokenpace.bench import benchmark
    from conftest import make_vit

    modes = []
    monkeypatch.setattr(torch, "compile", lambda m, **kw: modes.append(kw["mode"]) or m)
    model = make_vit("deit", depth=2)
    for mode in ("default", "max-autotune-no-cudagraphs"):
        benchmark(model, parse_methods("dense,evo"), 1, torch.device("cpu"), compile=True, runs=1, warmup=0,
                  compile_mode=mode)
    assert modes == ["default", "default", "max-autotune-no-cudagraphs", "max-autotune-no-cudagraphs"]


@pytest.mark.parametrize("mode, error", [
    (dict(compile_mode="fast"), "unknown compile mode 'fast'; accepted: default, reduce-overhead"),
    (dict(compile_mode="max-autotune-no-cudagraphs"), "sets how compiled runs compile, and compile \\(--compile\\) is "
                                                      "off"),
    (dict(compile=True, compile_mode="reduce-overhead"), "needs a CUDA device \\(got cpu\\); accepted on cpu: "
                                                          "default, max-autotune-no-cudagraphs"),
    (dict(compile=True, compile_mode="max-autotune"), "replays CUDA graphs"),
    (dict(cuda_graph=True), "CUDA-graph capture .* needs a CUDA device \\(got cpu\\)"),
    (dict(cuda_graph=True, compile=True), "needs a CUDA device \\(got cpu\\)"),  # the device is checked first
    (dict(compile_backend="aot_eager"), "compile backend 'aot_eager' \\(--compile-backend\\) sets what compiles, "
                                        "and compile \\(--compile\\) is off"),
    (dict(compile=True, compile_backend="fast"), "unknown compile backend 'fast'; accepted: .*aot_eager.*inductor"),
    (dict(compile=True, compile_backend="aot_eager", compile_mode="max-autotune-no-cudagraphs"),
     "compile mode 'max-autotune-no-cudagraphs' is inductor's, and the compile backend is 'aot_eager'; accepted with "
     "'aot_eager': default"),
])
def test_run_modes_that_do_not_apply_are_refused(mode, error):
    import torch

    from tokenpace.bench import benchmark
    from tokenpace.errors import TokenpaceError
    from conftest import make_vit

    with pytest.raises(TokenpaceError, match=error):
        benchmark(make_vit("deit", depth=1), parse_methods("dense"), 1, torch.device("cpu"), **mode)


def test_another_compile_backend_compiles_every_configuration_with_it(monkeypatch):
    """compile_backend="aot_eager" (the GPU suite's smoke run): every configuration is compiled by that backend, with
    no inductor mode passed to it, and runs."""
    import torch

    from tokenpace.bench import benchmark
    from tokenpace.runners import RunMode
    from conftest import make_vit

    calls = []
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda m, **kw: calls.append(kw) or real_compile(m, **kw))
    rows = benchmark(make_vit("deit", depth=2), parse_methods("dense,evo,idle"), 2, "cpu", compile=True, runs=1,
                     warmup=1, compile_backend="aot_eager")
    assert calls == [{"backend": "aot_eager"}] * 3
    assert [r.method for r in rows] == ["dense", "evo", "idle"] and all(r.ms_per_batch > 0 for r in rows)
    assert RunMode(compile=True, compile_backend="aot_eager").describe() == "compiled (aot_eager)"


def test_run_mode_checks_on_a_cuda_device_object():
    """RunMode.check reads only the device's type, so its CUDA-side refusals are checked here without a GPU."""
    import torch

    from tokenpace.errors import TokenpaceError
    from tokenpace.runners import RunMode

    cuda = torch.device("cuda")
    for ok in (RunMode(cuda_graph=True), RunMode(compile=True, compile_mode="reduce-overhead"), RunMode()):
        ok.check(cuda)
    with pytest.raises(TokenpaceError, match="takes eager kernels; for compiled code with CUDA graphs use compile "
                                             "mode 'reduce-overhead'"):
        RunMode(compile=True, cuda_graph=True).check(cuda)
    with pytest.raises(TokenpaceError, match="compile mode 'reduce-overhead' \\(--compile-mode\\) sets how"):
        RunMode(compile_mode="reduce-overhead").check(cuda)
    assert [m.describe() for m in (RunMode(), RunMode(compile=True), RunMode(True, "reduce-overhead"),
                                   RunMode(cuda_graph=True))] == ["eager", "compiled", "compiled (reduce-overhead)",
                                                                   "eager+cuda-graph"]
    assert RunMode(True, "max-autotune").replays_graphs
    assert not RunMode(True, "max-autotune-no-cudagraphs").replays_graphs


def test_cuda_graph_runners_capture_one_copy_per_configuration(monkeypatch):
    """--cuda-graph: each configuration is captured once from its own patched copy (a graph keeps reading the tensors
    it was captured with), replays need no autocast around them, and the model comes back as it was."""
    import torch

    import tokenpace
    from tokenpace import runners
    from tokenpace.bench import configure, spec_config
    from conftest import make_vit

    captured = []

    def fake_capture(call, device, autocast):
        with autocast():
            out = call()  # the capture runs the forward once, under the timing's autocast
        captured.append((call, out.dtype, torch.is_inference_mode_enabled()))
        return lambda: None

    monkeypatch.setattr(runners, "capture_cuda_graph", fake_capture)
    model = make_vit("deit", depth=2)
    configs = [spec_config(s) for s in parse_methods("dense,evo,idle")]
    x = torch.randn(1, 3, 32, 32)
    autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    said = []
    run = runners.make_runners(model, configs, ["dense", "evo", "idle"], configure, x,
                               runners.RunMode(cuda_graph=True), autocast, said.append)
    assert len(run.calls) == 3 and said == [f"capturing {m} in a CUDA graph" for m in ("dense", "evo", "idle")]
    assert all(dtype == torch.bfloat16 and inference for _, dtype, inference in captured)
    assert run.autocast is contextlib.nullcontext and all(p() is None for p in run.prepares)
    patched = [call.__defaults__[0] for call, _, _ in captured]  # the copy each capture ran
    assert [None if tokenpace.get_patch(m) is None else type(tokenpace.get_patch(m).config).__name__
            for m in patched] == [None, "Evo", "Idle"]
    assert model not in patched and len({id(m) for m in patched}) == 3
    assert not any(p.is_inference() for m in patched for p in m.parameters())  # copied outside inference mode


def test_cuda_graph_capture_keeps_what_its_replay_reads(monkeypatch):
    """capture_cuda_graph on stand-ins for torch.cuda's stream and graph classes (this machine has no GPU): warm-up
    calls on a side stream, then one capture; the replay keeps the captured model alive (a collected copy would
    leave the graph reading freed memory); a failed capture raises its own error after a progress line naming the
    method."""
    import gc
    import weakref

    import torch

    from tokenpace import runners
    from tokenpace.bench import configure, spec_config
    from conftest import make_vit

    events = []

    class Stream:
        def __init__(self, device=None):
            pass

        def wait_stream(self, other):
            events.append("wait")

    class Graph:
        def replay(self):
            events.append("replay")

    class Capture:
        fail = False

        def __init__(self, graph):
            pass

        def __enter__(self):
            events.append("capture")

        def __exit__(self, *exc):
            if Capture.fail:
                raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(torch.cuda, "graph", Capture)
    model = make_vit("deit", depth=2)
    calls = []
    monkeypatch.setattr(type(model), "__call__", lambda self, x: calls.append(weakref.ref(self)) or torch.zeros(1))
    configs = [spec_config(s) for s in parse_methods("dense,evo")]
    run = runners.make_runners(model, configs, ["dense", "evo"], configure, torch.randn(1, 3, 32, 32),
                               runners.RunMode(cuda_graph=True), contextlib.nullcontext, lambda msg: None)
    copies = calls[::4]  # 3 warm-up calls and the capture per configuration
    assert len(calls) == 8 and len({id(ref()) for ref in copies} | {id(model)}) == 3
    assert events.count("capture") == 2
    gc.collect()
    assert all(ref() is not None for ref in copies)  # held by the replays
    events.clear()
    run.calls[1]()
    assert events == ["replay"]
    del run
    gc.collect()
    assert all(ref() is None for ref in copies)
    Capture.fail = True
    said = []
    with pytest.raises(RuntimeError, match="^operation not permitted when stream is capturing$"):
        runners.make_runners(model, configs, ["dense", "evo"], configure, torch.randn(1, 3, 32, 32),
                             runners.RunMode(cuda_graph=True), contextlib.nullcontext, said.append)
    assert said == ["capturing dense in a CUDA graph"]  # the last progress line names what failed


def test_skipped_cuda_graphs_warn_only_where_graphs_were_asked_for():
    from torch._dynamo.utils import counters

    from tokenpace.runners import RunMode, warn_if_graphs_skipped

    with pytest.warns(UserWarning, match="ran 1 compiled graph\\(s\\) without CUDA graphs"):
        with warn_if_graphs_skipped(RunMode(compile=True, compile_mode="reduce-overhead")):
            counters["inductor"]["cudagraph_skips"] += 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with warn_if_graphs_skipped(RunMode(compile=True)):
            counters["inductor"]["cudagraph_skips"] += 1
        with warn_if_graphs_skipped(RunMode(compile=True, compile_mode="reduce-overhead")):
            pass


def test_bench_cli_refuses_run_modes_that_do_not_apply(capsys):
    for argv, error in ((["--compile-mode", "max-autotune-no-cudagraphs"], "--compile-mode max-autotune-no-cudagraphs"
                         " sets how --compile compiles, and --compile is off (add --compile)"),
                        (["--compile-mode", "default"], "--compile-mode default sets how --compile compiles"),
                        (["--compile-backend", "inductor"], "--compile-backend inductor sets what --compile compiles "
                                                            "with, and --compile is off (add --compile)"),
                        (["--compile", "--compile-backend", "fast"], "unknown compile backend 'fast'; accepted:"),
                        (["--train", "--cuda-graph"], "--cuda-graph is for inference"),
                        (["--cuda-graph"], "needs a CUDA device (got cpu)"),
                        (["--memory", "--cuda-graph"], "needs a CUDA device (got cpu)")):
        assert main(["bench", "--model", "vit_tiny_patch16_224", *argv]) == 2
        assert error in capsys.readouterr().err


def test_table_columns_hold_long_configurations():
    from tokenpace.bench import BenchResult, format_table

    long = "keep=0.7 stage_starts=(1, 4, 6) project_keys=True"
    rows = [BenchResult("dense", "-", 4.6, 100.0, 10.0, 1.0, [0.01]), BenchResult("idle", long, 2.9, 150.0, 6.7, 1.5,
                                                                                  [0.0067])]
    lines = format_table(rows).splitlines()
    ends = {line.index(mark) + len(mark) for line, mark in zip((lines[0], lines[2], lines[3]), ("GMACs", "4.6", "2.9"))}
    assert len({len(line) for line in (lines[0], lines[2], lines[3])}) == 1 and len(ends) == 1  # aligned
    assert long in lines[3]


def _tiny(**kwargs):
    import timm
    import torch

    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2,
                             num_classes=10, **kwargs)


def test_the_python_benchmarks_give_the_model_back_as_it_came_and_leave_the_global_rng_alone():
    import torch

    import tokenpace
    from tokenpace.bench import benchmark, benchmark_train
    from tokenpace.evaluate import accuracy_table

    model = tokenpace.apply(_tiny().train(), "evo", keep=0.5)
    data = [(torch.randn(2, 3, 32, 32), torch.tensor([1, 2]))]
    state = torch.random.get_rng_state()
    specs = parse_methods("idle,dense,evo")
    rows = benchmark(model, specs, 2, torch.device("cpu"), runs=1, warmup=0)
    assert rows[1].speedup == 1.0 and rows[0].speedup is not None  # dense need not come first
    benchmark_train(model, parse_methods("dense,idle"), 2, "cpu", runs=1, warmup=0)
    accuracy_table(model, specs, data, torch.device("cpu"))
    assert model.training and tokenpace.get_patch(model).config.name == "evo"
    assert torch.equal(torch.random.get_rng_state(), state)
    with pytest.raises(ValueError, match="the loader gave no images"):
        accuracy_table(model, specs, [], torch.device("cpu"))


@pytest.mark.parametrize("kwargs,message", [
    (dict(batch_size=0), "batch_size must be an integer >= 1; got 0"),
    (dict(runs=0), "runs must be an integer >= 1; got 0"),
    (dict(specs=[]), "specs is empty"),
    (dict(amp="fp8"), "amp 'fp8' is not accepted; choose one of none, bf16, fp16"),
])
def test_benchmark_arguments_are_checked(kwargs, message):
    from tokenpace.bench import benchmark

    args = {"specs": parse_methods("dense"), "batch_size": 1, "device": "cpu", "runs": 1, "warmup": 0, **kwargs}
    with pytest.raises(ValueError, match=message):
        benchmark(_tiny(), **args)


def test_a_bfloat16_model_is_benchmarked_and_scored_by_norm_in_float64_too():
    import torch

    import tokenpace
    from tokenpace.bench import benchmark

    rows = benchmark(_tiny().to(torch.bfloat16), parse_methods("dense,idle"), 2, "cpu", runs=1, warmup=0)
    assert [r.method for r in rows] == ["dense", "idle"]
    model = tokenpace.apply(_tiny().double().eval(), "idle", keep=0.5, score="norm")
    assert model(torch.randn(1, 3, 32, 32, dtype=torch.float64)).dtype == torch.float64


def test_an_option_given_twice_in_a_method_item_is_refused():
    with pytest.raises(Exception, match="'idle@0.5:keep=0.7' sets keep twice"):
        parse_methods("idle@0.5:keep=0.7")
