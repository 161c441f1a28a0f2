"""Second-order forecast written as an ODE step: BDF2 slope, Heun correction (FoCa style).

FoCa (Zheng et al. 2025, "Forecast then Calibrate", arXiv:2508.16211) treats the sequence of
cached features as the solution of an ODE in the trajectory coordinate x and forecasts it with
a multistep scheme instead of a Taylor series. From the last three computed points (newest x_0,
gaps h_1 = x_0 - x_1) with Newton divided differences D_0, D_1, D_2:

* forecast: the BDF2 slope at x_0, g_0 = D_1 + D_2 h_1, gives the predictor F = D_0 + k g_0
  for a cached step at x = x_0 + k;
* calibrate: a Heun (trapezoid) corrector averages g_0 with the slope extrapolated to x,
  which adds `calibration` * D_2 k^2.

With calibration 1 the forecast is exact for features quadratic in x, on any spacing (unlike
the Taylor recursion, whose backward differences lag by half a gap); lower values damp the
curvature term for long forecasts. With two points it is the secant line, with one plain reuse.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Iterator, Sequence

import torch

from ..config import UpdateConfig, check_range
from . import Forecaster, Values, check_axis


class FoCaForecaster(Forecaster):
    """Newton divided differences D_0..D_2 over the three newest computed coordinates."""

    def __init__(self, calibration: float) -> None:
        self.calibration = calibration
        self.nodes: list[float] = []
        self.tables: list[list[torch.Tensor] | None] = []

    def record(self, x: float, values: Sequence[torch.Tensor | None]) -> None:
        is_restart = (not self.nodes or x in self.nodes or len(values) != len(self.tables)
                      or any(t is not None and v is not None and t[0].shape != v.shape
                             for t, v in zip(self.tables, values)))
        nodes = [x] if is_restart else [x] + self.nodes[:2]
        self.tables = [None if value is None else
                       self._extend(value, None if is_restart else old, nodes)
                       for value, old in zip(values, self.tables if not is_restart else [None] * len(values))]
        self.nodes = nodes

    @staticmethod
    def _extend(value: torch.Tensor, old: list[torch.Tensor] | None, nodes: list[float]):
        table = [value]
        for j in range(1, min(3, 1 + (len(old) if old is not None else 0))):
            table.append((table[j - 1] - old[j - 1]) / (nodes[0] - nodes[j]))
        return table

    def predict(self, x: float) -> Values:
        k = x - self.nodes[0]
        out = []
        for table in self.tables:
            if table is None:
                out.append(None)
            elif len(table) == 1:
                out.append(table[0])
            elif len(table) == 2:
                out.append(table[0] + table[1] * k)
            else:
                h1 = self.nodes[0] - self.nodes[1]
                slope = table[1] + table[2] * h1               # BDF2 slope at x_0
                predicted = table[0] + slope * k               # forecast
                out.append(predicted + table[2] * (self.calibration * k * k))  # Heun calibration
        return tuple(out)

    def tensors(self) -> Iterator[torch.Tensor]:
        for table in self.tables:
            yield from table or ()

    @property
    def ready(self) -> bool:
        return bool(self.nodes)


@dataclass
class FoCaUpdate(UpdateConfig):
    """BDF2/Heun-like second-order forecast (FoCa style).

    Attributes:
        calibration: weight of the Heun corrector's curvature term, in [0, 1].
        axis: "step" or "sigma", the coordinate the features are differenced in.
    """

    name: ClassVar[str] = "foca"
    calibration: float = 1.0
    axis: str = "step"

    def __post_init__(self) -> None:
        check_range("FoCaUpdate", "calibration", self.calibration, 0.0, 1.0)
        check_axis("FoCaUpdate", self.axis)

    def new_forecaster(self) -> Forecaster:
        return FoCaForecaster(self.calibration)
