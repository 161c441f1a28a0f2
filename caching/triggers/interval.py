"""Static interval: recompute every N steps (FORA, Delta-DiT, DeepCache, PAB, ToCa, TaylorSeer, FoCa).

The interval counts steps since the latest computed step of the branch, so that warm-up, cool-down
and forced refreshes re-anchor it: with N = 3 and no warm-up, steps 0, 3, 6, ... are computed.
Alternatively `steps` lists the computed steps as trajectory fractions: a non-uniform static
schedule, e.g. one calibrated by `caching.schedule_search.search_compute_steps`.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from ..config import TriggerConfig

if TYPE_CHECKING:
    from ..runtime import CallFrame


@dataclass
class IntervalTrigger(TriggerConfig):
    """Recompute when `interval` steps have passed since the latest computed step, or exactly at
    the listed steps.

    Attributes:
        interval: N >= 1; 1 computes every step.
        steps: None, or the computed steps as fractions of the trajectory in [0, 1), increasing;
            step round(f * num_steps) is computed for each f (the interval is then unused).
    """

    name: ClassVar[str] = "interval"
    signal: ClassVar[str | None] = None
    interval: int = 3
    steps: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.interval, bool) or not isinstance(self.interval, int) or self.interval < 1:
            raise ValueError(f"IntervalTrigger: interval={self.interval!r} must be an int >= 1 "
                             "(1 computes every step)")
        if self.steps is not None:
            values = tuple(float(f) for f in self.steps)
            if not values or not all(math.isfinite(f) and 0.0 <= f < 1.0 for f in values) \
                    or any(b <= a for a, b in zip(values, values[1:])):
                raise ValueError(f"IntervalTrigger: steps={list(self.steps)!r} must be increasing trajectory "
                                 "fractions in [0, 1), e.g. [0, 0.1, 0.3]")
            self.steps = values

    def wants_compute(self, state: Any, frame: "CallFrame", signal: Any) -> bool:
        context = frame.context
        if self.steps is not None:
            is_scheduled_step = context.step_index in _scheduled(self.steps, context.num_steps)
            return is_scheduled_step
        last = frame.state.last_computed_step
        is_interval_elapsed = last is None or context.step_index - last >= self.interval
        return is_interval_elapsed


def steps_of_fractions(fractions: tuple[float, ...], num_steps: int) -> frozenset[int]:
    """The step indices of trajectory fractions in a run of `num_steps` steps (nearest step)."""
    return frozenset(min(num_steps - 1, int(math.floor(f * num_steps + 0.5))) for f in fractions)


_scheduled = functools.lru_cache(maxsize=64)(steps_of_fractions)
