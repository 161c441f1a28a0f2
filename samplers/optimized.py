"""Optimised schedules: timesteps chosen to minimise the error against a fine-step reference.

Given a model, a solver and an NFE budget, `optimize_schedule` starts from a named schedule and
moves each interior noise level in turn (coordinate descent), searching it by golden section
between its two neighbours in flow time tau = s / (alpha + s). The walk stays strictly decreasing
by construction, the endpoints (the start level and 0) stay fixed, and a move is kept only if it
lowers the calibration objective. The result is saved to a small JSON file next to the model and is
loaded by the registered schedule "optimized" (samplers.schedules.get_sigmas_optimized).

Cost: every candidate walk shares the model evaluations before the moved level with the current
best walk, and those are reused exactly (`_PrefixCache`), which halves the model calls of a sweep.
Against over-fitting a few calibration samples the objective is the mean per-sample log error (the
benchmark's mean PSNR, not dominated by one hard sample) and, optionally, a price on moving away
from the starting walk (`penalty`).
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

import torch

from samplers.api import make_sigmas, resolve_steps
from samplers.levels import level, level_at_tau
from samplers.loop import run_solver
from samplers.registry import SolverSpec, get_solver
from samplers.schedules import OptimizedSchedule

_GOLDEN = (math.sqrt(5) - 1) / 2
OBJECTIVES = ("psnr", "mse")


def _start(denoiser, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """The first point of a walk from `noise`, s(sigma_0) * noise, as `samplers.sample` starts."""
    _, scale = denoiser.alpha_sigma(sigmas[0].to(torch.float64))
    return noise * float(scale)


class _PrefixCache:
    """A denoiser that returns the stored x0 when called again at the same (sigma, x) bytes.

    Exact: a hit needs bit-identical inputs, and the denoiser must be a pure function of (x, sigma)
    for the search's fixed conditioning (not e.g. CFG with uncond reuse across steps, whose output
    depends on earlier calls). Keeps the `capacity` most recent results.
    """

    def __init__(self, denoiser, capacity: int = 256):
        self.denoiser = denoiser
        self.schedule = denoiser.schedule
        self.prediction_type = denoiser.prediction_type
        self.capacity = capacity
        self.calls = 0
        self.hits = 0
        self._store: OrderedDict[tuple, torch.Tensor] = OrderedDict()

    def alpha_sigma(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.denoiser.alpha_sigma(sigma)

    def __call__(self, x: torch.Tensor, sigma, **cond) -> torch.Tensor:
        raw = x.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()
        key = (float(sigma), str(x.dtype), tuple(x.shape), hashlib.blake2b(raw, digest_size=16).digest())
        self.calls += 1
        if key in self._store:
            self.hits += 1
            self._store.move_to_end(key)
            return self._store[key]
        x0 = self.denoiser(x, sigma, **cond)
        self._store[key] = x0
        if len(self._store) > self.capacity:
            self._store.popitem(last=False)
        return x0


@dataclass
class _Objective:
    """Calibration objective of one schedule against the reference samples.

    "psnr": mean over samples of log(per-sample MSE) (minimising it maximises the mean PSNR);
    "mse": the pooled MSE. Either is multiplied by 1 + penalty * sum((tau - tau_start)^2) over the
    interior levels.
    """

    denoiser: _PrefixCache
    spec: SolverSpec
    noise: torch.Tensor
    reference: torch.Tensor
    cond: dict
    solver_options: dict
    kind: str = "psnr"
    penalty: float = 0.0
    start_taus: list[float] = field(default_factory=list)
    calls: int = 0
    ratio_penalty: float = 0.0

    @torch.no_grad()
    def errors(self, sigmas: torch.Tensor) -> torch.Tensor:
        """Per-sample MSE (B,) of the solver on this walk."""
        self.calls += 1
        core = self.spec.make_steps(_start(self.denoiser, self.noise, sigmas), sigmas, self.denoiser.schedule,
                                    **self.solver_options)
        out = run_solver(core, self.denoiser, sigmas, order=self.spec.order, cond=self.cond)
        return (out.double() - self.reference.double()).pow(2).flatten(1).mean(1)

    def __call__(self, sigmas: torch.Tensor, errors: torch.Tensor | None = None) -> float:
        errors = self.errors(sigmas) if errors is None else errors
        value = unpenalized(errors, self.kind)
        if self.penalty:
            taus = [level(self.denoiser.schedule, float(s)).tau for s in sigmas[1:-1]]
            value += math.log1p(self.penalty * sum((t - t0) ** 2 for t, t0 in zip(taus, self.start_taus)))
        ratios = self.solver_options.get("compensation")
        if ratios is not None and self.ratio_penalty:
            value += math.log1p(self.ratio_penalty * sum(r * r for r in ratios))
        return value

    def set_ratios(self, ratios: list[float]) -> "_Objective":
        """Sets the solver's compensation ratios for the next evaluations; returns self."""
        self.solver_options = {**self.solver_options, "compensation": list(ratios)}
        return self


