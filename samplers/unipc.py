"""UniPC (Zhao et al. 2023, arXiv:2302.04867): multistep predictor UniP with the corrector UniC.

Data-prediction form with B(h) = h (bh1) or e^h - 1 (bh2). UniC reuses the evaluation at the
predicted point, so it costs no extra model call; after the last step there is no evaluation to
correct with, so UniC is skipped there. A step from pure noise (h = inf) is first order, and bh1's
unbounded B(h) = h is replaced there by its h -> inf-finite bh2 value (B = -1 in the code's sign).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from samplers.levels import Level, ddim_step, levels, lower_order
from samplers.loop import Evaluation, SolverSteps, check_sigmas, run_solver

VARIANTS = ("bh1", "bh2")


@dataclass
class _Update:
    """One UniP update, kept so that UniC can correct it once x0 at its result is known."""

    x: torch.Tensor          # the sample the update started from
    a: Level                 # its level
    b: Level                 # the target level
    x0: torch.Tensor         # x0 at (x, a)
    slopes: list[torch.Tensor]  # D1_k = (x0_k - x0) / r_k for the history used
    rks: list[float]         # r_k = (lambda_k - lambda_a) / h
    order: int
    scale: float             # B(h)
    b_coeffs: list[float]


def _coefficients(h: float, rks: list[float], order: int, variant: str) -> tuple[float, list[float]]:
    """B(h) and the vector b of the order conditions (UniPC eq. 7, data prediction: hh = -h)."""
    hh = -h
    h_phi_1 = math.expm1(hh)
    scale = hh if variant == "bh1" and math.isfinite(h) else math.expm1(hh)
    if order == 1:
        return scale, []
    h_phi_k, factorial, b = h_phi_1 / hh - 1, 1, []
    for k in range(1, order + 1):
        b.append(h_phi_k * factorial / scale)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    return scale, b


def _solve(rks: list[float], b: list[float], size: int) -> list[float]:
    """Solves the (size x size) Vandermonde-like system R rho = b with R[k, j] = rks[j] ** k."""
    nodes = torch.tensor(rks[:size], dtype=torch.float64)
    matrix = torch.stack([nodes**k for k in range(size)])
    return torch.linalg.solve(matrix, torch.tensor(b[:size], dtype=torch.float64)).tolist()


def _predict(update: _Update) -> torch.Tensor:
    """UniP: x_b = ddim(x, x0) - alpha_b B(h) sum_k rho_k D1_k (rho = 1/2 for order 2)."""
    x = ddim_step(update.x, update.x0, update.a, update.b)
    if update.order == 1:
        return x
    rhos = [0.5] if update.order == 2 else _solve(update.rks, update.b_coeffs, update.order - 1)
    residual = sum(rho * slope for rho, slope in zip(rhos, update.slopes))
    return x - update.b.alpha * update.scale * residual


def _correct(update: _Update, x0_b: torch.Tensor) -> torch.Tensor:
    """UniC: the same update with x0 at the predicted point as an extra node (rho = 1/2 for order 1)."""
    x = ddim_step(update.x, update.x0, update.a, update.b)
    rhos = [0.5] if update.order == 1 else _solve(update.rks + [1.0], update.b_coeffs, update.order)
    residual = sum(rho * slope for rho, slope in zip(rhos[:-1], update.slopes))
    return x - update.b.alpha * update.scale * (residual + rhos[-1] * (x0_b - update.x0))


def unipc_steps(x: torch.Tensor, sigmas: torch.Tensor, schedule, order: int = 2,
                variant: str = "bh2") -> SolverSteps:
    """UniPC-p with UniC (Zhao et al. 2023, Alg. 2/3), lower-order warm-up and final steps."""
    if variant not in VARIANTS or order not in (1, 2, 3):
        raise ValueError(f"UniPC needs variant in {VARIANTS} and order 1-3, got {variant!r}, {order}")
    walk = levels(schedule, sigmas)
    num_steps = len(walk) - 1
    history: list[tuple[Level, torch.Tensor]] = []  # finite-lambda (level, x0), newest first
    last: _Update | None = None
    for index in range(num_steps):
        a, b = walk[index], walk[index + 1]
        x0 = yield Evaluation(x, a.sigma, index)
        if last is not None:
            x = _correct(last, x0)
        step_order = lower_order(order, len(history), index, num_steps, walk[-1].s == 0)
        h = b.lam - a.lam
        used = history[: step_order - 1]
        rks = [(level_k.lam - a.lam) / h for level_k, _ in used]
        slopes = [(x0_k - x0) / rk for (_, x0_k), rk in zip(used, rks)]
        scale, b_coeffs = _coefficients(h, rks, step_order, variant)
        last = _Update(x, a, b, x0, slopes, rks, step_order, scale, b_coeffs)
        x = _predict(last)
        if math.isfinite(a.lam):
            history = [(a, x0)] + history[: max(order - 2, 0)]
    return x


@torch.no_grad()
def sample_unipc(denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, cond: dict | None = None,
                 callback: Callable | None = None, order: int = 2, variant: str = "bh2") -> torch.Tensor:
    """UniPC (Zhao et al. 2023, arXiv:2302.04867): predictor order `order`, corrector adds one.

    Args:
        denoiser: a Denoiser (returns x0).
        x: (B, ...) the initial noise scaled for sigmas[0].
        sigmas: (N + 1,) decreasing noise levels ending at 0.
        cond: keyword conditioning passed to the denoiser.
        callback: optional `callback(step_index, x, x0)` after each step.
        order: UniP order (1 to 3).
        variant: "bh1" (B(h) = h) or "bh2" (B(h) = e^h - 1).

    Returns:
        The sample (B, ...).
    """
    sigmas = check_sigmas(sigmas)
    steps = unipc_steps(x, sigmas, denoiser.schedule, order=order, variant=variant)
    return run_solver(steps, denoiser, sigmas, order=order + 1, cond=cond, callback=callback)


def sample_unipc_bh1(denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, cond: dict | None = None,
                     callback: Callable | None = None) -> torch.Tensor:
    """UniPC-2 with bh1 (Zhao et al. 2023, arXiv:2302.04867); see `sample_unipc`."""
    return sample_unipc(denoiser, x, sigmas, cond=cond, callback=callback, order=2, variant="bh1")


def sample_unipc_bh2(denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, cond: dict | None = None,
                     callback: Callable | None = None) -> torch.Tensor:
    """UniPC-2 with bh2 (Zhao et al. 2023, arXiv:2302.04867); see `sample_unipc`."""
    return sample_unipc(denoiser, x, sigmas, cond=cond, callback=callback, order=2, variant="bh2")
