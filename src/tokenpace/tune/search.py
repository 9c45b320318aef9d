"""The search: the fastest configuration within an accuracy budget (``max_drop``), or the most accurate one that
reaches a speed-up (``min_speedup``), measured on the user's device and images, cheap measurements first:

1. analytic MACs drop what cannot win: no MACs saved, or a MACs ratio too far below ``min_speedup``;
2. a quick interleaved benchmark (``tokenpace.bench.benchmark``) of every remaining candidate against dense;
3. accuracy and agreement with the dense predictions on the tuning split (``evaluate.accuracy_table``), per line
   (a configuration without its keep): with ``max_drop`` a bisection for the smallest keep within the budget,
   skipping lines that cannot beat the best found; with ``min_speedup`` the largest keeps fast enough;
4. a final interleaved benchmark of the finalists with more rounds; the choice;
5. the chosen configuration's accuracy on the check split, which the search never saw.

Accuracy is assumed to grow with keep along a line (fewer tokens dropped), which is what lets the bisection skip
keeps; the check split is how a user sees whether the choice holds on other images."""
from __future__ import annotations

import math
import numbers
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from torch.utils.data import Dataset

from ..bench import AMP_DTYPES, MethodSpec, benchmark, device_name, restored
from ..evaluate import accuracy_table
from ..patch import supported_methods
from .clock import SAFETY, Deadline, Progress, format_duration
from .space import Candidate, dense_gmacs, search_space
from .split import decoded_once, has_labels, loader, split_indices

DEFAULT_KEEPS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
SPEED_NOISE = 0.05  # a screened speed-up within 5% of another may be the faster one after the final benchmark
MACS_MARGIN = 1.25  # measured speed-ups have exceeded the MACs ratio by up to ~16% (README, CIFAR-10 rows)
GROUP = 8  # configurations per benchmark or accuracy pass: the unit the time budget is checked at
MIN_FINAL_RUNS = 3  # the final benchmark's rounds when the time budget is short (else --runs)


@dataclass(frozen=True)
class TuneSettings:
    """What to search for and how long. Exactly one budget: ``max_drop`` (points of top-1, or of agreement without
    labels, on the tuning split against the dense model) or ``min_speedup`` (measured, against dense); with
    neither, ``max_drop=0.5``."""

    max_drop: float | None = None
    min_speedup: float | None = None
    keeps: tuple[float, ...] = DEFAULT_KEEPS
    start_shifts: tuple[int, ...] = (-1, 0, 1)  # blocks by which the default selection layers are shifted
    batch_size: int = 32
    amp: str = "none"
    time_budget_s: float = 600.0
    runs: int = 10  # rounds of the final benchmark
    screen_runs: int = 3  # rounds of the quick benchmark
    finalists: int = 6
    check_fraction: float = 0.5
    labels: str = "auto"  # "auto": top-1 when every image has a label; "none": agreement with dense
    workers: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_drop is None and self.min_speedup is None:
            object.__setattr__(self, "max_drop", 0.5)
        if self.max_drop is not None and self.min_speedup is not None:
            raise ValueError("give one budget: max_drop (accuracy) or min_speedup (speed), not both")
        if self.max_drop is not None and not 0 <= self.max_drop < math.inf:
            raise ValueError(f"max_drop must be a finite number >= 0 (points); got {self.max_drop!r}")
        if self.min_speedup is not None and not 1 < self.min_speedup < math.inf:
            raise ValueError(f"min_speedup must be a finite number > 1 (against dense); got {self.min_speedup!r}")
        if not self.keeps or not all(0 < k <= 1 for k in self.keeps):
            raise ValueError(f"keeps must be ratios in (0, 1]; got {self.keeps!r}")
        if not self.start_shifts:
            raise ValueError("start_shifts must hold at least one shift (0: the default layers)")
        if self.amp not in AMP_DTYPES:
            raise ValueError(f"amp={self.amp!r} is not accepted; choose one of {', '.join(AMP_DTYPES)}")
        if not 0 < self.check_fraction < 1:
            raise ValueError(f"check_fraction must lie in (0, 1); got {self.check_fraction!r}")
        if self.labels not in ("auto", "none"):
            raise ValueError(f"labels={self.labels!r} is not accepted; choose 'auto' or 'none'")
        for name in ("batch_size", "runs", "screen_runs", "finalists", "workers", "seed"):
            value = getattr(self, name)
            least = 0 if name in ("workers", "seed") else 1
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
                raise ValueError(f"{name} must be an integer >= {least}; got {value!r}")
        if isinstance(self.time_budget_s, bool) or not isinstance(self.time_budget_s, numbers.Real) or \
                not 0 < self.time_budget_s < math.inf:  # nan fails both comparisons
            raise ValueError(f"time_budget_s must be a finite number of seconds > 0; got {self.time_budget_s!r}")
        if not all(isinstance(shift, numbers.Integral) and not isinstance(shift, bool) for shift in self.start_shifts):
            raise ValueError(f"start_shifts must be whole numbers of blocks; got {self.start_shifts!r}")

    def budget_text(self) -> str:
        if self.max_drop is not None:
            return f"at most {self.max_drop:g} points below dense"
        return f"at least {self.min_speedup:g}x faster than dense"