def _golden_section(f: Callable[[float], float], low: float, high: float, iterations: int) -> tuple[float, float]:
    """Minimises a unimodal f on [low, high] by golden-section search; returns (argmin, min)."""
    c, d = high - _GOLDEN * (high - low), low + _GOLDEN * (high - low)
    fc, fd = f(c), f(d)
    for _ in range(iterations):
        if fc < fd:
            high, d, fd = d, c, fc
            c = high - _GOLDEN * (high - low)
            fc = f(c)
        else:
            low, c, fc = c, d, fd
            d = low + _GOLDEN * (high - low)
            fd = f(d)
    return (c, fc) if fc < fd else (d, fd)


def _with_tau(sigmas: torch.Tensor, index: int, tau: float, schedule) -> torch.Tensor:
    moved = sigmas.clone()
    moved[index] = level_at_tau(schedule, tau).sigma
    return moved


def _coordinate_descent(objective: _Objective, sigmas: torch.Tensor, best: float, sweeps: int,
                        iterations: int, margin: float,
                        log: Callable[[str], None] | None) -> tuple[torch.Tensor, float]:
    """Golden-section search of each interior level between its neighbours, `sweeps` times.

    The objective is a log error, so a sweep that gains less than 0.1% (1e-3 in the log) stops.
    """
    schedule = objective.denoiser.schedule
    for sweep in range(sweeps):
        start = best
        for index in range(1, len(sigmas) - 1):
            upper = level(schedule, float(sigmas[index - 1])).tau
            lower = level(schedule, float(sigmas[index + 1])).tau
            span = upper - lower

            def error_at(position: float) -> float:
                return objective(_with_tau(sigmas, index, lower + position * span, schedule))

            position, error = _golden_section(error_at, margin, 1 - margin, iterations)
            if error < best:
                sigmas, best = _with_tau(sigmas, index, lower + position * span, schedule), error
        if log is not None:
            log(f"sweep {sweep + 1}: calibration objective {best:.4f}")
        if best > start - 1e-3:
            break
    return sigmas, best


def _search_ratios(objective: _Objective, sigmas: torch.Tensor, sweeps: int, iterations: int,
                   width: float, log: Callable[[str], None] | None) -> tuple[list[float], float]:
    """Golden-section search of each step's compensation ratio (samplers.compensation) around its
    current value, the bracket halved every pass; starts from no compensation (all 0)."""
    ratios = [0.0] * (len(sigmas) - 1)
    best = objective.set_ratios(ratios)(sigmas)
    for sweep in range(sweeps):
        start, half = best, width / 2 ** (sweep + 1)
        for index in range(1, len(ratios)):
            def error_at(value: float) -> float:
                trial = ratios[:index] + [value] + ratios[index + 1:]
                return objective.set_ratios(trial)(sigmas)

            value, error = _golden_section(error_at, ratios[index] - half, ratios[index] + half, iterations)
            if error < best:
                ratios[index], best = value, error
        if log is not None:
            log(f"compensation sweep {sweep + 1}: calibration objective {best:.4f}")
        if best > start - 1e-3:
            break
    return ratios, best


