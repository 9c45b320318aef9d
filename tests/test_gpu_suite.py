"""The GPU suite (scripts/gpu_suite.py) in its --smoke mode: every section runs at toy size on the CPU and writes
the files the real run writes, so the one-shot GPU run cannot rot. Plus its fail-soft pieces: deadlines, the
alarm backstop, a failing section, and the on-device augmentation."""
import copy
import io
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
sys.path.insert(0, str(SCRIPTS))

import gpu_suite  # noqa: E402
from gpu_suite_cifar import lr_at  # noqa: E402
from gpu_suite_common import Deadline, DeadlineReached, alarm_at  # noqa: E402
from gpu_suite_data import random_crop_flip, random_erase  # noqa: E402
from gpu_suite_throughput import (DEIT_S, build_model, find_row, full_plan, run_group, run_throughput,  # noqa: E402
                                  smoke_plan)

CIFAR = os.environ.get("TOKENPACE_CIFAR", str(Path(__file__).resolve().parents[2] / "shared" / "data" /
                                              "cifar10_jpeg.npz"))
FILES = {"suite.log", "summary.json", "throughput.json", "cifar.json", "cifar_sweep.png"}


def packed_jpeg_npz(path: Path, n_train: int = 1100, n_test: int = 500) -> str:
    """A stand-in in the packed-JPEG format where the shared CIFAR-10 file is absent: class = dominant colour."""
    rng = np.random.default_rng(0)
    arrays = {"classes": np.array([f"c{i}" for i in range(10)])}
    for split, n in (("train", n_train), ("test", n_test)):
        labels = rng.integers(0, 10, n)
        blobs = []
        for label in labels:
            img = rng.integers(0, 80, (32, 32, 3)) + np.array([label * 17, 255 - label * 17, 120])
            buf = io.BytesIO()
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, format="JPEG")
            blobs.append(np.frombuffer(buf.getvalue(), np.uint8))
        arrays[f"{split}_jpeg"] = np.concatenate(blobs)
        arrays[f"{split}_offsets"] = np.concatenate([[0], np.cumsum([len(b) for b in blobs])]).astype(np.int64)
        arrays[f"{split}_labels"] = labels.astype(np.uint8)
    np.savez(path, **arrays)
    return str(path)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    if os.path.isfile(CIFAR):
        return CIFAR
    return packed_jpeg_npz(tmp_path_factory.mktemp("data") / "cifar.npz")


# pytest-xdist (`--dist loadgroup`): the tests reading the smoke run go to one worker, so it runs once (45 s)
ON_THE_SMOKE_RUNS_WORKER = pytest.mark.xdist_group("gpu_suite_smoke")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, data):
    out = tmp_path_factory.mktemp("suite")
    start = time.perf_counter()
    summary = gpu_suite.main(["--smoke", str(out), "--data", data])
    return out, summary, time.perf_counter() - start


def load(out: Path, name: str) -> dict:
    return json.loads((out / name).read_text())


