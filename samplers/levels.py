"""Scalar coefficients shared by the solvers, computed on the CPU in float64 once per step.

Every noise level is described by its forward-process coefficients (alpha, s), its log-SNR
lambda = log(alpha / s) (-inf for pure noise, +inf for clean data), and its *flow coordinates*
c = alpha + s, tau = s / (alpha + s): with y = x / c, a path of fixed (x0, eps) is the straight
line y = x0 + tau * (eps - x0). For flow models (alpha + s = 1) these are the model's own (x, t);
for VP models they are the rectified-flow form of the same ODE. In them Euler is exactly DDIM.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Level:
    """One noise level as Python floats.

    Attributes:
        sigma: the level in the model's own variable (flow t, or VE sigma).
        alpha: signal coefficient.
        s: noise coefficient (x = alpha * x0 + s * eps).
    """

    sigma: float
    alpha: float
    s: float

    @property
    def lam(self) -> float:
        """log-SNR log(alpha / s), -inf at alpha = 0 and +inf at s = 0 (never NaN)."""
        if self.alpha <= 0:
            return -math.inf
        if self.s <= 0:
            return math.inf
        return math.log(self.alpha) - math.log(self.s)

    @property
    def c(self) -> float:
        """Flow-coordinate scale alpha + s."""
        return self.alpha + self.s

    @property
    def tau(self) -> float:
        """Flow-coordinate time s / (alpha + s) in [0, 1]."""
        return self.s / (self.alpha + self.s)


def level(schedule, sigma: float) -> Level:
    """The Level of noise level `sigma` under `schedule` (anything with `alpha_sigma`)."""
    alpha, s = schedule.alpha_sigma(torch.tensor(float(sigma), dtype=torch.float64))
    return Level(float(sigma), float(alpha), float(s))


def levels(schedule, sigmas: torch.Tensor) -> list[Level]:
    """Levels of a whole schedule (N + 1,).

    Every solver core starts with this, once per generation; the levels of a flow schedule (the
    common case) are kept per walk, since the per-level tensor work costs about a tenth of a
    millisecond per step of a small model.
    """
    values = sigmas.cpu().tolist()
    if type(schedule).__name__ != "FlowSchedule":  # VP schedules hold a tensor: not a cheap key
        return [level(schedule, value) for value in values]
    key = (schedule, tuple(values))
    known = _FLOW_LEVELS.get(key)
    if known is None:
        known = tuple(level(schedule, value) for value in values)
        if len(_FLOW_LEVELS) >= 64:
            _FLOW_LEVELS.pop(next(iter(_FLOW_LEVELS)))
        _FLOW_LEVELS[key] = known
    return list(known)


_FLOW_LEVELS: dict[tuple, tuple[Level, ...]] = {}


def level_at_lambda(schedule, lam: float) -> Level:
    """The Level whose log-SNR is `lam`, through the schedule's inverse map."""
    sigma = schedule.lambda_to_sigma(torch.tensor(lam, dtype=torch.float64))
    return level(schedule, float(sigma))


def level_at_tau(schedule, tau: float) -> Level:
    """The Level at flow-coordinate time `tau` in (0, 1)."""
    return level_at_lambda(schedule, math.log((1 - tau) / tau))


def ddim_step(x: torch.Tensor, x0: torch.Tensor, a: Level, b: Level) -> torch.Tensor:
    """First-order step from level a to b with data estimate x0: x_b = alpha_b x0 + s_b eps_hat.

    Equals (s_b / s_a) x + (alpha_b - s_b alpha_a / s_a) x0, the DPM-Solver++ first-order update;
    exact in the limits alpha_a = 0 (pure noise) and s_b = 0 (returns x0).
    """
    if b.s == 0:
        return x0
    return (b.s / a.s) * x + (b.alpha - b.s * a.alpha / a.s) * x0


def flow_velocity(x: torch.Tensor, x0: torch.Tensor, a: Level) -> torch.Tensor:
    """d y / d tau = eps - x0 in flow coordinates, with eps = (x - alpha x0) / s."""
    return (x - a.alpha * x0) / a.s - x0


def lagrange_weights(nodes: list[float], lo: float, hi: float) -> list[float]:
    """Integrals over [lo, hi] of the Lagrange basis polynomials on `nodes` (Adams weights)."""
    points, weights = np.polynomial.legendre.leggauss(len(nodes) + 1)
    u = 0.5 * (hi - lo) * points + 0.5 * (hi + lo)
    weights = 0.5 * (hi - lo) * weights
    out = []
    for j, node in enumerate(nodes):
        basis = np.ones_like(u)
        for m, other in enumerate(nodes):
            if m != j:
                basis *= (u - other) / (node - other)
        out.append(float(np.dot(weights, basis)))
    return out


def lower_order(order: int, history: int, step_index: int, num_steps: int, ends_at_zero: bool) -> int:
    """Order of a multistep update: warm-up while history is short, lower order at the final steps."""
    order = min(order, history + 1)
    if ends_at_zero:
        order = min(order, num_steps - step_index)
    return order
