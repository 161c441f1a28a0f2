"""iPNDM: the improved pseudo-numerical multistep method of Zhang & Chen (DEIS, arXiv:2204.13902).

PNDM (Liu et al. 2022) and iPNDM integrate the probability-flow ODE in the exponential-integrator
variables of DDIM: with y = x / alpha and rho = s / alpha it reads dy/drho = eps, and one DDIM step
is exactly y' = y + (rho' - rho) eps. iPNDM replaces eps by the Adams-Bashforth combination of the
last `order` noise predictions with the constant-step coefficients (1; 3/2, -1/2;
23/12, -16/12, 5/12; 55/24, -59/24, 37/24, -9/24), warming up with the lower orders instead of
PNDM's Runge-Kutta start:

    eps_hat = sum_j c_j eps_{i-j},   x' = alpha' x0_hat + s' eps_hat,   x0_hat = (x - s eps_hat) / alpha.

The paper applies the constant coefficients on any grid; `coefficients="variable"` instead
integrates the Lagrange polynomial through the history nodes in rho over the actual step (the
variable-step form; a history node at rho = inf, pure noise, is left out there).

The last steps of a walk that ends at sigma = 0 are lower order (`lower_order_final`, as
DPM-Solver++ does below 15 steps): that step spans all of the remaining rho and extrapolating eps
with a cubic across it is what made the high-order update unstable on the trained models.
"""

from __future__ import annotations

from typing import Callable

import torch

from samplers.levels import Level, ddim_step, lagrange_weights, levels, lower_order
from samplers.loop import Evaluation, SolverSteps, check_sigmas, run_solver

# Adams-Bashforth coefficients for a constant step, newest first (Hairer et al., Solving ODEs I, III.1).
ADAMS_BASHFORTH = {1: (1.0,), 2: (3 / 2, -1 / 2), 3: (23 / 12, -16 / 12, 5 / 12),
                   4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}
COEFFICIENTS = ("fixed", "variable")


def _rho(point: Level) -> float:
    """DDIM's time rho = s / alpha (the VE sigma), inf at pure noise."""
    return point.s / point.alpha if point.alpha > 0 else float("inf")


def _weights(history: list[tuple[float, torch.Tensor]], a: Level, b: Level, coefficients: str) -> list[float]:
    """Weights of the eps history (newest first) in eps_hat, summing to 1."""
    if coefficients == "fixed" or len(history) == 1:
        return list(ADAMS_BASHFORTH[len(history)])
    lo, hi = _rho(a), _rho(b)
    return [w / (hi - lo) for w in lagrange_weights([node for node, _ in history], lo, hi)]


def ipndm_steps(x: torch.Tensor, sigmas: torch.Tensor, schedule, order: int = 4, coefficients: str = "fixed",
                lower_order_final: bool = True) -> SolverSteps:
    """iPNDM of `order` (1 to 4): DDIM with the Adams-Bashforth combination of the eps history.

    Args:
        x: (B, ...) the initial point at sigmas[0].
        sigmas: (N + 1,) the walk.
        schedule: the model's noise schedule.
        order: the Adams-Bashforth order (1 is DDIM).
        coefficients: "fixed" (the paper's constant-step coefficients) or "variable" (step-size aware).
        lower_order_final: on a walk ending at 0, the last step is first order, the one before it
            at most second order, and so on.
    """
    if order not in (1, 2, 3, 4):
        raise ValueError(f"iPNDM order must be 1 to 4, got {order}")
    if coefficients not in COEFFICIENTS:
        raise ValueError(f"iPNDM coefficients must be one of {COEFFICIENTS}, got {coefficients!r}")
    walk = levels(schedule, sigmas)
    num_steps = len(walk) - 1
    ends_at_zero = lower_order_final and walk[-1].s == 0
    history: list[tuple[float, torch.Tensor]] = []  # (rho, eps), newest first
    for index in range(num_steps):
        a, b = walk[index], walk[index + 1]
        x0 = yield Evaluation(x, a.sigma, index)
        history = [(_rho(a), (x - a.alpha * x0) / a.s)] + history[: order - 1]
        if coefficients == "variable":
            history = [(node, eps) for node, eps in history if node != float("inf")] or history[:1]
        step_order = lower_order(order, len(history) - 1, index, num_steps, ends_at_zero)
        if step_order == 1 or a.alpha == 0:
            x = ddim_step(x, x0, a, b)
            continue
        used = history[:step_order]
        eps_hat = sum(w * eps for w, (_, eps) in zip(_weights(used, a, b, coefficients), used))
        x0_hat = (x - a.s * eps_hat) / a.alpha
        x = b.alpha * x0_hat + b.s * eps_hat
    return x


@torch.no_grad()
def sample_ipndm(denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, cond: dict | None = None,
                 callback: Callable | None = None, order: int = 4, coefficients: str = "fixed",
                 lower_order_final: bool = True) -> torch.Tensor:
    """iPNDM (Zhang & Chen 2023, arXiv:2204.13902): Adams-Bashforth on eps in DDIM's variables.

    Args:
        denoiser: a Denoiser (returns x0).
        x: (B, ...) the initial noise scaled for sigmas[0].
        sigmas: (N + 1,) decreasing noise levels ending at 0.
        cond: keyword conditioning passed to the denoiser.
        callback: optional `callback(step_index, x, x0)` after each step.
        order: Adams-Bashforth order (1 to 4).
        coefficients: "fixed" (the paper's) or "variable" (step-size aware).
        lower_order_final: lower the order of the last steps of a walk ending at 0.

    Returns:
        The sample (B, ...).
    """
    sigmas = check_sigmas(sigmas)
    steps = ipndm_steps(x, sigmas, denoiser.schedule, order=order, coefficients=coefficients,
                        lower_order_final=lower_order_final)
    return run_solver(steps, denoiser, sigmas, order=order, cond=cond, callback=callback)
