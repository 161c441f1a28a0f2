"""Static interval: recompute every N steps (FORA, Delta-DiT, DeepCache, PAB, ToCa, TaylorSeer, FoCa).

The interval counts steps since the latest computed step of the branch, so that warm-up, cool-down
and forced refreshes re-anchor it: with N = 3 and no warm-up, steps 0, 3, 6, ... are computed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from ..config import TriggerConfig

if TYPE_CHECKING:
    from ..runtime import CallFrame


@dataclass
class IntervalTrigger(TriggerConfig):
    """Recompute when `interval` steps have passed since the latest computed step.

    Attributes:
        interval: N >= 1; 1 computes every step.
    """

    name: ClassVar[str] = "interval"
    signal: ClassVar[str | None] = None
    interval: int = 3

    def __post_init__(self) -> None:
        if isinstance(self.interval, bool) or not isinstance(self.interval, int) or self.interval < 1:
            raise ValueError(f"IntervalTrigger: interval={self.interval!r} must be an int >= 1 "
                             "(1 computes every step)")

    def wants_compute(self, state: Any, frame: "CallFrame", signal: Any) -> bool:
        last = frame.state.last_computed_step
        is_interval_elapsed = last is None or frame.context.step_index - last >= self.interval
        return is_interval_elapsed