@dataclass
class CheckScore:
    """The metric of the dense model and of one configuration on the check split."""

    images: int
    dense: float
    value: float

    @property
    def drop(self) -> float:
        return self.dense - self.value


@dataclass
class TuneResult:
    settings: TuneSettings
    labelled: bool  # False: the metric is agreement with the dense predictions
    device: str
    dtype: str
    dense_gmacs: float
    candidates: list[Candidate]
    tune_images: int
    check_images: int
    dense_tune: float | None = None  # the dense model's metric on the tuning split
    dense_img_per_s: float | None = None
    chosen: Candidate | None = None
    closest: Candidate | None = None  # when nothing meets the budget: the nearest miss
    check: CheckScore | None = None  # of the chosen configuration, else of the closest
    macs_pruned: int = 0  # configurations dropped by their MACs before any measurement
    elapsed_s: float = 0.0
    stopped: str | None = None  # why the search ended before it was done (the time budget)
    notes: list[str] = field(default_factory=list)

    @property
    def metric(self) -> str:
        return "top-1" if self.labelled else "agreement"

    def value(self, c: Candidate) -> float | None:
        return c.top1 if self.labelled else c.agreement

    def drop(self, c: Candidate) -> float | None:
        v = self.value(c)
        return None if v is None or self.dense_tune is None else self.dense_tune - v

    def evaluated(self) -> list[Candidate]:
        return [c for c in self.candidates if self.value(c) is not None]

    def within_budget(self, c: Candidate) -> bool:
        """Within the budget: on the tuning split (max_drop), or on the best speed-up measured (min_speedup)."""
        if self.settings.max_drop is not None:
            d = self.drop(c)
            return d is not None and d <= self.settings.max_drop + 1e-9
        return c.best_speedup is not None and c.best_speedup >= self.settings.min_speedup

    def qualifies(self, c: Candidate) -> bool:
        """Within the budget and faster than the dense model (a slower configuration is no answer)."""
        return self.within_budget(c) and c.best_speedup is not None and c.best_speedup > 1.0

    @property
    def check_within_budget(self) -> bool | None:
        """Whether the check split confirms the accuracy budget (None: no check figure, no choice, or a speed
        budget)."""
        if self.check is None or self.chosen is None or self.settings.max_drop is None:
            return None
        return self.check.drop <= self.settings.max_drop + 1e-9

    def frontier(self) -> list[Candidate]:
        """The evaluated configurations that neither another one nor dense (1.00x) beats on both speed-up and
        metric, by speed-up."""
        points = [(c.best_speedup, self.value(c)) for c in self.evaluated() if c.best_speedup is not None]
        if self.dense_tune is not None:
            points.append((1.0, self.dense_tune))
        front = [c for c in self.evaluated() if c.best_speedup is not None and not any(
            speed >= c.best_speedup and value >= self.value(c) and (speed, value) != (c.best_speedup, self.value(c))
            for speed, value in points)]
        return sorted(front, key=lambda c: c.best_speedup)


