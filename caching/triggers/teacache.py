"""TeaCache: cache while the accumulated, rescaled change of the modulated input stays below a threshold.

TeaCache (Liu et al., CVPR 2025, "Timestep Embedding Tells: It's Time to Cache for Video Diffusion
Model", arXiv:2411.19108) watches the first block's timestep-modulated input, which is cheap to
compute before any block runs. Its relative L1 change between consecutive steps is mapped through
a polynomial to an estimate of the output's relative change, and the estimates accumulate over
cached steps; the model is recomputed once the sum reaches the threshold.

The polynomial is fitted per model: `calibrate_teacache(model, run_fn)` records (input change,
output change) pairs over a full-compute run and fits them with numpy.polyfit. A trigger built
without coefficients calibrates itself on the first generation it sees.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar

import torch

from ..calibration import TeaCacheCalibration, relative_l1
from ..config import TriggerConfig, check_range

if TYPE_CHECKING:
    from ..runtime import CallFrame


@dataclass
class TeaCacheState:
    """Per-branch TeaCache state: the previous modulated input and the accumulated estimate (0-d, on device)."""

    previous: torch.Tensor | None = None
    accumulated: torch.Tensor | None = None
    pending_previous: torch.Tensor | None = None
    pending_accumulated: torch.Tensor | None = None

    def tensors(self):
        return (t for t in (self.previous, self.accumulated) if t is not None)


@dataclass
class TeaCacheTrigger(TriggerConfig):
    """TeaCache trigger.

    Attributes:
        threshold: accumulated estimated relative output change allowed before recomputing, in [0, 2].
        coefficients: rescaling polynomial, highest power first; None calibrates on the first run.
        degree: polynomial degree used when calibrating.
    """

    name: ClassVar[str] = "teacache"
    signal: ClassVar[str | None] = "probe"
    threshold: float = 0.2
    coefficients: tuple[float, ...] | None = None
    degree: int = 4

    def __post_init__(self) -> None:
        check_range("TeaCacheTrigger", "threshold", self.threshold, 0.0, 2.0,
                    "0 computes every step, typical values are 0.1-0.6")
        if self.coefficients is not None:
            self.coefficients = tuple(float(c) for c in self.coefficients)
            if not self.coefficients:
                raise ValueError("TeaCacheTrigger: coefficients is empty; pass None to calibrate")

    @property
    def needs_calibration(self) -> bool:
        return self.coefficients is None

    def new_state(self) -> TeaCacheState:
        return TeaCacheState()

    def rescale(self, change: torch.Tensor) -> torch.Tensor:
        """The polynomial (Horner form) applied to a 0-d tensor, clamped at 0."""
        value = torch.zeros_like(change)
        for coefficient in self.coefficients:
            value = value * change + coefficient
        return value.clamp_min(0.0)

    def wants_compute(self, state: TeaCacheState, frame: "CallFrame", probe: torch.Tensor) -> bool:
        previous = state.previous
        state.pending_previous = probe
        if previous is None or previous.shape != probe.shape:
            state.pending_accumulated = None
            return True
        accumulated = self.rescale(relative_l1(probe, previous, frame.group))
        if state.accumulated is not None:
            accumulated = accumulated + state.accumulated
        state.pending_accumulated = accumulated
        is_below_threshold = accumulated < self.threshold
        return torch.logical_not(is_below_threshold)  # a 0-d tensor: see TriggerConfig.wants_compute

    def observe(self, state: TeaCacheState, frame: "CallFrame", probe: torch.Tensor) -> None:
        state.pending_previous, state.pending_accumulated = probe, None

    def commit(self, state: TeaCacheState, frame: "CallFrame", computed: bool) -> None:
        if state.pending_previous is not None:
            state.previous = state.pending_previous
        state.accumulated = None if computed else state.pending_accumulated
        state.pending_previous = state.pending_accumulated = None

    def calibrate(self, calibration: TeaCacheCalibration) -> None:
        self.coefficients = calibration.coefficients


def calibrate_teacache(model: torch.nn.Module, run_fn: Callable[[], Any], *, degree: int = 4,
                       scope: Any = None) -> TeaCacheCalibration:
    """Fits TeaCache's rescaling polynomial for `model` from a full-compute run.

    Args:
        model: a supported transformer, without a cache applied.
        run_fn: runs one or more generations of the model with step contexts published (the
            native loop or a pipeline); its outputs are ignored.
        degree: degree of the fitted polynomial (lowered if too few pairs were recorded).
        scope: the scope the trigger will drive (default: the whole transformer residual).

    Returns:
        The calibration; pass `calibration.coefficients` to TeaCacheTrigger or
        `get_preset("teacache", coefficients=...)`.
    """
    from ..apply import apply_cache, remove_cache
    from ..config import CacheConfig
    from ..scopes import ResidualScope

    config = CacheConfig(trigger=TeaCacheTrigger(degree=degree), scope=scope or ResidualScope(),
                         count_flops=False, name="teacache-calibration")
    handle = apply_cache(model, config)
    handle.runtime.auto_calibrate = False  # every generation of run_fn is recorded
    try:
        run_fn()
        calibration = handle.runtime.finish_calibration()
    finally:
        remove_cache(model)
    return calibration