@ON_THE_SMOKE_RUNS_WORKER
def test_smoke_run_writes_every_file_in_time(smoke):
    out, summary, seconds = smoke
    assert {p.name for p in out.iterdir()} == FILES  # at most 8 files, no leftovers (.tmp)
    assert (out / "cifar_sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert summary["elapsed_s"] <= seconds + 0.05 and seconds < 120  # the clock starts at main(), not at import
    assert {name: s["status"] for name, s in summary["sections"].items()} == dict.fromkeys(gpu_suite.SECTIONS, "ok")
    log = (out / "suite.log").read_text()
    assert "== idle: ok" in log and "== clutter: ok" in log and "CIFAR-10 decoded" in log
    assert load(out, "summary.json") == json.loads(json.dumps(summary))  # the file holds the final summary


@ON_THE_SMOKE_RUNS_WORKER
def test_summary_has_environment_figures_and_targets(smoke):
    _, summary, _ = smoke
    assert summary["mode"] == "smoke" and summary["device"].startswith("cpu")
    assert summary["torch"] == torch.__version__ and summary["timm"]
    targets = summary["targets"]
    assert set(targets) == {"evo_speedup", "idle_speedup", "evo_speedup_compiled", "idle_speedup_compiled",
                            "batch1_not_slower", "batch1_not_slower_cuda_graph", "cifar_dense", "cifar_evo_vs_dense",
                            "cifar_idle_vs_dense", "attention_vs_random", "attention_vs_random_cluttered"}
    assert targets.pop("batch1_not_slower_cuda_graph")["met"] is None  # CUDA graphs: CUDA only, not in the smoke
    for name, t in targets.items():  # every target measured (the compiled ones by the compiled smoke group)
        assert t["value"] is not None and t["met"] == (t["value"] >= t["threshold"]), name
    f = summary["figures"]
    for key in ("cifar_dense_top1", "cifar_evo_top1", "cifar_evo_random_top1", "cifar_idle_top1",
                "cifar_clutter_evo_top1", "cifar_clutter_evo_random_top1"):
        assert 0 <= f[key] <= 100
    assert f["speedup_bf16_eager"]["evo"] > 0 and f["speedup_b1_bf16_eager"]["idle"] > 0
    # replayed from CUDA graphs (eager, and compiled in reduce-overhead mode): CUDA only, named but not measured
    assert set(f["speedup_bf16_cuda_graph"].values()) == set(f["speedup_bf16_compiled_cuda_graph"].values()) == {None}


def test_figures_read_each_batch_256_mode_from_its_own_group():
    plan = full_plan()

    def group(compile, mode, graph, speedup):
        return {"model": plan.target_model, "batch": plan.target_batch, "precision": "bf16", "compile": compile,
                "compile_mode": mode, "cuda_graph": graph, "rows": [{"method": "evo", "speedup": speedup}]}

    doc = {"groups": [group(False, None, False, 1.1), group(False, None, True, 1.2), group(True, "default", False, 1.3),
                      group(True, "reduce-overhead", False, 1.4)]}
    f = gpu_suite.figures(doc, {}, plan)
    assert [f[k]["evo"] for k in ("speedup_bf16_eager", "speedup_bf16_cuda_graph", "speedup_bf16_compiled",
                                  "speedup_bf16_compiled_cuda_graph")] == [1.1, 1.2, 1.3, 1.4]
    assert f["speedup_bf16_compiled_cuda_graph"]["idle"] is None


def test_full_plan_puts_the_batch_256_graph_groups_where_they_cost_least():
    """The eager capture (seconds) right after the targets' groups; the compiled one (three compilations) after every
    eager group, ahead of the other compiled groups."""
    groups = full_plan().groups
    first_compiled = next(i for i, g in enumerate(groups) if g.compile)
    eager_graph = next(i for i, g in enumerate(groups) if g.cuda_graph and g.batch == 256)
    compiled_graph = next(i for i, g in enumerate(groups) if g.compile_mode == "reduce-overhead" and g.batch == 256)
    assert eager_graph == first_compiled + 1
    assert all(not g.compile for g in groups[first_compiled + 1:compiled_graph])
    assert all(g.compile for g in groups[compiled_graph:])


@ON_THE_SMOKE_RUNS_WORKER
def test_throughput_rows(smoke):
    out, _, _ = smoke
    doc = load(out, "throughput.json")
    plan = smoke_plan()
    # every group ran (the compiled one by aot_eager: tracing without inductor's cold-cache code generation fits)
    assert doc["failed"] == [] and doc["not_run"] == []
    assert [g["key"] for g in doc["groups"]] == [g.key for g in plan.groups]
    assert doc["dropped"][0]["why"]
    for group, spec in zip(doc["groups"], plan.groups):
        rows = group["rows"]
        assert [r["method"] for r in rows] == spec.methods.split(",")
        assert rows[0]["speedup"] == 1.0 and all(r["img_per_s"] > 0 for r in rows)
        assert all(r["gmacs"] < rows[0]["gmacs"] for r in rows[1:])
        assert all(r["timed_calls"] == spec.runs == len(r["times_ms"]) for r in rows)
        assert all(r["peak_mib"] is None for r in rows)  # CUDA only
        # the CPU counts dynamo's graphs only; a timed call compiles none (eager: nothing to compile)
        assert all(r["churn"] == {"dynamo_graphs": 0} for r in rows), rows
    compiled = [g for g in doc["groups"] if g["compile"]]
    assert len(compiled) == 1 and compiled[0]["compile_backend"] == "aot_eager"
    assert compiled[0]["mode"] == "compiled (aot_eager)"
    assert [r["method"] for r in compiled[0]["rows"]] == ["dense", "evo", "idle"]
    # each compiled model compiles once, in its warm-up call: its timed calls are no slower than a few times the
    # dense model's (a recompilation costs seconds, the calls milliseconds)
    slowest = max(t for r in compiled[0]["rows"] for t in r["times_ms"])
    assert slowest < 20 * max(compiled[0]["rows"][0]["times_ms"]) + 50, compiled[0]["rows"]


@ON_THE_SMOKE_RUNS_WORKER
def test_host_probe_warms_the_machine_then_profiles_each_method(smoke):
    """Before the first group: the warm-up's calls, then one profiled forward per method on the first group's model.
    The CPU has no kernels to sum; its aten calls show the reduced forwards' extra host work."""
    out, _, _ = smoke
    probe = load(out, "throughput.json")["host_probe"]
    plan = smoke_plan()
    assert probe["model"] == plan.groups[0].model.label and probe["batch"] == plan.groups[0].batch
    assert probe["warmup"]["calls"] >= 2 and probe["warmup"]["last_median_ms"] > 0
    rows = {m["method"]: m for m in probe["methods"]}
    assert list(rows) == plan.probe.methods.split(",")
    assert all(m["wall_ms"] > 0 and m["kernel_ms"] is None and m["kernels"] is None for m in rows.values())
    assert all(rows[m]["aten_calls"] > rows["dense"]["aten_calls"] for m in ("evo", "idle", "evit", "topk"))


def test_host_probe_moves_the_model_to_the_device_before_its_first_forward():
    """The probe runs before any benchmark (which would move the model): it moves the model itself."""
    from gpu_suite_host import HostProbe, run_probe

    model = build_model(smoke_plan().groups[0].model)
    moved = []
    original = model.to

    def to(*args, **kwargs):
        moved.append(args)
        return original(*args, **kwargs)

    model.to = to
    doc = run_probe(HostProbe(warmup_s=0.0, methods="dense,idle", calls=1), model, 2, "none", torch.device("cpu"))
    assert moved and moved[0] == (torch.device("cpu"),)
    assert [m["method"] for m in doc["methods"]] == ["dense", "idle"] and doc["warmup"]["calls"] >= 2
    import tokenpace

    assert tokenpace.get_patch(model) is None  # left dense, as the groups expect


def test_host_probe_sums_only_device_kernels():
    """The kernel sum reads the profile's CUDA events alone, per key: host events (aten calls) are not kernels."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    from gpu_suite_host import _kernels

    def event(device, us, count, key):
        return SimpleNamespace(device_type=device, self_device_time_total=us, count=count, key=key)

    prof = SimpleNamespace(key_averages=lambda: [
        event(DeviceType.CPU, 900.0, 40, "aten::linear"), event(DeviceType.CUDA, 1500.0, 3, "nvjet_sm90_tst_bias_TNN"),
        event(DeviceType.CUDA, 500.0, 2, "void implicit_convolve_sgemm<bf16>"),
        event(DeviceType.CUDA, 0.0, 1, "vectorized_layer_norm_kernel")])
    # a kernel of no measured time counts, with its 0 (no fallback attribute); the conv's sgemm is the stem's
    assert _kernels(prof) == (2.0, 6, {"gemm": 1.5, "conv": 0.5, "norm": 0.0})
    cpu_only = SimpleNamespace(key_averages=lambda: [event(DeviceType.CPU, 900.0, 40, "aten::linear")])
    assert _kernels(cpu_only) == (None, None, None)


@ON_THE_SMOKE_RUNS_WORKER
def test_cifar_results(smoke):
    out, _, _ = smoke
    doc = load(out, "cifar.json")
    keeps = doc["config"]["sweep_keeps"]
    assert doc["evo"]["train"]["steps"] == doc["dense"]["train"]["steps"] > 0  # Evo trains the dense step count
    assert doc["idle"]["train"]["steps"] > 0
    assert set(doc["dense"]["sweeps"]) == {"evo", "idle", "evit", "topk"}
    assert set(doc["evo"]["sweeps"]) == {"evo"} and set(doc["idle"]["sweeps"]) == {"idle"}
    assert doc["evo"]["config"] == {"method": "evo", "keep": 0.5, "mode": "stage"}
    for name in ("dense", "evo", "idle", "clutter"):
        res = doc[name]
        assert res["test_images"] == 500 and 0 <= res["top1"] <= 100
        for sweep in res["sweeps"].values():
            assert sweep["keeps"] == keeps and len(sweep["attention"]) == len(sweep["random"]) == len(keeps)
            # keep 1 runs every token: both rankings give the model's own dense accuracy (one image of slack)
            assert abs(sweep["attention"][-1] - res["dense_form_top1"]) <= 0.2
            assert abs(sweep["random"][-1] - res["dense_form_top1"]) <= 0.2
    for name in ("evo", "idle", "clutter"):
        assert 0 <= doc[name]["random_top1"] <= 100 and doc[name]["macs"] > 0
    for name in ("dense", "evo", "idle", "clutter"):  # CUDA graphs of the steps on the GPU; eager here, and said
        assert doc[name]["train"]["step_mode"] == "eager: not on CUDA" and doc[name]["train"]["captures"] == 0
    assert doc["graph_preflight"] == {"ok": False, "error": "not run: not on CUDA (training steps run eagerly there)"}
    # the cluttered Evo model: trained on its time budget (no step count to match), tested on 500 cluttered images
    clutter = doc["clutter"]
    assert clutter["test_images"] == 500 and set(clutter["sweeps"]) == {"evo"} and clutter["train"]["steps"] > 0
    assert clutter["config"] == {"method": "evo", "keep": 0.5, "mode": "stage"}
    cfg = doc["config"]
    assert clutter["setup"] == {"canvas": cfg["clutter_canvas"], "img_size": cfg["clutter_canvas"],
                                "patch_size": cfg["clutter_patch_size"], "batch_size": doc["batch_pick"]["batch_size"],
                                "lr": doc["batch_pick"]["lr"]}  # at the batch the dense section picked
    # as many tokens (8x8 patches of 64 px, 4x4 of 32 px): only the patch embedding's larger patches cost more
    cfg = doc["config"]
    patches = (cfg["img_size"] // cfg["patch_size"]) ** 2
    extra = patches * 3 * (cfg["clutter_patch_size"] ** 2 - cfg["patch_size"] ** 2) * cfg["embed_dim"]
    assert clutter["macs"] - doc["evo"]["macs"] == extra
    # the dense section timed each batch choice and trains (with Evo and Idle) at the one it picked, its learning
    # rates scaled by sqrt(batch / the configured batch)
    pick, cfg = doc["batch_pick"], doc["config"]
    assert set(pick["images_per_s"]) == set(pick["step_modes"]) == {str(b) for b in cfg["batch_choices"]}
    assert pick["batch_size"] in cfg["batch_choices"]
    scale = (pick["batch_size"] / cfg["batch_size"]) ** 0.5
    assert pick["lr"] == pytest.approx(cfg["lr"] * scale) and pick["idle_lr"] == pytest.approx(cfg["idle_lr"] * scale)
    steps_per_epoch = 1024 // pick["batch_size"]  # the smoke trains one epoch of its 1024 images
    assert doc["dense"]["train"]["steps"] == steps_per_epoch


def test_full_plan_times_batch_1_from_cuda_graphs_among_the_targets():
    """The batch-1 target is read eager and from CUDA graphs (capture costs seconds: it runs before the compiled
    target group); every group's key is its own, and find_row tells the groups of one setting apart by mode."""
    plan = full_plan()
    keys = [g.key for g in plan.groups]
    assert len(set(keys)) == len(keys)
    graphed = [i for i, g in enumerate(plan.groups) if g.cuda_graph]
    first_compiled = next(i for i, g in enumerate(plan.groups) if g.compile)
    assert plan.groups[graphed[0]].batch == 1 and graphed[0] < first_compiled
    assert all(not g.compile for g in plan.groups if g.cuda_graph) and all(g.warmup >= 2 for g in plan.groups
                                                                         if g.cuda_graph or g.compile_mode != "default")
    assert "b1 bf16 eager+cuda-graph" in keys[graphed[0]]
    assert any(g.compile_mode == "reduce-overhead" and g.batch == 1 for g in plan.groups)

    def group(compile, mode, graph, speedup):
        return {"model": "m", "batch": 1, "precision": "bf16", "compile": compile, "compile_mode": mode,
                "cuda_graph": graph, "rows": [{"method": "evo", "speedup": speedup}]}

    doc = {"groups": [group(False, None, False, 0.8), group(False, None, True, 1.1), group(True, "default", False, 1.2),
                      group(True, "reduce-overhead", False, 1.3)]}
    assert find_row(doc, "m", 1, "bf16", False, "evo")["speedup"] == 0.8
    assert find_row(doc, "m", 1, "bf16", False, "evo", cuda_graph=True)["speedup"] == 1.1
    assert find_row(doc, "m", 1, "bf16", True, "evo")["speedup"] == 1.2
    assert find_row(doc, "m", 1, "bf16", True, "evo", compile_mode="reduce-overhead")["speedup"] == 1.3
    old = {"groups": [{k: v for k, v in group(True, None, False, 1.4).items() if k not in ("compile_mode",
                                                                                         "cuda_graph")}]}
    assert find_row(old, "m", 1, "bf16", True, "evo")["speedup"] == 1.4  # a file from before the modes


def test_tables_name_each_run_mode():
    import gpu_tables

    from gpu_suite_throughput import BenchGroup

    def group(compile=False, compile_mode="default", cuda_graph=False, **kw):
        """A group record as run_group writes it."""
        mode = BenchGroup(DEIT_S, 1, "bf16", compile, compile_mode=compile_mode, cuda_graph=cuda_graph).run_mode
        return {"compile": compile, "mode": mode.describe(), **kw}

    assert gpu_tables._mode(group()) == "eager" and gpu_tables._mode(group(cuda_graph=True)) == "eager+cuda-graph"
    assert gpu_tables._mode({"compile": True}) == "compiled"  # a file from before the modes
    assert gpu_tables._mode({"compile": False}) == "eager"
    assert gpu_tables._mode(group(compile=True, compile_mode="reduce-overhead", cudagraph_skips=0)) == (
        "compiled (reduce-overhead)")
    assert gpu_tables._mode(group(compile=True, compile_mode="reduce-overhead", cudagraph_skips=2)) == (
        "compiled (reduce-overhead), 2 graph(s) run without CUDA graphs")


def test_failing_section_is_recorded_and_the_others_still_run(tmp_path, data):
    summary = gpu_suite.main(["--smoke", str(tmp_path), "--data", data, "--sections", "idle,throughput"])
    assert summary["sections"]["idle"]["status"].startswith("failed: RuntimeError: Idle fine-tunes the dense")
    assert summary["sections"]["throughput"]["status"] == "ok"
    assert load(tmp_path, "throughput.json")["groups"] and "idle failed" in (tmp_path / "suite.log").read_text()


def test_throughput_past_its_deadline_lists_every_group_as_not_run():
    plan = smoke_plan()
    saved = []
    doc = run_throughput(plan, torch.device("cpu"), Deadline.after(-1), 0.0, lambda msg: None,
                         lambda doc: saved.append(copy.deepcopy(doc)))
    assert doc["groups"] == [] and [g["key"] for g in doc["not_run"]] == [g.key for g in plan.groups]
    assert all(g["why"] == "deadline passed" for g in doc["not_run"])
    assert saved and saved[-1]["not_run"] == doc["not_run"]  # the written file says so too


def test_call_watch_sums_each_methods_churn_over_its_timed_calls_only(monkeypatch):
    import gpu_suite_throughput as throughput

    totals = iter([{"dynamo_graphs": g, "device_allocs": a} for g, a in
                   [(0, 0), (1, 5), (2, 9), (2, 9), (2, 12), (3, 12)]])  # at start, then after each call
    monkeypatch.setattr(throughput, "churn_counts", lambda device: next(totals))
    watch = throughput.CallWatch(torch.device("cpu"), Deadline.after(60))
    for message in ("[warm-up 1/1] dense 5.0 ms", "[warm-up 1/1] evo 4.0 ms", "[run 1/2] dense 5.0 ms",
                    "[run 1/2] evo 4.0 ms", "[run 2/2] evo 4.0 ms"):
        watch(message)
    # the warm-up calls (which compile) are not counted; each timed call gets what changed since the previous hook
    assert watch.churn == {"dense": {"dynamo_graphs": 0, "device_allocs": 0},
                           "evo": {"dynamo_graphs": 1, "device_allocs": 3}}
    assert watch.timed_calls == {"dense": 1, "evo": 2}


def test_churn_counts_read_dynamos_graphs_and_the_cuda_allocator(monkeypatch):
    import gpu_suite_throughput as throughput

    before = throughput.churn_counts(torch.device("cpu"))
    assert set(before) == {"dynamo_graphs"}
    torch._dynamo.reset()
    torch.compile(lambda t: t * 2 + 1, backend="eager")(torch.ones(3))
    assert throughput.churn_counts(torch.device("cpu"))["dynamo_graphs"] == before["dynamo_graphs"] + 1
    # on CUDA (faked: the allocator's statistics), and a statistic this torch's allocator does not keep
    monkeypatch.setattr(torch.cuda, "memory_stats", lambda device: {"num_device_alloc": 7, "num_alloc_retries": 1})
    assert throughput.churn_counts(torch.device("cuda"))["device_allocs"] == 7
    monkeypatch.setattr(torch.cuda, "memory_stats", lambda device: {"num_device_alloc": 9})
    counts = throughput.churn_counts(torch.device("cuda"))
    assert counts["device_allocs"] == 9 and counts["alloc_retries"] is None
    # a count that is not kept stays unknown in the watch's sums, not zero
    monkeypatch.setattr(throughput, "churn_counts", lambda device: dict(counts))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: 0)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 0)
    watch = throughput.CallWatch(torch.device("cuda"), Deadline.after(60))
    watch("[run 1/1] dense 5.0 ms")
    assert watch.churn == {"dense": {"dynamo_graphs": 0, "device_allocs": 0, "alloc_retries": None}}


