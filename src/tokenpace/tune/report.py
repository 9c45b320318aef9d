"""What ``tune`` reports: the summary and Pareto table, the plot (accuracy against measured speed-up, the chosen
point marked), ``tokenpace.json`` (the choice and what was measured) and ``search.json`` (every candidate)."""
from __future__ import annotations

import dataclasses
import json
import os

from ..bench import speedup_text, versions
from ..config_io import save_config
from ..errors import TokenpaceError
from ..evaluate import save_plot
from .clock import format_duration
from .search import TuneResult
from .space import Candidate

CONFIG_FILE, SEARCH_FILE, PLOT_FILE = "tokenpace.json", "search.json", "frontier.png"
OUTPUT_FILES = (CONFIG_FILE, SEARCH_FILE, PLOT_FILE)  # what a search may leave in its folder


def verdict(r: TuneResult) -> str:
    """One line: what was chosen, or that nothing meets the budget and which configuration came closest."""
    s = r.settings
    if r.chosen is not None:
        c = r.chosen
        return (f"chosen: {c.describe()}: {speedup_text(c.best_speedup)} against dense, "
                f"{r.metric} {r.value(c):.2f} on the tuning split (dense {r.dense_tune:.2f})")
    c = r.closest
    if c is None:
        return "no configuration meets the budget: " + ("none was measured within the time budget" if r.stopped
                                                         else "every configuration was dropped by its MACs (see the notes)")
    value = f"{r.metric} {r.value(c):.2f} (dense {r.dense_tune:.2f})" if r.value(c) is not None else \
        f"{r.metric} not measured on the tuning split"
    if s.max_drop is not None and r.within_budget(c):
        return (f"no configuration meets the budget: none within {s.max_drop:g} points is faster than dense on this "
                f"device; the fastest within it: {c.describe()} at {speedup_text(c.best_speedup)}, {value}")
    if s.max_drop is not None:
        return (f"no configuration meets the budget: none is within {s.max_drop:g} points of dense on the tuning "
                f"split; the closest: {c.describe()}, {value}, {speedup_text(c.best_speedup)}")
    return (f"no configuration meets the budget: none reaches {s.min_speedup:g}x on this device; the closest: "
            f"{c.describe()} at {speedup_text(c.best_speedup)}, {value}")


def check_line(r: TuneResult) -> str | None:
    if r.check is None:
        return None
    c = r.check
    which = "the chosen configuration" if r.chosen is not None else "the closest one"
    text = (f"check split ({c.images} images the search never saw), {which}: {r.metric} {c.value:.2f} (dense "
            f"{c.dense:.2f}, drop {c.drop:+.2f} points)")
    if r.check_within_budget is True:
        return text + ": within the budget"
    if r.check_within_budget is False:
        return (text + f": beyond the {r.settings.max_drop:g}-point budget; the tuning split's figure did not hold "
                "on other images (use more images, or a smaller --max-drop)")
    return text


def summary(r: TuneResult, name: str) -> str:
    s = r.settings
    timed = sum(c.screen_speedup is not None for c in r.candidates)
    lines = [
        f"tokenpace tune: {name}, {r.tune_images} tuning + {r.check_images} check images, {r.device}, "
        f"batch {s.batch_size}, {r.dtype}",
        (f"budget: {r.metric} {s.budget_text()} on the tuning split" if s.max_drop is not None else
         f"budget: {s.budget_text()} (measured, interleaved with dense), the best {r.metric} among those"),
        f"searched {len(r.candidates)} configurations in {format_duration(r.elapsed_s)}: {r.macs_pruned} dropped by "
        f"their MACs, {timed} timed, {len(r.evaluated())} evaluated on the tuning split"
        + (" (stopped by the time budget)" if r.stopped else ""),
        *(f"note: {n}" for n in r.notes),
        "",
        frontier_table(r),
        "",
        verdict(r),
    ]
    line = check_line(r)
    return "\n".join(lines + ([line] if line else []))


