"""Throughput section of the GPU suite: groups of (model, batch, precision, eager/compiled), each timing dense and
the methods interleaved with tokenpace's own benchmark, run in priority order until the section's deadline.

Groups that cannot fit are listed with the reason: dropped by plan (too slow for any budget) or not run (the
deadline came first), never silently left out.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch._dynamo  # its config is set before any compilation

from gpu_suite_common import Deadline, DeadlineReached, number_cell
from gpu_suite_host import HostProbe, run_probe

ALL_METHODS = "dense,evo,idle,evit,topk"
TARGET_METHODS = "dense,evo,idle"  # the methods the targets name: compiled first, the others if time is left
OTHER_METHODS = "dense,evit,topk"


@dataclass(frozen=True)
class BenchModel:
    label: str
    timm_name: str
    kwargs: tuple[tuple[str, object], ...] = ()


@dataclass(frozen=True)
class BenchGroup:
    """One call of the benchmark: every method of ``methods`` timed interleaved under one setting."""

    model: BenchModel
    batch: int
    amp: str  # "none" (fp32) or "bf16"
    compile: bool
    methods: str = ALL_METHODS
    runs: int = 10
    warmup: int = 2  # two at least for compile mode reduce-overhead: it records its graphs in the second call
    compile_mode: str = "default"  # torch.compile's; "reduce-overhead" replays CUDA graphs
    cuda_graph: bool = False  # eager kernels captured once in a CUDA graph per method, then replayed
    compile_backend: str = "inductor"  # torch.compile's; the smoke run's aot_eager traces without generating code

    @property
    def run_mode(self):
        from tokenpace.runners import RunMode

        return RunMode(self.compile, self.compile_mode, self.cuda_graph, self.compile_backend)

    @property
    def key(self) -> str:
        precision = "fp32" if self.amp == "none" else self.amp
        return f"{self.model.label} b{self.batch} {precision} {self.run_mode.describe()} [{self.methods}]"


@dataclass(frozen=True)
class ThroughputPlan:
    groups: tuple[BenchGroup, ...]  # priority order: the targets' groups first
    dropped: tuple[tuple[str, str], ...]  # (group key, why it is left out of every run)
    compile_estimate_s: float  # planning figure: seconds to compile one model; a compiled group starts only if
    # its methods' compilations fit in the time left
    target_model: str  # the model and batch the speed targets name
    target_batch: int
    probe: HostProbe | None = None  # the machine's warm-up and the per-method profile, on the first group's model


DEIT_S = BenchModel("deit_small_patch16_224", "deit_small_patch16_224")
DEIT_B = BenchModel("deit_base_patch16_224", "deit_base_patch16_224")
VIT_B_1024 = BenchModel("vit_base_patch16_224@1024", "vit_base_patch16_224", (("img_size", 1024),))
# the backbones issue's encoders: no class token and an attention-pool head; RoPE inside attention
SIGLIP_B = BenchModel("vit_base_patch16_siglip_224", "vit_base_patch16_siglip_224")
EVA02_S = BenchModel("eva02_small_patch14_224", "eva02_small_patch14_224")
# SAM 2's image encoder (timm HieraDet) at its own 896 px: a dense-task backbone, windows and pooling stage entries;
# Idle is the method it runs
SAM2_T = BenchModel("sam2_hiera_tiny", "sam2_hiera_tiny")
# a VLM's vision tower at its own 768 px (48x48 patches, RoPE, the 2x2 merger's tokens out): Qwen3.5's encoder
QWEN3_T = BenchModel("qwen3_vit_88m_enc", "qwen3_vit_88m_enc")


def full_plan() -> ThroughputPlan:
    """33 groups in priority order: the targets' (DeiT-S bf16 at batch 256 and 1, batch 1 replayed from CUDA graphs,
    then compiled at 256), batch 256 replayed from CUDA graphs, every eager setting of DeiT-S (batch 64 bf16 also
    from CUDA graphs) and DeiT-B, SigLIP-B (bf16, batch 256 and 1), ViT-B at 1024 px (fewer rounds: up to a second
    per call) with EVA-02-S (bf16, batch 256), SAM 2's Hiera-T (bf16, batch 8 at 896 px, dense and Idle) and
    Qwen3.5's vision tower (bf16, batch 8 at 768 px, dense, Evo and Idle) before its slowest group, then more
    compiled: batch 256 in reduce-overhead mode (compiled and replayed from CUDA graphs) first, batch 1 in it too."""
    S, B, L = DEIT_S, DEIT_B, VIT_B_1024
    G = BenchGroup
    # at batch 1 (and 64) a GPU waits on the host's launches; a CUDA graph replays a forward's kernels in one host
    # call (capture: seconds, no compilation)
    targets = [G(S, 256, "bf16", False), G(S, 1, "bf16", False), G(S, 1, "bf16", False, cuda_graph=True),
               G(S, 256, "bf16", True, TARGET_METHODS),
               # added after the first run, where reduced forwards at batch 256 looked bound by the host: the
               # batch-256 kernels without the host's launches (capture: seconds)
               G(S, 256, "bf16", False, cuda_graph=True)]
    eager = [G(S, 64, "bf16", False), G(S, 64, "bf16", False, cuda_graph=True), G(S, 256, "none", False),
             G(S, 64, "none", False), G(S, 1, "none", False),
             *(G(B, b, amp, False) for amp in ("bf16", "none") for b in (256, 64, 1)),
             G(SIGLIP_B, 256, "bf16", False), G(SIGLIP_B, 1, "bf16", False)]
    large = [G(L, 1, "bf16", False), G(L, 64, "bf16", False, runs=5, warmup=1),
             G(L, 256, "bf16", False, runs=3, warmup=1), G(L, 1, "none", False, runs=5),
             G(EVA02_S, 256, "bf16", False),  # ~1 s, before the ~25 s fp32 group below
             G(SAM2_T, 8, "bf16", False, "dense,idle"),  # ~100 GMACs an image: about a second for its calls
             G(QWEN3_T, 8, "bf16", False, "dense,evo,idle"),  # ~300 GMACs an image: a few seconds for its calls
             G(L, 64, "none", False, runs=3, warmup=1)]
    # at batch 1 the host's launch cost bounds a forward: its compiled group replays CUDA graphs, as a latency
    # deployment would
    # the first of them added after the first run: batch 256 compiled and replayed from CUDA graphs (three
    # compilations, ~55 s there: after the eager and large groups, which the README's GPU rows rest on)
    compiled = [G(S, 256, "bf16", True, TARGET_METHODS, compile_mode="reduce-overhead"),
                G(S, 256, "bf16", True, OTHER_METHODS),
                G(S, 1, "bf16", True, TARGET_METHODS, compile_mode="reduce-overhead"),
                G(S, 64, "bf16", True, TARGET_METHODS), G(S, 256, "none", True, TARGET_METHODS),
                G(B, 256, "bf16", True, TARGET_METHODS), G(L, 64, "bf16", True, TARGET_METHODS, runs=5, warmup=1)]
    dropped = ((G(L, 256, "none", False).key,
                "fp32 at 1024 px and batch 256 is about 340 TFLOP per forward (660 GMACs per image), seconds each "
                "on an H100/H200 without TF32: five methods x several rounds would take the whole throughput budget"),
               ("the other compiled 1024 px groups", "one compilation per method and shape; the batch-64 bf16 group "
                "stands for them"))
    # a cold inductor compile of a DeiT-S forward: ~25-45 s; the patched ones have more operations to lower
    return ThroughputPlan((*targets, *eager, *large, *compiled), dropped, compile_estimate_s=35.0,
                          target_model=S.label, target_batch=256, probe=HostProbe(warmup_s=5.0))


def smoke_plan() -> ThroughputPlan:
    """Tiny ViTs on the CPU: both precisions, a model built at another image size, tiny SigLIP-, EVA-02-, SAM 2- and
    Qwen3-tower-shaped models, and one compiled group of the targets' methods. That group compiles with aot_eager:
    dynamo traces every method as the GPU run's inductor does, without the C++ code generation whose cold-cache
    minutes on two busy cores would not fit the smoke's budget (the tests compile with inductor on the CPU
    themselves)."""
    tiny = BenchModel("deit_tiny@32", "deit_tiny_patch16_224",
                      (("img_size", 32), ("patch_size", 4), ("depth", 4), ("embed_dim", 48)))
    large = BenchModel("deit_tiny@64", "deit_tiny_patch16_224",
                       (("img_size", 64), ("patch_size", 8), ("depth", 4), ("embed_dim", 48)))
    shrink = (("img_size", 32), ("patch_size", 4), ("depth", 4), ("embed_dim", 48), ("num_heads", 3))
    siglip = BenchModel("siglip_tiny@32", SIGLIP_B.timm_name, shrink)
    eva = BenchModel("eva02_tiny@32", EVA02_S.timm_name, shrink)
    # a tiny SAM 2 encoder at 64 px (its config's input size overridden: the benchmark reads it)
    qwen3 = BenchModel("qwen3_tower_tiny@32", QWEN3_T.timm_name, shrink + (("pos_embed_grid_size", 8),))
    sam2 = BenchModel("sam2_tiny@64", SAM2_T.timm_name,
                      (("embed_dim", 16), ("num_heads", 1), ("stages", (1, 2, 3, 2)), ("window_spec", (4, 2, 4, 2)),
                       ("global_att_blocks", (4,)), ("global_pos_size", (4, 4)),
                       ("pretrained_cfg_overlay", {"input_size": (3, 64, 64)})))
    G = BenchGroup
    groups = (G(tiny, 4, "bf16", False, runs=2, warmup=1), G(tiny, 1, "bf16", False, runs=2, warmup=1),
              G(siglip, 4, "bf16", False, runs=2, warmup=1), G(eva, 4, "bf16", False, runs=2, warmup=1),
              G(sam2, 2, "bf16", False, "dense,idle", runs=2, warmup=1),
              G(qwen3, 2, "bf16", False, "dense,evo,idle", runs=2, warmup=1),
              G(tiny, 4, "none", False, runs=2, warmup=1), G(large, 2, "bf16", False, TARGET_METHODS, runs=2, warmup=1),
              G(tiny, 4, "bf16", True, TARGET_METHODS, runs=2, warmup=1, compile_backend="aot_eager"))
    dropped = ((G(large, 4, "none", False).key, "smoke: stands for the dropped 1024 px fp32 group"),)
    # compile estimate: aot_eager traces one tiny model in a few seconds on two cores
    return ThroughputPlan(groups, dropped, compile_estimate_s=5.0, target_model=tiny.label, target_batch=4,
                          probe=HostProbe(warmup_s=0.3, calls=2))


ALLOCATOR_STATS = {"device_allocs": "num_device_alloc", "alloc_retries": "num_alloc_retries"}


def churn_counts(device: torch.device) -> dict[str, int | None]:
    """Running totals of what can make timed calls drift: graphs dynamo compiled (a recompilation in the timed
    rounds), and on CUDA the allocator's device allocations and its retries (a retry frees the cache and
    synchronises); None where this torch's allocator does not count one."""
    counts: dict[str, int | None] = {"dynamo_graphs": int(torch._dynamo.utils.counters["stats"]["unique_graphs"])}
    if device.type == "cuda":
        stats = torch.cuda.memory_stats(device)
        counts |= {name: None if key not in stats else int(stats[key]) for name, key in ALLOCATOR_STATS.items()}
    return counts


