"""iPNDM: Adams-Bashforth multistep on the probability-flow ODE in flow coordinates.

The improved PNDM of Zhang & Chen (2023, DEIS, arXiv:2204.13902) with variable-step weights:
dy/dtau = eps - x0 is extrapolated by the Lagrange polynomial through the last `order` slopes
and integrated exactly over the step. tau = 1 (pure noise) is a regular node here, so the
history from the first step is kept; warm-up steps use the history available.
"""

from __future__ import annotations

from typing import Callable

import torch

from samplers.levels import flow_velocity, lagrange_weights, levels
from samplers.loop import Evaluation, SolverSteps, check_sigmas, run_solver


def ipndm_steps(x: torch.Tensor, sigmas: torch.Tensor, schedule, order: int = 4) -> SolverSteps:
    """Variable-step iPNDM of `order` (1 to 4): y' = y + sum_j w_j d_j (Zhang & Chen 2023, Sec. 4)."""
    if order not in (1, 2, 3, 4):
        raise ValueError(f"iPNDM order must be 1 to 4, got {order}")
    walk = levels(schedule, sigmas)
    history: list[tuple[float, torch.Tensor]] = []  # (tau, slope), newest first
    for index in range(len(walk) - 1):
        a, b = walk[index], walk[index + 1]
        x0 = yield Evaluation(x, a.sigma, index)
        history = [(a.tau, flow_velocity(x, x0, a))] + history[: order - 1]
        weights = lagrange_weights([tau for tau, _ in history], a.tau, b.tau)
        y = x / a.c + sum(weight * slope for weight, (_, slope) in zip(weights, history))
        x = b.c * y
    return x


@torch.no_grad()
def sample_ipndm(denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, cond: dict | None = None,
                 callback: Callable | None = None, order: int = 4) -> torch.Tensor:
    """iPNDM (Zhang & Chen 2023, arXiv:2204.13902), variable-step: one evaluation per step.

    Args:
        denoiser: a Denoiser (returns x0).
        x: (B, ...) the initial noise scaled for sigmas[0].
        sigmas: (N + 1,) decreasing noise levels ending at 0.
        cond: keyword conditioning passed to the denoiser.
        callback: optional `callback(step_index, x, x0)` after each step.
        order: Adams-Bashforth order (1 to 4).

    Returns:
        The sample (B, ...).
    """
    sigmas = check_sigmas(sigmas)
    steps = ipndm_steps(x, sigmas, denoiser.schedule, order=order)
    return run_solver(steps, denoiser, sigmas, order=order, cond=cond, callback=callback)
