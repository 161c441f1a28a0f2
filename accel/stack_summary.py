"""`accel.summary(pipe)`: what the stack did in the pipeline's latest call, as a dataclass.

Per guidance branch: the steps whose cached scope was computed and those served from the cache,
the block (or unit) evaluations skipped, and FLOPs counted by torch's FlopCounterMode (full and as
run; quantized linears are counted too, see `caching.flops`). Over all branches: the FLOP speedup
of the cached denoiser calls, the peak cache memory, the uncond calls served by CFG reuse, and the
resolved stack that ran (with every interaction decision).

    image = pipe(prompt, num_inference_steps=20).images[0]
    print(accel.summary(pipe).to_dict())
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class BranchSummary:
    """One guidance branch of the latest call, over every cached denoiser.

    Attributes:
        branch: "cond", "uncond" or "batched".
        calls: denoiser calls made on this branch (all stages).
        steps_computed: step indices whose cached scope was computed (empty without a cache).
        steps_cached: step indices served from the cache.
        units_skipped: block / attention / token-module evaluations skipped, summed over steps.
        flops_full: counted FLOPs the calls would have cost without a cache (None: not counted).
        flops_computed: counted FLOPs as run (None: not counted).
    """

    branch: str
    calls: int
    steps_computed: tuple[int, ...]
    steps_cached: tuple[int, ...]
    units_skipped: int
    flops_full: float | None
    flops_computed: float | None


@dataclass(frozen=True)
class StackSummary:
    """What the stack did in the pipeline's latest call.

    Attributes:
        pipeline: the pipeline class.
        num_steps: solver steps of the call.
        guidance: how guidance ran: "none", "separate" (cond / uncond calls) or "batched".
        stack: the resolved stack that ran, with its decisions (`ResolvedStack.describe()`).
        cached_models: the denoisers carrying a cache (e.g. ["transformer", "transformer_2"]).
        branches: one summary per guidance branch that ran.
        flops_full: counted FLOPs of every denoiser call without a cache (None: not counted).
        flops_computed: counted FLOPs as run (None: not counted).
        peak_cache_bytes: the most memory the caches held at once during the call.
        uncond_reused_calls: uncond calls answered by CFG reuse instead of the model.
    """

    pipeline: str
    num_steps: int
    guidance: str
    stack: str
    cached_models: tuple[str, ...]
    branches: tuple[BranchSummary, ...]
    flops_full: float | None
    flops_computed: float | None
    peak_cache_bytes: int
    uncond_reused_calls: int

    @property
    def flops_speedup(self) -> float | None:
        """Counted FLOPs without the cache over FLOPs as run (None without a counted cache)."""
        if not self.flops_computed or self.flops_full is None:
            return None
        return self.flops_full / self.flops_computed

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, with `flops_speedup`."""
        return {**asdict(self), "flops_speedup": self.flops_speedup}


def _sum_or_none(values: list[float | None]) -> float | None:
    counted = [v for v in values if v is not None]
    return float(sum(counted)) if counted else None


def _branch(name: str, calls: int, runs: list[Any]) -> BranchSummary:
    records = [call for run in runs for call in run.calls if call.branch == name]
    computed = sorted({c.step for c in records if c.stage == 0 and c.computed})
    cached = sorted({c.step for c in records if c.stage == 0 and not c.computed})
    return BranchSummary(branch=name, calls=calls, steps_computed=tuple(computed), steps_cached=tuple(cached),
                         units_skipped=sum(len(c.skipped) for c in records),
                         flops_full=_sum_or_none([c.flops_full for c in records]) if records else None,
                         flops_computed=_sum_or_none([c.flops_computed for c in records]) if records else None)


def summarize(pipeline: str, resolved: Any, caches: dict[str, Any], hooks: list[Any]) -> StackSummary:
    """Builds the summary of the latest call.

    Args:
        pipeline: the pipeline class name.
        resolved: the ResolvedStack of the latest call.
        caches: denoiser attribute name -> its caching.CacheHandle.
        hooks: the GuidanceBranchHooks of the denoisers (call counts, reused uncond calls).
    """
    runs = [run for run in (handle.stats.last_run() for handle in caches.values()) if run is not None]
    counts: dict[str, int] = {}
    for hook in hooks:
        for branch, count in hook.calls.items():
            counts[branch] = counts.get(branch, 0) + count
    branches = tuple(_branch(name, counts.get(name, 0), runs) for name in sorted(counts))
    return StackSummary(
        pipeline=pipeline, num_steps=resolved.run.num_steps, guidance=resolved.run.guidance,
        stack=resolved.describe(), cached_models=tuple(caches), branches=branches,
        flops_full=_sum_or_none([b.flops_full for b in branches]),
        flops_computed=_sum_or_none([b.flops_computed for b in branches]),
        peak_cache_bytes=sum(run.peak_cache_bytes for run in runs),
        uncond_reused_calls=sum(hook.reused_calls for hook in hooks))