class CallWatch:
    """The benchmark's per-call progress hook. It stops the group once ``cut_at`` has passed, counts each method's
    timed calls, keeps the first call's seconds (with torch.compile: compilation included), and records each
    method's peak CUDA memory over its timed calls (the peak counter is reset after every call, so each call is
    measured alone; ``resident_mib`` is what stays allocated between calls: every method's weights, the input).
    ``churn`` sums :func:`churn_counts` over each method's timed calls (from the hook before each to the hook after
    it, so the benchmark's re-configuration between calls counts too): all zero in a steady timed round."""

    PATTERN = re.compile(r"\[(?:\w+ )?(?P<phase>warm-up|run) (?P<round>\d+)/\d+\] (?P<label>\S+)\s+(?P<ms>[\d.]+) ms")

    def __init__(self, device: torch.device, cut_at: Deadline) -> None:
        self.device, self.cut_at = device, cut_at
        self.timed_calls: dict[str, int] = {}
        self.first_call_s: dict[str, float] = {}
        self.peak_mib: dict[str, float] = {}
        self.resident_mib: float | None = None
        self.churn: dict[str, dict[str, int | None]] = {}
        self._counts = churn_counts(device)

    def __call__(self, message: str) -> None:
        match = self.PATTERN.search(message)
        if match is None:  # another format after a merge: keep timing, lose the per-call figures (a test notices)
            self.cut_at.check(f"the benchmark, after {message.strip()}")
            return
        label = match["label"]
        self.first_call_s.setdefault(label, float(match["ms"]) / 1000)
        counts = churn_counts(self.device)
        if match["phase"] == "run":
            self.timed_calls[label] = self.timed_calls.get(label, 0) + 1
            churn = self.churn.setdefault(label, dict.fromkeys(counts, 0))
            for name, total in counts.items():
                before, so_far = self._counts.get(name), churn.get(name)
                churn[name] = None if None in (total, before, so_far) else so_far + total - before
        self._counts = counts
        if self.device.type == "cuda":
            if match["phase"] == "run":
                peak = torch.cuda.max_memory_allocated(self.device) / 2**20
                self.peak_mib[label] = max(self.peak_mib.get(label, 0.0), peak)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.resident_mib = torch.cuda.memory_allocated(self.device) / 2**20
        self.cut_at.check(f"the benchmark, after {message.strip()}")


