"""Registries of solvers and schedules, chosen by name (recipes never import dotted paths)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from samplers.euler import sample_euler
from samplers.schedules import get_sigmas_flow


@dataclass(frozen=True)
class SolverSpec:
    """A registered solver.

    Attributes:
        name: registry name.
        fn: `fn(denoiser, x, sigmas, *, cond, callback) -> x`.
        order: convergence order.
        evals_per_step: model evaluations per step (NFE = steps * evals_per_step, minus savings
            stated by `nfe`).
        predictions: prediction types the solver accepts (all, through the Denoiser adapters).
        paper: citation.
    """

    name: str
    fn: Callable[..., torch.Tensor]
    order: int
    evals_per_step: int
    paper: str

    def nfe(self, num_steps: int) -> int:
        """Exact model evaluations for `num_steps` steps (one per guidance pass not counted)."""
        return num_steps * self.evals_per_step


SOLVERS: dict[str, SolverSpec] = {
    "euler": SolverSpec("euler", sample_euler, order=1, evals_per_step=1,
                        paper="Euler / DDIM (Song et al. 2021, arXiv:2010.02502)"),
}

SCHEDULES: dict[str, Callable[..., torch.Tensor]] = {
    "flow": get_sigmas_flow,
}


def get_solver(name: str) -> SolverSpec:
    """Looks a solver up by name, with an error listing the known names."""
    if name not in SOLVERS:
        raise ValueError(f"unknown solver {name!r}; choose one of: {', '.join(sorted(SOLVERS))}")
    return SOLVERS[name]


def get_schedule(name: str) -> Callable[..., torch.Tensor]:
    """Looks a schedule function up by name, with an error listing the known names."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; choose one of: {', '.join(sorted(SCHEDULES))}")
    return SCHEDULES[name]
