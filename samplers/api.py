"""Sampling by name: resolve a solver, a schedule and a step count or NFE budget, then run."""

from __future__ import annotations

from typing import Callable

import torch

from samplers.loop import run_solver
from samplers.registry import DEFAULT_SCHEDULES, SolverSpec, get_schedule, get_solver
from samplers.schedules import optimized_solver_options


def resolve_steps(spec: SolverSpec, steps: int | None, nfe: int | None) -> int:
    """The step count from exactly one of `steps` and `nfe` (an NFE budget must be met exactly)."""
    if (steps is None) == (nfe is None):
        raise ValueError("give exactly one of steps and nfe")
    if nfe is not None:
        return spec.steps_for_nfe(nfe)
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}; ask for at least one step")
    return steps


def make_sigmas(schedule: str, num_steps: int, noise_schedule, **options) -> torch.Tensor:
    """The walk (num_steps + 1,) of a named schedule ("auto": the family default) for a model."""
    if schedule == "auto":
        schedule = DEFAULT_SCHEDULES.get(getattr(noise_schedule, "name", None), "flow")
    return get_schedule(schedule).sigmas(num_steps, noise_schedule, **options)


@torch.no_grad()
def sample(denoiser, noise: torch.Tensor, *, solver: str = "dpmpp_2m", steps: int | None = None,
           nfe: int | None = None, schedule: str = "auto", schedule_options: dict | None = None,
           solver_options: dict | None = None, cond: dict | None = None,
           callback: Callable | None = None) -> torch.Tensor:
    """Samples with a registered solver and schedule.

    Args:
        denoiser: a Denoiser (returns x0); its prediction type must fit its schedule family.
        noise: (B, ...) standard normal noise; x starts as s(sigma_0) * noise (the noise part of
            the first level, exactly noise at flow t = 1).
        solver: a name in SOLVERS.
        steps: number of solver steps (give this or `nfe`).
        nfe: model-evaluation budget per guidance branch, met exactly (give this or `steps`).
        schedule: a name in SCHEDULES, or "auto" (uniform t for flow, Karras for VP).
        schedule_options: keyword options of the schedule function (e.g. {"shift": 3.0}).
        solver_options: keyword options of the solver core (e.g. {"eta": 0.5} for ddim); an
            optimised schedule's own (its calibrated `compensation`) apply unless given here.
        cond: keyword conditioning passed to the denoiser.
        callback: optional `callback(step_index, x, x0)` after each step.

    Returns:
        The sample (B, ...).
    """
    spec = get_solver(solver)
    spec.check_fits(denoiser.prediction_type, getattr(denoiser.schedule, "name", None))
    num_steps = resolve_steps(spec, steps, nfe)
    sigmas = make_sigmas(schedule, num_steps, denoiser.schedule, **(schedule_options or {}))
    _, scale = denoiser.alpha_sigma(sigmas[0].to(torch.float64))
    options = {**optimized_solver_options(schedule, schedule_options), **(solver_options or {})}
    core = spec.make_steps(noise * float(scale), sigmas, denoiser.schedule, **options)
    return run_solver(core, denoiser, sigmas, order=spec.order, cond=cond, callback=callback)
