"""First-block residual trigger: FBCache and DBCache.

First Block Cache (ParaAttention, 2025; also diffusers' FirstBlockCache) always computes the first
block and compares its residual (output minus input) with the residual at the latest computed
step; while the relative change stays below the threshold, the remaining blocks are reused.
DBCache (cache-dit, 2025) generalises it: the first n blocks are always computed and give the
residual, the last m blocks are always computed too, and only the middle is cached.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from ..calibration import relative_l1
from ..config import TriggerConfig, check_range

if TYPE_CHECKING:
    from ..runtime import CallFrame


@dataclass
class ResidualState:
    """Per-branch state: the head residual at the latest computed step."""

    reference: torch.Tensor | None = None
    pending: torch.Tensor | None = None

    def tensors(self):
        return (t for t in (self.reference,) if t is not None)


@dataclass
class ResidualTrigger(TriggerConfig):
    """Cache while the head residual's relative L1 change since the latest computed step < threshold.

    Attributes:
        threshold: relative change in [0, 1]; 0 computes every step.
    """

    name: ClassVar[str] = "residual"
    signal: ClassVar[str | None] = "head_residual"
    threshold: float = 0.08

    def __post_init__(self) -> None:
        check_range("ResidualTrigger", "threshold", self.threshold, 0.0, 1.0,
                    "0 computes every step, typical values are 0.05-0.3")

    def new_state(self) -> ResidualState:
        return ResidualState()

    def wants_compute(self, state: ResidualState, frame: "CallFrame", residual: torch.Tensor) -> bool:
        state.pending = residual
        reference = state.reference
        if reference is None or reference.shape != residual.shape:
            return True
        is_below_threshold = relative_l1(residual, reference, frame.group) < self.threshold
        return torch.logical_not(is_below_threshold)  # a 0-d tensor: see TriggerConfig.wants_compute

    def observe(self, state: ResidualState, frame: "CallFrame", residual: torch.Tensor) -> None:
        state.pending = residual

    def commit(self, state: ResidualState, frame: "CallFrame", computed: bool) -> None:
        if computed and state.pending is not None:
            state.reference = state.pending
        state.pending = None
