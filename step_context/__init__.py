"""Contract 3: the step context that loop drivers publish and caches read.

Whoever drives a denoising loop (a native sampler, or a scheduler inside a diffusers pipeline)
publishes where the loop is with `publish_step`; whoever evaluates guidance marks the branch with
`guidance_branch`. Caches call `current_step()` and never count calls to guess where they are.

This module depends on nothing but the standard library, so that both leaf packages
(`samplers`, which publishes, and `caching`, which reads) can import it without importing
each other.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from dataclasses import dataclass
from typing import Iterator

BRANCHES = ("cond", "uncond", "batched")


@dataclass(frozen=True)
class StepContext:
    """Where a denoising loop stands during one model evaluation.

    Attributes:
        step_index: 0-based index of the solver step being taken.
        num_steps: total solver steps of this generation.
        sigma: the noise level (flow time t in [0, 1] for flow models) the model is evaluated at.
        timestep: the model's own timestep value for this evaluation (e.g. 1000 * t or a DDPM index).
        solver_order: order of the solver taking the step (1 for Euler).
        branch: guidance branch being evaluated: "cond", "uncond" or "batched" (both in one batch).
        generation: a counter that changes with every new generation, so state can be reset.
        stage: index of the model evaluation inside the step (0 for the first; Heun's corrector is 1).
    """

    step_index: int
    num_steps: int
    sigma: float
    timestep: float
    solver_order: int = 1
    branch: str = "cond"
    generation: int = 0
    stage: int = 0

    @property
    def progress(self) -> float:
        """Fraction of the trajectory already done, in [0, 1)."""
        return self.step_index / max(1, self.num_steps)

    @property
    def is_first_step(self) -> bool:
        return self.step_index == 0

    @property
    def is_last_step(self) -> bool:
        return self.step_index == self.num_steps - 1


_CURRENT: contextvars.ContextVar[StepContext | None] = contextvars.ContextVar("step_context", default=None)
_BRANCH: contextvars.ContextVar[str | None] = contextvars.ContextVar("guidance_branch", default=None)
_GENERATION = [0]


def new_generation() -> int:
    """Returns a fresh generation id; drivers call it once per generation."""
    _GENERATION[0] += 1
    return _GENERATION[0]


def current_step() -> StepContext | None:
    """The context of the evaluation in progress, with the active guidance branch, or None.

    Called on every model call, so it allocates nothing in the steady state: the context with
    another branch is built once per (published context, branch) and reused (a frozen dataclass
    is a pure function of both, so sharing it between threads is safe).
    """
    context = _CURRENT.get()
    branch = _BRANCH.get()
    if context is None or branch is None or branch == context.branch:
        return context
    memo = _WITH_BRANCH.get(branch)
    if memo is not None and memo[0] is context:
        return memo[1]
    relabelled = dataclasses.replace(context, branch=branch)
    _WITH_BRANCH[branch] = (context, relabelled)
    return relabelled


# branch -> (published context, that context relabelled with the branch): one entry per branch.
_WITH_BRANCH: dict[str, tuple[StepContext, StepContext]] = {}


def set_branch(branch: str | None) -> contextvars.Token:
    """Marks the following model calls as evaluating `branch` until `reset_branch(token)`.

    The blockless form of `guidance_branch`, for hooks that must not open a context manager
    around the model call (the call may be traced by torch.compile).
    """
    if branch is not None and branch not in BRANCHES:
        raise ValueError(f"unknown guidance branch {branch!r}; expected one of {BRANCHES}")
    return _BRANCH.set(branch)


def reset_branch(token: contextvars.Token) -> None:
    """Restores the branch that was active before `set_branch` returned `token`."""
    _BRANCH.reset(token)


@contextlib.contextmanager
def publish_step(context: StepContext) -> Iterator[StepContext]:
    """Makes `context` current for the duration of the block."""
    token = _CURRENT.set(context)
    try:
        yield context
    finally:
        _CURRENT.reset(token)


@contextlib.contextmanager
def guidance_branch(branch: str) -> Iterator[None]:
    """Marks the model calls inside the block as evaluating `branch` ("cond", "uncond", "batched")."""
    if branch not in BRANCHES:
        raise ValueError(f"unknown guidance branch {branch!r}; expected one of {BRANCHES}")
    token = _BRANCH.set(branch)
    try:
        yield
    finally:
        _BRANCH.reset(token)


def set_current(context: StepContext | None) -> contextvars.Token:
    """Sets the context without a block (for schedulers whose step spans pipeline code)."""
    return _CURRENT.set(context)


__all__ = ["StepContext", "BRANCHES", "current_step", "publish_step", "guidance_branch",
           "new_generation", "set_current", "set_branch", "reset_branch"]
