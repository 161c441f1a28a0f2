"""The shared loop driver: runs a solver and publishes the step context (step_context/).

A solver's core is a generator ("solver steps"): it yields an `Evaluation` whenever it needs the
data prediction x0 at (x, sigma), receives x0 through `send`, and returns the final sample. The
same core is driven by `run_solver` (the native loop, below) and by the diffusers-compatible
scheduler (one `step()` per evaluation), so both walk exactly the same arithmetic.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Generator, Iterator

import torch

from step_context import StepContext, current_step, new_generation, publish_step

if TYPE_CHECKING:
    from samplers.registry import SolverSpec


@dataclass(frozen=True)
class Evaluation:
    """A solver's request for x0 at one point.

    Attributes:
        x: (B, ...) the point to evaluate the denoiser at.
        sigma: its noise level in the model's own variable (a Python float).
        step_index: the solver step this evaluation belongs to.
        stage: index of the evaluation inside the step (0 first; Heun's corrector is 1).
    """

    x: torch.Tensor
    sigma: float
    step_index: int
    stage: int = 0


SolverSteps = Generator[Evaluation, torch.Tensor, torch.Tensor]


def check_sigmas(sigmas: torch.Tensor) -> torch.Tensor:
    """Returns `sigmas` as a CPU tensor, or raises if it is not a strictly decreasing walk >= 0."""
    sigmas = torch.as_tensor(sigmas).detach().cpu()
    if sigmas.ndim != 1 or len(sigmas) < 2:
        raise ValueError(f"sigmas must be a 1-D tensor of num_steps + 1 >= 2 values, got shape "
                         f"{tuple(sigmas.shape)}; build it with a samplers.schedules function")
    if not bool((sigmas[1:] < sigmas[:-1]).all()) or float(sigmas[-1]) < 0:
        raise ValueError("sigmas must be strictly decreasing and >= 0; build them with a "
                         "samplers.schedules function")
    return sigmas


def model_timestep(model, sigma: float) -> float:
    """The model's own timestep for a noise level: 1000 * t for flow, the DDPM index for VP."""
    schedule = getattr(model, "schedule", model)
    to_timestep = getattr(schedule, "sigma_to_timestep", None)
    if to_timestep is not None:
        return float(to_timestep(torch.tensor([sigma], dtype=torch.float32))[0])
    return sigma * getattr(schedule, "num_train_timesteps", 1000)


def evaluation_context(request: Evaluation, num_steps: int, order: int, generation: int,
                       model) -> StepContext:
    """The StepContext of one model evaluation."""
    return StepContext(step_index=request.step_index, num_steps=num_steps, sigma=request.sigma,
                       timestep=model_timestep(model, request.sigma), solver_order=order,
                       generation=generation, stage=request.stage)


def solver_steps(sigmas: torch.Tensor, order: int, model=None) -> Iterator[int]:
    """Yields step indices 0..N-1, publishing a StepContext around each step's evaluations.

    `sigmas` must be a CPU tensor (schedules are), so reading one value is no device sync.
    """
    values = sigmas.cpu().tolist()
    num_steps = len(values) - 1
    generation = new_generation()
    for index in range(num_steps):
        request = Evaluation(x=torch.empty(0), sigma=values[index], step_index=index)
        with publish_step(evaluation_context(request, num_steps, order, generation, model)):
            yield index


@contextlib.contextmanager
def stage_context(request: Evaluation, model) -> Iterator[None]:
    """Inside a step published by `solver_steps`, publishes a later stage with its own sigma."""
    context = current_step()
    if request.stage == 0 or context is None:
        yield
        return
    later = dataclasses.replace(context, sigma=request.sigma, stage=request.stage,
                                timestep=model_timestep(model, request.sigma))
    with publish_step(later):
        yield


def advance(steps: SolverSteps, x0: torch.Tensor | None) -> tuple[Evaluation | None, torch.Tensor | None]:
    """Sends x0 (None to start) and returns (next request, None) or (None, final sample)."""
    try:
        return (next(steps) if x0 is None else steps.send(x0)), None
    except StopIteration as stop:
        return None, stop.value


def run_solver(steps: SolverSteps, denoiser, sigmas: torch.Tensor, *, order: int,
               cond: dict | None = None, callback: Callable | None = None) -> torch.Tensor:
    """Drives a solver core natively: one denoiser call per request, under the step context.

    Args:
        steps: the solver's generator, already bound to x and sigmas.
        denoiser: a Denoiser (returns x0).
        sigmas: (N + 1,) the schedule the core walks (for the step context).
        order: the solver's order (published in the step context).
        cond: keyword conditioning passed to the denoiser.
        callback: optional `callback(step_index, x, x0)` after each step, x0 from its first call.

    Returns:
        The final sample (B, ...).
    """
    cond = cond or {}
    request, result = advance(steps, None)
    for index in solver_steps(sigmas, order, model=denoiser):
        first_x0 = None
        while request is not None and request.step_index == index:
            with stage_context(request, denoiser):
                x0 = denoiser(request.x, request.sigma, **cond)
            first_x0 = x0 if first_x0 is None else first_x0
            request, result = advance(steps, x0)
        if callback is not None:
            callback(index, result if request is None else request.x, first_x0)
    return result


def plan_evaluations(spec: "SolverSpec", sigmas: torch.Tensor, schedule, options: dict) -> list[Evaluation]:
    """The evaluation points of a solver on a walk, found by a dry run of its core on a zero sample."""
    dry = dict(options)
    if "generator" in inspect.signature(spec.steps).parameters:
        dry["generator"] = torch.Generator().manual_seed(0)  # leaves the global random state alone
    zero = torch.zeros(1, dtype=torch.float64)
    core = spec.make_steps(zero, sigmas, schedule, **dry)
    plan, (request, _) = [], advance(core, None)
    while request is not None:
        plan.append(Evaluation(torch.empty(0), request.sigma, request.step_index, request.stage))
        request, _ = advance(core, zero)
    return plan
