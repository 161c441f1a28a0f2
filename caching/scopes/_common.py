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


class ReuseSlot:
    """Per-branch cached output of one unit under plain reuse: the output object itself.

    The reuse counterpart of `ForecastSlot` with nothing between the hook and the stored value
    (one is read or written per unit per call), so torch.compile traces it as an attribute.
    """

    __slots__ = ("output",)

    def __init__(self) -> None:
        self.output: Any = None

    def tensors(self):
        values = self.output if isinstance(self.output, (tuple, list)) else (self.output,)
        return (value for value in values if isinstance(value, torch.Tensor))

    @property
    def ready(self) -> bool:
        return self.output is not None

    def record(self, coordinate: float, output: Any) -> None:
        self.output = tuple(output) if isinstance(output, list) else output

    def predict(self, coordinate: float) -> Any:
        return self.output