def test_a_group_is_cut_between_calls_at_its_deadline():
    group = smoke_plan().groups[0]
    with pytest.raises(DeadlineReached, match="after \\[warm-up 1/1\\] dense"):
        run_group(group, build_model(group.model), torch.device("cpu"), Deadline.after(-1))


def test_cifar_sections_with_the_full_runs_settings(data):
    """The smoke run trains in fp32 and fine-tunes Idle by distillation; the GPU run uses bf16 autocast and plain
    cross-entropy. Those settings, a few steps each on the CPU: dense, Evo from scratch, Idle fine-tuned, evaluated."""
    import dataclasses

    from gpu_suite_cifar import evaluate_model, finetune_idle, train_dense, train_evo
    from gpu_suite_data import decode_cifar, to_device

    cfg = dataclasses.replace(gpu_suite.smoke_cifar(data), amp="bf16", idle_objective="ce", train_limit=128,
                              test_limit=100, batch_size=32, eval_batch=50, eval_reserve_s=0.0,
                              sweep_keeps=(0.5, 1.0))
    cpu = torch.device("cpu")
    train, test = (to_device(split, cpu) for split in decode_cifar(data, cfg.train_limit, cfg.test_limit))
    dense, report = train_dense(train, cfg, cpu, Deadline.after(30), lambda msg: None)
    assert report.steps == 4 and report.stopped_by == "steps"  # one epoch of 128 images in batches of 32
    evo, _ = train_evo(train, cfg, cpu, Deadline.after(30), lambda msg: None, max_steps=2)
    idle, _ = finetune_idle(dense, train, cfg, cpu, Deadline.after(30), lambda msg: None)
    for model, own in ((evo, ("evo", {"keep": 0.5, "mode": "stage"})), (idle, ("idle", {"keep": 0.7}))):
        result = evaluate_model(model, own, (own[0],), test, cfg, cpu)
        assert 0 <= result["top1"] <= 100 and 0 <= result["random_top1"] <= 100 and result["test_images"] == 100
    assert all(torch.isfinite(p).all() for p in idle.parameters())


