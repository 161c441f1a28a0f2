"""The per-call records of the cache runtime: a branch's state and one model call's frame.

`BranchState` lives for one guidance branch of one generation; a `CallFrame` for one model call,
shared by the model hook and the scope hooks (caching.runtime). Both are read on every call, so
they are plain attribute holders, the frame a slotted class.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from step_context import StepContext

from .config import RunSchedule


@dataclass
class BranchState:
    """Everything a cache keeps for one guidance branch of one generation.

    Attributes:
        signature: shapes, dtypes and devices of the model inputs the state was built for.
        trigger: the trigger's own state.
        last_computed_step: step index of the latest computed evaluation, or None.
        consecutive_cached: cached steps since the latest computed one.
        decisions: step index -> whether stage 0 computed (later stages of a step follow it).
        kind_last_computed: for attention scopes, step of the latest computation per kind.
        slots: per-hook cached data (forecasters, token caches), keyed by unit name.
        has_cache: True once a computed evaluation filled the slots.
        last_step: the latest stage-0 step index seen (a step going backwards means a new run).
    """

    signature: tuple
    trigger: Any
    last_computed_step: int | None = None
    consecutive_cached: int = 0
    decisions: dict[int, bool] = field(default_factory=dict)
    kind_last_computed: dict[str, int] = field(default_factory=dict)
    slots: dict[str, Any] = field(default_factory=dict)
    has_cache: bool = False
    last_step: int = -1


class CallFrame:
    """The plan of one model call, shared by the model hook and the scope hooks.

    A slotted plain class rather than a dataclass: one is built per model call.

    Attributes:
        context: the published step context, or None (then everything is computed).
        state: the branch state of this call.
        schedule: the run's trajectory fractions as step counts.
        signature: the input signature (shapes) of the call.
        coordinate: the forecast coordinate of this call (step index or sigma).
        group: the process group a feature-watching trigger reduces its statistic over (context
            parallelism: each rank holds a token shard), or None.
        must_compute: warm-up, cool-down, a forced refresh, an empty cache or calibration.
        should_compute: the decision; None until a feature-watching trigger decided.
        decision: in a compiled model, a feature-watching trigger's decision as a 0-d bool tensor
            that picks each block's path in the graph (`torch.cond`); read once when the call
            closes, which sets `should_compute`. None otherwise.
        skipped_if_cached: (unit, fraction) skipped if `decision` turns out False.
        record: whether computed values update histories (stage 0 only).
        measure_flops: whether this call measures per-unit FLOPs for its signature.
        kind_compute: attention kinds recomputed in this call (attention scope).
        scratch: tensors passed between hooks within the call (range entry inputs, probes).
        skipped: (unit, fraction of its FLOPs skipped) for each unit not (fully) computed.
        tokens: (tokens computed, tokens total) per token-scope module call.
        unit_flops: FLOPs measured per unit during a measuring call.
        overhead_flops: FLOPs of indicators (probes) measured during a measuring call.
        total_flops: FLOPs of the whole call, when measured.
    """

    __slots__ = ("context", "state", "schedule", "signature", "coordinate", "group", "must_compute",
                 "should_compute", "decision", "skipped_if_cached", "record", "measure_flops", "kind_compute",
                 "scratch", "skipped", "tokens", "unit_flops", "overhead_flops", "total_flops")

    def __init__(self, context: StepContext | None = None, state: BranchState | None = None,
                 schedule: RunSchedule | None = None, signature: tuple = (), coordinate: float = 0.0,
                 group: Any = None) -> None:
        self.context, self.state, self.schedule = context, state, schedule
        self.signature, self.coordinate, self.group = signature, coordinate, group
        self.must_compute, self.should_compute = True, True
        self.decision: torch.Tensor | None = None
        self.skipped_if_cached: tuple[tuple[str, float], ...] = ()
        self.record = self.measure_flops = False
        self.kind_compute: dict[str, bool] = {}
        self.scratch: dict[str, Any] = {}
        self.skipped: list[tuple[str, float]] = []
        self.tokens: list[tuple[int, int]] = []
        self.unit_flops: dict[str, float] = {}
        self.overhead_flops = 0.0
        self.total_flops: float | None = None

    def occurrence_key(self, unit: str) -> str:
        """`unit` on its first call within this model call, `unit#k` on its (k+1)-th.

        A module that a block calls more than once per forward (CogView4's feed-forward runs on
        the image and then the text tokens) gets one cache slot and one FLOP count per call.
        """
        counts = self.scratch.get("occurrences")
        if counts is None:
            counts = self.scratch["occurrences"] = {}
        index = counts.get(unit, 0)
        counts[unit] = index + 1
        return unit if index == 0 else f"{unit}#{index}"

    @property
    def is_passthrough(self) -> bool:
        """True when no step context was published: every hook computes as if absent."""
        return self.context is None

    @property
    def compute_now(self) -> bool:
        """Whether the cached scope runs in this call (an undecided frame computes)."""
        return self.should_compute is not False


def input_signature(args: tuple, kwargs: dict) -> tuple:
    """Shapes, dtypes and devices of the tensor arguments of a call: a change means a new state."""
    signature = [(index, v.shape, v.dtype, v.device) for index, v in enumerate(args) if isinstance(v, torch.Tensor)]
    for key in sorted(kwargs):
        v = kwargs[key]
        if isinstance(v, torch.Tensor):
            signature.append((key, v.shape, v.dtype, v.device))
    return tuple(signature)


def iter_tensors(obj: Any, depth: int = 0) -> Iterator[torch.Tensor]:
    """Every tensor reachable from `obj` through containers, `tensors()` methods and attributes."""
    if depth > 6 or obj is None or isinstance(obj, (int, float, str, bool)):
        return
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from iter_tensors(value, depth + 1)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from iter_tensors(value, depth + 1)
    elif hasattr(obj, "tensors"):
        for item in obj.tensors():
            yield from iter_tensors(item, depth + 1)
    elif hasattr(obj, "__dict__"):
        for value in vars(obj).values():
            yield from iter_tensors(value, depth + 1)
