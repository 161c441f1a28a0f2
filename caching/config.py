"""A cache policy is when (trigger) x what (scope) x how (update), plus trajectory fractions.

`CacheConfig` holds the three parts and the fractions of the trajectory that are always computed
(warm-up, cool-down) or that bound a run of cached steps. Fractions are converted to step counts
per run by `RunSchedule.for_steps`, so one config serves 8 steps as well as 50.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from step_context import BRANCHES

if TYPE_CHECKING:
    from .runtime import CallFrame

logger = logging.getLogger("caching")


def check_range(owner: str, name: str, value: float, low: float, high: float,
                fix: str = "", *, high_inclusive: bool = True) -> None:
    """Raises a one-line ValueError when `value` is outside [low, high] (or [low, high))."""
    inside = low <= value <= high if high_inclusive else low <= value < high
    if not (isinstance(value, (int, float)) and math.isfinite(value) and inside):
        bracket = "]" if high_inclusive else ")"
        hint = f"; {fix}" if fix else ""
        raise ValueError(f"{owner}: {name}={value!r} is out of range [{low}, {high}{bracket}{hint}")


class TriggerConfig:
    """When to compute: decides, for each model call, whether the cached scope is recomputed.

    Subclasses set `name`, `signal` (None for a decision from the step context alone, "probe"
    for the first block's modulated input, "head_residual" for the residual of the first
    computed blocks) and implement `wants_compute` and `commit`.
    """

    name: ClassVar[str] = "trigger"
    signal: ClassVar[str | None] = None

    @property
    def needs_calibration(self) -> bool:
        """True when the trigger lacks calibrated parameters and must record a run first."""
        return False

    def new_state(self) -> Any:
        """Fresh per-branch trigger state."""
        return None

    def wants_compute(self, state: Any, frame: "CallFrame", signal: Any) -> Any:
        """Whether the scope should be recomputed now (the caller adds warm-up and the like).

        A feature-watching trigger returns a 0-d bool tensor computed from the signal (or True
        without a reference yet): eagerly the runtime reads it once (the one host sync of the
        step); in a compiled model it stays in the graph and picks the path (`torch.cond`).
        """
        raise NotImplementedError

    def observe(self, state: Any, frame: "CallFrame", signal: Any) -> None:
        """Takes the signal of a call that computes anyway (warm-up and the like) without deciding:
        `commit` then starts from it as from a computed call (in a compiled graph: no guard on the
        state's history, so this path is one graph)."""
        self.wants_compute(state, frame, signal)

    def commit(self, state: Any, frame: "CallFrame", computed: bool) -> None:
        """Updates the trigger state once the call is done, knowing whether it computed."""

    def calibrate(self, calibration: Any) -> None:
        """Takes calibrated parameters (polynomial coefficients, magnitude ratios)."""


class ScopeConfig:
    """What is cached: the whole residual, a block range, single blocks, attention, tokens, a UNet branch."""

    name: ClassVar[str] = "scope"
    model_kinds: ClassVar[tuple[str, ...]] = ("transformer",)
    triggers: ClassVar[tuple[str, ...]] = ("interval", "magcache")


class UpdateConfig:
    """How cached values are turned into outputs: reuse, Taylor forecast, second-order forecast."""

    name: ClassVar[str] = "update"
    axis: str = "step"

    def new_forecaster(self):
        raise NotImplementedError

    def coordinate(self, step_index: int, sigma: float) -> float:
        """The forecast coordinate of an evaluation: the step index or the noise level."""
        return float(step_index) if self.axis == "step" else float(sigma)


@dataclass
class CacheConfig:
    """A complete cache policy.

    Attributes:
        trigger: when the cached scope is recomputed.
        scope: what is cached.
        update: how cached values become outputs on cached steps.
        warmup: fraction of the trajectory at its start that is always computed.
        cooldown: fraction of the trajectory at its end that is always computed.
        max_cached: longest run of consecutive cached steps, as a fraction of the trajectory
            (None: unbounded; at least one step once converted).
        count_flops: measure per-unit FLOPs (once per input shape) so statistics report savings.
        name: the preset name, for reports.
        full_branches: guidance branches computed in full on every call ("cond", "uncond" or
            "batched"); e.g. ("uncond",) when CFG already computes that branch only every k steps.
    """

    trigger: TriggerConfig
    scope: ScopeConfig
    update: UpdateConfig = field(default=None)  # type: ignore[assignment]
    warmup: float = 0.0
    cooldown: float = 0.0
    max_cached: float | None = None
    count_flops: bool = True
    name: str = "custom"
    full_branches: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self.full_branches = tuple(self.full_branches)
        unknown = sorted(set(self.full_branches) - set(BRANCHES))
        if unknown:
            raise ValueError(f"CacheConfig: full_branches={list(self.full_branches)} names {unknown[0]!r}; "
                             f"branches are {', '.join(BRANCHES)}")
        if self.update is None:
            from .updates import ReuseUpdate
            self.update = ReuseUpdate()
        for part, base in (("trigger", TriggerConfig), ("scope", ScopeConfig), ("update", UpdateConfig)):
            if not isinstance(getattr(self, part), base):
                raise ValueError(f"CacheConfig.{part} must be a {base.__name__}, got "
                                 f"{type(getattr(self, part)).__name__}")
        check_range("CacheConfig", "warmup", self.warmup, 0.0, 1.0,
                    "a warm-up must be a fraction of the run below 1", high_inclusive=False)
        check_range("CacheConfig", "cooldown", self.cooldown, 0.0, 1.0,
                    "a cool-down must be a fraction of the run below 1", high_inclusive=False)
        if self.warmup + self.cooldown >= 1.0:
            raise ValueError(f"CacheConfig: warmup={self.warmup} + cooldown={self.cooldown} cover the whole "
                             "run, so nothing could be cached; lower them so they sum below 1")
        if self.max_cached is not None:
            check_range("CacheConfig", "max_cached", self.max_cached, 0.0, 1.0,
                        "give the longest cached run as a fraction of the trajectory, or None")
        if self.trigger.name not in self.scope.triggers:
            raise ValueError(f"CacheConfig: trigger '{self.trigger.name}' cannot drive scope "
                             f"'{self.scope.name}'; use one of {self.scope.triggers}")

    def describe(self) -> dict[str, Any]:
        """A JSON-ready description of the policy."""
        def fields_of(obj: Any) -> dict[str, Any]:
            return {k: v for k, v in vars(obj).items() if not k.startswith("_")}
        return {"name": self.name, "trigger": {"kind": self.trigger.name, **fields_of(self.trigger)},
                "scope": {"kind": self.scope.name, **fields_of(self.scope)},
                "update": {"kind": self.update.name, **fields_of(self.update)},
                "warmup": self.warmup, "cooldown": self.cooldown, "max_cached": self.max_cached,
                "full_branches": list(self.full_branches)}


@dataclass(frozen=True)
class RunSchedule:
    """The trajectory fractions of a CacheConfig, converted to step counts for one run length.

    Attributes:
        num_steps: solver steps of the run.
        warmup_steps: the first `warmup_steps` steps are always computed.
        cooldown_steps: the last `cooldown_steps` steps are always computed.
        max_cached_steps: longest run of consecutive cached steps, or None.
    """

    num_steps: int
    warmup_steps: int
    cooldown_steps: int
    max_cached_steps: int | None

    @classmethod
    def for_steps(cls, config: CacheConfig, num_steps: int) -> "RunSchedule":
        """Converts `config`'s fractions for a run of `num_steps` steps (ceil for the protected ends)."""
        warmup = math.ceil(config.warmup * num_steps - 1e-9)
        cooldown = math.ceil(config.cooldown * num_steps - 1e-9)
        max_cached = None
        if config.max_cached is not None:
            max_cached = math.floor(config.max_cached * num_steps + 1e-9)
            if max_cached < 1:
                logger.info("max_cached=%s of %d steps is below one step; allowing 1 cached step "
                            "in a row", config.max_cached, num_steps)
                max_cached = 1
        if warmup + cooldown >= num_steps:
            logger.warning("at %d steps, warm-up (%d) and cool-down (%d) steps cover the whole run: "
                           "every step is computed; lower warmup/cooldown to cache at this step count",
                           num_steps, warmup, cooldown)
        return cls(num_steps, warmup, cooldown, max_cached)

    def is_warmup_phase(self, step_index: int) -> bool:
        return step_index < self.warmup_steps

    def is_cooldown_phase(self, step_index: int) -> bool:
        return step_index >= self.num_steps - self.cooldown_steps
