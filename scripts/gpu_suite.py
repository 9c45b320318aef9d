#!/usr/bin/env python3
"""Every GPU figure tokenpace needs, in one run of at most 7 minutes on one H100/H200 (issue 14).

    python scripts/gpu_suite.py OUTDIR            # the real run (CUDA); budgets in seconds: --throughput-s etc.
    python scripts/gpu_suite.py --smoke OUTDIR    # the same code paths on the CPU at toy sizes (< 2 minutes)

Sections, each with its own deadline, run in order: data (decode CIFAR-10), throughput (DeiT-S, DeiT-B, ViT-B at
1024 px; dense and every method; fp32/bf16; eager/compiled), dense CIFAR-10 ViT from scratch, Evo(0.5) from
scratch, Idle(0.7) fine-tuned, Evo(0.5) from scratch on cluttered 64 px CIFAR-10 (its attention-vs-random control).
A failing section is logged and the others still run. Files in OUTDIR, each rewritten as results arrive:
suite.log, summary.json (environment, sections, headline figures, targets met/missed), throughput.json,
cifar.json, cifar_sweep.png. The data: --data, default data/cifar10_jpeg.npz (ignored by git: copy
../shared/data/cifar10_jpeg.npz there and carry it to the GPU machine) or else ../shared/data/cifar10_jpeg.npz.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

PROCESS_START = time.perf_counter()  # imports count against the run's total budget
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(HERE), str(ROOT / "src")]  # the sibling modules, and this checkout's tokenpace

import gpu_suite_preflight  # noqa: E402  (no torch: it can start its trial before this process imports torch)

SECTIONS = ("data", "throughput", "dense", "evo", "idle", "clutter")
CIFAR_SECTIONS = ("dense", "evo", "idle", "clutter")


def wants_preflight(argv: list[str]) -> bool:
    """A full (CUDA) run with a CIFAR section: the sections from ``--sections X`` or ``--sections=X``, all without."""
    if "--smoke" in argv or "-h" in argv or "--help" in argv:
        return False
    sections = SECTIONS
    for i, arg in enumerate(argv):
        if arg == "--sections" and i + 1 < len(argv):
            sections = argv[i + 1].split(",")
        elif arg.startswith("--sections="):
            sections = arg.split("=", 1)[1].split(",")
    return any(s.strip() in CIFAR_SECTIONS for s in sections)


# the CUDA graph trial, started beside this process's imports when run as a script
EARLY_PREFLIGHT = (gpu_suite_preflight.start("cuda") if __name__ == "__main__" and wants_preflight(sys.argv[1:])
                   else None)

import torch  # noqa: E402

from gpu_suite_cifar import (SWEEP_METHODS, CifarConfig, evaluate_model, finetune_idle, override,  # noqa: E402
                             pick_batch, plot_sweeps, train_dense, train_evo)
from gpu_suite_common import Deadline, Log, alarm_at, write_json  # noqa: E402
from gpu_suite_data import cluttered, decode_cifar, to_device  # noqa: E402
from gpu_suite_throughput import ThroughputPlan, find_row, full_plan, run_throughput, smoke_plan  # noqa: E402
from tokenpace.cli.source import parse_model_args  # noqa: E402  (key=value lists as --model-args reads them)
from tokenpace.errors import TokenpaceError  # noqa: E402
from tokenpace.runtime import cudnn_autotuned  # noqa: E402

LOG, SUMMARY, THROUGHPUT, CIFAR, PLOT = "suite.log", "summary.json", "throughput.json", "cifar.json", "cifar_sweep.png"
PREFLIGHT_S = 30.0  # the CUDA graph trial's time from its start (~10 s: imports, CUDA, six captures)
DATA_CANDIDATES = (ROOT / "data" / "cifar10_jpeg.npz", ROOT.parent / "shared" / "data" / "cifar10_jpeg.npz")


@dataclass(frozen=True)
class Budgets:
    """Seconds per section (its evaluation included) and for the whole run, counted from the process start (startup,
    ~11 s of imports and CUDA initialisation, is inside ``total``); a section's deadline is the earlier of its own
    and the run's, and its alarm fires ``grace`` after that deadline but never after ``hard``. Full run: 11 s
    startup, then 5 + 140 + 95 + 98 + 25 + 40 = 403 s of sections, against the 410 s total; in the second H200 run
    data took 1.5 s and Evo stopped by its step count 9 s before its budget, so the clutter section (last) usually
    gets its 40 s. The clutter section (added after that run) took its time from data (5 s), dense (7), Evo (8),
    Idle (5), the old slack below the total and 10 s more total; throughput keeps 140 s, which its ViT-B 1024 px
    groups need (they ended at 125 and 139 s into the section then). The compiled batch-256 CUDA-graph group
    (~45 s) runs only where time is left after the eager groups."""

    total: float = 410.0
    data: float = 5.0  # decoding CIFAR-10 took 1.5-1.8 s on the H200's 16 cores
    throughput: float = 140.0
    dense: float = 95.0
    evo: float = 98.0  # Evo trains for the dense run's number of steps, or until this budget ends
    idle: float = 25.0
    clutter: float = 40.0  # Evo on cluttered images, last: it absorbs what ran over before it
    grace: float = 20.0  # the alarm backstop fires this long after a section's deadline...
    hard: float = 420.0  # ...but never later than this after the process started (the 7 minutes)


SMOKE_BUDGETS = Budgets(total=115.0, data=20.0, throughput=75.0, dense=30.0, evo=30.0, idle=20.0, clutter=20.0,
                        grace=10.0, hard=118.0)


@dataclass(frozen=True)
class SuiteConfig:
    out: str
    smoke: bool
    device: torch.device
    budgets: Budgets
    throughput: ThroughputPlan
    cifar: CifarConfig
    sections: tuple[str, ...] = SECTIONS
    argv: tuple[str, ...] = ()


def smoke_cifar(data: str) -> CifarConfig:
    return CifarConfig(data=data, train_limit=1024, test_limit=500, embed_dim=48, depth=4, num_heads=3,
                       batch_size=64, batch_choices=(64, 128), amp="none", max_epochs=1, eval_batch=250,
                       eval_reserve_s=3.0, idle_objective="distill", sweep_keeps=(0.3, 0.5, 0.7, 1.0))


class Suite:
    """Runs the sections, keeps their results, and rewrites summary.json after each."""

    def __init__(self, cfg: SuiteConfig, start: float, preflight=None) -> None:
        self.cfg = cfg
        self.start = start
        self.preflight = preflight  # the CUDA graph trial (gpu_suite_preflight.start), or None
        self.preflight_result: dict | None = None
        os.makedirs(cfg.out, exist_ok=True)
        self.log = Log(os.path.join(cfg.out, LOG), start)
        self.end = Deadline(start + cfg.budgets.total)
        self.throughput: dict = {}
        self.cifar: dict = {"config": dataclasses.asdict(cfg.cifar)}
        self.host_data = None  # decoded CIFAR-10 in host memory
        self.data = None  # the same on the device
        self.dense_model = None
        self.dense_steps: int | None = None
        self.cifar_cfg = cfg.cifar  # with the batch the dense section picks, and its learning rates
        self.summary = {"suite": "tokenpace GPU suite (issue 14)", "mode": "smoke" if cfg.smoke else "full",
                        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "argv": list(cfg.argv),
                        **environment(cfg.device), "budgets_s": dataclasses.asdict(cfg.budgets), "sections": {}}

    def path(self, name: str) -> str:
        return os.path.join(self.cfg.out, name)

    def run(self) -> dict:
        self.log(f"tokenpace GPU suite, {self.summary['mode']} mode, on {self.summary['device']}; "
                 f"torch {torch.__version__}, timm {self.summary['timm']}; output in {self.cfg.out}")
        steps = {"data": self.section_data, "throughput": self.section_throughput, "dense": self.section_dense,
                 "evo": self.section_evo, "idle": self.section_idle, "clutter": self.section_clutter}
        with cudnn_autotuned(self.cfg.device):  # the conv stems (patch embeddings) of timed and trained models
            for name in self.cfg.sections:
                if name == "throughput":  # the trial's GPU work ends before anything is timed, in no section's time
                    self.wait_for_preflight()
                self.run_section(name, getattr(self.cfg.budgets, name), steps[name])
        self.write_summary()
        self.log(f"done in {time.perf_counter() - self.start:.1f} s; targets: " + "; ".join(
            f"{k} {'met' if t['met'] else 'missed' if t['met'] is False else 'not measured'}"
            for k, t in self.summary["targets"].items()))
        return self.summary

    def run_section(self, name: str, budget: float, fn) -> None:
        """One section under its deadline; any failure is logged and recorded, and the run goes on."""
        deadline = Deadline.after(budget).earlier(self.end)
        record = {"budget_s": budget, "status": "running"}
        self.summary["sections"][name] = record
        if deadline.remaining() <= 1:
            record["status"] = "skipped: the run's total budget is spent"
            self.log(f"== {name}: skipped (total budget spent)")
            self.write_summary()
            return
        self.log(f"== {name}: {deadline.remaining():.0f} s")
        began = time.perf_counter()
        try:
            # the backstop fires ``grace`` after the deadline, but not past the run's hard end
            grace = max(0.5, min(self.cfg.budgets.grace, self.start + self.cfg.budgets.hard - deadline.at))
            with alarm_at(deadline, grace):
                fn(deadline)
            record["status"] = "ok"
        except BaseException as err:  # KeyboardInterrupt too: record it, then stop
            record["status"] = f"failed: {type(err).__name__}: {str(err)[:400]}"
            self.log(f"{name} failed:\n{traceback.format_exc()}")
            if isinstance(err, KeyboardInterrupt):
                raise
        finally:
            record["seconds"] = round(time.perf_counter() - began, 1)
            self.write_summary()
        self.log(f"== {name}: {record['status']} in {record['seconds']} s")

    # sections -----------------------------------------------------------------------------------------------------

    def section_throughput(self, deadline: Deadline) -> None:
        def save(doc: dict) -> None:
            self.throughput = doc
            write_json(self.path(THROUGHPUT), {**environment(self.cfg.device), **doc})

        run_throughput(self.cfg.throughput, self.cfg.device, deadline, self.cfg.budgets.grace, self.log, save)
        if self.cfg.device.type == "cuda":
            torch.cuda.empty_cache()

    def section_data(self, deadline: Deadline) -> None:
        """Decoded first, before CUDA and torch.compile start their threads (the decoders are forked processes)."""
        c = self.cfg.cifar
        self.host_data = decode_cifar(c.data, c.train_limit, c.test_limit)
        self.log(f"CIFAR-10 decoded: {len(self.host_data[0].labels)} train + {len(self.host_data[1].labels)} test "
                 f"images from {c.data}")

    def wait_for_preflight(self) -> None:
        """Read the CUDA graph trial's result (waiting for it, at most until PREFLIGHT_S after its start). Never
        raises: any trouble reads as a failed trial."""
        if self.preflight is None:
            return
        try:
            result = gpu_suite_preflight.collect(self.preflight, PREFLIGHT_S)
        except Exception as e:  # noqa: BLE001 - the CIFAR sections still run, eagerly
            result = {"ok": False, "error": f"reading the trial failed: {type(e).__name__}: {e}"}
        self.preflight, self.preflight_result = None, result
        self.log(f"CUDA graph preflight: {'ok' if result['ok'] else 'failed'} "
                 + json.dumps({k: v for k, v in result.items() if k != 'ok'}))

    def resolve_graphs(self) -> None:
        """Once, before the first CIFAR section: train from CUDA graphs only if the trial captured every kind of
        step and no CUDA graph of the throughput section failed in this process (a refused capture may leave it
        in capture state)."""
        if "graph_preflight" in self.cifar:
            return
        self.wait_for_preflight()
        result = self.preflight_result or {"ok": False, "error": "not run: " + (
            "no CIFAR section" if self.cfg.device.type == "cuda" else "not on CUDA (training steps run eagerly there)")}
        failed = [g["key"] for g in self.throughput.get("failed", []) if g.get("replays_graphs")]
        if result["ok"] and failed:
            result = {**result, "ok": False, "error": f"a throughput CUDA graph failed in this process: {failed[0]}"}
        if self.preflight_result is not None or failed:
            self.log("training steps: " + ("replayed from CUDA graphs" if result["ok"]
                                           else f"eager ({result.get('error') or 'the trial failed'})"))
        self.cifar["graph_preflight"] = result
        self.cifar["config"]["cuda_graphs"] = result["ok"]
        self.cifar_cfg = dataclasses.replace(self.cifar_cfg, cuda_graphs=result["ok"])

    def cifar_data(self):
        self.resolve_graphs()
        if self.host_data is None:
            raise RuntimeError("no CIFAR-10 images: the data section did not decode them")
        if self.data is None:
            self.data = tuple(to_device(split, self.cfg.device) for split in self.host_data)
        return self.data

    def section_dense(self, deadline: Deadline) -> None:
        train, test = self.cifar_data()
        # ten timed steps a batch on the GPU (four 5 ms replays would be a noisy pick); two in the smoke run
        self.cifar_cfg, self.cifar["batch_pick"] = pick_batch(train, self.cifar_cfg, self.cfg.device, self.log,
                                                              steps=2 if self.cfg.smoke else 10)
        model, report = train_dense(train, self.cifar_cfg, self.cfg.device, deadline, self.log)
        self.dense_model, self.dense_steps = model, report.steps
        self.save_cifar("dense", report, evaluate_model(model, None, SWEEP_METHODS, test, self.cifar_cfg,
                                                        self.cfg.device))

    def section_evo(self, deadline: Deadline) -> None:
        train, test = self.cifar_data()
        c = self.cifar_cfg
        model, report = train_evo(train, c, self.cfg.device, deadline, self.log, max_steps=self.dense_steps)
        own = ("evo", {"keep": c.evo_keep, "mode": "stage"})
        self.save_cifar("evo", report, evaluate_model(model, own, ("evo",), test, c, self.cfg.device))

    def section_idle(self, deadline: Deadline) -> None:
        if self.dense_model is None:
            raise RuntimeError("Idle fine-tunes the dense model's weights, and the dense section did not produce any")
        train, test = self.cifar_data()
        c = self.cifar_cfg
        model, report = finetune_idle(self.dense_model, train, c, self.cfg.device, deadline, self.log)
        own = ("idle", {"keep": c.idle_keep})
        self.save_cifar("idle", report, evaluate_model(model, own, ("idle",), test, c, self.cfg.device))

    def section_clutter(self, deadline: Deadline) -> None:
        """Evo(0.5) from scratch on cluttered CIFAR-10 (each image at a random place on a noise canvas, as many
        tokens as at 32 px): on 32 px CIFAR-10 the object fills the image, and random scores lose the Evo model
        only about half a point at keep 0.5 (second H200 run), so no token selection can lead them by much there.
        The test images get fixed places and noise."""
        train, test = self.cifar_data()
        c = self.cifar_cfg.cluttered()
        picked = ("picked by the dense section" if "batch_pick" in self.cifar
                  else "not picked: the dense section did not run")
        self.log(f"  cluttered: {c.canvas} px canvas, patch {c.patch_size}, batch {c.batch_size} ({picked}), "
                 f"lr {c.lr:.2e}")
        test = cluttered(test, c.canvas, seed=1)
        model, report = train_evo(train, c, self.cfg.device, deadline, self.log, max_steps=None)
        own = ("evo", {"keep": c.evo_keep, "mode": "stage"})
        evaluation = evaluate_model(model, own, ("evo",), test, c, self.cfg.device)
        setup = {k: getattr(c, k) for k in ("canvas", "img_size", "patch_size", "batch_size", "lr")}
        self.save_cifar("clutter", report, {**evaluation, "setup": setup})

    def save_cifar(self, name: str, report, evaluation: dict) -> None:
        self.cifar[name] = {**evaluation, "train": dataclasses.asdict(report)}
        write_json(self.path(CIFAR), self.cifar)
        plot_sweeps(self.cifar, self.path(PLOT))
        extra = f", random scores {evaluation['random_top1']:.2f}" if "random_top1" in evaluation else ""
        self.log(f"{name}: top-1 {evaluation['top1']:.2f}%{extra} after {report.epochs:.1f} epochs "
                 f"({report.steps} steps, {report.seconds:.0f} s, stopped by {report.stopped_by}; "
                 f"steps {report.step_mode})")

    # summary ------------------------------------------------------------------------------------------------------

    def write_summary(self) -> None:
        self.summary["elapsed_s"] = round(time.perf_counter() - self.start, 1)
        self.summary["figures"] = figures(self.throughput, self.cifar, self.cfg.throughput)
        self.summary["targets"] = targets(self.summary["figures"])
        self.summary["files"] = sorted(f for f in os.listdir(self.cfg.out) if not f.endswith(".tmp"))
        write_json(self.path(SUMMARY), self.summary)


def environment(device: torch.device) -> dict:
    import timm

    from tokenpace.bench import device_name

    env = {"device": device_name(device), "torch": torch.__version__, "timm": timm.__version__,
           "python": platform.python_version(), "cuda": torch.version.cuda}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["gpu"] = {"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
                      "multiprocessors": props.multi_processor_count}
    return env


def figures(throughput: dict, cifar: dict, plan: ThroughputPlan) -> dict:
    """The numbers the targets read: speed-ups of the target model and CIFAR accuracies (None: not measured)."""
    model, batch = plan.target_model, plan.target_batch

    def speedups(b: int, compile: bool, cuda_graph: bool = False, mode: str = "default") -> dict:
        rows = {m: find_row(throughput, model, b, "bf16", compile, m, compile_mode=mode, cuda_graph=cuda_graph)
                for m in ("evo", "idle", "evit", "topk")}
        return {m: (r["speedup"] if r else None) for m, r in rows.items()}

    def acc(name: str, key: str = "top1"):
        return cifar.get(name, {}).get(key)

    def sweep_at(name: str, method: str, series: str, keep: float):
        sweep = cifar.get(name, {}).get("sweeps", {}).get(method)
        return sweep[series][sweep["keeps"].index(keep)] if sweep and keep in sweep["keeps"] else None

    return {
        "throughput_model": model,
        "throughput_batch": batch,
        "speedup_bf16_eager": speedups(batch, False),
        "speedup_bf16_compiled": speedups(batch, True),
        "speedup_b1_bf16_eager": speedups(1, False),
        "speedup_b1_bf16_cuda_graph": speedups(1, False, cuda_graph=True),
        "speedup_bf16_cuda_graph": speedups(batch, False, cuda_graph=True),
        "speedup_bf16_compiled_cuda_graph": speedups(batch, True, mode="reduce-overhead"),
        "cifar_test_images": acc("dense", "test_images"),
        "cifar_dense_top1": acc("dense"),
        "cifar_evo_top1": acc("evo"),
        "cifar_evo_random_top1": acc("evo", "random_top1"),
        "cifar_idle_top1": acc("idle"),
        "cifar_idle_random_top1": acc("idle", "random_top1"),
        "cifar_clutter_evo_top1": acc("clutter"),
        "cifar_clutter_evo_random_top1": acc("clutter", "random_top1"),
        "cifar_dense_model_evo0.5_attention_top1": sweep_at("dense", "evo", "attention", 0.5),
        "cifar_dense_model_evo0.5_random_top1": sweep_at("dense", "evo", "random", 0.5),
    }


def _target(what: str, value, threshold: float, unit: str = "") -> dict:
    met = None if value is None else bool(value >= threshold)
    return {"what": what, "value": None if value is None else round(value, 3), "threshold": threshold,
            "unit": unit, "met": met}


def _minus(a, b):
    return None if a is None or b is None else a - b


def targets(f: dict) -> dict:
    """Issue 14's targets, each met / missed (False) / not measured (None), with the number."""
    eager, compiled = f["speedup_bf16_eager"], f["speedup_bf16_compiled"]
    size = f"b{f['throughput_batch']}"
    dense = f["cifar_dense_top1"]

    def slower(speedups: dict):
        return None if speedups["evo"] is None or speedups["idle"] is None else min(speedups["evo"], speedups["idle"])

    return {
        "evo_speedup": _target(f"{f['throughput_model']} {size} bf16 eager: Evo(0.5) / dense", eager["evo"], 1.5,
                               "x"),
        "idle_speedup": _target(f"{f['throughput_model']} {size} bf16 eager: Idle(0.7) / dense", eager["idle"], 1.5,
                                "x"),
        "evo_speedup_compiled": _target(f"{size} bf16, compiled Evo / compiled dense", compiled["evo"], 1.5, "x"),
        "idle_speedup_compiled": _target(f"{size} bf16, compiled Idle / compiled dense", compiled["idle"], 1.5,
                                         "x"),
        "batch1_not_slower": _target("b1 bf16 eager: the slower of Evo and Idle / dense",
                                     slower(f["speedup_b1_bf16_eager"]), 1.0, "x"),
        "batch1_not_slower_cuda_graph": _target("b1 bf16, each replayed from a CUDA graph: the slower of Evo and "
                                                "Idle / dense", slower(f["speedup_b1_bf16_cuda_graph"]), 1.0, "x"),
        "cifar_dense": _target(f"dense ViT top-1 on {f['cifar_test_images']} test images", dense, 85.0, "%"),
        "cifar_evo_vs_dense": _target("Evo(0.5) from scratch minus dense (points)",
                                      _minus(f["cifar_evo_top1"], dense), -1.0, "points"),
        "cifar_idle_vs_dense": _target("Idle(0.7) fine-tuned minus dense (points)",
                                       _minus(f["cifar_idle_top1"], dense), -0.5, "points"),
        "attention_vs_random": _target("Evo(0.5) model at keep 0.5: class attention minus random scores (points)",
                                       _minus(f["cifar_evo_top1"], f["cifar_evo_random_top1"]), 3.0, "points"),
        # the same target on the cluttered variant the issue allows (where the object is a quarter of the tokens)
        "attention_vs_random_cluttered": _target(
            "the same on cluttered 64 px CIFAR-10 (Evo(0.5) trained there)",
            _minus(f["cifar_clutter_evo_top1"], f["cifar_clutter_evo_random_top1"]), 3.0, "points"),
    }


