"""Trajectory distillation: a LoRA student takes few (optionally cached) solver steps and lands on
the teacher's recorded trajectory.

The method is single-phase TRACT (Berthelot et al. 2023, arXiv:2303.04248, "transitive closure
time-distillation"), which generalises Luhman & Luhman's direct distillation (arXiv:2101.02388)
to several segments: the teacher's fine trajectory is cut into K segments at points of its own
grid, and the student's one solver step must jump from the start of a segment to its end. Two
losses:

- "segments": every student step starts from the teacher's state (TRACT's loss, one model call
  per sample and step; cheap, but never sees its own errors);
- "rollout": the student rolls out all K steps from the noise, with gradients through the whole
  rollout (backpropagation through the solver, as in Watson et al.'s "learning fast samplers",
  arXiv:2202.05830), and every state it visits is compared with the teacher's at the same sigma.

The student runs without classifier-free guidance (cond branch only) and learns the guided
teacher, which is guidance distillation (Meng et al. 2023, arXiv:2210.03142) folded into the same
loss. A cache installed on the student during training (`install_cache`) makes the adapter
cache-aware: the rollout then goes through the cache's reused or forecast steps exactly as it will
at inference, so the adapter learns to correct them (the loss is on the rollout, not on single
steps). Solvers must have differentiable cores (all of samplers' cores are; the public
`samplers.sample` only adds `no_grad`).
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
from samplers.loop import run_solver

LOSSES = ("segments", "rollout")


@dataclass(frozen=True)
class TrajectoryConfig:
    """What the student is trained to do.

    Attributes:
        steps: student solver steps.
        solver: student solver (samplers registry; one evaluation per step).
        schedule: the student's schedule: a samplers registry name, or "auto" when the caller
            gives the walk itself (`TrajectoryDistillation(sigmas=...)`, e.g. the walk a pipeline's
            own scheduler takes); teacher states between two recorded sigmas are interpolated
            linearly (exact when the student's sigmas are on the grid).
        batch_size: trajectories per micro-batch.
        loss: "segments" or "rollout" (see the module docstring).
        seed: batch selection seed.
    """

    steps: int = 4
    solver: str = "euler"
    schedule: str = "flow"
    batch_size: int = 32
    loss: str = "rollout"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        spec = samplers.get_solver(self.solver)
        if spec.evals_per_step != 1:
            raise ValueError(f"student solver {self.solver!r} takes {spec.evals_per_step} evaluations a "
                             "step; use euler, ddim, dpmpp_2m or unipc_bh2")
        if self.schedule != "auto":
            samplers.get_schedule(self.schedule)


class TrajectoryDistillation:
    """The objective (see distill.objective.Objective).

    Args:
        name: "step-distill" or "cache-aware" (recorded in the adapter's metadata).
        module: the student's trainable module (LoRA layers require grad, the rest is frozen).
        student: the student as a Denoiser (cond only, adapter active).
        teacher: recorded teacher trajectories.
        config: steps, solver, schedule, loss.
        export: writes the adapter: `export(out_dir) -> path`.
        install_cache: installs the inference cache on the student, returning a callable that
            removes it; None trains without a cache.
        sigmas: (steps + 1,) the student's walk; None builds it from `config.schedule` (required
            when that is "auto").
    """

    def __init__(self, name: str, module: nn.Module, student: samplers.Denoiser, teacher: Trajectories,
                 config: TrajectoryConfig, export: Callable[[Path], Path],
                 install_cache: Callable[[], Callable[[], None]] | None = None,
                 sigmas: torch.Tensor | None = None):
        self.name = name
        self._module = module
        self._student = student
        self._teacher = teacher
        self.config = config
        self._export = export
        self.sigmas = self._walk(config, student, sigmas)
        self._remove_cache = install_cache() if install_cache is not None else None

    @staticmethod
    def _walk(config: TrajectoryConfig, student: samplers.Denoiser, sigmas: torch.Tensor | None) -> torch.Tensor:
        if sigmas is None:
            if config.schedule == "auto":
                raise ValueError("schedule 'auto' needs the student's walk: pass sigmas=...")
            return samplers.make_sigmas(config.schedule, config.steps, student.schedule).to(torch.float32)
        sigmas = torch.as_tensor(sigmas, dtype=torch.float32).detach().cpu()
        if sigmas.shape != (config.steps + 1,):
            raise ValueError(f"the student's walk has {len(sigmas) - 1} steps, the config {config.steps}")
        return sigmas

    def module(self) -> nn.Module:
        return self._module

    def loss(self, step: int, micro_batch: int) -> torch.Tensor:
        """Mean squared error to the teacher's states (averaged over the K student states)."""
        generator = seeded_generator(self.config.seed, step, micro_batch)
        index = torch.randint(len(self._teacher), (self.config.batch_size,), generator=generator)
        batch = self._teacher.batch(index)
        device = next(self._module.parameters()).device
        points = batch.states_at(self.sigmas).to(device)
        targets = points[:, 1:]
        cond = {k: v.to(device) for k, v in batch.cond.items()}
        if self.config.loss == "rollout":
            states = self.rollout(points[:, 0], cond)
        else:
            states = self._segment_steps(points[:, :-1], cond)
        return torch.mean((states - targets) ** 2)

    def rollout(self, noise: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        """The student's states (B, K, ...) after each of its K steps from `noise` (B, ...)."""
        spec = samplers.get_solver(self.config.solver)
        states = []
        run_solver(spec.make_steps(noise, self.sigmas, self._student.schedule), self._student, self.sigmas,
                   order=spec.order, cond=cond, callback=lambda index, x, x0: states.append(x))
        return torch.stack(states, dim=1)

    def _segment_steps(self, starts: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        """One student step from each teacher state (B, K, ...) to the next grid point."""
        ends = []
        spec = samplers.get_solver(self.config.solver)
        for k in range(self.config.steps):
            pair = self.sigmas[k:k + 2]
            end = run_solver(spec.make_steps(starts[:, k], pair, self._student.schedule), self._student, pair,
                             order=spec.order, cond=cond)
            ends.append(end)
        return torch.stack(ends, dim=1)

    def export(self, out_dir: Path) -> Path:
        if self._remove_cache is not None:
            self._remove_cache()
            self._remove_cache = None
        return self._export(out_dir)