def test_a_deadline_inside_torch_compile_counts_as_a_cut(monkeypatch):
    """The alarm fires inside a compilation, where dynamo re-raises what its backend raised as the cause of its own
    error: the group is listed as cut, not as failed; a real error is still a failure."""
    import gpu_suite_throughput as throughput

    class BackendCompilerFailed(RuntimeError):  # dynamo's wrapper keeps the original as inner_exception and cause
        def __init__(self, inner):
            super().__init__(f"backend='inductor' raised: {inner}")
            self.inner_exception = inner

    errors = iter([DeadlineReached("hard limit: 20 s past the section's deadline"), ValueError("out of memory")])

    def run_group(group, model, device, cut_at):
        inner = next(errors)
        raise BackendCompilerFailed(inner) from inner

    monkeypatch.setattr(throughput, "run_group", run_group)
    monkeypatch.setattr(throughput, "build_model", lambda spec: None)
    plan = smoke_plan()
    plan = type(plan)(plan.groups[:2], (), 0.0, plan.target_model, plan.target_batch)
    doc = run_throughput(plan, torch.device("cpu"), Deadline.after(60), 0.0, lambda msg: None, lambda doc: None)
    assert doc["not_run"] == [{"key": plan.groups[0].key, "why": "cut: hard limit: 20 s past the section's deadline"}]
    assert [f["key"] for f in doc["failed"]] == [plan.groups[1].key]
    assert "out of memory" in doc["failed"][0]["error"]