def tune(model: nn.Module, dataset: Dataset, device: torch.device | str = "cpu",
         settings: TuneSettings | None = None, methods: list[MethodSpec] | None = None, progress: bool = False,
         clock: Callable[[], float] = time.monotonic) -> TuneResult:
    """Search ``methods`` (default: every method of the model's family; a spec's own options are kept fixed) on
    ``dataset`` (items ``(image, label)`` with the model's evaluation transform applied, or bare images) and
    return what was measured and chosen. ``model`` is given back as it came in: its method configuration (or none),
    train/eval mode, and each parameter and buffer on its device, with its dtype (the same parameter objects)."""
    settings = settings or TuneSettings()
    device = torch.device(device)
    with placement_kept(model), restored(model):  # restored: the method configuration and train/eval mode
        search = _Search(model, dataset, device, settings, methods, progress, clock)
        try:
            search.run()
        finally:
            search.bar.close()
    return search.result


@contextmanager
def placement_kept(model: nn.Module):
    """Run a block that may move ``model`` to another device or dtype; put every parameter and buffer back where it
    was after (errors too). Parameters keep their identity (their data is moved, as ``Module.to`` does), so an
    optimiser holding them stays valid."""
    placed = [(module, name, tensor.device, tensor.dtype) for module in model.modules()
              for name, tensor in [*module._parameters.items(), *module._buffers.items()] if tensor is not None]
    try:
        yield model
    finally:
        for module, name, device, dtype in placed:
            if name in module._parameters and module._parameters[name] is not None:
                param = module._parameters[name]
                if (param.device, param.dtype) != (device, dtype):
                    param.data = param.data.to(device, dtype)
                    if param.grad is not None:
                        param.grad = param.grad.to(device, dtype)
            elif module._buffers.get(name) is not None:
                module._buffers[name] = module._buffers[name].to(device, dtype)