def parse_args(argv: list[str] | None) -> SuiteConfig:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="output folder (created); at most 5 files are written there")
    p.add_argument("--smoke", action="store_true", help="toy sizes on the CPU: the same code paths in < 2 minutes")
    p.add_argument("--data", default=None, help="CIFAR-10 packed-JPEG .npz (default: data/ or ../shared/data/)")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"subset of {','.join(SECTIONS)}, in order")
    p.add_argument("--cifar", default="", metavar="KEY=VALUE,...",
                   help="CIFAR recipe fields replaced, e.g. depth=6,drop_path=0 (gpu_suite_cifar.CifarConfig; "
                        "recorded in cifar.json's config)")
    base = SMOKE_BUDGETS if "--smoke" in (argv if argv is not None else sys.argv[1:]) else Budgets()
    for f in dataclasses.fields(Budgets):
        p.add_argument(f"--{f.name}-s", type=float, default=getattr(base, f.name), dest=f"{f.name}_s",
                       help=f"seconds (default {getattr(base, f.name):g})")
    a = p.parse_args(argv)
    sections = tuple(s.strip() for s in a.sections.split(",") if s.strip())
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown or not sections:
        p.error(f"--sections {a.sections!r}: unknown {unknown}; accepted: {', '.join(SECTIONS)}")
    data = a.data or next((str(c) for c in DATA_CANDIDATES if c.is_file()), None)
    if data is None or not os.path.isfile(data):
        p.error(f"CIFAR-10 data not found at {data or ' or '.join(map(str, DATA_CANDIDATES))}; pass --data")
    if not a.smoke and not torch.cuda.is_available():
        p.error("the full suite needs a CUDA GPU (none is visible); use --smoke for the CPU run")
    budgets = Budgets(**{f.name: getattr(a, f"{f.name}_s") for f in dataclasses.fields(Budgets)})
    device = torch.device("cuda" if not a.smoke else "cpu")
    try:
        cifar = override(smoke_cifar(data) if a.smoke else CifarConfig(data=data), parse_model_args(a.cifar))
    except (ValueError, TokenpaceError) as err:
        p.error(str(err).replace("--model-args", "--cifar"))
    return SuiteConfig(out=a.out, smoke=a.smoke, device=device, budgets=budgets,
                       throughput=smoke_plan() if a.smoke else full_plan(), cifar=cifar, sections=sections,
                       argv=tuple(sys.argv[1:] if argv is None else argv))