def test_alarm_interrupts_code_that_does_not_check_the_deadline():
    start = time.perf_counter()
    with pytest.raises(DeadlineReached, match="hard limit"):
        with alarm_at(Deadline.after(0.05), grace_s=0.05):
            time.sleep(5)
    assert time.perf_counter() - start < 2


def test_a_sections_alarm_never_fires_past_the_runs_hard_end(tmp_path, data):
    """grace 30 s after a 1.5 s deadline, but the run's hard end 2 s after its start: the alarm fires by then."""
    cfg = gpu_suite.parse_args(["--smoke", str(tmp_path), "--data", data, "--grace-s", "30", "--hard-s", "2"])
    suite = gpu_suite.Suite(cfg, time.perf_counter())
    start = time.perf_counter()
    suite.run_section("data", 1.5, lambda deadline: time.sleep(20))
    assert time.perf_counter() - start < 5
    assert suite.summary["sections"]["data"]["status"].startswith("failed: DeadlineReached: hard limit")


def test_crop_flip_keeps_image_content_and_erasing_draws_boxes():
    torch.manual_seed(0)
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    same = random_crop_flip(x, pad=0)  # no padding: each image is itself or its mirror
    for a, b in zip(same, x):
        assert torch.equal(a, b) or torch.equal(a, b.flip(2))
    shifted = random_crop_flip(x, pad=2)
    assert shifted.shape == x.shape and not torch.equal(shifted, x)
    assert torch.equal(random_erase(x, prob=0.0), x)
    erased = random_erase(x, prob=1.0)
    changed = (erased != x).any(1)  # (B, H, W): the erased box of each image, all channels
    assert all(0 < c.sum() <= 0.25 * 64 * 1.5 for c in changed)


