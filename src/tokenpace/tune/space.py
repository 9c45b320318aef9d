"""The configurations ``tune`` searches: methods x keep x where selection starts (x Evo's mode), each with its
analytic MACs. Candidates of one *line* differ only in keep."""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from torch import nn

from ..bench import MethodSpec, configure, restored
from ..core.schedule import EmptySelection
from ..errors import TokenpaceError
from ..families import adapter_for
from ..methods import MethodConfig, make_config
from ..methods.evo import MODES
from ..patch import get_patch, macs

# The field that says where each method selects (TopK's is one layer, the others a tuple)
START_FIELD = {"evo": "stage_starts", "idle": "stage_starts", "evit": "layers", "topk": "layer"}


@dataclass
class Candidate:
    """One configuration and what the search measured of it (None: not measured)."""

    config: MethodConfig  # as applied to the model: keep and selection layers explicit
    gmacs: float
    screen_speedup: float | None = None  # the quick interleaved benchmark every candidate gets
    speedup: float | None = None  # the final interleaved benchmark (finalists only)
    img_per_s: float | None = None  # from the latest benchmark it took part in
    top1: float | None = None  # on the tuning split, in %
    agreement: float | None = None  # % of tuning images where the prediction equals the dense model's
    default: bool = False  # the method's default configuration on this model (keep, layers, mode)

    @property
    def line(self) -> MethodConfig:
        """The configuration without its keep: the candidates of a line differ only in keep."""
        return replace(self.config, keep=None)

    @property
    def keep(self) -> float:
        return self.config.keep

    @property
    def best_speedup(self) -> float | None:
        """The final benchmark's speed-up where there is one, else the screen's."""
        return self.speedup if self.speedup is not None else self.screen_speedup

    def spec(self) -> MethodSpec:
        return MethodSpec.from_config(self.config)

    def describe(self) -> str:
        return f"{self.config.name} {self.spec().describe(self.config)}"


def selection_layers(config: MethodConfig, model: nn.Module) -> tuple[int, ...]:
    """The layers where ``config`` selects tokens on ``model``, its defaults resolved."""
    family = adapter_for(model)
    resolved = config.resolved(family)
    if resolved.name == "evo":
        return resolved.resolved_stage_starts(family)
    if resolved.name == "idle":
        return resolved.resolved_stage_starts(family.depth)
    if resolved.name == "evit":
        return resolved.resolved_layers(family.depth)
    return (resolved.resolved_layer(family.depth),)


def with_layers(config: MethodConfig, layers: tuple[int, ...]) -> MethodConfig:
    name = START_FIELD[config.name]
    return replace(config, **{name: layers[0] if name == "layer" else layers})


@dataclass
class SearchSpace:
    """The configurations to search, and per method the start shifts left out because the method refuses the
    selection layers they give (layers outside the model: reported, not left out unmentioned)."""

    candidates: list[Candidate]
    skipped: dict[str, dict[int, str]]  # method name: {shift: why the method refused the shifted layers}
    empty_keeps: dict[str, dict[float, str]] = field(default_factory=dict)  # method: {keep: why} (no token kept)

    @property
    def skipped_shifts(self) -> dict[str, tuple[int, ...]]:
        return {method: tuple(sorted(why)) for method, why in self.skipped.items()}

    def notes(self) -> list[str]:
        notes = []
        for method, shifts in self.skipped_shifts.items():
            first = shifts[0]
            notes.append(f"start shift{'s' if len(shifts) > 1 else ''} {', '.join(f'{s:+d}' for s in shifts)} "
                         f"skipped for {method} (at {first:+d}: {self.skipped[method][first]})")
        for method, why in self.empty_keeps.items():
            keeps = sorted(why)
            notes.append(f"{method} with keep {', '.join(f'{k:g}' for k in keeps)} skipped where a block would keep "
                         f"no token (e.g. {why[keeps[0]]})")
        return notes


def candidates(model: nn.Module, specs: list[MethodSpec], keeps: tuple[float, ...],
               shifts: tuple[int, ...]) -> list[Candidate]:
    """The configurations of :func:`search_space`."""
    return search_space(model, specs, keeps, shifts).candidates


