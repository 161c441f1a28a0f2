"""How cached values become outputs: plain reuse, Taylor forecast (TaylorSeer), BDF2/Heun forecast (FoCa).

A forecaster keeps, per cache slot, what it needs from the steps that were computed and returns a
value for a cached step at coordinate x (the step index or sigma, see `UpdateConfig.axis`).
Values are tuples of tensors (or None, for streams a block does not return), so one forecaster
serves a block's (hidden, encoder) pair as well as a single attention output.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Iterator, Sequence

import torch

from ..config import UpdateConfig, check_range

Values = tuple["torch.Tensor | None", ...]


class Forecaster:
    """Base class: records computed values at coordinates and predicts values at new coordinates."""

    def record(self, x: float, values: Sequence[torch.Tensor | None]) -> None:
        raise NotImplementedError

    def predict(self, x: float) -> Values:
        raise NotImplementedError

    def tensors(self) -> Iterator[torch.Tensor]:
        """Every tensor the forecaster holds (for the cache-memory statistic)."""
        raise NotImplementedError

    @property
    def ready(self) -> bool:
        """True once at least one value was recorded."""
        raise NotImplementedError


class ReuseForecaster(Forecaster):
    """Plain reuse: the last computed value, whatever the coordinate."""

    def __init__(self) -> None:
        self.last: Values | None = None

    def record(self, x: float, values: Sequence[torch.Tensor | None]) -> None:
        self.last = tuple(values)

    def predict(self, x: float) -> Values:
        return self.last

    def tensors(self) -> Iterator[torch.Tensor]:
        return (t for t in (self.last or ()) if t is not None)

    @property
    def ready(self) -> bool:
        return self.last is not None


@dataclass
class ReuseUpdate(UpdateConfig):
    """Plain reuse of the last computed value (FORA, DeepCache, TeaCache, FBCache, ...)."""

    name: ClassVar[str] = "reuse"
    axis: str = "step"

    def new_forecaster(self) -> Forecaster:
        return ReuseForecaster()


def check_axis(owner: str, axis: str) -> None:
    """One-line error for an unknown forecast axis."""
    if axis not in ("step", "sigma"):
        raise ValueError(f"{owner}: axis={axis!r} is unknown; use 'step' (step index) or 'sigma'")


def check_order(owner: str, order: int, high: int) -> None:
    if not isinstance(order, int) or isinstance(order, bool):
        raise ValueError(f"{owner}: order must be an int in [0, {high}], got {order!r}")
    check_range(owner, "order", order, 0, high, f"use an order between 0 and {high}")


from .foca import FoCaForecaster, FoCaUpdate  # noqa: E402
from .taylorseer import TaylorForecaster, TaylorUpdate  # noqa: E402

__all__ = ["Forecaster", "ReuseForecaster", "ReuseUpdate", "TaylorForecaster", "TaylorUpdate",
           "FoCaForecaster", "FoCaUpdate"]