def test_paste_on_noise_places_each_image_whole_on_its_canvas():
    from gpu_suite_data import DeviceSplit, cluttered, normalize, paste_on_noise

    images = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8)
    canvas = paste_on_noise(images, 20, torch.Generator().manual_seed(0))
    assert canvas.shape == (6, 3, 20, 20) and canvas.dtype == torch.uint8
    places = set()
    for image, out in zip(images, canvas):  # exactly one place shows the image, untouched
        found = [(top, left) for top in range(13) for left in range(13)
                 if torch.equal(out[:, top:top + 8, left:left + 8], image)]
        assert len(found) == 1
        places.add(found[0])
    assert len(places) > 1  # places differ between images
    split = DeviceSplit(images, torch.arange(6))
    fixed = cluttered(split, 20, seed=3)
    assert torch.equal(fixed.images, cluttered(split, 20, seed=3).images) and torch.equal(fixed.labels, split.labels)
    with pytest.raises(ValueError, match="canvas 6 is smaller than the 8x8 images"):
        paste_on_noise(images, 6)
    # augmented (normalised) images: placed whole on noise normalised the same way, in the usual memory layout
    floats = normalize(images)
    out = paste_on_noise(floats, 20, torch.Generator().manual_seed(0))
    assert out.dtype == floats.dtype and out.is_contiguous()
    assert torch.equal(out, normalize(canvas))  # the same draws: the uint8 canvas, normalised


def test_batch_pick_takes_a_larger_batch_only_where_it_buys_images_per_second():
    from gpu_suite_cifar import choose_batch

    assert choose_batch({512: 14000.0, 1024: 27000.0, 2048: 50000.0}) == 2048  # host-bound: time per step flat
    assert choose_batch({512: 21000.0, 1024: 24000.0, 2048: 25000.0}) == 512  # GPU-bound: more steps win
    assert choose_batch({512: 14000.0, 1024: 24000.0, 2048: 26000.0}) == 1024


def test_batch_pick_times_the_batches_the_data_fills_and_scales_the_learning_rates():
    from dataclasses import replace

    from gpu_suite_cifar import CifarConfig, pick_batch
    from gpu_suite_data import DeviceSplit

    cfg = CifarConfig(data="-", embed_dim=24, depth=2, num_heads=2, batch_size=16, batch_choices=(16, 32, 512),
                      amp="none")
    data = DeviceSplit(torch.randint(0, 256, (100, 3, 32, 32), dtype=torch.uint8), torch.randint(0, 10, (100,)))
    state = torch.random.get_rng_state()
    picked, record = pick_batch(data, cfg, torch.device("cpu"), lambda msg: None, steps=1)
    assert torch.equal(torch.random.get_rng_state(), state)  # the dense run draws as if nothing had been timed
    assert set(record["images_per_s"]) == {"16", "32"}  # 512 is more than the 100 images
    assert picked.batch_size == record["batch_size"] in (16, 32) and record["seconds"] >= 0
    assert picked.lr == pytest.approx(cfg.lr * (picked.batch_size / 16) ** 0.5)
    # one choice: nothing timed, the learning rates still follow the batch
    one, record = pick_batch(data, replace(cfg, batch_choices=(64,)), torch.device("cpu"), lambda msg: None)
    assert record["images_per_s"] == {} and one.batch_size == 64
    assert one.lr == pytest.approx(cfg.lr * 2) and one.idle_lr == pytest.approx(cfg.idle_lr * 2)


def test_time_schedule_warms_up_then_anneals():
    assert lr_at(0.0, 1e-3, 1e-5, 0.1) == pytest.approx(1e-6)
    assert lr_at(0.1, 1e-3, 1e-5, 0.1) == pytest.approx(1e-3)
    assert lr_at(0.55, 1e-3, 1e-5, 0.1) == pytest.approx((1e-3 + 1e-5) / 2)
    assert lr_at(1.0, 1e-3, 1e-5, 0.1) == pytest.approx(1e-5)


def probe_wheel(folder: Path) -> Path:
    """A minimal pure-Python wheel, standing in for the carried timm wheel."""
    import zipfile

    folder.mkdir()
    path = folder / "tokenpace_probe-1.0-py3-none-any.whl"
    info = "tokenpace_probe-1.0.dist-info"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("tokenpace_probe/__init__.py", "VERSION = '1.0'\n")
        z.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: tokenpace-probe\nVersion: 1.0\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")
    return folder


