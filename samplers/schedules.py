"""Noise-level schedules: separate `get_sigmas_*` functions, each returning a decreasing CPU
tensor of num_steps + 1 values ending in 0 (the sampler's walk), in the model's own variable.
"""

from __future__ import annotations

import torch


def _check_steps(num_steps: int) -> None:
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}")


def shift_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's static time shift: t' = shift * t / (1 + (shift - 1) * t) (Esser et al. 2024, eq. 23)."""
    return shift * t / (1 + (shift - 1) * t)


def get_sigmas_flow(num_steps: int, shift: float = 1.0, t_max: float = 1.0) -> torch.Tensor:
    """Uniform flow times from t_max to 0, optionally shifted (shift=1 keeps them uniform)."""
    _check_steps(num_steps)
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    t = torch.linspace(t_max, 0.0, num_steps + 1, dtype=torch.float64)
    return shift_time(t, shift).to(torch.float32)
