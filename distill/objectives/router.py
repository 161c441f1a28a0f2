"""A learned cache router: per-step, per-block keep/skip gates (Learning-to-Cache, Ma et al. 2024,
arXiv:2406.01733).

For a fixed solver and step count, gate g[i, l] = sigmoid(logit[i, l] / temperature) says how much
of block l's fresh residual step i uses; the rest comes from the residual cached at step i - 1
(the cache engine's soft "router" mode). As in Learning-to-Cache, training works on pairs of
adjacent steps of the full model's own trajectory: step i - 1 runs in full and fills the cache,
step i runs gated, and the loss is the error of the gated data prediction against the full one
plus a sparsity penalty that pushes gates towards skipping:

    loss = mean((D_gated(x_i) - D_full(x_i))^2) / mean(D_full(x_i)^2) + penalty * mean(g[i])

The first step has no cache and always computes. At inference the gates are thresholded into a
boolean table (`caching.load_router(path).mask(threshold)`), and skipped blocks cost nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

import samplers
from distill.objective import seeded_generator
from distill.trajectories import Trajectories
from samplers.loop import model_timestep
from step_context import StepContext, new_generation, publish_step


@dataclass(frozen=True)
class RouterConfig:
    """Router training settings.

    Attributes:
        penalty: weight of the mean gate (the sparsity term).
        temperature: gates are sigmoid(logit / temperature).
        init_logit: starting logit (positive: start near "compute everything").
        batch_size: trajectories per micro-batch (all at the same step).
        steps_per_batch: distinct steps (table rows) each micro-batch trains, one pair each; every
            row must be visited often, and one row per micro-batch visits each only steps / rows times.
        seed: batch and step selection seed.
    """

    penalty: float = 0.002
    temperature: float = 1.0
    init_logit: float = 2.0
    batch_size: int = 8
    steps_per_batch: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        if self.penalty < 0:
            raise ValueError(f"penalty must be >= 0, got {self.penalty}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.steps_per_batch < 1:
            raise ValueError(f"steps_per_batch must be >= 1, got {self.steps_per_batch}")


class RouterLogits(nn.Module):
    """The trainable table: logits (num_steps, num_blocks)."""

    def __init__(self, num_steps: int, num_blocks: int, init_logit: float, temperature: float):
        super().__init__()
        self.logits = nn.Parameter(torch.full((num_steps, num_blocks), float(init_logit)))
        self.temperature = temperature

    def gates(self) -> torch.Tensor:
        """(num_steps, num_blocks) in (0, 1); step 0 is forced to 1 (nothing cached yet)."""
        gates = torch.sigmoid(self.logits / self.temperature)
        return torch.cat([torch.ones_like(gates[:1]), gates[1:]])


class RouterObjective:
    """The objective (see distill.objective.Objective).

    Args:
        logits: the trainable gate table; its gates() must already drive the model's cache (the
            caller installs `caching.apply_router(model, gates_fn, mode="soft")`).
        denoiser: the full model as a Denoiser (guidance included), with the soft router installed.
        teacher: the full model's own trajectory at the router's solver and step count.
        config: penalty, temperature, batch size.
        export: writes the router file: `export(out_dir) -> path`.
    """

    name = "router"

    def __init__(self, logits: RouterLogits, denoiser: samplers.Denoiser, teacher: Trajectories,
                 config: RouterConfig, export: Callable[[Path], Path]):
        if logits.logits.shape[0] != teacher.x0.shape[1]:
            raise ValueError(f"router table has {logits.logits.shape[0]} steps but the teacher trajectory "
                             f"{teacher.x0.shape[1]}; record the teacher at the router's step count")
        self._logits = logits
        self._denoiser = denoiser
        self._teacher = teacher
        self.config = config
        self._export = export

    def module(self) -> nn.Module:
        return self._logits

    def loss(self, step: int, micro_batch: int) -> torch.Tensor:
        """Mean over `steps_per_batch` random steps i >= 1 of the gated prediction's relative error,
        plus the sparsity term on those rows."""
        generator = seeded_generator(self.config.seed, step, micro_batch)
        num_steps = self._teacher.x0.shape[1]
        index = torch.randint(len(self._teacher), (self.config.batch_size,), generator=generator)
        rows = (torch.randperm(num_steps - 1, generator=generator)[:self.config.steps_per_batch] + 1).tolist()
        batch = self._teacher.batch(index)
        device = self._logits.logits.device
        cond = {k: v.to(device) for k, v in batch.cond.items()}
        errors = [self._pair_error(batch, cond, row, device) for row in rows]
        gates = self._logits.gates()[rows]
        return torch.stack(errors).mean() + self.config.penalty * gates.mean()

    def _pair_error(self, batch: Trajectories, cond: dict, step_index: int, device) -> torch.Tensor:
        """Step i - 1 in full (fills the cache), step i gated: relative error of its prediction."""
        generation = new_generation()
        with torch.no_grad(), publish_step(self._context(step_index - 1, generation)):
            self._denoiser(batch.states[:, step_index - 1].to(device), self._sigma(step_index - 1), **cond)
        with publish_step(self._context(step_index, generation)):
            gated = self._denoiser(batch.states[:, step_index].to(device), self._sigma(step_index), **cond)
        full = batch.x0[:, step_index].to(device)
        return torch.mean((gated - full) ** 2) / torch.mean(full ** 2).clamp_min(1e-12)

    def _sigma(self, step_index: int) -> float:
        return float(self._teacher.sigmas[step_index])

    def _context(self, step_index: int, generation: int) -> StepContext:
        sigma = self._sigma(step_index)
        return StepContext(step_index=step_index, num_steps=self._teacher.x0.shape[1], sigma=sigma,
                           timestep=model_timestep(self._denoiser, sigma), generation=generation)

    def export(self, out_dir: Path) -> Path:
        return self._export(out_dir)
