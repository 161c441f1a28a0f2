"""Taylor forecast of cached features (TaylorSeer, Liu et al. 2025, arXiv:2503.06923).

At every computed step the forecaster refreshes finite-difference estimates of the feature's
derivatives, d_0 = F(x_0) and d_{i+1} = (d_i(x_0) - d_i(x_prev)) / (x_0 - x_prev), the paper's
recursion generalised to uneven gaps. A cached step at x is forecast by the truncated Taylor
series sum_i d_i (x - x_0)^i / i!. Exact for features linear in x at any order >= 1.
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

    def __init__(self, order: int) -> None:
        self.order = order
        self.x0: float | None = None
        self.factors: list[list[torch.Tensor] | None] = []

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

    def _refresh(self, value: torch.Tensor, old: list[torch.Tensor] | None, gap: float | None):
        factors = [value]
        if old is None:
            return factors
        for i in range(min(self.order, len(old))):
            factors.append((factors[i] - old[i]) / gap)
        return factors

    def predict(self, x: float) -> Values:
        offset = x - self.x0
        out = []
        for factors in self.factors:
            if factors is None:
                out.append(None)
                continue
            value = factors[0]
            for i in range(1, len(factors)):
                value = value + factors[i] * (offset ** i / math.factorial(i))
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
    """

    name: ClassVar[str] = "taylor"
    order: int = 2
    axis: str = "step"

    def __post_init__(self) -> None:
        check_order("TaylorUpdate", self.order, 4)
        check_axis("TaylorUpdate", self.axis)

    def new_forecaster(self) -> Forecaster:
        return TaylorForecaster(self.order)