def time_group(model: torch.nn.Module, group: BenchGroup, device: torch.device, watch: CallWatch):
    """The one call into tokenpace's benchmark (its signature may change at merge: adapt it here only)."""
    from tokenpace.bench import benchmark, parse_methods

    return benchmark(model, parse_methods(group.methods), group.batch, device, amp=group.amp,
                     compile=group.compile, runs=group.runs, warmup=group.warmup, progress=watch,
                     compile_mode=group.compile_mode, cuda_graph=group.cuda_graph,
                     compile_backend=group.compile_backend)


def build_model(spec: BenchModel) -> torch.nn.Module:
    """Random weights: there is no hub access on the GPU machine. A 1024 px model is built at that size (timm sizes
    the position embedding to the grid; with pretrained weights it would resample them)."""
    import timm

    return timm.create_model(spec.timm_name, pretrained=False, **dict(spec.kwargs)).eval()


def run_group(group: BenchGroup, model: torch.nn.Module, device: torch.device, cut_at: Deadline) -> dict:
    """Rows of one group (one per method), with peak memory; raises DeadlineReached if ``cut_at`` passes first."""
    from tokenpace.runners import cudagraph_skips

    if group.compile:
        torch._dynamo.reset()  # each group compiles its own copies; start from an empty cache
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    watch = CallWatch(device, cut_at)
    skips_before = cudagraph_skips()
    results = time_group(model, group, device, watch)
    rows = []
    for r in results:
        # a replayed graph allocates nothing (its intermediates live in the graph's pool, counted as reserved):
        # max_memory_allocated would give every method the same figure
        peak = None if group.run_mode.replays_graphs else watch.peak_mib.get(r.method)
        rows.append({"method": r.method, "config": r.config, "gmacs": r.gmacs, "img_per_s": round(r.img_per_s, 2),
                     "ms_per_batch": round(r.ms_per_batch, 4), "speedup": round(r.speedup, 4),
                     "peak_mib": None if peak is None else round(peak, 1),
                     "first_call_s": round(watch.first_call_s[r.method], 3),
                     "timed_calls": watch.timed_calls.get(r.method, 0),
                     "churn": watch.churn.get(r.method),
                     "times_ms": [round(t * 1000, 4) for t in r.times_s]})
    return {"key": group.key, "model": group.model.label, "timm_name": group.model.timm_name,
            "model_args": dict(group.model.kwargs), "batch": group.batch,
            "precision": "fp32" if group.amp == "none" else group.amp, "compile": group.compile,
            "compile_mode": group.compile_mode if group.compile else None, "cuda_graph": group.cuda_graph,
            "compile_backend": group.compile_backend if group.compile else None,
            "mode": group.run_mode.describe(),
            # graphs inductor ran without their CUDA graphs (in a CUDA-graph mode, those rows are plain compiled)
            "cudagraph_skips": cudagraph_skips() - skips_before if group.compile and group.run_mode.replays_graphs
            else None,
            "runs": group.runs, "warmup": group.warmup,
            "resident_mib": None if watch.resident_mib is None else round(watch.resident_mib, 1), "rows": rows}