def test_device_script_installs_carried_wheels_and_runs_the_suite(tmp_path, data):
    """scripts/gpu_device_run.sh, the one command of a GPU loan, end to end on the CPU (data section only): the
    carried wheels are installed into a site folder put on the path, every import is checked first."""
    import subprocess

    env = {**os.environ, "OUT": str(tmp_path / "out"), "TOKENPACE_SITE": str(tmp_path / "site"),
           "TOKENPACE_WHEELS": str(probe_wheel(tmp_path / "wheels")), "PYTHON": sys.executable}
    os.makedirs(env["OUT"])
    done = subprocess.run(["bash", str(SCRIPTS / "gpu_device_run.sh"), "--smoke", "--sections", "data", "--data",
                           data], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "site" / "tokenpace_probe" / "__init__.py").is_file()  # the wheel went into the site folder
    assert f"torch {torch.__version__} timm " in done.stdout
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert list(summary["sections"]) == ["data"] and summary["sections"]["data"]["status"] == "ok"
    assert summary["mode"] == "smoke" and (tmp_path / "out" / "suite.log").is_file()


@ON_THE_SMOKE_RUNS_WORKER
def test_tables_render_every_figure_of_the_run(smoke, tmp_path):
    import gpu_tables

    out, summary, _ = smoke
    text = gpu_tables.render(out)
    for name, t in summary["targets"].items():
        verdict = {True: "met", False: "**missed**", None: "not measured"}[t["met"]]
        assert f"| {name} | {t['what']} |" in text and text.split(f"| {name} |")[1].split("\n")[0].endswith(
            f"| {verdict} |")
    for g in load(out, "throughput.json")["groups"]:
        rows = {r["method"]: r for r in g["rows"]}
        dense = rows.pop("dense")
        cells = [f"{dense['img_per_s']:.0f}"] + [  # a method the group did not run (SAM 2: Idle only) shows "-"
            f"{rows[m]['speedup']:.2f}x / {dense['gmacs'] / rows[m]['gmacs']:.2f}x" if m in rows else "-"
            for m in ("evo", "idle", "evit", "topk")]
        mode = "compiled (aot_eager)" if g["compile"] else "eager"  # the smoke runs no CUDA graphs
        assert f"({g['model']}) | {g['batch']} | {g['precision']} | {mode} | " + " | ".join(cells) in text
    cifar = load(out, "cifar.json")
    assert f"| dense, from scratch | {cifar['dense']['top1']:.2f} |" in text
    assert f"| evo(0.5), from scratch | {cifar['evo']['top1']:.2f} | {cifar['evo']['random_top1']:.2f} |" in text
    assert text.split("| dense, from scratch |")[1].split("\n")[0].endswith("| eager: not on CUDA |")  # steps run
    assert "CUDA graph preflight: not run: not on CUDA (training steps run eagerly there)." in text
    assert "Peak memory" not in text  # the CPU measures no CUDA peak
    probe = load(out, "throughput.json")["host_probe"]
    idle = next(m for m in probe["methods"] if m["method"] == "idle")
    assert f"One forward of `{probe['model']}` at batch {probe['batch']}" in text
    assert f"| idle | {idle['config']} | {idle['wall_ms']:.2f} | - | - | {idle['aten_calls']} |" in text
    dropped = load(out, "throughput.json")["dropped"][0]
    assert f"- throughput group {dropped['key']}: dropped by the plan ({dropped['why']})" in text
    assert "failed" not in text.split("Not run or failed:")[1]
    rows = sum(len(g["rows"]) for g in load(out, "throughput.json")["groups"])
    assert f"No timed call compiled a graph ({rows} method rows)." in text  # the CPU counts no allocations

    # a failed section and a group that did not fit are listed, not dropped
    for name in ("summary.json", "throughput.json", "cifar.json"):
        (tmp_path / name).write_text((out / name).read_text())
    broken = load(tmp_path, "summary.json")
    broken["sections"]["idle"]["status"] = "failed: RuntimeError: boom"
    (tmp_path / "summary.json").write_text(json.dumps(broken))
    doc = load(tmp_path, "throughput.json")
    doc["not_run"].append({"key": "vit_b@1024 b64 fp32 eager [dense,evo]", "why": "needs 40 s, 12 s left"})
    assert "kernel ms by kind" not in text  # the CPU has no kernels to sort
    doc["host_probe"]["methods"][0]["kernel_ms_by_kind"] = {"gemm": 3.58, "conv": 0.97, "norm": 2.56}  # as on CUDA
    busy = doc["groups"][0]["rows"][1]
    busy["churn"] = {"dynamo_graphs": 1, "device_allocs": 12, "alloc_retries": 0}  # as a drifting CUDA group's
    (tmp_path / "throughput.json").write_text(json.dumps(doc))
    text = gpu_tables.render(tmp_path)
    method = doc["host_probe"]["methods"][0]["method"]
    assert f"| {method} | 3.58 | - | 0.97 | 2.56 | - | - | - | - | - |" in text.split("kernel ms by kind")[1]
    assert "- section idle: failed: RuntimeError: boom" in text
    g = doc["groups"][0]
    assert (f"({g['model']}) | {g['batch']} | {g['precision']} | eager | {busy['method']} | {busy['timed_calls']} "
            "| 0 | 12 | 1 |") in text.split("compiled a graph (dynamo)")[1]
    assert "No timed call compiled" not in text
    assert "- throughput group vit_b@1024 b64 fp32 eager [dense,evo]: not run (needs 40 s, 12 s left)" in text


