"""Learned per-step, per-block gates: Learning-to-Cache (Ma et al. 2024, arXiv:2406.01733).

Learning-to-Cache trains a router beta[t, l] in [0, 1] for every solver step t and transformer
block l: on step t, block l either computes, or returns its input plus the residual it produced
the last time it computed. Here the gate table has shape (num_steps, num_blocks), columns in the
order of the layouts registry (FLUX: double blocks, then single blocks).

Two modes:

* ``hard`` (inference): the table is thresholded once, at construction (compute where
  gate >= threshold; the first step always computes), into host booleans, so deciding costs no
  device sync. A step whose row computes every block counts as a computed step; a step with a
  closed gate counts as cached and its skipped blocks' FLOPs as saved.
* ``soft`` (training): the gates stay a tensor (or a zero-argument callable returning one, e.g.
  ``lambda: torch.sigmoid(logits)``, evaluated once per model call so each training step sees
  the current parameter). Every block runs and its output is mixed with its cached residual
  (see `caching.scopes.router`), so gradients reach the gates. Every step except forced ones
  (the first step, warm-up, cool-down, an empty cache) counts as cached.
"""

from __future__ import annotations

import copy
from dataclasses import InitVar, dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Union

import torch

from ..config import TriggerConfig, check_range

if TYPE_CHECKING:
    from ..runtime import CallFrame

GateSource = Union[torch.Tensor, Callable[[], torch.Tensor]]
MODES = ("hard", "soft")


def gate_mask(gates: torch.Tensor, threshold: float) -> torch.Tensor:
    """The boolean compute table of a gate table: gate >= threshold, first step always computing.

    A bool table is taken as it is (first step still forced).
    """
    mask = gates.detach() if gates.dtype == torch.bool else gates.detach() >= threshold
    mask = mask.clone()
    mask[0] = True
    return mask


def check_gate_table(owner: str, gates: Any) -> torch.Tensor:
    """A (num_steps, num_blocks) table of gates in [0, 1] (or booleans), else a one-line error."""
    if not isinstance(gates, torch.Tensor):
        raise ValueError(f"{owner}: gates must be a torch.Tensor of shape (num_steps, num_blocks) (or a "
                         f"callable returning one), got {type(gates).__name__}")
    if gates.ndim != 2 or gates.shape[0] < 1 or gates.shape[1] < 1:
        raise ValueError(f"{owner}: gates must have shape (num_steps, num_blocks), got {tuple(gates.shape)}")
    if gates.dtype != torch.bool:
        if not gates.is_floating_point():
            raise ValueError(f"{owner}: gates must be floating point probabilities or booleans, "
                             f"got {gates.dtype}")
        values = gates.detach()
        is_valid = bool(torch.isfinite(values).all() and (values >= 0).all() and (values <= 1).all())
        if not is_valid:  # one host sync at construction, never per call
            raise ValueError(f"{owner}: gates must be finite probabilities in [0, 1]; pass "
                             "torch.sigmoid(logits), not the logits")
    return gates


@dataclass
class RouterTrigger(TriggerConfig):
    """Per-step, per-block gates (Learning-to-Cache); see the module docstring.

    Args:
        gates: (num_steps, num_blocks) gate probabilities or booleans, or a zero-argument callable
            returning them (evaluated once per call in soft mode, once here in hard mode).
            Shared, not copied, when the config is copied (a soft router follows its parameter).

    Attributes:
        mode: "hard" (skip blocks whose gate is below `threshold`) or "soft" (mix, differentiably).
        threshold: hard mode computes a block where its gate >= threshold; 0 computes everything.
        path: the router file the gates came from, for reports and messages (None if given directly).
        model_class: the model class the router was trained for, or None (not checked).
        num_steps: rows of the table: the step count the router is valid for.
        num_blocks: columns of the table: the model's block count.
    """

    name: ClassVar[str] = "router"
    signal: ClassVar[str | None] = None
    gates: InitVar[Any] = None
    mode: str = "hard"
    threshold: float = 0.5
    path: str | None = None
    model_class: str | None = None
    num_steps: int = field(init=False, default=0)
    num_blocks: int = field(init=False, default=0)

    def __post_init__(self, gates: Any) -> None:
        if self.mode not in MODES:
            raise ValueError(f"RouterTrigger: mode={self.mode!r} is unknown; use 'hard' (inference, skipped "
                             "blocks cost nothing) or 'soft' (training, differentiable gates)")
        check_range("RouterTrigger", "threshold", self.threshold, 0.0, 1.0,
                    "a block computes where its gate >= threshold; 0.5 is the usual cut")
        self._source: GateSource = gates
        table = gates() if callable(gates) and not isinstance(gates, torch.Tensor) else gates
        table = check_gate_table("RouterTrigger", table)
        self.num_steps, self.num_blocks = int(table.shape[0]), int(table.shape[1])
        self._rows: tuple[tuple[bool, ...], ...] = ()
        if self.mode == "hard":
            mask = gate_mask(table, self.threshold).cpu().tolist()
            self._rows = tuple(tuple(bool(v) for v in row) for row in mask)

    def __deepcopy__(self, memo: dict) -> "RouterTrigger":
        clone = copy.copy(self)  # fields are immutable; the gate source is shared on purpose
        memo[id(self)] = clone
        return clone

    @property
    def source(self) -> str:
        return f"router {self.path}" if self.path else "router gates"

    @property
    def mask(self) -> tuple[tuple[bool, ...], ...]:
        """Hard mode: per step, per block, whether the block computes (empty in soft mode)."""
        return self._rows

    def check_steps(self, num_steps: int) -> None:
        """A one-line error when the run's step count is not the table's."""
        if num_steps != self.num_steps:
            raise ValueError(f"{self.source} has gates for {self.num_steps} steps but this run has {num_steps} "
                             f"steps (step context num_steps); run with {self.num_steps} steps, or train / load "
                             f"a router for {num_steps} steps")

    def wants_compute(self, state: Any, frame: "CallFrame", signal: Any) -> bool:
        self.check_steps(frame.context.num_steps)
        if self.mode == "soft":
            return False  # every unforced step follows the gates
        is_every_block_open = all(self._rows[frame.context.step_index])
        return is_every_block_open

    def compute_row(self, step_index: int) -> tuple[bool, ...]:
        """Hard mode: whether each block computes at `step_index`."""
        return self._rows[step_index]

    def gate_row(self, step_index: int) -> torch.Tensor:
        """Soft mode: the current gates of `step_index`, shape (num_blocks,), with their graph."""
        source = self._source
        gates = source() if callable(source) and not isinstance(source, torch.Tensor) else source
        if not isinstance(gates, torch.Tensor) or tuple(gates.shape) != (self.num_steps, self.num_blocks):
            shape = tuple(gates.shape) if isinstance(gates, torch.Tensor) else type(gates).__name__
            raise ValueError(f"{self.source}: the gate callable returned {shape}, not the "
                             f"({self.num_steps}, {self.num_blocks}) table it was applied with; apply a new "
                             "router for another shape")
        return gates[step_index]