def main(argv: list[str] | None = None, start: float | None = None,
         preflight: gpu_suite_preflight.Launched | None = None) -> dict:
    """Run the suite; its total budget counts from ``start`` (default: now). ``preflight``: the CUDA graph trial,
    if already started (else started here where the run needs it)."""
    cfg = parse_args(argv)
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    if cfg.smoke:
        # toy tensors on a shared CPU: a second OpenMP thread waiting on a busy core made forwards ~100x slower
        torch.set_num_threads(1)
    # a capture CUDA refuses must not leave this process in capture state: the trial runs in its own, started
    # before this process imported torch where run as a script
    if preflight is None and cfg.device.type == "cuda" and set(CIFAR_SECTIONS) & set(cfg.sections):
        preflight = gpu_suite_preflight.start("cuda")
    try:
        return Suite(cfg, time.perf_counter() if start is None else start, preflight).run()
    finally:
        if preflight is not None:  # the suite ended before it read the result
            preflight.stop()
        torch.set_num_threads(threads)
        if cfg.smoke:  # no pool of inductor compile workers left running beside the caller (a test process)
            from torch._inductor.async_compile import shutdown_compile_workers

            shutdown_compile_workers()


if __name__ == "__main__":
    main(start=PROCESS_START, preflight=EARLY_PREFLIGHT)
