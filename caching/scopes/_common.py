"""Small helpers shared by the scope hooks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..updates import Forecaster


def pack(output: Any) -> tuple[tuple[torch.Tensor | None, ...], bool]:
    """(values, is_tuple) from a module output that is a tensor or a flat tuple of tensors / None."""
    if isinstance(output, torch.Tensor):
        return (output,), False
    return tuple(output), True


def unpack(values: tuple[torch.Tensor | None, ...], is_tuple: bool) -> Any:
    """The inverse of `pack`."""
    return tuple(values) if is_tuple else values[0]


@dataclass
class ForecastSlot:
    """Per-branch cached values of one unit: a forecaster and the output structure it returns."""

    forecaster: Forecaster
    is_tuple: bool = False

    def tensors(self):
        return self.forecaster.tensors()

    @property
    def ready(self) -> bool:
        return self.forecaster.ready

    def record(self, coordinate: float, output: Any) -> None:
        values, self.is_tuple = pack(output)
        self.forecaster.record(coordinate, values)

    def predict(self, coordinate: float) -> Any:
        return unpack(self.forecaster.predict(coordinate), self.is_tuple)
