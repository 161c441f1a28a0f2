"""The shared loop driver: walks the step indices and publishes the step context (contract 3)."""

from __future__ import annotations

from typing import Iterator

import torch

from step_context import StepContext, new_generation, publish_step


def solver_steps(sigmas: torch.Tensor, order: int, model=None) -> Iterator[int]:
    """Yields step indices 0..N-1, publishing a StepContext around each step's evaluations.

    `sigmas` must be a CPU tensor (schedules are), so reading one value is no device sync.
    """
    if sigmas.device.type != "cpu":
        sigmas = sigmas.cpu()
    num_steps = len(sigmas) - 1
    values = sigmas.tolist()
    num_train = getattr(getattr(model, "schedule", None), "num_train_timesteps", 1000)
    generation = new_generation()
    for index in range(num_steps):
        context = StepContext(step_index=index, num_steps=num_steps, sigma=values[index],
                              timestep=values[index] * num_train, solver_order=order,
                              generation=generation)
        with publish_step(context):
            yield index
