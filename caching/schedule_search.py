"""A calibrated compute schedule: which steps a static cache computes, chosen on calibration samples.

A static policy (FORA, TaylorSeer, FoCa) computes every N-th step. Features do not change at one
pace along a trajectory, though: they move fastest in the first steps and in the last ones, so
with the same number of computed steps a non-uniform placement forecasts better. This searches
the placement, as `samplers.optimized` searches a solver's noise levels: coordinate descent
moves each computed step (but the first, which every cache must compute) to every free step
between its neighbours and keeps a move only when it lowers the error of the cached run against
the full-compute run of the same calibration samples. The budget (how many steps are computed)
never changes, so neither do the FLOPs. The result is a tuple of trajectory fractions for
`IntervalTrigger(steps=...)` (preset parameter `steps`).

`search_forecast_gains` then calibrates the forecast itself on the same samples: one multiplier
per segment of the Taylor extrapolation between computed steps (`TaylorUpdate.gains`, preset
parameter `gains`). Neither search changes the FLOPs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from tqdm import tqdm

from .apply import apply_cache, remove_cache
from .config import CacheConfig


@dataclass(frozen=True)
class ComputeSchedule:
    """The computed steps of a run of `num_steps` steps, found by `search_compute_steps`.

    Attributes:
        steps: computed step indices, increasing, starting at 0.
        num_steps: the run length they were searched for.
        objective: mean per-sample log MSE of the cached run against the full-compute run.
        initial_objective: the same for the starting placement.
        trials: cached runs evaluated.
    """

    steps: tuple[int, ...]
    num_steps: int
    objective: float
    initial_objective: float
    trials: int

    def fractions(self) -> tuple[float, ...]:
        """The steps as trajectory fractions (`IntervalTrigger.steps`); exact for `num_steps`."""
        return tuple(step / self.num_steps for step in self.steps)


def _log_error(images: torch.Tensor, reference: torch.Tensor) -> float:
    errors = (images.double() - reference.double()).pow(2).flatten(1).mean(1)
    return float(errors.clamp_min(1e-20).log().mean())


class _Trials:
    """The calibration objective of cached runs (apply `config`, run, remove the cache), counted and
    shown as a transient progress bar (only on a terminal). A given `trial` replaces the built-in
    objective: it is called with `config_for`'s result and returns the error itself."""

    def __init__(self, model: torch.nn.Module | None, run_fn: Callable[[], torch.Tensor] | None,
                 reference: torch.Tensor | None, desc: str, trial: Callable[[Any], float] | None = None) -> None:
        self.model, self.run_fn, self.reference, self.trial = model, run_fn, reference, trial
        self.count = 0
        self.bar = tqdm(desc=desc, unit="run", leave=False, disable=None if trial is None else True)

    def __call__(self, config: CacheConfig) -> float:
        self.count += 1
        self.bar.update()
        if self.trial is not None:
            return self.trial(config)
        apply_cache(self.model, config)
        try:
            return _log_error(self.run_fn(), self.reference)
        finally:
            remove_cache(self.model)


@torch.no_grad()
def search_compute_steps(model: torch.nn.Module | None, config_for: Callable[[tuple[float, ...]], Any],
                         run_fn: Callable[[], torch.Tensor] | None, reference: torch.Tensor | None,
                         initial_steps: Sequence[int], num_steps: int, *, sweeps: int = 2,
                         log: Callable[[str], None] | None = None,
                         trial: Callable[[Any], float] | None = None) -> ComputeSchedule:
    """Moves each computed step between its neighbours to minimise the cached run's error.

    Args:
        model: the module the cache is applied to (a bare one: no cache installed).
        config_for: `config_for(fractions)` -> the CacheConfig computing exactly those steps
            (warm-up and cool-down 0, so that only the placement decides).
        run_fn: generates the calibration samples (N, ...) with the step context published, for a
            run of `num_steps` steps.
        reference: (N, ...) the same samples without a cache.
        initial_steps: the starting placement (step 0 is added); its length is the budget.
        num_steps: steps of the run.
        sweeps: passes over the computed steps (stops early when a pass gains < 1e-3 in the log).
        log: optional `log(message)` after each pass.
        trial: optional `trial(config_for(fractions)) -> error` replacing the built-in objective
            (then `model`, `run_fn` and `reference` are unused): e.g. a whole pipeline run through
            `accel.apply`, journaled (`accel calibrate`).

    Returns:
        The ComputeSchedule.
    """
    steps = sorted(set(initial_steps) | {0})
    if steps[-1] >= num_steps:
        raise ValueError(f"initial_steps {list(initial_steps)} reach past a run of {num_steps} steps")
    trials = _Trials(model, run_fn, reference, "compute-schedule search", trial)

    def error_of(candidate: list[int]) -> float:
        return trials(config_for(tuple(s / num_steps for s in candidate)))

    best = initial = error_of(steps)
    for sweep in range(sweeps):
        start = best
        for index in range(1, len(steps)):
            upper = steps[index + 1] if index + 1 < len(steps) else num_steps
            for position in range(steps[index - 1] + 1, upper):
                if position == steps[index]:
                    continue
                candidate = steps[:index] + [position] + steps[index + 1:]
                error = error_of(candidate)
                if error < best:
                    steps, best = candidate, error
        if log is not None:
            log(f"compute-schedule sweep {sweep + 1}: log MSE {best:.4f} (start {initial:.4f}), steps {steps}")
        if best > start - 1e-3:
            break
    trials.bar.close()
    return ComputeSchedule(tuple(steps), num_steps, best, initial, trials.count)