def table_rows(r: TuneResult) -> list[Candidate]:
    """The frontier, the methods' defaults, and the chosen or closest configuration, by speed-up."""
    rows = {id(c): c for c in r.frontier()}
    for c in r.evaluated():
        if c.default or c is r.chosen or c is r.closest:
            rows[id(c)] = c
    if r.closest is not None:
        rows[id(r.closest)] = r.closest
    return sorted(rows.values(), key=lambda c: (c.best_speedup or 0.0))


def frontier_table(r: TuneResult) -> str:
    head = (f"{'method':<6} {'config':<40} {'GMACs':>7} {'quick':>6} {'final':>6} {r.metric:>9} {'vs dense':>8}  "
            "(Pareto frontier, defaults, the choice)")
    out = [head, "-" * len(head),
           f"{'dense':<6} {'-':<40} {r.dense_gmacs:>7.4g} {'1.00x':>6} {'1.00x':>6} "
           f"{_num(r.dense_tune):>9} {'':>8}"]
    front = {id(c) for c in r.frontier()}
    for c in table_rows(r):
        marks = [m for m, on in (("chosen", c is r.chosen), ("closest", c is r.closest), ("default", c.default),
                                 ("frontier", id(c) in front)) if on]
        drop = r.drop(c)
        out.append(f"{c.config.name:<6} {c.spec().describe(c.config):<40.40} {c.gmacs:>7.4g} "
                   f"{speedup_text(c.screen_speedup):>6} {speedup_text(c.speedup):>6} {_num(r.value(c)):>9} "
                   f"{'' if drop is None else f'{-drop:+.2f}':>8}  {', '.join(marks)}")
    return "\n".join(out)


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def plot_frontier(r: TuneResult, path: str, title: str) -> None:
    """The tuning-split metric against measured speed-up: every evaluated configuration, the frontier, the
    defaults, dense, the budget and the chosen point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    points = [c for c in r.evaluated() if c.best_speedup is not None]
    for method in dict.fromkeys(c.config.name for c in points):
        mine = [c for c in points if c.config.name == method]
        ax.scatter([c.best_speedup for c in mine], [r.value(c) for c in mine], s=14, alpha=0.6, label=method)
    front = r.frontier()
    ax.plot([c.best_speedup for c in front], [r.value(c) for c in front], color="grey", lw=1, label="frontier")
    defaults = [c for c in points if c.default]
    if defaults:
        ax.scatter([c.best_speedup for c in defaults], [r.value(c) for c in defaults], marker="s", s=50,
                   facecolors="none", edgecolors="black", label="method defaults")
    if r.dense_tune is not None:
        ax.scatter([1.0], [r.dense_tune], marker="*", s=140, color="black", zorder=5, label="dense")
    s = r.settings
    if s.max_drop is not None and r.dense_tune is not None:
        ax.axhline(r.dense_tune - s.max_drop, color="tab:red", ls="--", lw=1, label=f"budget (-{s.max_drop:g})")
    if s.min_speedup is not None:
        ax.axvline(s.min_speedup, color="tab:red", ls="--", lw=1, label=f"budget ({s.min_speedup:g}x)")
    mark = r.chosen or r.closest
    if mark is not None and mark.best_speedup is not None and r.value(mark) is not None:
        ax.scatter([mark.best_speedup], [r.value(mark)], marker="*", s=260, color="tab:red", zorder=6,
                   label="chosen" if r.chosen is not None else "closest (budget not met)")
        ax.annotate(mark.describe(), (mark.best_speedup, r.value(mark)), textcoords="offset points",
                    xytext=(5, -12), fontsize=7)
    save_plot(fig, ax, path, title, "speed-up against dense (measured, interleaved)",
              f"{r.metric} on the tuning split (%)")


def measured(r: TuneResult, c: Candidate) -> dict:
    """What the search measured of ``c``, as tokenpace.json records it."""
    s = r.settings
    check = None if r.check is None else {
        "images": r.check.images, "dense": r.check.dense, "value": r.check.value, "drop": r.check.drop,
        "within_budget": r.check_within_budget}
    return {
        "device": r.device, "batch_size": s.batch_size, "dtype": r.dtype, "amp": s.amp,
        "speedup": c.best_speedup, "speedup_from": "final" if c.speedup is not None else "quick",
        "img_per_s": c.img_per_s, "dense_img_per_s": r.dense_img_per_s, "gmacs": c.gmacs,
        "dense_gmacs": r.dense_gmacs, "metric": r.metric,
        "budget": {"max_drop": s.max_drop} if s.max_drop is not None else {"min_speedup": s.min_speedup},
        "tuning_split": {"images": r.tune_images, "dense": r.dense_tune, "value": r.value(c), "drop": r.drop(c)},
        "check_split": check, "search_s": round(r.elapsed_s, 1), "candidates": len(r.candidates),
        "stopped": r.stopped, "notes": r.notes,
    }


def candidate_json(r: TuneResult, c: Candidate) -> dict:
    return {"method": c.config.name, "config": c.spec().describe(c.config),
            "options": {k: v for k, v in dataclasses.asdict(c.config).items()}, "gmacs": c.gmacs,
            "quick_speedup": c.screen_speedup, "final_speedup": c.speedup, "img_per_s": c.img_per_s,
            "top1": c.top1, "agreement": c.agreement, "default": c.default, "chosen": c is r.chosen,
            "closest": c is r.closest}


def earlier_outputs(folder: str) -> list[str]:
    """The names of an earlier search's outputs in ``folder``; TokenpaceError when one is a folder (it cannot be
    replaced by a file)."""
    found = [name for name in OUTPUT_FILES if os.path.lexists(os.path.join(folder, name))]
    folders = [name for name in found if os.path.isdir(os.path.join(folder, name))]
    if folders:
        raise TokenpaceError(f"{os.path.join(folder, folders[0])!r} is a folder; tune writes a file of that name "
                             "there: move it, or choose another output folder")
    return found


def write_outputs(r: TuneResult, folder: str, model: dict, title: str) -> tuple[list[str], list[str]]:
    """tokenpace.json (only when a configuration meets the budget), search.json and frontier.png (only when something
    was evaluated) in ``folder``; ``model`` is what the files record about the model (config_io.model_record and how
    it was built). Returns (the paths written, the paths removed): an earlier search's tokenpace.json or
    frontier.png that this one does not rewrite is removed, so the folder never pairs its files with another
    search's."""
    earlier_outputs(folder)  # a folder in the way is refused before anything is removed
    os.makedirs(folder, exist_ok=True)
    rewritten = {SEARCH_FILE} | ({CONFIG_FILE} if r.chosen is not None else set()) | (
        {PLOT_FILE} if r.evaluated() else set())
    removed = []
    for name in OUTPUT_FILES:
        path = os.path.join(folder, name)
        if name not in rewritten and os.path.lexists(path):  # removed first: a failed write leaves no mix
            os.remove(path)
            removed.append(path)
    written = []
    if r.chosen is not None:
        path = os.path.join(folder, CONFIG_FILE)
        save_config(r.chosen.config, path, **model, measured=measured(r, r.chosen), versions=versions())
        written.append(path)
    path = os.path.join(folder, SEARCH_FILE)
    document = {**model, "settings": dataclasses.asdict(r.settings), "labelled": r.labelled, "metric": r.metric,
                "device": r.device, "dtype": r.dtype, "dense_gmacs": r.dense_gmacs, "dense_tune": r.dense_tune,
                "dense_img_per_s": r.dense_img_per_s, "tune_images": r.tune_images, "check_images": r.check_images,
                "search_s": round(r.elapsed_s, 1), "stopped": r.stopped, "notes": r.notes, "verdict": verdict(r),
                "chosen": None if r.chosen is None else measured(r, r.chosen),
                "closest": None if r.closest is None else measured(r, r.closest),
                "candidates": [candidate_json(r, c) for c in r.candidates], "versions": versions()}
    with open(path, "w") as f:
        json.dump(document, f, indent=2, allow_nan=False)
    written.append(path)
    if PLOT_FILE in rewritten:
        path = os.path.join(folder, PLOT_FILE)
        plot_frontier(r, path, title)
        written.append(path)
    return written, removed
