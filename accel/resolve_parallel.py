"""The resolver rule for context parallelism (`context-parallel`), beside accel/resolve.py's rules.

Under diffusers' context parallelism each rank holds a token shard, and every cache decision must
be the same on all ranks (caching.parallel). What decides from the step alone needs nothing; a
feature-watching trigger reduces its statistic over the group. Two things cannot be made to agree
and are refused: a trigger that calibrates itself on its first generation (each rank would fit its
own shard) and the token scope (ToCa ranks tokens within a shard).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from accel.stack import Stack, StackError

if TYPE_CHECKING:
    from accel.resolve import RunInfo

CALIBRATED_PARAMETER = {"teacache": "coefficients", "magcache": "ratios"}


def context_parallel_decisions(stack: Stack, run: "RunInfo") -> tuple[Stack, list[str]]:
    """Says how the cache decides alike on every context-parallel rank, or refuses what cannot."""
    ranks = run.context_parallel
    if ranks <= 1 or stack.cache is None:
        return stack, []
    config, preset = stack.cache.build(), stack.cache.preset
    trigger, where = config.trigger, f"cache {preset} under context parallelism ({ranks} ranks)"
    if trigger.needs_calibration:
        key = CALIBRATED_PARAMETER.get(trigger.name, "its parameters")
        raise StackError(f"{where}: {trigger.name} would calibrate on each rank's token shard and the ranks would "
                         f"disagree; calibrate on one process (caching.calibrate_{trigger.name}) and set "
                         f"cache.params.{key}")
    if config.scope.name == "tokens":
        raise StackError(f"{where}: the tokens scope picks its recomputed tokens within each rank's shard; use a "
                         "block or attention preset (fora, taylorseer, fbcache, dbcache, teacache)")
    if trigger.signal is not None:
        return stack, [f"context-parallel: {ranks} ranks hold token shards -> {trigger.name} all-reduces its "
                       "statistic's partial sums over the group before deciding (one all-reduce per decision), "
                       "so every rank decides alike"]
    return stack, [f"context-parallel: {ranks} ranks -> {trigger.name} decides from the step alone, alike on "
                   "every rank"]