class _Search:
    def __init__(self, model, dataset, device, settings, methods, progress, clock) -> None:
        self.model, self.device, self.s = model.to(device).eval(), device, settings
        self.deadline = Deadline(settings.time_budget_s, clock)
        labelled = settings.labels == "auto" and has_labels(dataset)
        tune_idx, check_idx = split_indices(len(dataset), settings.check_fraction, settings.seed)
        specs = methods or [MethodSpec(name) for name in supported_methods(model)]
        pin = device.type == "cuda"
        self.tune_batches = loader(dataset, tune_idx, labelled, settings.batch_size, settings.workers, pin)
        self.check_batches = loader(dataset, check_idx, labelled, settings.batch_size, settings.workers, pin)
        dtype = AMP_DTYPES[settings.amp]
        space = search_space(model, specs, settings.keeps, settings.start_shifts)
        self.result = TuneResult(
            settings=settings, labelled=labelled, device=device_name(device),
            dtype=str(dtype or next(model.parameters()).dtype).replace("torch.", ""),
            dense_gmacs=dense_gmacs(model), candidates=space.candidates,
            tune_images=len(tune_idx), check_images=len(check_idx), notes=space.notes())
        if not labelled:
            self.result.notes.append("no labels" + (" used (--labels none)" if settings.labels == "none" else
                                     " in the data") + ": the budget is on agreement with the dense model's "
                                     "predictions (% of images with the same top-1), not on accuracy")
        self.bar = Progress(progress, settings.time_budget_s)

    # ---------------------------------------------------------------------------------------------------------
    def run(self) -> None:
        r, s = self.result, self.s
        self.bar.say("decoding the tuning split")
        self.tune_batches = decoded_once(self.tune_batches)
        self.bar.say("timing the dense model")
        dense = benchmark(self.model, [MethodSpec("dense")], s.batch_size, self.device, amp=s.amp, runs=1, warmup=1)
        self.deadline.image_s = dense[0].ms_per_batch / 1000 / s.batch_size
        r.dense_img_per_s = dense[0].img_per_s
        self.live = live = self._prune_by_macs()
        # the methods' defaults first, timed and evaluated: an answer early, and the comparison for the choice
        defaults = [c for c in live if c.default]
        self._screen(defaults)
        if self._evaluate([c for c in defaults if c.screen_speedup is not None], later=len(live) // 4):
            self._screen([c for c in live if not c.default])
        screened = [c for c in live if c.screen_speedup is not None]
        if screened and not r.stopped:
            if s.max_drop is not None:
                self._bisect(screened)
            else:
                self._fastest_enough(screened)
        self._finish()
        r.elapsed_s = self.deadline.elapsed()

    def _prune_by_macs(self) -> list[Candidate]:
        r, s = self.result, self.s
        floor = 1.0 if s.min_speedup is None else s.min_speedup / MACS_MARGIN
        live = [c for c in r.candidates if r.dense_gmacs / c.gmacs > max(floor, 1.0 + 1e-9)]
        pruned = r.macs_pruned = len(r.candidates) - len(live)
        if pruned:
            why = "save no MACs" if s.min_speedup is None else (
                f"have a MACs ratio below {floor:.2f} ({s.min_speedup:g}x / {MACS_MARGIN} margin) or save none")
            r.notes.append(f"{pruned} of {len(r.candidates)} configurations dropped before any measurement: they {why}")
        if not live:
            r.notes.append("no configuration is left to measure")
        return sorted(live, key=lambda c: c.gmacs)  # the most MACs saved first

    # --- stage 2: the quick interleaved benchmark ----------------------------------------------------------------
    def _screen(self, todo: list[Candidate]) -> None:
        for start in range(0, len(todo), GROUP):
            group = todo[start:start + GROUP]
            timed = sum(c.screen_speedup is not None for c in self.live)
            self._plan(screen_left=len(self.live) - timed)
            cost = self._bench_cost(group, self.s.screen_runs)
            if not self._fits(cost, f"the quick benchmark ({timed} of {len(self.live)} configurations timed)"):
                return
            with self.deadline.timed(cost):
                results = benchmark(self.model, [MethodSpec("dense")] + [c.spec() for c in group], self.s.batch_size,
                                    self.device, amp=self.s.amp, runs=self.s.screen_runs, warmup=1)
            for c, b in zip(group, results[1:]):
                c.screen_speedup, c.img_per_s = b.speedup, b.img_per_s
            self.bar.advance(cost, f"timed {timed + len(group)}/{len(self.live)}")

    def _bench_cost(self, group: list[Candidate], runs: int) -> float:
        forwards = 1 + sum(1 / self._speed_guess(c) for c in group)
        return self.deadline.forwards((runs + 1) * self.s.batch_size * forwards)

    def _speed_guess(self, c: Candidate) -> float:
        return c.best_speedup or self.result.dense_gmacs / c.gmacs

    # --- stage 3: accuracy on the tuning split -----------------------------------------------------------------
    def _lines(self, screened: list[Candidate]) -> list[list[Candidate]]:
        lines: dict = {}
        for c in screened:
            lines.setdefault(c.line, []).append(c)
        return [sorted(cands, key=lambda c: c.keep) for cands in lines.values()]

    def _bisect(self, screened: list[Candidate]) -> None:
        """Per line, the smallest keep within the budget: keeps [lo, hi) are undecided, hi the lowest known to be
        within it. A line whose undecided keeps were all slower than the best found (beyond the noise) stops."""
        lines = [[cands, 0, len(cands)] for cands in self._lines(screened)]
        while True:
            best = max((c.screen_speedup for c in self.result.evaluated() if self.result.qualifies(c)), default=0.0)
            probes = []
            for state in lines:
                self._settle(state)
                cands, lo, hi = state
                if lo < hi and max(c.screen_speedup for c in cands[lo:hi]) < best * (1 - SPEED_NOISE):
                    state[1] = hi  # cannot beat the best found: done
                elif lo < hi:
                    probes.append(cands[(lo + hi) // 2])
            if not probes:
                return
            rounds_left = max(math.ceil(math.log2(hi - lo + 1)) for _, lo, hi in lines if lo < hi)
            if not self._evaluate(sorted(probes, key=lambda c: -c.screen_speedup), later=len(probes) * rounds_left):
                return

    def _settle(self, state: list) -> None:
        """Narrow a line's undecided keeps by the evaluations already made on it (the defaults, earlier probes):
        a keep within the budget settles every larger keep, one beyond it every smaller keep."""
        cands, lo, hi = state
        for i in range(lo, hi):
            if self.result.value(cands[i]) is None:
                continue
            if self.result.within_budget(cands[i]):
                hi = i
                break
            lo = i + 1
        state[1:] = [lo, hi]

    def _fastest_enough(self, screened: list[Candidate]) -> None:
        """Per line, the two largest keeps whose quick speed-up reaches the target (within the noise): accuracy
        grows with keep, so the smaller keeps of a line cannot be more accurate."""
        threshold = self.s.min_speedup * (1 - SPEED_NOISE)
        probes = []
        for cands in self._lines(screened):
            probes += [c for c in cands if c.screen_speedup >= threshold][-2:][::-1]
        if not probes:
            self.result.notes.append(f"no configuration reached {threshold:.2f}x in the quick benchmark")
        self._evaluate(sorted(probes, key=lambda c: -c.gmacs), later=0)

    def _evaluate(self, probes: list[Candidate], later: int) -> bool:
        """Accuracy of ``probes`` on the tuning split, GROUP at a time; False when the time budget stopped it."""
        r = self.result
        for start in range(0, len(probes), GROUP):
            group = probes[start:start + GROUP]
            with_dense = r.dense_tune is None
            self._plan(probes_left=len(probes) - start + later)
            cost = self._accuracy_cost(group, r.tune_images, with_dense)
            if not self._fits(cost, f"accuracy ({len(r.evaluated())} configurations evaluated)"):
                return False
            specs = ([MethodSpec("dense")] if with_dense else []) + [c.spec() for c in group]
            with self.deadline.timed(cost):
                table = accuracy_table(self.model, specs, self.tune_batches, self.device, self.s.amp)
            if with_dense:
                r.dense_tune = table[0][0] if r.labelled else 100.0
                table = table[1:]
            for c, (top1, _, agreement) in zip(group, table):
                c.top1, c.agreement = (top1 if r.labelled else None), agreement
            best = self._best_so_far()
            self.bar.advance(cost, f"evaluated {len(r.evaluated())}" + (f", best {best}" if best else ""))
        return True

    def _accuracy_cost(self, group: list[Candidate], images: int, with_dense: bool) -> float:
        forwards = 1 + with_dense + sum(1 / self._speed_guess(c) for c in group)  # the reference runs every pass
        return self.deadline.forwards(images * forwards)

    def _best_so_far(self) -> str:
        r = self.result
        within = [c for c in r.evaluated() if r.qualifies(c)]
        if not within:
            return ""
        c = self._pick(within)
        return f"{c.describe()} {c.best_speedup:.2f}x {r.metric} {r.value(c):.2f}"

    def _pick(self, within: list[Candidate]) -> Candidate:
        """The fastest (max_drop) or the most accurate, then fastest (min_speedup)."""
        if self.s.max_drop is not None:
            return max(within, key=lambda c: c.best_speedup)
        return max(within, key=lambda c: (self.result.value(c), c.best_speedup))

    # --- stages 4 and 5: the final benchmark, the choice, the check split --------------------------------------
    def _finish(self) -> None:
        r, s = self.result, self.s
        evaluated = r.evaluated()
        if s.max_drop is not None:
            finalists = sorted((c for c in evaluated if r.within_budget(c)), key=lambda c: -c.screen_speedup)
        else:
            fast = [c for c in evaluated if c.screen_speedup >= s.min_speedup * (1 - SPEED_NOISE)]
            finalists = sorted(fast, key=lambda c: (-r.value(c), -c.screen_speedup))
        finalists = finalists[:s.finalists] or self._closest()
        if finalists:
            self._final_benchmark(finalists)
        within = [c for c in finalists if r.qualifies(c)]
        if within:
            r.chosen = self._pick(within)
        elif finalists:  # the smallest drop (max_drop, none within it), else the fastest of the finalists
            missed = s.max_drop is not None and not r.within_budget(finalists[0])
            r.closest = finalists[0] if missed else max(finalists, key=lambda c: c.best_speedup)
        target = r.chosen or r.closest
        if target is not None:
            self._check(target)

    def _closest(self) -> list[Candidate]:
        """The nearest miss: the smallest drop (max_drop), or the highest speed-up (min_speedup)."""
        r = self.result
        if self.s.max_drop is not None:
            pool = r.evaluated()
            return [min(pool, key=lambda c: (r.drop(c), -c.screen_speedup))] if pool else []
        pool = [c for c in r.evaluated() if c.best_speedup is not None] or [
            c for c in r.candidates if c.best_speedup is not None]
        return [max(pool, key=lambda c: c.best_speedup)] if pool else []

    def _final_benchmark(self, finalists: list[Candidate]) -> None:
        r, s = self.result, self.s
        runs = s.runs
        per_round = self._bench_cost(finalists, 0)
        check = self._accuracy_cost(finalists[:1], r.check_images, True)
        if not self.deadline.fits(per_round * (runs + 1) + check):
            runs = int((self.deadline.left() / SAFETY - check) / max(per_round, 1e-9)) - 1
            if runs < min(s.runs, MIN_FINAL_RUNS):
                r.notes.append("speed-ups are the quick benchmark's: the time budget left no room for the final one")
                r.stopped = r.stopped or "time budget"
                return
            r.notes.append(f"the final benchmark ran {runs} rounds, not {s.runs}: the time budget")
        self.bar.say(f"final benchmark of {len(finalists)}")
        results = benchmark(self.model, [MethodSpec("dense")] + [c.spec() for c in finalists], s.batch_size,
                            self.device, amp=s.amp, runs=runs, warmup=1)
        r.dense_img_per_s = results[0].img_per_s
        for c, b in zip(finalists, results[1:]):
            c.speedup, c.img_per_s = b.speedup, b.img_per_s

    def _check(self, target: Candidate) -> None:
        r = self.result
        if not self.deadline.fits(self._accuracy_cost([target], r.check_images, True)):
            r.notes.append("the check split was not evaluated: the time budget ran out (give a longer --time-budget "
                           "for an accuracy figure on images the search did not see)")
            r.stopped = r.stopped or "time budget"
            return
        self.bar.say("check split")
        table = accuracy_table(self.model, [MethodSpec("dense"), target.spec()], self.check_batches, self.device,
                               self.s.amp)
        value = (lambda row: row[0]) if r.labelled else (lambda row: row[2])
        r.check = CheckScore(r.check_images, value(table[0]), value(table[1]))

    # --- the time budget -------------------------------------------------------------------------------------
    def _reserve(self) -> float:
        """What the end needs at least: a short final benchmark of the finalists (it runs longer when there is
        time) and the check split."""
        r, s = self.result, self.s
        finals = self.deadline.forwards((min(s.runs, MIN_FINAL_RUNS) + 1) * s.batch_size * (1 + 0.8 * s.finalists))
        return finals + self.deadline.forwards(r.check_images * 2.8)

    def _fits(self, cost: float, where: str) -> bool:
        r = self.result
        if r.stopped is None and self.deadline.fits(cost + self._reserve()):
            return True
        if r.stopped is not None:
            return False
        r.stopped = "time budget"
        r.notes.append(f"the time budget ({format_duration(self.s.time_budget_s)}) stopped the search during "
                       f"{where}; the answer is the best so far")
        return False

    def _plan(self, screen_left: int = 0, probes_left: int = 0) -> None:
        """Re-estimate the work left for the progress bar: benchmarks, accuracy passes, the reserve."""
        r, s = self.result, self.s
        screen = self.deadline.forwards((s.screen_runs + 1) * s.batch_size * (screen_left * 0.8
                                        + math.ceil(screen_left / GROUP)))
        accuracy = self.deadline.forwards(r.tune_images * (probes_left * 0.8 + math.ceil(probes_left / GROUP)))
        self.bar.plan(min(screen + accuracy + self._reserve(), max(self.deadline.left(), 0.0)))