def search_space(model: nn.Module, specs: list[MethodSpec], keeps: tuple[float, ...],
                 shifts: tuple[int, ...]) -> SearchSpace:
    """Every configuration of the search with its MACs: per method spec, each keep (unless the spec sets one),
    the default selection layers shifted by each of ``shifts`` blocks (unless the spec sets them), and for Evo both
    modes (unless the spec sets one). Shifts that leave the model are skipped and recorded per method;
    configurations that compute the same (equal configs, one line with equal MACs, i.e. equal token counts, or
    Evo's two modes where they coincide) are kept once."""
    found: list[Candidate] = []
    seen: set = set()
    refused: dict[str, dict[int, str]] = {}  # per method: the shifts the method refused, and why
    fitted: dict[str, set[int]] = {}  # per method: the shifts that gave at least one configuration
    empty: dict[str, dict[float, str]] = {}  # per method: the keeps that left a block no token, and why
    with restored(model):
        for spec in specs:
            given = spec.method_options()
            modes = [given.get("mode", "stage")] if spec.method != "evo" or "mode" in given else list(MODES)
            # the method's default keep, not a keep the user fixed (--keep 0.5 is not Idle's default)
            try:
                default = _applied(model, make_config(spec.method, **{k: v for k, v in given.items() if k != "keep"}))
            except EmptySelection:  # the default keep leaves a block no token here: no candidate is the default
                default = (None, float("nan"))
            for mode in modes:
                base = make_config(spec.method, **{**given, **({"mode": mode} if spec.method == "evo" else {})})
                starts = [(None, base)] if START_FIELD[spec.method] in given else _shifted(base, model, shifts)
                for shift, start in starts:
                    for keep in ([base.keep] if "keep" in given else keeps):
                        try:
                            configure(model, replace(start, keep=keep))
                        except EmptySelection as err:  # a keep too small for this model's token counts
                            empty.setdefault(spec.method, {}).setdefault(keep, str(err))
                            continue
                        except ValueError as err:  # selection layers this model does not have
                            if shift is not None:
                                refused.setdefault(spec.method, {}).setdefault(shift, str(err))
                            continue
                        if shift is not None:
                            fitted.setdefault(spec.method, set()).add(shift)
                        applied = get_patch(model).config
                        gmacs = macs(model) / 1e9
                        same_counts = (replace(applied, keep=None), round(gmacs, 9))
                        if applied in seen or same_counts in seen:
                            continue
                        if (len(modes) == 2 and applied.mode == "layer" and replace(applied, mode="stage") in seen
                                and applied.modes_coincide(adapter_for(model))):
                            continue  # stage mode's twin, found already
                        seen.update((applied, same_counts))
                        found.append(Candidate(applied, gmacs, default=_same_work(applied, default, gmacs)))
    skipped = {method: {shift: why for shift, why in shifts.items() if shift not in fitted.get(method, set())}
               for method, shifts in refused.items()}
    space = SearchSpace(found, {method: shifts for method, shifts in skipped.items() if shifts}, empty)
    if not found:
        raise TokenpaceError("no configuration to search: " + "; ".join(space.notes()) + "; accepted: start shifts "
                             "that keep the layers inside the model (e.g. --start-shifts 0) and keeps that leave "
                             "every block a token")
    return space


def _applied(model: nn.Module, config: MethodConfig) -> tuple[MethodConfig, float]:
    """``config`` as applied to ``model`` with its selection layers explicit, and its MACs."""
    configure(model, with_layers(config, selection_layers(config, model)))
    return get_patch(model).config, macs(model) / 1e9


def _same_work(config: MethodConfig, default: tuple[MethodConfig, float], gmacs: float) -> bool:
    """``config`` computes what ``default`` does: equal, or on its line with equal MACs (equal token counts)."""
    return config == default[0] or (replace(config, keep=None) == replace(default[0], keep=None)
                                    and round(gmacs, 9) == round(default[1], 9))


def _shifted(config: MethodConfig, model: nn.Module, shifts: tuple[int, ...]) -> list[tuple[int, MethodConfig]]:
    layers = selection_layers(config, model)
    return [(shift, with_layers(config, tuple(layer + shift for layer in layers))) for shift in shifts]


def dense_gmacs(model: nn.Module) -> float:
    with restored(model):
        return macs(configure(model, None)) / 1e9
