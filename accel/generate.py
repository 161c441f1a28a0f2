"""Seeded generation on the embedded models through the samplers' contracts."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from tqdm import tqdm

import samplers
from accel.embedded import NULL_CLASS, FluxDigits


def sample_noise(seed: int, indices: range | list[int], shape: tuple[int, ...]) -> torch.Tensor:
    """Initial noise (len(indices), *shape); sample i is drawn from its own seed, so any split of
    the samples across batches or processes gives the same noise."""
    return torch.stack([
        torch.randn(shape, generator=torch.Generator().manual_seed(seed * 1_000_003 + i))
        for i in indices
    ])


def flux_digits_denoiser(model: FluxDigits, guidance_scale: float, uncond_interval: int = 1) -> samplers.Denoiser:
    """The embedded flow model as a Denoiser, with classifier-free guidance on its velocity (the
    uncond branch computed every `uncond_interval` steps)."""
    def model_fn(x: torch.Tensor, sigma: torch.Tensor, *, labels: torch.Tensor) -> torch.Tensor:
        return model.velocity(x, sigma, labels)

    guided = samplers.cfg_model_fn(model_fn, guidance_scale, cond_key="labels",
                                   uncond_value=lambda labels: torch.full_like(labels, NULL_CLASS),
                                   uncond_interval=uncond_interval)
    return samplers.Denoiser(guided, prediction_type="flow", schedule=samplers.FlowSchedule())


@dataclass(frozen=True)
class SamplingPlan:
    """A solver, its schedule and the step count: everything the loop needs besides the model."""

    solver: str
    steps: int
    schedule: str = "flow"
    schedule_params: dict = field(default_factory=dict)
    solver_params: dict = field(default_factory=dict)

    def describe(self) -> str:
        params = {**self.schedule_params, **self.solver_params}
        extra = ", ".join(f"{k}={v}" for k, v in params.items())
        return f"{self.solver} {self.steps} steps, {self.schedule} schedule" + (f" ({extra})" if extra else "")

    def nfe(self, guidance_scale: float) -> int:
        """Model evaluations per sample: solver NFE times the guidance passes."""
        passes = 1 if guidance_scale == 1.0 else 2
        return samplers.get_solver(self.solver).nfe(self.steps) * passes


def generate(denoiser: samplers.Denoiser, plan: SamplingPlan, noise: torch.Tensor, labels: torch.Tensor,
             batch_size: int, *, device: torch.device | str = "cpu", desc: str | None = None,
             before_generation: Callable[[], None] | None = None) -> torch.Tensor:
    """Samples images (N, C, H, W) for `noise` (N, C, H, W) and `labels` (N,), batch by batch.

    Args:
        denoiser: the model as a Denoiser.
        plan: solver, steps and schedule.
        noise: initial noise, already drawn per sample.
        labels: class labels.
        batch_size: samples per model call.
        device: where to run.
        desc: progress-bar label (None hides the bar).
        before_generation: called before each batch's generation (e.g. a cache reset).
    """
    outputs = []
    starts = range(0, noise.shape[0], batch_size)
    for start in tqdm(starts, desc=desc, disable=desc is None, leave=False):
        x = noise[start:start + batch_size].to(device)
        batch_labels = labels[start:start + batch_size].to(device)
        if before_generation is not None:
            before_generation()
        outputs.append(samplers.sample(
            denoiser, x, solver=plan.solver, steps=plan.steps, schedule=plan.schedule,
            schedule_options=dict(plan.schedule_params), solver_options=dict(plan.solver_params),
            cond={"labels": batch_labels}).cpu())
    return torch.cat(outputs)
