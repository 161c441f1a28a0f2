"""Taylor forecast of cached features (TaylorSeer, Liu et al. 2025, arXiv:2503.06923).

At every computed step the forecaster refreshes finite-difference estimates of the feature's
derivatives, d_0 = F(x_0) and d_{i+1} = (d_i(x_0) - d_i(x_prev)) / (x_0 - x_prev), the paper's
recursion generalised to uneven gaps. A cached step at x is forecast by the truncated Taylor
series sum_i d_i (x - x_0)^i / i!. Exact for features linear in x at any order >= 1.

Optional calibrated gains (this project, docs/caching.md "Calibrated forecast gains") scale the
derivative terms per segment between computed steps: after the k-th computed value of a
generation (k >= 2, the first with a derivative) a cached step is forecast as
d_0 + gains[k - 2] * sum_{i>=1} d_i (x - x_0)^i / i!. Long extrapolations from finite differences
overshoot where features bend; `caching.search_forecast_gains` picks the gains that minimise the
cached run's error on calibration samples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Iterator, Sequence

import torch

from ..config import UpdateConfig
from . import Forecaster, Values, check_axis, check_order


class TaylorForecaster(Forecaster):
    """Per-value derivative estimates d_0..d_order at the newest computed coordinate."""

    def __init__(self, order: int, gains: Sequence[float] | None = None) -> None:
        self.order = order
        self.gains = tuple(gains or ())
        self.x0: float | None = None
        self.factors: list[list[torch.Tensor] | None] = []
        self.computed = 0  # values recorded since the last restart

    def record(self, x: float, values: Sequence[torch.Tensor | None]) -> None:
        is_restart = self.x0 is None or x == self.x0 or len(values) != len(self.factors)
        new_factors: list[list[torch.Tensor] | None] = []
        for index, value in enumerate(values):
            if value is None:
                new_factors.append(None)
                continue
            old = None if is_restart else self.factors[index]
            if old is not None and old[0].shape != value.shape:
                old = None
            new_factors.append(self._refresh(value, old, None if old is None else x - self.x0))
        self.factors = new_factors
        self.x0 = x
        self.computed = 1 if is_restart else self.computed + 1

    def _refresh(self, value: torch.Tensor, old: list[torch.Tensor] | None, gap: float | None):
        factors = [value]
        if old is None:
            return factors
        for i in range(min(self.order, len(old))):
            factors.append((factors[i] - old[i]) / gap)
        return factors

    def gain(self) -> float:
        """The multiplier of the derivative terms in the current segment (1 without gains)."""
        segment = self.computed - 2
        return self.gains[segment] if 0 <= segment < len(self.gains) else 1.0

    def predict(self, x: float) -> Values:
        offset = x - self.x0
        gain = self.gain()
        out = []
        for factors in self.factors:
            if factors is None:
                out.append(None)
                continue
            value = factors[0]
            for i in range(1, len(factors)):
                value = value + factors[i] * (gain * offset ** i / math.factorial(i))
            out.append(value)
        return tuple(out)

    def tensors(self) -> Iterator[torch.Tensor]:
        for factors in self.factors:
            yield from factors or ()

    @property
    def ready(self) -> bool:
        return self.x0 is not None


@dataclass
class TaylorUpdate(UpdateConfig):
    """Taylor forecast of order 1 or 2 (TaylorSeer), differences taken in step index or sigma.

    Attributes:
        order: highest derivative kept (0 is plain reuse).
        axis: "step" (finite differences in step index) or "sigma" (in noise level).
        gains: None, or per-segment multipliers of the derivative terms in [0, 4]: entry k scales
            the forecasts made after the (k + 2)-th computed step of a generation; later segments
            use 1. Found by `caching.search_forecast_gains`.
    """

    name: ClassVar[str] = "taylor"
    order: int = 2
    axis: str = "step"
    gains: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        check_order("TaylorUpdate", self.order, 4)
        check_axis("TaylorUpdate", self.axis)
        if self.gains is not None:
            self.gains = check_gains("TaylorUpdate", self.gains)

    def new_forecaster(self) -> Forecaster:
        return TaylorForecaster(self.order, self.gains)


def check_gains(owner: str, gains: Sequence[float]) -> tuple[float, ...]:
    """The gains as a tuple of floats, or a one-line error naming the bad entry."""
    if isinstance(gains, (str, bytes)) or not isinstance(gains, Sequence):
        raise ValueError(f"{owner}: gains must be a list of numbers in [0, 4], got {gains!r}")
    out = []
    for index, gain in enumerate(gains):
        if isinstance(gain, bool) or not isinstance(gain, (int, float)) or not 0.0 <= gain <= 4.0:
            raise ValueError(f"{owner}: gains[{index}]={gain!r} must be a number in [0, 4] "
                             "(1 is the plain Taylor forecast)")
        out.append(float(gain))
    return tuple(out)
