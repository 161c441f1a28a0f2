"""Accumulated-error budget: spend an error allowance per refresh and over the whole run.

Each call estimates the error a cached step adds as the relative L1 drift of the head residual
since the previous call (computed or not). Cached steps accumulate that drift; the scope is
recomputed when the accumulation since the latest refresh would reach `threshold`, or when the
drift spent on cached steps over the whole run would exceed `total` (if set). Unlike FBCache,
which compares with the latest refresh only, the budget charges every step of a cached run.
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
class BudgetState:
    """Per-branch state (0-d tensors on the model's device)."""

    previous: torch.Tensor | None = None
    accumulated: torch.Tensor | None = None
    spent: torch.Tensor | None = None
    pending: tuple | None = None

    def tensors(self):
        return (t for t in (self.previous, self.accumulated, self.spent) if t is not None)


@dataclass
class BudgetTrigger(TriggerConfig):
    """Accumulated-error budget trigger.

    Attributes:
        threshold: drift allowed between refreshes, in [0, 2]; 0 computes every step.
        total: drift allowed on cached steps over the whole run, or None for no run budget.
    """

    name: ClassVar[str] = "budget"
    signal: ClassVar[str | None] = "head_residual"
    threshold: float = 0.2
    total: float | None = None

    def __post_init__(self) -> None:
        check_range("BudgetTrigger", "threshold", self.threshold, 0.0, 2.0)
        if self.total is not None:
            check_range("BudgetTrigger", "total", self.total, 0.0, 100.0, "or None for no run budget")

    def new_state(self) -> BudgetState:
        return BudgetState()

    def wants_compute(self, state: BudgetState, frame: "CallFrame", residual: torch.Tensor) -> bool:
        previous = state.previous
        if previous is None or previous.shape != residual.shape:
            state.pending = (residual, None)
            return True
        drift = relative_l1(residual, previous, frame.group)
        accumulated = drift if state.accumulated is None else state.accumulated + drift
        state.pending = (residual, drift, accumulated)
        is_within = accumulated < self.threshold
        if self.total is not None:
            spent = drift if state.spent is None else state.spent + drift
            is_within = is_within & (spent <= self.total)
        return torch.logical_not(is_within)  # a 0-d tensor: see TriggerConfig.wants_compute

    def observe(self, state: BudgetState, frame: "CallFrame", residual: torch.Tensor) -> None:
        state.pending = (residual, None)

    def commit(self, state: BudgetState, frame: "CallFrame", computed: bool) -> None:
        if state.pending is None:
            return
        state.previous = state.pending[0]
        if computed:
            state.accumulated = None
        elif len(state.pending) == 3:
            drift, state.accumulated = state.pending[1], state.pending[2]
            state.spent = drift if state.spent is None else state.spent + drift
        state.pending = None