def deadline_cause(err: BaseException) -> DeadlineReached | None:
    """The deadline that stopped a group, if one did: the alarm may fire inside torch.compile, whose dynamo wraps
    what its backend raised (BackendCompilerFailed, with the original as its cause). The chain is followed through
    ``__context__`` too, so an error raised while a deadline was being handled also counts as the cut."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, DeadlineReached):
            return err
        seen.add(id(err))
        err = getattr(err, "inner_exception", None) or err.__cause__ or err.__context__
    return None


def fits(group: BenchGroup, compile_s: float, deadline: Deadline) -> bool:
    """A compiled group starts only if its compilations (``compile_s`` each) fit in the time left."""
    if not group.compile:
        return not deadline.expired()
    return deadline.remaining() > compile_s * len(group.methods.split(","))


def run_throughput(plan: ThroughputPlan, device: torch.device, deadline: Deadline, grace_s: float, log,
                   save) -> dict:
    """Every group in order while time is left; ``save(doc)`` is called after each group."""
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    torch._dynamo.config.automatic_dynamic_shapes = False  # each batch size compiles static, as timm benchmarks
    doc = {"protocol": "tokenpace.bench.benchmark: random weights, random input, inference mode, methods interleaved "
                       "round by round after warm-up rounds, device sync around each call, median per method; "
                       "peak_mib = torch.cuda.max_memory_allocated over the method's timed calls (reset per call), "
                       "all methods' weights resident; null in groups replayed from CUDA graphs (cuda_graph, "
                       "compile mode reduce-overhead), whose intermediates live in the graphs' memory pools; "
                       "cuDNN autotuned (torch.backends.cudnn.benchmark) on CUDA from the runs after the second "
                       "H200 run; churn = per method, summed over its timed calls: graphs dynamo compiled and, on "
                       "CUDA, the allocator's num_device_alloc and num_alloc_retries (null: not kept by that torch)",
           "cudnn_autotuned": device.type == "cuda",
           "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
           "groups": [], "failed": [], "not_run": [], "dropped": [{"key": k, "why": w} for k, w in plan.dropped]}
    models: dict[str, torch.nn.Module] = {}
    if plan.probe is not None and plan.groups and not deadline.expired():
        first = plan.groups[0]
        log(f"host probe: {first.model.label} b{first.batch} {first.amp}, warm-up {plan.probe.warmup_s:g} s, "
            f"then [{plan.probe.methods}] profiled")
        try:
            models[first.model.label] = build_model(first.model)
            doc["host_probe"] = {"model": first.model.label, **run_probe(plan.probe, models[first.model.label],
                                                                        first.batch, first.amp, device)}
            w = doc["host_probe"]["warmup"]
            log(f"  warm-up: {w['calls']} calls, first {w['first_ms']:.1f} ms, last ten {w['last_median_ms']:.2f} ms")
            log("  " + ", ".join(f"{m['method']} {m['wall_ms']:.2f} ms wall, kernels {number_cell(m['kernel_ms'])} ms "
                                 f"in {'-' if m['kernels'] is None else m['kernels']}, {m['aten_calls']} aten calls"
                                 for m in doc["host_probe"]["methods"]))
        except Exception as err:  # the probe informs; it must not cost the groups
            doc["host_probe"] = {"error": f"{type(err).__name__}: {str(err)[:500]}"}
            log(f"  host probe failed: {type(err).__name__}: {str(err)[:300]}")
        save(doc)
    compile_s = plan.compile_estimate_s
    for group in plan.groups:
        if not fits(group, compile_s, deadline):
            why = ("deadline passed" if deadline.expired() else
                   f"its {len(group.methods.split(','))} compilations (~{compile_s:.0f} s each) do not fit "
                   f"the {deadline.remaining():.0f} s left")
            doc["not_run"].append({"key": group.key, "why": why})
            save(doc)  # the file lists what the deadline left out, not only what it cut (the second H200 run's did not)
            continue
        log(f"throughput: {group.key}")
        # a compiled group near its end may run past the deadline by a little rather than lose its compilations
        cut_at = Deadline(deadline.at + (grace_s * 0.75 if group.compile else 0.0))
        try:
            if group.model.label not in models:
                models[group.model.label] = build_model(group.model)
            result = run_group(group, models[group.model.label], device, cut_at)
            doc["groups"].append(result)
            if group.compile:  # the first call of each method compiled it: plan later groups with that figure
                compile_s = max(r["first_call_s"] for r in result["rows"])
            log("  " + ", ".join(f"{r['method']} {r['img_per_s']:.0f} img/s ({r['speedup']:.2f}x)"
                                 for r in result["rows"]))
        except Exception as err:  # one failed group (out of memory, a compile error) must not stop the others
            cut = deadline_cause(err)
            if cut is not None:
                doc["not_run"].append({"key": group.key, "why": f"cut: {cut}"})
                log(f"  cut by the deadline: {cut}")
                if group.compile:  # a compilation stopped half-way: leave no partial state to later sections
                    torch._dynamo.reset()
            else:
                doc["failed"].append({"key": group.key, "error": f"{type(err).__name__}: {str(err)[:500]}",
                                      "replays_graphs": group.run_mode.replays_graphs})
                log(f"  failed: {type(err).__name__}: {str(err)[:300]}")
        save(doc)
    return doc


def find_row(doc: dict, model: str, batch: int, precision: str, compile: bool, method: str,
             compile_mode: str = "default", cuda_graph: bool = False) -> dict | None:
    """The row of ``method`` in the group with these settings, or None where it was not measured."""
    wanted = (model, batch, precision, compile, compile_mode if compile else None, cuda_graph)
    for group in doc.get("groups", []):
        mode = group.get("compile_mode", "default" if group["compile"] else None)  # files from before the mode
        if (group["model"], group["batch"], group["precision"], group["compile"], mode,
                group.get("cuda_graph", False)) == wanted:
            for row in group["rows"]:
                if row["method"] == method:
                    return row
    return None