@pytest.mark.parametrize("case", ["ok", "refused", "throughput graph failed"])
def test_the_cuda_graph_trial_decides_how_the_cifar_sections_train(tmp_path, data, case):
    """The suite reads its trial's result once, before timing anything, and trains from CUDA graphs only where
    the trial captured every kind of step and no CUDA graph of the throughput section failed in the process."""
    from gpu_suite_preflight import Launched

    ok = case != "refused"
    result = {"ok": ok, "variants": {"dense": "ok" if ok else "RuntimeError: refused"}, "seconds": 1.0}
    child = Launched([sys.executable, "-c", f"print({json.dumps(json.dumps(result))})"])
    cfg = gpu_suite.parse_args(["--smoke", str(tmp_path), "--data", data])
    suite = gpu_suite.Suite(cfg, time.perf_counter(), preflight=child)
    suite.wait_for_preflight()  # before the throughput section
    assert suite.preflight is None and suite.preflight_result["variants"] == result["variants"]
    if case == "throughput graph failed":
        suite.throughput = {"failed": [{"key": "deit_s b1 bf16 compiled reduce-overhead [dense,evo,idle]",
                                        "error": "RuntimeError: boom", "replays_graphs": True},
                                       {"key": "deit_s b256 bf16 compiled [dense]", "error": "RuntimeError: x",
                                        "replays_graphs": False}]}
    assert suite.cifar_cfg.cuda_graphs is True  # until the first CIFAR section decides
    suite.resolve_graphs()
    suite.resolve_graphs()  # once
    graphs = case == "ok"
    assert suite.cifar["graph_preflight"]["ok"] is graphs and suite.cifar_cfg.cuda_graphs is graphs
    assert suite.cifar["config"]["cuda_graphs"] is graphs  # cifar.json says what ran
    log = (tmp_path / "suite.log").read_text()
    assert log.count("CUDA graph preflight:") == 1 and log.count("training steps:") == 1
    if case == "throughput graph failed":
        assert suite.cifar["graph_preflight"]["error"] == ("a throughput CUDA graph failed in this process: "
                                                          "deit_s b1 bf16 compiled reduce-overhead [dense,evo,idle]")
    assert ("training steps: replayed from CUDA graphs" in log) is graphs


def test_only_a_full_run_with_a_cifar_section_starts_the_trial():
    assert gpu_suite.wants_preflight(["out"])
    assert gpu_suite.wants_preflight(["out", "--sections", "data,dense"])
    assert gpu_suite.wants_preflight(["out", "--sections=clutter"])
    assert not gpu_suite.wants_preflight(["out", "--sections", "data,throughput"])
    assert not gpu_suite.wants_preflight(["--smoke", "out"])
    assert not gpu_suite.wants_preflight(["--help"])


def test_table_cells_keep_their_pipes_escaped():
    """A reason or an error in a cell (a step mode's "eager: ...") cannot split the Markdown row."""
    import gpu_tables

    assert gpu_tables._table(["mode"], [["eager: a | b"]]) == ["| mode |", "|---|", "| eager: a \\| b |"]


def test_cifar_option_replaces_recipe_fields_and_refuses_the_rest(tmp_path, data, capsys):
    cfg = gpu_suite.parse_args(["--smoke", str(tmp_path), "--data", data,
                                "--cifar", "depth=2,drop_path=0,batch_choices=64,idle_objective=ce"]).cifar
    base = gpu_suite.smoke_cifar(data)
    assert (cfg.depth, cfg.drop_path, cfg.batch_choices, cfg.idle_objective) == (2, 0.0, (64,), "ce")
    assert isinstance(cfg.drop_path, float) and cfg.embed_dim == base.embed_dim and cfg.data == data
    assert gpu_suite.parse_args(["--smoke", str(tmp_path), "--data", data]).cifar == base  # none given: as it was
    for given, why in (("depht=6", "--cifar depht: not a recipe field; accepted: amp, batch_choices"),
                       ("depth=0.5", "--cifar depth=0.5: expected a value like its default 4"),
                       ("drop_path=true", "--cifar drop_path=True: expected a value like its default 0.1"),
                       ("data=x.npz", "--cifar data: set by the suite, not by --cifar; accepted: amp"),
                       ("img_size=64", "--cifar img_size: set by the suite"),  # the images are 32 px
                       ("sweep_keeps=1", "--cifar sweep_keeps: set by the suite"),
                       ("embed_dim=50", "--cifar: embed_dim 50 is not a multiple of num_heads 3"),
                       ("num_heads=0", "--cifar: num_heads must be at least 1; got 0"),
                       ("patch_size=0", "--cifar: patch_size must be at least 1; got 0"),
                       ("eval_batch=0", "--cifar: eval_batch must be at least 1; got 0"),
                       ("depth=1", "--cifar: depth must be at least 2"),
                       ("evo_keep=1.5", "--cifar: evo_keep 1.5 is out of range; accepted: (0, 1)"),
                       ("lr=nan", "--cifar: lr nan is out of range; accepted: above 0"),
                       ("drop_path=-1", "--cifar: drop_path -1.0 is out of range; accepted: in [0, 1)"),
                       ("crop_pad=-2", "--cifar: crop_pad must be 0 or more; got -2"),
                       ("idle_objective=mse", "idle_objective 'mse' is not accepted; choose ce or distill"),
                       ("depth", "--cifar entry 'depth' must be key=value")):
        with pytest.raises(SystemExit):
            gpu_suite.parse_args(["--smoke", str(tmp_path), "--data", data, "--cifar", given])
        assert why in capsys.readouterr().err, given
    # the run records the recipe it trained
    suite = gpu_suite.Suite(gpu_suite.parse_args(["--smoke", str(tmp_path), "--data", data, "--cifar", "depth=2"]),
                            time.perf_counter())
    assert suite.cifar["config"]["depth"] == 2 and suite.cifar_cfg.depth == 2
