"""Dynamic compensation of the data prediction (DC-Solver, Zhao et al. 2024, arXiv:2409.03755).

A few-step solver evaluates the model at points that lag the ideal trajectory, so the data
prediction it receives is misaligned with where the solver's formula assumes it. DC-Solver
compensates by replacing the prediction at step i with an interpolation/extrapolation of the
recent predictions at a per-step ratio rho_i learned on a few calibration samples. This is its
two-point form, which wraps any solver core:

    x0_i <- x0_i + rho_i * (x0_i - x0_{i-1})        (step i's first evaluation; rho_0 is unused)

With every rho_i = 0 the solver is unchanged, so a search that starts there (see
`samplers.optimized.optimize_schedule(..., compensation=True)`) can only improve its calibration
objective. The ratios are tied to the walk (solver, schedule, steps) they were calibrated on.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from samplers.loop import SolverSteps


def check_ratios(ratios: Sequence[float], num_steps: int) -> list[float]:
    """The ratios as floats, one per step, finite; raises ValueError naming the fix otherwise."""
    values = [float(r) for r in ratios]
    if len(values) != num_steps:
        raise ValueError(f"compensation has {len(values)} ratios but the walk has {num_steps} steps; "
                         "give one ratio per step (calibrate them for this walk)")
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"compensation ratios must be finite, got {values}")
    return values


def compensated_steps(core: SolverSteps, ratios: Sequence[float]) -> SolverSteps:
    """Runs `core`, feeding it x0_i + rho_i (x0_i - x0_{i-1}) at each step's first evaluation.

    Args:
        core: a solver core (see samplers.loop); its later stages within a step get raw x0.
        ratios: rho_i per step (rho_0 is unused: there is no earlier prediction).

    Returns:
        The core's final sample.
    """
    previous: torch.Tensor | None = None
    request = next(core)
    while True:
        x0 = yield request
        fed = x0
        if request.stage == 0:
            ratio = ratios[request.step_index]
            if previous is not None and ratio != 0.0:
                fed = x0 + ratio * (x0 - previous)
            previous = x0
        try:
            request = core.send(fed)
        except StopIteration as finished:
            return finished.value
