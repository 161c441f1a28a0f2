"""Splitting work across `accelerate launch` processes and gathering it back.

Work is cut into fixed global batches first and whole batches are dealt round-robin to the
processes, so every batch is computed exactly as in a single-process run and the gathered result
is identical whatever the number of processes.
"""

from __future__ import annotations

from typing import Callable, TypeVar

T = TypeVar("T")


def process_state():
    """The accelerate PartialState (one process when not launched by accelerate).

    Without a GPU the processes that `accelerate launch` (torchrun) starts join a gloo group on
    the CPU, so the same launch command works on a laptop, in CI and on a GPU node.
    """
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def batch_slices(total: int, batch_size: int) -> list[slice]:
    """Global batches [0, b), [b, 2b), ... covering `total` items."""
    return [slice(start, min(start + batch_size, total)) for start in range(0, total, batch_size)]


def map_batches(work: Callable[[slice], T], slices: list[slice]) -> list[T]:
    """Runs `work` on this process's share of `slices`; returns every batch's result in order,
    gathered from all processes."""
    state = process_state()
    mine = [(index, work(piece)) for index, piece in enumerate(slices)
            if index % state.num_processes == state.process_index]
    if state.num_processes > 1:
        from accelerate.utils import gather_object

        mine = gather_object(mine)
    return [result for _, result in sorted(mine, key=lambda pair: pair[0])]


def is_main_process() -> bool:
    return process_state().is_main_process


def wait_for_everyone() -> None:
    process_state().wait_for_everyone()