@torch.no_grad()
def optimize_schedule(denoiser, solver: str, nfe: int, noise: torch.Tensor, *, cond: dict | None = None,
                      reference: torch.Tensor | None = None, reference_solver: str = "heun",
                      reference_steps: int = 100, initial_schedule: str = "auto",
                      initial_options: dict | None = None, solver_options: dict | None = None,
                      sweeps: int = 3, iterations: int = 6, margin: float = 0.05, objective: str = "psnr",
                      penalty: float = 0.0, compensation: bool = False, compensation_sweeps: int = 2,
                      compensation_iterations: int = 6, compensation_width: float = 1.0,
                      compensation_penalty: float = 0.2,
                      log: Callable[[str], None] | None = None) -> OptimizedSchedule:
    """Chooses the noise levels that minimise a solver's error at an NFE budget.

    Args:
        denoiser: a Denoiser (returns x0), a pure function of (x, sigma, cond): repeated calls are
            answered from a cache.
        solver: a name in SOLVERS.
        nfe: the model-evaluation budget; must be exactly reachable by the solver.
        noise: (B, ...) standard normal calibration noise (a few samples suffice); walks start
            from s(sigma_0) * noise, as `samplers.sample` does.
        cond: keyword conditioning for the calibration samples (e.g. labels (B,)).
        reference: (B, ...) the fine-step samples from `noise`; computed if None.
        reference_solver: solver for the reference when it is computed.
        reference_steps: its number of steps (on the family's default schedule).
        initial_schedule: the schedule the search starts from ("auto": the family default).
        initial_options: options of that schedule (e.g. {"shift": 3.0}).
        solver_options: options of the solver core.
        sweeps: maximum passes over the interior levels (stops early without progress).
        iterations: golden-section iterations per level and pass.
        margin: keeps each level this fraction of its bracket away from its neighbours.
        objective: "psnr" (mean per-sample log MSE) or "mse" (pooled MSE).
        penalty: price of moving away from the starting walk: the error is multiplied by
            1 + penalty * sum of squared flow-time moves of the interior levels (0: none).
        compensation: also calibrate one compensation ratio per step for the optimised walk
            (samplers.compensation; stored in the result's `solver_options`).
        compensation_sweeps: passes over the ratios (each halves the search bracket).
        compensation_iterations: golden-section iterations per ratio and pass.
        compensation_width: the first pass searches each ratio in [r - width/2, r + width/2].
        compensation_penalty: the error is multiplied by 1 + this * sum of squared ratios.
        log: optional `log(message)` after each pass.

    Returns:
        The OptimizedSchedule (its `error` is the pooled calibration MSE); `.save(path)` keeps it.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    if penalty < 0:
        raise ValueError(f"penalty must be >= 0, got {penalty}")
    spec = get_solver(solver)
    family = getattr(denoiser.schedule, "name", None)
    spec.check_fits(denoiser.prediction_type, family)
    num_steps = resolve_steps(spec, None, nfe)
    cond = cond or {}
    made = {"solver": reference_solver, "steps": reference_steps} if reference is None else {"solver": "given"}
    if reference is None:
        fine = make_sigmas("auto", reference_steps, denoiser.schedule)
        ref_spec = get_solver(reference_solver)
        start = _start(denoiser, noise, fine)
        reference = run_solver(ref_spec.make_steps(start, fine, denoiser.schedule), denoiser, fine,
                               order=ref_spec.order, cond=cond)
    initial = make_sigmas(initial_schedule, num_steps, denoiser.schedule, **(initial_options or {}))
    cached = _PrefixCache(denoiser, capacity=max(256, 16 * num_steps))
    start_taus = [level(denoiser.schedule, float(s)).tau for s in initial[1:-1]]
    search = _Objective(cached, spec, noise, reference, cond, solver_options or {}, objective, penalty, start_taus)
    initial_errors = search.errors(initial)
    sigmas, _ = _coordinate_descent(search, initial, search(initial, initial_errors), sweeps, iterations, margin, log)
    options: dict = {}
    if compensation:
        search.ratio_penalty = compensation_penalty
        ratios, _ = _search_ratios(search, sigmas, compensation_sweeps, compensation_iterations, compensation_width,
                                   log)
        options = {"compensation": ratios}
        search.set_ratios(ratios)
    final_errors = search.errors(sigmas)
    initial_error, error = float(initial_errors.mean()), float(final_errors.mean())
    return OptimizedSchedule(sigmas=sigmas.tolist(), solver=solver, nfe=nfe, family=family, error=error,
                             solver_options=options,
                             initial_error=initial_error, initial_schedule=initial_schedule,
                             reference={**made, "samples": int(noise.shape[0]), "evaluations": search.calls,
                                        "model_calls": cached.calls - cached.hits, "objective": objective,
                                        "objective_value": unpenalized(final_errors, objective),
                                        "penalty": penalty, "compensation": compensation})


def unpenalized(errors: torch.Tensor, kind: str) -> float:
    """The calibration objective of per-sample MSEs (B,) without the walk's penalties (lower is
    better): mean log MSE ("psnr") or log pooled MSE ("mse"), so walks searched from different
    starts compare on one scale."""
    if kind == "psnr":
        return float(errors.clamp_min(1e-20).log().mean())
    return math.log(float(errors.mean()))
