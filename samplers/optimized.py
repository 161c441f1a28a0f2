"""Optimised schedules: timesteps chosen to minimise the error against a fine-step reference.

Given a model, a solver and an NFE budget, `optimize_schedule` starts from a named schedule and
moves each interior noise level in turn (coordinate descent), searching it by golden section
between its two neighbours in flow time tau = s / (alpha + s). The walk stays strictly decreasing
by construction, the endpoints (the start level and 0) stay fixed, and a move is kept only if it
lowers the calibration error. The result is saved to a small JSON file next to the model and is
loaded by the registered schedule "optimized" (samplers.schedules.get_sigmas_optimized).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from samplers.api import make_sigmas, resolve_steps
from samplers.levels import level, level_at_tau
from samplers.loop import run_solver
from samplers.registry import SolverSpec, get_solver
from samplers.schedules import OptimizedSchedule

_GOLDEN = (math.sqrt(5) - 1) / 2


def _start(denoiser, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """The first point of a walk from `noise`, s(sigma_0) * noise, as `samplers.sample` starts."""
    _, scale = denoiser.alpha_sigma(sigmas[0].to(torch.float64))
    return noise * float(scale)


@dataclass
class _Objective:
    """Calibration error of one schedule: MSE of the solver's samples against the reference."""

    denoiser: object
    spec: SolverSpec
    noise: torch.Tensor
    reference: torch.Tensor
    cond: dict
    solver_options: dict
    calls: int = 0

    @torch.no_grad()
    def __call__(self, sigmas: torch.Tensor) -> float:
        self.calls += 1
        core = self.spec.make_steps(_start(self.denoiser, self.noise, sigmas), sigmas, self.denoiser.schedule,
                                    **self.solver_options)
        out = run_solver(core, self.denoiser, sigmas, order=self.spec.order, cond=self.cond)
        return float((out.double() - self.reference.double()).pow(2).mean())


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
    """Golden-section search of each interior level between its neighbours, `sweeps` times."""
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
            log(f"sweep {sweep + 1}: calibration MSE {best:.4e}")
        if best >= start * (1 - 1e-3):
            break
    return sigmas, best


@torch.no_grad()
def optimize_schedule(denoiser, solver: str, nfe: int, noise: torch.Tensor, *, cond: dict | None = None,
                      reference: torch.Tensor | None = None, reference_solver: str = "heun",
                      reference_steps: int = 100, initial_schedule: str = "auto",
                      initial_options: dict | None = None, solver_options: dict | None = None,
                      sweeps: int = 3, iterations: int = 6, margin: float = 0.05,
                      log: Callable[[str], None] | None = None) -> OptimizedSchedule:
    """Chooses the noise levels that minimise a solver's error at an NFE budget.

    Args:
        denoiser: a Denoiser (returns x0).
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
        log: optional `log(message)` after each pass.

    Returns:
        The OptimizedSchedule; call `.save(path)` to keep it next to the model.
    """
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
    objective = _Objective(denoiser, spec, noise, reference, cond, solver_options or {})
    initial = make_sigmas(initial_schedule, num_steps, denoiser.schedule, **(initial_options or {}))
    initial_error = objective(initial)
    sigmas, error = _coordinate_descent(objective, initial, initial_error, sweeps, iterations, margin, log)
    return OptimizedSchedule(sigmas=sigmas.tolist(), solver=solver, nfe=nfe, family=family, error=error,
                             initial_error=initial_error, initial_schedule=initial_schedule,
                             reference={**made, "samples": int(noise.shape[0]), "evaluations": objective.calls})
