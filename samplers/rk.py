"""Runge-Kutta solvers (Heun, explicit midpoint) on the probability-flow ODE in flow coordinates.

With y = x / (alpha + s) and tau = s / (alpha + s) the ODE reads dy/dtau = eps - x0 (see
samplers.levels). For flow models this is the model's own x and t, so `heun` is exactly the
FlowMatch Heun sampler; for VP models it is the same ODE in rectified-flow form.
"""

from __future__ import annotations

from typing import Callable

import torch

from samplers.levels import ddim_step, flow_velocity, level_at_tau, levels
from samplers.loop import Evaluation, SolverSteps, check_sigmas, run_solver


def heun_steps(x: torch.Tensor, sigmas: torch.Tensor, schedule) -> SolverSteps:
    """Heun's 2nd-order method (Karras et al. 2022, Alg. 1); the step to sigma = 0 is Euler."""
    walk = levels(schedule, sigmas)
    for index in range(len(walk) - 1):
        a, b = walk[index], walk[index + 1]
        x0 = yield Evaluation(x, a.sigma, index)
        x_euler = ddim_step(x, x0, a, b)
        if b.s == 0:
            x = x_euler
            continue
        x0_next = yield Evaluation(x_euler, b.sigma, index, stage=1)
        slope = 0.5 * (flow_velocity(x, x0, a) + flow_velocity(x_euler, x0_next, b))
        x = b.c * (x / a.c + (b.tau - a.tau) * slope)
    return x


def midpoint_steps(x: torch.Tensor, sigmas: torch.Tensor, schedule) -> SolverSteps:
    """Explicit midpoint rule (Runge 1895) at the middle of each step in flow time tau."""
    walk = levels(schedule, sigmas)
    for index in range(len(walk) - 1):
        a, b = walk[index], walk[index + 1]
        x0 = yield Evaluation(x, a.sigma, index)
        mid = level_at_tau(schedule, 0.5 * (a.tau + b.tau))
        x_mid = ddim_step(x, x0, a, mid)
        x0_mid = yield Evaluation(x_mid, mid.sigma, index, stage=1)
        x = b.c * (x / a.c + (b.tau - a.tau) * flow_velocity(x_mid, x0_mid, mid))
    return x


@torch.no_grad()
def sample_heun(denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, cond: dict | None = None,
                callback: Callable | None = None) -> torch.Tensor:
    """Heun (Karras et al. 2022, arXiv:2206.00364, Alg. 1): 2 evaluations per step, 1 on the last.

    Args:
        denoiser: a Denoiser (returns x0).
        x: (B, ...) the initial noise scaled for sigmas[0].
        sigmas: (N + 1,) decreasing noise levels ending at 0.
        cond: keyword conditioning passed to the denoiser.
        callback: optional `callback(step_index, x, x0)` after each step.

    Returns:
        The sample (B, ...).
    """
    sigmas = check_sigmas(sigmas)
    return run_solver(heun_steps(x, sigmas, denoiser.schedule), denoiser, sigmas, order=2,
                      cond=cond, callback=callback)


@torch.no_grad()
def sample_midpoint(denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, cond: dict | None = None,
                    callback: Callable | None = None) -> torch.Tensor:
    """Explicit midpoint (2nd-order Runge-Kutta; Hairer et al., Solving ODEs I, II.1): 2 evaluations per step.

    Args:
        denoiser: a Denoiser (returns x0).
        x: (B, ...) the initial noise scaled for sigmas[0].
        sigmas: (N + 1,) decreasing noise levels ending at 0.
        cond: keyword conditioning passed to the denoiser.
        callback: optional `callback(step_index, x, x0)` after each step.

    Returns:
        The sample (B, ...).
    """
    sigmas = check_sigmas(sigmas)
    return run_solver(midpoint_steps(x, sigmas, denoiser.schedule), denoiser, sigmas, order=2,
                      cond=cond, callback=callback)
