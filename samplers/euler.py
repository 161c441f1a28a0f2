"""The first-order solver: Euler in the data-prediction form (DDIM with eta = 0)."""

from __future__ import annotations

from typing import Callable

import torch

from samplers.loop import solver_steps


@torch.no_grad()
def sample_euler(denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, cond: dict | None = None,
                 callback: Callable | None = None) -> torch.Tensor:
    """Euler / DDIM(eta=0): x' = alpha' x0 + s' eps_hat (Song et al. 2021; Euler for rectified flow).

    For flow models this is exactly x' = x + (t' - t) * velocity.

    Args:
        denoiser: a Denoiser (returns x0).
        x: (B, ...) the initial noise scaled for sigmas[0].
        sigmas: (N + 1,) decreasing noise levels ending at 0.
        cond: keyword conditioning passed to the denoiser.
        callback: optional `callback(step_index, x, x0)` after each step.

    Returns:
        The sample (B, ...).
    """
    cond = cond or {}
    for index in solver_steps(sigmas, order=1, model=denoiser):
        sigma, sigma_next = sigmas[index], sigmas[index + 1]
        x0 = denoiser(x, sigma, **cond)
        alpha, s = denoiser.alpha_sigma(sigma)
        alpha_next, s_next = denoiser.alpha_sigma(sigma_next)
        eps = (x - alpha * x0) / s
        x = alpha_next * x0 + s_next * eps
        if callback is not None:
            callback(index, x, x0)
    return x
