"""Cache decisions under context parallelism: every rank holds a token shard, every rank decides alike.

diffusers' context parallelism (`model.enable_parallelism(config=ContextParallelConfig(...))`)
splits the image and text tokens across the ranks of a group at the model's input and gathers
them at its output; the blocks in between, and the cache's hooks on them, see one shard per rank.
A static schedule (interval, calibrated steps, MagCache's ratios, a router's table) decides from the
step alone, so every rank takes the same decision. A feature-watching trigger (TeaCache's probe,
the first-block residual of FBCache / DBCache, the error budget) computes a statistic of the
features; on a shard it would differ per rank, the ranks would take different decisions, and the
next attention (which exchanges tokens between ranks) would mix computed and cached blocks. So its
statistic is reduced over the group first: the partial sums of |a - b| and |b| are all-reduced in
one collective, and the relative change is computed from the totals, which is the statistic of the
whole token set (up to the order of the float additions).
"""

from __future__ import annotations

from typing import Any

import torch

_EPS = 1e-8


def context_parallel_group(model: torch.nn.Module) -> Any:
    """The process group of `model`'s context parallelism, or None when it has none (or one rank)."""
    config = getattr(model, "_parallel_config", None)
    cp_config = getattr(config, "context_parallel_config", None)
    mesh = getattr(cp_config, "_flattened_mesh", None)
    if mesh is None:
        return None
    group = mesh.get_group()
    return group if torch.distributed.get_world_size(group) > 1 else None


def context_parallel_size(model: torch.nn.Module) -> int:
    """How many ranks share `model`'s tokens (1 without context parallelism)."""
    group = context_parallel_group(model)
    return 1 if group is None else torch.distributed.get_world_size(group)


def reduced_relative_l1(current: torch.Tensor, previous: torch.Tensor, group: Any) -> torch.Tensor:
    """mean|current - previous| / mean|previous| over the tokens of every rank of `group`.

    Args:
        current, previous: this rank's shard of the two feature tensors (same shape).
        group: the context-parallel process group.

    Returns:
        A 0-d float32 tensor on the inputs' device, equal on every rank.
    """
    sums = torch.stack([(current - previous).abs().sum(dtype=torch.float32),
                        previous.abs().sum(dtype=torch.float32),
                        torch.tensor(float(previous.numel()), device=previous.device)])
    torch.distributed.all_reduce(sums, group=group)
    count = sums[2]
    return (sums[0] / count) / (sums[1] / count).clamp_min(_EPS)
