"""MagCache: skip while the accumulated magnitude-ratio error stays below a threshold.

MagCache (Ma et al. 2025, "MagCache: Fast Video Generation with Magnitude-Aware Cache",
arXiv:2506.09045) observes that the ratio of residual magnitudes between consecutive steps,
||R_t|| / ||R_{t-1}||, follows a stable, model-specific curve. With the curve calibrated once,
the decision needs no features at all: over a run of cached steps the ratios multiply, the error
|1 - product| accumulates, and the model is recomputed once it reaches the threshold (or once
`max_cached` consecutive steps were cached). Decisions are host-side floats: no device sync.

`calibrate_magcache(model, run_fn)` records the curve from a full-compute run; a trigger built
without ratios calibrates itself on the first generation. Ratios of a run with another step count
are resampled by trajectory progress (nearest neighbour).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar

import torch

from ..calibration import MagCacheCalibration
from ..config import TriggerConfig, check_range

if TYPE_CHECKING:
    from ..runtime import CallFrame


@dataclass
class MagCacheState:
    """Per-branch accumulators (host floats)."""

    ratio: float = 1.0
    error: float = 0.0
    pending: tuple[float, float] | None = None


@dataclass
class MagCacheTrigger(TriggerConfig):
    """MagCache trigger.

    Attributes:
        threshold: accumulated error in [0, 1]; 0 computes every step.
        ratios: calibrated ratio per step of a reference run (ratios[0] = 1); None calibrates.
    """

    name: ClassVar[str] = "magcache"
    signal: ClassVar[str | None] = None
    threshold: float = 0.06
    ratios: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        check_range("MagCacheTrigger", "threshold", self.threshold, 0.0, 1.0,
                    "0 computes every step, typical values are 0.02-0.2")
        if self.ratios is not None:
            self.ratios = tuple(float(r) for r in self.ratios)
            if len(self.ratios) < 2:
                raise ValueError("MagCacheTrigger: ratios needs one value per step of a run of >= 2 steps; "
                                 "pass None to calibrate")

    @property
    def needs_calibration(self) -> bool:
        return self.ratios is None

    def new_state(self) -> MagCacheState:
        return MagCacheState()

    def ratio_at(self, step_index: int, num_steps: int) -> float:
        """The calibrated ratio at `step_index` of a `num_steps` run, resampled by progress."""
        reference = len(self.ratios)
        if num_steps <= 1:
            return self.ratios[-1]
        return self.ratios[round(step_index * (reference - 1) / (num_steps - 1))]

    def wants_compute(self, state: MagCacheState, frame: "CallFrame", signal: Any) -> bool:
        context = frame.context
        ratio = state.ratio * self.ratio_at(context.step_index, context.num_steps)
        error = state.error + abs(1.0 - ratio)
        state.pending = (ratio, error)
        is_below_threshold = error < self.threshold
        return not is_below_threshold

    def commit(self, state: MagCacheState, frame: "CallFrame", computed: bool) -> None:
        if computed or state.pending is None:
            state.ratio, state.error = 1.0, 0.0
        else:
            state.ratio, state.error = state.pending
        state.pending = None

    def calibrate(self, calibration: MagCacheCalibration) -> None:
        self.ratios = calibration.ratios


def calibrate_magcache(model: torch.nn.Module, run_fn: Callable[[], Any], *,
                       scope: Any = None) -> MagCacheCalibration:
    """Records MagCache's magnitude ratios for `model` from a full-compute run.

    Args:
        model: a supported model, without a cache applied.
        run_fn: runs one or more generations with step contexts published.
        scope: the scope the trigger will drive (default: the whole transformer residual for
            transformers, the deep branch for UNets); its cached quantity is what is measured.

    Returns:
        The calibration; pass `calibration.ratios` to MagCacheTrigger or
        `get_preset("magcache", ratios=...)`.
    """
    from ..apply import apply_cache, remove_cache
    from ..config import CacheConfig
    from ..layouts import get_model_layout
    from ..scopes import DeepBranchScope, ResidualScope

    if scope is None:
        scope = DeepBranchScope() if get_model_layout(model).kind == "unet" else ResidualScope()
    config = CacheConfig(trigger=MagCacheTrigger(), scope=scope, count_flops=False,
                         name="magcache-calibration")
    handle = apply_cache(model, config)
    handle.runtime.auto_calibrate = False  # every generation of run_fn is recorded
    try:
        run_fn()
        calibration = handle.runtime.finish_calibration()
    finally:
        remove_cache(model)
    return calibration