@dataclass(frozen=True)
class ForecastGains:
    """Per-segment gains of a Taylor forecast, found by `search_forecast_gains`.

    Attributes:
        gains: multipliers of the derivative terms, one per segment after the 2nd, 3rd, ...
            computed step (`TaylorUpdate.gains`).
        objective: mean per-sample log MSE of the cached run against the full-compute run.
        initial_objective: the same with every gain 1 (the plain Taylor forecast).
        trials: cached runs evaluated.
    """

    gains: tuple[float, ...]
    objective: float
    initial_objective: float
    trials: int


@torch.no_grad()
def search_forecast_gains(model: torch.nn.Module | None, config_for: Callable[[tuple[float, ...]], Any],
                          run_fn: Callable[[], torch.Tensor] | None, reference: torch.Tensor | None, segments: int, *,
                          deltas: Sequence[float] = (0.2, 0.1, 0.05), sweeps: int = 2,
                          log: Callable[[str], None] | None = None,
                          trial: Callable[[Any], float] | None = None) -> ForecastGains:
    """Scales each segment's Taylor extrapolation to minimise the cached run's error.

    A finite-difference forecast over a long run of cached steps overshoots where the features
    bend (and undershoots where they speed up). One gain per segment between computed steps,
    searched like the placement: for each segment in turn, step its gain by +-delta while the
    error of the cached run against the full-compute run drops, for each delta from coarse to fine.

    Args:
        model: the module the cache is applied to (a bare one: no cache installed).
        config_for: `config_for(gains)` -> the CacheConfig with those `TaylorUpdate.gains`.
        run_fn: generates the calibration samples (N, ...) with the step context published.
        reference: (N, ...) the same samples without a cache.
        segments: gains to search (computed steps - 1 for a run with a fixed compute schedule).
        deltas: gain increments, coarse to fine.
        sweeps: passes over the segments (stops early when a pass gains < 1e-3 in the log).
        log: optional `log(message)` after each pass.
        trial: optional `trial(config_for(gains)) -> error` replacing the built-in objective (as in
            `search_compute_steps`).

    Returns:
        The ForecastGains.
    """
    if segments < 1:
        raise ValueError(f"segments={segments!r}: a forecast needs >= 2 computed steps to have a gain to search")
    trials = _Trials(model, run_fn, reference, "forecast-gains search", trial)

    def error_of(candidate: tuple[float, ...]) -> float:
        return trials(config_for(candidate))

    gains = (1.0,) * segments
    best = initial = error_of(gains)
    for sweep in range(sweeps):
        start = best
        for segment in range(segments):
            for delta in deltas:
                gains, best = _walk_gain(error_of, gains, best, segment, delta)
        if log is not None:
            log(f"forecast-gains sweep {sweep + 1}: log MSE {best:.4f} (start {initial:.4f}), gains {list(gains)}")
        if best > start - 1e-3:
            break
    trials.bar.close()
    return ForecastGains(gains, best, initial, trials.count)


def _walk_gain(error_of: Callable[[tuple[float, ...]], float], gains: tuple[float, ...], best: float,
               segment: int, delta: float) -> tuple[tuple[float, ...], float]:
    """Moves gains[segment] by +-delta (within [0, 4]) while the error drops."""
    while True:
        for value in (gains[segment] + delta, gains[segment] - delta):
            value = round(value, 6)
            if not 0.0 <= value <= 4.0:
                continue
            candidate = gains[:segment] + (value,) + gains[segment + 1:]
            error = error_of(candidate)
            if error < best:
                gains, best = candidate, error
                break
        else:
            return gains, best
