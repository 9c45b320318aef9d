"""The configurations ``tune`` searches: methods x keep x where selection starts (x Evo's mode), each with its
analytic MACs. Candidates of one *line* differ only in keep."""
from __future__ import annotations

from dataclasses import dataclass, replace

from torch import nn

from ..bench import MethodSpec, configure, restored
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
    field = START_FIELD[config.name]
    return replace(config, **{field: layers[0] if field == "layer" else layers})


def candidates(model: nn.Module, specs: list[MethodSpec], keeps: tuple[float, ...],
               shifts: tuple[int, ...]) -> list[Candidate]:
    """Every configuration of the search with its MACs: per method spec, each keep (unless the spec sets one),
    the default selection layers shifted by each of ``shifts`` blocks (unless the spec sets them), and for Evo both
    modes (unless the spec sets one). Shifts that leave the model are skipped; configurations that compute the same
    (equal configs, one line with equal MACs, i.e. equal token counts, or Evo's two modes where they coincide) are
    kept once."""
    found: list[Candidate] = []
    seen: set = set()
    with restored(model):
        for spec in specs:
            given = spec.method_options()
            modes = [given.get("mode", "stage")] if spec.method != "evo" or "mode" in given else list(MODES)
            # the method's default keep, not a keep the user fixed (--keep 0.5 is not Idle's default)
            default = _applied(model, make_config(spec.method, **{k: v for k, v in given.items() if k != "keep"}))
            for mode in modes:
                base = make_config(spec.method, **{**given, **({"mode": mode} if spec.method == "evo" else {})})
                starts = [base] if START_FIELD[spec.method] in given else _shifted(base, model, shifts)
                for start in starts:
                    for keep in ([base.keep] if "keep" in given else keeps):
                        try:
                            configure(model, replace(start, keep=keep))
                        except ValueError:  # selection layers this model does not have
                            continue
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
    if not found:
        raise TokenpaceError("no configuration to search: every selection layer shift leaves the model; accepted "
                             "shifts keep the layers inside it (e.g. --start-shifts 0)")
    return found


def _applied(model: nn.Module, config: MethodConfig) -> tuple[MethodConfig, float]:
    """``config`` as applied to ``model`` with its selection layers explicit, and its MACs."""
    configure(model, with_layers(config, selection_layers(config, model)))
    return get_patch(model).config, macs(model) / 1e9


def _same_work(config: MethodConfig, default: tuple[MethodConfig, float], gmacs: float) -> bool:
    """``config`` computes what ``default`` does: equal, or on its line with equal MACs (equal token counts)."""
    return config == default[0] or (replace(config, keep=None) == replace(default[0], keep=None)
                                    and round(gmacs, 9) == round(default[1], 9))


def _shifted(config: MethodConfig, model: nn.Module, shifts: tuple[int, ...]) -> list[MethodConfig]:
    layers = selection_layers(config, model)
    return [with_layers(config, tuple(layer + shift for layer in layers)) for shift in shifts]


def dense_gmacs(model: nn.Module) -> float:
    with restored(model):
        return macs(configure(model, None)) / 1e9
