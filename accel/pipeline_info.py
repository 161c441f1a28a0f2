"""What a stack is resolved against on a diffusers pipeline: its denoisers and the `RunInfo` of a call.

`accel.apply` reads this before it changes anything; the lab, calibration and training read it to
check a stack on a loaded pipeline without applying it.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

import caching
from caching.parallel import context_parallel_size
from samplers.diffusers_scheduler import AccelScheduler

from accel.branch_hook import branch_mode
from accel.resolve import RunInfo
from accel.stack import Stack, StackError

# Attributes that hold a pipeline's denoisers, in order; the first present one is the primary.
DENOISER_ATTRIBUTES = ("transformer", "transformer_2", "unet")


def unwrap_compiled(model: torch.nn.Module) -> torch.nn.Module:
    """The module a `torch.compile(module)` wrapper (OptimizedModule) compiles, else `model` itself.

    Hooks go on the original module: the wrapper's compiled forward calls the original module's
    `forward` attribute, so the compiled code runs the hooks (and recompiles once when they change).
    """
    original = getattr(model, "_orig_mod", None)
    return original if isinstance(original, torch.nn.Module) else model


def primary_denoiser(pipe: Any) -> tuple[str, torch.nn.Module]:
    """(attribute, module) of the pipeline's primary denoiser, unwrapped from torch.compile."""
    for name in ("transformer", "unet"):
        model = getattr(pipe, name, None)
        if isinstance(model, torch.nn.Module):
            return name, unwrap_compiled(model)
    raise StackError(f"{type(pipe).__name__} has neither a transformer nor a unet; accel.apply needs a "
                     "diffusers pipeline with one of them")


def scheduler_config(pipe: Any) -> dict[str, Any]:
    """The pipeline scheduler's whole config with its class name (a scheduler built in code has none).

    AccelScheduler.from_config keeps it as `native_config`, the walk of `schedule: auto`.
    """
    return {**pipe.scheduler.config, "_class_name": type(pipe.scheduler).__name__}


def run_info_for(pipe: Any, stack: Stack) -> RunInfo:
    """What `stack` is resolved against on `pipe`: its denoiser, prediction type and guidance calls,
    and, when the stack brings adapters, the denoiser's weights identity (their base-model check;
    a few KiB read per tensor, so only then)."""
    _, denoiser = primary_denoiser(pipe)
    sampler = stack.sampler
    try:
        probe = AccelScheduler.from_config(scheduler_config(pipe), solver="euler", schedule="auto")
        walk = AccelScheduler.from_config(scheduler_config(pipe), solver="euler", schedule=sampler.schedule,
                                          schedule_options=dict(sampler.schedule_params) or None)
    except ValueError as error:
        raise StackError(f"{type(pipe).__name__}'s scheduler: {str(error).splitlines()[0]}") from None
    try:
        layout = caching.get_model_layout(denoiser)
        kind = layout.kind
        num_blocks = (len(caching.layouts.transformer_blocks(denoiser, layout)) if kind == "transformer"
                      else None)
    except ValueError:
        kind, num_blocks = "other", None
    guidance = stack.guidance
    mode = ("none" if not guidance.has_uncond_pass else
            "batched" if branch_mode(type(pipe)) == "batched" else "separate")
    identity = None
    if stack.adapters:
        from accel.lab.fingerprint import module_identity

        identity = module_identity(denoiser)
    return RunInfo(model_class=type(denoiser).__name__, model_kind=kind, prediction_type=probe.prediction,
                   num_steps=stack.sampler.steps, guidance=mode, num_blocks=num_blocks,
                   noise_family=probe.model_schedule.name, pipeline_class=type(pipe).__name__,
                   supports_lora=hasattr(pipe, "load_lora_weights"), schedule=walk.describe(),
                   starts_mid_walk="strength" in inspect.signature(type(pipe).__call__).parameters,
                   context_parallel=context_parallel_size(denoiser), model_identity=identity)


def pipeline_denoisers(pipe: Any) -> list[tuple[str, torch.nn.Module]]:
    """Every denoiser of the pipeline the stack acts on, the primary one first."""
    found = [(name, unwrap_compiled(getattr(pipe, name))) for name in DENOISER_ATTRIBUTES
             if isinstance(getattr(pipe, name, None), torch.nn.Module)]
    if not found:
        primary_denoiser(pipe)  # raises the one-line error
    return found
