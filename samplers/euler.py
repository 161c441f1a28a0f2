"""First-order solvers: Euler (= DDIM with eta = 0) and DDIM with eta (stochastic)."""

from __future__ import annotations

import math
from typing import Callable

import torch

from samplers.levels import ddim_step, levels
from samplers.loop import Evaluation, SolverSteps, check_sigmas, run_solver


def euler_steps(x: torch.Tensor, sigmas: torch.Tensor, schedule) -> SolverSteps:
    """Euler / DDIM(eta=0): x' = alpha' x0 + s' eps_hat (Song et al. 2021, arXiv:2010.02502)."""
    walk = levels(schedule, sigmas)
    for index in range(len(walk) - 1):
        x0 = yield Evaluation(x, walk[index].sigma, index)
        x = ddim_step(x, x0, walk[index], walk[index + 1])
    return x


def ddim_steps(x: torch.Tensor, sigmas: torch.Tensor, schedule, eta: float = 0.0,
               generator: torch.Generator | None = None) -> SolverSteps:
    """DDIM with eta: fresh noise of std eta * s' sqrt(1 - e^-2h) per step (Song et al. 2021, eq. 16)."""
    if eta < 0:
        raise ValueError(f"eta must be >= 0 (0 is deterministic DDIM, 1 is DDPM-like), got {eta}")
    walk = levels(schedule, sigmas)
    for index in range(len(walk) - 1):
        a, b = walk[index], walk[index + 1]
        x0 = yield Evaluation(x, a.sigma, index)
        if eta == 0 or b.s == 0:
            x = ddim_step(x, x0, a, b)
            continue
        # e^-h = (alpha_a / s_a) / (alpha_b / s_b), 0 when a is pure noise (lambda_a = -inf).
        decay = a.alpha * b.s / (a.s * b.alpha)
        noise_std = min(eta * b.s * math.sqrt(1 - decay**2), b.s)
        eps = (x - a.alpha * x0) / a.s
        device = generator.device if generator is not None else x.device
        noise = torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)
        x = b.alpha * x0 + math.sqrt(b.s**2 - noise_std**2) * eps + noise_std * noise
    return x


@torch.no_grad()
def sample_euler(denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, cond: dict | None = None,
                 callback: Callable | None = None) -> torch.Tensor:
    """Euler / DDIM(eta=0) (Song et al. 2021); for flow models exactly x' = x + (t' - t) velocity.

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
    return run_solver(euler_steps(x, sigmas, denoiser.schedule), denoiser, sigmas, order=1,
                      cond=cond, callback=callback)


@torch.no_grad()
def sample_ddim(denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, cond: dict | None = None,
                callback: Callable | None = None, eta: float = 0.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """DDIM with eta (Song et al. 2021, arXiv:2010.02502); eta = 0 is deterministic.

    Args:
        denoiser: a Denoiser (returns x0).
        x: (B, ...) the initial noise scaled for sigmas[0].
        sigmas: (N + 1,) decreasing noise levels ending at 0.
        cond: keyword conditioning passed to the denoiser.
        callback: optional `callback(step_index, x, x0)` after each step.
        eta: noise scale (0 deterministic, 1 the DDPM posterior variance).
        generator: random source for the fresh noise.

    Returns:
        The sample (B, ...).
    """
    sigmas = check_sigmas(sigmas)
    steps = ddim_steps(x, sigmas, denoiser.schedule, eta=eta, generator=generator)
    return run_solver(steps, denoiser, sigmas, order=1, cond=cond, callback=callback)
