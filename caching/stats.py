"""Per-run cache statistics: which steps, blocks and tokens were computed, FLOPs saved, memory held.

FLOPs are counted, not estimated: the first computed call for each input signature runs under
`torch.utils.flop_counter.FlopCounterMode`, once for the whole call and once per cacheable unit
(block, attention module, token-wise module, UNet block), inside that unit's hook. A later call's
computed FLOPs are the full call's count minus the counted FLOPs of the units it skipped (a
token-subset unit counts the skipped share of its tokens). The TeaCache probe is charged on every
call, since it runs on every call.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, NamedTuple, Sequence

if TYPE_CHECKING:
    from .runtime import CallFrame


@dataclass(frozen=True)
class FlopTable:
    """Counted FLOPs of one input signature.

    Attributes:
        total: FLOPs of a fully computed call (indicator overhead included).
        units: FLOPs of each cacheable unit, by unit name.
        overhead: FLOPs of indicators (the TeaCache probe) within `total`.
    """

    total: float
    units: dict[str, float]
    overhead: float = 0.0

    @property
    def full(self) -> float:
        """FLOPs of the call without any cache (no indicator either)."""
        return self.total - self.overhead

    def computed(self, skipped: Sequence[tuple[str, float]]) -> float:
        """FLOPs actually computed when `skipped` (unit, fraction) were not computed."""
        return self.total - sum(self.units.get(unit, 0.0) * fraction for unit, fraction in skipped)


class CallRecord(NamedTuple):
    """One model call (a named tuple: one is made per model call).

    Attributes:
        branch: guidance branch.
        step: step index; stage: evaluation index within the step.
        computed: whether the cached scope was recomputed.
        skipped: the units not (fully) computed, with the skipped fraction of each.
        tokens_computed / tokens_total: token-scope totals over the call's token-wise modules.
        flops_full / flops_computed: counted FLOPs without cache and as run (None if not counted).
    """

    branch: str
    step: int
    stage: int
    computed: bool
    skipped: tuple[tuple[str, float], ...]
    tokens_computed: int
    tokens_total: int
    flops_full: float | None
    flops_computed: float | None


@dataclass
class RunStats:
    """Statistics of one generation (all branches).

    Attributes:
        generation: the generation id from the step context.
        calls: one record per model call.
        peak_cache_bytes: largest cache memory held after a call of this run.
    """

    generation: int
    calls: list[CallRecord] = field(default_factory=list)
    peak_cache_bytes: int = 0

    def steps_computed(self, branch: str | None = None) -> list[int]:
        """Step indices whose stage-0 evaluation recomputed the cached scope."""
        return [c.step for c in self.calls if c.stage == 0 and c.computed and branch in (None, c.branch)]

    def steps_cached(self, branch: str | None = None) -> list[int]:
        """Step indices whose stage-0 evaluation used the cache."""
        return [c.step for c in self.calls if c.stage == 0 and not c.computed and branch in (None, c.branch)]

    def units_skipped(self, step: int, branch: str = "cond") -> tuple[str, ...]:
        """Names of the units (blocks, attention modules, ...) not fully computed at `step`."""
        for call in self.calls:
            if call.step == step and call.branch == branch and call.stage == 0:
                return tuple(unit for unit, _ in call.skipped)
        return ()

    @property
    def token_fraction(self) -> float | None:
        """Share of tokens computed by token-wise modules over the run, or None without a token scope."""
        total = sum(c.tokens_total for c in self.calls)
        return None if total == 0 else sum(c.tokens_computed for c in self.calls) / total

    @property
    def flops_full(self) -> float:
        return float(sum(c.flops_full or 0.0 for c in self.calls))

    @property
    def flops_computed(self) -> float:
        return float(sum(c.flops_computed or 0.0 for c in self.calls))

    @property
    def flops_saved(self) -> float:
        return self.flops_full - self.flops_computed

    @property
    def flops_speedup(self) -> float:
        """Full FLOPs over computed FLOPs (1.0 when nothing was counted)."""
        return self.flops_full / self.flops_computed if self.flops_computed > 0 else 1.0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary."""
        branches = sorted({c.branch for c in self.calls})
        return {"generation": self.generation, "calls": len(self.calls),
                "steps_computed": {b: self.steps_computed(b) for b in branches},
                "steps_cached": {b: self.steps_cached(b) for b in branches},
                "token_fraction": self.token_fraction, "flops_full": self.flops_full,
                "flops_computed": self.flops_computed, "flops_speedup": self.flops_speedup,
                "peak_cache_bytes": self.peak_cache_bytes}


class CacheStats:
    """Statistics of every run of one applied cache, by generation id.

    Cache memory is measured lazily: walking every cached tensor on each model call would cost
    more than the call's own bookkeeping, and a branch state's memory only grows while it lives
    (forecasters keep a bounded history of fixed-shape tensors; a shape change starts a new state;
only a trigger's 0-d accumulators, a few bytes, come and go).
    So calls only mark the memory as changed, and `flush` measures it — before a state is dropped
    or replaced, and whenever the statistics are read — which yields the same peak.

    Attributes:
        measure_cache_bytes: returns the bytes the cache holds now (set by the runtime).
    """

    def __init__(self) -> None:
        self.runs: dict[int, RunStats] = {}
        self.passthrough_calls = 0
        self.measure_cache_bytes: Callable[[], int] | None = None
        self._cache_bytes = 0
        self._current: RunStats | None = None
        self._unmeasured = False

    @property
    def cache_bytes(self) -> int:
        """Bytes the cache holds after the latest call."""
        self.flush()
        return self._cache_bytes

    def flush(self) -> None:
        """Measures the cache memory if a call changed it since the last measurement."""
        if not self._unmeasured or self.measure_cache_bytes is None:
            return
        self._unmeasured = False
        self._cache_bytes = self.measure_cache_bytes()
        if self._current is not None:
            self._current.peak_cache_bytes = max(self._current.peak_cache_bytes, self._cache_bytes)

    def begin_run(self, generation: int) -> None:
        self._current = self.runs.setdefault(generation, RunStats(generation))

    def record_call(self, frame: "CallFrame", computed: bool, table: FlopTable | None) -> None:
        context = frame.context
        if self._current is None or self._current.generation != context.generation:
            self.flush()
            self.begin_run(context.generation)
        skipped = tuple(frame.skipped)
        tokens = frame.tokens
        tokens_computed = sum(done for done, _ in tokens) if tokens else 0
        tokens_total = sum(total for _, total in tokens) if tokens else 0
        full = computed_flops = None
        if table is not None:
            full, computed_flops = table.full, table.computed(skipped) if skipped else table.total
        self._current.calls.append(CallRecord(context.branch, context.step_index, context.stage, computed,
                                              skipped, tokens_computed, tokens_total, full,
                                              computed_flops))
        self._unmeasured = True

    def last_run(self) -> RunStats | None:
        """The statistics of the latest generation, or None before any call."""
        self.flush()
        return self._current

    def summary(self) -> dict[str, Any]:
        """All runs, JSON-ready."""
        self.flush()
        return {"runs": [run.to_dict() for run in self.runs.values()],
                "passthrough_calls": self.passthrough_calls, "cache_bytes": self.cache_bytes}

    def reset(self) -> None:
        self.runs.clear()
        self._current = None
        self._unmeasured = False
        self.passthrough_calls = 0
